//! Grouped-query attention: MHA (`kv_heads == heads`), GQA and MQA (`kv_heads == 1`) in one module.

use crate::{
    CachedAttention, Causality, Observation, ObserveRequest, PackedSet, Rotary, RotaryConfig,
    attend_appended, grouped_attention, position_range, project,
};
use burn::module::Param;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use kv_core::{CacheShape, KvError, KvState, Result};

/// Settings of a [`GroupedAttention`] layer.
#[derive(Config, Debug)]
pub struct GroupedAttentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Base of the RoPE frequencies.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Leading dims of each head that RoPE rotates (None: all); the rest match on content alone.
    #[config(default = "None")]
    pub rope_dims: Option<usize>,
    /// Key token shift: each key is projected from a learned per-channel mix of its own input and
    /// the previous token's (RWKV's time-mix, on keys only). A query then matches the key *after*
    /// a token like its own with the same `W_q`/`W_k` pairing that matches equal tokens, which is
    /// the induction ("find the cue, read what follows") circuit in one layer.
    #[config(default = "None")]
    pub key_shift: Option<bool>,
    /// Mimetic initialisation of the query-key product (Trockman & Kolter, 2023): each KV head's
    /// key projection starts equal to the query projection of the first head of its group, and
    /// the group's other query heads start halfway between that key projection and their own
    /// random draw, so every head's `W_q^T W_k` starts near positive semi-definite: attention
    /// already prefers keys whose input resembles the query's, the starting point of a copy or
    /// lookup head. (Only the first head of each group gets it exactly; without the others, GQA
    /// and MQA models had too few such heads to learn retrieval in the presets' budget.)
    #[config(default = "None")]
    pub mimetic_init: Option<bool>,
    /// Width of one head when it is not `d_model / n_heads` (some pretrained models, e.g.
    /// Mistral-Nemo); None: `d_model / n_heads`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// Biases on the query, key and value projections (Qwen2); None: no biases (Llama).
    #[config(default = "None")]
    pub qkv_bias: Option<bool>,
    /// QK-norm (Qwen3, Gemma 3): an RMSNorm with a learned gain over each head's query and key,
    /// before RoPE, with this epsilon; None: none (Llama, Qwen2).
    #[config(default = "None")]
    pub qk_norm_eps: Option<f64>,
}

impl GroupedAttentionConfig {
    /// Width of one head (`head_dim` if set, else `d_model / n_heads`).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Checks the head layout, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        if self.n_heads == 0 {
            return Err(KvError::config("heads", 0, "at least 1"));
        }
        if self.d_model == 0
            || (self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_heads))
        {
            return Err(KvError::config(
                "d_model",
                self.d_model,
                format!(
                    "a positive multiple of heads = {} (or set head_dim)",
                    self.n_heads
                ),
            ));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(KvError::config(
                "kv_heads",
                self.n_kv_heads,
                format!(
                    "a divisor of heads = {} (heads = kv_heads x group size)",
                    self.n_heads
                ),
            ));
        }
        if let Some(eps) = self.qk_norm_eps.filter(|e| !(*e > 0.0 && *e < 1.0)) {
            return Err(KvError::config(
                "qk_norm_eps",
                eps,
                "a small positive number such as 1e-6",
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(KvError::config(
                "head_dim",
                self.head_dim(),
                "even and > 0, because RoPE rotates pairs (d_model / heads unless set)",
            ));
        }
        Ok(())
    }

    /// Validates and builds the layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<GroupedAttention<B>> {
        Ok(crate::materialize(self.init_lazy(device)?))
    }

    /// [`init`](Self::init) with the parameters still lazy, for loaders that replace them all.
    pub fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<GroupedAttention<B>> {
        self.validate()?;
        let d = self.head_dim();
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        let bias = self.qkv_bias.unwrap_or(false);
        let qkv = |i, o| LinearConfig::new(i, o).with_bias(bias).init(device);
        let mut wq: Linear<B> = qkv(self.d_model, self.n_heads * d);
        let mut wk: Linear<B> = qkv(self.d_model, self.n_kv_heads * d);
        if self.mimetic_init == Some(true) {
            let (kv, group) = (self.n_kv_heads, self.n_heads / self.n_kv_heads);
            let q = wq
                .weight
                .val()
                .detach()
                .reshape([self.d_model, kv, group, d]);
            let first = q.clone().narrow(2, 0, 1);
            wk.weight = Param::from_tensor(first.clone().reshape([self.d_model, kv * d]).detach());
            if group > 1 {
                // Equal-variance mix, so every query head keeps the scale of a fresh draw.
                let rest = (q.narrow(2, 1, group - 1)
                    + first.clone().expand([self.d_model, kv, group - 1, d]))
                .mul_scalar(std::f64::consts::FRAC_1_SQRT_2);
                let all = Tensor::cat(vec![first, rest], 2);
                wq.weight =
                    Param::from_tensor(all.reshape([self.d_model, self.n_heads * d]).detach());
            }
        }
        Ok(GroupedAttention {
            wq,
            wk,
            wv: qkv(self.d_model, self.n_kv_heads * d),
            wo: lin(self.n_heads * d, self.d_model),
            rope: RotaryConfig::new(d)
                .with_theta(self.rope_theta)
                .with_rotated(self.rope_dims)
                .init(device)?,
            key_mix: self
                .key_shift
                .unwrap_or(false)
                .then(|| Param::from_tensor(Tensor::full([self.d_model], 0.5, device))),
            q_norm: self
                .qk_norm_eps
                .map(|eps| RmsNormConfig::new(d).with_epsilon(eps).init(device)),
            k_norm: self
                .qk_norm_eps
                .map(|eps| RmsNormConfig::new(d).with_epsilon(eps).init(device)),
            packed: PackedSet::default(),
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: d,
        })
    }
}

/// Self-attention with `n_heads` query heads sharing `n_kv_heads` K/V heads, RoPE on q and k.
#[derive(Module, Debug)]
pub struct GroupedAttention<B: Backend> {
    /// Query projection `[d_model, heads * head_dim]`.
    pub wq: Linear<B>,
    /// Key projection `[d_model, kv_heads * head_dim]`.
    pub wk: Linear<B>,
    /// Value projection `[d_model, kv_heads * head_dim]`.
    pub wv: Linear<B>,
    /// Output projection `[heads * head_dim, d_model]`.
    pub wo: Linear<B>,
    /// Rotary embedding for queries and keys.
    pub rope: Rotary<B>,
    /// Key token shift's per-channel weight of the token's own input (`1 - mix` goes to the
    /// previous token's); absent without key shift.
    pub key_mix: Option<Param<Tensor<B, 1>>>,
    /// QK-norm of each query head `[head_dim]` (absent without QK-norm).
    pub q_norm: Option<RmsNorm<B>>,
    /// QK-norm of each key head `[head_dim]` (absent without QK-norm).
    pub k_norm: Option<RmsNorm<B>>,
    /// `wq`, `wk`, `wv` and `wo` as a quantised checkpoint's codes, for decode steps on host
    /// backends ([`crate::project`]); a loader fills it, and whatever changes the weights must
    /// clear it.
    #[module(skip)]
    pub packed: PackedSet<4>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// One attention call's result.
#[derive(Debug, Clone)]
pub struct AttentionOutput<B: Backend> {
    /// `[batch, t, d_model]`.
    pub output: Tensor<B, 3>,
    /// What the caller asked to observe, if anything.
    pub observation: Option<Observation<B>>,
}

impl<B: Backend> GroupedAttention<B> {
    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// Key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The shape of the cache this layer writes, for a batch of `batch`.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        CacheShape {
            batch,
            kv_heads: self.n_kv_heads,
            key_dim: self.head_dim,
            value_dim: self.head_dim,
        }
    }

    /// An empty state for a batch of `batch`.
    pub fn new_state(&self, batch: usize, device: &B::Device) -> KvState<B> {
        KvState::new(self.cache_shape(batch), device)
    }

    /// Whether keys are token-shifted (the layer's [`KvState`] then carries its last input).
    pub fn has_key_shift(&self) -> bool {
        self.key_mix.is_some()
    }

    /// Projects `x` `[b, t, d_model]` to RoPE'd q `[b, H, t, d]`, RoPE'd k and v `[b, KV, t, d]`;
    /// `before` `[b, 1, d_model]` is the input of the token before `x`'s first (zeros if None),
    /// read by the key shift.
    pub(crate) fn project(
        &self,
        x: Tensor<B, 3>,
        start: usize,
        before: Option<Tensor<B, 3>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let pos = position_range::<B>(start, x.dims()[1], &x.device());
        let (q, k, v) = self.project_unrotated(x, before);
        let (q, k) = self.rope.apply_pair(q, k, pos);
        (q, k, v)
    }

    /// [`project`](Self::project) before RoPE: q `[b, H, t, d]`, k and v `[b, KV, t, d]` as the
    /// projections (and the QK-norm, if any) give them (DMC reads and merges keys in this space).
    pub(crate) fn project_unrotated(
        &self,
        x: Tensor<B, 3>,
        before: Option<Tensor<B, 3>>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
        let [b, t, dm] = x.dims();
        let d = self.head_dim;
        let heads = |y: Tensor<B, 3>, n: usize| crate::heads::split_heads(y, n, d);
        let q = heads(
            project(&self.wq, self.packed.get(0), x.clone()),
            self.n_heads,
        );
        let key_input = match &self.key_mix {
            None => x.clone(),
            Some(mix) => {
                let before = before.unwrap_or_else(|| Tensor::zeros([b, 1, dm], &x.device()));
                let prev = if t > 1 {
                    Tensor::cat(vec![before, x.clone().narrow(1, 0, t - 1)], 1)
                } else {
                    before
                };
                let mix = mix.val().reshape([1, 1, dm]);
                prev.clone() + (x.clone() - prev) * mix
            }
        };
        let k = heads(
            project(&self.wk, self.packed.get(1), key_input),
            self.n_kv_heads,
        );
        let v = heads(project(&self.wv, self.packed.get(2), x), self.n_kv_heads);
        let norm = |n: &Option<RmsNorm<B>>, y: Tensor<B, 4>| match n {
            Some(n) => n.forward(y),
            None => y,
        };
        (norm(&self.q_norm, q), norm(&self.k_norm, k), v)
    }

    /// For key shift: the input before `x` (the state's carried last input) and, as a side
    /// effect, `x`'s last row carried for the next call.
    pub(crate) fn shift_carry(
        &self,
        x: &Tensor<B, 3>,
        state: &mut KvState<B>,
    ) -> Option<Tensor<B, 3>> {
        if !self.has_key_shift() {
            return None;
        }
        let t = x.dims()[1];
        let before = if state.cache.tokens_seen() > 0 {
            state.last_input.take()
        } else {
            None
        };
        state.last_input = Some(x.clone().narrow(1, t - 1, 1));
        before
    }

    pub(crate) fn merge_heads(&self, o: Tensor<B, 4>) -> Tensor<B, 3> {
        project(&self.wo, self.packed.get(3), crate::heads::merge_heads(o))
    }

    pub(crate) fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// Training path: causal self-attention over `x` `[b, t, d_model]` at positions `0..t`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (q, k, v) = self.project(x, 0, None);
        let causality = Causality::Consecutive {
            first_query: 0,
            first_key: 0,
        };
        let (o, _) = grouped_attention(
            q,
            &[(k, v)],
            &causality,
            self.scale(),
            ObserveRequest::default(),
        );
        self.merge_heads(o)
    }
}

impl<B: Backend> CachedAttention<B> for GroupedAttention<B> {
    type State = KvState<B>;

    fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// The new tokens `x` `[b, t, d_model]` take positions `tokens_seen ..`, their K/V are
    /// appended to the state's cache, and they attend over every slot it holds.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut KvState<B>,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        let b = x.dims()[0];
        if state.cache.shape() != self.cache_shape(b) {
            return Err(KvError::config(
                "layer cache shape",
                format!("{:?}", state.cache.shape()),
                format!("{:?}", self.cache_shape(b)),
            ));
        }
        let before = self.shift_carry(&x, state);
        let cache = &mut state.cache;
        // Causality uses the absolute positions; RoPE uses the cache's rotary position, which
        // equals tokens seen unless a re-rotating policy shifted it.
        let (q, k, v) = self.project(x, cache.rope_position(), before);
        cache.append(k, v)?;
        let (o, observation) = attend_appended(q, cache, self.scale(), observe);
        Ok(AttentionOutput {
            output: self.merge_heads(o),
            observation,
        })
    }
}
