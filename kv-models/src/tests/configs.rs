//! Model configs and presets: bad values are errors naming them, presets parse and size up.

use super::support::*;
use crate::*;
use burn::prelude::*;

fn bad_configs_name_the_value<B: Backend>(dev: &B::Device) {
    let cases = [
        (tiny(8, 3), "kv_heads = 3"),
        (
            DecoderConfig::new(64, 24, 2, 4, 4, 48),
            "fine: head_dim 6 is even",
        ),
        (DecoderConfig::new(64, 20, 2, 4, 4, 48), "head_dim = 5"),
        (DecoderConfig::new(64, 32, 0, 8, 8, 48), "n_layers = 0"),
        (DecoderConfig::new(0, 32, 2, 8, 8, 48), "vocab_size = 0"),
        (DecoderConfig::new(64, 30, 2, 8, 8, 48), "d_model = 30"),
    ];
    assert_init_outcomes::<B>(&cases, dev);
}

fn mla_decoder_configs_name_the_value<B: Backend>(dev: &B::Device) {
    let mla = |kv_latent, rope_dim| Some(MlaSettings::new(8, kv_latent, rope_dim));
    let cases = [
        (
            DecoderConfig {
                n_kv_heads: 2,
                ..tiny_mla(4, 0)
            },
            "n_kv_heads = 2",
        ),
        (tiny_mla(4, 0).with_rope_dims(Some(4)), "rope_dims = 4"),
        (tiny_mla(4, 0).with_mla(mla(12, 5)), "rope_dim = 5"),
        (tiny_mla(4, 0).with_mla(mla(0, 4)), "kv_latent = 0"),
        (tiny_mla(4, 40), "query_latent = 40"),
        // d_model need not be heads x head_dim with MLA.
        (
            DecoderConfig::new(64, 30, 2, 4, 1, 48).with_mla(mla(12, 4)),
            "fine",
        ),
    ];
    assert_init_outcomes::<B>(&cases, dev);
    // Configs without the field (every config written before MLA) still parse, as grouped models.
    let json = r#"{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
        "rope_theta": 10000.0, "max_positions": 64, "norm_eps": 1e-5, "tie_embeddings": true, "token_shift": false}"#;
    assert_eq!(DecoderConfig::from_json(json).unwrap().mla, None);
    let err = DecoderConfig::from_json(&json.replace("\"token_shift\": false", "\"token_shift\": false, \"mla\": {\"head_dim\": 8, \"kv_latent\": 12, \"rope_dim\": 4, \"latent\": 3}")).unwrap_err();
    assert!(err.to_string().contains("unknown field `latent`"), "{err}");
}

#[test]
fn presets_parse_and_unknown_names_list_the_valid_ones() {
    for name in preset_names() {
        let p = preset(name).unwrap();
        assert!(p.train.is_some() || name == "decode-bench", "{name}");
    }
    let err = preset("huge").unwrap_err().to_string();
    assert!(err.contains("huge") && err.contains("tiny-mha"), "{err}");
}

#[test]
fn tiny_mla_preset_matches_tiny_mha_in_size_with_a_third_of_its_cache() {
    type B = burn::backend::Flex;
    let (mha, mla) = (preset("tiny-mha").unwrap(), preset("tiny-mla").unwrap());
    assert_eq!(mha.train, mla.train);
    let count = |p: &Preset| p.model.init::<B>(&Default::default()).unwrap().num_params();
    let (n_mha, n_mla) = (count(&mha), count(&mla));
    assert!(
        (n_mla as f64 / n_mha as f64 - 1.0).abs() <= 0.02,
        "{n_mla} vs {n_mha} parameters"
    );
    // (kv_latent 64 + rope_dim 16) against 2 x 4 heads x 32 per token and layer.
    assert_eq!(
        mla.model.kv_bytes_per_token() * 256,
        mha.model.kv_bytes_per_token() * 80
    );
}

kv_core::backend_tests!(
    bad_configs_name_the_value,
    mla_decoder_configs_name_the_value,
);
