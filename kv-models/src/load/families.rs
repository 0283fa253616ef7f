//! The pretrained model families the loaders read, one row each, and the one table of tensor
//! names that maps llama.cpp's GGUF names to Hugging Face's. Both loaders (`hf.rs`, `gguf_model.rs`)
//! and the weight builder (`llama.rs`) read these; adding a Llama-shaped family is a row here.

/// What distinguishes one Llama-shaped family from another, as far as loading goes.
#[derive(Debug)]
pub(crate) struct Family {
    /// Its name, as Hugging Face's `model_type` spells it.
    pub name: &'static str,
    /// Hugging Face's `architectures[0]` for it, for configs that carry no `model_type`.
    pub hf_architecture: &'static str,
    /// llama.cpp's `general.architecture` for it, where GGUF files of it are read.
    pub gguf_architecture: Option<&'static str>,
    /// llama.cpp's converter interleaves the two halves of each query/key head (its RoPE rotates
    /// adjacent pairs); the loader undoes it. Only the `llama` converter does this.
    pub gguf_permuted_qk: bool,
    /// The query, key and value projections always carry biases (and `attention_bias` is then
    /// not read).
    pub qkv_bias: bool,
    /// An RMSNorm with a learned gain over each head's query and key before RoPE.
    pub qk_norm: bool,
    /// The config's `sliding_window` field, when set, means a window applies (Mistral); other
    /// families set it unused unless `use_sliding_window` is true.
    pub sliding_window_field: bool,
    /// The feed-forward's activation (`hidden_act`): every family here gates with SiLU (SwiGLU).
    pub activation: &'static str,
}

/// Every family the loaders read. Norm layout (pre-norm, two RMSNorms a block), feed-forward
/// (SwiGLU) and embedding scale (none) are the same for all of them, so they are not columns yet.
pub(crate) const FAMILIES: &[Family] = &[
    Family {
        name: "llama",
        hf_architecture: "LlamaForCausalLM",
        gguf_architecture: Some("llama"),
        gguf_permuted_qk: true,
        qkv_bias: false,
        qk_norm: false,
        sliding_window_field: false,
        activation: "silu",
    },
    Family {
        name: "mistral",
        hf_architecture: "MistralForCausalLM",
        gguf_architecture: None,
        gguf_permuted_qk: true,
        qkv_bias: false,
        qk_norm: false,
        sliding_window_field: true,
        activation: "silu",
    },
    Family {
        name: "qwen2",
        hf_architecture: "Qwen2ForCausalLM",
        gguf_architecture: Some("qwen2"),
        gguf_permuted_qk: false,
        qkv_bias: true,
        qk_norm: false,
        sliding_window_field: false,
        activation: "silu",
    },
    Family {
        name: "qwen3",
        hf_architecture: "Qwen3ForCausalLM",
        gguf_architecture: Some("qwen3"),
        gguf_permuted_qk: false,
        qkv_bias: false,
        qk_norm: true,
        sliding_window_field: false,
        activation: "silu",
    },
];

/// The family of a Hugging Face config: by `model_type`, else by `architectures[0]`.
pub(crate) fn by_hf(
    model_type: Option<&str>,
    architecture: Option<&str>,
) -> Option<&'static Family> {
    match model_type {
        Some(t) => FAMILIES.iter().find(|f| f.name == t),
        None => FAMILIES
            .iter()
            .find(|f| Some(f.hf_architecture) == architecture),
    }
}

/// The family of a GGUF file's `general.architecture`.
pub(crate) fn by_gguf(architecture: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.gguf_architecture == Some(architecture))
}

/// The families a Hugging Face folder may hold, for error messages.
pub(crate) fn hf_names() -> String {
    FAMILIES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The GGUF architectures read, for error messages.
pub(crate) fn gguf_names() -> String {
    FAMILIES
        .iter()
        .filter_map(|f| f.gguf_architecture)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whole-model tensors: Hugging Face name, llama.cpp name.
const MODEL_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer modules (`model.layers.{i}.` / `blk.{i}.`, then `.weight` or `.bias`): Hugging
/// Face name, llama.cpp name.
const LAYER_TENSORS: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// llama.cpp's name for a Hugging Face tensor name (None: no counterpart).
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = MODEL_TENSORS.iter().find(|(h, _)| *h == hf) {
        return Some((*g).into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let (module, suffix) = name.rsplit_once('.')?;
    let (_, mapped) = LAYER_TENSORS.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{mapped}.{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_found_by_each_of_its_names() {
        for f in FAMILIES {
            assert_eq!(by_hf(Some(f.name), None).unwrap().name, f.name);
            assert_eq!(by_hf(None, Some(f.hf_architecture)).unwrap().name, f.name);
            if let Some(g) = f.gguf_architecture {
                assert_eq!(by_gguf(g).unwrap().name, f.name);
            }
        }
        assert!(by_hf(Some("gpt2"), Some("LlamaForCausalLM")).is_none());
        assert!(by_gguf("mistral").is_none());
    }

    #[test]
    fn tensor_names_map_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.k_norm.weight").as_deref(),
            Some("blk.3.attn_k_norm.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.q_proj.bias").as_deref(),
            Some("blk.0.attn_q.bias")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary.inv_freq"), None);
    }
}
