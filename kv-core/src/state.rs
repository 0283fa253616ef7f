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

/// What the slot each (batch row, KV head) of a merging attention (DMC) is still extending needs
/// for its next merge: the pre-RoPE keys, values and merge weights of the last tokens seen (a
/// window one shorter than the most a slot averages, oldest first), and how many tokens the open
/// slot's run has reached. The cache holds the slot itself (its key rotated at the newest token
/// it covers); a merge recomputes it from these tokens and the new one, so a run of any length
/// holds the mean of its last `window` tokens, as the training path computes it.
#[derive(Debug, Clone)]
pub struct OpenSlots<B: Backend> {
    /// Pre-RoPE keys of the last tokens seen, `[batch, kv_heads, recent, key_dim]`.
    pub keys: Tensor<B, 4>,
    /// Values of the same tokens, `[batch, kv_heads, recent, value_dim]`.
    pub values: Tensor<B, 4>,
    /// Their merge weights, `[batch, kv_heads, recent]`.
    pub weights: Tensor<B, 3>,
    /// Tokens in each head's open run, however long (index `b * kv_heads + h`); 0: closed, the
    /// next token appends.
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
        Self {
            cache: LayerCache::new(shape, device),
            last_input: None,
            open: None,
        }
    }

    /// Drops every slot and the carried input.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.last_input = None;
        self.open = None;
    }

    /// The cache's statistics, the carried input and a merging attention's recent tokens
    /// counted with the metadata.
    pub fn stats(&self) -> LayerStats {
        let mut stats = self.cache.stats();
        stats.metadata_bytes += self.last_input.as_ref().map_or(0, tensor_bytes)
            + self.open.as_ref().map_or(0, OpenSlots::bytes);
        stats
    }
}

impl<B: Backend> From<LayerCache<B>> for KvState<B> {
    fn from(cache: LayerCache<B>) -> Self {
        Self {
            cache,
            last_input: None,
            open: None,
        }
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
