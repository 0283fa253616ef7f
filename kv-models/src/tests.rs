//! Backend-generic model tests: cached paths against full recomputation, configs, checkpoints.

use crate::*;
use burn::module::Param;
use burn::prelude::*;
use kv_attention::GroupedAttentionConfig;
use kv_policies::FullCache;

fn tiny(n_heads: usize, n_kv_heads: usize) -> DecoderConfig {
    DecoderConfig::new(64, 32, 2, n_heads, n_kv_heads, 48)
}

fn tokens<B: Backend>(ids: &[i32], dev: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::<B, 1, Int>::from_ints(ids, dev).reshape([1, ids.len()])
}

fn sequence(len: usize) -> Vec<i32> {
    (0..len).map(|i| ((i * 29 + 7) % 64) as i32).collect()
}

fn max_abs_diff<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    (a - b).abs().max().into_scalar().elem::<f32>()
}

fn cached_decode_matches_full_forward<B: Backend>(dev: &B::Device) {
    // 90 tokens: prompts that fill the cache's body, its tail, and decodes that cross a flush.
    let ids = sequence(90);
    for (heads, kv) in [(8, 8), (8, 2), (8, 1)] {
        let model = tiny(heads, kv).init::<B>(dev).unwrap();
        let full = model.forward(tokens(&ids, dev));
        for split in [1, 5, 17, 70, 90] {
            let mut cache = model.new_cache(1);
            let mut parts = vec![model.forward_cached(tokens(&ids[..split], dev), &mut cache).unwrap()];
            for &id in &ids[split..] {
                parts.push(model.forward_cached(tokens(&[id], dev), &mut cache).unwrap());
            }
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(diff <= 1e-4, "heads {heads}/{kv}, split {split}: max abs diff {diff}");
            assert_eq!(cache.tokens_seen(), ids.len());
            // Measured bytes: 2 (K and V) x layers x kv_heads x head_dim x slots x 4 bytes.
            assert_eq!(cache.stats().kv_bytes, 2 * 2 * kv * 4 * ids.len() * 4);
        }
    }
}

/// Expands each KV head's projection columns to the `r` query heads of its group.
fn repeat_heads<B: Backend>(w: Tensor<B, 2>, kv: usize, r: usize, head_dim: usize) -> Tensor<B, 2> {
    let d = w.dims()[0];
    w.reshape([d, kv, 1, head_dim]).expand([d, kv, r, head_dim]).reshape([d, kv * r * head_dim])
}

fn gqa_equals_mha_with_duplicated_kv_heads<B: Backend>(dev: &B::Device) {
    let (heads, kv) = (8, 2);
    let gqa = tiny(heads, kv).init::<B>(dev).unwrap();
    let mut mha = gqa.clone();
    for block in mha.blocks.iter_mut() {
        let src = block.attn.clone();
        let mut attn = GroupedAttentionConfig::new(32, heads, heads).init::<B>(dev).unwrap();
        attn.wq = src.wq;
        attn.wo = src.wo;
        attn.wk.weight = Param::from_tensor(repeat_heads(src.wk.weight.val(), kv, heads / kv, 4));
        attn.wv.weight = Param::from_tensor(repeat_heads(src.wv.weight.val(), kv, heads / kv, 4));
        block.attn = attn;
    }
    assert_eq!(mha.blocks[0].attn.n_kv_heads(), heads);
    let x = tokens(&sequence(20), dev);
    let diff = max_abs_diff(gqa.forward(x.clone()), mha.forward(x));
    assert!(diff <= 1e-5, "{diff}");
}

fn bad_configs_name_the_value<B: Backend>(dev: &B::Device) {
    let cases = [
        (tiny(8, 3), "kv_heads = 3"),
        (DecoderConfig::new(64, 24, 2, 4, 4, 48), "fine: head_dim 6 is even"),
        (DecoderConfig::new(64, 20, 2, 4, 4, 48), "head_dim = 5"),
        (DecoderConfig::new(64, 32, 0, 8, 8, 48), "n_layers = 0"),
        (DecoderConfig::new(0, 32, 2, 8, 8, 48), "vocab_size = 0"),
        (DecoderConfig::new(64, 30, 2, 8, 8, 48), "d_model = 30"),
    ];
    for (cfg, want) in cases {
        match cfg.init::<B>(dev) {
            Ok(_) => assert!(want.contains("fine"), "{cfg:?} should fail with {want}"),
            Err(e) => assert!(e.to_string().contains(want), "{e} should mention {want}"),
        }
    }
}

fn checkpoint_round_trips<B: Backend>(dev: &B::Device) {
    let cfg = tiny(4, 2);
    let model = cfg.init::<B>(dev).unwrap();
    let dir = std::env::temp_dir().join(format!("kv-ckpt-test-{}", std::process::id()));
    save_model(&model, &cfg, &dir).unwrap();
    let (loaded, loaded_cfg) = load_model::<B>(&dir, dev).unwrap();
    assert_eq!(loaded_cfg, cfg);
    let x = tokens(&sequence(9), dev);
    assert_eq!(max_abs_diff(model.forward(x.clone()), loaded.forward(x)), 0.0);
    // A truncated weights file is an error that names the file, not a panic.
    let bytes = std::fs::read(dir.join(MODEL_FILE)).unwrap();
    std::fs::write(dir.join(MODEL_FILE), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_model::<B>(&dir, dev).unwrap_err().to_string();
    assert!(err.contains(MODEL_FILE), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn greedy_generation_follows_full_forward_argmax<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).init::<B>(dev).unwrap();
    let prompt: Vec<u32> = sequence(6).iter().map(|&t| t as u32).collect();
    let config = GenerateConfig { max_new_tokens: 8, sampler: SamplerConfig::default(), stop_token: None };
    let mut streamed = Vec::new();
    let out = generate(&model, &prompt, &config, &mut FullCache, |t| streamed.push(t)).unwrap();
    assert_eq!(out.tokens, streamed);
    assert_eq!(out.tokens.len(), 8);
    let mut seq: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
    for &t in &out.tokens {
        let logits = model.forward(tokens(&seq, dev));
        let [_, n, v] = logits.dims();
        let row: Vec<f32> = logits.narrow(1, n - 1, 1).reshape([v]).into_data().iter::<f32>().collect();
        assert_eq!(argmax(&row), t);
        seq.push(t as i32);
    }
    // The last sampled token is never fed back, so the cache holds prompt + new - 1 tokens.
    assert_eq!(out.cache.tokens_seen, prompt.len() + 7);
    let err = generate(&model, &[64], &config, &mut FullCache, |_| {}).unwrap_err().to_string();
    assert!(err.contains("prompt token = 64"), "{err}");
}

kv_core::backend_tests!(
    cached_decode_matches_full_forward,
    gqa_equals_mha_with_duplicated_kv_heads,
    bad_configs_name_the_value,
    checkpoint_round_trips,
    greedy_generation_follows_full_forward_argmax,
);

#[test]
fn presets_parse_and_unknown_names_list_the_valid_ones() {
    for name in preset_names() {
        preset(name).unwrap();
    }
    let err = preset("huge").unwrap_err().to_string();
    assert!(err.contains("huge") && err.contains("tiny-mha"), "{err}");
}
