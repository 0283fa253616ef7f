//! A tensor that grows along its slot axis (dim 2) without copying what it already holds.

use burn::prelude::*;
use burn::tensor::BasicOps;

/// New slots gather in a small tail tensor and move into the body every `TAIL_SLOTS` slots.
///
/// Why not write each token straight into a preallocated buffer: burn-flex 0.21's `slice_assign`
/// (and `select_assign`) always copies its destination, because its `to_contiguous` fast path
/// clones the buffer's `Arc` before writing, so an in-place append is impossible there. With a
/// tail, a token costs a copy of at most `TAIL_SLOTS` slots and the body is rewritten once every
/// `TAIL_SLOTS` tokens. On backends that do write in place (NdArray, CubeCL) the flush is cheap too.
pub const TAIL_SLOTS: usize = 64;

/// A `[batch, heads, slots, ...]` tensor with spare capacity along dim 2.
#[derive(Debug, Clone)]
pub(crate) struct SlotBuffer<B: Backend, const D: usize, K: BasicOps<B>> {
    body: Tensor<B, D, K>,
    body_len: usize,
    tail: Option<Tensor<B, D, K>>,
}

impl<B: Backend, const D: usize, K: BasicOps<B>> SlotBuffer<B, D, K> {
    /// An empty buffer for rows of shape `dims` (dim 2 is the capacity).
    pub fn zeros(dims: [usize; D], device: &B::Device) -> Self {
        Self {
            body: Tensor::zeros(dims, device),
            body_len: 0,
            tail: None,
        }
    }

    fn tail_len(&self) -> usize {
        self.tail.as_ref().map_or(0, |t| t.dims()[2])
    }

    /// Slots held.
    pub fn len(&self) -> usize {
        self.body_len + self.tail_len()
    }

    /// Slots in the first segment [`segments`](Self::segments) returns (the body, or the tail
    /// while the body is empty).
    pub fn leading_len(&self) -> usize {
        if self.body_len > 0 {
            self.body_len
        } else {
            self.tail_len()
        }
    }

    /// Slots the body can hold before it has to grow.
    pub fn capacity(&self) -> usize {
        self.body.dims()[2]
    }

    /// Bytes allocated by the body and the tail.
    pub fn allocated_bytes(&self) -> usize {
        crate::stats::tensor_bytes(&self.body)
            + self.tail.as_ref().map_or(0, crate::stats::tensor_bytes)
    }

    /// Grows the body so it can hold `slots` slots.
    pub fn reserve_total(&mut self, slots: usize) {
        if slots <= self.capacity() {
            return;
        }
        let mut dims = self.body.dims();
        dims[2] = slots;
        let fresh = Tensor::zeros(dims, &self.body.device());
        self.body = if self.body_len == 0 {
            fresh
        } else {
            write_at(fresh, 0, held(&self.body, self.body_len))
        };
    }

    /// Moves the tail into the body.
    pub fn flush(&mut self) {
        if let Some(tail) = self.tail.take() {
            let n = tail.dims()[2];
            if self.body_len + n > self.capacity() {
                self.reserve_total((self.capacity() * 2).max(self.body_len + n).max(TAIL_SLOTS));
            }
            let at = self.body_len;
            self.body.inplace(|b| write_at(b, at, tail));
            self.body_len += n;
        }
    }

    /// Appends `x` (`t` slots along dim 2).
    pub fn append(&mut self, x: Tensor<B, D, K>) {
        let t = x.dims()[2];
        if t == 0 {
            return;
        }
        if t >= TAIL_SLOTS {
            // A prompt-sized chunk goes straight into the body.
            self.flush();
            self.tail = Some(x);
            self.flush();
            return;
        }
        self.tail = Some(match self.tail.take() {
            Some(tail) => Tensor::cat(vec![tail, x], 2),
            None => x,
        });
        if self.tail_len() >= TAIL_SLOTS {
            self.flush();
        }
    }

    /// The held slots as contiguous pieces in slot order (at most two: body, then tail).
    pub fn segments(&self) -> Vec<Tensor<B, D, K>> {
        let mut out = Vec::with_capacity(2);
        if self.body_len > 0 {
            out.push(held(&self.body, self.body_len));
        }
        if let Some(t) = &self.tail {
            out.push(t.clone());
        }
        out
    }

    /// The first `m` held slots (`m` at most [`len`](Self::len)), a view when the first segment
    /// covers them.
    pub fn prefix(&self, m: usize) -> Tensor<B, D, K> {
        match self.segments().into_iter().next() {
            Some(first) if first.dims()[2] >= m => first.narrow(2, 0, m),
            _ => self.view().narrow(2, 0, m),
        }
    }

    /// Every held slot as one tensor (copies when there is a tail).
    pub fn view(&self) -> Tensor<B, D, K> {
        let mut segs = self.segments();
        match segs.len() {
            0 => held(&self.body, 0),
            1 => segs.pop().unwrap(),
            _ => Tensor::cat(segs, 2),
        }
    }

    /// Replaces the held slots with `x`, which becomes the body as it is: writing it into the old
    /// body would rewrite the whole reserved capacity on burn-flex (see the module note), so an
    /// eviction every step would cost the full buffer instead of the slots kept.
    pub fn replace(&mut self, x: Tensor<B, D, K>) {
        self.tail = None;
        self.body_len = x.dims()[2];
        self.body = x;
    }

    /// Overwrites the last held slot with `x` (one slot along dim 2): a merging attention (DMC)
    /// rewrites the slot it is still extending. Copies at most the tail, as an append does.
    pub fn set_last(&mut self, x: Tensor<B, D, K>) {
        debug_assert_eq!(x.dims()[2], 1, "one slot");
        debug_assert!(self.len() > 0, "a slot to overwrite");
        match self.tail.take() {
            Some(tail) if tail.dims()[2] > 1 => {
                let n = tail.dims()[2];
                self.tail = Some(Tensor::cat(vec![tail.narrow(2, 0, n - 1), x], 2));
            }
            // The last slot is the tail's only one, or lies in the body: drop it, then append.
            Some(_) => self.tail = Some(x),
            None => {
                self.body_len -= 1;
                self.append(x);
            }
        }
    }

    /// Keeps the slots `indices` `[batch, heads, k]` (per batch row and head), in that order.
    ///
    /// Each kept slot is one row of `prod(dims[3..])` values, so the held slots are viewed as
    /// `[batch * heads * n, row]` and the kept rows taken with one row `select` (a copy per row)
    /// rather than an element-wise `gather` (an index computation per value, several times slower
    /// on the CPU backends).
    pub fn gather(&mut self, indices: Tensor<B, 3, Int>) {
        let view = self.view();
        self.gather_from(view, indices);
    }

    /// [`gather`](Self::gather) from `view`, the held slots as the caller reads them (a layer
    /// cache's keys under a key overlay).
    pub fn gather_from(&mut self, view: Tensor<B, D, K>, indices: Tensor<B, 3, Int>) {
        let [b, h, k] = indices.dims();
        let mut dims = view.dims();
        let n = dims[2];
        let row: usize = dims[3..].iter().product();
        let device = indices.device();
        // Row of slot j of head (bi, hi): (bi * h + hi) * n + j.
        let base = Tensor::<B, 1, Int>::arange(0..(b * h) as i64, &device)
            .mul_scalar(n as i64)
            .reshape([b, h, 1])
            .expand([b, h, k]);
        let rows = (indices + base).reshape([b * h * k]);
        dims[2] = k;
        let kept = view.reshape([b * h * n, row]).select(0, rows).reshape(dims);
        self.replace(kept);
    }
}

/// Writes `x` into `buf` at slot `at` along dim 2.
fn write_at<B: Backend, const D: usize, K: BasicOps<B>>(
    buf: Tensor<B, D, K>,
    at: usize,
    x: Tensor<B, D, K>,
) -> Tensor<B, D, K> {
    let dims = x.dims();
    let ranges: [core::ops::Range<usize>; D] =
        core::array::from_fn(|i| if i == 2 { at..at + dims[2] } else { 0..dims[i] });
    buf.slice_assign(ranges, x)
}

/// The first `n` slots of `buf`; an empty tensor when `n == 0` (burn rejects empty `narrow`s).
pub(crate) fn held<B: Backend, const D: usize, K: BasicOps<B>>(
    buf: &Tensor<B, D, K>,
    n: usize,
) -> Tensor<B, D, K> {
    if n == 0 {
        let mut dims = buf.dims();
        dims[2] = 0;
        Tensor::empty(dims, &buf.device())
    } else {
        buf.clone().narrow(2, 0, n)
    }
}
