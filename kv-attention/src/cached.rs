//! The inference interface every attention kind shares: one typed state per layer, and a cached
//! forward that continues it.

use crate::AttentionOutput;
use burn::prelude::*;
use kv_core::{ObserveRequest, Result};

/// An attention kind's inference path: what one layer keeps between calls ([`State`](Self::State))
/// and the forward pass that reads and extends it. Each kind also has a `new_state` of its own
/// (a cross layer has none: it reads the cache [`crate::GlobalKv::new_state`] makes).
///
/// Grouped and sliding-window attention keep a [`kv_core::KvState`] (the cache and the input a
/// key shift carries), MLA a latent [`kv_core::LayerCache`], gated retention a
/// [`kv_core::RecurrentState`], and YOCO's cross-attention reads the one global cache it is
/// handed. A decoder written over this trait runs any of them; a policy sees the cache through
/// `AsMut<LayerCache>` (see `kv_policies::drive_layer`).
pub trait CachedAttention<B: Backend> {
    /// What one layer of this kind keeps between calls.
    type State;

    /// Query heads (observations are per query head).
    fn n_heads(&self) -> usize;

    /// Inference path: the new tokens `x` `[b, t, d_model]` continue `state` at position
    /// "tokens seen"; returns their outputs and, when `observe` asks and the kind can, what the
    /// attention saw.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut Self::State,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>>;
}
