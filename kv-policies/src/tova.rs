//! TOVA, token omission via attention (Oren et al., 2024): keep what the current query attends to.

use crate::select::{keep_top_k, over_budget};
use crate::{CachePolicy, LayerContext, PolicySpec, Schedule, Scorer};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{Budget, KvError, LayerCache, Result};

/// Once the cache is over budget, evicts the slots the latest query attends to least, with the
/// attention averaged over all heads of the layer: one decision per layer, as in the paper, so
/// every KV head keeps the same positions.
#[derive(Debug, Clone, PartialEq)]
pub struct TovaPolicy {
    /// Slots kept per KV head.
    pub budget: Budget,
    /// When to evict.
    pub schedule: Schedule,
}

impl TovaPolicy {
    /// Parses `tova:budget=..,every=1`.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let p = spec.params(&["budget", "every"])?;
        Ok(Self { budget: p.budget("budget", Budget::Ratio(0.5))?, schedule: p.schedule(Schedule::EveryStep)? })
    }
}

impl<B: Backend> CachePolicy<B> for TovaPolicy {
    fn name(&self) -> String {
        format!("tova(budget={})", self.budget)
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        ObserveRequest { window: if self.schedule.is_due(ctx.phase) { 1 } else { 0 }, ..Default::default() }
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        let Some((_, k)) = over_budget(self.schedule, self.budget, ctx.phase, cache) else { return Ok(()) };
        let scores = self.score(ctx, cache, obs, k)?;
        keep_top_k(cache, scores, k)
    }
}

impl<B: Backend> Scorer<B> for TovaPolicy {
    /// The latest query's attention averaged over the layer's query heads, the same for every KV head.
    fn score(&self, _: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>, _: usize) -> Result<Tensor<B, 3>> {
        let probs = obs
            .and_then(|o| o.window.clone())
            .ok_or_else(|| KvError::config("tova observation", "none", "the last query's attention"))?;
        let [b, h, w, n] = probs.dims();
        let last = probs.narrow(2, w - 1, 1).reshape([b, h, n]);
        Ok(last.mean_dim(1).expand([b, cache.shape().kv_heads, n]))
    }
}
