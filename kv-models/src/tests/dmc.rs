//! DMC models: a retrofit starts as the model without its decision channels, the merged cache
//! decodes what the training path computes, checkpoints keep the kind, and retrofit training
//! moves the decisions.

use super::support::*;
use crate::*;
use burn::module::Param;
use burn::prelude::*;

/// The shared tiny grouped decoder: 2 layers, d_model 32, `heads` heads of 8.
fn base(heads: usize, kv: usize) -> DecoderConfig {
    tiny(heads, kv)
}

fn zero_decision_columns<B: Backend>(w: &Param<Tensor<B, 2>>, d: usize) -> Param<Tensor<B, 2>> {
    let [rows, cols] = w.dims();
    let keep: Vec<f32> = (0..cols)
        .map(|i| if i % d == d - 1 { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::<B, 1>::from_floats(keep.as_slice(), &w.device())
        .reshape([1, cols])
        .expand([rows, cols]);
    Param::from_tensor(w.val() * keep)
}

fn a_retrofit_starts_as_the_model_without_its_decision_channels<B: Backend>(dev: &B::Device) {
    let ids = sequence(30);
    for (heads, kv) in [(4, 4), (4, 2)] {
        B::seed(dev, 3);
        let config = base(heads, kv);
        let model = config.init::<B>(dev).unwrap();
        let (dmc, dmc_config) = to_dmc(&model, &config, DmcSettings::default()).unwrap();
        assert_eq!(dmc_config.dmc, Some(DmcSettings::default()));
        assert!(
            dmc.blocks()
                .unwrap()
                .iter()
                .all(|b| b.attention.dmc().is_some())
        );
        let mut zeroed = model.clone();
        for block in zeroed.blocks_mut().unwrap() {
            let a = block.attention.grouped_mut().unwrap();
            let d = a.head_dim();
            a.wq.weight = zero_decision_columns(&a.wq.weight, d);
            a.wk.weight = zero_decision_columns(&a.wk.weight, d);
        }
        let want = zeroed.forward(tokens(&ids, dev));
        let diff = max_abs_diff(dmc.forward(tokens(&ids, dev)), want.clone());
        assert!(
            diff < 1e-5,
            "{heads}/{kv}: the retrofit's training path differs by {diff}"
        );
        let (decoded, state) = decode_logits(&dmc, &ids, 12, dev);
        let diff = max_abs_diff(decoded, want.clone());
        assert!(
            diff < 1e-4,
            "{heads}/{kv}: the retrofit's merged cache differs by {diff}"
        );
        assert!(
            state
                .cache()
                .stats()
                .layers
                .iter()
                .all(|l| l.slots_per_head.iter().all(|&n| n == 30)),
            "no merges before fine-tuning"
        );
        // Zeroing the channel is a change (the test can fail).
        assert!(max_abs_diff(model.forward(tokens(&ids, dev)), want) > 1e-5);
    }
    let err = to_dmc(
        &tiny_mla(4, 0).init::<B>(dev).unwrap(),
        &tiny_mla(4, 0),
        DmcSettings::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mla"), "{err}");
}

fn a_dmc_model_decodes_what_its_training_path_computes<B: Backend>(dev: &B::Device) {
    // init_bias 0: about half the tokens merge from the start.
    let settings = DmcSettings {
        init_bias: 0.0,
        window: 6,
        ..DmcSettings::default()
    };
    let ids = sequence(48);
    for (heads, kv, shift) in [(4, 4, false), (4, 2, true)] {
        B::seed(dev, 5);
        let config = base(heads, kv)
            .with_key_shift(Some(shift))
            .with_token_shift(shift)
            .with_dmc(Some(settings.clone()));
        let model = config.init::<B>(dev).unwrap();
        let want = model.forward(tokens(&ids, dev));
        for split in [48, 1, 20] {
            let (decoded, state) = decode_logits(&model, &ids, split, dev);
            let diff = max_abs_diff(decoded, want.clone());
            assert!(
                diff < 1e-4,
                "{heads}/{kv}, prefill {split}: decode differs from the training path by {diff}"
            );
            let stats = state.cache().stats();
            let slots: usize = stats
                .layers
                .iter()
                .flat_map(|l| l.slots_per_head.iter())
                .sum();
            assert!(slots < 48 * 2 * kv, "merges happened ({slots} slots)");
            // Bytes held are the heads' slots, keys and values of 8 floats each.
            assert_eq!(
                stats.layers.iter().map(|l| l.kv_bytes).sum::<usize>(),
                slots * 2 * 8 * 4
            );
            assert!(stats.layers.iter().all(|l| l.tokens_seen == 48));
        }
    }
}

fn dmc_checkpoints_keep_the_kind_and_its_settings<B: Backend>(dev: &B::Device) {
    let settings = DmcSettings {
        init_bias: 0.5,
        window: 7,
        temperature: 0.2,
        zero_after_rope: true,
    };
    let config = base(4, 2).with_dmc(Some(settings.clone()));
    let model = config.init::<B>(dev).unwrap();
    let dir = temp_dir("dmc-checkpoint");
    save_model(&model, &config, &dir).unwrap();
    let (loaded, loaded_config) = load_model::<B>(&dir, &dev.clone()).unwrap();
    assert_eq!(loaded_config.dmc, Some(settings));
    assert_eq!(
        loaded.blocks().unwrap()[0]
            .attention
            .dmc()
            .unwrap()
            .window(),
        7
    );
    let ids = tokens(&sequence(20), dev);
    assert!(max_abs_diff(model.forward(ids.clone()), loaded.forward(ids)) < 1e-6);
    std::fs::remove_dir_all(&dir).unwrap();
    // DMC goes with grouped attention only, and its settings are checked.
    assert_init_outcomes::<B>(
        &[
            (
                tiny_mla(4, 0).with_dmc(Some(DmcSettings::default())),
                "absent (null) with mla",
            ),
            (
                base(4, 2).with_dmc(Some(DmcSettings {
                    window: 0,
                    ..DmcSettings::default()
                })),
                "dmc.window = 0",
            ),
            (
                base(4, 2).with_dmc(Some(DmcSettings {
                    temperature: -1.0,
                    ..DmcSettings::default()
                })),
                "dmc.temperature = -1",
            ),
        ],
        dev,
    );
}

fn retrofit_training_moves_the_decisions_towards_the_target<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    B::seed(dev, 11);
    let config = DecoderConfig::new(256, 32, 2, 4, 2, 64);
    let model = config.init::<AD<B>>(dev).unwrap();
    let (model, config) = to_dmc(
        &model,
        &config,
        DmcSettings {
            init_bias: 1.0,
            ..DmcSettings::default()
        },
    )
    .unwrap();
    let mut recipe = train_config(8);
    recipe.dmc = Some(train::DmcTraining::new(3.0));
    let decision = |m: &DecoderLm<AD<B>>| {
        let a = m.blocks().unwrap()[0].attention.dmc().unwrap();
        let d = a.attention.head_dim();
        floats(
            a.attention
                .wk
                .weight
                .val()
                .reshape([32, 2, d])
                .narrow(2, d - 1, 1),
        )
    };
    assert!(
        decision(&model).iter().all(|&w| w == 0.0),
        "a retrofit starts with zeroed decision weights"
    );
    let dir = temp_dir("dmc-train");
    let mut trainer =
        train::Trainer::<AD<B>>::from_model(model, config, recipe.clone(), dev).unwrap();
    let steps: Vec<train::StepMetrics> = (0..8).map(|_| trainer.train_step().unwrap()).collect();
    let moved = decision(trainer.model())
        .iter()
        .map(|w| w.abs())
        .fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "the decision weights did not train ({moved})");
    let targets: Vec<f64> = steps.iter().map(|m| m.dmc.unwrap().target).collect();
    let ramp_then_hold = targets[..6].windows(2).all(|w| w[1] > w[0])
        && targets[5..].iter().all(|&t| (t - 3.0).abs() < 1e-9);
    assert!(
        ramp_then_hold,
        "the target ramps over 3/4 of the steps, then holds: {targets:?}"
    );
    assert!(steps.iter().all(|m| m.dmc.unwrap().cr >= 1.0));
    // A compression target needs a DMC model.
    let err = train::Trainer::<AD<B>>::new(DecoderConfig::new(256, 32, 2, 4, 2, 64), recipe, dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--dmc"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn policies_evict_from_the_merged_cache_head_by_head<B: Backend>(dev: &B::Device) {
    B::seed(dev, 9);
    let settings = DmcSettings {
        init_bias: 1.0,
        window: 4,
        ..DmcSettings::default()
    };
    let model = base(4, 2).with_dmc(Some(settings)).init::<B>(dev).unwrap();
    let ids = sequence(60);
    let prefill = |spec: &str| {
        let mut policy = kv_policies::build_policy::<B>(spec).unwrap();
        let mut state = model.new_state(1);
        model
            .forward_with_policy(
                tokens(&ids[..40], dev),
                &mut state,
                policy.as_mut(),
                kv_policies::Phase::Prefill,
            )
            .unwrap();
        (state, policy)
    };
    // StreamingLLM over each head's merged slots: the slots at positions below `sinks`, then
    // the newest others, out of what DMC alone holds.
    let (full, _) = prefill("full");
    let (streamed, _) = prefill("streaming:budget=10,sinks=4");
    for layer in 0..2 {
        let (all, kept) = (
            kept(full.cache().layer(layer)),
            kept(streamed.cache().layer(layer)),
        );
        for (head, (all, kept)) in all.iter().zip(&kept).enumerate() {
            assert!(
                all.len() > 10,
                "layer {layer} head {head}: DMC alone holds {} slots",
                all.len()
            );
            let sinks: Vec<i64> = all.iter().copied().filter(|&p| p < 4).collect();
            let mut want = sinks.clone();
            want.extend(
                all.iter()
                    .copied()
                    .filter(|&p| p >= 4)
                    .skip(all.len() - sinks.len() - (10 - sinks.len())),
            );
            assert_eq!(kept, &want, "layer {layer} head {head}");
        }
    }
    // Scorers that read the attention (per head, from each head's own observation) keep every
    // head within budget while decoding, and the merged cache stays smaller than DMC alone.
    for spec in [
        "h2o:budget=12",
        "tova:budget=12",
        "snapkv:budget=12,window=4",
        "knorm:budget=12,skip=0",
        "vatp:budget=12",
    ] {
        let (mut state, mut policy) = prefill(spec);
        for (step, &id) in ids[40..].iter().enumerate() {
            let logits = model
                .forward_with_policy(
                    tokens(&[id], dev),
                    &mut state,
                    policy.as_mut(),
                    kv_policies::Phase::Decode { step: step + 1 },
                )
                .unwrap();
            assert!(floats(logits).iter().all(|x| x.is_finite()), "{spec}");
        }
        let stats = state.cache().stats();
        let bound = if spec.starts_with("snapkv") {
            12 + 20
        } else {
            12
        };
        for l in &stats.layers {
            assert!(
                l.slots_per_head.iter().all(|&n| n <= bound),
                "{spec}: {:?}",
                l.slots_per_head
            );
            assert_eq!(l.tokens_seen, 60);
        }
    }
    // Selection across heads or re-rotation need one position list per layer: a clear error.
    let mut policy = kv_policies::build_policy::<B>("streaming:budget=10,rerotate=true").unwrap();
    let err = model
        .forward_with_policy(
            tokens(&ids[..40], dev),
            &mut model.new_state(1),
            policy.as_mut(),
            kv_policies::Phase::Prefill,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("ragged") && err.contains("rerotate"), "{err}");
}

fn a_dmc_retrofit_resumes_exactly<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    let config = DecoderConfig::new(256, 32, 2, 4, 2, 64);
    let start = || {
        B::seed(dev, 13);
        let model = config.init::<AD<B>>(dev).unwrap();
        let (model, dmc) = to_dmc(
            &model,
            &config,
            DmcSettings {
                init_bias: 1.0,
                ..DmcSettings::default()
            },
        )
        .unwrap();
        let mut recipe = train_config(6);
        recipe.dmc = Some(train::DmcTraining::new(2.0));
        train::Trainer::<AD<B>>::from_model(model, dmc, recipe, dev).unwrap()
    };
    let (straight, paused) = (temp_dir("dmc-straight"), temp_dir("dmc-paused"));
    train::run(&mut start(), &straight, |_| {}).unwrap();
    train::run_until(&mut start(), &paused, 3, |_| {}).unwrap();
    // A resumed run is a new process: the backend's generator is wherever it happens to be.
    B::seed(dev, 999);
    let mut resumed = train::Trainer::<AD<B>>::resume(&paused, None, dev).unwrap();
    train::run(&mut resumed, &paused, |_| {}).unwrap();
    // The Gumbel noise is drawn per step, so the losses and the weights are the same.
    assert_eq!(step_losses(&straight), step_losses(&paused));
    let (a, _) = load_model::<B>(&straight, dev).unwrap();
    let (b, _) = load_model::<B>(&paused, dev).unwrap();
    assert_eq!(params::<B, _>(&a), params::<B, _>(&b));
    std::fs::remove_dir_all(&straight).unwrap();
    std::fs::remove_dir_all(&paused).unwrap();
}

kv_core::backend_tests!(
    a_dmc_retrofit_resumes_exactly,
    policies_evict_from_the_merged_cache_head_by_head,
    a_retrofit_starts_as_the_model_without_its_decision_channels,
    a_dmc_model_decodes_what_its_training_path_computes,
    dmc_checkpoints_keep_the_kind_and_its_settings,
    retrofit_training_moves_the_decisions_towards_the_target,
);
