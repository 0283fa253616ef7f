//! Hugging Face checkpoint folders: `config.json` and `model.safetensors` (or shards with an
//! index) of a Llama-shaped model of one of the families in `families.rs`.

use super::families;
use super::llama::{HostTensor, WeightSource};
use crate::model::config::DecoderConfig;
use half::{bf16, f16};
use kv_core::{KvError, Result};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The fields of a Hugging Face `config.json` that shape a Llama-family model.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers 5 keeps the RoPE settings here instead (`rope_theta`, `rope_type`).
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: Option<bool>,
    #[serde(default)]
    mlp_bias: Option<bool>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    sliding_window: Option<Value>,
    #[serde(default)]
    use_sliding_window: Option<bool>,
}

/// The decoder config a Hugging Face `config.json` describes; anything the decoder cannot
/// reproduce (another architecture, RoPE scaling, a sliding window, biases Llama lacks) is an
/// error naming the field.
pub(crate) fn config_from_hf(text: &str, origin: &Path) -> Result<DecoderConfig> {
    let bad = |m: String| KvError::io(origin, m);
    let hf: HfConfig = serde_json::from_str(text)
        .map_err(|e| bad(format!("not a Hugging Face model config: {e}")))?;
    let (model_type, architecture) = (
        hf.model_type.as_deref(),
        hf.architectures.first().map(String::as_str),
    );
    let Some(family) = families::by_hf(model_type, architecture) else {
        return Err(bad(format!(
            "model_type {:?} / architectures {:?} is not a family this loader reads ({})",
            model_type.unwrap_or("none"),
            architecture.unwrap_or("none"),
            families::hf_names()
        )));
    };
    if let Some(act) = hf.hidden_act.as_deref().filter(|a| *a != family.activation) {
        return Err(bad(format!(
            "hidden_act {act:?} (the decoder's {} feed-forward uses {})",
            family.name, family.activation
        )));
    }
    let mut theta = hf.rope_theta;
    let mut rope_type = None;
    if let Some(p) = &hf.rope_parameters {
        theta = theta.or_else(|| p.get("rope_theta").and_then(Value::as_f64));
        rope_type = p
            .get("rope_type")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    if let Some(s) = hf.rope_scaling.as_ref().filter(|s| !s.is_null()) {
        rope_type = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .or(Some("unnamed".into()));
    }
    if let Some(t) = rope_type.filter(|t| t != "default") {
        return Err(bad(format!(
            "RoPE scaling {t:?} (the decoder implements plain RoPE only)"
        )));
    }
    let sliding = hf.sliding_window.as_ref().is_some_and(|w| !w.is_null());
    if (family.sliding_window_field && sliding) || hf.use_sliding_window == Some(true) {
        return Err(bad(format!(
            "sliding_window {:?} (the decoder attends over the whole cache)",
            hf.sliding_window
        )));
    }
    if hf.mlp_bias == Some(true) {
        return Err(bad(
            "mlp_bias true (the decoder's feed-forward has no biases)".into(),
        ));
    }
    // Qwen2 always has q/k/v biases; Llama may (attention_bias), but then also on o_proj.
    let qkv_bias = family.qkv_bias;
    if hf.attention_bias == Some(true) && !qkv_bias {
        return Err(bad(format!(
            "attention_bias true in a {} config (only q/k/v biases, as Qwen2 has, are supported)",
            family.name
        )));
    }
    let heads = hf.num_attention_heads;
    let head_dim = hf
        .head_dim
        .filter(|&h| heads == 0 || h * heads != hf.hidden_size);
    let config = DecoderConfig::new(
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        heads,
        hf.num_key_value_heads.unwrap_or(heads),
        hf.intermediate_size,
    )
    .with_rope_theta(theta.unwrap_or(10000.0))
    .with_max_positions(hf.max_position_embeddings.unwrap_or(4096))
    .with_norm_eps(hf.rms_norm_eps.unwrap_or(1e-6))
    .with_tie_embeddings(hf.tie_word_embeddings.unwrap_or(false))
    .with_head_dim(head_dim)
    .with_qkv_bias(qkv_bias.then_some(true))
    .with_qk_norm(family.qk_norm.then_some(true));
    config.validate()?;
    Ok(config)
}

/// Safetensors files of one checkpoint, read one file at a time.
pub(crate) struct SafetensorsSource {
    dir: PathBuf,
    /// Tensor name -> file (from the shard index, or every tensor of the one file).
    files: HashMap<String, PathBuf>,
    /// The file whose bytes are loaded, with them.
    loaded: Option<(PathBuf, Vec<u8>)>,
}

impl SafetensorsSource {
    /// The weights of a checkpoint folder: `model.safetensors`, or the shards its
    /// `model.safetensors.index.json` lists.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let mut files = HashMap::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| KvError::io(&index, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| KvError::io(&index, format!("not JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| KvError::io(&index, "no weight_map object"))?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    KvError::io(&index, format!("weight_map[{name}] is not a file name"))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(KvError::io(
                        &index,
                        format!(
                            "weight_map[{name}] = {file:?} is not a file name inside the folder"
                        ),
                    ));
                }
                files.insert(name.clone(), dir.join(file));
            }
        } else if single.is_file() {
            let header = read_header(&single)?;
            for name in header.keys().filter(|k| *k != "__metadata__") {
                files.insert(name.clone(), single.clone());
            }
        } else {
            return Err(KvError::io(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            loaded: None,
        })
    }
}

/// The JSON header of a safetensors file (names, dtypes, shapes, offsets), read without the data.
fn read_header(path: &Path) -> Result<BTreeMap<String, Value>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| KvError::io(path, e))?;
    let len = f.metadata().map_err(|e| KvError::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        KvError::io(
            path,
            "not a safetensors file: shorter than its 8-byte header length",
        )
    })?;
    let n = u64::from_le_bytes(n);
    // safetensors caps headers at 100 MB; anything past the file is truncation.
    if n > 100_000_000 || n > len - 8 {
        return Err(KvError::io(
            path,
            format!("not a safetensors file: header of {n} bytes in a file of {len}"),
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| KvError::io(path, e))?;
    serde_json::from_slice(&header).map_err(|e| {
        KvError::io(
            path,
            format!("not a safetensors file: header is not JSON: {e}"),
        )
    })
}

impl WeightSource for SafetensorsSource {
    fn read(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(file) = self.files.get(name).cloned() else {
            return Ok(None);
        };
        if self.loaded.as_ref().is_none_or(|(p, _)| *p != file) {
            let bytes = std::fs::read(&file).map_err(|e| KvError::io(&file, e))?;
            self.loaded = Some((file.clone(), bytes));
        }
        let (_, bytes) = self.loaded.as_ref().expect("just loaded");
        // deserialize checks every tensor's extent against the buffer before handing out views.
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| KvError::io(&file, format!("not a usable safetensors file: {e}")))?;
        let view = st
            .tensor(name)
            .map_err(|e| KvError::io(&file, format!("tensor {name}: {e}")))?;
        Ok(Some((
            view.shape().to_vec(),
            to_f32(view.dtype(), view.data(), name, &file)?,
        )))
    }

    fn origin(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Little-endian floats of a safetensors dtype, as f32.
pub(crate) fn to_f32(dtype: Dtype, data: &[u8], name: &str, file: &Path) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(KvError::io(
                file,
                format!("tensor {name} has dtype {other:?} (supported: F32, F16, BF16)"),
            ));
        }
    })
}
