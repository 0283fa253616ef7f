//! PyramidKV (Cai et al., 2024): SnapKV scoring with per-layer budgets that shrink with depth.

use crate::{CachePolicy, LayerContext, PolicySpec, SnapKvPolicy};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{KvError, LayerCache, Result};

/// SnapKV with a pyramid of budgets: lower layers (broad attention) keep more, upper layers
/// (focused attention) keep less, with the same mean as the flat budget.
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
#[derive(Debug, Clone, PartialEq)]
pub struct PyramidKvPolicy {
    /// Scoring, window and the mean budget.
    pub snapkv: SnapKvPolicy,
    /// Steepness: the last layer keeps `1 / beta` of the mean budget (kvpress: 20).
    pub beta: f32,
}

impl PyramidKvPolicy {
    /// Parses `pyramidkv:budget=..,window=32,kernel=7,pool=max,beta=20,every=0`.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let p = spec.params(&["budget", "window", "kernel", "pool", "every", "beta"])?;
        let beta = p.f32_in("beta", 20.0, 1.0, 1e6)?;
        let snap = PolicySpec::parse(&spec_without(spec, "beta"))?;
        Ok(Self { snapkv: SnapKvPolicy::from_spec(&snap)?, beta })
    }

    /// Slots layer `layer` of `n_layers` keeps of `n` prompt tokens when the flat budget is
    /// `flat` slots (see the type's docs for the formula).
    pub fn layer_budget(&self, n: usize, flat: usize, layer: usize, n_layers: usize) -> usize {
        let (n_f, a, w) = (n as f64, flat as f64, self.snapkv.window as f64);
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
}

/// The spec string of `spec` with parameter `drop` removed (to hand the rest to SnapKV).
fn spec_without(spec: &PolicySpec, drop: &str) -> String {
    let params: Vec<String> = spec.pairs().filter(|(k, _)| *k != drop).map(|(k, v)| format!("{k}={v}")).collect();
    format!("snapkv:{}", params.join(","))
}

impl<B: Backend> CachePolicy<B> for PyramidKvPolicy {
    fn name(&self) -> String {
        format!("pyramidkv(budget={},window={},beta={})", self.snapkv.budget, self.snapkv.window, self.beta)
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        CachePolicy::<B>::observe_request(&self.snapkv, ctx)
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        if !self.snapkv.schedule.is_due(ctx.phase) {
            return Ok(());
        }
        if ctx.layer >= ctx.n_layers {
            return Err(KvError::config("layer", ctx.layer, format!("below the model's {} layers", ctx.n_layers)));
        }
        let flat = self.snapkv.budget.slots_for(cache.tokens_seen());
        if flat >= cache.tokens_seen() {
            // Nothing to compress, so nothing to redistribute across layers.
            return Ok(());
        }
        let k = self.layer_budget(cache.tokens_seen(), flat, ctx.layer, ctx.n_layers).min(cache.tokens_seen());
        self.snapkv.compress(ctx, cache, obs, k)
    }
}
