//! Key-norm eviction (Devoto et al., EMNLP 2024): keep the keys with the lowest L2 norm.

use crate::select::{keep_top_k, over_budget};
use crate::{CachePolicy, LayerContext, PolicySpec, Schedule, Scorer};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{Budget, LayerCache, Result};

/// Keeps, per KV head, the slots whose keys have the smallest L2 norm; needs no attention
/// probabilities. RoPE is a rotation, so the norm of a cached (rotated) key equals its raw norm.
#[derive(Debug, Clone, PartialEq)]
pub struct KnormPolicy {
    /// Slots kept per KV head.
    pub budget: Budget,
    /// The first `skip_layers` layers are never pruned (their norm/attention link is weak).
    pub skip_layers: usize,
    /// When to evict.
    pub schedule: Schedule,
}

impl KnormPolicy {
    /// Parses `knorm:budget=..,skip=2,every=1`. The default skips layers 0 and 1, as the paper's
    /// code does (l2compress's README: "we skip compression of the first two layers"), because
    /// there a low key norm does not mean high attention; kvpress's `KnormPress` prunes every
    /// layer (`skip=0`).
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let p = spec.params(&["budget", "skip", "every"])?;
        Ok(Self { budget: p.budget("budget", Budget::Ratio(0.5))?, skip_layers: p.usize("skip", 2)?, schedule: p.schedule(Schedule::EveryStep)? })
    }
}

impl<B: Backend> CachePolicy<B> for KnormPolicy {
    fn name(&self) -> String {
        format!("knorm(budget={},skip={})", self.budget, self.skip_layers)
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        ObserveRequest { key_norms: !self.skips_layer(ctx), ..Default::default() }
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        if self.skips_layer(ctx) {
            return Ok(());
        }
        let Some((_, k)) = over_budget(self.schedule, self.budget, ctx.phase, cache) else { return Ok(()) };
        let scores = self.score(ctx, cache, obs, k)?;
        keep_top_k(cache, scores, k)
    }
}

impl<B: Backend> Scorer<B> for KnormPolicy {
    /// Minus the squared L2 norm of the keys attention scores at each slot, summed over the KV
    /// head's query group: the smallest norms score highest. The attention reports the norms
    /// (MLA's are of its up-projected keys, not of the cached latent); a cache observed without
    /// them is scored by the keys it holds.
    fn score(&self, _: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>, _: usize) -> Result<Tensor<B, 3>> {
        let norms = obs.and_then(|o| o.key_norms.clone()).unwrap_or_else(|| cache.keys().powi_scalar(2).sum_dim(3).squeeze_dim::<3>(3));
        Ok(norms.neg())
    }

    fn skips_layer(&self, ctx: &LayerContext<'_, B>) -> bool {
        ctx.layer < self.skip_layers
    }
}
