//! The attention of a Llama-style block: grouped (MHA/GQA/MQA), latent (MLA) or merging (DMC).

use burn::prelude::*;
use kv_attention::{
    AttentionOutput, CachedAttention, DmcAttention, GroupedAttention, MlaAttention, ObserveRequest,
    Rotary,
};
use kv_core::{CacheShape, KvState, Result};

/// A Llama-style block's self-attention, recorded under its kind's name (`Grouped`, `Latent` or
/// `Dmc`).
// One value per block (or per model): the size gap between variants costs nothing worth a Box,
// which burn's Module derive does not support.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SelfAttention<B: Backend> {
    /// Grouped-query attention (MHA, GQA or MQA).
    Grouped(GroupedAttention<B>),
    /// Multi-head latent attention.
    Latent(MlaAttention<B>),
    /// Grouped attention whose KV heads merge tokens into their slots (DMC).
    Dmc(DmcAttention<B>),
}

impl<B: Backend> SelfAttention<B> {
    /// The grouped attention, if this is one.
    pub fn grouped(&self) -> Option<&GroupedAttention<B>> {
        match self {
            Self::Grouped(a) => Some(a),
            Self::Latent(_) | Self::Dmc(_) => None,
        }
    }

    /// The grouped attention, mutably, if this is one.
    pub fn grouped_mut(&mut self) -> Option<&mut GroupedAttention<B>> {
        match self {
            Self::Grouped(a) => Some(a),
            Self::Latent(_) | Self::Dmc(_) => None,
        }
    }

    /// The latent attention, if this is one.
    pub fn latent(&self) -> Option<&MlaAttention<B>> {
        match self {
            Self::Latent(a) => Some(a),
            Self::Grouped(_) | Self::Dmc(_) => None,
        }
    }

    /// The latent attention, mutably, if this is one.
    pub fn latent_mut(&mut self) -> Option<&mut MlaAttention<B>> {
        match self {
            Self::Latent(a) => Some(a),
            Self::Grouped(_) | Self::Dmc(_) => None,
        }
    }

    /// The merging attention, if this is one.
    pub fn dmc(&self) -> Option<&DmcAttention<B>> {
        match self {
            Self::Dmc(a) => Some(a),
            Self::Grouped(_) | Self::Latent(_) => None,
        }
    }

    /// The rotary embedding of the cached keys (MLA: of the shared `k_R`), for re-rotating policies.
    pub fn rope(&self) -> &Rotary<B> {
        match self {
            Self::Grouped(a) => &a.rope,
            Self::Latent(a) => &a.rope,
            Self::Dmc(a) => &a.attention.rope,
        }
    }

    /// The shape of the cache this attention writes, for a batch of `batch`.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        match self {
            Self::Grouped(a) => a.cache_shape(batch),
            Self::Latent(a) => a.cache_shape(batch),
            Self::Dmc(a) => a.cache_shape(batch),
        }
    }

    /// An empty state for a batch of `batch` (DMC: its cache in ragged storage).
    pub fn new_state(&self, batch: usize, device: &B::Device) -> KvState<B> {
        match self {
            Self::Dmc(a) => a.new_state(batch, device),
            _ => KvState::new(self.cache_shape(batch), device),
        }
    }

    /// Training path: causal self-attention over `x` `[b, t, d_model]` at positions `0..t`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_train(x).0
    }

    /// [`forward`](Self::forward), plus a DMC layer's share of merged tokens per sequence
    /// `[batch]` (straight-through), which the compression loss reads; `None` for other kinds.
    pub fn forward_train(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        match self {
            Self::Grouped(a) => (a.forward(x), None),
            Self::Latent(a) => (a.forward(x), None),
            Self::Dmc(a) => {
                let (o, decisions) = a.forward_train(x);
                (o, Some(decisions.merged_share))
            }
        }
    }
}

impl<B: Backend> CachedAttention<B> for SelfAttention<B> {
    /// Every kind keeps a [`KvState`]; MLA never carries a key-shift input, and only DMC open slots.
    type State = KvState<B>;

    fn n_heads(&self) -> usize {
        match self {
            Self::Grouped(a) => a.n_heads(),
            Self::Latent(a) => a.n_heads(),
            Self::Dmc(a) => a.n_heads(),
        }
    }

    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut KvState<B>,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        match self {
            Self::Grouped(a) => a.forward_cached(x, state, observe),
            Self::Latent(a) => a.forward_cached(x, &mut state.cache, observe),
            Self::Dmc(a) => a.forward_cached(x, state, observe),
        }
    }
}
