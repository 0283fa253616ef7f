//! Backend-generic KV cache tensors on burn: what a cache *is*, with no model or policy code.
//!
//! - [`LayerCache`]: keys, values, original positions and per-slot side data that move together;
//! - [`ModelCache`]: every layer's state, typed: [`KvState`] for attention layers,
//!   [`LocalState`] (a sliding window or a [`RecurrentState`]) for layers a model manages itself;
//! - [`Budget`]: how many slots a policy may keep;
//! - [`CacheStats`]: bytes and slots measured from the tensors held;
//! - [`ObserveRequest`] / [`Observation`]: what an attention call hands a policy, and
//!   [`KeyRotation`]: how a policy re-rotates cached keys, so policies and attention kinds
//!   depend on this crate and not on each other;
//! - [`KvError`]: the error type of the whole workspace;
//! - [`readback`]: every read of a tensor back to the host, counted.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::prelude::*;
//! use kv_core::{CacheShape, LayerCache};
//!
//! let device = Default::default();
//! let mut cache = LayerCache::<Flex>::new(CacheShape { batch: 1, kv_heads: 2, key_dim: 4, value_dim: 4 }, &device);
//! cache.append(Tensor::zeros([1, 2, 6, 4], &device), Tensor::ones([1, 2, 6, 4], &device)).unwrap();
//! // Keep slots 0, 4 and 5 of both heads: keys, values, positions and side data move together.
//! let keep = Tensor::<Flex, 1, Int>::from_ints([0, 4, 5], &device).reshape([1, 1, 3]).expand([1, 2, 3]);
//! cache.retain(keep).unwrap();
//! assert_eq!((cache.slots(), cache.tokens_seen()), (3, 6));
//! let positions: Vec<i64> = cache.positions().into_data().iter::<i64>().collect();
//! assert_eq!(positions, vec![0, 4, 5, 0, 4, 5]);
//! // 2 (K and V) x 2 heads x 3 slots x 4 dims x 4 bytes, measured from the tensors held.
//! assert_eq!(cache.stats().kv_bytes, 2 * 2 * 3 * 4 * 4);
//! ```

// Tests read what they assert; the library reads through kv_core::readback (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

mod budget;
mod error;
mod layer;
mod model;
mod observe;
pub mod readback;
mod slots;
mod state;
mod stats;
#[cfg(any(test, feature = "testing"))]
mod testing;

pub use budget::Budget;
pub use error::{KvError, Result};
pub use layer::{CacheShape, DEAD, HeadWrite, LayerCache};
pub use model::ModelCache;
pub use observe::{KeyRotation, Observation, ObserveRequest};
pub use slots::TAIL_SLOTS;
pub use state::{KvState, LocalState, OpenSlots, RecurrentState};
pub use stats::{CacheStats, LayerStats};

#[cfg(test)]
mod tests;
