//! Evaluation of a model: held-out loss and exact-match accuracy on the long-context tasks.

use crate::data::{Corpus, TaskKind, exact_match};
use crate::{ByteTokenizer, DecoderLm, GenerateConfig, Generation, SamplerConfig, generate};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use kv_core::{KvError, Result};
use burn::tensor::activation::log_softmax;
use kv_policies::{CachePolicy, FullCache, Phase};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Errors unless `model` can read byte-level tokens (ids up to 255).
pub fn check_byte_vocab<B: Backend>(model: &DecoderLm<B>) -> Result<()> {
    let v = model.vocab_size();
    if v < ByteTokenizer::VOCAB {
        return Err(KvError::config("vocab_size", v, format!("at least {} for byte-level text and tasks", ByteTokenizer::VOCAB)));
    }
    Ok(())
}

/// Mean next-token loss over the first `windows` consecutive windows of `seq_len` tokens.
pub fn validation_loss<B: Backend>(model: &DecoderLm<B>, corpus: &Corpus, seq_len: usize, windows: usize) -> Result<f64> {
    check_byte_vocab(model)?;
    let all = corpus.windows(seq_len + 1, windows);
    if all.is_empty() {
        return Err(KvError::config("validation text", format!("{} bytes", corpus.len()), format!("at least {} bytes", seq_len + 1)));
    }
    let device = model.embed.weight.device();
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut total = 0.0;
    for chunk in all.chunks(8) {
        let ids: Vec<i32> = chunk.iter().flatten().map(|&t| t as i32).collect();
        let b = chunk.len();
        let x = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([b, seq_len + 1]);
        let logits = model.forward(x.clone().narrow(1, 0, seq_len));
        let v = logits.dims()[2];
        let loss = ce.forward(logits.reshape([b * seq_len, v]), x.narrow(1, 1, seq_len).reshape([b * seq_len]));
        total += loss.into_scalar().elem::<f64>() * b as f64;
    }
    Ok(total / all.len() as f64)
}

/// Loss of a model reading text through a compressed cache.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PolicyLoss {
    /// Mean next-token loss (nats).
    pub loss: f64,
    /// Key/value bytes held at the end of each window, measured from the cache, averaged.
    pub kv_bytes: f64,
}

/// Mean next-token loss when every token is predicted through the cache under a policy, fed one
/// token at a time (as StreamingLLM measures perplexity), over `windows` windows of `len` tokens.
///
/// With the full cache this equals [`validation_loss`] up to float rounding.
pub fn policy_loss<B: Backend>(
    model: &DecoderLm<B>,
    corpus: &Corpus,
    len: usize,
    windows: usize,
    policy: &mut dyn FnMut() -> Box<dyn CachePolicy<B>>,
) -> Result<PolicyLoss> {
    check_byte_vocab(model)?;
    let all = corpus.windows(len + 1, windows);
    if all.is_empty() {
        return Err(KvError::config("validation text", format!("{} bytes", corpus.len()), format!("at least {} bytes", len + 1)));
    }
    let device = model.embed.weight.device();
    let (mut total, mut bytes) = (0.0, 0.0);
    for w in &all {
        let mut p = policy();
        let mut cache = model.new_cache(1);
        cache.reserve(len);
        let mut rows = Vec::with_capacity(len);
        for (i, &t) in w[..len].iter().enumerate() {
            let phase = if i == 0 { Phase::Prefill } else { Phase::Decode { step: i } };
            let x = Tensor::<B, 1, Int>::from_ints([t as i32], &device).reshape([1, 1]);
            rows.push(model.forward_with_policy(x, &mut cache, p.as_mut(), phase)?);
        }
        let v = model.vocab_size();
        let logits = Tensor::cat(rows, 1).reshape([len, v]);
        let targets: Vec<i32> = w[1..].iter().map(|&t| t as i32).collect();
        let targets = Tensor::<B, 1, Int>::from_ints(targets.as_slice(), &device).reshape([len, 1]);
        let nll = log_softmax(logits, 1).gather(1, targets).mean().neg();
        total += nll.into_scalar().elem::<f64>();
        bytes += cache.stats().kv_bytes as f64;
    }
    let n = all.len() as f64;
    Ok(PolicyLoss { loss: total / n, kv_bytes: bytes / n })
}

/// Exact-match results of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task.
    pub task: TaskKind,
    /// Prompt plus answer length in tokens.
    pub context: usize,
    /// Fraction answered exactly.
    pub accuracy: f64,
    /// Samples answered exactly.
    pub correct: usize,
    /// Samples asked.
    pub total: usize,
    /// Key/value bytes held when each answer was complete, measured from the cache, averaged.
    pub kv_bytes: f64,
}

/// Greedy continuation of one task prompt under a cache policy (the answer's length in tokens),
/// with the generation's measurements.
pub fn answer<B: Backend>(model: &DecoderLm<B>, prompt: &str, answer_len: usize, policy: &mut dyn CachePolicy<B>) -> Result<(String, Generation)> {
    let ids: Vec<u32> = prompt.bytes().map(u32::from).collect();
    let config = GenerateConfig { max_new_tokens: answer_len, sampler: SamplerConfig::default(), stop_token: None };
    let out = generate(model, &ids, &config, policy, |_| {})?;
    Ok((out.tokens.iter().map(|&t| char::from(t.min(255) as u8)).collect(), out))
}

/// Accuracy of `model` on `samples` seeded instances of `task` at `context` tokens (full cache);
/// `depth` fixes where the needle or passkey sits (None: random).
pub fn task_accuracy<B: Backend>(
    model: &DecoderLm<B>,
    task: TaskKind,
    context: usize,
    samples: usize,
    seed: u64,
    depth: Option<f32>,
) -> Result<TaskResult> {
    task_accuracy_with(model, task, context, samples, seed, depth, &mut || Box::new(FullCache))
}

/// [`task_accuracy`] under a cache policy made fresh for every sample by `policy`.
pub fn task_accuracy_with<B: Backend>(
    model: &DecoderLm<B>,
    task: TaskKind,
    context: usize,
    samples: usize,
    seed: u64,
    depth: Option<f32>,
    policy: &mut dyn FnMut() -> Box<dyn CachePolicy<B>>,
) -> Result<TaskResult> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut correct, mut bytes) = (0, 0.0);
    for _ in 0..samples {
        let s = task.sample(&mut rng, context, depth)?;
        let (got, generation) = answer(model, &s.prompt, s.answer.len(), policy().as_mut())?;
        correct += exact_match(&s.answer, &got) as usize;
        bytes += generation.cache.kv_bytes as f64;
    }
    let n = samples.max(1) as f64;
    Ok(TaskResult { task, context, accuracy: correct as f64 / n, correct, total: samples, kv_bytes: bytes / n })
}
