//! Shared scoring machinery: group reduction, protected slots and top-k indices.

use burn::prelude::*;
use kv_core::LayerCache;

/// Reduces per-query-head scores `[b, heads, n]` to one score per KV head `[b, kv_heads, n]` by
/// summing over each group of contiguous query heads (the kvpress rule, techniques.md §0).
pub fn group_sum<B: Backend>(x: Tensor<B, 3>, kv_heads: usize) -> Tensor<B, 3> {
    let [b, h, n] = x.dims();
    if h == kv_heads {
        return x;
    }
    x.reshape([b, kv_heads, h / kv_heads, n]).sum_dim(2).reshape([b, kv_heads, n])
}

/// Indices of the `k` largest entries along dim 2 (`k < n`), in no particular order.
pub fn top_k_indices<B: Backend>(scores: Tensor<B, 3>, k: usize) -> Tensor<B, 3, Int> {
    // argtopk is native on CubeCL but unimplemented on the CPU backends, where a sort is cheap.
    if B::name(&scores.device()).contains("cubecl") || B::name(&scores.device()).contains("fusion") {
        scores.argtopk(k, 2)
    } else {
        scores.topk_with_indices(k, 2).1
    }
}

/// A `[1, 1, n]` mask of the last `window` slots (slot order is position order).
pub fn recent_mask<B: Backend>(n: usize, window: usize, device: &B::Device) -> Tensor<B, 3, Bool> {
    Tensor::<B, 1, Int>::arange(0..n as i64, device).greater_equal_elem(n.saturating_sub(window) as i64).reshape([1, 1, n])
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
