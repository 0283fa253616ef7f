//! The decoder's cached paths against full recomputation, batching, GQA against MHA, generation.

use super::support::*;
use crate::*;
use burn::module::Param;
use burn::prelude::*;
use kv_attention::GroupedAttentionConfig;
use kv_policies::FullCache;

fn cached_decode_matches_full_forward<B: Backend>(dev: &B::Device) {
    // 90 tokens: prompts that fill the cache's body, its tail, and decodes that cross a flush.
    let ids = sequence(90);
    for (heads, kv, shift, width, key_shift) in [
        (8, 8, false, None, None),
        (8, 2, false, None, None),
        (8, 1, false, None, None),
        (8, 2, true, None, None),
        (8, 2, true, Some(3), None),
        (8, 2, true, Some(3), Some(true)),
    ] {
        let model = tiny(heads, kv)
            .with_token_shift(shift)
            .with_token_shift_width(width)
            .with_key_shift(key_shift)
            .init::<B>(dev)
            .unwrap();
        let full = model.forward(tokens(&ids, dev));
        for split in [1, 5, 17, 70, 90] {
            let mut cache = model.new_state(1);
            let mut parts = vec![
                model
                    .forward_cached(tokens(&ids[..split], dev), &mut cache)
                    .unwrap(),
            ];
            for &id in &ids[split..] {
                parts.push(
                    model
                        .forward_cached(tokens(&[id], dev), &mut cache)
                        .unwrap(),
                );
            }
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(
                diff <= 1e-4,
                "heads {heads}/{kv}, shift {shift} x {width:?}, key shift {key_shift:?}, split {split}: max abs diff {diff}"
            );
            assert_eq!(cache.tokens_seen(), ids.len());
            // Measured bytes: 2 (K and V) x layers x kv_heads x head_dim x slots x 4 bytes.
            assert_eq!(cache.stats().kv_bytes, 2 * 2 * kv * 4 * ids.len() * 4);
        }
    }
}

/// Expands each KV head's projection columns to the `r` query heads of its group.
fn repeat_heads<B: Backend>(w: Tensor<B, 2>, kv: usize, r: usize, head_dim: usize) -> Tensor<B, 2> {
    let d = w.dims()[0];
    w.reshape([d, kv, 1, head_dim])
        .expand([d, kv, r, head_dim])
        .reshape([d, kv * r * head_dim])
}

fn batched_forward_matches_each_row_decoded_alone<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).init::<B>(dev).unwrap();
    let (a, b) = (sequence(20), sequence(21)[1..].to_vec());
    let both: Vec<i32> = a.iter().chain(&b).copied().collect();
    let batch =
        model.forward(Tensor::<B, 1, Int>::from_ints(both.as_slice(), dev).reshape([2, 20]));
    for (row, ids) in [a, b].iter().enumerate() {
        let mut cache = model.new_state(1);
        let parts: Vec<_> = ids
            .iter()
            .map(|&id| {
                model
                    .forward_cached(tokens(&[id], dev), &mut cache)
                    .unwrap()
            })
            .collect();
        let diff = max_abs_diff(Tensor::cat(parts, 1), batch.clone().narrow(0, row, 1));
        assert!(diff <= 1e-4, "row {row}: {diff}");
    }
}

fn gqa_equals_mha_with_duplicated_kv_heads<B: Backend>(dev: &B::Device) {
    let (heads, kv) = (8, 2);
    let gqa = tiny(heads, kv).init::<B>(dev).unwrap();
    let mut mha = gqa.clone();
    for block in mha.blocks_mut().unwrap().iter_mut() {
        let src = block.attention.grouped().unwrap().clone();
        let mut attn = GroupedAttentionConfig::new(32, heads, heads)
            .init::<B>(dev)
            .unwrap();
        attn.wq = src.wq;
        attn.wo = src.wo;
        attn.wk.weight = Param::from_tensor(repeat_heads(src.wk.weight.val(), kv, heads / kv, 4));
        attn.wv.weight = Param::from_tensor(repeat_heads(src.wv.weight.val(), kv, heads / kv, 4));
        block.attention = crate::model::attention::SelfAttention::Grouped(attn);
    }
    assert_eq!(
        mha.blocks().unwrap()[0]
            .attention
            .grouped()
            .unwrap()
            .n_kv_heads(),
        heads
    );
    let x = tokens(&sequence(20), dev);
    let diff = max_abs_diff(gqa.forward(x.clone()), mha.forward(x));
    assert!(diff <= 1e-5, "{diff}");
}

fn greedy_generation_follows_full_forward_argmax<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).init::<B>(dev).unwrap();
    let prompt: Vec<u32> = sequence(6).iter().map(|&t| t as u32).collect();
    let config = GenerateConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let mut streamed = Vec::new();
    let out = generate(&model, &prompt, &config, &mut FullCache, |t| {
        streamed.push(t)
    })
    .unwrap();
    assert_eq!(out.tokens, streamed);
    assert_eq!(out.tokens.len(), 8);
    let mut seq: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    for &t in &out.tokens {
        let logits = model.forward(tokens(&seq, dev));
        let [_, n, v] = logits.dims();
        let row: Vec<f32> = logits
            .narrow(1, n - 1, 1)
            .reshape([v])
            .into_data()
            .iter::<f32>()
            .collect();
        assert_eq!(argmax(&row), t);
        seq.push(t as i32);
    }
    // The last sampled token is never fed back, so the cache holds prompt + new - 1 tokens.
    assert_eq!(out.cache.tokens_seen, prompt.len() + 7);
    let err = generate(&model, &[64], &config, &mut FullCache, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt token = 64"), "{err}");
}

fn generation_stays_inside_the_context_and_the_tokenizer_unless_told<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).with_max_positions(12).init::<B>(dev).unwrap();
    let prompt: Vec<u32> = sequence(6).iter().map(|&t| t as u32).collect();
    let sampled = |config: &GenerateConfig| {
        generate(&model, &prompt, config, &mut FullCache, |_| {}).unwrap()
    };
    let config = GenerateConfig {
        max_new_tokens: 100,
        sampler: SamplerConfig {
            temperature: 3.0,
            ..Default::default()
        },
        vocab_limit: Some(10),
        ..Default::default()
    };
    // Positions 0..12: 6 prompt tokens and 6 fed back, so 7 generated, the last never fed.
    let out = sampled(&config);
    assert_eq!(out.tokens.len(), 7);
    assert!(out.context_full);
    assert_eq!(out.cache.tokens_seen, 12);
    // At temperature 3 over 64 ids, every id is below the tokenizer's 10.
    assert!(out.tokens.iter().all(|&t| t < 10), "{:?}", out.tokens);
    let beyond = sampled(&GenerateConfig {
        allow_beyond_context: true,
        ..config.clone()
    });
    assert_eq!(beyond.tokens.len(), 100);
    assert!(!beyond.context_full);
    let e = generate(
        &model,
        &sequence(13).iter().map(|&t| t as u32).collect::<Vec<_>>(),
        &config,
        &mut FullCache,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("13 tokens") && e.contains("max_positions = 12"),
        "{e}"
    );
}

kv_core::backend_tests!(
    generation_stays_inside_the_context_and_the_tokenizer_unless_told,
    cached_decode_matches_full_forward,
    batched_forward_matches_each_row_decoded_alone,
    gqa_equals_mha_with_duplicated_kv_heads,
    greedy_generation_follows_full_forward_argmax,
);
