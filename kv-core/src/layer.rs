//! One layer's KV cache: keys, values, the original position of every slot and per-slot side data.

use crate::{KvError, Result, stats::LayerStats};
use burn::prelude::*;

/// The fixed dimensions of a layer cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// KV heads (1 for MQA, `heads / group` for GQA; 1 for an MLA latent).
    pub kv_heads: usize,
    /// Width of one cached key (per head).
    pub key_dim: usize,
    /// Width of one cached value (per head); 0 for layouts that cache keys only.
    pub value_dim: usize,
}

/// A layer's cache with rectangular storage: every KV head holds the same number of slots.
///
/// Keys are `[batch, kv_heads, slots, key_dim]`, values `[batch, kv_heads, slots, value_dim]`,
/// positions `[batch, kv_heads, slots]` (Int) and each side channel `[batch, kv_heads, slots]`.
/// They live in buffers with spare capacity that grow by doubling, so appending a token writes one
/// row in place instead of copying the whole cache (see burn-0.21 notes: `inplace` + `slice_assign`
/// only avoids the copy while the buffer has a single owner, which is why every view handed out
/// here is a fresh `narrow` that callers drop before the next write).
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    shape: CacheShape,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    positions: Tensor<B, 3, Int>,
    side: Vec<(String, Tensor<B, 3>)>,
    capacity: usize,
    slots: usize,
    seen: usize,
}

impl<B: Backend> LayerCache<B> {
    /// An empty cache; storage is allocated on the first append (or by [`reserve`](Self::reserve)).
    pub fn new(shape: CacheShape, device: &B::Device) -> Self {
        Self::with_capacity(shape, 0, device)
    }

    /// An empty cache with room for `capacity` slots before it has to grow.
    pub fn with_capacity(shape: CacheShape, capacity: usize, device: &B::Device) -> Self {
        let CacheShape { batch, kv_heads, key_dim, value_dim } = shape;
        Self {
            shape,
            keys: Tensor::zeros([batch, kv_heads, capacity, key_dim], device),
            values: Tensor::zeros([batch, kv_heads, capacity, value_dim], device),
            positions: Tensor::zeros([batch, kv_heads, capacity], device),
            side: Vec::new(),
            capacity,
            slots: 0,
            seen: 0,
        }
    }

    /// The fixed dimensions of this cache.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Slots held per KV head.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens seen so far: the RoPE position of the next token, whatever was evicted.
    pub fn tokens_seen(&self) -> usize {
        self.seen
    }

    /// Slots the buffers can hold before growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The device the cache lives on.
    pub fn device(&self) -> B::Device {
        self.keys.device()
    }

    /// Makes room for at least `extra` more slots, so a known-length generation never regrows.
    pub fn reserve(&mut self, extra: usize) {
        let needed = self.slots + extra;
        if needed > self.capacity {
            self.grow_to(needed);
        }
    }

    fn grow_to(&mut self, capacity: usize) {
        let CacheShape { batch, kv_heads, key_dim, value_dim } = self.shape;
        let device = self.device();
        let n = self.slots;
        let keys = Tensor::zeros([batch, kv_heads, capacity, key_dim], &device);
        let values = Tensor::zeros([batch, kv_heads, capacity, value_dim], &device);
        let positions = Tensor::zeros([batch, kv_heads, capacity], &device);
        let mut side: Vec<Tensor<B, 3>> = self.side.iter().map(|_| Tensor::zeros([batch, kv_heads, capacity], &device)).collect();
        // burn rejects zero-length slices, so an empty cache just swaps in the new buffers.
        let (keys, values, positions) = if n == 0 {
            (keys, values, positions)
        } else {
            for (new, (_, old)) in side.iter_mut().zip(&self.side) {
                new.inplace(|b| b.slice_assign([0..batch, 0..kv_heads, 0..n], old.clone().narrow(2, 0, n)));
            }
            (
                keys.slice_assign([0..batch, 0..kv_heads, 0..n, 0..key_dim], self.keys()),
                if value_dim == 0 { values } else { values.slice_assign([0..batch, 0..kv_heads, 0..n, 0..value_dim], self.values()) },
                positions.slice_assign([0..batch, 0..kv_heads, 0..n], self.positions()),
            )
        };
        self.keys = keys;
        self.values = values;
        self.positions = positions;
        for ((_, buf), new) in self.side.iter_mut().zip(side) {
            *buf = new;
        }
        self.capacity = capacity;
    }

    /// Appends `t` new tokens: keys `[batch, kv_heads, t, key_dim]`, values likewise.
    ///
    /// They get positions `tokens_seen .. tokens_seen + t`, side channels start at zero for them,
    /// and `tokens_seen` advances by `t`.
    pub fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<()> {
        let CacheShape { batch, kv_heads, key_dim, value_dim } = self.shape;
        let [kb, kh, t, kd] = keys.dims();
        if [kb, kh, kd] != [batch, kv_heads, key_dim] {
            return Err(KvError::shape("appended keys", &keys.dims(), format!("[{batch}, {kv_heads}, t, {key_dim}]")));
        }
        if values.dims() != [batch, kv_heads, t, value_dim] {
            return Err(KvError::shape("appended values", &values.dims(), format!("[{batch}, {kv_heads}, {t}, {value_dim}]")));
        }
        if self.slots + t > self.capacity {
            self.grow_to((self.capacity * 2).max(self.slots + t).max(16));
        }
        let device = self.device();
        if t == 0 {
            return Ok(());
        }
        let (lo, hi) = (self.slots, self.slots + t);
        self.keys.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, lo..hi, 0..key_dim], keys));
        if value_dim > 0 {
            self.values.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, lo..hi, 0..value_dim], values));
        }
        let pos = Tensor::<B, 1, Int>::arange(self.seen as i64..(self.seen + t) as i64, &device)
            .reshape([1, 1, t])
            .expand([batch, kv_heads, t]);
        self.positions.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, lo..hi], pos));
        for (_, buf) in self.side.iter_mut() {
            let zeros = Tensor::zeros([batch, kv_heads, t], &device);
            buf.inplace(|b| b.slice_assign([0..batch, 0..kv_heads, lo..hi], zeros));
        }
        self.slots = hi;
        self.seen += t;
        Ok(())
    }

    /// The keys held, `[batch, kv_heads, slots, key_dim]` (a view: drop it before the next write).
    pub fn keys(&self) -> Tensor<B, 4> {
        held(&self.keys, self.slots)
    }

    /// The values held, `[batch, kv_heads, slots, value_dim]`.
    pub fn values(&self) -> Tensor<B, 4> {
        held(&self.values, self.slots)
    }

    /// The original (absolute) position of every slot, `[batch, kv_heads, slots]`.
    pub fn positions(&self) -> Tensor<B, 3, Int> {
        held(&self.positions, self.slots)
    }

    /// Overwrites the keys held, for example after re-rotating them to new positions.
    pub fn set_keys(&mut self, keys: Tensor<B, 4>) -> Result<()> {
        let CacheShape { batch, kv_heads, key_dim, .. } = self.shape;
        let n = self.slots;
        if keys.dims() != [batch, kv_heads, n, key_dim] {
            return Err(KvError::shape("replacement keys", &keys.dims(), format!("[{batch}, {kv_heads}, {n}, {key_dim}]")));
        }
        self.keys.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, 0..n, 0..key_dim], keys));
        Ok(())
    }

    /// Overwrites the recorded positions of the slots held (StreamingLLM's in-cache positions).
    pub fn set_positions(&mut self, positions: Tensor<B, 3, Int>) -> Result<()> {
        let CacheShape { batch, kv_heads, .. } = self.shape;
        let n = self.slots;
        if positions.dims() != [batch, kv_heads, n] {
            return Err(KvError::shape("replacement positions", &positions.dims(), format!("[{batch}, {kv_heads}, {n}]")));
        }
        self.positions.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, 0..n], positions));
        Ok(())
    }

    /// Adds a named per-slot side channel (zero for the slots already held); adding twice is a no-op.
    pub fn add_side(&mut self, name: &str) {
        if self.side.iter().any(|(n, _)| n == name) {
            return;
        }
        let CacheShape { batch, kv_heads, .. } = self.shape;
        let buf = Tensor::zeros([batch, kv_heads, self.capacity], &self.device());
        self.side.push((name.to_string(), buf));
    }

    /// Names of the side channels, in the order they were added.
    pub fn side_names(&self) -> Vec<String> {
        self.side.iter().map(|(n, _)| n.clone()).collect()
    }

    fn side_index(&self, name: &str) -> Result<usize> {
        self.side.iter().position(|(n, _)| n == name).ok_or_else(|| KvError::Unknown {
            kind: "side channel".into(),
            name: name.into(),
            valid: format!("{:?}", self.side_names()),
        })
    }

    /// A side channel's values for the slots held, `[batch, kv_heads, slots]`.
    pub fn side(&self, name: &str) -> Result<Tensor<B, 3>> {
        let i = self.side_index(name)?;
        Ok(held(&self.side[i].1, self.slots))
    }

    /// Overwrites a side channel for the slots held.
    pub fn set_side(&mut self, name: &str, values: Tensor<B, 3>) -> Result<()> {
        let i = self.side_index(name)?;
        let CacheShape { batch, kv_heads, .. } = self.shape;
        let n = self.slots;
        if values.dims() != [batch, kv_heads, n] {
            return Err(KvError::shape(format!("side channel '{name}'"), &values.dims(), format!("[{batch}, {kv_heads}, {n}]")));
        }
        self.side[i].1.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, 0..n], values));
        Ok(())
    }

    /// Keeps, for every (batch row, KV head), the slots named by `indices` `[batch, kv_heads, k]`,
    /// in that order; keys, values, positions and every side channel move together.
    ///
    /// Indices must be below [`slots`](Self::slots); checking that would cost a host sync, so it is
    /// the caller's contract (policies build them with top-k over the slots held).
    pub fn retain(&mut self, indices: Tensor<B, 3, Int>) -> Result<()> {
        let CacheShape { batch, kv_heads, key_dim, value_dim } = self.shape;
        let [ib, ih, k] = indices.dims();
        if [ib, ih] != [batch, kv_heads] || k > self.slots || k == 0 {
            return Err(KvError::shape(
                "retain indices",
                &indices.dims(),
                format!("[{batch}, {kv_heads}, k] with 1 <= k <= {} slots held", self.slots),
            ));
        }
        let idx_k = indices.clone().unsqueeze_dim::<4>(3).expand([batch, kv_heads, k, key_dim]);
        let kept = self.keys().gather(2, idx_k);
        self.keys.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, 0..k, 0..key_dim], kept));
        if value_dim > 0 {
            let idx_v = indices.clone().unsqueeze_dim::<4>(3).expand([batch, kv_heads, k, value_dim]);
            let kept = self.values().gather(2, idx_v);
            self.values.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, 0..k, 0..value_dim], kept));
        }
        let kept = self.positions().gather(2, indices.clone());
        self.positions.inplace(|buf| buf.slice_assign([0..batch, 0..kv_heads, 0..k], kept));
        let n = self.slots;
        for (_, buf) in self.side.iter_mut() {
            let kept = held(buf, n).gather(2, indices.clone());
            buf.inplace(|b| b.slice_assign([0..batch, 0..kv_heads, 0..k], kept));
        }
        self.slots = k;
        Ok(())
    }

    /// Keeps the slots `range` (the same for every head), e.g. a recent window.
    pub fn retain_range(&mut self, start: usize, len: usize) -> Result<()> {
        let CacheShape { batch, kv_heads, .. } = self.shape;
        if start + len > self.slots {
            return Err(KvError::config("retained range", format!("{start}..{}", start + len), format!("within 0..{}", self.slots)));
        }
        let idx = Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, &self.device())
            .reshape([1, 1, len])
            .expand([batch, kv_heads, len]);
        self.retain(idx)
    }

    /// Drops every slot and resets the token counter; keeps the buffers for reuse.
    pub fn clear(&mut self) {
        self.slots = 0;
        self.seen = 0;
    }

    /// Statistics measured from the tensors held.
    pub fn stats(&self) -> LayerStats {
        let held = |t: (Vec<usize>, burn::tensor::DType)| t.0.iter().product::<usize>() * t.1.size();
        let keys = self.keys();
        let values = self.values();
        let key_bytes = held((keys.dims().to_vec(), keys.dtype()));
        let value_bytes = held((values.dims().to_vec(), values.dtype()));
        let positions = self.positions();
        let mut meta = held((positions.dims().to_vec(), positions.dtype()));
        let mut allocated = held((self.keys.dims().to_vec(), self.keys.dtype()))
            + held((self.values.dims().to_vec(), self.values.dtype()))
            + held((self.positions.dims().to_vec(), self.positions.dtype()));
        for (_, buf) in &self.side {
            meta += self.slots * self.shape.batch * self.shape.kv_heads * buf.dtype().size();
            allocated += held((buf.dims().to_vec(), buf.dtype()));
        }
        LayerStats {
            slots_per_head: vec![self.slots; self.shape.kv_heads],
            tokens_seen: self.seen,
            kv_bytes: key_bytes + value_bytes,
            metadata_bytes: meta,
            allocated_bytes: allocated,
        }
    }
}

/// The first `n` slots of a buffer along dim 2; an empty tensor when `n == 0`, because burn
/// rejects zero-length `narrow`s.
fn held<B: Backend, const D: usize, K: burn::tensor::BasicOps<B>>(buf: &Tensor<B, D, K>, n: usize) -> Tensor<B, D, K> {
    if n == 0 {
        let mut dims = buf.dims();
        dims[2] = 0;
        Tensor::empty(dims, &buf.device())
    } else {
        buf.clone().narrow(2, 0, n)
    }
}
