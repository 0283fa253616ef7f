//! Making and changing models: training from scratch with exact resume (and DMC fine-tuning),
//! versioned checkpoints, the presets, and conversions of trained models (GQA/MQA, MLA, partial
//! RoPE, DMC retrofit).

pub mod checkpoint;
pub mod convert;
pub mod presets;
mod run;

pub use run::*;
