//! `kv train` killed with SIGKILL at random points (some while a checkpoint is being written)
//! and resumed until it finishes ends with the same checkpoint, byte for byte, and the same
//! logged losses as a run that was never interrupted; no torn checkpoint is ever visible.

use crate::common::*;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 24;

/// The logged losses and evaluations of a run, without the wall-clock fields.
fn losses(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn metrics line {l:?}: {e}"));
            let o = v.as_object_mut().unwrap();
            o.remove("tokens_per_s");
            o.remove("seconds");
            v.to_string()
        })
        .collect()
}

/// Panics unless `dir` holds either no checkpoint or a complete, self-consistent one.
fn assert_no_torn_checkpoint(dir: &Path, when: &str) {
    let Ok(bytes) = std::fs::read(dir.join("checkpoint.kvc")) else {
        return;
    };
    assert!(
        bytes.len() > 16 && &bytes[..8] == b"KVCKPT02",
        "{when}: checkpoint.kvc has no header ({} bytes)",
        bytes.len()
    );
    let body = &bytes[..bytes.len() - 8];
    let sum = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap());
    assert_eq!(
        sum,
        fnv1a(body),
        "{when}: a torn checkpoint.kvc is visible ({} bytes)",
        bytes.len()
    );
    let sections = checkpoint_sections(&bytes);
    assert!(
        sections.iter().all(|s| !s.is_empty()),
        "{when}: a checkpoint section is empty"
    );
}

/// Starts training into `dir`: a resume when it holds a checkpoint, else a fresh run.
fn start(preset: &str, dir: &Path) -> Child {
    let mut cmd = kv();
    if dir.join("checkpoint.kvc").exists() {
        cmd.args(["train", "--resume", "--out", &dir.display().to_string()]);
    } else {
        cmd.args([
            "train",
            "--config",
            preset,
            "--out",
            &dir.display().to_string(),
        ]);
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A small deterministic generator for kill times (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Waits for `child` to exit on its own; panics with its stderr if it failed.
fn finish(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn training_killed_at_random_points_resumes_to_the_same_bytes_and_losses_as_an_uninterrupted_run() {
    let root = scratch("kill9");
    let preset = root.join("tiny.json");
    std::fs::write(&preset, tiny_preset(STEPS, 2)).unwrap();
    let preset = preset.display().to_string();

    let reference = root.join("reference");
    let started = Instant::now();
    finish(start(&preset, &reference), "the uninterrupted run");
    let full = started.elapsed();
    let want_bytes = std::fs::read(reference.join("checkpoint.kvc")).unwrap();
    let want_losses = losses(&reference);
    assert_eq!(
        want_losses
            .iter()
            .filter(|l| l.contains("\"step\"") && l.contains("\"loss\""))
            .count(),
        STEPS
    );

    // The same command twice gives the same file: the comparison below is meaningful.
    let again = root.join("again");
    finish(start(&preset, &again), "the second uninterrupted run");
    assert!(
        std::fs::read(again.join("checkpoint.kvc")).unwrap() == want_bytes,
        "two uninterrupted runs wrote different checkpoints"
    );

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut kills, mut mid_write) = (0usize, 0usize);
    let trials = 20;
    for trial in 0..trials {
        let dir = root.join(format!("trial-{trial}"));
        // Every fourth trial waits for a checkpoint write and kills it in the middle.
        let at_write = trial % 4 == 3;
        for attempt in 0.. {
            assert!(attempt < 60, "trial {trial} never finished");
            let partial = dir.join(".checkpoint.kvc.partial");
            if at_write {
                // A leftover from an earlier kill would be mistaken for a write in progress.
                let _ = std::fs::remove_file(&partial);
            }
            let mut child = start(&preset, &dir);
            let killed = if at_write {
                let deadline = Instant::now() + full * 3;
                loop {
                    if partial.exists() || Instant::now() > deadline {
                        break;
                    }
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::hint::spin_loop();
                }
                let killed = child.try_wait().unwrap().is_none() && child.kill().is_ok();
                let _ = child.wait();
                // The temporary file outlives the process only if the write never reached its rename.
                if killed && partial.exists() {
                    mid_write += 1;
                }
                killed
            } else {
                // Anywhere in a run's lifetime, start-up included; later attempts may finish.
                std::thread::sleep(Duration::from_micros(
                    rng.below(full.as_micros() as u64 * 5 / 4),
                ));
                let killed = child.try_wait().unwrap().is_none() && child.kill().is_ok();
                let _ = child.wait();
                killed
            };
            assert_no_torn_checkpoint(&dir, &format!("trial {trial} after kill {attempt}"));
            if killed {
                kills += 1;
            }
            // After two kills let the run finish, so every trial ends.
            if attempt >= 2 {
                finish(
                    start(&preset, &dir),
                    &format!("trial {trial}'s last resume"),
                );
                break;
            }
        }
        assert!(
            std::fs::read(dir.join("checkpoint.kvc")).unwrap() == want_bytes,
            "trial {trial}: the resumed run's checkpoint differs from the uninterrupted one"
        );
        assert_eq!(
            losses(&dir),
            want_losses,
            "trial {trial}: the logged losses differ"
        );
    }
    eprintln!(
        "{trials} trials, {kills} SIGKILLs ({mid_write} during a checkpoint write); every resumed run equals the uninterrupted one"
    );
    assert!(
        kills >= trials,
        "only {kills} kills landed in {trials} trials"
    );
    assert!(mid_write >= 1, "no kill landed during a checkpoint write");
}
