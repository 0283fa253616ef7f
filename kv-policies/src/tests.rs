//! Policy tests: spec parsing, the invariant matrix and each method's own invariants.

use crate::*;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use kv_attention::CachedAttention;
use kv_attention::{
    GroupedAttention, GroupedAttentionConfig, Observation, ObserveRequest, position_range,
};
use kv_core::{Budget, KvState, LayerCache};

const D_MODEL: usize = 32;

/// Attention layers with their caches, driven the way the decoder drives them.
struct Stack<B: Backend> {
    layers: Vec<GroupedAttention<B>>,
    states: Vec<KvState<B>>,
}

impl<B: Backend> Stack<B> {
    fn new(n_layers: usize, heads: usize, kv: usize, dev: &B::Device) -> Self {
        let layers: Vec<_> = (0..n_layers)
            .map(|_| {
                GroupedAttentionConfig::new(D_MODEL, heads, kv)
                    .init::<B>(dev)
                    .unwrap()
            })
            .collect();
        let states = layers.iter().map(|l| l.new_state(1, dev)).collect();
        Self { layers, states }
    }

    /// Every layer's cache.
    fn caches(&self) -> Vec<&LayerCache<B>> {
        self.states.iter().map(|s| &s.cache).collect()
    }

    /// Runs `t` random tokens through every layer under `policy`; before the policy acts, a "tag"
    /// side channel is set to each slot's position, so alignment can be checked afterwards.
    fn run(&mut self, t: usize, policy: &mut dyn CachePolicy<B>, phase: Phase, dev: &B::Device) {
        let xs: Vec<_> = self
            .layers
            .iter()
            .map(|_| Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev))
            .collect();
        self.run_inputs(&xs, policy, phase);
    }

    /// [`run`](Self::run) with each layer's input given, `[1, t, d_model]`.
    fn run_inputs(&mut self, xs: &[Tensor<B, 3>], policy: &mut dyn CachePolicy<B>, phase: Phase) {
        let n_layers = self.layers.len();
        for (i, (layer, cache)) in self.layers.iter().zip(self.states.iter_mut()).enumerate() {
            let ctx = LayerContext {
                layer: i,
                n_layers,
                n_heads: layer.n_heads(),
                phase,
                rope: Some(&layer.rope),
                tokens: None,
            };
            let x = xs[i].clone();
            drive_layer(policy, &ctx, cache, |state, request| {
                let out = layer.forward_cached(x, state, request)?;
                let cache = &mut state.cache;
                if !cache.is_ragged() {
                    cache.add_side("tag");
                    cache.set_side("tag", cache.positions().float())?;
                }
                Ok((out.output, out.observation))
            })
            .unwrap();
        }
    }
}

fn ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// What a cache keeps: a copy with its lazily evicted slots compacted away.
fn kept<B: Backend>(c: &LayerCache<B>) -> LayerCache<B> {
    let mut c = c.clone();
    c.compact();
    c
}

/// Positions per KV head of a batch-1 cache, of the slots it keeps.
fn head_positions<B: Backend>(c: &LayerCache<B>) -> Vec<Vec<i64>> {
    c.kept_positions()
}

#[test]
fn lists_of_specs_split_where_a_new_policy_starts() {
    let given = vec![
        "full,snapkv:window=64,kernel=5,pool=avg,h2o".to_string(),
        "knorm:skip=0".into(),
        "tova,every=0".into(),
    ];
    assert_eq!(
        split_specs(&given),
        vec![
            "full",
            "snapkv:window=64,kernel=5,pool=avg",
            "h2o",
            "knorm:skip=0",
            "tova:every=0"
        ]
    );
}

#[test]
fn specs_parse_and_bad_ones_say_what_is_valid() {
    type B = burn::backend::Flex;
    for spec in [
        "full",
        "streaming:budget=64,sinks=2,rerotate=true",
        "h2o:budget=0.2,recent=0.5,normalize=true",
        "vatp",
        "knorm:skip=1",
        "snapkv:budget=0.5,window=32,kernel=7,pool=max",
    ] {
        build_policy::<B>(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    let e = build_policy::<B>("adakw").err().unwrap().to_string();
    assert!(
        e.contains("unknown policy 'adakw'") && e.contains("pyramidkv, adakv"),
        "{e}"
    );
    for spec in [
        "adakv",
        "adakv:budget=0.3,min_share=0.5,scorer=h2o,recent=0.25",
        "adakv:scorer=snapkv,window=8,kernel=3",
    ] {
        build_policy::<B>(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    let e = build_policy::<B>("adakv:scorer=streaming")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("adakv:scorer = streaming") && e.contains("snapkv, h2o"),
        "{e}"
    );
    let e = build_policy::<B>("adakv:every=4")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("once, at the end of prefill"), "{e}");
    let e = build_policy::<B>("adakv:min_share=2")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("min_share = 2"), "{e}");
    let e = build_policy::<B>("adakv:scorer=h2o,window=8")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("window") && e.contains("recent"), "{e}");
    let e = build_policy::<B>("snapkv:windo=3")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("windo") && e.contains("window, kernel"), "{e}");
    let e = build_policy::<B>("h2o:budget=1.5")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("h2o:budget = 1.5") && e.contains("(0, 1]"),
        "{e}"
    );
    let e = build_policy::<B>("snapkv:kernel=4")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("kernel = 4") && e.contains("odd"), "{e}");
    let e = build_policy::<B>("full:budget=0.5")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("budget") && e.contains("none"), "{e}");
    assert!(
        build_policy::<B>("streaming:rerotate=maybe")
            .err()
            .unwrap()
            .to_string()
            .contains("true or false")
    );
    // A key given twice is an error, not "the last one wins", whatever its spelling.
    let e = build_policy::<B>("h2o:budget=0.5,Budget=0.6")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("h2o:budget") && e.contains("twice") && e.contains("at most once"),
        "{e}"
    );
}

/// Parameters a scorer needs for the invariant tests' 40-token prompts (SnapKV's default window
/// of 64 would cover the whole prompt; key-norm's default skips the first two layers).
fn test_params(scorer: &str) -> &'static str {
    match scorer {
        "snapkv" => "window=8,kernel=3",
        "knorm" => "skip=0",
        _ => "",
    }
}

/// Every scorer the standard registry holds, with [`test_params`], as specs without a budget;
/// a scorer registered later is covered with no test edit.
fn registered_scorers<B: Backend>(per_head_only: bool) -> Vec<String> {
    let registry = Registry::<B>::standard();
    let names: Vec<String> = match per_head_only {
        true => registry
            .per_head_scorers("snapkv")
            .iter()
            .map(|n| n.to_string())
            .collect(),
        false => registry
            .entries()
            .iter()
            .filter(|e| matches!(e.kind, crate::EntryKind::Scorer { .. }))
            .map(|e| e.name.clone())
            .collect(),
    };
    assert!(names.len() >= 5, "registered scorers: {names:?}");
    names
        .into_iter()
        .map(|n| match test_params(&n) {
            "" => n,
            p => format!("{n}:{p}"),
        })
        .collect()
}

/// Scorers that protect neither sinks nor a recent window, so the newest token may go.
const NEWEST_MAY_GO: &[&str] = &["knorm", "tova"];

fn invariant_matrix<B: Backend>(dev: &B::Device) {
    let (prompt, steps) = (40, 12);
    // Every registered scorer, plus the variants whose invariants differ.
    let mut kinds = registered_scorers::<B>(false);
    kinds.extend([
        "streaming:rerotate=true".into(),
        "h2o:normalize=true".into(),
    ]);
    for kind in &kinds {
        let kind = kind.as_str();
        for every in [0, 1] {
            for (heads, kv) in [(4, 4), (4, 2), (4, 1)] {
                for ratio in [0.2f32, 0.8] {
                    let sep = if kind.contains(':') { "," } else { ":" };
                    let spec = format!("{kind}{sep}budget={ratio},every={every}");
                    let mut policy = build_policy::<B>(&spec).unwrap();
                    let mut stack = Stack::<B>::new(2, heads, kv, dev);
                    let budget = Budget::Ratio(ratio);
                    stack.run(prompt, policy.as_mut(), Phase::Prefill, dev);
                    let mut expected = budget.slots_for(prompt);
                    for step in 0..=steps {
                        if step > 0 {
                            stack.run(1, policy.as_mut(), Phase::Decode { step }, dev);
                            expected = if every == 1 {
                                budget.slots_for(prompt + step)
                            } else {
                                expected + 1
                            };
                        }
                        let seen = prompt + step;
                        for c in stack.caches() {
                            let ctx = format!("{spec} heads {heads}/{kv} step {step}");
                            assert_eq!(c.live_slots(), expected, "{ctx}: slots");
                            assert_eq!(c.tokens_seen(), seen, "{ctx}");
                            if kind.contains("rerotate") {
                                // Re-rotated: the next token sits at the slot count plus the frame
                                // offset, which returns to 0 at least every TAIL_SLOTS evictions.
                                assert!(
                                    c.rope_position() >= c.live_slots()
                                        && crate::frame_offset(c) < kv_core::TAIL_SLOTS,
                                    "{ctx}: rerotated rope position {}",
                                    c.rope_position()
                                );
                            } else {
                                assert_eq!(c.rope_position(), seen, "{ctx}: rope position");
                            }
                            for h in head_positions(c) {
                                assert!(
                                    h.windows(2).all(|w| w[0] < w[1]),
                                    "{ctx}: positions {h:?}"
                                );
                                // Methods with a recent window or sinks keep the newest token.
                                let name = kind.split(':').next().unwrap_or(kind);
                                if !NEWEST_MAY_GO.contains(&name) {
                                    assert_eq!(
                                        *h.last().unwrap(),
                                        seen as i64 - 1,
                                        "{ctx}: newest token kept"
                                    );
                                }
                            }
                            let c = kept(c);
                            let tags = floats(c.side("tag").unwrap());
                            let pos: Vec<f32> =
                                ints(c.positions()).iter().map(|&p| p as f32).collect();
                            assert_eq!(tags, pos, "{ctx}: side data out of line");
                        }
                    }
                }
            }
        }
    }
}

/// A random `heads`/`kv` layer prefilled with `t` random inputs under the policy `spec`: the
/// layer, its cache after the policy acted, and the inputs.
fn one_prefill<B: Backend>(
    heads: usize,
    kv: usize,
    t: usize,
    spec: &str,
    dev: &B::Device,
) -> (GroupedAttention<B>, LayerCache<B>, Tensor<B, 3>) {
    let layer = GroupedAttentionConfig::new(D_MODEL, heads, kv)
        .init::<B>(dev)
        .unwrap();
    let mut state = layer.new_state(1, dev);
    let mut policy = build_policy::<B>(spec).unwrap();
    let x = Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
    let ctx = LayerContext {
        layer: 0,
        n_layers: 1,
        n_heads: heads,
        phase: Phase::Prefill,
        rope: Some(&layer.rope),
        tokens: None,
    };
    let out = layer
        .forward_cached(x.clone(), &mut state, policy.observe_request(&ctx))
        .unwrap();
    policy
        .after_attention(&ctx, &mut state.cache, out.observation.as_ref())
        .unwrap();
    (layer, state.cache, x)
}

/// Queries and keys (each KV head repeated over its group) of `layer` for `x` `[1, t, d_model]`
/// at positions `0..t`, computed from its weights rather than by the attention kernel.
fn explicit_qk<B: Backend>(
    layer: &GroupedAttention<B>,
    x: Tensor<B, 3>,
    heads: usize,
    kv: usize,
    dev: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let (t, d) = (x.dims()[1], D_MODEL / heads);
    let pos = position_range::<B>(0, t, dev);
    let q = layer.rope.apply(
        layer
            .wq
            .forward(x.clone())
            .reshape([1, t, heads, d])
            .swap_dims(1, 2),
        pos.clone(),
    );
    let k = layer.rope.apply(
        layer.wk.forward(x).reshape([1, t, kv, d]).swap_dims(1, 2),
        pos,
    );
    (
        q,
        k.reshape([1, kv, 1, t, d])
            .expand([1, kv, heads / kv, t, d])
            .reshape([1, heads, t, d]),
    )
}

/// On the explicit kernel and on the host kernel's second pass alike.
fn h2o_accumulates_column_sums_of_causal_attention<B: Backend>(dev: &B::Device) {
    for (heads, kv, host) in [(4, 4, false), (4, 2, false), (2, 2, true), (2, 1, true)] {
        let t = 12;
        // Heads of 16, a size the host kernel takes, so it really runs.
        assert!(!host || kv_attention::host::HEAD_DIMS.contains(&(D_MODEL / heads)));
        let (layer, cache, x) = kv_attention::with_host_kernels(host, || {
            one_prefill::<B>(heads, kv, t, "h2o:budget=1.0", dev)
        });
        // Reference: explicit causal softmax from the layer's own weights, summed over queries
        // and over each GQA group.
        let d = D_MODEL / heads;
        let (q, k) = explicit_qk(&layer, x, heads, kv, dev);
        let s = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, dev)
            .reshape([1, 1, t, t])
            .expand([1, heads, t, t]);
        let p = softmax(s.mask_fill(mask, f32::NEG_INFINITY), 3);
        let want = p
            .sum_dim(2)
            .reshape([1, kv, heads / kv, t])
            .sum_dim(2)
            .reshape([1, kv, t]);
        let got = cache.side(ACC_CHANNEL).unwrap();
        let diff = (got - want).abs().max().into_scalar().elem::<f32>();
        assert!(
            diff <= 1e-5,
            "heads {heads}/{kv}, host kernel {host}: {diff}"
        );
    }
}

/// A cache of `n` slots on 2 KV heads with chosen keys, values and accumulated scores.
fn crafted<B: Backend>(
    keys: &[f32],
    values: &[f32],
    acc: &[f32],
    n: usize,
    dev: &B::Device,
) -> LayerCache<B> {
    let d = keys.len() / (2 * n);
    let mut c = LayerCache::new(
        kv_core::CacheShape {
            batch: 1,
            kv_heads: 2,
            key_dim: d,
            value_dim: d,
        },
        dev,
    );
    c.append(
        Tensor::<B, 1>::from_floats(keys, dev).reshape([1, 2, n, d]),
        Tensor::<B, 1>::from_floats(values, dev).reshape([1, 2, n, d]),
    )
    .unwrap();
    c.add_side(ACC_CHANNEL);
    c.set_side(
        ACC_CHANNEL,
        Tensor::<B, 1>::from_floats(acc, dev).reshape([1, 2, n]),
    )
    .unwrap();
    c
}

fn vatp_with_equal_value_norms_selects_what_h2o_selects<B: Backend>(dev: &B::Device) {
    let n = 10;
    let sums: Vec<f32> = (0..2 * n)
        .map(|i| ((i * 7) % 11) as f32 + 0.1 * i as f32)
        .collect();
    let keys: Vec<f32> = (0..2 * n * 2).map(|i| i as f32).collect();
    // One step of attention (2 query heads, one per KV head) observed over a cache that has none yet.
    let run = |spec: &str, values: &[f32], sums: &[f32]| {
        let mut c = crafted::<B>(&keys, values, &vec![0.0; 2 * n], n, dev);
        let obs = Observation {
            column_sums: Some(Tensor::<B, 1>::from_floats(sums, dev).reshape([1, 2, n])),
            ..Default::default()
        };
        let ctx = LayerContext {
            layer: 0,
            n_layers: 1,
            n_heads: 2,
            phase: Phase::Decode { step: 1 },
            rope: None,
            tokens: None,
        };
        build_policy::<B>(spec)
            .unwrap()
            .after_attention(&ctx, &mut c, Some(&obs))
            .unwrap();
        (head_positions(&c), floats(c.side(ACC_CHANNEL).unwrap()))
    };
    // Equal L1 norms (2 each), different signs and layouts.
    let equal: Vec<f32> = (0..2 * n * 2)
        .map(|i| if i % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let (h2o, h2o_acc) = run("h2o:budget=4,recent=0.25", &equal, &sums);
    let (vatp, vatp_acc) = run("vatp:budget=4,recent=0.25,sinks=0", &equal, &sums);
    assert_eq!(vatp, h2o);
    // VATP accumulates attention x value norm (the official code's order), by value.
    assert!(
        vatp_acc
            .iter()
            .zip(&h2o_acc)
            .all(|(v, h)| (v - 2.0 * h).abs() < 1e-5),
        "{vatp_acc:?} vs 2 x {h2o_acc:?}"
    );
    // Unequal norms change the choice (so the test above can fail).
    let skewed: Vec<f32> = (0..2 * n * 2)
        .map(|i| if (i / 2) % n == 1 { 50.0 } else { 0.01 })
        .collect();
    assert_ne!(
        run("vatp:budget=4,recent=0.25,sinks=0", &skewed, &sums).0,
        h2o
    );
    // Sinks survive even with no attention and no value norm.
    let mut sums0 = sums.clone();
    sums0[0] = 0.0;
    sums0[n] = 0.0;
    let (kept, _) = run("vatp:budget=4,recent=0.25,sinks=1", &equal, &sums0);
    assert!(kept.iter().all(|h| h[0] == 0), "{kept:?}");
}

fn h2o_with_no_heavy_hitters_is_a_sliding_window<B: Backend>(dev: &B::Device) {
    let mut stack = Stack::<B>::new(1, 4, 2, dev);
    let mut policy = build_policy::<B>("h2o:budget=6,recent=1.0").unwrap();
    stack.run(20, policy.as_mut(), Phase::Prefill, dev);
    for step in 1..5 {
        stack.run(1, policy.as_mut(), Phase::Decode { step }, dev);
    }
    let want: Vec<i64> = (18..24).collect();
    assert!(head_positions(stack.caches()[0]).iter().all(|h| *h == want));
}

fn knorm_keeps_exactly_the_smallest_norms<B: Backend>(dev: &B::Device) {
    let (n, d) = (9, 3);
    let keys: Vec<f32> = (0..2 * n * d)
        .map(|i| (((i * 37) % 23) as f32 - 11.0) * 0.3)
        .collect();
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>("knorm:budget=4,skip=0").unwrap();
    let ctx = LayerContext {
        layer: 0,
        n_layers: 1,
        n_heads: 2,
        phase: Phase::Prefill,
        rope: None,
        tokens: None,
    };
    policy.after_attention(&ctx, &mut c, None).unwrap();
    for (h, kept) in head_positions(&c).iter().enumerate() {
        let mut norms: Vec<(f32, i64)> = (0..n)
            .map(|j| {
                (
                    keys[(h * n + j) * d..(h * n + j + 1) * d]
                        .iter()
                        .map(|x| x * x)
                        .sum::<f32>(),
                    j as i64,
                )
            })
            .collect();
        norms.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut want: Vec<i64> = norms[..4].iter().map(|x| x.1).collect();
        want.sort();
        assert_eq!(*kept, want, "head {h}");
    }
    // Skipped layers are untouched; by default (the paper's code) layers 0 and 1.
    for (spec, layer, pruned) in [
        ("knorm:budget=4,skip=1", 0, false),
        ("knorm:budget=4", 1, false),
        ("knorm:budget=4", 2, true),
    ] {
        let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
        let ctx = LayerContext {
            layer,
            n_layers: 4,
            ..ctx
        };
        build_policy::<B>(spec)
            .unwrap()
            .after_attention(&ctx, &mut c, None)
            .unwrap();
        assert_eq!(
            c.slots(),
            if pruned { 4 } else { n },
            "{spec} at layer {layer}"
        );
    }
}

fn snapkv_keeps_the_window_and_unpooled_votes_are_column_sums<B: Backend>(dev: &B::Device) {
    let (n, w, heads) = (16, 4, 2);
    let probs = softmax(
        Tensor::<B, 4>::random([1, heads, w, n], Distribution::Normal(0.0, 2.0), dev),
        3,
    );
    let keys: Vec<f32> = (0..2 * n * 2).map(|i| i as f32).collect();
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>(&format!("snapkv:budget=7,window={w},kernel=1")).unwrap();
    let ctx = LayerContext {
        layer: 0,
        n_layers: 1,
        n_heads: heads,
        phase: Phase::Prefill,
        rope: None,
        tokens: None,
    };
    policy
        .after_attention(
            &ctx,
            &mut c,
            Some(&Observation {
                window: Some(probs.clone()),
                ..Default::default()
            }),
        )
        .unwrap();
    let sums = floats(probs.sum_dim(2).reshape([heads, n]));
    for (h, kept) in head_positions(&c).iter().enumerate() {
        let mut order: Vec<usize> = (0..n - w).collect();
        order.sort_by(|&a, &b| sums[h * n + b].total_cmp(&sums[h * n + a]));
        let mut want: Vec<i64> = order[..3]
            .iter()
            .map(|&j| j as i64)
            .chain((n - w) as i64..n as i64)
            .collect();
        want.sort();
        assert_eq!(*kept, want, "head {h}");
    }
}

fn pooling_matches_hand_computed_values<B: Backend>(dev: &B::Device) {
    let x = Tensor::<B, 1>::from_floats([1.0, 5.0, 2.0, 0.0, 3.0], dev).reshape([1, 1, 5]);
    assert_eq!(
        floats(pool1d(x.clone(), 3, Pool::Max)),
        vec![5.0, 5.0, 5.0, 3.0, 3.0]
    );
    let avg = floats(pool1d(x.clone(), 3, Pool::Avg));
    let want = [6.0 / 3.0, 8.0 / 3.0, 7.0 / 3.0, 5.0 / 3.0, 1.0];
    assert!(
        avg.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
        "{avg:?}"
    );
    assert_eq!(
        floats(pool1d(x, 1, Pool::Max)),
        vec![1.0, 5.0, 2.0, 0.0, 3.0]
    );
}

fn streaming_keeps_sinks_and_recent_and_rerotation_matches_recomputed_rope<B: Backend>(
    dev: &B::Device,
) {
    let layer = GroupedAttentionConfig::new(D_MODEL, 4, 2)
        .init::<B>(dev)
        .unwrap();
    for rerotate in [false, true] {
        let mut state = layer.new_state(1, dev);
        let mut policy =
            build_policy::<B>(&format!("streaming:budget=8,sinks=2,rerotate={rerotate}")).unwrap();
        // 142 evictions: the lazy re-rotation returns to in-cache positions twice on the way.
        let t = 150;
        let xs = Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
        let mut sinks_as_written = Vec::new();
        for i in 0..t {
            let phase = if i == 0 {
                Phase::Prefill
            } else {
                Phase::Decode { step: i }
            };
            let ctx = LayerContext {
                layer: 0,
                n_layers: 1,
                n_heads: 4,
                phase,
                rope: Some(&layer.rope),
                tokens: None,
            };
            layer
                .forward_cached(
                    xs.clone().narrow(1, i, 1),
                    &mut state,
                    ObserveRequest::default(),
                )
                .unwrap();
            policy
                .after_attention(&ctx, &mut state.cache, None)
                .unwrap();
            if i == 7 {
                sinks_as_written = floats(state.cache.stored_keys_prefix(2));
            }
        }
        // Each step rotates the sinks afresh from their stored keys, which stay as written, bit
        // for bit, through 142 evictions and two returns to in-cache positions.
        assert_eq!(
            floats(state.cache.stored_keys_prefix(2)),
            sinks_as_written,
            "rerotate={rerotate}: stored sinks drifted"
        );
        let want: Vec<i64> = [0, 1].into_iter().chain(144..150).collect();
        assert!(
            head_positions(&state.cache).iter().all(|h| *h == want),
            "{:?}",
            head_positions(&state.cache)
        );
        // The held keys equal raw keys rotated at their in-cache positions plus the frame offset
        // (rerotate: only relative positions reach attention), or at their original ones.
        let raw = layer
            .wk
            .forward(xs)
            .reshape([1, t, 2, D_MODEL / 4])
            .swap_dims(1, 2);
        let idx = Tensor::<B, 1, Int>::from_ints(
            want.iter()
                .map(|&p| p as i32)
                .collect::<Vec<_>>()
                .as_slice(),
            dev,
        );
        let kept_keys = raw.select(2, idx.clone());
        let offset = crate::frame_offset(&state.cache);
        assert!(
            offset > 0 || !rerotate,
            "the last steps evicted lazily, so the frame is ahead"
        );
        let rope_pos = if rerotate {
            position_range::<B>(offset, 8, dev)
        } else {
            idx.reshape([1, 1, 8])
        };
        let expected = layer.rope.apply(kept_keys, rope_pos);
        let diff = (kept(&state.cache).keys() - expected)
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>();
        assert!(diff <= 1e-4, "rerotate={rerotate}: {diff}");
        assert_eq!(
            state.cache.rope_position(),
            if rerotate { 8 + offset } else { t }
        );
    }
}

fn pyramid_budgets_shrink_with_depth_around_the_flat_mean<B: Backend>(dev: &B::Device) {
    let p = policy_spec("pyramidkv:budget=0.5,window=8,beta=20");
    let budgets = |n: usize, flat: usize, layers: usize| -> Vec<usize> {
        (0..layers)
            .map(|l| p.layer_budget(n, flat, l, layers))
            .collect()
    };
    // Keep 1/2 of 400: from 2A - A/beta = 390 down to A/beta = 10 in equal steps, mean 200.
    assert_eq!(budgets(400, 200, 5), vec![390, 295, 200, 105, 10]);
    // Keep 3/4: layer 0 would keep 585 of 400 tokens, so it is capped at the 392 prefix tokens and
    // the bottom rises to 2A - 392 = 208, which keeps the mean at the flat 300.
    let clamped = budgets(400, 300, 5);
    assert_eq!(clamped, vec![392, 346, 300, 254, 208]);
    assert_eq!(clamped.iter().sum::<usize>(), 5 * 300);
    for keep in [0.25, 0.5, 0.6, 0.75, 0.9] {
        let flat = (1000.0 * keep) as usize;
        let b = budgets(1000, flat, 7);
        let mean = b.iter().sum::<usize>() as f64 / 7.0;
        assert!((mean - flat as f64).abs() <= 0.5, "keep {keep}: {b:?}");
        assert!(
            b.windows(2).all(|w| w[0] >= w[1]) && b[0] <= 1000 - 8,
            "keep {keep}: {b:?}"
        );
    }
    // Infeasible pyramids (the smallest layer could not hold its window) fall back to flat SnapKV.
    let wide = policy_spec("pyramidkv:budget=0.25,window=32");
    assert_eq!(
        (0..4)
            .map(|l| wide.layer_budget(100, 25, l, 4))
            .collect::<Vec<_>>(),
        vec![25; 4]
    );
    assert_eq!(
        p.layer_budget(400, 200, 0, 1),
        200,
        "one layer keeps the flat budget"
    );
    // In a model: every layer holds its own budget, and the bytes held are their sum.
    let mut stack = Stack::<B>::new(3, 4, 2, dev);
    let mut policy = build_policy::<B>("pyramidkv:budget=0.5,window=4,kernel=3,beta=2").unwrap();
    stack.run(60, policy.as_mut(), Phase::Prefill, dev);
    let spec = policy_spec("pyramidkv:budget=0.5,window=4,kernel=3,beta=2");
    let want: Vec<usize> = (0..3).map(|l| spec.layer_budget(60, 30, l, 3)).collect();
    assert_eq!(want, vec![45, 30, 15]);
    let got: Vec<usize> = stack.caches().into_iter().map(|c| c.slots()).collect();
    assert_eq!(got, want);
    let bytes: usize = stack.caches().into_iter().map(|c| c.stats().kv_bytes).sum();
    assert_eq!(
        bytes,
        want.iter().sum::<usize>() * 2 * 2 * (D_MODEL / 4) * 4
    );
}

/// The per-layer budgets of a `pyramidkv` spec (its window and beta, defaults filled in).
fn policy_spec(s: &str) -> PyramidBudgets {
    let p = PolicySpec::parse(s).unwrap();
    let params = p
        .params(&["budget", "window", "kernel", "pool", "beta"])
        .unwrap();
    PyramidBudgets {
        beta: params.f32_in("beta", 20.0, 1.0, 1e6).unwrap(),
        window: SnapKvScorer::from_params(&params).unwrap().window,
    }
}

fn tova_keeps_what_the_last_query_attends_to_averaged_over_heads<B: Backend>(dev: &B::Device) {
    let (n, heads) = (10, 4);
    let probs = softmax(
        Tensor::<B, 4>::random([1, heads, 1, n], Distribution::Normal(0.0, 2.0), dev),
        3,
    );
    let keys: Vec<f32> = (0..2 * n * 2).map(|i| i as f32).collect();
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>("tova:budget=4").unwrap();
    let ctx = LayerContext {
        layer: 0,
        n_layers: 1,
        n_heads: heads,
        phase: Phase::Decode { step: 1 },
        rope: None,
        tokens: None,
    };
    policy
        .after_attention(
            &ctx,
            &mut c,
            Some(&Observation {
                window: Some(probs.clone()),
                ..Default::default()
            }),
        )
        .unwrap();
    let p = floats(probs.reshape([heads, n]));
    let mean: Vec<f32> = (0..n)
        .map(|j| (0..heads).map(|h| p[h * n + j]).sum::<f32>() / heads as f32)
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]));
    let mut want: Vec<i64> = order[..4].iter().map(|&j| j as i64).collect();
    want.sort();
    assert!(
        head_positions(&c).iter().all(|h| *h == want),
        "{:?} vs {want:?}",
        head_positions(&c)
    );
}

fn adakv_gives_heads_unequal_budgets_with_a_minimum_share<B: Backend>(dev: &B::Device) {
    // Head 0's scores all beat head 1's: the layer-wide top-k hands it everything but head 1's
    // guaranteed share.
    let scores = Tensor::<B, 1>::from_floats(
        [
            (0..10).map(|i| 10.0 + i as f32).collect::<Vec<_>>(),
            (0..10).map(|i| i as f32 / 100.0).collect(),
        ]
        .concat()
        .as_slice(),
        dev,
    )
    .reshape([1, 2, 10]);
    for (min_share, want0, want1) in [
        (0.25, vec![3, 4, 5, 6, 7, 8, 9], vec![9]),
        (0.5, vec![4, 5, 6, 7, 8, 9], vec![8, 9]),
        (1.0, vec![6, 7, 8, 9], vec![6, 7, 8, 9]),
    ] {
        let keep = AcrossHeads { min_share }.select(scores.clone(), 4);
        assert_eq!(keep, vec![want0, want1], "min_share {min_share}");
    }
}

fn adakv_invariants<B: Backend>(dev: &B::Device) {
    let prompt = 40;
    // Every per-head scorer the registry holds, as AdaKV's `scorer=` with its test parameters.
    let scorers: Vec<String> = registered_scorers::<B>(true)
        .into_iter()
        .map(|spec| format!("scorer={}", spec.replacen(':', ",", 1)))
        .collect();
    for scorer in &scorers {
        for (heads, kv) in [(4, 4), (4, 2), (4, 1)] {
            for (ratio, min_share) in [(0.2f32, 0.2f32), (0.8, 0.2), (0.2, 0.6)] {
                let spec = format!("adakv:budget={ratio},min_share={min_share},{scorer}");
                let mut policy = build_policy::<B>(&spec).unwrap();
                let mut stack = Stack::<B>::new(2, heads, kv, dev);
                stack.run(prompt, policy.as_mut(), Phase::Prefill, dev);
                let k = Budget::Ratio(ratio).slots_for(prompt);
                let safe = ((min_share * k as f32).floor() as usize).max(1);
                let head_dim = D_MODEL / heads;
                for step in 0..=6 {
                    if step > 0 {
                        stack.run(1, policy.as_mut(), Phase::Decode { step }, dev);
                    }
                    let seen = prompt + step;
                    for c in stack.caches() {
                        let ctx = format!("{spec} heads {heads}/{kv} step {step}");
                        let slots = c.slots_per_head();
                        // The layer keeps kv_heads x k prompt slots, every head at least its share.
                        assert_eq!(
                            slots.iter().sum::<usize>(),
                            kv * (k + step),
                            "{ctx}: {slots:?}"
                        );
                        assert!(
                            slots.iter().all(|&s| s >= safe + step),
                            "{ctx}: {slots:?} vs share {safe}"
                        );
                        // Bytes measured from the tensors equal the per-head slots' bytes.
                        let stats = c.stats();
                        assert_eq!(stats.slots_per_head, slots, "{ctx}");
                        assert_eq!(
                            stats.kv_bytes,
                            slots.iter().sum::<usize>() * 2 * head_dim * 4,
                            "{ctx}: bytes"
                        );
                        assert_eq!((c.tokens_seen(), c.rope_position()), (seen, seen), "{ctx}");
                        let views: Vec<&LayerCache<B>> = match c.head_caches() {
                            Some(h) => h.iter().collect(),
                            None => vec![c],
                        };
                        for head in views {
                            for h in head_positions(head) {
                                assert!(
                                    h.windows(2).all(|w| w[0] < w[1]),
                                    "{ctx}: positions {h:?}"
                                );
                                if step > 0
                                    || !(scorer.contains("knorm") || scorer.contains("tova"))
                                {
                                    assert_eq!(
                                        *h.last().unwrap(),
                                        seen as i64 - 1,
                                        "{ctx}: newest token kept"
                                    );
                                }
                                if scorer.contains("snapkv") {
                                    assert!(
                                        (prompt as i64 - 8..prompt as i64).all(|p| h.contains(&p)),
                                        "{ctx}: window kept {h:?}"
                                    );
                                }
                            }
                            // Side data moved with its slot (tokens decoded into ragged storage are untagged: 0).
                            let tags = floats(head.side("tag").unwrap());
                            let tagged = |p: i64| !c.is_ragged() || p < prompt as i64;
                            let pos: Vec<f32> = ints(head.positions())
                                .iter()
                                .map(|&p| if tagged(p) { p as f32 } else { 0.0 })
                                .collect();
                            assert_eq!(tags, pos, "{ctx}: side data out of line");
                        }
                    }
                }
            }
        }
    }
}

/// Appends one slot (key value `x` in every dim) to a 2-KV-head cache of width 2.
fn push_slot<B: Backend>(c: &mut LayerCache<B>, x: f32, dev: &B::Device) {
    c.append(
        Tensor::full([1, 2, 1, 2], x, dev),
        Tensor::full([1, 2, 1, 2], 1.0, dev),
    )
    .unwrap();
}

fn colsums<B: Backend>(head0: &[f32], head1: &[f32], dev: &B::Device) -> Observation<B> {
    let n = head0.len();
    let v: Vec<f32> = head0.iter().chain(head1).copied().collect();
    Observation {
        column_sums: Some(Tensor::<B, 1>::from_floats(v.as_slice(), dev).reshape([1, 2, n])),
        ..Default::default()
    }
}

fn h2o_evicts_the_hand_computed_slots_of_a_toy_sequence<B: Backend>(dev: &B::Device) {
    // docs/techniques.md, H2O: 2 heads, 6 tokens, budget 3 (1 recent + 2 heavy hitters).
    // Eager eviction, so the crafted column sums cover exactly the slots kept; lazy eviction keeps
    // the same slots (`lazy_eviction_keeps_what_eager_eviction_keeps`).
    // Prefill of 3 tokens (column sums of 3 causal queries), then one query per step. By hand:
    //   step 1  head 0 acc [1.6 1.5 0.7 0.2] -> keep 0 1 + recent 3, evict 2
    //           head 1 acc [1.3 1.2 1.3 0.2] -> keep 0 2 + 3, evict 1
    //   step 2  head 0 acc over [0 1 3 4] = [1.8 1.6 0.7 0.2] -> evict 3
    //           head 1 acc over [0 2 3 4] = [1.3 1.6 0.8 0.1] -> evict 3
    //   step 3  head 0 acc over [0 1 4 5] = [1.9 1.7 0.9 0.1] -> evict 4
    //           head 1 acc over [0 2 4 5] = [1.35 1.65 0.9 0.1] -> evict 4
    let mut c = LayerCache::<B>::new(
        kv_core::CacheShape {
            batch: 1,
            kv_heads: 2,
            key_dim: 2,
            value_dim: 2,
        },
        dev,
    );
    let mut policy = build_policy::<B>("h2o:budget=3,recent=0.34,lazy=false").unwrap();
    let ctx = |phase| LayerContext {
        layer: 0,
        n_layers: 1,
        n_heads: 2,
        phase,
        rope: None,
        tokens: None,
    };
    for x in 0..3 {
        push_slot(&mut c, x as f32, dev);
    }
    policy
        .after_attention(
            &ctx(Phase::Prefill),
            &mut c,
            Some(&colsums(&[1.5, 0.9, 0.6], &[1.2, 1.1, 0.7], dev)),
        )
        .unwrap();
    assert_eq!(head_positions(&c), vec![vec![0, 1, 2], vec![0, 1, 2]]);
    let steps: [([f32; 4], [f32; 4], [[i64; 3]; 2], [[f32; 3]; 2]); 3] = [
        (
            [0.1, 0.6, 0.1, 0.2],
            [0.1, 0.1, 0.6, 0.2],
            [[0, 1, 3], [0, 2, 3]],
            [[1.6, 1.5, 0.2], [1.3, 1.3, 0.2]],
        ),
        (
            [0.2, 0.1, 0.5, 0.2],
            [0.0, 0.3, 0.6, 0.1],
            [[0, 1, 4], [0, 2, 4]],
            [[1.8, 1.6, 0.2], [1.3, 1.6, 0.1]],
        ),
        (
            [0.1, 0.1, 0.7, 0.1],
            [0.05, 0.05, 0.8, 0.1],
            [[0, 1, 5], [0, 2, 5]],
            [[1.9, 1.7, 0.1], [1.35, 1.65, 0.1]],
        ),
    ];
    for (step, (h0, h1, kept, acc)) in steps.iter().enumerate() {
        push_slot(&mut c, 3.0 + step as f32, dev);
        policy
            .after_attention(
                &ctx(Phase::Decode { step: step + 1 }),
                &mut c,
                Some(&colsums(h0, h1, dev)),
            )
            .unwrap();
        assert_eq!(
            head_positions(&c),
            kept.iter().map(|k| k.to_vec()).collect::<Vec<_>>(),
            "step {}",
            step + 1
        );
        // The accumulated scores are a replay of the column sums over the compressed cache.
        let got = floats(c.side(ACC_CHANNEL).unwrap());
        let want: Vec<f32> = acc.iter().flatten().copied().collect();
        assert!(
            got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5),
            "step {}: acc {got:?} vs {want:?}",
            step + 1
        );
        // Keys moved with their slots: slot x was written with key value x.
        let keys: Vec<f32> = floats(c.keys()).chunks(2).map(|k| k[0]).collect();
        assert_eq!(
            keys,
            kept.iter().flatten().map(|&p| p as f32).collect::<Vec<_>>()
        );
    }
    // normalize divides each slot's accumulated score by the queries that could see it
    // (tokens seen - position), checked by value on the final cache (6 tokens seen).
    let normalized = H2oScorer {
        normalize: true,
        ..Default::default()
    };
    let got = floats(normalized.accumulated(&c).unwrap());
    let want = [
        1.9 / 6.0,
        1.7 / 5.0,
        0.1 / 1.0,
        1.35 / 6.0,
        1.65 / 4.0,
        0.1 / 1.0,
    ];
    assert!(
        got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
        "{got:?} vs {want:?}"
    );
}

fn streaming_rerotation_at_or_below_the_sinks_keeps_the_rope_position_at_the_slot_count<
    B: Backend,
>(
    dev: &B::Device,
) {
    let layer = GroupedAttentionConfig::new(D_MODEL, 4, 2)
        .init::<B>(dev)
        .unwrap();
    for (budget, sinks) in [(2, 4), (4, 4), (3, 3)] {
        let mut state = layer.new_state(1, dev);
        let mut policy = build_policy::<B>(&format!(
            "streaming:budget={budget},sinks={sinks},rerotate=true"
        ))
        .unwrap();
        for i in 0..12 {
            let phase = if i == 0 {
                Phase::Prefill
            } else {
                Phase::Decode { step: i }
            };
            let ctx = LayerContext {
                layer: 0,
                n_layers: 1,
                n_heads: 4,
                phase,
                rope: Some(&layer.rope),
                tokens: None,
            };
            let x = Tensor::<B, 3>::random(
                [1, if i == 0 { 6 } else { 1 }, D_MODEL],
                Distribution::Normal(0.0, 1.0),
                dev,
            );
            layer
                .forward_cached(x, &mut state, ObserveRequest::default())
                .unwrap();
            policy
                .after_attention(&ctx, &mut state.cache, None)
                .unwrap();
            assert_eq!(
                (state.cache.slots(), state.cache.rope_position()),
                (budget, budget),
                "budget {budget}, sinks {sinks}, step {i}"
            );
        }
        // Only sinks are left: the first `budget` positions of the stream.
        let want: Vec<i64> = (0..budget as i64).collect();
        assert!(
            head_positions(&state.cache).iter().all(|h| *h == want),
            "{:?}",
            head_positions(&state.cache)
        );
    }
}

fn snapkv_with_grouped_heads_selects_what_explicit_queries_and_keys_vote_for<B: Backend>(
    dev: &B::Device,
) {
    // GQA 4/2: votes are pooled per query head, then summed over the group (kvpress's order).
    let (heads, kv, t, w, budget, kernel) = (4, 2, 24, 4, 10, 3);
    let (layer, cache, x) = one_prefill::<B>(
        heads,
        kv,
        t,
        &format!("snapkv:budget={budget},window={w},kernel={kernel},pool=max"),
        dev,
    );
    // Reference from the layer's weights: the window's causal softmax over all keys.
    let d = D_MODEL / heads;
    let (q, k) = explicit_qk(&layer, x, heads, kv, dev);
    let s = q
        .narrow(2, t - w, w)
        .matmul(k.swap_dims(2, 3))
        .div_scalar((d as f64).sqrt());
    let mask = Tensor::<B, 2, Bool>::tril_mask([w, t], (t - w) as i64, dev)
        .reshape([1, 1, w, t])
        .expand([1, heads, w, t]);
    let p = floats(softmax(s.mask_fill(mask, f32::NEG_INFINITY), 3));
    let prefix = t - w;
    for g in 0..kv {
        let mut votes = vec![0.0f32; prefix];
        for h in g * heads / kv..(g + 1) * heads / kv {
            let col: Vec<f32> = (0..prefix)
                .map(|j| (0..w).map(|i| p[(h * w + i) * t + j]).sum())
                .collect();
            // Max-pool of width 3 with -inf padding, per query head.
            for j in 0..prefix {
                let lo = j.saturating_sub(kernel / 2);
                let hi = (j + kernel / 2).min(prefix - 1);
                votes[j] += col[lo..=hi]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
            }
        }
        let mut order: Vec<usize> = (0..prefix).collect();
        order.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]));
        let mut want: Vec<i64> = order[..budget - w]
            .iter()
            .map(|&j| j as i64)
            .chain(prefix as i64..t as i64)
            .collect();
        want.sort();
        assert_eq!(head_positions(&cache)[g], want, "KV head {g}");
    }
}

fn knorm_selection_is_unchanged_by_rope<B: Backend>(dev: &B::Device) {
    let (heads, kv, t) = (4, 2, 20);
    let layer = GroupedAttentionConfig::new(D_MODEL, heads, kv)
        .init::<B>(dev)
        .unwrap();
    let x = Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
    let mut state = layer.new_state(1, dev);
    let mut policy = build_policy::<B>("knorm:budget=7,skip=0").unwrap();
    let ctx = LayerContext {
        layer: 0,
        n_layers: 1,
        n_heads: heads,
        phase: Phase::Prefill,
        rope: Some(&layer.rope),
        tokens: None,
    };
    let out = layer
        .forward_cached(x.clone(), &mut state, policy.observe_request(&ctx))
        .unwrap();
    // The attention reports the norms of the rotated keys it holds: equal to the raw keys' norms.
    let d = D_MODEL / heads;
    let raw = layer.wk.forward(x).reshape([1, t, kv, d]).swap_dims(1, 2);
    let raw_norms = floats(raw.powi_scalar(2).sum_dim(3).reshape([kv, t]));
    let reported = floats(
        out.observation
            .as_ref()
            .unwrap()
            .key_norms
            .clone()
            .unwrap()
            .reshape([kv, t]),
    );
    let group = (heads / kv) as f32;
    assert!(
        raw_norms
            .iter()
            .zip(&reported)
            .all(|(r, o)| (group * r - o).abs() <= 1e-4 * o.abs().max(1.0)),
        "{raw_norms:?} vs {reported:?}"
    );
    policy
        .after_attention(&ctx, &mut state.cache, out.observation.as_ref())
        .unwrap();
    for g in 0..kv {
        let mut order: Vec<usize> = (0..t).collect();
        order.sort_by(|&a, &b| raw_norms[g * t + a].total_cmp(&raw_norms[g * t + b]));
        let mut want: Vec<i64> = order[..7].iter().map(|&j| j as i64).collect();
        want.sort();
        assert_eq!(
            head_positions(&state.cache)[g],
            want,
            "KV head {g}: smallest raw (unrotated) norms"
        );
    }
}

fn adakv_protects_exactly_the_minimum_share_when_scores_tie<B: Backend>(dev: &B::Device) {
    // Head 1's scores all tie: a threshold would protect all 10 of its slots; exactly
    // max(1, 0.5 x 4) = 2 may be protected, and head 0 wins the rest of the 8 slots.
    let scores = Tensor::<B, 1>::from_floats(
        [
            (0..10).map(|i| 10.0 + i as f32).collect::<Vec<_>>(),
            vec![1.0; 10],
        ]
        .concat()
        .as_slice(),
        dev,
    )
    .reshape([1, 2, 10]);
    let keep = AcrossHeads { min_share: 0.5 }.select(scores, 4);
    assert_eq!(keep[0], vec![4, 5, 6, 7, 8, 9]);
    assert_eq!(keep[1].len(), 2, "{keep:?}");
}

/// A per-step policy's lazy eviction (a tombstone per step, compacted every `TAIL_SLOTS`) keeps
/// exactly the slots eager eviction (a copy of the cache without the victim) keeps, step by step
/// over 300 decode steps, with the same attention outputs, and its stats count only live slots.
fn lazy_eviction_keeps_what_eager_eviction_keeps<B: Backend>(dev: &B::Device) {
    let (prompt, steps, budget) = (24, 300, 20);
    for kind in [
        "h2o",
        "tova",
        "streaming",
        "streaming:rerotate=true",
        "vatp",
    ] {
        for (heads, kv) in [(4, 4), (4, 2), (4, 1)] {
            let sep = if kind.contains(':') { "," } else { ":" };
            let spec = format!("{kind}{sep}budget={budget},every=1");
            let mut lazy = build_policy::<B>(&spec).unwrap();
            let mut eager = build_policy::<B>(&format!("{spec},lazy=false")).unwrap();
            B::seed(dev, 11);
            let mut a = Stack::<B>::new(2, heads, kv, dev);
            let mut b = Stack {
                layers: a.layers.clone(),
                states: a.states.clone(),
            };
            let mut dead_seen = 0;
            for step in 0..=steps {
                let t = if step == 0 { prompt } else { 1 };
                let xs: Vec<_> = (0..2)
                    .map(|_| {
                        Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev)
                    })
                    .collect();
                let phase = if step == 0 {
                    Phase::Prefill
                } else {
                    Phase::Decode { step }
                };
                a.run_inputs(&xs, lazy.as_mut(), phase);
                b.run_inputs(&xs, eager.as_mut(), phase);
                if step == 150 {
                    // A compaction from outside the policy (as a chunk's append does) folds
                    // re-rotated sinks into their stored keys; the next steps must notice.
                    a.states.iter_mut().for_each(|s| s.cache.compact());
                }
                for (l, (ca, cb)) in a.caches().into_iter().zip(b.caches()).enumerate() {
                    let ctx = format!("{spec} heads {heads}/{kv} step {step} layer {l}");
                    assert_eq!(
                        cb.dead_slots(),
                        0,
                        "{ctx}: eager eviction leaves no tombstone"
                    );
                    assert!(
                        ca.dead_slots() < kv_core::TAIL_SLOTS,
                        "{ctx}: compacted in time"
                    );
                    dead_seen = dead_seen.max(ca.dead_slots());
                    assert_eq!(
                        head_positions(ca),
                        head_positions(cb),
                        "{ctx}: kept positions"
                    );
                    assert_eq!(ca.live_slots(), cb.slots(), "{ctx}");
                    assert_eq!(
                        ca.stats().kv_bytes,
                        cb.stats().kv_bytes,
                        "{ctx}: live bytes"
                    );
                    // Re-rotated lazily, the frame may sit ahead of in-cache positions (only
                    // relative positions reach attention, compared below); eagerly, it never does.
                    let ahead = if kind.contains("rerotate") {
                        crate::frame_offset(ca)
                    } else {
                        0
                    };
                    assert_eq!(ca.rope_position() - ahead, cb.rope_position(), "{ctx}");
                }
            }
            assert!(
                dead_seen > 0,
                "{spec}: lazy eviction never left a dead slot"
            );
            // Same kept slots, so the next token attends to the same thing.
            let x = Tensor::<B, 3>::random([1, 1, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
            let (oa, ob) = (
                a.layers[0]
                    .forward_cached(x.clone(), &mut a.states[0], ObserveRequest::default())
                    .unwrap(),
                b.layers[0]
                    .forward_cached(x, &mut b.states[0], ObserveRequest::default())
                    .unwrap(),
            );
            let diff = (oa.output - ob.output)
                .abs()
                .max()
                .into_scalar()
                .elem::<f32>();
            assert!(
                diff < 1e-5,
                "{spec} heads {heads}/{kv}: outputs differ by {diff}"
            );
        }
    }
}

kv_core::backend_tests!(
    lazy_eviction_keeps_what_eager_eviction_keeps,
    adakv_gives_heads_unequal_budgets_with_a_minimum_share,
    adakv_invariants,
    pyramid_budgets_shrink_with_depth_around_the_flat_mean,
    tova_keeps_what_the_last_query_attends_to_averaged_over_heads,
    invariant_matrix,
    h2o_accumulates_column_sums_of_causal_attention,
    vatp_with_equal_value_norms_selects_what_h2o_selects,
    h2o_with_no_heavy_hitters_is_a_sliding_window,
    knorm_keeps_exactly_the_smallest_norms,
    snapkv_keeps_the_window_and_unpooled_votes_are_column_sums,
    pooling_matches_hand_computed_values,
    streaming_keeps_sinks_and_recent_and_rerotation_matches_recomputed_rope,
    h2o_evicts_the_hand_computed_slots_of_a_toy_sequence,
    streaming_rerotation_at_or_below_the_sinks_keeps_the_rope_position_at_the_slot_count,
    snapkv_with_grouped_heads_selects_what_explicit_queries_and_keys_vote_for,
    knorm_selection_is_unchanged_by_rope,
    adakv_protects_exactly_the_minimum_share_when_scores_tie,
);
