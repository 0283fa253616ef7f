//! Backend-generic cache tests; each body runs on every CPU backend this build enables.

use crate::*;
use burn::prelude::*;

fn shape(batch: usize, kv_heads: usize, dim: usize) -> CacheShape {
    CacheShape {
        batch,
        kv_heads,
        key_dim: dim,
        value_dim: dim,
    }
}

/// Keys/values whose every element encodes (batch, head, position) so content checks are exact.
fn tagged<B: Backend>(
    b: usize,
    h: usize,
    start: usize,
    t: usize,
    d: usize,
    dev: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let mut k = Vec::with_capacity(b * h * t * d);
    for bi in 0..b {
        for hi in 0..h {
            for p in start..start + t {
                for _ in 0..d {
                    k.push((bi * 10_000 + hi * 1_000 + p) as f32);
                }
            }
        }
    }
    let keys = Tensor::<B, 1>::from_floats(k.as_slice(), dev).reshape([b, h, t, d]);
    let values = keys.clone().neg();
    (keys, values)
}

fn floats<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

fn ints<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
    t.into_data().iter::<i64>().collect()
}

fn bytes_match_formula<B: Backend>(dev: &B::Device) {
    for (layers, kv_heads, d, slots) in [(1, 1, 8, 5), (4, 2, 16, 33), (3, 8, 4, 100)] {
        let mut cache = ModelCache::<B>::new(layers, shape(1, kv_heads, d), dev);
        for l in cache.layers_mut() {
            // Appended in pieces, so growth and spare capacity are exercised too.
            for (start, t) in [(0, slots / 2), (slots / 2, slots - slots / 2)] {
                let (k, v) = tagged::<B>(1, kv_heads, start, t, d, dev);
                l.append(k, v).unwrap();
            }
        }
        let stats = cache.stats();
        assert_eq!(stats.kv_bytes, 2 * layers * kv_heads * d * slots * 4);
        assert_eq!(stats.tokens_seen, slots);
        assert!(stats.allocated_bytes >= stats.kv_bytes);
        assert_eq!(stats.total_slots(), layers * kv_heads * slots);
    }
}

fn append_assigns_positions_and_counts<B: Backend>(dev: &B::Device) {
    let mut c = LayerCache::<B>::new(shape(2, 3, 4), dev);
    let (k, v) = tagged::<B>(2, 3, 0, 5, 4, dev);
    c.append(k, v).unwrap();
    let (k, v) = tagged::<B>(2, 3, 5, 1, 4, dev);
    c.append(k, v).unwrap();
    assert_eq!((c.slots(), c.tokens_seen()), (6, 6));
    let pos = ints(c.positions());
    assert_eq!(&pos[..6], &[0, 1, 2, 3, 4, 5]);
    assert_eq!(pos.len(), 2 * 3 * 6);
    let keys = floats(c.keys());
    assert_eq!(keys[5 * 4], 5.0);
    assert_eq!(
        keys[(3 + 2) * 6 * 4 + 4 * 4],
        12_004.0,
        "batch 1, head 2, position 4"
    );
}

fn retain_moves_everything_together<B: Backend>(dev: &B::Device) {
    let (b, h, d, n) = (2, 2, 3, 8);
    let mut c = LayerCache::<B>::new(shape(b, h, d), dev);
    c.add_side("score");
    let (k, v) = tagged::<B>(b, h, 0, n, d, dev);
    c.append(k, v).unwrap();
    // Side data tagged like the keys, so alignment can be checked by content.
    let side: Vec<f32> = (0..b * h * n)
        .map(|i| ((i / (h * n)) * 10_000 + ((i / n) % h) * 1_000 + i % n) as f32 * 0.5)
        .collect();
    c.set_side(
        "score",
        Tensor::<B, 1>::from_floats(side.as_slice(), dev).reshape([b, h, n]),
    )
    .unwrap();
    // A different kept set per (batch, head), not in position order.
    let keep: [[[i64; 3]; 2]; 2] = [[[7, 0, 3], [1, 2, 6]], [[5, 4, 0], [6, 7, 1]]];
    let flat: Vec<i64> = keep.iter().flatten().flatten().copied().collect();
    let idx = Tensor::<B, 1, Int>::from_ints(flat.as_slice(), dev).reshape([b, h, 3]);
    c.retain(idx).unwrap();
    assert_eq!((c.slots(), c.tokens_seen()), (3, n));
    let pos = ints(c.positions());
    let keys = floats(c.keys());
    let values = floats(c.values());
    let side = floats(c.side("score").unwrap());
    for bi in 0..b {
        for hi in 0..h {
            for j in 0..3 {
                let slot = (bi * h + hi) * 3 + j;
                let p = keep[bi][hi][j];
                let tag = (bi * 10_000 + hi * 1_000) as f32 + p as f32;
                assert_eq!(pos[slot], p);
                assert_eq!(keys[slot * d], tag);
                assert_eq!(keys[slot * d + d - 1], tag);
                assert_eq!(values[slot * d], -tag);
                assert_eq!(side[slot], tag * 0.5);
            }
        }
    }
    // After eviction the next token still gets position n, and its side data starts at zero.
    let (k, v) = tagged::<B>(b, h, n, 1, d, dev);
    c.append(k, v).unwrap();
    assert_eq!(ints(c.positions())[3], n as i64);
    assert_eq!(floats(c.side("score").unwrap())[3], 0.0);
    let stats = c.stats();
    assert_eq!(
        stats.slots_per_head,
        vec![4; b * h],
        "one entry per (batch row, head)"
    );
    assert_eq!(stats.kv_bytes, 2 * b * h * 4 * d * 4);
}

fn token_by_token_appends_cross_the_tail_flush<B: Backend>(dev: &B::Device) {
    let (h, d, n) = (2, 3, 2 * TAIL_SLOTS + 11);
    let mut c = LayerCache::<B>::new(shape(1, h, d), dev);
    c.add_side("score");
    for p in 0..n {
        let (k, v) = tagged::<B>(1, h, p, 1, d, dev);
        c.append(k, v).unwrap();
        assert_eq!(c.slots(), p + 1);
    }
    let (want_k, want_v) = tagged::<B>(1, h, 0, n, d, dev);
    assert_eq!(floats(c.keys()), floats(want_k));
    assert_eq!(floats(c.values()), floats(want_v));
    assert_eq!(
        ints(c.positions())[..n],
        (0..n as i64).collect::<Vec<_>>()[..]
    );
    let segments = c.kv_segments();
    assert!(segments.len() <= 2);
    assert_eq!(segments.iter().map(|(k, _)| k.dims()[2]).sum::<usize>(), n);
    // Retain over body and tail together, then keep appending.
    c.retain_range(n - 5, 5).unwrap();
    let (k, v) = tagged::<B>(1, h, n, 1, d, dev);
    c.append(k, v).unwrap();
    assert_eq!(
        ints(c.positions())[..6],
        [
            n as i64 - 5,
            n as i64 - 4,
            n as i64 - 3,
            n as i64 - 2,
            n as i64 - 1,
            n as i64
        ]
    );
    assert_eq!(floats(c.keys())[5 * d], n as f32);
    assert_eq!(c.stats().kv_bytes, 2 * h * 6 * d * 4);
}

fn bad_shapes_are_errors<B: Backend>(dev: &B::Device) {
    let mut c = LayerCache::<B>::new(shape(1, 2, 4), dev);
    let err = c
        .append(
            Tensor::zeros([1, 3, 1, 4], dev),
            Tensor::zeros([1, 3, 1, 4], dev),
        )
        .unwrap_err();
    assert!(err.to_string().contains("[1, 3, 1, 4]"), "{err}");
    c.append(
        Tensor::zeros([1, 2, 2, 4], dev),
        Tensor::zeros([1, 2, 2, 4], dev),
    )
    .unwrap();
    let err = c.retain(Tensor::zeros([1, 2, 3], dev)).unwrap_err();
    assert!(err.to_string().contains("k <= 2 slots"), "{err}");
    assert!(c.side("nope").unwrap_err().to_string().contains("nope"));
}

fn retain_range_keeps_a_window<B: Backend>(dev: &B::Device) {
    let mut c = LayerCache::<B>::new(shape(1, 1, 2), dev);
    let (k, v) = tagged::<B>(1, 1, 0, 10, 2, dev);
    c.append(k, v).unwrap();
    c.retain_range(6, 4).unwrap();
    assert_eq!(ints(c.positions()), vec![6, 7, 8, 9]);
    assert!(c.retain_range(2, 4).is_err());
}

fn keep_last_trims_to_a_window_and_keeps_the_counter<B: Backend>(dev: &B::Device) {
    let mut c = LayerCache::<B>::new(shape(1, 2, 2), dev);
    c.add_side("acc");
    let (k, v) = tagged::<B>(1, 2, 0, 7, 2, dev);
    c.append(k, v).unwrap();
    c.keep_last(9).unwrap();
    assert_eq!(c.slots(), 7);
    c.keep_last(3).unwrap();
    assert_eq!(ints(c.positions()), vec![4, 5, 6, 4, 5, 6]);
    assert_eq!(c.side("acc").unwrap().dims(), [1, 2, 3]);
    // Zero drops every slot but not the token counter or the side channels.
    c.keep_last(0).unwrap();
    assert_eq!((c.slots(), c.tokens_seen()), (0, 7));
    let (k, v) = tagged::<B>(1, 2, 7, 1, 2, dev);
    c.append(k, v).unwrap();
    assert_eq!(ints(c.positions()), vec![7, 7]);
    assert_eq!(c.side_names(), vec!["acc".to_string()]);
}

fn model_stats_count_local_windows_and_states<B: Backend>(dev: &B::Device) {
    let window = LocalState::Window(KvState::new(shape(1, 1, 4), dev));
    let mut cache = ModelCache::<B>::with_local(
        vec![KvState::new(shape(1, 2, 4), dev)],
        vec![window, LocalState::Recurrent(RecurrentState::default())],
    );
    let (k, v) = tagged::<B>(1, 2, 0, 5, 4, dev);
    cache.layer_mut(0).append(k, v).unwrap();
    let (k, v) = tagged::<B>(1, 1, 0, 3, 4, dev);
    let LocalState::Window(w) = cache.local_mut(0) else {
        unreachable!()
    };
    w.cache.append(k, v).unwrap();
    let LocalState::Recurrent(r) = cache.local_mut(1) else {
        unreachable!()
    };
    r.state = Some(Tensor::zeros([1, 2, 4, 4], dev));
    r.state = Some(Tensor::ones([1, 2, 4, 4], dev));
    r.tokens_seen = 3;
    let stats = cache.stats();
    assert_eq!(stats.layer_kv_bytes(), 2 * 2 * 5 * 4 * 4);
    assert_eq!(stats.state_bytes, 2 * 4 * 4 * 4);
    assert_eq!(
        stats.kv_bytes,
        2 * 2 * 5 * 4 * 4 + 2 * 3 * 4 * 4 + 2 * 4 * 4 * 4
    );
    assert_eq!(stats.local_layers[0].slots_per_head, vec![3]);
    // Slots and compression are the policy-managed layers' only.
    assert_eq!(stats.total_slots(), 2 * 5);
    assert_eq!(cache.tokens_seen(), 5);
    cache.clear();
    assert_eq!(
        (cache.stats().kv_bytes, cache.local(1).tokens_seen()),
        (0, 0)
    );
}

fn ragged_storage_holds_each_heads_own_slots<B: Backend>(dev: &B::Device) {
    let d = 4;
    let mut c = LayerCache::<B>::new(shape(2, 2, d), dev);
    let (k, v) = tagged::<B>(2, 2, 0, 10, d, dev);
    c.append(k, v).unwrap();
    c.add_side("tag");
    c.set_side("tag", c.positions().float()).unwrap();
    // Equal counts stay rectangular.
    let mut rect = c.clone();
    rect.retain_per_head(&[vec![0, 5, 9], vec![1, 2, 3], vec![4, 6, 8], vec![0, 1, 9]])
        .unwrap();
    assert!(!rect.is_ragged());
    assert_eq!(
        ints(rect.positions()),
        vec![0, 5, 9, 1, 2, 3, 4, 6, 8, 0, 1, 9]
    );
    // Unequal counts: every (row, head) holds exactly its own slots, and the bytes shrink with them.
    let keep = vec![
        vec![0, 9],
        vec![1, 2, 3, 4, 5, 6, 7],
        vec![9],
        vec![0, 3, 6, 9],
    ];
    c.retain_per_head(&keep).unwrap();
    assert!(c.is_ragged());
    assert_eq!(c.slots_per_head(), vec![2, 7, 1, 4]);
    assert_eq!(c.slots(), 7);
    let stats = c.stats();
    assert_eq!(stats.slots_per_head, vec![2, 7, 1, 4]);
    assert_eq!(stats.kv_bytes, 14 * 2 * d * 4, "keys + values of 14 slots");
    let int_bytes = Tensor::<B, 1, Int>::zeros([1], dev).dtype().size();
    assert_eq!(
        stats.metadata_bytes,
        14 * (int_bytes + 4),
        "an Int position and one f32 side value per slot"
    );
    let heads = c.head_caches().unwrap();
    for (i, (head, idx)) in heads.iter().zip(&keep).enumerate() {
        let (b, h) = (i / 2, i % 2);
        let want: Vec<i64> = idx.iter().map(|&p| p as i64).collect();
        assert_eq!(ints(head.positions()), want, "head {i}");
        let keys: Vec<f32> = idx
            .iter()
            .flat_map(|&p| [(b * 10_000 + h * 1_000 + p) as f32; 4])
            .collect();
        assert_eq!(floats(head.keys()), keys, "head {i} keys");
        assert_eq!(
            floats(head.values()),
            keys.iter().map(|k| -k).collect::<Vec<_>>(),
            "head {i} values"
        );
        assert_eq!(
            floats(head.side("tag").unwrap()),
            want.iter().map(|&p| p as f32).collect::<Vec<_>>(),
            "head {i} side data"
        );
    }
    // Appending adds the new token to every head; the counter is the tokens seen, not slots.
    let (k, v) = tagged::<B>(2, 2, 10, 1, d, dev);
    c.append(k, v).unwrap();
    assert_eq!(c.slots_per_head(), vec![3, 8, 2, 5]);
    assert_eq!((c.tokens_seen(), c.rope_position()), (11, 11));
    assert!(
        c.head_caches()
            .unwrap()
            .iter()
            .all(|h| ints(h.positions()).last() == Some(&10))
    );
    // A second per-head retain works head by head.
    c.retain_per_head(&[vec![2], vec![0, 7], vec![0, 1], vec![4]])
        .unwrap();
    assert_eq!(c.slots_per_head(), vec![1, 2, 2, 1]);
    assert_eq!(c.stats().kv_bytes, 6 * 2 * d * 4);
    // Operations that need one slot count per layer say so instead of acting on the wrong slots.
    let idx = Tensor::<B, 3, Int>::zeros([2, 2, 1], dev);
    let e = c.retain(idx).unwrap_err().to_string();
    assert!(
        e.contains("retain") && e.contains("ragged") && e.contains("[1, 2, 2, 1]"),
        "{e}"
    );
    assert!(
        c.side("tag")
            .unwrap_err()
            .to_string()
            .contains("rectangular storage")
    );
    assert!(c.shift_rope(1).is_err());
    // Bad index lists name the head and what is valid.
    let e = c
        .retain_per_head(&[vec![0], vec![1, 0], vec![0], vec![0]])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head 1") && e.contains("strictly increasing"),
        "{e}"
    );
    let e = c
        .retain_per_head(&[vec![0], vec![5], vec![0], vec![0]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("below the 2 slots"), "{e}");
    assert!(
        c.retain_per_head(&[vec![0]])
            .unwrap_err()
            .to_string()
            .contains("2 x 2")
    );
    c.clear();
    assert!(!c.is_ragged());
}

fn lazy_eviction_marks_then_compacts_in_slot_order<B: Backend>(dev: &B::Device) {
    let mut c = LayerCache::<B>::new(shape(1, 2, 2), dev);
    let (k, v) = tagged::<B>(1, 2, 0, 6, 2, dev);
    c.append(k, v).unwrap();
    c.add_side("tag");
    c.set_side("tag", c.positions().float()).unwrap();
    // Head 0 drops slot 1, head 1 slot 4; then head 0 slot 3, head 1 slot 0.
    let victims = |a: i32, b: i32| Tensor::<B, 1, Int>::from_ints([a, b], dev).reshape([1, 2, 1]);
    c.evict_one(victims(1, 4)).unwrap();
    let (k, v) = tagged::<B>(1, 2, 6, 1, 2, dev);
    c.append(k, v).unwrap();
    c.evict_one(victims(3, 0)).unwrap();
    assert_eq!((c.slots(), c.live_slots(), c.dead_slots()), (7, 5, 2));
    let bias = floats(c.dead_bias().unwrap());
    let dead: Vec<usize> = bias
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == DEAD)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        dead,
        vec![1, 3, 7, 11],
        "slot 1 and 3 of head 0, 0 and 4 of head 1"
    );
    assert!(bias.iter().all(|&b| b == 0.0 || b == DEAD));
    // Stats count what is kept: 5 slots x 2 heads x (key + value) x 2 floats.
    assert_eq!(c.stats().kv_bytes, 5 * 2 * 2 * 2 * 4);
    assert_eq!(c.stats().slots_per_head, vec![5, 5]);
    let mut kept = c.clone();
    kept.compact();
    assert_eq!((kept.slots(), kept.dead_slots()), (5, 0));
    assert!(kept.dead_bias().is_none());
    assert_eq!(ints(kept.positions()), vec![0, 2, 4, 5, 6, 1, 2, 3, 5, 6]);
    assert_eq!(
        floats(kept.side("tag").unwrap()),
        vec![0.0, 2.0, 4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 5.0, 0.0],
        "side data moves with its slots; token 6 came after the tags"
    );
    let keys: Vec<f32> = floats(kept.keys()).chunks(2).map(|k| k[0]).collect();
    assert_eq!(
        keys,
        vec![
            0.0, 2.0, 4.0, 5.0, 6.0, 1001.0, 1002.0, 1003.0, 1005.0, 1006.0
        ]
    );
    assert_eq!(kept.stats().kv_bytes, c.stats().kv_bytes);
    // A chunk compacts first, so its causal mask never meets a dead slot.
    let (k, v) = tagged::<B>(1, 2, 7, 3, 2, dev);
    c.append(k, v).unwrap();
    assert_eq!((c.slots(), c.dead_slots(), c.tokens_seen()), (8, 0, 10));
    assert_eq!(
        ints(c.positions()),
        vec![0, 2, 4, 5, 6, 7, 8, 9, 1, 2, 3, 5, 6, 7, 8, 9]
    );
    // TAIL_SLOTS evictions in a row compact by themselves.
    let mut c = LayerCache::<B>::new(shape(1, 1, 2), dev);
    let (k, v) = tagged::<B>(1, 1, 0, TAIL_SLOTS + 2, 2, dev);
    c.append(k, v).unwrap();
    for i in 0..TAIL_SLOTS {
        assert_eq!(c.dead_slots(), i);
        c.evict_one(Tensor::<B, 1, Int>::from_ints([i as i32], dev).reshape([1, 1, 1]))
            .unwrap();
    }
    assert_eq!((c.slots(), c.dead_slots()), (2, 0));
    assert_eq!(
        ints(c.positions()),
        vec![TAIL_SLOTS as i64, TAIL_SLOTS as i64 + 1]
    );
    assert!(
        c.evict_one(Tensor::<B, 1, Int>::from_ints([0, 0], dev).reshape([1, 2, 1]))
            .is_err(),
        "one victim per head"
    );
}

/// The first key of every slot attention reads, per (batch, head), in slot order.
fn read_keys<B: Backend>(c: &LayerCache<B>) -> Vec<f32> {
    let segments: Vec<Tensor<B, 4>> = c
        .kv_segments()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(k.dims()[2], v.dims()[2], "key and value segments line up");
            k
        })
        .collect();
    floats(Tensor::cat(segments, 2))
        .chunks(c.shape().key_dim)
        .map(|k| k[0])
        .collect()
}

fn key_overlay_is_read_in_place_of_the_stored_keys<B: Backend>(dev: &B::Device) {
    // 5 slots per head, all still in the tail, so setting the overlay moves them to the body.
    let mut c = LayerCache::<B>::new(shape(1, 2, 2), dev);
    let (k, v) = tagged::<B>(1, 2, 0, 5, 2, dev);
    c.append(k, v).unwrap();
    let overlay =
        Tensor::<B, 1>::from_floats([-1.0, -1.0, -2.0, -2.0, -3.0, -3.0, -4.0, -4.0], dev)
            .reshape([1, 2, 2, 2]);
    c.set_key_overlay(overlay.clone()).unwrap();
    assert!(c.has_key_overlay());
    let want = vec![
        -1.0, -2.0, 2.0, 3.0, 4.0, -3.0, -4.0, 1002.0, 1003.0, 1004.0,
    ];
    assert_eq!(
        read_keys(&c),
        want,
        "attention reads the overlay for the first 2 slots"
    );
    assert_eq!(
        floats(c.keys()).chunks(2).map(|k| k[0]).collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        floats(c.stored_keys())
            .chunks(2)
            .map(|k| k[0])
            .collect::<Vec<_>>(),
        vec![
            0.0, 1.0, 2.0, 3.0, 4.0, 1000.0, 1001.0, 1002.0, 1003.0, 1004.0
        ],
        "stored keys stay as written"
    );
    assert_eq!(
        floats(c.stored_keys_prefix(2))
            .chunks(2)
            .map(|k| k[0])
            .collect::<Vec<_>>(),
        vec![0.0, 1.0, 1000.0, 1001.0]
    );
    assert_eq!(
        c.stats().kv_bytes,
        5 * 2 * 2 * 2 * 4,
        "held bytes are the stored slots'"
    );
    // Appends and a tail flush keep it (the overlay's slots do not move).
    for p in 5..5 + TAIL_SLOTS {
        let (k, v) = tagged::<B>(1, 2, p, 1, 2, dev);
        c.append(k, v).unwrap();
    }
    assert!(c.has_key_overlay());
    assert_eq!(read_keys(&c)[..3], [-1.0, -2.0, 2.0]);
    // Compaction folds it into the keys kept; replacing the keys drops it.
    c.evict_one(Tensor::<B, 1, Int>::from_ints([2, 3], dev).reshape([1, 2, 1]))
        .unwrap();
    let mut folded = c.clone();
    folded.compact();
    assert!(!folded.has_key_overlay());
    assert_eq!(
        floats(folded.stored_keys())
            .chunks(2)
            .map(|k| k[0])
            .take(4)
            .collect::<Vec<_>>(),
        vec![-1.0, -2.0, 3.0, 4.0]
    );
    c.set_keys(c.stored_keys()).unwrap();
    assert!(!c.has_key_overlay());
    assert_eq!(read_keys(&c)[..2], [0.0, 1.0]);
    // Shapes it cannot take.
    for dims in [[1, 2, 0, 2], [1, 2, 70, 2], [1, 1, 2, 2], [1, 2, 2, 3]] {
        assert!(
            c.set_key_overlay(Tensor::zeros(dims, dev)).is_err(),
            "{dims:?}"
        );
    }
}

crate::backend_tests!(
    key_overlay_is_read_in_place_of_the_stored_keys,
    lazy_eviction_marks_then_compacts_in_slot_order,
    ragged_storage_holds_each_heads_own_slots,
    keep_last_trims_to_a_window_and_keeps_the_counter,
    model_stats_count_local_windows_and_states,
    bytes_match_formula,
    append_assigns_positions_and_counts,
    retain_moves_everything_together,
    bad_shapes_are_errors,
    token_by_token_appends_cross_the_tail_flush,
    retain_range_keeps_a_window,
);
