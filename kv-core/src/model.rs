//! A model's cache: one layer cache per attention layer.

use crate::{CacheShape, CacheStats, LayerCache};
use burn::prelude::*;

/// The caches of every layer of a model, indexed by layer.
#[derive(Debug, Clone)]
pub struct ModelCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
}

impl<B: Backend> ModelCache<B> {
    /// One empty rectangular cache per layer, all with the same shape.
    pub fn new(layers: usize, shape: CacheShape, device: &B::Device) -> Self {
        Self { layers: (0..layers).map(|_| LayerCache::new(shape, device)).collect() }
    }

    /// A model cache from layer caches built elsewhere (e.g. with different shapes per layer).
    pub fn from_layers(layers: Vec<LayerCache<B>>) -> Self {
        Self { layers }
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

    /// Tokens seen (the next token's position), taken from the first layer.
    pub fn tokens_seen(&self) -> usize {
        self.layers.first().map_or(0, |l| l.tokens_seen())
    }

    /// Reserves room for `extra` more slots in every layer.
    pub fn reserve(&mut self, extra: usize) {
        self.layers.iter_mut().for_each(|l| l.reserve(extra));
    }

    /// Empties every layer.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| l.clear());
    }

    /// Statistics measured from the tensors every layer holds.
    pub fn stats(&self) -> CacheStats {
        CacheStats::from_layers(self.layers.iter().map(|l| l.stats()).collect())
    }
}
