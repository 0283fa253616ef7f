//! Where a command's model comes from: a preset, a config file or a saved checkpoint.

use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, Result};
use kv_models::{DecoderConfig, DecoderLm, load_model, preset};
use std::path::PathBuf;

/// Model selection flags shared by commands.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A built-in preset, randomly initialised (tiny-mha, tiny-gqa, tiny-mqa).
    #[arg(long, default_value = "tiny-mha", conflicts_with_all = ["config", "checkpoint"])]
    pub preset: String,
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
    /// The config the flags name, without building the model.
    pub fn config(&self) -> Result<DecoderConfig> {
        match (&self.checkpoint, &self.config) {
            (Some(dir), _) => DecoderConfig::from_file(dir.join(kv_models::CONFIG_FILE)),
            (None, Some(path)) => DecoderConfig::from_file(path),
            (None, None) => preset(&self.preset),
        }
    }

    /// Builds (or loads) the model on `device`.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<(DecoderLm<B>, DecoderConfig)> {
        if let Some(dir) = &self.checkpoint {
            if !dir.is_dir() {
                return Err(KvError::io(dir, "no such checkpoint directory"));
            }
            return load_model(dir, device);
        }
        let config = self.config()?;
        B::seed(device, self.init_seed);
        Ok((config.init(device)?, config))
    }
}
