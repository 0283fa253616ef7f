//! Trainable transformers built from kv-attention, with cached generation and sampling.
//!
//! - [`DecoderConfig`] / [`DecoderLm`]: a Llama-style decoder (RMSNorm, RoPE, SwiGLU) whose
//!   attention is MHA, GQA or MQA by `n_kv_heads`;
//! - [`generate`]: prefill + decode with any [`kv_policies::CachePolicy`];
//! - [`Sampler`]: greedy, temperature, top-k, top-p, seeded;
//! - [`save_model`] / [`load_model`]: checkpoints written atomically.

mod checkpoint;
mod config;
mod decoder;
mod ffn;
mod generate;
mod materialize;
mod presets;
mod sampling;
mod tokenizer;

pub use checkpoint::{CONFIG_FILE, MODEL_FILE, load_model, save_model, write_atomic};
pub use config::DecoderConfig;
pub use decoder::{DecoderBlock, DecoderLm};
pub use ffn::FeedForward;
pub use generate::{GenerateConfig, Generation, generate};
pub use materialize::materialize;
pub use presets::{preset, preset_names};
pub use sampling::{Sampler, SamplerConfig, argmax};
pub use tokenizer::ByteTokenizer;

#[cfg(test)]
mod tests;
