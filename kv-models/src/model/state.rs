//! A model's inference state: the per-layer states in a [`ModelCache`] and the token history a
//! token shift reads.

use burn::prelude::*;
use kv_core::{CacheStats, LayerCache, LocalState, ModelCache};

/// Everything a [`crate::model::decoder::DecoderLm`] keeps between inference calls.
///
/// The layers' typed states live in the [`ModelCache`] (what policies manage and what the
/// memory figures count); the last tokens seen, which a token shift mixes into the next call's
/// first inputs, are the model's own and live here.
#[derive(Debug, Clone)]
pub struct ModelState<B: Backend> {
    cache: ModelCache<B>,
    previous_tokens: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> ModelState<B> {
    /// A fresh state around the model's empty layer states.
    pub fn new(cache: ModelCache<B>) -> Self {
        Self {
            cache,
            previous_tokens: None,
        }
    }

    /// The layers' states.
    pub fn cache(&self) -> &ModelCache<B> {
        &self.cache
    }

    /// The layers' states, mutably.
    pub fn cache_mut(&mut self) -> &mut ModelCache<B> {
        &mut self.cache
    }

    /// The last tokens of every batch row seen so far (`[b, <= w]`, the latest last), for a token
    /// shift; `None` before the first call or without one.
    pub fn previous_tokens(&self) -> Option<&Tensor<B, 2, Int>> {
        self.previous_tokens.as_ref()
    }

    /// Records the last tokens of every batch row after a forward pass.
    pub(crate) fn set_previous_tokens(&mut self, tokens: Tensor<B, 2, Int>) {
        self.previous_tokens = Some(tokens);
    }

    /// Tokens seen (the next token's position).
    pub fn tokens_seen(&self) -> usize {
        self.cache.tokens_seen()
    }

    /// The RoPE position the next token takes: `tokens_seen`, less any shift a re-rotating
    /// policy (StreamingLLM's own mode) applied to the first policy-managed cache.
    pub fn next_position(&self) -> usize {
        if self.cache.num_layers() > 0 {
            self.cache.layer(0).rope_position()
        } else {
            self.tokens_seen()
        }
    }

    /// Statistics measured from the tensors every layer holds.
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Number of policy-managed caches (YOCO: 1, the global cache).
    pub fn num_layers(&self) -> usize {
        self.cache.num_layers()
    }

    /// One policy-managed cache.
    pub fn layer(&self, i: usize) -> &LayerCache<B> {
        self.cache.layer(i)
    }

    /// One policy-managed cache, mutably.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache<B> {
        self.cache.layer_mut(i)
    }

    /// Every policy-managed cache, mutably, in layer order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerCache<B>> {
        self.cache.layers_mut()
    }

    /// Number of model-managed local states (YOCO's self-decoder layers).
    pub fn num_local(&self) -> usize {
        self.cache.num_local()
    }

    /// One model-managed local state.
    pub fn local(&self, i: usize) -> &LocalState<B> {
        self.cache.local(i)
    }

    /// Reserves room for `extra` more slots in every policy-managed cache.
    pub fn reserve(&mut self, extra: usize) {
        self.cache.reserve(extra);
    }

    /// Forgets every token seen.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.previous_tokens = None;
    }
}
