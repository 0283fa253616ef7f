//! `kv eval`: a grid of checkpoints x policies x compressions x tasks x contexts x depths, written
//! as JSON, a Markdown table and PNG charts.

use crate::backend::{BackendJob, DeviceKind};
use crate::report::{FORMAT_VERSION, GridFile};
use burn::prelude::*;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_core::{KvError, Result};
use kv_models::data::{NiahSpec, TextSource};
use kv_models::eval::grid::{GridModel, GridSpec, Probe, run_grid};
use kv_models::{CONFIG_FILE, DecoderConfig, DecoderLm, Tokenizer, load_model};
use std::path::{Path, PathBuf};

/// Flags of `kv eval`; every list flag takes comma-separated values.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Checkpoint directories to evaluate (labelled by folder name).
    #[arg(long, value_delimiter = ',', required_unless_present = "model")]
    pub checkpoint: Vec<PathBuf>,
    /// Pretrained models to evaluate: `.gguf` files, Hugging Face folders, or `smollm2`
    /// (labelled by file or folder name).
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<PathBuf>,
    /// Probes: passkey, needle, recall, copy, lookup (tasks the tiny models learn), niah and
    /// niah-query (the Needle-in-a-Haystack test, question seen after or before compression),
    /// ppl (held-out stories), ppl-essays (Paul Graham's essays).
    #[arg(long, value_delimiter = ',', default_value = "passkey")]
    pub task: Vec<String>,
    /// Policy specs without a budget (`full`, `h2o`, `snapkv:window=64,kernel=5`, ...); a
    /// `key=value` after a comma belongs to the spec before it.
    #[arg(long, value_delimiter = ',', default_value = "full")]
    pub policy: Vec<String>,
    /// Fractions of slots removed, each in [0, 1); a policy's budget is 1 - compression.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.875")]
    pub compression: Vec<f64>,
    /// Context lengths in tokens (prompt + answer, or the perplexity window).
    #[arg(long, value_delimiter = ',', default_value = "256")]
    pub context: Vec<usize>,
    /// Depths of the passkey / needle as fractions of the context (default: random per sample).
    #[arg(long, value_delimiter = ',')]
    pub depth: Vec<f32>,
    /// Samples per task cell.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Text windows per perplexity cell.
    #[arg(long, default_value_t = 4)]
    pub windows: usize,
    /// Fraction of each perplexity window prefilled as one prompt (so prefill-time policies
    /// compress it); only the continuation is scored. 0: token by token from the first token.
    #[arg(long, default_value_t = 0.5)]
    pub ppl_prompt: f64,
    /// Seed of the task samples.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Tokens of a perplexity continuation fed per call (1: token by token; the policy acts
    /// after every call).
    #[arg(long, default_value_t = 1)]
    pub ppl_chunk: usize,
    /// The sentence the niah probes hide (default: the test's San Francisco needle).
    #[arg(long)]
    pub needle: Option<String>,
    /// The question the niah probes ask about it.
    #[arg(long)]
    pub question: Option<String>,
    /// Phrases a right niah answer contains, separated by `|` (score: the share found).
    #[arg(long)]
    pub expect: Option<String>,
    /// A folder of .txt files to use as the haystack (default: the essays the fetch script gets).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Also write the NIAH prompts (token ids per context and depth, for the first model) to
    /// this JSON file, so another implementation can run exactly the same cells
    /// (`reference/kvpress_niah.py`).
    #[arg(long)]
    pub niah_prompts: Option<PathBuf>,
    /// Let contexts run past a model's max_positions (length-extrapolation studies); without it
    /// a context longer than any model's is refused before any work.
    #[arg(long)]
    pub allow_beyond_context: bool,
    /// Folder for eval.json, eval.md and the charts.
    #[arg(long, default_value = "runs/eval")]
    pub out: PathBuf,
}

impl EvalArgs {
    /// The grid's axes, parsed.
    pub fn spec(&self) -> Result<GridSpec> {
        Ok(GridSpec {
            policies: kv_policies::split_specs(&self.policy),
            compressions: self.compression.clone(),
            probes: self
                .task
                .iter()
                .map(|t| Probe::parse(t))
                .collect::<Result<_>>()?,
            contexts: self.context.clone(),
            depths: self.depth.iter().map(|&d| Some(d)).collect(),
            samples: self.samples,
            windows: self.windows,
            ppl_prompt: self.ppl_prompt,
            seed: self.seed,
            niah: self.niah_spec(),
            ppl_chunk: self.ppl_chunk,
            allow_beyond_context: self.allow_beyond_context,
        })
    }

    /// The needle, question, expected phrases and haystack of the niah probes.
    pub fn niah_spec(&self) -> NiahSpec {
        let d = NiahSpec::default();
        NiahSpec {
            needle: self.needle.clone().unwrap_or(d.needle),
            question: self.question.clone().unwrap_or(d.question),
            expect: self.expect.as_ref().map_or(d.expect, |e| {
                e.split('|').map(|p| p.trim().to_string()).collect()
            }),
            haystack: self.haystack.clone(),
        }
    }
}

/// A checkpoint's label: its folder name.
pub fn label(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Fails unless `dir` holds a readable checkpoint config (the weights are checked when loaded).
pub fn check_checkpoint(dir: &Path) -> Result<DecoderConfig> {
    if !dir.is_dir() {
        return Err(KvError::io(dir, "no such checkpoint directory"));
    }
    DecoderConfig::from_file(dir.join(CONFIG_FILE))
}

/// A model the grid evaluates.
#[derive(Debug, Clone)]
pub enum EvalModel {
    /// A checkpoint directory written by `kv train` or `kv convert`.
    Checkpoint(PathBuf),
    /// A pretrained model (`.gguf`, Hugging Face folder, or `smollm2`).
    Pretrained(PathBuf),
}

impl EvalModel {
    /// The label cells name it by (its folder or file name), after checking that it exists and
    /// its config reads (the weights are checked when loaded).
    fn check(&self) -> Result<(String, DecoderConfig)> {
        match self {
            EvalModel::Checkpoint(dir) => check_checkpoint(dir).map(|c| (label(dir), c)),
            EvalModel::Pretrained(path) => {
                let p = crate::model_source::pretrained(path)?;
                Ok((p.label(), p.config()?))
            }
        }
    }

    fn load<B: Backend>(&self, device: &B::Device) -> Result<(DecoderLm<B>, Tokenizer)> {
        match self {
            EvalModel::Checkpoint(dir) => {
                Ok((load_model::<B>(dir, device)?.0, Tokenizer::for_run(dir)?))
            }
            EvalModel::Pretrained(path) => {
                let p = crate::model_source::pretrained(path)?.load::<B>(device)?;
                Ok((p.model, p.tokenizer))
            }
        }
    }
}

/// Runs a grid over checkpoint directories (see [`run_models`]).
pub fn run_checkpoints<B: Backend>(
    checkpoints: &[PathBuf],
    spec: &GridSpec,
    device: &B::Device,
    backend: DeviceKind,
) -> Result<GridFile> {
    let models: Vec<EvalModel> = checkpoints
        .iter()
        .cloned()
        .map(EvalModel::Checkpoint)
        .collect();
    run_models::<B>(&models, spec, device, backend)
}

/// Runs a grid over `models` with a progress bar; everything is validated before any work.
pub fn run_models<B: Backend>(
    sources: &[EvalModel],
    spec: &GridSpec,
    device: &B::Device,
    backend: DeviceKind,
) -> Result<GridFile> {
    let checked = sources
        .iter()
        .map(EvalModel::check)
        .collect::<Result<Vec<_>>>()?;
    let labels: Vec<String> = checked.iter().map(|(l, _)| l.clone()).collect();
    for (i, l) in labels.iter().enumerate() {
        if labels[..i].contains(l) {
            return Err(KvError::config(
                "--checkpoint/--model",
                l,
                "models with distinct folder or file names",
            ));
        }
    }
    let registry = crate::backend::policies::<B>();
    let cells = spec.cells(&labels, &registry)?;
    if !spec.allow_beyond_context {
        let longest = spec.contexts.iter().copied().max().unwrap_or(0);
        if let Some((label, config)) = checked.iter().find(|(_, c)| longest > c.max_positions) {
            return Err(KvError::config(
                "--context",
                format!("{longest} tokens for {label}"),
                format!(
                    "at most the model's max_positions = {} (the context it was trained for; --allow-beyond-context goes past it)",
                    config.max_positions
                ),
            ));
        }
    }
    let loaded = sources
        .iter()
        .map(|s| s.load::<B>(device))
        .collect::<Result<Vec<_>>>()?;
    let mut named = Vec::with_capacity(loaded.len());
    // Each model reads the same held-out stories in its own tokens; byte models share one copy.
    let byte_text = TextSource::Stories.load(0)?.1;
    for (label, (model, tokenizer)) in labels.iter().zip(&loaded) {
        let text = if tokenizer.is_bytes() {
            byte_text.clone()
        } else {
            TextSource::Stories.load_with(0, tokenizer)?.1
        };
        named.push(GridModel {
            label: label.clone(),
            model,
            tokenizer: tokenizer.clone(),
            text,
        });
    }
    let bar = ProgressBar::new(cells.len() as u64).with_style(
        ProgressStyle::with_template("eval {msg:>40} [{bar:30}] {pos}/{len} {elapsed} eta {eta}")
            .unwrap()
            .progress_chars("=> "),
    );
    let results = run_grid(&named, &cells, spec, &registry, |r| {
        bar.set_message(format!(
            "{} {} {}@{}",
            r.cell.model, r.cell.spec, r.cell.probe, r.cell.context
        ));
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    Ok(GridFile {
        version: FORMAT_VERSION,
        device: backend.name().into(),
        spec: spec.clone(),
        results,
    })
}

/// Runs `kv eval` on one backend.
pub struct EvalJob {
    /// The flags.
    pub args: EvalArgs,
    /// The backend, for the results.
    pub device: DeviceKind,
}

impl BackendJob for EvalJob {
    type Output = GridFile;

    fn run<B: Backend>(self, device: B::Device) -> Result<GridFile> {
        let spec = self.args.spec()?;
        let models: Vec<EvalModel> = (self
            .args
            .checkpoint
            .iter()
            .cloned()
            .map(EvalModel::Checkpoint))
        .chain(self.args.model.iter().cloned().map(EvalModel::Pretrained))
        .collect();
        if let Some(path) = &self.args.niah_prompts {
            kv_models::check_replaceable(path)?;
            write_niah_prompts::<B>(path, &models, &spec, &device)?;
        }
        run_models::<B>(&models, &spec, &device, self.device)
    }
}

/// Writes the NIAH prompts of `spec` for the first model's tokenizer: `{"model", "needle",
/// "question", "expect", "cells": [{"context", "depth", "context_ids", "question_ids"}]}`.
fn write_niah_prompts<B: Backend>(
    path: &Path,
    models: &[EvalModel],
    spec: &GridSpec,
    device: &B::Device,
) -> Result<()> {
    let first = models.first().ok_or_else(|| {
        KvError::config(
            "--niah-prompts",
            path.display(),
            "a grid with at least one model",
        )
    })?;
    let (_, tokenizer) = first.load::<B>(device)?;
    let haystack = kv_models::data::Haystack::for_spec(&spec.niah)?;
    let depths: Vec<f32> = if spec.depths.is_empty() {
        kv_models::data::DEFAULT_DEPTHS.to_vec()
    } else {
        spec.depths.iter().flatten().copied().collect()
    };
    let mut cells = Vec::new();
    for &context in &spec.contexts {
        for &depth in &depths {
            let p =
                kv_models::data::niah_prompt(&haystack, &tokenizer, &spec.niah, context, depth)?;
            cells.push(serde_json::json!({"context": context, "depth": depth, "context_ids": p.context, "question_ids": p.question}));
        }
    }
    let (label, _) = first.check()?;
    let json = serde_json::json!({"model": label, "needle": spec.niah.needle, "question": spec.niah.question, "expect": spec.niah.expect, "cells": cells});
    kv_models::write_atomic(path, json.to_string().as_bytes())
}
