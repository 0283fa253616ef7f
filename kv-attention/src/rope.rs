//! Rotary position embedding applied at explicit positions.

use burn::prelude::*;
use kv_core::{KvError, Result};

/// Settings of a [`Rotary`] embedding.
#[derive(Config, Debug)]
pub struct RotaryConfig {
    /// Width of the rotated vectors (must be even).
    pub dim: usize,
    /// Base of the frequency ladder.
    #[config(default = 10000.0)]
    pub theta: f64,
    /// Leading dims that are rotated (even, at most `dim`); the rest carry no position (partial
    /// rotary, as GPT-NeoX). None: all of them.
    #[config(default = "None")]
    pub rotated: Option<usize>,
}

impl RotaryConfig {
    /// Validates the settings and builds the embedding.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Rotary<B>> {
        if self.dim == 0 || !self.dim.is_multiple_of(2) {
            return Err(KvError::config(
                "rope dim (head_dim)",
                self.dim,
                "an even number > 0, because RoPE rotates pairs",
            ));
        }
        if !(self.theta.is_finite() && self.theta > 1.0) {
            return Err(KvError::config(
                "rope_theta",
                self.theta,
                "a finite base > 1 such as 10000",
            ));
        }
        let rotated = self.rotated.unwrap_or(self.dim);
        if rotated == 0 || !rotated.is_multiple_of(2) || rotated > self.dim {
            return Err(KvError::config(
                "rope_dims",
                rotated,
                format!(
                    "an even number of rotated dims in [2, head_dim = {}]",
                    self.dim
                ),
            ));
        }
        let half = rotated / 2;
        // Same recipe as HF Llama (over the rotated dims), so loaded checkpoints reproduce its numerics.
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / self.theta.powf((2 * i) as f64 / rotated as f64)) as f32)
            .collect();
        Ok(Rotary {
            inv_freq: Tensor::from_floats(inv.as_slice(), device),
            dim: self.dim,
            rotated,
        })
    }
}

/// Rotary position embedding in the rotate-half layout (pairs `(x[i], x[i + d/2])`, as HF Llama).
///
/// Positions are explicit per token (and may differ per head), never derived from a cache length.
/// Because rotations compose (`R(a) R(b) = R(a + b)`), calling [`apply`](Self::apply) with a
/// position *delta* re-rotates keys that were already rotated; negative deltas are allowed.
/// Angles are computed on the fly from the positions, so there is no maximum position.
#[derive(Module, Debug)]
pub struct Rotary<B: Backend> {
    inv_freq: Tensor<B, 1>,
    dim: usize,
    rotated: usize,
}

impl<B: Backend> kv_core::KeyRotation<B> for Rotary<B> {
    fn rotate_by(&self, keys: Tensor<B, 4>, delta: Tensor<B, 3, Int>) -> Tensor<B, 4> {
        self.apply(keys, delta)
    }
}

impl<B: Backend> Rotary<B> {
    /// Width of the rotated vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rotates `x` `[batch, heads, t, dim]` by `positions` `[batch | 1, heads | 1, t]`.
    pub fn apply(&self, x: Tensor<B, 4>, positions: Tensor<B, 3, Int>) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let turn = self.turn(positions, [b, h, t], d, x.dtype(), &x.device());
        turn.rotate(x)
    }

    /// Rotates queries `[batch, heads, t, dim]` and keys `[batch, kv_heads, t, dim]` by the same
    /// `positions` `[1, 1, t]`, computing the angles once (a decode step's two rotations).
    pub fn apply_pair(
        &self,
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        positions: Tensor<B, 3, Int>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [pb, ph, _] = positions.dims();
        if pb != 1 || ph != 1 {
            return (self.apply(q, positions.clone()), self.apply(k, positions));
        }
        let [b, h, t, d] = q.dims();
        let turn = self.turn(positions, [b, h, t], d, q.dtype(), &q.device());
        (turn.rotate(q), turn.rotate(k))
    }

    /// The angles of `positions` as `cos` and signed `sin` rows of `t * d` (one row when the
    /// positions are shared, `[1, 1, t]`, else one per (batch, head) of `[b, h, t]`), and the
    /// `rotate_half` matrix. Dims past `rotated` get `cos = 1`, `sin = 0` and no swap, so a
    /// partial rotary passes them through exactly, without a split and a concatenation.
    fn turn(
        &self,
        positions: Tensor<B, 3, Int>,
        [b, h, t]: [usize; 3],
        d: usize,
        dtype: burn::tensor::DType,
        device: &B::Device,
    ) -> Turn<B> {
        let [pb, ph, _] = positions.dims();
        let (half, rest) = (self.rotated / 2, d - self.rotated);
        let rows = if pb == 1 && ph == 1 { 1 } else { b * h };
        let positions = if rows == 1 {
            positions
        } else {
            positions.expand([b, h, t])
        };
        // Angles as an outer product, a matmul, so no broadcast op walks them element by element.
        let angles = positions
            .float()
            .reshape([rows * t, 1])
            .matmul(self.inv_freq.clone().reshape([1, half]));
        let (cos, sin) = (angles.clone().cos(), angles.sin());
        let (mut cos_parts, mut sin_parts) = (vec![cos.clone(), cos], vec![sin.clone().neg(), sin]);
        if rest > 0 {
            cos_parts.push(Tensor::ones([rows * t, rest], device));
            sin_parts.push(Tensor::zeros([rows * t, rest], device));
        }
        let cos = Tensor::cat(cos_parts, 1).reshape([rows, t * d]).cast(dtype);
        let sin = Tensor::cat(sin_parts, 1).reshape([rows, t * d]).cast(dtype);
        // rotate_half(x)[i] = -x[i + half] for i < half, x[i - half] after (the sign is in `sin`):
        // row i of the matrix says where input feature i goes.
        let mut swap = vec![0f32; d * d];
        for i in 0..half {
            swap[(i + half) * d + i] = 1.0;
            swap[i * d + i + half] = 1.0;
        }
        let swap = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(swap, [d, d]), device)
            .cast(dtype);
        Turn { cos, sin, swap }
    }
}

/// The rotation of one set of positions ([`Rotary::turn`]), for every tensor rotated at them.
struct Turn<B: Backend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    swap: Tensor<B, 2>,
}

impl<B: Backend> Turn<B> {
    /// `x cos + rotate_half(x) sin`, with `rotate_half` a signed permutation applied as a `[d, d]`
    /// matmul and the angles as rows of `t * d`, one broadcast over every batch row and head or
    /// one per (batch, head). Every op then reads contiguous data, where the narrowed halves of
    /// the textbook form send CPU backends through per-element strided loops.
    fn rotate(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, t, d] = x.dims();
        let x = x.reshape([b * h * t, d]);
        let swapped = x.clone().matmul(self.swap.clone()).reshape([b * h, t * d]);
        (x.reshape([b * h, t * d]) * self.cos.clone() + swapped * self.sin.clone())
            .reshape([b, h, t, d])
    }
}

/// Positions `start .. start + len` shaped `[1, 1, len]`, shared by every batch row and head.
pub fn position_range<B: Backend>(
    start: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 3, Int> {
    Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, device).reshape([1, 1, len])
}
