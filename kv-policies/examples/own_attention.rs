//! A minimal attention layer of one's own, in plain burn, compressed by SnapKV and H2O through
//! `drive_layer`: the layer fills what the policy asks to observe, the policy evicts.
//!
//! Run: `cargo run -p kv-policies --example own_attention`.

// Reads as a user of the library would; the library itself reads through kv_core::readback.
#![allow(clippy::disallowed_methods)]

use burn::backend::Flex;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use kv_core::{CacheShape, LayerCache, Observation, ObserveRequest, Result};
use kv_policies::{LayerContext, Phase, Registry, drive_layer};

type B = Flex;
const D: usize = 16;

/// Single-head attention without RoPE: causal by slot position, over everything cached.
struct TinyAttention {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
}

impl TinyAttention {
    /// Appends the new tokens' keys and values, attends, and observes what was requested.
    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        cache: &mut LayerCache<B>,
        request: ObserveRequest,
    ) -> Result<(Tensor<B, 3>, Option<Observation<B>>)> {
        let [b, t, _] = x.dims();
        let seen = cache.tokens_seen() as i64;
        cache.append(
            self.k.forward(x.clone()).reshape([b, 1, t, D]),
            self.v.forward(x.clone()).reshape([b, 1, t, D]),
        )?;
        let q = self.q.forward(x).reshape([b, 1, t, D]);
        let n = cache.slots();
        let scores = q
            .matmul(cache.keys().swap_dims(2, 3))
            .div_scalar((D as f32).sqrt());
        // Query i (at position seen + i) sees slot j iff pos[j] <= seen + i.
        let qpos = Tensor::<B, 1, Int>::arange(seen..seen + t as i64, &scores.device())
            .reshape([1, 1, t, 1]);
        let hidden = cache.positions().reshape([b, 1, 1, n]).greater(qpos);
        let probs = softmax(scores.mask_fill(hidden, f32::NEG_INFINITY), 3);
        let out = probs.clone().matmul(cache.values()).reshape([b, t, D]);
        let mut obs = Observation::default();
        if request.column_sums {
            obs.column_sums = Some(probs.clone().sum_dim(2).reshape([b, 1, n]));
        }
        if request.window > 0 {
            let w = request.window.min(t);
            obs.window = Some(probs.narrow(2, t - w, w));
        }
        Ok((out, Some(obs)))
    }
}

fn main() -> Result<()> {
    let device = Default::default();
    let lin = || LinearConfig::new(D, D).with_bias(false).init::<B>(&device);
    let layer = TinyAttention {
        q: lin(),
        k: lin(),
        v: lin(),
    };
    let registry = Registry::<B>::standard();
    for spec in ["snapkv:budget=16,window=8,kernel=3", "h2o:budget=16"] {
        let mut policy = registry.build(spec, &Default::default())?;
        let mut cache = LayerCache::new(
            CacheShape {
                batch: 1,
                kv_heads: 1,
                key_dim: D,
                value_dim: D,
            },
            &device,
        );
        let mut run = |x: Tensor<B, 3>, phase: Phase, cache: &mut LayerCache<B>| {
            let ctx = LayerContext {
                layer: 0,
                n_layers: 1,
                n_heads: 1,
                phase,
                rope: None,
                tokens: None,
            };
            drive_layer(policy.as_mut(), &ctx, cache, |cache, request| {
                layer.forward_cached(x, cache, request)
            })
        };
        let prompt = Tensor::<B, 3>::random(
            [1, 64, D],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        run(prompt, Phase::Prefill, &mut cache)?;
        for step in 1..=8 {
            let token = Tensor::<B, 3>::random(
                [1, 1, D],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            );
            run(token, Phase::Decode { step }, &mut cache)?;
        }
        let kept: Vec<i64> = cache.positions().into_data().iter::<i64>().collect();
        println!(
            "{spec}: {} of {} tokens held, positions {kept:?}",
            cache.slots(),
            cache.tokens_seen()
        );
    }
    Ok(())
}
