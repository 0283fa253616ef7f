//! Helpers shared by the process-level tests: run the `kv` binary, make small fixture files.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `kv` binary cargo built for these tests.
pub fn kv() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv"));
    // No progress bars in captured output; the same assets folder as the rest of the tests.
    cmd.env("NO_COLOR", "1");
    cmd
}

/// A fresh, empty scratch folder for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-cli-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `cmd` and returns its output, panicking with the command line if it could not start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"))
}

/// Every file below `dir`, relative to it, sorted.
pub fn listing(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A preset small enough to train in a second: 2 layers of width 32, GQA 4/2, byte vocabulary.
pub fn tiny_preset(steps: usize, checkpoint_every: usize) -> String {
    format!(
        r#"{{"model": {{"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "ffn_hidden": 64, "rope_theta": 10000.0, "max_positions": 64, "norm_eps": 1e-5,
            "tie_embeddings": true, "token_shift": false}},
          "train": {{"seq_len": 32, "batch_size": 2, "steps": {steps}, "lr": 0.003, "warmup_steps": 2,
            "eval_every": 4, "eval_windows": 1, "eval_task_samples": 1, "checkpoint_every": {checkpoint_every}, "seed": 5}}}}"#
    )
}

/// FNV-1a, the checksum of checkpoint files (so a test can forge a well-formed one).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The four sections of a checkpoint file (config, training state, model, optimiser).
pub fn checkpoint_sections(bytes: &[u8]) -> Vec<Vec<u8>> {
    assert_eq!(&bytes[..8], b"KVCKPT02");
    let mut at = 8;
    let mut out = vec![];
    for _ in 0..4 {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        out.push(bytes[at + 8..at + 8 + len].to_vec());
        at += 8 + len;
    }
    out
}

/// A checkpoint file from its sections, with a valid checksum.
pub fn encode_checkpoint(sections: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"KVCKPT02".to_vec();
    for s in sections {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// A GGUF metadata value.
pub enum Meta<'a> {
    /// Type 4.
    U32(u32),
    /// Type 6.
    F32(f32),
    /// Type 8.
    Str(&'a str),
    /// Type 9 holding strings.
    Strs(Vec<&'a str>),
}

/// One tensor of a hand-made GGUF file: name, dims (GGUF order: fastest first), type, offset.
pub struct GgufTensor<'a> {
    pub name: &'a str,
    pub dims: Vec<u64>,
    pub kind: u32,
    pub offset: u64,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 file: header, metadata, tensor infos, padding to 32, then `data`.
pub fn gguf(meta: &[(&str, Meta)], tensors: &[GgufTensor], data: &[u8]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend_from_slice(&9u32.to_le_bytes());
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut out, s);
                }
            }
        }
    }
    for t in tensors {
        put_str(&mut out, t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.kind.to_le_bytes());
        out.extend_from_slice(&t.offset.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend_from_slice(data);
    out
}

/// The metadata of a one-layer Llama of width 8 (2 heads, vocabulary 16, feed-forward 16),
/// with a 16-token byte-level BPE vocabulary.
pub fn llama_meta() -> Vec<(&'static str, Meta<'static>)> {
    vec![
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        (
            "tokenizer.ggml.tokens",
            Meta::Strs(vec![
                "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "ab",
            ]),
        ),
        ("tokenizer.ggml.merges", Meta::Strs(vec!["a b"])),
        ("general.architecture", Meta::Str("llama")),
        ("llama.block_count", Meta::U32(1)),
        ("llama.embedding_length", Meta::U32(8)),
        ("llama.feed_forward_length", Meta::U32(16)),
        ("llama.attention.head_count", Meta::U32(2)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.context_length", Meta::U32(64)),
        ("llama.vocab_size", Meta::U32(16)),
    ]
}

/// A safetensors file: the JSON header (names, dtypes, shapes, offsets) given verbatim, then `data`.
pub fn safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A Hugging Face `config.json` of a one-layer Llama of width 8.
pub const HF_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16,
  "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
  "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "tie_word_embeddings": true}"#;
