//! A Hugging Face tokenizer through training, resume and evaluation.

use super::support::*;
use crate::*;
use burn::prelude::*;

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
    let ids: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), i.into()))
        .collect();
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
    let e = train::Trainer::<AD<B>>::new(DecoderConfig::new(64, 32, 1, 4, 4, 64), cfg.clone(), dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("vocab_size = 64") && e.contains(&format!("at least {words}")),
        "{e}"
    );
    let model = DecoderConfig::new(words, 32, 2, 4, 4, 64);
    let mut t = train::Trainer::<AD<B>>::new(model.clone(), cfg.clone(), dev).unwrap();
    let before = t.evaluate().unwrap();
    train::run_until(&mut t, &run, 3, |_| {}).unwrap();
    // The run carries its own copy of the tokenizer: resuming works without the original.
    std::fs::remove_file(&path).unwrap();
    let copy = Tokenizer::for_run(&run).unwrap();
    assert_eq!(copy.name(), "hf");
    assert_eq!(
        copy.encode("the key is 42.").unwrap(),
        tokenizer.encode("the key is 42.").unwrap()
    );
    let mut resumed = train::Trainer::<AD<B>>::resume(&run, None, dev).unwrap();
    let after = train::run(&mut resumed, &run, |_| {}).unwrap().unwrap();
    assert!(
        after.valid_loss.is_finite() && after.valid_loss < before.valid_loss,
        "{} -> {}",
        before.valid_loss,
        after.valid_loss
    );
    // Tasks are read through the same tokenizer (recall's words and numbers are in its vocabulary).
    let (loaded, _) = load_model::<B>(&run, dev).unwrap();
    let r = task_accuracy_with(
        &loaded,
        &Tokenizer::for_run(&run).unwrap(),
        data::TaskKind::Recall,
        200,
        2,
        3,
        None,
        &mut || Box::new(kv_policies::FullCache),
    )
    .unwrap();
    assert_eq!(r.total, 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

kv_core::backend_tests!(a_hugging_face_tokenizer_trains_resumes_and_evaluates);
