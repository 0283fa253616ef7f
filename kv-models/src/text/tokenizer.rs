//! Text to token ids and back: bytes by default (no files), a Hugging Face `tokenizer.json` as an
//! option (feature `hf-tokenizer`, which builds the `tokenizers` crate and its C regex library).

use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};
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
        let bytes: Vec<u8> = ids
            .iter()
            .map(|&i| u8::try_from(i).unwrap_or(b'?'))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// File name of a run's tokenizer, copied beside its checkpoint so the run is self-contained.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of a tokenizer's text settings (chat template, BOS/EOS), beside `tokenizer.json` as
/// in a Hugging Face model folder.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// How a model's text is framed: the fields of Hugging Face's `tokenizer_config.json` that
/// generation needs, plus the ids that end a turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// The Jinja chat template (`chat_template`), if the model has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The BOS token's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    /// The EOS token's text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    /// Whether a plain prompt starts with the BOS token.
    #[serde(default)]
    pub add_bos_token: bool,
    /// Tokens that end a generation (EOS, end of turn).
    #[serde(default)]
    pub stop_token_ids: Vec<u32>,
}

impl TextConfig {
    /// Reads the text settings from a Hugging Face `tokenizer_config.json` (whose `bos_token` and
    /// `eos_token` may be strings or `{"content": ..}` objects, and whose `chat_template` may be a
    /// list of named templates).
    pub fn from_json(text: &str, origin: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| KvError::io(origin, format!("not JSON: {e}")))?;
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            None => None,
        };
        let chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(named.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            None | Some(serde_json::Value::Null) => None,
            Some(other) => {
                return Err(KvError::io(
                    origin,
                    format!(
                        "chat_template = {other} is neither Jinja text nor a list of named templates"
                    ),
                ));
            }
        };
        let stop_token_ids = match v.get("stop_token_ids") {
            Some(ids) => serde_json::from_value(ids.clone())
                .map_err(|e| KvError::io(origin, format!("stop_token_ids: {e}")))?,
            None => vec![],
        };
        Ok(Self {
            chat_template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            add_bos_token: v
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            stop_token_ids,
        })
    }
}

/// One message of a chat, as chat templates read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A Hugging Face tokenizer with the JSON it came from and its text settings.
#[cfg(feature = "hf-tokenizer")]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    json: String,
    text: TextConfig,
    /// Ids of `text.bos_token` etc., resolved once.
    bos_id: Option<u32>,
    stop_ids: Vec<u32>,
    /// FastGen's token classes, computed on first use (one decode per vocabulary entry).
    classes: std::sync::OnceLock<std::sync::Arc<kv_policies::TokenClasses>>,
}

/// The tokenizer a model reads and writes text with, and how its text is framed.
#[derive(Clone, Default)]
pub enum Tokenizer {
    /// Every byte is a token ([`ByteTokenizer`]).
    #[default]
    Bytes,
    /// A Hugging Face tokenizer (from `tokenizer.json` or built from a GGUF file).
    #[cfg(feature = "hf-tokenizer")]
    Hf(std::sync::Arc<HfTokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({}, vocab {})", self.name(), self.vocab_size())
    }
}

#[cfg(not(feature = "hf-tokenizer"))]
fn without_feature() -> KvError {
    KvError::config(
        "tokenizer",
        "tokenizer.json",
        "the byte tokenizer: this build lacks the hf-tokenizer feature (cargo build --features hf-tokenizer)",
    )
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`, with the `tokenizer_config.json` beside it if any.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
        let config = path.with_file_name(TOKENIZER_CONFIG_FILE);
        let text = if config.is_file() {
            TextConfig::from_json(
                &std::fs::read_to_string(&config).map_err(|e| KvError::io(&config, e))?,
                &config,
            )?
        } else {
            TextConfig::default()
        };
        Self::from_parts(&json, text).map_err(|e| match e {
            KvError::InvalidConfig { expected, .. } => KvError::io(path, expected),
            other => other,
        })
    }

    /// Parses the contents of a Hugging Face `tokenizer.json` (no text settings).
    pub fn from_json(json: &str) -> Result<Self> {
        Self::from_parts(json, TextConfig::default())
    }

    /// A tokenizer from `tokenizer.json` contents and text settings; the settings' tokens must
    /// be in the vocabulary.
    #[cfg(feature = "hf-tokenizer")]
    pub fn from_parts(json: &str, text: TextConfig) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes()).map_err(|e| {
            KvError::config(
                "tokenizer.json",
                "unreadable",
                format!("a Hugging Face tokenizer file: {e}"),
            )
        })?;
        let id = |what: &str, t: &Option<String>| -> Result<Option<u32>> {
            match t {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    KvError::config(what, t, "a token of the tokenizer's vocabulary")
                }),
            }
        };
        let bos_id = id("bos_token", &text.bos_token)?;
        let mut stop_ids = text.stop_token_ids.clone();
        if let Some(eos) = id("eos_token", &text.eos_token)?
            && !stop_ids.contains(&eos)
        {
            stop_ids.push(eos);
        }
        let vocab = inner.get_vocab_size(true) as u32;
        if let Some(bad) = stop_ids.iter().find(|&&s| s >= vocab) {
            return Err(KvError::config(
                "stop_token_ids",
                bad,
                format!("ids below the vocabulary of {vocab}"),
            ));
        }
        if text.add_bos_token && bos_id.is_none() {
            return Err(KvError::config(
                "add_bos_token",
                true,
                "false, or a bos_token to add",
            ));
        }
        Ok(Tokenizer::Hf(std::sync::Arc::new(HfTokenizer {
            inner,
            json: json.to_string(),
            text,
            bos_id,
            stop_ids,
            classes: Default::default(),
        })))
    }

    /// A tokenizer from `tokenizer.json` contents (not compiled into this build).
    #[cfg(not(feature = "hf-tokenizer"))]
    pub fn from_parts(_json: &str, _text: TextConfig) -> Result<Self> {
        Err(without_feature())
    }

    /// The tokenizer of a run folder: its `tokenizer.json` if it has one, bytes otherwise.
    pub fn for_run(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if path.is_file() {
            Self::from_file(&path)
        } else {
            Ok(Tokenizer::Bytes)
        }
    }

    /// Writes a Hugging Face tokenizer (and its text settings, if any) into a run folder
    /// (atomically); the byte tokenizer needs no file.
    #[cfg_attr(not(feature = "hf-tokenizer"), allow(unused_variables))]
    pub fn save_to_run(&self, dir: &Path) -> Result<()> {
        match self {
            Tokenizer::Bytes => Ok(()),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => {
                crate::train::checkpoint::write_atomic(
                    &dir.join(TOKENIZER_FILE),
                    t.json.as_bytes(),
                )?;
                if t.text != TextConfig::default() {
                    let config =
                        serde_json::to_vec_pretty(&t.text).map_err(|e| KvError::io(dir, e))?;
                    crate::train::checkpoint::write_atomic(
                        &dir.join(TOKENIZER_CONFIG_FILE),
                        &config,
                    )?;
                }
                Ok(())
            }
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
            Tokenizer::Hf(t) => t.inner.get_vocab_size(true),
        }
    }

    /// The text settings (default for the byte tokenizer).
    pub fn text_config(&self) -> TextConfig {
        match self {
            Tokenizer::Bytes => TextConfig::default(),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t.text.clone(),
        }
    }

    /// Token ids of `text`, without special tokens added (prompts and answers are encoded apart
    /// and joined, so nothing may be added around them); special tokens written in the text
    /// (`<|im_start|>`) are still recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.encode(text)),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t
                .inner
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| {
                    KvError::config(
                        "text to encode",
                        format!("{} bytes", text.len()),
                        format!("text the tokenizer accepts: {e}"),
                    )
                }),
        }
    }

    /// The ids a plain prompt starts with: BOS when the model's text settings add it.
    pub fn prompt_prefix(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => vec![],
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t
                .bos_id
                .filter(|_| t.text.add_bos_token)
                .into_iter()
                .collect(),
        }
    }

    /// [`prompt_prefix`](Self::prompt_prefix) followed by the ids of `text`: how a plain prompt
    /// reaches the model.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.prompt_prefix();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Whether the tokenizer's own post-processor (as `tokenizer.json` defines it) starts every
    /// encoding with the BOS token, as Llama 3's does.
    pub(crate) fn post_processor_adds_bos(&self) -> bool {
        match self {
            Tokenizer::Bytes => false,
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t.bos_id.is_some_and(|b| {
                t.inner
                    .encode("a", true)
                    .is_ok_and(|e| e.get_ids().first() == Some(&b))
            }),
        }
    }

    /// FastGen's token classes: special tokens (added tokens marked special, BOS and the stop
    /// tokens; control bytes for the byte tokenizer) and punctuation (tokens whose text is only
    /// punctuation and whitespace), computed once per tokenizer.
    pub fn token_classes(&self) -> std::sync::Arc<kv_policies::TokenClasses> {
        match self {
            Tokenizer::Bytes => std::sync::Arc::new(kv_policies::TokenClasses::bytes()),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t
                .classes
                .get_or_init(|| {
                    let vocab = self.vocab_size();
                    let mut special: Vec<u32> = t
                        .inner
                        .get_added_tokens_decoder()
                        .iter()
                        .filter(|(_, a)| a.special)
                        .map(|(id, _)| *id)
                        .collect();
                    special.extend(t.bos_id);
                    special.extend(&t.stop_ids);
                    let texts: Vec<(u32, String)> = (0..vocab as u32)
                        .filter_map(|id| t.inner.decode(&[id], false).ok().map(|s| (id, s)))
                        .collect();
                    std::sync::Arc::new(kv_policies::TokenClasses::from_texts(
                        vocab,
                        texts.iter().map(|(i, s)| (*i, s.as_str())),
                        special,
                    ))
                })
                .clone(),
        }
    }

    /// What policies built for this tokenizer's model need from it (FastGen's token classes).
    pub fn policy_env(&self) -> kv_policies::PolicyEnv {
        kv_policies::PolicyEnv {
            token_classes: Some(self.token_classes()),
        }
    }

    /// Tokens after which generation stops (EOS, end of turn); none for the byte tokenizer.
    pub fn stop_tokens(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes => vec![],
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t.stop_ids.clone(),
        }
    }

    /// Text of token ids, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => Ok(ByteTokenizer.decode(ids)),
            #[cfg(feature = "hf-tokenizer")]
            Tokenizer::Hf(t) => t.inner.decode(ids, false).map_err(|e| {
                KvError::config(
                    "token ids",
                    format!("{ids:?}"),
                    format!("ids below the vocabulary of {}: {e}", self.vocab_size()),
                )
            }),
        }
    }

    /// The model's chat template applied to `messages` (as Hugging Face's `apply_chat_template`
    /// renders it), ending with the assistant's turn opened when `add_generation_prompt`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let text = self.text_config();
        let template = text.chat_template.as_deref().ok_or_else(|| {
            KvError::config("chat template", "none", "a model whose tokenizer config or GGUF file has a chat_template (use --prompt for plain text)")
        })?;
        crate::text::chat::render(template, messages, add_generation_prompt, &text)
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
        assert_eq!(
            t.decode(&t.encode("héllo, 42").unwrap()).unwrap(),
            "héllo, 42"
        );
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
