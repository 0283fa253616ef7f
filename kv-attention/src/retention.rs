//! Gated retention (YOCO's gRet, after RetNet and GLA): linear attention with a data-dependent
//! per-head decay, in three equivalent forms: parallel, chunkwise and recurrent.
//!
//! Per head, with `gamma_t = sigmoid(x_t W_gamma)^(1/tau)`:
//! `S_t = gamma_t S_{t-1} + k_t^T v_t` (`[d_k, d_v]`), `o_t = q_t S_t`, then
//! `out = (swish(x W_G) * RMSNorm_head(o)) W_O`. The recurrent state is the whole cache.

use crate::{
    AttentionOutput, CachedAttention, ObserveRequest, Rotary, RotaryConfig, position_range,
};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{log_sigmoid, silu};
use kv_core::{KvError, RecurrentState, Result};

/// Settings of a [`GatedRetention`] layer.
#[derive(Config, Debug)]
pub struct GatedRetentionConfig {
    /// Model width.
    pub d_model: usize,
    /// Retention heads (`d_model / heads` wide each).
    pub n_heads: usize,
    /// Gate temperature: `log gamma = logsigmoid(x W_gamma) / tau` (YOCO's
    /// `gate_logit_normalizer`, 16), which keeps decays close to 1.
    #[config(default = 16.0)]
    pub tau: f64,
    /// Tokens per chunk of the chunkwise form (training and prefill).
    #[config(default = 256)]
    pub chunk: usize,
    /// Base of the RoPE frequencies applied to q and k.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Leading dims of each head that RoPE rotates (None: all).
    #[config(default = "None")]
    pub rope_dims: Option<usize>,
    /// Epsilon of the per-head RMS normalisation.
    #[config(default = 1e-6)]
    pub norm_eps: f64,
}

impl GatedRetentionConfig {
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks every setting, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        KvError::require_positive(&[("heads", self.n_heads), ("retention chunk", self.chunk)])?;
        if self.d_model == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(KvError::config(
                "d_model",
                self.d_model,
                format!("a positive multiple of heads = {}", self.n_heads),
            ));
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(KvError::config(
                "tau",
                self.tau,
                "a finite number > 0 (YOCO uses 16)",
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
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<GatedRetention<B>> {
        Ok(crate::materialize(self.init_lazy(device)?))
    }

    /// [`init`](Self::init) with the parameters still lazy, for loaders that replace them all.
    pub fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<GatedRetention<B>> {
        self.validate()?;
        let d = self.head_dim();
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Ok(GatedRetention {
            wq: lin(self.d_model, self.d_model),
            wk: lin(self.d_model, self.d_model),
            wv: lin(self.d_model, self.d_model),
            wg: lin(self.d_model, self.d_model),
            w_gamma: lin(self.d_model, self.n_heads),
            wo: lin(self.d_model, self.d_model),
            rope: RotaryConfig::new(d)
                .with_theta(self.rope_theta)
                .with_rotated(self.rope_dims)
                .init(device)?,
            n_heads: self.n_heads,
            head_dim: d,
            tau: self.tau,
            chunk: self.chunk,
            norm_eps: self.norm_eps,
        })
    }
}

/// Gated retention, as YOCO's `GateRetention` (q, k, v, swish gate, per-head decay gate, output).
#[derive(Module, Debug)]
pub struct GatedRetention<B: Backend> {
    /// Query projection `[d_model, d_model]`.
    pub wq: Linear<B>,
    /// Key projection `[d_model, d_model]`.
    pub wk: Linear<B>,
    /// Value projection `[d_model, d_model]`.
    pub wv: Linear<B>,
    /// Swish output gate `W_G` `[d_model, d_model]`.
    pub wg: Linear<B>,
    /// Decay gate `W_gamma` `[d_model, heads]`.
    pub w_gamma: Linear<B>,
    /// Output projection `[d_model, d_model]`.
    pub wo: Linear<B>,
    /// Rotary embedding of q and k.
    pub rope: Rotary<B>,
    n_heads: usize,
    head_dim: usize,
    tau: f64,
    chunk: usize,
    norm_eps: f64,
}

/// q, k (RoPE'd, k scaled by `d_k^-1/2`), v `[b, h, t, d]` and log decays `[b, h, t]` (f32).
pub type Projected<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 3>);

impl<B: Backend> GatedRetention<B> {
    /// Retention heads.
    pub fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// An empty state for a batch of `batch`.
    pub fn new_state(&self, _batch: usize, _device: &B::Device) -> RecurrentState<B> {
        RecurrentState::default()
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Tokens per chunk of the chunkwise form.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Shape of the recurrent state for a batch of `batch`: `[batch, heads, d_k, d_v]`.
    pub fn state_shape(&self, batch: usize) -> [usize; 4] {
        [batch, self.n_heads, self.head_dim, self.head_dim]
    }

    /// Projects `x` `[b, t, d_model]` at positions `start ..` (see [`Projected`]).
    pub fn project(&self, x: Tensor<B, 3>, start: usize) -> Projected<B> {
        let [_, t, _] = x.dims();
        let (h, d) = (self.n_heads, self.head_dim);
        let heads = |y: Tensor<B, 3>| crate::heads::split_heads(y, h, d);
        let pos = position_range::<B>(start, t, &x.device());
        let (q, k) = self.rope.apply_pair(
            heads(self.wq.forward(x.clone())),
            heads(self.wk.forward(x.clone())),
            pos,
        );
        let k = k.mul_scalar((d as f64).powf(-0.5));
        let v = heads(self.wv.forward(x.clone()));
        let mut gate = self.w_gamma.forward(x);
        if gate.dtype() != DType::F32 {
            gate = gate.cast(DType::F32);
        }
        // log gamma in f32: decays are accumulated as sums of logs, never as products.
        let log_gamma = log_sigmoid(gate).div_scalar(self.tau).swap_dims(1, 2);
        (q, k, v, log_gamma)
    }

    /// `W_O(swish(x W_G) * RMSNorm_head(o))` for retention outputs `o` `[b, h, t, d]`.
    pub fn output(&self, x: Tensor<B, 3>, o: Tensor<B, 4>) -> Tensor<B, 3> {
        let dtype = o.dtype();
        let o = if dtype != DType::F32 {
            o.cast(DType::F32)
        } else {
            o
        };
        // Per-head RMS normalisation without a learned scale (YOCO's `subln`), in f32.
        let rms = o
            .clone()
            .powf_scalar(2.0)
            .mean_dim(3)
            .add_scalar(self.norm_eps)
            .sqrt();
        let mut o = o / rms;
        if o.dtype() != dtype {
            o = o.cast(dtype);
        }
        let o = crate::heads::merge_heads(o);
        self.wo.forward(silu(self.wg.forward(x)) * o)
    }

    /// Training path: `x` `[b, t, d_model]` at positions `0..t`, chunkwise (one chunk, i.e. the
    /// parallel form, when `t <= chunk`).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (q, k, v, lg) = self.project(x.clone(), 0);
        let (o, _) = retention_chunkwise(q, k, v, lg, self.chunk, None);
        self.output(x, o)
    }
}

impl<B: Backend> CachedAttention<B> for GatedRetention<B> {
    type State = RecurrentState<B>;

    fn n_heads(&self) -> usize {
        self.n_heads
    }

    /// The new tokens `x` `[b, t, d_model]` at positions `tokens_seen ..` continue the state
    /// (zeros before the first token). A single token takes the recurrent form, a prompt the
    /// chunkwise one. Observes nothing: retention keeps no slots for a policy.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut RecurrentState<B>,
        _observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        let [b, t, _] = x.dims();
        if let Some(s) = &state.state
            && s.dims() != self.state_shape(b)
        {
            return Err(KvError::shape(
                "retention state",
                &s.dims(),
                format!("{:?}", self.state_shape(b)),
            ));
        }
        let (q, k, v, lg) = self.project(x.clone(), state.tokens_seen);
        let previous = state.state.take();
        let (o, next) = if t == 1 {
            retention_recurrent(q, k, v, lg, previous)
        } else {
            retention_chunkwise(q, k, v, lg, self.chunk, previous)
        };
        state.state = Some(next);
        state.tokens_seen += t;
        Ok(AttentionOutput {
            output: self.output(x, o),
            observation: None,
        })
    }
}

/// `exp` of a log-decay matrix `[b, h, t, t]` with the strictly upper triangle (future keys) zeroed.
fn causal_decay<B: Backend>(log_decay: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, t, _] = log_decay.dims();
    // `tril_mask` is true outside the lower triangle: exactly the future keys.
    let future =
        Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &log_decay.device()).reshape([1, 1, t, t]);
    // Masked before exp: above the diagonal the differences are positive and could overflow.
    log_decay.mask_fill(future, f32::NEG_INFINITY).exp()
}

fn to_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() != dtype { x.cast(dtype) } else { x }
}

/// Parallel form: `o = ((q k^T) * D) v` with `D_ij = prod_{j < m <= i} gamma_m` for `j <= i`, else 0.
///
/// `q`, `k` `[b, h, t, d_k]`, `v` `[b, h, t, d_v]`, `log_gamma` `[b, h, t]` (f32); returns
/// `[b, h, t, d_v]`. Memory is `t x t` per head: the training form for short rows.
pub fn retention_parallel<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_gamma: Tensor<B, 3>,
) -> Tensor<B, 4> {
    let [b, h, t, _] = q.dims();
    let cum = log_gamma.cumsum(2);
    let decay = causal_decay(cum.clone().reshape([b, h, t, 1]) - cum.reshape([b, h, 1, t]));
    let scores = q.matmul(k.swap_dims(2, 3));
    let dtype = scores.dtype();
    (scores * to_dtype(decay, dtype)).matmul(v)
}

/// Chunkwise form: the parallel form inside chunks of `chunk` tokens, a state carried between
/// them. Starts from `state` `[b, h, d_k, d_v]` (None: zeros); returns the outputs and the state
/// after the last token.
///
/// All decays are exponentials of non-positive sums of log gates taken within one chunk, so
/// nothing overflows however long the sequence.
pub fn retention_chunkwise<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_gamma: Tensor<B, 3>,
    chunk: usize,
    state: Option<Tensor<B, 4>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let chunk = chunk.max(1);
    let mut state = state;
    let mut outs = Vec::with_capacity(t.div_ceil(chunk));
    let mut lo = 0;
    while lo < t {
        let n = chunk.min(t - lo);
        let (qc, kc, vc) = (
            q.clone().narrow(2, lo, n),
            k.clone().narrow(2, lo, n),
            v.clone().narrow(2, lo, n),
        );
        let lc = log_gamma.clone().narrow(2, lo, n).cumsum(2);
        let dtype = qc.dtype();
        let decay =
            causal_decay(lc.clone().reshape([b, h, n, 1]) - lc.clone().reshape([b, h, 1, n]));
        let mut o = (qc.clone().matmul(kc.clone().swap_dims(2, 3)) * to_dtype(decay, dtype))
            .matmul(vc.clone());
        let total = lc.clone().narrow(2, n - 1, 1);
        // Each key's decay from its own position to the chunk's end.
        let to_end = to_dtype(
            (total.clone() - lc.clone()).exp().reshape([b, h, n, 1]),
            dtype,
        );
        let added = (kc * to_end).swap_dims(2, 3).matmul(vc);
        state = Some(match state {
            Some(s) => {
                // The carried state reaches query i decayed by the gates from the chunk start to i.
                o = o + (qc * to_dtype(lc.exp().reshape([b, h, n, 1]), dtype)).matmul(s.clone());
                s * to_dtype(total.exp().reshape([b, h, 1, 1]), dtype) + added
            }
            None => added,
        });
        outs.push(o);
        lo += n;
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 2)
    };
    let state = state.unwrap_or_else(|| Tensor::zeros([b, h, dk, dv], &q.device()));
    (out, state)
}

/// Recurrent form, one token at a time: `S_t = gamma_t S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`.
/// Starts from `state` (None: zeros); returns the outputs and the final state.
pub fn retention_recurrent<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    log_gamma: Tensor<B, 3>,
    state: Option<Tensor<B, 4>>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, h, t, dk] = q.dims();
    let dv = v.dims()[3];
    let dtype = q.dtype();
    let mut s = state.unwrap_or_else(|| Tensor::zeros([b, h, dk, dv], &q.device()));
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let gamma = to_dtype(
            log_gamma
                .clone()
                .narrow(2, i, 1)
                .exp()
                .reshape([b, h, 1, 1]),
            dtype,
        );
        let ki = k.clone().narrow(2, i, 1);
        s = s * gamma + ki.swap_dims(2, 3).matmul(v.clone().narrow(2, i, 1));
        outs.push(q.clone().narrow(2, i, 1).matmul(s.clone()));
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 2)
    };
    (out, s)
}
