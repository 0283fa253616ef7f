//! Grouped scaled-dot-product attention over a cache, with causality taken from slot positions.

use crate::{ObserveRequest, Observation};
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
    /// Query `i` sees slot `j` iff `key_positions[j] <= query_positions[i]`: a causal mask that
    /// stays right after eviction, because it reads the positions each slot remembers.
    ByPosition {
        /// Absolute positions of the queries, `[t]`.
        query: Tensor<B, 1, Int>,
        /// Absolute positions of the slots, `[batch | 1, kv_heads | 1, n]`.
        key: Tensor<B, 3, Int>,
    },
}

/// Attention of `q` `[batch, heads, t, dk]` over `k` `[batch, kv_heads, n, dk]` and
/// `v` `[batch, kv_heads, n, dv]`, returning `[batch, heads, t, dv]` and what was asked to observe.
///
/// Query heads `g*r .. g*r + r - 1` share KV head `g` (the contiguous HF convention). K/V are
/// broadcast by folding the group into the query rows (`[b, kv, r*t, d] x [b, kv, d, n]`), so no
/// repeated copy of the cache is ever made. Scores and softmax are computed in f32.
pub fn grouped_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causality: &Causality<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let [b, h, t, dk] = q.dims();
    let [_, kvh, n, _] = k.dims();
    let dv = v.dims()[3];
    let r = h / kvh;
    let kt = k.swap_dims(2, 3);
    let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    let mut col_sums: Option<Tensor<B, 3>> = None;
    let mut windows = Vec::new();
    let win_start = t.saturating_sub(observe.window);
    let mut lo = 0;
    while lo < t {
        let tb = QUERY_BLOCK.min(t - lo);
        let qb = q.clone().narrow(2, lo, tb).reshape([b, kvh, r * tb, dk]);
        let mut scores = qb.matmul(kt.clone()).mul_scalar(scale);
        if scores.dtype() != DType::F32 {
            scores = scores.cast(DType::F32);
        }
        let mut scores = scores.reshape([b, kvh, r, tb, n]);
        if let Causality::ByPosition { query, key } = causality {
            let [pb, ph, _] = key.dims();
            let kp = key.clone().reshape([pb, ph, 1, n]).expand([b, kvh, tb, n]);
            let qp = query.clone().narrow(0, lo, tb).reshape([1, 1, tb, 1]).expand([b, kvh, tb, n]);
            let mask = kp.greater(qp).reshape([b, kvh, 1, tb, n]).expand([b, kvh, r, tb, n]);
            scores = scores.mask_fill(mask, -1.0e9);
        }
        let probs = softmax(scores, 4);
        if observe.column_sums {
            let s = probs.clone().sum_dim(3).reshape([b, h, n]);
            col_sums = Some(match col_sums {
                Some(acc) => acc + s,
                None => s,
            });
        }
        let hi = lo + tb;
        if observe.window > 0 && hi > win_start {
            let from = win_start.max(lo);
            windows.push(probs.clone().narrow(3, from - lo, hi - from).reshape([b, h, hi - from, n]));
        }
        let mut probs = probs.reshape([b, kvh, r * tb, n]);
        if probs.dtype() != v.dtype() {
            probs = probs.cast(v.dtype());
        }
        let out = probs.matmul(v.clone());
        outs.push(out.reshape([b, h, tb, dv]));
        lo = hi;
    }
    let out = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(outs, 2) };
    let observation = (!observe.is_empty()).then(|| Observation {
        column_sums: col_sums,
        window: (!windows.is_empty()).then(|| Tensor::cat(windows, 2)),
    });
    (out, observation)
}
