//! Autoregressive generation with a cache and any cache policy.

use crate::model::decoder::DecoderLm;
use crate::model::sampling::{Sampler, SamplerConfig};
use crate::model::state::ModelState;
use burn::prelude::*;
use kv_core::readback::ReadBack;
use kv_core::{CacheStats, KvError, Result};
use kv_policies::{CachePolicy, Phase};
use std::time::{Duration, Instant};

/// Slots reserved up front for generated tokens at most; past this a cache grows by doubling, so
/// a huge `max_new_tokens` under a bounded policy never reserves memory it will not use.
const RESERVE_NEW_TOKENS: usize = 1024;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerateConfig {
    /// Tokens to generate after the prompt.
    pub max_new_tokens: usize,
    /// How each token is chosen.
    pub sampler: SamplerConfig,
    /// Stop early after producing any of these tokens (EOS, end of turn); it is kept in the output.
    pub stop_tokens: Vec<u32>,
    /// Sample only ids below this (the tokenizer's size, where the model's output layer is wider
    /// and the ids beyond it have no text); `None` samples the whole vocabulary.
    pub vocab_limit: Option<usize>,
    /// Go on past the model's `max_positions` (length-extrapolation studies); by default
    /// generation stops when the next token's RoPE position would pass them.
    pub allow_beyond_context: bool,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    /// The cache at the end, measured from the tensors held.
    pub cache: CacheStats,
    /// Wall time of the prompt's forward pass, first token's logits included.
    pub prefill_time: Duration,
    /// Wall time of the decode steps.
    pub decode_time: Duration,
    /// Whether generation stopped because the next position would pass the model's
    /// `max_positions` (never with `allow_beyond_context`).
    pub context_full: bool,
}

/// The last position's logits of `[b, t, vocab]` (batch row 0), read to the host.
pub fn last_row<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    // The one host sync per token: the sampler needs the numbers.
    logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .read_back()
        .iter::<f32>()
        .collect()
}

/// Generates up to `config.max_new_tokens` after `prompt` (batch 1) under `policy`, calling
/// `on_token` with each token as soon as it is chosen.
pub fn generate<B: Backend>(
    model: &DecoderLm<B>,
    prompt: &[u32],
    config: &GenerateConfig,
    policy: &mut dyn CachePolicy<B>,
    on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(KvError::config("prompt", "\"\"", "at least one token"));
    }
    let vocab = model.vocab_size();
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(KvError::config(
            "prompt token",
            bad,
            format!("an id below the vocabulary size {vocab}"),
        ));
    }
    Sampler::new(config.sampler)?;
    if prompt.len() > model.max_positions && !config.allow_beyond_context {
        return Err(KvError::config(
            "prompt",
            format!("{} tokens", prompt.len()),
            format!(
                "at most the model's max_positions = {} (the context it was trained for; allow_beyond_context goes past it)",
                model.max_positions
            ),
        ));
    }
    let device = model.embed.weight.device();
    let mut cache = model.new_state(1);
    cache.reserve(prompt.len() + config.max_new_tokens.min(RESERVE_NEW_TOKENS));
    let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    let start = Instant::now();
    let input = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([1, prompt.len()]);
    let logits =
        last_row(model.forward_last_with_policy(input, &mut cache, policy, Phase::Prefill)?);
    let prefill_time = start.elapsed();
    let start = Instant::now();
    let tokens = continue_generation(model, &mut cache, logits, config, policy, 1, on_token)?;
    let context_full = tokens.len() < config.max_new_tokens
        && !tokens
            .last()
            .is_some_and(|t| config.stop_tokens.contains(t));
    Ok(Generation {
        tokens,
        cache: cache.stats(),
        prefill_time,
        decode_time: start.elapsed(),
        context_full,
    })
}

/// Generates after text already in `cache`, whose last position gave `logits`: up to
/// `config.max_new_tokens`, the first one chosen from `logits`, the rest fed back as decode steps
/// numbered from `first_step` (1 right after a prefill).
pub fn continue_generation<B: Backend>(
    model: &DecoderLm<B>,
    cache: &mut ModelState<B>,
    mut logits: Vec<f32>,
    config: &GenerateConfig,
    policy: &mut dyn CachePolicy<B>,
    first_step: usize,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut sampler = Sampler::new(config.sampler)?;
    let device = model.embed.weight.device();
    let mut tokens = Vec::with_capacity(config.max_new_tokens.min(RESERVE_NEW_TOKENS));
    for i in 0..config.max_new_tokens {
        let step = (first_step + i).saturating_sub(1);
        if let Some(at) = logits.iter().position(|x| !x.is_finite()) {
            return Err(KvError::config(
                "logits",
                format!("{} at id {at} (decode step {step})", logits[at]),
                "finite numbers; the weights or the input drive the model to NaN or inf",
            ));
        }
        let row = match config.vocab_limit {
            Some(n) if n > 0 && n < logits.len() => &logits[..n],
            _ => &logits[..],
        };
        let next = sampler.sample(row);
        tokens.push(next);
        on_token(next);
        if config.stop_tokens.contains(&next) || i + 1 == config.max_new_tokens {
            break;
        }
        if !config.allow_beyond_context && cache.next_position() >= model.max_positions {
            break;
        }
        let input = Tensor::<B, 1, Int>::from_ints([next as i32], &device).reshape([1, 1]);
        logits = last_row(model.forward_last_with_policy(
            input,
            cache,
            policy,
            Phase::Decode {
                step: first_step + i,
            },
        )?);
    }
    Ok(tokens)
}
