//! `kv train`: train a preset or config from scratch, resume a run, or fine-tune from weights.

use crate::backend::BackendJob;
use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_core::{KvError, Result};
use kv_models::data::{TextSource, text_files};
use kv_models::train::{EvalMetrics, TrainEvent, Trainer, run};
use kv_models::{Preset, Tokenizer, load_model, preset};
use std::path::{Path, PathBuf};

/// Flags of `kv train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// A built-in preset (tiny-mha, tiny-gqa, tiny-mqa, ...; default tiny-mha, or dmc-retrofit
    /// for `--init DIR --dmc ..`).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// A preset-shaped JSON file: {"model": {...}, "train": {...}}.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Total optimiser steps (overrides the recipe).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Run directory for checkpoints and metrics.jsonl (default: runs/<preset>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run saved in --out exactly where it stopped.
    #[arg(long, conflicts_with = "init")]
    pub resume: bool,
    /// Start from the weights of this checkpoint (its model config wins), with a fresh optimiser.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train on these text files (a file or a folder of .txt / .jsonl) instead of the stories.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// DMC: make every grouped attention layer merge tokens and train towards this compression,
    /// `cr=2` (plus optional `ramp`, the share of steps the target ramps over, and the model's
    /// `window`, `init_bias`, `temperature`, and `zero_after_rope=true` for the official code's
    /// second zeroing of the decision channel; unset ones come from the recipe, else 0.75, 12, 5,
    /// 0.1, false). With --init it retrofits the checkpoint's weights (the decision channels start
    /// zeroed: no merges) under the dmc-retrofit recipe unless --preset or --config names another.
    #[arg(long, value_name = "SPEC")]
    pub dmc: Option<String>,
    /// Read text with this Hugging Face tokenizer.json instead of bytes (builds with the
    /// `hf-tokenizer` feature); a fresh model's vocabulary is resized to the tokenizer's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl TrainArgs {
    fn recipe(&self) -> Result<(Preset, String)> {
        match &self.config {
            Some(path) => {
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "custom".into());
                Ok((Preset::from_file(path)?, name))
            }
            None => {
                let default = if self.init.is_some() && self.dmc.is_some() {
                    "dmc-retrofit"
                } else {
                    "tiny-mha"
                };
                let name = self.preset.clone().unwrap_or_else(|| default.into());
                Ok((preset(&name)?, name))
            }
        }
    }

    /// The run directory.
    pub fn out_dir(&self) -> Result<PathBuf> {
        Ok(self.out.clone().unwrap_or_else(|| {
            PathBuf::from("runs").join(self.recipe().map(|r| r.1).unwrap_or_default())
        }))
    }
}

impl BackendJob for TrainArgs {
    type Output = ();

    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let out = self.out_dir()?;
        let mut trainer = if self.resume {
            Trainer::<Autodiff<B>>::resume(&out, self.steps, &device)?
        } else {
            let (recipe, name) = self.recipe()?;
            let mut train = recipe.train.ok_or_else(|| {
                KvError::config("preset", &name, "a preset with a \"train\" recipe")
            })?;
            if let Some(s) = self.steps {
                train.steps = s;
            }
            if let Some(path) = &self.data {
                train.data = TextSource::Files(text_files(path)?);
            }
            let mut model_config = recipe.model;
            if let Some(path) = &self.tokenizer {
                model_config.vocab_size = Tokenizer::from_file(path)?.vocab_size();
                train.tokenizer = Some(path.clone());
            } else if let Some(dir) = self
                .init
                .as_ref()
                .filter(|d| d.join(kv_models::TOKENIZER_FILE).is_file())
            {
                // Fine-tuning keeps the tokenizer the weights were trained with.
                train.tokenizer = Some(dir.join(kv_models::TOKENIZER_FILE));
            }
            if let Some(spec) = self.dmc.as_deref() {
                let (settings, target) = parse_dmc(
                    spec,
                    model_config.dmc.clone().unwrap_or_default(),
                    train.dmc.clone(),
                )?;
                model_config.dmc = Some(settings);
                train.dmc = Some(target);
            }
            train.validate()?;
            if out.join(kv_models::CHECKPOINT_FILE).exists() {
                return Err(KvError::io(
                    &out,
                    "already holds a run; pass --resume to continue it or --out to start another",
                ));
            }
            match &self.init {
                Some(dir) => {
                    let (model, config) = load_model::<Autodiff<B>>(dir, &device)?;
                    // A compression target on a model without DMC retrofits it, with the recipe's settings.
                    let (model, config) = match (&train.dmc, &model_config.dmc) {
                        (Some(_), settings) if config.dmc.is_none() => kv_models::to_dmc(
                            &model,
                            &config,
                            settings.clone().unwrap_or_default(),
                        )?,
                        _ => (model, config),
                    };
                    Trainer::from_model(model, config, train, &device)?
                }
                None => Trainer::new(model_config, train, &device)?,
            }
        };
        // The run folder exists before the first line is printed, so an unusable --out is the
        // command's only output.
        std::fs::create_dir_all(&out).map_err(|e| KvError::io(&out, e))?;
        let started = std::time::Instant::now();
        if let Some(ev) = train_with_progress(&mut trainer, &out, "")? {
            let tasks: Vec<String> = ev
                .task_accuracy
                .iter()
                .map(|(t, a)| format!("{} {:.1}%", t.name(), a * 100.0))
                .collect();
            eprintln!(
                "done in {:.1} s: step {}, valid loss {:.4}, {}; checkpoint in {}",
                started.elapsed().as_secs_f64(),
                ev.step,
                ev.valid_loss,
                tasks.join(", "),
                out.display()
            );
        }
        Ok(())
    }
}

/// Runs `trainer` to its last step with a progress bar (loss, tokens/s, ETA) and evaluation
/// lines; `label` prefixes the bar when several runs share a screen.
pub fn train_with_progress<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    out: &Path,
    label: &str,
) -> Result<Option<EvalMetrics>> {
    let c = trainer.config().clone();
    let params = trainer.model().num_params();
    eprintln!(
        "{label}training {params} parameters for {} steps of {} tokens into {} (from step {})",
        c.steps,
        c.tokens_per_step(),
        out.display(),
        trainer.step()
    );
    let bar = ProgressBar::new(c.steps as u64)
        .with_position(trainer.step() as u64)
        .with_style(
            ProgressStyle::with_template(&format!(
                "{label}{{bar:30}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}] {{msg}}"
            ))
            .unwrap()
            .progress_chars("=> "),
        );
    let mut eval_msg = String::new();
    let last = run(trainer, out, |e| match e {
        TrainEvent::Step(m) => {
            bar.set_position(m.step as u64);
            let dmc = m
                .dmc
                .map(|d| format!(" | cr {:.2}/{:.2}", d.cr, d.target))
                .unwrap_or_default();
            bar.set_message(format!(
                "loss {:.3} | lr {:.1e} | {:.0} tok/s{dmc}{eval_msg}",
                m.loss, m.lr, m.tokens_per_s
            ));
        }
        TrainEvent::Eval(ev) => {
            let tasks: Vec<String> = ev
                .task_accuracy
                .iter()
                .map(|(t, a)| format!("{} {:.0}%", t.name(), a * 100.0))
                .collect();
            eval_msg = format!(" | valid {:.3} {}", ev.valid_loss, tasks.join(" "));
            bar.println(format!(
                "{label}step {:>5}: valid loss {:.4}; {}",
                ev.step,
                ev.valid_loss,
                tasks.join(", ")
            ));
        }
        TrainEvent::Checkpoint { .. } => {}
    })?;
    bar.finish_and_clear();
    Ok(last)
}

/// Parses `--dmc cr=2[,ramp=..][,window=..][,init_bias=..][,temperature=..][,zero_after_rope=..]` over the recipe's
/// DMC `settings` and `target` into the model's settings and the run's compression target.
pub fn parse_dmc(
    spec: &str,
    settings: kv_models::DmcSettings,
    target: Option<kv_models::train::DmcTraining>,
) -> Result<(kv_models::DmcSettings, kv_models::train::DmcTraining)> {
    let mut settings = settings;
    let mut cr = None;
    let mut ramp = None;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| {
            KvError::config("--dmc", part, "key=value pairs such as cr=2,ramp=0.75")
        })?;
        let number = |what: &str| {
            value
                .trim()
                .parse::<f64>()
                .map_err(|_| KvError::config(format!("--dmc {what}"), value, "a number"))
        };
        match key.trim() {
            "cr" => cr = Some(number("cr")?),
            "ramp" => ramp = Some(number("ramp")?),
            "init_bias" => settings.init_bias = number("init_bias")?,
            "temperature" => settings.temperature = number("temperature")?,
            "window" => {
                settings.window = value.trim().parse().map_err(|_| {
                    KvError::config("--dmc window", value, "a whole number of tokens such as 12")
                })?
            }
            "zero_after_rope" => {
                settings.zero_after_rope = value
                    .trim()
                    .parse()
                    .map_err(|_| KvError::config("--dmc zero_after_rope", value, "true or false"))?
            }
            other => {
                return Err(KvError::Unknown {
                    kind: "--dmc key".into(),
                    name: other.into(),
                    valid: "cr, ramp, window, init_bias, temperature, zero_after_rope".into(),
                });
            }
        }
    }
    let cr = cr
        .or(target.as_ref().map(|t| t.cr))
        .ok_or_else(|| KvError::config("--dmc", spec, "a target compression such as cr=2"))?;
    let mut target = kv_models::train::DmcTraining {
        cr,
        ..target.unwrap_or(kv_models::train::DmcTraining::new(cr))
    };
    if let Some(r) = ramp {
        target.ramp = r;
    }
    target.validate()?;
    Ok((settings, target))
}
