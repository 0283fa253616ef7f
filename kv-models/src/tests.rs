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
    for (heads, kv, shift, width, key_shift) in [(8, 8, false, None, None), (8, 2, false, None, None), (8, 1, false, None, None), (8, 2, true, None, None), (8, 2, true, Some(3), None), (8, 2, true, Some(3), Some(true))] {
        let model = tiny(heads, kv).with_token_shift(shift).with_token_shift_width(width).with_key_shift(key_shift).init::<B>(dev).unwrap();
        let full = model.forward(tokens(&ids, dev));
        for split in [1, 5, 17, 70, 90] {
            let mut cache = model.new_cache(1);
            let mut parts = vec![model.forward_cached(tokens(&ids[..split], dev), &mut cache).unwrap()];
            for &id in &ids[split..] {
                parts.push(model.forward_cached(tokens(&[id], dev), &mut cache).unwrap());
            }
            let diff = max_abs_diff(Tensor::cat(parts, 1), full.clone());
            assert!(diff <= 1e-4, "heads {heads}/{kv}, shift {shift} x {width:?}, key shift {key_shift:?}, split {split}: max abs diff {diff}");
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
        let src = block.attn.clone().unwrap();
        let mut attn = GroupedAttentionConfig::new(32, heads, heads).init::<B>(dev).unwrap();
        attn.wq = src.wq;
        attn.wo = src.wo;
        attn.wk.weight = Param::from_tensor(repeat_heads(src.wk.weight.val(), kv, heads / kv, 4));
        attn.wv.weight = Param::from_tensor(repeat_heads(src.wv.weight.val(), kv, heads / kv, 4));
        block.attn = Some(attn);
    }
    assert_eq!(mha.blocks[0].attn.as_ref().unwrap().n_kv_heads(), heads);
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
    let config = GenerateConfig { max_new_tokens: 8, sampler: SamplerConfig::default(), stop_tokens: vec![] };
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
        "checkpoint_every": 0, "seed": 7, "short_seq_len": 24, "short_steps": 4
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
    // The pause falls inside the curriculum's short stage, so the resumed run must switch lengths
    // at the same step. A run that died after its checkpoint left a log line it must not keep.
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
    for spec in ["full", "streaming:budget=64", "streaming:budget=1.0,rerotate=true", "h2o:budget=1.0", "h2o:budget=64,normalize=true", "vatp:budget=1.0", "knorm:budget=1.0", "snapkv:budget=1.0,window=8", "tova:budget=1.0", "pyramidkv:budget=1.0,window=8", "adakv:budget=1.0,window=8", "adakv:budget=1.0,scorer=h2o"] {
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
    let full = policy_loss(&model, &corpus, 40, 3, 1, 1, &mut || Box::new(kv_policies::FullCache)).unwrap();
    let got = full.loss;
    assert!((want - got).abs() <= 1e-4, "{want} vs {got}");
    // Bytes measured from the cache: 2 x layers x kv_heads x head_dim x tokens x 4.
    assert_eq!(full.kv_bytes, (2 * 2 * 2 * 4 * 40 * 4) as f64);
    // A small streaming budget really changes what the model sees.
    let pruned = policy_loss(&model, &corpus, 40, 3, 1, 1, &mut || kv_policies::build_policy::<B>("streaming:budget=4,sinks=1").unwrap()).unwrap();
    assert!((pruned.loss - want).abs() > 1e-4, "{} vs {want}", pruned.loss);
    assert_eq!(pruned.kv_bytes, (2 * 2 * 2 * 4 * 4 * 4) as f64);
    // With a 24-token prompt, the continuation's loss matches the forward pass from position 23,
    // and a prefill-only policy compresses the prompt: SnapKV keeps half of it, then grows by 16.
    let want = validation_loss_from(&model, &corpus, 40, 3, 23).unwrap();
    let full = policy_loss(&model, &corpus, 40, 3, 24, 1, &mut || Box::new(kv_policies::FullCache)).unwrap();
    assert!((want - full.loss).abs() <= 1e-4, "{want} vs {}", full.loss);
    let snap = policy_loss(&model, &corpus, 40, 3, 24, 1, &mut || kv_policies::build_policy::<B>("snapkv:budget=0.5,window=4").unwrap()).unwrap();
    assert!((snap.loss - want).abs() > 1e-4, "{} vs {want}", snap.loss);
    assert_eq!(snap.kv_bytes, (2 * 2 * 2 * 4 * (12 + 16) * 4) as f64);
    assert!(policy_loss(&model, &corpus, 40, 3, 41, 1, &mut || Box::new(kv_policies::FullCache)).unwrap_err().to_string().contains("prompt = 41"));
    // Fed in chunks, a full cache reads the same continuation: the loss does not move.
    let chunked = policy_loss(&model, &corpus, 40, 3, 24, 5, &mut || Box::new(kv_policies::FullCache)).unwrap();
    assert!((want - chunked.loss).abs() <= 1e-4, "{want} vs {}", chunked.loss);
    assert!(policy_loss(&model, &corpus, 40, 3, 24, 0, &mut || Box::new(kv_policies::FullCache)).is_err());
}

fn endless_streaming_keeps_the_cache_constant<B: Backend>(dev: &B::Device) {
    let model = DecoderConfig::new(64, 16, 1, 2, 1, 16).init::<B>(dev).unwrap();
    for rerotate in [false, true] {
        let mut policy = kv_policies::build_policy::<B>(&format!("streaming:budget=24,sinks=4,rerotate={rerotate}")).unwrap();
        let config = GenerateConfig { max_new_tokens: 5000, sampler: SamplerConfig { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 }, stop_tokens: vec![] };
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

/// A small MLA decoder: 2 layers, d_model 32, `heads` heads of 8, latent 12, RoPE 4.
fn tiny_mla(heads: usize, query_latent: usize) -> DecoderConfig {
    DecoderConfig::new(64, 32, 2, heads, 1, 48).with_mla(Some(MlaSettings { query_latent, ..MlaSettings::new(8, 12, 4) }))
}

/// Logits of a prefill of `split` tokens, then one decode step per remaining token.
fn decode_logits<B: Backend>(model: &DecoderLm<B>, ids: &[i32], split: usize, dev: &B::Device) -> (Tensor<B, 3>, kv_core::ModelCache<B>) {
    let mut cache = model.new_cache(1);
    let mut parts = vec![model.forward_cached(tokens(&ids[..split], dev), &mut cache).unwrap()];
    for &id in &ids[split..] {
        parts.push(model.forward_cached(tokens(&[id], dev), &mut cache).unwrap());
    }
    (Tensor::cat(parts, 1), cache)
}

fn mla_cached_decode_matches_full_forward<B: Backend>(dev: &B::Device) {
    // 90 tokens, so prompts and decodes cross the cache's tail flush as in the grouped test.
    let ids = sequence(90);
    for (query_latent, shift) in [(0, false), (16, false), (16, true)] {
        let model = tiny_mla(4, query_latent).with_token_shift(shift).init::<B>(dev).unwrap();
        let full = model.forward(tokens(&ids, dev));
        for split in [1, 5, 70, 90] {
            let (logits, cache) = decode_logits(&model, &ids, split, dev);
            let diff = max_abs_diff(logits, full.clone());
            assert!(diff <= 1e-4, "query_latent {query_latent}, shift {shift}, split {split}: max abs diff {diff}");
            // Measured bytes: (kv_latent + rope_dim) x slots x layers x 4 bytes.
            assert_eq!(cache.stats().kv_bytes, (12 + 4) * ids.len() * 2 * 4);
        }
    }
}

fn mla_absorbed_decode_matches_naive_path_logits<B: Backend>(dev: &B::Device) {
    for query_latent in [0, 16] {
        let absorbed = tiny_mla(4, query_latent).init::<B>(dev).unwrap();
        let mut naive = absorbed.clone();
        naive.set_mla_path(kv_attention::MlaPath::Naive);
        for (len, split) in [(8, 1), (15, 7), (40, 33), (75, 68)] {
            let ids: Vec<i32> = sequence(len + 3)[3..].to_vec();
            let (a, _) = decode_logits(&absorbed, &ids, split, dev);
            let (n, _) = decode_logits(&naive, &ids, split, dev);
            let diff = max_abs_diff(a, n);
            assert!(diff <= 1e-4, "query_latent {query_latent}, {len} tokens from a prompt of {split}: {diff}");
        }
    }
}

fn mla_cache_bytes_do_not_depend_on_heads<B: Backend>(dev: &B::Device) {
    let ids = sequence(11);
    for heads in [1, 2, 4, 8] {
        let config = tiny_mla(heads, 0);
        let model = config.init::<B>(dev).unwrap();
        let (_, cache) = decode_logits(&model, &ids, 6, dev);
        let stats = cache.stats();
        assert_eq!(stats.kv_bytes, (12 + 4) * 11 * 2 * 4, "heads {heads}");
        assert_eq!(stats.kv_bytes, config.kv_bytes_per_token() * 11, "heads {heads}");
        assert_eq!(stats.total_slots(), 2 * 11);
    }
}

fn mla_decoder_configs_name_the_value<B: Backend>(dev: &B::Device) {
    let mla = |kv_latent, rope_dim| Some(MlaSettings::new(8, kv_latent, rope_dim));
    let cases = [
        (DecoderConfig { n_kv_heads: 2, ..tiny_mla(4, 0) }, "n_kv_heads = 2"),
        (tiny_mla(4, 0).with_rope_dims(Some(4)), "rope_dims = 4"),
        (tiny_mla(4, 0).with_mla(mla(12, 5)), "rope_dim = 5"),
        (tiny_mla(4, 0).with_mla(mla(0, 4)), "kv_latent = 0"),
        (tiny_mla(4, 40), "query_latent = 40"),
        // d_model need not be heads x head_dim with MLA.
        (DecoderConfig::new(64, 30, 2, 4, 1, 48).with_mla(mla(12, 4)), "fine"),
    ];
    for (cfg, want) in cases {
        match cfg.init::<B>(dev) {
            Ok(_) => assert!(want == "fine", "{cfg:?} should fail with {want}"),
            Err(e) => assert!(e.to_string().contains(want), "{e} should mention {want}"),
        }
    }
    // Configs without the field (every config written before MLA) still parse, as grouped models.
    let json = r#"{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
        "rope_theta": 10000.0, "max_positions": 64, "norm_eps": 1e-5, "tie_embeddings": true, "token_shift": false}"#;
    assert_eq!(DecoderConfig::from_json(json).unwrap().mla, None);
    let err = DecoderConfig::from_json(&json.replace("\"token_shift\": false", "\"token_shift\": false, \"mla\": {\"head_dim\": 8, \"kv_latent\": 12, \"rope_dim\": 4, \"latent\": 3}")).unwrap_err();
    assert!(err.to_string().contains("unknown field `latent`"), "{err}");
}

fn mla_policies_with_a_budget_above_the_length_match_the_full_cache<B: Backend>(dev: &B::Device) {
    let model = tiny_mla(4, 0).init::<B>(dev).unwrap();
    let ids = sequence(30);
    let (want, _) = decode_logits(&model, &ids, 20, dev);
    let specs = [
        "h2o:budget=1.0",
        "h2o:budget=64,normalize=true",
        "snapkv:budget=1.0,window=8",
        "streaming:budget=64",
        "streaming:budget=1.0,rerotate=true",
        "tova:budget=1.0",
        "vatp:budget=1.0",
        "knorm:budget=1.0",
        "pyramidkv:budget=1.0,window=8",
        "adakv:budget=1.0,window=8",
    ];
    for spec in specs {
        let mut policy = kv_policies::build_policy::<B>(spec).unwrap();
        let mut cache = model.new_cache(1);
        let mut parts = vec![model.forward_with_policy(tokens(&ids[..20], dev), &mut cache, policy.as_mut(), kv_policies::Phase::Prefill).unwrap()];
        for (step, &id) in ids[20..].iter().enumerate() {
            let phase = kv_policies::Phase::Decode { step: step + 1 };
            parts.push(model.forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase).unwrap());
        }
        let diff = max_abs_diff(Tensor::cat(parts, 1), want.clone());
        assert!(diff <= 1e-5, "{spec}: {diff}");
        assert_eq!(cache.stats().total_slots(), 2 * 30, "{spec}");
    }
}

fn mla_policies_with_a_small_budget_keep_exactly_the_budget<B: Backend>(dev: &B::Device) {
    let model = tiny_mla(4, 0).init::<B>(dev).unwrap();
    let ids = sequence(30);
    let (full, _) = decode_logits(&model, &ids, 20, dev);
    let budget = 8;
    // (spec, slots right after the prefill, slots after the 10 decode steps)
    let specs = [
        (format!("h2o:budget={budget}"), budget, budget),
        (format!("h2o:budget={budget},normalize=true"), budget, budget),
        // Scored on each head's up-projected keys and values, not on the cached latent.
        (format!("vatp:budget={budget}"), budget, budget),
        (format!("knorm:budget={budget},skip=0"), budget, budget),
        (format!("streaming:budget={budget},sinks=2"), budget, budget),
        (format!("streaming:budget={budget},sinks=2,rerotate=true"), budget, budget),
        (format!("tova:budget={budget}"), budget, budget),
        // SnapKV compresses the prompt once; decoded tokens then accumulate.
        (format!("snapkv:budget={budget},window=4"), budget, budget + 10),
        // One latent head: AdaKV's layer-wide top-k is SnapKV's, and storage stays rectangular.
        (format!("adakv:budget={budget},window=4"), budget, budget + 10),
    ];
    for (spec, after_prefill, at_end) in specs {
        let mut policy = kv_policies::build_policy::<B>(&spec).unwrap();
        let mut cache = model.new_cache(1);
        let mut parts = vec![model.forward_with_policy(tokens(&ids[..20], dev), &mut cache, policy.as_mut(), kv_policies::Phase::Prefill).unwrap()];
        let slots = |c: &kv_core::ModelCache<B>| c.stats().layers.iter().map(|l| l.slots_per_head.clone()).collect::<Vec<_>>();
        assert_eq!(slots(&cache), vec![vec![after_prefill]; 2], "{spec} after prefill");
        for (step, &id) in ids[20..].iter().enumerate() {
            let phase = kv_policies::Phase::Decode { step: step + 1 };
            parts.push(model.forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase).unwrap());
        }
        let stats = cache.stats();
        assert_eq!(slots(&cache), vec![vec![at_end]; 2], "{spec} at the end");
        assert_eq!(stats.kv_bytes, (12 + 4) * at_end * 2 * 4, "{spec}");
        assert_eq!(stats.tokens_seen, 30, "{spec}");
        let logits = Tensor::cat(parts, 1);
        let values: Vec<f32> = logits.clone().into_data().iter::<f32>().collect();
        assert!(values.iter().all(|x| x.is_finite()), "{spec}");
        // Eviction really changed what the model saw.
        assert!(max_abs_diff(logits, full.clone()) > 1e-4, "{spec}");
    }
}

fn mla_checkpoints_round_trip_and_grouped_records_keep_their_layout<B: Backend>(dev: &B::Device) {
    let cfg = tiny_mla(4, 16);
    let model = cfg.init::<B>(dev).unwrap();
    let dir = temp_dir("mla-ckpt");
    save_model(&model, &cfg, &dir).unwrap();
    let (loaded, loaded_cfg) = load_model::<B>(&dir, dev).unwrap();
    assert_eq!(loaded_cfg, cfg);
    let x = tokens(&sequence(9), dev);
    assert_eq!(max_abs_diff(model.forward(x.clone()), loaded.forward(x.clone())), 0.0);
    std::fs::remove_dir_all(&dir).unwrap();

    // A grouped model's record as it was written before MLA existed (a plain `attn` field, no
    // `mla`) still loads into today's blocks.
    #[derive(Module, Debug)]
    struct LegacyBlock<B: Backend> {
        attn_norm: burn::nn::RmsNorm<B>,
        attn: kv_attention::GroupedAttention<B>,
        ffn_norm: burn::nn::RmsNorm<B>,
        ffn: FeedForward<B>,
    }
    #[derive(Module, Debug)]
    struct LegacyLm<B: Backend> {
        embed: burn::nn::Embedding<B>,
        blocks: Vec<LegacyBlock<B>>,
        norm: burn::nn::RmsNorm<B>,
        lm_head: Option<burn::nn::Linear<B>>,
        token_shift: Option<burn::nn::Linear<B>>,
    }
    let cfg = tiny(4, 2).with_token_shift(true);
    let model = cfg.init::<B>(dev).unwrap();
    let m = model.clone();
    let legacy = LegacyLm {
        embed: m.embed,
        blocks: m.blocks.into_iter().map(|b| LegacyBlock { attn_norm: b.attn_norm, attn: b.attn.unwrap(), ffn_norm: b.ffn_norm, ffn: b.ffn }).collect(),
        norm: m.norm,
        lm_head: m.lm_head,
        token_shift: m.token_shift,
    };
    let what = std::path::Path::new("legacy");
    let bytes = crate::checkpoint::record_bytes::<B, _>(legacy.into_record(), what).unwrap();
    let record = crate::checkpoint::record_from::<B, _>(bytes, dev, what).unwrap();
    let reloaded = cfg.init::<B>(dev).unwrap().load_record(record);
    reloaded.check_blocks().unwrap();
    assert_eq!(max_abs_diff(model.forward(x.clone()), reloaded.forward(x)), 0.0);
}

/// `w` `[d, heads * head_dim]` with every head replaced by the first head of its group of `r`.
fn same_within_groups<B: Backend>(w: Tensor<B, 2>, groups: usize, r: usize, head_dim: usize) -> Tensor<B, 2> {
    let d = w.dims()[0];
    w.reshape([d, groups, r, head_dim]).narrow(2, 0, 1).expand([d, groups, r, head_dim]).reshape([d, groups * r * head_dim])
}

fn mean_pooled_grouping_of_identical_heads_keeps_the_logits<B: Backend>(dev: &B::Device) {
    let x = tokens(&sequence(20), dev);
    for (heads, kv, target) in [(8, 8, 2), (8, 8, 1), (8, 2, 1), (8, 4, 4)] {
        let config = tiny(heads, kv);
        let mut model = config.init::<B>(dev).unwrap();
        for block in model.blocks.iter_mut() {
            let attn = block.attn.as_mut().unwrap();
            attn.wk.weight = Param::from_tensor(same_within_groups(attn.wk.weight.val(), target, kv / target, 4));
            attn.wv.weight = Param::from_tensor(same_within_groups(attn.wv.weight.val(), target, kv / target, 4));
        }
        let (grouped, grouped_config) = to_grouped(&model, &config, target).unwrap();
        assert_eq!(grouped_config.n_kv_heads, target);
        assert_eq!(grouped.blocks[0].attn.as_ref().unwrap().n_kv_heads(), target);
        let diff = max_abs_diff(model.forward(x.clone()), grouped.forward(x.clone()));
        assert!(diff <= 1e-5, "{heads}/{kv} -> {target}: {diff}");
        assert_eq!(grouped_config.kv_bytes_per_token() * kv, config.kv_bytes_per_token() * target);
    }
    // With distinct heads each new head is the mean of its group's columns.
    let config = tiny(8, 8);
    let model = config.init::<B>(dev).unwrap();
    let (grouped, _) = to_grouped(&model, &config, 2).unwrap();
    let old = model.blocks[1].attn.as_ref().unwrap().wv.weight.val();
    let want = (old.clone().narrow(1, 16, 4) + old.clone().narrow(1, 20, 4) + old.clone().narrow(1, 24, 4) + old.narrow(1, 28, 4)).div_scalar(4.0);
    let got = grouped.blocks[1].attn.as_ref().unwrap().wv.weight.val().narrow(1, 4, 4);
    assert!((got - want).abs().max().into_scalar().elem::<f32>() <= 1e-6);
    for (kv, want) in [(3, "kv_heads = 3"), (0, "kv_heads = 0"), (16, "kv_heads = 16")] {
        let err = to_grouped(&model, &config, kv).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("n_kv_heads = 8"), "{err}");
    }
    let mla = tiny_mla(4, 0);
    let err = to_grouped(&mla.init::<B>(dev).unwrap(), &mla, 1).unwrap_err().to_string();
    assert!(err.contains("mla"), "{err}");
}

/// A partial-RoPE grouped model (4 of 8 dims rotated) whose heads share their rotated key projection.
fn shared_rope_model<B: Backend>(kv: usize, dev: &B::Device) -> (DecoderLm<B>, DecoderConfig) {
    let config = tiny(4, kv).with_rope_dims(Some(4));
    let mut model = config.init::<B>(dev).unwrap();
    for block in model.blocks.iter_mut() {
        let attn = block.attn.as_mut().unwrap();
        let w = attn.wk.weight.val().reshape([32, kv, 8]);
        let rot = w.clone().narrow(1, 0, 1).narrow(2, 0, 4).expand([32, kv, 4]);
        attn.wk.weight = Param::from_tensor(Tensor::cat(vec![rot, w.narrow(2, 4, 4)], 2).reshape([32, kv * 8]));
    }
    (model, config)
}

fn latent_conversion_is_exact_at_full_rank_and_reports_what_truncation_loses<B: Backend>(dev: &B::Device) {
    let ids = sequence(24);
    for kv in [4, 2] {
        let (model, config) = shared_rope_model::<B>(kv, dev);
        let want = model.forward(tokens(&ids, dev));
        // M = [W_K unrotated | W_V] is 32 x (4 x 4 + 4 x 8): rank <= d_model = 32.
        let (mla, mla_config, report) = to_latent(&model, &config, 32).unwrap();
        assert!(report.latent_error.iter().chain(&report.rope_error).all(|&e| e <= 1e-6), "{report:?}");
        let diff = max_abs_diff(mla.forward(tokens(&ids, dev)), want.clone());
        assert!(diff <= 1e-4, "kv {kv}: converted forward differs by {diff}");
        let (decoded, cache) = decode_logits(&mla, &ids, 9, dev);
        let diff = max_abs_diff(decoded, want);
        assert!(diff <= 1e-4, "kv {kv}: converted absorbed decode differs by {diff}");
        assert_eq!(cache.stats().kv_bytes, (32 + 4) * ids.len() * 2 * 4);
        assert_eq!(mla_config.kv_bytes_per_token(), (32 + 4) * 2 * 4);
        // The converted config round-trips through JSON (checkpoints store it).
        assert_eq!(DecoderConfig::from_json(&serde_json::to_string(&mla_config).unwrap()).unwrap(), mla_config);
    }
    // Truncation: the reported error is the relative error of the factors actually stored, and it
    // shrinks as the latent widens.
    let (model, config) = shared_rope_model::<B>(4, dev);
    let attn = model.blocks[0].attn.as_ref().unwrap();
    let wk = attn.wk.weight.val().reshape([32, 4, 8]).narrow(2, 4, 4).reshape([32, 16]);
    let m = Tensor::cat(vec![wk, attn.wv.weight.val()], 1);
    let mut last = f64::INFINITY;
    for k in [4, 8, 16, 24] {
        let (mla, _, report) = to_latent(&model, &config, k).unwrap();
        let layer = mla.blocks[0].mla.as_ref().unwrap();
        let up = Tensor::cat(vec![layer.wk_up.weight.val(), layer.wv_up.weight.val()], 1);
        let rebuilt = layer.wkv_down.weight.val().matmul(up);
        let norm = |t: Tensor<B, 2>| t.powi_scalar(2).sum().into_scalar().elem::<f64>().sqrt();
        let measured = norm(rebuilt - m.clone()) / norm(m.clone());
        assert!((measured - report.latent_error[0]).abs() <= 1e-4, "k {k}: measured {measured} vs reported {}", report.latent_error[0]);
        assert!(report.latent_error[0] < last && report.latent_error[0] > 0.0, "k {k}: {:?}", report.latent_error);
        last = report.latent_error[0];
        assert_eq!(report.singular_values[0].len(), 32);
    }
    // Heads with different rotated keys are pooled, and the report says by how much.
    let config = tiny(4, 4).with_rope_dims(Some(4));
    let (_, _, report) = to_latent(&config.init::<B>(dev).unwrap(), &config, 32).unwrap();
    assert!(report.rope_error.iter().all(|&e| e > 0.1), "{report:?}");
    // Full-RoPE models and nonsense widths are refused, naming the value.
    let full = tiny(4, 4);
    let err = to_latent(&full.init::<B>(dev).unwrap(), &full, 16).unwrap_err().to_string();
    assert!(err.contains("rope_dims = null"), "{err}");
    let err = to_latent(&model, &config, 40).unwrap_err().to_string();
    assert!(err.contains("kv_latent = 40"), "{err}");
}

fn partial_rope_conversion_keeps_the_fast_frequencies_exactly<B: Backend>(dev: &B::Device) {
    // head_dim 8: rotate-half pairs (i, i + 4) turn at 10000^(-i/4); keeping 4 dims keeps pairs 0, 1.
    let ids = sequence(30);
    let config = tiny(4, 2);
    let mut model = config.init::<B>(dev).unwrap();
    let approx = to_partial_rope(&model, &config, 4).unwrap().0.forward(tokens(&ids, dev));
    // Queries that read nothing from the slow pairs (dims 2, 3, 6, 7 of each head) make the
    // dropped rotation irrelevant, so the converted model must reproduce the logits.
    let mask: Vec<f32> = (0..4).flat_map(|_| [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]).collect();
    let mask = Tensor::<B, 1>::from_floats(mask.as_slice(), dev).reshape([1, 32]);
    for block in model.blocks.iter_mut() {
        let attn = block.attn.as_mut().unwrap();
        attn.wq.weight = Param::from_tensor(attn.wq.weight.val() * mask.clone());
    }
    let want = model.forward(tokens(&ids, dev));
    let (partial, partial_config) = to_partial_rope(&model, &config, 4).unwrap();
    assert_eq!(partial_config.rope_dims, Some(4));
    assert!((partial_config.rope_theta - 100.0).abs() < 1e-9, "{}", partial_config.rope_theta);
    let diff = max_abs_diff(partial.forward(tokens(&ids, dev)), want.clone());
    assert!(diff <= 1e-5, "partial RoPE changed the logits by {diff}");
    // With the slow pairs in use, dropping their rotation is an approximation (the test can fail).
    let full = to_partial_rope(&config.init::<B>(dev).unwrap(), &config, 4).unwrap();
    assert!(max_abs_diff(approx, full.0.forward(tokens(&ids, dev))) > 0.0);
    // The converted model is a partial-RoPE model, so the latent conversion applies.
    let (mla, mla_config, _) = to_latent(&partial, &partial_config, 16).unwrap();
    assert_eq!(mla_config.mla.as_ref().unwrap().rope_dim, 4);
    assert_eq!(mla.forward(tokens(&ids, dev)).dims(), [1, 30, 64]);
    for (bad, want) in [(0, "rope_dims = 0"), (3, "rope_dims = 3"), (8, "rope_dims = 8")] {
        let err = to_partial_rope(&model, &config, bad).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
    let err = to_partial_rope(&partial, &partial_config, 2).unwrap_err().to_string();
    assert!(err.contains("already uses partial RoPE"), "{err}");
}

fn grouped_conversion_pools_query_key_value_biases<B: Backend>(dev: &B::Device) {
    let x = tokens(&sequence(20), dev);
    let config = tiny(8, 8).with_qkv_bias(Some(true));
    let mut model = config.init::<B>(dev).unwrap();
    for block in model.blocks.iter_mut() {
        let attn = block.attn.as_mut().unwrap();
        for lin in [&mut attn.wk, &mut attn.wv] {
            lin.weight = Param::from_tensor(same_within_groups(lin.weight.val(), 2, 4, 4));
            let b = lin.bias.as_ref().unwrap().val().reshape([1, 32]);
            lin.bias = Some(Param::from_tensor(same_within_groups(b, 2, 4, 4).reshape([32])));
        }
    }
    let (grouped, grouped_config) = to_grouped(&model, &config, 2).unwrap();
    assert_eq!(grouped.blocks[0].attn.as_ref().unwrap().wk.bias.as_ref().unwrap().dims(), [8]);
    let diff = max_abs_diff(model.forward(x.clone()), grouped.forward(x));
    assert!(diff <= 1e-5, "pooled biases changed the logits by {diff}");
    let err = to_latent(&grouped, &grouped_config.clone().with_rope_dims(Some(2)), 8).unwrap_err().to_string();
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
        assert!(after < before, "{name}: validation loss {before} -> {after} after 6 steps");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn adakv_decodes_from_ragged_storage_and_holds_fewer_bytes<B: Backend>(dev: &B::Device) {
    let model = tiny(8, 2).init::<B>(dev).unwrap();
    let ids = sequence(30);
    let (head_dim, kv) = (32 / 8, 2);
    for spec in ["adakv:budget=8,window=4,min_share=0.25", "adakv:budget=8,min_share=0.25,scorer=h2o"] {
        let mut policy = kv_policies::build_policy::<B>(spec).unwrap();
        let mut cache = model.new_cache(1);
        let mut parts = vec![model.forward_with_policy(tokens(&ids[..20], dev), &mut cache, policy.as_mut(), kv_policies::Phase::Prefill).unwrap()];
        let prefill = cache.stats();
        for l in &prefill.layers {
            assert_eq!(l.slots_per_head.iter().sum::<usize>(), kv * 8, "{spec}: {:?}", l.slots_per_head);
            assert!(l.slots_per_head.iter().all(|&s| s >= 2), "{spec}: {:?}", l.slots_per_head);
            assert_eq!(l.kv_bytes, kv * 8 * 2 * head_dim * 4, "{spec}: measured bytes");
        }
        for (step, &id) in ids[20..].iter().enumerate() {
            let phase = kv_policies::Phase::Decode { step: step + 1 };
            parts.push(model.forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), phase).unwrap());
        }
        let logits = Tensor::cat(parts, 1);
        assert!(logits.clone().is_finite().all().into_scalar().to_bool(), "{spec}");
        let stats = cache.stats();
        assert_eq!(stats.tokens_seen, 30);
        assert_eq!(stats.kv_bytes, 2 * kv * (8 + 10) * 2 * head_dim * 4, "{spec}: every head grew by the 10 decoded tokens");
        // Compressing really changed what the model attends to.
        let (full, _) = decode_logits(&model, &ids, 20, dev);
        assert!(max_abs_diff(logits, full) > 1e-4, "{spec}");
    }
}

fn fastgen_runs_on_gqa_and_mla_and_at_full_recovery_decodes_as_the_full_cache<B: Backend>(dev: &B::Device) {
    let ids = sequence(36);
    let env = kv_policies::PolicyEnv::with_classes(kv_policies::TokenClasses::new(64, [7], [1, 2, 3, 4]));
    let run = |model: &DecoderLm<B>, spec: &str| {
        let mut policy = kv_policies::build_policy_in::<B>(spec, &env).unwrap();
        let mut cache = model.new_cache(1);
        let mut parts = vec![model.forward_with_policy(tokens(&ids[..24], dev), &mut cache, policy.as_mut(), kv_policies::Phase::Prefill).unwrap()];
        for (step, &id) in ids[24..].iter().enumerate() {
            parts.push(model.forward_with_policy(tokens(&[id], dev), &mut cache, policy.as_mut(), kv_policies::Phase::Decode { step: step + 1 }).unwrap());
        }
        (Tensor::cat(parts, 1), cache)
    };
    let models = [("gqa", tiny(8, 2).init::<B>(dev).unwrap()), ("mla", tiny_mla(4, 0).init::<B>(dev).unwrap())];
    for (name, model) in &models {
        let (full, full_cache) = decode_logits(model, &ids, 24, dev);
        let (same, cache) = run(model, "fastgen:recover=1");
        assert!(max_abs_diff(full.clone(), same) <= 1e-5, "{name}: T = 1 is the full cache");
        assert_eq!(cache.stats().kv_bytes, full_cache.stats().kv_bytes, "{name}");
        let (logits, cache) = run(model, "fastgen:recover=0.5,local=0.25,frequent=0.25");
        assert!(logits.clone().is_finite().all().into_scalar().to_bool(), "{name}");
        let stats = cache.stats();
        assert_eq!(stats.tokens_seen, 36, "{name}");
        assert!(stats.kv_bytes < full_cache.stats().kv_bytes, "{name}: FastGen at T = 0.5 holds fewer bytes");
        assert!(stats.layers.iter().all(|l| l.slots_per_head.iter().all(|&s| s >= 1)), "{name}");
        for l in 0..cache.num_layers() {
            assert_eq!(cache.layer(l).rope_position(), 36, "{name}: the next RoPE position is the tokens seen");
        }
    }
}

/// A word-level tokenizer.json of the stories' and the tasks' own words (`\w+` runs and
/// punctuation runs, as its Whitespace pre-tokenizer splits them), written to `dir`.
#[cfg(feature = "hf-tokenizer")]
fn word_level_tokenizer(dir: &std::path::Path) -> std::path::PathBuf {
    use rand::SeedableRng;
    let mut text = data::story(&mut rand::rngs::StdRng::seed_from_u64(1), 60_000);
    text += " Remember each key and its value. Q = ; \n";
    let mut vocab = vec!["[UNK]".to_string()];
    let mut word = String::new();
    let flush = |w: &mut String, vocab: &mut Vec<String>| {
        if !w.is_empty() && !vocab.contains(w) {
            vocab.push(w.clone());
        }
        w.clear();
    };
    for c in text.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut vocab);
            if !c.is_whitespace() {
                flush(&mut c.to_string(), &mut vocab);
            }
        }
    }
    (0..1000).for_each(|n| flush(&mut n.to_string(), &mut vocab));
    let ids: serde_json::Map<String, serde_json::Value> = vocab.iter().enumerate().map(|(i, w)| (w.clone(), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": ids}
    });
    let path = dir.join("words.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

#[cfg(feature = "hf-tokenizer")]
fn a_hugging_face_tokenizer_trains_resumes_and_evaluates<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    let dir = temp_dir("hf");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let path = word_level_tokenizer(&dir);
    let tokenizer = Tokenizer::from_file(&path).unwrap();
    let words = tokenizer.vocab_size();
    assert!((100..2000).contains(&words), "{words}");
    let mut cfg = train_config(6);
    cfg.tokenizer = Some(path.clone());
    // A model too small for the tokenizer is refused before training.
    let e = train::Trainer::<AD<B>>::new(DecoderConfig::new(64, 32, 1, 4, 4, 64), cfg.clone(), dev).err().unwrap().to_string();
    assert!(e.contains("vocab_size = 64") && e.contains(&format!("at least {words}")), "{e}");
    let model = DecoderConfig::new(words, 32, 2, 4, 4, 64);
    let mut t = train::Trainer::<AD<B>>::new(model.clone(), cfg.clone(), dev).unwrap();
    let before = t.evaluate().unwrap();
    train::run_until(&mut t, &run, 3, |_| {}).unwrap();
    // The run carries its own copy of the tokenizer: resuming works without the original.
    std::fs::remove_file(&path).unwrap();
    let copy = Tokenizer::for_run(&run).unwrap();
    assert_eq!(copy.name(), "hf");
    assert_eq!(copy.encode("the key is 42.").unwrap(), tokenizer.encode("the key is 42.").unwrap());
    let mut resumed = train::Trainer::<AD<B>>::resume(&run, None, dev).unwrap();
    let after = train::run(&mut resumed, &run, |_| {}).unwrap().unwrap();
    assert!(after.valid_loss.is_finite() && after.valid_loss < before.valid_loss, "{} -> {}", before.valid_loss, after.valid_loss);
    // Tasks are read through the same tokenizer (recall's words and numbers are in its vocabulary).
    let (loaded, _) = load_model::<B>(&run, dev).unwrap();
    let r = task_accuracy_with(&loaded, &Tokenizer::for_run(&run).unwrap(), data::TaskKind::Recall, 200, 2, 3, None, &mut || Box::new(kv_policies::FullCache)).unwrap();
    assert_eq!(r.total, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

kv_core::backend_tests!(
    adakv_decodes_from_ragged_storage_and_holds_fewer_bytes,
    fastgen_runs_on_gqa_and_mla_and_at_full_recovery_decodes_as_the_full_cache,
    batched_forward_matches_each_row_decoded_alone,
    policy_perplexity_with_a_full_cache_matches_the_forward_pass,
    every_policy_with_a_budget_above_the_length_matches_the_full_cache,
    endless_streaming_keeps_the_cache_constant,
    resume_is_exact,
    converted_models_uptrain_below_their_starting_loss,
    a_few_steps_reduce_the_loss,
    bad_training_configs_are_errors,
    cached_decode_matches_full_forward,
    gqa_equals_mha_with_duplicated_kv_heads,
    bad_configs_name_the_value,
    checkpoint_round_trips,
    greedy_generation_follows_full_forward_argmax,
    mla_cached_decode_matches_full_forward,
    mla_absorbed_decode_matches_naive_path_logits,
    mla_cache_bytes_do_not_depend_on_heads,
    mla_decoder_configs_name_the_value,
    mla_policies_with_a_budget_above_the_length_match_the_full_cache,
    mla_policies_with_a_small_budget_keep_exactly_the_budget,
    mla_checkpoints_round_trip_and_grouped_records_keep_their_layout,
    mean_pooled_grouping_of_identical_heads_keeps_the_logits,
    latent_conversion_is_exact_at_full_rank_and_reports_what_truncation_loses,
    partial_rope_conversion_keeps_the_fast_frequencies_exactly,
    grouped_conversion_pools_query_key_value_biases,
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


#[test]
fn tiny_mla_preset_matches_tiny_mha_in_size_with_a_third_of_its_cache() {
    type B = burn::backend::Flex;
    let (mha, mla) = (preset("tiny-mha").unwrap(), preset("tiny-mla").unwrap());
    assert_eq!(mha.train, mla.train);
    let count = |p: &Preset| p.model.init::<B>(&Default::default()).unwrap().num_params();
    let (n_mha, n_mla) = (count(&mha), count(&mla));
    assert!((n_mla as f64 / n_mha as f64 - 1.0).abs() <= 0.02, "{n_mla} vs {n_mha} parameters");
    // (kv_latent 64 + rope_dim 16) against 2 x 4 heads x 32 per token and layer.
    assert_eq!(mla.model.kv_bytes_per_token() * 256, mha.model.kv_bytes_per_token() * 80);
}

#[cfg(feature = "hf-tokenizer")]
mod hf {
    use super::*;
    kv_core::backend_tests!(a_hugging_face_tokenizer_trains_resumes_and_evaluates);
}
