//! A decoder block's attention, whichever kind it holds: grouped (MHA/GQA/MQA), latent (MLA), or
//! one of YOCO's self-decoder (window, retention) and cross-decoder kinds.

use burn::prelude::*;
use kv_attention::{AttentionOutput, CrossAttention, GatedRetention, GroupedAttention, MlaAttention, ObserveRequest, Rotary, SlidingWindowAttention};
use kv_core::{CacheShape, LayerCache, Result};

/// A borrowed attention module of either kind, so the decoder drives both through one interface.
///
/// Blocks hold the two kinds in two `Option` fields rather than one enum field because burn
/// records an enum module under its variant name, which would stop every checkpoint saved before
/// MLA existed from loading; with options, a grouped block's record is unchanged.
#[derive(Debug)]
pub enum BlockAttention<'a, B: Backend> {
    /// Grouped-query attention (MHA, GQA or MQA).
    Grouped(&'a GroupedAttention<B>),
    /// Multi-head latent attention.
    Latent(&'a MlaAttention<B>),
}

impl<B: Backend> Clone for BlockAttention<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for BlockAttention<'_, B> {}

impl<'a, B: Backend> BlockAttention<'a, B> {
    /// Query heads (observations are per query head).
    pub fn n_heads(&self) -> usize {
        match self {
            Self::Grouped(a) => a.n_heads(),
            Self::Latent(a) => a.n_heads(),
        }
    }

    /// The rotary embedding of the cached keys (MLA: of the shared `k_R`), for re-rotating policies.
    pub fn rope(&self) -> &'a Rotary<B> {
        match self {
            Self::Grouped(a) => &a.rope,
            Self::Latent(a) => &a.rope,
        }
    }

    /// The shape of the cache this attention writes, for a batch of `batch`.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        match self {
            Self::Grouped(a) => a.cache_shape(batch),
            Self::Latent(a) => a.cache_shape(batch),
        }
    }

    /// Training path: causal self-attention over `x` `[b, t, d_model]` at positions `0..t`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Grouped(a) => a.forward(x),
            Self::Latent(a) => a.forward(x),
        }
    }

    /// Inference path: appends the new tokens to `cache` and attends over every slot it holds.
    pub fn forward_cached(&self, x: Tensor<B, 3>, cache: &mut LayerCache<B>, observe: ObserveRequest) -> Result<AttentionOutput<B>> {
        match self {
            Self::Grouped(a) => a.forward_cached(x, cache, observe),
            Self::Latent(a) => a.forward_cached(x, cache, observe),
        }
    }
}

/// What a decoder block mixes its tokens with: a cached self-attention of a Llama-style model, or
/// one of YOCO's three layer kinds.
#[derive(Debug)]
pub enum BlockKind<'a, B: Backend> {
    /// Grouped or latent self-attention with its own per-layer cache.
    Attention(BlockAttention<'a, B>),
    /// YOCO self-decoder: sliding-window attention.
    Window(&'a SlidingWindowAttention<B>),
    /// YOCO self-decoder: gated retention.
    Retention(&'a GatedRetention<B>),
    /// YOCO cross-decoder: attention over the shared global K/V.
    Cross(&'a CrossAttention<B>),
}

impl<B: Backend> Clone for BlockKind<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for BlockKind<'_, B> {}

impl<B: Backend> BlockKind<'_, B> {
    /// A short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Attention(BlockAttention::Grouped(_)) => "grouped attention",
            Self::Attention(BlockAttention::Latent(_)) => "latent attention",
            Self::Window(_) => "sliding-window attention",
            Self::Retention(_) => "gated retention",
            Self::Cross(_) => "cross-attention",
        }
    }
}
