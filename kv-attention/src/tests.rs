//! Backend-generic attention tests.

use crate::*;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;

fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

fn randn<B: Backend, const D: usize>(shape: [usize; D], dev: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), dev)
}

fn pos<B: Backend>(p: &[i64], dev: &B::Device) -> Tensor<B, 3, Int> {
    Tensor::<B, 1, Int>::from_ints(p, dev).reshape([1, 1, p.len()])
}

fn rope_dot_products_depend_only_on_relative_position<B: Backend>(dev: &B::Device) {
    let rope = RotaryConfig::new(16).init::<B>(dev).unwrap();
    let q = randn::<B, 4>([1, 2, 1, 16], dev);
    let k = randn::<B, 4>([1, 2, 1, 16], dev);
    let dot = |pq: i64, pk: i64| {
        let qr = rope.apply(q.clone(), pos(&[pq], dev));
        let kr = rope.apply(k.clone(), pos(&[pk], dev));
        (qr * kr).sum_dim(3)
    };
    let base = dot(7, 3);
    for shift in [1, 10, 100, 1000] {
        let diff = max_abs_diff(base.clone(), dot(7 + shift, 3 + shift));
        assert!(diff <= 1e-3, "shift {shift}: q.k changed by {diff}");
    }
    // Different relative distance does change it (the test can fail).
    assert!(max_abs_diff(base, dot(8, 3)) > 1e-3);
}

fn rope_rerotation_by_delta_equals_rotation_at_target<B: Backend>(dev: &B::Device) {
    let rope = RotaryConfig::new(8).init::<B>(dev).unwrap();
    let k = randn::<B, 4>([2, 3, 5, 8], dev);
    let p = [0, 4, 9, 20, 33];
    for delta in [-4i64, 3, 17] {
        let direct = rope.apply(k.clone(), pos(&p.map(|x| x + delta), dev));
        let rerot = rope.apply(rope.apply(k.clone(), pos(&p, dev)), pos(&[delta; 5], dev));
        let diff = max_abs_diff(direct, rerot);
        assert!(diff <= 1e-4, "delta {delta}: {diff}");
    }
    // Position 0 is the identity.
    assert!(max_abs_diff(rope.apply(k.clone(), pos(&[0; 5], dev)), k) <= 1e-7);
}

fn rope_rejects_odd_dim<B: Backend>(dev: &B::Device) {
    let err = RotaryConfig::new(7).init::<B>(dev).unwrap_err().to_string();
    assert!(err.contains("= 7") && err.contains("even"), "{err}");
}

/// Reference: repeat K/V per query head and loop over heads explicitly.
fn reference<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool, scale: f64) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let [b, h, t, _] = q.dims();
    let [_, kvh, n, _] = k.dims();
    let r = h / kvh;
    let mut outs = Vec::new();
    let mut sums = Vec::new();
    for head in 0..h {
        let g = head / r;
        let qh = q.clone().narrow(1, head, 1);
        let kh = k.clone().narrow(1, g, 1);
        let vh = v.clone().narrow(1, g, 1);
        let mut s = qh.matmul(kh.swap_dims(2, 3)).mul_scalar(scale);
        if causal {
            let mask = Tensor::<B, 2, Bool>::tril_mask([t, n], (n - t) as i64, &s.device()).reshape([1, 1, t, n]).expand([b, 1, t, n]);
            s = s.mask_fill(mask, f32::NEG_INFINITY);
        }
        let p = softmax(s, 3);
        sums.push(p.clone().sum_dim(2).reshape([b, 1, n]));
        outs.push(p.matmul(vh));
    }
    (Tensor::cat(outs, 1), Tensor::cat(sums, 1))
}

fn grouped_broadcast_equals_repeated_heads<B: Backend>(dev: &B::Device) {
    for (h, kvh, t, n) in [(4, 4, 6, 6), (4, 2, 6, 6), (8, 1, 5, 5), (4, 2, 1, 9), (4, 1, 3, 11)] {
        let (q, k, v) = (randn::<B, 4>([2, h, t, 8], dev), randn::<B, 4>([2, kvh, n, 8], dev), randn::<B, 4>([2, kvh, n, 8], dev));
        let causality = Causality::ByPosition {
            query: Tensor::arange((n - t) as i64..n as i64, dev),
            key: position_range(0, n, dev),
        };
        let observe = ObserveRequest { column_sums: true, window: 2 };
        let (out, obs) = grouped_attention(q.clone(), &[(k.clone(), v.clone())], &causality, 0.35, observe);
        // The same keys split into two segments (a cache's body and tail) give the same result.
        if n > 2 {
            let split = [(k.clone().narrow(2, 0, n - 2), v.clone().narrow(2, 0, n - 2)), (k.clone().narrow(2, n - 2, 2), v.clone().narrow(2, n - 2, 2))];
            let (seg_out, _) = grouped_attention(q.clone(), &split, &causality, 0.35, ObserveRequest::default());
            assert!(max_abs_diff(seg_out, out.clone()) <= 1e-6, "segments h={h} kv={kvh}");
        }
        let (want, want_sums) = reference(q, k, v, true, 0.35);
        assert!(max_abs_diff(out, want) <= 1e-5, "h={h} kv={kvh}");
        let obs = obs.unwrap();
        assert!(max_abs_diff(obs.column_sums.unwrap(), want_sums) <= 1e-5);
        assert_eq!(obs.window.unwrap().dims(), [2, h, 2.min(t), n]);
    }
}

fn blocked_prefill_observes_what_one_block_would<B: Backend>(dev: &B::Device) {
    // Longer than one query block, so column sums accumulate across blocks.
    let (h, kvh, t) = (2, 1, QUERY_BLOCK + 37);
    let (q, k, v) = (randn::<B, 4>([1, h, t, 4], dev), randn::<B, 4>([1, kvh, t, 4], dev), randn::<B, 4>([1, kvh, t, 4], dev));
    let causality = Causality::ByPosition { query: Tensor::arange(0..t as i64, dev), key: position_range(0, t, dev) };
    let w = 50; // straddles the block boundary
    let (out, obs) = grouped_attention(q.clone(), &[(k.clone(), v.clone())], &causality, 0.5, ObserveRequest { column_sums: true, window: w });
    let (want, want_sums) = reference(q.clone(), k.clone(), v, true, 0.5);
    assert!(max_abs_diff(out, want) <= 1e-5);
    let obs = obs.unwrap();
    assert!(max_abs_diff(obs.column_sums.unwrap(), want_sums) <= 1e-3);
    // The window rows are the causal softmax rows of the last w queries.
    let s = q.narrow(2, t - w, w).matmul(k.swap_dims(2, 3).expand([1, h, 4, t])).mul_scalar(0.5);
    let mask = Tensor::<B, 2, Bool>::tril_mask([w, t], (t - w) as i64, dev).reshape([1, 1, w, t]).expand([1, h, w, t]);
    let want_win = softmax(s.mask_fill(mask, f32::NEG_INFINITY), 3);
    assert!(max_abs_diff(obs.window.unwrap(), want_win) <= 1e-5);
}

fn cached_layer_matches_full_forward<B: Backend>(dev: &B::Device) {
    for (h, kvh) in [(4, 4), (4, 2), (4, 1)] {
        let attn = GroupedAttentionConfig::new(32, h, kvh).init::<B>(dev).unwrap();
        let x = randn::<B, 3>([2, 10, 32], dev);
        let full = attn.forward(x.clone());
        for split in [1, 4, 9] {
            let mut cache = kv_core::LayerCache::new(attn.cache_shape(2), dev);
            let mut parts = vec![attn.forward_cached(x.clone().narrow(1, 0, split), &mut cache, ObserveRequest::default()).unwrap().output];
            for i in split..10 {
                parts.push(attn.forward_cached(x.clone().narrow(1, i, 1), &mut cache, ObserveRequest::default()).unwrap().output);
            }
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(diff <= 1e-5, "heads {h}/{kvh} split {split}: {diff}");
            assert_eq!(cache.slots(), 10);
        }
    }
}

fn bad_head_layouts_are_errors<B: Backend>(dev: &B::Device) {
    let err = GroupedAttentionConfig::new(32, 4, 3).init::<B>(dev).unwrap_err().to_string();
    assert!(err.contains("kv_heads = 3") && err.contains("heads = 4"), "{err}");
    let err = GroupedAttentionConfig::new(12, 4, 4).init::<B>(dev).unwrap_err().to_string();
    assert!(err.contains("head_dim = 3"), "{err}");
    let err = GroupedAttentionConfig::new(30, 4, 4).init::<B>(dev).unwrap_err().to_string();
    assert!(err.contains("d_model = 30"), "{err}");
}

kv_core::backend_tests!(
    rope_dot_products_depend_only_on_relative_position,
    rope_rerotation_by_delta_equals_rotation_at_target,
    rope_rejects_odd_dim,
    grouped_broadcast_equals_repeated_heads,
    blocked_prefill_observes_what_one_block_would,
    cached_layer_matches_full_forward,
    bad_head_layouts_are_errors,
);

