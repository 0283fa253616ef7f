//! Attention modules over kv-core caches.
//!
//! - [`CachedAttention`]: the inference interface of every kind, over its own typed state;
//! - [`Rotary`]: RoPE at explicit positions, and re-rotation by a position delta;
//! - [`grouped_attention`]: the shared attention kernel (MHA/GQA/MQA by `kv_heads`, f32 softmax,
//!   causality from slot positions, optional observation for policies);
//! - [`grouped_attention_parts`]: the same kernel with queries and keys split along the feature
//!   axis, so keys held as separate tensors are attended without concatenating the cache;
//! - [`host`]: causal flash attention and the SwiGLU activation ([`swiglu`]) over host memory,
//!   vectorised, for CPU backends' prefill and decode ([`Kernels`]), each built for the
//!   instruction sets of [`Isa`];
//! - [`GroupedAttention`]: the projection + RoPE + cache layer used by decoder models;
//! - [`DmcAttention`]: Dynamic Memory Compression, grouped attention whose KV heads merge tokens
//!   into their slots (ragged cache), with the training relaxation ([`merge_runs`]);
//! - [`MlaAttention`]: multi-head latent attention (DeepSeek-V2), naive or absorbed, over a
//!   one-head latent cache;
//! - [`SlidingWindowAttention`]: grouped attention over the last `window` positions, with a
//!   cache trimmed to the window;
//! - [`GatedRetention`]: YOCO's gated retention, parallel / chunkwise / recurrent;
//! - [`GlobalKv`] / [`CrossAttention`]: YOCO's one global K/V and the cross-decoder layers that
//!   share it.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::prelude::*;
//! use kv_attention::{CachedAttention, GroupedAttentionConfig, ObserveRequest};
//!
//! let device = Default::default();
//! // GQA: 8 query heads share 2 KV heads; the cache holds only the 2.
//! let layer = GroupedAttentionConfig::new(64, 8, 2).init::<Flex>(&device).unwrap();
//! let x = Tensor::<Flex, 3>::random([1, 10, 64], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
//! let mut state = layer.new_state(1, &device);
//! let prefill = layer.forward_cached(x.clone().narrow(1, 0, 9), &mut state, ObserveRequest::default()).unwrap();
//! let step = layer.forward_cached(x.clone().narrow(1, 9, 1), &mut state, ObserveRequest::default()).unwrap();
//! // The cached path equals the full causal forward pass.
//! let cached = Tensor::cat(vec![prefill.output, step.output], 1);
//! let diff = (cached - layer.forward(x)).abs().max().into_scalar();
//! assert!(diff < 1e-5);
//! assert_eq!((state.cache.slots(), state.cache.shape().kv_heads), (10, 2));
//! ```

// Tests read what they assert; the library reads through kv_core::readback (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

mod attend;
mod cached;
mod cross;
#[cfg(feature = "flex")]
mod decode;
mod dmc;
mod explicit;
mod grouped;
mod heads;
pub mod host;
mod isa;
mod kernels;
mod materialize;
mod mla;
mod packed;
mod prefill;
mod retention;
mod rope;
mod swiglu;
mod window;

pub use attend::{attend_appended, attend_cache, host_kernels_on, with_host_kernels};
pub use cached::CachedAttention;
pub use cross::{CrossAttention, CrossAttentionConfig, GlobalKv};
pub use dmc::{DmcAttention, DmcAttentionConfig, DmcDecisions, merge_fade, merge_runs};
pub use explicit::{
    Causality, QUERY_BLOCK, SplitSegment, grouped_attention, grouped_attention_parts,
};
pub use grouped::{AttentionOutput, GroupedAttention, GroupedAttentionConfig};
pub use isa::Isa;
pub use kernels::Kernels;
pub use kv_core::{Observation, ObserveRequest};
pub use materialize::materialize;
pub use mla::{MlaAttention, MlaAttentionConfig, MlaPath};
pub use packed::{
    CodeWidth, PACKED_BLOCK, PACKED_MAX_ROWS, PackedMatrix, PackedSet, project, project_packed,
};
pub use prefill::FUSED_BLOCK;
pub use retention::{
    GatedRetention, GatedRetentionConfig, Projected, retention_chunkwise, retention_parallel,
    retention_recurrent,
};
pub use rope::{Rotary, RotaryConfig, position_range};
pub use swiglu::swiglu;
pub use window::{SlidingWindowAttention, SlidingWindowAttentionConfig};

#[cfg(test)]
mod dmc_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod yoco_tests;
