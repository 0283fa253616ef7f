//! A Hugging Face `tokenizer.json` built from a GGUF file's `tokenizer.ggml.*` metadata (GPT-2
//! style byte-level BPE), with the pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, and the
//! text settings (BOS, stop tokens, chat template) of the same file.

use super::gguf::{GgufFile, GgufValue};
use crate::text::tokenizer::TextConfig;
use kv_core::{KvError, Result};
use serde_json::{Value, json};

/// llama.cpp's token types (`tokenizer.ggml.token_type`) that are matched whole in text.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The pre-tokenizers of the `tokenizer.ggml.pre` names this builder knows, as llama.cpp splits
/// text for each (llama-vocab.cpp), in Hugging Face's terms.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // Digits one by one, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]})
        }
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        _ => return None,
    })
}

/// The `tokenizer.ggml.pre` values [`tokenizer_json`] accepts.
pub(crate) const PRE_TOKENIZERS: &str = "default, gpt2, smollm, starcoder, refact, command-r, codeshell, exaone, minerva, llama-bpe, qwen2";

fn strings<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    let bad = || {
        KvError::io(
            file.path(),
            format!("GGUF metadata {key} is not an array of strings"),
        )
    };
    file.require(key)?
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_str().ok_or_else(bad))
        .collect()
}

fn token_id(file: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    let Some(v) = file.get(key) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
        _ => Err(KvError::io(
            file.path(),
            format!(
                "GGUF metadata {key} = {v:?} is not a token id below the vocabulary of {vocab}"
            ),
        )),
    }
}

/// The tokenizer.json of a GGUF file's vocabulary and merges, and its text settings.
pub(crate) fn tokenizer_json(file: &GgufFile) -> Result<(String, TextConfig)> {
    let bad = |m: String| KvError::io(file.path(), m);
    let model = file
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("none");
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer.ggml.model {model:?} (only gpt2-style byte-level BPE tokenizers are built from GGUF)"
        )));
    }
    let tokens = strings(file, "tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(bad("tokenizer.ggml.tokens is empty".into()));
    }
    let merges = match file.get("tokenizer.ggml.merges") {
        Some(_) => strings(file, "tokenizer.ggml.merges")?,
        None => vec![],
    };
    if merges.is_empty() {
        return Err(bad(
            "tokenizer.ggml.merges is missing or empty: a BPE tokenizer needs its merges".into(),
        ));
    }
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(GgufValue::as_i64).collect::<Option<Vec<_>>>())
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                bad(format!(
                    "tokenizer.ggml.token_type is not {} integers",
                    tokens.len()
                ))
            })?,
    };
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let pre_tokenizer =
        pre_tokenizer(pre).ok_or_else(|| bad(format!("tokenizer.ggml.pre {pre:?} is not a pre-tokenizer this builder knows ({PRE_TOKENIZERS})")))?;
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if vocab.insert(t.to_string(), json!(id)).is_some() {
            return Err(bad(format!(
                "token {t:?} appears twice in tokenizer.ggml.tokens (second at id {id})"
            )));
        }
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for m in &merges {
        // llama.cpp splits a merge at the first space after its first character.
        let cut = m
            .char_indices()
            .skip(1)
            .find(|(_, c)| *c == ' ')
            .map(|(i, _)| i);
        let Some(i) = cut else {
            return Err(bad(format!(
                "merge {m:?} is not two tokens separated by a space"
            )));
        };
        pairs.push(json!([&m[..i], &m[i + 1..]]));
    }
    let added: Vec<Value> = (0..tokens.len())
        .filter(|&i| types[i] == CONTROL || types[i] == USER_DEFINED)
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == CONTROL})
        })
        .collect();
    let n = tokens.len();
    let bos = token_id(file, "tokenizer.ggml.bos_token_id", n)?;
    let eos = token_id(file, "tokenizer.ggml.eos_token_id", n)?;
    let eot = token_id(file, "tokenizer.ggml.eot_token_id", n)?;
    let eom = token_id(file, "tokenizer.ggml.eom_token_id", n)?;
    let add_bos = file
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(false)
        && bos.is_some();
    let post_processor = match bos.filter(|_| add_bos) {
        Some(b) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[b as usize], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[b as usize], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[b as usize]: {"id": tokens[b as usize], "ids": [b], "tokens": [tokens[b as usize]]}}}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
        }
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": matches!(pre, "llama-bpe" | "llama3"),
                  "vocab": vocab, "merges": pairs}
    });
    let mut stop: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
    stop.dedup();
    let chat_template = match file.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(v.as_str().map(str::to_string).ok_or_else(|| {
            bad(format!(
                "tokenizer.chat_template is a GGUF {}, not a string of Jinja text",
                v.type_name()
            ))
        })?),
    };
    let text = TextConfig {
        chat_template,
        bos_token: bos.map(|b| tokens[b as usize].to_string()),
        eos_token: eos.map(|e| tokens[e as usize].to_string()),
        add_bos_token: add_bos,
        stop_token_ids: stop,
    };
    Ok((tokenizer.to_string(), text))
}
