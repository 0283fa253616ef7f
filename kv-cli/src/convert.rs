//! `kv convert`: turn a trained grouped-attention checkpoint into one with a smaller cache
//! (fewer KV heads by mean-pooling, or a multi-head latent by truncated SVD), ready for
//! `kv train --init`.

use crate::backend::BackendJob;
use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, Result};
use kv_models::{load_model, save_model, to_grouped, to_latent, to_partial_rope};
use std::path::PathBuf;

/// Flags of `kv convert`.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// The checkpoint to convert.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    pub from: Option<PathBuf>,
    /// A pretrained model to convert instead: a `.gguf` file, a Hugging Face folder, or `smollm2`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Target: `gqa:kv_heads=N`, `mqa`, or `mla:d_c=N[,rope_dims=R]` (latent width; the RoPE
    /// part keeps a partial-RoPE model's `rope_dims`; a model that rotates every dim first keeps
    /// only its `R` fastest-rotating dims, MHA2MLA's partial RoPE).
    #[arg(long)]
    pub to: String,
    /// Folder for the converted checkpoint (weights and config).
    #[arg(long)]
    pub out: PathBuf,
}

/// A parsed conversion target.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Grouped(usize),
    /// Latent width and, for a full-RoPE model, the dims that keep RoPE.
    Latent(usize, Option<usize>),
}

fn parse_target(spec: &str) -> Result<Target> {
    let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let mut pairs = Vec::new();
    for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| KvError::config("--to parameter", pair, "key=value"))?;
        let n: usize = v
            .parse()
            .map_err(|_| KvError::config(format!("--to {k}"), v, "a positive integer"))?;
        pairs.push((k.to_string(), n));
    }
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let allow = |keys: &[&str]| match pairs.iter().find(|(k, _)| !keys.contains(&k.as_str())) {
        Some((k, _)) => Err(KvError::Unknown {
            kind: format!("{name} parameter"),
            name: k.clone(),
            valid: keys.join(", "),
        }),
        None => Ok(()),
    };
    match name {
        "gqa" => {
            allow(&["kv_heads"])?;
            Ok(Target::Grouped(get("kv_heads").ok_or_else(|| {
                KvError::config("--to gqa", spec, "gqa:kv_heads=N")
            })?))
        }
        "mqa" => {
            allow(&[])?;
            Ok(Target::Grouped(1))
        }
        "mla" => {
            allow(&["d_c", "rope_dims"])?;
            Ok(Target::Latent(
                get("d_c")
                    .ok_or_else(|| KvError::config("--to mla", spec, "mla:d_c=N (latent width)"))?,
                get("rope_dims"),
            ))
        }
        other => Err(KvError::Unknown {
            kind: "conversion target".into(),
            name: other.into(),
            valid: "gqa:kv_heads=N, mqa, mla:d_c=N[,rope_dims=R]".into(),
        }),
    }
}

/// What a conversion did, for the command's one-line report.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// KV bytes per token before and after.
    pub bytes_per_token: (usize, usize),
    /// Worst per-layer relative error of the latent factorisation (MLA only).
    pub latent_error: Option<f64>,
}

impl BackendJob for ConvertArgs {
    type Output = ConvertReport;

    fn run<B: Backend>(self, device: B::Device) -> Result<ConvertReport> {
        let target = parse_target(&self.to)?;
        if self.out.join(kv_models::CHECKPOINT_FILE).exists() {
            return Err(KvError::io(
                &self.out,
                "already holds a checkpoint; choose another --out",
            ));
        }
        let (model, config, tokenizer) = match (&self.from, &self.model) {
            (Some(dir), _) => {
                let (m, c) = load_model::<B>(dir, &device)?;
                (m, c, kv_models::Tokenizer::for_run(dir)?)
            }
            (None, Some(path)) => {
                let source = crate::model_source::pretrained(path)?;
                // A folder of weights alone converts too; the result then reads bytes.
                let tokenizer = if source.has_tokenizer() {
                    source.tokenizer()?
                } else {
                    kv_models::Tokenizer::Bytes
                };
                let (m, c) = source.load_model::<B>(&device)?;
                (m, c, tokenizer)
            }
            (None, None) => {
                return Err(KvError::config(
                    "--from",
                    "missing",
                    "a checkpoint (--from DIR) or a pretrained model (--model PATH)",
                ));
            }
        };
        let before = config.kv_bytes_per_token();
        let (model, config, latent_error) = match target {
            Target::Grouped(kv) => {
                let (m, c) = to_grouped(&model, &config, kv)?;
                (m, c, None)
            }
            Target::Latent(d_c, rope_dims) => {
                let (model, config) = match (rope_dims, config.rope_dims) {
                    (Some(r), None) => to_partial_rope(&model, &config, r)?,
                    (Some(r), Some(have)) if r != have => {
                        return Err(KvError::config(
                            "--to mla rope_dims",
                            r,
                            format!("{have} (the model's own partial RoPE) or absent"),
                        ));
                    }
                    _ => (model, config),
                };
                let (m, c, report) = to_latent(&model, &config, d_c)?;
                let worst = report.latent_error.iter().copied().fold(0.0f64, f64::max);
                (m, c, Some(worst))
            }
        };
        save_model(&model, &config, &self.out)?;
        // The converted model reads text exactly as its source did.
        tokenizer.save_to_run(&self.out)?;
        Ok(ConvertReport {
            bytes_per_token: (before, config.kv_bytes_per_token()),
            latent_error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_name_the_value() {
        assert_eq!(parse_target("gqa:kv_heads=2").unwrap(), Target::Grouped(2));
        assert_eq!(parse_target("mqa").unwrap(), Target::Grouped(1));
        assert_eq!(
            parse_target("mla:d_c=64").unwrap(),
            Target::Latent(64, None)
        );
        assert_eq!(
            parse_target("mla:d_c=64,rope_dims=16").unwrap(),
            Target::Latent(64, Some(16))
        );
        for (bad, needle) in [
            ("gqa", "gqa:kv_heads=N"),
            ("mla:d_c=x", "= x"),
            ("mla:d_r=4", "d_r"),
            ("moe", "moe"),
            ("gqa:kv_heads", "key=value"),
        ] {
            let e = parse_target(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
