//! The decoder's configuration, validated before anything is built.

use burn::prelude::*;
use kv_attention::{
    CrossAttentionConfig, DmcAttentionConfig, GatedRetentionConfig, GroupedAttentionConfig,
    MlaAttentionConfig, SlidingWindowAttentionConfig,
};
use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

/// Multi-head latent attention settings of a decoder (DeepSeek-V2); absent for MHA/GQA/MQA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaSettings {
    /// Width `d_h` of one head's content query and key (need not be `d_model / n_heads`).
    pub head_dim: usize,
    /// Width `d_c` of the cached key/value latent.
    pub kv_latent: usize,
    /// Width `d_R` of the decoupled RoPE query (per head) and key (shared); even.
    pub rope_dim: usize,
    /// Width `d_c'` of the query latent; 0 (the default) projects queries straight from the input.
    #[serde(default)]
    pub query_latent: usize,
    /// Width of one head's value; absent (the default): `head_dim`.
    #[serde(default)]
    pub value_dim: Option<usize>,
    /// RMSNorm on the cached latent (default true, as DeepSeek); false only in models converted
    /// from MHA (see docs/conversion.md).
    #[serde(default = "yes")]
    pub latent_norm: bool,
}

fn yes() -> bool {
    true
}

impl MlaSettings {
    /// DeepSeek-V2's layout with these widths: no query compression, values `head_dim` wide,
    /// normalised latent.
    pub fn new(head_dim: usize, kv_latent: usize, rope_dim: usize) -> Self {
        Self {
            head_dim,
            kv_latent,
            rope_dim,
            query_latent: 0,
            value_dim: None,
            latent_norm: true,
        }
    }
}

/// Dynamic Memory Compression settings of a decoder (Nawrot et al. 2024): every grouped
/// attention layer merges tokens into its KV heads' slots; absent for other models. The target
/// compression ratio is a training setting (`TrainConfig::dmc`), not the model's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmcSettings {
    /// Offset of the decision logit and importance (the official `dmc-init-val`, default 5).
    #[serde(default = "default_dmc_init")]
    pub init_bias: f64,
    /// Most tokens one slot averages, the newest of its run, on both paths (default 12).
    #[serde(default = "default_dmc_window")]
    pub window: usize,
    /// Gumbel-sigmoid temperature while training (default 0.1).
    #[serde(default = "default_dmc_temperature")]
    pub temperature: f64,
    /// Zero the decision channel after RoPE as well as before, the official code's rule
    /// (default off: before only, so every RoPE pair keeps its relative form).
    #[serde(default)]
    pub zero_after_rope: bool,
}

fn default_dmc_init() -> f64 {
    5.0
}

fn default_dmc_window() -> usize {
    12
}

fn default_dmc_temperature() -> f64 {
    0.1
}

impl Default for DmcSettings {
    fn default() -> Self {
        Self {
            init_bias: default_dmc_init(),
            window: default_dmc_window(),
            temperature: default_dmc_temperature(),
            zero_after_rope: false,
        }
    }
}

/// The efficient self-attention of a YOCO self-decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SelfAttentionKind {
    /// Sliding-window attention over the last `window` positions (YOCO-SWA).
    Window,
    /// Gated retention (YOCO-gRet, the paper's default).
    Retention,
}

/// YOCO (You Only Cache Once, Sun et al. 2024) settings of a decoder; absent for other models.
///
/// The first `n_layers / 2` blocks form the self-decoder (`self_attention` + FFN, constant-size
/// state), then one global K/V is computed from its output, and the last `n_layers / 2` blocks
/// form the cross-decoder (own queries + FFN over that one cache, `n_kv_heads` heads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct YocoSettings {
    /// `"window"` or `"retention"`.
    pub self_attention: SelfAttentionKind,
    /// Keys each sliding-window query sees, itself included (YOCO's `C`; default 1024).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Tokens per chunk of the retention's chunkwise form (default 256).
    #[serde(default = "default_chunk")]
    pub chunk: usize,
    /// Retention gate temperature `tau` in `gamma = sigmoid(x W)^(1/tau)` (default 16).
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_window() -> usize {
    1024
}

fn default_chunk() -> usize {
    256
}

fn default_tau() -> f64 {
    16.0
}

impl YocoSettings {
    /// A sliding-window self-decoder with window `window`, the paper's other defaults.
    pub fn window(window: usize) -> Self {
        Self {
            self_attention: SelfAttentionKind::Window,
            window,
            chunk: default_chunk(),
            tau: default_tau(),
        }
    }

    /// A gated-retention self-decoder with the paper's defaults (chunk 256, tau 16).
    pub fn retention() -> Self {
        Self {
            self_attention: SelfAttentionKind::Retention,
            window: default_window(),
            chunk: default_chunk(),
            tau: default_tau(),
        }
    }

    /// Checks the settings against the model's layer count, naming the first bad value.
    pub fn validate(&self, n_layers: usize) -> Result<()> {
        if n_layers < 2 || !n_layers.is_multiple_of(2) {
            return Err(KvError::config(
                "n_layers",
                n_layers,
                "an even number >= 2 with yoco: half self-decoder, half cross-decoder",
            ));
        }
        if self.window == 0 {
            return Err(KvError::config(
                "yoco.window",
                0,
                "at least 1 key per query (the query's own)",
            ));
        }
        if self.chunk == 0 {
            return Err(KvError::config(
                "yoco.chunk",
                0,
                "at least 1 token per retention chunk (YOCO uses 256)",
            ));
        }
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(KvError::config(
                "yoco.tau",
                self.tau,
                "a finite number > 0 (YOCO uses 16)",
            ));
        }
        Ok(())
    }
}

/// Largest width a config may ask for (vocabulary, model, heads, feed-forward).
pub const MAX_WIDTH: usize = 1 << 24;
/// Most layers a config may ask for.
pub const MAX_LAYERS: usize = 4096;
/// Most parameters a config may ask for (by [`DecoderConfig::parameter_estimate`]).
pub const MAX_PARAMETERS: u64 = 1 << 36;

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
    /// Key/value heads per layer: `n_heads` for MHA, a divisor for GQA, 1 for MQA and for MLA
    /// (whose cache is one latent head shared by every query head).
    pub n_kv_heads: usize,
    /// Hidden width of the SwiGLU feed-forward.
    pub ffn_hidden: usize,
    /// Base of the RoPE frequencies.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// Leading dims of each head that RoPE rotates (None: all). Unrotated dims compare keys by
    /// content alone at any distance, which lets a small model's copy circuit learned on short
    /// rows keep working on long ones.
    #[config(default = "None")]
    pub rope_dims: Option<usize>,
    /// Context length the model is trained for (RoPE itself has no limit).
    #[config(default = 1024)]
    pub max_positions: usize,
    /// Epsilon of the RMSNorms.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// Whether the output head reuses the embedding matrix.
    #[config(default = true)]
    pub tie_embeddings: bool,
    /// Token shift: add a learned projection of the previous token's embedding to each token's
    /// input, so a single attention layer can match on "the token before" (the first half of an
    /// induction head) instead of having to learn it with a second layer first.
    #[config(default = false)]
    pub token_shift: bool,
    /// Previous tokens the token shift reads (None: 1). A few (3, like the short convolutions of
    /// H3, Based or Canon layers) let one attention layer match on the last few tokens, which
    /// disambiguates a retrieval cue ("key is") that a single previous token cannot.
    #[config(default = "None")]
    pub token_shift_width: Option<usize>,
    /// Key token shift in every grouped attention layer (see `GroupedAttentionConfig::key_shift`):
    /// keys read a learned mix of their token's and the previous token's layer input, so one
    /// layer can find "the token after one like mine". Not with MLA (its latent is the value too).
    #[config(default = "None")]
    pub key_shift: Option<bool>,
    /// Mimetic query-key initialisation in every grouped attention layer (see
    /// `GroupedAttentionConfig::mimetic_init`).
    #[config(default = "None")]
    pub mimetic_init: Option<bool>,
    /// Width of one attention head when it is not `d_model / n_heads` (some pretrained models);
    /// None: `d_model / n_heads`.
    #[config(default = "None")]
    pub head_dim: Option<usize>,
    /// Biases on the query, key and value projections (Qwen2); None: none (Llama).
    #[config(default = "None")]
    pub qkv_bias: Option<bool>,
    /// QK-norm (Qwen3): an RMSNorm (epsilon `norm_eps`) with a learned gain over each head's
    /// query and key before RoPE; None: none.
    #[config(default = "None")]
    pub qk_norm: Option<bool>,
    /// Multi-head latent attention instead of grouped attention in every layer; absent (or
    /// `null`) in the JSON of an MHA/GQA/MQA model, so older configs still load.
    pub mla: Option<MlaSettings>,
    /// YOCO decoder-decoder layout instead of identical blocks; absent (or `null`) in the JSON of
    /// every other model, so older configs still load.
    pub yoco: Option<YocoSettings>,
    /// DMC token merging in every grouped attention layer; absent (or `null`) in the JSON of
    /// every other model, so older configs still load.
    pub dmc: Option<DmcSettings>,
}

impl DecoderConfig {
    /// The grouped attention settings of every layer (used when [`mla`](Self::mla) is absent).
    pub fn attention(&self) -> GroupedAttentionConfig {
        GroupedAttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads)
            .with_rope_theta(self.rope_theta)
            .with_rope_dims(self.rope_dims)
            .with_key_shift(self.key_shift)
            .with_mimetic_init(self.mimetic_init)
            .with_head_dim(self.head_dim)
            .with_qkv_bias(self.qkv_bias)
            .with_qk_norm_eps((self.qk_norm == Some(true)).then_some(self.norm_eps))
    }

    /// The latent attention settings of every layer, for an MLA model (RoPE on `mla.rope_dim`
    /// only, so `rope_dims` does not apply).
    pub fn mla_attention(&self) -> Option<MlaAttentionConfig> {
        self.mla.as_ref().map(|m| {
            MlaAttentionConfig::new(
                self.d_model,
                self.n_heads,
                m.head_dim,
                m.kv_latent,
                m.rope_dim,
            )
            .with_query_latent(m.query_latent)
            .with_value_dim(m.value_dim)
            .with_latent_norm(m.latent_norm)
            .with_rope_theta(self.rope_theta)
            .with_norm_eps(self.norm_eps)
        })
    }

    /// The DMC settings of every layer, for a DMC model (grouped attention underneath).
    pub fn dmc_attention(&self) -> Option<DmcAttentionConfig> {
        self.dmc.as_ref().map(|d| {
            DmcAttentionConfig::new(self.attention())
                .with_init_bias(d.init_bias)
                .with_window(d.window)
                .with_temperature(d.temperature)
                .with_zero_after_rope(d.zero_after_rope)
        })
    }

    /// Previous tokens the token shift reads (0 without token shift).
    pub fn shift_width(&self) -> usize {
        if self.token_shift {
            self.token_shift_width.unwrap_or(1)
        } else {
            0
        }
    }

    /// YOCO's sliding-window self-attention settings (when `yoco.self_attention` is `window`).
    pub fn yoco_window(&self) -> Option<SlidingWindowAttentionConfig> {
        self.yoco
            .as_ref()
            .filter(|y| y.self_attention == SelfAttentionKind::Window)
            .map(|y| SlidingWindowAttentionConfig::new(self.attention(), y.window))
    }

    /// YOCO's gated retention settings (when `yoco.self_attention` is `retention`).
    pub fn yoco_retention(&self) -> Option<GatedRetentionConfig> {
        self.yoco
            .as_ref()
            .filter(|y| y.self_attention == SelfAttentionKind::Retention)
            .map(|y| {
                GatedRetentionConfig::new(self.d_model, self.n_heads)
                    .with_tau(y.tau)
                    .with_chunk(y.chunk)
                    .with_rope_theta(self.rope_theta)
                    .with_rope_dims(self.rope_dims)
            })
    }

    /// YOCO's global K/V and cross-decoder attention settings.
    pub fn yoco_cross(&self) -> Option<CrossAttentionConfig> {
        self.yoco.as_ref().map(|_| {
            CrossAttentionConfig::new(self.d_model, self.n_heads, self.n_kv_heads)
                .with_rope_theta(self.rope_theta)
                .with_rope_dims(self.rope_dims)
                .with_norm_eps(self.norm_eps)
        })
    }

    /// Width of one attention head (MLA: the content part, `mla.head_dim`).
    pub fn head_dim(&self) -> usize {
        match &self.mla {
            Some(m) => m.head_dim,
            None => self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1)),
        }
    }

    /// Roughly the parameter count (embeddings, attention and feed-forward of every layer),
    /// saturating instead of overflowing: what validation bounds before any allocation.
    pub fn parameter_estimate(&self) -> u64 {
        let u = |x: usize| x as u64;
        let hd = u(self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1)));
        let attn = u(self.d_model)
            .saturating_mul(hd)
            .saturating_mul(u(self.n_heads) * 2 + u(self.n_kv_heads) * 2);
        let ffn = u(self.d_model)
            .saturating_mul(u(self.ffn_hidden))
            .saturating_mul(3);
        let embed = u(self.vocab_size)
            .saturating_mul(u(self.d_model))
            .saturating_mul(if self.tie_embeddings { 1 } else { 2 });
        attn.saturating_add(ffn)
            .saturating_mul(u(self.n_layers))
            .saturating_add(embed)
    }

    /// Checks every field, naming the first bad value and what would be valid.
    pub fn validate(&self) -> Result<()> {
        KvError::require_positive(&[
            ("vocab_size", self.vocab_size),
            ("n_layers", self.n_layers),
            ("ffn_hidden", self.ffn_hidden),
            ("max_positions", self.max_positions),
        ])?;
        // A config file dictates allocations: bound every size before anything is built.
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("ffn_hidden", self.ffn_hidden),
            ("head_dim", self.head_dim.unwrap_or(0)),
        ] {
            if value > MAX_WIDTH {
                return Err(KvError::config(
                    field,
                    value,
                    format!("at most {MAX_WIDTH}"),
                ));
            }
        }
        if self.n_layers > MAX_LAYERS {
            return Err(KvError::config(
                "n_layers",
                self.n_layers,
                format!("at most {MAX_LAYERS}"),
            ));
        }
        KvError::require_positive(&[("n_heads", self.n_heads), ("n_kv_heads", self.n_kv_heads)])?;
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(KvError::config(
                "n_kv_heads",
                self.n_kv_heads,
                format!(
                    "a divisor of n_heads = {} (each KV head serves a group of query heads)",
                    self.n_heads
                ),
            ));
        }
        if self.mla.is_none()
            && self.head_dim.is_none()
            && !self.d_model.is_multiple_of(self.n_heads)
        {
            return Err(KvError::config(
                "d_model",
                self.d_model,
                format!("a multiple of n_heads = {} (or set head_dim)", self.n_heads),
            ));
        }
        let params = self.parameter_estimate();
        if params > MAX_PARAMETERS {
            return Err(KvError::config(
                "model size",
                format!("about {params} parameters"),
                format!("at most {MAX_PARAMETERS} (256 GiB of f32)"),
            ));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return Err(KvError::config(
                "norm_eps",
                self.norm_eps,
                "a small positive number such as 1e-5",
            ));
        }
        if let Some(w) = self.token_shift_width.filter(|&w| w == 0 || w > 16) {
            return Err(KvError::config(
                "token_shift_width",
                w,
                "between 1 and 16 previous tokens",
            ));
        }
        if self.mla.is_some() || self.yoco.is_some() {
            let kind = if self.mla.is_some() { "mla" } else { "yoco" };
            if let Some(d) = self.head_dim {
                return Err(KvError::config(
                    "head_dim",
                    d,
                    format!(
                        "absent with {kind}: only grouped attention takes an explicit head width"
                    ),
                ));
            }
            if self.qkv_bias == Some(true) {
                return Err(KvError::config(
                    "qkv_bias",
                    true,
                    format!("absent with {kind}: only grouped attention has q/k/v biases"),
                ));
            }
        }
        if self.qk_norm == Some(true)
            && (self.mla.is_some() || self.yoco.is_some() || self.dmc.is_some())
        {
            let kind = if self.mla.is_some() {
                "mla"
            } else if self.yoco.is_some() {
                "yoco"
            } else {
                "dmc"
            };
            return Err(KvError::config(
                "qk_norm",
                true,
                format!(
                    "absent with {kind}: only plain grouped attention normalises its queries and keys"
                ),
            ));
        }
        if self.dmc.is_some() && (self.mla.is_some() || self.yoco.is_some()) {
            let other = if self.mla.is_some() { "mla" } else { "yoco" };
            return Err(KvError::config(
                "dmc",
                "set",
                format!(
                    "absent (null) with {other}: DMC merges the slots of grouped attention layers"
                ),
            ));
        }
        if let Some(dmc) = self.dmc_attention() {
            dmc.validate()?;
        }
        if let Some(yoco) = &self.yoco {
            if self.mla.is_some() {
                return Err(KvError::config(
                    "mla",
                    "set",
                    "absent (null) with yoco: the cross-decoder caches grouped K/V",
                ));
            }
            // Its self-attention and cross-decoder heads are checked as a grouped layer's below.
            yoco.validate(self.n_layers)?;
        }
        match self.mla_attention() {
            Some(mla) => {
                if let Some(dims) = self.rope_dims {
                    return Err(KvError::config(
                        "rope_dims",
                        dims,
                        "absent (null) with mla: MLA's RoPE already covers only its own mla.rope_dim part",
                    ));
                }
                if self.n_kv_heads != 1 {
                    return Err(KvError::config(
                        "n_kv_heads",
                        self.n_kv_heads,
                        "1 with mla: the latent and the shared RoPE key form one cache head for every query head",
                    ));
                }
                if self.key_shift == Some(true) {
                    return Err(KvError::config(
                        "key_shift",
                        true,
                        "absent with mla: the latent is both key and value, so it cannot read a shifted input for keys only",
                    ));
                }
                mla.validate()
            }
            None => self.attention().validate(),
        }
    }

    /// Bytes of keys and values one token adds to the cache (f32, full cache): MLA caches the
    /// latent and the shared RoPE key, `kv_latent + rope_dim` per layer, whatever the head count.
    /// YOCO caches one layer's K/V (the global cache) whatever the depth; its self-decoder's
    /// windows and states are a constant, not per token.
    pub fn kv_bytes_per_token(&self) -> usize {
        if self.yoco.is_some() {
            return 2 * self.n_kv_heads * self.head_dim() * 4;
        }
        match &self.mla {
            Some(m) => self.n_layers * (m.kv_latent + m.rope_dim) * 4,
            None => 2 * self.n_layers * self.n_kv_heads * self.head_dim() * 4,
        }
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

    /// Parses a config from JSON text, validated; a field this config does not have (a typo that
    /// would otherwise be ignored silently) is an error naming it.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| KvError::io("<config>", format!("not a decoder config: {e}")))?;
        Self::check_fields(&value)?;
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| KvError::io("<config>", format!("not a decoder config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects a JSON object holding a key that is not a field of the config.
    pub(crate) fn check_fields(value: &serde_json::Value) -> Result<()> {
        let Some(object) = value.as_object() else {
            return Ok(());
        };
        let known = serde_json::to_value(Self::new(1, 1, 1, 1, 1, 1)).unwrap_or_default();
        let known: Vec<&str> = known
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        match object.keys().find(|k| !known.contains(&k.as_str())) {
            Some(bad) => Err(KvError::Unknown {
                kind: "model config field".into(),
                name: bad.clone(),
                valid: known.join(", "),
            }),
            None => Ok(()),
        }
    }

    /// The fields whose values differ from `other`, as `field checkpoint_value vs other_value`.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(self).unwrap_or_default(),
            serde_json::to_value(other).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec![];
        };
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} {v} vs {}", b.get(k).cloned().unwrap_or_default()))
            .collect()
    }
}
