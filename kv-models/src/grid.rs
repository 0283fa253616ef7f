//! The evaluation grid: models x policies x compressions x probes x contexts x depths, one
//! result per cell, every setting recorded beside its numbers.
//!
//! A grid is validated as a whole before any cell runs, so a typo in the last policy does not
//! surface after an hour of evaluation.

use crate::data::{Corpus, TaskKind};
use crate::{DecoderLm, Tokenizer, policy_loss, task_accuracy_with};
use burn::prelude::*;
use kv_core::{KvError, Result};
use kv_policies::{PolicySpec, build_policy};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// What a cell measures: exact-match accuracy on a task, or perplexity through the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    /// A long-context task, answered greedily under the policy.
    Task(TaskKind),
    /// Held-out text, every token predicted through the compressed cache.
    Ppl,
}

impl Probe {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Probe::Task(t) => t.name(),
            Probe::Ppl => "ppl",
        }
    }

    /// Parses `ppl` or a task name.
    pub fn parse(name: &str) -> Result<Self> {
        if name == "ppl" {
            return Ok(Probe::Ppl);
        }
        TaskKind::parse(name).map(Probe::Task).map_err(|_| KvError::Unknown {
            kind: "task".into(),
            name: name.into(),
            valid: "passkey, needle, recall, copy, lookup, ppl".into(),
        })
    }

    /// Whether the probe places something at a depth of the context.
    fn uses_depth(self) -> bool {
        matches!(self, Probe::Task(TaskKind::Passkey | TaskKind::Needle))
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
}

/// One cell's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridCell {
    /// The model's label.
    pub model: String,
    /// The policy's name.
    pub policy: String,
    /// The full spec the cell ran, budget included.
    pub spec: String,
    /// Fraction of slots removed (0 for the full cache).
    pub compression: f64,
    /// The probe's name.
    pub probe: String,
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
    /// Samples or windows evaluated.
    pub samples: usize,
    /// Wall time of the cell.
    pub seconds: f64,
}

/// The spec a policy runs at a compression: `full` stays `full`; others get `budget = 1 - c`.
pub fn policy_at(policy: &str, compression: f64) -> Result<String> {
    let parsed = PolicySpec::parse(policy)?;
    if parsed.name == "full" {
        return Ok("full".into());
    }
    if parsed.pairs().any(|(k, _)| k == "budget") {
        return Err(KvError::config(
            format!("{} budget in the grid", parsed.name),
            policy,
            "no budget= in grid policies: the grid sets it from each compression",
        ));
    }
    let keep = 1.0 - compression;
    Ok(if policy.contains(':') { format!("{policy},budget={keep}") } else { format!("{policy}:budget={keep}") })
}

impl GridSpec {
    /// Tokens prefilled before a perplexity window of `context` tokens is read token by token.
    pub fn ppl_prompt_tokens(&self, context: usize) -> usize {
        ((self.ppl_prompt * context as f64).round() as usize).clamp(1, context)
    }

    /// Every cell for models labelled `models`, validated: unknown policies or parameters,
    /// compressions out of range and contexts too short fail here, before any work.
    pub fn cells<B: Backend>(&self, models: &[String]) -> Result<Vec<GridCell>> {
        if models.is_empty() {
            return Err(KvError::config("models", 0, "at least one checkpoint"));
        }
        for (name, axis) in [("policies", self.policies.len()), ("probes", self.probes.len()), ("contexts", self.contexts.len())] {
            if axis == 0 {
                return Err(KvError::config(name, "none", "at least one"));
            }
        }
        KvError::require_positive(&[("samples", self.samples), ("windows", self.windows)])?;
        if let Some(c) = self.compressions.iter().find(|c| !(0.0..1.0).contains(*c)) {
            return Err(KvError::config("compression", c, "a fraction of slots removed in [0, 1)"));
        }
        if let Some(d) = self.depths.iter().flatten().find(|d| !(0.0..=1.0).contains(*d)) {
            return Err(KvError::config("depth", d, "a fraction of the context in [0, 1]"));
        }
        if !(0.0..1.0).contains(&self.ppl_prompt) {
            return Err(KvError::config("ppl prompt", self.ppl_prompt, "a fraction of the perplexity window in [0, 1)"));
        }
        for &probe in &self.probes {
            let min = match probe {
                Probe::Task(t) => t.min_context(),
                Probe::Ppl => 2,
            };
            if let Some(&c) = self.contexts.iter().find(|&&c| c < min) {
                return Err(KvError::config(format!("{} context", probe.name()), c, format!("at least {min} tokens")));
            }
        }
        let mut policies = Vec::new();
        for policy in &self.policies {
            let name = PolicySpec::parse(policy)?.name;
            let compressions: Vec<f64> = if name == "full" { vec![0.0] } else { self.compressions.clone() };
            if compressions.is_empty() {
                return Err(KvError::config("compressions", "none", format!("at least one for policy {name}")));
            }
            for c in compressions {
                let spec = policy_at(policy, c)?;
                build_policy::<B>(&spec)?;
                policies.push((name.clone(), spec, c));
            }
        }
        let depths = if self.depths.is_empty() { vec![None] } else { self.depths.clone() };
        let mut cells = Vec::new();
        for model in models {
            for &probe in &self.probes {
                for &context in &self.contexts {
                    let probe_depths: &[Option<f32>] = if probe.uses_depth() { &depths } else { &[None] };
                    for &depth in probe_depths {
                        for (policy, spec, compression) in &policies {
                            cells.push(GridCell {
                                model: model.clone(),
                                policy: policy.clone(),
                                spec: spec.clone(),
                                compression: *compression,
                                probe: probe.name().into(),
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

/// Runs one cell on `model`; `text` is the held-out text of perplexity cells.
pub fn run_cell<B: Backend>(model: &DecoderLm<B>, tokenizer: &Tokenizer, cell: &GridCell, spec: &GridSpec, text: &Corpus) -> Result<CellResult> {
    let start = Instant::now();
    let mut make = || build_policy::<B>(&cell.spec).expect("validated when the grid was built");
    let mut result = CellResult { cell: cell.clone(), accuracy: None, loss: None, perplexity: None, kv_bytes: 0.0, samples: 0, seconds: 0.0 };
    match Probe::parse(&cell.probe)? {
        Probe::Task(task) => {
            let r = task_accuracy_with(model, tokenizer, task, cell.context, spec.samples, spec.seed, cell.depth, &mut make)?;
            result.accuracy = Some(r.accuracy);
            result.kv_bytes = r.kv_bytes;
            result.samples = r.total;
        }
        Probe::Ppl => {
            let r = policy_loss(model, text, cell.context, spec.windows, spec.ppl_prompt_tokens(cell.context), &mut make)?;
            result.loss = Some(r.loss);
            result.perplexity = Some(r.loss.exp());
            result.kv_bytes = r.kv_bytes;
            result.samples = spec.windows;
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    Ok(result)
}

/// Runs every cell, the model of each looked up by label; `on_cell` sees each result as it lands.
pub fn run_grid<B: Backend>(models: &[GridModel<'_, B>], cells: &[GridCell], spec: &GridSpec, mut on_cell: impl FnMut(&CellResult)) -> Result<Vec<CellResult>> {
    let mut out = Vec::with_capacity(cells.len());
    for cell in cells {
        let m = models
            .iter()
            .find(|m| m.label == cell.model)
            .ok_or_else(|| KvError::config("grid model", &cell.model, "one of the loaded models"))?;
        let r = run_cell(m.model, &m.tokenizer, cell, spec, &m.text)?;
        on_cell(&r);
        out.push(r);
    }
    Ok(out)
}
