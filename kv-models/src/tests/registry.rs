//! A scoring method added from outside kv-policies, in this file alone: registered once, it is
//! named in specs, run by the models, wrapped by AdaKV and swept by the evaluation grid.

use super::support::*;
use crate::eval::grid::{GridModel, GridSpec, Probe, run_grid};
use crate::*;
use burn::prelude::*;
use kv_core::{LayerCache, Observation, ObserveRequest, Result};
use kv_policies::{LayerContext, Params, PolicyEnv, Registry, Schedule, Scorer, SpecParams};
use serde::{Deserialize, Serialize};

/// Keeps, in KV head `h`, the slots whose position has the parity of `h + offset`, newest first:
/// a made-up score whose kept sets are known in advance.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ParityScorer {
    offset: usize,
}

impl SpecParams for ParityScorer {
    const KEYS: &'static [&'static str] = &["offset"];

    fn from_params(p: &Params<'_>) -> Result<Self> {
        Ok(Self {
            offset: p.usize("offset", 0)?,
        })
    }
}

impl<B: Backend> Scorer<B> for ParityScorer {
    fn name(&self) -> String {
        format!("parity(offset={})", self.offset)
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, _: bool) -> ObserveRequest {
        ObserveRequest::default()
    }

    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        _: Option<&Observation<B>>,
        _: usize,
    ) -> Result<Tensor<B, 3>> {
        let [b, kv, n] = cache.positions().dims();
        let head = Tensor::<B, 1, Int>::arange(0..kv as i64, &cache.device())
            .reshape([1, kv, 1])
            .expand([b, kv, n]);
        let pos = cache.positions();
        let matches = (pos.clone() + head)
            .add_scalar(self.offset as i64)
            .remainder_scalar(2)
            .equal_elem(0);
        Ok(pos.clone().float() + matches.float().mul_scalar(1e6))
    }
}

fn registry<B: Backend>() -> Registry<B> {
    let mut r = Registry::standard();
    r.register_scorer::<ParityScorer>(
        "parity",
        "positions of the head's parity",
        Schedule::PrefillOnly,
        true,
    );
    r
}

fn a_scorer_registered_outside_the_crate_runs_through_specs_adakv_and_the_grid<B: Backend>(
    dev: &B::Device,
) {
    let r = registry::<B>();
    assert!(r.names().contains(&"parity") && r.per_head_scorers("snapkv").contains(&"parity"));
    assert!(r.help().contains("parity") && r.help().contains("offset"));
    assert!(
        !Registry::<B>::standard().names().contains(&"parity"),
        "the standard registry is untouched"
    );
    let e = r
        .build("parity:offst=1", &PolicyEnv::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("offst") && e.contains("offset"), "{e}");

    let model = DecoderConfig::new(256, 32, 2, 4, 2, 48)
        .init::<B>(dev)
        .unwrap();
    let ids: Vec<i32> = (0..20).map(|i| i * 7 % 64).collect();
    let prompt = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), dev).reshape([1, 20]);
    let evens: Vec<i64> = (0..20).step_by(2).collect();
    let odds: Vec<i64> = (1..20).step_by(2).collect();
    // Per-head top-k, through a spec: head 0 keeps the evens, head 1 the odds (offset 1 swaps them).
    for (spec, want) in [
        ("parity:budget=10", vec![evens.clone(), odds.clone()]),
        (
            "parity:budget=10,offset=1",
            vec![odds.clone(), evens.clone()],
        ),
    ] {
        let mut policy = r.build(spec, &PolicyEnv::default()).unwrap();
        let mut cache = model.new_state(1);
        model
            .forward_with_policy(
                prompt.clone(),
                &mut cache,
                policy.as_mut(),
                kv_policies::Phase::Prefill,
            )
            .unwrap();
        for l in 0..2 {
            assert_eq!(kept(cache.layer(l)), want, "{spec} layer {l}");
        }
    }
    // AdaKV over it: the layer-wide top-k of 2 x 6 slots takes each head's 10 parity slots first.
    let mut policy = r
        .build(
            "adakv:scorer=parity,budget=6,min_share=0.5",
            &PolicyEnv::default(),
        )
        .unwrap();
    let mut cache = model.new_state(1);
    model
        .forward_with_policy(
            prompt,
            &mut cache,
            policy.as_mut(),
            kv_policies::Phase::Prefill,
        )
        .unwrap();
    let kept = kept(cache.layer(0));
    assert_eq!(kept.iter().map(Vec::len).sum::<usize>(), 12, "{kept:?}");
    assert!(
        kept[0].iter().all(|p| p % 2 == 0) && kept[1].iter().all(|p| p % 2 == 1),
        "{kept:?}"
    );
    // The grid: its compression axis sets the budget, and the cell holds half the full cache.
    let spec = GridSpec {
        policies: vec!["full".into(), "parity:offset=1".into()],
        compressions: vec![0.5],
        probes: vec![Probe::Ppl],
        contexts: vec![48],
        depths: vec![],
        samples: 1,
        windows: 1,
        ppl_prompt: 0.5,
        seed: 3,
        niah: Default::default(),
        ppl_chunk: 1,
        allow_beyond_context: false,
    };
    assert!(
        spec.cells(&["m".to_string()], &Registry::<B>::standard())
            .is_err(),
        "the standard registry does not know it"
    );
    let cells = spec.cells(&["m".to_string()], &r).unwrap();
    assert_eq!(
        cells.iter().map(|c| c.spec.as_str()).collect::<Vec<_>>(),
        vec!["full", "parity:offset=1,budget=0.5"]
    );
    let text = data::TextSource::Stories.load(0).unwrap().1;
    let models = [GridModel {
        label: "m".into(),
        model: &model,
        tokenizer: Tokenizer::Bytes,
        text,
    }];
    let results = run_grid(&models, &cells, &spec, &r, |_| {}).unwrap();
    let (full, parity) = (&results[0], &results[1]);
    assert!(parity.perplexity.unwrap().is_finite());
    assert!(
        parity.kv_bytes < full.kv_bytes,
        "{} vs {}",
        parity.kv_bytes,
        full.kv_bytes
    );
}

kv_core::backend_tests!(
    a_scorer_registered_outside_the_crate_runs_through_specs_adakv_and_the_grid
);
