//! `kv generate`: stream tokens from a model with a cache.

use crate::backend::BackendJob;
use crate::model_source::ModelArgs;
use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, Result};
use kv_models::{ChatMessage, GenerateConfig, SamplerConfig, Tokenizer, generate};
use std::io::Write;
use std::path::PathBuf;

/// Flags of `kv generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt, as plain text.
    #[arg(long, default_value = "Once upon a time", conflicts_with_all = ["chat", "prompt_file"])]
    pub prompt: String,
    /// The prompt, read from a UTF-8 file.
    #[arg(long, conflicts_with = "chat")]
    pub prompt_file: Option<PathBuf>,
    /// A user message, wrapped in the model's chat template (pretrained models); the answer
    /// streams until the model ends its turn.
    #[arg(long)]
    pub chat: Option<String>,
    /// A system message for `--chat` (default: the template's own, if it has one).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy. Unset, each sampling setting comes from the model's
    /// generation_config.json, else llama.cpp's defaults (0.8, top-k 40, top-p 0.95, min-p 0.05).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus probability (1 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than this share of the most likely one (0 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cache policy spec, e.g. `streaming:budget=256,sinks=4` or `snapkv:budget=0.5,window=32`.
    #[arg(long, default_value = "full")]
    pub policy: String,
}

impl GenerateArgs {
    /// The sampler: each flag given, over the model's own settings.
    fn sampler(&self) -> Result<SamplerConfig> {
        let mut s = self.model.sampling(self.seed)?;
        s.temperature = self.temperature.unwrap_or(s.temperature);
        s.top_k = self.top_k.unwrap_or(s.top_k);
        s.top_p = self.top_p.unwrap_or(s.top_p);
        s.min_p = self.min_p.unwrap_or(s.min_p);
        s.validate()?;
        Ok(s)
    }

    /// The prompt's ids, and the text to echo before the answer (none for a chat).
    fn prompt(
        &self,
        tokenizer: &Tokenizer,
        config: &kv_models::DecoderConfig,
    ) -> Result<(Vec<u32>, String)> {
        if let Some(user) = &self.chat {
            let mut messages = Vec::new();
            if let Some(system) = &self.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", user));
            let text = tokenizer.render_chat(&messages, true)?;
            return Ok((tokenizer.encode(&text)?, String::new()));
        }
        let text = match &self.prompt_file {
            Some(path) => self.model.read_prompt_file(config, path)?,
            None => self.prompt.clone(),
        };
        if text.is_empty() {
            return Err(KvError::config(
                "prompt",
                "\"\" (empty)",
                "some text: --prompt TEXT, --prompt-file FILE or --chat MESSAGE",
            ));
        }
        Ok((tokenizer.encode_prompt(&text)?, text))
    }
}

/// Prints generated text as it grows, holding back an incomplete UTF-8 character and any stop
/// token.
pub(crate) struct Stream<'a> {
    tokenizer: &'a Tokenizer,
    stops: Vec<u32>,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> Stream<'a> {
    /// A stream that stops printing at `tokenizer`'s stop tokens.
    pub(crate) fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            stops: tokenizer.stop_tokens(),
            ids: vec![],
            printed: 0,
        }
    }

    /// Prints what `token` adds to the text.
    pub(crate) fn push(&mut self, token: u32, out: &mut impl Write) {
        if self.stops.contains(&token) {
            return;
        }
        if self.tokenizer.is_bytes() {
            // Raw bytes reassemble multi-byte characters in the terminal.
            let _ = out.write_all(&[token as u8]);
        } else {
            self.ids.push(token);
            let text = self.tokenizer.decode(&self.ids).unwrap_or_default();
            if text.ends_with('\u{FFFD}') {
                return;
            }
            if let Some(new) = text.get(self.printed..) {
                let _ = out.write_all(new.as_bytes());
                self.printed = text.len();
            }
        }
        let _ = out.flush();
    }
}

impl BackendJob for GenerateArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        crate::backend::policies::<B>().parse(&self.policy)?;
        let sampler = self.sampler()?;
        let loaded = self.model.load::<B>("tiny-mha", &device)?;
        let tokenizer = &loaded.tokenizer;
        let mut policy =
            crate::backend::policies::<B>().build(&self.policy, &tokenizer.policy_env())?;
        let (prompt, echo) = self.prompt(tokenizer, &loaded.config)?;
        self.model
            .check_context(&loaded.config, "prompt", prompt.len())?;
        let gen_config = GenerateConfig {
            max_new_tokens: self.max_tokens,
            sampler,
            stop_tokens: tokenizer.stop_tokens(),
            vocab_limit: Some(tokenizer.vocab_size()),
            allow_beyond_context: self.model.allow_beyond_context,
        };
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(echo.as_bytes());
        let _ = out.flush();
        let mut stream = Stream::new(tokenizer);
        let result = generate(&loaded.model, &prompt, &gen_config, policy.as_mut(), |t| {
            stream.push(t, &mut out)
        })?;
        let _ = writeln!(out);
        let n = result.tokens.len();
        let full = if result.context_full {
            format!(
                " | stopped at the model's max_positions = {} (--allow-beyond-context goes on)",
                loaded.config.max_positions
            )
        } else {
            String::new()
        };
        eprintln!(
            "{n} tokens{full} | {} | {} | prefill {:.1} ms ({} tokens) | decode {:.1} tok/s | cache {} slots/head in layer 0, {:.0} KiB measured ({} B/token; {} by the config's formula)",
            policy.name(),
            sampler.describe(),
            result.prefill_time.as_secs_f64() * 1e3,
            prompt.len(),
            n.saturating_sub(1) as f64 / result.decode_time.as_secs_f64().max(1e-9),
            result.cache.layers[0].slots_per_head[0],
            result.cache.kv_bytes as f64 / 1024.0,
            result.cache.kv_bytes_per_token() as usize,
            loaded.config.kv_bytes_per_token(),
        );
        Ok(())
    }
}
