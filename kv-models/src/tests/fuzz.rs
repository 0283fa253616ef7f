//! Fuzzing on stable Rust: random and mutated inputs for every parser that reads text or files
//! from outside (policy specs, model configs and presets, checkpoints, GGUF files, safetensors
//! folders, chat templates). No input may panic, take longer than [`SLOW`], or make one allocation larger than
//! the input justifies ([`allowed_bytes`]). The default run is a few hundred cases per parser
//! from a fixed seed; `KV_FUZZ_SECS=600 cargo nextest run -p kv-models --run-ignored only fuzz_`
//! runs each parser for that many seconds from random seeds.

use crate::load::Pretrained;
use crate::load::tests::{testdata, tiny_llama_gguf};
use crate::model::config::DecoderConfig;
use crate::train::checkpoint::load_model;
use crate::train::presets::{Preset, preset};
use crate::train::{TrainConfig, Trainer};
use burn::backend::{Autodiff, Flex};
use kv_policies::{PolicyEnv, TokenClasses, build_policy_in, split_specs};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type B = Flex;

/// The system allocator, recording the largest single request made on each thread.
struct LargestAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded to `System` unchanged; only a thread-local maximum is updated.
unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: LargestAlloc = LargestAlloc;

/// A case slower than this counts as a hang.
const SLOW: Duration = Duration::from_secs(10);

/// The largest single allocation an input of `len` bytes justifies: a small constant (buffers,
/// a parsed header) plus a linear factor (an f32 tensor de-quantised from 4-bit data is 8x its
/// bytes; a parsed metadata array holds a 32-byte value per input byte at worst).
fn allowed_bytes(len: usize) -> usize {
    (4 << 20) + 64 * len
}

/// Runs `check` on `input`, failing the case on a panic (caught by proptest), a slow case or an
/// allocation beyond [`allowed_bytes`] of `len`.
fn bounded(len: usize, check: impl FnOnce()) -> Result<(), TestCaseError> {
    bounded_beyond(0, len, check)
}

/// [`bounded`], allowing also the largest allocation the unmutated input makes (`baseline`):
/// resuming a run loads its training corpus, however small the checkpoint.
fn bounded_beyond(baseline: usize, len: usize, check: impl FnOnce()) -> Result<(), TestCaseError> {
    let (took, largest) = largest_allocation(check);
    prop_assert!(took < SLOW, "took {took:?} on an input of {len} bytes");
    prop_assert!(
        largest <= allowed_bytes(len).max(baseline),
        "one allocation of {largest} bytes for an input of {len} bytes"
    );
    Ok(())
}

/// How long `f` takes and the largest single allocation it makes on this thread.
fn largest_allocation(f: impl FnOnce()) -> (Duration, usize) {
    LARGEST.with(|l| l.set(0));
    let start = Instant::now();
    f();
    (start.elapsed(), LARGEST.with(Cell::get))
}

/// One edit of a seed input.
#[derive(Debug, Clone)]
enum Edit {
    /// Flip one bit.
    Flip(usize, u8),
    /// Overwrite one byte.
    Byte(usize, u8),
    /// Overwrite 8 bytes with a little-endian integer (a length, count, offset or dim).
    Word(usize, u64),
    /// Overwrite 4 bytes with a little-endian integer (a type, rank or version).
    Half(usize, u32),
    /// Cut the input here.
    Truncate(usize),
    /// Insert bytes here.
    Insert(usize, Vec<u8>),
    /// Remove this many bytes here.
    Remove(usize, usize),
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 31),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 62),
        Just(u64::MAX / 4 + 1),
        0u64..64,
        any::<u64>()
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip(at, bit)),
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Byte(at, b)),
        3 => (any::<usize>(), interesting_u64()).prop_map(|(at, v)| Edit::Word(at, v)),
        2 => (any::<usize>(), prop_oneof![Just(0u32), Just(u32::MAX), 0u32..40]).prop_map(|(at, v)| Edit::Half(at, v)),
        1 => any::<usize>().prop_map(Edit::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(at, b)| Edit::Insert(at, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, n)| Edit::Remove(at, n)),
    ]
}

/// `seed` with `edits` applied in order (positions wrap around the current length).
fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Flip(at, bit) if !b.is_empty() => b[at % n] ^= 1 << bit,
            Edit::Byte(at, v) if !b.is_empty() => b[at % n] = *v,
            Edit::Word(at, v) if b.len() >= 8 => {
                let at = at % (b.len() - 7);
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            Edit::Half(at, v) if b.len() >= 4 => {
                let at = at % (b.len() - 3);
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            Edit::Truncate(at) => b.truncate(at % (b.len() + 1)),
            Edit::Insert(at, bytes) => {
                let at = at % (b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Edit::Remove(at, k) if !b.is_empty() => {
                let at = at % b.len();
                b.drain(at..(at + k).min(b.len()));
            }
            _ => {}
        }
    }
    b
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..6)
}

/// How long and from which seed a target runs.
#[derive(Clone, Copy)]
enum Mode {
    /// `cases` cases from a fixed seed (the default test run).
    Quick(u32),
    /// Random seeds until the time is up (the long mode).
    For(Duration),
}

/// Runs `test` on values of `strategy` under `mode`; returns the number of cases run.
fn fuzz<S: Strategy>(
    name: &str,
    mode: Mode,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S::Value: std::fmt::Debug,
{
    let (cases, deadline) = match mode {
        Mode::Quick(n) => (n, None),
        Mode::For(d) => (256, Some(Instant::now() + d)),
    };
    let base = rand_seed();
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let ran = Cell::new(0u64);
    for round in 0u64.. {
        // A runner stops after `cases` successes; each round of the long mode gets a fresh one
        // on its own stream.
        let rng = match deadline {
            None => TestRng::deterministic_rng(RngAlgorithm::ChaCha),
            Some(_) => {
                let mut seed = base;
                seed[..8]
                    .iter_mut()
                    .zip(round.to_le_bytes())
                    .for_each(|(s, r)| *s ^= r);
                TestRng::from_seed(RngAlgorithm::ChaCha, &seed)
            }
        };
        let mut runner = TestRunner::new_with_rng(config.clone(), rng);
        match runner.run(&strategy, |v| {
            ran.set(ran.get() + 1);
            test(v)
        }) {
            Ok(()) => {}
            Err(TestError::Fail(why, input)) => {
                panic!("{name}: {why}\nminimal failing input: {input:?}")
            }
            Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    let total = ran.get();
    eprintln!("{name}: {total} cases, none panicked, hung or over-allocated");
    total
}

fn rand_seed() -> [u8; 32] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut s = [0u8; 32];
    for (i, b) in s.iter_mut().enumerate() {
        *b = (t >> ((i % 16) * 8)) as u8 ^ (std::process::id() as u8).wrapping_mul(i as u8 + 1);
    }
    s
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Policy specs built from the pieces real specs are made of, plus arbitrary text.
fn spec_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(
            kv_policies::Registry::<burn::backend::Flex>::standard()
                .names()
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
        ),
        prop::sample::select(vec![
            "budget", "every", "window", "kernel", "pool", "sinks", "rerotate", "scorer",
            "recover", "alpha", "beta", "floor", "value", "protect"
        ])
        .prop_map(str::to_string),
        prop::sample::select(vec![":", "=", ",", " ", "=,", "::", ""]).prop_map(str::to_string),
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "0.5",
            "1.5",
            "nan",
            "inf",
            "-inf",
            "1e40",
            "1024",
            "18446744073709551616",
            "4294967296",
            "true",
            "max",
            "avg",
            "h2o",
            "snapkv"
        ])
        .prop_map(str::to_string),
        "\\PC{0,6}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

fn check_spec(spec: &str) {
    let env = PolicyEnv::with_classes(TokenClasses::bytes());
    if let Ok(p) = build_policy_in::<B>(spec, &env) {
        let _ = p.name();
    }
    let _ = split_specs(&[spec.to_string()]);
}

fn spec_target(mode: Mode) -> u64 {
    fuzz("policy specs", mode, spec_text(), |s| {
        bounded(s.len(), || check_spec(&s))
    })
}

/// Model configs and presets: byte edits of a real preset's JSON, and fields set to hostile values.
fn config_target(mode: Mode) -> u64 {
    let seed = serde_json::to_string_pretty(&serde_json::json!({
        "model": serde_json::to_value(preset("tiny-mha").unwrap().model).unwrap(),
        "train": serde_json::to_value(preset("tiny-mha").unwrap().train.unwrap()).unwrap(),
    }))
    .unwrap();
    let fields: Vec<String> = serde_json::from_str::<serde_json::Value>(&seed).unwrap()["model"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let value = prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1e308".to_string()),
        Just("18446744073709551615".to_string()),
        Just("4294967296".to_string()),
        Just("null".to_string()),
        Just("\"x\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        (0u64..100_000).prop_map(|v| v.to_string()),
    ];
    let strategy = (edits(), prop::sample::select(fields), value, any::<bool>());
    let bytes = seed.clone().into_bytes();
    fuzz(
        "model configs",
        mode,
        strategy,
        move |(edits, field, value, structured)| {
            let text = if structured {
                let mut v: serde_json::Value = serde_json::from_str(&seed).unwrap();
                v["model"][&field] = serde_json::from_str(&value).unwrap();
                v.to_string()
            } else {
                String::from_utf8_lossy(&mutate(&bytes, &edits)).into_owned()
            };
            bounded(text.len(), || {
                if let Ok(p) = Preset::from_json(&text, "fuzz") {
                    assert!(p.model.parameter_estimate() <= crate::model::config::MAX_PARAMETERS);
                }
                if let Ok(model) =
                    serde_json::from_str::<serde_json::Value>(&text).map(|v| v["model"].to_string())
                {
                    let _ = DecoderConfig::from_json(&model);
                }
                let _ = serde_json::from_str::<TrainConfig>(&text).map(|t| t.validate());
            })
        },
    )
}

/// A trained run's checkpoint (weights, optimiser, training state) of a 2-layer width-16 model.
fn seed_checkpoint(dir: &Path) -> Vec<u8> {
    let p = Preset::from_json(
        r#"{"model": {"vocab_size": 256, "d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "ffn_hidden": 32,
             "max_positions": 32, "token_shift": true, "rope_theta": 10000.0, "norm_eps": 1e-5, "tie_embeddings": true},
            "train": {"seq_len": 16, "batch_size": 1, "steps": 1, "lr": 0.001, "eval_windows": 1, "eval_task_samples": 1}}"#,
        "seed",
    )
    .unwrap();
    let dev = Default::default();
    let mut t = Trainer::<Autodiff<B>>::new(p.model, p.train.unwrap(), &dev).unwrap();
    t.train_step().unwrap();
    t.save(dir).unwrap();
    std::fs::read(dir.join(crate::train::checkpoint::CHECKPOINT_FILE)).unwrap()
}

fn sections(bytes: &[u8]) -> Vec<Vec<u8>> {
    let s = crate::train::checkpoint::Sections::decode(bytes, Path::new("seed")).unwrap();
    vec![s.config, s.train, s.model, s.optim]
}

fn sealed(p: &[Vec<u8>]) -> Vec<u8> {
    crate::train::checkpoint::Sections {
        config: p[0].clone(),
        train: p[1].clone(),
        model: p[2].clone(),
        optim: p[3].clone(),
    }
    .encode()
}

/// Checkpoints: raw byte edits (caught by the checksum) and edits of one section re-sealed with
/// a valid checksum, which reach the config parser and burn's record decoder.
fn checkpoint_target(mode: Mode) -> u64 {
    let root = scratch("checkpoint");
    let good = seed_checkpoint(&root.join("seed"));
    let parts = sections(&good);
    let case = root.join("case");
    let dev = Default::default();
    let (_, baseline) = largest_allocation(|| {
        Trainer::<Autodiff<B>>::resume(&root.join("seed"), None, &dev).unwrap();
    });
    fuzz(
        "checkpoints",
        mode,
        (edits(), prop::option::of(0usize..4)),
        move |(edits, section)| {
            let bytes = match section {
                None => mutate(&good, &edits),
                Some(i) => {
                    let mut p = parts.clone();
                    p[i] = mutate(&p[i], &edits);
                    sealed(&p)
                }
            };
            std::fs::create_dir_all(&case).unwrap();
            std::fs::write(case.join(crate::train::checkpoint::CHECKPOINT_FILE), &bytes).unwrap();
            bounded_beyond(baseline, bytes.len(), || {
                let _ = load_model::<B>(&case, &dev);
                let _ = Trainer::<Autodiff<B>>::resume(&case, None, &dev);
            })
        },
    )
}

/// GGUF files: byte edits of tiny-llama written as llama.cpp writes it, read up to a built model.
fn gguf_target(mode: Mode) -> u64 {
    let root = scratch("gguf");
    let good = std::fs::read(tiny_llama_gguf(&root.join("seed.gguf"), None)).unwrap();
    let path = root.join("case.gguf");
    let dev = Default::default();
    fuzz("GGUF files", mode, edits(), move |edits| {
        let bytes = mutate(&good, &edits);
        std::fs::write(&path, &bytes).unwrap();
        bounded(bytes.len(), || {
            if let Ok(p) = Pretrained::open(&path) {
                let _ = p.config();
                let _ = p.load_model::<B>(&dev);
                let _ = p.tokenizer();
            }
        })
    })
}

/// Hugging Face folders: byte edits of tiny-llama's model.safetensors or of its config.json.
fn safetensors_target(mode: Mode) -> u64 {
    let root = scratch("safetensors");
    let weights = std::fs::read(testdata("tiny-llama/model.safetensors")).unwrap();
    let config = std::fs::read(testdata("tiny-llama/config.json")).unwrap();
    let dir = root.join("case");
    std::fs::create_dir_all(&dir).unwrap();
    let dev = Default::default();
    fuzz(
        "safetensors folders",
        mode,
        (edits(), any::<bool>()),
        move |(edits, in_config)| {
            let (w, c) = if in_config {
                (weights.clone(), mutate(&config, &edits))
            } else {
                (mutate(&weights, &edits), config.clone())
            };
            std::fs::write(dir.join("model.safetensors"), &w).unwrap();
            std::fs::write(dir.join("config.json"), &c).unwrap();
            bounded(w.len() + c.len(), || {
                if let Ok(p) = Pretrained::open(&dir) {
                    let _ = p.load_model::<B>(&dev);
                }
            })
        },
    )
}

/// Chat templates: Jinja pieces (loops, string growth, message access, filters, raises) strung
/// together, rendered over a short conversation. The render's fuel bounds time and data, so no
/// single allocation may pass about 64 bytes a unit of fuel.
fn template_text() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "{% for m in messages %}",
        "{% endfor %}",
        "{% for i in range(99999) %}",
        "{% for i in range(40) %}",
        "{% if add_generation_prompt %}",
        "{% endif %}",
        "{% set ns = namespace(s='ab') %}",
        "{% set ns.s = ns.s ~ ns.s %}",
        "{{ ns.s }}",
        "{{ m['content'] }}",
        "{{ messages[0]['content'] * 1000000 }}",
        "{{ 'x' * 99999999 }}",
        "{{ range(99999) | list | join(',') }}",
        "{{ m['content'].strip().upper() }}",
        "{{ raise_exception('no') }}",
        "{{ bos_token }}",
        "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
        "<|im_start|>",
        "{{",
        "}}",
        "{%",
        "text ",
    ]);
    prop::collection::vec(piece, 0..10).prop_map(|p| p.concat())
}

fn template_target(mode: Mode) -> u64 {
    use crate::text::chat::{CHAT_TEMPLATE_FUEL, render};
    use crate::text::tokenizer::{ChatMessage, TextConfig};
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What is the capital of France?"),
    ];
    let data_bound = 64 * CHAT_TEMPLATE_FUEL as usize;
    fuzz("chat templates", mode, template_text(), |t| {
        bounded_beyond(data_bound, t.len(), || {
            let _ = render(&t, &messages, true, &TextConfig::default());
        })
    })
}

#[test]
fn fuzzed_chat_templates_never_panic_hang_or_over_allocate() {
    assert!(template_target(Mode::Quick(1000)) >= 1000);
}

#[test]
fn fuzzed_policy_specs_never_panic_or_over_allocate() {
    assert!(spec_target(Mode::Quick(2000)) >= 2000);
}

#[test]
fn fuzzed_model_configs_never_panic_or_over_allocate() {
    assert!(config_target(Mode::Quick(1000)) >= 1000);
}

#[test]
fn fuzzed_checkpoints_never_panic_or_over_allocate() {
    assert!(checkpoint_target(Mode::Quick(300)) >= 300);
}

#[test]
fn fuzzed_gguf_files_never_panic_or_over_allocate() {
    assert!(gguf_target(Mode::Quick(200)) >= 200);
}

#[test]
fn fuzzed_safetensors_folders_never_panic_or_over_allocate() {
    assert!(safetensors_target(Mode::Quick(200)) >= 200);
}

/// The long mode: every parser for `KV_FUZZ_SECS` seconds (default 600) from random seeds.
#[test]
#[ignore = "long: run with --run-ignored only, KV_FUZZ_SECS=600"]
fn fuzz_every_parser_for_a_long_time() {
    let secs: u64 = std::env::var("KV_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let d = Duration::from_secs(secs);
    let counts = [
        ("policy specs", spec_target(Mode::For(d))),
        ("model configs", config_target(Mode::For(d))),
        ("checkpoints", checkpoint_target(Mode::For(d))),
        ("GGUF files", gguf_target(Mode::For(d))),
        ("safetensors folders", safetensors_target(Mode::For(d))),
        ("chat templates", template_target(Mode::For(d))),
    ];
    eprintln!("{counts:?}");
}
