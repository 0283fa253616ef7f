//! `kv kept`: which positions each policy keeps after a prompt, per layer and KV head, as JSON
//! (what `reference/kvpress_kept.py` records for kvpress, for any model, policy and prompt).

use crate::backend::BackendJob;
use crate::model_source::ModelArgs;
use burn::prelude::*;
use clap::Args;
use kv_core::{KvError, LayerCache, Result};
use kv_models::SharedPrefill;
use kv_policies::CachePolicy;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Flags of `kv kept`.
#[derive(Debug, Clone, Args)]
pub struct KeptArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Policy specs with their budgets (`snapkv:budget=0.5,window=64`, ...).
    #[arg(long, value_delimiter = ',', required = true)]
    pub policy: Vec<String>,
    /// The prompt, as plain text.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// The prompt, read from a UTF-8 file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Where to write the JSON.
    #[arg(long, default_value = "runs/kept.json")]
    pub out: PathBuf,
}

/// The contents of the JSON `kv kept` writes.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct KeptFile {
    /// The model's label.
    pub model: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Per policy spec: per layer, per KV head (batch row 0), the original positions kept.
    pub policies: BTreeMap<String, Vec<Vec<Vec<i64>>>>,
    /// Per policy spec that chooses per head (FastGen): per layer, per KV head, what it chose.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub choices: BTreeMap<String, Vec<Vec<String>>>,
}

/// The original positions each KV head of batch row 0 of `cache` keeps.
pub(crate) fn positions<B: Backend>(cache: &LayerCache<B>) -> Vec<Vec<i64>> {
    cache
        .kept_positions()
        .into_iter()
        .take(cache.shape().kv_heads)
        .collect()
}

impl BackendJob for KeptArgs {
    type Output = KeptFile;

    fn run<B: Backend>(self, device: B::Device) -> Result<KeptFile> {
        let specs = kv_policies::split_specs(&self.policy);
        // Checked before the model loads; built with the model's tokenizer after.
        let check = kv_policies::PolicyEnv::with_classes(kv_policies::TokenClasses::default());
        specs
            .iter()
            .try_for_each(|p| crate::backend::policies::<B>().build(p, &check).map(|_| ()))?;
        let text = match (&self.prompt, &self.prompt_file) {
            (Some(t), _) => t.clone(),
            (None, Some(path)) => self
                .model
                .read_prompt_file(&self.model.config("tiny-mha")?, path)?,
            (None, None) => {
                return Err(KvError::config(
                    "--prompt",
                    "missing",
                    "a prompt (--prompt TEXT or --prompt-file FILE)",
                ));
            }
        };
        kv_models::check_replaceable(&self.out)?;
        let loaded = self.model.load::<B>("tiny-mha", &device)?;
        let ids = loaded.tokenizer.encode_prompt(&text)?;
        self.model
            .check_context(&loaded.config, "--prompt", ids.len())?;
        let env = loaded.tokenizer.policy_env();
        let mut policies: Vec<Box<dyn CachePolicy<B>>> = specs
            .iter()
            .map(|p| crate::backend::policies::<B>().build(p, &env))
            .collect::<Result<_>>()?;
        if ids.is_empty() {
            return Err(KvError::config(
                "--prompt",
                "\"\" (empty)",
                "text with at least one token",
            ));
        }
        let refs: Vec<&dyn CachePolicy<B>> = policies.iter().map(|p| p.as_ref()).collect();
        let shared = SharedPrefill::new(&loaded.model, &ids, &refs, 0)?;
        let (mut out, mut choices) = (BTreeMap::new(), BTreeMap::new());
        for (spec, policy) in specs.iter().zip(policies.iter_mut()) {
            let cache = shared.cache_for(&loaded.model, policy.as_mut())?;
            out.insert(
                spec.clone(),
                (0..cache.num_layers())
                    .map(|l| positions(cache.layer(l)))
                    .collect(),
            );
            let chose = policy.head_choices();
            if !chose.is_empty() {
                choices.insert(spec.clone(), chose);
            }
        }
        Ok(KeptFile {
            model: self.model.label("tiny-mha"),
            prompt_tokens: ids.len(),
            policies: out,
            choices,
        })
    }
}

/// Writes what each (layer, KV head) holds after the prompt beside the JSON at `json`: a
/// Markdown table of slots and compression ratios (prompt tokens / slots) and a heat map (a panel
/// per policy, heads across, layers down, each square the share of the prompt's tokens the head
/// holds), which is how DMC's learned per-head rates and a ragged policy's budgets are read.
pub fn write_heads(json: &Path, file: &KeptFile) -> Result<Vec<PathBuf>> {
    let stem = json
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kept".into());
    let (md_path, png_path) = (
        json.with_file_name(format!("{stem}-heads.md")),
        json.with_file_name(format!("{stem}-heads.png")),
    );
    let tokens = file.prompt_tokens.max(1) as f64;
    let heads_max = file
        .policies
        .values()
        .flat_map(|layers| layers.iter().map(Vec::len))
        .max()
        .unwrap_or(0);
    let layers_max = file.policies.values().map(Vec::len).max().unwrap_or(0);
    let mut md = format!(
        "# Slots per KV head after the prompt\n\n{}, {} prompt tokens; each cell: slots held (compression ratio = tokens / slots).\n\n| policy | layer | {} |\n|---|---:|{}\n",
        file.model,
        file.prompt_tokens,
        (0..heads_max)
            .map(|h| format!("head {h}"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---:|".repeat(heads_max)
    );
    let mut panels = Vec::new();
    for (spec, layers) in &file.policies {
        let mut cells = Vec::new();
        for (l, heads) in layers.iter().enumerate() {
            let row: Vec<String> = heads
                .iter()
                .map(|kept| format!("{} ({:.2}x)", kept.len(), tokens / kept.len().max(1) as f64))
                .collect();
            md += &format!("| {spec} | {l} | {} |\n", row.join(" | "));
            cells.extend(
                heads
                    .iter()
                    .enumerate()
                    .map(|(h, kept)| (h, l, kept.len() as f64 / tokens)),
            );
        }
        panels.push(crate::plot::Panel {
            title: spec.clone(),
            cells,
        });
    }
    kv_models::write_atomic(&md_path, md.as_bytes())?;
    let title = format!("{}: share of the prompt each KV head holds", file.model);
    let maps = crate::plot::HeatMaps {
        title: &title,
        columns: (0..heads_max).map(|h| h.to_string()).collect(),
        rows: (0..layers_max).map(|l| l.to_string()).collect(),
        x_label: "KV head",
        y_label: "layer",
        panels,
    };
    crate::plot::heat_maps(&png_path, &maps)?;
    Ok(vec![md_path, png_path])
}
