//! H2O, the heavy-hitter oracle (Zhang et al., NeurIPS 2023): accumulated attention plus a
//! recent window.

use crate::select::{group_sum, protect, protect_recent_slots, sink_mask};
use crate::{LayerContext, Params, Scorer, SpecParams};
use burn::prelude::*;
use kv_core::{KvError, LayerCache, Observation, ObserveRequest, Result};
use serde::{Deserialize, Serialize};

/// Side channel holding each slot's accumulated attention (summed over its GQA group; VATP's
/// weighted by value norms).
pub const ACC_CHANNEL: &str = "h2o.acc";

/// Scores slots by the attention they have accumulated, the recent window (and sinks) protected.
///
/// Attention is accumulated over prefill (column sums, block by block) and every decode step, in
/// a side channel of the cache, so it moves with its slot on every eviction. Scores of the query
/// heads of a GQA group are summed into one score per KV head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct H2oScorer {
    /// Fraction of the budget reserved for the most recent tokens (the rest are heavy hitters).
    pub recent: f32,
    /// Divide each slot's accumulated attention by the number of queries that could see it
    /// (kvpress's observed-attention variant); off in the original.
    pub normalize: bool,
    /// Leading tokens never evicted (0 in the original H2O).
    pub sinks: usize,
}

impl Default for H2oScorer {
    fn default() -> Self {
        Self {
            recent: 0.5,
            normalize: false,
            sinks: 0,
        }
    }
}

impl SpecParams for H2oScorer {
    const KEYS: &'static [&'static str] = &["recent", "normalize", "sinks"];

    fn from_params(p: &Params<'_>) -> Result<Self> {
        let d = Self::default();
        Ok(Self {
            recent: p.f32_in("recent", d.recent, 0.0, 1.0)?,
            normalize: p.bool("normalize", d.normalize)?,
            sinks: p.usize("sinks", d.sinks)?,
        })
    }
}

impl H2oScorer {
    /// The accumulated scores of the slots held, `[b, kv_heads, n]`, before protection.
    pub fn accumulated<B: Backend>(&self, cache: &LayerCache<B>) -> Result<Tensor<B, 3>> {
        let s = cache.side(ACC_CHANNEL)?;
        if !self.normalize {
            return Ok(s);
        }
        // Queries at positions >= pos saw the slot: tokens_seen - pos of them.
        let seen = cache
            .positions()
            .neg()
            .add_scalar(cache.tokens_seen() as i64)
            .float();
        Ok(s / seen)
    }
}

impl<B: Backend> Scorer<B> for H2oScorer {
    fn name(&self) -> String {
        format!(
            "h2o(recent={}{}{})",
            self.recent,
            if self.normalize { ",normalized" } else { "" },
            sinks_label(self.sinks)
        )
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, _: bool) -> ObserveRequest {
        // Every call's attention counts, whether or not a selection follows it.
        ObserveRequest {
            column_sums: true,
            ..Default::default()
        }
    }

    fn observe(
        &self,
        _: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        accumulate(cache, column_sums(obs, "h2o")?)
    }

    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        _: Option<&Observation<B>>,
        k: usize,
    ) -> Result<Tensor<B, 3>> {
        Ok(protect_recent(
            cache,
            self.accumulated(cache)?,
            k,
            self.recent,
            self.sinks,
        ))
    }
}

pub(crate) fn sinks_label(sinks: usize) -> String {
    if sinks > 0 {
        format!(",sinks={sinks}")
    } else {
        String::new()
    }
}

/// This call's attention column sums `[b, heads, n]`, or an error naming the scorer that needed them.
pub(crate) fn column_sums<B: Backend>(
    obs: Option<&Observation<B>>,
    scorer: &str,
) -> Result<Tensor<B, 3>> {
    obs.and_then(|o| o.column_sums.clone()).ok_or_else(|| {
        KvError::config(
            format!("{scorer} observation"),
            "none",
            "attention column sums (the model ignored the policy's request)",
        )
    })
}

/// Adds per-query-head `sums` `[b, heads, n]`, summed over each GQA group, to every slot's
/// accumulated score.
pub(crate) fn accumulate<B: Backend>(cache: &mut LayerCache<B>, sums: Tensor<B, 3>) -> Result<()> {
    cache.add_side(ACC_CHANNEL);
    let acc = cache.side(ACC_CHANNEL)? + group_sum(sums, cache.shape().kv_heads);
    cache.set_side(ACC_CHANNEL, acc)
}

/// `scores` with the `recent` share of a `k`-slot budget and the first `sinks` positions protected.
pub(crate) fn protect_recent<B: Backend>(
    cache: &LayerCache<B>,
    scores: Tensor<B, 3>,
    k: usize,
    recent: f32,
    sinks: usize,
) -> Tensor<B, 3> {
    let window = ((k as f32 * recent).round() as usize).min(k);
    let scores = protect_recent_slots(scores, window);
    if sinks > 0 {
        protect(scores, sink_mask(cache, sinks))
    } else {
        scores
    }
}
