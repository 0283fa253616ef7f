//! H2O, the heavy-hitter oracle (Zhang et al., NeurIPS 2023): accumulated attention plus a
//! recent window.

use crate::select::{group_sum, keep_top_k, over_budget, protect, recent_mask, sink_mask};
use crate::{CachePolicy, LayerContext, PolicySpec, Schedule, Scorer};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{Budget, KvError, LayerCache, Result};

/// Side channel holding each slot's accumulated attention (summed over its GQA group; VATP's
/// weighted by value norms).
pub const ACC_CHANNEL: &str = "h2o.acc";

/// Keeps the slots with the most accumulated attention plus a recent window.
///
/// Attention is accumulated over prefill (column sums, block by block) and every decode step, in
/// a side channel of the cache, so it moves with its slot on every eviction. Scores of the query
/// heads of a GQA group are summed into one score per KV head.
#[derive(Debug, Clone, PartialEq)]
pub struct H2oPolicy {
    /// Slots kept per KV head.
    pub budget: Budget,
    /// Fraction of the budget reserved for the most recent tokens (the rest are heavy hitters).
    pub recent: f32,
    /// Divide each slot's accumulated attention by the number of queries that could see it
    /// (kvpress's observed-attention variant); off in the original.
    pub normalize: bool,
    /// Leading tokens never evicted (0 in the original H2O).
    pub sinks: usize,
    /// Weight each step's attention by the L1 norm of the value each query head reads from the
    /// slot before accumulating it (VATP).
    pub value_aware: bool,
    /// When to evict (scores accumulate every step regardless).
    pub schedule: Schedule,
}

impl H2oPolicy {
    /// Parses `h2o:budget=..,recent=0.5,normalize=false,sinks=0,every=1`.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let p = spec.params(&["budget", "recent", "normalize", "sinks", "every"])?;
        Ok(Self {
            budget: p.budget("budget", Budget::Ratio(0.5))?,
            recent: p.f32_in("recent", 0.5, 0.0, 1.0)?,
            normalize: p.bool("normalize", false)?,
            sinks: p.usize("sinks", 0)?,
            value_aware: false,
            schedule: p.schedule(Schedule::EveryStep)?,
        })
    }

    /// The eviction scores of the slots held, `[b, kv_heads, n]`, before protection.
    pub fn scores<B: Backend>(&self, cache: &LayerCache<B>) -> Result<Tensor<B, 3>> {
        let mut s = cache.side(ACC_CHANNEL)?;
        if self.normalize {
            // Queries at positions >= pos saw the slot: tokens_seen - pos of them.
            let seen = cache.positions().neg().add_scalar(cache.tokens_seen() as i64).float();
            s = s / seen;
        }
        Ok(s)
    }
}

impl<B: Backend> CachePolicy<B> for H2oPolicy {
    fn name(&self) -> String {
        let base = if self.value_aware { "vatp" } else { "h2o" };
        format!("{base}(budget={},recent={}{})", self.budget, self.recent, if self.normalize { ",normalized" } else { "" })
    }

    fn observe_request(&self, _: &LayerContext<'_, B>) -> ObserveRequest {
        ObserveRequest { column_sums: true, value_norms: self.value_aware, ..Default::default() }
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        self.accumulate(cache, obs)?;
        let Some((_, k)) = over_budget(self.schedule, self.budget, ctx.phase, cache) else { return Ok(()) };
        let scores = self.protected_scores(cache, k)?;
        keep_top_k(cache, scores, k)
    }
}

impl H2oPolicy {
    /// Adds this call's attention column sums (VATP: each query head's times the L1 norm of the
    /// value it reads) to every slot's accumulated score.
    fn accumulate<B: Backend>(&self, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        let mut sums = obs
            .and_then(|o| o.column_sums.clone())
            .ok_or_else(|| KvError::config("h2o observation", "none", "attention column sums (the model ignored the policy's request)"))?;
        if self.value_aware {
            let [b, h, n] = sums.dims();
            let norms = obs.and_then(|o| o.value_norms.clone()).unwrap_or_else(|| {
                // Observed without norms: the values the cache holds are the ones read.
                let kv = cache.shape().kv_heads;
                cache.values().abs().sum_dim(3).reshape([b, kv, 1, n]).expand([b, kv, h / kv, n]).reshape([b, h, n])
            });
            sums = sums * norms;
        }
        cache.add_side(ACC_CHANNEL);
        let acc = cache.side(ACC_CHANNEL)? + group_sum(sums, cache.shape().kv_heads);
        cache.set_side(ACC_CHANNEL, acc)
    }

    /// The scores with the recent share of a `k`-slot budget and the sinks protected.
    fn protected_scores<B: Backend>(&self, cache: &LayerCache<B>, k: usize) -> Result<Tensor<B, 3>> {
        let window = ((k as f32 * self.recent).round() as usize).min(k);
        let mut scores = protect(self.scores(cache)?, recent_mask(cache.slots(), window, &cache.device()));
        if self.sinks > 0 {
            scores = protect(scores, sink_mask(cache, self.sinks));
        }
        Ok(scores)
    }
}

impl<B: Backend> Scorer<B> for H2oPolicy {
    fn score(&self, _: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>, k: usize) -> Result<Tensor<B, 3>> {
        self.accumulate(cache, obs)?;
        self.protected_scores(cache, k)
    }
}
