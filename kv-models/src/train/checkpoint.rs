//! Checkpoints: one self-checking file per checkpoint, written atomically.
//!
//! `DIR/checkpoint.kvc` holds the model config, the training state (step and training config),
//! the weights and the optimiser state, each length-prefixed, followed by a checksum of everything
//! before it, so a truncated or corrupted file is recognised as such before any tensor is built.
//! `DIR/config.json` is a copy of the model config for people to read.

use crate::model::config::DecoderConfig;
use crate::model::decoder::DecoderLm;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use kv_core::{KvError, Result};
use std::path::{Path, PathBuf};

/// File name of the checkpoint inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.kvc";
/// File name of the human-readable model config inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// The header's first six bytes; two ASCII digits of the format version follow.
const MAGIC: &[u8; 6] = b"KVCKPT";
/// The format written. Version 1 held each block's attention in five optional fields and the
/// YOCO parts beside the blocks; version 2 records each block's attention as one enum and the
/// decoder stack under its architecture's name. Version 1 files are read through
/// [`upgrade_v1_model`].
pub(crate) const VERSION: u8 = 2;
const HEADER: usize = 8;

/// Checks that `path` is new or a regular file, so an output written by a rename over it never
/// replaces a device node, a symlink (`/dev/stdout`) or a folder.
pub fn check_replaceable(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(KvError::io(
            path,
            "is a symlink; an output replaces only a regular file or makes a new one (name the file it points to)",
        )),
        Ok(m) if !m.is_file() => Err(KvError::io(
            path,
            "is not a regular file (a device, folder, socket or pipe); an output replaces only a regular file or makes a new one",
        )),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash or a full disk
/// leaves either the old file or the new one, never a torn one. `path` must be new or a regular
/// file ([`check_replaceable`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    check_replaceable(path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| KvError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
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
    pub(crate) fn encode(&self) -> Vec<u8> {
        self.encode_version(VERSION)
    }

    /// The file bytes under the header of format `version` (tests write older versions).
    pub(crate) fn encode_version(&self, version: u8) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(format!("{version:02}").as_bytes());
        for s in [&self.config, &self.train, &self.model, &self.optim] {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s);
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// The sections of a checkpoint file of any readable version, the model record upgraded to
    /// the current format.
    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let (version, mut sections) = Self::decode_raw(bytes, path)?;
        if version == 1 {
            sections.model = upgrade_v1_model(&sections.model, path)?;
        }
        Ok(sections)
    }

    /// The format version and the sections as stored, after the checksum is verified.
    pub(crate) fn decode_raw(bytes: &[u8], path: &Path) -> Result<(u8, Self)> {
        let bad = |what: &str| KvError::io(path, format!("not a usable checkpoint: {what}"));
        if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
            let valid: Vec<String> = (1..=VERSION).map(|v| format!("KVCKPT{v:02}")).collect();
            return Err(bad(&format!(
                "wrong file type (no {} header)",
                valid.join(" or ")
            )));
        }
        let version = std::str::from_utf8(&bytes[MAGIC.len()..HEADER])
            .ok()
            .and_then(|v| v.parse::<u8>().ok());
        let version = match version {
            Some(v @ 1..=VERSION) => v,
            _ => {
                let shown = String::from_utf8_lossy(&bytes[MAGIC.len()..HEADER]).into_owned();
                return Err(bad(&format!(
                    "format version {shown:?}; this build reads versions 01 to {VERSION:02}"
                )));
            }
        };
        let truncated = || {
            bad(&format!(
                "truncated ({} bytes; the write that made it did not finish)",
                bytes.len()
            ))
        };
        let mut at = HEADER;
        let mut sections = Vec::with_capacity(4);
        for _ in 0..4 {
            let len_bytes = bytes.get(at..at + 8).ok_or_else(truncated)?;
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            at += 8;
            let body = bytes
                .get(at..at.checked_add(len).ok_or_else(truncated)?)
                .ok_or_else(truncated)?;
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
        Ok((
            version,
            Self {
                config,
                train,
                model,
                optim,
            },
        ))
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
        let path = dir.join(CHECKPOINT_FILE);
        let text = std::str::from_utf8(&self.config)
            .map_err(|e| KvError::io(&path, format!("its config is not UTF-8: {e}")))?;
        DecoderConfig::from_json(text).map_err(|e| match e {
            KvError::Io { message, .. } => KvError::io(&path, message),
            other => other,
        })
    }
}

fn checkpoint_path(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        return Err(KvError::io(dir, "no such checkpoint directory"));
    }
    let path = dir.join(CHECKPOINT_FILE);
    if !path.is_file() {
        return Err(KvError::io(
            dir,
            format!("not a checkpoint directory (no {CHECKPOINT_FILE})"),
        ));
    }
    Ok(path)
}

/// Serialises any burn record to bytes.
pub(crate) fn record_bytes<B: Backend, R: burn::record::Record<B>>(
    record: R,
    what: &Path,
) -> Result<Vec<u8>> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::new()
        .record(record, ())
        .map_err(|e| KvError::io(what, e))
}

/// A MessagePack record re-encoded with every map's entries in key order.
///
/// burn writes an optimiser's state as a hash map keyed by parameter id, so its bytes come out in
/// a different order on every run; sorted, the same training run always writes the same file.
pub(crate) fn canonical_record(bytes: Vec<u8>) -> Vec<u8> {
    fn sort(v: &mut rmpv::Value) {
        match v {
            rmpv::Value::Map(entries) => {
                entries.iter_mut().for_each(|(k, x)| {
                    sort(k);
                    sort(x)
                });
                entries.sort_by_cached_key(|(k, _)| k.to_string());
            }
            rmpv::Value::Array(items) => items.iter_mut().for_each(sort),
            _ => {}
        }
    }
    let Ok(mut value) = rmpv::decode::read_value(&mut bytes.as_slice()) else {
        return bytes;
    };
    sort(&mut value);
    let mut out = Vec::with_capacity(bytes.len());
    match rmpv::encode::write_value(&mut out, &value) {
        Ok(()) => out,
        Err(_) => bytes,
    }
}

/// A version-1 model record rewritten in the version-2 layout; the tensors and their parameter
/// ids are moved, not re-encoded, so the optimiser state keyed by those ids still applies.
///
/// Version 1 gave every block five optional attention fields (`attn`, `mla`, `swa`,
/// `retention`, `cross`; records from before MLA lack the later ones) and kept YOCO's
/// `global_kv` beside the blocks. Version 2 has `stack: {Llama: {blocks}}` or
/// `stack: {Yoco: {self_decoder, cross_decoder, global_kv}}`, each block's attention recorded
/// as `{Kind: module}` (a cross-decoder block's as the module itself).
pub(crate) fn upgrade_v1_model(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    use rmpv::Value;
    let bad = |what: String| {
        KvError::io(
            path,
            format!("version-1 record does not fit a decoder: {what}"),
        )
    };
    let take = |map: &mut Vec<(Value, Value)>, key: &str| -> Value {
        match map.iter().position(|(k, _)| k.as_str() == Some(key)) {
            Some(i) => map.remove(i).1,
            None => Value::Nil,
        }
    };
    let mut root = rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| bad(e.to_string()))?;
    let Value::Map(top) = &mut root else {
        return Err(bad("not a map".into()));
    };
    let item = top
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some("item"))
        .map(|(_, v)| v)
        .ok_or_else(|| bad("no item".into()))?;
    let Value::Map(fields) = item else {
        return Err(bad("item is not a map".into()));
    };
    let Value::Array(blocks) = take(fields, "blocks") else {
        return Err(bad("no block list".into()));
    };
    let global_kv = take(fields, "global_kv");
    let yoco = !global_kv.is_nil();
    let half = blocks.len() / 2;
    let mut converted = Vec::with_capacity(blocks.len());
    for (i, block) in blocks.into_iter().enumerate() {
        let Value::Map(mut block) = block else {
            return Err(bad(format!("block {i} is not a map")));
        };
        let kinds: Vec<(&str, Value)> = ["attn", "mla", "swa", "retention", "cross"]
            .into_iter()
            .map(|k| (k, take(&mut block, k)))
            .filter(|(_, v)| !v.is_nil())
            .collect();
        let [(kind, module)]: [(&str, Value); 1] = kinds.try_into().map_err(|k: Vec<(&str, Value)>| {
            let names: Vec<&str> = k.iter().map(|(n, _)| *n).collect();
            bad(format!("decoder block attention of block {i}: {} (exactly one of attn, mla, swa, retention, cross)", if names.is_empty() { "none".to_string() } else { names.join(" and ") }))
        })?;
        let variant = match (yoco, i < half, kind) {
            (false, _, "attn") => Some("Grouped"),
            (false, _, "mla") => Some("Latent"),
            (true, true, "swa") => Some("Window"),
            (true, true, "retention") => Some("Retention"),
            (true, false, "cross") => None,
            _ => {
                let want = if !yoco {
                    "attn or mla"
                } else if i < half {
                    "swa or retention (self-decoder)"
                } else {
                    "cross (cross-decoder)"
                };
                return Err(bad(format!(
                    "yoco block {i} holds {kind}, the layout needs {want}"
                )));
            }
        };
        let attention = match variant {
            Some(v) => Value::Map(vec![(Value::from(v), module)]),
            None => module,
        };
        let field =
            |block: &mut Vec<(Value, Value)>, key: &str| (Value::from(key), take(block, key));
        converted.push(Value::Map(vec![
            field(&mut block, "attn_norm"),
            (Value::from("attention"), attention),
            field(&mut block, "ffn_norm"),
            field(&mut block, "ffn"),
        ]));
    }
    let stack = if yoco {
        let cross = converted.split_off(half);
        let body = vec![
            (Value::from("self_decoder"), Value::Array(converted)),
            (Value::from("cross_decoder"), Value::Array(cross)),
            (Value::from("global_kv"), global_kv),
        ];
        Value::Map(vec![(Value::from("Yoco"), Value::Map(body))])
    } else {
        Value::Map(vec![(
            Value::from("Llama"),
            Value::Map(vec![(Value::from("blocks"), Value::Array(converted))]),
        )])
    };
    fields.push((Value::from("stack"), stack));
    let mut out = Vec::with_capacity(bytes.len() + 256);
    rmpv::encode::write_value(&mut out, &root).map_err(|e| bad(e.to_string()))?;
    Ok(out)
}

/// Runs `f`, turning a panic into its message: burn's record decoding asserts on malformed
/// input (a bad parameter id, data that does not fill its shape) instead of returning an error,
/// and a checkpoint is input from outside. The panic hook is silenced meanwhile, so the caller
/// reports one error rather than a panic trace.
fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    out.map_err(|p| {
        let message = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        message
            .unwrap_or_else(|| "malformed record".into())
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

/// Deserialises a burn record from bytes.
pub(crate) fn record_from<B: Backend, R: burn::record::Record<B>>(
    bytes: Vec<u8>,
    device: &B::Device,
    what: &Path,
) -> Result<R> {
    let bad = |e: String| KvError::io(what, format!("record does not fit this model: {e}"));
    without_panics(|| NamedMpkBytesRecorder::<FullPrecisionSettings>::new().load(bytes, device))
        .map_err(bad)?
        .map_err(|e| bad(e.to_string()))
}

/// The shape of every float parameter, in visiting order, without initialising lazy ones, and
/// how many are still lazy.
struct Shapes(Vec<Vec<usize>>, usize);

impl<B: Backend> burn::module::ModuleVisitor<B> for Shapes {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        self.0.push(param.lazy_shape().to_vec());
        self.1 += usize::from(!param.is_initialized());
    }
}

/// The model `config` describes, with every weight from the record in `bytes`.
///
/// Nothing is initialised from the config: it is built lazily, the record's tensors replace its
/// parameters, and every shape must equal the config's. So a checkpoint whose config asks for a
/// huge model but holds small weights is an error, not an allocation the file dictates.
pub(crate) fn model_from_record<B: Backend>(
    config: &DecoderConfig,
    bytes: Vec<u8>,
    device: &B::Device,
    what: &Path,
) -> Result<DecoderLm<B>> {
    let lazy = config.init_lazy::<B>(device)?;
    let mut want = Shapes(vec![], 0);
    lazy.visit(&mut want);
    let record = record_from::<B, _>(bytes, device, what)?;
    let model = without_panics(|| lazy.load_record(record))
        .map_err(|e| KvError::io(what, format!("record does not fit this model: {e}")))?;
    // YOCO's layout first (it names the block), then every shape.
    model.check_blocks()?;
    let mut got = Shapes(vec![], 0);
    model.visit(&mut got);
    if let Some((i, (w, g))) = want
        .0
        .iter()
        .zip(&got.0)
        .enumerate()
        .find(|(_, (w, g))| w != g)
    {
        return Err(KvError::io(
            what,
            format!(
                "record does not fit this model: parameter {i} has shape {g:?}, the config needs {w:?}"
            ),
        ));
    }
    if want.0.len() != got.0.len() {
        return Err(KvError::io(
            what,
            format!(
                "record does not fit this model: {} parameters, the config needs {}",
                got.0.len(),
                want.0.len()
            ),
        ));
    }
    if got.1 > 0 {
        return Err(KvError::io(
            what,
            format!(
                "record does not fit this model: {} parameters of the config are missing from it",
                got.1
            ),
        ));
    }
    Ok(model)
}

/// Saves `model` and `config` (no training state) into directory `dir`.
pub fn save_model<B: Backend>(
    model: &DecoderLm<B>,
    config: &DecoderConfig,
    dir: impl AsRef<Path>,
) -> Result<()> {
    let dir = dir.as_ref();
    let sections = Sections {
        config: serde_json::to_vec_pretty(config).map_err(|e| KvError::io(dir, e))?,
        // Ordinal ids: the same weights always make the same file.
        model: record_bytes::<B, _>(
            crate::model::ordinal::ordinal_ids(model.clone()).into_record(),
            dir,
        )?,
        ..Default::default()
    };
    sections.write(dir)
}

/// Loads a model and its config from checkpoint directory `dir`.
pub fn load_model<B: Backend>(
    dir: impl AsRef<Path>,
    device: &B::Device,
) -> Result<(DecoderLm<B>, DecoderConfig)> {
    let dir = dir.as_ref();
    let sections = Sections::read(dir)?;
    let config = sections.model_config(dir)?;
    let model =
        model_from_record::<B>(&config, sections.model, device, &dir.join(CHECKPOINT_FILE))?;
    Ok((model, config))
}

/// Loads a model that must have the given config; a different one is an error naming the fields.
pub fn load_model_expecting<B: Backend>(
    dir: impl AsRef<Path>,
    expected: &DecoderConfig,
    device: &B::Device,
) -> Result<DecoderLm<B>> {
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
