//! DMC, Dynamic Memory Compression (Nawrot, Łańcucki et al., ICML 2024): every KV head decides,
//! token by token, whether to append the new key and value as a slot or to merge them into the
//! slot it is still extending, as a weighted running average. Heads compress at their own rates,
//! so the cache is ragged (one cache per KV head, [`LayerCache::new_ragged`]).
//!
//! The decisions come from the layer's own projections, as in the official Megatron code: the
//! last channel of each KV head's pre-RoPE key gives the merge logit `k[-1] - init_bias` (merge
//! when it is positive), and the mean over the group's query heads of the last query channel
//! gives the importance `omega = sigmoid(q[-1] + init_bias)`. Both channels are then zeroed, so
//! they take no part in `q.k` (nor in RoPE's pairs). A slot holds the omega-weighted mean of its
//! tokens' pre-RoPE keys and of their values, `k = (z k_last + omega k_t) / (z + omega)`,
//! `z += omega`, its key rotated at the newest token it covers; the first token always appends.
//!
//! **Training** uses the paper's relaxation: Gumbel-sigmoid decisions (temperature 0.1), keys and
//! values as windowed weighted prefix sums ([`merge_runs`]), and every attention logit to key `j`
//! from a later query offset by `log(1 - alpha_{j+1})`, so a key merged forward fades from view.
//!
//! **A slot covers at most `window` tokens** (12, the paper's training window) on both paths: the
//! training path's prefix sums then always span whole slots, so with hard decisions it equals the
//! cached path exactly; it also bounds the compression at `window`x.

use crate::{AttentionOutput, CachedAttention, GroupedAttention, GroupedAttentionConfig, ObserveRequest, attend_cache, position_range};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::{sigmoid, softmax};
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
    /// Most tokens one slot may cover, and the window of the training prefix sums (the paper's 12).
    #[config(default = 12)]
    pub window: usize,
    /// Temperature of the Gumbel-sigmoid relaxation during training (the paper's 0.1).
    #[config(default = 0.1)]
    pub temperature: f64,
}

impl DmcAttentionConfig {
    /// Checks the settings, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        self.attention.validate()?;
        if self.attention.head_dim() < 2 {
            return Err(KvError::config("head_dim", self.attention.head_dim(), "at least 2 with dmc: its last channel becomes the decision channel"));
        }
        if self.window == 0 || self.window > 256 {
            return Err(KvError::config("dmc.window", self.window, "between 1 and 256 tokens per slot (the paper uses 12)"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(KvError::config("dmc.temperature", self.temperature, "a finite number > 0 (the paper uses 0.1)"));
        }
        if !self.init_bias.is_finite() {
            return Err(KvError::config("dmc.init_bias", self.init_bias, "a finite number (the paper uses 5)"));
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
        let want = (self.attention.n_heads, self.attention.n_kv_heads, self.attention.head_dim());
        let got = (attention.n_heads(), attention.n_kv_heads(), attention.head_dim());
        if want != got {
            return Err(KvError::config("retrofitted layer (heads, kv_heads, head_dim)", format!("{got:?}"), format!("{want:?}, as the DMC settings")));
        }
        let d = attention.head_dim();
        let mut attention = attention;
        // The packed copies would keep the decision channel's old weights.
        attention.packed = crate::PackedSet::default();
        for (linear, heads) in [(&mut attention.wq, want.0), (&mut attention.wk, want.1)] {
            let device = linear.weight.device();
            let keep: Vec<f32> = (0..heads * d).map(|i| if i % d == d - 1 { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::<B, 1>::from_floats(keep.as_slice(), &device);
            let column = keep.clone();
            // Each product becomes a leaf again (detach, require_grad) under its old id, so the
            // optimiser still trains it and a checkpoint keeps its parameter order.
            linear.weight = linear.weight.clone().map(|w| (w * column.unsqueeze_dim(0)).detach().require_grad());
            linear.bias = linear.bias.take().map(|b| b.map(|b| (b * keep).detach().require_grad()));
        }
        Ok(self.wrap(attention))
    }

    fn wrap<B: Backend>(&self, attention: GroupedAttention<B>) -> DmcAttention<B> {
        DmcAttention { attention, init_bias: self.init_bias, window: self.window, temperature: self.temperature }
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

    /// Most tokens one slot covers.
    pub fn window(&self) -> usize {
        self.window
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
        let logit = k.clone().narrow(3, d - 1, 1).reshape([b, kv, t]).sub_scalar(self.init_bias);
        let query = q.clone().narrow(3, d - 1, 1).reshape([b, kv, h / kv, t]).mean_dim(2).reshape([b, kv, t]);
        (logit, sigmoid(query.add_scalar(self.init_bias)).add_scalar(OMEGA_EPS))
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
        let kv = k.dims()[1];
        let noisy = if B::ad_enabled(&device) {
            // Gumbel-sigmoid: the difference of two Gumbel draws is logistic noise.
            let u = Tensor::<B, 3>::random([b, kv, t], burn::tensor::Distribution::Uniform(1e-6, 1.0 - 1e-6), &device);
            logit + u.clone().log() - u.neg().add_scalar(1.0).log()
        } else {
            logit
        };
        let asks = host_bools(noisy.clone().greater_elem(0.0));
        let (allowed, _) = capped(&asks, t, &vec![0; b * kv], self.window);
        let allowed = Tensor::<B, 1>::from_floats(allowed.iter().map(|&a| if a { 1.0 } else { 0.0 }).collect::<Vec<f32>>().as_slice(), &device).reshape([b, kv, t]);
        let hard = noisy.clone().greater_elem(0.0).float() * allowed.clone();
        let alpha = if B::ad_enabled(&device) { sigmoid(noisy.div_scalar(self.temperature)) * allowed } else { hard.clone() };
        let merged_share = (hard - alpha.clone().detach() + alpha.clone()).mean_dim(2).mean_dim(1).reshape([b]);
        // The same chunk kernel as a cached prefill, over an empty cache: no older slots and no
        // open one (extension index 0 is then a placeholder every query is blind to).
        let [_, _, _, d] = k.dims();
        let closed = || Tensor::zeros([b, kv, 1, d], &device);
        let (keys, values, _) = self.extend(closed(), closed(), Tensor::zeros([b, kv, 1], &device), k, v, omega, alpha.clone(), 0);
        let alpha = Tensor::cat(vec![Tensor::zeros([b, kv, 1], &device), alpha], 2);
        let q = self.attention.rope.apply(q, position_range(0, t, &device));
        let o = self.chunk_attention(q, &[], keys.0, values, alpha, &vec![false; b * kv]);
        (self.attention.merge_heads(o), DmcDecisions { merged_share })
    }

    /// The running merges of the extended run `[open slot; new tokens]` (`[b, KV, 1 + t, d]`):
    /// keys rotated at each token's position (the open slot at `seen - 1`) and as they are (the
    /// next open slot's mean), values, and the weights `z`; `alpha` `[b, KV, t]` are the new
    /// tokens' merges (relaxed or hard).
    #[allow(clippy::too_many_arguments)]
    fn extend(
        &self,
        open_k: Tensor<B, 4>,
        open_v: Tensor<B, 4>,
        open_z: Tensor<B, 3>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        omega: Tensor<B, 3>,
        alpha: Tensor<B, 3>,
        seen: usize,
    ) -> ((Tensor<B, 4>, Tensor<B, 4>), Tensor<B, 4>, Tensor<B, 3>) {
        let [b, kv, t, d] = k.dims();
        let device = k.device();
        let x = Tensor::cat(vec![Tensor::cat(vec![open_k, k], 2), Tensor::cat(vec![open_v, v], 2)], 3);
        let alpha = Tensor::cat(vec![Tensor::zeros([b, kv, 1], &device), alpha], 2);
        let (merged, z) = merge_runs(x, Tensor::cat(vec![open_z, omega], 2), alpha, self.window);
        let (mk, mv) = (merged.clone().narrow(3, 0, d), merged.narrow(3, d, d));
        let positions = Tensor::<B, 1, Int>::arange(seen as i64 - 1..(seen + t) as i64, &device).reshape([1, 1, 1 + t]);
        ((self.attention.rope.apply(mk.clone(), positions), mk), mv, z)
    }

    /// Attention of a chunk of queries `q` `[b, H, t, d]` (rotated) over, per KV head, the slots
    /// held before the chunk except the open one (`held`; empty: none anywhere), then the
    /// extended run's partial merges `keys` / `values` `[b, KV, 1 + t, d]` (index 0 the open slot,
    /// keys rotated) under merges `alpha` `[b, KV, 1 + t]`; `open[i]` says whether head `i` had
    /// an open slot. The training path and a cached prefill both run it.
    ///
    /// Query `i` (extension index `i + 1`) sees itself and every earlier partial merge `j`
    /// weighted by `1 - alpha_{j+1}` (the paper's `log(1 - alpha)` offset: with hard merges, the
    /// slots complete at that point), and all of `held`.
    fn chunk_attention(&self, q: Tensor<B, 4>, held: &[(Tensor<B, 4>, Tensor<B, 4>)], keys: Tensor<B, 4>, values: Tensor<B, 4>, alpha: Tensor<B, 3>, open: &[bool]) -> Tensor<B, 4> {
        let [b, h, t, d] = q.dims();
        let kv = keys.dims()[1];
        let r = h / kv;
        let device = q.device();
        let next = Tensor::cat(vec![alpha.narrow(2, 1, t), Tensor::zeros([b, kv, 1], &device)], 2);
        let closed: Vec<f32> = open.iter().map(|&o| if o { 0.0 } else { HIDDEN as f32 }).collect();
        let closed = Tensor::<B, 1>::from_floats(closed.as_slice(), &device).reshape([b, kv, 1]);
        let col_bias = next.neg().add_scalar(1.0).clamp_min(1e-30).log() + Tensor::cat(vec![closed, Tensor::zeros([b, kv, t], &device)], 2);
        let mut outs = Vec::with_capacity(t.div_ceil(crate::QUERY_BLOCK));
        let mut lo = 0;
        while lo < t {
            let tb = crate::QUERY_BLOCK.min(t - lo);
            let c = lo + tb + 1;
            // The block sees extension indices up to its last query's.
            let (rows, cols) = grid::<B>(lo + 1..lo + tb + 1, 0..c, &device);
            let bias = col_bias.clone().narrow(2, 0, c).reshape([b, kv, 1, c]).expand([b, kv, tb, c]);
            let bias = bias.mask_fill(cols.clone().equal(rows.clone()).reshape([1, 1, tb, c]).expand([b, kv, tb, c]), 0.0);
            let bias = bias.mask_fill(cols.greater(rows).reshape([1, 1, tb, c]).expand([b, kv, tb, c]), HIDDEN);
            let qb = q.clone().narrow(2, lo, tb).mul_scalar(self.attention.scale()).reshape([b, kv, r * tb, d]);
            let ext = qb.clone().matmul(keys.clone().narrow(2, 0, c).swap_dims(2, 3)).cast(DType::F32).reshape([b, kv, r, tb, c]) + bias.reshape([b, kv, 1, tb, c]);
            let ext = ext.reshape([b, kv, r * tb, c]);
            let o = if held.iter().all(|(k, _)| k.dims()[2] == 0) {
                // Nothing older anywhere (training, a first prefill): every head at once.
                softmax(ext, 3).cast(values.dtype()).matmul(values.clone().narrow(2, 0, c))
            } else {
                let per_head = (0..b * kv)
                    .map(|i| {
                        let pick = |x: &Tensor<B, 4>| x.clone().narrow(0, i / kv, 1).narrow(1, i % kv, 1);
                        let (hk, hv) = &held[i];
                        let n = hk.dims()[2];
                        let scores = if n > 0 { Tensor::cat(vec![pick(&qb).matmul(hk.clone().swap_dims(2, 3)).cast(DType::F32), pick(&ext)], 3) } else { pick(&ext) };
                        let probs = softmax(scores, 3).cast(values.dtype());
                        let o = probs.clone().narrow(3, n, c).matmul(pick(&values).narrow(2, 0, c));
                        if n > 0 { o + probs.narrow(3, 0, n).matmul(hv.clone()) } else { o }
                    })
                    .collect::<Vec<_>>();
                let per_row: Vec<Tensor<B, 4>> = (0..b).map(|bi| Tensor::cat(per_head[bi * kv..(bi + 1) * kv].to_vec(), 1)).collect();
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
    fn forward_cached(&self, x: Tensor<B, 3>, state: &mut KvState<B>, observe: ObserveRequest) -> Result<AttentionOutput<B>> {
        let [b, t, _] = x.dims();
        if t == 0 {
            return Err(KvError::config("new tokens", 0, "at least 1"));
        }
        let shape = self.cache_shape(b);
        if state.cache.shape() != shape {
            return Err(KvError::config("layer cache shape", format!("{:?}", state.cache.shape()), format!("{shape:?}")));
        }
        if !state.cache.is_ragged() {
            if state.cache.tokens_seen() > 0 {
                return Err(KvError::config("DMC layer cache", "rectangular storage with tokens in it", "the ragged cache DmcAttention::new_state makes"));
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
        let asks = host_bools(logit.greater_elem(0.0));
        // A head's open slot stays open unless a policy evicted from that head since.
        let held_now = state.cache.slots_per_head();
        let (open_k, open_v, open_z, open_tokens) = match state.open.take() {
            Some(o) => {
                let tokens = o.tokens.iter().zip(&o.slots).zip(&held_now).map(|((&n, &s), &h)| if s == h { n } else { 0 }).collect();
                (o.keys, o.values, o.weights, tokens)
            }
            None => (Tensor::zeros([b, kv, 1, d], &device), Tensor::zeros([b, kv, 1, d], &device), Tensor::zeros([b, kv, 1], &device), vec![0; heads]),
        };
        let (merges, runs) = capped(&asks, t, &open_tokens, self.window);
        let as_floats: Vec<f32> = merges.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        let alpha = Tensor::<B, 1>::from_floats(as_floats.as_slice(), &device).reshape([b, kv, t]);
        // The extended run: index 0 is each head's open slot (its mean and weight), then the chunk.
        let ((rk, mk), mv, z) = self.extend(open_k, open_v, open_z, k, v, omega, alpha.clone(), seen);
        let alpha = Tensor::cat(vec![Tensor::zeros([b, kv, 1], &device), alpha], 2);
        let q = self.attention.rope.apply(q, position_range(seen, t, &device));
        let open: Vec<bool> = open_tokens.iter().map(|&n| n > 0).collect();
        let chunk_output = (t > 1).then(|| {
            let caches = state.cache.head_caches().expect("ragged storage");
            let held: Vec<(Tensor<B, 4>, Tensor<B, 4>)> = caches
                .iter()
                .zip(&open)
                .map(|(c, &o)| {
                    let n = c.slots() - usize::from(o);
                    if n == 0 { (Tensor::zeros([1, 1, 0, d], &device), Tensor::zeros([1, 1, 0, d], &device)) } else { (c.keys().narrow(2, 0, n), c.values().narrow(2, 0, n)) }
                })
                .collect();
            self.chunk_attention(q.clone(), &held, rk.clone(), mv.clone(), alpha, &open)
        });
        // Each head writes the ends of its runs: ext index e ends one when e == t or e + 1 appends.
        let writes = (0..heads)
            .map(|i| {
                let m = &merges[i * t..(i + 1) * t];
                let ends: Vec<usize> = (1..=t).filter(|&e| e == t || !m[e]).collect();
                let (bi, hi) = (i / kv, i % kv);
                // One slot (every decode step) is a narrow; several, one select.
                let idx: Vec<i64> = ends.iter().map(|&e| e as i64).collect();
                let idx = (ends.len() > 1).then(|| Tensor::<B, 1, Int>::from_ints(idx.as_slice(), &device));
                let pick = |x: &Tensor<B, 4>| {
                    let head = x.clone().narrow(0, bi, 1).narrow(1, hi, 1);
                    match &idx {
                        Some(idx) => head.select(2, idx.clone()),
                        None => head.narrow(2, ends[0], 1),
                    }
                };
                HeadWrite { overwrite_last: open[i] && m[0], keys: pick(&rk), values: pick(&mv), positions: ends.iter().map(|&e| seen + e - 1).collect() }
            })
            .collect();
        state.cache.write_heads(writes, t)?;
        state.open = Some(OpenSlots {
            keys: mk.narrow(2, t, 1),
            values: mv.narrow(2, t, 1),
            weights: z.narrow(2, t, 1),
            tokens: runs,
            slots: state.cache.slots_per_head(),
        });
        let (output, observation) = match chunk_output {
            // One token: the slots held now are exactly what it attends over.
            None => attend_cache(q, &state.cache, None, self.attention.scale(), observe),
            Some(o) => {
                let observation = (!observe.is_empty())
                    .then(|| attend_cache(q, &state.cache, Some(Tensor::arange(seen as i64..(seen + t) as i64, &device)), self.attention.scale(), observe).1)
                    .flatten();
                (o, observation)
            }
        };
        Ok(AttentionOutput { output: self.attention.merge_heads(output), observation })
    }
}

/// DMC's windowed weighted prefix sums: for tokens `x` `[b, h, t, d]` with importances `omega`
/// `[b, h, t]` and merge decisions `alpha` `[b, h, t]` (token `i` merges into `i - 1`'s slot; hard
/// or relaxed), the running merge at every token, `x^_i = sum_j P(j, i) omega_j x_j / z_i` with
/// `P(j, i) = prod_{m = j+1..=i} alpha_m` over the last `window` tokens, and `z_i`.
///
/// The official code's `poolsum`. With hard decisions and slots of at most `window` tokens, `x^_i`
/// is exactly the mean of the slot `i` ends at that point, which is what the cache holds.
pub fn merge_runs<B: Backend>(x: Tensor<B, 4>, omega: Tensor<B, 3>, alpha: Tensor<B, 3>, window: usize) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, h, t, d] = x.dims();
    let device = x.device();
    let shift3 = |y: Tensor<B, 3>, o: usize| Tensor::cat(vec![Tensor::zeros([b, h, o], &device), y.narrow(2, 0, t - o)], 2);
    let shift4 = |y: Tensor<B, 4>, o: usize| Tensor::cat(vec![Tensor::zeros([b, h, o, d], &device), y.narrow(2, 0, t - o)], 2);
    let weighted = x * omega.clone().reshape([b, h, t, 1]);
    let (mut acc, mut z) = (weighted.clone(), omega.clone());
    let mut reach = Tensor::<B, 3>::ones([b, h, t], &device);
    for o in 1..window.min(t) {
        reach = reach * if o == 1 { alpha.clone() } else { shift3(alpha.clone(), o - 1) };
        acc = acc + shift4(weighted.clone(), o) * reach.clone().reshape([b, h, t, 1]);
        z = z + shift3(omega.clone(), o) * reach.clone();
    }
    (acc / z.clone().clamp_min(1e-30).reshape([b, h, t, 1]), z)
}

/// The merges a slot cap allows, per head: token `i` of head `hd` merges iff it asks to, its head
/// has an open slot (one started earlier, or `open[hd]` tokens carried in), and that slot covers
/// fewer than `window` tokens. `asks` is `[heads * t]`; returns the merges and each head's open
/// slot length at the end.
fn capped(asks: &[bool], t: usize, open: &[usize], window: usize) -> (Vec<bool>, Vec<usize>) {
    let mut merges = vec![false; asks.len()];
    let runs = open
        .iter()
        .enumerate()
        .map(|(hd, &carried)| {
            let mut run = carried;
            for i in 0..t {
                let merge = asks[hd * t + i] && run > 0 && run < window;
                merges[hd * t + i] = merge;
                run = if merge { run + 1 } else { 1 };
            }
            run
        })
        .collect();
    (merges, runs)
}

/// `x` with its last channel (DMC's decision channel) zeroed.
fn without_decision_channel<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let device = x.device();
    Tensor::cat(vec![x.narrow(3, 0, d - 1), Tensor::zeros([b, h, t, 1], &device)], 3)
}

/// Row and column indices over `rows x cols`, each `[rows, cols]`.
fn grid<B: Backend>(rows: std::ops::Range<usize>, cols: std::ops::Range<usize>, device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let (nr, nc) = (rows.len(), cols.len());
    let r = Tensor::<B, 1, Int>::arange(rows.start as i64..rows.end as i64, device).reshape([nr, 1]).expand([nr, nc]);
    let c = Tensor::<B, 1, Int>::arange(cols.start as i64..cols.end as i64, device).reshape([1, nc]).expand([nr, nc]);
    (r, c)
}

fn host_bools<B: Backend, const D: usize>(x: Tensor<B, D, Bool>) -> Vec<bool> {
    x.into_data().iter::<bool>().collect()
}
