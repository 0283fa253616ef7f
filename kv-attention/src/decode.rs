//! One decode token's attention over a cache held in host memory (burn-flex), read in place.
//!
//! burn's ops take a decode step's attention through a batched matmul over a transposed view, a
//! softmax and a second matmul, each its own pass with its own buffers (at 8k slots on
//! decode-bench, most of a step). Here the keys and values are read where the cache stores them,
//! through the tensors' own strides, without a copy, in (batch, KV head, key chunk) items dealt
//! over rayon's pool: each scores its chunk's keys for the group's query heads (each key read once
//! for the group), exponentiates against the chunk's maximum (the prefill kernel's polynomial
//! `exp2`, in f32) and sums the chunk's values under those weights; the chunks are then merged
//! exactly, as flash-decoding does. The probabilities are the observation H2O and TOVA read
//! (column sums and the last row of one query are the same thing).

use crate::{Isa, ObserveRequest};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::{DType, TensorData, TensorPrimitive};
use kv_core::readback::ReadBack;
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
        let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
            return None;
        };
        let any: Box<dyn std::any::Any> = Box::new(p);
        let tensor = *any.downcast::<FlexTensor>().ok()?;
        let layout = tensor.layout();
        let shape: [usize; D] = t.dims();
        let strides: Vec<usize> = layout
            .strides()
            .iter()
            .map(|&s| usize::try_from(s).ok())
            .collect::<Option<_>>()?;
        let strides: [usize; D] = strides.try_into().ok()?;
        if strides[D - 1] != 1 && shape[D - 1] > 1 {
            return None;
        }
        let offset = layout.start_offset();
        Some(Self {
            tensor,
            offset,
            strides,
            shape,
        })
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

/// Keys per work item: enough to pay for the dispatch, few enough to spread 3 KV heads over cores.
const CHUNK: usize = 256;

/// Key floats (batch x KV heads x slots x head size) from which the work is spread over the pool.
const PARALLEL_MIN: usize = 1 << 18;

/// Attention of one token's queries `q` `[b, h, 1, d]` over `segments` (`[b, kv, n_i, d]` keys and
/// values) with `bias` (`[b | 1, kv | 1, n]`, added to every score: dead slots) on the host, when
/// every tensor is burn-flex f32 and the request asks for nothing but column sums and a window
/// of at most one row. Returns the output `[b, h, 1, d]` and, when asked, the probabilities
/// `[b, h, n]`.
///
/// Each (batch, KV head, key chunk) item scores its keys for the group's queries, exponentiates
/// them against the chunk's own maximum and sums its values under those weights, in one pass
/// over its keys and values; the chunks are then merged exactly (each rescaled by `exp` of its
/// maximum less the row's), as flash-decoding does. The probabilities, when asked, are each
/// chunk's exponentials under the same rescaling.
///
/// `isa` picks the score and value loops (the widest this CPU runs at or below it; AVX-512 runs
/// the AVX2 loops); `parallel` deals the items over rayon's pool (`None`: from a megabyte of keys
/// up, below which the pool's dispatch costs more than the second core saves).
pub(crate) fn decode_attention<B: Backend>(
    q: &Tensor<B, 4>,
    kv: &[(Tensor<B, 4>, Tensor<B, 4>)],
    bias: Option<&Tensor<B, 3>>,
    scale: f64,
    observe: ObserveRequest,
    isa: Isa,
    parallel: Option<bool>,
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
        if kb != b || kvh == 0 || h % kvh != 0 || kd != d || values.shape != [b, kvh, len, d] {
            return None;
        }
        segments.push(Segment {
            keys,
            values,
            start: n,
        });
        n += len;
    }
    let kvh = segments[0].keys.shape[1];
    if segments.iter().any(|s| s.keys.shape[1] != kvh) || n == 0 {
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
    let qd = q.clone().host_data();
    let qs = qd.as_slice::<f32>().ok()?;
    let r = h / kvh;
    let want_probs = observe.column_sums || observe.window > 0;
    let ctx = Ctx {
        segments: &segments,
        bias: bias.as_ref(),
        scale: scale as f32,
        d,
        r,
        keep_exps: want_probs,
        isa: isa.usable(),
    };
    let parallel = parallel.unwrap_or(b * kvh * n * d >= PARALLEL_MIN);
    let items: Vec<Item> = (0..b)
        .flat_map(|bi| {
            (0..kvh).flat_map(move |g| {
                (0..n.div_ceil(CHUNK)).map(move |c| Item {
                    bi,
                    g,
                    j0: c * CHUNK,
                    len: CHUNK.min(n - c * CHUNK),
                })
            })
        })
        .collect();
    let attend = |it: &Item| {
        let queries = &qs[(it.bi * h + it.g * r) * d..(it.bi * h + it.g * r + r) * d];
        attend_chunk(&ctx, queries, *it)
    };
    let parts: Vec<Part> = if parallel {
        items.par_iter().map(attend).collect()
    } else {
        items.iter().map(attend).collect()
    };
    // Merge the chunks of each (batch, KV head): items are in (batch, KV head, chunk) order.
    let chunks = n.div_ceil(CHUNK);
    let mut output = vec![0f32; b * h * d];
    let mut probs = if want_probs {
        vec![0f32; b * h * n]
    } else {
        Vec::new()
    };
    for (row, (its, ps)) in items.chunks(chunks).zip(parts.chunks(chunks)).enumerate() {
        let head0 = row * r; // (bi * kvh + g) * r == bi * h + g * r
        for i in 0..r {
            let max = ps.iter().fold(f32::NEG_INFINITY, |m, p| m.max(p.max[i]));
            let weights: Vec<f32> = ps.iter().map(|p| (p.max[i] - max).exp()).collect();
            let total: f32 = ps.iter().zip(&weights).map(|(p, w)| p.sum[i] * w).sum();
            let out = &mut output[(head0 + i) * d..(head0 + i + 1) * d];
            for (p, &w) in ps.iter().zip(&weights) {
                let w = w / total;
                out.iter_mut()
                    .zip(&p.out[i * d..(i + 1) * d])
                    .for_each(|(o, &x)| *o += w * x);
            }
            if want_probs {
                for ((it, p), &w) in its.iter().zip(ps).zip(&weights) {
                    let w = w / total;
                    let dst = &mut probs[(head0 + i) * n + it.j0..(head0 + i) * n + it.j0 + it.len];
                    dst.iter_mut()
                        .zip(&p.exps[i * it.len..(i + 1) * it.len])
                        .for_each(|(o, &e)| *o = e * w);
                }
            }
        }
    }
    let device = q.device();
    let out = Tensor::from_data(TensorData::new(output, [b, h, 1, d]), &device);
    let probs = want_probs.then(|| Tensor::from_data(TensorData::new(probs, [b, h, n]), &device));
    #[cfg(test)]
    crate::attend::served::count(crate::attend::served::Kernel::Decode);
    Some((out, probs))
}

/// What every item of one call reads.
struct Ctx<'a> {
    segments: &'a [Segment],
    bias: Option<&'a HostView<3>>,
    scale: f32,
    d: usize,
    /// Query heads per KV head.
    r: usize,
    /// Whether each item returns its exponentials (the caller wants the probabilities).
    keep_exps: bool,
    /// The loops' build (one [`Isa::usable`] returned).
    isa: Isa,
}

/// One work item: slots `j0 .. j0 + len` of (batch `bi`, KV head `g`).
#[derive(Clone, Copy)]
struct Item {
    bi: usize,
    g: usize,
    j0: usize,
    len: usize,
}

/// One item's attention for each of its group's `r` queries, against the chunk's own maximum.
struct Part {
    /// Each query's largest score in the chunk.
    max: Vec<f32>,
    /// Each query's sum of `exp(score - max)`.
    sum: Vec<f32>,
    /// Each query's `sum_j exp(score_j - max) v_j`, `[r, d]`.
    out: Vec<f32>,
    /// Each query's `exp(score_j - max)`, `[r, len]`, when kept.
    exps: Vec<f32>,
}

/// The item's scores for the group's queries (each key read once for the group), the bias, the
/// exponentials against each query's maximum, then the values summed under them.
fn attend_chunk(ctx: &Ctx, queries: &[f32], it: Item) -> Part {
    let Item { bi, g, j0, len } = it;
    let (r, d) = (ctx.r, ctx.d);
    let key_spans = spans(ctx.segments, false, it);
    let mut exps = vec![0f32; r * len];
    scores(ctx.isa, &key_spans, queries, d, ctx.scale, len, &mut exps);
    if let Some(bias) = ctx.bias {
        let (sb, sg) = (
            if bias.shape[0] == 1 { 0 } else { bi },
            if bias.shape[1] == 1 { 0 } else { g },
        );
        let base = bias.offset + sb * bias.strides[0] + sg * bias.strides[1] + j0 * bias.strides[2];
        let data = bias.data();
        for row in exps.chunks_exact_mut(len) {
            row.iter_mut()
                .enumerate()
                .for_each(|(j, s)| *s += data[base + j * bias.strides[2]]);
        }
    }
    let mut max = Vec::with_capacity(r);
    let mut sum = Vec::with_capacity(r);
    for row in exps.chunks_exact_mut(len) {
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        sum.push(crate::host::exp_shifted(row, m, ctx.isa));
        max.push(m);
    }
    let mut out = vec![0f32; r * d];
    values(
        ctx.isa,
        &spans(ctx.segments, true, it),
        &exps,
        d,
        len,
        &mut out,
    );
    Part {
        max,
        sum,
        out,
        exps: if ctx.keep_exps { exps } else { Vec::new() },
    }
}

/// `out[i * len + j] = scale * q_i . k_j` for the `r = queries.len() / d` queries, with `isa`'s
/// loops (one [`Isa::usable`] returned; the vector loop takes whole multiples of 8 features).
fn scores(
    isa: Isa,
    keys: &[Span],
    queries: &[f32],
    d: usize,
    scale: f32,
    len: usize,
    out: &mut [f32],
) {
    match isa {
        // SAFETY: `isa` came from `Isa::usable`, so this CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if d.is_multiple_of(8) => unsafe {
            x86::scores(keys, queries, d, scale, len, out)
        },
        _ => scores_portable(keys, queries, d, scale, len, out),
    }
}

/// `out[i] += sum_j w[i * len + j] v_j` for the `r = out.len() / d` queries, with `isa`'s loops
/// (the vector loop takes whole multiples of 32 features).
fn values(isa: Isa, values: &[Span], w: &[f32], d: usize, len: usize, out: &mut [f32]) {
    match isa {
        // SAFETY: `isa` came from `Isa::usable`, so this CPU has AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if d.is_multiple_of(32) => unsafe {
            x86::values(values, w, d, len, out)
        },
        _ => values_portable(values, w, d, len, out),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Span;
    use std::arch::x86_64::*;

    /// The eight lanes of each of `a[0..8]` summed: `[sum a0, .., sum a7]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sums8(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps(u0, u1, 0x20),
            _mm256_permute2f128_ps(u0, u1, 0x31),
        )
    }

    /// Scores of eight keys at a time, each query's eight dot products reduced together, so a
    /// head of 32 pays a few shuffles per eight keys rather than a reduction per key. `d % 8 == 0`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores(
        keys: &[Span],
        queries: &[f32],
        d: usize,
        scale: f32,
        len: usize,
        out: &mut [f32],
    ) {
        // SAFETY: every pointer is into a span's rows, `d` floats each (the caller's shapes), or
        // into `queries` / `w` / `out`, whose lengths the loops keep to.
        unsafe {
            let r = queries.len() / d;
            let scale_v = _mm256_set1_ps(scale);
            for span in keys {
                let data = span.data.as_ptr();
                let mut j = 0;
                while j + 8 <= span.rows {
                    let key: [*const f32; 8] =
                        std::array::from_fn(|k| data.add(span.base + (j + k) * span.stride));
                    for i in 0..r {
                        let q = queries.as_ptr().add(i * d);
                        let mut acc = [_mm256_setzero_ps(); 8];
                        for e in (0..d).step_by(8) {
                            let qv = _mm256_loadu_ps(q.add(e));
                            for k in 0..8 {
                                acc[k] =
                                    _mm256_fmadd_ps(_mm256_loadu_ps(key[k].add(e)), qv, acc[k]);
                            }
                        }
                        _mm256_storeu_ps(
                            out.as_mut_ptr().add(i * len + span.first + j),
                            _mm256_mul_ps(sums8(acc), scale_v),
                        );
                    }
                    j += 8;
                }
                for j in j..span.rows {
                    let key = &span.data[span.base + j * span.stride..][..d];
                    for i in 0..r {
                        out[i * len + span.first + j] =
                            super::dot(&queries[i * d..(i + 1) * d], key) * scale;
                    }
                }
            }
        }
    }

    /// Each query's weighted sum of values, 32 output floats at a time in four registers, the
    /// values of the chunk read once per query and block (from cache after the first). `d % 32 == 0`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn values(values: &[Span], w: &[f32], d: usize, len: usize, out: &mut [f32]) {
        // SAFETY: every pointer is into a span's rows, `d` floats each (the caller's shapes), or
        // into `queries` / `w` / `out`, whose lengths the loops keep to.
        unsafe {
            let r = out.len() / d;
            for i in 0..r {
                for c in (0..d).step_by(32) {
                    let mut acc = [_mm256_setzero_ps(); 4];
                    for span in values {
                        let data = span.data.as_ptr();
                        let weights = w.as_ptr().add(i * len + span.first);
                        for j in 0..span.rows {
                            let p = _mm256_set1_ps(*weights.add(j));
                            let v = data.add(span.base + j * span.stride + c);
                            for t in 0..4 {
                                acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(v.add(8 * t)), p, acc[t]);
                            }
                        }
                    }
                    let o = out.as_mut_ptr().add(i * d + c);
                    for t in 0..4 {
                        _mm256_storeu_ps(
                            o.add(8 * t),
                            _mm256_add_ps(_mm256_loadu_ps(o.add(8 * t)), acc[t]),
                        );
                    }
                }
            }
        }
    }
}

/// [`scores`] in plain code, for any head size.
fn scores_portable(
    keys: &[Span],
    queries: &[f32],
    d: usize,
    scale: f32,
    len: usize,
    out: &mut [f32],
) {
    let r = queries.len() / d;
    for span in keys {
        for j in 0..span.rows {
            let key = &span.data[span.base + j * span.stride..][..d];
            for i in 0..r {
                out[i * len + span.first + j] = dot(&queries[i * d..(i + 1) * d], key) * scale;
            }
        }
    }
}

/// [`values`] in plain code, for any head size.
fn values_portable(values: &[Span], w: &[f32], d: usize, len: usize, out: &mut [f32]) {
    let r = out.len() / d;
    for span in values {
        for j in 0..span.rows {
            let value = &span.data[span.base + j * span.stride..][..d];
            for i in 0..r {
                let p = w[i * len + span.first + j];
                out[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(value)
                    .for_each(|(o, &x)| *o += p * x);
            }
        }
    }
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
                base: v.offset
                    + bi * v.strides[0]
                    + g * v.strides[1]
                    + (lo - s.start) * v.strides[2],
                stride: v.strides[2],
                rows: hi - lo,
                first: lo - j0,
            })
        })
        .collect()
}

/// `a . b`, in 16 lanes the compiler can vectorise (a running sum would be `d` dependent adds).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attend::served::{Kernel, calls};
    use crate::{attend_appended, with_host_kernels};
    use kv_core::{CacheShape, LayerCache};

    type B = burn::backend::Flex;

    thread_local! {
        /// This test thread's own generator, so tests running beside each other (plain `cargo
        /// test`) cannot change each other's data as a shared backend seed would.
        static STATE: std::cell::Cell<u64> = const { std::cell::Cell::new(0x9e37_79b9_7f4a_7c15) };
    }

    /// Restarts this thread's generator.
    fn seed(s: u64) {
        STATE.with(|c| c.set(s.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1));
    }

    /// Standard normal values (xorshift and Box-Muller), from this thread's generator.
    fn randn<const D: usize>(shape: [usize; D], dev: &burn::tensor::Device<B>) -> Tensor<B, D> {
        let uniform = || {
            STATE.with(|c| {
                let mut x = c.get();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.set(x);
                ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
            })
        };
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                ((-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), dev)
    }

    /// A cache of a prompt, then single tokens (a body and a tail), with a few slots dead.
    fn cache(kv_heads: usize, d: usize, dev: &burn::tensor::Device<B>) -> LayerCache<B> {
        let shape = CacheShape {
            batch: 2,
            kv_heads,
            key_dim: d,
            value_dim: d,
        };
        let mut c = LayerCache::new(shape, dev);
        c.append(
            randn([2, kv_heads, 300, d], dev),
            randn([2, kv_heads, 300, d], dev),
        )
        .unwrap();
        for step in 0..40 {
            c.append(
                randn([2, kv_heads, 1, d], dev),
                randn([2, kv_heads, 1, d], dev),
            )
            .unwrap();
            if step % 8 == 0 {
                let victim: Vec<i32> = (0..2 * kv_heads)
                    .map(|i| ((step * 7 + i * 31) % 250) as i32)
                    .collect();
                c.evict_one(
                    Tensor::<B, 1, Int>::from_ints(victim.as_slice(), dev)
                        .reshape([2, kv_heads, 1]),
                )
                .unwrap();
            }
        }
        assert!(
            c.dead_slots() > 0 && c.kv_segments().len() > 1,
            "the test needs dead slots and a tail"
        );
        c
    }

    fn diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The kernel on every instruction set this CPU runs, on one thread and over rayon's pool,
    /// against the explicit kernel (burn's ops, named explicitly, so another test flipping the
    /// process's switch cannot make the reference run on the kernel under test).
    fn check_against_the_explicit_kernel(
        c: &LayerCache<B>,
        q: Tensor<B, 4>,
        scale: f64,
        what: &str,
        tolerance: (f32, f32),
    ) {
        let observe = ObserveRequest {
            column_sums: true,
            window: 1,
            ..Default::default()
        };
        let (want, want_obs) =
            with_host_kernels(false, || attend_appended(q.clone(), c, scale, observe));
        let w = want_obs.unwrap();
        let (want_sums, want_window) = (w.column_sums.unwrap(), w.window.unwrap());
        for isa in Isa::available() {
            for parallel in [false, true] {
                let (got, probs) = decode_attention(
                    &q,
                    &c.kv_segments(),
                    c.dead_bias().as_ref(),
                    scale,
                    observe,
                    isa,
                    Some(parallel),
                )
                .expect("a shape the kernel takes");
                let probs = probs.expect("probabilities were asked for");
                let (out, sums) = (
                    diff(got, want.clone()),
                    diff(probs.clone(), want_sums.clone()),
                );
                assert!(
                    out <= tolerance.0,
                    "{what}, {isa}, parallel {parallel}: output differs by {out}"
                );
                assert!(
                    sums <= tolerance.1,
                    "{what}, {isa}, parallel {parallel}: probabilities differ by {sums}"
                );
                assert!(
                    diff(probs.unsqueeze_dim(2), want_window.clone()) <= tolerance.1,
                    "{what}, {isa}: window"
                );
            }
        }
        // And the dispatch sends a decode step to it when the host kernels are on.
        let before = calls(Kernel::Decode);
        let (got, _) = with_host_kernels(true, || attend_appended(q, c, scale, observe));
        assert_eq!(
            calls(Kernel::Decode) - before,
            1,
            "{what}: attend_appended took the host decode kernel"
        );
        assert!(
            diff(got, want) <= tolerance.0,
            "{what}: through the dispatch"
        );
    }

    #[test]
    fn host_decode_attends_and_observes_what_the_explicit_kernel_does() {
        let dev = Default::default();
        seed(5);
        // Grouped, MQA, MHA; head sizes the vector loops take whole (64, 128, 32), in part (40) or not (20).
        for (heads, kv_heads, d) in [
            (6, 2, 64),
            (4, 1, 128),
            (4, 4, 64),
            (4, 2, 32),
            (3, 3, 40),
            (2, 1, 20),
        ] {
            let c = cache(kv_heads, d, &dev);
            let q = randn([2, heads, 1, d], &dev);
            check_against_the_explicit_kernel(
                &c,
                q,
                (d as f64).powf(-0.5),
                &format!("{heads} heads on {kv_heads} of {d}"),
                (1e-5, 1e-6),
            );
        }
    }

    #[test]
    fn host_decode_is_exact_over_scores_spread_across_80() {
        // Keys grow from 0.05x to 3x along the cache and the query is 10x, so one row's scores
        // span more than 80 and the second chunk's maximum is far above the first's: the merge
        // rescales the first chunk by exp(-40) or less.
        let dev = Default::default();
        seed(11);
        let (kv_heads, d, n) = (2, 64, 600);
        let shape = CacheShape {
            batch: 2,
            kv_heads,
            key_dim: d,
            value_dim: d,
        };
        let growth: Vec<f32> = (0..n)
            .map(|j| 0.05 + 3.0 * (j as f32 / n as f32).powi(2))
            .collect();
        let growth = Tensor::<B, 1>::from_floats(growth.as_slice(), &dev).reshape([1, 1, n, 1]);
        let mut c = LayerCache::new(shape, &dev);
        c.append(
            randn([2, kv_heads, n, d], &dev) * growth,
            randn([2, kv_heads, n, d], &dev),
        )
        .unwrap();
        let q = randn::<4>([2, 4, 1, d], &dev) * 10.0;
        let scale = (d as f64).powf(-0.5);
        // The scores themselves, from the host data in f64.
        let (qs, ks): (Vec<f32>, Vec<f32>) = (
            q.clone().into_data().to_vec().unwrap(),
            c.keys().into_data().to_vec().unwrap(),
        );
        let row = |head: usize| -> Vec<f64> {
            (0..n)
                .map(|j| {
                    (0..d)
                        .map(|e| qs[head * d + e] as f64 * ks[((head / 2) * n + j) * d + e] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect()
        };
        let spread = |s: &[f64]| {
            s.iter().cloned().fold(f64::MIN, f64::max) - s.iter().cloned().fold(f64::MAX, f64::min)
        };
        let scores = row(0);
        let (first, second) = (&scores[..CHUNK], &scores[CHUNK..]);
        let top = |s: &[f64]| s.iter().cloned().fold(f64::MIN, f64::max);
        assert!(
            spread(&scores) > 80.0 && top(second) - top(first) > 40.0,
            "the test needs a wide range: spread {}, chunk maxima {} and {}",
            spread(&scores),
            top(first),
            top(second)
        );
        // Probabilities near 1 carry f32's rounding of their exponentials on both sides.
        check_against_the_explicit_kernel(&c, q, scale, "scores over 80", (2e-5, 5e-6));
    }
}
