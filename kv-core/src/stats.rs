//! Cache statistics, measured from the tensors a cache holds rather than computed from a formula.

use burn::prelude::*;
use burn::tensor::BasicOps;
use serde::{Deserialize, Serialize};

/// Bytes a tensor holds: its shape times its element size, the one measure every figure uses.
pub(crate) fn tensor_bytes<B: Backend, const D: usize, K: BasicOps<B>>(
    t: &Tensor<B, D, K>,
) -> usize {
    t.dims().iter().product::<usize>() * t.dtype().size()
}

/// What one layer's cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Slots held by each (batch row, KV head), index `b * kv_heads + h` (equal unless storage is ragged).
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
    /// Per-layer statistics of the policy-managed caches.
    pub layers: Vec<LayerStats>,
    /// Per-cache statistics of the model-managed sliding windows (YOCO's self-decoder).
    #[serde(default)]
    pub local_layers: Vec<LayerStats>,
    /// Bytes of the recurrent states held (YOCO's gated retention), which stand in for K/V.
    #[serde(default)]
    pub state_bytes: usize,
    /// Tokens seen (the largest over layers; all layers see every token).
    pub tokens_seen: usize,
    /// Total bytes of keys and values held, local windows and recurrent states included.
    pub kv_bytes: usize,
    /// Total bytes of positions and side channels held.
    pub metadata_bytes: usize,
    /// Total bytes allocated, spare capacity and recurrent states included.
    pub allocated_bytes: usize,
}

impl CacheStats {
    /// Sums per-layer statistics.
    pub fn from_layers(layers: Vec<LayerStats>) -> Self {
        Self::from_parts(layers, Vec::new(), 0)
    }

    /// Sums policy-managed layers, local windows and recurrent state bytes.
    pub fn from_parts(
        layers: Vec<LayerStats>,
        local_layers: Vec<LayerStats>,
        state_bytes: usize,
    ) -> Self {
        let all = || layers.iter().chain(local_layers.iter());
        Self {
            tokens_seen: all().map(|l| l.tokens_seen).max().unwrap_or(0),
            kv_bytes: all().map(|l| l.kv_bytes).sum::<usize>() + state_bytes,
            metadata_bytes: all().map(|l| l.metadata_bytes).sum(),
            allocated_bytes: all().map(|l| l.allocated_bytes).sum::<usize>() + state_bytes,
            layers,
            local_layers,
            state_bytes,
        }
    }

    /// Key/value bytes of the policy-managed layers only (YOCO: the global cache).
    pub fn layer_kv_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.kv_bytes).sum()
    }

    /// Total slots held, over policy-managed layers and KV heads.
    pub fn total_slots(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.slots_per_head.iter())
            .sum()
    }

    /// Key/value bytes held per token seen (0 before any token).
    pub fn kv_bytes_per_token(&self) -> f64 {
        if self.tokens_seen == 0 {
            0.0
        } else {
            self.kv_bytes as f64 / self.tokens_seen as f64
        }
    }

    /// Fraction of slots removed from the policy-managed layers compared with keeping every token
    /// seen in every head (local windows are the architecture, not a policy's compression).
    pub fn compression_ratio(&self) -> f64 {
        let full: usize = self
            .layers
            .iter()
            .map(|l| l.tokens_seen * l.slots_per_head.len())
            .sum();
        if full == 0 {
            0.0
        } else {
            1.0 - self.total_slots() as f64 / full as f64
        }
    }
}
