//! Attention modules over kv-core caches.
//!
//! - [`Rotary`]: RoPE at explicit positions, and re-rotation by a position delta;
//! - [`grouped_attention`]: the shared attention kernel (MHA/GQA/MQA by `kv_heads`, f32 softmax,
//!   causality from slot positions, optional observation for policies);
//! - [`grouped_attention_parts`]: the same kernel with queries and keys split along the feature
//!   axis, so keys held as separate tensors are attended without concatenating the cache;
//! - [`GroupedAttention`]: the projection + RoPE + cache layer used by decoder models;
//! - [`MlaAttention`]: multi-head latent attention (DeepSeek-V2), naive or absorbed, over a
//!   one-head latent cache;
//! - [`SlidingWindowAttention`]: grouped attention over the last `window` positions, with a
//!   cache trimmed to the window;
//! - [`GatedRetention`]: YOCO's gated retention, parallel / chunkwise / recurrent;
//! - [`GlobalKv`] / [`CrossAttention`]: YOCO's one global K/V and the cross-decoder layers that
//!   share it.

mod attend;
mod cross;
mod grouped;
mod mla;
mod retention;
mod rope;
mod window;

pub use attend::{Causality, QUERY_BLOCK, SplitSegment, attend_appended, attend_cache, grouped_attention, grouped_attention_parts};
pub use grouped::{AttentionOutput, GroupedAttention, GroupedAttentionConfig};
pub use mla::{MlaAttention, MlaAttentionConfig, MlaPath};
pub use kv_core::{ObserveRequest, Observation};
pub use cross::{CrossAttention, CrossAttentionConfig, GlobalKv};
pub use retention::{GatedRetention, GatedRetentionConfig, Projected, retention_chunkwise, retention_parallel, retention_recurrent};
pub use window::{SlidingWindowAttention, SlidingWindowAttentionConfig};
pub use rope::{Rotary, RotaryConfig, position_range};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod yoco_tests;
