//! Loads a checkpoint written by `kv train` (or `save_model`) and generates under a cache policy.
//!
//! Run: `cargo run -p kv-models --example generate_with_policy -- [CHECKPOINT_DIR] [POLICY] [PROMPT]`;
//! the defaults are the small test checkpoint committed with this crate, `h2o:budget=16` and
//! "Once upon a time". With `runs/models/tiny-mha` (from `kv tour`) the text reads as stories.

use burn::backend::Flex;
use kv_models::{GenerateConfig, Tokenizer, generate, load_model};
use kv_policies::{PolicyEnv, Registry};
use std::path::PathBuf;

fn main() -> kv_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/golden/gqa"),
        PathBuf::from,
    );
    let spec = args.next().unwrap_or_else(|| "h2o:budget=16".into());
    let prompt_text = args.next().unwrap_or_else(|| "Once upon a time".into());

    let device = Default::default();
    let (model, config) = load_model::<Flex>(&dir, &device)?;
    // The run's own tokenizer when it has one (a Hugging Face tokenizer.json), else bytes.
    let tokenizer = Tokenizer::for_run(&dir)?;
    let mut prompt = tokenizer.encode(&prompt_text)?;
    // The small test checkpoint knows 64 token ids: fold bytes into its vocabulary.
    prompt
        .iter_mut()
        .for_each(|t| *t %= config.vocab_size as u32);

    let mut policy = Registry::<Flex>::standard().build(&spec, &PolicyEnv::default())?;
    let settings = GenerateConfig {
        max_new_tokens: 48,
        ..Default::default()
    };
    let out = generate(&model, &prompt, &settings, policy.as_mut(), |_| {})?;
    println!("{}{}", prompt_text, tokenizer.decode(&out.tokens)?);
    println!(
        "{}: {} tokens seen, {} slots/head held in layer 0, {} KV bytes measured",
        policy.name(),
        out.cache.tokens_seen,
        out.cache.layers[0]
            .slots_per_head
            .iter()
            .max()
            .unwrap_or(&0),
        out.cache.kv_bytes
    );
    Ok(())
}
