//! Named model presets, shipped as JSON files in the repository's `presets/` folder.

use crate::DecoderConfig;
use kv_core::{KvError, Result};

const PRESETS: &[(&str, &str)] = &[
    ("tiny-mha", include_str!("../../presets/tiny-mha.json")),
    ("tiny-gqa", include_str!("../../presets/tiny-gqa.json")),
    ("tiny-mqa", include_str!("../../presets/tiny-mqa.json")),
];

/// Names of the built-in presets.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}

/// The decoder config of a built-in preset.
pub fn preset(name: &str) -> Result<DecoderConfig> {
    let (_, json) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| KvError::Unknown {
        kind: "preset".into(),
        name: name.into(),
        valid: preset_names().join(", "),
    })?;
    DecoderConfig::from_json(json)
}
