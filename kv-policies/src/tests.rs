//! Policy tests: spec parsing, the invariant matrix and each method's own invariants.

use crate::*;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::softmax;
use kv_attention::{GroupedAttention, GroupedAttentionConfig, ObserveRequest, Observation, position_range};
use kv_core::{Budget, LayerCache};

const D_MODEL: usize = 32;

/// Attention layers with their caches, driven the way the decoder drives them.
struct Stack<B: Backend> {
    layers: Vec<GroupedAttention<B>>,
    caches: Vec<LayerCache<B>>,
}

impl<B: Backend> Stack<B> {
    fn new(n_layers: usize, heads: usize, kv: usize, dev: &B::Device) -> Self {
        let layers: Vec<_> = (0..n_layers).map(|_| GroupedAttentionConfig::new(D_MODEL, heads, kv).init::<B>(dev).unwrap()).collect();
        let caches = layers.iter().map(|l| LayerCache::new(l.cache_shape(1), dev)).collect();
        Self { layers, caches }
    }

    /// Runs `t` random tokens through every layer under `policy`; before the policy acts, a "tag"
    /// side channel is set to each slot's position, so alignment can be checked afterwards.
    fn run(&mut self, t: usize, policy: &mut dyn CachePolicy<B>, phase: Phase, dev: &B::Device) {
        let n_layers = self.layers.len();
        for (i, (layer, cache)) in self.layers.iter().zip(self.caches.iter_mut()).enumerate() {
            let ctx = LayerContext { layer: i, n_layers, n_heads: layer.n_heads(), phase, rope: Some(&layer.rope) };
            let x = Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
            let out = layer.forward_cached(x, cache, policy.observe_request(&ctx)).unwrap();
            if !cache.is_ragged() {
                cache.add_side("tag");
                cache.set_side("tag", cache.positions().float()).unwrap();
            }
            policy.after_attention(&ctx, cache, out.observation.as_ref()).unwrap();
        }
    }
}

fn ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// Positions per KV head of a batch-1 cache.
fn head_positions<B: Backend>(c: &LayerCache<B>) -> Vec<Vec<i64>> {
    let n = c.slots();
    ints(c.positions()).chunks(n.max(1)).map(|h| h.to_vec()).collect()
}

#[test]
fn specs_parse_and_bad_ones_say_what_is_valid() {
    type B = burn::backend::Flex;
    for spec in ["full", "streaming:budget=64,sinks=2,rerotate=true", "h2o:budget=0.2,recent=0.5,normalize=true", "vatp", "knorm:skip=1", "snapkv:budget=0.5,window=32,kernel=7,pool=max"] {
        build_policy::<B>(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    let e = build_policy::<B>("adakw").err().unwrap().to_string();
    assert!(e.contains("unknown policy 'adakw'") && e.contains("pyramidkv, adakv"), "{e}");
    for spec in ["adakv", "adakv:budget=0.3,min_share=0.5,scorer=h2o,recent=0.25", "adakv:scorer=snapkv,window=8,kernel=3"] {
        build_policy::<B>(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    }
    let e = build_policy::<B>("adakv:scorer=streaming").err().unwrap().to_string();
    assert!(e.contains("adakv:scorer = streaming") && e.contains("snapkv, h2o"), "{e}");
    let e = build_policy::<B>("adakv:every=4").err().unwrap().to_string();
    assert!(e.contains("once, at the end of prefill"), "{e}");
    let e = build_policy::<B>("adakv:min_share=2").err().unwrap().to_string();
    assert!(e.contains("min_share = 2"), "{e}");
    let e = build_policy::<B>("adakv:scorer=h2o,window=8").err().unwrap().to_string();
    assert!(e.contains("window") && e.contains("recent"), "{e}");
    let e = build_policy::<B>("snapkv:windo=3").err().unwrap().to_string();
    assert!(e.contains("windo") && e.contains("window, kernel"), "{e}");
    let e = build_policy::<B>("h2o:budget=1.5").err().unwrap().to_string();
    assert!(e.contains("h2o:budget = 1.5") && e.contains("(0, 1]"), "{e}");
    let e = build_policy::<B>("snapkv:kernel=4").err().unwrap().to_string();
    assert!(e.contains("kernel = 4") && e.contains("odd"), "{e}");
    let e = build_policy::<B>("full:budget=0.5").err().unwrap().to_string();
    assert!(e.contains("budget") && e.contains("none"), "{e}");
    assert!(build_policy::<B>("streaming:rerotate=maybe").err().unwrap().to_string().contains("true or false"));
}

fn invariant_matrix<B: Backend>(dev: &B::Device) {
    let (prompt, steps) = (40, 12);
    let kinds = ["streaming", "streaming:rerotate=true", "h2o", "h2o:normalize=true", "vatp", "knorm", "snapkv:window=8,kernel=3", "tova"];
    for kind in kinds {
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
                            expected = if every == 1 { budget.slots_for(prompt + step) } else { expected + 1 };
                        }
                        let seen = prompt + step;
                        for c in &stack.caches {
                            let ctx = format!("{spec} heads {heads}/{kv} step {step}");
                            assert_eq!(c.slots(), expected, "{ctx}: slots");
                            assert_eq!(c.tokens_seen(), seen, "{ctx}");
                            if kind.contains("rerotate") {
                                assert_eq!(c.rope_position(), c.slots(), "{ctx}: rerotated rope position");
                            } else {
                                assert_eq!(c.rope_position(), seen, "{ctx}: rope position");
                            }
                            for h in head_positions(c) {
                                assert!(h.windows(2).all(|w| w[0] < w[1]), "{ctx}: positions {h:?}");
                                // Methods with a recent window or sinks keep the newest token.
                                if !kind.starts_with("knorm") && !kind.starts_with("tova") {
                                    assert_eq!(*h.last().unwrap(), seen as i64 - 1, "{ctx}: newest token kept");
                                }
                            }
                            let tags = floats(c.side("tag").unwrap());
                            let pos: Vec<f32> = ints(c.positions()).iter().map(|&p| p as f32).collect();
                            assert_eq!(tags, pos, "{ctx}: side data out of line");
                        }
                    }
                }
            }
        }
    }
}

fn h2o_accumulates_column_sums_of_causal_attention<B: Backend>(dev: &B::Device) {
    for (heads, kv) in [(4, 4), (4, 2)] {
        let layer = GroupedAttentionConfig::new(D_MODEL, heads, kv).init::<B>(dev).unwrap();
        let mut cache = LayerCache::new(layer.cache_shape(1), dev);
        let mut policy = build_policy::<B>("h2o:budget=1.0").unwrap();
        let t = 12;
        let x = Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
        let ctx = LayerContext { layer: 0, n_layers: 1, n_heads: heads, phase: Phase::Prefill, rope: Some(&layer.rope) };
        let out = layer.forward_cached(x.clone(), &mut cache, policy.observe_request(&ctx)).unwrap();
        policy.after_attention(&ctx, &mut cache, out.observation.as_ref()).unwrap();
        // Reference: explicit causal softmax from the layer's own weights, summed over queries
        // and over each GQA group.
        let d = D_MODEL / heads;
        let pos = position_range::<B>(0, t, dev);
        let q = layer.rope.apply(layer.wq.forward(x.clone()).reshape([1, t, heads, d]).swap_dims(1, 2), pos.clone());
        let k = layer.rope.apply(layer.wk.forward(x).reshape([1, t, kv, d]).swap_dims(1, 2), pos);
        let k = k.reshape([1, kv, 1, t, d]).expand([1, kv, heads / kv, t, d]).reshape([1, heads, t, d]);
        let s = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, dev).reshape([1, 1, t, t]).expand([1, heads, t, t]);
        let p = softmax(s.mask_fill(mask, f32::NEG_INFINITY), 3);
        let want = p.sum_dim(2).reshape([1, kv, heads / kv, t]).sum_dim(2).reshape([1, kv, t]);
        let got = cache.side(ACC_CHANNEL).unwrap();
        let diff = (got - want).abs().max().into_scalar().elem::<f32>();
        assert!(diff <= 1e-5, "heads {heads}/{kv}: {diff}");
    }
}

/// A cache of `n` slots on 2 KV heads with chosen keys, values and accumulated scores.
fn crafted<B: Backend>(keys: &[f32], values: &[f32], acc: &[f32], n: usize, dev: &B::Device) -> LayerCache<B> {
    let d = keys.len() / (2 * n);
    let mut c = LayerCache::new(kv_core::CacheShape { batch: 1, kv_heads: 2, key_dim: d, value_dim: d }, dev);
    c.append(
        Tensor::<B, 1>::from_floats(keys, dev).reshape([1, 2, n, d]),
        Tensor::<B, 1>::from_floats(values, dev).reshape([1, 2, n, d]),
    )
    .unwrap();
    c.add_side(ACC_CHANNEL);
    c.set_side(ACC_CHANNEL, Tensor::<B, 1>::from_floats(acc, dev).reshape([1, 2, n])).unwrap();
    c
}

/// Runs one decode-phase eviction with an observation that adds nothing to the scores.
fn evict<B: Backend>(policy: &mut dyn CachePolicy<B>, cache: &mut LayerCache<B>, heads: usize) {
    let n = cache.slots();
    let obs = Observation { column_sums: Some(Tensor::zeros([1, heads, n], &cache.device())), window: None };
    let ctx = LayerContext { layer: 0, n_layers: 1, n_heads: heads, phase: Phase::Decode { step: 1 }, rope: None };
    policy.after_attention(&ctx, cache, Some(&obs)).unwrap();
}

fn vatp_with_equal_value_norms_selects_what_h2o_selects<B: Backend>(dev: &B::Device) {
    let n = 10;
    let acc: Vec<f32> = (0..2 * n).map(|i| ((i * 7) % 11) as f32 + 0.1 * i as f32).collect();
    let keys: Vec<f32> = (0..2 * n * 2).map(|i| i as f32).collect();
    // Equal L1 norms, different signs and layouts.
    let equal: Vec<f32> = (0..2 * n * 2).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
    let run = |spec: &str, values: &[f32]| {
        let mut c = crafted::<B>(&keys, values, &acc, n, dev);
        evict(build_policy::<B>(spec).unwrap().as_mut(), &mut c, 2);
        head_positions(&c)
    };
    let h2o = run("h2o:budget=4,recent=0.25", &equal);
    assert_eq!(run("vatp:budget=4,recent=0.25,sinks=0", &equal), h2o);
    // Unequal norms change the choice (so the test above can fail).
    let skewed: Vec<f32> = (0..2 * n * 2).map(|i| if (i / 2) % n == 1 { 50.0 } else { 0.01 }).collect();
    assert_ne!(run("vatp:budget=4,recent=0.25,sinks=0", &skewed), h2o);
    // Sinks survive even with no attention and no value norm.
    let mut acc0 = acc.clone();
    acc0[0] = 0.0;
    acc0[n] = 0.0;
    let mut c = crafted::<B>(&keys, &equal, &acc0, n, dev);
    evict(build_policy::<B>("vatp:budget=4,recent=0.25,sinks=1").unwrap().as_mut(), &mut c, 2);
    assert!(head_positions(&c).iter().all(|h| h[0] == 0), "{:?}", head_positions(&c));
}

fn h2o_with_no_heavy_hitters_is_a_sliding_window<B: Backend>(dev: &B::Device) {
    let mut stack = Stack::<B>::new(1, 4, 2, dev);
    let mut policy = build_policy::<B>("h2o:budget=6,recent=1.0").unwrap();
    stack.run(20, policy.as_mut(), Phase::Prefill, dev);
    for step in 1..5 {
        stack.run(1, policy.as_mut(), Phase::Decode { step }, dev);
    }
    let want: Vec<i64> = (18..24).collect();
    assert!(head_positions(&stack.caches[0]).iter().all(|h| *h == want));
}

fn knorm_keeps_exactly_the_smallest_norms<B: Backend>(dev: &B::Device) {
    let (n, d) = (9, 3);
    let keys: Vec<f32> = (0..2 * n * d).map(|i| (((i * 37) % 23) as f32 - 11.0) * 0.3).collect();
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>("knorm:budget=4").unwrap();
    let ctx = LayerContext { layer: 0, n_layers: 1, n_heads: 2, phase: Phase::Prefill, rope: None };
    policy.after_attention(&ctx, &mut c, None).unwrap();
    for (h, kept) in head_positions(&c).iter().enumerate() {
        let mut norms: Vec<(f32, i64)> = (0..n)
            .map(|j| (keys[(h * n + j) * d..(h * n + j + 1) * d].iter().map(|x| x * x).sum::<f32>(), j as i64))
            .collect();
        norms.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut want: Vec<i64> = norms[..4].iter().map(|x| x.1).collect();
        want.sort();
        assert_eq!(*kept, want, "head {h}");
    }
    // Skipped layers are untouched.
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>("knorm:budget=4,skip=1").unwrap();
    policy.after_attention(&ctx, &mut c, None).unwrap();
    assert_eq!(c.slots(), n);
}

fn snapkv_keeps_the_window_and_unpooled_votes_are_column_sums<B: Backend>(dev: &B::Device) {
    let (n, w, heads) = (16, 4, 2);
    let probs = softmax(Tensor::<B, 4>::random([1, heads, w, n], Distribution::Normal(0.0, 2.0), dev), 3);
    let keys: Vec<f32> = (0..2 * n * 2).map(|i| i as f32).collect();
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>(&format!("snapkv:budget=7,window={w},kernel=1")).unwrap();
    let ctx = LayerContext { layer: 0, n_layers: 1, n_heads: heads, phase: Phase::Prefill, rope: None };
    policy.after_attention(&ctx, &mut c, Some(&Observation { column_sums: None, window: Some(probs.clone()) })).unwrap();
    let sums = floats(probs.sum_dim(2).reshape([heads, n]));
    for (h, kept) in head_positions(&c).iter().enumerate() {
        let mut order: Vec<usize> = (0..n - w).collect();
        order.sort_by(|&a, &b| sums[h * n + b].total_cmp(&sums[h * n + a]));
        let mut want: Vec<i64> = order[..3].iter().map(|&j| j as i64).chain((n - w) as i64..n as i64).collect();
        want.sort();
        assert_eq!(*kept, want, "head {h}");
    }
}

fn pooling_matches_hand_computed_values<B: Backend>(dev: &B::Device) {
    let x = Tensor::<B, 1>::from_floats([1.0, 5.0, 2.0, 0.0, 3.0], dev).reshape([1, 1, 5]);
    assert_eq!(floats(pool1d(x.clone(), 3, Pool::Max)), vec![5.0, 5.0, 5.0, 3.0, 3.0]);
    let avg = floats(pool1d(x.clone(), 3, Pool::Avg));
    let want = [6.0 / 3.0, 8.0 / 3.0, 7.0 / 3.0, 5.0 / 3.0, 3.0 / 3.0];
    assert!(avg.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{avg:?}");
    assert_eq!(floats(pool1d(x, 1, Pool::Max)), vec![1.0, 5.0, 2.0, 0.0, 3.0]);
}

fn streaming_keeps_sinks_and_recent_and_rerotation_matches_recomputed_rope<B: Backend>(dev: &B::Device) {
    let layer = GroupedAttentionConfig::new(D_MODEL, 4, 2).init::<B>(dev).unwrap();
    for rerotate in [false, true] {
        let mut cache = LayerCache::new(layer.cache_shape(1), dev);
        let mut policy = build_policy::<B>(&format!("streaming:budget=8,sinks=2,rerotate={rerotate}")).unwrap();
        let t = 20;
        let xs = Tensor::<B, 3>::random([1, t, D_MODEL], Distribution::Normal(0.0, 1.0), dev);
        for i in 0..t {
            let phase = if i == 0 { Phase::Prefill } else { Phase::Decode { step: i } };
            let ctx = LayerContext { layer: 0, n_layers: 1, n_heads: 4, phase, rope: Some(&layer.rope) };
            layer.forward_cached(xs.clone().narrow(1, i, 1), &mut cache, ObserveRequest::default()).unwrap();
            policy.after_attention(&ctx, &mut cache, None).unwrap();
        }
        let want: Vec<i64> = [0, 1].into_iter().chain(14..20).collect();
        assert!(head_positions(&cache).iter().all(|h| *h == want), "{:?}", head_positions(&cache));
        // The held keys equal raw keys rotated at their in-cache (rerotate) or original positions.
        let raw = layer.wk.forward(xs).reshape([1, t, 2, D_MODEL / 4]).swap_dims(1, 2);
        let idx = Tensor::<B, 1, Int>::from_ints(want.iter().map(|&p| p as i32).collect::<Vec<_>>().as_slice(), dev);
        let kept = raw.select(2, idx.clone());
        let rope_pos = if rerotate { position_range::<B>(0, 8, dev) } else { idx.reshape([1, 1, 8]) };
        let expected = layer.rope.apply(kept, rope_pos);
        let diff = (cache.keys() - expected).abs().max().into_scalar().elem::<f32>();
        assert!(diff <= 1e-4, "rerotate={rerotate}: {diff}");
        assert_eq!(cache.rope_position(), if rerotate { 8 } else { 20 });
    }
}

fn pyramid_budgets_shrink_with_depth_around_the_flat_mean<B: Backend>(dev: &B::Device) {
    let p = PyramidKvPolicy::from_spec(&PolicySpec::parse("pyramidkv:budget=40,window=8,beta=20").unwrap()).unwrap();
    let layers = 5;
    let budgets: Vec<usize> = (0..layers).map(|l| p.layer_budget(40, l, layers)).collect();
    assert!(budgets.windows(2).all(|w| w[0] > w[1]), "{budgets:?}");
    let mean = budgets.iter().sum::<usize>() as f64 / layers as f64;
    assert!((mean - 40.0).abs() <= 0.5, "{budgets:?}");
    assert_eq!(budgets[layers - 1], 8 + 2, "last layer keeps (40 - 8) / 20 ~ 2 prefix slots");
    // In a model: every layer holds its own budget, and the bytes held are their sum.
    let mut stack = Stack::<B>::new(3, 4, 2, dev);
    let mut policy = build_policy::<B>("pyramidkv:budget=0.5,window=4,kernel=3").unwrap();
    stack.run(60, policy.as_mut(), Phase::Prefill, dev);
    let want: Vec<usize> = (0..3).map(|l| p_layer(&policy_spec("pyramidkv:budget=0.5,window=4,kernel=3"), 30, l, 3)).collect();
    let got: Vec<usize> = stack.caches.iter().map(|c| c.slots()).collect();
    assert_eq!(got, want);
    let bytes: usize = stack.caches.iter().map(|c| c.stats().kv_bytes).sum();
    assert_eq!(bytes, want.iter().sum::<usize>() * 2 * 2 * (D_MODEL / 4) * 4);
}

fn policy_spec(s: &str) -> PyramidKvPolicy {
    PyramidKvPolicy::from_spec(&PolicySpec::parse(s).unwrap()).unwrap()
}

fn p_layer(p: &PyramidKvPolicy, flat: usize, l: usize, n: usize) -> usize {
    p.layer_budget(flat, l, n)
}

fn tova_keeps_what_the_last_query_attends_to_averaged_over_heads<B: Backend>(dev: &B::Device) {
    let (n, heads) = (10, 4);
    let probs = softmax(Tensor::<B, 4>::random([1, heads, 1, n], Distribution::Normal(0.0, 2.0), dev), 3);
    let keys: Vec<f32> = (0..2 * n * 2).map(|i| i as f32).collect();
    let mut c = crafted::<B>(&keys, &keys, &vec![0.0; 2 * n], n, dev);
    let mut policy = build_policy::<B>("tova:budget=4").unwrap();
    let ctx = LayerContext { layer: 0, n_layers: 1, n_heads: heads, phase: Phase::Decode { step: 1 }, rope: None };
    policy.after_attention(&ctx, &mut c, Some(&Observation { column_sums: None, window: Some(probs.clone()) })).unwrap();
    let p = floats(probs.reshape([heads, n]));
    let mean: Vec<f32> = (0..n).map(|j| (0..heads).map(|h| p[h * n + j]).sum::<f32>() / heads as f32).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]));
    let mut want: Vec<i64> = order[..4].iter().map(|&j| j as i64).collect();
    want.sort();
    assert!(head_positions(&c).iter().all(|h| *h == want), "{:?} vs {want:?}", head_positions(&c));
}

fn adakv_gives_heads_unequal_budgets_with_a_minimum_share<B: Backend>(dev: &B::Device) {
    // Head 0's scores all beat head 1's: the layer-wide top-k hands it everything but head 1's
    // guaranteed share.
    let scores = Tensor::<B, 1>::from_floats([(0..10).map(|i| 10.0 + i as f32).collect::<Vec<_>>(), (0..10).map(|i| i as f32 / 100.0).collect()].concat().as_slice(), dev).reshape([1, 2, 10]);
    for (min_share, want0, want1) in [(0.25, vec![3, 4, 5, 6, 7, 8, 9], vec![9]), (0.5, vec![4, 5, 6, 7, 8, 9], vec![8, 9]), (1.0, vec![6, 7, 8, 9], vec![6, 7, 8, 9])] {
        let policy = AdaKvPolicy::<B>::new(Budget::Tokens(4), min_share, build_scorer::<B>("knorm").unwrap());
        let keep = policy.select(scores.clone(), 4);
        assert_eq!(keep, vec![want0, want1], "min_share {min_share}");
    }
}

fn adakv_invariants<B: Backend>(dev: &B::Device) {
    let prompt = 40;
    let scorers = ["scorer=snapkv,window=8,kernel=3", "scorer=h2o", "scorer=vatp", "scorer=tova", "scorer=knorm"];
    for scorer in scorers {
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
                    for c in &stack.caches {
                        let ctx = format!("{spec} heads {heads}/{kv} step {step}");
                        let slots = c.slots_per_head();
                        // The layer keeps kv_heads x k prompt slots, every head at least its share.
                        assert_eq!(slots.iter().sum::<usize>(), kv * (k + step), "{ctx}: {slots:?}");
                        assert!(slots.iter().all(|&s| s >= safe + step), "{ctx}: {slots:?} vs share {safe}");
                        // Bytes measured from the tensors equal the per-head slots' bytes.
                        let stats = c.stats();
                        assert_eq!(stats.slots_per_head, slots, "{ctx}");
                        assert_eq!(stats.kv_bytes, slots.iter().sum::<usize>() * 2 * head_dim * 4, "{ctx}: bytes");
                        assert_eq!((c.tokens_seen(), c.rope_position()), (seen, seen), "{ctx}");
                        let views: Vec<&LayerCache<B>> = match c.head_caches() {
                            Some(h) => h.iter().collect(),
                            None => vec![c],
                        };
                        for head in views {
                            for h in head_positions(head) {
                                assert!(h.windows(2).all(|w| w[0] < w[1]), "{ctx}: positions {h:?}");
                                if step > 0 || !(scorer.contains("knorm") || scorer.contains("tova")) {
                                    assert_eq!(*h.last().unwrap(), seen as i64 - 1, "{ctx}: newest token kept");
                                }
                                if scorer.contains("snapkv") {
                                    assert!((prompt as i64 - 8..prompt as i64).all(|p| h.contains(&p)), "{ctx}: window kept {h:?}");
                                }
                            }
                            // Side data moved with its slot (tokens decoded into ragged storage are untagged: 0).
                            let tags = floats(head.side("tag").unwrap());
                            let tagged = |p: i64| !c.is_ragged() || p < prompt as i64;
                            let pos: Vec<f32> = ints(head.positions()).iter().map(|&p| if tagged(p) { p as f32 } else { 0.0 }).collect();
                            assert_eq!(tags, pos, "{ctx}: side data out of line");
                        }
                    }
                }
            }
        }
    }
}

kv_core::backend_tests!(
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
);
