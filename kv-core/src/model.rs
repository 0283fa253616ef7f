//! A model's cache: one layer cache per attention layer, plus the constant-size state of layers
//! that do not keep a growing cache (sliding windows, recurrent states).

use crate::{CacheShape, CacheStats, LayerCache};
use burn::prelude::*;

/// The caches of every layer of a model, indexed by layer.
///
/// `layers` are the caches policies manage (one per attention layer; a YOCO model has one, the
/// global cache its cross-decoder shares). `local` caches are sliding windows a model trims itself
/// and policies never see, and `states` are named fixed-size tensors (a retention layer's
/// `[batch, heads, d_k, d_v]` state). All three count in [`stats`](Self::stats).
#[derive(Debug, Clone)]
pub struct ModelCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    local: Vec<LayerCache<B>>,
    states: Vec<(String, Tensor<B, 4>)>,
    previous_tokens: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> ModelCache<B> {
    /// One empty rectangular cache per layer, all with the same shape.
    pub fn new(layers: usize, shape: CacheShape, device: &B::Device) -> Self {
        Self::from_layers((0..layers).map(|_| LayerCache::new(shape, device)).collect())
    }

    /// A model cache from layer caches built elsewhere (e.g. with different shapes per layer).
    pub fn from_layers(layers: Vec<LayerCache<B>>) -> Self {
        Self { layers, local: Vec::new(), states: Vec::new(), previous_tokens: None }
    }

    /// A model cache with policy-managed `layers` and model-managed `local` window caches.
    pub fn with_local(layers: Vec<LayerCache<B>>, local: Vec<LayerCache<B>>) -> Self {
        Self { local, ..Self::from_layers(layers) }
    }

    /// The last tokens of every batch row seen so far (`[b, <= w]`, the latest last), for models
    /// whose input at a position also reads the `w` tokens before it (token shift); `None` before
    /// the first call.
    pub fn previous_tokens(&self) -> Option<&Tensor<B, 2, Int>> {
        self.previous_tokens.as_ref()
    }

    /// Records the last tokens of every batch row after a forward pass.
    pub fn set_previous_tokens(&mut self, tokens: Tensor<B, 2, Int>) {
        self.previous_tokens = Some(tokens);
    }

    /// Number of layer caches.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// One layer's cache.
    pub fn layer(&self, i: usize) -> &LayerCache<B> {
        &self.layers[i]
    }

    /// One layer's cache, mutably.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache<B> {
        &mut self.layers[i]
    }

    /// All layer caches, mutably, for loops that walk layers in order.
    pub fn layers_mut(&mut self) -> &mut [LayerCache<B>] {
        &mut self.layers
    }

    /// Number of model-managed local (sliding-window) caches.
    pub fn num_local(&self) -> usize {
        self.local.len()
    }

    /// One local cache.
    pub fn local(&self, i: usize) -> &LayerCache<B> {
        &self.local[i]
    }

    /// One local cache, mutably.
    pub fn local_mut(&mut self, i: usize) -> &mut LayerCache<B> {
        &mut self.local[i]
    }

    /// A named state tensor, if one was stored.
    pub fn state(&self, name: &str) -> Option<&Tensor<B, 4>> {
        self.states.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// Stores (or replaces) a named state tensor.
    pub fn set_state(&mut self, name: &str, state: Tensor<B, 4>) {
        match self.states.iter_mut().find(|(n, _)| n == name) {
            Some((_, t)) => *t = state,
            None => self.states.push((name.to_string(), state)),
        }
    }

    /// Names of the stored states, in the order they were first stored.
    pub fn state_names(&self) -> Vec<String> {
        self.states.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Tokens seen (the next token's position), taken from the first layer.
    pub fn tokens_seen(&self) -> usize {
        self.layers.first().or(self.local.first()).map_or(0, |l| l.tokens_seen())
    }

    /// Reserves room for `extra` more slots in every policy-managed layer (local windows never
    /// grow past their window, so reserving there would only waste memory).
    pub fn reserve(&mut self, extra: usize) {
        self.layers.iter_mut().for_each(|l| l.reserve(extra));
    }

    /// Empties every layer and local cache and drops every state.
    pub fn clear(&mut self) {
        self.layers.iter_mut().chain(self.local.iter_mut()).for_each(|l| l.clear());
        self.states.clear();
        self.previous_tokens = None;
    }

    /// Statistics measured from the tensors every layer, local cache and state holds.
    pub fn stats(&self) -> CacheStats {
        let state_bytes = self.states.iter().map(|(_, t)| t.dims().iter().product::<usize>() * t.dtype().size()).sum();
        CacheStats::from_parts(
            self.layers.iter().map(|l| l.stats()).collect(),
            self.local.iter().map(|l| l.stats()).collect(),
            state_bytes,
        )
    }
}
