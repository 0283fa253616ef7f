//! The explicit attention kernel: scores, an f32 softmax and the observations policies read
//! (column sums, band sums, a window of rows), in query blocks, with causality from slot
//! positions. Every path the others cannot take ends here.

use crate::{Kernels, Observation, ObserveRequest};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::softmax;

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

/// `block(start)` for each query block's first row, in order, on up to [`Kernels::prefill_threads`](crate::Kernels)
/// threads, latest (largest) blocks dealt out first so the threads finish together; on one
/// thread when the backend records an autodiff graph, which is built op by op.
pub(crate) fn in_blocks<B: Backend, T: Send>(
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
