//! Building a [`DecoderLm`] from the named tensors of a Llama-family checkpoint, whatever file
//! they came from: every format maps its names to Hugging Face's and hands over plain f32 rows (and a
//! quantised file, on request, its codes).

use super::gguf::BlockCodes;
use crate::model::config::DecoderConfig;
use crate::model::decoder::DecoderLm;
use burn::module::{ModuleVisitor, Param};
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::TensorData;
use kv_attention::{PACKED_BLOCK, PackedMatrix, PackedSet};
use kv_core::{KvError, Result};

/// A tensor read from a checkpoint: row-major shape (PyTorch's) and f32 values.
pub(crate) type HostTensor = (Vec<usize>, Vec<f32>);

/// Where a loader reads tensors from, by their Hugging Face Llama name
/// (`model.layers.0.self_attn.q_proj.weight`), already in Hugging Face's layout.
pub(crate) trait WeightSource {
    /// The tensor of that name, or None if the checkpoint has none.
    fn read(&mut self, hf_name: &str) -> Result<Option<HostTensor>>;
    /// The same tensor as quantised codes, or None if it is not quantised (or not here).
    fn read_codes(&mut self, _hf_name: &str) -> Result<Option<(Vec<usize>, BlockCodes)>> {
        Ok(None)
    }
    /// The checkpoint, for error messages.
    fn origin(&self) -> String;
}

struct Builder<'a, B: Backend> {
    src: &'a mut dyn WeightSource,
    device: &'a B::Device,
    /// Whether to keep packed copies of quantised weights (host kernels on, no autodiff).
    pack: bool,
}

impl<B: Backend> Builder<'_, B> {
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (got, values) = self.src.read(name)?.ok_or_else(|| {
            KvError::io(
                self.src.origin(),
                format!("checkpoint has no tensor {name}"),
            )
        })?;
        if got != shape {
            return Err(KvError::io(
                self.src.origin(),
                format!("tensor {name} has shape {got:?}, but the config makes it {shape:?}"),
            ));
        }
        // A NaN or inf weight would only show later as NaN logits (greedy picks token 0), so it
        // is refused here, by name.
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(KvError::io(
                self.src.origin(),
                format!(
                    "tensor {name} holds {} at index {i}; weights must be finite numbers",
                    values[i]
                ),
            ));
        }
        Ok(values)
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Param<Tensor<B, 1>>> {
        let v = self.read(name, &[n])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(v, [n]),
            self.device,
        )))
    }

    /// A PyTorch `[out, in]` weight as burn's `[in, out]`.
    fn matrix_t(&mut self, name: &str, out: usize, inp: usize) -> Result<Param<Tensor<B, 2>>> {
        let v = self.read(name, &[out, inp])?;
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(transpose(&v, out, inp), [inp, out]),
            self.device,
        )))
    }

    /// Reads a linear layer; returns its packed copy when packing is on and its weight is stored
    /// in 32-value blocks.
    fn linear(
        &mut self,
        layer: &mut Linear<B>,
        prefix: &str,
        out: usize,
        inp: usize,
    ) -> Result<Option<PackedMatrix>> {
        let name = format!("{prefix}.weight");
        layer.weight = self.matrix_t(&name, out, inp)?;
        if layer.bias.is_some() {
            layer.bias = Some(self.vector(&format!("{prefix}.bias"), out)?);
        }
        self.packed(&name, out, inp)
    }

    /// Tensor `name` `[out, inp]` as a packed matrix, when packing is on and it is quantised in
    /// 32-value blocks (Q6_K's 16-value blocks stay unpacked).
    fn packed(&mut self, name: &str, out: usize, inp: usize) -> Result<Option<PackedMatrix>> {
        if !self.pack {
            return Ok(None);
        }
        match self.src.read_codes(name)? {
            Some((shape, c)) if c.block == PACKED_BLOCK && shape == [out, inp] => {
                PackedMatrix::new(out, inp, &c.codes, c.scales, c.offsets).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// `[rows, cols]` row-major values as `[cols, rows]` row-major, in tiles that stay in cache.
pub(crate) fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0f32; v.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    out[c * rows + r] = v[r * cols + c];
                }
            }
        }
    }
    out
}

/// A module's packed set, when every one of its matrices could be packed (else none: the module
/// then runs on its f32 weights alone).
fn packed_set<const N: usize>(matrices: [Option<PackedMatrix>; N]) -> PackedSet<N> {
    if matrices.iter().all(Option::is_some) {
        PackedSet::new(matrices.map(|m| m.expect("all present")))
    } else {
        PackedSet::default()
    }
}

struct Unset(usize);

impl<B: Backend> ModuleVisitor<B> for Unset {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 += usize::from(!param.is_initialized());
    }
}

/// A Llama-style model with `config`'s shape and every weight read from `src`.
///
/// The model is built without random initialisation (burn's parameters are lazy and every one is
/// replaced); a parameter the mapping below missed would stay lazy and silently random, so the
/// build ends by checking that none is left.
pub(crate) fn build_llama<B: Backend>(
    config: &DecoderConfig,
    src: &mut dyn WeightSource,
    device: &B::Device,
) -> Result<DecoderLm<B>> {
    if config.mla.is_some()
        || config.yoco.is_some()
        || config.token_shift
        || config.key_shift == Some(true)
        || config.rope_dims.is_some()
    {
        return Err(KvError::config(
            "pretrained config",
            "mla, yoco, token or key shift, or partial RoPE",
            "a plain Llama layout",
        ));
    }
    let mut model = config.init_lazy::<B>(device)?;
    let (d, v, f) = (config.d_model, config.vocab_size, config.ffn_hidden);
    let hd = config.head_dim();
    let (q_out, kv_out) = (config.n_heads * hd, config.n_kv_heads * hd);
    let mut b = Builder::<B> {
        src,
        device,
        pack: kv_attention::host_kernels_on::<B>(device),
    };
    let embed = b.read("model.embed_tokens.weight", &[v, d])?;
    model.embed.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(embed, [v, d]), device));
    for (i, block) in model.blocks_mut()?.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        block.attn_norm.gamma = b.vector(&format!("{p}.input_layernorm.weight"), d)?;
        block.ffn_norm.gamma = b.vector(&format!("{p}.post_attention_layernorm.weight"), d)?;
        let attn = block.attention.grouped_mut().ok_or_else(|| {
            KvError::config(
                format!("block {i} attention"),
                "latent",
                "grouped (a Llama checkpoint)",
            )
        })?;
        let attention = [
            b.linear(&mut attn.wq, &format!("{p}.self_attn.q_proj"), q_out, d)?,
            b.linear(&mut attn.wk, &format!("{p}.self_attn.k_proj"), kv_out, d)?,
            b.linear(&mut attn.wv, &format!("{p}.self_attn.v_proj"), kv_out, d)?,
            b.linear(&mut attn.wo, &format!("{p}.self_attn.o_proj"), d, q_out)?,
        ];
        attn.packed = packed_set(attention);
        for (norm, name) in [(&mut attn.q_norm, "q_norm"), (&mut attn.k_norm, "k_norm")] {
            if let Some(norm) = norm.as_mut() {
                norm.gamma = b.vector(&format!("{p}.self_attn.{name}.weight"), hd)?;
            }
        }
        let ffn = [
            b.linear(&mut block.ffn.gate, &format!("{p}.mlp.gate_proj"), f, d)?,
            b.linear(&mut block.ffn.up, &format!("{p}.mlp.up_proj"), f, d)?,
            b.linear(&mut block.ffn.down, &format!("{p}.mlp.down_proj"), d, f)?,
        ];
        block.ffn.packed = packed_set(ffn);
    }
    model.norm.gamma = b.vector("model.norm.weight", d)?;
    let head = match model.lm_head.as_mut() {
        Some(head) => {
            head.weight = b.matrix_t("lm_head.weight", v, d)?;
            b.packed("lm_head.weight", v, d)?
        }
        None => b.packed("model.embed_tokens.weight", v, d)?,
    };
    model.packed_head = packed_set([head]);
    let mut unset = Unset(0);
    model.visit(&mut unset);
    if unset.0 > 0 {
        return Err(KvError::config(
            "loaded parameters",
            format!("{} left unset", unset.0),
            "every parameter read from the checkpoint",
        ));
    }
    Ok(crate::model::ordinal::ordinal_ids(model))
}
