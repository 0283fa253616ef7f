//! DMC, Dynamic Memory Compression (Nawrot, Łańcucki et al., ICML 2024): every KV head decides,
//! token by token, whether to append the new key and value as a slot or to merge them into the
//! slot it is still extending, as a weighted running average. Heads compress at their own rates,
//! so the cache is ragged (one cache per KV head, [`LayerCache::new_ragged`]).
//!
//! The decisions come from the layer's own projections, as in the official Megatron code: the
//! last channel of each KV head's pre-RoPE key gives the merge logit `k[-1] - init_bias` (merge
//! when it is positive), and the mean over the group's query heads of the last query channel
//! gives the importance `omega = sigmoid(q[-1] + init_bias)`. Both channels are then zeroed, so
//! they take no part in `q.k`. A slot holds the omega-weighted mean of its tokens' pre-RoPE keys
//! and of their values, its key rotated at the newest token it covers; the first token always
//! appends.
//!
//! **A slot averages the last `window` tokens of its run** (12, the official window), at
//! inference as in training: a run may grow without limit, and once it is longer than the
//! window its oldest tokens leave the mean (the official inference kernel subtracts them from
//! its running sums). The cache keeps each head's last `window - 1` tokens for this
//! ([`OpenSlots`]) and recomputes the slot from them, so with hard decisions the merged cache
//! equals the training path exactly, however the tokens arrive.
//!
//! **Training** uses the paper's relaxation: Gumbel-sigmoid decisions (temperature 0.1), keys and
//! values as windowed weighted prefix sums ([`merge_runs`]), and every attention logit to key `j`
//! from a later query offset by `log(1 - alpha_{j+1})` ([`merge_fade`]), so a key merged forward fades
//! from view.

use crate::{
    AttentionOutput, CachedAttention, GroupedAttention, GroupedAttentionConfig, ObserveRequest,
    attend_cache, position_range,
};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{log_sigmoid, sigmoid, softmax};
use kv_core::readback::ReadBack;
use kv_core::{CacheShape, HeadWrite, KvError, KvState, LayerCache, OpenSlots, Result};

/// Added to every importance, so a slot's total weight is never zero.
const OMEGA_EPS: f64 = 1e-6;
/// The additive score of a key a query may not see.
const HIDDEN: f64 = -1.0e9;

/// Settings of a [`DmcAttention`] layer.
#[derive(Config, Debug)]
pub struct DmcAttentionConfig {
    /// The grouped attention whose projections DMC reads its decisions from.
    pub attention: GroupedAttentionConfig,
    /// Offset of the decision logit (`k[-1] - init_bias`) and of the importance
    /// (`sigmoid(q[-1] + init_bias)`): with the channels at zero, decisions start at "append"
    /// (the official code's `dmc-init-val`, 5).
    #[config(default = 5.0)]
    pub init_bias: f64,
    /// Most tokens one slot averages (the newest of its run), on both paths (the official 12).
    #[config(default = 12)]
    pub window: usize,
    /// Temperature of the Gumbel-sigmoid relaxation during training (the paper's 0.1).
    #[config(default = 0.1)]
    pub temperature: f64,
    /// Zero the decision channel after RoPE too, as the official code does: its rotation partner
    /// then keeps only the cosine half of its turn. Off (the default), the channel is zeroed
    /// before RoPE only and comes out of the rotation carrying the partner's sine half, so every
    /// RoPE pair keeps its relative form and a retrofit starts exactly as the base model without
    /// the channel.
    #[config(default = false)]
    pub zero_after_rope: bool,
}

impl DmcAttentionConfig {
    /// Checks the settings, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        self.attention.validate()?;
        if self.attention.head_dim() < 2 {
            return Err(KvError::config(
                "head_dim",
                self.attention.head_dim(),
                "at least 2 with dmc: its last channel becomes the decision channel",
            ));
        }
        if self.window == 0 || self.window > 256 {
            return Err(KvError::config(
                "dmc.window",
                self.window,
                "between 1 and 256 tokens averaged per slot (the paper uses 12)",
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(KvError::config(
                "dmc.temperature",
                self.temperature,
                "a finite number > 0 (the paper uses 0.1)",
            ));
        }
        if !self.init_bias.is_finite() {
            return Err(KvError::config(
                "dmc.init_bias",
                self.init_bias,
                "a finite number (the paper uses 5)",
            ));
        }
        Ok(())
    }

    /// Validates and builds a randomly initialised layer.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<DmcAttention<B>> {
        Ok(crate::materialize(self.init_lazy(device)?))
    }

    /// [`init`](Self::init) with the parameters still lazy, for loaders that replace them all.
    pub fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<DmcAttention<B>> {
        self.validate()?;
        Ok(self.wrap(self.attention.init_lazy(device)?))
    }

    /// Retrofits a trained grouped layer into DMC: the same weights, with the decision channel's
    /// query and key weights (and biases) zeroed, so every decision starts at "append"
    /// (`sigmoid(-init_bias)`) and every importance at `sigmoid(init_bias)`. This is where the
    /// official recipe's first stage (fading the channel out over 250 steps) ends, reached at once.
    pub fn retrofit<B: Backend>(&self, attention: GroupedAttention<B>) -> Result<DmcAttention<B>> {
        self.validate()?;
        let want = (
            self.attention.n_heads,
            self.attention.n_kv_heads,
            self.attention.head_dim(),
        );
        let got = (
            attention.n_heads(),
            attention.n_kv_heads(),
            attention.head_dim(),
        );
        if want != got {
            return Err(KvError::config(
                "retrofitted layer (heads, kv_heads, head_dim)",
                format!("{got:?}"),
                format!("{want:?}, as the DMC settings"),
            ));
        }
        let d = attention.head_dim();
        let mut attention = attention;
        // The packed copies would keep the decision channel's old weights.
        attention.packed = crate::PackedSet::default();
        for (linear, heads) in [(&mut attention.wq, want.0), (&mut attention.wk, want.1)] {
            let device = linear.weight.device();
            let keep: Vec<f32> = (0..heads * d)
                .map(|i| if i % d == d - 1 { 0.0 } else { 1.0 })
                .collect();
            let keep = Tensor::<B, 1>::from_floats(keep.as_slice(), &device);
            let column = keep.clone();
            // Each product becomes a leaf again (detach, require_grad) under its old id, so the
            // optimiser still trains it and a checkpoint keeps its parameter order.
            linear.weight = linear
                .weight
                .clone()
                .map(|w| (w * column.unsqueeze_dim(0)).detach().require_grad());
            linear.bias = linear
                .bias
                .take()
                .map(|b| b.map(|b| (b * keep).detach().require_grad()));
        }
        Ok(self.wrap(attention))
    }

    fn wrap<B: Backend>(&self, attention: GroupedAttention<B>) -> DmcAttention<B> {
        DmcAttention {
            attention,
            init_bias: self.init_bias,
            window: self.window,
            temperature: self.temperature,
            zero_after_rope: self.zero_after_rope,
        }
    }
}

/// Grouped attention whose KV heads merge tokens into their slots (DMC).
#[derive(Module, Debug)]
pub struct DmcAttention<B: Backend> {
    /// The projections, RoPE and output of the underlying grouped attention.
    pub attention: GroupedAttention<B>,
    init_bias: f64,
    window: usize,
    temperature: f64,
    zero_after_rope: bool,
}

/// What DMC's training forward reports besides the output, for the compression loss.
#[derive(Debug, Clone)]
pub struct DmcDecisions<B: Backend> {
    /// Share of tokens merged per sequence, `[batch]`, with a straight-through gradient: the hard
    /// share forward, the relaxed decisions' gradient backward (the official `alpha_hard`).
    pub merged_share: Tensor<B, 1>,
}

impl<B: Backend> DmcAttention<B> {
    /// Query heads.
    pub fn n_heads(&self) -> usize {
        self.attention.n_heads()
    }

    /// Most tokens one slot averages.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Tokens each head keeps for its next merge: one fewer than the window (at least one).
    fn recent(&self) -> usize {
        (self.window - 1).max(1)
    }

    /// RoPE at `positions`, then the decision channel zeroed again if the official rule is on.
    fn rotate(&self, x: Tensor<B, 4>, positions: Tensor<B, 3, Int>) -> Tensor<B, 4> {
        let x = self.attention.rope.apply(x, positions);
        if self.zero_after_rope {
            without_decision_channel(x)
        } else {
            x
        }
    }

    /// The cache shape of one batch of `batch` (per KV head; storage is ragged).
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        self.attention.cache_shape(batch)
    }

    /// An empty state, its cache in ragged storage.
    pub fn new_state(&self, batch: usize, device: &B::Device) -> KvState<B> {
        KvState::from(LayerCache::new_ragged(self.cache_shape(batch), device))
    }

    /// The merge logits `[b, kv_heads, t]` (merge where positive) and importances
    /// `[b, kv_heads, t]` read from pre-RoPE queries `[b, H, t, d]` and keys `[b, KV, t, d]`.
    pub fn decisions(&self, q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [b, h, t, d] = q.dims();
        let kv = k.dims()[1];
        let logit = k
            .clone()
            .narrow(3, d - 1, 1)
            .reshape([b, kv, t])
            .sub_scalar(self.init_bias);
        let query = q
            .clone()
            .narrow(3, d - 1, 1)
            .reshape([b, kv, h / kv, t])
            .mean_dim(2)
            .reshape([b, kv, t]);
        (
            logit,
            sigmoid(query.add_scalar(self.init_bias)).add_scalar(OMEGA_EPS),
        )
    }

    /// Training path: causal attention over `x` `[b, t, d_model]` at positions `0..t` with the
    /// relaxed merges (Gumbel noise while autodiff is on; hard decisions otherwise, which equal
    /// the cached path).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_train(x).0
    }

    /// [`forward`](Self::forward), also returning the decisions the compression loss reads.
    pub fn forward_train(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, DmcDecisions<B>) {
        let [b, t, _] = x.dims();
        let device = x.device();
        let (q, k, v) = self.attention.project_unrotated(x, None);
        let (logit, omega) = self.decisions(&q, &k);
        let (q, k) = (without_decision_channel(q), without_decision_channel(k));
        let [_, kv, _, d] = k.dims();
        let relaxed = B::ad_enabled(&device);
        let noisy = if relaxed {
            // Gumbel-sigmoid: the difference of two Gumbel draws is logistic noise.
            let u = Tensor::<B, 3>::random(
                [b, kv, t],
                burn::tensor::Distribution::Uniform(1e-6, 1.0 - 1e-6),
                &device,
            );
            logit + u.clone().log() - u.neg().add_scalar(1.0).log()
        } else {
            logit
        };
        // The first token has no slot to merge into: it always appends.
        let later = Tensor::<B, 3>::ones([b, kv, t], &device).slice_fill([0..b, 0..kv, 0..1], 0.0);
        let hard = noisy.clone().greater_elem(0.0).float() * later.clone();
        let (alpha, faded) = if relaxed {
            (
                sigmoid(noisy.clone().div_scalar(self.temperature)) * later.clone(),
                merge_fade(noisy, self.temperature) * later,
            )
        } else {
            (hard.clone(), hard.clone().mul_scalar(HIDDEN))
        };
        let merged_share = (hard - alpha.clone().detach() + alpha.clone())
            .mean_dim(2)
            .mean_dim(1)
            .reshape([b]);
        let (merged, _) = merge_runs(Tensor::cat(vec![k, v], 3), omega, alpha, self.window);
        let (mk, mv) = (merged.clone().narrow(3, 0, d), merged.narrow(3, d, d));
        let positions = position_range(0, t, &device);
        let (q, rk) = (
            self.rotate(q, positions.clone()),
            self.rotate(mk, positions),
        );
        // The same chunk kernel as a cached prefill, over an empty cache: no older slots and no
        // open one (extension index 0 is a placeholder every query is blind to).
        let none = || Tensor::zeros([b, kv, 1, d], &device);
        let keys = Tensor::cat(vec![none(), rk], 2);
        let values = Tensor::cat(vec![none(), mv], 2);
        let o = self.chunk_attention(q, &[], keys, values, faded, &vec![false; b * kv]);
        (self.attention.merge_heads(o), DmcDecisions { merged_share })
    }

    /// Attention of a chunk of queries `q` `[b, H, t, d]` (rotated) over, per KV head, the slots
    /// held before the chunk except the open one (`held`; empty: none anywhere), then `keys` /
    /// `values` `[b, KV, 1 + t, d]`: index 0 the open slot as held (keys rotated), then the chunk
    /// tokens' partial merges. `faded` `[b, KV, t]` is each chunk token's [`merge_fade`] (its merge
    /// hides the partial merge before it); `open[i]` says whether head `i` had an open slot. The
    /// training path and a cached prefill both run it.
    ///
    /// Query `i` (extension index `i + 1`) sees itself and every earlier partial merge `j`
    /// offset by the fade of the token after it (the paper's `log(1 - alpha_{j+1})`: with hard
    /// merges, the slots complete at that point), and all of `held`.
    fn chunk_attention(
        &self,
        q: Tensor<B, 4>,
        held: &[(Tensor<B, 4>, Tensor<B, 4>)],
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        faded: Tensor<B, 3>,
        open: &[bool],
    ) -> Tensor<B, 4> {
        let [b, h, t, d] = q.dims();
        let kv = keys.dims()[1];
        let r = h / kv;
        let device = q.device();
        let closed: Vec<f32> = open
            .iter()
            .map(|&o| if o { 0.0 } else { HIDDEN as f32 })
            .collect();
        let closed = Tensor::<B, 1>::from_floats(closed.as_slice(), &device).reshape([b, kv, 1]);
        let col_bias = Tensor::cat(vec![faded, Tensor::zeros([b, kv, 1], &device)], 2)
            + Tensor::cat(vec![closed, Tensor::zeros([b, kv, t], &device)], 2);
        let mut outs = Vec::with_capacity(t.div_ceil(crate::QUERY_BLOCK));
        let mut lo = 0;
        while lo < t {
            let tb = crate::QUERY_BLOCK.min(t - lo);
            let c = lo + tb + 1;
            // The block sees extension indices up to its last query's.
            let (rows, cols) = grid::<B>(lo + 1..lo + tb + 1, 0..c, &device);
            let bias = col_bias
                .clone()
                .narrow(2, 0, c)
                .reshape([b, kv, 1, c])
                .expand([b, kv, tb, c]);
            let bias = bias.mask_fill(
                cols.clone()
                    .equal(rows.clone())
                    .reshape([1, 1, tb, c])
                    .expand([b, kv, tb, c]),
                0.0,
            );
            let bias = bias.mask_fill(
                cols.greater(rows)
                    .reshape([1, 1, tb, c])
                    .expand([b, kv, tb, c]),
                HIDDEN,
            );
            let qb = q
                .clone()
                .narrow(2, lo, tb)
                .mul_scalar(self.attention.scale())
                .reshape([b, kv, r * tb, d]);
            let ext = qb
                .clone()
                .matmul(keys.clone().narrow(2, 0, c).swap_dims(2, 3))
                .cast(DType::F32)
                .reshape([b, kv, r, tb, c])
                + bias.reshape([b, kv, 1, tb, c]);
            let ext = ext.reshape([b, kv, r * tb, c]);
            let o = if held.iter().all(|(k, _)| k.dims()[2] == 0) {
                // Nothing older anywhere (training, a first prefill): every head at once.
                softmax(ext, 3)
                    .cast(values.dtype())
                    .matmul(values.clone().narrow(2, 0, c))
            } else {
                let per_head = (0..b * kv)
                    .map(|i| {
                        let pick =
                            |x: &Tensor<B, 4>| x.clone().narrow(0, i / kv, 1).narrow(1, i % kv, 1);
                        let (hk, hv) = &held[i];
                        let n = hk.dims()[2];
                        let scores = if n > 0 {
                            Tensor::cat(
                                vec![
                                    pick(&qb)
                                        .matmul(hk.clone().swap_dims(2, 3))
                                        .cast(DType::F32),
                                    pick(&ext),
                                ],
                                3,
                            )
                        } else {
                            pick(&ext)
                        };
                        let probs = softmax(scores, 3).cast(values.dtype());
                        let o = probs
                            .clone()
                            .narrow(3, n, c)
                            .matmul(pick(&values).narrow(2, 0, c));
                        if n > 0 {
                            o + probs.narrow(3, 0, n).matmul(hv.clone())
                        } else {
                            o
                        }
                    })
                    .collect::<Vec<_>>();
                let per_row: Vec<Tensor<B, 4>> = (0..b)
                    .map(|bi| Tensor::cat(per_head[bi * kv..(bi + 1) * kv].to_vec(), 1))
                    .collect();
                Tensor::cat(per_row, 0)
            };
            outs.push(o.reshape([b, h, tb, d]));
            lo += tb;
        }
        Tensor::cat(outs, 2)
    }
}

impl<B: Backend> CachedAttention<B> for DmcAttention<B> {
    type State = KvState<B>;

    fn n_heads(&self) -> usize {
        self.attention.n_heads()
    }

    /// The new tokens take positions `tokens_seen ..`; each KV head appends or merges them into
    /// its own slots (one host read of the decisions per call), and they attend over those.
    /// Observations (for a policy over the merged cache) are of the slots held after the call.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut KvState<B>,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        let [b, t, _] = x.dims();
        if t == 0 {
            return Err(KvError::config("new tokens", 0, "at least 1"));
        }
        let shape = self.cache_shape(b);
        if state.cache.shape() != shape {
            return Err(KvError::config(
                "layer cache shape",
                format!("{:?}", state.cache.shape()),
                format!("{shape:?}"),
            ));
        }
        if !state.cache.is_ragged() {
            if state.cache.tokens_seen() > 0 {
                return Err(KvError::config(
                    "DMC layer cache",
                    "rectangular storage with tokens in it",
                    "the ragged cache DmcAttention::new_state makes",
                ));
            }
            state.cache = LayerCache::new_ragged(shape, &state.cache.device());
            state.open = None;
        }
        let device = x.device();
        let before = self.attention.shift_carry(&x, state);
        let seen = state.cache.tokens_seen();
        let (q, k, v) = self.attention.project_unrotated(x, before);
        let (logit, omega) = self.decisions(&q, &k);
        let (q, k) = (without_decision_channel(q), without_decision_channel(k));
        let [_, kv, _, d] = k.dims();
        let heads = b * kv;
        let recent = self.recent();
        let asks = host_bools(logit.greater_elem(0.0));
        // A head's open slot stays open unless a policy evicted from that head since.
        let held_now = state.cache.slots_per_head();
        let (ring_k, ring_v, ring_w, open_tokens) = match state.open.take() {
            Some(o) => {
                let tokens = o
                    .tokens
                    .iter()
                    .zip(&o.slots)
                    .zip(&held_now)
                    .map(|((&n, &s), &h)| if s == h { n } else { 0 })
                    .collect();
                (o.keys, o.values, o.weights, tokens)
            }
            None => (
                Tensor::zeros([b, kv, recent, d], &device),
                Tensor::zeros([b, kv, recent, d], &device),
                Tensor::zeros([b, kv, recent], &device),
                vec![0; heads],
            ),
        };
        let (merges, runs) = merges_of(&asks, t, &open_tokens);
        // The run so far (the recent tokens) and the chunk, each head's tokens in order, with each
        // one's merge into the one before: a recent token of age `a` (1 the newest) merged into its
        // predecessor iff both are in the open run.
        let x_ext = Tensor::cat(
            vec![
                Tensor::cat(vec![ring_k, k], 2),
                Tensor::cat(vec![ring_v, v], 2),
            ],
            3,
        );
        let w_ext = Tensor::cat(vec![ring_w, omega], 2);
        let (mk, mv) = if t == 1 {
            // A decode step's slot is one weighted sum over the recent tokens of its run and itself.
            let coefficients: Vec<f32> = (0..heads)
                .flat_map(|i| (0..=recent).map(move |e| (recent - e, i)))
                .map(|(age, i)| {
                    f32::from(age == 0 || (merges[i] && age <= open_tokens[i] && age < self.window))
                })
                .collect();
            let c = Tensor::<B, 1>::from_floats(coefficients.as_slice(), &device).reshape([
                b,
                kv,
                1,
                recent + 1,
            ]) * w_ext.clone().reshape([b, kv, 1, recent + 1]);
            let merged = c.clone().matmul(x_ext.clone()) / c.sum_dim(3);
            (merged.clone().narrow(3, 0, d), merged.narrow(3, d, d))
        } else {
            let alpha: Vec<f32> = (0..heads)
                .flat_map(|i| {
                    let carried = open_tokens[i];
                    let ring = (0..recent).map(move |e| f32::from(recent - e < carried));
                    ring.chain(merges[i * t..(i + 1) * t].iter().map(|&m| f32::from(m)))
                        .collect::<Vec<_>>()
                })
                .collect();
            let alpha =
                Tensor::<B, 1>::from_floats(alpha.as_slice(), &device).reshape([b, kv, recent + t]);
            let (merged, _) = merge_runs(x_ext.clone(), w_ext.clone(), alpha, self.window);
            let merged = merged.narrow(2, recent, t);
            (merged.clone().narrow(3, 0, d), merged.narrow(3, d, d))
        };
        let positions = position_range(seen, t, &device);
        let (q, rk) = (
            self.rotate(q, positions.clone()),
            self.rotate(mk, positions),
        );
        let open: Vec<bool> = open_tokens.iter().map(|&n| n > 0).collect();
        let chunk_output = (t > 1).then(|| {
            let caches = state.cache.head_caches().expect("ragged storage");
            // Per head: the slots before its open one, and the open one as the cache holds it.
            let (held, open_slot): (Vec<_>, Vec<_>) = caches
                .iter()
                .zip(&open)
                .map(|(c, &o)| {
                    let n = c.slots() - usize::from(o);
                    let empty = || {
                        (
                            Tensor::zeros([1, 1, 0, d], &device),
                            Tensor::zeros([1, 1, 0, d], &device),
                        )
                    };
                    let older = if n == 0 {
                        empty()
                    } else {
                        (c.keys().narrow(2, 0, n), c.values().narrow(2, 0, n))
                    };
                    let slot = if o {
                        (c.keys().narrow(2, n, 1), c.values().narrow(2, n, 1))
                    } else {
                        (
                            Tensor::zeros([1, 1, 1, d], &device),
                            Tensor::zeros([1, 1, 1, d], &device),
                        )
                    };
                    (older, slot)
                })
                .unzip();
            let by_head = |parts: Vec<Tensor<B, 4>>| -> Tensor<B, 4> {
                Tensor::cat(
                    (0..b)
                        .map(|bi| Tensor::cat(parts[bi * kv..(bi + 1) * kv].to_vec(), 1))
                        .collect(),
                    0,
                )
            };
            let (open_k, open_v): (Vec<_>, Vec<_>) = open_slot.into_iter().unzip();
            let keys = Tensor::cat(vec![by_head(open_k), rk.clone()], 2);
            let values = Tensor::cat(vec![by_head(open_v), mv.clone()], 2);
            let faded: Vec<f32> = merges
                .iter()
                .map(|&m| if m { HIDDEN as f32 } else { 0.0 })
                .collect();
            let faded = Tensor::<B, 1>::from_floats(faded.as_slice(), &device).reshape([b, kv, t]);
            self.chunk_attention(q.clone(), &held, keys, values, faded, &open)
        });
        // Each head writes the ends of its runs: chunk token i ends one when it is the last or the
        // next one appends.
        let writes = (0..heads)
            .map(|i| {
                let m = &merges[i * t..(i + 1) * t];
                let ends: Vec<usize> = (0..t).filter(|&e| e + 1 == t || !m[e + 1]).collect();
                let (bi, hi) = (i / kv, i % kv);
                // One slot (every decode step) is a narrow; several, one select.
                let idx: Vec<i64> = ends.iter().map(|&e| e as i64).collect();
                let idx = (ends.len() > 1)
                    .then(|| Tensor::<B, 1, Int>::from_ints(idx.as_slice(), &device));
                let pick = |x: &Tensor<B, 4>| {
                    let head = x.clone().narrow(0, bi, 1).narrow(1, hi, 1);
                    match &idx {
                        Some(idx) => head.select(2, idx.clone()),
                        None => head.narrow(2, ends[0], 1),
                    }
                };
                HeadWrite {
                    overwrite_last: open[i] && m[0],
                    keys: pick(&rk),
                    values: pick(&mv),
                    positions: ends.iter().map(|&e| seen + e).collect(),
                }
            })
            .collect();
        state.cache.write_heads(writes, t)?;
        let ext = recent + t;
        state.open = Some(OpenSlots {
            keys: x_ext
                .clone()
                .narrow(2, ext - recent, recent)
                .narrow(3, 0, d),
            values: x_ext.narrow(2, ext - recent, recent).narrow(3, d, d),
            weights: w_ext.narrow(2, ext - recent, recent),
            tokens: runs,
            slots: state.cache.slots_per_head(),
        });
        let (output, observation) = match chunk_output {
            // One token: the slots held now are exactly what it attends over.
            None => attend_cache(q, &state.cache, None, self.attention.scale(), observe),
            Some(o) => {
                let observation = (!observe.is_empty())
                    .then(|| {
                        attend_cache(
                            q,
                            &state.cache,
                            Some(Tensor::arange(seen as i64..(seen + t) as i64, &device)),
                            self.attention.scale(),
                            observe,
                        )
                        .1
                    })
                    .flatten();
                (o, observation)
            }
        };
        Ok(AttentionOutput {
            output: self.attention.merge_heads(output),
            observation,
        })
    }
}

/// DMC's windowed weighted prefix sums: for tokens `x` `[b, h, t, d]` with importances `omega`
/// `[b, h, t]` and merge decisions `alpha` `[b, h, t]` (token `i` merges into `i - 1`'s slot; hard
/// or relaxed), the running merge at every token, `x^_i = sum_j P(j, i) omega_j x_j / z_i` with
/// `P(j, i) = prod_{m = j+1..=i} alpha_m` over the last `window` tokens, and `z_i`.
///
/// The official code's `poolsum`. With hard decisions, `x^_i` is the mean of the last `window`
/// tokens of the run `i` ends at that point, which is what the cache holds.
pub fn merge_runs<B: Backend>(
    x: Tensor<B, 4>,
    omega: Tensor<B, 3>,
    alpha: Tensor<B, 3>,
    window: usize,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, h, t, d] = x.dims();
    let device = x.device();
    let shift3 = |y: Tensor<B, 3>, o: usize| {
        Tensor::cat(
            vec![Tensor::zeros([b, h, o], &device), y.narrow(2, 0, t - o)],
            2,
        )
    };
    let shift4 = |y: Tensor<B, 4>, o: usize| {
        Tensor::cat(
            vec![Tensor::zeros([b, h, o, d], &device), y.narrow(2, 0, t - o)],
            2,
        )
    };
    let weighted = x * omega.clone().reshape([b, h, t, 1]);
    let (mut acc, mut z) = (weighted.clone(), omega.clone());
    let mut reach = Tensor::<B, 3>::ones([b, h, t], &device);
    for o in 1..window.min(t) {
        reach = reach
            * if o == 1 {
                alpha.clone()
            } else {
                shift3(alpha.clone(), o - 1)
            };
        acc = acc + shift4(weighted.clone(), o) * reach.clone().reshape([b, h, t, 1]);
        z = z + shift3(omega.clone(), o) * reach.clone();
    }
    (acc / z.clone().clamp_min(1e-30).reshape([b, h, t, 1]), z)
}

/// The merges of a chunk, per head: token `i` of head `hd` merges iff it asks to and its head has
/// an open slot (one started earlier in the chunk, or `open[hd]` tokens carried in). `asks` is
/// `[heads * t]`; returns the merges and each head's open run length at the end.
fn merges_of(asks: &[bool], t: usize, open: &[usize]) -> (Vec<bool>, Vec<usize>) {
    let mut merges = vec![false; asks.len()];
    let runs = open
        .iter()
        .enumerate()
        .map(|(hd, &carried)| {
            let mut run = carried;
            for i in 0..t {
                let merge = asks[hd * t + i] && run > 0;
                merges[hd * t + i] = merge;
                run = if merge { run + 1 } else { 1 };
            }
            run
        })
        .collect();
    (merges, runs)
}

/// The attention offset of a key from later queries when the token after it merges with relaxed
/// logit `x`: `log(1 - sigmoid(x / temperature))`, as `log_sigmoid(-x / temperature)` (the
/// official `get_attn_score_mask`), which keeps its gradient where a confident merge would
/// round `1 - sigmoid` to zero in f32.
pub fn merge_fade<B: Backend, const D: usize>(x: Tensor<B, D>, temperature: f64) -> Tensor<B, D> {
    log_sigmoid(x.div_scalar(-temperature))
}

/// `x` with its last channel (DMC's decision channel) zeroed.
fn without_decision_channel<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let device = x.device();
    Tensor::cat(
        vec![x.narrow(3, 0, d - 1), Tensor::zeros([b, h, t, 1], &device)],
        3,
    )
}

/// Row and column indices over `rows x cols`, each `[rows, cols]`.
fn grid<B: Backend>(
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let (nr, nc) = (rows.len(), cols.len());
    let r = Tensor::<B, 1, Int>::arange(rows.start as i64..rows.end as i64, device)
        .reshape([nr, 1])
        .expand([nr, nc]);
    let c = Tensor::<B, 1, Int>::arange(cols.start as i64..cols.end as i64, device)
        .reshape([1, nc])
        .expand([nr, nc]);
    (r, c)
}

fn host_bools<B: Backend, const D: usize>(x: Tensor<B, D, Bool>) -> Vec<bool> {
    x.read_back().iter::<bool>().collect()
}
