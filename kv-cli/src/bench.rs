//! `kv bench`: cache bytes per token (measured from the tensors held), prefill time, decode
//! tokens/s against context length, each policy's own time per step, and training tokens/s.

use crate::backend::{BackendJob, DeviceKind};
use crate::model_source::ModelArgs;
use crate::plot::{Chart, Series, line_chart};
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::Distribution;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_attention::{Observation, ObserveRequest};
use kv_core::readback::ReadBack;
use kv_core::{KvError, LayerCache, Result};
use kv_models::ModelState;
use kv_models::train::{TrainConfig, Trainer};
use kv_models::{DecoderConfig, DecoderLm, preset};
use kv_policies::{CachePolicy, LayerContext, Phase, PolicyEnv, TokenClasses};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Flags of `kv bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// KV head counts to compare, each replacing the model's `n_kv_heads` (random weights only;
    /// default: the model's own).
    #[arg(long, value_delimiter = ',')]
    pub kv_heads: Vec<usize>,
    /// Context lengths (tokens already cached) at which decode is timed.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    pub contexts: Vec<usize>,
    /// Timed decode steps per cell (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    pub steps: usize,
    /// Policy specs to time (with their budgets, e.g. `h2o:budget=1024`); any policy other than
    /// `full` runs after a real prefill, since it needs the prompt's attention.
    #[arg(long, value_delimiter = ',', default_value = "full")]
    pub policy: Vec<String>,
    /// Also time a real prefill for the full cache (otherwise its cache is filled with random K/V,
    /// because decode cost depends on the cache's size, not its content).
    #[arg(long)]
    pub prefill: bool,
    /// Training steps to time for training tokens/s (0: skip).
    #[arg(long, default_value_t = 0)]
    pub train_steps: usize,
    /// Skip measuring the read bandwidth (and so the roofline columns): its 256 MiB buffer would
    /// otherwise set the process's peak RSS, which a peer benchmark compares.
    #[arg(long)]
    pub no_roofline: bool,
    /// Folder for bench.json, bench.md and the charts.
    #[arg(long, default_value = "runs/bench")]
    pub out: PathBuf,
}

/// One measured decode cell.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeCell {
    /// Backend name.
    pub device: String,
    /// The model's label (preset, checkpoint folder, or `kv=N` variant).
    pub model: String,
    /// KV heads of the model.
    pub kv_heads: usize,
    /// Tokens in the context when the timed steps start.
    pub context: usize,
    /// The policy spec.
    pub policy: String,
    /// Milliseconds of the prompt's forward pass (policy included), when a real prefill ran.
    pub prefill_ms: Option<f64>,
    /// Tensor reads back to the host during that prefill (logits included), when one ran.
    #[serde(default)]
    pub prefill_host_reads: Option<u64>,
    /// Peak host memory the prefill added (activations, scores, cache), counted by the global
    /// allocator; CPU backends only (a GPU's tensors are not on this heap).
    #[serde(default)]
    pub prefill_peak_mib: Option<f64>,
    /// Decode steps timed: `--steps`, rounded up to whole compaction cycles
    /// ([`kv_core::TAIL_SLOTS`]) for a policy.
    #[serde(default)]
    pub steps: usize,
    /// Decode steps per second (one token each, batch 1).
    pub tokens_per_s: f64,
    /// Mean milliseconds per decode step.
    pub ms_per_step: f64,
    /// Mean milliseconds per decode step spent in the policy's hooks (all layers).
    pub policy_ms_per_step: f64,
    /// Tensor reads back to the host per decode step, the whole model and policy (counted by
    /// `kv_core::readback`; the logits the sampler reads are one). On a GPU backend each is a
    /// transfer and a sync; a CPU backend's host kernels read its memory in place, uncounted.
    #[serde(default)]
    pub host_reads_per_step: f64,
    /// Microseconds to append one token's K/V to one layer's cache, averaged over whole
    /// tail-flush cycles: flat-ish across contexts when appends do not copy the cache.
    pub append_us: f64,
    /// Key/value bytes per token seen, measured from the cache tensors held after the run.
    pub kv_bytes_per_token: f64,
    /// Key/value bytes held after the run, measured.
    pub kv_bytes: usize,
    /// Slots per KV head in layer 0 after the run.
    pub slots: usize,
    /// Bytes a decode step must read at least: every weight once, plus the K/V (and recurrent
    /// states) held after the run, measured from the tensors.
    #[serde(default)]
    pub bytes_read_per_token: usize,
    /// Tokens/s of a decoder limited only by reading `bytes_read_per_token` at the measured
    /// read bandwidth (the roofline for batch-1 decode, which is memory-bound).
    #[serde(default)]
    pub roofline_tokens_per_s: f64,
}

impl DecodeCell {
    /// Measured decode speed as a share of the roofline figure.
    pub fn roofline_share(&self) -> f64 {
        if self.roofline_tokens_per_s > 0.0 {
            self.tokens_per_s / self.roofline_tokens_per_s
        } else {
            0.0
        }
    }
}

/// Training throughput of one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainCell {
    /// Backend name.
    pub device: String,
    /// The model's label.
    pub model: String,
    /// Trainable parameters.
    pub params: usize,
    /// Tokens per optimiser step.
    pub tokens_per_step: usize,
    /// Training tokens per second (forward, backward and AdamW), after one warm-up step.
    pub tokens_per_s: f64,
}

/// The contents of `bench.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BenchFile {
    /// Read bandwidth measured on the device before the first cell ([`read_bandwidth`]), which
    /// the roofline figures use.
    #[serde(default)]
    pub read_bytes_per_s: f64,
    /// The kernels the cells ran on ([`kv_attention::Kernels::describe`]).
    #[serde(default)]
    pub kernels: String,
    /// Decode cells.
    pub decode: Vec<DecodeCell>,
    /// Training throughput cells.
    pub train: Vec<TrainCell>,
}

/// Times a policy's hooks; the backend is synced around them so the time is the policy's own.
struct TimedPolicy<'a, B: Backend> {
    inner: Box<dyn CachePolicy<B>>,
    device: &'a B::Device,
    spent: Duration,
}

impl<B: Backend> CachePolicy<B> for TimedPolicy<'_, B> {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        self.inner.observe_request(ctx)
    }

    fn after_attention(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        observation: Option<&Observation<B>>,
    ) -> Result<()> {
        let _ = B::sync(self.device);
        let start = Instant::now();
        let r = self.inner.after_attention(ctx, cache, observation);
        let _ = B::sync(self.device);
        self.spent += start.elapsed();
        r
    }
}

/// What to measure for one model.
#[derive(Debug, Clone)]
pub struct DecodePlan {
    /// Contexts to time decode at.
    pub contexts: Vec<usize>,
    /// Timed decode steps per cell.
    pub steps: usize,
    /// Policy specs (budget included).
    pub policies: Vec<String>,
    /// Real prefill for the full cache too.
    pub prefill: bool,
    /// The device's measured read bandwidth (bytes/s, [`read_bandwidth`]), for the roofline.
    pub read_bytes_per_s: f64,
}

fn one_token<B: Backend>(token: i32, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints([token], device).reshape([1, 1])
}

/// Fills every layer with `context` random K/V slots (positions 0..context).
fn synthetic_fill<B: Backend>(
    cache: &mut ModelState<B>,
    context: usize,
    device: &B::Device,
) -> Result<()> {
    let shape = cache.layer(0).shape();
    for layer in cache.layers_mut() {
        let kv_shape = [1, shape.kv_heads, context, shape.key_dim];
        layer.append(
            Tensor::random(kv_shape, Distribution::Normal(0.0, 1.0), device),
            Tensor::random(
                [1, shape.kv_heads, context, shape.value_dim],
                Distribution::Normal(0.0, 1.0),
                device,
            ),
        )?;
    }
    Ok(())
}

/// Bytes of every float parameter of a module, measured from the tensors.
struct WeightBytes(usize);

impl<B: Backend> burn::module::ModuleVisitor<B> for WeightBytes {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
        let t = param.val();
        self.0 += t.dims().iter().product::<usize>() * t.dtype().size();
    }
}

/// Bytes of the model's weights, each of which a decode step reads once (packed ones as their
/// codes).
pub fn weight_bytes<B: Backend>(model: &DecoderLm<B>) -> usize {
    let mut bytes = WeightBytes(0);
    model.visit(&mut bytes);
    // Packed weights are read as their codes, not their f32 copies.
    let (packed_bytes, packed_values) = model.packed_weights();
    bytes.0.saturating_sub(4 * packed_values) + packed_bytes
}

/// Read bandwidth of `device` (bytes per second): the best of five sums over a 256 MiB float
/// tensor, each synced. A sum reads every byte and writes almost nothing, as a decode step
/// reads weights and cache, and it allocates no output that would add page faults to the time.
pub fn read_bandwidth<B: Backend>(device: &B::Device) -> f64 {
    let n = 64 << 20;
    let src = Tensor::<B, 1>::ones([n], device);
    let bytes = (n * src.dtype().size()) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let _ = B::sync(device);
        let start = Instant::now();
        let _ = src.clone().sum().read_back();
        best = best.min(start.elapsed().as_secs_f64());
    }
    bytes / best
}

/// Measures one decode cell of `model`.
pub fn decode_cell<B: Backend>(
    model: &DecoderLm<B>,
    label: &str,
    context: usize,
    policy: &str,
    plan: &DecodePlan,
    device: &B::Device,
    backend: DeviceKind,
) -> Result<DecodeCell> {
    // The prefill below is a synthetic byte stream, so FastGen gets the byte tokenizer's classes:
    // what is measured is the policy's cost, not its choices on real text.
    let env = PolicyEnv::with_classes(TokenClasses::bytes());
    let mut timed = TimedPolicy {
        inner: crate::backend::policies::<B>().build(policy, &env)?,
        device,
        spent: Duration::ZERO,
    };
    // A DMC model's cache is what its merges left: random slots would hold one per token.
    let merges = model
        .blocks()
        .is_ok_and(|blocks| blocks.iter().any(|b| b.attention.dmc().is_some()));
    let evicts = crate::backend::policies::<B>().parse(policy)?.name != "full";
    let real_prefill = plan.prefill || merges || evicts;
    // A per-step policy compacts its lazily evicted slots every TAIL_SLOTS steps: time whole
    // cycles, so that cost is amortised in.
    let steps = if evicts {
        plan.steps.next_multiple_of(kv_core::TAIL_SLOTS)
    } else {
        plan.steps
    };
    let mut cache = model.new_state(1);
    let appends = plan.steps.max(2 * kv_core::TAIL_SLOTS);
    cache.reserve(context + steps + appends + 2);
    let (mut prefill_ms, mut prefill_peak_mib, mut prefill_host_reads) = (None, None, None);
    if real_prefill {
        // A deterministic byte stream: the policy's choices depend on content, its cost hardly.
        let ids: Vec<i32> = (0..context)
            .map(|i| (32 + (i * 7 + i / 13) % 90) as i32)
            .collect();
        let x = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, context]);
        let _ = B::sync(device);
        let base = crate::peak::reset_peak();
        let reads_before = kv_core::readback::count();
        let start = Instant::now();
        // Only the last position's logits, as generation asks for them (and HF's `logits_to_keep=1`).
        let logits = model.forward_last_with_policy(x, &mut cache, &mut timed, Phase::Prefill)?;
        let _ = logits.read_back();
        prefill_ms = Some(start.elapsed().as_secs_f64() * 1e3);
        prefill_host_reads = Some(kv_core::readback::count() - reads_before);
        if backend.is_cpu() {
            prefill_peak_mib = Some((crate::peak::peak() - base) as f64 / (1 << 20) as f64);
        }
    } else {
        synthetic_fill(&mut cache, context, device)?;
    }
    let mut step_no = 0;
    let mut step =
        |cache: &mut ModelState<B>, timed: &mut TimedPolicy<B>, token: i32| -> Result<()> {
            step_no += 1;
            let logits = model.forward_with_policy(
                one_token(token, device),
                cache,
                timed,
                Phase::Decode { step: step_no },
            )?;
            // Read the logits back, as generation does: this is also the device sync.
            let _ = logits.read_back();
            Ok(())
        };
    for i in 0..2 {
        step(&mut cache, &mut timed, 65 + i)?;
    }
    timed.spent = Duration::ZERO;
    let reads_before = kv_core::readback::count();
    let start = Instant::now();
    for i in 0..steps {
        step(&mut cache, &mut timed, 97 + (i % 26) as i32)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let host_reads_per_step = (kv_core::readback::count() - reads_before) as f64 / steps as f64;
    let policy_ms = timed.spent.as_secs_f64() * 1e3 / steps as f64;
    let stats = cache.stats();
    let shape = cache.layer(0).shape();
    let slots = cache.layer(0).live_slots();
    let layer = cache.layer_mut(0);
    let row = [1, shape.kv_heads, 1, shape.key_dim];
    let (k, v) = (
        Tensor::<B, 4>::zeros(row, device),
        Tensor::<B, 4>::zeros([1, shape.kv_heads, 1, shape.value_dim], device),
    );
    let _ = B::sync(device);
    let start = Instant::now();
    // Whole flush cycles, so the body rewrite every TAIL_SLOTS tokens is amortised in.
    for _ in 0..appends {
        layer.append(k.clone(), v.clone())?;
    }
    let _ = B::sync(device);
    let append_us = start.elapsed().as_secs_f64() * 1e6 / appends as f64;
    // Measured before the appends above, so the bytes are those the timed steps read.
    let bytes_read_per_token = weight_bytes(model) + stats.kv_bytes;
    Ok(DecodeCell {
        device: backend.name().into(),
        model: label.into(),
        kv_heads: shape.kv_heads,
        context,
        policy: policy.into(),
        prefill_ms,
        prefill_host_reads,
        prefill_peak_mib,
        steps,
        tokens_per_s: steps as f64 / secs,
        ms_per_step: secs * 1e3 / steps as f64,
        policy_ms_per_step: policy_ms,
        host_reads_per_step,
        append_us,
        kv_bytes_per_token: stats.kv_bytes_per_token(),
        kv_bytes: stats.kv_bytes,
        slots,
        bytes_read_per_token,
        roofline_tokens_per_s: plan.read_bytes_per_s / bytes_read_per_token as f64,
    })
}

/// Training tokens/s of a freshly initialised `config` under `train` (batch and length), timed
/// over `steps` optimiser steps after one warm-up step.
pub fn train_cell<B: Backend>(
    config: &DecoderConfig,
    train: &TrainConfig,
    label: &str,
    steps: usize,
    device: &B::Device,
    backend: DeviceKind,
) -> Result<TrainCell> {
    let mut train = train.clone();
    train.steps = steps + 1;
    // Full-length rows: the curriculum's short stage would time cheaper attention.
    train.short_steps = 0;
    train.eval_every = 0;
    train.checkpoint_every = 0;
    let mut trainer = Trainer::<Autodiff<B>>::new(config.clone(), train.clone(), device)?;
    trainer.train_step()?;
    let start = Instant::now();
    for _ in 0..steps {
        trainer.train_step()?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(TrainCell {
        device: backend.name().into(),
        model: label.into(),
        params: trainer.model().num_params(),
        tokens_per_step: train.tokens_per_step(),
        tokens_per_s: (steps * train.tokens_per_step()) as f64 / secs,
    })
}

/// Runs `kv bench` on one backend.
pub struct BenchJob {
    /// The flags.
    pub args: BenchArgs,
    /// The backend, for the results.
    pub device: DeviceKind,
}

impl BackendJob for BenchJob {
    type Output = BenchFile;

    fn run<B: Backend>(self, device: B::Device) -> Result<BenchFile> {
        let args = &self.args;
        if args.steps == 0 {
            return Err(KvError::config("--steps", 0, "at least 1"));
        }
        if let Some(&c) = args.contexts.iter().find(|&&c| c == 0) {
            return Err(KvError::config(
                "--contexts",
                c,
                "context lengths of at least 1 token",
            ));
        }
        let policies = kv_policies::split_specs(&args.policy);
        for p in &policies {
            crate::backend::policies::<B>()
                .build(p, &PolicyEnv::with_classes(TokenClasses::bytes()))?;
        }
        if !args.kv_heads.is_empty() && args.model.has_weights() {
            return Err(KvError::config(
                "--kv-heads",
                "with trained weights",
                "random-weight models only (a checkpoint or pretrained model has its own heads)",
            ));
        }
        let base = args.model.config("decode-bench")?;
        if let Some(&most) = args.contexts.iter().max() {
            // The cached context must fit; the few timed steps after it only measure speed.
            args.model.check_context(&base, "--contexts", most)?;
        }
        let variants: Vec<(String, Option<usize>)> = if args.kv_heads.is_empty() {
            vec![(args.model.label("decode-bench"), None)]
        } else {
            args.kv_heads
                .iter()
                .map(|&kv| (format!("kv={kv}"), Some(kv)))
                .collect()
        };
        let mut plan = DecodePlan {
            contexts: args.contexts.clone(),
            steps: args.steps,
            policies,
            prefill: args.prefill,
            read_bytes_per_s: 0.0,
        };
        let cells = variants.len() * plan.contexts.len() * plan.policies.len()
            + usize::from(args.train_steps > 0) * variants.len();
        let bar = ProgressBar::new(cells as u64).with_style(
            ProgressStyle::with_template("bench {msg:>36} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap()
                .progress_chars("=> "),
        );
        let mut out = BenchFile::default();
        for (label, kv) in variants {
            let (model, config) = match kv {
                Some(kv) => {
                    let mut config = base.clone();
                    config.n_kv_heads = kv;
                    config.validate()?;
                    B::seed(&device, args.model.init_seed);
                    (config.init::<B>(&device)?, config)
                }
                None => {
                    let loaded = args.model.load::<B>("decode-bench", &device)?;
                    (loaded.model, loaded.config)
                }
            };
            out.kernels = kv_attention::Kernels::current().describe();
            if out.read_bytes_per_s == 0.0 && !args.no_roofline {
                // Once, after every argument and the first model have been checked.
                out.read_bytes_per_s = read_bandwidth::<B>(&device);
                plan.read_bytes_per_s = out.read_bytes_per_s;
            }
            for &context in &plan.contexts {
                for policy in &plan.policies {
                    bar.set_message(format!("{label} {policy} ctx={context}"));
                    out.decode.push(decode_cell(
                        &model,
                        &label,
                        context,
                        policy,
                        &plan,
                        &device,
                        self.device,
                    )?);
                    bar.inc(1);
                }
            }
            if args.train_steps > 0 {
                bar.set_message(format!("{label} training"));
                let recipe = preset("tiny-mha")?.train.expect("tiny-mha has a recipe");
                out.train.push(train_cell::<B>(
                    &config,
                    &recipe,
                    &label,
                    args.train_steps,
                    &device,
                    self.device,
                )?);
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok(out)
    }
}

/// The Markdown tables of a benchmark.
pub fn markdown(file: &BenchFile) -> String {
    let mut s = format!("Kernels: {}.\n\n", file.kernels);
    s += &format!(
        "Roofline: a batch-1 decode step reads every weight and the K/V it holds at least once, so at the measured read bandwidth ({:.1} GB/s) it can run at most `roofline` tokens/s.\n\n",
        file.read_bytes_per_s / 1e9
    );
    s += "| device | model | kv_heads | policy | context | prefill ms | prefill host reads | prefill peak MiB | decode tokens/s | ms/step | policy ms/step | policy share | host reads/step | append µs/layer | KV bytes/token (measured) | slots/head | MiB read/token | roofline tokens/s | share of roofline |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for c in &file.decode {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.3} | {:.0}% | {:.2} | {:.1} | {:.0} | {} | {:.2} | {:.0} | {:.0}% |\n",
            c.device,
            c.model,
            c.kv_heads,
            c.policy,
            c.context,
            c.prefill_ms.map_or("-".into(), |m| format!("{m:.0}")),
            c.prefill_host_reads.map_or("-".into(), |r| r.to_string()),
            c.prefill_peak_mib.map_or("-".into(), |m| format!("{m:.1}")),
            c.tokens_per_s,
            c.ms_per_step,
            c.policy_ms_per_step,
            100.0 * c.policy_ms_per_step / c.ms_per_step,
            c.host_reads_per_step,
            c.append_us,
            c.kv_bytes_per_token,
            c.slots,
            c.bytes_read_per_token as f64 / (1 << 20) as f64,
            c.roofline_tokens_per_s,
            100.0 * c.roofline_share()
        );
    }
    if !file.train.is_empty() {
        s += "\n| device | model | parameters | tokens/step | training tokens/s |\n|---|---|---:|---:|---:|\n";
        for t in &file.train {
            s += &format!(
                "| {} | {} | {} | {} | {:.0} |\n",
                t.device, t.model, t.params, t.tokens_per_step, t.tokens_per_s
            );
        }
    }
    s
}

/// Charts of decode tokens/s and measured KV bytes against context, a line per (model, policy).
pub fn charts(dir: &Path, file: &BenchFile) -> Result<Vec<PathBuf>> {
    let mut lines: BTreeMap<String, Vec<&DecodeCell>> = BTreeMap::new();
    for c in &file.decode {
        let name = if c.policy == "full" {
            c.model.clone()
        } else {
            format!("{} {}", c.model, c.policy)
        };
        lines.entry(name).or_default().push(c);
    }
    if lines.values().all(|cells| cells.len() < 2) {
        return Ok(vec![]);
    }
    let series = |f: &dyn Fn(&DecodeCell) -> f64| -> Vec<Series> {
        lines
            .iter()
            .map(|(name, cells)| {
                let mut points: Vec<(f64, f64)> =
                    cells.iter().map(|c| (c.context as f64, f(c))).collect();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                Series {
                    name: name.clone(),
                    points,
                }
            })
            .collect()
    };
    let speed = dir.join("decode-speed.png");
    line_chart(
        &speed,
        &Chart {
            title: "Decode speed against context",
            x_label: "context (tokens)",
            y_label: "tokens/s",
            log_x: false,
            y_from_zero: false,
            series: series(&|c| c.tokens_per_s),
        },
    )?;
    let bytes = dir.join("cache-bytes.png");
    line_chart(
        &bytes,
        &Chart {
            title: "KV cache held against context (measured)",
            x_label: "context (tokens)",
            y_label: "MiB",
            log_x: false,
            y_from_zero: false,
            series: series(&|c| c.kv_bytes as f64 / (1 << 20) as f64),
        },
    )?;
    Ok(vec![speed, bytes])
}

/// Writes `bench.json`, `bench.md` and the charts into `dir`; returns the paths written.
pub fn write_results(dir: &Path, file: &BenchFile) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| KvError::io(dir, e))?;
    let json = serde_json::to_string_pretty(file).map_err(|e| KvError::io(dir, e))?;
    let (json_path, md_path) = (dir.join("bench.json"), dir.join("bench.md"));
    kv_models::write_atomic(&json_path, json.as_bytes())?;
    kv_models::write_atomic(&md_path, markdown(file).as_bytes())?;
    let mut paths = vec![json_path, md_path];
    paths.extend(charts(dir, file)?);
    Ok(paths)
}
