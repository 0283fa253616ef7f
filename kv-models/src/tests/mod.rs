//! The model crate's tests, one module per subject; `support` holds the helpers they share.

mod backends;
mod checkpoints;
mod configs;
mod conversion;
mod decoder;
mod dmc;
mod fuzz;
mod golden;
mod kept;
mod mla;
mod policies;
mod registry;
mod support;
#[cfg(feature = "hf-tokenizer")]
mod tokenizer;
mod training;
mod yoco;
