//! Training-free decisions over kv-core caches, one file per method.
//!
//! Every policy implements [`CachePolicy`]: the model asks it what to observe before a layer's
//! attention and hands it the layer cache afterwards. [`build_policy`] makes any of them from a
//! spec string such as `snapkv:budget=0.5,window=32,kernel=7,pool=max`.
//!
//! | policy | file | scores |
//! |---|---|---|
//! | `full` | `policy.rs` | keeps everything (the reference) |
//! | `streaming` | `streaming.rs` | position: sinks + recent window, optional re-rotation |
//! | `h2o` | `h2o.rs` | accumulated attention + recent window |
//! | `vatp` | `vatp.rs` | accumulated attention x value L1 norm, sinks kept |
//! | `knorm` | `knorm.rs` | lowest key L2 norm |
//! | `snapkv` | `snapkv.rs` | observation-window attention, pooled |
//! | `tova` | `tova.rs` | the latest query's attention, averaged over the layer's heads |
//! | `pyramidkv` | `pyramid.rs` | SnapKV with per-layer budgets shrinking with depth |
//! | `adakv` | `adakv.rs` | any scorer, one top-k across a layer's heads (unequal per-head budgets) |
//! | `fastgen` | `fastgen.rs` | per head, the cheapest of five token-class policies that recovers `T` of its attention |
//!
//! The scoring policies also implement [`Scorer`], so a selection rule other than their own
//! per-head top-k (AdaKV's) can use their scores.

mod adakv;
mod fastgen;
mod h2o;
mod knorm;
mod policy;
mod pyramid;
mod scorer;
pub mod select;
mod snapkv;
mod spec;
mod streaming;
mod tova;
mod vatp;

pub use adakv::{ADAKV_SCORERS, AdaKvPolicy};
pub use fastgen::{FASTGEN_ACC, FastGenPolicy, HeadPolicy, HeadProfile, TokenClasses, admit, is_punctuation_text, profile_head};
pub use h2o::{ACC_CHANNEL, H2oPolicy};
pub use scorer::Scorer;
pub use knorm::KnormPolicy;
pub use policy::{CachePolicy, FullCache, LayerContext, Phase, Schedule};
pub use snapkv::{Pool, SnapKvPolicy, pool1d};
pub use spec::{POLICY_NAMES, Params, PolicyEnv, PolicySpec, SELF_BUDGETED, build_policy, build_policy_in, build_scorer, split_specs};
pub use pyramid::PyramidKvPolicy;
pub use streaming::StreamingPolicy;
pub use tova::TovaPolicy;
pub use vatp::VatpPolicy;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod fastgen_tests;
