//! The evaluation grid: models x policies x compressions x probes x contexts x depths, one
//! result per cell, every setting recorded beside its numbers.
//!
//! A grid is validated as a whole before any cell runs, so a typo in the last policy does not
//! surface after an hour of evaluation.

use crate::data::{
    ANSWER_TOKENS, Corpus, DEFAULT_DEPTHS, FRAME_TOKENS, Haystack, NiahMode, NiahSpec, TaskKind,
    niah_prompt,
};
use crate::eval::fanout::SharedPrefill;
use crate::eval::scores::{policy_loss, task_accuracy_with};
use crate::model::decoder::DecoderLm;
use crate::model::generate::{GenerateConfig, continue_generation, last_row};
use crate::model::sampling::SamplerConfig;
use crate::text::tokenizer::Tokenizer;
use burn::prelude::*;
use kv_core::{KvError, Result};
use kv_policies::{Phase, PolicyEnv, Registry, TokenClasses};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// What a cell measures: exact-match accuracy on a task, the Needle-in-a-Haystack score, or
/// perplexity through the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A long-context task, answered greedily under the policy.
    Task(TaskKind),
    /// Held-out generated stories, predicted through the compressed cache.
    Ppl,
    /// Paul Graham's essays (the haystack), predicted through the compressed cache.
    #[serde(rename = "ppl-essays")]
    PplEssays,
    /// The Needle-in-a-Haystack test in one of its two modes.
    Niah(NiahMode),
}

impl Probe {
    /// Every probe: each task, then the Needle-in-a-Haystack modes and the perplexities.
    pub fn all() -> Vec<Probe> {
        let tasks = TaskKind::ALL.iter().map(|&t| Probe::Task(t));
        tasks
            .chain([
                Probe::Niah(NiahMode::Agnostic),
                Probe::Niah(NiahMode::QueryAware),
                Probe::Ppl,
                Probe::PplEssays,
            ])
            .collect()
    }

    /// Every probe name [`Probe::parse`] accepts, comma-separated (for help and errors).
    pub fn names() -> String {
        Self::all()
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Probe::Task(t) => t.name(),
            Probe::Ppl => "ppl",
            Probe::PplEssays => "ppl-essays",
            Probe::Niah(NiahMode::Agnostic) => "niah",
            Probe::Niah(NiahMode::QueryAware) => "niah-query",
        }
    }

    /// Parses a probe name ([`Probe::names`]).
    pub fn parse(name: &str) -> Result<Self> {
        Self::all()
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| KvError::Unknown {
                kind: "task".into(),
                name: name.into(),
                valid: Self::names(),
            })
    }

    /// Whether the probe places something at a depth of the context.
    fn uses_depth(self) -> bool {
        matches!(
            self,
            Probe::Task(TaskKind::Passkey | TaskKind::Needle) | Probe::Niah(_)
        )
    }

    /// Whether the probe reads the haystack (the essays or `--haystack`).
    fn reads_haystack(self) -> bool {
        matches!(self, Probe::PplEssays | Probe::Niah(_))
    }

    /// Whether the probe reports perplexity (else a score in [0, 1]).
    pub fn is_perplexity(self) -> bool {
        matches!(self, Probe::Ppl | Probe::PplEssays)
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A probe written and read as its name, so a result's JSON says `"probe": "passkey"`.
mod probe_by_name {
    use super::Probe;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(probe: &Probe, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(probe.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Probe, D::Error> {
        let name = String::deserialize(d)?;
        Probe::parse(&name).map_err(serde::de::Error::custom)
    }
}

/// The axes of a grid (models come separately, as loaded models).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridSpec {
    /// Policy specs without a budget (`h2o`, `knorm:skip=2`); `full` is the reference.
    pub policies: Vec<String>,
    /// Fractions of cache slots removed, each in [0, 1): 0.5 keeps half, 0.875 keeps an eighth.
    pub compressions: Vec<f64>,
    /// What to measure.
    pub probes: Vec<Probe>,
    /// Context lengths in tokens (prompt + answer, or the perplexity window).
    pub contexts: Vec<usize>,
    /// Depths of the passkey / needle (None: random per sample); other probes ignore them.
    pub depths: Vec<Option<f32>>,
    /// Samples per task cell.
    pub samples: usize,
    /// Text windows per perplexity cell.
    pub windows: usize,
    /// Fraction of each perplexity window prefilled as one prompt before the rest is read token
    /// by token (0: one token, StreamingLLM's way); only the continuation is scored, so
    /// prefill-time policies (SnapKV, PyramidKV, AdaKV) are measured on what they compressed.
    #[serde(default)]
    pub ppl_prompt: f64,
    /// Seed of the task samples (the same prompts in every cell).
    pub seed: u64,
    /// The Needle-in-a-Haystack test's needle, question, expected phrases and haystack.
    #[serde(default)]
    pub niah: NiahSpec,
    /// Tokens of a perplexity window's continuation fed per call (1: token by token; more: the
    /// policy acts once per chunk, which is cheaper on a large model).
    #[serde(default = "one")]
    pub ppl_chunk: usize,
    /// Run contexts past a model's `max_positions` (length-extrapolation studies); by default
    /// such a grid is refused before any work.
    #[serde(default)]
    pub allow_beyond_context: bool,
}

fn one() -> usize {
    1
}

/// One cell's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridCell {
    /// The model's label.
    pub model: String,
    /// The policy as the grid was given it (name and any parameters, no budget).
    pub policy: String,
    /// The full spec the cell ran, budget included.
    pub spec: String,
    /// Fraction of slots removed (0 for the full cache).
    pub compression: f64,
    /// What the cell measures (its name in JSON: `passkey`, `niah`, `ppl`, ...).
    #[serde(with = "probe_by_name")]
    pub probe: Probe,
    /// Context length in tokens.
    pub context: usize,
    /// Depth of the passkey / needle, when fixed.
    pub depth: Option<f32>,
}

/// One cell's settings and numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    /// The settings.
    #[serde(flatten)]
    pub cell: GridCell,
    /// Exact-match accuracy (task probes).
    pub accuracy: Option<f64>,
    /// Mean next-token loss in nats (perplexity probe).
    pub loss: Option<f64>,
    /// `exp(loss)` (perplexity probe).
    pub perplexity: Option<f64>,
    /// Key/value bytes held at the end of each sample, measured from the cache, averaged.
    pub kv_bytes: f64,
    /// Fraction of slots held fewer than one per token and KV head, measured, averaged: what the
    /// policy evicted, plus what the model merged (DMC), so a DMC model's `full` is below 1.
    #[serde(default)]
    pub removed: f64,
    /// Samples or windows evaluated.
    pub samples: usize,
    /// Wall time of the cell.
    pub seconds: f64,
    /// The generated answer (Needle-in-a-Haystack cells), to see what the score was given for.
    #[serde(default)]
    pub answer: Option<String>,
}

/// The spec a policy runs at a compression: `full` stays `full`, FastGen (which sets its own
/// compression from its recovery threshold) keeps its spec; others get `budget = 1 - c`.
pub fn policy_at<B: Backend>(
    registry: &Registry<B>,
    policy: &str,
    compression: f64,
) -> Result<String> {
    let parsed = registry.parse(policy)?;
    if parsed.name == "full" {
        return Ok("full".into());
    }
    if registry.is_self_budgeted(&parsed.name) {
        return Ok(policy.trim().to_string());
    }
    if parsed.pairs().any(|(k, _)| k == "budget") {
        return Err(KvError::config(
            format!("{} budget in the grid", parsed.name),
            policy,
            "no budget= in grid policies: the grid sets it from each compression",
        ));
    }
    let keep = 1.0 - compression;
    Ok(if policy.contains(':') {
        format!("{policy},budget={keep}")
    } else {
        format!("{policy}:budget={keep}")
    })
}

impl GridSpec {
    /// Tokens prefilled before a perplexity window of `context` tokens is read token by token.
    pub fn ppl_prompt_tokens(&self, context: usize) -> usize {
        ((self.ppl_prompt * context as f64).round() as usize).clamp(1, context)
    }

    /// Every cell for models labelled `models`, validated: policies unknown to `registry` or
    /// their bad parameters, compressions out of range and contexts too short fail here, before
    /// any work.
    pub fn cells<B: Backend>(
        &self,
        models: &[String],
        registry: &Registry<B>,
    ) -> Result<Vec<GridCell>> {
        if models.is_empty() {
            return Err(KvError::config("models", 0, "at least one checkpoint"));
        }
        for (name, axis) in [
            ("policies", self.policies.len()),
            ("probes", self.probes.len()),
            ("contexts", self.contexts.len()),
        ] {
            if axis == 0 {
                return Err(KvError::config(name, "none", "at least one"));
            }
        }
        KvError::require_positive(&[
            ("samples", self.samples),
            ("windows", self.windows),
            ("ppl chunk", self.ppl_chunk),
        ])?;
        if self.probes.iter().any(|p| matches!(p, Probe::Niah(_))) {
            self.niah.validate()?;
        }
        if let Some(c) = self.compressions.iter().find(|c| !(0.0..1.0).contains(*c)) {
            return Err(KvError::config(
                "compression",
                c,
                "a fraction of slots removed in [0, 1)",
            ));
        }
        if let Some(d) = self
            .depths
            .iter()
            .flatten()
            .find(|d| !(0.0..=1.0).contains(*d))
        {
            return Err(KvError::config(
                "depth",
                d,
                "a fraction of the context in [0, 1]",
            ));
        }
        if !(0.0..1.0).contains(&self.ppl_prompt) {
            return Err(KvError::config(
                "ppl prompt",
                self.ppl_prompt,
                "a fraction of the perplexity window in [0, 1)",
            ));
        }
        for &probe in &self.probes {
            let min = match probe {
                Probe::Task(t) => t.min_context(),
                Probe::Ppl | Probe::PplEssays => 2,
                Probe::Niah(_) => FRAME_TOKENS + 64,
            };
            if let Some(&c) = self.contexts.iter().find(|&&c| c < min) {
                return Err(KvError::config(
                    format!("{} context", probe.name()),
                    c,
                    format!("at least {min} tokens"),
                ));
            }
        }
        let mut policies = Vec::new();
        for policy in &self.policies {
            let name = registry.parse(policy)?.name;
            let compressions: Vec<f64> = if registry.is_self_budgeted(&name) {
                vec![0.0]
            } else {
                self.compressions.clone()
            };
            if compressions.is_empty() {
                return Err(KvError::config(
                    "compressions",
                    "none",
                    format!("at least one for policy {name}"),
                ));
            }
            // Label: the policy as given (its name, plus any parameters), so variants such as
            // `streaming` and `streaming:rerotate=true` stay apart in tables and charts.
            let label = if name == "full" {
                name.clone()
            } else {
                policy.trim().to_string()
            };
            for c in compressions {
                let spec = policy_at(registry, policy, c)?;
                // Validated with empty token classes: the run hands each model's own.
                registry.build(&spec, &PolicyEnv::with_classes(TokenClasses::default()))?;
                policies.push((label.clone(), spec, c));
            }
        }
        let depths = if self.depths.is_empty() {
            vec![None]
        } else {
            self.depths.clone()
        };
        // The haystack test is defined at fixed depths; without any it uses the standard five.
        let niah_depths: Vec<Option<f32>> = if self.depths.is_empty() {
            DEFAULT_DEPTHS.iter().map(|&d| Some(d)).collect()
        } else {
            self.depths.clone()
        };
        let mut cells = Vec::new();
        for model in models {
            for &probe in &self.probes {
                for &context in &self.contexts {
                    let probe_depths: &[Option<f32>] = match probe {
                        Probe::Niah(_) => &niah_depths,
                        p if p.uses_depth() => &depths,
                        _ => &[None],
                    };
                    for &depth in probe_depths {
                        for (policy, spec, compression) in &policies {
                            cells.push(GridCell {
                                model: model.clone(),
                                policy: policy.clone(),
                                spec: spec.clone(),
                                compression: *compression,
                                probe,
                                context,
                                depth,
                            });
                        }
                    }
                }
            }
        }
        Ok(cells)
    }
}

/// A model of the grid with what it reads: its tokenizer and the held-out text in its tokens.
pub struct GridModel<'a, B: Backend> {
    /// The label cells name it by.
    pub label: String,
    /// The model.
    pub model: &'a DecoderLm<B>,
    /// Its tokenizer (task prompts are encoded with it).
    pub tokenizer: Tokenizer,
    /// Held-out text for perplexity cells, in its tokenizer's tokens.
    pub text: Corpus,
}

/// Runs one cell on `model`; `text` is the held-out text of `ppl` cells, `haystack` the
/// haystack of NIAH and `ppl-essays` cells (already read, with its tokens for this model).
pub fn run_cell<B: Backend>(
    model: &DecoderLm<B>,
    tokenizer: &Tokenizer,
    cell: &GridCell,
    spec: &GridSpec,
    text: &Corpus,
    haystack: Option<&Haystack>,
    registry: &Registry<B>,
) -> Result<CellResult> {
    if let Probe::Niah(_) = cell.probe {
        let haystack = haystack.ok_or_else(|| {
            KvError::config(
                "niah cell",
                &cell.model,
                "a haystack (the essays or --haystack)",
            )
        })?;
        return Ok(niah_cells(
            model,
            tokenizer,
            std::slice::from_ref(cell),
            spec,
            haystack,
            registry,
        )?
        .remove(0));
    }
    let start = Instant::now();
    let env = tokenizer.policy_env();
    let mut make = || {
        registry
            .build(&cell.spec, &env)
            .expect("validated when the grid was built")
    };
    let mut result = CellResult {
        cell: cell.clone(),
        accuracy: None,
        loss: None,
        perplexity: None,
        kv_bytes: 0.0,
        removed: 0.0,
        samples: 0,
        seconds: 0.0,
        answer: None,
    };
    match cell.probe {
        Probe::Task(task) => {
            let r = task_accuracy_with(
                model,
                tokenizer,
                task,
                cell.context,
                spec.samples,
                spec.seed,
                cell.depth,
                &mut make,
            )?;
            result.accuracy = Some(r.accuracy);
            result.kv_bytes = r.kv_bytes;
            result.removed = r.removed;
            result.samples = r.total;
        }
        probe @ (Probe::Ppl | Probe::PplEssays) => {
            let essays;
            let corpus = if probe == Probe::Ppl {
                text
            } else {
                let h = haystack.ok_or_else(|| {
                    KvError::config(
                        "ppl-essays cell",
                        &cell.model,
                        "the essays (run scripts/fetch-assets.sh)",
                    )
                })?;
                essays = Corpus::tokenize(h.text().as_bytes(), tokenizer)?;
                &essays
            };
            let r = policy_loss(
                model,
                corpus,
                cell.context,
                spec.windows,
                spec.ppl_prompt_tokens(cell.context),
                spec.ppl_chunk,
                &mut make,
            )?;
            result.loss = Some(r.loss);
            result.perplexity = Some(r.loss.exp());
            result.kv_bytes = r.kv_bytes;
            result.removed = r.removed;
            result.samples = spec.windows;
        }
        Probe::Niah(_) => unreachable!("handled above"),
    }
    result.seconds = start.elapsed().as_secs_f64();
    Ok(result)
}

/// The Needle-in-a-Haystack cells of one (model, mode, context, depth), every policy of
/// `cells` reading one shared prefill of the prompt ([`SharedPrefill`]); each cell's time is
/// its own decode plus an equal share of the prefill.
fn niah_cells<B: Backend>(
    model: &DecoderLm<B>,
    tokenizer: &Tokenizer,
    cells: &[GridCell],
    spec: &GridSpec,
    haystack: &Haystack,
    registry: &Registry<B>,
) -> Result<Vec<CellResult>> {
    let start = Instant::now();
    let first = &cells[0];
    let Probe::Niah(mode) = first.probe else {
        return Err(KvError::config(
            "niah cells",
            first.probe.name(),
            "niah or niah-query",
        ));
    };
    let prompt = niah_prompt(
        haystack,
        tokenizer,
        &spec.niah,
        first.context,
        first.depth.unwrap_or(0.5),
    )?;
    let prefill: Vec<u32> = match mode {
        NiahMode::Agnostic => prompt.context.clone(),
        NiahMode::QueryAware => prompt
            .context
            .iter()
            .chain(&prompt.question)
            .copied()
            .collect(),
    };
    let env = tokenizer.policy_env();
    let mut policies: Vec<Box<dyn kv_policies::CachePolicy<B>>> = cells
        .iter()
        .map(|c| registry.build(&c.spec, &env))
        .collect::<Result<_>>()?;
    let shared = {
        let refs: Vec<&dyn kv_policies::CachePolicy<B>> =
            policies.iter().map(|p| p.as_ref()).collect();
        SharedPrefill::new(
            model,
            &prefill,
            &refs,
            prompt.question.len() + ANSWER_TOKENS,
        )?
    };
    let prefill_share = start.elapsed().as_secs_f64() / cells.len() as f64;
    let stops = tokenizer.stop_tokens();
    let config = GenerateConfig {
        max_new_tokens: ANSWER_TOKENS,
        sampler: SamplerConfig::default(),
        stop_tokens: stops.clone(),
        ..Default::default()
    };
    let device = model.embed.weight.device();
    let mut out = Vec::with_capacity(cells.len());
    for (cell, policy) in cells.iter().zip(policies.iter_mut()) {
        let t = Instant::now();
        let mut cache = shared.cache_for(model, policy.as_mut())?;
        let (logits, next_step) = match mode {
            NiahMode::Agnostic => {
                let ids: Vec<i32> = prompt.question.iter().map(|&t| t as i32).collect();
                let x =
                    Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([1, ids.len()]);
                (
                    last_row(model.forward_last_with_policy(
                        x,
                        &mut cache,
                        policy.as_mut(),
                        Phase::Decode { step: 1 },
                    )?),
                    2,
                )
            }
            NiahMode::QueryAware => (last_row(shared.last_logits.clone()), 1),
        };
        let tokens = continue_generation(
            model,
            &mut cache,
            logits,
            &config,
            policy.as_mut(),
            next_step,
            |_| {},
        )?;
        let answer = tokenizer.decode(
            &tokens
                .iter()
                .copied()
                .filter(|t| !stops.contains(t))
                .collect::<Vec<_>>(),
        )?;
        out.push(CellResult {
            cell: cell.clone(),
            accuracy: Some(spec.niah.score(&answer)),
            loss: None,
            perplexity: None,
            kv_bytes: cache.stats().kv_bytes as f64,
            removed: cache.stats().compression_ratio(),
            samples: 1,
            seconds: t.elapsed().as_secs_f64() + prefill_share,
            answer: Some(answer),
        });
    }
    Ok(out)
}

/// Runs every cell, the model of each looked up by label; `on_cell` sees each result as it
/// lands. Consecutive Needle-in-a-Haystack cells that differ only in their policy share one
/// prefill.
pub fn run_grid<B: Backend>(
    models: &[GridModel<'_, B>],
    cells: &[GridCell],
    spec: &GridSpec,
    registry: &Registry<B>,
    mut on_cell: impl FnMut(&CellResult),
) -> Result<Vec<CellResult>> {
    if !spec.allow_beyond_context {
        for m in models {
            if let Some(c) = cells
                .iter()
                .find(|c| c.model == m.label && c.context > m.model.max_positions)
            {
                return Err(KvError::config(
                    "context",
                    format!("{} tokens for {}", c.context, m.label),
                    format!(
                        "at most the model's max_positions = {} (allow_beyond_context goes past it)",
                        m.model.max_positions
                    ),
                ));
            }
        }
    }
    let needs_haystack = cells.iter().any(|c| c.probe.reads_haystack());
    let haystack = if needs_haystack {
        Some(Haystack::for_spec(&spec.niah)?)
    } else {
        None
    };
    let mut out = Vec::with_capacity(cells.len());
    let mut i = 0;
    while i < cells.len() {
        let cell = &cells[i];
        let m = models
            .iter()
            .find(|m| m.label == cell.model)
            .ok_or_else(|| {
                KvError::config("grid model", &cell.model, "one of the loaded models")
            })?;
        let results = if let (Probe::Niah(_), Some(h)) = (cell.probe, haystack.as_ref()) {
            let same = |c: &GridCell| {
                (&c.model, &c.probe, c.context, c.depth)
                    == (&cell.model, &cell.probe, cell.context, cell.depth)
            };
            let n = cells[i..].iter().take_while(|c| same(c)).count();
            niah_cells(m.model, &m.tokenizer, &cells[i..i + n], spec, h, registry)?
        } else {
            vec![run_cell(
                m.model,
                &m.tokenizer,
                cell,
                spec,
                &m.text,
                haystack.as_ref(),
                registry,
            )?]
        };
        i += results.len();
        for r in results {
            on_cell(&r);
            out.push(r);
        }
    }
    Ok(out)
}
