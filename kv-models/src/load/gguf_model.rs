//! A Llama-family model from a GGUF file: its config from the `{arch}.*` metadata, its weights by
//! llama.cpp's tensor names mapped to Hugging Face's.

use super::gguf::GgufFile;
use super::llama::{HostTensor, WeightSource};
use crate::DecoderConfig;
use kv_core::{KvError, Result};

/// GGUF architectures this loader maps onto the Llama decoder.
const ARCHITECTURES: &str = "llama, qwen2";

/// The decoder config a GGUF file's metadata describes.
pub(crate) fn config_from_gguf(file: &GgufFile) -> Result<DecoderConfig> {
    let bad = |m: String| KvError::io(file.path(), m);
    let arch = file.require("general.architecture")?.as_str().unwrap_or_default().to_string();
    if !["llama", "qwen2"].contains(&arch.as_str()) {
        return Err(bad(format!("general.architecture {arch:?} is not one this loader reads ({ARCHITECTURES})")));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> Result<usize> {
        let v = file.require_u64(&key(k))?;
        usize::try_from(v).ok().filter(|&v| v <= 1 << 24).ok_or_else(|| bad(format!("{} = {v} is implausibly large", key(k))))
    };
    let heads = int("attention.head_count")?;
    let kv_heads = if file.get(&key("attention.head_count_kv")).is_some() { int("attention.head_count_kv")? } else { heads };
    let d_model = int("embedding_length")?;
    let vocab = match file.get(&key("vocab_size")) {
        Some(_) => int("vocab_size")?,
        None => file.tensor_info("token_embd.weight").map(|t| t.shape()[0]).ok_or_else(|| bad("no vocab_size and no token_embd.weight".into()))?,
    };
    let head_dim = match file.get(&key("attention.key_length")) {
        Some(_) => int("attention.key_length")?,
        None => d_model / heads.max(1),
    };
    if let Some(rope) = file.get(&key("rope.dimension_count")).and_then(|v| v.as_u64()).filter(|&r| r as usize != head_dim) {
        return Err(bad(format!("{} = {rope} (partial RoPE; the loader expects RoPE over the whole head of {head_dim})", key("rope.dimension_count"))));
    }
    if let Some(t) = file.get(&key("rope.scaling.type")).and_then(|v| v.as_str()).filter(|t| *t != "none") {
        return Err(bad(format!("{} = {t:?} (the decoder implements plain RoPE only)", key("rope.scaling.type"))));
    }
    let theta = match file.get(&key("rope.freq_base")) {
        Some(_) => file.require_f64(&key("rope.freq_base"))?,
        None => 10000.0,
    };
    let eps = file.require_f64(&key("attention.layer_norm_rms_epsilon"))?;
    let positions = if file.get(&key("context_length")).is_some() { int("context_length")? } else { 4096 };
    let config = DecoderConfig::new(vocab, d_model, int("block_count")?, heads, kv_heads, int("feed_forward_length")?)
        .with_rope_theta(theta)
        .with_max_positions(positions)
        .with_norm_eps(eps)
        .with_tie_embeddings(file.tensor_info("output.weight").is_none())
        .with_head_dim((head_dim * heads != d_model).then_some(head_dim))
        .with_qkv_bias((arch == "qwen2").then_some(true));
    config.validate()?;
    Ok(config)
}

/// Reads a GGUF file's tensors under their Hugging Face names, de-quantised, with llama.cpp's
/// query/key row permutation undone.
pub(crate) struct GgufSource<'a> {
    pub(crate) file: &'a GgufFile,
    pub(crate) config: &'a DecoderConfig,
}

impl GgufSource<'_> {
    /// llama.cpp's name for a Hugging Face tensor name (None: no counterpart).
    fn gguf_name(hf: &str) -> Option<String> {
        let fixed = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Some(f.into());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (layer, name) = rest.split_once('.')?;
        let (module, suffix) = name.rsplit_once('.')?;
        let mapped = match module {
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        Some(format!("blk.{layer}.{mapped}.{suffix}"))
    }
}

impl WeightSource for GgufSource<'_> {
    fn read(&mut self, hf_name: &str) -> Result<Option<HostTensor>> {
        let Some(name) = Self::gguf_name(hf_name) else { return Ok(None) };
        if self.file.tensor_info(&name).is_none() {
            return Ok(None);
        }
        let (shape, mut values) = self.file.read_f32(&name)?;
        // llama.cpp's converter interleaves the two halves of each query/key head for the `llama`
        // architecture (its RoPE rotates adjacent pairs); the decoder's RoPE rotates halves, as
        // Hugging Face's does, so the rows go back (qwen2 files are written unpermuted).
        let is_llama = self.file.get("general.architecture").and_then(|v| v.as_str()) == Some("llama");
        let heads = if name.contains(".attn_q.") {
            Some(self.config.n_heads)
        } else if name.contains(".attn_k.") {
            Some(self.config.n_kv_heads)
        } else {
            None
        };
        if let (true, Some(heads)) = (is_llama, heads) {
            let rows = shape[0];
            let cols = if shape.len() > 1 { shape[1] } else { 1 };
            values = unpermute_rows(&values, heads, rows, cols)
                .ok_or_else(|| KvError::io(self.file.path(), format!("tensor {name}: {rows} rows do not split into {heads} heads of even width")))?;
        }
        Ok(Some((shape, values)))
    }

    fn origin(&self) -> String {
        self.file.path().display().to_string()
    }
}

/// Undoes llama.cpp's `permute` of a `[rows, cols]` query or key weight (or bias, `cols = 1`):
/// within each head of `rows / heads` rows, GGUF row `2 j + c` holds Hugging Face row
/// `c * half + j`.
pub(crate) fn unpermute_rows(values: &[f32], heads: usize, rows: usize, cols: usize) -> Option<Vec<f32>> {
    if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
        return None;
    }
    let (dim, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0.0f32; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for c in 0..2 {
                let src = (h * dim + 2 * j + c) * cols;
                let dst = (h * dim + c * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    Some(out)
}
