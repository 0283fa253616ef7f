//! Shared scoring machinery: group reduction, protected slots and top-k indices.

use burn::prelude::*;
use kv_core::LayerCache;
use std::sync::atomic::{AtomicBool, Ordering};

/// Reduces per-query-head scores `[b, heads, n]` to one score per KV head `[b, kv_heads, n]` by
/// summing over each group of contiguous query heads (the kvpress rule, docs/techniques.md, Conventions).
pub fn group_sum<B: Backend>(x: Tensor<B, 3>, kv_heads: usize) -> Tensor<B, 3> {
    let [b, h, n] = x.dims();
    if h == kv_heads {
        return x;
    }
    x.reshape([b, kv_heads, h / kv_heads, n])
        .sum_dim(2)
        .reshape([b, kv_heads, n])
}

/// How [`top_k_indices`] finds the largest scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopKMethod {
    /// A sort (`topk_with_indices`): every backend has it.
    Sort,
    /// burn's `argtopk`: native on CubeCL backends (WGPU, CUDA), where it beats a sort, but
    /// unimplemented (a panic) on the CPU backends of burn 0.21.
    ArgTopK,
}

static USE_ARGTOPK: AtomicBool = AtomicBool::new(false);

/// Chooses how every policy of this process finds its top-k (default [`TopKMethod::Sort`]); the
/// binary that picks the backend sets [`TopKMethod::ArgTopK`] for backends that implement it,
/// since burn offers no way to ask a backend which operations it has.
pub fn set_top_k_method(method: TopKMethod) {
    USE_ARGTOPK.store(method == TopKMethod::ArgTopK, Ordering::Relaxed);
}

/// The method [`top_k_indices`] uses now.
pub fn top_k_method() -> TopKMethod {
    if USE_ARGTOPK.load(Ordering::Relaxed) {
        TopKMethod::ArgTopK
    } else {
        TopKMethod::Sort
    }
}

/// Indices of the `k` largest entries along dim 2 (`k < n`), in no particular order.
pub fn top_k_indices<B: Backend>(scores: Tensor<B, 3>, k: usize) -> Tensor<B, 3, Int> {
    match top_k_method() {
        TopKMethod::ArgTopK => scores.argtopk(k, 2),
        TopKMethod::Sort => scores.topk_with_indices(k, 2).1,
    }
}

/// `scores` `[b, kv_heads, n]` with the last `window` slots (slot order is position order) never
/// evictable: one contiguous fill, where a mask over every slot, broadcast over the heads, takes
/// burn-flex's per-element path at every decode step.
pub fn protect_recent_slots<B: Backend>(scores: Tensor<B, 3>, window: usize) -> Tensor<B, 3> {
    let [b, h, n] = scores.dims();
    let window = window.min(n);
    if window == 0 {
        scores
    } else {
        scores.slice_fill([0..b, 0..h, n - window..n], f32::INFINITY)
    }
}

/// A `[b, kv_heads, n]` mask of the slots whose original position is below `sinks`.
pub fn sink_mask<B: Backend>(cache: &LayerCache<B>, sinks: usize) -> Tensor<B, 3, Bool> {
    cache.positions().lower_elem(sinks as i64)
}

/// Marks `mask`ed slots as never evictable by giving them an infinite score.
pub fn protect<B: Backend>(scores: Tensor<B, 3>, mask: Tensor<B, 3, Bool>) -> Tensor<B, 3> {
    let dims = scores.dims();
    scores.mask_fill(mask.expand(dims), f32::INFINITY)
}
