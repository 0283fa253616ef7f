//! Multi-head latent attention inside the decoder: cached, absorbed and naive paths, cache bytes, policies.

use super::support::*;
use burn::prelude::*;

fn mla_cached_decode_matches_full_forward<B: Backend>(dev: &B::Device) {
    // 90 tokens, so prompts and decodes cross the cache's tail flush as in the grouped test.
    let ids = sequence(90);
    for (query_latent, shift) in [(0, false), (16, false), (16, true)] {
        let model = tiny_mla(4, query_latent)
            .with_token_shift(shift)
            .init::<B>(dev)
            .unwrap();
        let full = model.forward(tokens(&ids, dev));
        for split in [1, 5, 70, 90] {
            let (logits, cache) = decode_logits(&model, &ids, split, dev);
            let diff = max_abs_diff(logits, full.clone());
            assert!(
                diff <= 1e-4,
                "query_latent {query_latent}, shift {shift}, split {split}: max abs diff {diff}"
            );
            // Measured bytes: (kv_latent + rope_dim) x slots x layers x 4 bytes.
            assert_eq!(cache.stats().kv_bytes, (12 + 4) * ids.len() * 2 * 4);
        }
    }
}

fn mla_absorbed_decode_matches_naive_path_logits<B: Backend>(dev: &B::Device) {
    for query_latent in [0, 16] {
        let absorbed = tiny_mla(4, query_latent).init::<B>(dev).unwrap();
        let mut naive = absorbed.clone();
        naive.set_mla_path(kv_attention::MlaPath::Naive);
        for (len, split) in [(8, 1), (15, 7), (40, 33), (75, 68)] {
            let ids: Vec<i32> = sequence(len + 3)[3..].to_vec();
            let (a, _) = decode_logits(&absorbed, &ids, split, dev);
            let (n, _) = decode_logits(&naive, &ids, split, dev);
            let diff = max_abs_diff(a, n);
            assert!(
                diff <= 1e-4,
                "query_latent {query_latent}, {len} tokens from a prompt of {split}: {diff}"
            );
        }
    }
}

fn mla_cache_bytes_do_not_depend_on_heads<B: Backend>(dev: &B::Device) {
    let ids = sequence(11);
    for heads in [1, 2, 4, 8] {
        let config = tiny_mla(heads, 0);
        let model = config.init::<B>(dev).unwrap();
        let (_, cache) = decode_logits(&model, &ids, 6, dev);
        let stats = cache.stats();
        assert_eq!(stats.kv_bytes, (12 + 4) * 11 * 2 * 4, "heads {heads}");
        assert_eq!(
            stats.kv_bytes,
            config.kv_bytes_per_token() * 11,
            "heads {heads}"
        );
        assert_eq!(stats.total_slots(), 2 * 11);
    }
}

fn mla_policies_with_a_budget_above_the_length_match_the_full_cache<B: Backend>(dev: &B::Device) {
    let model = tiny_mla(4, 0).init::<B>(dev).unwrap();
    let ids = sequence(30);
    let (want, _) = decode_logits(&model, &ids, 20, dev);
    let specs = [
        "h2o:budget=1.0",
        "h2o:budget=64,normalize=true",
        "snapkv:budget=1.0,window=8",
        "streaming:budget=64",
        "streaming:budget=1.0,rerotate=true",
        "tova:budget=1.0",
        "vatp:budget=1.0",
        "knorm:budget=1.0",
        "pyramidkv:budget=1.0,window=8",
        "adakv:budget=1.0,window=8",
    ];
    assert_specs_match_full_cache(&model, &ids, &specs, want, 2 * 30, dev);
}

fn mla_policies_with_a_small_budget_keep_exactly_the_budget<B: Backend>(dev: &B::Device) {
    let model = tiny_mla(4, 0).init::<B>(dev).unwrap();
    let ids = sequence(30);
    let (full, _) = decode_logits(&model, &ids, 20, dev);
    let budget = 8;
    // (spec, slots right after the prefill, slots after the 10 decode steps)
    let specs = [
        (format!("h2o:budget={budget}"), budget, budget),
        (
            format!("h2o:budget={budget},normalize=true"),
            budget,
            budget,
        ),
        // Scored on each head's up-projected keys and values, not on the cached latent.
        (format!("vatp:budget={budget}"), budget, budget),
        (format!("knorm:budget={budget},skip=0"), budget, budget),
        (format!("streaming:budget={budget},sinks=2"), budget, budget),
        (
            format!("streaming:budget={budget},sinks=2,rerotate=true"),
            budget,
            budget,
        ),
        (format!("tova:budget={budget}"), budget, budget),
        // SnapKV compresses the prompt once; decoded tokens then accumulate.
        (
            format!("snapkv:budget={budget},window=4"),
            budget,
            budget + 10,
        ),
        // One latent head: AdaKV's layer-wide top-k is SnapKV's, and storage stays rectangular.
        (
            format!("adakv:budget={budget},window=4"),
            budget,
            budget + 10,
        ),
    ];
    for (spec, after_prefill, at_end) in specs {
        let mut policy = kv_policies::build_policy::<B>(&spec).unwrap();
        let mut cache = model.new_state(1);
        let mut parts = vec![
            model
                .forward_with_policy(
                    tokens(&ids[..20], dev),
                    &mut cache,
                    policy.as_mut(),
                    kv_policies::Phase::Prefill,
                )
                .unwrap(),
        ];
        let slots = |c: &crate::model::state::ModelState<B>| {
            c.stats()
                .layers
                .iter()
                .map(|l| l.slots_per_head.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            slots(&cache),
            vec![vec![after_prefill]; 2],
            "{spec} after prefill"
        );
        for (step, &id) in ids[20..].iter().enumerate() {
            let phase = kv_policies::Phase::Decode { step: step + 1 };
            parts.push(
                model
                    .forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase)
                    .unwrap(),
            );
        }
        let stats = cache.stats();
        assert_eq!(slots(&cache), vec![vec![at_end]; 2], "{spec} at the end");
        assert_eq!(stats.kv_bytes, (12 + 4) * at_end * 2 * 4, "{spec}");
        assert_eq!(stats.tokens_seen, 30, "{spec}");
        let logits = Tensor::cat(parts, 1);
        let values: Vec<f32> = logits.clone().into_data().iter::<f32>().collect();
        assert!(values.iter().all(|x| x.is_finite()), "{spec}");
        // Eviction really changed what the model saw.
        assert!(max_abs_diff(logits, full.clone()) > 1e-4, "{spec}");
    }
}

kv_core::backend_tests!(
    mla_cached_decode_matches_full_forward,
    mla_absorbed_decode_matches_naive_path_logits,
    mla_cache_bytes_do_not_depend_on_heads,
    mla_policies_with_a_budget_above_the_length_match_the_full_cache,
    mla_policies_with_a_small_budget_keep_exactly_the_budget,
);
