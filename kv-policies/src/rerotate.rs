//! Key re-rotation after eviction (StreamingLLM's position mode, kvpress's `KeyRerotationPress`):
//! the kept keys are rotated to their in-cache positions, so relative distances never exceed the
//! cache and endless streams stay within the trained range; it works after any per-head top-k.

use crate::LayerContext;
use burn::prelude::*;
use kv_core::{KvError, LayerCache, Result};

/// Re-rotates the keys `cache` kept, `kept` `[b, kv_heads, k]` being their slot indices among
/// the `before` slots held before the eviction, and shifts the cache's RoPE position so the next
/// token rotates at the cache length.
///
/// Under re-rotation slot `i` is always rotated at position `i` (new tokens rotate at the cache
/// length), so the kept slot that was at index `j` needs a delta rotation of `i - j`
/// (`R(a)R(b) = R(a+b)`); slots that did not move get a rotation by 0, which is exact.
pub fn rerotate_kept<B: Backend>(ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, kept: Tensor<B, 3, Int>, before: usize, policy: &str) -> Result<()> {
    let rope = ctx.rope.ok_or_else(|| KvError::config(format!("{policy}:rerotate"), true, "a layer with RoPE (this one has none)"))?;
    let [_, _, k] = kept.dims();
    let target = Tensor::<B, 1, Int>::arange(0..k as i64, &kept.device()).reshape([1, 1, k]);
    let delta = target - kept;
    if k > 0 {
        let keys = rope.rotate_by(cache.keys(), delta);
        cache.set_keys(keys)?;
    }
    cache.shift_rope(before - k)
}
