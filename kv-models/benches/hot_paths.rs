//! Criterion benches of the hot paths: one decode step per attention kind, and one decode step
//! under each eviction policy, at 1024 tokens of context (random weights: cost does not depend on
//! what a model learned); and a causal prefill's attention at 4096 tokens on the host kernel
//! against burn's fused one, on the same tensors. Run with
//! `cargo bench -p kv-models --bench hot_paths`.

// Reads as a user of the library would; the library itself reads through kv_core::readback.
#![allow(clippy::disallowed_methods)]

use burn::backend::Flex;
use burn::prelude::*;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kv_models::ModelState;
use kv_models::{DecoderLm, preset};
use kv_policies::{Phase, build_policy};

type B = Flex;

const CONTEXT: usize = 1024;

fn tokens(ids: &[i32]) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(ids, &Default::default()).reshape([1, ids.len()])
}

fn prompt() -> Vec<i32> {
    (0..CONTEXT)
        .map(|i| (32 + (i * 7 + i / 13) % 90) as i32)
        .collect()
}

fn model(name: &str) -> DecoderLm<B> {
    preset(name)
        .expect("built-in preset")
        .model
        .init::<B>(&Default::default())
        .expect("valid preset")
}

fn decode_step_per_attention_kind(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step_at_1024");
    for name in [
        "tiny-mha",
        "tiny-gqa",
        "tiny-mqa",
        "tiny-mla",
        "tiny-yoco",
        "tiny-yoco-retention",
    ] {
        let model = model(name);
        let mut cache = model.new_state(1);
        model
            .forward_cached(tokens(&prompt()), &mut cache)
            .expect("prefill");
        group.bench_function(name, |b| {
            b.iter_batched(
                || cache.clone(),
                |mut cache: ModelState<B>| {
                    model
                        .forward_cached(tokens(&[65]), &mut cache)
                        .expect("decode")
                        .into_data()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn decode_step_per_policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("tiny_mha_decode_step_at_1024_budget_512");
    let model = model("tiny-mha");
    for spec in [
        "full",
        "streaming",
        "h2o",
        "vatp",
        "knorm",
        "tova",
        "snapkv",
        "pyramidkv",
    ] {
        let spec = if spec == "full" {
            spec.to_string()
        } else {
            format!("{spec}:budget=512,every=1")
        };
        let mut policy = build_policy::<B>(&spec).expect("valid spec");
        let mut cache = model.new_state(1);
        model
            .forward_with_policy(
                tokens(&prompt()),
                &mut cache,
                policy.as_mut(),
                Phase::Prefill,
            )
            .expect("prefill");
        group.bench_function(&spec, |b| {
            b.iter_batched(
                || (cache.clone(), build_policy::<B>(&spec).expect("valid spec")),
                |(mut cache, mut policy)| {
                    model
                        .forward_with_policy(
                            tokens(&[65]),
                            &mut cache,
                            policy.as_mut(),
                            Phase::Decode { step: 1 },
                        )
                        .expect("decode")
                        .into_data()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// decode-bench's attention shape (8 heads of 32) and SmolLM2's (9 query heads on 3 KV heads of
/// 64): the host kernel and burn's fused kernel (burn-flex's flash loop), both on one thread, so
/// the ratio of the two is the kernel's own.
fn prefill_attention_host_vs_fused(c: &mut Criterion) {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use kv_attention::host::{HostShape, causal_attention};
    let mut group = c.benchmark_group("causal_prefill_attention_at_4096");
    group.sample_size(10);
    let device = Default::default();
    let n = 4096;
    for (name, heads, kv_heads, head_dim) in [("8x32", 8, 8, 32), ("9on3x64", 9, 3, 64)] {
        let random = |h: usize| {
            Tensor::<B, 4>::random(
                [1, h, n, head_dim],
                burn::tensor::Distribution::Normal(0.0, 1.0),
                &device,
            )
        };
        let (q, k, v) = (random(heads), random(kv_heads), random(kv_heads));
        let host = |x: &Tensor<B, 4>| x.clone().into_data().to_vec::<f32>().expect("f32");
        let (qh, kh, vh) = (host(&q), host(&k), host(&v));
        let shape = HostShape {
            batch: 1,
            heads,
            kv_heads,
            queries: n,
            keys: n,
            visible: n,
            head_dim,
        };
        let scale = (head_dim as f32).powf(-0.5);
        group.bench_function(format!("host_{name}"), |b| {
            b.iter(|| {
                causal_attention(
                    &qh,
                    &kh,
                    &vh,
                    shape,
                    scale,
                    false,
                    1,
                    kv_attention::Isa::best(),
                )
                .expect("a supported shape")
            })
        });
        let spread = |x: Tensor<B, 4>| {
            x.reshape([1, kv_heads, 1, n, head_dim])
                .expand([1, kv_heads, heads / kv_heads, n, head_dim])
                .reshape([1, heads, n, head_dim])
        };
        let (ks, vs) = (spread(k), spread(v));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        group.bench_function(format!("burn_fused_{name}"), |b| {
            b.iter(|| attention(q.clone(), ks.clone(), vs.clone(), None, None, options).into_data())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    decode_step_per_attention_kind,
    decode_step_per_policy,
    prefill_attention_host_vs_fused
);
criterion_main!(benches);
