//! Cache statistics, measured from the tensors a cache holds rather than computed from a formula.

use serde::{Deserialize, Serialize};

/// What one layer's cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Slots held by each KV head (equal for rectangular storage).
    pub slots_per_head: Vec<usize>,
    /// Tokens seen by this layer.
    pub tokens_seen: usize,
    /// Bytes of the keys and values held (shape x element size of the held tensors).
    pub kv_bytes: usize,
    /// Bytes of the positions and side channels of the slots held.
    pub metadata_bytes: usize,
    /// Bytes of the buffers allocated, spare capacity included.
    pub allocated_bytes: usize,
}

/// What a whole model's cache holds, summed over layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Per-layer statistics.
    pub layers: Vec<LayerStats>,
    /// Tokens seen (the largest over layers; all layers see every token).
    pub tokens_seen: usize,
    /// Total bytes of keys and values held.
    pub kv_bytes: usize,
    /// Total bytes of positions and side channels held.
    pub metadata_bytes: usize,
    /// Total bytes allocated, spare capacity included.
    pub allocated_bytes: usize,
}

impl CacheStats {
    /// Sums per-layer statistics.
    pub fn from_layers(layers: Vec<LayerStats>) -> Self {
        Self {
            tokens_seen: layers.iter().map(|l| l.tokens_seen).max().unwrap_or(0),
            kv_bytes: layers.iter().map(|l| l.kv_bytes).sum(),
            metadata_bytes: layers.iter().map(|l| l.metadata_bytes).sum(),
            allocated_bytes: layers.iter().map(|l| l.allocated_bytes).sum(),
            layers,
        }
    }

    /// Total slots held, over layers and KV heads.
    pub fn total_slots(&self) -> usize {
        self.layers.iter().flat_map(|l| l.slots_per_head.iter()).sum()
    }

    /// Key/value bytes held per token seen (0 before any token).
    pub fn kv_bytes_per_token(&self) -> f64 {
        if self.tokens_seen == 0 { 0.0 } else { self.kv_bytes as f64 / self.tokens_seen as f64 }
    }

    /// Fraction of slots removed compared with keeping every token seen in every head.
    pub fn compression_ratio(&self) -> f64 {
        let full: usize = self.layers.iter().map(|l| l.tokens_seen * l.slots_per_head.len()).sum();
        if full == 0 { 0.0 } else { 1.0 - self.total_slots() as f64 / full as f64 }
    }
}
