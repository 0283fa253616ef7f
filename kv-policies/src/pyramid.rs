//! PyramidKV (Cai et al., 2024): SnapKV scoring with per-layer budgets that shrink with depth.

use crate::{CachePolicy, LayerContext, PolicySpec, SnapKvPolicy};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{KvError, LayerCache, Result};

/// SnapKV with a pyramid of budgets: lower layers (broad attention) keep more, upper layers
/// (focused attention) keep less, with the same mean as the flat budget.
///
/// As kvpress does it: with `C` the flat budget and `w` the window, the prefix budgets run in
/// equal steps from `2(C - w) - (C - w)/beta` at layer 0 down to `(C - w)/beta` at the last layer.
#[derive(Debug, Clone, PartialEq)]
pub struct PyramidKvPolicy {
    /// Scoring, window and the mean budget.
    pub snapkv: SnapKvPolicy,
    /// Steepness: the last layer keeps `1 / beta` of the mean prefix budget (kvpress: 20).
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

    /// Slots layer `layer` of `n_layers` keeps when the flat budget is `flat` slots.
    pub fn layer_budget(&self, flat: usize, layer: usize, n_layers: usize) -> usize {
        let w = self.snapkv.window.min(flat);
        let avail = (flat - w) as f64;
        if n_layers < 2 || avail == 0.0 {
            return flat;
        }
        let min = avail / self.beta as f64;
        let max = 2.0 * avail - min;
        let step = (max - min) / (n_layers - 1) as f64;
        w + (max - layer as f64 * step).round().max(0.0) as usize
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
        let k = self.layer_budget(flat, ctx.layer, ctx.n_layers).min(cache.tokens_seen());
        self.snapkv.compress(ctx, cache, obs, k)
    }
}
