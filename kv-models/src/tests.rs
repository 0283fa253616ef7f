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

fn batched_forward_matches_each_row_decoded_alone<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).init::<B>(dev).unwrap();
    let (a, b) = (sequence(20), sequence(21)[1..].to_vec());
    let both: Vec<i32> = a.iter().chain(&b).copied().collect();
    let batch = model.forward(Tensor::<B, 1, Int>::from_ints(both.as_slice(), dev).reshape([2, 20]));
    for (row, ids) in [a, b].iter().enumerate() {
        let mut cache = model.new_cache(1);
        let parts: Vec<_> = ids.iter().map(|&id| model.forward_cached(tokens(&[id], dev), &mut cache).unwrap()).collect();
        let diff = max_abs_diff(Tensor::cat(parts, 1), batch.clone().narrow(0, row, 1));
        assert!(diff <= 1e-4, "row {row}: {diff}");
    }
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
    assert_eq!(max_abs_diff(model.forward(x.clone()), loaded.forward(x.clone())), 0.0);
    // A different config is refused with the differing fields named.
    let err = load_model_expecting::<B>(&dir, &tiny(4, 4), dev).unwrap_err().to_string();
    assert!(err.contains("n_kv_heads 2 vs 4"), "{err}");
    load_model_expecting::<B>(&dir, &cfg, dev).unwrap();
    // A failed write leaves the previous checkpoint intact: block the temporary file's path.
    let blocker = dir.join(format!(".{CHECKPOINT_FILE}.partial"));
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let other = tiny(4, 2).init::<B>(dev).unwrap();
    assert!(save_model(&other, &cfg, &dir).is_err());
    let (still, _) = load_model::<B>(&dir, dev).unwrap();
    assert_eq!(max_abs_diff(model.forward(x.clone()), still.forward(x.clone())), 0.0);
    std::fs::remove_dir_all(&blocker).unwrap();
    // A truncated file is an error that says so and names the file, not a panic.
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_model::<B>(&dir, dev).unwrap_err().to_string();
        assert!(err.contains(CHECKPOINT_FILE) && (err.contains("truncated") || err.contains("wrong file type")), "{err}");
    }
    let mut corrupt = bytes.clone();
    corrupt[bytes.len() / 2] ^= 0xff;
    std::fs::write(&path, &corrupt).unwrap();
    assert!(load_model::<B>(&dir, dev).unwrap_err().to_string().contains("checksum"));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(load_model::<B>(&dir, dev).unwrap_err().to_string().contains("no such checkpoint directory"));
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

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train_config(steps: usize) -> train::TrainConfig {
    serde_json::from_value(serde_json::json!({
        "seq_len": 96, "batch_size": 4, "grad_accum": 2, "steps": steps, "lr": 0.003, "warmup_steps": 2,
        "tasks": ["recall"], "task_fraction": 0.5, "eval_every": 0, "eval_windows": 2, "eval_task_samples": 2,
        "checkpoint_every": 0, "seed": 7
    }))
    .unwrap()
}

/// Every float parameter of a model, flattened in visiting order.
fn params<B: Backend, M: burn::module::Module<B>>(m: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: Backend> burn::module::ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
            self.0.extend(p.val().into_data().iter::<f32>());
        }
    }
    let mut c = Collect(vec![]);
    m.visit(&mut c);
    c.0
}

fn step_losses(dir: &std::path::Path) -> Vec<(usize, f64)> {
    train::read_log(dir).unwrap().into_iter().filter_map(|l| match l {
        train::LogLine::Step(m) => Some((m.step, m.loss)),
        _ => None,
    }).collect()
}

fn resume_is_exact<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    let model = DecoderConfig::new(256, 32, 2, 4, 2, 64);
    let (straight, paused) = (temp_dir("straight"), temp_dir("paused"));
    let mut t = train::Trainer::<AD<B>>::new(model.clone(), train_config(6), dev).unwrap();
    train::run(&mut t, &straight, |_| {}).unwrap();
    let mut t = train::Trainer::<AD<B>>::new(model, train_config(6), dev).unwrap();
    train::run_until(&mut t, &paused, 3, |_| {}).unwrap();
    drop(t);
    // A run that died after its checkpoint left a log line the resumed run must not keep.
    let mut log = std::fs::read_to_string(paused.join(train::METRICS_FILE)).unwrap();
    log += "{\"kind\":\"step\",\"step\":4,\"loss\":9.9,\"lr\":0.1,\"tokens_per_s\":1.0}\n";
    std::fs::write(paused.join(train::METRICS_FILE), log).unwrap();
    let mut t = train::Trainer::<AD<B>>::resume(&paused, None, dev).unwrap();
    assert_eq!(t.step(), 3);
    train::run(&mut t, &paused, |_| {}).unwrap();
    assert_eq!(step_losses(&straight), step_losses(&paused));
    assert_eq!(step_losses(&straight).len(), 6);
    let (a, _) = load_model::<B>(&straight, dev).unwrap();
    let (b, _) = load_model::<B>(&paused, dev).unwrap();
    let (pa, pb) = (params::<B, _>(&a), params::<B, _>(&b));
    let diff = pa.iter().zip(&pb).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff <= 1e-6, "parameters differ by {diff}");
    // Weights-only checkpoints cannot be resumed, and say what to do instead.
    save_model(&a, &DecoderConfig::new(256, 32, 2, 4, 2, 64), &straight).unwrap();
    let err = train::Trainer::<AD<B>>::resume(&straight, None, dev).err().unwrap().to_string();
    assert!(err.contains("--init"), "{err}");
    std::fs::remove_dir_all(&straight).unwrap();
    std::fs::remove_dir_all(&paused).unwrap();
}

fn a_few_steps_reduce_the_loss<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    let dir = temp_dir("smoke");
    let mut cfg = train_config(25);
    cfg.tasks.clear();
    cfg.task_fraction = 0.0;
    let mut t = train::Trainer::<AD<B>>::new(DecoderConfig::new(256, 32, 2, 4, 4, 64), cfg, dev).unwrap();
    let before = t.evaluate().unwrap().valid_loss;
    let eval = train::run(&mut t, &dir, |_| {}).unwrap().unwrap();
    let losses = step_losses(&dir);
    assert!(eval.valid_loss < before - 1.0, "valid loss {before} -> {}", eval.valid_loss);
    assert!(losses.last().unwrap().1 < losses[0].1 - 1.0, "{losses:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bad_training_configs_are_errors<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    let model = DecoderConfig::new(256, 32, 1, 4, 4, 64);
    let mut c = train_config(1);
    c.lr = 0.0;
    assert!(train::Trainer::<AD<B>>::new(model.clone(), c, dev).err().unwrap().to_string().contains("lr = 0"));
    let mut c = train_config(1);
    c.tasks = vec![data::TaskKind::Passkey];
    let e = train::Trainer::<AD<B>>::new(model, c, dev).err().unwrap().to_string();
    assert!(e.contains("seq_len = 96") && e.contains("passkey"), "{e}");
}

fn every_policy_with_a_budget_above_the_length_matches_the_full_cache<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).init::<B>(dev).unwrap();
    let ids = sequence(30);
    let mut full_cache = model.new_cache(1);
    let want = model.forward_cached(tokens(&ids, dev), &mut full_cache).unwrap();
    for spec in ["full", "streaming:budget=64", "streaming:budget=1.0,rerotate=true", "h2o:budget=1.0", "h2o:budget=64,normalize=true", "vatp:budget=1.0", "knorm:budget=1.0", "snapkv:budget=1.0,window=8", "tova:budget=1.0", "pyramidkv:budget=1.0,window=8"] {
        let mut policy = kv_policies::build_policy::<B>(spec).unwrap();
        let mut cache = model.new_cache(1);
        let mut parts = vec![model.forward_with_policy(tokens(&ids[..20], dev), &mut cache, policy.as_mut(), kv_policies::Phase::Prefill).unwrap()];
        for (step, &id) in ids[20..].iter().enumerate() {
            let phase = kv_policies::Phase::Decode { step: step + 1 };
            parts.push(model.forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase).unwrap());
        }
        let diff = max_abs_diff(Tensor::cat(parts, 1), want.clone());
        assert!(diff <= 1e-5, "{spec}: {diff}");
        assert_eq!(cache.stats().total_slots(), 2 * 2 * 30, "{spec}");
    }
}

fn policy_perplexity_with_a_full_cache_matches_the_forward_pass<B: Backend>(dev: &B::Device) {
    let model = DecoderConfig::new(256, 32, 2, 8, 2, 48).init::<B>(dev).unwrap();
    let corpus = data::Corpus::stories(5, 4000);
    // Byte-level text needs all 256 ids: a smaller vocabulary is an error, not an out-of-range panic.
    let small = tiny(8, 2).init::<B>(dev).unwrap();
    let err = validation_loss(&small, &corpus, 40, 3).unwrap_err().to_string();
    assert!(err.contains("vocab_size = 64"), "{err}");
    let want = validation_loss(&model, &corpus, 40, 3).unwrap();
    let got = policy_loss(&model, &corpus, 40, 3, &mut || Box::new(kv_policies::FullCache)).unwrap();
    assert!((want - got).abs() <= 1e-4, "{want} vs {got}");
    // A small streaming budget really changes what the model sees.
    let pruned = policy_loss(&model, &corpus, 40, 3, &mut || kv_policies::build_policy::<B>("streaming:budget=4,sinks=1").unwrap()).unwrap();
    assert!((pruned - want).abs() > 1e-4, "{pruned} vs {want}");
}

fn endless_streaming_keeps_the_cache_constant<B: Backend>(dev: &B::Device) {
    let model = DecoderConfig::new(64, 16, 1, 2, 1, 16).init::<B>(dev).unwrap();
    for rerotate in [false, true] {
        let mut policy = kv_policies::build_policy::<B>(&format!("streaming:budget=24,sinks=4,rerotate={rerotate}")).unwrap();
        let config = GenerateConfig { max_new_tokens: 5000, sampler: SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 }, stop_token: None };
        let mut sizes = Vec::new();
        let out = generate(&model, &[1, 2, 3], &config, policy.as_mut(), |_| sizes.push(())).unwrap();
        assert_eq!(out.tokens.len(), 5000);
        assert_eq!(out.cache.tokens_seen, 3 + 4999);
        assert_eq!(out.cache.layers[0].slots_per_head, vec![24]);
        assert_eq!(out.cache.kv_bytes, 2 * 24 * 8 * 4);
    }
    // Finite logits at the end of a long stream.
    let mut policy = kv_policies::build_policy::<B>("streaming:budget=24,rerotate=true").unwrap();
    let mut cache = model.new_cache(1);
    let ids = sequence(400).iter().map(|&t| t % 64).collect::<Vec<_>>();
    let mut last = None;
    for (i, &id) in ids.iter().enumerate() {
        let phase = if i == 0 { kv_policies::Phase::Prefill } else { kv_policies::Phase::Decode { step: i } };
        last = Some(model.forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase).unwrap());
    }
    let l: Vec<f32> = last.unwrap().into_data().iter::<f32>().collect();
    assert!(l.iter().all(|x| x.is_finite()));
}

kv_core::backend_tests!(
    batched_forward_matches_each_row_decoded_alone,
    policy_perplexity_with_a_full_cache_matches_the_forward_pass,
    every_policy_with_a_budget_above_the_length_matches_the_full_cache,
    endless_streaming_keeps_the_cache_constant,
    resume_is_exact,
    a_few_steps_reduce_the_loss,
    bad_training_configs_are_errors,
    cached_decode_matches_full_forward,
    gqa_equals_mha_with_duplicated_kv_heads,
    bad_configs_name_the_value,
    checkpoint_round_trips,
    greedy_generation_follows_full_forward_argmax,
);

#[test]
fn presets_parse_and_unknown_names_list_the_valid_ones() {
    for name in preset_names() {
        let p = preset(name).unwrap();
        assert!(p.train.is_some() || name == "decode-bench", "{name}");
    }
    let err = preset("huge").unwrap_err().to_string();
    assert!(err.contains("huge") && err.contains("tiny-mha"), "{err}");
}

