//! Converting a trained grouped-attention model into one with a smaller cache: fewer KV heads
//! (GQA/MQA, by mean-pooling), a latent cache (MLA, by truncated SVD) or merged slots (DMC, by
//! repurposing a channel), as a starting point for uptraining instead of training from scratch. The reasoning is in docs/conversion.md.

use crate::model::attention::SelfAttention;
use crate::model::config::{DecoderConfig, DmcSettings, MlaSettings};
use crate::model::decoder::DecoderLm;
use burn::module::Param;
use burn::prelude::*;
use kv_attention::GroupedAttention;
use kv_core::readback::ReadBack;
use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};

/// A copy of `model` whose layers have `kv_heads` KV heads, each the mean of the K and V
/// projection columns of a contiguous group of the old KV heads (Ainslie et al., 2023).
///
/// Query and output projections are unchanged, and query head `h` reads new KV head
/// `h * kv_heads / n_heads`, the group its old KV head was pooled into. Pooling before RoPE is
/// exact for RoPE's part, which is linear and the same for every head; when the heads of a group
/// already have identical projections, the logits do not change at all.
pub fn to_grouped<B: Backend>(
    model: &DecoderLm<B>,
    config: &DecoderConfig,
    kv_heads: usize,
) -> Result<(DecoderLm<B>, DecoderConfig)> {
    if config.mla.is_some() {
        return Err(KvError::config(
            "model attention",
            "mla",
            "a grouped (MHA/GQA/MQA) model to pool KV heads of",
        ));
    }
    if config.yoco.is_some() {
        return Err(KvError::config(
            "model attention",
            "yoco",
            "a grouped (MHA/GQA/MQA) model to pool KV heads of",
        ));
    }
    let old = config.n_kv_heads;
    if kv_heads == 0 || !old.is_multiple_of(kv_heads) {
        return Err(KvError::config(
            "kv_heads",
            kv_heads,
            format!(
                "a divisor of the model's n_kv_heads = {old} (each new head pools a contiguous group of old ones)"
            ),
        ));
    }
    let new_config = DecoderConfig {
        n_kv_heads: kv_heads,
        ..config.clone()
    };
    new_config.validate()?;
    let device = model.embed.weight.device();
    let mut out = model.clone();
    for (i, block) in out.blocks_mut()?.iter_mut().enumerate() {
        let src = grouped_block(block.attention.grouped(), i, config)?;
        let d = src.head_dim();
        let pool = |w: Tensor<B, 2>| {
            let d_model = w.dims()[0];
            w.reshape([d_model, kv_heads, old / kv_heads, d])
                .mean_dim(2)
                .reshape([d_model, kv_heads * d])
        };
        // A bias is one more input row of its projection: pooled the same way.
        let pool_bias = |b: &Param<Tensor<B, 1>>| {
            Param::from_tensor(pool(b.val().reshape([1, old * d])).reshape([kv_heads * d]))
        };
        let mut attn = new_config.attention().init::<B>(&device)?;
        attn.wq = src.wq.clone();
        attn.wo = src.wo.clone();
        attn.rope = src.rope.clone();
        attn.key_mix = src.key_mix.clone();
        // One gain per head dim, shared by every head: it applies to a pooled key as it did.
        attn.q_norm = src.q_norm.clone();
        attn.k_norm = src.k_norm.clone();
        attn.wk.weight = Param::from_tensor(pool(src.wk.weight.val()));
        attn.wv.weight = Param::from_tensor(pool(src.wv.weight.val()));
        attn.wk.bias = src.wk.bias.as_ref().map(pool_bias);
        attn.wv.bias = src.wv.bias.as_ref().map(pool_bias);
        block.attention = SelfAttention::Grouped(attn);
    }
    Ok((out, new_config))
}

/// How faithful a latent conversion is, per layer (0 = exact).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentConversion {
    /// Relative Frobenius error `|M - M_k| / |M|` of the rank-`kv_latent` approximation of the
    /// stacked `M = [W_K (unrotated dims) | W_V]`: `sqrt(sum of the dropped sigma^2 / sum of all)`.
    pub latent_error: Vec<f64>,
    /// Relative Frobenius distance `|W_rot - mean| / |W_rot|` of the heads' rotated key
    /// projections from their mean, which becomes the one shared `W_KR` (0 when heads share it).
    pub rope_error: Vec<f64>,
    /// Singular values of each layer's `M`, in descending order (for choosing `kv_latent`).
    pub singular_values: Vec<Vec<f64>>,
}

/// A copy of `model` with multi-head latent attention of latent width `kv_latent`, built from
/// each layer's K and V projections by truncated SVD (MHA2MLA-style), plus a report of what the
/// truncation and the shared RoPE key lost.
///
/// The model must use partial RoPE (`rope_dims = r < head_dim`): the `r` rotated dims of every
/// key become the shared RoPE key `W_KR` (the mean over heads of their projections), and the
/// `head_dim - r` unrotated key dims and all value dims are stacked into
/// `M = [W_K_nope | W_V]` `[d_model, heads * (2 head_dim - r)]`, factored as
/// `M ~ (U_k S_k^1/2) (S_k^1/2 V_k^T)` = `W_DKV W_UKV`. Queries are the old ones with each head's
/// two parts swapped to MLA's `[content | rope]` order; `W_O` is unchanged. The latent carries no
/// RMSNorm (`latent_norm: false`), so with `kv_latent >= rank M` and heads that share their rotated
/// key projection the converted model reproduces the original's logits.
pub fn to_latent<B: Backend>(
    model: &DecoderLm<B>,
    config: &DecoderConfig,
    kv_latent: usize,
) -> Result<(DecoderLm<B>, DecoderConfig, LatentConversion)> {
    if config.mla.is_some() {
        return Err(KvError::config(
            "model attention",
            "mla",
            "a grouped (MHA/GQA/MQA) model to compress",
        ));
    }
    if config.yoco.is_some() {
        return Err(KvError::config(
            "model attention",
            "yoco",
            "a grouped (MHA/GQA/MQA) model to compress",
        ));
    }
    let (h, d_h) = (config.n_heads, config.head_dim());
    let r = match config.rope_dims {
        Some(r) if r < d_h => r,
        other => {
            return Err(KvError::config(
                "rope_dims",
                other.map_or("null (all dims rotated)".to_string(), |r| r.to_string()),
                format!(
                    "fewer than head_dim = {d_h}: MLA's latent keys carry no position, so only the unrotated dims of a partial-RoPE model can be compressed"
                ),
            ));
        }
    };
    if config.key_shift == Some(true) {
        return Err(KvError::config(
            "key_shift",
            true,
            "a model without key shift: MLA's latent is key and value at once, so it has no key-only input to shift",
        ));
    }
    if config.qkv_bias == Some(true) {
        return Err(KvError::config(
            "qkv_bias",
            true,
            "a model without q/k/v biases: MLA's projections have none",
        ));
    }
    if config.qk_norm == Some(true) {
        return Err(KvError::config(
            "qk_norm",
            true,
            "a model without QK-norm: a latent key is not one head's normalised key",
        ));
    }
    let nope = d_h - r;
    let settings = MlaSettings {
        value_dim: Some(d_h),
        latent_norm: false,
        ..MlaSettings::new(nope, kv_latent, r)
    };
    let new_config = DecoderConfig {
        n_kv_heads: 1,
        rope_dims: None,
        mla: Some(settings),
        ..config.clone()
    };
    new_config.validate()?;
    let mla_config = new_config
        .mla_attention()
        .expect("mla settings were just set");
    let device = model.embed.weight.device();
    let mut report = LatentConversion {
        latent_error: vec![],
        rope_error: vec![],
        singular_values: vec![],
    };
    let mut out = model.clone();
    for (i, block) in out.blocks_mut()?.iter_mut().enumerate() {
        let src = grouped_block(block.attention.grouped(), i, config)?;
        let d = src.wq.weight.dims()[0];
        let kv = src.n_kv_heads();
        // Every query head's own K/V columns (a GQA group's heads read the same ones).
        let per_query_head = |w: Tensor<B, 2>| {
            w.reshape([d, kv, 1, d_h])
                .expand([d, kv, h / kv, d_h])
                .reshape([d, h, d_h])
        };
        let wk = per_query_head(src.wk.weight.val());
        let wv = per_query_head(src.wv.weight.val()).reshape([d, h * d_h]);
        let rot = wk.clone().narrow(2, 0, r);
        let w_kr = rot.clone().mean_dim(1).reshape([d, r]);
        report
            .rope_error
            .push(relative(rot.clone() - w_kr.clone().reshape([d, 1, r]), rot));
        let stacked = Tensor::cat(
            vec![wk.clone().narrow(2, r, nope).reshape([d, h * nope]), wv],
            1,
        );
        let (down, up, sigma) = truncated_svd(stacked, kv_latent, i)?;
        let dropped: f64 = sigma.iter().skip(kv_latent).map(|s| s * s).sum();
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        report.latent_error.push(if total > 0.0 {
            (dropped / total).sqrt()
        } else {
            0.0
        });
        report.singular_values.push(sigma);
        let wq = src.wq.weight.val().reshape([d, h, d_h]);
        let wq = Tensor::cat(vec![wq.clone().narrow(2, r, nope), wq.narrow(2, 0, r)], 2)
            .reshape([d, h * d_h]);
        let mut mla = mla_config.init::<B>(&device)?;
        mla.wq.weight = Param::from_tensor(wq);
        mla.wkv_down.weight = Param::from_tensor(down);
        mla.wk_rope.weight = Param::from_tensor(w_kr);
        mla.wk_up.weight = Param::from_tensor(up.clone().narrow(1, 0, h * nope));
        mla.wv_up.weight = Param::from_tensor(up.narrow(1, h * nope, h * d_h));
        mla.wo = src.wo.clone();
        block.attention = SelfAttention::Latent(mla);
    }
    Ok((out, new_config, report))
}

/// A copy of a full-RoPE grouped model whose heads rotate only their `rotated` highest-frequency
/// dims (MHA2MLA's partial RoPE, "S_high", Ji et al. 2025), the step that lets a pretrained model
/// such as SmolLM2 be converted to MLA.
///
/// In the rotate-half layout, pair `(i, i + d/2)` turns at `theta^(-2i/d)`. The `rotated / 2`
/// fastest pairs are moved to the front of each query and key head, in the order partial RoPE
/// rotates (`(j, j + rotated/2)`), and the base becomes `theta^(rotated/d)`, so those dims turn at
/// exactly their old frequencies; the other dims lose their (slow) rotation, which is the one
/// approximation, recovered by uptraining. Values and outputs are unchanged, and since queries
/// and keys are permuted alike, `q . k` of the rotated part is unchanged.
pub fn to_partial_rope<B: Backend>(
    model: &DecoderLm<B>,
    config: &DecoderConfig,
    rotated: usize,
) -> Result<(DecoderLm<B>, DecoderConfig)> {
    if config.mla.is_some() || config.yoco.is_some() {
        return Err(KvError::config(
            "model attention",
            if config.mla.is_some() { "mla" } else { "yoco" },
            "a grouped (MHA/GQA/MQA) model",
        ));
    }
    let d = config.head_dim();
    if let Some(r) = config.rope_dims {
        return Err(KvError::config(
            "rope_dims",
            r,
            "null (a model that rotates every dim); this model already uses partial RoPE",
        ));
    }
    if rotated == 0 || !rotated.is_multiple_of(2) || rotated >= d {
        return Err(KvError::config(
            "rope_dims",
            rotated,
            format!("an even number of rotated dims below head_dim = {d}"),
        ));
    }
    let (half, keep) = (d / 2, rotated / 2);
    // New position p of each head takes old dim order[p].
    let order: Vec<usize> = (0..keep)
        .chain(half..half + keep)
        .chain(keep..half)
        .chain(half + keep..d)
        .collect();
    let theta = config.rope_theta.powf(rotated as f64 / d as f64);
    let new_config = DecoderConfig {
        rope_dims: Some(rotated),
        rope_theta: theta,
        ..config.clone()
    };
    new_config.validate()?;
    let device = model.embed.weight.device();
    let mut out = model.clone();
    for (i, block) in out.blocks_mut()?.iter_mut().enumerate() {
        let src = grouped_block(block.attention.grouped(), i, config)?;
        let permute = |w: Tensor<B, 2>, heads: usize| {
            let rows = w.dims()[0];
            let index: Vec<i32> = (0..heads)
                .flat_map(|h| order.iter().map(move |&o| (h * d + o) as i32))
                .collect();
            w.reshape([rows, heads * d])
                .select(1, Tensor::<B, 1, Int>::from_ints(index.as_slice(), &device))
        };
        let permute_bias = |b: &Param<Tensor<B, 1>>, heads: usize| {
            Param::from_tensor(permute(b.val().reshape([1, heads * d]), heads).reshape([heads * d]))
        };
        let mut attn = new_config.attention().init::<B>(&device)?;
        attn.wq.weight = Param::from_tensor(permute(src.wq.weight.val(), config.n_heads));
        attn.wk.weight = Param::from_tensor(permute(src.wk.weight.val(), config.n_kv_heads));
        attn.wq.bias = src
            .wq
            .bias
            .as_ref()
            .map(|b| permute_bias(b, config.n_heads));
        attn.wk.bias = src
            .wk
            .bias
            .as_ref()
            .map(|b| permute_bias(b, config.n_kv_heads));
        attn.wv = src.wv.clone();
        attn.wo = src.wo.clone();
        attn.key_mix = src.key_mix.clone();
        // QK-norm's gains move with the dims they scale (the norm itself ignores their order).
        let permute_gain = |n: &Option<burn::nn::RmsNorm<B>>| {
            n.clone().map(|mut n| {
                let g = n.gamma.val().reshape([1, d]);
                n.gamma = Param::from_tensor(permute(g, 1).reshape([d]));
                n
            })
        };
        attn.q_norm = permute_gain(&src.q_norm);
        attn.k_norm = permute_gain(&src.k_norm);
        block.attention = SelfAttention::Grouped(attn);
    }
    Ok((out, new_config))
}
/// A copy of `model` whose grouped layers merge tokens into their slots (DMC), retrofitted from
/// its weights: each head's last query and key channel becomes the decision channel, with its
/// weights zeroed, so the copy starts as the model without that channel, appending every token
/// ([`kv_attention::DmcAttentionConfig::retrofit`]); fine-tuning with a compression target
/// (`TrainConfig::dmc`) then teaches it to merge. The returned config records `settings`.
pub fn to_dmc<B: Backend>(
    model: &DecoderLm<B>,
    config: &DecoderConfig,
    settings: DmcSettings,
) -> Result<(DecoderLm<B>, DecoderConfig)> {
    for (kind, set) in [
        ("mla", config.mla.is_some()),
        ("yoco", config.yoco.is_some()),
        ("dmc", config.dmc.is_some()),
    ] {
        if set {
            return Err(KvError::config(
                "model attention",
                kind,
                "a grouped (MHA/GQA/MQA) model without DMC to retrofit",
            ));
        }
    }
    let new_config = DecoderConfig {
        dmc: Some(settings),
        ..config.clone()
    };
    new_config.validate()?;
    let dmc = new_config
        .dmc_attention()
        .expect("dmc settings were just set");
    let mut out = model.clone();
    for (i, block) in out.blocks_mut()?.iter_mut().enumerate() {
        let src = grouped_block(block.attention.grouped(), i, config)?.clone();
        block.attention = SelfAttention::Dmc(dmc.retrofit(src)?);
    }
    Ok((out, new_config))
}

fn grouped_block<'a, B: Backend>(
    attn: Option<&'a GroupedAttention<B>>,
    layer: usize,
    config: &DecoderConfig,
) -> Result<&'a GroupedAttention<B>> {
    let attn = attn.ok_or_else(|| {
        KvError::config(
            format!("block {layer} attention"),
            "not grouped",
            "a grouped attention layer",
        )
    })?;
    if attn.n_kv_heads() != config.n_kv_heads || attn.n_heads() != config.n_heads {
        return Err(KvError::config(
            format!("block {layer} heads"),
            format!("{}/{}", attn.n_heads(), attn.n_kv_heads()),
            format!(
                "{}/{} as the config says",
                config.n_heads, config.n_kv_heads
            ),
        ));
    }
    Ok(attn)
}

/// `|a| / |b|` in the Frobenius norm (0 when `b` is 0).
fn relative<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let norm = |t: Tensor<B, D>| t.powi_scalar(2).sum().read_scalar().sqrt();
    let nb = norm(b);
    if nb > 0.0 { norm(a) / nb } else { 0.0 }
}

/// Rank-`k` factors of `m` `[rows, cols]`: `down = U_k S_k^1/2` `[rows, k]`, `up = S_k^1/2 V_k^T`
/// `[k, cols]`, and every singular value in descending order. Columns past the rank are zero.
fn truncated_svd<B: Backend>(
    m: Tensor<B, 2>,
    k: usize,
    layer: usize,
) -> Result<(Tensor<B, 2>, Tensor<B, 2>, Vec<f64>)> {
    let [rows, cols] = m.dims();
    let device = m.device();
    let values: Vec<f64> = m.read_back().iter::<f64>().collect();
    // nalgebra's sorted SVD panics on NaN, so a diverged checkpoint is an error here instead.
    if values.iter().any(|v| !v.is_finite()) {
        return Err(KvError::config(
            format!("block {layer} K/V weights"),
            "non-finite",
            "finite weights to factor",
        ));
    }
    let svd = nalgebra::DMatrix::from_row_slice(rows, cols, &values)
        .try_svd(true, true, f64::EPSILON, 0)
        .ok_or_else(|| {
            KvError::config(
                format!("block {layer} K/V weights"),
                "no SVD",
                "weights whose SVD converges",
            )
        })?;
    let (Some(u), Some(v_t)) = (svd.u, svd.v_t) else {
        return Err(KvError::config(
            format!("block {layer} K/V weights"),
            "no singular vectors",
            "a complete SVD",
        ));
    };
    let sigma: Vec<f64> = svd.singular_values.iter().copied().collect();
    let kept = k.min(sigma.len());
    let mut down = vec![0.0f32; rows * k];
    let mut up = vec![0.0f32; k * cols];
    for j in 0..kept {
        let s = sigma[j].sqrt();
        for i in 0..rows {
            down[i * k + j] = (u[(i, j)] * s) as f32;
        }
        for c in 0..cols {
            up[j * cols + c] = (v_t[(j, c)] * s) as f32;
        }
    }
    let tensor = |v: Vec<f32>, shape: [usize; 2]| {
        Tensor::<B, 1>::from_floats(v.as_slice(), &device).reshape(shape)
    };
    Ok((tensor(down, [rows, k]), tensor(up, [k, cols]), sigma))
}
