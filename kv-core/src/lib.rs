//! Backend-generic KV cache tensors on burn: what a cache *is*, with no model or policy code.
//!
//! - [`LayerCache`]: keys, values, original positions and per-slot side data that move together;
//! - [`ModelCache`]: one layer cache per layer;
//! - [`Budget`]: how many slots a policy may keep;
//! - [`CacheStats`]: bytes and slots measured from the tensors held;
//! - [`ObserveRequest`] / [`Observation`]: what an attention call hands a policy, and
//!   [`KeyRotation`]: how a policy re-rotates cached keys, so policies and attention kinds
//!   depend on this crate and not on each other;
//! - [`KvError`]: the error type of the whole workspace.

mod budget;
mod error;
mod layer;
mod model;
mod observe;
mod slots;
mod stats;
mod testing;

pub use budget::Budget;
pub use error::{KvError, Result};
pub use layer::{CacheShape, LayerCache};
pub use model::ModelCache;
pub use observe::{KeyRotation, ObserveRequest, Observation};
pub use slots::TAIL_SLOTS;
pub use stats::{CacheStats, LayerStats};

#[cfg(test)]
mod tests;
