//! DMC's invariants: no merges is the base layer with its decision channel zeroed, a merged run
//! is the omega-weighted mean of its last `window` pre-RoPE keys rotated at its last position,
//! the training path with hard decisions equals the merged cache, the slots held are what the
//! decisions imply, and the relaxed fade keeps its gradient.

use crate::*;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::tests::{max_abs_diff, randn};

/// A DMC layer over 8 query heads and `kv` KV heads of width 8 (full RoPE, so the decision
/// channel sits in a RoPE pair), decisions offset by `init_bias`.
fn layer<B: Backend>(
    kv: usize,
    init_bias: f64,
    window: usize,
    bias: bool,
    dev: &B::Device,
) -> DmcAttention<B> {
    layer_with::<B>(kv, init_bias, window, bias, false, dev)
}

/// [`layer`], with the official rule's second zeroing of the decision channel on or off.
fn layer_with<B: Backend>(
    kv: usize,
    init_bias: f64,
    window: usize,
    bias: bool,
    zero_after_rope: bool,
    dev: &B::Device,
) -> DmcAttention<B> {
    B::seed(dev, 7);
    let attention = GroupedAttentionConfig::new(64, 8, kv).with_qkv_bias(Some(bias));
    DmcAttentionConfig::new(attention)
        .with_init_bias(init_bias)
        .with_window(window)
        .with_zero_after_rope(zero_after_rope)
        .init(dev)
        .unwrap()
}

/// Every token's merge decision of `dmc` on `x`, per (batch row, KV head), from its logits: a
/// token merges iff its logit is positive and it is not its sequence's first.
fn decisions_of<B: Backend>(dmc: &DmcAttention<B>, x: &Tensor<B, 3>) -> Vec<Vec<bool>> {
    let [_, t, _] = x.dims();
    let (q, k, _) = dmc.attention.project_unrotated(x.clone(), None);
    let (logit, _) = dmc.decisions(&q, &k);
    let logit: Vec<f32> = logit.into_data().iter::<f32>().collect();
    logit
        .chunks(t)
        .map(|head| {
            head.iter()
                .enumerate()
                .map(|(i, &l)| i > 0 && l > 0.0)
                .collect()
        })
        .collect()
}

/// The longest run of tokens merged into one slot.
fn longest_run(merges: &[Vec<bool>]) -> usize {
    merges
        .iter()
        .map(|m| {
            let (mut best, mut run) = (0, 0);
            for &merge in m {
                run = if merge { run + 1 } else { 1 };
                best = best.max(run);
            }
            best
        })
        .max()
        .unwrap_or(0)
}

/// Runs `x` through the cached path in chunks of the given lengths; returns every output row.
fn cached<B: Backend>(
    dmc: &DmcAttention<B>,
    x: &Tensor<B, 3>,
    chunks: &[usize],
    state: &mut kv_core::KvState<B>,
) -> Tensor<B, 3> {
    let mut at = 0;
    let mut outs = vec![];
    for &n in chunks {
        outs.push(
            dmc.forward_cached(x.clone().narrow(1, at, n), state, ObserveRequest::default())
                .unwrap()
                .output,
        );
        at += n;
    }
    Tensor::cat(outs, 1)
}

fn never_merging_equals_the_base_layer_with_the_decision_channel_zeroed<B: Backend>(
    dev: &B::Device,
) {
    for kv in [8, 2] {
        let dmc = layer::<B>(kv, 1e4, 12, false, dev);
        let x = randn::<B, 3>([2, 9, 64], dev);
        // The base layer: the same weights, the decision channel's query and key columns zeroed.
        let mut base = dmc.attention.clone();
        let d = base.head_dim();
        for (linear, heads) in [(&mut base.wq, 8), (&mut base.wk, kv)] {
            let keep: Vec<f32> = (0..heads * d)
                .map(|i| if i % d == d - 1 { 0.0 } else { 1.0 })
                .collect();
            let keep = Tensor::<B, 1>::from_floats(keep.as_slice(), dev).unsqueeze_dim(0);
            linear.weight = Param::from_tensor(linear.weight.val() * keep);
        }
        let want = base.forward(x.clone());
        let diff = max_abs_diff(dmc.forward(x.clone()), want.clone());
        assert!(
            diff < 1e-5,
            "kv {kv}: training path differs from the base layer by {diff}"
        );
        let mut state = dmc.new_state(2, dev);
        let diff = max_abs_diff(cached(&dmc, &x, &[5, 1, 1, 2], &mut state), want);
        assert!(
            diff < 1e-5,
            "kv {kv}: cached path differs from the base layer by {diff}"
        );
        assert_eq!(
            state.cache.slots_per_head(),
            vec![9; 2 * kv],
            "no merge: one slot per token"
        );
        // And the base layer without zeroing differs (the channel mattered: the test can fail).
        assert!(max_abs_diff(dmc.forward(x.clone()), dmc.attention.forward(x)) > 1e-4);
    }
}

fn a_merged_run_is_the_omega_weighted_mean_of_its_pre_rope_keys_rotated_at_its_last_position<
    B: Backend,
>(
    dev: &B::Device,
) {
    // Every key asks to merge (its decision channel's bias is huge); the query channel stays
    // random, so the importances differ token by token.
    let mut dmc = layer::<B>(2, 5.0, 12, true, dev);
    let d = dmc.attention.head_dim();
    let bias: Vec<f32> = (0..2 * d)
        .map(|i| if i % d == d - 1 { 1e4 } else { 0.0 })
        .collect();
    dmc.attention.wk.bias = Some(Param::from_tensor(Tensor::from_floats(
        bias.as_slice(),
        dev,
    )));
    let x = randn::<B, 3>([1, 5, 64], dev);
    let mut state = dmc.new_state(1, dev);
    dmc.forward_cached(x.clone(), &mut state, ObserveRequest::default())
        .unwrap();
    assert_eq!(
        state.cache.slots_per_head(),
        vec![1, 1],
        "five merges into one slot per head"
    );
    let (q, k, v) = dmc.attention.project_unrotated(x, None);
    let (_, omega) = dmc.decisions(&q, &k);
    let spread = (omega.clone().max() - omega.clone().min())
        .into_scalar()
        .elem::<f32>();
    assert!(spread > 1e-3, "importances should differ ({spread})");
    let k = Tensor::cat(
        vec![
            k.clone().narrow(3, 0, d - 1),
            Tensor::zeros([1, 2, 5, 1], dev),
        ],
        3,
    );
    let w = omega.reshape([1, 2, 5, 1]);
    let mean = |x: Tensor<B, 4>| (x * w.clone()).sum_dim(2) / w.clone().sum_dim(2);
    let key = dmc
        .attention
        .rope
        .apply(mean(k.clone()), position_range(4, 1, dev));
    let at_first = dmc.attention.rope.apply(mean(k), position_range(0, 1, dev));
    for (head, cache) in state.cache.head_caches().unwrap().iter().enumerate() {
        let diff = max_abs_diff(cache.keys(), key.clone().narrow(1, head, 1));
        assert!(
            diff < 1e-5,
            "head {head}: key differs from the rotated weighted mean by {diff}"
        );
        let diff = max_abs_diff(cache.values(), mean(v.clone()).narrow(1, head, 1));
        assert!(
            diff < 1e-5,
            "head {head}: value differs from the weighted mean by {diff}"
        );
        assert_eq!(
            cache
                .positions()
                .into_data()
                .iter::<i64>()
                .collect::<Vec<_>>(),
            vec![4],
            "a slot sits at the newest token it covers"
        );
    }
    // Rotated at the first position instead, the key would differ (the test can fail).
    assert!(
        max_abs_diff(
            state.cache.head_caches().unwrap()[0].keys(),
            at_first.narrow(1, 0, 1)
        ) > 1e-3
    );
}

fn a_run_longer_than_the_window_holds_the_mean_of_its_last_window_tokens<B: Backend>(
    dev: &B::Device,
) {
    // Every token merges; with a window of 3, the one slot of 7 tokens averages tokens 4, 5, 6
    // (the official rule: the oldest leave the running sums), whichever way the tokens arrive.
    let mut dmc = layer::<B>(2, 5.0, 3, true, dev);
    let d = dmc.attention.head_dim();
    let bias: Vec<f32> = (0..2 * d)
        .map(|i| if i % d == d - 1 { 1e4 } else { 0.0 })
        .collect();
    dmc.attention.wk.bias = Some(Param::from_tensor(Tensor::from_floats(
        bias.as_slice(),
        dev,
    )));
    let x = randn::<B, 3>([1, 7, 64], dev);
    let (q, k, v) = dmc.attention.project_unrotated(x.clone(), None);
    let (_, omega) = dmc.decisions(&q, &k);
    let k = Tensor::cat(
        vec![
            k.clone().narrow(3, 0, d - 1),
            Tensor::zeros([1, 2, 7, 1], dev),
        ],
        3,
    );
    let mean_of = |x: Tensor<B, 4>, from: usize| {
        let w = omega
            .clone()
            .narrow(2, from, 7 - from)
            .reshape([1, 2, 7 - from, 1]);
        (x.narrow(2, from, 7 - from) * w.clone()).sum_dim(2) / w.sum_dim(2)
    };
    let (key, value) = (
        dmc.attention
            .rope
            .apply(mean_of(k.clone(), 4), position_range(6, 1, dev)),
        mean_of(v.clone(), 4),
    );
    let whole_run = dmc
        .attention
        .rope
        .apply(mean_of(k, 0), position_range(6, 1, dev));
    let want = dmc.forward(x.clone());
    for chunks in [vec![7], vec![1; 7], vec![2, 5], vec![5, 1, 1]] {
        let mut state = dmc.new_state(1, dev);
        let got = cached(&dmc, &x, &chunks, &mut state);
        assert_eq!(
            state.cache.slots_per_head(),
            vec![1, 1],
            "{chunks:?}: one slot per head, however long the run"
        );
        for (head, cache) in state.cache.head_caches().unwrap().iter().enumerate() {
            let diff = max_abs_diff(cache.keys(), key.clone().narrow(1, head, 1));
            assert!(
                diff < 1e-5,
                "{chunks:?}, head {head}: key differs from the mean of the last 3 by {diff}"
            );
            let diff = max_abs_diff(cache.values(), value.clone().narrow(1, head, 1));
            assert!(
                diff < 1e-5,
                "{chunks:?}, head {head}: value differs from the mean of the last 3 by {diff}"
            );
        }
        // The mean of the whole run is another key (the test can fail).
        assert!(
            max_abs_diff(
                state.cache.head_caches().unwrap()[0].keys(),
                whole_run.clone().narrow(1, 0, 1)
            ) > 1e-3
        );
        let diff = max_abs_diff(got, want.clone());
        assert!(
            diff < 1e-4,
            "{chunks:?}: cached path differs from the training path by {diff}"
        );
        // The recent tokens kept for the next merge are metadata: 2 tokens' keys, values, weights.
        assert_eq!(
            state.stats().metadata_bytes - state.cache.stats().metadata_bytes,
            2 * 2 * (d + d + 1) * 4,
            "{chunks:?}"
        );
    }
}

fn hard_training_path_equals_the_merged_cache_however_the_tokens_arrive<B: Backend>(
    dev: &B::Device,
) {
    // init_bias 0: about half the tokens merge, so with windows of 3 and 4 some runs outgrow the
    // window and their oldest tokens leave the slot's mean. 300 tokens: past one query block of
    // the chunk kernel. Both RoPE zeroing rules.
    for (kv, window, t, zero_after_rope) in [
        (8, 4, 40, false),
        (2, 12, 40, false),
        (1, 3, 40, true),
        (2, 12, 300, false),
        (2, 3, 300, true),
    ] {
        let dmc = layer_with::<B>(kv, 0.0, window, false, zero_after_rope, dev);
        let x = randn::<B, 3>([2, t, 64], dev);
        let merges = decisions_of(&dmc, &x);
        if window < 12 {
            assert!(
                longest_run(&merges) > window,
                "window {window}: the test needs a run longer than the window"
            );
        }
        let want = dmc.forward(x.clone());
        for chunks in [
            vec![t],
            vec![1; t],
            vec![t / 3, 1, 1, t / 2, t - t / 3 - t / 2 - 2],
        ] {
            let mut state = dmc.new_state(2, dev);
            let diff = max_abs_diff(cached(&dmc, &x, &chunks, &mut state), want.clone());
            assert!(
                diff < 1e-4,
                "kv {kv}, window {window}, chunks {chunks:?}: cached path differs from the training path by {diff}"
            );
            let slots = state.cache.slots_per_head();
            let expected: Vec<usize> = merges
                .iter()
                .map(|m| m.iter().filter(|&&merge| !merge).count())
                .collect();
            assert_eq!(
                slots, expected,
                "kv {kv}, window {window}: a slot per append, however long the runs"
            );
        }
    }
}

fn slots_held_are_what_the_decisions_imply_and_bytes_follow_them<B: Backend>(dev: &B::Device) {
    let dmc = layer::<B>(2, 0.0, 5, false, dev);
    let (b, t) = (2, 30);
    let x = randn::<B, 3>([b, t, 64], dev);
    let mut state = dmc.new_state(b, dev);
    cached(&dmc, &x, &[10, 1, 1, 18], &mut state);
    // Independent count: a token merges iff its logit is positive and it is not the first; a
    // run longer than the window is still one slot.
    let merges = decisions_of(&dmc, &x);
    assert!(
        longest_run(&merges) > 5,
        "the test needs a run longer than the window"
    );
    let expected: Vec<usize> = merges
        .iter()
        .map(|m| m.iter().filter(|&&merge| !merge).count())
        .collect();
    assert_eq!(state.cache.slots_per_head(), expected);
    let stats = state.cache.stats();
    assert_eq!(
        stats.tokens_seen, t,
        "tokens seen counts every token, merged or not"
    );
    assert_eq!(
        stats.kv_bytes,
        expected.iter().sum::<usize>() * (8 + 8) * 4,
        "bytes held are the sum of the heads' slots"
    );
    // Compression ratio per head: tokens seen over slots held.
    let ratios: Vec<f64> = stats
        .slots_per_head
        .iter()
        .map(|&n| t as f64 / n as f64)
        .collect();
    assert!(ratios.iter().all(|&r| r > 1.0), "{ratios:?}");
}

fn the_next_token_rotates_at_tokens_seen_not_at_slots_held<B: Backend>(dev: &B::Device) {
    let dmc = layer::<B>(2, 0.0, 12, false, dev);
    let x = randn::<B, 3>([1, 21, 64], dev);
    let mut state = dmc.new_state(1, dev);
    cached(&dmc, &x, &[20], &mut state);
    assert!(state.cache.slots() < 20, "merges happened");
    assert_eq!(state.cache.rope_position(), 20);
    let step = dmc
        .forward_cached(
            x.clone().narrow(1, 20, 1),
            &mut state,
            ObserveRequest::default(),
        )
        .unwrap()
        .output;
    let want = dmc.forward(x).narrow(1, 20, 1);
    assert!(max_abs_diff(step, want) < 1e-4);
    for cache in state.cache.head_caches().unwrap() {
        let last = cache.positions().into_data().iter::<i64>().last().unwrap();
        assert_eq!(
            last, 20,
            "the newest slot covers the newest token, at position tokens seen - 1 = 20"
        );
    }
}

fn zeroing_after_rope_takes_the_decision_channel_out_of_the_rotated_keys_too<B: Backend>(
    dev: &B::Device,
) {
    // Never merging, the official rule is attention over queries and keys whose decision channel
    // is zero after RoPE as well: computed here by hand, and different from the default rule. A
    // RoPE base of 4 turns the channel's pair (the slowest) by a third of a radian per position,
    // so the sine half the official rule drops is large.
    let with_rule = |zero_after_rope: bool| {
        B::seed(dev, 7);
        let attention = GroupedAttentionConfig::new(64, 8, 2).with_rope_theta(4.0);
        DmcAttentionConfig::new(attention)
            .with_init_bias(1e4)
            .with_zero_after_rope(zero_after_rope)
            .init::<B>(dev)
            .unwrap()
    };
    let dmc = with_rule(true);
    let x = randn::<B, 3>([1, 9, 64], dev);
    let (q, k, v) = dmc.attention.project_unrotated(x.clone(), None);
    let d = dmc.attention.head_dim();
    let zero = |x: Tensor<B, 4>| {
        let [b, h, t, _] = x.dims();
        Tensor::cat(
            vec![x.narrow(3, 0, d - 1), Tensor::zeros([b, h, t, 1], dev)],
            3,
        )
    };
    let positions = position_range(0, 9, dev);
    let (q, k) = (
        zero(dmc.attention.rope.apply(zero(q), positions.clone())),
        zero(dmc.attention.rope.apply(zero(k), positions)),
    );
    let k = k
        .reshape([1, 2, 1, 9, d])
        .expand([1, 2, 4, 9, d])
        .reshape([1, 8, 9, d]);
    let v = v
        .reshape([1, 2, 1, 9, d])
        .expand([1, 2, 4, 9, d])
        .reshape([1, 8, 9, d]);
    let mask = Tensor::<B, 2, Bool>::tril_mask([9, 9], 0, dev)
        .reshape([1, 1, 9, 9])
        .expand([1, 8, 9, 9]);
    let p = burn::tensor::activation::softmax(
        q.matmul(k.swap_dims(2, 3))
            .mul_scalar(dmc.attention.scale())
            .mask_fill(mask, -1e9),
        3,
    );
    let want = dmc.attention.merge_heads(p.matmul(v));
    let diff = max_abs_diff(dmc.forward(x.clone()), want.clone());
    assert!(
        diff < 1e-5,
        "training path differs from the zeroed-after-RoPE attention by {diff}"
    );
    let mut state = dmc.new_state(1, dev);
    let diff = max_abs_diff(cached(&dmc, &x, &[4, 1, 4], &mut state), want.clone());
    assert!(
        diff < 1e-5,
        "cached path differs from the zeroed-after-RoPE attention by {diff}"
    );
    let diff = max_abs_diff(with_rule(false).forward(x), want);
    assert!(diff > 1e-3, "the two rules should differ ({diff})");
}

fn the_fade_keeps_a_gradient_for_confident_merges<B: Backend>(dev: &B::Device) {
    type A<B> = burn::backend::Autodiff<B>;
    let temperature = 0.1;
    // x / temperature = 20: 1 - sigmoid(20) rounds to 0 in f32, so log(clamp(1 - sigmoid)) is
    // flat there, while d/dx log(1 - sigmoid(x / t)) = -sigmoid(x / t) / t is about -10.
    for x in [20.0 * temperature, 0.3, -0.5] {
        let at = |x: f64| {
            merge_fade(Tensor::<B, 1>::from_floats([x as f32], dev), temperature)
                .into_scalar()
                .elem::<f64>()
        };
        let h = 1e-3;
        let finite = (at(x + h) - at(x - h)) / (2.0 * h);
        let input = Tensor::<A<B>, 1>::from_floats([x as f32], dev).require_grad();
        let grads = merge_fade(input.clone(), temperature).sum().backward();
        let grad = input.grad(&grads).unwrap().into_scalar().elem::<f64>();
        assert!(
            (grad - finite).abs() <= 1e-2 * finite.abs().max(1.0),
            "x {x}: autodiff {grad}, finite differences {finite}"
        );
        assert!(
            grad < 0.0,
            "x {x}: the fade should fall as the merge grows more confident ({grad})"
        );
        // The clamped form the stable one replaces has no gradient at x / t = 20.
        let input = Tensor::<A<B>, 1>::from_floats([x as f32], dev).require_grad();
        let clamped = burn::tensor::activation::sigmoid(input.clone().div_scalar(temperature))
            .neg()
            .add_scalar(1.0)
            .clamp_min(1e-30)
            .log();
        let grads = clamped.sum().backward();
        let flat = input
            .grad(&grads)
            .map_or(0.0, |g| g.into_scalar().elem::<f64>());
        if x == 20.0 * temperature {
            assert_eq!(flat, 0.0, "the clamped form saturates at x / t = 20");
        }
    }
}

fn merge_runs_with_relaxed_decisions_is_the_recurrence_within_its_window<B: Backend>(
    dev: &B::Device,
) {
    // acc_i = alpha_i acc_{i-1} + omega_i x_i, c_i = alpha_i c_{i-1} + omega_i, over a window
    // longer than the sequence: the windowed sums equal the plain recurrence.
    let (t, d) = (9, 3);
    let x = randn::<B, 4>([1, 1, t, d], dev);
    let omega = Tensor::<B, 3>::random([1, 1, t], Distribution::Uniform(0.1, 1.0), dev);
    let alpha = Tensor::<B, 3>::random([1, 1, t], Distribution::Uniform(0.0, 1.0), dev);
    let (got, z) = merge_runs(x.clone(), omega.clone(), alpha.clone(), 16);
    let (xs, om, al): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        x.into_data().iter().collect(),
        omega.into_data().iter().collect(),
        alpha.into_data().iter().collect(),
    );
    let (mut acc, mut c) = (vec![0.0f32; d], 0.0f32);
    let got: Vec<f32> = got.into_data().iter().collect();
    let z: Vec<f32> = z.into_data().iter().collect();
    for i in 0..t {
        let a = if i == 0 { 0.0 } else { al[i] };
        c = a * c + om[i];
        for j in 0..d {
            acc[j] = a * acc[j] + om[i] * xs[i * d + j];
            assert!(
                (got[i * d + j] - acc[j] / c).abs() < 1e-5,
                "token {i} channel {j}"
            );
        }
        assert!((z[i] - c).abs() < 1e-5, "token {i} weight");
    }
}

kv_core::backend_tests!(
    never_merging_equals_the_base_layer_with_the_decision_channel_zeroed,
    a_merged_run_is_the_omega_weighted_mean_of_its_pre_rope_keys_rotated_at_its_last_position,
    a_run_longer_than_the_window_holds_the_mean_of_its_last_window_tokens,
    hard_training_path_equals_the_merged_cache_however_the_tokens_arrive,
    slots_held_are_what_the_decisions_imply_and_bytes_follow_them,
    the_next_token_rotates_at_tokens_seen_not_at_slots_held,
    merge_runs_with_relaxed_decisions_is_the_recurrence_within_its_window,
    zeroing_after_rope_takes_the_decision_channel_out_of_the_rotated_keys_too,
    the_fade_keeps_a_gradient_for_confident_merges,
);
