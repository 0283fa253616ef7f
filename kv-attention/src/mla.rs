//! Multi-head latent attention (DeepSeek-V2): keys and values compressed into one latent per
//! token plus one shared RoPE key, so the cache holds `kv_latent + rope_dim` numbers per token and
//! layer whatever the head count.

use crate::{
    AttentionOutput, CachedAttention, Causality, ObserveRequest, Rotary, RotaryConfig,
    SplitSegment, grouped_attention_parts, position_range,
};
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use kv_core::{CacheShape, KvError, LayerCache, Result};

/// Settings of an [`MlaAttention`] layer (DeepSeek-V2's names: `d_c`, `d_c'`, `d_h`, `d_R`).
#[derive(Config, Debug, PartialEq)]
pub struct MlaAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads (each with its own content key and value, up-projected from the latent).
    pub n_heads: usize,
    /// Width `d_h` of one head's content query and key (and value, unless `value_dim` is set).
    pub head_dim: usize,
    /// Width `d_c` of the cached key/value latent.
    pub kv_latent: usize,
    /// Width `d_R` of the decoupled RoPE query (per head) and key (shared); even.
    pub rope_dim: usize,
    /// Width `d_c'` of the query latent; 0 projects queries straight from the input.
    #[config(default = 0)]
    pub query_latent: usize,
    /// Base of the RoPE frequencies.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Epsilon of the latent RMSNorms.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
    /// Width `d_v` of one head's value (None: `head_dim`, as in DeepSeek-V2).
    #[config(default = "None")]
    pub value_dim: Option<usize>,
    /// RMSNorm on the key/value latent (DeepSeek's `kv_norm`). Off only for a model converted
    /// from MHA, whose latent must stay a linear image of the input to reproduce it.
    #[config(default = true)]
    pub latent_norm: bool,
}

impl MlaAttentionConfig {
    /// Numbers one token adds to one layer's cache: the latent and the shared RoPE key.
    pub fn cache_width(&self) -> usize {
        self.kv_latent + self.rope_dim
    }

    /// Width of one head's value.
    pub fn value_width(&self) -> usize {
        self.value_dim.unwrap_or(self.head_dim)
    }

    /// Checks every width, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        KvError::require_positive(&[
            ("d_model", self.d_model),
            ("heads", self.n_heads),
            ("head_dim", self.head_dim),
            ("kv_latent", self.kv_latent),
            ("value_dim", self.value_width()),
        ])?;
        if self.rope_dim == 0 || !self.rope_dim.is_multiple_of(2) {
            return Err(KvError::config(
                "rope_dim",
                self.rope_dim,
                "an even number > 0: RoPE rotates pairs, and the RoPE part is MLA's only source of position",
            ));
        }
        // The latent is a linear image of the input (then only rescaled by its norm), so width
        // beyond d_model carries no information and only grows the cache.
        if self.kv_latent > self.d_model {
            return Err(KvError::config(
                "kv_latent",
                self.kv_latent,
                format!(
                    "at most d_model = {}: a wider latent only grows the cache",
                    self.d_model
                ),
            ));
        }
        let mha = self.n_heads * (self.head_dim + self.rope_dim + self.value_width());
        if self.cache_width() > mha {
            return Err(KvError::config(
                "kv_latent",
                self.kv_latent,
                format!(
                    "at most {}: kv_latent + rope_dim = {} exceeds the {mha} numbers per token that full per-head keys and values \
                     (heads = {} x (head_dim + rope_dim + value_dim)) would cache",
                    mha.saturating_sub(self.rope_dim),
                    self.cache_width(),
                    self.n_heads,
                ),
            ));
        }
        if self.query_latent > self.d_model {
            return Err(KvError::config(
                "query_latent",
                self.query_latent,
                format!(
                    "0 (no query compression) or at most d_model = {}",
                    self.d_model
                ),
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(KvError::config(
                "norm_eps",
                self.norm_eps,
                "a small positive number such as 1e-6",
            ));
        }
        Ok(())
    }

    /// Validates and builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<MlaAttention<B>> {
        Ok(crate::materialize(self.init_lazy(device)?))
    }

    /// [`init`](Self::init) with the parameters still lazy, for loaders that replace them all.
    pub fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<MlaAttention<B>> {
        self.validate()?;
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm = |d| {
            RmsNormConfig::new(d)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let compressed = self.query_latent > 0;
        let q_in = if compressed {
            self.query_latent
        } else {
            self.d_model
        };
        let (keys_width, values_width) = (
            self.n_heads * self.head_dim,
            self.n_heads * self.value_width(),
        );
        Ok(MlaAttention {
            wq_down: compressed.then(|| lin(self.d_model, self.query_latent)),
            q_norm: compressed.then(|| norm(self.query_latent)),
            wq: lin(q_in, self.n_heads * (self.head_dim + self.rope_dim)),
            wkv_down: lin(self.d_model, self.kv_latent),
            kv_norm: self.latent_norm.then(|| norm(self.kv_latent)),
            wk_rope: lin(self.d_model, self.rope_dim),
            wk_up: lin(self.kv_latent, keys_width),
            wv_up: lin(self.kv_latent, values_width),
            wo: lin(values_width, self.d_model),
            rope: RotaryConfig::new(self.rope_dim)
                .with_theta(self.rope_theta)
                .init(device)?,
            n_heads: self.n_heads,
            head_dim: self.head_dim,
            value_dim: self.value_width(),
            kv_latent: self.kv_latent,
            rope_dim: self.rope_dim,
            path: MlaPath::Auto,
        })
    }
}

/// How [`MlaAttention`]'s cached path attends over its latent cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MlaPath {
    /// Naive for a chunk of several tokens (prefill), absorbed for one (decode), as DeepSeek
    /// runs it: a prompt's queries share one up-projection of the latents and score
    /// `head_dim`-wide keys, where absorbed scoring is `kv_latent` wide per query; one decode
    /// token would up-project the whole cache for a single query.
    #[default]
    Auto,
    /// `W_UK` folded into the query and `W_UV` applied after attention: reads only the cache, as
    /// MQA over `[latent ; k_R]` keys and latent values.
    Absorbed,
    /// Up-projects every cached latent to per-head keys and values first (the reference).
    Naive,
}

/// Multi-head latent attention, as DeepSeek-V2 defines it (V3's `inference/model.py::MLA`).
///
/// Per token: `c = RMSNorm(x W_DKV)` (`kv_latent`), `k_R = RoPE(x W_KR)` (`rope_dim`, shared by
/// every head); queries `[q_C | q_R]` per head from `x` or from `RMSNorm(x W_DQ)`; per head
/// `k_C = c W_UK`, `v = c W_UV` (`value_dim` wide); score
/// `(q_C.k_C + RoPE(q_R).k_R) / sqrt(head_dim + rope_dim)`; output `concat_h(o_h) W_O`.
///
/// The cache (kv_heads = 1) holds keys = `k_R` `[b, 1, n, rope_dim]` and values = `c`
/// `[b, 1, n, kv_latent]`, so every kv-core policy works on it unchanged and a re-rotating
/// policy re-rotates exactly the RoPE part.
#[derive(Module, Debug)]
pub struct MlaAttention<B: Backend> {
    /// Query down-projection `W_DQ` `[d_model, query_latent]` (absent without query compression).
    pub wq_down: Option<Linear<B>>,
    /// RMSNorm of the query latent (absent without query compression).
    pub q_norm: Option<RmsNorm<B>>,
    /// Query projection `[query_latent | d_model, heads * (head_dim + rope_dim)]`: per head the
    /// content part (`W_UQ`) then the RoPE part (`W_QR`), fused as DeepSeek's `wq_b`.
    pub wq: Linear<B>,
    /// Key/value down-projection `W_DKV` `[d_model, kv_latent]`.
    pub wkv_down: Linear<B>,
    /// RMSNorm of the key/value latent (the cache holds the normalised latent); absent only in
    /// models converted from MHA.
    pub kv_norm: Option<RmsNorm<B>>,
    /// Shared RoPE key projection `W_KR` `[d_model, rope_dim]`.
    pub wk_rope: Linear<B>,
    /// Content key up-projection `W_UK` `[kv_latent, heads * head_dim]`.
    pub wk_up: Linear<B>,
    /// Value up-projection `W_UV` `[kv_latent, heads * value_dim]`.
    pub wv_up: Linear<B>,
    /// Output projection `[heads * value_dim, d_model]`.
    pub wo: Linear<B>,
    /// Rotary embedding of the RoPE parts (`rope_dim` wide).
    pub rope: Rotary<B>,
    n_heads: usize,
    head_dim: usize,
    value_dim: usize,
    kv_latent: usize,
    rope_dim: usize,
    path: MlaPath,
}

impl<B: Backend> MlaAttention<B> {
    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Width of one head's content query and key.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Width of one head's value.
    pub fn value_dim(&self) -> usize {
        self.value_dim
    }

    /// Width of the cached latent.
    pub fn kv_latent(&self) -> usize {
        self.kv_latent
    }

    /// Width of the RoPE parts.
    pub fn rope_dim(&self) -> usize {
        self.rope_dim
    }

    /// The path [`CachedAttention::forward_cached`] takes.
    pub fn path(&self) -> MlaPath {
        self.path
    }

    /// Chooses the path [`CachedAttention::forward_cached`] takes (`Auto` by default).
    pub fn set_path(&mut self, path: MlaPath) {
        self.path = path;
    }

    /// The shape of the cache this layer writes: one "head" holding `k_R` as keys and the latent
    /// as values.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        CacheShape {
            batch,
            kv_heads: 1,
            key_dim: self.rope_dim,
            value_dim: self.kv_latent,
        }
    }

    fn scale(&self) -> f64 {
        ((self.head_dim + self.rope_dim) as f64).powf(-0.5)
    }

    /// Content queries `[b, H, t, head_dim]` and RoPE'd queries `[b, H, t, rope_dim]` at
    /// `positions` `[1, 1, t]`.
    pub(crate) fn queries(
        &self,
        x: Tensor<B, 3>,
        positions: Tensor<B, 3, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let c_q = match (&self.wq_down, &self.q_norm) {
            (Some(down), Some(norm)) => norm.forward(down.forward(x)),
            (Some(down), None) => down.forward(x),
            _ => x,
        };
        let q = crate::heads::split_heads(
            self.wq.forward(c_q),
            self.n_heads,
            self.head_dim + self.rope_dim,
        );
        let q_c = q.clone().narrow(3, 0, self.head_dim);
        let q_r = self
            .rope
            .apply(q.narrow(3, self.head_dim, self.rope_dim), positions);
        (q_c, q_r)
    }

    /// The normalised latent `[b, 1, t, kv_latent]` and the RoPE'd shared key `[b, 1, t, rope_dim]`.
    pub(crate) fn latent(
        &self,
        x: Tensor<B, 3>,
        positions: Tensor<B, 3, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, _] = x.dims();
        let c = self.wkv_down.forward(x.clone());
        let c = match &self.kv_norm {
            Some(norm) => norm.forward(c),
            None => c,
        }
        .reshape([b, 1, t, self.kv_latent]);
        let k_r = self.rope.apply(
            self.wk_rope.forward(x).reshape([b, 1, t, self.rope_dim]),
            positions,
        );
        (c, k_r)
    }

    /// Per-head content keys `[b, H, n, head_dim]` and values `[b, H, n, value_dim]` from
    /// latents `[b, 1, n, kv_latent]`.
    pub(crate) fn up_project(&self, c: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, _, n, d_c] = c.dims();
        let c = c.reshape([b, n, d_c]);
        let heads = |y: Tensor<B, 3>, d: usize| crate::heads::split_heads(y, self.n_heads, d);
        (
            heads(self.wk_up.forward(c.clone()), self.head_dim),
            heads(self.wv_up.forward(c), self.value_dim),
        )
    }

    /// Naive attention: every latent up-projected, the shared `k_R` broadcast to every head.
    fn attend_naive(
        &self,
        (q_c, q_r): (Tensor<B, 4>, Tensor<B, 4>),
        segments: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
        causality: &Causality<B>,
        observe: ObserveRequest,
    ) -> (Tensor<B, 4>, Option<crate::Observation<B>>) {
        let [b, h, _, _] = q_c.dims();
        let segments: Vec<SplitSegment<B>> = segments
            .into_iter()
            .map(|(k_r, c)| {
                let n = c.dims()[2];
                let (k_c, v) = self.up_project(c);
                SplitSegment {
                    keys: vec![k_c, k_r.expand([b, h, n, self.rope_dim])],
                    values: v,
                }
            })
            .collect();
        grouped_attention_parts(&[q_c, q_r], &segments, causality, self.scale(), observe)
    }

    /// Absorbed attention over the cache's own segments: `q~ = q_C W_UK^T` per head (`kv_latent`
    /// wide) scores the latent, `q_R` scores `k_R`, the latent doubles as the value, and `W_UV` is
    /// applied to the attended latent, so no per-head key or value is ever formed.
    fn attend_absorbed(
        &self,
        (q_c, q_r): (Tensor<B, 4>, Tensor<B, 4>),
        segments: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
        causality: &Causality<B>,
        observe: ObserveRequest,
    ) -> (Tensor<B, 4>, Option<crate::Observation<B>>) {
        let (h, d_h, d_v, d_c) = (self.n_heads, self.head_dim, self.value_dim, self.kv_latent);
        // W_UK as [1, H, d_h, d_c] and W_UV as [1, H, d_c, d_v] (weights are [in, out]).
        let w_uk = self
            .wk_up
            .weight
            .val()
            .reshape([d_c, h, d_h])
            .permute([1, 2, 0])
            .reshape([1, h, d_h, d_c]);
        let w_uv = self
            .wv_up
            .weight
            .val()
            .reshape([d_c, h, d_v])
            .swap_dims(0, 1)
            .reshape([1, h, d_c, d_v]);
        let q_lat = q_c.matmul(w_uk);
        let segments: Vec<SplitSegment<B>> = segments
            .into_iter()
            .map(|(k_r, c)| SplitSegment {
                keys: vec![c.clone(), k_r],
                values: c,
            })
            .collect();
        let (o_lat, observation) =
            grouped_attention_parts(&[q_lat, q_r], &segments, causality, self.scale(), observe);
        (o_lat.matmul(w_uv), observation)
    }

    fn merge_heads(&self, o: Tensor<B, 4>) -> Tensor<B, 3> {
        self.wo.forward(crate::heads::merge_heads(o))
    }

    /// Training path (naive): causal self-attention over `x` `[b, t, d_model]` at positions `0..t`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let t = x.dims()[1];
        let device = x.device();
        let pos = position_range::<B>(0, t, &device);
        let queries = self.queries(x.clone(), pos.clone());
        let (c, k_r) = self.latent(x, pos.clone());
        let causality = Causality::Consecutive {
            first_query: 0,
            first_key: 0,
        };
        let (o, _) = self.attend_naive(
            queries,
            vec![(k_r, c)],
            &causality,
            ObserveRequest::default(),
        );
        self.merge_heads(o)
    }

    /// An empty latent cache for a batch of `batch`.
    pub fn new_state(&self, batch: usize, device: &B::Device) -> LayerCache<B> {
        LayerCache::new(self.cache_shape(batch), device)
    }

    /// [`CachedAttention::forward_cached`] on an explicit path.
    pub fn forward_cached_with(
        &self,
        x: Tensor<B, 3>,
        cache: &mut LayerCache<B>,
        observe: ObserveRequest,
        path: MlaPath,
    ) -> Result<AttentionOutput<B>> {
        let [b, t, _] = x.dims();
        if cache.shape() != self.cache_shape(b) {
            return Err(KvError::config(
                "layer cache shape",
                format!("{:?}", cache.shape()),
                format!("{:?}", self.cache_shape(b)),
            ));
        }
        // Causality uses absolute positions; RoPE uses the cache's rotary position (they differ
        // only after a re-rotating policy shifted it).
        if cache.is_ragged() {
            // One latent "head" per row: a per-head budget can never make it ragged by itself.
            return Err(KvError::config(
                "MLA cache storage",
                "ragged",
                "rectangular: the latent is one head shared by every query head",
            ));
        }
        let device = x.device();
        let pos = position_range::<B>(cache.rope_position(), t, &device);
        let queries = self.queries(x.clone(), pos.clone());
        let (c, k_r) = self.latent(x, pos);
        cache.append(k_r, c)?;
        let causality = Causality::appended(cache, t);
        let segments = cache.kv_segments();
        let (o, mut observation) = match path {
            MlaPath::Absorbed => self.attend_absorbed(queries, segments, &causality, observe),
            MlaPath::Auto if t == 1 => self.attend_absorbed(queries, segments, &causality, observe),
            MlaPath::Naive | MlaPath::Auto => {
                self.attend_naive(queries, segments, &causality, observe)
            }
        };
        if observe.key_norms || observe.value_norms {
            let o = observation.get_or_insert_with(Default::default);
            let (c, k_r) = (cache.values(), cache.keys());
            if observe.key_norms {
                o.key_norms = Some(self.key_norms(c.clone(), k_r));
            }
            if observe.value_norms {
                o.value_norms = Some(self.value_norms(c));
            }
        }
        Ok(AttentionOutput {
            output: self.merge_heads(o),
            observation,
        })
    }

    /// `[b, 1, n]`: for each cached latent, the squared norms of the keys all heads score,
    /// `sum_h |W_UK^h c|^2 + heads x |k_R|^2`, through the Gram matrix `G = W_UK W_UK^T`
    /// (`kv_latent` squared), so no per-head key is formed: `sum_h |W_UK^h c|^2 = c^T G c`.
    pub fn key_norms(&self, c: Tensor<B, 4>, k_r: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, _, n, d_c] = c.dims();
        let w = self.wk_up.weight.val();
        let gram = w.clone().matmul(w.transpose());
        let c = c.reshape([b * n, d_c]);
        let content = (c.clone().matmul(gram) * c).sum_dim(1).reshape([b, 1, n]);
        let rope = k_r
            .powi_scalar(2)
            .sum_dim(3)
            .reshape([b, 1, n])
            .mul_scalar(self.n_heads as f64);
        content + rope
    }

    /// `[b, heads, n]`: the L1 norm of each head's value `W_UV^h c` of each cached latent. Unlike
    /// the key norms this has no shortcut: it costs one up-projection of the cache's values.
    pub fn value_norms(&self, c: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, _, n, _] = c.dims();
        let (_, v) = self.up_project(c);
        v.abs().sum_dim(3).reshape([b, self.n_heads, n])
    }
}

impl<B: Backend> CachedAttention<B> for MlaAttention<B> {
    type State = LayerCache<B>;

    fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// On this layer's [`path`](MlaAttention::path): the new tokens `x` `[b, t, d_model]` take
    /// positions `tokens_seen ..`, their latent and `k_R` are appended to the cache, and they
    /// attend over every slot it holds.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut LayerCache<B>,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        self.forward_cached_with(x, cache, observe, self.path)
    }
}
