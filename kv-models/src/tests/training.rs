//! Training: exact resume, the loss falls, bad recipes are errors.

use super::support::*;
use crate::*;
use burn::prelude::*;

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
    let diff = pa
        .iter()
        .zip(&pb)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-6, "parameters differ by {diff}");
    // Weights-only checkpoints cannot be resumed, and say what to do instead.
    save_model(&a, &DecoderConfig::new(256, 32, 2, 4, 2, 64), &straight).unwrap();
    let err = train::Trainer::<AD<B>>::resume(&straight, None, dev)
        .err()
        .unwrap()
        .to_string();
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
    let mut t =
        train::Trainer::<AD<B>>::new(DecoderConfig::new(256, 32, 2, 4, 4, 64), cfg, dev).unwrap();
    let before = t.evaluate().unwrap().valid_loss;
    let eval = train::run(&mut t, &dir, |_| {}).unwrap().unwrap();
    let losses = step_losses(&dir);
    assert!(
        eval.valid_loss < before - 1.0,
        "valid loss {before} -> {}",
        eval.valid_loss
    );
    assert!(losses.last().unwrap().1 < losses[0].1 - 1.0, "{losses:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn bad_training_configs_are_errors<B: Backend>(dev: &B::Device) {
    type AD<B> = burn::backend::Autodiff<B>;
    let model = DecoderConfig::new(256, 32, 1, 4, 4, 64);
    let mut c = train_config(1);
    c.lr = 0.0;
    assert!(
        train::Trainer::<AD<B>>::new(model.clone(), c, dev)
            .err()
            .unwrap()
            .to_string()
            .contains("lr = 0")
    );
    let mut c = train_config(1);
    c.tasks = vec![data::TaskKind::Passkey];
    let e = train::Trainer::<AD<B>>::new(model, c, dev)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("seq_len = 96") && e.contains("passkey"), "{e}");
}

kv_core::backend_tests!(
    resume_is_exact,
    a_few_steps_reduce_the_loss,
    bad_training_configs_are_errors,
);
