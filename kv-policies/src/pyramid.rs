//! PyramidKV (Cai et al., 2024): per-layer budgets that shrink with depth, around the flat mean;
//! registered over SnapKV's scores (as in the paper), and usable over any scorer.

use kv_core::{Budget, KvError, Result};
use serde::{Deserialize, Serialize};

/// PyramidKV's budgets: lower layers (broad attention) keep more, upper layers (focused attention)
/// keep less, with the same mean as the flat budget.
///
/// The budgets are kvpress's (`PyramidKVPress.get_layer_budget`), which adapts the formula of
/// PyramidKV's official code (KVCache-Factory, `PyramidKVCluster`): with `A` the flat budget and
/// `w` the window, layer totals run in equal steps from `max = 2A - A/beta` at layer 0 down to
/// `min = A/beta` at the last; layer 0 cannot keep more than the `n - w` prefix tokens there are,
/// so `max` is capped there and `min = 2A - max` (which keeps the mean at `A` for keep ratios
/// above about one half); when the pyramid does not fit (`min < w`: the smallest layer could not
/// hold its window), every layer keeps `A`, plain SnapKV. KVCache-Factory instead builds its
/// pyramid over prefix budgets (`A - w`, plus the window in every layer) and skips it for prompts
/// shorter than `2 (A - w)`; kvpress's version is the one the field's benchmarks use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PyramidBudgets {
    /// Steepness: the last layer keeps `1 / beta` of the mean budget (kvpress: 20).
    pub beta: f32,
    /// The protected window every layer must hold (SnapKV's observation window).
    pub window: usize,
}

impl PyramidBudgets {
    /// Slots layer `layer` of `n_layers` keeps of `n` prompt tokens when the flat budget is
    /// `flat` slots (see the type's docs for the formula).
    pub fn layer_budget(&self, n: usize, flat: usize, layer: usize, n_layers: usize) -> usize {
        let (n_f, a, w) = (n as f64, flat as f64, self.window as f64);
        let mut min = a / self.beta as f64;
        let mut max = 2.0 * a - min;
        if max >= n_f - w {
            max = n_f - w;
            min = 2.0 * a - max;
        }
        // kvpress's feasibility test; one layer has no pyramid (its mean must be the flat budget).
        if n_layers < 2 || !(n_f >= max && max >= min && min >= w) {
            return flat;
        }
        let step = (max - min) / (n_layers - 1) as f64;
        (max - layer as f64 * step).round() as usize
    }

    /// Slots layer `layer` keeps once `seen` tokens have been seen: `seen` (nothing to evict)
    /// when the flat budget keeps everything, so nothing is redistributed across layers.
    pub fn slots(
        &self,
        budget: Budget,
        seen: usize,
        layer: usize,
        n_layers: usize,
    ) -> Result<usize> {
        if layer >= n_layers {
            return Err(KvError::config(
                "layer",
                layer,
                format!("below the model's {n_layers} layers"),
            ));
        }
        let flat = budget.slots_for(seen);
        if flat >= seen {
            return Ok(seen);
        }
        Ok(self.layer_budget(seen, flat, layer, n_layers).min(seen))
    }
}
