//! Training-free decisions over kv-core caches, one file per method.
//!
//! Every policy implements [`CachePolicy`]: the model asks it what to observe before a layer's
//! attention and hands it the layer cache afterwards. [`FullCache`] is the reference that keeps
//! everything; the eviction methods (StreamingLLM, H2O, VATP, key-norm, SnapKV, ...) build on the
//! same interface.

mod policy;

pub use policy::{CachePolicy, FullCache, Phase, Schedule};
