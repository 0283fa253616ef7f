//! `kv bench`: decode throughput against context length, with cache bytes measured from tensors.

use crate::backend::{BackendJob, DeviceKind};
use crate::model_source::ModelArgs;
use burn::prelude::*;
use burn::tensor::Distribution;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_core::{KvError, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `kv bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// KV head counts to compare (each replaces the model's `n_kv_heads`).
    #[arg(long, value_delimiter = ',', default_value = "8,2,1")]
    pub kv_heads: Vec<usize>,
    /// Context lengths (tokens already cached) at which decode is timed.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    pub contexts: Vec<usize>,
    /// Timed decode steps per cell (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Folder for bench.json and bench.md.
    #[arg(long, default_value = "runs/bench")]
    pub out: PathBuf,
}

/// One measured cell.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeCell {
    /// Backend name.
    pub device: String,
    /// KV heads of the model.
    pub kv_heads: usize,
    /// Tokens in the cache when the timed steps start.
    pub context: usize,
    /// Decode steps per second (one token each, batch 1).
    pub tokens_per_s: f64,
    /// Mean milliseconds per decode step.
    pub ms_per_step: f64,
    /// Microseconds to append one token's K/V to one layer's cache at this context, averaged
    /// over whole tail-flush cycles: flat-ish across contexts when appends do not copy the cache.
    pub append_us: f64,
    /// Key/value bytes per token, measured from the cache tensors held after the run.
    pub kv_bytes_per_token: f64,
    /// Key/value bytes held after the run.
    pub kv_bytes: usize,
}

/// Runs the decode benchmark on one backend.
pub struct DecodeBench {
    /// The flags.
    pub args: BenchArgs,
    /// The backend, for the results.
    pub device: DeviceKind,
}

impl BackendJob for DecodeBench {
    type Output = Vec<DecodeCell>;

    fn run<B: Backend>(self, device: B::Device) -> Result<Vec<DecodeCell>> {
        let args = &self.args;
        if args.steps == 0 {
            return Err(KvError::config("--steps", 0, "at least 1"));
        }
        let base = args.model.config("decode-bench")?;
        let cells = args.kv_heads.len() * args.contexts.len();
        let bar = ProgressBar::new(cells as u64).with_style(
            ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {elapsed}").unwrap().progress_chars("=> "),
        );
        let mut out = Vec::new();
        for &kv in &args.kv_heads {
            let mut config = base.clone();
            config.n_kv_heads = kv;
            config.validate()?;
            B::seed(&device, args.model.init_seed);
            let model = config.init::<B>(&device)?;
            for &context in &args.contexts {
                bar.set_message(format!("{} kv={kv} ctx={context}", self.device.name()));
                let mut cache = model.new_cache(1);
                let appends = args.steps.max(2 * kv_core::TAIL_SLOTS);
                cache.reserve(context + args.steps + appends + 2);
                // Decode cost depends on the cache's size, not its content, so synthetic K/V
                // stand in for a prefill that would cost minutes at 8k on a CPU.
                let shape = cache.layer(0).shape();
                for layer in cache.layers_mut() {
                    let kv_shape = [1, shape.kv_heads, context, shape.key_dim];
                    layer.append(
                        Tensor::random(kv_shape, Distribution::Normal(0.0, 1.0), &device),
                        Tensor::random(kv_shape, Distribution::Normal(0.0, 1.0), &device),
                    )?;
                }
                let step = |cache: &mut kv_core::ModelCache<B>, token: i32| -> Result<()> {
                    let input = Tensor::<B, 1, Int>::from_ints([token], &device).reshape([1, 1]);
                    let logits = model.forward_cached(input, cache)?;
                    // Read the logits back, as generation does: this is also the device sync.
                    let _ = logits.into_data();
                    Ok(())
                };
                for i in 0..2 {
                    step(&mut cache, i)?;
                }
                let start = Instant::now();
                for i in 0..args.steps {
                    step(&mut cache, (i % 256) as i32)?;
                }
                let secs = start.elapsed().as_secs_f64();
                let stats = cache.stats();
                let layer = cache.layer_mut(0);
                let row = [1, shape.kv_heads, 1, shape.key_dim];
                let (k, v) = (Tensor::<B, 4>::zeros(row, &device), Tensor::<B, 4>::zeros(row, &device));
                let _ = B::sync(&device);
                let start = Instant::now();
                // Whole flush cycles, so the body rewrite every TAIL_SLOTS tokens is amortised in.
                for _ in 0..appends {
                    layer.append(k.clone(), v.clone())?;
                }
                let _ = B::sync(&device);
                let append_us = start.elapsed().as_secs_f64() * 1e6 / appends as f64;
                out.push(DecodeCell {
                    device: self.device.name().into(),
                    kv_heads: kv,
                    context,
                    tokens_per_s: args.steps as f64 / secs,
                    ms_per_step: secs * 1e3 / args.steps as f64,
                    append_us,
                    kv_bytes_per_token: stats.kv_bytes_per_token(),
                    kv_bytes: stats.kv_bytes,
                });
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok(out)
    }
}

/// The Markdown table of a decode benchmark.
pub fn markdown(cells: &[DecodeCell]) -> String {
    let mut s = String::from(
        "| device | kv_heads | context | decode tokens/s | ms/step | append µs/layer | KV bytes/token (measured) |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in cells {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.1} | {:.0} |\n",
            c.device, c.kv_heads, c.context, c.tokens_per_s, c.ms_per_step, c.append_us, c.kv_bytes_per_token
        );
    }
    s
}

/// Writes `bench.json` and `bench.md` into `dir`.
pub fn write_results(dir: &std::path::Path, cells: &[DecodeCell]) -> Result<()> {
    let json = serde_json::to_string_pretty(cells).map_err(|e| KvError::io(dir, e))?;
    kv_models::write_atomic(&dir.join("bench.json"), json.as_bytes())?;
    kv_models::write_atomic(&dir.join("bench.md"), markdown(cells).as_bytes())
}
