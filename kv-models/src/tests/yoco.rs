//! Backend-generic tests of YOCO decoders: cached paths against full recomputation, early exit,
//! the one global cache under policies, configs, checkpoints and presets.

use super::support::*;
use crate::model::state::ModelState;
use crate::*;
use burn::prelude::*;
use kv_policies::{FullCache, Phase};

const WINDOW: usize = 6;

/// A small YOCO decoder: d_model 32, 4 heads of 8, `kv` global K/V heads, window 6, chunk 4.
fn tiny_yoco(kind: SelfAttentionKind, n_layers: usize, kv: usize) -> DecoderConfig {
    let yoco = YocoSettings {
        self_attention: kind,
        window: WINDOW,
        chunk: 4,
        tau: 16.0,
    };
    DecoderConfig::new(64, 32, n_layers, 4, kv, 48).with_yoco(Some(yoco))
}

const KINDS: [SelfAttentionKind; 2] = [SelfAttentionKind::Window, SelfAttentionKind::Retention];

/// Logits of a prefill of `split` tokens, then one decode step per remaining token, under `spec`.
fn decode_with<B: Backend>(
    model: &DecoderLm<B>,
    ids: &[i32],
    split: usize,
    spec: &str,
    dev: &B::Device,
) -> (Tensor<B, 3>, ModelState<B>) {
    let mut policy = kv_policies::build_policy::<B>(spec).unwrap();
    let mut cache = model.new_state(1);
    let mut parts = vec![
        model
            .forward_with_policy(
                tokens(&ids[..split], dev),
                &mut cache,
                policy.as_mut(),
                Phase::Prefill,
            )
            .unwrap(),
    ];
    for (step, &id) in ids[split..].iter().enumerate() {
        parts.push(
            model
                .forward_with_policy(
                    tokens(&[id], dev),
                    &mut cache,
                    policy.as_mut(),
                    Phase::Decode { step: step + 1 },
                )
                .unwrap(),
        );
    }
    (Tensor::cat(parts, 1), cache)
}

fn yoco_cached_decode_matches_full_forward<B: Backend>(dev: &B::Device) {
    // 30 tokens against a window of 6: prompts shorter and longer than the window.
    let ids = sequence(30);
    for kind in KINDS {
        for (kv, shift) in [(4, false), (2, true), (1, false)] {
            let model = tiny_yoco(kind, 4, kv)
                .with_token_shift(shift)
                .init::<B>(dev)
                .unwrap();
            let full = model.forward(tokens(&ids, dev));
            for split in [1, 5, 17, 30] {
                let (logits, cache) = decode_with(&model, &ids, split, "full", dev);
                let diff = max_abs_diff(logits, full.clone());
                assert!(
                    diff <= 1e-4,
                    "{kind:?}, kv {kv}, shift {shift}, split {split}: max abs diff {diff}"
                );
                assert_eq!(cache.tokens_seen(), ids.len());
                let stats = cache.stats();
                // The one global cache holds every token: 2 x kv x head_dim 8 x 30 x 4 bytes.
                assert_eq!(stats.layer_kv_bytes(), 2 * kv * 8 * 30 * 4, "{kind:?}");
                assert_eq!(stats.layers.len(), 1);
            }
        }
    }
}

fn yoco_early_exit_prefill_gives_the_same_next_token_logits<B: Backend>(dev: &B::Device) {
    for kind in KINDS {
        let model = tiny_yoco(kind, 4, 2)
            .with_token_shift(true)
            .init::<B>(dev)
            .unwrap();
        let ids = sequence(21);
        let (prompt, next) = (&ids[..20], ids[20]);
        // Both halves over every position.
        let full = model.forward(tokens(&ids, dev));
        let mut cache = model.new_state(1);
        let first = model
            .forward_last_with_policy(
                tokens(prompt, dev),
                &mut cache,
                &mut FullCache,
                Phase::Prefill,
            )
            .unwrap();
        assert_eq!(first.dims(), [1, 1, 64]);
        let diff = max_abs_diff(first, full.clone().narrow(1, 19, 1));
        assert!(diff <= 1e-4, "{kind:?} prefill: {diff}");
        // The early exit still filled the global cache for every prompt position.
        assert_eq!(cache.layer(0).slots(), 20);
        let second = model
            .forward_last_with_policy(
                tokens(&[next], dev),
                &mut cache,
                &mut FullCache,
                Phase::Decode { step: 1 },
            )
            .unwrap();
        let diff = max_abs_diff(second, full.narrow(1, 20, 1));
        assert!(diff <= 1e-4, "{kind:?} decode after early exit: {diff}");
        // Generation (which exits early) follows the full forward's argmax.
        let prompt_u: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
        let config = GenerateConfig {
            max_new_tokens: 5,
            ..Default::default()
        };
        let out = generate(&model, &prompt_u, &config, &mut FullCache, |_| {}).unwrap();
        let mut seq = prompt.to_vec();
        for &t in &out.tokens {
            let logits = model.forward(tokens(&seq, dev));
            let n = logits.dims()[1];
            let row: Vec<f32> = logits
                .narrow(1, n - 1, 1)
                .reshape([64])
                .into_data()
                .iter::<f32>()
                .collect();
            assert_eq!(argmax(&row), t, "{kind:?}");
            seq.push(t as i32);
        }
    }
}

fn yoco_cache_bytes_do_not_depend_on_cross_decoder_layers<B: Backend>(dev: &B::Device) {
    let ids = sequence(25);
    for kind in KINDS {
        let mut global = Vec::new();
        for n_layers in [2, 4, 6] {
            let config = tiny_yoco(kind, n_layers, 2);
            let model = config.init::<B>(dev).unwrap();
            let (_, cache) = decode_with(&model, &ids, 10, "full", dev);
            let stats = cache.stats();
            global.push(stats.layer_kv_bytes());
            assert_eq!(
                stats.layer_kv_bytes(),
                config.kv_bytes_per_token() * 25,
                "{kind:?}, {n_layers} layers"
            );
            // Only the self-decoder's constant state scales with depth.
            let selfs = n_layers / 2;
            match kind {
                SelfAttentionKind::Window => {
                    assert_eq!(stats.local_layers.len(), selfs);
                    assert!(
                        stats
                            .local_layers
                            .iter()
                            .all(|l| l.slots_per_head == vec![WINDOW; 2]),
                        "{:?}",
                        stats.local_layers
                    );
                    assert_eq!(stats.state_bytes, 0);
                    assert_eq!(
                        stats.kv_bytes,
                        stats.layer_kv_bytes() + selfs * 2 * 2 * 8 * WINDOW * 4
                    );
                }
                SelfAttentionKind::Retention => {
                    assert!(stats.local_layers.is_empty());
                    // [batch 1, heads 4, d_k 8, d_v 8] f32 per self-decoder block.
                    assert_eq!(stats.state_bytes, selfs * 4 * 8 * 8 * 4);
                    assert_eq!(stats.kv_bytes, stats.layer_kv_bytes() + stats.state_bytes);
                }
            }
        }
        assert!(
            global.windows(2).all(|w| w[0] == w[1]),
            "{kind:?}: {global:?}"
        );
    }
}

fn yoco_window_caches_never_exceed_the_window_over_a_long_decode<B: Backend>(dev: &B::Device) {
    let model = tiny_yoco(SelfAttentionKind::Window, 4, 1)
        .init::<B>(dev)
        .unwrap();
    let ids = sequence(150);
    let mut cache = model.new_state(1);
    model
        .forward_last_with_policy(
            tokens(&ids[..9], dev),
            &mut cache,
            &mut FullCache,
            Phase::Prefill,
        )
        .unwrap();
    for (step, &id) in ids[9..].iter().enumerate() {
        let logits = model
            .forward_last_with_policy(
                tokens(&[id], dev),
                &mut cache,
                &mut FullCache,
                Phase::Decode { step: step + 1 },
            )
            .unwrap();
        for j in 0..cache.num_local() {
            let slots = cache.local(j).window().unwrap().slots();
            assert!(
                slots <= WINDOW,
                "step {step}, window cache {j}: {slots} slots"
            );
        }
        if step == ids.len() - 10 {
            let row: Vec<f32> = logits.into_data().iter::<f32>().collect();
            assert!(row.iter().all(|x| x.is_finite()));
        }
    }
    assert_eq!(
        (cache.layer(0).slots(), cache.local(0).tokens_seen()),
        (150, 150)
    );
}

fn yoco_cross_attention_is_causal<B: Backend>(dev: &B::Device) {
    for kind in KINDS {
        let model = tiny_yoco(kind, 4, 2)
            .with_token_shift(true)
            .init::<B>(dev)
            .unwrap();
        let ids = sequence(16);
        let mut changed = ids.clone();
        changed[10] = (changed[10] + 1) % 64;
        let (a, b) = (
            model.forward(tokens(&ids, dev)),
            model.forward(tokens(&changed, dev)),
        );
        assert!(
            max_abs_diff(a.clone().narrow(1, 0, 10), b.clone().narrow(1, 0, 10)) <= 1e-6,
            "{kind:?}: an earlier position changed"
        );
        assert!(
            max_abs_diff(a.narrow(1, 10, 6), b.narrow(1, 10, 6)) > 1e-4,
            "{kind:?}: the change is seen later"
        );
    }
}

fn yoco_policies_with_a_budget_above_the_length_match_the_full_cache<B: Backend>(dev: &B::Device) {
    let ids = sequence(30);
    for kind in KINDS {
        let model = tiny_yoco(kind, 4, 2).init::<B>(dev).unwrap();
        let (want, _) = decode_with(&model, &ids, 20, "full", dev);
        let specs = [
            "streaming:budget=64",
            "streaming:budget=1.0,rerotate=true",
            "snapkv:budget=1.0,window=8",
            "h2o:budget=1.0",
            "tova:budget=1.0",
            "knorm:budget=1.0",
            "pyramidkv:budget=1.0,window=8",
            "adakv:budget=1.0,window=8",
        ];
        for spec in specs {
            let (got, cache) = decode_with(&model, &ids, 20, spec, dev);
            let diff = max_abs_diff(got, want.clone());
            assert!(diff <= 1e-5, "{kind:?} {spec}: {diff}");
            assert_eq!(cache.stats().total_slots(), 2 * 30, "{kind:?} {spec}");
        }
    }
}

fn yoco_policies_with_a_small_budget_keep_exactly_the_budget_in_the_global_cache<B: Backend>(
    dev: &B::Device,
) {
    let ids = sequence(30);
    let budget = 8;
    for kind in KINDS {
        let model = tiny_yoco(kind, 4, 2).init::<B>(dev).unwrap();
        let (full, _) = decode_with(&model, &ids, 20, "full", dev);
        // (spec, global slots right after the prefill, at the end of 10 decode steps)
        let specs = [
            (format!("streaming:budget={budget},sinks=2"), budget, budget),
            (
                format!("streaming:budget={budget},sinks=2,rerotate=true"),
                budget,
                budget,
            ),
            (format!("h2o:budget={budget}"), budget, budget),
            // SnapKV compresses the prompt once; decoded tokens then accumulate.
            (
                format!("snapkv:budget={budget},window=4"),
                budget,
                budget + 10,
            ),
        ];
        for (spec, after_prefill, at_end) in specs {
            for early_exit in [false, true] {
                let mut policy = kv_policies::build_policy::<B>(&spec).unwrap();
                let mut cache = model.new_state(1);
                let forward = |cache: &mut ModelState<B>,
                               policy: &mut dyn kv_policies::CachePolicy<B>,
                               ids: &[i32],
                               phase| {
                    if early_exit {
                        model
                            .forward_last_with_policy(tokens(ids, dev), cache, policy, phase)
                            .unwrap()
                    } else {
                        model
                            .forward_with_policy(tokens(ids, dev), cache, policy, phase)
                            .unwrap()
                    }
                };
                let mut parts = vec![forward(
                    &mut cache,
                    policy.as_mut(),
                    &ids[..20],
                    Phase::Prefill,
                )];
                assert_eq!(
                    cache.layer(0).slots(),
                    after_prefill,
                    "{kind:?} {spec} after prefill"
                );
                for (step, &id) in ids[20..].iter().enumerate() {
                    parts.push(forward(
                        &mut cache,
                        policy.as_mut(),
                        &[id],
                        Phase::Decode { step: step + 1 },
                    ));
                }
                let stats = cache.stats();
                assert_eq!(
                    stats.layers[0].slots_per_head,
                    vec![at_end; 2],
                    "{kind:?} {spec} at the end"
                );
                assert_eq!(
                    stats.layer_kv_bytes(),
                    2 * 2 * 8 * at_end * 4,
                    "{kind:?} {spec}"
                );
                assert_eq!(stats.tokens_seen, 30, "{kind:?} {spec}");
                // The self-decoder's windows are the architecture's, untouched by the policy.
                assert!(
                    stats
                        .local_layers
                        .iter()
                        .all(|l| l.slots_per_head == vec![WINDOW; 2]),
                    "{kind:?} {spec}"
                );
                let logits = Tensor::cat(parts, 1);
                let n = logits.dims()[1];
                assert!(
                    logits
                        .clone()
                        .into_data()
                        .iter::<f32>()
                        .all(|x| x.is_finite()),
                    "{kind:?} {spec}"
                );
                // Eviction really changed what the model saw.
                assert!(
                    max_abs_diff(logits.narrow(1, n - 10, 10), full.clone().narrow(1, 20, 10))
                        > 1e-4,
                    "{kind:?} {spec}"
                );
            }
        }
    }
}

fn yoco_policy_perplexity_with_a_full_cache_matches_the_forward_pass<B: Backend>(dev: &B::Device) {
    for kind in KINDS {
        let yoco = YocoSettings {
            self_attention: kind,
            window: WINDOW,
            chunk: 4,
            tau: 16.0,
        };
        let model = DecoderConfig::new(256, 32, 2, 4, 2, 48)
            .with_yoco(Some(yoco))
            .init::<B>(dev)
            .unwrap();
        let corpus = data::Corpus::stories(5, 4000);
        let want = validation_loss(&model, &corpus, 24, 2).unwrap();
        let got = policy_loss(&model, &corpus, 24, 2, 1, 1, &mut || Box::new(FullCache)).unwrap();
        assert!(
            (want - got.loss).abs() <= 1e-4,
            "{kind:?}: {want} vs {}",
            got.loss
        );
    }
}

fn yoco_bad_configs_name_the_value<B: Backend>(dev: &B::Device) {
    let base = || tiny_yoco(SelfAttentionKind::Window, 4, 2);
    let with = |f: &dyn Fn(&mut YocoSettings)| {
        let mut cfg = base();
        f(cfg.yoco.as_mut().unwrap());
        cfg
    };
    let cases = [
        (
            DecoderConfig {
                n_layers: 3,
                ..base()
            },
            "n_layers = 3",
        ),
        (
            DecoderConfig {
                n_layers: 0,
                ..base()
            },
            "n_layers = 0",
        ),
        (with(&|y| y.window = 0), "yoco.window = 0"),
        (with(&|y| y.chunk = 0), "yoco.chunk = 0"),
        (with(&|y| y.tau = -1.0), "yoco.tau = -1"),
        (with(&|y| y.tau = 0.0), "yoco.tau = 0"),
        (with(&|y| y.tau = f64::NAN), "yoco.tau = NaN"),
        (
            DecoderConfig {
                n_kv_heads: 3,
                ..base()
            },
            "kv_heads = 3",
        ),
        (
            base().with_mla(Some(MlaSettings::new(8, 12, 4))),
            "mla = set",
        ),
        (
            DecoderConfig {
                n_layers: 2,
                ..tiny_yoco(SelfAttentionKind::Retention, 4, 1)
            },
            "fine",
        ),
    ];
    assert_init_outcomes::<B>(&cases, dev);
    // JSON: the kind is named, unknown kinds and fields are refused, omitted settings take the
    // paper's defaults, and configs without `yoco` (every older one) still parse.
    let json = r#"{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
        "rope_theta": 10000.0, "max_positions": 64, "norm_eps": 1e-5, "tie_embeddings": true, "token_shift": false}"#;
    assert_eq!(DecoderConfig::from_json(json).unwrap().yoco, None);
    let yoco = |body: &str| {
        json.replace(
            "\"token_shift\": false",
            &format!("\"token_shift\": false, \"yoco\": {body}"),
        )
    };
    let cfg = DecoderConfig::from_json(&yoco(r#"{"self_attention": "retention"}"#)).unwrap();
    assert_eq!(cfg.yoco, Some(YocoSettings::retention()));
    assert_eq!(
        cfg.yoco.as_ref().map(|y| (y.window, y.chunk, y.tau)),
        Some((1024, 256, 16.0))
    );
    let err = DecoderConfig::from_json(&yoco(r#"{"self_attention": "linear"}"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear"), "{err}");
    let err = DecoderConfig::from_json(&yoco(r#"{"self_attention": "window", "windw": 8}"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `windw`"), "{err}");
    let err = DecoderConfig::from_json(&yoco(r#"{"self_attention": "window", "window": 0}"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("yoco.window = 0"), "{err}");
    // A YOCO model's cache is refused by a model of another layout, and vice versa, by name.
    let grouped = DecoderConfig::new(64, 32, 2, 4, 2, 48)
        .init::<B>(dev)
        .unwrap();
    let model = base().init::<B>(dev).unwrap();
    let err = model
        .forward_cached(tokens(&[1, 2], dev), &mut grouped.new_state(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache layout"), "{err}");
    let err = grouped
        .forward_cached(tokens(&[1, 2], dev), &mut model.new_state(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache layers = 1"), "{err}");
    // Conversions are for grouped models only.
    let err = to_grouped(&model, &base(), 1).unwrap_err().to_string();
    assert!(err.contains("yoco"), "{err}");
}

fn yoco_checkpoints_round_trip<B: Backend>(dev: &B::Device) {
    for kind in KINDS {
        let cfg = tiny_yoco(kind, 4, 2).with_token_shift(true);
        let model = cfg.init::<B>(dev).unwrap();
        let dir =
            std::env::temp_dir().join(format!("kv-yoco-ckpt-{kind:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        save_model(&model, &cfg, &dir).unwrap();
        let (loaded, loaded_cfg) = load_model::<B>(&dir, dev).unwrap();
        assert_eq!(loaded_cfg, cfg);
        let x = tokens(&sequence(12), dev);
        assert_eq!(
            max_abs_diff(model.forward(x.clone()), loaded.forward(x.clone())),
            0.0,
            "{kind:?}"
        );
        let (a, _) = decode_with(&model, &sequence(12), 7, "full", dev);
        let (b, _) = decode_with(&loaded, &sequence(12), 7, "full", dev);
        assert_eq!(max_abs_diff(a, b), 0.0, "{kind:?}");
        // A record that lost a cross-decoder layer's attention is refused, naming what is missing.
        let path = dir.join(crate::train::checkpoint::CHECKPOINT_FILE);
        let (_, mut sections) =
            crate::train::checkpoint::Sections::decode_raw(&std::fs::read(&path).unwrap(), &path)
                .unwrap();
        sections.model = without_attention(&sections.model, "cross_decoder", 1);
        std::fs::write(&path, sections.encode()).unwrap();
        let err = load_model::<B>(&dir, dev).unwrap_err().to_string();
        assert!(
            err.contains("does not fit") && err.contains("attention"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // Grouped checkpoints (no YOCO fields in their records) still load.
    let cfg = DecoderConfig::new(64, 32, 2, 4, 2, 48);
    let model = cfg.init::<B>(dev).unwrap();
    let dir = std::env::temp_dir().join(format!("kv-yoco-grouped-ckpt-{}", std::process::id()));
    save_model(&model, &cfg, &dir).unwrap();
    let (loaded, _) = load_model::<B>(&dir, dev).unwrap();
    let x = tokens(&sequence(9), dev);
    assert_eq!(
        max_abs_diff(model.forward(x.clone()), loaded.forward(x)),
        0.0
    );
    assert!(
        loaded.yoco().is_none()
            && loaded
                .blocks()
                .unwrap()
                .iter()
                .all(|b| b.attention.grouped().is_some())
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn yoco_trains_with_the_ordinary_loop<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    for kind in KINDS {
        let dir =
            std::env::temp_dir().join(format!("kv-yoco-train-{kind:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg: train::TrainConfig = serde_json::from_value(serde_json::json!({
            "seq_len": 32, "batch_size": 2, "grad_accum": 1, "steps": 8, "lr": 0.003, "warmup_steps": 1,
            "tasks": [], "task_fraction": 0.0, "eval_every": 0, "eval_windows": 1, "eval_task_samples": 1,
            "checkpoint_every": 0, "seed": 3
        }))
        .unwrap();
        let yoco = YocoSettings {
            self_attention: kind,
            window: 8,
            chunk: 8,
            tau: 16.0,
        };
        let model = DecoderConfig::new(256, 32, 2, 4, 2, 48).with_yoco(Some(yoco));
        let mut t = train::Trainer::<AD<B>>::new(model, cfg, dev).unwrap();
        train::run(&mut t, &dir, |_| {}).unwrap();
        let losses: Vec<f64> = train::read_log(&dir)
            .unwrap()
            .into_iter()
            .filter_map(|l| match l {
                train::LogLine::Step(m) => Some(m.loss),
                _ => None,
            })
            .collect();
        assert_eq!(losses.len(), 8, "{kind:?}");
        assert!(
            losses.iter().all(|l| l.is_finite()) && losses[7] < losses[0],
            "{kind:?}: {losses:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

kv_core::backend_tests!(
    yoco_cached_decode_matches_full_forward,
    yoco_early_exit_prefill_gives_the_same_next_token_logits,
    yoco_cache_bytes_do_not_depend_on_cross_decoder_layers,
    yoco_window_caches_never_exceed_the_window_over_a_long_decode,
    yoco_cross_attention_is_causal,
    yoco_policies_with_a_budget_above_the_length_match_the_full_cache,
    yoco_policies_with_a_small_budget_keep_exactly_the_budget_in_the_global_cache,
    yoco_policy_perplexity_with_a_full_cache_matches_the_forward_pass,
    yoco_bad_configs_name_the_value,
    yoco_checkpoints_round_trip,
    yoco_trains_with_the_ordinary_loop,
);

#[test]
fn tiny_yoco_presets_match_tiny_mha_in_size_with_one_layer_of_cache() {
    type B = burn::backend::Flex;
    let mha = preset("tiny-mha").unwrap();
    let count = |p: &Preset| p.model.init::<B>(&Default::default()).unwrap().num_params();
    let n_mha = count(&mha);
    for (name, kind) in [
        ("tiny-yoco", SelfAttentionKind::Window),
        ("tiny-yoco-retention", SelfAttentionKind::Retention),
    ] {
        let p = preset(name).unwrap();
        assert_eq!(p.train, mha.train, "{name}");
        assert_eq!(p.model.yoco.as_ref().map(|y| y.self_attention), Some(kind));
        assert_eq!(
            (p.model.n_layers, p.model.d_model),
            (4, mha.model.d_model),
            "{name}"
        );
        let n = count(&p);
        assert!(
            (n as f64 / n_mha as f64 - 1.0).abs() <= 0.05,
            "{name}: {n} vs {n_mha} parameters"
        );
        // One layer of K/V per token against tiny-mha's four.
        assert_eq!(
            p.model.kv_bytes_per_token() * 4,
            mha.model.kv_bytes_per_token(),
            "{name}"
        );
    }
    assert_eq!(preset("tiny-yoco").unwrap().model.yoco.unwrap().window, 64);
}

/// A version-2 model record with the `attention` of block `block` of YOCO's `half` removed.
fn without_attention(record: &[u8], half: &str, block: usize) -> Vec<u8> {
    use rmpv::Value;
    fn get<'a>(v: &'a mut Value, key: &str) -> &'a mut Value {
        let Value::Map(m) = v else {
            panic!("{key}: not a map")
        };
        &mut m
            .iter_mut()
            .find(|(k, _)| k.as_str() == Some(key))
            .unwrap()
            .1
    }
    let mut root = rmpv::decode::read_value(&mut &record[..]).unwrap();
    let blocks = get(get(get(get(&mut root, "item"), "stack"), "Yoco"), half);
    let Value::Array(blocks) = blocks else {
        panic!("{half}: not a list")
    };
    let Value::Map(fields) = &mut blocks[block] else {
        panic!("block: not a map")
    };
    fields.retain(|(k, _)| k.as_str() != Some("attention"));
    let mut out = vec![];
    rmpv::encode::write_value(&mut out, &root).unwrap();
    out
}
