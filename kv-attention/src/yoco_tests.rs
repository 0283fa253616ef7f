//! Backend-generic tests of YOCO's layers: windowed causality, sliding-window attention, the
//! three forms of gated retention, and cross-attention over a global cache.

use crate::*;
use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, softmax};

use crate::tests::{max_abs_diff, randn};

fn windowed_causality_matches_an_explicit_mask<B: Backend>(dev: &B::Device) {
    // GQA (4 query heads on 2 KV heads), queries at the end of a longer key run, two segments.
    let (h, kvh, t, n, d) = (4, 2, 6, 11, 8);
    let (q, k, v) = (
        randn::<B, 4>([2, h, t, d], dev),
        randn::<B, 4>([2, kvh, n, d], dev),
        randn::<B, 4>([2, kvh, n, d], dev),
    );
    for window in [1, 3, 7, 20] {
        let causality = Causality::Window {
            query: Tensor::arange((n - t) as i64..n as i64, dev),
            key: position_range(0, n, dev),
            window,
        };
        let segs = [
            (k.clone().narrow(2, 0, 5), v.clone().narrow(2, 0, 5)),
            (k.clone().narrow(2, 5, n - 5), v.clone().narrow(2, 5, n - 5)),
        ];
        let (out, _) =
            grouped_attention(q.clone(), &segs, &causality, 0.3, ObserveRequest::default());
        // Reference: repeat the KV heads, mask everything outside (i - window, i].
        let rep = |x: Tensor<B, 4>| {
            x.reshape([2, kvh, 1, n, d])
                .expand([2, kvh, h / kvh, n, d])
                .reshape([2, h, n, d])
        };
        let mut allowed = vec![false; t * n];
        for i in 0..t {
            let qi = (n - t + i) as i64;
            for j in 0..n as i64 {
                allowed[i * n + j as usize] = j <= qi && j > qi - window as i64;
            }
        }
        let allowed =
            Tensor::<B, 1, Bool>::from_bool(burn::tensor::TensorData::new(allowed, [t * n]), dev)
                .reshape([1, 1, t, n]);
        let scores = q
            .clone()
            .matmul(rep(k.clone()).swap_dims(2, 3))
            .mul_scalar(0.3)
            .mask_fill(allowed.bool_not().expand([2, h, t, n]), f32::NEG_INFINITY);
        let want = softmax(scores, 3).matmul(rep(v.clone()));
        let diff = max_abs_diff(out, want);
        assert!(diff <= 1e-5, "window {window}: {diff}");
    }
}

fn sliding_window_decode_matches_forward_and_never_holds_more_than_the_window<B: Backend>(
    dev: &B::Device,
) {
    for (kvh, window) in [(4, 4), (2, 1), (1, 6)] {
        let cfg =
            SlidingWindowAttentionConfig::new(GroupedAttentionConfig::new(32, 4, kvh), window);
        let swa = cfg.init::<B>(dev).unwrap();
        let t = 15;
        let x = randn::<B, 3>([2, t, 32], dev);
        let full = swa.forward(x.clone());
        for split in [1, 3, 9, 15] {
            let mut state = swa.new_state(2, dev);
            let none = ObserveRequest::default;
            let mut parts = vec![
                swa.forward_cached(x.clone().narrow(1, 0, split), &mut state, none())
                    .unwrap()
                    .output,
            ];
            assert!(
                state.cache.slots() <= window,
                "after a prompt of {split}: {} slots",
                state.cache.slots()
            );
            for i in split..t {
                parts.push(
                    swa.forward_cached(x.clone().narrow(1, i, 1), &mut state, none())
                        .unwrap()
                        .output,
                );
                assert!(
                    state.cache.slots() <= window,
                    "step {i}: {} slots",
                    state.cache.slots()
                );
            }
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(
                diff <= 1e-5,
                "kv {kvh}, window {window}, split {split}: {diff}"
            );
            assert_eq!(state.cache.tokens_seen(), t);
            assert_eq!(
                state.cache.stats().kv_bytes,
                2 * 2 * kvh * 8 * window.min(t) * 4
            );
        }
    }
    // The window really limits what is seen: a wide window gives other outputs.
    let narrow = SlidingWindowAttentionConfig::new(GroupedAttentionConfig::new(32, 4, 4), 2)
        .init::<B>(dev)
        .unwrap();
    let x = randn::<B, 3>([1, 8, 32], dev);
    // Run before cloning: burn's parameters are lazy, and a clone of an untouched one re-initialises.
    let causal = narrow.attn.forward(x.clone());
    let mut wide = SlidingWindowAttentionConfig::new(GroupedAttentionConfig::new(32, 4, 4), 16)
        .init::<B>(dev)
        .unwrap();
    wide.attn = narrow.attn.clone();
    assert!(max_abs_diff(narrow.forward(x.clone()), wide.forward(x.clone())) > 1e-4);
    assert!(max_abs_diff(wide.forward(x), causal) <= 1e-5);
    let err = SlidingWindowAttentionConfig::new(GroupedAttentionConfig::new(32, 4, 4), 0)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("window = 0"), "{err}");
}

/// Random retention inputs `[b, h, t, d]` and log decays `[b, h, t]` from `logsigmoid(z) / tau`.
fn retention_inputs<B: Backend>(
    t: usize,
    tau: f64,
    dev: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 3>) {
    let (b, h, dk, dv) = (2, 3, 8, 6);
    let lg = log_sigmoid(randn::<B, 3>([b, h, t], dev).add_scalar(1.0)).div_scalar(tau);
    (
        randn([b, h, t, dk], dev),
        randn::<B, 4>([b, h, t, dk], dev).mul_scalar(0.35),
        randn([b, h, t, dv], dev),
        lg,
    )
}

fn retention_parallel_chunkwise_and_recurrent_forms_agree<B: Backend>(dev: &B::Device) {
    // tau 1 decays fast (gamma down to ~0.3), tau 16 slowly: both regimes must agree.
    for tau in [1.0, 16.0] {
        let t = 13;
        let (q, k, v, lg) = retention_inputs::<B>(t, tau, dev);
        let parallel = retention_parallel(q.clone(), k.clone(), v.clone(), lg.clone());
        let (recurrent, state) =
            retention_recurrent(q.clone(), k.clone(), v.clone(), lg.clone(), None);
        let diff = max_abs_diff(parallel.clone(), recurrent.clone());
        assert!(diff <= 1e-4, "tau {tau}: parallel vs recurrent {diff}");
        for chunk in [1, 3, 8, 13, 64] {
            let (chunked, s) =
                retention_chunkwise(q.clone(), k.clone(), v.clone(), lg.clone(), chunk, None);
            let diff = max_abs_diff(chunked, parallel.clone());
            assert!(
                diff <= 1e-4,
                "tau {tau}, chunk {chunk}: chunkwise vs parallel {diff}"
            );
            let diff = max_abs_diff(s, state.clone());
            assert!(diff <= 1e-4, "tau {tau}, chunk {chunk}: final state {diff}");
        }
        // A prefill continued from its state (chunkwise, then recurrent) equals one pass.
        let split = 5;
        let part = |x: &Tensor<B, 4>, lo, n| x.clone().narrow(2, lo, n);
        let (first, s) = retention_chunkwise(
            part(&q, 0, split),
            part(&k, 0, split),
            part(&v, 0, split),
            lg.clone().narrow(2, 0, split),
            3,
            None,
        );
        let rest = t - split;
        let (second, _) = retention_chunkwise(
            part(&q, split, 4),
            part(&k, split, 4),
            part(&v, split, 4),
            lg.clone().narrow(2, split, 4),
            3,
            Some(s),
        );
        let (_, s2) = retention_chunkwise(
            part(&q, 0, split + 4),
            part(&k, 0, split + 4),
            part(&v, 0, split + 4),
            lg.clone().narrow(2, 0, split + 4),
            8,
            None,
        );
        let (third, _) = retention_recurrent(
            part(&q, split + 4, rest - 4),
            part(&k, split + 4, rest - 4),
            part(&v, split + 4, rest - 4),
            lg.clone().narrow(2, split + 4, rest - 4),
            Some(s2),
        );
        let diff = max_abs_diff(Tensor::cat(vec![first, second, third], 2), parallel);
        assert!(diff <= 1e-4, "tau {tau}: continued from states {diff}");
    }
    // Long sequences with strong decays stay finite (decays are exponentials of non-positive sums).
    let (q, k, v, lg) = retention_inputs::<B>(300, 0.05, dev);
    let (o, s) = retention_chunkwise(q, k, v, lg, 64, None);
    let finite = |x: Vec<f32>| x.iter().all(|v| v.is_finite());
    assert!(
        finite(o.into_data().iter::<f32>().collect())
            && finite(s.into_data().iter::<f32>().collect())
    );
}

fn gated_retention_decode_matches_forward<B: Backend>(dev: &B::Device) {
    for (chunk, rope_dims) in [(4, None), (256, Some(4))] {
        let layer = GatedRetentionConfig::new(32, 4)
            .with_chunk(chunk)
            .with_rope_dims(rope_dims)
            .init::<B>(dev)
            .unwrap();
        let t = 11;
        let x = randn::<B, 3>([2, t, 32], dev);
        let full = layer.forward(x.clone());
        for split in [1, 6, 11] {
            let mut state = layer.new_state(2, dev);
            let mut parts = vec![
                layer
                    .forward_cached(
                        x.clone().narrow(1, 0, split),
                        &mut state,
                        ObserveRequest::default(),
                    )
                    .unwrap()
                    .output,
            ];
            for i in split..t {
                assert_eq!(state.tokens_seen, i);
                parts.push(
                    layer
                        .forward_cached(
                            x.clone().narrow(1, i, 1),
                            &mut state,
                            ObserveRequest::default(),
                        )
                        .unwrap()
                        .output,
                );
            }
            assert_eq!(state.state.unwrap().dims(), [2, 4, 8, 8]);
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(diff <= 1e-4, "chunk {chunk}, split {split}: {diff}");
        }
    }
    let err = GatedRetentionConfig::new(32, 4)
        .with_tau(0.0)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tau = 0"), "{err}");
    let err = GatedRetentionConfig::new(32, 4)
        .with_chunk(0)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("chunk = 0"), "{err}");
    let layer = GatedRetentionConfig::new(32, 4).init::<B>(dev).unwrap();
    let mut wrong = kv_core::RecurrentState {
        state: Some(Tensor::zeros([1, 4, 8, 7], dev)),
        tokens_seen: 0,
    };
    let err = layer
        .forward_cached(
            randn::<B, 3>([1, 1, 32], dev),
            &mut wrong,
            ObserveRequest::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("retention state"), "{err}");
}

fn cross_attention_over_the_global_cache_matches_forward_and_is_causal<B: Backend>(
    dev: &B::Device,
) {
    for kvh in [4, 2, 1] {
        let cfg = CrossAttentionConfig::new(32, 4, kvh);
        let (global, cross) = (
            cfg.init_global::<B>(dev).unwrap(),
            cfg.init::<B>(dev).unwrap(),
        );
        let t = 9;
        let (src, x) = (
            randn::<B, 3>([2, t, 32], dev),
            randn::<B, 3>([2, t, 32], dev),
        );
        let (k, v) = global.project(src.clone(), 0);
        let full = cross.forward(x.clone(), k, v);
        // Prefill of 4 with every row, then one row per decode step; and the last row only.
        let mut cache = global.new_state(2, dev);
        global
            .append(src.clone().narrow(1, 0, 4), &mut cache)
            .unwrap();
        let mut parts = vec![
            cross
                .forward_cached(
                    x.clone().narrow(1, 0, 4),
                    &mut cache,
                    ObserveRequest::default(),
                )
                .unwrap()
                .output,
        ];
        for i in 4..t {
            global
                .append(src.clone().narrow(1, i, 1), &mut cache)
                .unwrap();
            parts.push(
                cross
                    .forward_cached(
                        x.clone().narrow(1, i, 1),
                        &mut cache,
                        ObserveRequest::default(),
                    )
                    .unwrap()
                    .output,
            );
        }
        let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
        assert!(diff <= 1e-5, "kv {kvh}: {diff}");
        let last = cross
            .forward_cached(
                x.clone().narrow(1, t - 3, 3),
                &mut cache,
                ObserveRequest::default(),
            )
            .unwrap()
            .output;
        assert!(
            max_abs_diff(last, full.clone().narrow(1, t - 3, 3)) <= 1e-5,
            "kv {kvh}: last rows"
        );
        // Changing a later token's K/V source and query never changes an earlier output.
        let changed = Tensor::cat(
            vec![
                src.clone().narrow(1, 0, 5),
                randn::<B, 3>([2, t - 5, 32], dev),
            ],
            1,
        );
        let (k2, v2) = global.project(changed, 0);
        let x2 = Tensor::cat(
            vec![
                x.clone().narrow(1, 0, 5),
                randn::<B, 3>([2, t - 5, 32], dev),
            ],
            1,
        );
        let out2 = cross.forward(x2, k2, v2);
        assert!(
            max_abs_diff(out2.clone().narrow(1, 0, 5), full.clone().narrow(1, 0, 5)) <= 1e-6,
            "kv {kvh}: causal"
        );
        assert!(max_abs_diff(out2.narrow(1, 5, t - 5), full.narrow(1, 5, t - 5)) > 1e-3);
    }
    let err = CrossAttentionConfig::new(32, 4, 3)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("kv_heads = 3"), "{err}");
}

fn gated_retention_of_three_scalar_tokens_matches_a_hand_computation<B: Backend>(dev: &B::Device) {
    // One head, d_k = d_v = 1: S_t = gamma_t S_(t-1) + k_t v_t, o_t = q_t S_t, with gamma applied to
    // the previous state (not after adding the new outer product). gamma = 0.5, 0.5, 0.25;
    // k = 1, 2, 3; v = 1; q = 1, 2, 1.
    //   from S_0 = 0: S = 1, 2.5, 3.625       -> o = 1, 5, 3.625
    //   from S_0 = 4: S = 3, 3.5, 3.875       -> o = 3, 7, 3.875
    let t3 = |x: [f32; 3]| Tensor::<B, 1>::from_floats(x, dev).reshape([1, 1, 3, 1]);
    let (q, k, v) = (
        t3([1.0, 2.0, 1.0]),
        t3([1.0, 2.0, 3.0]),
        t3([1.0, 1.0, 1.0]),
    );
    let log_gamma = Tensor::<B, 1>::from_floats([0.5f32.ln(), 0.5f32.ln(), 0.25f32.ln()], dev)
        .reshape([1, 1, 3]);
    let close = |got: Tensor<B, 4>, want: [f32; 3], what: &str| {
        let got: Vec<f32> = got.into_data().iter::<f32>().collect();
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5),
            "{what}: {got:?} vs {want:?}"
        );
    };
    close(
        retention_parallel(q.clone(), k.clone(), v.clone(), log_gamma.clone()),
        [1.0, 5.0, 3.625],
        "parallel",
    );
    let (o, s) = retention_recurrent(q.clone(), k.clone(), v.clone(), log_gamma.clone(), None);
    close(o, [1.0, 5.0, 3.625], "recurrent");
    assert!((s.into_scalar().elem::<f32>() - 3.625).abs() < 1e-5);
    let s0 = Tensor::<B, 4>::full([1, 1, 1, 1], 4.0, dev);
    let (o, s) = retention_recurrent(
        q.clone(),
        k.clone(),
        v.clone(),
        log_gamma.clone(),
        Some(s0.clone()),
    );
    close(o, [3.0, 7.0, 3.875], "recurrent from a state");
    assert!((s.into_scalar().elem::<f32>() - 3.875).abs() < 1e-5);
    for chunk in [1, 2, 3] {
        let (o, s) = retention_chunkwise(
            q.clone(),
            k.clone(),
            v.clone(),
            log_gamma.clone(),
            chunk,
            Some(s0.clone()),
        );
        close(
            o,
            [3.0, 7.0, 3.875],
            &format!("chunkwise ({chunk}) from a state"),
        );
        assert!((s.into_scalar().elem::<f32>() - 3.875).abs() < 1e-5);
    }
}

fn banded_window_prefill_equals_the_window_mask_over_every_key<B: Backend>(dev: &B::Device) {
    // Past one query block (256 rows), in one call and in chunks after a held window.
    for (kvh, window) in [(2, 40), (4, 300)] {
        let swa =
            SlidingWindowAttentionConfig::new(GroupedAttentionConfig::new(32, 4, kvh), window)
                .init::<B>(dev)
                .unwrap();
        let t = 600;
        let x = randn::<B, 3>([1, t, 32], dev);
        let (q, k, v) = swa.attn.project(x.clone(), 0, None);
        let all = Causality::Window {
            query: Tensor::arange(0..t as i64, dev),
            key: position_range(0, t, dev),
            window,
        };
        let want = swa.attn.merge_heads(
            grouped_attention(
                q,
                &[(k, v)],
                &all,
                swa.attn.scale(),
                ObserveRequest::default(),
            )
            .0,
        );
        let diff = max_abs_diff(swa.forward(x.clone()), want.clone());
        assert!(
            diff <= 1e-5,
            "window {window}: training path differs from the full mask by {diff}"
        );
        let mut state = swa.new_state(1, dev);
        let parts: Vec<Tensor<B, 3>> = [(0, 290), (290, 1), (291, 309)]
            .iter()
            .map(|&(at, n)| {
                swa.forward_cached(
                    x.clone().narrow(1, at, n),
                    &mut state,
                    ObserveRequest::default(),
                )
                .unwrap()
                .output
            })
            .collect();
        let diff = max_abs_diff(Tensor::cat(parts, 1), want);
        assert!(
            diff <= 1e-5,
            "window {window}: chunked prefill differs from the full mask by {diff}"
        );
    }
}

kv_core::backend_tests!(
    banded_window_prefill_equals_the_window_mask_over_every_key,
    gated_retention_of_three_scalar_tokens_matches_a_hand_computation,
    windowed_causality_matches_an_explicit_mask,
    sliding_window_decode_matches_forward_and_never_holds_more_than_the_window,
    retention_parallel_chunkwise_and_recurrent_forms_agree,
    gated_retention_decode_matches_forward,
    cross_attention_over_the_global_cache_matches_forward_and_is_causal,
);
