//! Criterion benches of the hot paths: one decode step per attention kind, and one decode step
//! under each eviction policy, at 1024 tokens of context (random weights: cost does not depend on
//! what a model learned). Run with `cargo bench -p kv-models --bench hot_paths`.

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
    (0..CONTEXT).map(|i| (32 + (i * 7 + i / 13) % 90) as i32).collect()
}

fn model(name: &str) -> DecoderLm<B> {
    preset(name).expect("built-in preset").model.init::<B>(&Default::default()).expect("valid preset")
}

fn decode_step_per_attention_kind(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step_at_1024");
    for name in ["tiny-mha", "tiny-gqa", "tiny-mqa", "tiny-mla", "tiny-yoco", "tiny-yoco-retention"] {
        let model = model(name);
        let mut cache = model.new_state(1);
        model.forward_cached(tokens(&prompt()), &mut cache).expect("prefill");
        group.bench_function(name, |b| {
            b.iter_batched(
                || cache.clone(),
                |mut cache: ModelState<B>| model.forward_cached(tokens(&[65]), &mut cache).expect("decode").into_data(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn decode_step_per_policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("tiny_mha_decode_step_at_1024_budget_512");
    let model = model("tiny-mha");
    for spec in ["full", "streaming", "h2o", "vatp", "knorm", "tova", "snapkv", "pyramidkv"] {
        let spec = if spec == "full" { spec.to_string() } else { format!("{spec}:budget=512,every=1") };
        let mut policy = build_policy::<B>(&spec).expect("valid spec");
        let mut cache = model.new_state(1);
        model.forward_with_policy(tokens(&prompt()), &mut cache, policy.as_mut(), Phase::Prefill).expect("prefill");
        group.bench_function(&spec, |b| {
            b.iter_batched(
                || (cache.clone(), build_policy::<B>(&spec).expect("valid spec")),
                |(mut cache, mut policy)| {
                    model.forward_with_policy(tokens(&[65]), &mut cache, policy.as_mut(), Phase::Decode { step: 1 }).expect("decode").into_data()
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, decode_step_per_attention_kind, decode_step_per_policy);
criterion_main!(benches);
