//! Training from scratch or from a checkpoint: AdamW, warmup + cosine, clipping, accumulation,
//! a mixture of corpus and task batches, periodic evaluation and exact resume.

use crate::data::{Corpus, TaskKind, TextSource, batch_rng};
use crate::eval::scores::{task_accuracy_with, validation_loss};
use crate::model::config::DecoderConfig;
use crate::model::decoder::DecoderLm;
use crate::text::tokenizer::Tokenizer;
use crate::train::checkpoint::CHECKPOINT_FILE;
use crate::train::checkpoint::{
    Sections, canonical_record, model_from_record, record_bytes, record_from,
};
use burn::grad_clipping::GradientClippingConfig;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use kv_core::readback::ReadBack;
use kv_core::{KvError, Result};
use kv_policies::FullCache;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// How to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Tokens per training sequence (the training context).
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimiser step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of the peak (cosine decay ends there).
    #[serde(default = "tenth")]
    pub min_lr_ratio: f64,
    /// Steps of linear warm-up.
    #[serde(default)]
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[serde(default = "tenth_f32")]
    pub weight_decay: f32,
    /// Gradient clipping by global norm (0 = off).
    #[serde(default = "one_f32")]
    pub clip_norm: f32,
    /// Long-context tasks mixed into training (listing one twice doubles its share).
    #[serde(default)]
    pub tasks: Vec<TaskKind>,
    /// Fraction of sequences that are task samples rather than corpus text.
    #[serde(default)]
    pub task_fraction: f32,
    /// Loss weight of a task's answer tokens (every other token weighs 1): a loss mask that
    /// points the small gradient budget of a CPU run at the retrieval the tasks exist to teach.
    #[serde(default = "one_f32")]
    pub answer_weight: f32,
    /// Draw each task sample's length uniformly between the task's minimum and `seq_len`
    /// (shorter retrieval distances first teach the lookup), instead of always `seq_len`.
    #[serde(default)]
    pub vary_task_length: bool,
    /// Length curriculum: the first `short_steps` steps train on sequences of `short_seq_len`
    /// tokens, with the batch scaled up to keep tokens per step. Attention over a short window is
    /// less diluted, so copying (an induction head) forms within ~100 steps; at the full length
    /// from the start it may not form at all within a CPU budget. 0 = off.
    #[serde(default)]
    pub short_seq_len: usize,
    /// Steps of the length curriculum's short stage.
    #[serde(default)]
    pub short_steps: usize,
    /// Evaluate every this many steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Validation windows for the validation loss.
    #[serde(default = "sixteen")]
    pub eval_windows: usize,
    /// Samples per task for task accuracy during training.
    #[serde(default = "sixteen")]
    pub eval_task_samples: usize,
    /// Save a checkpoint every this many steps (0 = only at the end).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Seed of the initialisation and of the data stream.
    #[serde(default)]
    pub seed: u64,
    /// Training text.
    #[serde(default = "stories")]
    pub data: TextSource,
    /// DMC retrofit: the compression the one-sided loss pushes the model's merges towards (the
    /// model config must have `dmc`); None: no compression loss.
    #[serde(default)]
    pub dmc: Option<DmcTraining>,
    /// A Hugging Face `tokenizer.json` to read text with (None: bytes). It is copied into the
    /// run folder, so checkpoints stay usable without it; task contexts then count bytes of text.
    #[serde(default)]
    pub tokenizer: Option<std::path::PathBuf>,
}

fn one() -> usize {
    1
}
fn sixteen() -> usize {
    16
}
fn tenth() -> f64 {
    0.1
}
fn tenth_f32() -> f32 {
    0.1
}
fn one_f32() -> f32 {
    1.0
}
fn stories() -> TextSource {
    TextSource::Stories
}

/// The compression target of a DMC retrofit (Nawrot et al. 2024, the official `get_dmc_loss`):
/// the loss adds `max(0, (1 - 1/CR_t) - merged share)` per sequence, the share being the hard
/// decisions' mean over layers, heads and tokens with a straight-through gradient, and `CR_t`
/// ramping linearly from 1 to `cr` over the first `ramp` of the steps, then holding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmcTraining {
    /// Target compression ratio, tokens seen / slots held (the paper: 2 to 4).
    pub cr: f64,
    /// Fraction of the steps over which the target ramps up (default 0.75; the official recipe
    /// ramps over 6k steps, then fine-tunes 2k at the final ratio).
    #[serde(default = "three_quarters")]
    pub ramp: f64,
}

fn three_quarters() -> f64 {
    0.75
}

impl DmcTraining {
    /// The target ratio `cr`, ramped over the first three quarters of the steps.
    pub fn new(cr: f64) -> Self {
        Self {
            cr,
            ramp: three_quarters(),
        }
    }

    /// The target compression ratio at `step` (0-based) of `steps`.
    pub fn cr_at(&self, step: usize, steps: usize) -> f64 {
        let span = (self.ramp * steps as f64).max(1.0);
        1.0 + (self.cr - 1.0) * ((step + 1) as f64 / span).min(1.0)
    }

    /// Checks the target, naming the bad value.
    pub fn validate(&self) -> Result<()> {
        if !(self.cr >= 1.0 && self.cr <= 64.0) {
            return Err(KvError::config(
                "dmc cr",
                self.cr,
                "a compression ratio in [1, 64] (the paper trains 2 to 4)",
            ));
        }
        if !(0.0..=1.0).contains(&self.ramp) {
            return Err(KvError::config(
                "dmc ramp",
                self.ramp,
                "a fraction of the steps in [0, 1]",
            ));
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Checks every field, naming the first bad value.
    pub fn validate(&self) -> Result<()> {
        KvError::require_positive(&[
            ("seq_len", self.seq_len),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("steps", self.steps),
        ])?;
        if !(self.lr > 0.0 && self.lr <= 1.0) {
            return Err(KvError::config("lr", self.lr, "a learning rate in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(KvError::config(
                "min_lr_ratio",
                self.min_lr_ratio,
                "a fraction in [0, 1]",
            ));
        }
        if !(0.0..1.0).contains(&self.weight_decay) {
            return Err(KvError::config(
                "weight_decay",
                self.weight_decay,
                "a decay in [0, 1) such as 0.1",
            ));
        }
        if !(self.clip_norm >= 0.0 && self.clip_norm.is_finite()) {
            return Err(KvError::config(
                "clip_norm",
                self.clip_norm,
                "a gradient norm >= 0 (0 = no clipping)",
            ));
        }
        if !(self.answer_weight > 0.0 && self.answer_weight.is_finite()) {
            return Err(KvError::config(
                "answer_weight",
                self.answer_weight,
                "a positive loss weight (1 = plain language modelling)",
            ));
        }
        if !(0.0..=1.0).contains(&self.task_fraction)
            || (self.task_fraction > 0.0 && self.tasks.is_empty())
        {
            return Err(KvError::config(
                "task_fraction",
                self.task_fraction,
                "in [0, 1], and 0 unless `tasks` names some",
            ));
        }
        if self.short_steps > 0 && !(2..self.seq_len).contains(&self.short_seq_len) {
            return Err(KvError::config(
                "short_seq_len",
                self.short_seq_len,
                format!(
                    "a length in [2, seq_len = {}) for the curriculum's short stage",
                    self.seq_len
                ),
            ));
        }
        if let Some(dmc) = &self.dmc {
            dmc.validate()?;
        }
        for t in &self.tasks {
            if self.seq_len + 1 < t.min_context() {
                return Err(KvError::config(
                    "seq_len",
                    self.seq_len,
                    format!("at least {} for task {}", t.min_context(), t.name()),
                ));
            }
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warm-up, then cosine decay to `min_lr_ratio`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// Tokens consumed per optimiser step (at the full length).
    pub fn tokens_per_step(&self) -> usize {
        self.seq_len * self.batch_size * self.grad_accum
    }

    /// Sequence length and micro-batch size at `step` (0-based), following the length curriculum.
    pub fn shape_at(&self, step: usize) -> (usize, usize) {
        if step < self.short_steps && self.short_seq_len > 0 {
            (
                self.short_seq_len,
                (self.batch_size * self.seq_len).div_ceil(self.short_seq_len),
            )
        } else {
            (self.seq_len, self.batch_size)
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Steps completed, this one included.
    pub step: usize,
    /// Mean training loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Training tokens per second of this step.
    pub tokens_per_s: f64,
    /// Wall seconds of this step.
    #[serde(default)]
    pub seconds: f64,
    /// DMC: the compression its hard decisions reached on this step's batch (tokens over slots)
    /// and the target it was pushed towards; absent for other models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dmc: Option<DmcStep>,
}

/// A DMC training step's compression, reached and targeted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DmcStep {
    /// Tokens seen per slot held under the step's hard decisions (mean merged share `m`: `1 / (1 - m)`).
    pub cr: f64,
    /// The ramped target ratio of the step.
    pub target: f64,
}

/// An evaluation during or after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Steps completed when evaluated.
    pub step: usize,
    /// Mean loss on held-out text.
    pub valid_loss: f64,
    /// Exact-match accuracy per task at the training context, full cache.
    pub task_accuracy: Vec<(TaskKind, f64)>,
}

/// One line of the metrics log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LogLine {
    /// A training step.
    Step(StepMetrics),
    /// An evaluation.
    Eval(EvalMetrics),
}

impl LogLine {
    fn step(&self) -> usize {
        match self {
            LogLine::Step(m) => m.step,
            LogLine::Eval(m) => m.step,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    config: TrainConfig,
}

/// What a run directory holds: its model, its recipe and the steps done.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStatus {
    /// The model's config.
    pub model: DecoderConfig,
    /// The training recipe.
    pub train: TrainConfig,
    /// Optimiser steps completed.
    pub step: usize,
}

impl RunStatus {
    /// Whether the run reached its last step.
    pub fn is_done(&self) -> bool {
        self.step >= self.train.steps
    }
}

/// Reads a run directory's status without loading its weights; `None` when it holds no
/// checkpoint yet. A damaged checkpoint is an error.
pub fn run_status(dir: &Path) -> Result<Option<RunStatus>> {
    if !dir.join(CHECKPOINT_FILE).exists() {
        return Ok(None);
    }
    let sections = Sections::read(dir)?;
    let model = sections.model_config(dir)?;
    let path = dir.join(CHECKPOINT_FILE);
    if sections.train.is_empty() {
        return Err(KvError::io(&path, "holds weights only (no training state)"));
    }
    let state: TrainState = serde_json::from_slice(&sections.train)
        .map_err(|e| KvError::io(&path, format!("bad training state: {e}")))?;
    Ok(Some(RunStatus {
        model,
        train: state.config,
        step: state.step,
    }))
}

/// A training run in progress on autodiff backend `B`.
pub struct Trainer<B: AutodiffBackend> {
    model: DecoderLm<B>,
    optim: OptimizerAdaptor<AdamW, DecoderLm<B>, B>,
    model_config: DecoderConfig,
    config: TrainConfig,
    step: usize,
    train: Corpus,
    valid: Corpus,
    tokenizer: Tokenizer,
    device: B::Device,
}

fn adamw<B: AutodiffBackend>(config: &TrainConfig) -> OptimizerAdaptor<AdamW, DecoderLm<B>, B> {
    AdamWConfig::new()
        .with_beta_2(0.95)
        .with_epsilon(1e-8)
        .with_weight_decay(config.weight_decay)
        .with_grad_clipping(
            (config.clip_norm > 0.0).then_some(GradientClippingConfig::Norm(config.clip_norm)),
        )
        .init()
}

impl<B: AutodiffBackend> Trainer<B> {
    /// A fresh run: a model initialised from `config.seed`.
    pub fn new(
        model_config: DecoderConfig,
        config: TrainConfig,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        B::seed(device, config.seed);
        let model = model_config.init::<B>(device)?;
        Self::from_model(model, model_config, config, device)
    }

    /// A fresh run (step 0, new optimiser) that starts from given weights (`kv train --init`).
    pub fn from_model(
        model: DecoderLm<B>,
        model_config: DecoderConfig,
        config: TrainConfig,
        device: &B::Device,
    ) -> Result<Self> {
        let tokenizer = match &config.tokenizer {
            Some(path) => Tokenizer::from_file(path)?,
            None => Tokenizer::Bytes,
        };
        Self::with_tokenizer(model, model_config, config, tokenizer, device)
    }

    fn with_tokenizer(
        model: DecoderLm<B>,
        model_config: DecoderConfig,
        config: TrainConfig,
        tokenizer: Tokenizer,
        device: &B::Device,
    ) -> Result<Self> {
        config.validate()?;
        model_config.validate()?;
        if config.dmc.is_some() && model_config.dmc.is_none() {
            return Err(KvError::config(
                "train dmc",
                "a compression target",
                "a model with dmc settings (retrofit one with `kv train --init <run> --dmc cr=2`)",
            ));
        }
        crate::eval::scores::check_vocab(
            &model,
            tokenizer.vocab_size(),
            &format!("the {} tokenizer", tokenizer.name()),
        )?;
        let (train, valid) = config.data.load_with(config.seed, &tokenizer)?;
        for (name, c) in [("training", &train), ("validation", &valid)] {
            if c.len() < config.seq_len + 1 {
                return Err(KvError::config(
                    format!("{name} text"),
                    format!("{} tokens", c.len()),
                    format!("at least seq_len + 1 = {}", config.seq_len + 1),
                ));
            }
        }
        Ok(Self {
            optim: adamw(&config),
            model,
            model_config,
            config,
            step: 0,
            train,
            valid,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Continues the run saved in `dir` exactly where it stopped; `steps`, if given, replaces the
    /// total step count (to extend a finished run).
    pub fn resume(dir: &Path, steps: Option<usize>, device: &B::Device) -> Result<Self> {
        let sections = Sections::read(dir)?;
        let path = dir.join(CHECKPOINT_FILE);
        let model_config = sections.model_config(dir)?;
        if sections.train.is_empty() || sections.optim.is_empty() {
            return Err(KvError::io(
                &path,
                "holds weights only (no training state), so it cannot be resumed; start a new run from it with --init",
            ));
        }
        let mut state: TrainState = serde_json::from_slice(&sections.train)
            .map_err(|e| KvError::io(&path, format!("bad training state: {e}")))?;
        // A log the run cannot extend fails here, before any work, not after the first step.
        log_lines(&dir.join(METRICS_FILE))?;
        if let Some(s) = steps {
            if s < state.step {
                return Err(KvError::config(
                    "--steps",
                    s,
                    format!(
                        "at least the {} steps the run in {} has already taken (more extends it)",
                        state.step,
                        dir.display()
                    ),
                ));
            }
            state.config.steps = s;
        }
        let model = model_from_record::<B>(&model_config, sections.model, device, &path)?;
        // The run's own copy of its tokenizer, so a moved or deleted original does not matter.
        let tokenizer = Tokenizer::for_run(dir)?;
        if tokenizer.is_bytes() && state.config.tokenizer.is_some() {
            return Err(KvError::io(
                dir.join(crate::text::tokenizer::TOKENIZER_FILE),
                "missing: the run was trained with a tokenizer file",
            ));
        }
        let mut trainer =
            Self::with_tokenizer(model, model_config, state.config, tokenizer, device)?;
        trainer.optim =
            adamw(&trainer.config).load_record(record_from::<B, _>(sections.optim, device, &path)?);
        trainer.step = state.step;
        Ok(trainer)
    }

    /// Steps completed.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The training config.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The model config.
    pub fn model_config(&self) -> &DecoderConfig {
        &self.model_config
    }

    /// The model being trained.
    pub fn model(&self) -> &DecoderLm<B> {
        &self.model
    }

    /// Whether every step has run.
    pub fn is_done(&self) -> bool {
        self.step >= self.config.steps
    }

    /// The `micro`-th micro-batch of `step`: inputs `[batch, seq_len]`, flat targets and their
    /// loss weights `[batch * seq_len]`.
    fn batch(
        &self,
        step: usize,
        micro: usize,
    ) -> Result<(Tensor<B, 2, Int>, Tensor<B, 1, Int>, Vec<f32>)> {
        let c = &self.config;
        let (seq_len, batch_size) = c.shape_at(step);
        // Tasks that fit this step's length (the curriculum's short stage fits fewer).
        let tasks: Vec<TaskKind> = c
            .tasks
            .iter()
            .copied()
            .filter(|t| t.min_context() <= seq_len + 1)
            .collect();
        let mut rng = batch_rng(c.seed, step, micro);
        let mut ids = Vec::with_capacity(batch_size * (seq_len + 1));
        let mut weights = vec![1.0f32; batch_size * seq_len];
        for row in 0..batch_size {
            let seq = if !tasks.is_empty() && rng.random::<f32>() < c.task_fraction {
                let task = tasks[rng.random_range(0..tasks.len())];
                // Task lengths vary from the shortest possible to the full window (a curriculum
                // of retrieval distances), with corpus text in front of the shorter ones.
                let len = if c.vary_task_length {
                    rng.random_range(task.min_context()..=seq_len + 1)
                } else {
                    seq_len + 1
                };
                let sample = task.sample(&mut rng, len, None)?;
                // Prompt and answer are encoded apart, so the answer starts on a token boundary;
                // a token is at least a byte, so the text fits (the front is cut if it ever did not).
                let answer = self.tokenizer.encode(&sample.answer)?;
                let mut text = self.tokenizer.encode(&sample.prompt)?;
                text.extend_from_slice(&answer);
                let text = &text[text.len().saturating_sub(seq_len + 1)..];
                // The answer is the sequence's tail, so it is the last targets of the row.
                let end = (row + 1) * seq_len;
                weights[end - answer.len()..end].fill(c.answer_weight);
                // Earlier answers inside the prompt (answered queries) are graded the same way:
                // with byte tokens the text's byte `at` is the target of row position `at - 1`.
                if self.tokenizer.is_bytes() {
                    let text_start = end + 1 - text.len();
                    for &at in &sample.retrieved {
                        if at > 0 {
                            weights[text_start + at - 1] = c.answer_weight;
                        }
                    }
                }
                let mut seq = if text.len() <= seq_len {
                    self.train.window(&mut rng, seq_len + 1 - text.len())?
                } else {
                    Vec::new()
                };
                seq.extend_from_slice(text);
                seq
            } else {
                self.train.window(&mut rng, seq_len + 1)?
            };
            ids.extend(seq.into_iter().map(|t| t as i32));
        }
        let all = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &self.device)
            .reshape([batch_size, seq_len + 1]);
        let inputs = all.clone().narrow(1, 0, seq_len);
        let targets = all.narrow(1, 1, seq_len).reshape([batch_size * seq_len]);
        Ok((inputs, targets, weights))
    }

    /// Runs one optimiser step (all its micro-batches).
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let start = Instant::now();
        let c = self.config.clone();
        let mut accumulator = GradientsAccumulator::new();
        let mut loss_sum = 0.0;
        let mut merged_sum = 0.0;
        let dmc_target = c.dmc.as_ref().map(|d| d.cr_at(self.step, c.steps));
        for micro in 0..c.grad_accum {
            let (inputs, targets, weights) = self.batch(self.step, micro)?;
            // Randomness inside the forward (DMC's Gumbel noise) is drawn from the step and
            // micro-batch, as the data is, so a resumed run repeats the uninterrupted one.
            B::seed(
                &self.device,
                batch_rng(c.seed ^ 0x6d63, self.step, micro).random::<u64>(),
            );
            let (logits, merged) = self.model.forward_train(inputs);
            let [b, t, v] = logits.dims();
            let mut loss = weighted_cross_entropy(logits.reshape([b * t, v]), targets, &weights);
            if let (Some(target), Some(merged)) = (dmc_target, merged) {
                // One-sided: merging more than the target costs nothing. Weight 1 per token, as
                // the official code's `dmc_loss * num_tokens` over a token-summed LM loss.
                merged_sum += merged.clone().mean().read_scalar();
                loss = loss
                    + merged
                        .neg()
                        .add_scalar(1.0 - 1.0 / target)
                        .clamp_min(0.0)
                        .mean();
            }
            loss_sum += loss.clone().read_scalar();
            let grads = loss.div_scalar(c.grad_accum as f64).backward();
            accumulator.accumulate(&self.model, GradientsParams::from_grads(grads, &self.model));
        }
        let lr = c.lr_at(self.step);
        self.model = self.optim.step(lr, self.model.clone(), accumulator.grads());
        self.step += 1;
        Ok(StepMetrics {
            step: self.step,
            loss: loss_sum / c.grad_accum as f64,
            lr,
            tokens_per_s: {
                let (l, b) = c.shape_at(self.step - 1);
                (l * b * c.grad_accum) as f64 / start.elapsed().as_secs_f64()
            },
            seconds: start.elapsed().as_secs_f64(),
            dmc: dmc_target.map(|target| DmcStep {
                cr: 1.0 / (1.0 - merged_sum / c.grad_accum as f64).max(1e-9),
                target,
            }),
        })
    }

    /// Validation loss and task accuracies (full cache, training context) of the current model.
    pub fn evaluate(&self) -> Result<EvalMetrics> {
        let model = self.model.valid();
        let c = &self.config;
        let valid_loss = validation_loss(&model, &self.valid, c.seq_len, c.eval_windows)?;
        let mut task_acc = Vec::new();
        let mut tasks = c.tasks.clone();
        tasks.dedup_by_key(|t| t.name());
        tasks.sort_by_key(|t| t.name());
        tasks.dedup();
        for task in tasks {
            let r = task_accuracy_with(
                &model,
                &self.tokenizer,
                task,
                c.seq_len,
                c.eval_task_samples,
                c.seed ^ 0xe7a1,
                None,
                &mut || Box::new(FullCache),
            )?;
            task_acc.push((task, r.accuracy));
        }
        Ok(EvalMetrics {
            step: self.step,
            valid_loss,
            task_accuracy: task_acc,
        })
    }

    /// Saves weights, optimiser state, step and configs into `dir`, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let state = TrainState {
            step: self.step,
            config: self.config.clone(),
        };
        let sections = Sections {
            config: serde_json::to_vec_pretty(&self.model_config)
                .map_err(|e| KvError::io(dir, e))?,
            train: serde_json::to_vec_pretty(&state).map_err(|e| KvError::io(dir, e))?,
            model: record_bytes::<B, _>(self.model.clone().into_record(), dir)?,
            optim: canonical_record(record_bytes::<B, _>(self.optim.to_record(), dir)?),
        };
        // The tokenizer first: a checkpoint never exists without the tokenizer it was trained with.
        self.tokenizer.save_to_run(dir)?;
        sections.write(dir)
    }
}

/// Mean of `-log p(target)` over rows, weighted by `weights` (f32 log-softmax).
fn weighted_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    weights: &[f32],
) -> Tensor<B, 1> {
    let n = weights.len();
    let logp = log_softmax(logits, 1)
        .gather(1, targets.reshape([n, 1]))
        .reshape([n]);
    if weights.iter().all(|&w| w == 1.0) {
        return logp.mean().neg();
    }
    let total: f32 = weights.iter().sum();
    let w = Tensor::<B, 1>::from_floats(weights, &logp.device());
    (logp * w).sum().div_scalar(total as f64).neg()
}

/// Training events reported to the caller (the CLI draws its progress bar from them).
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// A step finished.
    Step(StepMetrics),
    /// An evaluation finished.
    Eval(EvalMetrics),
    /// A checkpoint was written.
    Checkpoint {
        /// Steps completed.
        step: usize,
    },
}

/// The metrics log of a run directory, one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Reads a run's metrics log.
pub fn read_log(dir: &Path) -> Result<Vec<LogLine>> {
    Ok(log_lines(&dir.join(METRICS_FILE))?
        .into_iter()
        .map(|(line, _)| line)
        .collect())
}

/// The log's complete lines, each parsed and as written (a bad one named by its line number).
fn log_lines(path: &Path) -> Result<Vec<(LogLine, String)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(KvError::io(path, e)),
    };
    // A process killed while appending leaves its last line without a newline: that line never
    // finished, so it is not part of the log (the step it describes reruns on resume).
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<LogLine>(l)
                .map(|line| (line, l.to_string()))
                .map_err(|e| KvError::io(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Runs `trainer` to its last step, evaluating, checkpointing into `out` and appending to
/// `out/metrics.jsonl`; lines beyond the trainer's step (from a run that died after its last
/// checkpoint) are dropped first, so a resumed log reads as if the run had never stopped.
pub fn run<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    out: &Path,
    on_event: impl FnMut(&TrainEvent),
) -> Result<Option<EvalMetrics>> {
    let steps = trainer.config().steps;
    run_until(trainer, out, steps, on_event)
}

/// [`run`], stopping after step `until` with a checkpoint (a pause that `resume` continues).
pub fn run_until<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    out: &Path,
    until: usize,
    mut on_event: impl FnMut(&TrainEvent),
) -> Result<Option<EvalMetrics>> {
    let log_path = out.join(METRICS_FILE);
    let lines = log_lines(&log_path)?;
    let kept: Vec<&String> = lines
        .iter()
        .filter(|(line, _)| line.step() <= trainer.step())
        .map(|(_, l)| l)
        .collect();
    let on_disk = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
    let kept_len: usize = kept.iter().map(|l| l.len() + 1).sum();
    // The log is rewritten (its lines byte for byte) only when it holds more than the steps the
    // checkpoint reached: a dead run's later lines, or an unfinished last line.
    if kept_len != on_disk || !log_path.exists() {
        let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
        crate::train::checkpoint::write_atomic(&log_path, text.as_bytes())?;
    }
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(|e| KvError::io(&log_path, e))?;
    let mut write = |line: &LogLine| -> Result<()> {
        let mut s = serde_json::to_string(line).map_err(|e| KvError::io(&log_path, e))?;
        s.push('\n');
        // One write per line, so a kill leaves at most one unfinished line, which read_log drops.
        log.write_all(s.as_bytes())
            .map_err(|e| KvError::io(&log_path, e))
    };
    let mut last_eval = None;
    let until = until.min(trainer.config().steps);
    while trainer.step() < until {
        let m = trainer.train_step()?;
        write(&LogLine::Step(m.clone()))?;
        on_event(&TrainEvent::Step(m));
        let c = trainer.config();
        let step = trainer.step();
        if (c.eval_every > 0 && step.is_multiple_of(c.eval_every)) || trainer.is_done() {
            let e = trainer.evaluate()?;
            write(&LogLine::Eval(e.clone()))?;
            on_event(&TrainEvent::Eval(e.clone()));
            last_eval = Some(e);
        }
        if (c.checkpoint_every > 0 && step.is_multiple_of(c.checkpoint_every))
            || trainer.is_done()
            || step == until
        {
            trainer.save(out)?;
            on_event(&TrainEvent::Checkpoint { step });
        }
    }
    Ok(last_eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    type AD = burn::backend::Autodiff<burn::backend::Flex>;

    fn config(vary: bool) -> TrainConfig {
        serde_json::from_value(serde_json::json!({
            "seq_len": 64, "batch_size": 6, "steps": 1, "lr": 0.001, "tasks": ["copy"], "task_fraction": 1.0,
            "answer_weight": 4.0, "vary_task_length": vary, "seed": 3
        }))
        .unwrap()
    }

    #[test]
    fn lookup_rows_weight_every_retrieved_value() {
        let mut c = config(true);
        c.tasks = vec![TaskKind::Lookup];
        let t = Trainer::<AD>::new(
            DecoderConfig::new(256, 16, 1, 2, 2, 16),
            c,
            &Default::default(),
        )
        .unwrap();
        let (inputs, targets, weights) = t.batch(0, 0).unwrap();
        let ids: Vec<i64> = targets.read_back().iter::<i64>().collect();
        let inp: Vec<i64> = inputs.read_back().iter::<i64>().collect();
        for (row, (w, (x, y))) in weights
            .chunks(64)
            .zip(inp.chunks(64).zip(ids.chunks(64)))
            .enumerate()
        {
            let text: String = x.iter().map(|&b| b as u8 as char).collect();
            let weighted: Vec<(usize, char)> = w
                .iter()
                .enumerate()
                .filter(|(_, w)| **w != 1.0)
                .map(|(i, _)| (i, y[i] as u8 as char))
                .collect();
            // Every weighted target is a digit that follows `=` in the input, and the query before
            // it names a key listed earlier in the row with that very digit.
            for &(i, digit) in &weighted {
                assert!(
                    digit.is_ascii_digit() && text.as_bytes()[i] == b'=',
                    "row {row}: {text:?} at {i}"
                );
                let pair = format!("{}{}", &text[i - 2..=i], digit);
                assert!(
                    text[..i - 2].contains(&pair),
                    "row {row}: {pair} not listed before {i} in {text:?}"
                );
            }
            assert!(!weighted.is_empty(), "row {row}: {text:?}");
        }
    }

    #[test]
    fn answers_are_weighted_at_the_end_of_every_task_row() {
        for vary in [false, true] {
            let t = Trainer::<AD>::new(
                DecoderConfig::new(256, 16, 1, 2, 2, 16),
                config(vary),
                &Default::default(),
            )
            .unwrap();
            let (inputs, targets, weights) = t.batch(0, 0).unwrap();
            assert_eq!(inputs.dims(), [6, 64]);
            assert_eq!(targets.dims(), [6 * 64]);
            for row in weights.chunks(64) {
                // The copy answer is 8 tokens: exactly the row's last 8 targets are weighted.
                assert!(row[..56].iter().all(|&w| w == 1.0), "vary={vary}");
                assert!(row[56..].iter().all(|&w| w == 4.0), "vary={vary}");
            }
            // The weighted targets are the copied letters, i.e. the task really ends the row.
            let ids: Vec<i64> = targets.read_back().iter::<i64>().collect();
            assert!(ids.chunks(64).all(|r| {
                r[56..]
                    .iter()
                    .all(|&c| (b'a' as i64..=b'z' as i64).contains(&c))
            }));
        }
        let mut bad = config(false);
        bad.answer_weight = 0.0;
        let e = Trainer::<AD>::new(
            DecoderConfig::new(256, 16, 1, 2, 2, 16),
            bad,
            &Default::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("answer_weight = 0"), "{e}");
    }

    #[test]
    fn the_length_curriculum_trains_short_rows_first_at_the_same_tokens_per_step() {
        let mut c = config(true);
        c.tasks = vec![TaskKind::Copy, TaskKind::Passkey];
        c.seq_len = 200;
        (c.short_seq_len, c.short_steps) = (40, 3);
        c.validate().unwrap();
        assert_eq!(c.shape_at(0), (40, 30));
        assert_eq!(c.shape_at(2), (40, 30));
        assert_eq!(c.shape_at(3), (200, 6));
        let t = Trainer::<AD>::new(
            DecoderConfig::new(256, 16, 1, 2, 2, 16),
            c.clone(),
            &Default::default(),
        )
        .unwrap();
        // Short rows hold only the tasks that fit them (copy, not the 158-token passkey).
        let (inputs, _, weights) = t.batch(1, 0).unwrap();
        assert_eq!(inputs.dims(), [30, 40]);
        assert_eq!(weights.len(), 30 * 40);
        let (inputs, _, _) = t.batch(3, 0).unwrap();
        assert_eq!(inputs.dims(), [6, 200]);
        c.short_seq_len = 200;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("short_seq_len = 200"), "{e}");
    }
}
