//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded.

use kv_core::{KvError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How to sample; temperature 0 means greedy (argmax).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Softmax temperature; 0 picks the argmax.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = no limit).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0 = off; llama.cpp's
    /// default is 0.05), which cuts the long tail a small model's raw distribution has.
    pub min_p: f32,
    /// Seed of the sampler's random stream.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// The settings llama.cpp samples with unless told otherwise (temperature 0.8, top-k 40,
    /// top-p 0.95, min-p 0.05), for models whose files carry no generation settings.
    pub fn llama_cpp_defaults(seed: u64) -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            seed,
        }
    }

    /// One line naming the settings, for run summaries.
    pub fn describe(&self) -> String {
        if self.temperature == 0.0 {
            return "greedy".into();
        }
        format!(
            "temperature {} top-k {} top-p {} min-p {} seed {}",
            self.temperature, self.top_k, self.top_p, self.min_p, self.seed
        )
    }
}

impl SamplerConfig {
    /// Checks the values, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(KvError::config(
                "temperature",
                self.temperature,
                "a finite number >= 0 (0 = greedy)",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(KvError::config(
                "top_p",
                self.top_p,
                "a probability in (0, 1] (1 = off)",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(KvError::config(
                "min_p",
                self.min_p,
                "a fraction of the top probability in [0, 1] (0 = off)",
            ));
        }
        Ok(())
    }
}

/// A seeded sampler; the same seed and logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its own random stream seeded from the config.
    pub fn new(config: SamplerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rng: StdRng::seed_from_u64(config.seed),
        })
    }

    /// Picks a token id from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.config.top_k > 0 {
            order.truncate(self.config.top_k);
        }
        let t = self.config.temperature as f64;
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.min_p > 0.0 {
            // probs[0] is the most likely token's: `order` is sorted by logit.
            let floor = probs[0] * self.config.min_p as f64;
            let keep = probs.iter().take_while(|&&p| p >= floor).count().max(1);
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        if self.config.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs.iter().position(|p| {
                cum += p;
                cum >= self.config.top_p as f64
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let u: f64 = self.rng.random();
        let mut cum = 0.0;
        for (&i, p) in order.iter().zip(&probs) {
            cum += p;
            if u < cum {
                return i as u32;
            }
        }
        order[order.len() - 1] as u32
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..50)
            .map(|i| ((i * 37) % 11) as f32 * 0.3 - (i as f32) * 0.01)
            .collect()
    }

    #[test]
    fn greedy_returns_the_argmax() {
        let l = logits();
        let want = (0..l.len())
            .max_by(|&a, &b| l[a].total_cmp(&l[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert_eq!(s.sample(&l), want);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_seed_dependent() {
        let l = logits();
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig {
                temperature: 1.5,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                seed,
            })
            .unwrap();
            (0..64).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l = logits();
        let mut ranked: Vec<usize> = (0..l.len()).collect();
        ranked.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        let mut s = Sampler::new(SamplerConfig {
            temperature: 5.0,
            top_k: 3,
            top_p: 1.0,
            min_p: 0.0,
            seed: 1,
        })
        .unwrap();
        for _ in 0..200 {
            assert!(ranked[..3].contains(&(s.sample(&l) as usize)));
        }
        // A tiny top_p keeps only the most likely token.
        let mut s = Sampler::new(SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            min_p: 0.0,
            seed: 1,
        })
        .unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&l) as usize, ranked[0]);
        }
    }

    #[test]
    fn min_p_drops_tokens_below_a_share_of_the_top_one() {
        // Probabilities after softmax at temperature 1: about 0.66, 0.24, 0.09, 0.003.
        let l = [3.0f32, 2.0, 1.0, -2.5];
        let top = |min_p: f32| {
            let mut s = Sampler::new(SamplerConfig {
                temperature: 1.0,
                min_p,
                seed: 5,
                ..Default::default()
            })
            .unwrap();
            let mut seen = [false; 4];
            (0..4000).for_each(|_| seen[s.sample(&l) as usize] = true);
            seen
        };
        assert_eq!(top(0.0), [true; 4]);
        // 0.2 x 0.66 = 0.13: only the two most likely tokens stay.
        assert_eq!(top(0.2), [true, true, false, false]);
        assert_eq!(top(1.0), [true, false, false, false]);
        assert!(
            Sampler::new(SamplerConfig {
                min_p: 1.5,
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn bad_sampler_settings_are_errors() {
        let e = Sampler::new(SamplerConfig {
            temperature: -1.0,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("temperature = -1"), "{e}");
        let e = Sampler::new(SamplerConfig {
            top_p: 0.0,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("top_p = 0"), "{e}");
    }
}
