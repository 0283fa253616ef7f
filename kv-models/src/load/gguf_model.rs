//! A Llama-family model from a GGUF file: its config from the `{arch}.*` metadata, its weights by
//! llama.cpp's tensor names mapped to Hugging Face's.

use super::families::{self, Family};
use super::gguf::{BlockCodes, GgufFile, rows_in_order};
use super::llama::{HostTensor, WeightSource};
use crate::model::config::DecoderConfig;
use kv_core::{KvError, Result};

/// The family a GGUF file's `general.architecture` names, or an error listing those read.
pub(crate) fn family_of(file: &GgufFile) -> Result<&'static Family> {
    let arch = file
        .require("general.architecture")?
        .as_str()
        .unwrap_or_default();
    families::by_gguf(arch).ok_or_else(|| {
        KvError::io(
            file.path(),
            format!(
                "general.architecture {arch:?} is not one this loader reads ({})",
                families::gguf_names()
            ),
        )
    })
}

/// The decoder config a GGUF file's metadata describes.
pub(crate) fn config_from_gguf(file: &GgufFile) -> Result<DecoderConfig> {
    let bad = |m: String| KvError::io(file.path(), m);
    let family = family_of(file)?;
    let arch = family
        .gguf_architecture
        .expect("found by its GGUF architecture");
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> Result<usize> {
        let v = file.require_u64(&key(k))?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= 1 << 24)
            .ok_or_else(|| bad(format!("{} = {v} is implausibly large", key(k))))
    };
    // Zero sizes are refused here, by their own key, before anything is derived from them.
    let positive = |k: &str| -> Result<usize> {
        match int(k)? {
            0 => Err(bad(format!("{} = 0; it must be at least 1", key(k)))),
            v => Ok(v),
        }
    };
    let heads = positive("attention.head_count")?;
    let kv_heads = if file.get(&key("attention.head_count_kv")).is_some() {
        positive("attention.head_count_kv")?
    } else {
        heads
    };
    let d_model = positive("embedding_length")?;
    let vocab = match file.get(&key("vocab_size")) {
        Some(_) => int("vocab_size")?,
        None => file
            .tensor_info("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| bad("no vocab_size and no token_embd.weight".into()))?,
    };
    let (head_dim, head_from) = match file.get(&key("attention.key_length")) {
        Some(_) => (
            positive("attention.key_length")?,
            key("attention.key_length"),
        ),
        None => (
            d_model / heads,
            format!(
                "{} / {}",
                key("embedding_length"),
                key("attention.head_count")
            ),
        ),
    };
    if let Some(rope) = file
        .get(&key("rope.dimension_count"))
        .and_then(|v| v.as_u64())
        .filter(|&r| r as usize != head_dim)
    {
        return Err(bad(format!(
            "{} = {rope} but heads are {head_dim} wide ({head_from}); the loader reads RoPE over the whole head (no partial RoPE)",
            key("rope.dimension_count")
        )));
    }
    if let Some(t) = file
        .get(&key("rope.scaling.type"))
        .and_then(|v| v.as_str())
        .filter(|t| *t != "none")
    {
        return Err(bad(format!(
            "{} = {t:?} (the decoder implements plain RoPE only)",
            key("rope.scaling.type")
        )));
    }
    let theta = match file.get(&key("rope.freq_base")) {
        Some(_) => file.require_f64(&key("rope.freq_base"))?,
        None => 10000.0,
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(bad(format!(
            "{} = {theta}; a finite RoPE base > 1 such as 10000",
            key("rope.freq_base")
        )));
    }
    let eps = file.require_f64(&key("attention.layer_norm_rms_epsilon"))?;
    let positions = if file.get(&key("context_length")).is_some() {
        int("context_length")?
    } else {
        4096
    };
    let config = DecoderConfig::new(
        vocab,
        d_model,
        positive("block_count")?,
        heads,
        kv_heads,
        positive("feed_forward_length")?,
    )
    .with_rope_theta(theta)
    .with_max_positions(positions)
    .with_norm_eps(eps)
    .with_tie_embeddings(file.tensor_info("output.weight").is_none())
    .with_head_dim((head_dim * heads != d_model).then_some(head_dim))
    .with_qkv_bias(family.qkv_bias.then_some(true))
    .with_qk_norm(family.qk_norm.then_some(true));
    config.validate()?;
    Ok(config)
}

/// Reads a GGUF file's tensors under their Hugging Face names, de-quantised, with llama.cpp's
/// query/key row permutation undone.
pub(crate) struct GgufSource<'a> {
    pub(crate) file: &'a GgufFile,
    pub(crate) config: &'a DecoderConfig,
    pub(crate) family: &'static Family,
}

impl GgufSource<'_> {
    /// The file's name for `hf_name`, if it has that tensor.
    fn present(&self, hf_name: &str) -> Option<String> {
        families::gguf_name(hf_name).filter(|name| self.file.tensor_info(name).is_some())
    }

    /// llama.cpp's converter interleaves the two halves of each query/key head for some families
    /// (`Family::gguf_permuted_qk`; its RoPE rotates adjacent pairs); the decoder's RoPE rotates
    /// halves, as Hugging Face's does, so the rows go back. The row order to read tensor `name`
    /// of `rows` rows in, when it is one of those.
    fn row_order(&self, name: &str, rows: usize) -> Result<Option<Vec<usize>>> {
        let heads = if name.contains(".attn_q.") {
            self.config.n_heads
        } else if name.contains(".attn_k.") {
            self.config.n_kv_heads
        } else {
            return Ok(None);
        };
        if !self.family.gguf_permuted_qk {
            return Ok(None);
        }
        unpermuted_order(heads, rows).map(Some).ok_or_else(|| {
            KvError::io(
                self.file.path(),
                format!("tensor {name}: {rows} rows do not split into {heads} heads of even width"),
            )
        })
    }
}

impl WeightSource for GgufSource<'_> {
    fn read(&mut self, hf_name: &str) -> Result<Option<HostTensor>> {
        let Some(name) = self.present(hf_name) else {
            return Ok(None);
        };
        let (shape, values) = self.file.read_f32(&name)?;
        let cols = shape.get(1).copied().unwrap_or(1);
        let values = match self.row_order(&name, shape[0])? {
            Some(order) => rows_in_order(&values, cols, &order),
            None => values,
        };
        Ok(Some((shape, values)))
    }

    fn read_codes(&mut self, hf_name: &str) -> Result<Option<(Vec<usize>, BlockCodes)>> {
        let Some(name) = self.present(hf_name) else {
            return Ok(None);
        };
        let Some((shape, codes)) = self.file.read_codes(&name)? else {
            return Ok(None);
        };
        let cols = shape.get(1).copied().unwrap_or(1);
        let codes = match self.row_order(&name, shape[0])? {
            // A row that does not hold whole blocks cannot be moved as codes: leave it unpacked.
            Some(order) => match codes.permute_rows(cols, &order) {
                Some(c) => c,
                None => return Ok(None),
            },
            None => codes,
        };
        Ok(Some((shape, codes)))
    }

    fn origin(&self) -> String {
        self.file.path().display().to_string()
    }
}

/// Undoes llama.cpp's `permute` of a `[rows, cols]` query or key weight (or bias, `cols = 1`):
/// within each head of `rows / heads` rows, GGUF row `2 j + c` holds Hugging Face row
/// `c * half + j`.
#[cfg(test)]
pub(crate) fn unpermute_rows(
    values: &[f32],
    heads: usize,
    rows: usize,
    cols: usize,
) -> Option<Vec<f32>> {
    Some(rows_in_order(values, cols, &unpermuted_order(heads, rows)?))
}

/// The GGUF row each Hugging Face row of a permuted query or key weight is read from.
fn unpermuted_order(heads: usize, rows: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return None;
    }
    let (dim, half) = (rows / heads, rows / heads / 2);
    let mut order = vec![0; rows];
    for h in 0..heads {
        for j in 0..half {
            for c in 0..2 {
                order[h * dim + c * half + j] = h * dim + 2 * j + c;
            }
        }
    }
    Some(order)
}
