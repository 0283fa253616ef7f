//! The scorer interface: a policy that can rank the slots of a layer, so a selection rule other
//! than its own (AdaKV's layer-wide top-k) can choose what to keep.

use crate::{CachePolicy, LayerContext};
use burn::prelude::*;
use kv_attention::Observation;
use kv_core::{LayerCache, Result};

/// Per-slot importance scores, as every scoring policy computes them before its own top-k.
///
/// A scorer is a [`CachePolicy`] too: its `observe_request` says what attention must observe and
/// its `after_attention` is the scorer with its own per-head top-k (`keep_top_k(score(..))`), so
/// one piece of code serves both uses.
pub trait Scorer<B: Backend>: CachePolicy<B> {
    /// Scores `[batch, kv_heads, slots]` of the slots `cache` holds (higher = keep) when `k`
    /// slots per head are to be kept; `+inf` marks slots that must stay (observation windows,
    /// recent windows, sinks). May update per-slot side data first (H2O's accumulated attention).
    fn score(&self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>, k: usize) -> Result<Tensor<B, 3>>;

    /// Whether this layer is never compressed (key-norm's first layers).
    fn skips_layer(&self, _ctx: &LayerContext<'_, B>) -> bool {
        false
    }
}
