//! End-to-end tests of the harness: a tiny tour, the grid's files, and bad specs failing early.

use crate::backend::DeviceKind;
use crate::eval::run_checkpoints;
use crate::report::GridFile;
use crate::tour::{TourArgs, TourJob, TourPlan, TourReport, write_report};
use burn::backend::Flex;
use kv_models::Preset;
use kv_models::data::TaskKind;
use kv_models::eval::grid::{GridSpec, Probe};
use std::path::{Path, PathBuf};

type B = Flex;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-cli-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn tiny_preset(kv_heads: usize) -> Preset {
    let json = format!(
        r#"{{"model": {{"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": {kv_heads},
            "ffn_hidden": 64, "rope_theta": 10000.0, "max_positions": 160, "norm_eps": 1e-5,
            "tie_embeddings": true, "token_shift": true}},
          "train": {{"seq_len": 160, "batch_size": 2, "steps": 2, "lr": 0.001, "tasks": ["passkey"],
            "task_fraction": 0.5, "eval_windows": 1, "eval_task_samples": 1}}}}"#
    );
    Preset::from_json(&json, "test").unwrap()
}

fn tiny_grid(policies: &[&str]) -> GridSpec {
    GridSpec {
        policies: policies.iter().map(|p| p.to_string()).collect(),
        compressions: vec![0.5],
        probes: vec![Probe::Ppl, Probe::Task(TaskKind::Passkey)],
        contexts: vec![160],
        depths: vec![],
        samples: 2,
        windows: 1,
        ppl_prompt: 0.5,
        seed: 7,
        niah: Default::default(),
        ppl_chunk: 1,
        allow_beyond_context: false,
    }
}

fn tiny_plan(policies: &[&str]) -> TourPlan {
    TourPlan {
        presets: vec![
            ("t-mha".into(), tiny_preset(4)),
            ("t-gqa".into(), tiny_preset(2)),
        ],
        grid: tiny_grid(policies),
        bench_contexts: vec![32, 64],
        policy_context: 64,
        bench_steps: 2,
        real: None,
        // A two-step retrofit of the first model, decisions offset to 0 so some tokens merge.
        dmc: Some(crate::tour::DmcPlan {
            cr: 2.0,
            recipe: kv_models::train::TrainConfig {
                dmc: Some(kv_models::train::DmcTraining::new(2.0)),
                ..tiny_preset(4).train.unwrap()
            },
            settings: kv_models::DmcSettings {
                init_bias: 0.0,
                ..Default::default()
            },
            grid: tiny_grid(&["full", "h2o"]),
        }),
    }
}

fn run_tour(root: &Path, policies: &[&str]) -> kv_core::Result<TourReport> {
    let args = TourArgs {
        quick: true,
        out: root.join("tour"),
        models: root.join("models"),
        presets: vec![],
    };
    let job = TourJob {
        args,
        plan: tiny_plan(policies),
        device: DeviceKind::Flex,
    };
    crate::backend::BackendJob::run::<B>(job, Default::default())
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn a_tiny_tour_runs_end_to_end_and_reuses_its_models() {
    let root = scratch("tour");
    let report = run_tour(&root, &["full", "h2o", "streaming"]).unwrap();
    // One result per cell: 2 models x 2 probes x (full + 2 policies at one compression).
    assert_eq!(report.eval.results.len(), 2 * 2 * 3);
    assert!(report.models.iter().all(|m| m.trained_now && m.params > 0));
    let written = write_report(&root.join("tour"), &report).unwrap();
    for name in [
        "report.md",
        "report.json",
        "eval.json",
        "eval.md",
        "bench.json",
        "bench.md",
    ] {
        let path = root.join("tour").join(name);
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            "{name} missing or empty"
        );
    }
    let pngs: Vec<&PathBuf> = written
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    // Perplexity, passkey accuracy, decode speed, cache bytes, FastGen's choice per head, and
    // the DMC section's perplexity, passkey and per-head slots.
    assert_eq!(pngs.len(), 8, "{pngs:?}");
    assert!(pngs.iter().all(|p| is_png(p)), "{pngs:?}");
    let md = std::fs::read_to_string(root.join("tour/report.md")).unwrap();
    assert_eq!(report.fastgen.len(), 2, "one FastGen profile per model");
    assert!(
        report
            .fastgen
            .iter()
            .all(|c| !c.layers.is_empty() && c.layers.iter().all(|l| !l.is_empty()))
    );
    for section in [
        "## Models",
        "## Quality under compression",
        "## Speed and memory",
        "![perplexity.png](perplexity.png)",
        "## FastGen: what each head chose",
    ] {
        assert!(md.contains(section), "report.md lacks {section}");
    }
    // Measured bytes: at 50% compression the policies hold about half of the full cache.
    let full = report
        .eval
        .results
        .iter()
        .find(|r| r.cell.policy == "full" && r.cell.probe.name() == "ppl")
        .unwrap();
    let h2o = report
        .eval
        .results
        .iter()
        .find(|r| {
            r.cell.policy == "h2o"
                && r.cell.probe.name() == "ppl"
                && r.cell.model == full.cell.model
        })
        .unwrap();
    let kept = h2o.kv_bytes / full.kv_bytes;
    assert!(
        (0.45..=0.55).contains(&kept),
        "h2o at 50% kept {kept} of the full cache's bytes"
    );
    // Roofline: every decode step reads each f32 weight once plus the K/V held, measured.
    assert!(report.bench.read_bytes_per_s > 0.0);
    for c in &report.bench.decode {
        let m = report
            .models
            .iter()
            .chain(report.dmc.as_ref().map(|d| &d.model))
            .find(|m| m.name == c.model)
            .unwrap_or_else(|| panic!("no model {}", c.model));
        assert_eq!(
            c.bytes_read_per_token,
            m.params * 4 + c.kv_bytes,
            "{} ctx {}",
            c.model,
            c.context
        );
        assert!(
            (c.roofline_tokens_per_s
                - report.bench.read_bytes_per_s / c.bytes_read_per_token as f64)
                .abs()
                < 1e-6 * c.roofline_tokens_per_s
        );
    }
    assert!(
        std::fs::read_to_string(root.join("tour/bench.md"))
            .unwrap()
            .contains("share of roofline")
    );
    // The DMC section: a retrofit of the first model that merges, evaluated beside its base,
    // with its per-head slots drawn and benchmarked like the other models.
    let dmc = report.dmc.as_ref().unwrap();
    assert!(dmc.model.trained_now && dmc.model.name == "t-mha-dmc2");
    assert_eq!(
        dmc.eval.results.len(),
        2 * 2 * 2,
        "2 models x 2 probes x (full + h2o)"
    );
    let slots: usize = dmc.heads.policies["full"]
        .iter()
        .flatten()
        .map(Vec::len)
        .sum();
    assert!(
        slots > 0 && slots < 2 * 4 * dmc.heads.prompt_tokens,
        "merged slots: {slots}"
    );
    assert!(report.bench.decode.iter().any(|c| c.model == "t-mha-dmc2"));
    assert!(
        md.contains("## DMC: t-mha retrofitted") && is_png(&root.join("tour/dmc/kept-heads.png"))
    );
    // A second tour reuses the trained models.
    let again = run_tour(&root, &["full"]).unwrap();
    assert!(again.models.iter().all(|m| !m.trained_now));
    assert!(!again.dmc.unwrap().model.trained_now, "and the retrofit");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn eval_json_has_its_documented_shape_and_full_cells_match_plain_eval() {
    let root = scratch("grid");
    let preset = tiny_preset(2);
    let dir = root.join("m");
    let trainer = kv_models::train::Trainer::<burn::backend::Autodiff<B>>::new(
        preset.model.clone(),
        preset.train.clone().unwrap(),
        &Default::default(),
    )
    .unwrap();
    trainer.save(&dir).unwrap();
    let spec = tiny_grid(&["full", "snapkv"]);
    let file = run_checkpoints::<B>(
        std::slice::from_ref(&dir),
        &spec,
        &Default::default(),
        DeviceKind::Flex,
    )
    .unwrap();
    let written = crate::report::write(&root.join("out"), &file).unwrap();
    assert!(
        written
            .iter()
            .all(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0))
    );
    // The documented shape (docs/harness.md): top-level keys and every result's keys.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("out/eval.json")).unwrap())
            .unwrap();
    for key in ["version", "device", "spec", "results"] {
        assert!(json.get(key).is_some(), "eval.json lacks {key}");
    }
    for r in json["results"].as_array().unwrap() {
        for key in [
            "model",
            "policy",
            "spec",
            "compression",
            "probe",
            "context",
            "depth",
            "accuracy",
            "loss",
            "perplexity",
            "kv_bytes",
            "removed",
            "samples",
            "seconds",
        ] {
            assert!(r.get(key).is_some(), "a result lacks {key}: {r}");
        }
        assert!(
            r["accuracy"].is_number() != r["loss"].is_number(),
            "exactly one metric per probe: {r}"
        );
    }
    let back: GridFile = serde_json::from_value(json).unwrap();
    assert_eq!(back.results.len(), file.results.len());
    // Full-cache cells reproduce the plain evaluation functions.
    let (model, _) = kv_models::load_model::<B>(&dir, &Default::default()).unwrap();
    let (_, text) = kv_models::data::TextSource::Stories.load(0).unwrap();
    // The grid prefills half of each window and scores the continuation from the prompt's last token.
    let ppl = kv_models::validation_loss_from(&model, &text, 160, 1, 79).unwrap();
    let cell = file
        .results
        .iter()
        .find(|r| r.cell.policy == "full" && r.cell.probe.name() == "ppl")
        .unwrap();
    assert!(
        (cell.loss.unwrap() - ppl).abs() <= 1e-4,
        "{:?} vs {ppl}",
        cell.loss
    );
    let acc = kv_models::task_accuracy(&model, TaskKind::Passkey, 160, 2, 7, None).unwrap();
    let cell = file
        .results
        .iter()
        .find(|r| r.cell.policy == "full" && r.cell.probe.name() == "passkey")
        .unwrap();
    assert_eq!(cell.accuracy, Some(acc.accuracy));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_grid_specs_fail_before_any_work() {
    let root = scratch("bad");
    let cases: [(&[&str], f64, &str); 3] = [
        (&["full", "bogus"], 0.5, "bogus"),
        (&["h2o"], 1.0, "compression = 1"),
        (&["snapkv:window=0x"], 0.5, "window"),
    ];
    for (policies, compression, needle) in cases {
        let mut plan = tiny_plan(policies);
        plan.grid.compressions = vec![compression];
        let args = TourArgs {
            quick: true,
            out: root.join("tour"),
            models: root.join("models"),
            presets: vec![],
        };
        let err = crate::backend::BackendJob::run::<B>(
            TourJob {
                args,
                plan,
                device: DeviceKind::Flex,
            },
            Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(needle), "{err}");
        assert!(
            !root.join("models").exists(),
            "training started before the grid was validated"
        );
    }
    let missing = root.join("no-such-checkpoint");
    let err = run_checkpoints::<B>(
        std::slice::from_ref(&missing),
        &tiny_grid(&["full"]),
        &Default::default(),
        DeviceKind::Flex,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no-such-checkpoint"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn tiny_llama_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kv-models/testdata/tiny-llama")
}

fn smollm2() -> PathBuf {
    kv_models::resolve_model(Path::new("smollm2"))
        .expect("the SmolLM2 tests need scripts/fetch-assets.sh to have run")
}

#[test]
fn a_pretrained_folder_converts_to_a_checkpoint_that_loads_and_runs() {
    let root = scratch("convert-pretrained");
    let out = root.join("tiny-mqa");
    let args = crate::convert::ConvertArgs {
        from: None,
        model: Some(tiny_llama_dir()),
        to: "mqa".into(),
        out: out.clone(),
    };
    let report = crate::backend::BackendJob::run::<B>(args, Default::default()).unwrap();
    // 2 layers x 2 (K, V) x 16 dims x 4 bytes per KV head: 2 heads -> 1.
    assert_eq!(report.bytes_per_token, (2 * 2 * 2 * 16 * 4, 2 * 2 * 16 * 4));
    let (model, config) = kv_models::load_model::<B>(&out, &Default::default()).unwrap();
    assert_eq!((config.n_kv_heads, config.vocab_size), (1, 256));
    let x =
        burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_ints([1, 2, 3], &Default::default())
            .reshape([1, 3]);
    assert_eq!(model.forward(x).dims(), [1, 3, 256]);
    // A full-RoPE model converts to MLA once told which dims keep RoPE.
    let args = crate::convert::ConvertArgs {
        from: None,
        model: Some(tiny_llama_dir()),
        to: "mla:d_c=32".into(),
        out: root.join("mla-no-rope"),
    };
    let e = crate::backend::BackendJob::run::<B>(args, Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rope_dims"), "{e}");
    let args = crate::convert::ConvertArgs {
        from: None,
        model: Some(tiny_llama_dir()),
        to: "mla:d_c=32,rope_dims=8".into(),
        out: root.join("mla"),
    };
    let report = crate::backend::BackendJob::run::<B>(args, Default::default()).unwrap();
    assert_eq!(report.bytes_per_token.1, 2 * (32 + 8) * 4);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn smollm2_runs_through_the_grid_and_streams_text_whole_characters_at_a_time() {
    let model = crate::eval::EvalModel::Pretrained(smollm2());
    let spec = GridSpec {
        policies: vec!["full".into(), "streaming".into()],
        probes: vec![Probe::Ppl],
        contexts: vec![48],
        windows: 1,
        ..tiny_grid(&[])
    };
    let file = crate::eval::run_models::<B>(&[model], &spec, &Default::default(), DeviceKind::Flex)
        .unwrap();
    assert_eq!(file.results.len(), 2);
    for r in &file.results {
        assert_eq!(r.cell.model, "SmolLM2-135M-Instruct.Q4_1");
        let ppl = r.perplexity.unwrap();
        // A pretrained model reads simple English stories far better than chance (49152).
        assert!(
            ppl.is_finite() && ppl < 50.0,
            "{}: perplexity {ppl}",
            r.cell.spec
        );
    }
    let full = file
        .results
        .iter()
        .find(|r| r.cell.policy == "full")
        .unwrap();
    let streaming = file
        .results
        .iter()
        .find(|r| r.cell.policy == "streaming")
        .unwrap();
    assert!(
        streaming.kv_bytes < 0.6 * full.kv_bytes,
        "{} vs {}",
        streaming.kv_bytes,
        full.kv_bytes
    );
    // Streaming output: token by token, never half a character, and exactly the decoded text.
    let tokenizer = kv_models::Pretrained::open(smollm2())
        .unwrap()
        .tokenizer()
        .unwrap();
    let text = "naïve café — 東京 🙂 done.";
    let ids = tokenizer.encode(text).unwrap();
    let mut stream = crate::generate::Stream::new(&tokenizer);
    let mut out = Vec::new();
    for &t in ids.iter().chain([2u32].iter()) {
        let before = out.len();
        stream.push(t, &mut out);
        assert!(
            std::str::from_utf8(&out[before..]).is_ok(),
            "split a character at token {t}"
        );
    }
    assert_eq!(
        String::from_utf8(out).unwrap(),
        text,
        "the stop token <|im_end|> is not printed"
    );
}

#[test]
fn niah_cells_score_share_one_prefill_and_draw_heat_maps() {
    let root = scratch("niah");
    let hay = root.join("hay");
    std::fs::create_dir_all(&hay).unwrap();
    std::fs::write(
        hay.join("a.txt"),
        "The river runs past the old mill. Birds sing at dawn. ".repeat(30),
    )
    .unwrap();
    let preset = tiny_preset(2);
    let dir = root.join("m");
    let trainer = kv_models::train::Trainer::<burn::backend::Autodiff<B>>::new(
        preset.model.clone(),
        preset.train.clone().unwrap(),
        &Default::default(),
    )
    .unwrap();
    trainer.save(&dir).unwrap();
    let mut spec = GridSpec {
        policies: vec!["full".into(), "snapkv".into(), "h2o".into()],
        probes: vec![
            Probe::parse("niah").unwrap(),
            Probe::parse("niah-query").unwrap(),
        ],
        contexts: vec![360],
        // Past the 160 positions of a two-step model: the test is about the cells' machinery.
        allow_beyond_context: true,
        ..tiny_grid(&[])
    };
    spec.niah.haystack = Some(hay.clone());
    // The needle says what a byte model might echo: a phrase from the haystack scores by content.
    spec.niah.expect = vec!["zebra".into()];
    let file = run_checkpoints::<B>(
        std::slice::from_ref(&dir),
        &spec,
        &Default::default(),
        DeviceKind::Flex,
    )
    .unwrap();
    // 2 modes x 5 default depths x (full + 2 policies at one compression).
    assert_eq!(file.results.len(), 2 * 5 * 3);
    for r in &file.results {
        let score = r.accuracy.unwrap();
        assert!(
            (0.0..=1.0).contains(&score) && r.answer.is_some() && r.kv_bytes > 0.0,
            "{r:?}"
        );
        assert_eq!(
            score,
            if r.answer.as_ref().unwrap().to_lowercase().contains("zebra") {
                1.0
            } else {
                0.0
            }
        );
    }
    let depths: std::collections::BTreeSet<u32> = file
        .results
        .iter()
        .map(|r| (r.cell.depth.unwrap() * 100.0) as u32)
        .collect();
    assert_eq!(
        depths.into_iter().collect::<Vec<_>>(),
        vec![0, 25, 50, 75, 100]
    );
    // Compressed cells hold about half the full cache's bytes (the answer adds a few slots).
    let full = file
        .results
        .iter()
        .find(|r| r.cell.policy == "full" && r.cell.probe.name() == "niah")
        .unwrap();
    let snap = file
        .results
        .iter()
        .find(|r| {
            r.cell.policy == "snapkv"
                && r.cell.probe.name() == "niah"
                && r.cell.depth == full.cell.depth
        })
        .unwrap();
    assert!(
        snap.kv_bytes < 0.75 * full.kv_bytes,
        "{} vs {}",
        snap.kv_bytes,
        full.kv_bytes
    );
    let written = crate::report::write(&root.join("out"), &file).unwrap();
    let maps: Vec<&PathBuf> = written
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("heatmap-")
        })
        .collect();
    assert_eq!(maps.len(), 2, "{written:?}");
    assert!(maps.iter().all(|p| is_png(p)));
    // A haystack folder without text is an error before any work.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    spec.niah.haystack = Some(empty);
    let e = run_checkpoints::<B>(&[dir], &spec, &Default::default(), DeviceKind::Flex)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no .txt files"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}
