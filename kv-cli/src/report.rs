//! Grid results as files: `eval.json` (every number with its settings), `eval.md` (a pivot
//! table) and PNG charts of accuracy and perplexity against compression.

use crate::plot::{Chart, HeatMaps, Panel, Series, heat_maps, line_chart};
use kv_core::{KvError, Result};
use kv_models::eval::grid::{CellResult, GridSpec, Probe};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the JSON layout documented in docs/harness.md.
pub const FORMAT_VERSION: u32 = 1;

/// The contents of `eval.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GridFile {
    /// Layout version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Backend the grid ran on.
    pub device: String,
    /// The grid's axes.
    pub spec: GridSpec,
    /// One result per cell.
    pub results: Vec<CellResult>,
}

impl GridFile {
    /// Reads an `eval.json` from `text` (`origin` names it in errors), refusing another layout
    /// version and numbers no grid writes: accuracies outside [0, 1], a perplexity below 1,
    /// compressions outside [0, 1], depths outside [0, 1] and non-finite or negative measurements.
    pub fn parse(text: &str, origin: &Path) -> Result<GridFile> {
        let file: GridFile = serde_json::from_str(text)
            .map_err(|e| KvError::io(origin, format!("not an eval.json: {e}")))?;
        if file.version != FORMAT_VERSION {
            return Err(KvError::io(
                origin,
                format!(
                    "version = {}; this build reads eval.json version {FORMAT_VERSION}",
                    file.version
                ),
            ));
        }
        for (i, r) in file.results.iter().enumerate() {
            let bad = |field: &str, v: f64, valid: &str| {
                KvError::io(
                    origin,
                    format!("results[{i}].{field} = {v:?}; expected {valid}"),
                )
            };
            let unit = |field: &str, v: f64| {
                if (0.0..=1.0).contains(&v) {
                    Ok(())
                } else {
                    Err(bad(field, v, "a fraction in [0, 1]"))
                }
            };
            unit("compression", r.cell.compression)?;
            unit("removed", r.removed)?;
            if let Some(a) = r.accuracy {
                unit("accuracy", a)?;
            }
            if let Some(d) = r.cell.depth {
                unit("depth", d as f64)?;
            }
            if let Some(p) = r.perplexity.filter(|p| !(p.is_finite() && *p >= 1.0)) {
                return Err(bad("perplexity", p, "a finite number >= 1"));
            }
            if let Some(l) = r.loss.filter(|l| !(l.is_finite() && *l >= 0.0)) {
                return Err(bad("loss", l, "a finite number >= 0 (nats)"));
            }
            for (field, v) in [("kv_bytes", r.kv_bytes), ("seconds", r.seconds)] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad(field, v, "a finite number >= 0"));
                }
            }
        }
        Ok(file)
    }

    /// Reads and checks the `eval.json` at `path` ([`GridFile::parse`]).
    pub fn read(path: &Path) -> Result<GridFile> {
        let text = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
        Self::parse(&text, path)
    }
}

/// A row of the pivot table: one model under one policy at one compression.
type RowKey = (String, String, u64);

fn row_key(r: &CellResult) -> RowKey {
    // Compression as an integer key (per mille) so rows sort and group exactly.
    (
        r.cell.model.clone(),
        r.cell.policy.clone(),
        (r.cell.compression * 1000.0).round() as u64,
    )
}

fn value(r: &CellResult) -> f64 {
    r.accuracy.or(r.perplexity).unwrap_or(f64::NAN)
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let (s, n) = xs
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { f64::NAN } else { s / n as f64 }
}

/// The pivot table: a row per (model, policy, compression), a column per (probe, context) with
/// depths averaged, and the measured share of the full cache's bytes the row kept.
pub fn markdown(results: &[CellResult]) -> String {
    let mut columns: Vec<(String, usize)> = results
        .iter()
        .map(|r| (r.cell.probe.to_string(), r.cell.context))
        .collect();
    columns.sort();
    columns.dedup();
    let mut rows: BTreeMap<RowKey, Vec<&CellResult>> = BTreeMap::new();
    for r in results {
        rows.entry(row_key(r)).or_default().push(r);
    }
    let mut s = String::from("| model | policy | compression |");
    for (probe, ctx) in &columns {
        let unit = if probe.starts_with("ppl") {
            "ppl"
        } else if probe.starts_with("niah") {
            "score"
        } else {
            "acc"
        };
        s += &format!(" {probe}@{ctx} {unit} |");
    }
    s += " kept bytes (measured) |\n|---|---|---:|";
    s += &"---:|".repeat(columns.len() + 1);
    s += "\n";
    for ((model, policy, c), cells) in &rows {
        // A policy that sets its own compression (FastGen) shows what it kept instead.
        let compression = if sets_own_compression(policy) {
            "own".to_string()
        } else {
            format!("{:.1}%", *c as f64 / 10.0)
        };
        s += &format!("| {model} | {policy} | {compression} |");
        for col in &columns {
            let v = mean(
                cells
                    .iter()
                    .filter(|r| (r.cell.probe.name(), r.cell.context) == (col.0.as_str(), col.1))
                    .map(|r| value(r)),
            );
            s += &match (v.is_nan(), col.0.starts_with("ppl")) {
                (true, _) => " - |".to_string(),
                (false, true) => format!(" {v:.3} |"),
                (false, false) => format!(" {:.0}% |", v * 100.0),
            };
        }
        let kept = mean(cells.iter().filter_map(|r| kept_share(results, r)));
        s += &if kept.is_nan() {
            " - |\n".to_string()
        } else {
            format!(" {:.1}% |\n", kept * 100.0)
        };
    }
    s
}

/// Whether a policy label names one that sets its own compression (FastGen), not the grid.
fn sets_own_compression(policy: &str) -> bool {
    let name = policy.split(':').next().unwrap_or(policy);
    name != "full"
        && crate::backend::policies::<crate::backend::NamingBackend>().is_self_budgeted(name)
}

/// A cell's bytes over an uncompressed cache's in the same (model, probe, context, depth): the
/// `full` cell's bytes, scaled up by the slots it still lacked (a DMC model merges under `full`).
fn kept_share(results: &[CellResult], r: &CellResult) -> Option<f64> {
    let full = results.iter().find(|f| {
        f.cell.policy == "full"
            && f.cell.model == r.cell.model
            && f.cell.probe == r.cell.probe
            && f.cell.context == r.cell.context
            && f.cell.depth == r.cell.depth
    })?;
    let uncompressed = full.kv_bytes / (1.0 - full.removed).max(1e-9);
    (uncompressed > 0.0).then(|| r.kv_bytes / uncompressed)
}

/// One chart per probe: its metric against compression, a line per (model, policy), each line
/// starting from the model's full-cache value at compression 0.
pub fn charts(dir: &Path, results: &[CellResult]) -> Result<Vec<PathBuf>> {
    let mut probes: Vec<String> = results.iter().map(|r| r.cell.probe.to_string()).collect();
    probes.sort();
    probes.dedup();
    let mut written = Vec::new();
    for probe in probes {
        let of_probe: Vec<&CellResult> = results
            .iter()
            .filter(|r| r.cell.probe.name() == probe)
            .collect();
        let mut lines: BTreeMap<(String, String), BTreeMap<u64, Vec<f64>>> = BTreeMap::new();
        for r in &of_probe {
            let (model, policy, mut c) = row_key(r);
            if sets_own_compression(&policy) {
                // Plotted at the compression it reached: one minus the share of bytes it kept.
                c = kept_share(results, r)
                    .map_or(c, |k| ((1.0 - k) * 1000.0).round().max(0.0) as u64);
            }
            lines
                .entry((model, policy))
                .or_default()
                .entry(c)
                .or_default()
                .push(value(r));
        }
        let full: BTreeMap<String, f64> = lines
            .iter()
            .filter(|((_, p), _)| p == "full")
            .map(|((m, _), pts)| (m.clone(), mean(pts.values().flatten().copied())))
            .collect();
        let several_models = full.len() > 1
            || lines
                .keys()
                .map(|k| &k.0)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                > 1;
        let series: Vec<Series> = lines
            .iter()
            .filter(|((_, p), _)| p != "full")
            .map(|((model, policy), pts)| {
                let mut points: Vec<(f64, f64)> =
                    full.get(model).map(|&v| vec![(0.0, v)]).unwrap_or_default();
                points.extend(
                    pts.iter()
                        .map(|(&c, vs)| (c as f64 / 1000.0, mean(vs.iter().copied()))),
                );
                Series {
                    name: if several_models {
                        format!("{policy} ({model})")
                    } else {
                        policy.clone()
                    },
                    points,
                }
            })
            .collect();
        if series.is_empty() {
            continue;
        }
        let (file, title, y) = if probe == "ppl" {
            (
                "perplexity.png".to_string(),
                "Perplexity through the compressed cache".to_string(),
                "perplexity",
            )
        } else if probe.starts_with("ppl") {
            (
                format!("perplexity-{}.png", &probe[4..]),
                format!("Perplexity ({}) through the compressed cache", &probe[4..]),
                "perplexity",
            )
        } else if probe.starts_with("niah") {
            (
                format!("score-{probe}.png"),
                format!("{probe}: Needle-in-a-Haystack score (mean over depths and contexts)"),
                "score",
            )
        } else {
            (
                format!("accuracy-{probe}.png"),
                format!("{probe}: exact-match accuracy"),
                "accuracy",
            )
        };
        let path = dir.join(file);
        line_chart(
            &path,
            &Chart {
                title: &title,
                x_label: "compression (fraction of slots removed)",
                y_label: y,
                log_x: false,
                y_from_zero: false,
                series,
            },
        )?;
        written.push(path);
    }
    Ok(written)
}

/// The Needle-in-a-Haystack heat maps: one figure per (niah probe, model), one panel per policy
/// and compression, context across and depth down, each square the score of that cell.
pub fn niah_heat_maps(dir: &Path, results: &[CellResult]) -> Result<Vec<PathBuf>> {
    let mut groups: BTreeMap<(String, String), Vec<&CellResult>> = BTreeMap::new();
    for r in results
        .iter()
        .filter(|r| matches!(r.cell.probe, Probe::Niah(_)) && r.cell.depth.is_some())
    {
        groups
            .entry((r.cell.probe.to_string(), r.cell.model.clone()))
            .or_default()
            .push(r);
    }
    let mut written = Vec::new();
    for ((probe, model), cells) in groups {
        let mut contexts: Vec<usize> = cells.iter().map(|r| r.cell.context).collect();
        contexts.sort();
        contexts.dedup();
        let mut depths: Vec<u64> = cells
            .iter()
            .map(|r| (r.cell.depth.unwrap_or(0.0) * 1000.0).round() as u64)
            .collect();
        depths.sort();
        depths.dedup();
        let mut panels: BTreeMap<(bool, String, u64), Vec<(usize, usize, f64)>> = BTreeMap::new();
        for r in cells {
            let c = contexts
                .iter()
                .position(|&x| x == r.cell.context)
                .unwrap_or(0);
            let d = depths
                .iter()
                .position(|&x| x == (r.cell.depth.unwrap_or(0.0) * 1000.0).round() as u64)
                .unwrap_or(0);
            // The full cache first, then policies by name and compression.
            let key = (
                r.cell.policy != "full",
                r.cell.policy.clone(),
                (r.cell.compression * 1000.0).round() as u64,
            );
            panels
                .entry(key)
                .or_default()
                .push((c, d, r.accuracy.unwrap_or(0.0)));
        }
        let maps = HeatMaps {
            title: &format!("{probe}, {model}: score (green 1, red 0)"),
            columns: contexts.iter().map(|c| c.to_string()).collect(),
            rows: depths.iter().map(|d| format!("{}%", d / 10)).collect(),
            x_label: "context (tokens)",
            y_label: "depth",
            panels: panels
                .into_iter()
                .map(|((_, policy, c), cells)| Panel {
                    title: if policy == "full" {
                        "full".into()
                    } else {
                        format!("{policy} {:.1}%", c as f64 / 10.0)
                    },
                    cells,
                })
                .collect(),
        };
        let safe: String = model
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' {
                    ch
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("heatmap-{probe}-{safe}.png"));
        heat_maps(&path, &maps)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `eval.json`, `eval.md` and the charts into `dir`; returns the paths written.
pub fn write(dir: &Path, file: &GridFile) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| KvError::io(dir, e))?;
    let json = serde_json::to_string_pretty(file).map_err(|e| KvError::io(dir, e))?;
    let (json_path, md_path) = (dir.join("eval.json"), dir.join("eval.md"));
    kv_models::write_atomic(&json_path, json.as_bytes())?;
    kv_models::write_atomic(&md_path, markdown(&file.results).as_bytes())?;
    let mut paths = vec![json_path, md_path];
    paths.extend(charts(dir, &file.results)?);
    paths.extend(niah_heat_maps(dir, &file.results)?);
    Ok(paths)
}
