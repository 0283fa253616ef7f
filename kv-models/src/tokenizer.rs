//! Text to token ids and back: bytes by default (no files), a Hugging Face `tokenizer.json` as an
//! option (feature `hf-tokenizer`, which builds the `tokenizers` crate and its C regex library).

use kv_core::{KvError, Result};
use std::path::Path;

/// Byte-level tokenizer: every byte is a token (vocab 256), so it needs no files.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Vocabulary size.
    pub const VOCAB: usize = 256;

    /// The UTF-8 bytes of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    /// Text from token ids; ids above 255 and invalid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().map(|&i| u8::try_from(i).unwrap_or(b'?')).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// File name of a run's tokenizer, copied beside its checkpoint so the run is self-contained.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The tokenizer a model reads and writes text with.
#[derive(Clone, Default)]
pub enum Tokenizer {
    /// Every byte is a token ([`ByteTokenizer`]).
    #[default]
    Bytes,
    /// A Hugging Face tokenizer and the JSON it was loaded from.
    #[cfg(feature = "hf-tokenizer")]
    Hf(std::sync::Arc<(tokenizers::Tokenizer, String)>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({}, vocab {})", self.name(), self.vocab_size())
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
        Self::from_json(&json).map_err(|e| match e {
            KvError::InvalidConfig { expected, .. } => KvError::io(path, expected),
            other => other,
        })
    }

    /// Parses the contents of a Hugging Face `tokenizer.json`.
    #[cfg(feature = "hf-tokenizer")]
    pub fn from_json(json: &str) -> Result<Self> {
        let t = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| KvError::config("tokenizer.json", "unreadable", format!("a Hugging Face tokenizer file: {e}")))?;
        Ok(Tokenizer::Hf(std::sync::Arc::new((t, json.to_string()))))
    }

    /// Parses the contents of a Hugging Face `tokenizer.json` (not compiled into this build).
    #[cfg(not(feature = "hf-tokenizer"))]
    pub fn from_json(_json: &str) -> Result<Self> {
        Err(KvError::config("tokenizer", "tokenizer.json", "the byte tokenizer: this build lacks the hf-tokenizer feature (cargo build --features hf-tokenizer)"))
    }

    /// The tokenizer of a run folder: its `tokenizer.json` if it has one, bytes otherwise.
    pub fn for_run(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if path.is_file() { Self::from_file(&path) } else { Ok(Tokenizer::Bytes) }
    }

    /// Writes a Hugging Face tokenizer into a run folder (atomically); the byte tokenizer needs
    /// no file.
    #[cfg_attr(not(feature = "hf-tokenizer"), allow(unused_variables))]
    pub fn save_to_run(&self, dir: &Path) -> Result<()> {
        match self {
            Tokenizer::Bytes => Ok(()),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => crate::write_atomic(&dir.join(TOKENIZER_FILE), t.1.as_bytes()),
        }
    }

    /// `bytes` or `hf`.
    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(_) => "hf",
        }
    }

    /// Whether every byte is one token (task contexts are then exact token counts).
    pub fn is_bytes(&self) -> bool {
        matches!(self, Tokenizer::Bytes)
    }

    /// Ids the tokenizer can produce (the model's `vocab_size` must be at least this).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => ByteTokenizer::VOCAB,
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t.0.get_vocab_size(true),
        }
    }

    /// Token ids of `text`, without special tokens (prompts and answers are encoded apart and
    /// joined, so nothing may be added around them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.encode(text)),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t
                .0
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| KvError::config("text to encode", format!("{} bytes", text.len()), format!("text the tokenizer accepts: {e}"))),
        }
    }

    /// Text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.decode(ids)),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t
                .0
                .decode(ids, false)
                .map_err(|e| KvError::config("token ids", format!("{ids:?}"), format!("ids below the vocabulary of {}: {e}", self.vocab_size()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let t = ByteTokenizer;
        let ids = t.encode("héllo, 42");
        assert_eq!(ids.len(), 10);
        assert_eq!(t.decode(&ids), "héllo, 42");
        let t = Tokenizer::default();
        assert_eq!(t.decode(&t.encode("héllo, 42").unwrap()).unwrap(), "héllo, 42");
        assert_eq!((t.vocab_size(), t.name()), (256, "bytes"));
    }

    #[test]
    fn a_run_without_a_tokenizer_file_reads_bytes_and_a_bad_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("kv-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Tokenizer::for_run(&dir).unwrap().is_bytes());
        std::fs::write(dir.join(TOKENIZER_FILE), "{ not json").unwrap();
        let e = Tokenizer::for_run(&dir).unwrap_err().to_string();
        assert!(e.contains(TOKENIZER_FILE), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A word-level tokenizer.json small enough to write inline: every test below runs offline.
    #[cfg(feature = "hf-tokenizer")]
    pub(crate) const WORD_LEVEL: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null,
      "decoder": null,
      "model": {"type": "WordLevel", "unk_token": "[UNK]",
                "vocab": {"[UNK]": 0, "the": 1, "pass": 2, "key": 3, "is": 4, "12345": 5, ".": 6}}
    }"#;

    #[cfg(feature = "hf-tokenizer")]
    #[test]
    fn hugging_face_tokenizers_encode_decode_and_travel_with_a_run() {
        let t = Tokenizer::from_json(WORD_LEVEL).unwrap();
        assert_eq!((t.name(), t.vocab_size()), ("hf", 7));
        let ids = t.encode("the pass key is 12345.").unwrap();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(t.encode("the cat").unwrap(), vec![1, 0]);
        assert!(t.decode(&ids).unwrap().starts_with("the pass key is 12345"));
        let dir = std::env::temp_dir().join(format!("kv-tok-hf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        t.save_to_run(&dir).unwrap();
        let back = Tokenizer::for_run(&dir).unwrap();
        assert_eq!(back.encode("the pass key is 12345.").unwrap(), ids);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(not(feature = "hf-tokenizer"))]
    #[test]
    fn without_the_feature_a_tokenizer_file_says_how_to_get_it() {
        let e = Tokenizer::from_json("{}").unwrap_err().to_string();
        assert!(e.contains("--features hf-tokenizer"), "{e}");
    }
}
