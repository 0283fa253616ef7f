//! `kv generate`: stream tokens from a model with a cache.

use crate::backend::BackendJob;
use crate::model_source::ModelArgs;
use burn::prelude::*;
use clap::Args;
use kv_core::Result;
use kv_models::{GenerateConfig, SamplerConfig, generate};
use kv_policies::build_policy;
use std::io::Write;

/// Flags of `kv generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt (byte-level tokens).
    #[arg(long, default_value = "Once upon a time")]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus probability (1 = off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cache policy spec, e.g. `streaming:budget=256,sinks=4` or `snapkv:budget=0.5,window=32`.
    #[arg(long, default_value = "full")]
    pub policy: String,
}

impl BackendJob for GenerateArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let mut policy = build_policy::<B>(&self.policy)?;
        let (model, config) = self.model.load::<B>("tiny-mha", &device)?;
        let tokenizer = self.model.tokenizer()?;
        let prompt = tokenizer.encode(&self.prompt)?;
        let gen_config = GenerateConfig {
            max_new_tokens: self.max_tokens,
            sampler: SamplerConfig { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed },
            stop_token: None,
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(self.prompt.as_bytes());
        let _ = out.flush();
        let result = generate(&model, &prompt, &gen_config, policy.as_mut(), |t| {
            // Byte tokens go out as raw bytes, so multi-byte characters reassemble in the terminal.
            let text = if tokenizer.is_bytes() { vec![t as u8] } else { tokenizer.decode(&[t]).unwrap_or_default().into_bytes() };
            let _ = out.write_all(&text);
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        let n = result.tokens.len();
        eprintln!(
            "{n} tokens | {} | prefill {:.1} ms ({} tokens) | decode {:.1} tok/s | cache {} slots/head in layer 0, {:.0} KiB measured ({} B/token; {} by the config's formula)",
            policy.name(),
            result.prefill_time.as_secs_f64() * 1e3,
            prompt.len(),
            n.saturating_sub(1) as f64 / result.decode_time.as_secs_f64().max(1e-9),
            result.cache.layers[0].slots_per_head[0],
            result.cache.kv_bytes as f64 / 1024.0,
            result.cache.kv_bytes_per_token() as usize,
            config.kv_bytes_per_token(),
        );
        Ok(())
    }
}
