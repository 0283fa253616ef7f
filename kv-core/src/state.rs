//! What one layer keeps between inference calls, by kind: a KV cache with the input row a key
//! shift reads, or a recurrent state. A model's layers hold these typed values, never tensors
//! looked up by name.

use crate::stats::{LayerStats, tensor_bytes};
use crate::{CacheShape, LayerCache};
use burn::prelude::*;

/// An attention layer's state: its KV cache, and for token-shifted keys the layer's input at the
/// last token seen (`[batch, 1, d_model]`), which the next call's first key mixes in.
#[derive(Debug, Clone)]
pub struct KvState<B: Backend> {
    /// The keys and values held (what policies manage).
    pub cache: LayerCache<B>,
    /// The input row of the last token seen, for a key shift; `None` without one.
    pub last_input: Option<Tensor<B, 3>>,
    /// The slots a merging attention (DMC) may still extend; `None` for every other kind.
    pub open: Option<OpenSlots<B>>,
}

/// The slot each (batch row, KV head) of a merging attention (DMC) is still extending: the
/// weighted means of the pre-RoPE keys and of the values merged into it, their total weight, and
/// how many tokens it covers. The cache holds the slot itself (its key rotated at the newest
/// token it covers); this is what the next merge needs to recompute it.
#[derive(Debug, Clone)]
pub struct OpenSlots<B: Backend> {
    /// Weighted mean of the pre-RoPE keys merged, `[batch, kv_heads, 1, key_dim]`.
    pub keys: Tensor<B, 4>,
    /// Weighted mean of the values merged, `[batch, kv_heads, 1, value_dim]`.
    pub values: Tensor<B, 4>,
    /// Total merge weight `z`, `[batch, kv_heads, 1]`.
    pub weights: Tensor<B, 3>,
    /// Tokens each head's open slot covers (index `b * kv_heads + h`); 0: closed, the next
    /// token appends.
    pub tokens: Vec<usize>,
    /// Slots each head held after the last write: a different count means a policy evicted
    /// since, which closes the slot (its last slot may no longer be the open one).
    pub slots: Vec<usize>,
}

impl<B: Backend> OpenSlots<B> {
    /// Bytes of the tensors held.
    pub fn bytes(&self) -> usize {
        tensor_bytes(&self.keys) + tensor_bytes(&self.values) + tensor_bytes(&self.weights)
    }
}

impl<B: Backend> KvState<B> {
    /// An empty state with a cache of `shape`.
    pub fn new(shape: CacheShape, device: &B::Device) -> Self {
        Self { cache: LayerCache::new(shape, device), last_input: None, open: None }
    }

    /// Drops every slot and the carried input.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.last_input = None;
        self.open = None;
    }

    /// The cache's statistics, the carried input and a merging attention's open-slot sums
    /// counted with the metadata.
    pub fn stats(&self) -> LayerStats {
        let mut stats = self.cache.stats();
        stats.metadata_bytes += self.last_input.as_ref().map_or(0, tensor_bytes) + self.open.as_ref().map_or(0, OpenSlots::bytes);
        stats
    }
}

impl<B: Backend> From<LayerCache<B>> for KvState<B> {
    fn from(cache: LayerCache<B>) -> Self {
        Self { cache, last_input: None, open: None }
    }
}

impl<B: Backend> AsMut<LayerCache<B>> for KvState<B> {
    fn as_mut(&mut self) -> &mut LayerCache<B> {
        &mut self.cache
    }
}

impl<B: Backend> AsMut<LayerCache<B>> for LayerCache<B> {
    fn as_mut(&mut self) -> &mut LayerCache<B> {
        self
    }
}

/// A recurrent layer's state (a retention layer's `[batch, heads, d_k, d_v]`) and the tokens it
/// has absorbed, which give the next token's position.
#[derive(Debug, Clone, Default)]
pub struct RecurrentState<B: Backend> {
    /// The state after the last token seen; `None` before the first.
    pub state: Option<Tensor<B, 4>>,
    /// Tokens absorbed so far.
    pub tokens_seen: usize,
}

impl<B: Backend> RecurrentState<B> {
    /// Bytes of the state tensor held.
    pub fn bytes(&self) -> usize {
        self.state.as_ref().map_or(0, tensor_bytes)
    }
}

/// The state of a layer a model manages itself (policies never see it): a sliding window, or a
/// recurrent state.
#[derive(Debug, Clone)]
pub enum LocalState<B: Backend> {
    /// A sliding-window attention layer's cache, trimmed by the layer to its window.
    Window(KvState<B>),
    /// A recurrent layer's fixed-size state.
    Recurrent(RecurrentState<B>),
}

impl<B: Backend> LocalState<B> {
    /// Tokens this layer has seen.
    pub fn tokens_seen(&self) -> usize {
        match self {
            Self::Window(s) => s.cache.tokens_seen(),
            Self::Recurrent(s) => s.tokens_seen,
        }
    }

    /// The window's cache; `None` for a recurrent state.
    pub fn window(&self) -> Option<&LayerCache<B>> {
        match self {
            Self::Window(s) => Some(&s.cache),
            Self::Recurrent(_) => None,
        }
    }

    /// Forgets every token seen.
    pub fn clear(&mut self) {
        match self {
            Self::Window(s) => s.clear(),
            Self::Recurrent(s) => *s = RecurrentState::default(),
        }
    }
}
