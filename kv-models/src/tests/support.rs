//! Helpers shared by the model tests: tiny configs, token tensors, comparisons, temporary folders.

use crate::*;
use burn::prelude::*;
use kv_core::LayerCache;

pub(crate) fn tiny(n_heads: usize, n_kv_heads: usize) -> DecoderConfig {
    DecoderConfig::new(64, 32, 2, n_heads, n_kv_heads, 48)
}

pub(crate) fn tokens<B: Backend>(ids: &[i32], dev: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(ids, dev).reshape([1, ids.len()])
}

pub(crate) fn sequence(len: usize) -> Vec<i32> {
    (0..len).map(|i| ((i * 29 + 7) % 64) as i32).collect()
}

pub(crate) fn max_abs_diff<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

pub(crate) fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub(crate) fn train_config(steps: usize) -> train::TrainConfig {
    serde_json::from_value(serde_json::json!({
        "seq_len": 96, "batch_size": 4, "grad_accum": 2, "steps": steps, "lr": 0.003, "warmup_steps": 2,
        "tasks": ["recall"], "task_fraction": 0.5, "eval_every": 0, "eval_windows": 2, "eval_task_samples": 2,
        "checkpoint_every": 0, "seed": 7, "short_seq_len": 24, "short_steps": 4
    }))
    .unwrap()
}

/// Every float parameter of a model, flattened in visiting order.
pub(crate) fn params<B: Backend, M: burn::module::Module<B>>(m: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
            self.0.extend(p.val().into_data().iter::<f32>());
        }
    }
    let mut c = Collect(vec![]);
    m.visit(&mut c);
    c.0
}

pub(crate) fn step_losses(dir: &std::path::Path) -> Vec<(usize, f64)> {
    train::read_log(dir)
        .unwrap()
        .into_iter()
        .filter_map(|l| match l {
            train::LogLine::Step(m) => Some((m.step, m.loss)),
            _ => None,
        })
        .collect()
}

/// A small MLA decoder: 2 layers, d_model 32, `heads` heads of 8, latent 12, RoPE 4.
pub(crate) fn tiny_mla(heads: usize, query_latent: usize) -> DecoderConfig {
    DecoderConfig::new(64, 32, 2, heads, 1, 48).with_mla(Some(MlaSettings {
        query_latent,
        ..MlaSettings::new(8, 12, 4)
    }))
}

/// Logits of a prefill of `split` tokens, then one decode step per remaining token.
pub(crate) fn decode_logits<B: Backend>(
    model: &DecoderLm<B>,
    ids: &[i32],
    split: usize,
    dev: &B::Device,
) -> (Tensor<B, 3>, crate::model::state::ModelState<B>) {
    let mut cache = model.new_state(1);
    let mut parts = vec![
        model
            .forward_cached(tokens(&ids[..split], dev), &mut cache)
            .unwrap(),
    ];
    for &id in &ids[split..] {
        parts.push(
            model
                .forward_cached(tokens(&[id], dev), &mut cache)
                .unwrap(),
        );
    }
    (Tensor::cat(parts, 1), cache)
}

/// Every element of a float tensor, in order.
pub(crate) fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Original positions per (batch row, KV head) of the slots kept (lazily evicted ones left out),
/// for rectangular and ragged caches alike.
pub(crate) fn kept<B: Backend>(c: &LayerCache<B>) -> Vec<Vec<i64>> {
    c.kept_positions()
}

/// Asserts each config's `init` succeeds where its expectation starts with `"fine"` and otherwise fails
/// with an error that contains the expectation.
pub(crate) fn assert_init_outcomes<B: Backend>(cases: &[(DecoderConfig, &str)], dev: &B::Device) {
    for (cfg, want) in cases {
        match cfg.init::<B>(dev) {
            Ok(_) => assert!(want.starts_with("fine"), "{cfg:?} should fail with {want}"),
            Err(e) => assert!(e.to_string().contains(want), "{e} should mention {want}"),
        }
    }
}

/// Decodes `ids` (a prompt of 20, then one token per step) under each policy spec and asserts
/// the logits equal `want` (1e-5) and the caches hold `slots` slots in all.
pub(crate) fn assert_specs_match_full_cache<B: Backend>(
    model: &DecoderLm<B>,
    ids: &[i32],
    specs: &[&str],
    want: Tensor<B, 3>,
    slots: usize,
    dev: &B::Device,
) {
    for spec in specs {
        let mut policy = kv_policies::build_policy::<B>(spec).unwrap();
        let mut cache = model.new_state(1);
        let mut parts = vec![
            model
                .forward_with_policy(
                    tokens(&ids[..20], dev),
                    &mut cache,
                    policy.as_mut(),
                    kv_policies::Phase::Prefill,
                )
                .unwrap(),
        ];
        for (step, &id) in ids[20..].iter().enumerate() {
            let phase = kv_policies::Phase::Decode { step: step + 1 };
            parts.push(
                model
                    .forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase)
                    .unwrap(),
            );
        }
        let diff = max_abs_diff(Tensor::cat(parts, 1), want.clone());
        assert!(diff <= 1e-5, "{spec}: {diff}");
        assert_eq!(cache.stats().total_slots(), slots, "{spec}");
    }
}
