//! MHA to GQA/MQA (mean pooling), to MLA (SVD) and to partial RoPE, and uptraining after it.

use super::support::*;
use crate::*;
use burn::module::Param;
use burn::prelude::*;

/// `w` `[d, heads * head_dim]` with every head replaced by the first head of its group of `r`.
fn same_within_groups<B: Backend>(
    w: Tensor<B, 2>,
    groups: usize,
    r: usize,
    head_dim: usize,
) -> Tensor<B, 2> {
    let d = w.dims()[0];
    w.reshape([d, groups, r, head_dim])
        .narrow(2, 0, 1)
        .expand([d, groups, r, head_dim])
        .reshape([d, groups * r * head_dim])
}

fn mean_pooled_grouping_of_identical_heads_keeps_the_logits<B: Backend>(dev: &B::Device) {
    let x = tokens(&sequence(20), dev);
    for (heads, kv, target) in [(8, 8, 2), (8, 8, 1), (8, 2, 1), (8, 4, 4)] {
        let config = tiny(heads, kv);
        let mut model = config.init::<B>(dev).unwrap();
        for block in model.blocks_mut().unwrap().iter_mut() {
            let attn = block.attention.grouped_mut().unwrap();
            attn.wk.weight = Param::from_tensor(same_within_groups(
                attn.wk.weight.val(),
                target,
                kv / target,
                4,
            ));
            attn.wv.weight = Param::from_tensor(same_within_groups(
                attn.wv.weight.val(),
                target,
                kv / target,
                4,
            ));
        }
        let (grouped, grouped_config) = to_grouped(&model, &config, target).unwrap();
        assert_eq!(grouped_config.n_kv_heads, target);
        assert_eq!(
            grouped.blocks().unwrap()[0]
                .attention
                .grouped()
                .unwrap()
                .n_kv_heads(),
            target
        );
        let diff = max_abs_diff(model.forward(x.clone()), grouped.forward(x.clone()));
        assert!(diff <= 1e-5, "{heads}/{kv} -> {target}: {diff}");
        assert_eq!(
            grouped_config.kv_bytes_per_token() * kv,
            config.kv_bytes_per_token() * target
        );
    }
    // With distinct heads each new head is the mean of its group's columns.
    let config = tiny(8, 8);
    let model = config.init::<B>(dev).unwrap();
    let (grouped, _) = to_grouped(&model, &config, 2).unwrap();
    let old = model.blocks().unwrap()[1]
        .attention
        .grouped()
        .unwrap()
        .wv
        .weight
        .val();
    let want = (old.clone().narrow(1, 16, 4)
        + old.clone().narrow(1, 20, 4)
        + old.clone().narrow(1, 24, 4)
        + old.narrow(1, 28, 4))
    .div_scalar(4.0);
    let got = grouped.blocks().unwrap()[1]
        .attention
        .grouped()
        .unwrap()
        .wv
        .weight
        .val()
        .narrow(1, 4, 4);
    assert!((got - want).abs().max().into_scalar().elem::<f32>() <= 1e-6);
    for (kv, want) in [
        (3, "kv_heads = 3"),
        (0, "kv_heads = 0"),
        (16, "kv_heads = 16"),
    ] {
        let err = to_grouped(&model, &config, kv).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("n_kv_heads = 8"),
            "{err}"
        );
    }
    let mla = tiny_mla(4, 0);
    let err = to_grouped(&mla.init::<B>(dev).unwrap(), &mla, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mla"), "{err}");
}

/// A partial-RoPE grouped model (4 of 8 dims rotated) whose heads share their rotated key projection.
fn shared_rope_model<B: Backend>(kv: usize, dev: &B::Device) -> (DecoderLm<B>, DecoderConfig) {
    let config = tiny(4, kv).with_rope_dims(Some(4));
    let mut model = config.init::<B>(dev).unwrap();
    for block in model.blocks_mut().unwrap().iter_mut() {
        let attn = block.attention.grouped_mut().unwrap();
        let w = attn.wk.weight.val().reshape([32, kv, 8]);
        let rot = w
            .clone()
            .narrow(1, 0, 1)
            .narrow(2, 0, 4)
            .expand([32, kv, 4]);
        attn.wk.weight =
            Param::from_tensor(Tensor::cat(vec![rot, w.narrow(2, 4, 4)], 2).reshape([32, kv * 8]));
    }
    (model, config)
}

fn latent_conversion_is_exact_at_full_rank_and_reports_what_truncation_loses<B: Backend>(
    dev: &B::Device,
) {
    let ids = sequence(24);
    for kv in [4, 2] {
        let (model, config) = shared_rope_model::<B>(kv, dev);
        let want = model.forward(tokens(&ids, dev));
        // M = [W_K unrotated | W_V] is 32 x (4 x 4 + 4 x 8): rank <= d_model = 32.
        let (mla, mla_config, report) = to_latent(&model, &config, 32).unwrap();
        assert!(
            report
                .latent_error
                .iter()
                .chain(&report.rope_error)
                .all(|&e| e <= 1e-6),
            "{report:?}"
        );
        let diff = max_abs_diff(mla.forward(tokens(&ids, dev)), want.clone());
        assert!(diff <= 1e-4, "kv {kv}: converted forward differs by {diff}");
        let (decoded, cache) = decode_logits(&mla, &ids, 9, dev);
        let diff = max_abs_diff(decoded, want);
        assert!(
            diff <= 1e-4,
            "kv {kv}: converted absorbed decode differs by {diff}"
        );
        assert_eq!(cache.stats().kv_bytes, (32 + 4) * ids.len() * 2 * 4);
        assert_eq!(mla_config.kv_bytes_per_token(), (32 + 4) * 2 * 4);
        // The converted config round-trips through JSON (checkpoints store it).
        assert_eq!(
            DecoderConfig::from_json(&serde_json::to_string(&mla_config).unwrap()).unwrap(),
            mla_config
        );
    }
    // Truncation: the reported error is the relative error of the factors actually stored, and it
    // shrinks as the latent widens.
    let (model, config) = shared_rope_model::<B>(4, dev);
    let attn = model.blocks().unwrap()[0].attention.grouped().unwrap();
    let wk = attn
        .wk
        .weight
        .val()
        .reshape([32, 4, 8])
        .narrow(2, 4, 4)
        .reshape([32, 16]);
    let m = Tensor::cat(vec![wk, attn.wv.weight.val()], 1);
    let mut last = f64::INFINITY;
    for k in [4, 8, 16, 24] {
        let (mla, _, report) = to_latent(&model, &config, k).unwrap();
        let layer = mla.blocks().unwrap()[0].attention.latent().unwrap();
        let up = Tensor::cat(vec![layer.wk_up.weight.val(), layer.wv_up.weight.val()], 1);
        let rebuilt = layer.wkv_down.weight.val().matmul(up);
        let norm = |t: Tensor<B, 2>| t.powi_scalar(2).sum().into_scalar().elem::<f64>().sqrt();
        let measured = norm(rebuilt - m.clone()) / norm(m.clone());
        assert!(
            (measured - report.latent_error[0]).abs() <= 1e-4,
            "k {k}: measured {measured} vs reported {}",
            report.latent_error[0]
        );
        assert!(
            report.latent_error[0] < last && report.latent_error[0] > 0.0,
            "k {k}: {:?}",
            report.latent_error
        );
        last = report.latent_error[0];
        assert_eq!(report.singular_values[0].len(), 32);
    }
    // Heads with different rotated keys are pooled, and the report says by how much.
    let config = tiny(4, 4).with_rope_dims(Some(4));
    let (_, _, report) = to_latent(&config.init::<B>(dev).unwrap(), &config, 32).unwrap();
    assert!(report.rope_error.iter().all(|&e| e > 0.1), "{report:?}");
    // Full-RoPE models and nonsense widths are refused, naming the value.
    let full = tiny(4, 4);
    let err = to_latent(&full.init::<B>(dev).unwrap(), &full, 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_dims = null"), "{err}");
    let err = to_latent(&model, &config, 40).unwrap_err().to_string();
    assert!(err.contains("kv_latent = 40"), "{err}");
}

fn partial_rope_conversion_keeps_the_fast_frequencies_exactly<B: Backend>(dev: &B::Device) {
    // head_dim 8: rotate-half pairs (i, i + 4) turn at 10000^(-i/4); keeping 4 dims keeps pairs 0, 1.
    let ids = sequence(30);
    let config = tiny(4, 2);
    let mut model = config.init::<B>(dev).unwrap();
    let approx = to_partial_rope(&model, &config, 4)
        .unwrap()
        .0
        .forward(tokens(&ids, dev));
    // Queries that read nothing from the slow pairs (dims 2, 3, 6, 7 of each head) make the
    // dropped rotation irrelevant, so the converted model must reproduce the logits.
    let mask: Vec<f32> = (0..4)
        .flat_map(|_| [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
        .collect();
    let mask = Tensor::<B, 1>::from_floats(mask.as_slice(), dev).reshape([1, 32]);
    for block in model.blocks_mut().unwrap().iter_mut() {
        let attn = block.attention.grouped_mut().unwrap();
        attn.wq.weight = Param::from_tensor(attn.wq.weight.val() * mask.clone());
    }
    let want = model.forward(tokens(&ids, dev));
    let (partial, partial_config) = to_partial_rope(&model, &config, 4).unwrap();
    assert_eq!(partial_config.rope_dims, Some(4));
    assert!(
        (partial_config.rope_theta - 100.0).abs() < 1e-9,
        "{}",
        partial_config.rope_theta
    );
    let diff = max_abs_diff(partial.forward(tokens(&ids, dev)), want.clone());
    assert!(diff <= 1e-5, "partial RoPE changed the logits by {diff}");
    // With the slow pairs in use, dropping their rotation is an approximation (the test can fail).
    let full = to_partial_rope(&config.init::<B>(dev).unwrap(), &config, 4).unwrap();
    assert!(max_abs_diff(approx, full.0.forward(tokens(&ids, dev))) > 0.0);
    // The converted model is a partial-RoPE model, so the latent conversion applies.
    let (mla, mla_config, _) = to_latent(&partial, &partial_config, 16).unwrap();
    assert_eq!(mla_config.mla.as_ref().unwrap().rope_dim, 4);
    assert_eq!(mla.forward(tokens(&ids, dev)).dims(), [1, 30, 64]);
    for (bad, want) in [
        (0, "rope_dims = 0"),
        (3, "rope_dims = 3"),
        (8, "rope_dims = 8"),
    ] {
        let err = to_partial_rope(&model, &config, bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err}");
    }
    let err = to_partial_rope(&partial, &partial_config, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already uses partial RoPE"), "{err}");
}

fn grouped_conversion_pools_query_key_value_biases<B: Backend>(dev: &B::Device) {
    let x = tokens(&sequence(20), dev);
    let config = tiny(8, 8).with_qkv_bias(Some(true));
    let mut model = config.init::<B>(dev).unwrap();
    for block in model.blocks_mut().unwrap().iter_mut() {
        let attn = block.attention.grouped_mut().unwrap();
        for lin in [&mut attn.wk, &mut attn.wv] {
            lin.weight = Param::from_tensor(same_within_groups(lin.weight.val(), 2, 4, 4));
            let b = lin.bias.as_ref().unwrap().val().reshape([1, 32]);
            lin.bias = Some(Param::from_tensor(
                same_within_groups(b, 2, 4, 4).reshape([32]),
            ));
        }
    }
    let (grouped, grouped_config) = to_grouped(&model, &config, 2).unwrap();
    assert_eq!(
        grouped.blocks().unwrap()[0]
            .attention
            .grouped()
            .unwrap()
            .wk
            .bias
            .as_ref()
            .unwrap()
            .dims(),
        [8]
    );
    let diff = max_abs_diff(model.forward(x.clone()), grouped.forward(x));
    assert!(diff <= 1e-5, "pooled biases changed the logits by {diff}");
    let err = to_latent(&grouped, &grouped_config.clone().with_rope_dims(Some(2)), 8)
        .unwrap_err()
        .to_string();
    assert!(err.contains("qkv_bias"), "{err}");
}

fn converted_models_uptrain_below_their_starting_loss<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    // Partial RoPE (4 of 8 dims) so the latent conversion applies too.
    let config = DecoderConfig::new(256, 32, 2, 4, 4, 64).with_rope_dims(Some(4));
    let model = config.init::<B>(dev).unwrap();
    let grouped = to_grouped(&model, &config, 2).unwrap();
    let (latent_model, latent_config, _) = to_latent(&model, &config, 16).unwrap();
    for (name, (m, c)) in [("gqa", grouped), ("mla", (latent_model, latent_config))] {
        // As `kv convert` then `kv train --init`: saved, then loaded for training.
        let dir = temp_dir(&format!("converted-{name}"));
        save_model(&m, &c, &dir).unwrap();
        let (m, c) = load_model::<AD<B>>(&dir, dev).unwrap();
        let mut t = train::Trainer::<AD<B>>::from_model(m, c, train_config(6), dev).unwrap();
        let before = t.evaluate().unwrap().valid_loss;
        for _ in 0..6 {
            t.train_step().unwrap();
        }
        let after = t.evaluate().unwrap().valid_loss;
        assert!(
            after < before,
            "{name}: validation loss {before} -> {after} after 6 steps"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

kv_core::backend_tests!(
    mean_pooled_grouping_of_identical_heads_keeps_the_logits,
    latent_conversion_is_exact_at_full_rank_and_reports_what_truncation_loses,
    partial_rope_conversion_keeps_the_fast_frequencies_exactly,
    grouped_conversion_pools_query_key_value_biases,
    converted_models_uptrain_below_their_starting_loss,
);
