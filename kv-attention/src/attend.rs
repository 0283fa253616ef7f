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
    let [b, h, t, dk] = q.dims();
    let kvh = kv[0].0.dims()[1];
    let dv = kv[0].1.dims()[3];
    let lens: Vec<usize> = kv.iter().map(|(k, _)| k.dims()[2]).collect();
    let n: usize = lens.iter().sum();
    let r = h / kvh;
    let kts: Vec<Tensor<B, 4>> = kv.iter().map(|(k, _)| k.clone().swap_dims(2, 3)).collect();
    // Scaling the queries (t x d) instead of the scores (t x n) keeps a full pass over the scores
    // off every decode step.
    let q = q.mul_scalar(scale);
    let mut outs = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
    let mut col_sums: Option<Tensor<B, 3>> = None;
    let mut windows = Vec::new();
    let win_start = t.saturating_sub(observe.window);
    let mut lo = 0;
    while lo < t {
        let tb = QUERY_BLOCK.min(t - lo);
        let qb = q.clone().narrow(2, lo, tb).reshape([b, kvh, r * tb, dk]);
        let mut parts: Vec<Tensor<B, 4>> = kts.iter().map(|kt| qb.clone().matmul(kt.clone())).collect();
        let scores = if parts.len() == 1 { parts.pop().unwrap() } else { Tensor::cat(parts, 3) };
        let mut scores = scores;
        if scores.dtype() != DType::F32 {
            scores = scores.cast(DType::F32);
        }
        let mut scores = scores.reshape([b, kvh, r, tb, n]);
        if let Causality::ByPosition { query, key } = causality {
            // Compared at the positions' own shape ([1, 1, n] while no head has evicted), then
            // broadcast, so the mask costs t x n, not batch x heads x t x n.
            let [pb, ph, _] = key.dims();
            let kp = key.clone().reshape([pb, ph, 1, n]).expand([pb, ph, tb, n]);
            let qp = query.clone().narrow(0, lo, tb).reshape([1, 1, tb, 1]).expand([pb, ph, tb, n]);
            let mask = kp.greater(qp).reshape([pb, ph, 1, tb, n]).expand([b, kvh, r, tb, n]);
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
        if probs.dtype() != kv[0].1.dtype() {
            probs = probs.cast(kv[0].1.dtype());
        }
        let mut out: Option<Tensor<B, 4>> = None;
        let mut offset = 0;
        for ((_, v), &len) in kv.iter().zip(&lens) {
            let p = if len == n { probs.clone() } else { probs.clone().narrow(3, offset, len) };
            let o = p.matmul(v.clone());
            out = Some(match out {
                Some(acc) => acc + o,
                None => o,
            });
            offset += len;
        }
        outs.push(out.expect("at least one key segment").reshape([b, h, tb, dv]));
        lo = hi;
    }
    let out = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(outs, 2) };
    let observation = (!observe.is_empty()).then(|| Observation {
        column_sums: col_sums,
        window: (!windows.is_empty()).then(|| Tensor::cat(windows, 2)),
    });
    (out, observation)
}
