//! Moving between a projection's `[b, t, heads * d]` rows and attention's `[b, heads, t, d]`.
//!
//! The textbook `reshape` + `swap_dims(1, 2)` leaves a transposed view that the next op copies
//! element by element on burn-flex 0.21 (its strided iterator), about 10x slower than copying whole
//! rows of `d` values with one row `select`, which is what these do. A single token needs no
//! movement at all: its `[b, 1, heads, d]` is already `[b, heads, 1, d]` in memory.

use burn::prelude::*;

/// `[b, t, heads * d]` as `[b, heads, t, d]`, contiguous.
pub fn split_heads<B: Backend>(y: Tensor<B, 3>, heads: usize, d: usize) -> Tensor<B, 4> {
    let [b, t, _] = y.dims();
    if t == 1 {
        return y.reshape([b, heads, 1, d]);
    }
    // Row (bi, hi, ti) of the result is row (bi, ti, hi) of the projection.
    let rows: Vec<i64> = (0..b)
        .flat_map(|bi| {
            (0..heads).flat_map(move |hi| (0..t).map(move |ti| ((bi * t + ti) * heads + hi) as i64))
        })
        .collect();
    let rows = Tensor::<B, 1, Int>::from_ints(rows.as_slice(), &y.device());
    y.reshape([b * t * heads, d])
        .select(0, rows)
        .reshape([b, heads, t, d])
}

/// `[b, heads, t, d]` as `[b, t, heads * d]`, contiguous: the inverse of [`split_heads`].
pub fn merge_heads<B: Backend>(o: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, heads, t, d] = o.dims();
    if t == 1 {
        return o.reshape([b, 1, heads * d]);
    }
    // Row (bi, ti, hi) of the result is row (bi, hi, ti) of the attention output.
    let rows: Vec<i64> = (0..b)
        .flat_map(|bi| {
            (0..t).flat_map(move |ti| (0..heads).map(move |hi| ((bi * heads + hi) * t + ti) as i64))
        })
        .collect();
    let rows = Tensor::<B, 1, Int>::from_ints(rows.as_slice(), &o.device());
    o.reshape([b * heads * t, d])
        .select(0, rows)
        .reshape([b, t, heads * d])
}
