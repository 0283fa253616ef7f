//! The bad-input matrix: each case runs `kv` on one bad argument, spec, config, checkpoint, model
//! file, tokenizer, prompt or grid, and must exit non-zero with exactly one `error:` line that
//! names the bad value and what would be valid, without a panic, without leaving any file
//! behind, and without a heap peak beyond what the input justifies.

use crate::common::*;
use std::path::{Path, PathBuf};

/// One bad input.
struct Case {
    name: String,
    args: Vec<String>,
    /// Pieces the error line must hold (case-insensitive): the bad value and the valid ones.
    expect: Vec<String>,
    /// Heap high-water mark allowed, in MiB (the binary's own baseline is a few MiB).
    heap_mib: f64,
}

/// Fixture files the cases point at; made once.
struct Fixtures {
    dir: PathBuf,
}

impl Fixtures {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        let p = self.dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p.display().to_string()
    }
}

fn f32_bytes(n: usize, scale: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (((i * 37 % 17) as f32 - 8.0) * scale).to_le_bytes())
        .collect()
}

/// A complete one-layer GGUF Llama (width 8), with `edit` applied to its tensor list first.
fn tiny_gguf(
    edit: impl FnOnce(&mut Vec<GgufTensor<'static>>),
    meta_edit: impl FnOnce(&mut Vec<(&'static str, Meta<'static>)>),
) -> Vec<u8> {
    tiny_gguf_with(edit, meta_edit, None)
}

/// [`tiny_gguf`] with one f32 value replaced: `(tensor name, index, value)`.
fn tiny_gguf_with(
    edit: impl FnOnce(&mut Vec<GgufTensor<'static>>),
    meta_edit: impl FnOnce(&mut Vec<(&'static str, Meta<'static>)>),
    poke: Option<(&str, usize, f32)>,
) -> Vec<u8> {
    let shapes: Vec<(&'static str, Vec<u64>)> = vec![
        ("token_embd.weight", vec![8, 16]),
        ("blk.0.attn_norm.weight", vec![8]),
        ("blk.0.ffn_norm.weight", vec![8]),
        ("blk.0.attn_q.weight", vec![8, 8]),
        ("blk.0.attn_k.weight", vec![8, 8]),
        ("blk.0.attn_v.weight", vec![8, 8]),
        ("blk.0.attn_output.weight", vec![8, 8]),
        ("blk.0.ffn_gate.weight", vec![8, 16]),
        ("blk.0.ffn_up.weight", vec![8, 16]),
        ("blk.0.ffn_down.weight", vec![16, 8]),
        ("output_norm.weight", vec![8]),
    ];
    let mut tensors = Vec::new();
    let mut offset = 0u64;
    for (name, dims) in shapes {
        let n: u64 = dims.iter().product();
        tensors.push(GgufTensor {
            name,
            dims,
            kind: 0,
            offset,
        });
        offset += (n * 4).div_ceil(32) * 32;
    }
    let mut data = f32_bytes(offset as usize / 4, 0.05);
    if let Some((name, i, v)) = poke {
        let t = tensors
            .iter()
            .find(|t| t.name == name)
            .expect("a tensor of the tiny Llama");
        let at = t.offset as usize + 4 * i;
        data[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    edit(&mut tensors);
    let mut meta = llama_meta();
    meta_edit(&mut meta);
    gguf(&meta, &tensors, &data)
}

/// A Hugging Face folder of a one-layer Llama (width 8) whose safetensors header and data are
/// given; the header's offsets are up to the caller.
fn hf_folder(fx: &Fixtures, name: &str, config: &str, weights: Option<Vec<u8>>) -> String {
    fx.write(&format!("{name}/config.json"), config);
    if let Some(w) = weights {
        fx.write(&format!("{name}/model.safetensors"), w);
    }
    fx.path(name)
}

/// A header of every tensor of the tiny Llama, F32, packed, with `dtype` for the embedding.
fn hf_header(dtype: &str, skip: Option<&str>, past_end: bool) -> (String, usize) {
    let shapes: &[(&str, &[usize])] = &[
        ("model.embed_tokens.weight", &[16, 8]),
        ("model.layers.0.input_layernorm.weight", &[8]),
        ("model.layers.0.post_attention_layernorm.weight", &[8]),
        ("model.layers.0.self_attn.q_proj.weight", &[8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", &[8, 8]),
        ("model.layers.0.self_attn.v_proj.weight", &[8, 8]),
        ("model.layers.0.self_attn.o_proj.weight", &[8, 8]),
        ("model.layers.0.mlp.gate_proj.weight", &[16, 8]),
        ("model.layers.0.mlp.up_proj.weight", &[16, 8]),
        ("model.layers.0.mlp.down_proj.weight", &[8, 16]),
        ("model.norm.weight", &[8]),
    ];
    let mut entries = vec![];
    let mut at = 0usize;
    for (name, shape) in shapes {
        if Some(*name) == skip {
            continue;
        }
        let n: usize = shape.iter().product::<usize>() * 4;
        let d = if *name == "model.embed_tokens.weight" {
            dtype
        } else {
            "F32"
        };
        let end = if past_end && *name == "model.norm.weight" {
            at + n + 4096
        } else {
            at + n
        };
        entries.push(format!(
            r#""{name}": {{"dtype": "{d}", "shape": {shape:?}, "data_offsets": [{at}, {end}]}}"#
        ));
        at += n;
    }
    (format!("{{{}}}", entries.join(", ")), at)
}

fn cases(fx: &Fixtures, work: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    let w = |p: &str| work.join(p).display().to_string();
    let mut add = |name: &str, args: &[&str], expect: &[&str], heap_mib: f64| {
        cases.push(Case {
            name: name.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            expect: expect.iter().map(|s| s.to_lowercase()).collect(),
            heap_mib,
        })
    };
    let small = 32.0;

    // Command-line arguments.
    add(
        "unknown subcommand",
        &["frobnicate"],
        &["frobnicate"],
        small,
    );
    add(
        "unknown flag",
        &["generate", "--frobnicate"],
        &["--frobnicate"],
        small,
    );
    add(
        "steps not a number",
        &["train", "--steps", "abc"],
        &["abc", "--steps"],
        small,
    );
    add(
        "negative token count",
        &["generate", "--max-tokens", "-5"],
        &["-5"],
        small,
    );
    add(
        "unknown device",
        &["--device", "tpu", "generate"],
        &["tpu", "flex"],
        small,
    );
    add(
        "flags that conflict",
        &["generate", "--prompt", "x", "--chat", "y"],
        &["--chat", "--prompt"],
        small,
    );
    add(
        "unknown preset to train",
        &["train", "--preset", "nope", "--out", &w("t")],
        &["nope", "tiny-mha"],
        small,
    );
    add(
        "unknown preset to generate",
        &["generate", "--preset", "nope"],
        &["nope", "tiny-mha"],
        small,
    );
    add(
        "bench with zero steps",
        &["bench", "--steps", "0", "--out", &w("b")],
        &["--steps", "0", "at least 1"],
        small,
    );
    add(
        "bench at context 0",
        &["bench", "--contexts", "0", "--out", &w("b")],
        &["--contexts", "0"],
        small,
    );
    add(
        "bench with KV heads that do not divide",
        &["bench", "--kv-heads", "3", "--out", &w("b")],
        &["3", "n_kv_heads"],
        small,
    );
    add(
        "bench with zero KV heads",
        &["bench", "--kv-heads", "0", "--out", &w("b")],
        &["n_kv_heads", "0"],
        small,
    );
    add(
        "negative temperature",
        &["generate", "--temperature", "-1", "--max-tokens", "1"],
        &["temperature", "-1", ">= 0"],
        small,
    );
    add(
        "infinite temperature",
        &["generate", "--temperature", "inf", "--max-tokens", "1"],
        &["temperature", "inf"],
        small,
    );
    add(
        "top-p above 1",
        &["generate", "--top-p", "1.5", "--max-tokens", "1"],
        &["top_p", "1.5", "(0, 1]"],
        small,
    );
    add(
        "top-p NaN",
        &["generate", "--top-p", "nan", "--max-tokens", "1"],
        &["top_p", "nan"],
        small,
    );
    let ckpt = fx.path("ckpt");
    add(
        "eval compression above 1",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--compression",
            "1.5",
            "--out",
            &w("e"),
        ],
        &["1.5", "compression"],
        small,
    );
    add(
        "eval compression NaN",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--compression",
            "nan",
            "--out",
            &w("e"),
        ],
        &["nan", "compression"],
        small,
    );
    add(
        "eval at context 0",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--context",
            "0",
            "--out",
            &w("e"),
        ],
        &["context", "0"],
        small,
    );
    add(
        "eval of an unknown task",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--task",
            "nosuch",
            "--out",
            &w("e"),
        ],
        &["nosuch", "passkey"],
        small,
    );
    add(
        "eval with zero samples",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--samples",
            "0",
            "--out",
            &w("e"),
        ],
        &["samples", "0"],
        small,
    );
    add(
        "eval depth above 1",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--task",
            "needle",
            "--depth",
            "1.5",
            "--out",
            &w("e"),
        ],
        &["depth", "1.5"],
        small,
    );
    add(
        "eval of an unknown policy",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--policy",
            "full,nosuch",
            "--out",
            &w("e"),
        ],
        &["nosuch", "h2o"],
        small,
    );
    add(
        "eval of a missing checkpoint",
        &[
            "eval",
            "--checkpoint",
            &fx.path("missing"),
            "--out",
            &w("e"),
        ],
        &["missing", "checkpoint"],
        small,
    );
    add(
        "dmc spec with an unknown key",
        &[
            "train",
            "--init",
            &ckpt,
            "--dmc",
            "cr=2,speed=9",
            "--out",
            &w("d"),
        ],
        &["speed", "cr, ramp"],
        small,
    );
    add(
        "dmc spec without a target",
        &[
            "train",
            "--config",
            &fx.path("tiny.json"),
            "--dmc",
            "window=8",
            "--out",
            &w("d"),
        ],
        &["cr=2"],
        small,
    );
    add(
        "dmc target below 1",
        &[
            "train",
            "--init",
            &ckpt,
            "--dmc",
            "cr=0.5",
            "--out",
            &w("d"),
        ],
        &["0.5", "[1, 64]"],
        small,
    );
    add(
        "dmc window of 0",
        &[
            "train",
            "--config",
            &fx.path("tiny.json"),
            "--dmc",
            "cr=2,window=0",
            "--out",
            &w("d"),
        ],
        &["dmc.window", "0"],
        small,
    );
    add(
        "resume with nothing to resume",
        &["train", "--resume", "--out", &w("nothing")],
        &["nothing"],
        small,
    );
    add(
        "train into a folder that holds a run",
        &["train", "--config", &fx.path("tiny.json"), "--out", &ckpt],
        &["already holds a run", "--resume"],
        small,
    );
    add(
        "report from a missing file",
        &[
            "report",
            "--from",
            &fx.path("missing.json"),
            "--out",
            &w("r"),
        ],
        &["missing.json"],
        small,
    );
    add(
        "report from a file that is not an eval.json",
        &["report", "--from", &fx.path("tiny.json"), "--out", &w("r")],
        &["tiny.json", "not an eval.json"],
        small,
    );
    add(
        "convert to an unknown target",
        &[
            "convert",
            "--from",
            &ckpt,
            "--to",
            "nonsense",
            "--out",
            &w("c"),
        ],
        &["nonsense", "mqa"],
        small,
    );
    add(
        "convert to KV heads that do not divide",
        &[
            "convert",
            "--from",
            &ckpt,
            "--to",
            "gqa:kv_heads=3",
            "--out",
            &w("c"),
        ],
        &["3"],
        small,
    );
    add(
        "convert with a non-number",
        &[
            "convert",
            "--from",
            &ckpt,
            "--to",
            "mla:d_c=wide",
            "--out",
            &w("c"),
        ],
        &["wide", "d_c"],
        small,
    );

    // Policy specs, each through `generate` on the random tiny-mha.
    let spec = |s: &str| {
        ["generate", "--max-tokens", "1", "--policy", s]
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    for (name, s, expect) in [
        ("unknown policy", "nosuch", &["nosuch", "h2o", "snapkv"][..]),
        ("empty policy spec", "", &["policy", "full"][..]),
        (
            "repeated spec key",
            "h2o:budget=0.5,budget=0.6",
            &["budget", "twice"][..],
        ),
        ("unknown spec key", "h2o:bogus=1", &["bogus", "budget"][..]),
        ("budget of zero", "h2o:budget=0", &["budget", "0"][..]),
        (
            "budget ratio above 1",
            "h2o:budget=1.5",
            &["1.5", "(0, 1]"][..],
        ),
        ("budget NaN", "h2o:budget=nan", &["nan", "budget"][..]),
        ("budget infinite", "h2o:budget=inf", &["inf", "budget"][..]),
        ("budget negative", "h2o:budget=-3", &["-3", "budget"][..]),
        (
            "window not a number",
            "snapkv:window=abc",
            &["abc", "window", "whole number"][..],
        ),
        (
            "unknown pooling",
            "snapkv:pool=median",
            &["median", "max"][..],
        ),
        (
            "boolean neither true nor false",
            "streaming:rerotate=maybe",
            &["maybe", "true or false"][..],
        ),
        (
            "spec pair without a value",
            "h2o:budget",
            &["budget", "key=value"][..],
        ),
        (
            "AdaKV over a policy that is not a scorer",
            "adakv:scorer=streaming",
            &["streaming", "snapkv"][..],
        ),
        (
            "FastGen recovery above 1",
            "fastgen:recover=2",
            &["2", "recover"][..],
        ),
        ("negative schedule", "tova:every=-1", &["-1", "every"][..]),
    ] {
        let args = spec(s);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        add(&format!("spec: {name}"), &args, expect, small);
    }

    // Preset and config files.
    let model = |fields: &str| format!(r#"{{"model": {{{fields}}}}}"#);
    let base = r#""vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "rope_theta": 10000.0, "max_positions": 64, "norm_eps": 1e-5, "tie_embeddings": true, "token_shift": false"#;
    let with = |key: &str, value: &str| -> String {
        let fields: Vec<String> = base
            .split(", ")
            .map(|kv| {
                if kv.starts_with(&format!("\"{key}\"")) {
                    format!("\"{key}\": {value}")
                } else {
                    kv.to_string()
                }
            })
            .collect();
        model(&fields.join(", "))
    };
    let gen_config = |file: &str| {
        vec![
            "generate".to_string(),
            "--max-tokens".into(),
            "1".into(),
            "--config".into(),
            file.to_string(),
        ]
    };
    let mut config_case = |name: &str, file: &str, text: String, expect: &[&str]| {
        let path = fx.write(file, text);
        let args = gen_config(&path);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        add(&format!("config: {name}"), &args, expect, small);
    };
    config_case(
        "not JSON",
        "c-notjson.json",
        "{model: oops".into(),
        &["c-notjson.json", "key must be a string"],
    );
    config_case(
        "missing field",
        "c-missing.json",
        model(&base.replace(r#""d_model": 32, "#, "")),
        &["d_model"],
    );
    config_case(
        "wrong type",
        "c-type.json",
        with("d_model", r#""big""#),
        &["big", "usize"],
    );
    config_case(
        "KV heads that do not divide",
        "c-heads.json",
        with("n_kv_heads", "3"),
        &["n_kv_heads", "3"],
    );
    config_case(
        "width not divisible by heads",
        "c-width.json",
        with("d_model", "30"),
        &["30", "n_heads"],
    );
    config_case(
        "zero layers",
        "c-layers.json",
        with("n_layers", "0"),
        &["n_layers", "0"],
    );
    config_case(
        "misspelt field",
        "c-typo.json",
        model(&format!("{base}, \"token_shfit\": true")),
        &["token_shfit"],
    );
    config_case(
        "zero norm epsilon",
        "c-eps.json",
        with("norm_eps", "0"),
        &["norm_eps", "0"],
    );
    config_case(
        "negative RoPE base",
        "c-theta.json",
        with("rope_theta", "-1"),
        &["rope_theta", "-1"],
    );
    config_case(
        "a vocabulary no machine holds",
        "c-huge.json",
        with("vocab_size", "1000000000000"),
        &["vocab_size", "1000000000000"],
    );
    config_case(
        "a width no machine holds",
        "c-wide.json",
        with("d_model", "4294967296"),
        &["d_model", "4294967296"],
    );
    add(
        "config: missing file",
        &gen_config(&fx.path("nosuch.json"))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &["nosuch.json", "no such file"],
        small,
    );
    let recipe = |train: &str| {
        format!(
            r#"{{"model": {{{base}}}, "train": {{"seq_len": 32, "batch_size": 2, "steps": 2, "lr": 0.001{train}}}}}"#
        )
    };
    let mut train_case = |name: &str, file: &str, text: String, expect: &[&str]| {
        let path = fx.write(file, text);
        add(
            &format!("recipe: {name}"),
            &["train", "--config", &path, "--out", &w("run")],
            expect,
            small,
        );
    };
    train_case(
        "learning rate 0",
        "r-lr.json",
        recipe("").replace("0.001", "0"),
        &["lr", "0", "(0, 1]"],
    );
    train_case(
        "sequence length 0",
        "r-seq.json",
        recipe("").replace(r#""seq_len": 32"#, r#""seq_len": 0"#),
        &["seq_len", "0"],
    );
    train_case(
        "negative weight decay",
        "r-wd.json",
        recipe(r#", "weight_decay": -1"#),
        &["weight_decay", "-1"],
    );
    train_case(
        "unknown task",
        "r-task.json",
        recipe(r#", "tasks": ["nosuch"], "task_fraction": 0.5"#),
        &["nosuch", "passkey"],
    );
    train_case(
        "a model config without a recipe",
        "r-none.json",
        model(base),
        &["train"],
    );

    // Checkpoints.
    let good = std::fs::read(fx.dir.join("ckpt/checkpoint.kvc")).unwrap();
    let sections = checkpoint_sections(&good);
    let mut ckpt_case = |name: &str, dir: &str, bytes: Option<Vec<u8>>, expect: &[&str]| {
        let path = match bytes {
            Some(b) => {
                fx.write(&format!("{dir}/checkpoint.kvc"), b);
                fx.path(dir)
            }
            None => dir.to_string(),
        };
        add(
            &format!("checkpoint: {name}"),
            &["generate", "--max-tokens", "1", "--checkpoint", &path],
            expect,
            small + good.len() as f64 * 4.0 / (1 << 20) as f64,
        );
    };
    ckpt_case(
        "missing folder",
        &fx.path("no-ckpt"),
        None,
        &["no-ckpt", "no such checkpoint directory"],
    );
    ckpt_case(
        "a file, not a folder",
        &fx.path("tiny.json"),
        None,
        &["tiny.json", "no such checkpoint directory"],
    );
    std::fs::create_dir_all(fx.dir.join("empty-dir")).unwrap();
    ckpt_case(
        "a folder without a checkpoint",
        &fx.path("empty-dir"),
        None,
        &["empty-dir", "checkpoint.kvc"],
    );
    ckpt_case(
        "truncated inside the header",
        "k-trunc4",
        Some(good[..4].to_vec()),
        &["k-trunc4", "kvckpt01"],
    );
    ckpt_case(
        "truncated inside a length",
        "k-trunc12",
        Some(good[..12].to_vec()),
        &["k-trunc12", "truncated"],
    );
    ckpt_case(
        "truncated at half",
        "k-half",
        Some(good[..good.len() / 2].to_vec()),
        &["k-half", "truncated"],
    );
    ckpt_case(
        "missing its last byte",
        "k-minus1",
        Some(good[..good.len() - 1].to_vec()),
        &["k-minus1", "truncated"],
    );
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    ckpt_case(
        "a flipped byte",
        "k-flip",
        Some(flipped),
        &["k-flip", "checksum"],
    );
    ckpt_case(
        "random bytes",
        "k-random",
        Some(
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        &["k-random", "kvckpt01"],
    );
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    ckpt_case(
        "bytes after the checksum",
        "k-trailing",
        Some(trailing),
        &["k-trailing", "trailing"],
    );
    let wider = String::from_utf8(sections[0].clone())
        .unwrap()
        .replace("\"d_model\": 32", "\"d_model\": 64");
    assert!(
        wider.contains("64"),
        "the fixture's config spells d_model as expected"
    );
    let forged = |config: Vec<u8>, model: Vec<u8>| {
        encode_checkpoint(&[config, sections[1].clone(), model, sections[3].clone()])
    };
    ckpt_case(
        "weights of another config",
        "k-config",
        Some(forged(wider.into_bytes(), sections[2].clone())),
        &["k-config", "does not fit"],
    );
    ckpt_case(
        "a config that is not JSON",
        "k-json",
        Some(forged(b"{oops".to_vec(), sections[2].clone())),
        &["k-json", "not a decoder config"],
    );
    ckpt_case(
        "weights that are not a record",
        "k-record",
        Some(forged(sections[0].clone(), vec![0xc1; 64])),
        &["k-record", "record"],
    );
    ckpt_case(
        "a record cut short",
        "k-short",
        Some(forged(
            sections[0].clone(),
            sections[2][..sections[2].len() / 3].to_vec(),
        )),
        &["k-short", "record"],
    );
    add(
        "checkpoint: resume from weights only",
        &["train", "--resume", "--out", &fx.path("weights-only")],
        &["weights-only", "cannot be resumed", "--init"],
        small,
    );
    add(
        "output: a folder that cannot be made",
        &[
            "bench",
            "--steps",
            "1",
            "--contexts",
            "4",
            "--out",
            "/proc/kv-denied",
        ],
        &["/proc/kv-denied"],
        small,
    );
    add(
        "output: a path below a file",
        &[
            "kept",
            "--policy",
            "h2o",
            "--prompt",
            "hello there",
            "--out",
            &format!("{}/kept.json", fx.path("tiny.json")),
        ],
        &["tiny.json"],
        small,
    );
    add(
        "output: a run below a file",
        &[
            "train",
            "--config",
            &fx.path("tiny.json"),
            "--out",
            &format!("{}/run", fx.path("tiny.json")),
        ],
        &["tiny.json"],
        small,
    );

    // GGUF files.
    let mut gguf_case = |name: &str, file: &str, bytes: Vec<u8>, expect: &[&str]| {
        let len = bytes.len();
        let path = fx.write(file, bytes);
        add(
            &format!("gguf: {name}"),
            &["generate", "--max-tokens", "1", "--model", &path],
            expect,
            small + 8.0 * len as f64 / (1 << 20) as f64,
        );
    };
    let ok = tiny_gguf(|_| {}, |_| {});
    let mut magic = ok.clone();
    magic[..4].copy_from_slice(b"GGML");
    gguf_case(
        "wrong magic",
        "g-magic.gguf",
        magic,
        &["g-magic.gguf", "gguf"],
    );
    let mut version = ok.clone();
    version[4..8].copy_from_slice(&7u32.to_le_bytes());
    gguf_case(
        "unknown version",
        "g-version.gguf",
        version,
        &["version 7", "2 and 3"],
    );
    gguf_case(
        "truncated header",
        "g-header.gguf",
        ok[..10].to_vec(),
        &["g-header.gguf", "truncated"],
    );
    let mut count = ok.clone();
    count[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    gguf_case(
        "a tensor count no file holds",
        "g-count.gguf",
        count,
        &["1152921504606846976", "cannot fit"],
    );
    let mut key_len = ok.clone();
    key_len[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    gguf_case(
        "a string longer than the file",
        "g-string.gguf",
        key_len,
        &["1099511627776", "remain"],
    );
    gguf_case(
        "truncated data",
        "g-data.gguf",
        ok[..ok.len() - 100].to_vec(),
        &["past the end", "truncated"],
    );
    gguf_case(
        "a tensor extent past the end",
        "g-extent.gguf",
        tiny_gguf(|t| t[3].offset = 1 << 20, |_| {}),
        &["blk.0.attn_q.weight", "past the end"],
    );
    gguf_case(
        "dims whose product overflows",
        "g-dims.gguf",
        tiny_gguf(|t| t[3].dims = vec![1 << 40, 1 << 40], |_| {}),
        &["blk.0.attn_q.weight", "overflows"],
    );
    gguf_case(
        "an unsupported tensor type",
        "g-type.gguf",
        tiny_gguf(|t| t[3].kind = 16, |_| {}),
        &["iq2_xxs", "q4_k"],
    );
    gguf_case(
        "a missing tensor",
        "g-missing.gguf",
        tiny_gguf(|t| t.retain(|t| t.name != "blk.0.ffn_down.weight"), |_| {}),
        &["down_proj"],
    );
    gguf_case(
        "an unknown architecture",
        "g-arch.gguf",
        tiny_gguf(|_| {}, |m| m[3].1 = Meta::Str("falcon")),
        &["falcon", "llama"],
    );
    gguf_case(
        "a tensor of the wrong shape",
        "g-shape.gguf",
        tiny_gguf(|t| t[4].dims = vec![8, 4], |_| {}),
        &["k_proj", "[8, 8]"],
    );
    gguf_case(
        "heads that do not divide the width",
        "g-heads.gguf",
        tiny_gguf(|_| {}, |m| m[7].1 = Meta::U32(3)),
        &["3"],
    );
    gguf_case(
        "an alignment that is not a power of two",
        "g-align.gguf",
        tiny_gguf(|_| {}, |m| m.push(("general.alignment", Meta::U32(3)))),
        &["general.alignment", "power of two"],
    );
    gguf_case(
        "a repeated metadata key",
        "g-twice.gguf",
        tiny_gguf(|_| {}, |m| m.push(("llama.block_count", Meta::U32(1)))),
        &["llama.block_count", "twice"],
    );
    gguf_case(
        "a tokenizer that is not BPE",
        "g-tok.gguf",
        tiny_gguf(|_| {}, |m| m[0].1 = Meta::Str("spm")),
        &["spm", "gpt2"],
    );
    let smollm2 = dirs_assets().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if let Ok(mut f) = std::fs::File::open(&smollm2) {
        use std::io::Read;
        let mut head = vec![0u8; 4 << 20];
        f.read_exact(&mut head).unwrap();
        gguf_case(
            "the real SmolLM2 file cut at 4 MiB",
            "g-smollm2.gguf",
            head,
            &["past the end"],
        );
    }

    // Hugging Face folders (safetensors), through `convert`, which reads the weights only.
    let convert = |dir: &str| {
        vec![
            "convert".to_string(),
            "--model".into(),
            dir.to_string(),
            "--to".into(),
            "mqa".into(),
            "--out".into(),
            w("converted"),
        ]
    };
    let mut hf_case =
        |name: &str, dir: &str, config: &str, weights: Option<Vec<u8>>, expect: &[&str]| {
            let len = weights.as_ref().map_or(0, Vec::len);
            let path = hf_folder(fx, dir, config, weights);
            let args = convert(&path);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            add(
                &format!("safetensors: {name}"),
                &args,
                expect,
                small + 8.0 * len as f64 / (1 << 20) as f64,
            );
        };
    let (header, data_len) = hf_header("F32", None, false);
    let data = f32_bytes(data_len / 4, 0.05);
    hf_case(
        "no weights file",
        "h-none",
        HF_CONFIG,
        None,
        &["h-none", "model.safetensors"],
    );
    hf_case(
        "shorter than its header length",
        "h-short",
        HF_CONFIG,
        Some(vec![1, 2, 3]),
        &["h-short", "8-byte header"],
    );
    hf_case(
        "a header length past the end",
        "h-len",
        HF_CONFIG,
        Some(safetensors(&header, &data)[..64].to_vec()),
        &["header of", "in a file of"],
    );
    hf_case(
        "a header that is not JSON",
        "h-json",
        HF_CONFIG,
        Some(safetensors("{not json}", &data)),
        &["h-json", "not json"],
    );
    let (past, _) = hf_header("F32", None, true);
    hf_case(
        "a tensor past the end of the data",
        "h-past",
        HF_CONFIG,
        Some(safetensors(&past, &data)),
        &["h-past", "safetensors"],
    );
    let (ints, _) = hf_header("I32", None, false);
    hf_case(
        "an unsupported dtype",
        "h-dtype",
        HF_CONFIG,
        Some(safetensors(&ints, &data)),
        &["i32", "f32, f16, bf16"],
    );
    let (missing, n) = hf_header("F32", Some("model.layers.0.mlp.down_proj.weight"), false);
    hf_case(
        "a missing tensor",
        "h-missing",
        HF_CONFIG,
        Some(safetensors(&missing, &data[..n])),
        &["down_proj"],
    );
    hf_case(
        "an architecture it does not read",
        "h-arch",
        &HF_CONFIG
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\""),
        Some(safetensors(&header, &data)),
        &["gpt2", "llama"],
    );
    hf_case(
        "heads that do not divide the width",
        "h-heads",
        &HF_CONFIG.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3"),
        Some(safetensors(&header, &data)),
        &["3"],
    );
    fx.write("h-index/config.json", HF_CONFIG);
    fx.write(
        "h-index/model.safetensors.index.json",
        r#"{"weight_map": {"model.embed_tokens.weight": "../../etc/passwd"}}"#,
    );
    let args = convert(&fx.path("h-index"));
    add(
        "safetensors: an index that points outside the folder",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["../../etc/passwd", "inside the folder"],
        small,
    );

    // Tokenizer files, through `train --tokenizer`.
    let tok_args = |path: &str| -> Vec<String> {
        [
            "train",
            "--config",
            &fx.path("tiny.json"),
            "--tokenizer",
            path,
            "--out",
            &w("tok-run"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    for (name, file, text, expect) in [
        (
            "missing",
            "no-tokenizer.json",
            None,
            &["no-tokenizer.json"][..],
        ),
        (
            "not JSON",
            "t-notjson.json",
            Some("{oops".to_string()),
            &["t-notjson.json"][..],
        ),
        (
            "JSON that is not a tokenizer",
            "t-other.json",
            Some(r#"{"a": 1}"#.to_string()),
            &["t-other.json"][..],
        ),
        (
            "an empty vocabulary",
            "t-empty.json",
            Some(big_tokenizer(0)),
            &["vocab"][..],
        ),
    ] {
        let path = match text {
            Some(t) => fx.write(file, t),
            None => fx.path(file),
        };
        let args = tok_args(&path);
        add(
            &format!("tokenizer: {name}"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            expect,
            small,
        );
    }

    // Chat templates: endless, explosive, empty, or not text.
    let template = |t: &'static str| {
        move |m: &mut Vec<(&'static str, Meta<'static>)>| {
            m.push(("tokenizer.chat_template", Meta::Str(t)))
        }
    };
    for (name, file, bytes, expect, heap) in [
        (
            "a template that loops 10^10 times",
            "c-loop.gguf",
            tiny_gguf(
                |_| {},
                template(
                    "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
                ),
            ),
            &["chat template", "budget"][..],
            small,
        ),
        (
            "a template that doubles a string 40 times",
            "c-double.gguf",
            tiny_gguf(
                |_| {},
                template(
                    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
                ),
            ),
            &["chat template", "budget"][..],
            // The fuel bounds the data a template makes to about 64 MiB.
            96.0,
        ),
        (
            "a template that repeats a string 3 x 10^7 times",
            "c-repeat.gguf",
            tiny_gguf(|_| {}, template("{{ 'ab ' * 30000000 }}")),
            &["chat template", "budget"][..],
            small,
        ),
        (
            "a template that renders nothing",
            "c-empty.gguf",
            tiny_gguf(|_| {}, template("{% if false %}x{% endif %}")),
            &["chat template", "rendered nothing"][..],
            small,
        ),
        (
            "a template stored as an integer",
            "c-int.gguf",
            tiny_gguf(
                |_| {},
                |m| m.push(("tokenizer.chat_template", Meta::U32(7))),
            ),
            &["tokenizer.chat_template", "u32", "string"][..],
            small,
        ),
    ] {
        let path = fx.write(file, bytes);
        add(
            &format!("chat: {name}"),
            &[
                "generate",
                "--max-tokens",
                "1",
                "--model",
                &path,
                "--chat",
                "Hi",
            ],
            expect,
            heap,
        );
    }

    // Weights and metadata that load but cannot run.
    let mut gguf_run = |name: &str, file: &str, bytes: Vec<u8>, expect: &[&str]| {
        let path = fx.write(file, bytes);
        add(
            &format!("gguf: {name}"),
            &["generate", "--max-tokens", "1", "--model", &path],
            expect,
            small,
        );
    };
    gguf_run(
        "a NaN in output_norm",
        "n-out.gguf",
        tiny_gguf_with(|_| {}, |_| {}, Some(("output_norm.weight", 0, f32::NAN))),
        &["model.norm.weight", "nan", "finite"],
    );
    gguf_run(
        "an inf in attn_norm",
        "n-attn.gguf",
        tiny_gguf_with(
            |_| {},
            |_| {},
            Some(("blk.0.attn_norm.weight", 3, f32::INFINITY)),
        ),
        &["input_layernorm", "inf", "finite"],
    );
    gguf_run(
        "a NaN in the embedding",
        "n-embd.gguf",
        tiny_gguf_with(|_| {}, |_| {}, Some(("token_embd.weight", 17, f32::NAN))),
        &["embed_tokens", "nan"],
    );
    gguf_run(
        "rope.freq_base = inf",
        "n-rope.gguf",
        tiny_gguf(
            |_| {},
            |m| m.push(("llama.rope.freq_base", Meta::F32(f32::INFINITY))),
        ),
        &["rope.freq_base", "inf", "finite"],
    );
    gguf_run(
        "head_count = 0",
        "n-heads.gguf",
        tiny_gguf(|_| {}, |m| m[7].1 = Meta::U32(0)),
        &["llama.attention.head_count = 0", "at least 1"],
    );
    gguf_run(
        "embedding_length = 0",
        "n-width.gguf",
        tiny_gguf(|_| {}, |m| m[5].1 = Meta::U32(0)),
        &["llama.embedding_length = 0", "at least 1"],
    );
    gguf_run(
        "key_length that disagrees with the tensors",
        "n-keylen.gguf",
        tiny_gguf(
            |_| {},
            |m| m.push(("llama.attention.key_length", Meta::U32(32))),
        ),
        &["q_proj", "[8, 8]"],
    );
    let mut nan_header = hf_header("F32", None, false);
    let mut nan_data = f32_bytes(nan_header.1 / 4, 0.05);
    // model.norm.weight is the last tensor: its first value becomes NaN.
    let at = nan_header.1 - 8 * 4;
    nan_data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = hf_folder(
        fx,
        "h-nan",
        HF_CONFIG,
        Some(safetensors(&std::mem::take(&mut nan_header.0), &nan_data)),
    );
    let args = convert(&path);
    add(
        "safetensors: a NaN in the final norm",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["model.norm.weight", "nan"],
        small,
    );

    // Lengths past the model's context, refused before anything is allocated for them.
    add(
        "context: eval at 10^9 tokens",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--context",
            "1000000000",
            "--out",
            &w("e"),
        ],
        &["--context", "1000000000", "max_positions = 64"],
        small,
    );
    add(
        "context: eval past the model's 64 positions",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--task",
            "ppl",
            "--context",
            "100",
            "--out",
            &w("e"),
        ],
        &["100 tokens", "max_positions = 64", "--allow-beyond-context"],
        small,
    );
    add(
        "context: bench at 10^6 tokens",
        &["bench", "--contexts", "1000000", "--out", &w("b")],
        &["--contexts", "1000000", "max_positions"],
        small,
    );
    add(
        "context: stream with a 10^9-token prompt",
        &["stream", "--prompt-tokens", "1000000000", "--out", &w("s")],
        &["--prompt-tokens", "1000000000", "max_positions"],
        small,
    );
    let huge_prompt = fx.write("huge-prompt.txt", "word ".repeat(20_000));
    add(
        "context: kept with a 100 kB prompt file",
        &[
            "kept",
            "--policy",
            "h2o",
            "--prompt-file",
            &huge_prompt,
            "--out",
            &w("kept.json"),
        ],
        &["huge-prompt.txt", "100000 bytes", "max_positions"],
        small,
    );
    let long_prompt = fx.write("long-prompt.txt", "y".repeat(1000));
    add(
        "context: kept with a prompt past the model's positions",
        &[
            "kept",
            "--policy",
            "h2o",
            "--prompt-file",
            &long_prompt,
            "--out",
            &w("kept.json"),
        ],
        &["1000 tokens", "max_positions = 256"],
        small,
    );

    // Outputs that are not regular files are refused, and nothing is made beside them.
    let target = fx.write("link-target.json", "{}");
    let link = fx.dir.join("out-link.json");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let kept_to = |out: &str| -> Vec<String> {
        [
            "kept",
            "--policy",
            "h2o",
            "--prompt",
            "hello there",
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    for (name, out, expect) in [
        (
            "kept into /dev/full",
            "/dev/full".to_string(),
            "not a regular file",
        ),
        ("kept into a symlink", link.display().to_string(), "symlink"),
        (
            "kept into a folder",
            fx.dir.display().to_string(),
            "not a regular file",
        ),
    ] {
        let args = kept_to(&out);
        add(
            &format!("output: {name}"),
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[expect],
            small,
        );
    }
    add(
        "output: niah prompts into /dev/full",
        &[
            "eval",
            "--checkpoint",
            &ckpt,
            "--task",
            "niah",
            "--niah-prompts",
            "/dev/full",
            "--out",
            &w("e"),
        ],
        &["/dev/full", "not a regular file"],
        small,
    );

    // Paths that are not files.
    add(
        "a model that is a device",
        &["generate", "--model", "/dev/zero"],
        &["/dev/zero", "not a regular file"],
        small,
    );
    add(
        "training data that is a device",
        &[
            "train",
            "--config",
            &fx.path("tiny.json"),
            "--data",
            "/dev/zero",
            "--out",
            &w("t"),
        ],
        &["/dev/zero", "not a regular file"],
        small,
    );
    add(
        "a model name in the wrong case",
        &["generate", "--model", "SMOLLM2"],
        &["SMOLLM2", "`smollm2`"],
        small,
    );

    // Runs that cannot continue as asked.
    add(
        "resume to fewer steps than the run has taken",
        &["train", "--resume", "--steps", "1", "--out", &ckpt],
        &["--steps = 1", "2 steps"],
        small,
    );
    let bad_log = fx.dir.join("bad-log");
    std::fs::create_dir_all(&bad_log).unwrap();
    for f in std::fs::read_dir(&ckpt).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, bad_log.join(f.file_name().unwrap())).unwrap();
        }
    }
    let log = std::fs::read_to_string(bad_log.join("metrics.jsonl")).unwrap();
    let first = log.lines().next().unwrap().to_string();
    std::fs::write(bad_log.join("metrics.jsonl"), format!("{first}\n{{oops\n")).unwrap();
    add(
        "resume over a metrics log with a bad line",
        &["train", "--resume", "--out", &bad_log.display().to_string()],
        &["metrics.jsonl", "line 2"],
        small,
    );

    // Result files read back by report and stream: numbers no run writes.
    let eval_json = |version: u32, probe: &str, accuracy: f64| {
        format!(
            r#"{{"version": {version}, "device": "flex",
            "spec": {{"policies": ["full"], "compressions": [0.5], "probes": [], "contexts": [64],
                     "depths": [], "samples": 1, "windows": 1, "seed": 1}},
            "results": [{{"model": "m", "policy": "full", "spec": "full", "compression": 0.0,
                          "probe": "{probe}", "context": 64, "depth": null, "accuracy": {accuracy},
                          "loss": null, "perplexity": null, "kv_bytes": 10.0, "removed": 0.0,
                          "samples": 1, "seconds": 0.1}}]}}"#
        )
    };
    for (name, file, text, expect) in [
        (
            "a layout version it does not read",
            "r-version.json",
            eval_json(99, "passkey", 0.5),
            &["version = 99", "version 1"][..],
        ),
        (
            "an accuracy of -5",
            "r-acc.json",
            eval_json(1, "passkey", -5.0),
            &["accuracy = -5", "[0, 1]"][..],
        ),
        (
            "an accuracy of 1e308",
            "r-huge.json",
            eval_json(1, "passkey", 1e308),
            &["accuracy = 1e308", "[0, 1]"][..],
        ),
        (
            "a probe name that climbs out of the folder",
            "r-probe.json",
            eval_json(1, "x/../../escaped", 0.5),
            &["x/../../escaped", "passkey"][..],
        ),
    ] {
        let path = fx.write(file, text);
        add(
            &format!("report: {name}"),
            &["report", "--from", &path, "--out", &w("r")],
            expect,
            small,
        );
    }
    let stream_json = |a: f64, b: f64| {
        format!(
            r#"{{"device": "flex", "model": "m", "policy": "p", "tokens": 2, "seconds": 1.0,
            "warm_from_tokens": 0, "samples": [
              {{"tokens": 1, "rss_mib": {a:e}, "heap_mib": 1.0, "kv_mib": 1.0, "slots": 1, "seconds": 0.5}},
              {{"tokens": 2, "rss_mib": {b:e}, "heap_mib": 1.0, "kv_mib": 1.0, "slots": 1, "seconds": 1.0}}]}}"#
        )
    };
    let path = fx.write("s-huge.json", stream_json(1e308, -1e308));
    add(
        "stream: memory readings of +-1e308 MiB",
        &["stream", "--from", &path, "--out", &w("s")],
        &["rss_mib = 1e308", "finite number"],
        small,
    );

    // Prompts.
    let mut prompt_case = |name: &str, extra: &[&str], expect: &[&str]| {
        let mut args = vec!["generate", "--max-tokens", "1", "--temperature", "0"];
        args.extend_from_slice(extra);
        add(&format!("prompt: {name}"), &args, expect, small);
    };
    let bad_utf8 = fx.write("bad-utf8.txt", b"caf\xc3 \xff\xfe");
    prompt_case("empty", &["--prompt", ""], &["prompt", "empty"]);
    prompt_case(
        "invalid UTF-8 in a file",
        &["--prompt-file", &bad_utf8],
        &["bad-utf8.txt", "utf-8", "byte at 3"],
    );
    prompt_case(
        "a missing prompt file",
        &["--prompt-file", &fx.path("no-prompt.txt")],
        &["no-prompt.txt"],
    );
    let long = fx.write("long.txt", "x".repeat(300));
    prompt_case(
        "longer than the model's positions",
        &["--prompt-file", &long, "--preset", "tiny-mha"],
        &["300", "max_positions", "256"],
    );
    prompt_case(
        "a chat without a template",
        &["--chat", "hi"],
        &["chat template"],
    );
    add(
        "prompt: kept with an empty prompt",
        &[
            "kept",
            "--policy",
            "h2o",
            "--prompt",
            "",
            "--out",
            &w("kept.json"),
        ],
        &["prompt", "empty"],
        small,
    );
    cases
}

/// A WordLevel tokenizer.json with `n` tokens.
fn big_tokenizer(n: usize) -> String {
    let vocab: Vec<String> = (0..n).map(|i| format!("\"t{i}\": {i}")).collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null, "decoder": null,
        "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "t0"}}}}"#,
        vocab.join(", ")
    )
}

/// Where scripts/fetch-assets.sh puts the real model (the same rule as kv_models::assets_dir).
fn dirs_assets() -> PathBuf {
    std::env::var_os("KV_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/kv-cache")
        })
}

/// Makes the fixtures every case shares: a tiny preset, a trained checkpoint, a weights-only one.
fn fixtures(root: &Path) -> Fixtures {
    let fx = Fixtures {
        dir: root.join("fx"),
    };
    let preset = fx.write("tiny.json", tiny_preset(2, 0));
    let out = run(kv().args(["train", "--config", &preset, "--out", &fx.path("ckpt")]));
    assert!(
        out.status.success(),
        "fixture training failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(kv().args([
        "convert",
        "--from",
        &fx.path("ckpt"),
        "--to",
        "mqa",
        "--out",
        &fx.path("weights-only"),
    ]));
    assert!(
        out.status.success(),
        "fixture conversion failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fx
}

#[test]
fn every_bad_input_is_one_error_line_naming_it_with_no_panic_no_file_left_and_a_bounded_heap() {
    let root = scratch("bad-input");
    let fx = fixtures(&root);
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let cases = cases(&fx, &work);
    assert!(cases.len() >= 50, "the matrix holds {} cases", cases.len());
    let fixture_files = listing(&fx.dir);
    let mut failures = Vec::new();
    let mut worst_heap = (0.0f64, String::new());
    for (i, case) in cases.iter().enumerate() {
        let peak_file = root.join(format!("peak-{i}"));
        let out = run(kv()
            .args(&case.args)
            .current_dir(&work)
            .env("KV_PEAK_HEAP_FILE", &peak_file));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut why = Vec::new();
        if out.status.success() {
            why.push("exited 0".to_string());
        }
        if out.status.code().is_none() {
            why.push(format!("killed by a signal ({:?})", out.status));
        }
        if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
            why.push("panicked".into());
        }
        if lines.len() != 1 || !lines[0].starts_with("error: ") {
            why.push(format!(
                "{} stderr lines, not one `error:` line",
                lines.len()
            ));
        }
        let line = lines.last().map(|l| l.to_lowercase()).unwrap_or_default();
        for e in &case.expect {
            if !line.contains(e.as_str()) {
                why.push(format!("the line does not name {e:?}"));
            }
        }
        let left = listing(&work);
        if !left.is_empty() {
            why.push(format!("left files behind: {left:?}"));
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).unwrap();
        }
        match std::fs::read_to_string(&peak_file)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        {
            Some(bytes) => {
                let mib = bytes / (1 << 20) as f64;
                if std::env::var_os("KV_MATRIX_REPORT").is_some() {
                    eprintln!("| {} | {mib:.1} | {} |", case.name, stderr.trim());
                }
                if mib > worst_heap.0 {
                    worst_heap = (mib, case.name.clone());
                }
                if mib > case.heap_mib {
                    why.push(format!(
                        "heap peaked at {mib:.1} MiB (bound {:.1} MiB)",
                        case.heap_mib
                    ));
                }
            }
            None => why.push("no heap report (KV_PEAK_HEAP_FILE)".into()),
        }
        if !why.is_empty() {
            failures.push(format!(
                "{} (`kv {}`): {}\n    stderr: {}",
                case.name,
                case.args.join(" "),
                why.join("; "),
                stderr.trim()
            ));
        }
    }
    assert_eq!(
        listing(&fx.dir),
        fixture_files,
        "a case wrote into the fixtures"
    );
    eprintln!(
        "{} bad inputs, {} failed; largest heap peak {:.1} MiB ({})",
        cases.len(),
        failures.len(),
        worst_heap.0,
        worst_heap.1
    );
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs were not handled:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Runs `kv` with a heap report; returns (success, stderr, heap peak in MiB).
fn run_measured(args: &[&str], peak_file: &Path) -> (bool, String, f64) {
    let out = run(kv().args(args).env("KV_PEAK_HEAP_FILE", peak_file));
    let heap = std::fs::read_to_string(peak_file)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        / (1 << 20) as f64;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
        heap,
    )
}

#[test]
fn inputs_at_the_edges_succeed_within_the_context_and_a_bounded_heap_and_leave_devices_alone() {
    let root = scratch("edges");
    let peak = root.join("peak");
    // A trillion tokens under a 16-slot policy: generation stops at the model's 256 positions,
    // says so, and reserves nothing for the tokens it will never make.
    let (ok, err, heap) = run_measured(
        &[
            "generate",
            "--prompt",
            "hi",
            "--max-tokens",
            "1000000000000",
            "--policy",
            "streaming:budget=16",
            "--temperature",
            "0",
        ],
        &peak,
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("255 tokens | stopped at the model's max_positions = 256"),
        "{err}"
    );
    assert!(heap < 64.0, "heap peaked at {heap:.1} MiB");
    // Past the context on request, with the cache still bounded by the policy.
    let (ok, err, _) = run_measured(
        &[
            "generate",
            "--prompt",
            "hi",
            "--max-tokens",
            "400",
            "--policy",
            "streaming:budget=16",
            "--allow-beyond-context",
        ],
        &peak,
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("400 tokens |") && !err.contains("stopped"),
        "{err}"
    );
    assert!(err.contains("16 slots/head"), "{err}");
    // The sampling settings are printed: llama.cpp's defaults for a model without its own.
    assert!(
        err.contains("temperature 0.8 top-k 40 top-p 0.95 min-p 0.05"),
        "{err}"
    );
    // A device named as the output is neither replaced nor joined by files beside it.
    let (ok, err, _) = run_measured(
        &[
            "kept",
            "--policy",
            "h2o",
            "--prompt",
            "hello there",
            "--out",
            "/dev/full",
        ],
        &peak,
    );
    assert!(!ok && err.contains("not a regular file"), "{err}");
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/full")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    assert!(!Path::new("/dev/full-heads.md").exists());
    assert!(!Path::new("/dev/full-heads.png").exists());
    // Resuming a finished run does nothing and leaves its log byte for byte.
    let run_dir = root.join("run");
    let preset = root.join("tiny.json");
    std::fs::write(&preset, tiny_preset(2, 0)).unwrap();
    let dir = run_dir.display().to_string();
    let (ok, err, _) = run_measured(
        &[
            "train",
            "--config",
            &preset.display().to_string(),
            "--out",
            &dir,
        ],
        &peak,
    );
    assert!(ok, "{err}");
    let log = std::fs::read(run_dir.join("metrics.jsonl")).unwrap();
    let (ok, err, _) = run_measured(&["train", "--resume", "--out", &dir], &peak);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(run_dir.join("metrics.jsonl")).unwrap(), log);
    let _ = std::fs::remove_dir_all(&root);
}
