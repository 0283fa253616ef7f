//! Attention modules over kv-core caches.
//!
//! - [`Rotary`]: RoPE at explicit positions, and re-rotation by a position delta;
//! - [`grouped_attention`]: the shared attention kernel (MHA/GQA/MQA by `kv_heads`, f32 softmax,
//!   causality from slot positions, optional observation for policies);
//! - [`GroupedAttention`]: the projection + RoPE + cache layer used by decoder models.

mod attend;
mod grouped;
mod observe;
mod rope;

pub use attend::{Causality, QUERY_BLOCK, grouped_attention};
pub use grouped::{AttentionOutput, GroupedAttention, GroupedAttentionConfig};
pub use observe::{ObserveRequest, Observation};
pub use rope::{Rotary, RotaryConfig, position_range};

#[cfg(test)]
mod tests;
