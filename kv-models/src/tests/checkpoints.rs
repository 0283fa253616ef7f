//! Checkpoints round-trip, grouped and MLA records keep their layouts.

use super::support::*;
use crate::*;
use burn::prelude::*;

fn checkpoint_round_trips<B: Backend>(dev: &B::Device) {
    let cfg = tiny(4, 2);
    let model = cfg.init::<B>(dev).unwrap();
    let dir = std::env::temp_dir().join(format!("kv-ckpt-test-{}", std::process::id()));
    save_model(&model, &cfg, &dir).unwrap();
    let (loaded, loaded_cfg) = load_model::<B>(&dir, dev).unwrap();
    assert_eq!(loaded_cfg, cfg);
    let x = tokens(&sequence(9), dev);
    assert_eq!(
        max_abs_diff(model.forward(x.clone()), loaded.forward(x.clone())),
        0.0
    );
    // A different config is refused with the differing fields named.
    let err = load_model_expecting::<B>(&dir, &tiny(4, 4), dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("n_kv_heads 2 vs 4"), "{err}");
    load_model_expecting::<B>(&dir, &cfg, dev).unwrap();
    // A failed write leaves the previous checkpoint intact: block the temporary file's path.
    let blocker = dir.join(format!(".{CHECKPOINT_FILE}.partial"));
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let other = tiny(4, 2).init::<B>(dev).unwrap();
    assert!(save_model(&other, &cfg, &dir).is_err());
    let (still, _) = load_model::<B>(&dir, dev).unwrap();
    assert_eq!(
        max_abs_diff(model.forward(x.clone()), still.forward(x.clone())),
        0.0
    );
    std::fs::remove_dir_all(&blocker).unwrap();
    // A truncated file is an error that says so and names the file, not a panic.
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_model::<B>(&dir, dev).unwrap_err().to_string();
        assert!(
            err.contains(CHECKPOINT_FILE)
                && (err.contains("truncated") || err.contains("wrong file type")),
            "{err}"
        );
    }
    let mut corrupt = bytes.clone();
    corrupt[bytes.len() / 2] ^= 0xff;
    std::fs::write(&path, &corrupt).unwrap();
    assert!(
        load_model::<B>(&dir, dev)
            .unwrap_err()
            .to_string()
            .contains("checksum")
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        load_model::<B>(&dir, dev)
            .unwrap_err()
            .to_string()
            .contains("no such checkpoint directory")
    );
}

fn mla_checkpoints_round_trip_and_grouped_records_keep_their_layout<B: Backend>(dev: &B::Device) {
    let cfg = tiny_mla(4, 16);
    let model = cfg.init::<B>(dev).unwrap();
    let dir = temp_dir("mla-ckpt");
    save_model(&model, &cfg, &dir).unwrap();
    let (loaded, loaded_cfg) = load_model::<B>(&dir, dev).unwrap();
    assert_eq!(loaded_cfg, cfg);
    let x = tokens(&sequence(9), dev);
    assert_eq!(
        max_abs_diff(model.forward(x.clone()), loaded.forward(x.clone())),
        0.0
    );
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
    let llama = m.llama().unwrap().clone();
    let legacy = LegacyLm {
        embed: m.embed,
        blocks: llama
            .blocks
            .into_iter()
            .map(|b| LegacyBlock {
                attn_norm: b.attn_norm,
                attn: b.attention.grouped().unwrap().clone(),
                ffn_norm: b.ffn_norm,
                ffn: b.ffn,
            })
            .collect(),
        norm: m.norm,
        lm_head: m.lm_head,
        token_shift: m.token_shift,
    };
    // Written as a version-1 checkpoint, it loads through the one converter.
    let dir = temp_dir("legacy-ckpt");
    let what = dir.join(crate::train::checkpoint::CHECKPOINT_FILE);
    let sections = crate::train::checkpoint::Sections {
        config: serde_json::to_vec(&cfg).unwrap(),
        model: crate::train::checkpoint::record_bytes::<B, _>(legacy.into_record(), &what).unwrap(),
        ..Default::default()
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&what, sections.encode_version(1)).unwrap();
    let (reloaded, _) = load_model::<B>(&dir, dev).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        max_abs_diff(model.forward(x.clone()), reloaded.forward(x)),
        0.0
    );
}

/// The golden checkpoints are format 1 (the layout with five optional attention fields per
/// block): each loads through the converter, and its format-2 re-save loads to the same model.
#[test]
fn version_1_checkpoints_of_every_architecture_load_and_resave_as_version_2() {
    let dev = Default::default();
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
    let mut archs: Vec<_> = std::fs::read_dir(&golden)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join(CHECKPOINT_FILE).is_file())
        .collect();
    archs.sort();
    assert_eq!(archs.len(), 6, "{archs:?}");
    for dir in archs {
        let bytes = std::fs::read(dir.join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(&bytes[..8], b"KVCKPT01", "{}", dir.display());
        let (model, config) = load_model::<burn::backend::Flex>(&dir, &dev).unwrap();
        let out = temp_dir(&format!(
            "v2-{}",
            dir.file_name().unwrap().to_string_lossy()
        ));
        save_model(&model, &config, &out).unwrap();
        assert_eq!(
            &std::fs::read(out.join(CHECKPOINT_FILE)).unwrap()[..8],
            b"KVCKPT02"
        );
        let (again, _) = load_model::<burn::backend::Flex>(&out, &dev).unwrap();
        let x = tokens(&sequence(12), &dev);
        assert_eq!(
            max_abs_diff(model.forward(x.clone()), again.forward(x)),
            0.0,
            "{}",
            dir.display()
        );
        assert_eq!(model.yoco().is_some(), config.yoco.is_some());
        // A version this build does not know is refused, naming the ones it reads.
        let mut future = bytes.clone();
        future[6..8].copy_from_slice(b"09");
        std::fs::write(out.join(CHECKPOINT_FILE), &future).unwrap();
        let err = load_model::<burn::backend::Flex>(&out, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("format version \"09\"") && err.contains("01 to 02"),
            "{err}"
        );
        std::fs::remove_dir_all(&out).unwrap();
    }
}

kv_core::backend_tests!(
    checkpoint_round_trips,
    mla_checkpoints_round_trip_and_grouped_records_keep_their_layout,
);
