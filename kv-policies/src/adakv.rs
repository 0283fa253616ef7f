//! Ada-KV (Feng et al., 2024): one top-k across the heads of a layer, so heads get unequal
//! budgets, with a minimum share per head; a selection rule over any scorer.

use crate::select::{protect, top_k_indices};
use burn::prelude::*;
use burn::tensor::IndexingUpdateOp;
use kv_core::readback::ReadBack;
use serde::{Deserialize, Serialize};

/// Keeps the layer's `kv_heads x k` best slots wherever they are, after guaranteeing every KV
/// head its `min_share x k` best ones, so heads whose attention is concentrated give budget to
/// heads whose attention is spread. Registered to act once, at the end of prefill (as the paper
/// and kvpress do); the heads' unequal slot counts are held in ragged storage, so the bytes
/// really shrink.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AcrossHeads {
    /// Share of the mean budget every head keeps whatever the scores (the paper's safeguard, 0.2).
    pub min_share: f32,
}

impl AcrossHeads {
    /// The slots to keep per (batch row, KV head): `scores` `[b, kv_heads, n]`, `k` kept per head
    /// on average, at least `max(1, min_share x k)` per head.
    pub fn select<B: Backend>(&self, scores: Tensor<B, 3>, k: usize) -> Vec<Vec<usize>> {
        let [b, kv, n] = scores.dims();
        let safe = ((self.min_share * k as f32).floor() as usize).clamp(1, k);
        // Each head's `safe` best slots become unbeatable before the layer-wide top-k: exactly
        // those slots (marked by index, so ties at the threshold protect no more than `safe`).
        let scores = if safe < n {
            let best = top_k_indices(scores.clone(), safe);
            let marks = Tensor::<B, 3>::zeros([b, kv, n], &scores.device()).scatter(
                2,
                best,
                Tensor::ones([b, kv, safe], &scores.device()),
                IndexingUpdateOp::Add,
            );
            protect(scores, marks.greater_elem(0.5))
        } else {
            scores
        };
        let total = kv * k;
        let flat = scores.reshape([b, kv * n]);
        let picked: Vec<i64> = if total < kv * n {
            // One host read per layer, once per generation: ragged storage needs the sizes.
            top_k_indices(flat.reshape([b, 1, kv * n]), total)
                .read_back()
                .iter::<i64>()
                .collect()
        } else {
            (0..b).flat_map(|_| 0..(kv * n) as i64).collect()
        };
        let per_row = total.min(kv * n);
        let mut keep = vec![Vec::new(); b * kv];
        for (row, chunk) in picked.chunks(per_row).enumerate() {
            for &f in chunk {
                let f = f as usize;
                keep[row * kv + f / n].push(f % n);
            }
        }
        keep.iter_mut().for_each(|k| k.sort_unstable());
        keep
    }
}
