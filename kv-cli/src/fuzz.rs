//! Fuzzing the readers of result files a user hands back to `kv report` and `kv stream --from`:
//! a valid `eval.json` and `stream.json` with hostile values put into their leaves (huge and
//! negative numbers, names that climb out of the folder, wrong types). Every case must parse to
//! an error or to a file that is then drawn (Markdown, charts) within [`SLOW`], without a panic.
//! `KV_FUZZ_CASES` sets the cases per reader (default 100).

use crate::report::GridFile;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A case slower than this counts as a hang.
const SLOW: Duration = Duration::from_secs(10);

/// Values put into a leaf.
fn hostile() -> impl Strategy<Value = Value> {
    prop::sample::select(vec![
        json!(1e308),
        json!(-1e308),
        json!(f64::MAX),
        json!(-5.0),
        json!(0),
        json!(2.0),
        json!(1e-320),
        json!(u64::MAX),
        json!(-1),
        json!(0.5),
        json!("x/../../escaped"),
        json!(""),
        json!("passkey"),
        json!("niah"),
        json!("ppl"),
        json!("a".repeat(4096)),
        Value::Null,
        json!(true),
        json!([]),
        json!({}),
    ])
}

/// Every leaf (number, string, null, bool) of `v`, depth first.
fn leaves(v: &mut Value) -> Vec<&mut Value> {
    match v {
        Value::Array(items) => items.iter_mut().flat_map(leaves).collect(),
        Value::Object(map) => map.values_mut().flat_map(leaves).collect(),
        leaf => vec![leaf],
    }
}

/// `seed` with each `(index, value)` put into leaf `index` (modulo the leaves).
fn mutated(seed: &Value, edits: &[(usize, Value)]) -> String {
    let mut v = seed.clone();
    for (i, new) in edits {
        let mut all = leaves(&mut v);
        if all.is_empty() {
            break;
        }
        let n = all.len();
        *all[i % n] = new.clone();
    }
    v.to_string()
}

fn eval_seed() -> Value {
    let cell = |policy: &str, c: f64, probe: &str, acc: Option<f64>, ppl: Option<f64>| {
        json!({"model": "m", "policy": policy, "spec": policy, "compression": c, "probe": probe,
               "context": 64, "depth": 0.5, "accuracy": acc, "loss": ppl.map(f64::ln),
               "perplexity": ppl, "kv_bytes": 1024.0, "removed": c, "samples": 2, "seconds": 0.1})
    };
    json!({"version": 1, "device": "flex",
           "spec": {"policies": ["full", "h2o"], "compressions": [0.5], "probes": [],
                    "contexts": [64], "depths": [0.5], "samples": 2, "windows": 1, "seed": 1},
           "results": [cell("full", 0.0, "passkey", Some(1.0), None),
                       cell("h2o", 0.5, "passkey", Some(0.5), None),
                       cell("full", 0.0, "ppl", None, Some(3.0)),
                       cell("h2o", 0.5, "ppl", None, Some(4.0)),
                       cell("full", 0.0, "niah", Some(1.0), None),
                       cell("h2o", 0.5, "niah", Some(0.0), None)]})
}

fn stream_seed() -> Value {
    let sample = |t: usize, rss: f64| {
        json!({"tokens": t, "rss_mib": rss, "heap_mib": rss / 2.0, "kv_mib": 1.0, "slots": 16,
               "seconds": t as f64 / 100.0})
    };
    json!({"device": "flex", "model": "m", "policy": "streaming", "tokens": 300, "seconds": 3.0,
           "warm_from_tokens": 100,
           "samples": [sample(0, 50.0), sample(100, 60.0), sample(200, 61.0), sample(300, 60.5)]})
}

/// Runs `read` on `cases` mutations of `seed`, drawing what parses into a scratch folder;
/// returns the cases run and how many parsed.
fn fuzz_reader(
    name: &str,
    seed: Value,
    read: impl Fn(&str, &Path, &Path) -> bool,
    cases: u32,
) -> (u32, u32) {
    let dir: PathBuf = std::env::temp_dir().join(format!("kv-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let origin = dir.join("in.json");
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let parsed = std::cell::Cell::new(0u32);
    let strategy = prop::collection::vec((any::<usize>(), hostile()), 1..4);
    runner
        .run(&strategy, |edits| {
            let text = mutated(&seed, &edits);
            let start = Instant::now();
            if read(&text, &origin, &dir.join("out")) {
                parsed.set(parsed.get() + 1);
            }
            prop_assert!(start.elapsed() < SLOW, "took {:?}", start.elapsed());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    (cases, parsed.get())
}

fn cases() -> u32 {
    std::env::var("KV_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

#[test]
fn fuzzed_eval_json_never_panics_or_hangs_and_only_valid_files_are_drawn() {
    let (n, ok) = fuzz_reader(
        "eval-json",
        eval_seed(),
        |text, origin, out| match GridFile::parse(text, origin) {
            Ok(file) => {
                let written = crate::report::write(out, &file).unwrap_or_default();
                // Every file lands inside the output folder, whatever the names say.
                assert!(written.iter().all(|p| p.starts_with(out)), "{written:?}");
                true
            }
            Err(_) => false,
        },
        cases(),
    );
    eprintln!("eval.json: {n} cases, {ok} parsed and drawn");
    assert!(ok > 0 && ok < n, "{ok} of {n} parsed: the mutations miss");
}

#[test]
fn fuzzed_stream_json_never_panics_or_hangs_and_only_valid_files_are_drawn() {
    let (n, ok) = fuzz_reader(
        "stream-json",
        stream_seed(),
        |text, origin, out| match crate::stream::parse(text, origin) {
            Ok(file) => {
                let _ = crate::stream::write_results(out, &file);
                let _ = crate::stream::markdown(&file);
                true
            }
            Err(_) => false,
        },
        cases(),
    );
    eprintln!("stream.json: {n} cases, {ok} parsed and drawn");
    assert!(ok > 0 && ok < n, "{ok} of {n} parsed: the mutations miss");
}
