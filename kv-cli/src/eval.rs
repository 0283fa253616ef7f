//! `kv eval`: accuracy on a long-context task, or perplexity, of a saved model at a chosen context.

use crate::backend::BackendJob;
use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, Result};
use kv_models::data::{TaskKind, TextSource};
use kv_models::{load_model, policy_loss, task_accuracy_with};
use kv_policies::build_policy;
use serde_json::json;
use std::path::PathBuf;

/// Flags of `kv eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Checkpoint directory to evaluate.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// passkey, needle, recall, copy or ppl.
    #[arg(long, default_value = "passkey")]
    pub task: String,
    /// Context length in tokens (prompt + answer).
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Samples (task) or windows (ppl).
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Where the needle / passkey sits, as a fraction of the context (default: random).
    #[arg(long)]
    pub depth: Option<f32>,
    /// Seed of the task samples.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Cache policy spec: tasks generate under it, ppl predicts every token through it.
    #[arg(long, default_value = "full")]
    pub policy: String,
}

impl BackendJob for EvalArgs {
    type Output = serde_json::Value;

    fn run<B: Backend>(self, device: B::Device) -> Result<serde_json::Value> {
        let task = if self.task == "ppl" { None } else { Some(TaskKind::parse(&self.task).map_err(|_| KvError::Unknown {
            kind: "task".into(),
            name: self.task.clone(),
            valid: "passkey, needle, recall, copy, ppl".into(),
        })?) };
        if self.samples == 0 {
            return Err(KvError::config("--samples", 0, "at least 1"));
        }
        build_policy::<B>(&self.policy)?;
        let (model, _) = load_model::<B>(&self.checkpoint, &device)?;
        let start = std::time::Instant::now();
        let result = match task {
            Some(task) => {
                let spec = self.policy.clone();
                let mut make = || build_policy::<B>(&spec).expect("validated above");
                let r = task_accuracy_with(&model, task, self.context, self.samples, self.seed, self.depth, &mut make)?;
                json!({"task": task.name(), "policy": self.policy, "context": self.context, "accuracy": r.accuracy, "correct": r.correct, "total": r.total})
            }
            None => {
                let (_, valid) = TextSource::Stories.load(0)?;
                let spec = self.policy.clone();
                let mut make = || build_policy::<B>(&spec).expect("validated above");
                let loss = policy_loss(&model, &valid, self.context, self.samples, &mut make)?;
                json!({"task": "ppl", "policy": self.policy, "context": self.context, "loss": loss, "perplexity": loss.exp(), "windows": self.samples})
            }
        };
        let mut result = result;
        result["checkpoint"] = json!(self.checkpoint.display().to_string());
        result["seconds"] = json!(start.elapsed().as_secs_f64());
        Ok(result)
    }
}
