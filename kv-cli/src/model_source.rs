//! Where a command's model comes from: a preset, a config file or a saved checkpoint.

use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, Result};
use kv_models::{DecoderConfig, DecoderLm, Preset, Tokenizer, load_model, preset};
use std::path::PathBuf;

/// Model selection flags shared by commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A built-in preset, randomly initialised (tiny-mha, tiny-gqa, tiny-mqa, decode-bench).
    #[arg(long, conflicts_with_all = ["config", "checkpoint"])]
    pub preset: Option<String>,
    /// A decoder config JSON file, randomly initialised.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A saved checkpoint directory (config.json + model.mpk).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub init_seed: u64,
}

impl ModelArgs {
    /// The config the flags name (`default_preset` when they name none), without building it.
    pub fn config(&self, default_preset: &str) -> Result<DecoderConfig> {
        match (&self.checkpoint, &self.config) {
            (Some(dir), _) => DecoderConfig::from_file(dir.join(kv_models::CONFIG_FILE)),
            (None, Some(path)) => config_file(path),
            (None, None) => Ok(preset(self.preset.as_deref().unwrap_or(default_preset))?.model),
        }
    }

    /// The tokenizer of the model: a checkpoint's own `tokenizer.json`, bytes otherwise.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        self.checkpoint.as_ref().map_or(Ok(Tokenizer::Bytes), |dir| Tokenizer::for_run(dir))
    }

    /// Builds (or loads) the model on `device`.
    pub fn load<B: Backend>(&self, default_preset: &str, device: &B::Device) -> Result<(DecoderLm<B>, DecoderConfig)> {
        if let Some(dir) = &self.checkpoint {
            if !dir.is_dir() {
                return Err(KvError::io(dir, "no such checkpoint directory"));
            }
            return load_model(dir, device);
        }
        let config = self.config(default_preset)?;
        B::seed(device, self.init_seed);
        Ok((config.init(device)?, config))
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
