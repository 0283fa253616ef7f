//! Grouped scaled-dot-product attention over a cache, with causality taken from slot positions.

use crate::Kernels;
use crate::{Observation, ObserveRequest};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::softmax;

/// Attention of `q` `[batch, heads, t, d]` over every slot a layer cache holds, whether its
/// storage is rectangular or ragged; `query_positions` (absolute, `[t]`) masks causally by the
/// positions the slots remember, `None` lets every query see every slot (a single new token).
///
/// Ragged storage (heads with unequal budgets) attends head by head, each KV head's group of
/// query heads over that head's own slots; what it observes is per head too
/// ([`Observation::heads`]), with no norms (no ragged-storage policy reads them).
pub fn attend_cache<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    query_positions: Option<Tensor<B, 1, Int>>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let causality = |key: Tensor<B, 3, Int>| match &query_positions {
        None => Causality::live(cache),
        Some(query) => Causality::ByPosition {
            query: query.clone(),
            key,
        },
    };
    let Some(heads) = cache.head_caches() else {
        let h = q.dims()[1];
        let (o, observation) = grouped_attention(
            q,
            &cache.kv_segments(),
            &causality(cache.positions()),
            scale,
            observe,
        );
        return (
            o,
            Observation::with_plain_norms(observation, observe, cache, h),
        );
    };
    let [b, h, _, _] = q.dims();
    let kv = cache.shape().kv_heads;
    let group = h / kv;
    let per_head_request = ObserveRequest {
        key_norms: false,
        value_norms: false,
        ..observe
    };
    let mut observed = Vec::new();
    let rows = (0..b)
        .map(|row| {
            let per_head = (0..kv)
                .map(|head| {
                    let c = &heads[row * kv + head];
                    let q = q.clone().narrow(0, row, 1).narrow(1, head * group, group);
                    let (o, obs) = grouped_attention(
                        q,
                        &c.kv_segments(),
                        &causality(c.positions()),
                        scale,
                        per_head_request,
                    );
                    observed.extend(obs);
                    o
                })
                .collect();
            Tensor::cat(per_head, 1)
        })
        .collect();
    let observation = (!per_head_request.is_empty()).then(|| Observation {
        heads: Some(observed),
        ..Default::default()
    });
    (Tensor::cat(rows, 0), observation)
}

/// Causal attention of the cache's newest `t` tokens (`q` `[batch, heads, t, d]`, at positions
/// `tokens_seen - t ..`, their K/V already appended) over every slot it holds: what a layer runs
/// after appending a prompt, a chunk or one decoded token.
///
/// A chunk that no policy needs every row of (nothing, or only SnapKV's window) goes through
/// burn's fused kernel or the host one ([`fused_prefill`]), and so does one whose policy sums
/// each slot's attention when the host kernel is on. One token over a rectangular burn-flex f32
/// cache takes the host decode kernel (`decode.rs`) when the host kernels are on, unless band
/// sums or a window of more than one row are asked; what is left (a ragged cache, band sums,
/// column sums without the host kernels, other backends) takes the explicit kernel.
pub fn attend_appended<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let [_, h, t, _] = q.dims();
    let seen = cache.tokens_seen();
    if t > 1 && !cache.is_ragged() && observe.band == 0 {
        let prefilled = if observe.column_sums {
            host_observed_prefill(q.clone(), cache, scale, observe)
        } else {
            Some(fused_prefill(q.clone(), cache, scale, observe))
        };
        if let Some((o, observation)) = prefilled {
            return (
                o,
                Observation::with_plain_norms(observation, observe, cache, h),
            );
        }
    }
    #[cfg(feature = "flex")]
    if t == 1 && !cache.is_ragged() && host_kernels_on::<B>(&q.device()) {
        let bias = cache.dead_bias();
        if let Some((o, probs)) = crate::decode::decode_attention(
            &q,
            &cache.kv_segments(),
            bias.as_ref(),
            scale,
            observe,
            Kernels::current().isa,
            None,
        ) {
            let observation = (!observe.is_empty()).then(|| Observation {
                column_sums: probs.clone().filter(|_| observe.column_sums),
                window: probs
                    .filter(|_| observe.window > 0)
                    .map(|p| p.unsqueeze_dim(2)),
                ..Default::default()
            });
            return (
                o,
                Observation::with_plain_norms(observation, observe, cache, h),
            );
        }
    }
    if cache.is_ragged() {
        let query_positions =
            (t > 1).then(|| Tensor::arange((seen - t) as i64..seen as i64, &q.device()));
        return attend_cache(q, cache, query_positions, scale, observe);
    }
    let (o, observation) = grouped_attention(
        q,
        &cache.kv_segments(),
        &Causality::appended(cache, t),
        scale,
        observe,
    );
    (
        o,
        Observation::with_plain_norms(observation, observe, cache, h),
    )
}

/// Query rows per call of the fused kernel at prefill: each block attends only over the keys up
/// to its last query, so a causal prefill does about half the work of one call over the square.
pub const FUSED_BLOCK: usize = 512;

/// Runs `f` with the host kernels on or off for this thread alone (the rest of the current
/// [`Kernels`] kept), restoring the thread's choice after: what a test compares a kernel against
/// then runs on the path it names, whatever other tests choose on other threads.
pub fn with_host_kernels<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    Kernels {
        host: enabled,
        ..Kernels::current()
    }
    .scope(f)
}

/// Whether the host kernels may take this call's tensors: the current [`Kernels`] takes them, and
/// no autodiff graph is being recorded on `device` (the kernels' outputs would cut it).
pub fn host_kernels_on<B: Backend>(device: &B::Device) -> bool {
    Kernels::current().host && !B::ad_enabled(device)
}

/// Calls each host kernel served on this thread, so a test can tell whether the kernel it meant
/// to check ran (per thread, so other tests running beside it do not count).
#[cfg(test)]
pub(crate) mod served {
    use std::cell::Cell;

    /// One counter per kernel.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Kernel {
        /// The prefill attention and SwiGLU (`host.rs`).
        Prefill,
        /// The decode attention (`decode.rs`).
        Decode,
        /// The packed-weight product (`packed.rs`).
        Packed,
    }

    thread_local! {
        static CALLS: [Cell<usize>; 3] = const { [Cell::new(0), Cell::new(0), Cell::new(0)] };
    }

    /// Counts one call of `kernel` on this thread.
    pub(crate) fn count(kernel: Kernel) {
        CALLS.with(|c| c[kernel as usize].set(c[kernel as usize].get() + 1));
    }

    /// Calls of `kernel` on this thread so far.
    pub(crate) fn calls(kernel: Kernel) -> usize {
        CALLS.with(|c| c[kernel as usize].get())
    }
}

/// `silu(gate) * up`, the gated FFN's activation: through the vectorised host kernel
/// ([`crate::host::swiglu`]) when the current [`Kernels`] takes host kernels, the tensors are f32, no autodiff
/// graph is recorded and there are enough elements to pay for moving them (a prefill's, not a
/// decode step's); through the backend's ops otherwise.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let device = gate.device();
    let eligible = host_kernels_on::<B>(&device)
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims()
        && gate.shape().num_elements() >= HOST_SWIGLU_MIN;
    if !eligible {
        return burn::tensor::activation::silu(gate) * up;
    }
    // Moved, not cloned, so a uniquely held buffer leaves the backend without a copy.
    let dims = gate.dims();
    let (g, u) = (gate.into_data(), up.into_data());
    let out = match (g.as_slice::<f32>(), u.as_slice::<f32>()) {
        (Ok(gs), Ok(us)) => crate::host::swiglu(
            gs,
            us,
            Kernels::current().prefill_threads,
            Kernels::current().isa,
        ),
        _ => None,
    };
    match out {
        Some(out) => {
            #[cfg(test)]
            served::count(served::Kernel::Prefill);
            Tensor::from_data(burn::tensor::TensorData::new(out, dims), &device)
        }
        None => {
            burn::tensor::activation::silu(Tensor::from_data(g, &device))
                * Tensor::from_data(u, &device)
        }
    }
}

/// The fewest elements [`swiglu`] moves to the host for: a few prefill rows of a small FFN.
const HOST_SWIGLU_MIN: usize = 1 << 15;

/// The first `rows` queries of `q` over the first `visible` keys through the host kernel, with
/// each query head's column sums when asked, if the current [`Kernels`] takes host kernels and the tensors
/// suit it.
fn host_prefill<B: Backend>(
    q: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    rows: usize,
    visible: usize,
    scale: f64,
    column_sums: bool,
) -> Option<(Tensor<B, 4>, Option<Tensor<B, 3>>)> {
    let device = q.device();
    let f32s = [q.dtype(), keys.dtype(), values.dtype()]
        .iter()
        .all(|&d| d == DType::F32);
    if !host_kernels_on::<B>(&device) || !f32s {
        return None;
    }
    let [batch, heads, t, head_dim] = q.dims();
    let [_, kv_heads, keys_len, dv] = values.dims();
    if dv != head_dim || !crate::host::HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let q = if rows == t {
        q.clone()
    } else {
        q.clone().narrow(2, 0, rows)
    }
    .into_data();
    let (k, v) = (keys.clone().into_data(), values.clone().into_data());
    let shape = crate::host::HostShape {
        batch,
        heads,
        kv_heads,
        queries: rows,
        keys: keys_len,
        visible,
        head_dim,
    };
    let threads = Kernels::current().prefill_threads;
    let out = crate::host::causal_attention(
        q.as_slice().ok()?,
        k.as_slice().ok()?,
        v.as_slice().ok()?,
        shape,
        scale as f32,
        column_sums,
        threads,
        Kernels::current().isa,
    )?;
    #[cfg(test)]
    served::count(served::Kernel::Prefill);
    let output = Tensor::from_data(
        burn::tensor::TensorData::new(out.output, [batch, heads, rows, head_dim]),
        &device,
    );
    let sums = out.column_sums.map(|c| {
        Tensor::from_data(
            burn::tensor::TensorData::new(c, [batch, heads, visible]),
            &device,
        )
    });
    Some((output, sums))
}

/// A chunk whose policy sums each slot's attention (H2O, VATP) through the host kernel, its
/// window rows (if also observed) through the explicit kernel for their probabilities; `None`
/// where the host kernel cannot take it.
fn host_observed_prefill<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    scale: f64,
    observe: ObserveRequest,
) -> Option<(Tensor<B, 4>, Option<Observation<B>>)> {
    // Checked before reading the keys out, which copies a cache that has a tail.
    if !host_kernels_on::<B>(&q.device()) {
        return None;
    }
    let t = q.dims()[2];
    let n = cache.slots();
    let (out, column_sums) = host_prefill(&q, &cache.keys(), &cache.values(), t, n, scale, true)?;
    let w = observe.window.min(t);
    let window = (w > 0).then(|| {
        let rows = ObserveRequest {
            window: w,
            ..Default::default()
        };
        let (_, obs) = grouped_attention(
            q.narrow(2, t - w, w),
            &cache.kv_segments(),
            &Causality::newest(cache, w),
            scale,
            rows,
        );
        obs.and_then(|o| o.window)
            .expect("the window was asked for")
    });
    Some((
        out,
        Some(Observation {
            column_sums,
            window,
            ..Default::default()
        }),
    ))
}

/// `block(start)` for each query block's first row, in order, on up to [`Kernels::prefill_threads`](crate::Kernels)
/// threads, latest (largest) blocks dealt out first so the threads finish together; on one
/// thread when the backend records an autodiff graph, which is built op by op.
fn in_blocks<B: Backend, T: Send>(
    starts: &[usize],
    device: &B::Device,
    block: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let threads = if B::ad_enabled(device) {
        1
    } else {
        Kernels::current().prefill_threads.min(starts.len())
    };
    if threads <= 1 {
        return starts.iter().map(|&lo| block(lo)).collect();
    }
    let mut done: Vec<(usize, T)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|i| {
                let block = &block;
                s.spawn(move || {
                    starts
                        .iter()
                        .enumerate()
                        .rev()
                        .skip(i)
                        .step_by(threads)
                        .map(|(j, &lo)| (j, block(lo)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a query block's thread"))
            .collect()
    });
    done.sort_by_key(|(j, _)| *j);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Causal attention of a chunk of `t` new queries (the cache's last `t` slots) through burn's
/// fused `attention` (flash on Flex and CubeCL) or the host kernel ([`crate::Kernels`]),
/// except for the last `observe.window` rows, which the explicit kernel computes so their
/// probabilities can be observed.
///
/// Exact, not an approximation: appended slots are the newest, so query `i` of the chunk sees
/// the `n - t` older slots and new slots `0..=i`, which is the bottom-right causal mask; the rows
/// before the window see no window key, so they attend over the first `n - w` slots alone. They
/// go in blocks of [`FUSED_BLOCK`] rows, each over the keys up to its last query (the same
/// bottom-right mask, cut), on up to [`Kernels::prefill_threads`](crate::Kernels) threads. Query and key heads must
/// match for the fused kernel, so each KV head is broadcast to its group for this call (a
/// temporary the size of the keys, never held).
fn fused_prefill<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let [b, h, t, dk] = q.dims();
    let (keys, values) = (cache.keys(), cache.values());
    let [_, kv, n, _] = keys.dims();
    let dv = values.dims()[3];
    let w = observe.window.min(t);
    let head = t - w;
    let mut outs = Vec::new();
    let visible = n - w;
    if let Some((o, _)) = (head > 0)
        .then(|| host_prefill(&q, &keys, &values, head, visible, scale, false))
        .flatten()
    {
        outs.push(o);
    } else if head > 0 {
        let older = visible - head;
        let spread = |x: Tensor<B, 4>, d: usize| {
            x.narrow(2, 0, visible)
                .reshape([b, kv, 1, visible, d])
                .expand([b, kv, h / kv, visible, d])
                .reshape([b, h, visible, d])
        };
        let (ks, vs) = (spread(keys.clone(), dk), spread(values.clone(), dv));
        // An explicit scale drops CubeCL to its unfused fallback; the usual one is the default.
        let default_scale = ((scale * scale * dk as f64) - 1.0).abs() < 1e-9;
        let device = q.device();
        let block = |lo: usize| {
            let rows = FUSED_BLOCK.min(head - lo);
            let len = older + lo + rows;
            let cut = |x: &Tensor<B, 4>| {
                if len == visible {
                    x.clone()
                } else {
                    x.clone().narrow(2, 0, len)
                }
            };
            // Flex aligns a non-square causal mask bottom-right, CubeCL's flash kernel top-left:
            // only a square one is portable, so any other block gets an explicit mask.
            let (mask, is_causal) = if rows == len {
                (None, true)
            } else {
                (
                    Some(
                        Tensor::<B, 2, Bool>::tril_mask([rows, len], (len - rows) as i64, &device)
                            .reshape([1, 1, rows, len]),
                    ),
                    false,
                )
            };
            let options = AttentionModuleOptions {
                scale: (!default_scale).then_some(scale),
                softcap: None,
                is_causal,
            };
            attention(
                q.clone().narrow(2, lo, rows),
                cut(&ks),
                cut(&vs),
                mask,
                None,
                options,
            )
        };
        let starts: Vec<usize> = (0..head).step_by(FUSED_BLOCK).collect();
        outs.extend(in_blocks::<B, _>(&starts, &device, block));
    }
    let mut observation = None;
    if w > 0 {
        let qw = q.narrow(2, head, w);
        let causality = Causality::newest(cache, w);
        let (o, obs) = grouped_attention(qw, &cache.kv_segments(), &causality, scale, observe);
        outs.push(o);
        observation = obs;
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 2)
    };
    debug_assert_eq!(out.dims(), [b, h, t, dv]);
    (out, observation)
}

/// Queries are processed in blocks of this many rows so that prefill never materialises a full
/// `[heads, t, n]` score matrix; it bounds memory at `heads x BLOCK x n` scores.
pub const QUERY_BLOCK: usize = 256;

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum Causality<B: Backend> {
    /// Every query sees every key (single-token decode, or bidirectional use).
    None,
    /// Every query sees every live slot: single-token decode over a cache holding lazily evicted
    /// slots, whose [`dead_bias`](kv_core::LayerCache::dead_bias) is added to the scores.
    Live {
        /// `0` for a live slot, [`kv_core::DEAD`] for a dead one, `[batch, kv_heads, n]`.
        bias: Tensor<B, 3>,
    },
    /// Query `i` sees slot `j` iff `key_positions[j] <= query_positions[i]`: a causal mask that
    /// stays right after eviction, because it reads the positions each slot remembers.
    ByPosition {
        /// Absolute positions of the queries, `[t]`.
        query: Tensor<B, 1, Int>,
        /// Absolute positions of the slots, `[batch | 1, kv_heads | 1, n]`.
        key: Tensor<B, 3, Int>,
    },
    /// Ordinary causality over a cache nothing was evicted from: query `i` is at position
    /// `first_query + i` and slot `j` at `first_key + j`. The kernel then scores each query block
    /// only against the keys at or before its last query (about half the work of a masked
    /// prefill) and builds its mask from two ranges instead of from the slots' positions.
    Consecutive {
        /// Position of the first query.
        first_query: usize,
        /// Position of the first slot.
        first_key: usize,
    },
    /// Sliding-window causality: query `i` sees slot `j` iff
    /// `query_positions[i] - window < key_positions[j] <= query_positions[i]`, so every query sees
    /// at most `window` keys, itself included.
    Window {
        /// Absolute positions of the queries, `[t]`.
        query: Tensor<B, 1, Int>,
        /// Absolute positions of the slots, `[batch | 1, kv_heads | 1, n]`.
        key: Tensor<B, 3, Int>,
        /// Keys each query sees, itself included (at least 1).
        window: usize,
    },
}

impl<B: Backend> Causality<B> {
    /// What one new token (the newest, after every slot) sees of `cache`: every live slot.
    pub fn live(cache: &kv_core::LayerCache<B>) -> Self {
        match cache.dead_bias() {
            Some(bias) => Self::Live { bias },
            None => Self::None,
        }
    }

    /// What the cache's newest `t` tokens (appended, at positions `tokens_seen - t ..`) see of it:
    /// every live slot for one token, the prefix of a cache nothing was evicted from, or the
    /// slots at or before each query's position.
    pub fn appended(cache: &kv_core::LayerCache<B>, t: usize) -> Self {
        if t == 1 {
            Self::live(cache)
        } else {
            Self::newest(cache, t)
        }
    }

    /// Causality of the cache's newest `t` tokens over its slots (at least two queries, or one
    /// that must not see every slot), which hold no dead one: a multi-token append compacts them.
    pub fn newest(cache: &kv_core::LayerCache<B>, t: usize) -> Self {
        let seen = cache.tokens_seen();
        debug_assert_eq!(
            cache.dead_slots(),
            0,
            "a chunk attends over a compacted cache"
        );
        if cache.slots() == seen {
            // Nothing was evicted: slot j is at position j, so each query block reads only its prefix.
            Self::Consecutive {
                first_query: seen - t,
                first_key: 0,
            }
        } else {
            Self::ByPosition {
                query: Tensor::arange((seen - t) as i64..seen as i64, &cache.device()),
                key: cache.positions(),
            }
        }
    }
}

/// Attention of `q` `[batch, heads, t, dk]` over keys `[batch, kv_heads, n_i, dk]` and values
/// `[batch, kv_heads, n_i, dv]` given as segments in slot order (a cache's body and tail, or one
/// pair), returning `[batch, heads, t, dv]` and what was asked to observe over all `n` keys.
///
/// Query heads `g*r .. g*r + r - 1` share KV head `g` (the contiguous HF convention). K/V are
/// broadcast by folding the group into the query rows (`[b, kv, r*t, d] x [b, kv, d, n]`), so no
/// repeated copy of the cache is ever made, and segments are attended where they lie (scores are
/// concatenated, never the keys). Scores and softmax are computed in f32.
pub fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    kv: &[(Tensor<B, 4>, Tensor<B, 4>)],
    causality: &Causality<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let segments: Vec<SplitSegment<B>> = kv
        .iter()
        .map(|(k, v)| SplitSegment {
            keys: vec![k.clone()],
            values: v.clone(),
        })
        .collect();
    grouped_attention_parts(&[q], &segments, causality, scale, observe)
}

/// One contiguous run of slots for [`grouped_attention_parts`]: its keys as parts along the
/// feature axis (`[batch, kv_heads, n_i, d_p]` each) and its values `[batch, kv_heads, n_i, dv]`.
#[derive(Debug, Clone)]
pub struct SplitSegment<B: Backend> {
    /// Key parts, matching the query parts one to one.
    pub keys: Vec<Tensor<B, 4>>,
    /// Values of the same slots.
    pub values: Tensor<B, 4>,
}

/// [`grouped_attention`] with queries and keys split into parts along the feature axis: the
/// score of a query and a slot is `sum_p q_p . k_p`, exactly the dot product of the concatenations.
///
/// Why: a key assembled from tensors held separately (MLA's absorbed decode scores the latent
/// `c` and the shared RoPE key `k_R`, and `c` is also the value) is attended where each piece lies,
/// so no `[c ; k_R]` copy of the cache is made per step. `q_parts[p]` is `[batch, heads, t, d_p]`.
pub fn grouped_attention_parts<B: Backend>(
    q_parts: &[Tensor<B, 4>],
    kv: &[SplitSegment<B>],
    causality: &Causality<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let [b, h, t, _] = q_parts[0].dims();
    let kvh = kv[0].values.dims()[1];
    let dv = kv[0].values.dims()[3];
    debug_assert!(
        kv.iter().all(|s| s.keys.len() == q_parts.len()),
        "one key part per query part"
    );
    let lens: Vec<usize> = kv.iter().map(|s| s.values.dims()[2]).collect();
    let n: usize = lens.iter().sum();
    let r = h / kvh;
    let keys: Vec<Vec<Tensor<B, 4>>> = kv.iter().map(|s| s.keys.clone()).collect();
    // Scaling the queries (t x d) instead of the scores (t x n) keeps a full pass over the scores
    // off every decode step.
    let q_parts: Vec<Tensor<B, 4>> = q_parts
        .iter()
        .map(|q| q.clone().mul_scalar(scale))
        .collect();
    let win_start = t.saturating_sub(observe.window);
    // One block of queries: its output rows and what it observed of every slot.
    let block = |lo: usize| {
        let tb = QUERY_BLOCK.min(t - lo);
        // Keys this block can see at all: with consecutive positions, those up to its last query.
        let visible = match causality {
            Causality::Consecutive {
                first_query,
                first_key,
            } => (first_query + lo + tb)
                .saturating_sub(*first_key)
                .clamp(1, n),
            _ => n,
        };
        let (keys_b, lens_b) = visible_segments(&keys, &lens, visible);
        let qbs: Vec<Tensor<B, 4>> = q_parts
            .iter()
            .map(|q| {
                let dk = q.dims()[3];
                q.clone().narrow(2, lo, tb).reshape([b, kvh, r * tb, dk])
            })
            .collect();
        // One query row per KV head (an MHA decode step): keys x query^T reads the keys row by row
        // as they are stored, 1.4-1.7x faster on burn-flex than the query x a transposed view of
        // them; with more rows the two are even, and a block takes the usual queries x keys^T.
        let one_row = r * tb == 1;
        let score = |qb: &Tensor<B, 4>, k: &Tensor<B, 4>| {
            if one_row {
                k.clone().matmul(qb.clone().swap_dims(2, 3)).swap_dims(2, 3)
            } else {
                qb.clone().matmul(k.clone().swap_dims(2, 3))
            }
        };
        let mut parts: Vec<Tensor<B, 4>> = keys_b
            .iter()
            .map(|seg| {
                let mut s = qbs.iter().zip(seg).map(|(qb, k)| score(qb, k));
                let first = s.next().expect("at least one key part");
                s.fold(first, |acc, x| acc + x)
            })
            .collect();
        let scores = if parts.len() == 1 {
            parts.pop().unwrap()
        } else {
            Tensor::cat(parts, 3)
        };
        let mut scores = scores;
        if scores.dtype() != DType::F32 {
            scores = scores.cast(DType::F32);
        }
        let n_all = n;
        let n = visible;
        let mut scores = scores.reshape([b, kvh, r, tb, n]);
        let (query, key, window) = match causality {
            Causality::None | Causality::Live { .. } | Causality::Consecutive { .. } => {
                (None, None, None)
            }
            Causality::ByPosition { query, key } => (Some(query), Some(key), None),
            Causality::Window { query, key, window } => (Some(query), Some(key), Some(*window)),
        };
        let mut near: Option<Tensor<B, 5, Bool>> = None;
        if let Causality::Consecutive {
            first_query,
            first_key,
        } = causality
        {
            let device = scores.device();
            let kp =
                Tensor::<B, 1, Int>::arange(*first_key as i64..(first_key + n) as i64, &device)
                    .reshape([1, n])
                    .expand([tb, n]);
            let qp = Tensor::<B, 1, Int>::arange(
                (first_query + lo) as i64..(first_query + lo + tb) as i64,
                &device,
            )
            .reshape([tb, 1])
            .expand([tb, n]);
            if observe.band > 0 {
                let far = kp
                    .clone()
                    .add_scalar(observe.band as i64)
                    .lower_equal(qp.clone());
                near = Some(far.reshape([1, 1, 1, tb, n]).expand([b, kvh, r, tb, n]));
            }
            let mask = kp
                .greater(qp)
                .reshape([1, 1, 1, tb, n])
                .expand([b, kvh, r, tb, n]);
            scores = scores.mask_fill(mask, -1.0e9);
        }
        if let Causality::Live { bias } = causality {
            let [pb, ph, _] = bias.dims();
            scores = scores
                + bias
                    .clone()
                    .reshape([pb, ph, 1, 1, n])
                    .expand([b, kvh, r, tb, n]);
        }
        if let (Some(query), Some(key)) = (query, key) {
            // Compared at the positions' own shape ([1, 1, n] while no head has evicted), then
            // broadcast, so the mask costs t x n, not batch x heads x t x n.
            let [pb, ph, _] = key.dims();
            let kp = key.clone().reshape([pb, ph, 1, n]).expand([pb, ph, tb, n]);
            let qp = query
                .clone()
                .narrow(0, lo, tb)
                .reshape([1, 1, tb, 1])
                .expand([pb, ph, tb, n]);
            if observe.band > 0 {
                let far = kp
                    .clone()
                    .add_scalar(observe.band as i64)
                    .lower_equal(qp.clone());
                near = Some(far.reshape([pb, ph, 1, tb, n]).expand([b, kvh, r, tb, n]));
            }
            let mut mask = kp.clone().greater(qp.clone());
            if let Some(w) = window {
                mask = mask.bool_or(kp.add_scalar(w as i64).lower_equal(qp));
            }
            let mask = mask.reshape([pb, ph, 1, tb, n]).expand([b, kvh, r, tb, n]);
            scores = scores.mask_fill(mask, -1.0e9);
        }
        let probs = softmax(scores, 4);
        // Observations cover every slot: those past this block's last query got nothing.
        let pad3 = |x: Tensor<B, 3>| {
            if n == n_all {
                x
            } else {
                Tensor::cat(
                    vec![x, Tensor::zeros([b, h, n_all - n], &probs.device())],
                    2,
                )
            }
        };
        let col_sum = observe
            .column_sums
            .then(|| pad3(probs.clone().sum_dim(3).reshape([b, h, n])));
        let band_sum = near.map(|far| {
            pad3(
                probs
                    .clone()
                    .mask_fill(far, 0.0)
                    .sum_dim(3)
                    .reshape([b, h, n]),
            )
        });
        let hi = lo + tb;
        let window = (observe.window > 0 && hi > win_start).then(|| {
            let from = win_start.max(lo);
            let rows = probs
                .clone()
                .narrow(3, from - lo, hi - from)
                .reshape([b, h, hi - from, n]);
            if n == n_all {
                rows
            } else {
                Tensor::cat(
                    vec![
                        rows,
                        Tensor::zeros([b, h, hi - from, n_all - n], &probs.device()),
                    ],
                    3,
                )
            }
        });
        let mut probs = probs.reshape([b, kvh, r * tb, n]);
        if probs.dtype() != kv[0].values.dtype() {
            probs = probs.cast(kv[0].values.dtype());
        }
        let mut out: Option<Tensor<B, 4>> = None;
        let mut offset = 0;
        for (seg, &len) in kv.iter().zip(&lens_b) {
            if len == 0 {
                continue;
            }
            let p = if len == n {
                probs.clone()
            } else {
                probs.clone().narrow(3, offset, len)
            };
            let values = if len == seg.values.dims()[2] {
                seg.values.clone()
            } else {
                seg.values.clone().narrow(2, 0, len)
            };
            let o = p.matmul(values);
            out = Some(match out {
                Some(acc) => acc + o,
                None => o,
            });
            offset += len;
        }
        (
            out.expect("at least one key segment")
                .reshape([b, h, tb, dv]),
            col_sum,
            band_sum,
            window,
        )
    };
    let starts: Vec<usize> = (0..t).step_by(QUERY_BLOCK).collect();
    let mut outs = Vec::with_capacity(starts.len());
    let (mut col_sums, mut band_sums, mut windows): (
        Option<Tensor<B, 3>>,
        Option<Tensor<B, 3>>,
        Vec<Tensor<B, 4>>,
    ) = (None, None, Vec::new());
    let add = |acc: Option<Tensor<B, 3>>, x: Option<Tensor<B, 3>>| match (acc, x) {
        (Some(a), Some(x)) => Some(a + x),
        (a, x) => a.or(x),
    };
    for (out, col_sum, band_sum, window) in in_blocks::<B, _>(&starts, &q_parts[0].device(), block)
    {
        outs.push(out);
        col_sums = add(col_sums, col_sum);
        band_sums = add(band_sums, band_sum);
        windows.extend(window);
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 2)
    };
    let observation = (!observe.is_empty()).then(|| Observation {
        column_sums: col_sums,
        window: (!windows.is_empty()).then(|| Tensor::cat(windows, 2)),
        band: if band_sums.is_some() { observe.band } else { 0 },
        band_sums,
        ..Default::default()
    });
    (out, observation)
}

/// The key parts of each segment (`[b, kv, n_i, d_p]`) and the segment lengths, cut to the first
/// `visible` slots overall (a segment wholly past them gets length 0 and no keys).
fn visible_segments<B: Backend>(
    keys: &[Vec<Tensor<B, 4>>],
    lens: &[usize],
    visible: usize,
) -> (Vec<Vec<Tensor<B, 4>>>, Vec<usize>) {
    let mut left = visible;
    let mut out = Vec::with_capacity(keys.len());
    let mut out_lens = Vec::with_capacity(lens.len());
    for (parts, &len) in keys.iter().zip(lens) {
        let take = len.min(left);
        left -= take;
        out_lens.push(take);
        if take > 0 {
            out.push(
                parts
                    .iter()
                    .map(|k| {
                        if take == len {
                            k.clone()
                        } else {
                            k.clone().narrow(2, 0, take)
                        }
                    })
                    .collect(),
            );
        }
    }
    (out, out_lens)
}
