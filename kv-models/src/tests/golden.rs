//! Regression golden: the slots every policy keeps and the logits it decodes with, on every
//! architecture, recorded once and compared on every run, so a refactor of the policies or the
//! models cannot change a decision or a number unnoticed. The models are checkpoints committed
//! with the golden (`testdata/golden/<arch>/`), written in checkpoint format 1 before the
//! decoder took one type per architecture, so the comparison also proves that checkpoints
//! written before a change still load after it. Recording keeps them: it writes a checkpoint
//! only where none exists.
//!
//! Record again (only after a change that is meant to alter results) with
//! `KV_RECORD_GOLDEN=1 cargo nextest run -p kv-models -E 'test(policy_golden)'`.

use super::support::*;
use crate::*;
use burn::backend::Flex;
use burn::prelude::*;
use kv_policies::{PolicyEnv, TokenClasses, build_policy_in};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

type B = Flex;

const PROMPT: usize = 40;
const DECODE: usize = 16;

/// Policies with the parameters that exercise each code path (schedules, re-rotation, sinks,
/// normalisation, every AdaKV scorer).
const SPECS: &[&str] = &[
    "full",
    "streaming:budget=20",
    "streaming:budget=20,rerotate=true",
    "streaming:budget=0.5,sinks=2,every=4",
    "h2o:budget=20",
    "h2o:budget=0.5,recent=0.25,normalize=true,sinks=2",
    "vatp:budget=20",
    "knorm:budget=20,skip=1",
    "knorm:budget=0.5,skip=0,every=3",
    "snapkv:budget=20,window=8,kernel=3",
    "snapkv:budget=0.5,window=4,kernel=1,pool=avg,every=5",
    "tova:budget=20",
    "pyramidkv:budget=20,window=4,kernel=3,beta=4",
    "adakv:budget=20,window=8,kernel=3",
    "adakv:budget=20,scorer=h2o,min_share=0.5",
    "adakv:budget=20,scorer=vatp",
    "adakv:budget=20,scorer=knorm,skip=1",
    "adakv:budget=20,scorer=tova",
    "fastgen:recover=0.6,local=0.25,frequent=0.25",
];

fn architectures() -> Vec<(&'static str, DecoderConfig)> {
    let base = |kv| DecoderConfig::new(64, 32, 2, 8, kv, 48);
    let yoco = |kind| YocoSettings {
        self_attention: kind,
        window: 8,
        chunk: 4,
        tau: 16.0,
    };
    vec![
        ("mha", base(8)),
        ("gqa", base(2)),
        (
            "gqa-shift",
            base(2)
                .with_token_shift(true)
                .with_token_shift_width(Some(2))
                .with_key_shift(Some(true)),
        ),
        (
            "mla",
            DecoderConfig::new(64, 32, 2, 4, 1, 48).with_mla(Some(MlaSettings::new(8, 12, 4))),
        ),
        (
            "yoco-window",
            DecoderConfig::new(64, 32, 2, 4, 2, 48)
                .with_yoco(Some(yoco(SelfAttentionKind::Window))),
        ),
        (
            "yoco-retention",
            DecoderConfig::new(64, 32, 2, 4, 2, 48)
                .with_yoco(Some(yoco(SelfAttentionKind::Retention))),
        ),
    ]
}

/// What one policy did on one architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Run {
    /// Original positions kept per policy-managed layer and (batch row 0) KV head, after prefill.
    kept_prefill: Vec<Vec<Vec<i64>>>,
    /// The same after the last decode step.
    kept_end: Vec<Vec<Vec<i64>>>,
    /// Last-row logits after prefill and after every decode step.
    logits: Vec<Vec<f32>>,
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/golden")
}

fn sequence() -> Vec<i32> {
    (0..PROMPT + DECODE)
        .map(|i| ((i * 29 + 7) % 64) as i32)
        .collect()
}

fn run(model: &DecoderLm<B>, spec: &str) -> Run {
    let dev = Default::default();
    let env = PolicyEnv::with_classes(TokenClasses::new(64, [7], [1, 2, 3, 4]));
    let mut policy = build_policy_in::<B>(spec, &env).unwrap();
    let ids = sequence();
    let tokens = |ids: &[i32]| Tensor::<B, 1, Int>::from_ints(ids, &dev).reshape([1, ids.len()]);
    let mut cache = model.new_state(1);
    let kept_all = |cache: &crate::model::state::ModelState<B>| {
        (0..cache.num_layers())
            .map(|l| kept(cache.layer(l)))
            .collect::<Vec<_>>()
    };
    let row = |l: Tensor<B, 3>| {
        let t = l.dims()[1];
        l.narrow(1, t - 1, 1)
            .into_data()
            .iter::<f32>()
            .collect::<Vec<f32>>()
    };
    let mut logits = vec![row(model
        .forward_with_policy(
            tokens(&ids[..PROMPT]),
            &mut cache,
            policy.as_mut(),
            kv_policies::Phase::Prefill,
        )
        .unwrap())];
    let kept_prefill = kept_all(&cache);
    for (step, &id) in ids[PROMPT..].iter().enumerate() {
        logits.push(row(model
            .forward_with_policy(
                tokens(&[id]),
                &mut cache,
                policy.as_mut(),
                kv_policies::Phase::Decode { step: step + 1 },
            )
            .unwrap()));
    }
    Run {
        kept_prefill,
        kept_end: kept_all(&cache),
        logits,
    }
}

#[test]
fn policy_golden_kept_sets_and_logits_are_unchanged() {
    let dev = Default::default();
    let record = std::env::var_os("KV_RECORD_GOLDEN").is_some();
    for (arch, config) in architectures() {
        let dir = golden_dir().join(arch);
        if record && !dir.join(CHECKPOINT_FILE).is_file() {
            <B as burn::tensor::backend::Backend>::seed(&dev, 17);
            let model = config.init::<B>(&dev).unwrap();
            save_model(&model, &config, &dir).unwrap();
        }
        let (model, _) = load_model::<B>(&dir, &dev)
            .unwrap_or_else(|e| panic!("{arch}: the golden checkpoint loads: {e}"));
        let runs: BTreeMap<String, Run> = SPECS
            .iter()
            .map(|s| (s.to_string(), run(&model, s)))
            .collect();
        let file = dir.join("runs.json");
        if record {
            std::fs::write(&file, serde_json::to_string(&runs).unwrap()).unwrap();
            continue;
        }
        let golden: BTreeMap<String, Run> =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        assert_eq!(
            golden.keys().collect::<Vec<_>>(),
            runs.keys().collect::<Vec<_>>(),
            "{arch}: the same policies"
        );
        for (spec, want) in &golden {
            let got = &runs[spec];
            assert_eq!(
                got.kept_prefill, want.kept_prefill,
                "{arch} {spec}: slots kept after prefill"
            );
            assert_eq!(
                got.kept_end, want.kept_end,
                "{arch} {spec}: slots kept after decoding"
            );
            assert_eq!(got.logits.len(), want.logits.len());
            for (step, (g, w)) in got.logits.iter().zip(&want.logits).enumerate() {
                let diff = g
                    .iter()
                    .zip(w)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    diff <= 1e-5,
                    "{arch} {spec}: logits of step {step} differ by {diff}"
                );
            }
        }
    }
}
