//! A model's cache: one KV state per policy-managed attention layer, plus the states of layers
//! the model manages itself (sliding windows, recurrent states).

use crate::{CacheShape, CacheStats, KvState, LayerCache, LocalState};
use burn::prelude::*;

/// The per-layer states of a model, typed by what each layer keeps.
///
/// `layers` are the KV states policies manage (one per attention layer; a YOCO model has one,
/// the global cache its cross-decoder shares). `local` states belong to layers the model trims
/// itself and policies never see: sliding windows and recurrent states. All of them count in
/// [`stats`](Self::stats).
#[derive(Debug, Clone)]
pub struct ModelCache<B: Backend> {
    layers: Vec<KvState<B>>,
    local: Vec<LocalState<B>>,
}

impl<B: Backend> ModelCache<B> {
    /// One empty rectangular cache per layer, all with the same shape.
    pub fn new(layers: usize, shape: CacheShape, device: &B::Device) -> Self {
        Self::from_layers(
            (0..layers)
                .map(|_| LayerCache::new(shape, device))
                .collect(),
        )
    }

    /// A model cache from layer caches built elsewhere (e.g. with different shapes per layer).
    pub fn from_layers(layers: Vec<LayerCache<B>>) -> Self {
        Self {
            layers: layers.into_iter().map(KvState::from).collect(),
            local: Vec::new(),
        }
    }

    /// A model cache with policy-managed `layers` and model-managed `local` states.
    pub fn with_local(layers: Vec<KvState<B>>, local: Vec<LocalState<B>>) -> Self {
        Self { layers, local }
    }

    /// Number of policy-managed layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// One layer's cache.
    pub fn layer(&self, i: usize) -> &LayerCache<B> {
        &self.layers[i].cache
    }

    /// One layer's cache, mutably.
    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache<B> {
        &mut self.layers[i].cache
    }

    /// One layer's whole state (its cache and the input a key shift carries), mutably.
    pub fn layer_state_mut(&mut self, i: usize) -> &mut KvState<B> {
        &mut self.layers[i]
    }

    /// Every layer's cache, mutably, in layer order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerCache<B>> {
        self.layers.iter_mut().map(|s| &mut s.cache)
    }

    /// Number of model-managed local states.
    pub fn num_local(&self) -> usize {
        self.local.len()
    }

    /// One local state.
    pub fn local(&self, i: usize) -> &LocalState<B> {
        &self.local[i]
    }

    /// One local state, mutably.
    pub fn local_mut(&mut self, i: usize) -> &mut LocalState<B> {
        &mut self.local[i]
    }

    /// The policy-managed states and the local ones at once, for models that update both in
    /// one pass.
    pub fn parts_mut(&mut self) -> (&mut [KvState<B>], &mut [LocalState<B>]) {
        (&mut self.layers, &mut self.local)
    }

    /// Tokens seen (the next token's position), taken from the first layer.
    pub fn tokens_seen(&self) -> usize {
        match (self.layers.first(), self.local.first()) {
            (Some(l), _) => l.cache.tokens_seen(),
            (None, Some(l)) => l.tokens_seen(),
            (None, None) => 0,
        }
    }

    /// Reserves room for `extra` more slots in every policy-managed layer (local windows never
    /// grow past their window, so reserving there would only waste memory).
    pub fn reserve(&mut self, extra: usize) {
        self.layers.iter_mut().for_each(|l| l.cache.reserve(extra));
    }

    /// Forgets every token seen, in every layer and local state.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| l.clear());
        self.local.iter_mut().for_each(|l| l.clear());
    }

    /// Statistics measured from the tensors every layer and local state holds.
    pub fn stats(&self) -> CacheStats {
        let mut windows = vec![];
        let mut state_bytes = 0;
        for local in &self.local {
            match local {
                LocalState::Window(s) => windows.push(s.stats()),
                LocalState::Recurrent(s) => state_bytes += s.bytes(),
            }
        }
        CacheStats::from_parts(
            self.layers.iter().map(|l| l.stats()).collect(),
            windows,
            state_bytes,
        )
    }
}
