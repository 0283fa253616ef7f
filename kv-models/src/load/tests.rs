//! Loading pretrained models: de-quantisation against llama.cpp's Python reference, Hugging Face
//! and GGUF checkpoints against transformers' logits, the SmolLM2 tokenizer, chat template and
//! greedy generation against transformers, and hostile files.

use super::gguf::{GgmlType, GgufFile, GgufValue, dequantize};
use super::*;
use safetensors::SafeTensors;
use std::path::PathBuf;

pub(crate) fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-load-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Reads every tensor of a safetensors file as (shape, f32 values or i64 values as f64).
fn read_safetensors(path: &Path) -> Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.dtype(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn i64s(data: &[u8]) -> Vec<i64> {
    data.chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn tensor_named(
    all: &[(String, Vec<usize>, safetensors::Dtype, Vec<u8>)],
    name: &str,
) -> (Vec<usize>, Vec<u8>) {
    let t = all
        .iter()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no {name}"));
    (t.1.clone(), t.3.clone())
}

#[test]
fn dequantisation_of_every_supported_type_equals_the_gguf_reference() {
    let all = read_safetensors(&testdata("gguf-dequant.safetensors"));
    let mut checked = vec![];
    for kind in GgmlType::SUPPORTED {
        let name = kind.name();
        let (_, raw) = tensor_named(&all, &format!("{name}.raw"));
        let (_, expected) = tensor_named(&all, &format!("{name}.expected"));
        let expected = f32s(&expected);
        let got = dequantize(kind, &raw, expected.len()).unwrap();
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(
            worst <= 1e-6 * scale.max(1.0),
            "{name}: max abs diff {worst} (values up to {scale})"
        );
        checked.push(name);
    }
    assert_eq!(checked.len(), 11);
    // A short buffer or a type without a decoder is an error, not a panic.
    let e = dequantize(GgmlType::Q4_K, &[0u8; 100], 256).unwrap_err();
    assert!(e.contains("100 bytes"), "{e}");
    let e = dequantize(GgmlType(16), &[0u8; 66], 256).unwrap_err();
    assert!(e.contains("IQ2_XXS") && e.contains("Q6_K"), "{e}");
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn logits_of<B: Backend>(model: &crate::model::decoder::DecoderLm<B>, ids: &[i64]) -> Vec<f32> {
    let dev = model.embed.weight.device();
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let x = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &dev).reshape([1, ids.len()]);
    model.forward(x).into_data().iter::<f32>().collect()
}

fn tiny_llama_golden() -> (Vec<i64>, Vec<f32>) {
    golden_logits("tiny-llama-logits.safetensors")
}

/// The input ids and transformers' logits stored in a test-data file.
fn golden_logits(file: &str) -> (Vec<i64>, Vec<f32>) {
    let all = read_safetensors(&testdata(file));
    (
        i64s(&tensor_named(&all, "input_ids").1),
        f32s(&tensor_named(&all, "logits").1),
    )
}

/// Asserts that `model` reproduces transformers' logits (`want` for `ids`) to 1e-4, in one full
/// forward and on the cached path (prefill 40, then one token at a time), on the backend's kernels
/// and on the host kernels the CLI's CPU path takes.
fn assert_reproduces<B: Backend>(
    label: &str,
    model: &crate::model::decoder::DecoderLm<B>,
    ids: &[i64],
    want: &[f32],
    dev: &B::Device,
) {
    let diff = max_abs_diff(&logits_of(model, ids), want);
    eprintln!("{label}: max abs logit diff vs transformers {diff:.2e}");
    assert!(diff <= 1e-4, "{label}: max abs diff {diff}");
    let as_t = |s: &[i64]| {
        Tensor::<B, 1, Int>::from_ints(
            s.iter().map(|&i| i as i32).collect::<Vec<_>>().as_slice(),
            dev,
        )
        .reshape([1, s.len()])
    };
    for host in [false, true] {
        let rows = kv_attention::with_host_kernels(host, || {
            let mut cache = model.new_state(1);
            let mut rows = vec![model.forward_cached(as_t(&ids[..40]), &mut cache).unwrap()];
            for i in 40..ids.len() {
                rows.push(
                    model
                        .forward_cached(as_t(&ids[i..i + 1]), &mut cache)
                        .unwrap(),
                );
            }
            rows
        });
        let cached: Vec<f32> = Tensor::cat(rows, 1).into_data().iter::<f32>().collect();
        let diff = max_abs_diff(&cached, want);
        assert!(
            diff <= 1e-4,
            "{label}: cached decode, host kernel {host}: max abs diff {diff}"
        );
    }
}

fn tiny_llama_from_its_hugging_face_folder_reproduces_transformers_logits<B: Backend>(
    dev: &B::Device,
) {
    let source = Pretrained::open(testdata("tiny-llama")).unwrap();
    assert_eq!(source.format(), PretrainedFormat::HuggingFace);
    let config = source.config().unwrap();
    assert_eq!(
        (
            config.vocab_size,
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.n_kv_heads
        ),
        (256, 64, 2, 4, 2)
    );
    assert!(!config.tie_embeddings);
    assert_eq!(config.norm_eps, 1e-6);
    let (model, _) = source.load_model::<B>(dev).unwrap();
    let (ids, want) = tiny_llama_golden();
    assert_reproduces("tiny-llama (safetensors)", &model, &ids, &want, dev);
}

/// Qwen3 (QK-norm, a head wider than `hidden / heads`, tied embeddings, RoPE base 1e6), from a
/// folder transformers wrote and as a GGUF file of architecture `qwen3` (rows not permuted).
fn tiny_qwen3_reproduces_transformers_logits_from_its_folder_and_as_gguf<B: Backend>(
    dev: &B::Device,
) {
    let source = Pretrained::open(testdata("tiny-qwen3")).unwrap();
    let config = source.config().unwrap();
    assert_eq!(
        (
            config.qk_norm,
            config.qkv_bias,
            config.head_dim(),
            config.rope_theta
        ),
        (Some(true), None, 32, 1e6)
    );
    assert!(config.tie_embeddings);
    let (model, _) = source.load_model::<B>(dev).unwrap();
    let (ids, want) = golden_logits("tiny-qwen3-logits.safetensors");
    assert_reproduces("tiny-qwen3 (safetensors)", &model, &ids, &want, dev);
    // The same weights without QK-norm are far off: the test can fail.
    let mut plain = model.clone();
    for block in plain.blocks_mut().unwrap() {
        let attn = block.attention.grouped_mut().unwrap();
        (attn.q_norm, attn.k_norm) = (None, None);
    }
    let off = max_abs_diff(&logits_of(&plain, &ids), &want);
    assert!(off > 0.1, "without QK-norm: max abs diff {off}");
    // Conversions carry the norms: pooling into as many KV heads as it has is the same model;
    // DMC and MLA, which have no QK-norm, refuse it by name.
    let (same, _) = crate::train::convert::to_grouped(&model, &config, 2).unwrap();
    assert!(max_abs_diff(&logits_of(&same, &ids), &want) <= 1e-4);
    let err = error_of(crate::train::convert::to_dmc(
        &model,
        &config,
        crate::model::config::DmcSettings::default(),
    ));
    assert!(err.contains("qk_norm"), "{err}");

    let dir = scratch("tiny-qwen3-gguf");
    let shape = GgufShape {
        arch: "qwen3",
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        theta: 1e6,
        permute_qk: false,
    };
    let path = folder_as_gguf(&testdata("tiny-qwen3"), &dir.join("q.gguf"), &shape, None);
    let (model, gguf_config) = Pretrained::open(&path)
        .unwrap()
        .load_model::<B>(dev)
        .unwrap();
    assert_eq!(
        gguf_config,
        // GGUF stores the epsilon as an f32.
        config.clone().with_norm_eps(gguf_config.norm_eps)
    );
    assert_reproduces("tiny-qwen3 (GGUF)", &model, &ids, &want, dev);
    // A file without a layer's key norm names the tensor it lacks.
    let broken = folder_as_gguf(
        &testdata("tiny-qwen3"),
        &dir.join("broken.gguf"),
        &shape,
        Some("blk.1.attn_k_norm.weight"),
    );
    let err = error_of(Pretrained::open(&broken).unwrap().load_model::<B>(dev));
    assert!(
        err.contains("model.layers.1.self_attn.k_norm.weight"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- A GGUF writer, for files the tests control ------------------------------------------------

/// A GGUF file built in memory: metadata and F32 (or raw-encoded) tensors.
#[derive(Default)]
struct GgufWriter {
    kv: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::Str(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::Array(a) => {
            out.extend(a.first().map_or(4, type_id).to_le_bytes());
            out.extend((a.len() as u64).to_le_bytes());
            a.iter().for_each(|x| put_value(out, x));
        }
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

impl GgufWriter {
    fn meta(mut self, key: &str, v: GgufValue) -> Self {
        self.kv.push((key.into(), v));
        self
    }

    /// A row-major `[rows, cols]` (or `[n]`) f32 tensor, stored with ggml's reversed dims.
    fn f32_tensor(&mut self, name: &str, shape: &[usize], values: &[f32]) {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((
            name.into(),
            dims,
            0,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, t, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(t.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(out.len().div_ceil(32) * 32, 0);
        }
        out
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.bytes()).unwrap();
        path.to_path_buf()
    }
}

/// llama.cpp's `permute` of query/key rows (what its converter writes for the llama architecture).
fn permute_rows(values: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let (dim, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for j in 0..half {
            for c in 0..2 {
                let hf = (h * dim + c * half + j) * cols;
                let gg = (h * dim + 2 * j + c) * cols;
                out[gg..gg + cols].copy_from_slice(&values[hf..hf + cols]);
            }
        }
    }
    out
}

/// tiny-llama written as llama.cpp's converter would write it (F32, q/k rows permuted).
pub(crate) fn tiny_llama_gguf(path: &Path, skip: Option<&str>) -> PathBuf {
    let shape = GgufShape {
        arch: "llama",
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        theta: 10000.0,
        permute_qk: true,
    };
    folder_as_gguf(&testdata("tiny-llama"), path, &shape, skip)
}

/// What a test GGUF file's metadata says about the model it holds.
struct GgufShape {
    arch: &'static str,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    theta: f32,
    /// Interleave each query/key head's halves, as llama.cpp's `llama` converter does.
    permute_qk: bool,
}

/// A tiny Hugging Face folder's weights written as llama.cpp's converter would write them (F32),
/// under llama.cpp's names spelt out here, independently of the loader's table; `skip` leaves one
/// tensor out.
fn folder_as_gguf(folder: &Path, path: &Path, m: &GgufShape, skip: Option<&str>) -> PathBuf {
    let all = read_safetensors(&folder.join("model.safetensors"));
    let key = |k: &str| format!("{}.{k}", m.arch);
    let u32_of = |n: usize| GgufValue::U32(n as u32);
    let mut w = GgufWriter::default()
        .meta("general.architecture", GgufValue::Str(m.arch.into()))
        .meta(&key("block_count"), GgufValue::U32(2))
        .meta(&key("context_length"), GgufValue::U32(1024))
        .meta(&key("embedding_length"), GgufValue::U32(64))
        .meta(&key("feed_forward_length"), GgufValue::U32(128))
        .meta(&key("attention.head_count"), u32_of(m.heads))
        .meta(&key("attention.head_count_kv"), u32_of(m.kv_heads))
        .meta(&key("attention.key_length"), u32_of(m.head_dim))
        .meta(&key("rope.freq_base"), GgufValue::F32(m.theta))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            GgufValue::F32(1e-6),
        )
        .meta(&key("rope.dimension_count"), u32_of(m.head_dim));
    for (name, shape, _, data) in &all {
        let mut values = f32s(data);
        let gguf = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            n => {
                let rest = n.strip_prefix("model.layers.").unwrap();
                let (layer, module) = rest.split_once('.').unwrap();
                let mut permute = |heads: usize| {
                    if m.permute_qk {
                        values = permute_rows(&values, heads, shape[0], shape[1]);
                    }
                };
                let g = match module {
                    "input_layernorm.weight" => "attn_norm",
                    "post_attention_layernorm.weight" => "ffn_norm",
                    "self_attn.q_proj.weight" => {
                        permute(m.heads);
                        "attn_q"
                    }
                    "self_attn.k_proj.weight" => {
                        permute(m.kv_heads);
                        "attn_k"
                    }
                    "self_attn.v_proj.weight" => "attn_v",
                    "self_attn.o_proj.weight" => "attn_output",
                    "self_attn.q_norm.weight" => "attn_q_norm",
                    "self_attn.k_norm.weight" => "attn_k_norm",
                    "mlp.gate_proj.weight" => "ffn_gate",
                    "mlp.up_proj.weight" => "ffn_up",
                    "mlp.down_proj.weight" => "ffn_down",
                    other => panic!("unmapped {other}"),
                };
                format!("blk.{layer}.{g}.weight")
            }
        };
        if Some(gguf.as_str()) != skip {
            w.f32_tensor(&gguf, shape, &values);
        }
    }
    w.write(path)
}

fn tiny_llama_as_a_gguf_file_with_permuted_rows_reproduces_transformers_logits<B: Backend>(
    dev: &B::Device,
) {
    let dir = scratch("tiny-gguf");
    let path = tiny_llama_gguf(&dir.join("tiny.gguf"), None);
    let source = Pretrained::open(&path).unwrap();
    assert_eq!(
        (source.format(), source.label()),
        (PretrainedFormat::Gguf, "tiny".to_string())
    );
    let (model, config) = source.load_model::<B>(dev).unwrap();
    assert!(!config.tie_embeddings);
    let (ids, want) = tiny_llama_golden();
    assert_reproduces("tiny-llama (GGUF, permuted q/k)", &model, &ids, &want, dev);
    // Without undoing the permutation the logits would be far off: the test can fail.
    let (_, q) = GgufFile::open(&path)
        .unwrap()
        .read_f32("blk.0.attn_q.weight")
        .unwrap();
    assert_ne!(unpermute_rows(&q, 4, 64, 64).unwrap(), q);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn error_of<T>(r: kv_core::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn hostile_or_broken_gguf_files_are_one_line_errors_naming_the_problem<B: Backend>(
    dev: &B::Device,
) {
    let dir = scratch("bad-gguf");
    let good = tiny_llama_gguf(&dir.join("good.gguf"), None).to_path_buf();
    let bytes = std::fs::read(&good).unwrap();
    let load = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        Pretrained::open(&p).and_then(|s| s.load_model::<B>(dev))
    };
    let open = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        GgufFile::open(&p)
    };
    // Wrong magic: not recognised as a model at all.
    let mut wrong = bytes.clone();
    wrong[..4].copy_from_slice(b"GGML");
    let e = error_of(load("magic.gguf", &wrong));
    assert!(e.contains("expected a .gguf file"), "{e}");
    let e = error_of(open("magic2.gguf", &wrong));
    assert!(e.contains("wrong magic"), "{e}");
    // Truncated inside the header, and inside the tensor data.
    let e = error_of(open("header.gguf", &bytes[..40]));
    assert!(e.contains("truncated"), "{e}");
    let e = error_of(load("data.gguf", &bytes[..bytes.len() - 100]));
    assert!(e.contains("past the end of the file"), "{e}");
    // Counts and sizes that would make a naive reader allocate terabytes.
    let huge = GgufWriter::default()
        .meta(
            "tokenizer.ggml.tokens",
            GgufValue::Array(vec![GgufValue::Str("a".into())]),
        )
        .bytes();
    let mut huge_array = huge.clone();
    // The array's count sits after magic, version, counts, key, value type and element type.
    let at = 4 + 4 + 8 + 8 + 8 + "tokenizer.ggml.tokens".len() + 4 + 4;
    huge_array[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = error_of(open("array.gguf", &huge_array));
    assert!(e.contains("cannot fit"), "{e}");
    let mut huge_count = huge.clone();
    huge_count[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let e = error_of(open("count.gguf", &huge_count));
    assert!(e.contains("cannot fit"), "{e}");
    let mut huge_string = huge;
    huge_string[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let e = error_of(open("string.gguf", &huge_string));
    assert!(e.contains("only") && e.contains("remain"), "{e}");
    // A tensor whose dims overflow, and one whose extent lies past the file.
    let mut w = GgufWriter::default();
    w.tensors
        .push(("x".into(), vec![u64::MAX / 2, 4], 0, vec![0; 32]));
    let e = error_of(open("overflow.gguf", &w.bytes()));
    assert!(e.contains("overflows"), "{e}");
    let mut w = GgufWriter::default();
    w.tensors.push(("x".into(), vec![1 << 20], 0, vec![0; 32]));
    let e = error_of(open("extent.gguf", &w.bytes()));
    assert!(e.contains("past the end of the file"), "{e}");
    // An unsupported quantisation type is named when the tensor is read.
    let mut w = GgufWriter::default();
    w.tensors.push(("x".into(), vec![256], 16, vec![0; 66]));
    let p = dir.join("iq.gguf");
    w.write(&p);
    let e = error_of(GgufFile::open(&p).unwrap().read_f32("x"));
    assert!(e.contains("IQ2_XXS") && e.contains("supported"), "{e}");
    // A missing tensor, and a config whose head counts do not divide.
    let e = error_of(load(
        "missing.gguf",
        &std::fs::read(tiny_llama_gguf(
            &dir.join("m.gguf"),
            Some("blk.1.ffn_up.weight"),
        ))
        .unwrap(),
    ));
    assert!(
        e.contains("no tensor model.layers.1.mlp.up_proj.weight"),
        "{e}"
    );
    let mut w = GgufWriter::default()
        .meta("general.architecture", GgufValue::Str("llama".into()))
        .meta("llama.block_count", GgufValue::U32(2))
        .meta("llama.embedding_length", GgufValue::U32(64))
        .meta("llama.feed_forward_length", GgufValue::U32(128))
        .meta("llama.attention.head_count", GgufValue::U32(4))
        .meta("llama.attention.head_count_kv", GgufValue::U32(3))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(1e-6),
        );
    w.f32_tensor("token_embd.weight", &[256, 64], &vec![0.0; 256 * 64]);
    let e = error_of(load("heads.gguf", &w.bytes()));
    assert!(e.contains("kv_heads = 3") && e.contains("divisor"), "{e}");
    let w = GgufWriter::default().meta("general.architecture", GgufValue::Str("mamba".into()));
    let e = error_of(load("arch.gguf", &w.bytes()));
    assert!(e.contains("mamba") && e.contains("llama"), "{e}");
    // Every message is one line.
    std::fs::remove_dir_all(&dir).unwrap();
}

fn broken_hugging_face_folders_are_errors_naming_the_problem<B: Backend>(dev: &B::Device) {
    let dir = scratch("bad-hf");
    let copy = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(testdata("tiny-llama").join(f), d.join(f)).unwrap();
        }
        d
    };
    let d = copy("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = error_of(Pretrained::open(&d).unwrap().load_model::<B>(dev));
    assert!(e.contains("safetensors"), "{e}");
    let d = copy("header");
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &bad).unwrap();
    let e = error_of(Pretrained::open(&d).unwrap().load_model::<B>(dev));
    assert!(e.contains("header of"), "{e}");
    let d = copy("arch");
    let config = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"gpt_neox\"")
        .replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
    std::fs::write(d.join("config.json"), config).unwrap();
    let e = error_of(Pretrained::open(&d).unwrap().config());
    assert!(e.contains("gpt_neox") && e.contains("qwen2"), "{e}");
    let d = copy("scaling");
    let config = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}",
        );
    std::fs::write(d.join("config.json"), config).unwrap();
    let e = error_of(Pretrained::open(&d).unwrap().config());
    assert!(e.contains("yarn"), "{e}");
    let e = error_of(Pretrained::open(dir.join("nothing")));
    assert!(e.contains("no such model"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- SmolLM2-135M-Instruct, the real model -----------------------------------------------------

/// The fetched SmolLM2 GGUF; a missing file fails the test with how to fetch it.
fn smollm2() -> PathBuf {
    let path = assets_dir().join(SMOLLM2_FILE);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-assets.sh (the SmolLM2 tests need the real model)",
        path.display()
    );
    path
}

#[test]
fn smollm2_config_comes_from_the_gguf_metadata() {
    let config = Pretrained::open(smollm2()).unwrap().config().unwrap();
    assert_eq!(
        (
            config.vocab_size,
            config.d_model,
            config.n_layers,
            config.n_heads,
            config.n_kv_heads,
            config.ffn_hidden
        ),
        (49152, 576, 30, 9, 3, 1536)
    );
    assert_eq!(
        (
            config.head_dim(),
            config.rope_theta,
            config.tie_embeddings,
            config.max_positions
        ),
        (64, 100000.0, true, 8192)
    );
    assert!((config.norm_eps - 1e-5).abs() < 1e-10);
}

fn smollm2_logits_match_transformers_on_the_golden_cases<B: Backend>(dev: &B::Device) {
    let (model, _) = Pretrained::open(smollm2())
        .unwrap()
        .load_model::<B>(dev)
        .unwrap();
    let all = read_safetensors(&testdata("smollm2-golden.safetensors"));
    for case in ["short", "long"] {
        let ids = i64s(&tensor_named(&all, &format!("{case}.input_ids")).1);
        let positions = i64s(&tensor_named(&all, &format!("{case}.full_positions")).1);
        let rows = f32s(&tensor_named(&all, &format!("{case}.full_logits")).1);
        let top = i64s(&tensor_named(&all, &format!("{case}.top32_ids")).1);
        let logits = logits_of(&model, &ids);
        let v = 49152;
        let mut worst = 0.0f32;
        for (k, &p) in positions.iter().enumerate() {
            let p = p as usize;
            worst = worst.max(max_abs_diff(
                &logits[p * v..(p + 1) * v],
                &rows[k * v..(k + 1) * v],
            ));
        }
        // The CLI's CPU prefill: a cached prefill whose attention runs on the host kernel.
        let x = Tensor::<B, 1, Int>::from_ints(
            ids.iter().map(|&i| i as i32).collect::<Vec<_>>().as_slice(),
            dev,
        )
        .reshape([1, ids.len()]);
        let prefilled: Vec<f32> = kv_attention::with_host_kernels(true, || {
            model
                .forward_cached(x, &mut model.new_state(1))
                .unwrap()
                .into_data()
                .iter::<f32>()
                .collect()
        });
        let mut worst_host = 0.0f32;
        for (k, &p) in positions.iter().enumerate() {
            let p = p as usize;
            worst_host = worst_host.max(max_abs_diff(
                &prefilled[p * v..(p + 1) * v],
                &rows[k * v..(k + 1) * v],
            ));
        }
        assert!(
            worst_host <= 5e-3,
            "{case}, host kernel prefill: max abs diff {worst_host}"
        );
        let mut mismatches = vec![];
        for p in 0..ids.len() {
            let row = &logits[p * v..(p + 1) * v];
            let ours = crate::model::sampling::argmax(row) as i64;
            if ours != top[p * 32] {
                mismatches.push((p, ours, top[p * 32]));
            }
        }
        eprintln!(
            "smollm2 {case} ({} tokens): max abs logit diff {worst:.2e} over the recorded rows ({worst_host:.2e} with a host-kernel prefill); top-1 mismatches {mismatches:?}",
            ids.len()
        );
        assert!(worst <= 5e-3, "{case}: max abs diff {worst}");
        assert!(
            mismatches.is_empty(),
            "{case}: top-1 differs from transformers at {mismatches:?}"
        );
    }
}

/// With the host kernels on, the loader keeps SmolLM2's Q4_1 (projections) and Q8_0 (tied head)
/// codes beside the f32 weights: they de-quantise to exactly those weights, bit for bit, and
/// decode steps through them give the f32 path's logits.
fn smollm2_packed_codes_are_the_f32_weights_and_decode_alike<B: Backend>(dev: &B::Device) {
    kv_attention::with_host_kernels(true, || smollm2_packed_codes_on_the_host_kernels::<B>(dev));
}

fn smollm2_packed_codes_on_the_host_kernels<B: Backend>(dev: &B::Device) {
    let (packed, config) = Pretrained::open(smollm2())
        .unwrap()
        .load_model::<B>(dev)
        .unwrap();
    let (d, f, kv, v) = (
        config.d_model,
        config.ffn_hidden,
        config.n_kv_heads * config.head_dim(),
        config.vocab_size,
    );
    let per_block = d * d * 2 + d * kv * 2 + d * f * 3;
    // Q4_1: 16 bytes of nibbles and two f32 per 32 values; Q8_0: 32 bytes and one f32.
    assert_eq!(
        packed.packed_weights(),
        (
            30 * per_block / 32 * 24 + v * d / 32 * 36,
            30 * per_block + v * d
        )
    );
    let bits = |t: Tensor<B, 2>| {
        t.into_data()
            .iter::<f32>()
            .map(f32::to_bits)
            .collect::<Vec<_>>()
    };
    let same = |p: &kv_attention::PackedMatrix, w: Tensor<B, 2>, what: &str| {
        assert!(
            p.dequantize().iter().map(|x| x.to_bits()).eq(bits(w)),
            "{what}: packed codes differ from the f32 weights"
        );
    };
    let blocks = packed.blocks().unwrap();
    for i in [0, 29] {
        let a = blocks[i].attention.grouped().unwrap();
        for (j, (lin, name)) in [(&a.wq, "q"), (&a.wk, "k"), (&a.wv, "v"), (&a.wo, "o")]
            .into_iter()
            .enumerate()
        {
            same(
                a.packed.get(j).unwrap(),
                lin.weight.val().transpose(),
                &format!("block {i} {name}"),
            );
        }
        let ffn = &blocks[i].ffn;
        for (j, lin) in [&ffn.gate, &ffn.up, &ffn.down].into_iter().enumerate() {
            same(
                ffn.packed.get(j).unwrap(),
                lin.weight.val().transpose(),
                &format!("block {i} ffn {j}"),
            );
        }
    }
    same(
        packed.packed_head.get(0).unwrap(),
        packed.embed.weight.val(),
        "tied head",
    );

    let mut plain = packed.clone();
    plain.clear_packed();
    assert_eq!(plain.packed_weights(), (0, 0));
    let prompt: Vec<i32> = (0..40).map(|i| (i * 977 + 13) % 49152).collect();
    let (mut sp, mut sf) = (packed.new_state(1), plain.new_state(1));
    let x = Tensor::<B, 1, Int>::from_ints(prompt.as_slice(), dev).reshape([1, prompt.len()]);
    let _ = packed.forward_cached(x.clone(), &mut sp).unwrap();
    let mut next = crate::model::sampling::argmax(
        &plain
            .forward_cached(x, &mut sf)
            .unwrap()
            .narrow(1, prompt.len() - 1, 1)
            .into_data()
            .iter::<f32>()
            .collect::<Vec<_>>(),
    ) as i32;
    let mut worst = 0f32;
    for step in 0..6 {
        let x = Tensor::<B, 1, Int>::from_ints([next], dev).reshape([1, 1]);
        let a: Vec<f32> = packed
            .forward_cached(x.clone(), &mut sp)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        let b: Vec<f32> = plain
            .forward_cached(x, &mut sf)
            .unwrap()
            .into_data()
            .iter::<f32>()
            .collect();
        let diff = max_abs_diff(&a, &b);
        assert!(diff <= 2e-3, "step {step}: max abs logit diff {diff}");
        assert_eq!(
            crate::model::sampling::argmax(&a),
            crate::model::sampling::argmax(&b),
            "step {step}"
        );
        worst = worst.max(diff);
        next = crate::model::sampling::argmax(&b) as i32;
    }
    // The sums run in another order, so a zero difference would mean the packed path never ran.
    assert!(
        worst > 0.0,
        "decode through the packed codes was bit-identical to the f32 path"
    );
}

#[cfg(feature = "hf-tokenizer")]
mod text {
    use super::*;
    use crate::model::generate::{GenerateConfig, generate};
    use crate::model::sampling::SamplerConfig;
    use crate::text::tokenizer::{ChatMessage, Tokenizer};
    use serde_json::Value;

    fn golden() -> Value {
        serde_json::from_str(&std::fs::read_to_string(testdata("smollm2-tokens.json")).unwrap())
            .unwrap()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn smollm2_tokenizer_from_the_gguf_encodes_and_decodes_like_transformers() {
        let tokenizer = Pretrained::open(smollm2()).unwrap().tokenizer().unwrap();
        assert_eq!(tokenizer.vocab_size(), 49152);
        let g = golden();
        for case in g["encodings"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tokenizer.encode(text).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{text:?}");
            assert_eq!(tokenizer.decode(&got).unwrap(), text);
        }
        assert_eq!(tokenizer.stop_tokens(), vec![2]);
        assert!(tokenizer.prompt_prefix().is_empty(), "SmolLM2 adds no BOS");
    }

    fn smollm2_chat_prompt_and_greedy_answer_match_transformers<B: Backend>(dev: &B::Device) {
        let source = Pretrained::open(smollm2()).unwrap();
        let pretrained = source.load::<B>(dev).unwrap();
        let g = golden();
        let greedy = &g["greedy"];
        let messages: Vec<ChatMessage> =
            serde_json::from_value(greedy["messages"].clone()).unwrap();
        let prompt = pretrained.tokenizer.render_chat(&messages, true).unwrap();
        let prompt_ids = pretrained.tokenizer.encode(&prompt).unwrap();
        assert_eq!(prompt_ids, ids(&greedy["prompt_ids"]));
        let config = GenerateConfig {
            max_new_tokens: 32,
            sampler: SamplerConfig::default(),
            stop_tokens: pretrained.tokenizer.stop_tokens(),
            ..Default::default()
        };
        let out = generate(
            &pretrained.model,
            &prompt_ids,
            &config,
            &mut kv_policies::FullCache,
            |_| {},
        )
        .unwrap();
        assert_eq!(out.tokens, ids(&greedy["generated_ids"]));
        assert_eq!(
            pretrained.tokenizer.decode(&out.tokens).unwrap(),
            greedy["generated_text"].as_str().unwrap()
        );
    }

    /// The SmolLM2 file's tokenizer metadata, written into a small GGUF with `change` applied.
    fn tokenizer_gguf(
        dir: &Path,
        name: &str,
        change: impl FnOnce(&mut std::collections::BTreeMap<String, GgufValue>),
    ) -> PathBuf {
        let file = GgufFile::open(smollm2()).unwrap();
        let mut meta: std::collections::BTreeMap<String, GgufValue> = file
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        change(&mut meta);
        let w = GgufWriter {
            kv: meta.into_iter().collect(),
            ..Default::default()
        };
        w.write(&dir.join(name))
    }

    #[test]
    fn gguf_tokenizers_without_merges_or_of_unknown_kinds_are_errors() {
        let dir = scratch("bad-tokenizer");
        let tok = |p: PathBuf| {
            let file = GgufFile::open(&p).unwrap();
            super::super::gguf_vocab::tokenizer_json(&file).map(|_| ())
        };
        let e = error_of(tok(tokenizer_gguf(&dir, "merges.gguf", |m| {
            m.remove("tokenizer.ggml.merges");
        })));
        assert!(e.contains("merges"), "{e}");
        let e = error_of(tok(tokenizer_gguf(&dir, "pre.gguf", |m| {
            m.insert(
                "tokenizer.ggml.pre".into(),
                GgufValue::Str("klingon".into()),
            );
        })));
        assert!(e.contains("klingon") && e.contains("smollm"), "{e}");
        let e = error_of(tok(tokenizer_gguf(&dir, "spm.gguf", |m| {
            m.insert(
                "tokenizer.ggml.model".into(),
                GgufValue::Str("llama".into()),
            );
        })));
        assert!(e.contains("gpt2"), "{e}");
        let e = error_of(tok(tokenizer_gguf(&dir, "bos.gguf", |m| {
            m.insert(
                "tokenizer.ggml.bos_token_id".into(),
                GgufValue::U32(1 << 20),
            );
        })));
        assert!(e.contains("bos_token_id"), "{e}");
        // Built with BOS, the tokenizer adds it to plain prompts and keeps the chat's own.
        let p = tokenizer_gguf(&dir, "add-bos.gguf", |m| {
            m.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
        });
        let file = GgufFile::open(&p).unwrap();
        let (json, text) = super::super::gguf_vocab::tokenizer_json(&file).unwrap();
        let t = Tokenizer::from_parts(&json, text).unwrap();
        assert_eq!(t.encode_prompt("Hello").unwrap(), vec![1, 19556]);
        assert_eq!(t.encode("Hello").unwrap(), vec![19556]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_known_pre_tokenizer_builds_a_working_tokenizer() {
        let dir = scratch("pre-tokenizers");
        for pre in super::super::gguf_vocab::PRE_TOKENIZERS.split(", ") {
            let p = tokenizer_gguf(&dir, &format!("{pre}.gguf"), |m| {
                m.insert("tokenizer.ggml.pre".into(), GgufValue::Str(pre.into()));
            });
            let file = GgufFile::open(&p).unwrap();
            let (json, text) = super::super::gguf_vocab::tokenizer_json(&file).unwrap();
            let t = Tokenizer::from_parts(&json, text).unwrap();
            let s = "Hello world 12345, it's ok";
            assert_eq!(t.decode(&t.encode(s).unwrap()).unwrap(), s, "{pre}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    kv_core::backend_tests!(smollm2_chat_prompt_and_greedy_answer_match_transformers);

    #[test]
    fn a_run_folder_keeps_the_tokenizer_and_its_chat_settings() {
        let dir = scratch("run-text");
        let tokenizer = Pretrained::open(smollm2()).unwrap().tokenizer().unwrap();
        tokenizer.save_to_run(&dir).unwrap();
        let back = Tokenizer::for_run(&dir).unwrap();
        assert_eq!(back.text_config(), tokenizer.text_config());
        assert_eq!(back.stop_tokens(), vec![2]);
        let m = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            back.render_chat(&m, true).unwrap(),
            tokenizer.render_chat(&m, true).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn transposes_and_unpermutes_are_what_they_say() {
    assert_eq!(
        transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
        vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
    );
    // One head of 4 rows: GGUF rows [0, 1, 2, 3] hold HF rows [0, 2, 1, 3].
    assert_eq!(
        unpermute_rows(&[10.0, 12.0, 11.0, 13.0], 1, 4, 1).unwrap(),
        vec![10.0, 11.0, 12.0, 13.0]
    );
    let v: Vec<f32> = (0..48).map(|i| i as f32).collect();
    assert_eq!(
        unpermute_rows(&permute_rows(&v, 3, 12, 4), 3, 12, 4).unwrap(),
        v
    );
    assert!(unpermute_rows(&v, 5, 12, 4).is_none());
}

kv_core::backend_tests!(
    tiny_llama_from_its_hugging_face_folder_reproduces_transformers_logits,
    tiny_qwen3_reproduces_transformers_logits_from_its_folder_and_as_gguf,
    tiny_llama_as_a_gguf_file_with_permuted_rows_reproduces_transformers_logits,
    hostile_or_broken_gguf_files_are_one_line_errors_naming_the_problem,
    broken_hugging_face_folders_are_errors_naming_the_problem,
    smollm2_logits_match_transformers_on_the_golden_cases,
    smollm2_packed_codes_are_the_f32_weights_and_decode_alike,
);
