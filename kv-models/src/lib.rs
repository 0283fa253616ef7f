//! Trainable transformers built from kv-attention, with cached generation and sampling.
//!
//! - [`DecoderConfig`] / [`DecoderLm`]: embedding, a decoder [`Stack`] and output head; the
//!   stack is a [`Llama`] (RMSNorm, RoPE, SwiGLU blocks whose [`SelfAttention`] is MHA, GQA or
//!   MQA by `n_kv_heads`, or MLA (DeepSeek-V2) by `mla`) or a [`Yoco`] decoder-decoder (a
//!   constant-state self-decoder, one global cache) by `yoco`; [`ModelState`] is what a model
//!   keeps between inference calls;
//! - [`to_grouped`] / [`to_latent`]: MHA to GQA/MQA (mean-pooling) or MLA (truncated SVD);
//! - [`generate`]: prefill + decode with any [`kv_policies::CachePolicy`];
//! - [`Sampler`]: greedy, temperature, top-k, top-p, seeded;
//! - [`save_model`] / [`load_model`]: checkpoints written atomically;
//! - [`data`]: the embedded story corpus, user text files and the long-context tasks;
//! - [`train`]: training from scratch with exact resume;
//! - [`load`]: pretrained Llama-family models from GGUF files or Hugging Face folders, with
//!   their tokenizers and chat templates ([`Pretrained`]).
//!
//! ```
//! use burn::backend::Flex;
//! use kv_models::{DecoderConfig, GenerateConfig, generate};
//! use kv_policies::{PolicyEnv, Registry};
//!
//! let device = Default::default();
//! // vocab 64, d_model 32, 2 layers, 4 query heads over 2 KV heads, SwiGLU width 48.
//! let model = DecoderConfig::new(64, 32, 2, 4, 2, 48).init::<Flex>(&device).unwrap();
//! let mut policy = Registry::<Flex>::standard().build("streaming:budget=16,sinks=4", &PolicyEnv::default()).unwrap();
//! let config = GenerateConfig { max_new_tokens: 40, ..Default::default() };
//! let out = generate(&model, &[1, 2, 3, 4, 5, 6, 7, 8], &config, policy.as_mut(), |_| {}).unwrap();
//! assert_eq!(out.tokens.len(), 40);
//! // The last token is never fed back: 47 tokens seen, 16 slots per head held.
//! assert_eq!(out.cache.tokens_seen, 47);
//! assert_eq!(out.cache.layers[0].slots_per_head, vec![16, 16]);
//! ```
//!
//! `examples/generate_with_policy.rs` loads a checkpoint and generates under any policy spec.

// Tests read what they assert; the library reads through kv_core::readback (clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod data;
pub mod eval;
pub mod load;
pub mod model;
pub mod text;
pub mod train;

// The flat names below are the crate's public API (what `kv_models::DecoderConfig` names); inside
// the crate, code imports by room path (`crate::model::config::DecoderConfig`).
pub use eval::fanout::SharedPrefill;
pub use eval::scores::{
    PolicyLoss, TaskResult, answer, policy_loss, task_accuracy, task_accuracy_with,
    validation_loss, validation_loss_from,
};
pub use kv_attention::materialize;
pub use load::{Pretrained, PretrainedFormat, PretrainedModel, assets_dir, resolve_model};
pub use model::attention::SelfAttention;
pub use model::block::Block;
pub use model::config::{DecoderConfig, DmcSettings, MlaSettings, SelfAttentionKind, YocoSettings};
pub use model::decoder::{DecoderLm, Stack};
pub use model::ffn::FeedForward;
pub use model::generate::{GenerateConfig, Generation, continue_generation, generate, last_row};
pub use model::llama::{DecoderBlock, Llama};
pub use model::ordinal::ordinal_ids;
pub use model::sampling::{Sampler, SamplerConfig, argmax};
pub use model::state::ModelState;
pub use model::yoco::{CrossDecoderBlock, SelfDecoderAttention, SelfDecoderBlock, Yoco};
pub use text::tokenizer::{
    ByteTokenizer, ChatMessage, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TextConfig, Tokenizer,
};
pub use train::checkpoint::{
    CHECKPOINT_FILE, CONFIG_FILE, check_replaceable, load_model, load_model_expecting, save_model,
    write_atomic,
};
pub use train::convert::{LatentConversion, to_dmc, to_grouped, to_latent, to_partial_rope};
pub use train::presets::{Preset, preset, preset_names};

#[cfg(test)]
mod tests;
