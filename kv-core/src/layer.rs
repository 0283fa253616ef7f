//! One layer's KV cache: keys, values, the original position of every slot and per-slot side data.

use crate::readback::ReadBack;
use crate::slots::SlotBuffer;
use crate::{KvError, Result, TAIL_SLOTS, stats::LayerStats};
use burn::prelude::*;

/// The attention bias of a dead slot ([`LayerCache::dead_bias`]): the same large negative the
/// causal masks use, so its softmax weight is exactly zero.
pub const DEAD: f32 = -1.0e9;

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

/// What one (batch row, KV head) of ragged storage receives from a call of a merging attention
/// (DMC): see [`LayerCache::write_heads`].
#[derive(Debug, Clone)]
pub struct HeadWrite<B: Backend> {
    /// Whether the first slot replaces the head's last one (a merge into its open slot).
    pub overwrite_last: bool,
    /// Keys of the slots written, `[1, 1, m, key_dim]`.
    pub keys: Tensor<B, 4>,
    /// Values of the slots written, `[1, 1, m, value_dim]`.
    pub values: Tensor<B, 4>,
    /// The recorded (absolute) position of each slot written: the newest token it covers.
    pub positions: Vec<usize>,
}

/// A layer's cache: keys, values, positions and side channels of the slots each KV head holds.
///
/// **Rectangular storage** (the usual one): every KV head holds the same number of slots. Keys are `[batch, kv_heads, slots, key_dim]`, values `[batch, kv_heads, slots, value_dim]`,
/// positions `[batch, kv_heads, slots]` (Int) and each side channel `[batch, kv_heads, slots]`.
/// All of them are [`SlotBuffer`]s of the same length: appending a token copies at most a small
/// tail, never the whole cache (see `slots.rs` for why a plain in-place write is not enough on
/// burn-flex), and attention reads the held slots as at most two contiguous segments.
///
/// **Lazy eviction**: [`evict_one`](Self::evict_one) drops one slot per head in O(1) by marking it
/// dead instead of copying the cache without it; attention skips dead slots
/// ([`dead_bias`](Self::dead_bias)), and they are compacted away together once [`TAIL_SLOTS`] have
/// accumulated, before any multi-token append, and by [`compact`](Self::compact). Until then every
/// per-slot view (keys, values, positions, side channels, [`slots`](Self::slots)) still includes
/// them, so all of a step's tensors share one slot index; [`live_slots`](Self::live_slots) and
/// [`stats`](Self::stats) count only the living.
///
/// **Key overlay**: [`set_key_overlay`](Self::set_key_overlay) makes attention read other keys for
/// the first few slots while their stored keys stay as written. StreamingLLM's re-rotation keeps
/// its attention sinks there, rotated afresh from their stored keys every step, so it rotates a
/// handful of sinks instead of every window key, and the sinks never accumulate rounding.
///
/// **Ragged storage**: after [`retain_per_head`](Self::retain_per_head) gives heads unequal
/// budgets (AdaKV; later FastGen, DMC), every (batch row, KV head) owns a `[1, 1, n_i, ..]` cache
/// of its own, so a head that keeps fewer slots really holds fewer bytes. Attention then runs per
/// head over [`head_caches`](Self::head_caches); the rectangular views are empty and the
/// operations that need one slot count per layer (`retain`, side channels, re-rotation) return
/// an error instead of acting on the wrong slots.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    shape: CacheShape,
    keys: SlotBuffer<B, 4, Float>,
    values: SlotBuffer<B, 4, Float>,
    positions: SlotBuffer<B, 3, Int>,
    side: Vec<(String, SlotBuffer<B, 3, Float>)>,
    /// Tombstones of lazy evictions: `0` for a live slot, [`DEAD`] for one evicted but not yet
    /// compacted away (`None` while no slot is dead).
    dead: Option<Tensor<B, 3>>,
    /// Dead slots per (batch row, KV head): every lazy eviction marks one slot in each head.
    dead_count: usize,
    /// Keys attention reads for the first slots in place of the stored ones
    /// ([`set_key_overlay`](Self::set_key_overlay)).
    key_overlay: Option<Tensor<B, 4>>,
    seen: usize,
    rope_shift: usize,
    device: B::Device,
    /// Per (batch row, KV head) caches, index `b * kv_heads + h`, when storage is ragged.
    ragged: Option<Vec<LayerCache<B>>>,
}

impl<B: Backend> LayerCache<B> {
    /// An empty cache; storage is allocated on the first append (or by [`reserve`](Self::reserve)).
    pub fn new(shape: CacheShape, device: &B::Device) -> Self {
        let CacheShape {
            batch,
            kv_heads,
            key_dim,
            value_dim,
        } = shape;
        Self {
            shape,
            keys: SlotBuffer::zeros([batch, kv_heads, 0, key_dim], device),
            values: SlotBuffer::zeros([batch, kv_heads, 0, value_dim], device),
            positions: SlotBuffer::zeros([batch, kv_heads, 0], device),
            side: Vec::new(),
            dead: None,
            dead_count: 0,
            key_overlay: None,
            seen: 0,
            rope_shift: 0,
            device: device.clone(),
            ragged: None,
        }
    }

    /// Whether heads hold unequal numbers of slots, each in a cache of its own.
    pub fn is_ragged(&self) -> bool {
        self.ragged.is_some()
    }

    /// The per-head caches of ragged storage (index `b * kv_heads + h`, each `[1, 1, n_i, ..]`);
    /// `None` for rectangular storage.
    pub fn head_caches(&self) -> Option<&[LayerCache<B>]> {
        self.ragged.as_deref()
    }

    /// The per-head caches of ragged storage, mutable, for a policy that evicts head by head
    /// (FastGen's decode); `None` for rectangular storage.
    pub fn head_caches_mut(&mut self) -> Option<&mut [LayerCache<B>]> {
        self.ragged.as_deref_mut()
    }

    /// Slots stored by every (batch row, KV head), index `b * kv_heads + h`, dead ones included.
    pub fn slots_per_head(&self) -> Vec<usize> {
        match &self.ragged {
            Some(heads) => heads.iter().map(|h| h.slots()).collect(),
            None => vec![self.slots(); self.shape.batch * self.shape.kv_heads],
        }
    }

    /// The error for an operation that needs rectangular storage.
    fn needs_rectangular(&self, what: &str) -> KvError {
        KvError::config(
            format!("{what} on a layer cache"),
            format!(
                "ragged storage (slots per head {:?})",
                self.slots_per_head()
            ),
            "rectangular storage: a per-head-budget policy (AdaKV) compresses once, at prefill, and cannot be followed by another eviction",
        )
    }

    fn check_rectangular(&self, what: &str) -> Result<()> {
        if self.is_ragged() {
            Err(self.needs_rectangular(what))
        } else {
            Ok(())
        }
    }

    /// The fixed dimensions of this cache.
    pub fn shape(&self) -> CacheShape {
        self.shape
    }

    /// Slots stored per KV head, dead ones included: the length of every per-slot view (with
    /// ragged storage: the most any head stores).
    pub fn slots(&self) -> usize {
        match &self.ragged {
            Some(heads) => heads.iter().map(|h| h.slots()).max().unwrap_or(0),
            None => self.positions.len(),
        }
    }

    /// Slots per KV head that are not dead: what the cache keeps (with ragged storage: the most
    /// any head keeps).
    pub fn live_slots(&self) -> usize {
        self.slots() - self.dead_count
    }

    /// Dead slots per KV head, awaiting compaction.
    pub fn dead_slots(&self) -> usize {
        self.dead_count
    }

    /// The additive attention bias of the slots stored, `[batch, kv_heads, slots]`: `0` for a live
    /// slot and [`DEAD`] for a dead one, or `None` when no slot is dead.
    pub fn dead_bias(&self) -> Option<Tensor<B, 3>> {
        self.dead.clone()
    }

    /// Evicts slot `victims[b, h]` (`[batch, kv_heads, 1]`, a live slot) of every (batch row, KV
    /// head) by marking it dead: a few ops on `[batch, kv_heads, slots]`, never a copy of the keys
    /// or values. Compacts once [`TAIL_SLOTS`] slots per head are dead.
    pub fn evict_one(&mut self, victims: Tensor<B, 3, Int>) -> Result<()> {
        self.check_rectangular("evict_one")?;
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        let n = self.slots();
        if victims.dims() != [batch, kv_heads, 1] || self.live_slots() < 2 {
            return Err(KvError::shape(
                "evicted slots",
                &victims.dims(),
                format!(
                    "[{batch}, {kv_heads}, 1], from a cache of at least 2 live slots ({} now)",
                    self.live_slots()
                ),
            ));
        }
        // A victim is live (bias 0), so adding DEAD at its index marks it: one write per head,
        // where a one-hot mask compared every slot.
        let bias = self
            .dead
            .take()
            .unwrap_or_else(|| Tensor::zeros([batch, kv_heads, n], &self.device));
        let tombstones = Tensor::full([batch, kv_heads, 1], DEAD, &self.device);
        self.dead = Some(bias.scatter(2, victims, tombstones, burn::tensor::IndexingUpdateOp::Add));
        self.dead_count += 1;
        if self.dead_count >= TAIL_SLOTS {
            self.compact();
        }
        Ok(())
    }

    /// Removes every dead slot, keeping the living in order; a no-op when none is dead.
    pub fn compact(&mut self) {
        let Some(bias) = self.dead_bias() else { return };
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        let n = self.slots();
        let live = n - self.dead_count;
        // Dead slots sort after every live one, and each group keeps its slot order.
        let order = bias.lower_elem(DEAD / 2.0).int().mul_scalar(n as i64)
            + Tensor::<B, 1, Int>::arange(0..n as i64, &self.device)
                .reshape([1, 1, n])
                .expand([batch, kv_heads, n]);
        let keep = order.sort(2).narrow(2, 0, live);
        self.gather_all(keep);
    }

    /// The original positions of the slots each (batch row, KV head) keeps, index
    /// `b * kv_heads + h`, rectangular or ragged, dead slots left out: read back to the host, for
    /// reporting and tests, never in a decode step.
    pub fn kept_positions(&self) -> Vec<Vec<i64>> {
        if let Some(heads) = &self.ragged {
            return heads.iter().flat_map(|h| h.kept_positions()).collect();
        }
        let mut kept = self.clone();
        kept.compact();
        let n = kept.slots().max(1);
        kept.positions()
            .read_back()
            .iter::<i64>()
            .collect::<Vec<_>>()
            .chunks(n)
            .map(<[i64]>::to_vec)
            .collect()
    }

    /// Gathers every per-slot buffer at `indices` (live slots), which leaves no slot dead.
    fn gather_all(&mut self, indices: Tensor<B, 3, Int>) {
        self.dead = None;
        self.dead_count = 0;
        if self.key_overlay.is_some() {
            // The overlay's keys are the ones attention reads, so they are the ones kept.
            let keys = self.keys();
            self.key_overlay = None;
            self.keys.gather_from(keys, indices.clone());
        } else {
            self.keys.gather(indices.clone());
        }
        if self.shape.value_dim > 0 {
            self.values.gather(indices.clone());
        }
        self.positions.gather(indices.clone());
        for (_, buf) in self.side.iter_mut() {
            buf.gather(indices.clone());
        }
    }

    /// Tokens seen so far: the RoPE position of the next token, whatever was evicted.
    pub fn tokens_seen(&self) -> usize {
        self.seen
    }

    /// The RoPE position of the next token: `tokens_seen` unless a policy that re-rotates the
    /// cache to in-cache positions (StreamingLLM's own mode) has shifted it down.
    pub fn rope_position(&self) -> usize {
        self.seen - self.rope_shift
    }

    /// Lowers the RoPE position of every future token by `by`, for a policy that has just
    /// re-rotated the cached keys `by` positions down; `tokens_seen` is unchanged.
    pub fn shift_rope(&mut self, by: usize) -> Result<()> {
        self.check_rectangular("re-rotation")?;
        if self.rope_shift + by > self.seen {
            return Err(KvError::config(
                "rope shift",
                self.rope_shift + by,
                format!("at most the {} tokens seen", self.seen),
            ));
        }
        self.rope_shift += by;
        Ok(())
    }

    /// The device the cache lives on.
    pub fn device(&self) -> B::Device {
        self.device.clone()
    }

    /// Makes room for at least `extra` more slots, so a known-length generation never regrows.
    pub fn reserve(&mut self, extra: usize) {
        if let Some(heads) = &mut self.ragged {
            heads.iter_mut().for_each(|h| h.reserve(extra));
            return;
        }
        let total = self.slots() + extra;
        self.keys.reserve_total(total);
        self.values.reserve_total(total);
        self.positions.reserve_total(total);
        self.side
            .iter_mut()
            .for_each(|(_, b)| b.reserve_total(total));
    }

    /// Appends `t` new tokens: keys `[batch, kv_heads, t, key_dim]`, values likewise.
    ///
    /// They get positions `tokens_seen .. tokens_seen + t`, side channels start at zero for them,
    /// and `tokens_seen` advances by `t`.
    pub fn append(&mut self, keys: Tensor<B, 4>, values: Tensor<B, 4>) -> Result<()> {
        let CacheShape {
            batch,
            kv_heads,
            key_dim,
            value_dim,
        } = self.shape;
        let [kb, kh, t, kd] = keys.dims();
        if [kb, kh, kd] != [batch, kv_heads, key_dim] {
            return Err(KvError::shape(
                "appended keys",
                &keys.dims(),
                format!("[{batch}, {kv_heads}, t, {key_dim}]"),
            ));
        }
        if values.dims() != [batch, kv_heads, t, value_dim] {
            return Err(KvError::shape(
                "appended values",
                &values.dims(),
                format!("[{batch}, {kv_heads}, {t}, {value_dim}]"),
            ));
        }
        if t == 0 {
            return Ok(());
        }
        if t > 1 {
            // A chunk's causal mask reads the slots' positions; dead ones would need their own.
            self.compact();
        }
        if let Some(heads) = &mut self.ragged {
            for (i, head) in heads.iter_mut().enumerate() {
                let (b, h) = (i / kv_heads, i % kv_heads);
                head.append(
                    keys.clone().narrow(0, b, 1).narrow(1, h, 1),
                    values.clone().narrow(0, b, 1).narrow(1, h, 1),
                )?;
            }
            self.seen += t;
            return Ok(());
        }
        self.keys.append(keys);
        self.values.append(values);
        let pos =
            Tensor::<B, 1, Int>::arange(self.seen as i64..(self.seen + t) as i64, &self.device)
                .reshape([1, 1, t])
                .expand([batch, kv_heads, t]);
        self.positions.append(pos);
        for (_, buf) in self.side.iter_mut() {
            buf.append(Tensor::zeros([batch, kv_heads, t], &self.device));
        }
        // One small copy per appended token, so every read of the bias in a step is free.
        self.dead = self.dead.take().map(|d| {
            Tensor::cat(
                vec![d, Tensor::zeros([batch, kv_heads, t], &self.device)],
                2,
            )
        });
        self.seen += t;
        Ok(())
    }

    /// The keys attention reads, `[batch, kv_heads, slots, key_dim]`: the stored ones under any
    /// [key overlay](Self::set_key_overlay) (rectangular storage; empty when ragged).
    pub fn keys(&self) -> Tensor<B, 4> {
        debug_assert!(
            !self.is_ragged(),
            "rectangular view of a ragged cache: read head_caches()"
        );
        let stored = self.keys.view();
        match &self.key_overlay {
            None => stored,
            Some(overlay) => {
                let (m, n) = (overlay.dims()[2], stored.dims()[2]);
                if m == n {
                    overlay.clone()
                } else {
                    Tensor::cat(vec![overlay.clone(), stored.narrow(2, m, n - m)], 2)
                }
            }
        }
    }

    /// The keys as stored, under any [key overlay](Self::set_key_overlay).
    pub fn stored_keys(&self) -> Tensor<B, 4> {
        self.keys.view()
    }

    /// The stored keys of the first `m` slots (`m` at most [`slots`](Self::slots)), without
    /// copying the rest.
    pub fn stored_keys_prefix(&self, m: usize) -> Tensor<B, 4> {
        self.keys.prefix(m)
    }

    /// The original positions of the first `m` slots (`m` at most [`slots`](Self::slots)),
    /// without copying the rest.
    pub fn positions_prefix(&self, m: usize) -> Tensor<B, 3, Int> {
        self.positions.prefix(m)
    }

    /// Makes attention read `keys` `[batch, kv_heads, m, key_dim]` for the first `m` slots, while
    /// their stored keys stay as written: a policy that re-rotates a few pinned slots every step
    /// (StreamingLLM's sinks) derives them from the stored keys, so no error accumulates, and no
    /// write touches the rest of the cache.
    ///
    /// The first `m` slots must stay live while the overlay is set. Replacing the keys
    /// ([`set_keys`](Self::set_keys)) drops it; every other rewrite of the storage (compaction,
    /// retain) folds it into the keys kept.
    pub fn set_key_overlay(&mut self, keys: Tensor<B, 4>) -> Result<()> {
        self.check_rectangular("set_key_overlay")?;
        let CacheShape {
            batch,
            kv_heads,
            key_dim,
            ..
        } = self.shape;
        let [kb, kh, m, kd] = keys.dims();
        if [kb, kh, kd] != [batch, kv_heads, key_dim] || m == 0 || m > self.slots() {
            return Err(KvError::shape(
                "overlay keys",
                &keys.dims(),
                format!(
                    "[{batch}, {kv_heads}, m, {key_dim}] with 1 <= m <= {} slots held",
                    self.slots()
                ),
            ));
        }
        if self.keys.leading_len() < m {
            // Attention reads the overlay as a segment of its own, so the first stored segment
            // (of every buffer, which all move in step) must cover it.
            self.flush_tails();
        }
        self.key_overlay = Some(keys);
        Ok(())
    }

    /// Whether a [key overlay](Self::set_key_overlay) is set.
    pub fn has_key_overlay(&self) -> bool {
        self.key_overlay.is_some()
    }

    /// Moves every buffer's tail into its body.
    fn flush_tails(&mut self) {
        self.keys.flush();
        self.values.flush();
        self.positions.flush();
        self.side.iter_mut().for_each(|(_, b)| b.flush());
    }

    /// The values held, `[batch, kv_heads, slots, value_dim]` (rectangular storage; empty when ragged).
    pub fn values(&self) -> Tensor<B, 4> {
        debug_assert!(
            !self.is_ragged(),
            "rectangular view of a ragged cache: read head_caches()"
        );
        self.values.view()
    }

    /// The keys and values held as contiguous segments in slot order, for attention kernels that
    /// read the cache without concatenating it (rectangular storage; none when ragged).
    pub fn kv_segments(&self) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        debug_assert!(
            !self.is_ragged(),
            "rectangular view of a ragged cache: read head_caches()"
        );
        let (mut k, mut v) = (self.keys.segments(), self.values.segments());
        if let Some(overlay) = &self.key_overlay {
            // The overlay replaces the head of the first segment (set_key_overlay keeps it there).
            let m = overlay.dims()[2];
            k = split_first(k, m);
            v = split_first(v, m);
            k[0] = overlay.clone();
        }
        debug_assert_eq!(k.len(), v.len());
        k.into_iter().zip(v).collect()
    }

    /// The original (absolute) position of every slot, `[batch, kv_heads, slots]` (rectangular
    /// storage; empty when ragged).
    pub fn positions(&self) -> Tensor<B, 3, Int> {
        debug_assert!(
            !self.is_ragged(),
            "rectangular view of a ragged cache: read head_caches()"
        );
        self.positions.view()
    }

    /// Overwrites the keys held, for example after re-rotating them to new positions; drops any
    /// [key overlay](Self::set_key_overlay).
    pub fn set_keys(&mut self, keys: Tensor<B, 4>) -> Result<()> {
        self.check_rectangular("set_keys")?;
        let CacheShape {
            batch,
            kv_heads,
            key_dim,
            ..
        } = self.shape;
        let n = self.slots();
        if keys.dims() != [batch, kv_heads, n, key_dim] {
            return Err(KvError::shape(
                "replacement keys",
                &keys.dims(),
                format!("[{batch}, {kv_heads}, {n}, {key_dim}]"),
            ));
        }
        // The new keys are one segment, so every other buffer becomes one too (attention reads
        // keys and values as segments that line up).
        self.flush_tails();
        self.keys.replace(keys);
        self.key_overlay = None;
        Ok(())
    }

    /// Overwrites the recorded positions of the slots held (StreamingLLM's in-cache positions).
    pub fn set_positions(&mut self, positions: Tensor<B, 3, Int>) -> Result<()> {
        self.check_rectangular("set_positions")?;
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        let n = self.slots();
        if positions.dims() != [batch, kv_heads, n] {
            return Err(KvError::shape(
                "replacement positions",
                &positions.dims(),
                format!("[{batch}, {kv_heads}, {n}]"),
            ));
        }
        self.positions.replace(positions);
        Ok(())
    }

    /// Adds a named per-slot side channel (zero for the slots already held); adding twice is a no-op.
    pub fn add_side(&mut self, name: &str) {
        if self.side.iter().any(|(n, _)| n == name) {
            return;
        }
        if let Some(heads) = &mut self.ragged {
            heads.iter_mut().for_each(|h| h.add_side(name));
        }
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        let mut buf = SlotBuffer::zeros([batch, kv_heads, 0], &self.device);
        let n = self.slots();
        if n > 0 {
            buf.append(Tensor::zeros([batch, kv_heads, n], &self.device));
        }
        self.side.push((name.to_string(), buf));
    }

    /// Names of the side channels, in the order they were added.
    pub fn side_names(&self) -> Vec<String> {
        self.side.iter().map(|(n, _)| n.clone()).collect()
    }

    fn side_index(&self, name: &str) -> Result<usize> {
        self.side
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| KvError::Unknown {
                kind: "side channel".into(),
                name: name.into(),
                valid: format!("{:?}", self.side_names()),
            })
    }

    /// A side channel's values for the slots held, `[batch, kv_heads, slots]`.
    pub fn side(&self, name: &str) -> Result<Tensor<B, 3>> {
        self.check_rectangular("reading a side channel")?;
        let i = self.side_index(name)?;
        Ok(self.side[i].1.view())
    }

    /// Overwrites a side channel for the slots held.
    pub fn set_side(&mut self, name: &str, values: Tensor<B, 3>) -> Result<()> {
        self.check_rectangular("writing a side channel")?;
        let i = self.side_index(name)?;
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        let n = self.slots();
        if values.dims() != [batch, kv_heads, n] {
            return Err(KvError::shape(
                format!("side channel '{name}'"),
                &values.dims(),
                format!("[{batch}, {kv_heads}, {n}]"),
            ));
        }
        self.side[i].1.replace(values);
        Ok(())
    }

    /// Keeps, for every (batch row, KV head), the slots named by `indices` `[batch, kv_heads, k]`,
    /// in that order; keys, values, positions and every side channel move together.
    ///
    /// Indices must be below [`slots`](Self::slots) and name live slots; checking that would cost
    /// a host sync, so it is the caller's contract (policies build them with top-k over the slots
    /// held, dead ones scored lowest). No slot is dead afterwards.
    pub fn retain(&mut self, indices: Tensor<B, 3, Int>) -> Result<()> {
        self.check_rectangular("retain")?;
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        let [ib, ih, k] = indices.dims();
        if [ib, ih] != [batch, kv_heads] || k > self.slots() || k == 0 {
            return Err(KvError::shape(
                "retain indices",
                &indices.dims(),
                format!(
                    "[{batch}, {kv_heads}, k] with 1 <= k <= {} slots held",
                    self.slots()
                ),
            ));
        }
        self.gather_all(indices);
        Ok(())
    }

    /// Keeps the live slots `start .. start + len` (the same for every head), e.g. a recent window.
    pub fn retain_range(&mut self, start: usize, len: usize) -> Result<()> {
        self.compact();
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        if start + len > self.slots() || len == 0 {
            return Err(KvError::config(
                "retained range",
                format!("{start}..{}", start + len),
                format!("non-empty, within 0..{}", self.slots()),
            ));
        }
        let idx = Tensor::<B, 1, Int>::arange(start as i64..(start + len) as i64, &self.device)
            .reshape([1, 1, len])
            .expand([batch, kv_heads, len]);
        self.retain(idx)
    }

    /// Keeps only the newest `n` slots (a sliding window's eviction); `n == 0` drops every slot.
    /// Unlike [`clear`](Self::clear), the token counter and the side channels' names stay.
    pub fn keep_last(&mut self, n: usize) -> Result<()> {
        self.check_rectangular("keep_last")?;
        self.compact();
        let held = self.slots();
        if held <= n {
            return Ok(());
        }
        if n > 0 {
            return self.retain_range(held - n, n);
        }
        let CacheShape {
            batch,
            kv_heads,
            key_dim,
            value_dim,
        } = self.shape;
        self.keys = SlotBuffer::zeros([batch, kv_heads, 0, key_dim], &self.device);
        self.values = SlotBuffer::zeros([batch, kv_heads, 0, value_dim], &self.device);
        self.positions = SlotBuffer::zeros([batch, kv_heads, 0], &self.device);
        for (_, buf) in self.side.iter_mut() {
            *buf = SlotBuffer::zeros([batch, kv_heads, 0], &self.device);
        }
        self.key_overlay = None;
        Ok(())
    }

    /// Keeps, for every (batch row `b`, KV head `h`), the slots `keep[b * kv_heads + h]` (slot
    /// indices in increasing order); heads may keep different numbers of slots.
    ///
    /// Equal counts keep rectangular storage (one gather, as [`retain`](Self::retain)); unequal
    /// ones move every head into a cache of its own, sized to what it keeps, so the bytes held
    /// shrink with each head's budget. Indices are checked here: they come from the host anyway,
    /// because unequal budgets need their sizes on the host to allocate. They must name live
    /// slots; no slot is dead afterwards.
    pub fn retain_per_head(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        let CacheShape {
            batch, kv_heads, ..
        } = self.shape;
        if keep.len() != batch * kv_heads {
            return Err(KvError::config(
                "per-head index lists",
                keep.len(),
                format!("one per batch row and KV head ({batch} x {kv_heads})"),
            ));
        }
        let held = self.slots_per_head();
        for (i, (idx, &n)) in keep.iter().zip(&held).enumerate() {
            let sorted = idx.windows(2).all(|w| w[0] < w[1]);
            if idx.is_empty() || !sorted || idx.last().is_some_and(|&last| last >= n) {
                return Err(KvError::config(
                    format!("kept slots of head {i}"),
                    format!("{} indices, last {:?}", idx.len(), idx.last()),
                    format!("1 or more strictly increasing indices below the {n} slots it holds"),
                ));
            }
        }
        let to_tensor = |idx: &[usize], dims: [usize; 3]| {
            let ints: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
            Tensor::<B, 1, Int>::from_ints(ints.as_slice(), &self.device).reshape(dims)
        };
        if let Some(heads) = &mut self.ragged {
            for (head, idx) in heads.iter_mut().zip(keep) {
                if idx.len() < head.slots() {
                    head.retain(to_tensor(idx, [1, 1, idx.len()]))?;
                }
            }
            return Ok(());
        }
        let k = keep[0].len();
        if keep.iter().all(|idx| idx.len() == k) {
            let flat: Vec<usize> = keep.concat();
            return self.retain(to_tensor(&flat, [batch, kv_heads, k]));
        }
        let (keys, values, positions) = (self.keys(), self.values.view(), self.positions.view());
        let sides: Vec<(String, Tensor<B, 3>)> = self
            .side
            .iter()
            .map(|(n, b)| (n.clone(), b.view()))
            .collect();
        let one = CacheShape {
            batch: 1,
            kv_heads: 1,
            ..self.shape
        };
        let mut heads = Vec::with_capacity(keep.len());
        for (i, idx) in keep.iter().enumerate() {
            let (b, h) = (i / kv_heads, i % kv_heads);
            let sel = to_tensor(idx, [idx.len(), 1, 1]).reshape([idx.len()]);
            let pick4 = |t: &Tensor<B, 4>| {
                t.clone()
                    .narrow(0, b, 1)
                    .narrow(1, h, 1)
                    .select(2, sel.clone())
            };
            let mut head = LayerCache::new(one, &self.device);
            head.keys.replace(pick4(&keys));
            head.values.replace(if self.shape.value_dim > 0 {
                pick4(&values)
            } else {
                Tensor::zeros([1, 1, idx.len(), 0], &self.device)
            });
            head.positions.replace(
                positions
                    .clone()
                    .narrow(0, b, 1)
                    .narrow(1, h, 1)
                    .select(2, sel.clone()),
            );
            for (name, side) in &sides {
                let mut buf = SlotBuffer::zeros([1, 1, 0], &self.device);
                buf.replace(
                    side.clone()
                        .narrow(0, b, 1)
                        .narrow(1, h, 1)
                        .select(2, sel.clone()),
                );
                head.side.push((name.clone(), buf));
            }
            (head.seen, head.rope_shift) = (self.seen, self.rope_shift);
            heads.push(head);
        }
        let CacheShape {
            key_dim, value_dim, ..
        } = self.shape;
        self.keys = SlotBuffer::zeros([batch, kv_heads, 0, key_dim], &self.device);
        self.values = SlotBuffer::zeros([batch, kv_heads, 0, value_dim], &self.device);
        self.positions = SlotBuffer::zeros([batch, kv_heads, 0], &self.device);
        for (_, buf) in self.side.iter_mut() {
            *buf = SlotBuffer::zeros([batch, kv_heads, 0], &self.device);
        }
        self.ragged = Some(heads);
        (self.dead, self.dead_count, self.key_overlay) = (None, 0, None);
        Ok(())
    }

    /// An empty cache in ragged storage from the start, for an attention whose heads fill at
    /// different rates (DMC's merges): every (batch row, KV head) owns a cache of its own.
    pub fn new_ragged(shape: CacheShape, device: &B::Device) -> Self {
        let one = CacheShape {
            batch: 1,
            kv_heads: 1,
            ..shape
        };
        let mut cache = Self::new(shape, device);
        cache.ragged = Some(
            (0..shape.batch * shape.kv_heads)
                .map(|_| Self::new(one, device))
                .collect(),
        );
        cache
    }

    /// Writes the slots `t` new tokens leave, head by head, into ragged storage (DMC): each
    /// (batch row, KV head) may first overwrite its last slot (a merge into the slot it is still
    /// extending, whose side data it keeps) and then appends the rest, each slot at its own
    /// recorded position. `tokens_seen` advances by `t` whatever number of slots was written.
    pub fn write_heads(&mut self, writes: Vec<HeadWrite<B>>, t: usize) -> Result<()> {
        let CacheShape {
            batch,
            kv_heads,
            key_dim,
            value_dim,
        } = self.shape;
        let seen = self.seen;
        let Some(heads) = &mut self.ragged else {
            return Err(KvError::config(
                "per-head writes",
                "a rectangular cache",
                "ragged storage (LayerCache::new_ragged)",
            ));
        };
        if writes.len() != batch * kv_heads {
            return Err(KvError::config(
                "per-head writes",
                writes.len(),
                format!("one per batch row and KV head ({batch} x {kv_heads})"),
            ));
        }
        for (i, (head, w)) in heads.iter_mut().zip(writes).enumerate() {
            let m = w.positions.len();
            if w.keys.dims() != [1, 1, m, key_dim] || w.values.dims() != [1, 1, m, value_dim] {
                return Err(KvError::shape(
                    format!("slots written to head {i}"),
                    &w.keys.dims(),
                    format!("[1, 1, {m}, {key_dim}] keys and [1, 1, {m}, {value_dim}] values"),
                ));
            }
            let held = head.positions.len();
            let in_order = w.positions.windows(2).all(|p| p[0] < p[1])
                && w.positions.iter().all(|&p| p >= seen && p < seen + t);
            if !in_order || (w.overwrite_last && (held == 0 || m == 0)) {
                return Err(KvError::config(
                    format!("slot positions written to head {i}"),
                    format!("{:?} (overwrite last: {})", w.positions, w.overwrite_last),
                    format!(
                        "increasing positions among the new tokens {seen}..{}, and a held slot to overwrite",
                        seen + t
                    ),
                ));
            }
            if m > 0 {
                let pos: Vec<i64> = w.positions.iter().map(|&p| p as i64).collect();
                let pos =
                    Tensor::<B, 1, Int>::from_ints(pos.as_slice(), &head.device).reshape([1, 1, m]);
                let from = usize::from(w.overwrite_last);
                if w.overwrite_last {
                    head.keys.set_last(w.keys.clone().narrow(2, 0, 1));
                    head.values.set_last(w.values.clone().narrow(2, 0, 1));
                    head.positions.set_last(pos.clone().narrow(2, 0, 1));
                }
                if m > from {
                    head.keys.append(w.keys.narrow(2, from, m - from));
                    head.values.append(w.values.narrow(2, from, m - from));
                    head.positions.append(pos.narrow(2, from, m - from));
                    for (_, buf) in head.side.iter_mut() {
                        buf.append(Tensor::zeros([1, 1, m - from], &head.device));
                    }
                }
            }
            head.seen = seen + t;
        }
        self.seen = seen + t;
        Ok(())
    }

    /// Drops every slot and resets the token counter.
    pub fn clear(&mut self) {
        *self = Self::new(self.shape, &self.device);
    }

    /// Statistics measured from the tensors held.
    pub fn stats(&self) -> LayerStats {
        if let Some(heads) = &self.ragged {
            let per: Vec<LayerStats> = heads.iter().map(|h| h.stats()).collect();
            return LayerStats {
                slots_per_head: per.iter().map(|s| s.slots_per_head[0]).collect(),
                tokens_seen: self.seen,
                kv_bytes: per.iter().map(|s| s.kv_bytes).sum(),
                metadata_bytes: per.iter().map(|s| s.metadata_bytes).sum(),
                allocated_bytes: per.iter().map(|s| s.allocated_bytes).sum(),
            };
        }
        fn bytes<B: Backend, const D: usize, K: burn::tensor::BasicOps<B>>(
            t: &[Tensor<B, D, K>],
        ) -> usize {
            t.iter().map(crate::stats::tensor_bytes).sum()
        }
        // Dead slots are still stored until compaction, but no longer kept: they count as
        // allocated, not as held.
        let (n, live) = (self.slots(), self.live_slots());
        let held = |stored: usize| stored.checked_div(n).map_or(0, |per_slot| per_slot * live);
        let kv_bytes = held(bytes(&self.keys.segments()) + bytes(&self.values.segments()));
        let mut metadata_bytes = held(bytes(&self.positions.segments()));
        let mut allocated_bytes = self.keys.allocated_bytes()
            + self.values.allocated_bytes()
            + self.positions.allocated_bytes();
        allocated_bytes += self
            .key_overlay
            .as_ref()
            .map_or(0, crate::stats::tensor_bytes);
        if let Some(dead) = &self.dead {
            metadata_bytes += held(crate::stats::tensor_bytes(dead));
            allocated_bytes += crate::stats::tensor_bytes(dead);
        }
        for (_, buf) in &self.side {
            metadata_bytes += held(bytes(&buf.segments()));
            allocated_bytes += buf.allocated_bytes();
        }
        LayerStats {
            slots_per_head: vec![live; self.shape.batch * self.shape.kv_heads],
            tokens_seen: self.seen,
            kv_bytes,
            metadata_bytes,
            allocated_bytes,
        }
    }
}

/// `segments` with the first one split after its first `m` slots (`m` at most its length).
fn split_first<B: Backend>(mut segments: Vec<Tensor<B, 4>>, m: usize) -> Vec<Tensor<B, 4>> {
    let first = segments.remove(0);
    let n = first.dims()[2];
    if n > m {
        segments.insert(0, first.clone().narrow(2, m, n - m));
    }
    segments.insert(0, first.narrow(2, 0, m));
    segments
}
