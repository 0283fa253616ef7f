//! Sliding-window attention (Mistral; YOCO's SWA self-decoder): causal attention over the last
//! `window` positions, with a cache that never keeps more than `window` slots.

use crate::{AttentionOutput, CachedAttention, Causality, GroupedAttention, GroupedAttentionConfig, ObserveRequest, grouped_attention, position_range};
use burn::prelude::*;
use kv_core::{CacheShape, KvError, KvState, Result};

/// Settings of a [`SlidingWindowAttention`] layer.
#[derive(Config, Debug)]
pub struct SlidingWindowAttentionConfig {
    /// The projections, heads and RoPE (as a grouped attention layer).
    pub attention: GroupedAttentionConfig,
    /// Keys each query sees, itself included (YOCO's `C`).
    pub window: usize,
}

impl SlidingWindowAttentionConfig {
    /// Checks the window and the head layout, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 {
            return Err(KvError::config("window", 0, "at least 1 key per query (the query's own)"));
        }
        self.attention.validate()
    }

    /// Validates and builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<SlidingWindowAttention<B>> {
        Ok(crate::materialize(self.init_lazy(device)?))
    }

    /// [`init`](Self::init) with the parameters still lazy, for loaders that replace them all.
    pub fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<SlidingWindowAttention<B>> {
        self.validate()?;
        Ok(SlidingWindowAttention { attn: self.attention.init_lazy(device)?, window: self.window })
    }
}

/// Grouped self-attention where query `i` sees positions `i - window + 1 ..= i` only.
///
/// The cache is an ordinary [`LayerCache`] that this layer trims itself: before new tokens are
/// appended it keeps the newest `window - 1` slots (all a new token can still see), and after the
/// call the newest `window`. So a decode step never holds more than `window` slots, and a prompt
/// of `t` tokens at most `window - 1 + t` during its own call. Policies never run on it.
#[derive(Module, Debug)]
pub struct SlidingWindowAttention<B: Backend> {
    /// Projections and RoPE.
    pub attn: GroupedAttention<B>,
    window: usize,
}

impl<B: Backend> SlidingWindowAttention<B> {
    /// Keys each query sees, itself included.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.attn.n_heads()
    }

    /// The shape of the window cache for a batch of `batch`.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        self.attn.cache_shape(batch)
    }

    /// An empty state for a batch of `batch`.
    pub fn new_state(&self, batch: usize, device: &B::Device) -> KvState<B> {
        KvState::new(self.cache_shape(batch), device)
    }

    /// Training path: windowed causal self-attention over `x` `[b, t, d_model]` at positions `0..t`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let t = x.dims()[1];
        let device = x.device();
        let (q, k, v) = self.attn.project(x, 0, None);
        let causality = Causality::Window { query: Tensor::arange(0..t as i64, &device), key: position_range(0, t, &device), window: self.window };
        let (o, _) = grouped_attention(q, &[(k, v)], &causality, self.attn.scale(), ObserveRequest::default());
        self.attn.merge_heads(o)
    }
}

impl<B: Backend> CachedAttention<B> for SlidingWindowAttention<B> {
    type State = KvState<B>;

    fn n_heads(&self) -> usize {
        self.attn.n_heads()
    }

    /// The new tokens `x` `[b, t, d_model]` take positions `tokens_seen ..` and attend over the
    /// window's slots; afterwards the cache holds at most `window` slots. Observes nothing: no
    /// policy runs on a window.
    fn forward_cached(&self, x: Tensor<B, 3>, state: &mut KvState<B>, _observe: ObserveRequest) -> Result<AttentionOutput<B>> {
        let [b, t, _] = x.dims();
        if state.cache.shape() != self.cache_shape(b) {
            return Err(KvError::config("window cache shape", format!("{:?}", state.cache.shape()), format!("{:?}", self.cache_shape(b))));
        }
        // Evicting before the append keeps a decode step at `window` slots, not `window + 1`.
        state.cache.keep_last(self.window - 1)?;
        let before = self.attn.shift_carry(&x, state);
        let cache = &mut state.cache;
        let start = cache.tokens_seen();
        let device = x.device();
        let (q, k, v) = self.attn.project(x, start, before);
        cache.append(k, v)?;
        // A single new token sees every slot held (the last window - 1 and itself).
        let causality = if t == 1 {
            Causality::None
        } else {
            Causality::Window { query: Tensor::arange(start as i64..(start + t) as i64, &device), key: cache.positions(), window: self.window }
        };
        let (o, _) = grouped_attention(q, &cache.kv_segments(), &causality, self.attn.scale(), ObserveRequest::default());
        cache.keep_last(self.window)?;
        Ok(AttentionOutput { output: self.attn.merge_heads(o), observation: None })
    }
}
