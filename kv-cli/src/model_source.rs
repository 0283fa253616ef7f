//! Where a command's model comes from: a preset, a config file, a saved checkpoint, or a
//! pretrained model (a GGUF file or a Hugging Face folder).

use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, Result};
use kv_models::{
    DecoderConfig, DecoderLm, Preset, Pretrained, Tokenizer, load_model, preset, resolve_model,
};
use std::path::{Path, PathBuf};

/// Model selection flags shared by commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A built-in preset, randomly initialised (tiny-mha, tiny-gqa, tiny-mqa, tiny-mla, tiny-yoco,
    /// tiny-yoco-retention, quick-mha, quick-gqa, decode-bench; an unknown name lists them all).
    #[arg(long, conflicts_with_all = ["config", "checkpoint", "model"])]
    pub preset: Option<String>,
    /// A decoder config JSON file, randomly initialised.
    #[arg(long, conflicts_with_all = ["checkpoint", "model"])]
    pub config: Option<PathBuf>,
    /// A saved checkpoint directory (checkpoint.kvc + config.json).
    #[arg(long, conflicts_with = "model")]
    pub checkpoint: Option<PathBuf>,
    /// A pretrained model: a `.gguf` file, a Hugging Face folder (config.json, safetensors,
    /// tokenizer.json), or `smollm2` (fetched by scripts/fetch-assets.sh).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub init_seed: u64,
    /// Run a quantised GGUF model's decode steps on its de-quantised f32 weights too. By
    /// default a CPU backend also keeps the checkpoint's own codes and multiplies decode steps by
    /// them (`kv_attention::PackedMatrix`), reading about a fifth of the bytes for Q4_1.
    #[arg(long)]
    pub f32_weights: bool,
    /// Let positions run past the model's max_positions (length-extrapolation studies). Without
    /// it a prompt or context longer than the model's context is refused and generation stops
    /// at its end.
    #[arg(long)]
    pub allow_beyond_context: bool,
}

/// Bytes a token covers at most, for refusing a prompt file too long for any context before
/// it is read and tokenised (English averages about 4; long runs of one character more).
pub const MAX_PROMPT_BYTES_PER_TOKEN: u64 = 64;

/// A model ready to run, with its tokenizer.
pub struct LoadedModel<B: Backend> {
    /// The model.
    pub model: DecoderLm<B>,
    /// Its config.
    pub config: DecoderConfig,
    /// How it reads and writes text.
    pub tokenizer: Tokenizer,
}

/// The pretrained model a `--model` value names.
pub fn pretrained(path: &Path) -> Result<Pretrained> {
    Pretrained::open(resolve_model(path)?)
}

impl ModelArgs {
    /// The config the flags name (`default_preset` when they name none), without building it.
    pub fn config(&self, default_preset: &str) -> Result<DecoderConfig> {
        match (&self.model, &self.checkpoint, &self.config) {
            (Some(path), _, _) => pretrained(path)?.config(),
            (None, Some(dir), _) => DecoderConfig::from_file(dir.join(kv_models::CONFIG_FILE)),
            (None, None, Some(path)) => config_file(path),
            (None, None, None) => {
                Ok(preset(self.preset.as_deref().unwrap_or(default_preset))?.model)
            }
        }
    }

    /// Refuses `tokens` positions (`what` names them) beyond `config`'s `max_positions`, unless
    /// `--allow-beyond-context`.
    pub fn check_context(&self, config: &DecoderConfig, what: &str, tokens: usize) -> Result<()> {
        if tokens > config.max_positions && !self.allow_beyond_context {
            return Err(KvError::config(
                what,
                format!("{tokens} tokens"),
                format!(
                    "at most the model's max_positions = {} (the context it was trained for; --allow-beyond-context goes past it)",
                    config.max_positions
                ),
            ));
        }
        Ok(())
    }

    /// Reads a UTF-8 prompt file, refusing one too long for the model's context before reading
    /// it ([`MAX_PROMPT_BYTES_PER_TOKEN`]) and a path that is not a regular file.
    pub fn read_prompt_file(&self, config: &DecoderConfig, path: &Path) -> Result<String> {
        let meta = std::fs::metadata(path).map_err(|e| KvError::io(path, e))?;
        if !meta.is_file() {
            return Err(KvError::io(
                path,
                "not a regular file (a device, folder, socket or pipe); a prompt file is UTF-8 text",
            ));
        }
        let most = config.max_positions as u64 * MAX_PROMPT_BYTES_PER_TOKEN;
        if meta.len() > most && !self.allow_beyond_context {
            return Err(KvError::io(
                path,
                format!(
                    "{} bytes, more than any prompt within the model's max_positions = {} could hold (at most {most} bytes at {MAX_PROMPT_BYTES_PER_TOKEN} a token); --allow-beyond-context reads it anyway",
                    meta.len(),
                    config.max_positions
                ),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| KvError::io(path, e))?;
        String::from_utf8(bytes).map_err(|e| {
            KvError::io(
                path,
                format!(
                    "not UTF-8 text (first bad byte at {})",
                    e.utf8_error().valid_up_to()
                ),
            )
        })
    }

    /// How to sample the model the flags name: a pretrained model's own settings
    /// ([`Pretrained::sampling`]), else llama.cpp's defaults.
    pub fn sampling(&self, seed: u64) -> Result<kv_models::SamplerConfig> {
        match &self.model {
            Some(path) => pretrained(path)?.sampling(seed),
            None => Ok(kv_models::SamplerConfig::llama_cpp_defaults(seed)),
        }
    }

    /// Whether the flags name trained weights (a checkpoint or a pretrained model).
    pub fn has_weights(&self) -> bool {
        self.checkpoint.is_some() || self.model.is_some()
    }

    /// A label for results: the preset, config, checkpoint or model file name.
    pub fn label(&self, default_preset: &str) -> String {
        let stem = |p: &Path| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match (&self.model, &self.checkpoint, &self.config, &self.preset) {
            (Some(path), ..) => pretrained(path)
                .map(|p| p.label())
                .unwrap_or_else(|_| stem(path)),
            (None, Some(dir), ..) => crate::eval::label(dir),
            (None, None, Some(path), _) => stem(path),
            (None, None, None, Some(p)) => p.clone(),
            (None, None, None, None) => default_preset.into(),
        }
    }

    /// Builds (or loads) the model on `device`, with its tokenizer.
    pub fn load<B: Backend>(
        &self,
        default_preset: &str,
        device: &B::Device,
    ) -> Result<LoadedModel<B>> {
        if let Some(path) = &self.model {
            let mut p = pretrained(path)?.load::<B>(device)?;
            if self.f32_weights {
                p.model.clear_packed();
            }
            return Ok(LoadedModel {
                model: p.model,
                config: p.config,
                tokenizer: p.tokenizer,
            });
        }
        if let Some(dir) = &self.checkpoint {
            if !dir.is_dir() {
                return Err(KvError::io(dir, "no such checkpoint directory"));
            }
            let (model, config) = load_model(dir, device)?;
            return Ok(LoadedModel {
                model,
                config,
                tokenizer: Tokenizer::for_run(dir)?,
            });
        }
        let config = self.config(default_preset)?;
        B::seed(device, self.init_seed);
        Ok(LoadedModel {
            model: config.init(device)?,
            config,
            tokenizer: Tokenizer::Bytes,
        })
    }
}

/// A model config from a file holding either a preset (`{"model": .., "train": ..}`) or a bare
/// decoder config.
pub fn config_file(path: &std::path::Path) -> Result<DecoderConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
    if text.contains("\"model\"") {
        Ok(Preset::from_json(&text, &path.display().to_string())?.model)
    } else {
        DecoderConfig::from_json(&text).map_err(|e| match e {
            KvError::Io { message, .. } => KvError::io(path, message),
            other => other,
        })
    }
}
