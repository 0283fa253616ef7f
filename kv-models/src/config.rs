//! The decoder's configuration, validated before anything is built.

use burn::prelude::*;
use kv_attention::GroupedAttentionConfig;
use kv_core::{KvError, Result};

/// Shape of a Llama-style decoder-only language model.
#[derive(Config, Debug, PartialEq)]
pub struct DecoderConfig {
    /// Vocabulary size (256 for the byte tokenizer).
    pub vocab_size: usize,
    /// Model width.
    pub d_model: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads per layer.
    pub n_heads: usize,
    /// Key/value heads per layer: `n_heads` for MHA, a divisor for GQA, 1 for MQA.
    pub n_kv_heads: usize,
    /// Hidden width of the SwiGLU feed-forward.
    pub ffn_hidden: usize,
    /// Base of the RoPE frequencies.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Context length the model is trained for (RoPE itself has no limit).
    #[config(default = 1024)]
    pub max_positions: usize,
    /// Epsilon of the RMSNorms.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// Whether the output head reuses the embedding matrix.
    #[config(default = true)]
    pub tie_embeddings: bool,
}

impl DecoderConfig {
    /// The attention settings of every layer.
    pub fn attention(&self) -> GroupedAttentionConfig {
        GroupedAttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads).with_rope_theta(self.rope_theta)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Checks every field, naming the first bad value and what would be valid.
    pub fn validate(&self) -> Result<()> {
        KvError::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("n_layers", self.n_layers),
            ("ffn_hidden", self.ffn_hidden),
            ("max_positions", self.max_positions),
        ])?;
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(KvError::config("norm_eps", self.norm_eps, "a small positive number such as 1e-5"));
        }
        self.attention().validate()
    }

    /// Bytes of keys and values one token adds to the cache (f32, full cache).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim() * 4
    }

    /// Reads a config from a JSON file, validated.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            KvError::Io { message, .. } => KvError::io(path, message),
            other => other,
        })
    }

    /// Parses a config from JSON text, validated.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| KvError::io("<config>", format!("not a decoder config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The fields whose values differ from `other`, as `field checkpoint_value vs other_value`.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let (a, b) = (serde_json::to_value(self).unwrap_or_default(), serde_json::to_value(other).unwrap_or_default());
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return vec![] };
        a.iter().filter(|(k, v)| b.get(*k) != Some(*v)).map(|(k, v)| format!("{k} {v} vs {}", b.get(k).cloned().unwrap_or_default())).collect()
    }
}
