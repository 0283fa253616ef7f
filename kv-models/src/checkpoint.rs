//! Checkpoints: one self-checking file per checkpoint, written atomically.
//!
//! `DIR/checkpoint.kvc` holds the model config, the training state (step and training config),
//! the weights and the optimiser state, each length-prefixed, followed by a checksum of everything
//! before it, so a truncated or corrupted file is recognised as such before any tensor is built.
//! `DIR/config.json` is a copy of the model config for people to read.

use crate::{DecoderConfig, DecoderLm};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use kv_core::{KvError, Result};
use std::path::{Path, PathBuf};

/// File name of the checkpoint inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.kvc";
/// File name of the human-readable model config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
const MAGIC: &[u8; 8] = b"KVCKPT01";

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash or a full disk
/// leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
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

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The raw sections of a checkpoint file.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sections {
    pub config: Vec<u8>,
    pub train: Vec<u8>,
    pub model: Vec<u8>,
    pub optim: Vec<u8>,
}

impl Sections {
    fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for s in [&self.config, &self.train, &self.model, &self.optim] {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s);
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |what: &str| KvError::io(path, format!("not a usable checkpoint: {what}"));
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("wrong file type (no KVCKPT01 header)"));
        }
        let truncated = || bad(&format!("truncated ({} bytes; the write that made it did not finish)", bytes.len()));
        let mut at = MAGIC.len();
        let mut sections = Vec::with_capacity(4);
        for _ in 0..4 {
            let len_bytes = bytes.get(at..at + 8).ok_or_else(truncated)?;
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            at += 8;
            let body = bytes.get(at..at.checked_add(len).ok_or_else(truncated)?).ok_or_else(truncated)?;
            sections.push(body.to_vec());
            at += len;
        }
        let sum = bytes.get(at..at + 8).ok_or_else(truncated)?;
        if u64::from_le_bytes(sum.try_into().unwrap()) != fnv1a(&bytes[..at]) {
            return Err(bad("checksum mismatch (the file is corrupted)"));
        }
        if bytes.len() != at + 8 {
            return Err(bad("trailing bytes after the checksum"));
        }
        let optim = sections.pop().unwrap();
        let model = sections.pop().unwrap();
        let train = sections.pop().unwrap();
        let config = sections.pop().unwrap();
        Ok(Self { config, train, model, optim })
    }

    /// Writes the sections into `dir` atomically, plus the readable config copy.
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(CHECKPOINT_FILE), &self.encode())?;
        write_atomic(&dir.join(CONFIG_FILE), &self.config)
    }

    /// Reads and verifies the sections of the checkpoint in `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = checkpoint_path(dir)?;
        let bytes = std::fs::read(&path).map_err(|e| KvError::io(&path, e))?;
        Self::decode(&bytes, &path)
    }

    /// The model config stored in the checkpoint.
    pub fn model_config(&self, dir: &Path) -> Result<DecoderConfig> {
        let text = std::str::from_utf8(&self.config).map_err(|e| KvError::io(dir.join(CHECKPOINT_FILE), e))?;
        DecoderConfig::from_json(text)
    }
}

fn checkpoint_path(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(KvError::io(dir, "no such checkpoint directory"));
    }
    let path = dir.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return Err(KvError::io(dir, format!("not a checkpoint directory (no {CHECKPOINT_FILE})")));
    }
    Ok(path)
}

/// Serialises any burn record to bytes.
pub(crate) fn record_bytes<B: Backend, R: burn::record::Record<B>>(record: R, what: &Path) -> Result<Vec<u8>> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::new().record(record, ()).map_err(|e| KvError::io(what, e))
}

/// Deserialises a burn record from bytes.
pub(crate) fn record_from<B: Backend, R: burn::record::Record<B>>(bytes: Vec<u8>, device: &B::Device, what: &Path) -> Result<R> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::new()
        .load(bytes, device)
        .map_err(|e| KvError::io(what, format!("record does not fit this model: {e}")))
}

/// Saves `model` and `config` (no training state) into directory `dir`.
pub fn save_model<B: Backend>(model: &DecoderLm<B>, config: &DecoderConfig, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    let sections = Sections {
        config: serde_json::to_vec_pretty(config).map_err(|e| KvError::io(dir, e))?,
        model: record_bytes::<B, _>(model.clone().into_record(), dir)?,
        ..Default::default()
    };
    sections.write(dir)
}

/// Loads a model and its config from checkpoint directory `dir`.
pub fn load_model<B: Backend>(dir: impl AsRef<Path>, device: &B::Device) -> Result<(DecoderLm<B>, DecoderConfig)> {
    let dir = dir.as_ref();
    let sections = Sections::read(dir)?;
    let config = sections.model_config(dir)?;
    let record = record_from::<B, _>(sections.model, device, &dir.join(CHECKPOINT_FILE))?;
    let model = config.init::<B>(device)?.load_record(record);
    model.check_blocks()?;
    Ok((model, config))
}

/// Loads a model that must have the given config; a different one is an error naming the fields.
pub fn load_model_expecting<B: Backend>(dir: impl AsRef<Path>, expected: &DecoderConfig, device: &B::Device) -> Result<DecoderLm<B>> {
    let dir = dir.as_ref();
    let (model, config) = load_model::<B>(dir, device)?;
    let diff = config.differences(expected);
    if !diff.is_empty() {
        return Err(KvError::config(
            format!("checkpoint {}", dir.display()),
            format!("a model with {}", diff.join(", ")),
            "a checkpoint of the same model config (checkpoint value vs requested)",
        ));
    }
    Ok(model)
}
