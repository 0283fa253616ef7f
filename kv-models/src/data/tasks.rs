//! Seeded long-context tasks with exact-match answers: passkey, needle in a haystack, recall,
//! copy and lookup ([`TaskKind::ALL`]).
//!
//! Every sample is byte-level text whose prompt plus answer is exactly `context` bytes (tokens), so
//! the same generator makes training sequences and evaluation prompts of a chosen length.

use super::stories::story;
use kv_core::{KvError, Result};
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};
use serde::{Deserialize, Serialize};

/// A long-context task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// A 5-digit number hidden in repetitive filler, asked for at the end.
    Passkey,
    /// A key sentence at a chosen depth of story text, asked for at the end.
    Needle,
    /// Key-value pairs, then queries of several keys; the last one is asked.
    Recall,
    /// A random string, a separator, then the same string again: the model must finish the
    /// copy. The purest induction task, used to teach copying early in training.
    Copy,
    /// Multi-query associative recall in miniature: two-letter keys with one-digit values
    /// (`ab=3 cd=7 ef=1 `), then every key asked again in a random order with its value
    /// (`ef=1 ab=3 cd=`), the last one unanswered. A content lookup that fits in a few dozen
    /// tokens and grades every query, so the length curriculum's short stage can teach the
    /// "find the cue, read what follows" circuit that passkey and recall need.
    Lookup,
}

impl TaskKind {
    /// Every task.
    pub const ALL: &[TaskKind] = &[
        TaskKind::Passkey,
        TaskKind::Needle,
        TaskKind::Recall,
        TaskKind::Copy,
        TaskKind::Lookup,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Passkey => "passkey",
            TaskKind::Needle => "needle",
            TaskKind::Recall => "recall",
            TaskKind::Copy => "copy",
            TaskKind::Lookup => "lookup",
        }
    }

    /// Parses a task name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name() == name)
            .ok_or_else(|| KvError::Unknown {
                kind: "task".into(),
                name: name.into(),
                valid: Self::ALL
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Shortest context (in bytes) this task can be generated at.
    pub fn min_context(self) -> usize {
        match self {
            TaskKind::Passkey => PASSKEY_HEADER.len() + 2 * 26 + PASSKEY_QUESTION.len() + 5 + 8,
            TaskKind::Needle => NEEDLE_HEADER.len() + 2 * 40 + 2 * 50 + 4 + 8,
            TaskKind::Recall => RECALL_HEADER.len() + 3 * 8 + 2 * 6 + 8,
            TaskKind::Copy => 2 * COPY_ANSWER + 2,
            TaskKind::Lookup => 3 * LOOKUP_PAIR + 4,
        }
    }

    /// A sample of exactly `context` bytes; `depth` in [0, 1] places the needle or passkey (None: random).
    pub fn sample(
        self,
        rng: &mut impl Rng,
        context: usize,
        depth: Option<f32>,
    ) -> Result<TaskSample> {
        if context < self.min_context() {
            return Err(KvError::config(
                format!("{} context", self.name()),
                context,
                format!("at least {} tokens", self.min_context()),
            ));
        }
        if let Some(d) = depth
            && !(0.0..=1.0).contains(&d)
        {
            return Err(KvError::config(
                "depth",
                d,
                "a fraction of the context in [0, 1]",
            ));
        }
        let depth = depth.unwrap_or_else(|| rng.random_range(0.0..=1.0));
        let s = match self {
            TaskKind::Passkey => passkey(rng, context, depth),
            TaskKind::Needle => needle(rng, context, depth),
            TaskKind::Recall => recall(rng, context),
            TaskKind::Copy => copy(rng, context),
            TaskKind::Lookup => lookup(rng, context),
        };
        debug_assert_eq!(s.prompt.len() + s.answer.len(), context, "{self:?}");
        Ok(s)
    }
}

/// One task instance: the model reads `prompt` and must continue with `answer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSample {
    /// Everything before the answer.
    pub prompt: String,
    /// The exact continuation expected.
    pub answer: String,
    /// Byte offsets in the prompt of earlier answers, predictable only by retrieval (the answered
    /// queries of lookup and recall); training weights them like the answer.
    #[serde(default)]
    pub retrieved: Vec<usize>,
}

impl TaskSample {
    /// Prompt and answer as one training text.
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt, self.answer)
    }
}

/// Exact match: the generated continuation must equal the answer, character for character
/// (a continuation longer than the answer is judged on its first `answer.len()` bytes).
pub fn exact_match(answer: &str, generated: &str) -> bool {
    generated.len() >= answer.len() && generated.as_bytes()[..answer.len()] == *answer.as_bytes()
}

// The filler is the classic one (Mohtashami & Jaggi) with its verbs changed so that "is " occurs
// only in the key sentence and the question: in the classic "The sky is blue" the cue's last six
// bytes ("ky is ") recur every 90 bytes, which turns a byte-level passkey test into a test of
// 7-byte prefix matching that a tiny model cannot learn in minutes.
const PASSKEY_HEADER: &str = "A pass key hides in the text below. Remember it. ";
const PASSKEY_FILLER: &str = "The grass grows green. The sky turns blue. The sun shines yellow. Here we go. There and back again. ";
const PASSKEY_QUESTION: &str = " Now tell me the pass key. The pass key is ";

fn passkey(rng: &mut impl Rng, context: usize, depth: f32) -> TaskSample {
    let key = rng.random_range(10_000..100_000).to_string();
    let needle = format!("The pass key is {key}. Remember it. ");
    let filler_len =
        context - PASSKEY_HEADER.len() - needle.len() - PASSKEY_QUESTION.len() - key.len();
    let before = (filler_len as f32 * depth).round() as usize;
    // Start the filler at a random phase so the key does not always follow the same words.
    let phase = rng.random_range(0..PASSKEY_FILLER.len());
    let filler: String = PASSKEY_FILLER
        .chars()
        .cycle()
        .skip(phase)
        .take(filler_len)
        .collect();
    let prompt = format!(
        "{PASSKEY_HEADER}{}{needle}{}{PASSKEY_QUESTION}",
        &filler[..before],
        &filler[before..]
    );
    TaskSample {
        prompt,
        answer: key,
        retrieved: Vec::new(),
    }
}

const NEEDLE_HEADER: &str = "Read the story and answer the question at the end.\n";
const CITIES: &[&str] = &[
    "Avalon",
    "Brisk",
    "Corvel",
    "Dunmore",
    "Elstow",
    "Farrow",
    "Glenmark",
    "Holt",
    "Ivybridge",
    "Jarrow",
];

fn needle(rng: &mut impl Rng, context: usize, depth: f32) -> TaskSample {
    let city = CITIES.choose(rng).unwrap();
    let code = rng.random_range(1000..10_000).to_string();
    let sentence = format!(" The secret code of {city} is {code}. ");
    let question = format!("\nWhat is the secret code of {city}? The secret code of {city} is ");
    let hay_len = context - NEEDLE_HEADER.len() - sentence.len() - question.len() - code.len();
    let mut hay = String::new();
    while hay.len() < hay_len {
        hay += &story(rng, hay_len - hay.len());
    }
    hay.truncate(hay_len);
    // Insert at the sentence boundary nearest the requested depth, so the needle reads as text.
    let target = (hay_len as f32 * depth).round() as usize;
    let at = hay[..target].rfind(". ").map_or(0, |i| i + 1);
    let at = if target == hay_len { hay_len } else { at };
    let prompt = format!(
        "{NEEDLE_HEADER}{}{sentence}{}{question}",
        &hay[..at],
        &hay[at..]
    );
    TaskSample {
        prompt,
        answer: code,
        retrieved: Vec::new(),
    }
}

const COPY_ANSWER: usize = 8;

fn copy(rng: &mut impl Rng, context: usize) -> TaskSample {
    // `s|s`: the string takes half the context, so the copy reaches back that far.
    let len = (context - 1) / 2;
    let s: String = (0..len)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect();
    let pad = context - 1 - 2 * len;
    let prompt = format!("{}{s}|{}", " ".repeat(pad), &s[..len - COPY_ANSWER]);
    TaskSample {
        prompt,
        answer: s[len - COPY_ANSWER..].to_string(),
        retrieved: Vec::new(),
    }
}

/// Bytes of one `ab=3 ` pair.
const LOOKUP_PAIR: usize = 5;

fn lookup(rng: &mut impl Rng, context: usize) -> TaskSample {
    // `pairs` pairs and as many queries take 10 x pairs - 1 bytes (the last query has no space).
    let pairs = ((context + 1) / (2 * LOOKUP_PAIR)).min(26 * 26);
    let mut keys: Vec<[u8; 2]> = Vec::with_capacity(pairs);
    while keys.len() < pairs {
        let k = [
            b'a' + rng.random_range(0..26u8),
            b'a' + rng.random_range(0..26u8),
        ];
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let values: Vec<u8> = (0..pairs)
        .map(|_| b'0' + rng.random_range(0..10u8))
        .collect();
    let pair = |i: usize| {
        format!(
            "{}{}={}",
            keys[i][0] as char, keys[i][1] as char, values[i] as char
        )
    };
    let mut prompt = " ".repeat(context + 1 - 2 * LOOKUP_PAIR * pairs);
    for i in 0..pairs {
        prompt += &pair(i);
        prompt.push(' ');
    }
    let mut order: Vec<usize> = (0..pairs).collect();
    order.shuffle(rng);
    let mut retrieved = Vec::with_capacity(pairs - 1);
    for &i in &order[..pairs - 1] {
        retrieved.push(prompt.len() + 3);
        prompt += &pair(i);
        prompt.push(' ');
    }
    let last = order[pairs - 1];
    prompt += &pair(last)[..3];
    TaskSample {
        prompt,
        answer: (values[last] as char).to_string(),
        retrieved,
    }
}

const RECALL_HEADER: &str = "Remember each key and its value.\n";

fn recall(rng: &mut impl Rng, context: usize) -> TaskSample {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    let mut keys: Vec<String> = Vec::new();
    let mut values: Vec<String> = Vec::new();
    // Each pair "kkk=vvv; " is 9 bytes, each query "Q kkk=vvv " 10 bytes; the final query has no value.
    let budget = context - RECALL_HEADER.len() - 1;
    let queries = (budget / 60).clamp(1, 8);
    let pairs = ((budget - queries * 10) / 9).max(queries);
    while keys.len() < pairs {
        let k: String = (0..3)
            .map(|_| LETTERS[rng.random_range(0..26)] as char)
            .collect();
        if !keys.contains(&k) {
            keys.push(k);
            values.push(rng.random_range(100..1000).to_string());
        }
    }
    let mut prompt = String::from(RECALL_HEADER);
    for (k, v) in keys.iter().zip(&values) {
        prompt += &format!("{k}={v}; ");
    }
    prompt.push('\n');
    let mut asked = Vec::new();
    let mut retrieved = Vec::new();
    for q in 0..queries {
        let i = rng.random_range(0..pairs);
        asked.push(i);
        if q + 1 < queries {
            let at = prompt.len() + 6;
            prompt += &format!("Q {}={} ", keys[i], values[i]);
            retrieved.extend(at..at + values[i].len());
        } else {
            prompt += &format!("Q {}=", keys[i]);
        }
    }
    let answer = values[*asked.last().unwrap()].clone();
    // Pad (or trim the pair list's tail of spaces) to land exactly on the context length.
    let total = prompt.len() + answer.len();
    if total < context {
        let pad = context - total;
        prompt.insert_str(RECALL_HEADER.len(), &" ".repeat(pad));
        retrieved.iter_mut().for_each(|at| *at += pad);
    }
    TaskSample {
        prompt,
        answer,
        retrieved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn samples_are_deterministic_exact_length_and_contain_their_answer() {
        for &task in TaskKind::ALL {
            for context in [task.min_context(), 256, 1000] {
                let a = task
                    .sample(&mut StdRng::seed_from_u64(9), context, None)
                    .unwrap();
                let b = task
                    .sample(&mut StdRng::seed_from_u64(9), context, None)
                    .unwrap();
                let c = task
                    .sample(&mut StdRng::seed_from_u64(10), context, None)
                    .unwrap();
                assert_eq!(a, b, "{task:?}");
                assert_ne!(a, c, "{task:?}");
                assert_eq!(
                    a.prompt.len() + a.answer.len(),
                    context,
                    "{task:?} at {context}"
                );
                assert!(a.prompt.is_ascii());
                // The answer appears in the prompt (it is retrievable), before the question.
                assert!(a.prompt.contains(&a.answer), "{task:?}: {a:?}");
            }
        }
    }

    #[test]
    fn the_passkey_cue_is_the_only_is_in_its_prompt() {
        // The key sentence and the question are the only places "is " occurs, so a 3-byte match
        // of the cue finds the key (see PASSKEY_FILLER); every phase of the filler is checked.
        for seed in 0..50 {
            let s = TaskKind::Passkey
                .sample(&mut StdRng::seed_from_u64(seed), 600, None)
                .unwrap();
            assert_eq!(s.prompt.matches("is ").count(), 2, "{s:?}");
            assert!(s.prompt.ends_with("The pass key is "));
        }
    }

    #[test]
    fn lookup_asks_every_key_once_and_marks_the_retrieved_values() {
        for (seed, context) in (0..50).zip([19, 34, 35, 100, 257].into_iter().cycle()) {
            let s = TaskKind::Lookup
                .sample(&mut StdRng::seed_from_u64(seed), context, None)
                .unwrap();
            let items: Vec<&str> = s.prompt.trim_start().split(' ').collect();
            let pairs = items.len() / 2;
            assert!(pairs >= 2 && items.len() == 2 * pairs, "{s:?}");
            let (listed, rest) = items.split_at(pairs);
            let (asked, last) = rest.split_at(pairs - 1);
            // Every key is listed once and asked once; answered queries repeat the listed value.
            let mut keys: Vec<&str> = asked.iter().chain(last).map(|q| &q[..3]).collect();
            keys.sort();
            let mut listed_keys: Vec<&str> = listed.iter().map(|p| &p[..3]).collect();
            listed_keys.sort();
            assert_eq!(keys, listed_keys, "{s:?}");
            assert!(asked.iter().all(|q| listed.contains(q)), "{s:?}");
            assert!(
                listed.contains(&format!("{}{}", last[0], s.answer).as_str()),
                "{s:?}"
            );
            assert_eq!(s.retrieved.len(), pairs - 1);
            for (&at, q) in s.retrieved.iter().zip(asked) {
                assert_eq!(s.prompt.as_bytes()[at], q.as_bytes()[3], "{s:?}");
            }
        }
    }

    #[test]
    fn depth_places_the_needle() {
        let mut rng = StdRng::seed_from_u64(1);
        let early = TaskKind::Needle.sample(&mut rng, 2000, Some(0.0)).unwrap();
        let late = TaskKind::Needle.sample(&mut rng, 2000, Some(1.0)).unwrap();
        let pos = |s: &TaskSample| s.prompt.find("secret code of").unwrap();
        assert!(pos(&early) < 200, "{}", pos(&early));
        assert!(pos(&late) > 1700, "{}", pos(&late));
        let mid = TaskKind::Passkey.sample(&mut rng, 2000, Some(0.5)).unwrap();
        let p = mid.prompt.find("The pass key is").unwrap();
        assert!((800..1200).contains(&p), "{p}");
    }

    #[test]
    fn scorer_accepts_exact_answers_and_rejects_near_misses() {
        assert!(exact_match("68231", "68231"));
        assert!(exact_match("68231", "68231. Remember"));
        assert!(!exact_match("68231", "68230"));
        assert!(!exact_match("68231", "6823"));
        assert!(!exact_match("68231", " 68231"));
        assert!(!exact_match("719", "791"));
    }

    #[test]
    fn bad_task_requests_are_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        let e = TaskKind::Passkey
            .sample(&mut rng, 10, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("passkey context = 10"), "{e}");
        assert!(
            TaskKind::Needle
                .sample(&mut rng, 1000, Some(1.5))
                .unwrap_err()
                .to_string()
                .contains("depth = 1.5")
        );
        assert!(
            TaskKind::parse("haystack")
                .unwrap_err()
                .to_string()
                .contains("passkey, needle, recall, copy, lookup")
        );
    }
}
