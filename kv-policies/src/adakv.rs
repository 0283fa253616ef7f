//! Ada-KV (Feng et al., 2024): one top-k across the heads of a layer, so heads get unequal
//! budgets, with a minimum share per head; it wraps any scorer.

use crate::select::{protect, top_k_indices};
use crate::{CachePolicy, LayerContext, Phase, PolicySpec, Scorer, build_scorer};
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{Budget, KvError, LayerCache, Result};

/// Scorers AdaKV can wrap.
pub const ADAKV_SCORERS: &[&str] = &["snapkv", "h2o", "vatp", "tova", "knorm"];

/// Keeps the layer's `kv_heads x k` best slots wherever they are, after guaranteeing every KV
/// head its `min_share x k` best ones, so heads whose attention is concentrated give budget to
/// heads whose attention is spread. Acts once, at the end of prefill (as the paper and kvpress
/// do); the heads' unequal slot counts are held in ragged storage, so the bytes really shrink.
pub struct AdaKvPolicy<B: Backend> {
    /// Mean slots kept per KV head (the layer keeps `kv_heads` times this many).
    pub budget: Budget,
    /// Share of the mean budget every head keeps whatever the scores (the paper's safeguard, 0.2).
    pub min_share: f32,
    scorer: Box<dyn Scorer<B>>,
}

impl<B: Backend> AdaKvPolicy<B> {
    /// Wraps `scorer` with a layer-wide budget.
    pub fn new(budget: Budget, min_share: f32, scorer: Box<dyn Scorer<B>>) -> Self {
        Self { budget, min_share, scorer }
    }

    /// Parses `adakv:budget=0.5,min_share=0.2,scorer=snapkv,...`; the other parameters go to the
    /// scorer (`window`, `kernel`, `pool` for SnapKV, `recent` for H2O, ...).
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        if let Some((_, every)) = spec.pairs().find(|(k, _)| *k == "every") {
            return Err(KvError::config("adakv:every", every, "no schedule: AdaKV compresses once, at the end of prefill"));
        }
        let scorer_name = spec.pairs().find(|(k, _)| *k == "scorer").map_or("snapkv", |(_, v)| v);
        if !ADAKV_SCORERS.contains(&scorer_name) {
            return Err(KvError::config("adakv:scorer", scorer_name, format!("one of {}", ADAKV_SCORERS.join(", "))));
        }
        let own = ["budget", "min_share", "scorer"];
        // The scorer checks its own parameters; AdaKV reads only its own here.
        let p = spec.params(&spec.pairs().map(|(k, _)| k).collect::<Vec<_>>())?;
        let budget = p.budget("budget", Budget::Ratio(0.5))?;
        let min_share = p.f32_in("min_share", 0.2, 0.0, 1.0)?;
        let rest: Vec<String> = spec.pairs().filter(|(k, _)| !own.contains(k)).map(|(k, v)| format!("{k}={v}")).collect();
        let scorer = build_scorer::<B>(&format!("{scorer_name}:{}", rest.join(",")))?;
        Ok(Self::new(budget, min_share, scorer))
    }

    /// The slots to keep per (batch row, KV head): `scores` `[b, kv_heads, n]`, `k` kept per head
    /// on average, at least `max(1, min_share x k)` per head.
    pub fn select(&self, scores: Tensor<B, 3>, k: usize) -> Vec<Vec<usize>> {
        let [b, kv, n] = scores.dims();
        let safe = ((self.min_share * k as f32).floor() as usize).clamp(1, k);
        // Each head's `safe` best slots become unbeatable before the layer-wide top-k: exactly
        // those slots (marked by index, so ties at the threshold protect no more than `safe`).
        let scores = if safe < n {
            let best = top_k_indices(scores.clone(), safe);
            let marks = Tensor::<B, 3>::zeros([b, kv, n], &scores.device()).scatter(2, best, Tensor::ones([b, kv, safe], &scores.device()), IndexingUpdateOp::Add);
            protect(scores, marks.greater_elem(0.5))
        } else {
            scores
        };
        let total = kv * k;
        let flat = scores.reshape([b, kv * n]);
        let picked: Vec<i64> = if total < kv * n {
            // One host read per layer, once per generation: ragged storage needs the sizes.
            top_k_indices(flat.reshape([b, 1, kv * n]), total).into_data().iter::<i64>().collect()
        } else {
            (0..b).flat_map(|_| 0..(kv * n) as i64).collect()
        };
        let per_row = total.min(kv * n);
        let mut keep = vec![Vec::new(); b * kv];
        for (row, chunk) in picked.chunks(per_row).enumerate() {
            for &f in chunk {
                let f = f as usize;
                keep[row * kv + f / n].push(f % n);
            }
        }
        keep.iter_mut().for_each(|k| k.sort_unstable());
        keep
    }
}

impl<B: Backend> CachePolicy<B> for AdaKvPolicy<B> {
    fn name(&self) -> String {
        format!("adakv(budget={},min_share={},{})", self.budget, self.min_share, self.scorer.name())
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        match ctx.phase {
            Phase::Prefill => self.scorer.observe_request(ctx),
            Phase::Decode { .. } => ObserveRequest::default(),
        }
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        if ctx.phase != Phase::Prefill || self.scorer.skips_layer(ctx) {
            return Ok(());
        }
        let k = self.budget.slots_for(cache.tokens_seen());
        if cache.slots() <= k {
            return Ok(());
        }
        let scores = self.scorer.score(ctx, cache, obs, k)?;
        let keep = self.select(scores, k);
        cache.retain_per_head(&keep)
    }
}
