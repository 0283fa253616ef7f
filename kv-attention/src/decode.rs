//! One decode token's attention over a cache held in host memory (burn-flex), read in place.
//!
//! burn's ops take a decode step's attention through a batched matmul over a transposed view, a
//! softmax and a second matmul, each its own pass with its own buffers (at 4k slots on SmolLM2,
//! most of a step). Here the keys and values are read where the cache stores them, through the
//! tensors' own strides, without a copy: the scores of a group's query heads in one pass over its
//! keys, an f32 softmax (the prefill kernel's polynomial `exp2`), then one pass over its values, with (batch, KV head, key chunk) items
//! dealt over rayon's pool. The probabilities are the observation H2O and TOVA read (column sums
//! and the last row of one query are the same thing).

use crate::ObserveRequest;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use rayon::prelude::*;

/// A float tensor's storage on burn-flex, borrowed: the buffer, its first element and strides
/// (innermost 1).
struct HostView<const D: usize> {
    tensor: FlexTensor,
    offset: usize,
    strides: [usize; D],
    shape: [usize; D],
}

impl<const D: usize> HostView<D> {
    /// The tensor's storage, when `B` is burn-flex, the dtype f32 and the innermost stride 1 (all
    /// strides non-negative); None otherwise.
    fn of<B: Backend>(t: &Tensor<B, D>) -> Option<Self> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else { return None };
        let any: Box<dyn std::any::Any> = Box::new(p);
        let tensor = *any.downcast::<FlexTensor>().ok()?;
        let layout = tensor.layout();
        let shape: [usize; D] = t.dims();
        let strides: Vec<usize> = layout.strides().iter().map(|&s| usize::try_from(s).ok()).collect::<Option<_>>()?;
        let strides: [usize; D] = strides.try_into().ok()?;
        if strides[D - 1] != 1 && shape[D - 1] > 1 {
            return None;
        }
        let offset = layout.start_offset();
        Some(Self { tensor, offset, strides, shape })
    }

    fn data(&self) -> &[f32] {
        self.tensor.storage::<f32>()
    }
}

/// Keys and values of one run of slots.
struct Segment {
    keys: HostView<4>,
    values: HostView<4>,
    /// Slots before this segment.
    start: usize,
}

/// Whether the kernel takes `heads` query heads of `head_dim` on `kv_heads`: only where it was
/// measured to win. A group of query heads shares each key read here, and a head of 64 or more
/// pays for each dot product's reduction across lanes (SmolLM2, 3 query heads of 64 per KV head:
/// 1.3-1.6x burn's ops, which broadcast the group over a transposed view). With one query head per
/// KV head, or heads of 32, burn's matmul over the keys as stored is faster (decode-bench, MHA of
/// 32: 395 against 264 tokens/s at 2k; tiny-gqa, 2 of 32 per KV head: 1030-1070 against 840).
pub(crate) fn takes(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads >= 2 && head_dim >= 64
}

/// Keys per work item: enough to pay for the dispatch, few enough to spread 3 KV heads over cores.
const CHUNK: usize = 256;

/// Key floats (batch x KV heads x slots x head size) from which the work is spread over the pool.
const PARALLEL_MIN: usize = 1 << 18;

/// Attention of one token's queries `q` `[b, h, 1, d]` over `segments` (`[b, kv, n_i, d]` keys and
/// values) with `bias` (`[b | 1, kv | 1, n]`, added to every score: dead slots) on the host, when
/// every tensor is burn-flex f32 and the request asks for nothing but column sums and a window
/// of at most one row. Returns the output `[b, h, 1, d]` and, when asked, the probabilities
/// `[b, h, n]`.
pub(crate) fn decode_attention<B: Backend>(
    q: &Tensor<B, 4>,
    kv: &[(Tensor<B, 4>, Tensor<B, 4>)],
    bias: Option<&Tensor<B, 3>>,
    scale: f64,
    observe: ObserveRequest,
) -> Option<(Tensor<B, 4>, Option<Tensor<B, 3>>)> {
    let [b, h, t, d] = q.dims();
    if t != 1 || observe.band > 0 || observe.window > 1 || d == 0 || kv.is_empty() {
        return None;
    }
    let mut segments = Vec::with_capacity(kv.len());
    let mut n = 0;
    for (k, v) in kv {
        let (keys, values) = (HostView::of(k)?, HostView::of(v)?);
        let [kb, kvh, len, kd] = keys.shape;
        if kb != b || h % kvh != 0 || kd != d || values.shape != [b, kvh, len, d] {
            return None;
        }
        segments.push(Segment { keys, values, start: n });
        n += len;
    }
    let kvh = segments[0].keys.shape[1];
    if segments.iter().any(|s| s.keys.shape[1] != kvh) || n == 0 || !takes(h, kvh, d) {
        return None;
    }
    let bias = match bias {
        Some(t) => {
            let view = HostView::of(t)?;
            let [pb, ph, pn] = view.shape;
            if !(pb == 1 || pb == b) || !(ph == 1 || ph == kvh) || pn != n {
                return None;
            }
            Some(view)
        }
        None => None,
    };
    let qd = q.clone().into_data();
    let qs = qd.as_slice::<f32>().ok()?;
    let r = h / kvh;
    let scale = scale as f32;
    // Below a megabyte of keys the pool's dispatch costs more than the second core saves.
    let parallel = b * kvh * n * d >= PARALLEL_MIN;
    let items: Vec<(usize, usize, usize)> =
        (0..b).flat_map(|bi| (0..kvh).flat_map(move |g| (0..n.div_ceil(CHUNK)).map(move |c| (bi, g, c * CHUNK)))).collect();
    // Pass 1: each item's scores, [b, h, n] (query head g * r + i of batch bi at row bi * h + ..).
    let mut scores = vec![0f32; b * h * n];
    {
        let score = |&(bi, g, j0): &(usize, usize, usize)| {
            let queries = &qs[(bi * h + g * r) * d..(bi * h + g * r + r) * d];
            let item = Item { bi, g, j0, len: CHUNK.min(n - j0), r };
            ((bi * h + g * r) * n + j0, scores_of(&segments, bias.as_ref(), queries, scale, item))
        };
        let parts: Vec<(usize, Vec<f32>)> = if parallel { items.par_iter().map(score).collect() } else { items.iter().map(score).collect() };
        for (&(_, _, j0), (at, out)) in items.iter().zip(parts) {
            let len = CHUNK.min(n - j0);
            for i in 0..r {
                scores[at + i * n..at + i * n + len].copy_from_slice(&out[i * len..(i + 1) * len]);
            }
        }
    }
    // An exact softmax per query head, in f32.
    let softmax = |row: &mut [f32]| {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let inv = 1.0 / crate::host::exp_shifted(row, max);
        row.iter_mut().for_each(|x| *x *= inv);
    };
    if parallel {
        scores.par_chunks_mut(n).for_each(softmax);
    } else {
        scores.chunks_mut(n).for_each(softmax);
    }
    // Pass 2: each item's share of the output, then the shares summed per head.
    let output_share = |&(bi, g, j0): &(usize, usize, usize)| {
        let probs = &scores[(bi * h + g * r) * n..];
        outputs_of(&segments, probs, n, d, Item { bi, g, j0, len: CHUNK.min(n - j0), r })
    };
    let parts: Vec<Vec<f32>> = if parallel { items.par_iter().map(output_share).collect() } else { items.iter().map(output_share).collect() };
    let mut output = vec![0f32; b * h * d];
    for (&(bi, g, _), part) in items.iter().zip(&parts) {
        let at = (bi * h + g * r) * d;
        output[at..at + r * d].iter_mut().zip(part).for_each(|(o, p)| *o += p);
    }
    let device = q.device();
    let out = Tensor::from_data(TensorData::new(output, [b, h, 1, d]), &device);
    let probs = (observe.column_sums || observe.window > 0).then(|| Tensor::from_data(TensorData::new(scores, [b, h, n]), &device));
    #[cfg(test)]
    DECODE_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some((out, probs))
}

/// Calls the host decode served, so a test can tell it ran.
#[cfg(test)]
pub(crate) static DECODE_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One work item: slots `j0 .. j0 + len` of (batch `bi`, KV head `g`), whose group has `r` query
/// heads.
#[derive(Clone, Copy)]
struct Item {
    bi: usize,
    g: usize,
    j0: usize,
    len: usize,
    r: usize,
}

/// The widest instruction set this CPU has for the kernels below.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2Fma,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
    }
    Isa::Portable
}

/// [`score_item`] with the widest instruction set this CPU has.
fn scores_of(segments: &[Segment], bias: Option<&HostView<3>>, queries: &[f32], scale: f32, it: Item) -> Vec<f32> {
    match isa() {
        // SAFETY: `isa` found the CPU to support the instruction set of each call.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::scores_avx512(segments, bias, queries, scale, it) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::scores_avx2(segments, bias, queries, scale, it) },
        _ => score_item::<false>(segments, bias, queries, scale, it),
    }
}

/// [`value_item`] with the widest instruction set this CPU has.
fn outputs_of(segments: &[Segment], probs: &[f32], n: usize, d: usize, it: Item) -> Vec<f32> {
    match isa() {
        // SAFETY: `isa` found the CPU to support the instruction set of each call.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::outputs_avx512(segments, probs, n, d, it) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { x86::outputs_avx2(segments, probs, n, d, it) },
        _ => value_item::<false>(segments, probs, n, d, it),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{HostView, Item, Segment, score_item, value_item};

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn scores_avx512(segments: &[Segment], bias: Option<&HostView<3>>, queries: &[f32], scale: f32, it: Item) -> Vec<f32> {
        score_item::<true>(segments, bias, queries, scale, it)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn scores_avx2(segments: &[Segment], bias: Option<&HostView<3>>, queries: &[f32], scale: f32, it: Item) -> Vec<f32> {
        score_item::<true>(segments, bias, queries, scale, it)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn outputs_avx512(segments: &[Segment], probs: &[f32], n: usize, d: usize, it: Item) -> Vec<f32> {
        value_item::<true>(segments, probs, n, d, it)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn outputs_avx2(segments: &[Segment], probs: &[f32], n: usize, d: usize, it: Item) -> Vec<f32> {
        value_item::<true>(segments, probs, n, d, it)
    }
}

/// The item's scores `[r, len]`: each key read once for the group's `r` queries, plus the bias.
#[inline(always)]
fn score_item<const FMA: bool>(segments: &[Segment], bias: Option<&HostView<3>>, queries: &[f32], scale: f32, it: Item) -> Vec<f32> {
    let Item { bi, g, j0, len, r } = it;
    let d = queries.len() / r;
    let mut out = vec![0f32; r * len];
    for span in spans(segments, false, it) {
        for j in 0..span.rows {
            let at = span.base + j * span.stride;
            let key = &span.data[at..at + d];
            for i in 0..r {
                out[i * len + span.first + j] = dot::<FMA>(&queries[i * d..(i + 1) * d], key) * scale;
            }
        }
    }
    if let Some(bias) = bias {
        let (sb, sg) = (if bias.shape[0] == 1 { 0 } else { bi }, if bias.shape[1] == 1 { 0 } else { g });
        let base = bias.offset + sb * bias.strides[0] + sg * bias.strides[1] + j0 * bias.strides[2];
        let data = bias.data();
        for i in 0..r {
            for j in 0..len {
                out[i * len + j] += data[base + j * bias.strides[2]];
            }
        }
    }
    out
}

/// The item's share of the output `[r, d]`: each value read once for the group's `r` heads.
#[inline(always)]
fn value_item<const FMA: bool>(segments: &[Segment], probs: &[f32], n: usize, d: usize, it: Item) -> Vec<f32> {
    let Item { j0, r, .. } = it;
    let mut out = vec![0f32; r * d];
    for span in spans(segments, true, it) {
        for j in 0..span.rows {
            let at = span.base + j * span.stride;
            let value = &span.data[at..at + d];
            for i in 0..r {
                axpy::<FMA>(probs[i * n + j0 + span.first + j], value, &mut out[i * d..(i + 1) * d]);
            }
        }
    }
    out
}

/// Rows of one segment an item reads: `rows` rows from `base` by `stride` in `data`, the first
/// being the item's row `first`.
struct Span<'a> {
    data: &'a [f32],
    base: usize,
    stride: usize,
    rows: usize,
    first: usize,
}

/// The item's rows of keys (or of values) in each segment they fall in.
fn spans(segments: &[Segment], values: bool, it: Item) -> Vec<Span<'_>> {
    let Item { bi, g, j0, len, .. } = it;
    let end = j0 + len;
    segments
        .iter()
        .filter_map(|s| {
            let v = if values { &s.values } else { &s.keys };
            let (lo, hi) = (j0.max(s.start), end.min(s.start + v.shape[2]));
            (lo < hi).then(|| Span {
                data: v.data(),
                base: v.offset + bi * v.strides[0] + g * v.strides[1] + (lo - s.start) * v.strides[2],
                stride: v.strides[2],
                rows: hi - lo,
                first: lo - j0,
            })
        })
        .collect()
}

/// `a . b` in 16 lanes (the compiler vectorises the fixed-width inner loop).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] = if FMA { x[l].mul_add(y[l], acc[l]) } else { x[l] * y[l] + acc[l] };
        }
    }
    // A tree over the lanes (halves added), which vectorises; a running sum would be 16
    // dependent scalar adds.
    for w in [8, 4, 2, 1] {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

/// `out += p * v`.
#[inline(always)]
fn axpy<const FMA: bool>(p: f32, v: &[f32], out: &mut [f32]) {
    out.iter_mut().zip(v).for_each(|(o, &x)| *o = if FMA { p.mul_add(x, *o) } else { p * x + *o });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{attend_appended, set_host_kernels};
    use kv_core::{CacheShape, LayerCache};
    use std::sync::atomic::Ordering;

    type B = burn::backend::Flex;

    fn randn<const D: usize>(shape: [usize; D], dev: &burn::tensor::Device<B>) -> Tensor<B, D> {
        Tensor::random(shape, burn::tensor::Distribution::Normal(0.0, 1.0), dev)
    }

    /// A cache of a prompt, then single tokens (a body and a tail), with a few slots dead.
    fn cache(kv_heads: usize, d: usize, dev: &burn::tensor::Device<B>) -> LayerCache<B> {
        let shape = CacheShape { batch: 2, kv_heads, key_dim: d, value_dim: d };
        let mut c = LayerCache::new(shape, dev);
        c.append(randn([2, kv_heads, 300, d], dev), randn([2, kv_heads, 300, d], dev)).unwrap();
        for step in 0..40 {
            c.append(randn([2, kv_heads, 1, d], dev), randn([2, kv_heads, 1, d], dev)).unwrap();
            if step % 8 == 0 {
                let victim: Vec<i32> = (0..2 * kv_heads).map(|i| ((step * 7 + i * 31) % 250) as i32).collect();
                c.evict_one(Tensor::<B, 1, Int>::from_ints(victim.as_slice(), dev).reshape([2, kv_heads, 1])).unwrap();
            }
        }
        assert!(c.dead_slots() > 0 && c.kv_segments().len() > 1, "the test needs dead slots and a tail");
        c
    }

    #[test]
    fn host_decode_attends_and_observes_what_the_explicit_kernel_does() {
        let dev = Default::default();
        let observe = ObserveRequest { column_sums: true, window: 1, ..Default::default() };
        for (heads, kv_heads, d, runs) in [(6, 2, 64, true), (4, 1, 128, true), (4, 4, 64, false), (4, 2, 32, false)] {
            let c = cache(kv_heads, d, &dev);
            let q = randn([2, heads, 1, d], &dev);
            let scale = (d as f64).powf(-0.5);
            set_host_kernels(false);
            let (want, want_obs) = attend_appended(q.clone(), &c, scale, observe);
            set_host_kernels(true);
            let before = DECODE_CALLS.load(Ordering::Relaxed);
            let (got, got_obs) = attend_appended(q, &c, scale, observe);
            set_host_kernels(false);
            assert_eq!(DECODE_CALLS.load(Ordering::Relaxed) - before, usize::from(runs), "{heads} heads on {kv_heads} of {d}");
            let diff = |a: Tensor<B, 4>, b: Tensor<B, 4>| -> f32 { (a - b).abs().max().into_scalar() };
            assert!(diff(got, want) <= 1e-5, "{heads}/{kv_heads}/{d}: output");
            let (g, w) = (got_obs.unwrap(), want_obs.unwrap());
            let sums: f32 = (g.column_sums.unwrap() - w.column_sums.unwrap()).abs().max().into_scalar();
            assert!(sums <= 1e-6, "{heads}/{kv_heads}/{d}: column sums differ by {sums}");
            assert!(diff(g.window.unwrap(), w.window.unwrap()) <= 1e-6, "{heads}/{kv_heads}/{d}: window");
        }
    }
}
