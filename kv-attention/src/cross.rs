//! YOCO's cross-decoder attention: one global K/V computed once from the self-decoder's output,
//! shared by every cross-decoder layer, each of which only projects its own queries.

use crate::{
    AttentionOutput, CachedAttention, Causality, ObserveRequest, Rotary, RotaryConfig,
    attend_appended, grouped_attention, position_range,
};
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use kv_core::{CacheShape, KvError, LayerCache, Result};

/// Settings of a [`GlobalKv`] projection and of the [`CrossAttention`] layers that read it.
#[derive(Config, Debug)]
pub struct CrossAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads of each cross-decoder layer.
    pub n_heads: usize,
    /// Heads of the global K/V; must divide `n_heads` (GQA layout).
    pub n_kv_heads: usize,
    /// Base of the RoPE frequencies.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Leading dims of each head that RoPE rotates (None: all).
    #[config(default = "None")]
    pub rope_dims: Option<usize>,
    /// Epsilon of the global K/V's input norm.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
}

impl CrossAttentionConfig {
    /// Width of one head (`d_model / n_heads`).
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks the head layout, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        crate::GroupedAttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads)
            .with_rope_dims(self.rope_dims)
            .validate()?;
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(KvError::config(
                "norm_eps",
                self.norm_eps,
                "a small positive number such as 1e-5",
            ));
        }
        Ok(())
    }

    fn rope<B: Backend>(&self, device: &B::Device) -> Result<Rotary<B>> {
        RotaryConfig::new(self.head_dim())
            .with_theta(self.rope_theta)
            .with_rotated(self.rope_dims)
            .init(device)
    }

    /// Validates and builds the shared K/V projection.
    pub fn init_global<B: Backend>(&self, device: &B::Device) -> Result<GlobalKv<B>> {
        Ok(crate::materialize(self.init_global_lazy(device)?))
    }

    /// [`init_global`](Self::init_global) with the parameters still lazy, for loaders.
    pub fn init_global_lazy<B: Backend>(&self, device: &B::Device) -> Result<GlobalKv<B>> {
        self.validate()?;
        let d = self.head_dim();
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Ok(GlobalKv {
            norm: RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device),
            wk: lin(self.d_model, self.n_kv_heads * d),
            wv: lin(self.d_model, self.n_kv_heads * d),
            rope: self.rope(device)?,
            n_kv_heads: self.n_kv_heads,
            head_dim: d,
        })
    }

    /// Validates and builds one cross-decoder attention layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<CrossAttention<B>> {
        Ok(crate::materialize(self.init_lazy(device)?))
    }

    /// [`init`](Self::init) with the parameters still lazy, for loaders that replace them all.
    pub fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<CrossAttention<B>> {
        self.validate()?;
        let d = self.head_dim();
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Ok(CrossAttention {
            wq: lin(self.d_model, self.n_heads * d),
            wo: lin(self.n_heads * d, self.d_model),
            rope: self.rope(device)?,
            n_heads: self.n_heads,
            head_dim: d,
        })
    }
}

/// YOCO's global cache projection: `K = RoPE(norm(x) W_K)`, `V = norm(x) W_V`, computed once per
/// token from the self-decoder's output, with RoPE applied once, at the token's position.
#[derive(Module, Debug)]
pub struct GlobalKv<B: Backend> {
    /// Norm of the self-decoder's output.
    pub norm: RmsNorm<B>,
    /// Key projection `[d_model, kv_heads * head_dim]`.
    pub wk: Linear<B>,
    /// Value projection `[d_model, kv_heads * head_dim]`.
    pub wv: Linear<B>,
    /// Rotary embedding of the keys (and, in every cross layer, of the queries).
    pub rope: Rotary<B>,
    n_kv_heads: usize,
    head_dim: usize,
}

impl<B: Backend> GlobalKv<B> {
    /// Heads of the global K/V.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// The shape of the global cache for a batch of `batch`.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        CacheShape {
            batch,
            kv_heads: self.n_kv_heads,
            key_dim: self.head_dim,
            value_dim: self.head_dim,
        }
    }

    /// The empty global cache every cross layer of the model reads, for a batch of `batch`.
    pub fn new_state(&self, batch: usize, device: &B::Device) -> LayerCache<B> {
        LayerCache::new(self.cache_shape(batch), device)
    }

    /// RoPE'd keys and values `[b, kv_heads, t, head_dim]` of `x` `[b, t, d_model]` at RoPE
    /// positions `start ..`.
    pub fn project(&self, x: Tensor<B, 3>, start: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [_, t, _] = x.dims();
        let x = self.norm.forward(x);
        let heads = |y: Tensor<B, 3>| crate::heads::split_heads(y, self.n_kv_heads, self.head_dim);
        let k = self.rope.apply(
            heads(self.wk.forward(x.clone())),
            position_range(start, t, &x.device()),
        );
        (k, heads(self.wv.forward(x)))
    }

    /// Appends the K/V of the new tokens `x` `[b, t, d_model]` to the global cache, at the
    /// cache's RoPE position (tokens seen, unless a re-rotating policy shifted it).
    pub fn append(&self, x: Tensor<B, 3>, cache: &mut LayerCache<B>) -> Result<()> {
        let b = x.dims()[0];
        if cache.shape() != self.cache_shape(b) {
            return Err(KvError::config(
                "global cache shape",
                format!("{:?}", cache.shape()),
                format!("{:?}", self.cache_shape(b)),
            ));
        }
        let (k, v) = self.project(x, cache.rope_position());
        cache.append(k, v)
    }
}

/// One cross-decoder layer's attention: its own queries (RoPE'd) over the shared global K/V,
/// causal, in the GQA layout; it owns no key or value projection.
#[derive(Module, Debug)]
pub struct CrossAttention<B: Backend> {
    /// Query projection `[d_model, heads * head_dim]`.
    pub wq: Linear<B>,
    /// Output projection `[heads * head_dim, d_model]`.
    pub wo: Linear<B>,
    /// Rotary embedding of the queries.
    pub rope: Rotary<B>,
    n_heads: usize,
    head_dim: usize,
}

impl<B: Backend> CrossAttention<B> {
    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    fn queries(&self, x: Tensor<B, 3>, rope_start: usize) -> Tensor<B, 4> {
        let [_, t, _] = x.dims();
        let q = crate::heads::split_heads(self.wq.forward(x.clone()), self.n_heads, self.head_dim);
        self.rope
            .apply(q, position_range(rope_start, t, &x.device()))
    }

    fn merge_heads(&self, o: Tensor<B, 4>) -> Tensor<B, 3> {
        self.wo.forward(crate::heads::merge_heads(o))
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// Training path: `x` `[b, t, d_model]` at positions `0..t` attends causally over the global
    /// `keys`, `values` `[b, kv_heads, t, head_dim]` of the same positions.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Tensor<B, 3> {
        let q = self.queries(x, 0);
        let causality = Causality::Consecutive {
            first_query: 0,
            first_key: 0,
        };
        let (o, _) = grouped_attention(
            q,
            &[(keys, values)],
            &causality,
            self.scale(),
            ObserveRequest::default(),
        );
        self.merge_heads(o)
    }
}

impl<B: Backend> CachedAttention<B> for CrossAttention<B> {
    /// The one global cache every cross layer shares ([`GlobalKv::new_state`]).
    type State = LayerCache<B>;

    fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// `x` `[b, m, d_model]` holds the *last* `m` of the tokens already appended to the global
    /// cache (early exit passes only the positions whose logits are needed); they attend
    /// causally over every slot the cache holds. The cache is only read: [`GlobalKv::append`]
    /// writes it once per call, for every cross layer.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut LayerCache<B>,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        let [b, m, _] = x.dims();
        let shape = cache.shape();
        if shape.batch != b
            || !self.n_heads.is_multiple_of(shape.kv_heads.max(1))
            || shape.key_dim != self.head_dim
            || shape.value_dim != self.head_dim
        {
            return Err(KvError::config(
                "global cache shape",
                format!("{shape:?}"),
                format!(
                    "batch {b}, kv_heads dividing {}, key_dim = value_dim = {}",
                    self.n_heads, self.head_dim
                ),
            ));
        }
        let seen = cache.tokens_seen();
        if m > seen || cache.slots() == 0 {
            return Err(KvError::config(
                "cross-decoder queries",
                m,
                format!("at most the {seen} tokens in the global cache, which must hold a slot"),
            ));
        }
        // Absolute positions for causality, the cache's RoPE positions for the rotation.
        let q = self.queries(x, cache.rope_position().saturating_sub(m));
        let (o, observation) = attend_appended(q, cache, self.scale(), observe);
        Ok(AttentionOutput {
            output: self.merge_heads(o),
            observation,
        })
    }
}
