//! Evaluation of a model: held-out loss and exact-match accuracy on the long-context tasks.

use crate::data::{Corpus, TaskKind, exact_match};
use crate::model::decoder::DecoderLm;
use crate::model::generate::{GenerateConfig, Generation, generate};
use crate::model::sampling::SamplerConfig;
use crate::text::tokenizer::Tokenizer;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use kv_core::readback::ReadBack;
use kv_core::{KvError, Result};
use kv_policies::{CachePolicy, FullCache, Phase};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Errors unless `model` has at least `needed` token ids.
pub fn check_vocab<B: Backend>(model: &DecoderLm<B>, needed: usize, what: &str) -> Result<()> {
    let v = model.vocab_size();
    if v < needed {
        return Err(KvError::config(
            "vocab_size",
            v,
            format!("at least {needed} for {what}"),
        ));
    }
    Ok(())
}

/// Errors unless `model` can read every token of `corpus`.
fn check_corpus_vocab<B: Backend>(model: &DecoderLm<B>, corpus: &Corpus) -> Result<()> {
    check_vocab(
        model,
        corpus.max_token() as usize + 1,
        "the text's token ids",
    )
}

/// Mean next-token loss over the first `windows` consecutive windows of `seq_len` tokens.
pub fn validation_loss<B: Backend>(
    model: &DecoderLm<B>,
    corpus: &Corpus,
    seq_len: usize,
    windows: usize,
) -> Result<f64> {
    validation_loss_from(model, corpus, seq_len, windows, 0)
}

/// [`validation_loss`] over the predictions made at positions `from..seq_len` only (what
/// [`policy_loss`] with a `from + 1`-token prompt scores).
pub fn validation_loss_from<B: Backend>(
    model: &DecoderLm<B>,
    corpus: &Corpus,
    seq_len: usize,
    windows: usize,
    from: usize,
) -> Result<f64> {
    check_corpus_vocab(model, corpus)?;
    if from >= seq_len {
        return Err(KvError::config(
            "first scored position",
            from,
            format!("below the window of {seq_len} tokens"),
        ));
    }
    let all = corpus.windows(seq_len + 1, windows);
    if all.is_empty() {
        return Err(KvError::config(
            "validation text",
            format!("{} bytes", corpus.len()),
            format!("at least {} bytes", seq_len + 1),
        ));
    }
    let device = model.embed.weight.device();
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut total = 0.0;
    for chunk in all.chunks(8) {
        let ids: Vec<i32> = chunk.iter().flatten().map(|&t| t as i32).collect();
        let b = chunk.len();
        let x = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([b, seq_len + 1]);
        let logits = model
            .forward(x.clone().narrow(1, 0, seq_len))
            .narrow(1, from, seq_len - from);
        let (v, n) = (logits.dims()[2], seq_len - from);
        let loss = ce.forward(
            logits.reshape([b * n, v]),
            x.narrow(1, from + 1, n).reshape([b * n]),
        );
        total += loss.read_scalar() * b as f64;
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
    /// Fraction of slots the cache held fewer than one per token and head, averaged (a policy's
    /// evictions, or DMC's merges).
    #[serde(default)]
    pub removed: f64,
}

/// Mean next-token loss of text read through the cache under a policy, over `windows` windows of
/// `len` tokens: the first `prompt` tokens are one prefill (so prefill-time policies such as
/// SnapKV and AdaKV compress them), the rest are fed `chunk` tokens per call (1: one at a time,
/// as StreamingLLM measures perplexity; the policy acts after every call), and the loss is over
/// the predictions made from the last prompt token on.
///
/// With the full cache this equals [`validation_loss_from`]`(.., prompt - 1)` up to float
/// rounding; with `prompt = 1` it scores every token, like [`validation_loss`].
pub fn policy_loss<B: Backend>(
    model: &DecoderLm<B>,
    corpus: &Corpus,
    len: usize,
    windows: usize,
    prompt: usize,
    chunk: usize,
    policy: &mut dyn FnMut() -> Box<dyn CachePolicy<B>>,
) -> Result<PolicyLoss> {
    if chunk == 0 {
        return Err(KvError::config(
            "perplexity chunk",
            0,
            "at least 1 token per call",
        ));
    }
    check_corpus_vocab(model, corpus)?;
    if !(1..=len).contains(&prompt) {
        return Err(KvError::config(
            "perplexity prompt",
            prompt,
            format!("1 to {len} tokens of the {len}-token window"),
        ));
    }
    let all = corpus.windows(len + 1, windows);
    if all.is_empty() {
        return Err(KvError::config(
            "validation text",
            format!("{} bytes", corpus.len()),
            format!("at least {} bytes", len + 1),
        ));
    }
    let device = model.embed.weight.device();
    let (mut total, mut bytes, mut removed) = (0.0, 0.0, 0.0);
    for (wi, w) in all.iter().enumerate() {
        let mut p = policy();
        let mut cache = model.new_state(1);
        cache.reserve(len);
        let n = len - prompt + 1;
        let mut rows = Vec::with_capacity(n);
        let head: Vec<i32> = w[..prompt].iter().map(|&t| t as i32).collect();
        let x = Tensor::<B, 1, Int>::from_ints(head.as_slice(), &device).reshape([1, prompt]);
        rows.push(model.forward_last_with_policy(x, &mut cache, p.as_mut(), Phase::Prefill)?);
        for (i, part) in w[prompt..len].chunks(chunk).enumerate() {
            let ids: Vec<i32> = part.iter().map(|&t| t as i32).collect();
            let x =
                Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([1, part.len()]);
            rows.push(model.forward_with_policy(
                x,
                &mut cache,
                p.as_mut(),
                Phase::Decode { step: i + 1 },
            )?);
        }
        let v = model.vocab_size();
        let logits = Tensor::cat(rows, 1).reshape([n, v]);
        let targets: Vec<i32> = w[prompt..].iter().map(|&t| t as i32).collect();
        let targets = Tensor::<B, 1, Int>::from_ints(targets.as_slice(), &device).reshape([n, 1]);
        let nll = log_softmax(logits, 1).gather(1, targets).mean().neg();
        let nll = nll.read_scalar();
        if !nll.is_finite() {
            return Err(KvError::config(
                "perplexity loss",
                format!("{nll} in window {} of {}", wi + 1, all.len()),
                "a finite loss; the weights or the input drive the model's logits to NaN or inf",
            ));
        }
        total += nll;
        let stats = cache.stats();
        bytes += stats.kv_bytes as f64;
        removed += stats.compression_ratio();
    }
    let n = all.len() as f64;
    Ok(PolicyLoss {
        loss: total / n,
        kv_bytes: bytes / n,
        removed: removed / n,
    })
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
    /// Fraction of slots the cache held fewer than one per token and head, averaged.
    pub removed: f64,
}

/// Greedy continuation of one task prompt under a cache policy, with the generation's
/// measurements: `answer_len` tokens, the answer's length in bytes (no token is shorter than a
/// byte, so that is enough for any tokenizer).
pub fn answer<B: Backend>(
    model: &DecoderLm<B>,
    tokenizer: &Tokenizer,
    prompt: &str,
    answer_len: usize,
    policy: &mut dyn CachePolicy<B>,
) -> Result<(String, Generation)> {
    check_vocab(
        model,
        tokenizer.vocab_size(),
        &format!("the {} tokenizer", tokenizer.name()),
    )?;
    let ids = tokenizer.encode_prompt(prompt)?;
    let config = GenerateConfig {
        max_new_tokens: answer_len,
        sampler: SamplerConfig::default(),
        stop_tokens: tokenizer.stop_tokens(),
        vocab_limit: Some(tokenizer.vocab_size()),
        ..Default::default()
    };
    let out = generate(model, &ids, &config, policy, |_| {})?;
    Ok((tokenizer.decode(&out.tokens)?, out))
}

/// Accuracy of `model` on `samples` seeded instances of `task` at `context` tokens (full cache,
/// byte tokens); `depth` fixes where the needle or passkey sits (None: random).
pub fn task_accuracy<B: Backend>(
    model: &DecoderLm<B>,
    task: TaskKind,
    context: usize,
    samples: usize,
    seed: u64,
    depth: Option<f32>,
) -> Result<TaskResult> {
    task_accuracy_with(
        model,
        &Tokenizer::Bytes,
        task,
        context,
        samples,
        seed,
        depth,
        &mut || Box::new(FullCache),
    )
}

/// [`task_accuracy`] read through `tokenizer` (whose contexts are bytes of text, fewer tokens
/// unless it is the byte tokenizer), under a cache policy made fresh for every sample by `policy`.
#[allow(clippy::too_many_arguments)]
pub fn task_accuracy_with<B: Backend>(
    model: &DecoderLm<B>,
    tokenizer: &Tokenizer,
    task: TaskKind,
    context: usize,
    samples: usize,
    seed: u64,
    depth: Option<f32>,
    policy: &mut dyn FnMut() -> Box<dyn CachePolicy<B>>,
) -> Result<TaskResult> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut correct, mut bytes, mut removed) = (0, 0.0, 0.0);
    for _ in 0..samples {
        let s = task.sample(&mut rng, context, depth)?;
        let (got, generation) = answer(
            model,
            tokenizer,
            &s.prompt,
            s.answer.len(),
            policy().as_mut(),
        )?;
        correct += exact_match(&s.answer, &got) as usize;
        bytes += generation.cache.kv_bytes as f64;
        removed += generation.cache.compression_ratio();
    }
    let n = samples.max(1) as f64;
    Ok(TaskResult {
        task,
        context,
        accuracy: correct as f64 / n,
        correct,
        total: samples,
        kv_bytes: bytes / n,
        removed: removed / n,
    })
}
