//! Sliding-window attention (Mistral; YOCO's SWA self-decoder): causal attention over the last
//! `window` positions, with a cache that never keeps more than `window` slots.

use crate::{
    AttentionOutput, CachedAttention, Causality, GroupedAttention, GroupedAttentionConfig,
    ObserveRequest, QUERY_BLOCK, grouped_attention, position_range,
};
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
            return Err(KvError::config(
                "window",
                0,
                "at least 1 key per query (the query's own)",
            ));
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
        Ok(SlidingWindowAttention {
            attn: self.attention.init_lazy(device)?,
            window: self.window,
        })
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
        let (q, k, v) = self.attn.project(x, 0, None);
        self.attn.merge_heads(self.banded(q, k, v, 0, 0))
    }

    /// Windowed attention of queries `q` `[b, H, t, d]` at positions `query_start ..` over keys
    /// and values `[b, KV, n, d]` at the consecutive positions `key_start ..`, query block by
    /// query block, each block over only the band of keys its window reaches: linear in the
    /// context, where a mask over every key would be quadratic (26x the work at window 64, 8k).
    fn banded(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        query_start: usize,
        key_start: usize,
    ) -> Tensor<B, 4> {
        let t = q.dims()[2];
        let n = k.dims()[2];
        let device = q.device();
        let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
        let mut lo = 0;
        while lo < t {
            let tb = QUERY_BLOCK.min(t - lo);
            let (first, last) = (query_start + lo, query_start + lo + tb - 1);
            // Keys the block's window reaches: positions (first - window, last], as slot indices.
            let from = (first + 1).saturating_sub(self.window).max(key_start) - key_start;
            let to = (last + 1 - key_start).min(n);
            let causality = Causality::Window {
                query: Tensor::arange(first as i64..(last + 1) as i64, &device),
                key: position_range(key_start + from, to - from, &device),
                window: self.window,
            };
            let band = [(
                k.clone().narrow(2, from, to - from),
                v.clone().narrow(2, from, to - from),
            )];
            let (o, _) = grouped_attention(
                q.clone().narrow(2, lo, tb),
                &band,
                &causality,
                self.attn.scale(),
                ObserveRequest::default(),
            );
            outs.push(o);
            lo += tb;
        }
        if outs.len() == 1 {
            outs.pop().unwrap()
        } else {
            Tensor::cat(outs, 2)
        }
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
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut KvState<B>,
        _observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        let [b, t, _] = x.dims();
        if state.cache.shape() != self.cache_shape(b) {
            return Err(KvError::config(
                "window cache shape",
                format!("{:?}", state.cache.shape()),
                format!("{:?}", self.cache_shape(b)),
            ));
        }
        // Evicting before the append keeps a decode step at `window` slots, not `window + 1`.
        state.cache.keep_last(self.window - 1)?;
        let before = self.attn.shift_carry(&x, state);
        let cache = &mut state.cache;
        let start = cache.tokens_seen();
        let (q, k, v) = self.attn.project(x, start, before);
        cache.append(k, v)?;
        let o = if t == 1 {
            // A single new token sees every slot held (the last window - 1 and itself).
            grouped_attention(
                q,
                &cache.kv_segments(),
                &Causality::None,
                self.attn.scale(),
                ObserveRequest::default(),
            )
            .0
        } else {
            // The window holds consecutive positions, the newest last.
            self.banded(
                q,
                cache.keys(),
                cache.values(),
                start,
                cache.tokens_seen() - cache.slots(),
            )
        };
        cache.keep_last(self.window)?;
        Ok(AttentionOutput {
            output: self.attn.merge_heads(o),
            observation: None,
        })
    }
}
