//! The scorer interface: what a scoring method computes, apart from what is kept.
//!
//! A scorer only observes and scores; [`TopKPolicy`](crate::TopKPolicy) owns the budget, the
//! schedule, the per-layer budgets and the selection rule (per-head top-k or AdaKV's layer-wide
//! one), so a new scoring method is one file with its score, as in kvpress's `ScorerPress`.

use crate::LayerContext;
use burn::prelude::*;
use kv_core::{LayerCache, Observation, ObserveRequest, Result};

/// Per-slot importance scores of a layer's cache.
pub trait Scorer<B: Backend> {
    /// A short name with the scorer's own parameters, for tables and logs (`h2o(recent=0.5)`).
    fn name(&self) -> String;

    /// What the layer's attention must observe; `selecting` says whether a selection follows
    /// this call (scorers that only read the current call's attention need nothing otherwise).
    fn observe_request(&self, ctx: &LayerContext<'_, B>, selecting: bool) -> ObserveRequest;

    /// Updates per-slot state after every attention call, selection or not (H2O's accumulated
    /// attention, kept in a side channel so it moves with its slot).
    fn observe(
        &self,
        _ctx: &LayerContext<'_, B>,
        _cache: &mut LayerCache<B>,
        _obs: Option<&Observation<B>>,
    ) -> Result<()> {
        Ok(())
    }

    /// Scores `[batch, kv_heads, slots]` of the slots `cache` holds (higher = keep) when `k`
    /// slots per head are to be kept; `+inf` marks slots that must stay (observation windows,
    /// recent windows, sinks).
    fn score(
        &self,
        ctx: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        obs: Option<&Observation<B>>,
        k: usize,
    ) -> Result<Tensor<B, 3>>;

    /// `Some(s)` when the scorer ranks by stream order: the stream's first `s` tokens above every
    /// other slot, the rest newest first (StreamingLLM), so one slot over budget always evicts the
    /// oldest live slot after the sinks and re-rotation has only the sinks to move.
    fn stream_order_sinks(&self) -> Option<usize> {
        None
    }

    /// Whether this layer is never compressed (key-norm's first layers).
    fn skips_layer(&self, _ctx: &LayerContext<'_, B>) -> bool {
        false
    }
}
