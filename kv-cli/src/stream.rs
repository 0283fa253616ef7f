//! `kv stream`: decode a very long stream (a million tokens) under a bounded-cache policy and
//! record the process's resident memory as it goes, to show that a streaming cache holds its
//! memory flat however long it runs.

use crate::backend::{BackendJob, DeviceKind};
use crate::model_source::ModelArgs;
use crate::plot::{Chart, Series, line_chart};
use burn::prelude::*;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kv_core::readback::ReadBack;
use kv_core::{KvError, Result};
use kv_policies::Phase;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `kv stream`.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Cache policy; it must bound the cache (a token budget such as `streaming:budget=1024`),
    /// or memory grows with the stream by design.
    #[arg(long, default_value = "streaming:budget=1024")]
    pub policy: String,
    /// Tokens to decode after the prompt, each fed back from the model's greedy choice.
    #[arg(long, default_value_t = 1_000_000)]
    pub tokens: usize,
    /// Record memory every this many tokens.
    #[arg(long, default_value_t = 10_000)]
    pub sample_every: usize,
    /// Tokens of the (synthetic, byte-text) prompt before decoding starts.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Folder for stream.json, stream.md and stream-rss.png.
    #[arg(long, default_value = "runs/stream")]
    pub out: PathBuf,
    /// Decode nothing: redraw stream.md and stream-rss.png from this stream.json (a finished run,
    /// or the readings so far of one still running or cut short).
    #[arg(long)]
    pub from: Option<PathBuf>,
}

/// Reads a stream.json written by `kv stream`.
pub fn read(path: &Path) -> Result<StreamFile> {
    let text = std::fs::read_to_string(path).map_err(|e| KvError::io(path, e))?;
    parse(&text, path)
}

/// Reads a `stream.json` from `text` (`origin` names it in errors), refusing measurements no
/// stream writes: negative, non-finite or beyond-any-machine (> 2^40 MiB) sizes and times.
pub fn parse(text: &str, origin: &Path) -> Result<StreamFile> {
    let file: StreamFile = serde_json::from_str(text)
        .map_err(|e| KvError::io(origin, format!("not a stream.json: {e}")))?;
    const MAX_MIB: f64 = (1u64 << 40) as f64;
    let check = |field: String, v: f64, max: f64| {
        if v.is_finite() && (0.0..=max).contains(&v) {
            Ok(())
        } else {
            Err(KvError::io(
                origin,
                format!("{field} = {v:?}; expected a finite number in [0, {max:e}]"),
            ))
        }
    };
    check("seconds".into(), file.seconds, f64::MAX)?;
    for (i, s) in file.samples.iter().enumerate() {
        check(format!("samples[{i}].rss_mib"), s.rss_mib, MAX_MIB)?;
        check(format!("samples[{i}].heap_mib"), s.heap_mib, MAX_MIB)?;
        check(format!("samples[{i}].kv_mib"), s.kv_mib, MAX_MIB)?;
        check(format!("samples[{i}].seconds"), s.seconds, f64::MAX)?;
    }
    Ok(file)
}

/// One memory reading during the stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamSample {
    /// Tokens seen so far (prompt included).
    pub tokens: usize,
    /// Resident set size of the process, MiB (`VmRSS` of /proc/self/status; 0 where unavailable).
    pub rss_mib: f64,
    /// Heap bytes in use, MiB, counted by the global allocator (CPU backends hold tensors there).
    pub heap_mib: f64,
    /// Key/value bytes the cache holds, measured from its tensors, MiB.
    pub kv_mib: f64,
    /// Slots per KV head in layer 0.
    pub slots: usize,
    /// Seconds since decoding started.
    pub seconds: f64,
}

/// The contents of `stream.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamFile {
    /// Backend name.
    pub device: String,
    /// The model's label.
    pub model: String,
    /// The policy, as it names itself.
    pub policy: String,
    /// Tokens decoded after the prompt.
    pub tokens: usize,
    /// Wall seconds of the decoding.
    pub seconds: f64,
    /// Readings, every `sample_every` tokens.
    pub samples: Vec<StreamSample>,
    /// Readings from this token count on are past the warm-up (the cache full, allocators settled).
    pub warm_from_tokens: usize,
}

impl StreamFile {
    /// `(min, max)` RSS in MiB after the warm-up.
    pub fn rss_range(&self) -> (f64, f64) {
        self.samples
            .iter()
            .filter(|s| s.tokens >= self.warm_from_tokens)
            .fold((f64::MAX, 0.0f64), |(lo, hi), s| {
                (lo.min(s.rss_mib), hi.max(s.rss_mib))
            })
    }

    /// Spread of RSS after the warm-up, as a fraction of its minimum.
    pub fn rss_spread(&self) -> f64 {
        let (lo, hi) = self.rss_range();
        if lo > 0.0 && lo < f64::MAX {
            (hi - lo) / lo
        } else {
            0.0
        }
    }
}

/// Resident set size of this process in MiB, from /proc (Linux); 0 elsewhere.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kb.map_or(0.0, |k| k / 1024.0)
}

/// Runs `kv stream` on one backend.
pub struct StreamJob {
    /// The flags.
    pub args: StreamArgs,
    /// The backend, for the results.
    pub device: DeviceKind,
}

impl BackendJob for StreamJob {
    type Output = StreamFile;

    fn run<B: Backend>(self, device: B::Device) -> Result<StreamFile> {
        let args = &self.args;
        if args.tokens == 0 || args.sample_every == 0 || args.prompt_tokens == 0 {
            let (flag, v) = if args.tokens == 0 {
                ("--tokens", 0)
            } else if args.sample_every == 0 {
                ("--sample-every", 0)
            } else {
                ("--prompt-tokens", 0)
            };
            return Err(KvError::config(flag, v, "at least 1"));
        }
        crate::backend::policies::<B>().parse(&args.policy)?;
        // The stream itself runs past any context by design (its point is memory over a million
        // tokens); the prompt is one forward pass and must fit.
        args.model.check_context(
            &args.model.config("tiny-mha")?,
            "--prompt-tokens",
            args.prompt_tokens,
        )?;
        let loaded = args.model.load::<B>("tiny-mha", &device)?;
        let mut policy =
            crate::backend::policies::<B>().build(&args.policy, &loaded.tokenizer.policy_env())?;
        let model = &loaded.model;
        let vocab = loaded.config.vocab_size;
        let prompt: Vec<i32> = (0..args.prompt_tokens)
            .map(|i| (32 + (i * 7 + i / 13) % 90) as i32 % vocab as i32)
            .collect();
        let mut cache = model.new_state(1);
        let x =
            Tensor::<B, 1, Int>::from_ints(prompt.as_slice(), &device).reshape([1, prompt.len()]);
        let logits =
            model.forward_last_with_policy(x, &mut cache, policy.as_mut(), Phase::Prefill)?;
        let mut next = argmax_last::<B>(logits);
        let bar = ProgressBar::new(args.tokens as u64).with_style(
            ProgressStyle::with_template("stream {bar:30} {pos}/{len} [{elapsed} < {eta}] {msg}")
                .unwrap()
                .progress_chars("=> "),
        );
        let start = Instant::now();
        let mut samples = Vec::new();
        let reading = |cache: &kv_models::ModelState<B>, tokens: usize| {
            let stats = cache.stats();
            StreamSample {
                tokens,
                rss_mib: rss_mib(),
                heap_mib: crate::peak::current() as f64 / (1 << 20) as f64,
                kv_mib: stats.kv_bytes as f64 / (1 << 20) as f64,
                slots: cache.layer(0).live_slots(),
                seconds: start.elapsed().as_secs_f64(),
            }
        };
        samples.push(reading(&cache, prompt.len()));
        for step in 1..=args.tokens {
            let x = Tensor::<B, 1, Int>::from_ints([next], &device).reshape([1, 1]);
            let logits = model.forward_with_policy(
                x,
                &mut cache,
                policy.as_mut(),
                Phase::Decode { step },
            )?;
            next = argmax_last::<B>(logits);
            if step % args.sample_every == 0 || step == args.tokens {
                let s = reading(&cache, prompt.len() + step);
                bar.set_position(step as u64);
                bar.set_message(format!(
                    "RSS {:.1} MiB | KV {:.2} MiB | {} slots",
                    s.rss_mib, s.kv_mib, s.slots
                ));
                samples.push(s);
                // A long run can be watched (or cut short) from its JSON, rewritten at each reading.
                if step < args.tokens {
                    let so_far = StreamFile {
                        device: self.device.name().into(),
                        model: args.model.label("tiny-mha"),
                        policy: policy.name(),
                        tokens: step,
                        seconds: start.elapsed().as_secs_f64(),
                        samples: samples.clone(),
                        warm_from_tokens: warm_from(&samples, prompt.len(), args.tokens),
                    };
                    std::fs::create_dir_all(&args.out).map_err(|e| KvError::io(&args.out, e))?;
                    let json = serde_json::to_string_pretty(&so_far)
                        .map_err(|e| KvError::io(&args.out, e))?;
                    kv_models::write_atomic(&args.out.join("stream.json"), json.as_bytes())?;
                }
            }
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        let warm_from_tokens = warm_from(&samples, prompt.len(), args.tokens);
        Ok(StreamFile {
            device: self.device.name().into(),
            model: args.model.label("tiny-mha"),
            policy: policy.name(),
            tokens: args.tokens,
            seconds,
            samples,
            warm_from_tokens,
        })
    }
}

/// Where the warm-up ends: once the cache has filled and been cut back for as long again, and
/// after the first tenth of the stream (allocator pools and the backend's buffers settle).
fn warm_from(samples: &[StreamSample], prompt: usize, tokens: usize) -> usize {
    let full_at = samples.iter().map(|s| s.slots).max().unwrap_or(0) + prompt;
    (2 * full_at).max(tokens / 10).min(prompt + tokens)
}

/// The greedy next token from logits `[1, t, vocab]` (its last row).
fn argmax_last<B: Backend>(logits: Tensor<B, 3>) -> i32 {
    let [_, t, v] = logits.dims();
    let row: Vec<f32> = logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .read_back()
        .iter::<f32>()
        .collect();
    kv_models::argmax(&row) as i32
}

/// The Markdown summary of a stream.
pub fn markdown(file: &StreamFile) -> String {
    let (lo, hi) = file.rss_range();
    let last = file.samples.last();
    format!(
        "| device | model | policy | tokens | wall s | tokens/s | RSS after warm-up (min / max MiB) | spread | KV held (MiB) | slots/head |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1}% | {:.3} | {} |\n",
        file.device,
        file.model,
        file.policy,
        file.tokens,
        file.seconds,
        file.tokens as f64 / file.seconds.max(1e-9),
        lo,
        hi,
        100.0 * file.rss_spread(),
        last.map_or(0.0, |s| s.kv_mib),
        last.map_or(0, |s| s.slots),
    )
}

/// Writes `stream.json`, `stream.md` and `stream-rss.png` into `dir`; returns the paths.
pub fn write_results(dir: &Path, file: &StreamFile) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| KvError::io(dir, e))?;
    let (json, md, png) = (
        dir.join("stream.json"),
        dir.join("stream.md"),
        dir.join("stream-rss.png"),
    );
    kv_models::write_atomic(
        &json,
        serde_json::to_string_pretty(file)
            .map_err(|e| KvError::io(dir, e))?
            .as_bytes(),
    )?;
    kv_models::write_atomic(&md, markdown(file).as_bytes())?;
    let line = |name: &str, f: &dyn Fn(&StreamSample) -> f64| Series {
        name: name.into(),
        points: file
            .samples
            .iter()
            .map(|s| (s.tokens as f64, f(s)))
            .collect(),
    };
    let title = format!(
        "Memory while streaming {} tokens ({})",
        file.tokens, file.policy
    );
    line_chart(
        &png,
        &Chart {
            title: &title,
            x_label: "tokens seen",
            y_label: "MiB",
            log_x: false,
            y_from_zero: true,
            series: vec![
                line("resident set (RSS)", &|s| s.rss_mib),
                line("heap in use", &|s| s.heap_mib),
                line("KV cache held", &|s| s.kv_mib),
            ],
        },
    )?;
    Ok(vec![json, md, png])
}
