//! Saving and loading a model with its config, written atomically.

use crate::{DecoderConfig, DecoderLm};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use kv_core::{KvError, Result};
use std::path::Path;

/// File name of the config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.mpk";

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash or a full disk
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| KvError::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        KvError::io(path, e)
    })
}

/// Saves `model` and `config` into directory `dir` (created if needed).
pub fn save_model<B: Backend>(model: &DecoderLm<B>, config: &DecoderConfig, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let bytes = NamedMpkBytesRecorder::<FullPrecisionSettings>::new()
        .record(model.clone().into_record(), ())
        .map_err(|e| KvError::io(dir.join(MODEL_FILE), e))?;
    write_atomic(&dir.join(MODEL_FILE), &bytes)?;
    let json = serde_json::to_string_pretty(config).map_err(|e| KvError::io(dir.join(CONFIG_FILE), e))?;
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}

/// Loads a model and its config from directory `dir`.
pub fn load_model<B: Backend>(dir: impl AsRef<Path>, device: &B::Device) -> Result<(DecoderLm<B>, DecoderConfig)> {
    let dir = dir.as_ref();
    let config = DecoderConfig::from_file(dir.join(CONFIG_FILE))?;
    let path = dir.join(MODEL_FILE);
    let bytes = std::fs::read(&path).map_err(|e| KvError::io(&path, e))?;
    let record = NamedMpkBytesRecorder::<FullPrecisionSettings>::new()
        .load(bytes, device)
        .map_err(|e| KvError::io(&path, format!("not a checkpoint of this model (truncated or from another config): {e}")))?;
    let model = config.init::<B>(device)?.load_record(record);
    Ok((model, config))
}
