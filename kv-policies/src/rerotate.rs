//! Key re-rotation after eviction (StreamingLLM's position mode, kvpress's `KeyRerotationPress`):
//! the kept keys are rotated to their in-cache positions, so relative distances never exceed the
//! cache and endless streams stay within the trained range; it works after any per-head top-k.
//!
//! Only relative positions reach attention, so a re-rotating cache keeps a **frame offset** `o`:
//! the live slot of rank `r` is rotated at `r + o` and the next token at `live + o`, which is
//! [`frame_offset`]. A selection rotates every kept key back to `o = 0`. A per-step eviction of a
//! stream-order scorer (StreamingLLM) instead leaves the window where it is, raises `o` by one and
//! rotates only the sinks, which sit before the victim, one position further (from their stored
//! keys, through the cache's key overlay); every [`TAIL_SLOTS`] evictions the window is rotated
//! back to `o = 0` together with the compaction that is due then.

use crate::LayerContext;
use burn::prelude::*;
use kv_core::{KeyRotation, KvError, LayerCache, Result, TAIL_SLOTS};

/// How far the whole cache is rotated ahead of its in-cache positions: the next token's RoPE
/// position minus the live slots.
pub fn frame_offset<B: Backend>(cache: &LayerCache<B>) -> usize {
    cache.rope_position().saturating_sub(cache.live_slots())
}

fn layer_rope<'a, B: Backend>(
    ctx: &LayerContext<'a, B>,
    policy: &str,
) -> Result<&'a dyn KeyRotation<B>> {
    ctx.rope.ok_or_else(|| {
        KvError::config(
            format!("{policy}:rerotate"),
            true,
            "a layer with RoPE (this one has none)",
        )
    })
}

/// Replaces the keys with `keys`, rotated `offset` positions back, and lowers the next token's
/// RoPE position to match: the frame offset drops by `offset`.
fn rotated_back<B: Backend>(
    cache: &mut LayerCache<B>,
    keys: Tensor<B, 4>,
    offset: usize,
) -> Result<()> {
    cache.set_keys(keys)?;
    cache.shift_rope(offset)
}

/// Brings a re-rotating cache to in-cache positions (`o = 0`, no dead slot, no overlay), as a
/// selection over all its slots ([`rerotate_kept`]) assumes.
pub fn restore_in_cache_positions<B: Backend>(
    ctx: &LayerContext<'_, B>,
    cache: &mut LayerCache<B>,
    policy: &str,
) -> Result<()> {
    cache.compact();
    let offset = frame_offset(cache);
    if offset == 0 {
        return Ok(());
    }
    let rope = layer_rope(ctx, policy)?;
    let delta = Tensor::<B, 3, Int>::full([1, 1, cache.slots()], -(offset as i64), &cache.device());
    // The keys attention reads, overlay included: all of them sit `offset` ahead.
    rotated_back(cache, rope.rotate_by(cache.keys(), delta), offset)
}

/// Re-rotates the keys `cache` kept, `kept` `[b, kv_heads, k]` being their slot indices among
/// the `before` slots held before the eviction, and shifts the cache's RoPE position so the next
/// token rotates at the cache length. The cache must have been at in-cache positions
/// ([`restore_in_cache_positions`]) before the eviction.
///
/// Under re-rotation slot `i` is then rotated at position `i` (new tokens rotate at the cache
/// length), so the kept slot that was at index `j` needs a delta rotation of `i - j`
/// (`R(a)R(b) = R(a+b)`); slots that did not move get a rotation by 0, which is exact.
pub fn rerotate_kept<B: Backend>(
    ctx: &LayerContext<'_, B>,
    cache: &mut LayerCache<B>,
    kept: Tensor<B, 3, Int>,
    before: usize,
    policy: &str,
) -> Result<()> {
    let rope = layer_rope(ctx, policy)?;
    let [_, _, k] = kept.dims();
    let target = Tensor::<B, 1, Int>::arange(0..k as i64, &kept.device()).reshape([1, 1, k]);
    let delta = target - kept;
    if k > 0 {
        let keys = rope.rotate_by(cache.keys(), delta);
        cache.set_keys(keys)?;
    }
    cache.shift_rope(before - k)
}

/// Evicts `victim` (`[b, kv_heads, 1]`) from a re-rotating cache whose scorer keeps the stream's
/// first `sinks` tokens and otherwise evicts the oldest ([`Scorer::stream_order_sinks`]
/// (crate::Scorer::stream_order_sinks)), so the victim is the oldest live slot after the sinks.
///
/// Cost per step: a tombstone and a rotation of the `sinks` first slots, instead of a copy and a
/// rotation of the whole cache; the same relative positions, up to f32 rounding.
pub fn evict_after_sinks<B: Backend>(
    ctx: &LayerContext<'_, B>,
    cache: &mut LayerCache<B>,
    victim: Tensor<B, 3, Int>,
    sinks: usize,
    policy: &str,
) -> Result<()> {
    let rope = layer_rope(ctx, policy)?;
    let mut offset = frame_offset(cache);
    // Back to o = 0 when this eviction compacts (which keeps the angles, and so their f32
    // rounding, within the budget plus TAIL_SLOTS), or when a compaction elsewhere (a chunk's
    // append) folded the sinks' overlay into their stored keys, which then sit `o` ahead too.
    let folded = sinks > 0 && !cache.has_key_overlay();
    if offset > 0 && (cache.dead_slots() + 1 >= TAIL_SLOTS || folded) {
        let (n, device) = (cache.slots(), cache.device());
        let back = |len: usize| Tensor::<B, 3, Int>::full([1, 1, len], -(offset as i64), &device);
        let keys = if cache.has_key_overlay() {
            // Stored sinks are at their in-cache positions already: of the slots the overlay
            // covers, only the others move back, and everything after it moves back as one.
            let m = sinks.min(n);
            let stored = cache.stored_keys();
            let not_sink = cache
                .positions_prefix(m)
                .greater_equal_elem(sinks as i64)
                .int()
                .mul_scalar(-(offset as i64));
            let head = rope.rotate_by(stored.clone().narrow(2, 0, m), not_sink);
            if m == n {
                head
            } else {
                Tensor::cat(
                    vec![
                        head,
                        rope.rotate_by(stored.narrow(2, m, n - m), back(n - m)),
                    ],
                    2,
                )
            }
        } else {
            rope.rotate_by(cache.stored_keys(), back(n))
        };
        rotated_back(cache, keys, offset)?;
        offset = 0;
    }
    cache.evict_one(victim)?;
    if sinks > 0 {
        // Every sink lies before the victim, so it moves one position closer to the window: it
        // is rotated `o + 1` ahead of its stored key, while the other slots the overlay covers
        // (dead, or the window's oldest) keep theirs.
        let m = sinks.min(cache.slots());
        let ahead = cache
            .positions_prefix(m)
            .lower_elem(sinks as i64)
            .int()
            .mul_scalar((offset + 1) as i64);
        let overlay = rope.rotate_by(cache.stored_keys_prefix(m), ahead);
        cache.set_key_overlay(overlay)?;
    }
    Ok(())
}
