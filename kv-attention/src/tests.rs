//! Backend-generic attention tests.

use crate::*;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;

/// The largest elementwise difference of two tensors (the kv-attention tests' tolerance check).
pub(crate) fn max_abs_diff<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

/// A tensor of standard normal draws.
pub(crate) fn randn<B: Backend, const D: usize>(
    shape: [usize; D],
    dev: &B::Device,
) -> Tensor<B, D> {
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

/// Positions shared by every row and head (one broadcast row of angles) rotate exactly as the same
/// positions given per head (a row of angles per head), on a transposed view as projections hand
/// it over, and rotate-half pairs feature `i` with `i + d/2` as HF Llama does.
fn rope_shared_positions_rotate_as_per_head_positions<B: Backend>(dev: &B::Device) {
    let rope = RotaryConfig::new(8).init::<B>(dev).unwrap();
    let x = randn::<B, 4>([2, 7, 3, 8], dev).swap_dims(1, 2);
    let p = [3i64, 0, 11, 40, 41, 1000, 7];
    let shared = rope.apply(x.clone(), pos(&p, dev));
    let per_head = rope.apply(x.clone(), pos(&p, dev).expand([2, 3, 7]));
    assert!(max_abs_diff(shared.clone(), per_head) <= 1e-6);
    // Feature 1 of the row at position 11: x1 cos(11 w) - x5 sin(11 w), w = 10000^(-2/8).
    let row = x
        .clone()
        .narrow(2, 2, 1)
        .narrow(0, 1, 1)
        .narrow(1, 2, 1)
        .reshape([8])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let got = shared
        .narrow(2, 2, 1)
        .narrow(0, 1, 1)
        .narrow(1, 2, 1)
        .reshape([8])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let angle = 11.0 * 10000f64.powf(-2.0 / 8.0);
    let want = row[1] as f64 * angle.cos() - row[5] as f64 * angle.sin();
    assert!((got[1] as f64 - want).abs() <= 1e-5, "{} vs {want}", got[1]);
    // Queries and keys rotated as a pair (one set of angles) equal each rotated alone, bit for
    // bit, with shared and with per-head positions.
    let k = randn::<B, 4>([2, 1, 7, 8], dev);
    for positions in [pos(&p, dev), pos(&p, dev).expand([2, 1, 7])] {
        let (pq, pk) = rope.apply_pair(x.clone().narrow(1, 0, 1), k.clone(), positions.clone());
        assert_eq!(
            max_abs_diff(pq, rope.apply(x.clone().narrow(1, 0, 1), positions.clone())),
            0.0
        );
        assert_eq!(max_abs_diff(pk, rope.apply(k.clone(), positions)), 0.0);
    }
}

fn heads_split_and_merge_as_the_transposed_views_do<B: Backend>(dev: &B::Device) {
    for (b, t, n, d) in [(2, 5, 3, 4), (2, 1, 3, 4), (1, 7, 1, 8)] {
        let y = randn::<B, 3>([b, t, n * d], dev);
        let split = crate::heads::split_heads(y.clone(), n, d);
        assert_eq!(
            max_abs_diff(
                split.clone(),
                y.clone().reshape([b, t, n, d]).swap_dims(1, 2)
            ),
            0.0,
            "split {b}x{t}x{n}x{d}"
        );
        assert_eq!(
            max_abs_diff(crate::heads::merge_heads(split), y),
            0.0,
            "merge {b}x{t}x{n}x{d}"
        );
    }
}

fn swiglu_on_the_host_equals_silu_times_up<B: Backend>(dev: &B::Device) {
    use crate::attend::served::{Kernel, calls};
    // A prefill's gate and up projections (76 800 values) go to the host kernel; a decode
    // step's (128) stay on the backend.
    for (dims, host_serves) in [([2, 300, 128], true), ([1, 1, 128], false)] {
        let (g, u) = (
            randn::<B, 3>(dims, dev).mul_scalar(4.0),
            randn::<B, 3>(dims, dev),
        );
        let want = burn::tensor::activation::silu(g.clone()) * u.clone();
        let before = calls(Kernel::Prefill);
        let got = with_host_kernels(true, || swiglu(g, u));
        let served = calls(Kernel::Prefill) - before;
        assert_eq!(
            served == 1,
            host_serves && !B::ad_enabled(dev),
            "{dims:?}: served {served}"
        );
        let diff = max_abs_diff(got, want);
        assert!(diff <= 1e-5, "{dims:?}: {diff}");
    }
}

fn rope_rerotation_by_delta_equals_rotation_at_target<B: Backend>(dev: &B::Device) {
    // Full and partial rotary (4 of 8 dims rotated, the rest position-free).
    for rotated in [None, Some(4)] {
        let rope = RotaryConfig::new(8)
            .with_rotated(rotated)
            .init::<B>(dev)
            .unwrap();
        let k = randn::<B, 4>([2, 3, 5, 8], dev);
        let p = [0, 4, 9, 20, 33];
        for delta in [-4i64, 3, 17] {
            let direct = rope.apply(k.clone(), pos(&p.map(|x| x + delta), dev));
            let rerot = rope.apply(rope.apply(k.clone(), pos(&p, dev)), pos(&[delta; 5], dev));
            let diff = max_abs_diff(direct, rerot);
            assert!(diff <= 1e-4, "rotated {rotated:?}, delta {delta}: {diff}");
        }
        // Position 0 is the identity.
        assert!(max_abs_diff(rope.apply(k.clone(), pos(&[0; 5], dev)), k.clone()) <= 1e-7);
        let moved = rope.apply(k.clone(), pos(&[50; 5], dev));
        if let Some(r) = rotated {
            // Unrotated dims are untouched at any position, bit for bit; rotated ones move.
            assert_eq!(
                max_abs_diff(
                    moved.clone().narrow(3, r, 8 - r),
                    k.clone().narrow(3, r, 8 - r)
                ),
                0.0
            );
            assert!(max_abs_diff(moved.narrow(3, 0, r), k.narrow(3, 0, r)) > 1e-2);
        }
    }
    let err = RotaryConfig::new(8)
        .with_rotated(Some(5))
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_dims = 5"), "{err}");
}

fn rope_rejects_odd_dim<B: Backend>(dev: &B::Device) {
    let err = RotaryConfig::new(7).init::<B>(dev).unwrap_err().to_string();
    assert!(err.contains("= 7") && err.contains("even"), "{err}");
}

/// Reference: repeat K/V per query head and loop over heads explicitly.
fn reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
    scale: f64,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
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
            let mask = Tensor::<B, 2, Bool>::tril_mask([t, n], (n - t) as i64, &s.device())
                .reshape([1, 1, t, n])
                .expand([b, 1, t, n]);
            s = s.mask_fill(mask, f32::NEG_INFINITY);
        }
        let p = softmax(s, 3);
        sums.push(p.clone().sum_dim(2).reshape([b, 1, n]));
        outs.push(p.matmul(vh));
    }
    (Tensor::cat(outs, 1), Tensor::cat(sums, 1))
}

fn grouped_broadcast_equals_repeated_heads<B: Backend>(dev: &B::Device) {
    for (h, kvh, t, n) in [
        (4, 4, 6, 6),
        (4, 2, 6, 6),
        (8, 1, 5, 5),
        (4, 2, 1, 9),
        (4, 1, 3, 11),
    ] {
        let (q, k, v) = (
            randn::<B, 4>([2, h, t, 8], dev),
            randn::<B, 4>([2, kvh, n, 8], dev),
            randn::<B, 4>([2, kvh, n, 8], dev),
        );
        let causality = Causality::ByPosition {
            query: Tensor::arange((n - t) as i64..n as i64, dev),
            key: position_range(0, n, dev),
        };
        let observe = ObserveRequest {
            column_sums: true,
            window: 2,
            ..Default::default()
        };
        let (out, obs) = grouped_attention(
            q.clone(),
            &[(k.clone(), v.clone())],
            &causality,
            0.35,
            observe,
        );
        // The same keys split into two segments (a cache's body and tail) give the same result.
        if n > 2 {
            let split = [
                (k.clone().narrow(2, 0, n - 2), v.clone().narrow(2, 0, n - 2)),
                (k.clone().narrow(2, n - 2, 2), v.clone().narrow(2, n - 2, 2)),
            ];
            let (seg_out, _) = grouped_attention(
                q.clone(),
                &split,
                &causality,
                0.35,
                ObserveRequest::default(),
            );
            assert!(
                max_abs_diff(seg_out, out.clone()) <= 1e-6,
                "segments h={h} kv={kvh}"
            );
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
    let (q, k, v) = (
        randn::<B, 4>([1, h, t, 4], dev),
        randn::<B, 4>([1, kvh, t, 4], dev),
        randn::<B, 4>([1, kvh, t, 4], dev),
    );
    let causality = Causality::ByPosition {
        query: Tensor::arange(0..t as i64, dev),
        key: position_range(0, t, dev),
    };
    let w = 50; // straddles the block boundary
    let (out, obs) = grouped_attention(
        q.clone(),
        &[(k.clone(), v.clone())],
        &causality,
        0.5,
        ObserveRequest {
            column_sums: true,
            window: w,
            ..Default::default()
        },
    );
    let (want, want_sums) = reference(q.clone(), k.clone(), v, true, 0.5);
    assert!(max_abs_diff(out, want) <= 1e-5);
    let obs = obs.unwrap();
    assert!(max_abs_diff(obs.column_sums.unwrap(), want_sums) <= 1e-3);
    // The window rows are the causal softmax rows of the last w queries.
    let s = q
        .narrow(2, t - w, w)
        .matmul(k.swap_dims(2, 3).expand([1, h, 4, t]))
        .mul_scalar(0.5);
    let mask = Tensor::<B, 2, Bool>::tril_mask([w, t], (t - w) as i64, dev)
        .reshape([1, 1, w, t])
        .expand([1, h, w, t]);
    let want_win = softmax(s.mask_fill(mask, f32::NEG_INFINITY), 3);
    assert!(max_abs_diff(obs.window.unwrap(), want_win) <= 1e-5);
}

fn cached_layer_matches_full_forward<B: Backend>(dev: &B::Device) {
    for (h, kvh, key_shift) in [(4, 4, None), (4, 2, None), (4, 1, None), (4, 2, Some(true))] {
        let attn = GroupedAttentionConfig::new(32, h, kvh)
            .with_key_shift(key_shift)
            .init::<B>(dev)
            .unwrap();
        assert_eq!(attn.has_key_shift(), key_shift.is_some());
        let x = randn::<B, 3>([2, 10, 32], dev);
        let full = attn.forward(x.clone());
        for split in [1, 4, 9] {
            let mut state = attn.new_state(2, dev);
            let mut parts = vec![
                attn.forward_cached(
                    x.clone().narrow(1, 0, split),
                    &mut state,
                    ObserveRequest::default(),
                )
                .unwrap()
                .output,
            ];
            for i in split..10 {
                parts.push(
                    attn.forward_cached(
                        x.clone().narrow(1, i, 1),
                        &mut state,
                        ObserveRequest::default(),
                    )
                    .unwrap()
                    .output,
                );
            }
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(
                diff <= 1e-5,
                "heads {h}/{kvh} key shift {key_shift:?} split {split}: {diff}"
            );
            assert_eq!(state.cache.slots(), 10);
        }
    }
}

fn bad_head_layouts_are_errors<B: Backend>(dev: &B::Device) {
    let err = GroupedAttentionConfig::new(32, 4, 3)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kv_heads = 3") && err.contains("heads = 4"),
        "{err}"
    );
    let err = GroupedAttentionConfig::new(12, 4, 4)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("head_dim = 3"), "{err}");
    let err = GroupedAttentionConfig::new(30, 4, 4)
        .init::<B>(dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("d_model = 30"), "{err}");
}

fn split_parts_equal_concatenated_keys<B: Backend>(dev: &B::Device) {
    // Scores from feature-split parts equal those of the concatenated queries and keys, with the
    // cache given as two segments and a causal mask.
    let (h, kvh, t, n) = (4, 1, 3, 9);
    let (qa, qb) = (
        randn::<B, 4>([2, h, t, 6], dev),
        randn::<B, 4>([2, h, t, 2], dev),
    );
    let (ka, kb, v) = (
        randn::<B, 4>([2, kvh, n, 6], dev),
        randn::<B, 4>([2, kvh, n, 2], dev),
        randn::<B, 4>([2, kvh, n, 5], dev),
    );
    let causality = Causality::ByPosition {
        query: Tensor::arange((n - t) as i64..n as i64, dev),
        key: position_range(0, n, dev),
    };
    let observe = ObserveRequest {
        column_sums: true,
        window: 2,
        ..Default::default()
    };
    let seg = |lo: usize, len: usize| SplitSegment {
        keys: vec![ka.clone().narrow(2, lo, len), kb.clone().narrow(2, lo, len)],
        values: v.clone().narrow(2, lo, len),
    };
    let (out, obs) = grouped_attention_parts(
        &[qa.clone(), qb.clone()],
        &[seg(0, 5), seg(5, 4)],
        &causality,
        0.4,
        observe,
    );
    let (want, want_obs) = grouped_attention(
        Tensor::cat(vec![qa, qb], 3),
        &[(Tensor::cat(vec![ka, kb], 3), v)],
        &causality,
        0.4,
        observe,
    );
    assert!(max_abs_diff(out, want) <= 1e-5);
    let (obs, want_obs) = (obs.unwrap(), want_obs.unwrap());
    assert!(max_abs_diff(obs.column_sums.unwrap(), want_obs.column_sums.unwrap()) <= 1e-5);
    assert!(max_abs_diff(obs.window.unwrap(), want_obs.window.unwrap()) <= 1e-5);
}

/// A small MLA layer: d_model 32, 4 heads of 8, latent 12, RoPE 4, optional query latent.
fn small_mla<B: Backend>(heads: usize, query_latent: usize, dev: &B::Device) -> MlaAttention<B> {
    MlaAttentionConfig::new(32, heads, 8, 12, 4)
        .with_query_latent(query_latent)
        .init::<B>(dev)
        .unwrap()
}

/// Runs `x` through `mla` as a prefill of `split` tokens then one token at a time on `path`,
/// returning the outputs and every call's observation (column sums and a 2-query window).
fn mla_decode<B: Backend>(
    mla: &MlaAttention<B>,
    x: &Tensor<B, 3>,
    split: usize,
    path: MlaPath,
    dev: &B::Device,
) -> (Tensor<B, 3>, Vec<Observation<B>>, kv_core::LayerCache<B>) {
    let t = x.dims()[1];
    let observe = ObserveRequest {
        column_sums: true,
        window: 2,
        ..Default::default()
    };
    let mut cache = kv_core::LayerCache::new(mla.cache_shape(x.dims()[0]), dev);
    let mut outs = Vec::new();
    let mut observations = Vec::new();
    let mut lo = 0;
    for len in std::iter::once(split).chain(std::iter::repeat_n(1, t - split)) {
        let out = mla
            .forward_cached_with(x.clone().narrow(1, lo, len), &mut cache, observe, path)
            .unwrap();
        outs.push(out.output);
        observations.push(out.observation.unwrap());
        lo += len;
    }
    (Tensor::cat(outs, 1), observations, cache)
}

fn mla_absorbed_decode_matches_naive_and_full_forward<B: Backend>(dev: &B::Device) {
    for query_latent in [0, 16] {
        let mla = small_mla::<B>(4, query_latent, dev);
        for (t, split) in [(6, 1), (9, 4), (12, 12), (80, 70)] {
            let x = randn::<B, 3>([2, t, 32], dev);
            let full = mla.forward(x.clone());
            let (absorbed, abs_obs, cache) = mla_decode(&mla, &x, split, MlaPath::Absorbed, dev);
            let (naive, naive_obs, _) = mla_decode(&mla, &x, split, MlaPath::Naive, dev);
            let ctx = format!("query_latent {query_latent}, t {t}, split {split}");
            let diff = max_abs_diff(absorbed.clone(), naive.clone());
            assert!(diff <= 1e-4, "{ctx}: absorbed vs naive {diff}");
            let diff = max_abs_diff(absorbed.clone(), full);
            assert!(diff <= 1e-4, "{ctx}: absorbed vs full forward {diff}");
            // The default (naive prefill, absorbed decode) equals both, observations included.
            let (auto, auto_obs, _) = mla_decode(&mla, &x, split, MlaPath::Auto, dev);
            let diff = max_abs_diff(auto, absorbed);
            assert!(diff <= 1e-4, "{ctx}: auto vs absorbed {diff}");
            for (a, n) in auto_obs.iter().zip(&naive_obs) {
                assert!(
                    max_abs_diff(
                        a.column_sums.clone().unwrap(),
                        n.column_sums.clone().unwrap()
                    ) <= 1e-5,
                    "{ctx}: auto column sums"
                );
                assert!(
                    max_abs_diff(a.window.clone().unwrap(), n.window.clone().unwrap()) <= 1e-5,
                    "{ctx}: auto window"
                );
            }
            // Both paths observe the same attention, per query head, over the one latent head.
            for (a, n) in abs_obs.into_iter().zip(naive_obs) {
                assert_eq!(a.column_sums.as_ref().unwrap().dims()[1], 4);
                assert!(
                    max_abs_diff(a.column_sums.unwrap(), n.column_sums.unwrap()) <= 1e-5,
                    "{ctx}: column sums"
                );
                assert!(
                    max_abs_diff(a.window.unwrap(), n.window.unwrap()) <= 1e-5,
                    "{ctx}: window"
                );
            }
            assert_eq!(cache.slots(), t);
        }
    }
}

fn mla_cache_bytes_do_not_depend_on_heads<B: Backend>(dev: &B::Device) {
    let x = randn::<B, 3>([1, 7, 32], dev);
    for heads in [1, 2, 4, 8] {
        let mla = small_mla::<B>(heads, 0, dev);
        let (_, _, cache) = mla_decode(&mla, &x, 3, MlaPath::Absorbed, dev);
        // (kv_latent 12 + rope_dim 4) x 7 slots x 4 bytes, one cache head whatever the head count.
        let stats = cache.stats();
        assert_eq!(stats.kv_bytes, (12 + 4) * 7 * 4, "heads {heads}");
        assert_eq!(stats.slots_per_head, vec![7]);
    }
}

fn mla_scores_depend_only_on_relative_position<B: Backend>(dev: &B::Device) {
    let mla = small_mla::<B>(4, 0, dev);
    let x = randn::<B, 3>([1, 5, 32], dev);
    // Full pre-mask score matrices [1, H, 5, 5] with every token shifted by `start`.
    let scores = |start: usize| {
        let p = position_range::<B>(start, 5, dev);
        let (q_c, q_r) = mla.queries(x.clone(), p.clone());
        let (c, k_r) = mla.latent(x.clone(), p);
        let (k_c, _) = mla.up_project(c);
        q_c.matmul(k_c.swap_dims(2, 3)) + q_r.matmul(k_r.swap_dims(2, 3))
    };
    let base = scores(0);
    for shift in [1, 1000] {
        let diff = max_abs_diff(base.clone(), scores(shift));
        assert!(diff <= 1e-3, "shift {shift}: scores changed by {diff}");
    }
    // The RoPE part alone does depend on position (so the test could fail).
    let p = |s| position_range::<B>(s, 5, dev);
    let rope_part = |a: usize, b: usize| {
        mla.queries(x.clone(), p(a))
            .1
            .matmul(mla.latent(x.clone(), p(b)).1.swap_dims(2, 3))
    };
    assert!(max_abs_diff(rope_part(0, 0), rope_part(3, 0)) > 1e-3);
}

fn mla_bad_configs_name_the_value<B: Backend>(dev: &B::Device) {
    let base = || MlaAttentionConfig::new(32, 4, 8, 12, 4);
    let cases = [
        (
            MlaAttentionConfig {
                rope_dim: 7,
                ..base()
            },
            "rope_dim = 7",
        ),
        (
            MlaAttentionConfig {
                rope_dim: 0,
                ..base()
            },
            "rope_dim = 0",
        ),
        (
            MlaAttentionConfig {
                kv_latent: 0,
                ..base()
            },
            "kv_latent = 0",
        ),
        (
            MlaAttentionConfig {
                kv_latent: 40,
                ..base()
            },
            "kv_latent = 40",
        ),
        (MlaAttentionConfig::new(32, 1, 4, 12, 4), "kv_latent = 12"),
        (base().with_query_latent(64), "query_latent = 64"),
        (
            MlaAttentionConfig {
                n_heads: 0,
                ..base()
            },
            "heads = 0",
        ),
        (
            MlaAttentionConfig {
                head_dim: 0,
                ..base()
            },
            "head_dim = 0",
        ),
        (
            MlaAttentionConfig {
                d_model: 0,
                ..base()
            },
            "d_model = 0",
        ),
        (base().with_rope_theta(0.5), "rope_theta = 0.5"),
        (
            MlaAttentionConfig {
                head_dim: 7,
                ..base()
            },
            "fine: the content part is never rotated",
        ),
    ];
    for (cfg, want) in cases {
        match cfg.init::<B>(dev) {
            Ok(_) => assert!(want.starts_with("fine"), "{cfg:?} should fail with {want}"),
            Err(e) => assert!(e.to_string().contains(want), "{e} should mention {want}"),
        }
    }
    let err = MlaAttentionConfig {
        kv_latent: 40,
        ..base()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("d_model = 32"), "{err}");
    // A cache of another shape (a grouped layer's) is refused, not misread.
    let mla = small_mla::<B>(4, 0, dev);
    let mut wrong = kv_core::LayerCache::new(
        kv_core::CacheShape {
            batch: 1,
            kv_heads: 4,
            key_dim: 8,
            value_dim: 8,
        },
        dev,
    );
    let err = mla
        .forward_cached(
            randn::<B, 3>([1, 2, 32], dev),
            &mut wrong,
            ObserveRequest::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer cache shape") && err.contains("value_dim: 12"),
        "{err}"
    );
}

fn ragged_attention_equals_each_heads_rectangular_attention<B: Backend>(dev: &B::Device) {
    use kv_core::{CacheShape, LayerCache};
    let (batch, heads, kv, d, n) = (2, 4, 2, 8, 12);
    let mut full = LayerCache::<B>::new(
        CacheShape {
            batch,
            kv_heads: kv,
            key_dim: d,
            value_dim: d,
        },
        dev,
    );
    full.append(randn([batch, kv, n, d], dev), randn([batch, kv, n, d], dev))
        .unwrap();
    let keep: Vec<Vec<usize>> = vec![
        vec![0, 2, 5, 7, 11],
        (0..12).filter(|&i| i != 3).collect(),
        vec![4, 11],
        vec![1, 4, 9, 10],
    ];
    let mut ragged = full.clone();
    ragged.retain_per_head(&keep).unwrap();
    assert!(ragged.is_ragged());
    // Three queries at positions 9..12 (causal by remembered position), then one unmasked query.
    for (t, query_positions) in [
        (3, Some(Tensor::<B, 1, Int>::arange(9..12, dev))),
        (1, None),
    ] {
        let q = randn([batch, heads, t, d], dev);
        let request = ObserveRequest {
            column_sums: true,
            ..Default::default()
        };
        let (got, obs) = attend_cache(q.clone(), &ragged, query_positions.clone(), 0.3, request);
        let per_head = obs
            .and_then(|o| o.heads)
            .expect("ragged attention observes per head");
        assert_eq!(per_head.len(), batch * kv);
        assert_eq!(got.dims(), [batch, heads, t, d]);
        // Reference: every head of a rectangular cache keeps head i's slots; read group i from it.
        for (i, idx) in keep.iter().enumerate() {
            let (b, h) = (i / kv, i % kv);
            let mut rect = full.clone();
            rect.retain_per_head(&vec![idx.clone(); batch * kv])
                .unwrap();
            assert!(!rect.is_ragged());
            let (want, want_obs) =
                attend_cache(q.clone(), &rect, query_positions.clone(), 0.3, request);
            let group = heads / kv;
            let pick = |x: Tensor<B, 4>| x.narrow(0, b, 1).narrow(1, h * group, group);
            let diff = max_abs_diff(pick(got.clone()), pick(want));
            assert!(diff <= 1e-6, "t {t}, head {i}: {diff}");
            let want_sums = want_obs
                .and_then(|o| o.column_sums)
                .unwrap()
                .narrow(0, b, 1)
                .narrow(1, h * group, group);
            let got_sums = per_head[i]
                .column_sums
                .clone()
                .expect("column sums of the head's slots");
            assert_eq!(got_sums.dims(), [1, group, idx.len()]);
            let diff = max_abs_diff(got_sums, want_sums);
            assert!(diff <= 1e-6, "t {t}, head {i} column sums: {diff}");
        }
    }
}

fn band_sums_are_the_attention_of_the_queries_within_the_band_after_each_key<B: Backend>(
    dev: &B::Device,
) {
    let (heads, kv, d, n, band) = (4, 2, 8, 300, 7);
    let q = randn::<B, 4>([1, heads, n, d], dev);
    let (k, v) = (
        randn::<B, 4>([1, kv, n, d], dev),
        randn::<B, 4>([1, kv, n, d], dev),
    );
    let positions = Tensor::<B, 1, Int>::arange(0..n as i64, dev);
    let causality = Causality::ByPosition {
        query: positions.clone(),
        key: positions.clone().reshape([1, 1, n]),
    };
    // Two query blocks (n > QUERY_BLOCK), so the sums cross a block boundary.
    let request = ObserveRequest {
        band,
        column_sums: true,
        window: n,
        ..Default::default()
    };
    let (_, obs) = grouped_attention(q, &[(k, v)], &causality, 0.35, request);
    let obs = obs.unwrap();
    assert_eq!(obs.band, band);
    let probs: Vec<f32> = obs.window.unwrap().into_data().iter::<f32>().collect();
    let sums: Vec<f32> = obs.band_sums.unwrap().into_data().iter::<f32>().collect();
    let cols: Vec<f32> = obs.column_sums.unwrap().into_data().iter::<f32>().collect();
    for h in 0..heads {
        for j in 0..n {
            let want: f32 = (j..(j + band).min(n))
                .map(|i| probs[(h * n + i) * n + j])
                .sum();
            let got = sums[h * n + j];
            assert!(
                (got - want).abs() <= 1e-5,
                "head {h}, key {j}: {got} vs {want}"
            );
            assert!(got <= cols[h * n + j] + 1e-6);
        }
    }
}

fn mimetic_init_copies_each_groups_first_query_projection_into_its_keys<B: Backend>(
    dev: &B::Device,
) {
    let (d_model, heads, kv) = (32, 4, 2);
    let attn = GroupedAttentionConfig::new(d_model, heads, kv)
        .with_mimetic_init(Some(true))
        .init::<B>(dev)
        .unwrap();
    let d = attn.head_dim();
    let (wq, wk) = (attn.wq.weight.val(), attn.wk.weight.val());
    for g in 0..kv {
        let q_first = wq.clone().narrow(1, g * (heads / kv) * d, d);
        assert!(
            max_abs_diff(wk.clone().narrow(1, g * d, d), q_first) == 0.0,
            "group {g}"
        );
        // The group's other head leans towards the same key projection: a positive trace.
        let other = wq.clone().narrow(1, (g * (heads / kv) + 1) * d, d);
        let trace: f32 = other
            .transpose()
            .matmul(wk.clone().narrow(1, g * d, d))
            .mul(Tensor::eye(d, dev))
            .sum()
            .into_scalar()
            .elem();
        assert!(trace > 0.0, "group {g}: trace {trace}");
    }
    // So every head scores a key from the query's own input highest: q.k = |W x|^2 >= q.k' (for
    // the first head of each group, by Cauchy-Schwarz when the norms match, here on average).
    let x = randn::<B, 3>([1, 6, d_model], dev);
    let (q, k, _) = attn.project(x, 0, None);
    let scores = q
        .narrow(1, 0, 1)
        .matmul(k.narrow(1, 0, 1).swap_dims(2, 3))
        .reshape([6, 6]);
    let diag: f32 = scores
        .clone()
        .mul(Tensor::eye(6, dev))
        .sum()
        .into_scalar()
        .elem();
    let all: f32 = scores.sum().into_scalar().elem();
    assert!(
        diag / 6.0 > (all - diag) / 30.0,
        "diagonal {diag} vs all {all}"
    );
    // Without it, keys are drawn independently.
    let plain = GroupedAttentionConfig::new(d_model, heads, kv)
        .init::<B>(dev)
        .unwrap();
    assert!(
        max_abs_diff(
            plain.wk.weight.val().narrow(1, 0, d),
            plain.wq.weight.val().narrow(1, 0, d)
        ) > 0.0
    );
}

fn mla_reports_the_norms_of_the_keys_and_values_its_heads_use<B: Backend>(dev: &B::Device) {
    let heads = 4;
    let mla = small_mla::<B>(heads, 0, dev);
    let x = randn::<B, 3>([1, 10, 32], dev);
    let mut cache = kv_core::LayerCache::new(mla.cache_shape(1), dev);
    let request = ObserveRequest {
        key_norms: true,
        value_norms: true,
        ..Default::default()
    };
    let out = mla.forward_cached(x, &mut cache, request).unwrap();
    let obs = out.observation.unwrap();
    // Reference: every head's content key and value up-projected (the naive path), k_R shared.
    let (k_c, v) = mla.up_project(cache.values());
    let k_r = cache.keys();
    let want_keys = k_c.powi_scalar(2).sum_dim(3).sum_dim(1).reshape([1, 1, 10])
        + k_r
            .clone()
            .powi_scalar(2)
            .sum_dim(3)
            .reshape([1, 1, 10])
            .mul_scalar(heads as f64);
    let got_keys = obs.key_norms.unwrap();
    assert!(
        max_abs_diff(got_keys.clone(), want_keys.clone())
            <= 1e-3 * want_keys.clone().max().into_scalar().elem::<f32>(),
        "key norms"
    );
    let want_values = v.abs().sum_dim(3).reshape([1, heads, 10]);
    assert!(
        max_abs_diff(obs.value_norms.unwrap(), want_values) <= 1e-4,
        "value norms"
    );
    // The shared RoPE key alone ranks the slots differently: scoring it instead would be wrong.
    let rope_only: Vec<f32> = k_r
        .powi_scalar(2)
        .sum_dim(3)
        .into_data()
        .iter::<f32>()
        .collect();
    let full: Vec<f32> = got_keys.into_data().iter::<f32>().collect();
    let rank = |v: &[f32]| {
        let mut o: Vec<usize> = (0..v.len()).collect();
        o.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        o
    };
    assert_ne!(rank(&rope_only), rank(&full));
}

/// burn 0.21 parameters are lazy and a clone of a lazy one draws new weights: every `init` hands
/// back materialised parameters, so a clone of a fresh layer, taken before either is used,
/// computes what the layer does.
fn a_clone_of_a_fresh_layer_of_every_kind_has_its_weights<B: Backend>(dev: &B::Device) {
    let x = Tensor::<B, 3>::random([1, 6, 32], Distribution::Normal(0.0, 1.0), dev);
    let same = |a: Tensor<B, 3>, b: Tensor<B, 3>, kind: &str| {
        let diff = (a - b).abs().max().into_scalar().elem::<f32>();
        assert_eq!(diff, 0.0, "{kind}: a clone computes differently");
    };
    let grouped = GroupedAttentionConfig::new(32, 4, 2)
        .init::<B>(dev)
        .unwrap();
    let copy = grouped.clone();
    same(
        grouped.forward(x.clone()),
        copy.forward(x.clone()),
        "grouped",
    );
    let mla = MlaAttentionConfig::new(32, 4, 8, 12, 4)
        .init::<B>(dev)
        .unwrap();
    let copy = mla.clone();
    same(mla.forward(x.clone()), copy.forward(x.clone()), "mla");
    let window = SlidingWindowAttentionConfig::new(GroupedAttentionConfig::new(32, 4, 2), 3)
        .init::<B>(dev)
        .unwrap();
    let copy = window.clone();
    same(window.forward(x.clone()), copy.forward(x.clone()), "window");
    let retention = GatedRetentionConfig::new(32, 4).init::<B>(dev).unwrap();
    let copy = retention.clone();
    same(
        retention.forward(x.clone()),
        copy.forward(x.clone()),
        "retention",
    );
    let cross = CrossAttentionConfig::new(32, 4, 2);
    let global = cross.init_global::<B>(dev).unwrap();
    let copy = global.clone();
    let (k, v) = global.project(x.clone(), 0);
    let (k2, v2) = copy.project(x.clone(), 0);
    same(k.clone().flatten(2, 3), k2.flatten(2, 3), "global keys");
    same(v.clone().flatten(2, 3), v2.flatten(2, 3), "global values");
    let attn = cross.init::<B>(dev).unwrap();
    let copy = attn.clone();
    same(
        attn.forward(x.clone(), k.clone(), v.clone()),
        copy.forward(x, k, v),
        "cross",
    );
}

fn consecutive_causality_equals_the_positional_mask_with_every_observation<B: Backend>(
    dev: &B::Device,
) {
    // Past one query block, after older slots (a chunk), keys split in two segments as a cache's
    // body and tail: outputs and every observation as the mask built from positions gives.
    let (t, old) = (600, 37);
    let n = old + t;
    let q = randn::<B, 4>([1, 4, t, 8], dev);
    let (k, v) = (
        randn::<B, 4>([1, 2, n, 8], dev),
        randn::<B, 4>([1, 2, n, 8], dev),
    );
    let split = 500;
    let segments = [
        (k.clone().narrow(2, 0, split), v.clone().narrow(2, 0, split)),
        (k.narrow(2, split, n - split), v.narrow(2, split, n - split)),
    ];
    let observe = ObserveRequest {
        column_sums: true,
        window: 300,
        band: 5,
        ..Default::default()
    };
    let by_position = Causality::ByPosition {
        query: Tensor::arange(old as i64..n as i64, dev),
        key: position_range(0, n, dev),
    };
    let consecutive = Causality::Consecutive {
        first_query: old,
        first_key: 0,
    };
    let (want, want_obs) = grouped_attention(q.clone(), &segments, &by_position, 0.3, observe);
    let (got, got_obs) = grouped_attention(q, &segments, &consecutive, 0.3, observe);
    assert!(max_abs_diff(got, want) <= 1e-5);
    let (a, b) = (got_obs.unwrap(), want_obs.unwrap());
    assert!(
        max_abs_diff(a.column_sums.unwrap(), b.column_sums.unwrap()) <= 1e-5,
        "column sums"
    );
    assert!(
        max_abs_diff(a.band_sums.unwrap(), b.band_sums.unwrap()) <= 1e-5,
        "band sums"
    );
    assert!(
        max_abs_diff(a.window.unwrap(), b.window.unwrap()) <= 1e-5,
        "window"
    );
}

/// The fused prefill, in query blocks over each block's visible keys and spread over threads, on
/// the backend's kernel and on the host kernel, and the explicit kernel spread over threads, equal
/// the explicit kernel on one thread: a chunk
/// after older (partly evicted) slots, with an observed window straddling a block boundary and
/// column sums, for MHA, GQA and MQA.
fn prefill_in_blocks_on_threads_equals_the_explicit_kernel_on_one<B: Backend>(dev: &B::Device) {
    let (older, t, w, d) = (70, 2 * FUSED_BLOCK + 37, 45, 16);
    for (h, kvh) in [(4, 4), (4, 2), (4, 1)] {
        let mut cache = kv_core::LayerCache::<B>::new(
            kv_core::CacheShape {
                batch: 1,
                kv_heads: kvh,
                key_dim: d,
                value_dim: d,
            },
            dev,
        );
        cache
            .append(
                randn::<B, 4>([1, kvh, older, d], dev),
                randn::<B, 4>([1, kvh, older, d], dev),
            )
            .unwrap();
        // Evict every third older slot, so positions are not consecutive.
        let kept: Vec<i32> = (0..older as i32).filter(|i| i % 3 != 1).collect();
        let idx = Tensor::<B, 1, Int>::from_ints(kept.as_slice(), dev)
            .reshape([1, 1, kept.len()])
            .expand([1, kvh, kept.len()]);
        cache.retain(idx).unwrap();
        cache
            .append(
                randn::<B, 4>([1, kvh, t, d], dev),
                randn::<B, 4>([1, kvh, t, d], dev),
            )
            .unwrap();
        let q = randn::<B, 4>([1, h, t, d], dev);
        let seen = cache.tokens_seen();
        let causality = Causality::ByPosition {
            query: Tensor::arange((seen - t) as i64..seen as i64, dev),
            key: cache.positions(),
        };
        // The explicit kernel, on one thread, is the reference: the fused path serves the window
        // request, and column sums (H2O) take the explicit kernel itself, in blocks on threads.
        let observe = ObserveRequest {
            window: w,
            ..Default::default()
        };
        let sums = ObserveRequest {
            column_sums: true,
            ..observe
        };
        let (want, want_obs) = Kernels::backend_ops()
            .scope(|| grouped_attention(q.clone(), &cache.kv_segments(), &causality, 0.3, sums));
        let want_obs = want_obs.unwrap();
        let (want_window, want_sums) = (want_obs.window.unwrap(), want_obs.column_sums.unwrap());
        for (threads, host) in [(1, false), (3, false), (1, true), (3, true)] {
            let kernels = Kernels {
                host,
                isa: crate::Isa::best(),
                prefill_threads: threads,
            };
            let before = crate::attend::served::calls(crate::attend::served::Kernel::Prefill);
            let ((got, obs), (got_sums, obs_sums)) = kernels.scope(|| {
                (
                    attend_appended(q.clone(), &cache, 0.3, observe),
                    attend_appended(q.clone(), &cache, 0.3, sums),
                )
            });
            let served =
                crate::attend::served::calls(crate::attend::served::Kernel::Prefill) - before;
            if host && !B::ad_enabled(dev) {
                assert_eq!(served, 2, "the host kernel served both chunks");
            }
            let diff = max_abs_diff(got, want.clone());
            assert!(
                diff <= 1e-4,
                "heads {h}/{kvh}, {threads} threads, host kernel {host}: {diff}"
            );
            assert!(
                max_abs_diff(obs.unwrap().window.unwrap(), want_window.clone()) <= 1e-5,
                "heads {h}/{kvh}: window"
            );
            // Column sums: the explicit kernel on threads, or the host kernel's second pass.
            let tolerance = if host { 1e-4 } else { 1e-5 };
            assert!(
                max_abs_diff(got_sums, want.clone()) <= tolerance,
                "heads {h}/{kvh}, {threads} threads, host kernel {host}: output with column sums"
            );
            let obs = obs_sums.unwrap();
            assert!(
                max_abs_diff(obs.column_sums.unwrap(), want_sums.clone()) <= 1e-4,
                "heads {h}/{kvh}, {threads} threads, host kernel {host}: column sums"
            );
            assert!(
                max_abs_diff(obs.window.unwrap(), want_window.clone()) <= 1e-6,
                "heads {h}/{kvh}, {threads} threads, host kernel {host}: window"
            );
        }
    }
}

kv_core::backend_tests!(
    prefill_in_blocks_on_threads_equals_the_explicit_kernel_on_one,
    consecutive_causality_equals_the_positional_mask_with_every_observation,
    a_clone_of_a_fresh_layer_of_every_kind_has_its_weights,
    mla_reports_the_norms_of_the_keys_and_values_its_heads_use,
    mimetic_init_copies_each_groups_first_query_projection_into_its_keys,
    ragged_attention_equals_each_heads_rectangular_attention,
    band_sums_are_the_attention_of_the_queries_within_the_band_after_each_key,
    rope_dot_products_depend_only_on_relative_position,
    rope_rerotation_by_delta_equals_rotation_at_target,
    swiglu_on_the_host_equals_silu_times_up,
    heads_split_and_merge_as_the_transposed_views_do,
    rope_shared_positions_rotate_as_per_head_positions,
    rope_rejects_odd_dim,
    grouped_broadcast_equals_repeated_heads,
    blocked_prefill_observes_what_one_block_would,
    cached_layer_matches_full_forward,
    bad_head_layouts_are_errors,
    split_parts_equal_concatenated_keys,
    mla_absorbed_decode_matches_naive_and_full_forward,
    mla_cache_bytes_do_not_depend_on_heads,
    mla_scores_depend_only_on_relative_position,
    mla_bad_configs_name_the_value,
);
