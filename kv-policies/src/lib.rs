//! Training-free decisions over kv-core caches, one file per method.
//!
//! Every policy implements [`CachePolicy`]: the model asks it what to observe before a layer's
//! attention and hands it the layer cache afterwards ([`drive_layer`] does both around any
//! attention). Scoring methods implement only [`Scorer`] (observe, score); the one
//! [`TopKPolicy`] owns the budget, the schedule, per-layer budgets (PyramidKV), the selection
//! rule (per-head top-k or AdaKV's layer-wide one) and key re-rotation, for every scorer. The
//! [`Registry`] names them all: [`build_policy`] makes any of them from a spec string such as
//! `snapkv:budget=0.5,window=32,kernel=7,pool=max`, and code outside this crate registers its own.
//!
//! ```
//! use burn::backend::Flex;
//! use kv_policies::{PolicyEnv, Registry};
//!
//! let registry = Registry::<Flex>::standard();
//! let policy = registry.build("snapkv:budget=0.5,window=32", &PolicyEnv::default()).unwrap();
//! assert_eq!(policy.name(), "snapkv(budget=0.5,window=32,kernel=7,pool=max)");
//! // Bad parameters are errors that say what would be valid.
//! let error = registry.build("snapkv:kernel=4", &PolicyEnv::default()).err().unwrap();
//! assert!(error.to_string().contains("an odd width"));
//! ```
//!
//! `examples/own_attention.rs` drives SnapKV and H2O from an attention layer written in plain
//! burn, through [`drive_layer`].
//!
//! | policy | file | scores |
//! |---|---|---|
//! | `full` | `policy.rs` | keeps everything (the reference) |
//! | `streaming` | `streaming.rs` | position: sinks + recent window (`rerotate=true`: `rerotate.rs`) |
//! | `h2o` | `h2o.rs` | accumulated attention + recent window |
//! | `vatp` | `vatp.rs` | accumulated attention x value L1 norm, sinks kept |
//! | `knorm` | `knorm.rs` | lowest key L2 norm |
//! | `snapkv` | `snapkv.rs` | observation-window attention, pooled |
//! | `tova` | `tova.rs` | the latest query's attention, averaged over the layer's heads |
//! | `pyramidkv` | `pyramid.rs` | SnapKV with per-layer budgets shrinking with depth |
//! | `adakv` | `adakv.rs` | any scorer, one top-k across a layer's heads (unequal per-head budgets) |
//! | `fastgen` | `fastgen.rs` | per head, the cheapest of five token-class policies that recovers `T` of its attention |

// Tests read what they assert; the library reads through kv_core::readback (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

mod adakv;
mod driver;
mod fastgen;
mod h2o;
mod knorm;
mod policy;
mod pyramid;
mod registry;
mod rerotate;
mod scorer;
pub mod select;
mod snapkv;
mod spec;
mod streaming;
mod top_k;
mod tova;
mod vatp;

pub use adakv::AcrossHeads;
pub use driver::drive_layer;
pub use fastgen::{
    FASTGEN_ACC, FastGenPolicy, HeadPolicy, HeadProfile, TokenClasses, admit, fastgen_records,
    is_punctuation_text, profile_head,
};
pub use h2o::{ACC_CHANNEL, H2oScorer};
pub use knorm::KnormScorer;
pub use policy::{CachePolicy, FullCache, LayerContext, Phase, Schedule};
pub use pyramid::PyramidBudgets;
pub use registry::{EntryKind, PolicyBuilder, PolicyEntry, Registry, ScorerBuilder, TOP_K_KEYS};
pub use rerotate::{evict_after_sinks, frame_offset, rerotate_kept, restore_in_cache_positions};
pub use scorer::Scorer;
pub use snapkv::{Pool, SnapKvScorer, pool1d};
pub use spec::{
    Params, PolicyEnv, PolicySpec, SpecParams, build_policy, build_policy_in, split_specs,
};
pub use streaming::StreamingScorer;
pub use top_k::{LayerBudget, Selection, TopKPolicy};
pub use tova::TovaScorer;
pub use vatp::VatpScorer;

#[cfg(test)]
mod fastgen_tests;
#[cfg(test)]
mod tests;
