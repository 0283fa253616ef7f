//! Training and evaluation data: the embedded story corpus, user text files and long-context tasks.

mod niah;
mod stories;
mod tasks;

pub use niah::{
    ANSWER_TOKENS, DEFAULT_DEPTHS, ESSAYS_DIR, FRAME_TOKENS, Haystack, NiahMode, NiahPrompt,
    NiahSpec, niah_prompt,
};
pub use stories::story;
pub use tasks::{TaskKind, TaskSample, exact_match};

use crate::text::tokenizer::Tokenizer;
use kv_core::{KvError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A body of tokenized text to cut training and validation windows from.
#[derive(Debug, Clone)]
pub struct Corpus {
    tokens: Vec<u32>,
}

impl Corpus {
    /// About `bytes` bytes of generated stories from `seed` (the embedded default corpus), as
    /// byte tokens.
    pub fn stories(seed: u64, bytes: usize) -> Self {
        Self::from_bytes(&Self::story_text(seed, bytes))
    }

    fn story_text(seed: u64, bytes: usize) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut text = String::with_capacity(bytes + 4096);
        while text.len() < bytes {
            let len = rng.random_range(1500..6000);
            text += &story(&mut rng, len);
        }
        text.into_bytes()
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            tokens: bytes.iter().map(|&b| u32::from(b)).collect(),
        }
    }

    /// `text` as tokens of `tokenizer` (bytes that are not UTF-8 count as U+FFFD for others).
    pub fn tokenize(text: &[u8], tokenizer: &Tokenizer) -> Result<Self> {
        if tokenizer.is_bytes() {
            return Ok(Self::from_bytes(text));
        }
        Ok(Self {
            tokens: tokenizer.encode(&String::from_utf8_lossy(text))?,
        })
    }

    /// Text from files: `.jsonl` files contribute the `"text"` field of each line, anything else
    /// is read as plain UTF-8 text. Documents are separated by blank lines. Byte tokens.
    pub fn from_files(paths: &[PathBuf]) -> Result<Self> {
        Ok(Self::from_bytes(&Self::file_text(paths)?))
    }

    fn file_text(paths: &[PathBuf]) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        for path in paths {
            let text = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
            if path.extension().is_some_and(|e| e == "jsonl") {
                for (i, line) in text
                    .lines()
                    .enumerate()
                    .filter(|(_, l)| !l.trim().is_empty())
                {
                    let doc: serde_json::Value = serde_json::from_str(line)
                        .map_err(|e| KvError::io(path, format!("line {}: not JSON: {e}", i + 1)))?;
                    let t = doc.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                        KvError::io(
                            path,
                            format!(
                                "line {}: expected an object with a \"text\" string field",
                                i + 1
                            ),
                        )
                    })?;
                    bytes.extend_from_slice(t.as_bytes());
                    bytes.extend_from_slice(b"\n\n");
                }
            } else {
                bytes.extend_from_slice(text.as_bytes());
                bytes.extend_from_slice(b"\n\n");
            }
        }
        Ok(bytes)
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the corpus is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The largest token id held (0 when empty), to check a model's vocabulary against.
    pub fn max_token(&self) -> u32 {
        self.tokens.iter().copied().max().unwrap_or(0)
    }

    /// Splits off the last `fraction` of the text for validation.
    pub fn split(mut self, fraction: f32) -> (Corpus, Corpus) {
        let at = ((self.tokens.len() as f64) * (1.0 - fraction as f64)) as usize;
        let valid = self.tokens.split_off(at);
        (self, Corpus { tokens: valid })
    }

    /// A random window of `len` tokens.
    pub fn window(&self, rng: &mut impl Rng, len: usize) -> Result<Vec<u32>> {
        if self.tokens.len() < len {
            return Err(KvError::config(
                "corpus size",
                format!("{} tokens", self.tokens.len()),
                format!("at least one window of {len} tokens"),
            ));
        }
        let start = rng.random_range(0..=self.tokens.len() - len);
        Ok(self.tokens[start..start + len].to_vec())
    }

    /// Consecutive, non-overlapping windows of `len` tokens from the start (for validation).
    pub fn windows(&self, len: usize, count: usize) -> Vec<Vec<u32>> {
        self.tokens
            .chunks_exact(len)
            .take(count)
            .map(<[u32]>::to_vec)
            .collect()
    }
}

/// Where training text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextSource {
    /// The generated story corpus (about 4 MB), seeded.
    Stories,
    /// Plain text or JSONL files.
    Files(Vec<PathBuf>),
}

impl TextSource {
    /// Loads the training and validation corpora as byte tokens (the last 5% is validation).
    pub fn load(&self, seed: u64) -> Result<(Corpus, Corpus)> {
        self.load_with(seed, &Tokenizer::Bytes)
    }

    /// Loads the training and validation corpora as tokens of `tokenizer`.
    pub fn load_with(&self, seed: u64, tokenizer: &Tokenizer) -> Result<(Corpus, Corpus)> {
        match self {
            TextSource::Stories => Ok((
                Corpus::tokenize(&Corpus::story_text(seed, 4 << 20), tokenizer)?,
                Corpus::tokenize(
                    &Corpus::story_text(seed ^ 0x5eed_7a11, 256 << 10),
                    tokenizer,
                )?,
            )),
            TextSource::Files(paths) => {
                let corpus = Corpus::tokenize(&Corpus::file_text(paths)?, tokenizer)?;
                if corpus.is_empty() {
                    let names: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
                    return Err(KvError::config(
                        "data files",
                        names.join(", "),
                        "files with some text",
                    ));
                }
                Ok(corpus.split(0.05))
            }
        }
    }
}

/// Reads `path` as a list of text files when it is a directory, or as one file.
pub fn text_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| KvError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        Ok(files)
    } else if path.is_file() {
        Ok(vec![path.to_path_buf()])
    } else if path.exists() {
        Err(KvError::io(
            path,
            "not a regular file or folder (a device, socket or pipe); expected text files or a folder of them",
        ))
    } else {
        Err(KvError::io(path, "no such file or directory"))
    }
}

/// The deterministic random stream of one (step, micro-batch) pair: resuming needs only the step.
pub fn batch_rng(seed: u64, step: usize, micro: usize) -> StdRng {
    let mix = seed
        ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (micro as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    StdRng::seed_from_u64(mix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_windows_and_files() {
        let c = Corpus::stories(1, 10_000);
        assert!(c.len() >= 10_000);
        let w = c.window(&mut StdRng::seed_from_u64(0), 100).unwrap();
        assert_eq!(w.len(), 100);
        assert!(c.window(&mut StdRng::seed_from_u64(0), 1 << 30).is_err());
        let dir = std::env::temp_dir().join(format!("kv-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), "hello world").unwrap();
        std::fs::write(
            dir.join("b.jsonl"),
            "{\"text\": \"second doc\"}\n\n{\"text\": \"third\"}\n",
        )
        .unwrap();
        let files = text_files(&dir).unwrap();
        let c = Corpus::from_files(&files).unwrap();
        let text: Vec<u8> = c.tokens.iter().map(|&t| t as u8).collect();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "hello world\n\nsecond doc\n\nthird\n\n"
        );
        std::fs::write(dir.join("c.jsonl"), "{\"body\": 1}\n").unwrap();
        let e = Corpus::from_files(&[dir.join("c.jsonl")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("\"text\""), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
