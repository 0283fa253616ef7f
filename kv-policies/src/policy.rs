//! The interface every cache policy implements, and when policies run.

use burn::prelude::*;
use kv_core::{KeyRotation, LayerCache, Observation, ObserveRequest, Result};

/// Where in generation a policy is being consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// At the end of the prompt's forward pass.
    Prefill,
    /// After a generated token's forward pass; `step` counts decode steps from 1.
    Decode {
        /// Decode steps taken so far, this one included.
        step: usize,
    },
}

/// When an evicting policy acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Once, at the end of prefill (SnapKV's default).
    PrefillOnly,
    /// At the end of prefill and after every decode step (H2O, StreamingLLM).
    EveryStep,
    /// At the end of prefill and after every `n`-th decode step.
    EveryN(usize),
}

impl Schedule {
    /// Whether the policy acts in this phase.
    pub fn is_due(&self, phase: Phase) -> bool {
        match (self, phase) {
            (_, Phase::Prefill) => true,
            (Schedule::PrefillOnly, Phase::Decode { .. }) => false,
            (Schedule::EveryStep, Phase::Decode { .. }) => true,
            (Schedule::EveryN(n), Phase::Decode { step }) => *n > 0 && step % n == 0,
        }
    }
}

/// What a policy knows about the layer it is consulted for.
#[derive(Debug, Clone, Copy)]
pub struct LayerContext<'a, B: Backend> {
    /// The layer's index.
    pub layer: usize,
    /// Layers in the model (per-layer budgets, skipped layers).
    pub n_layers: usize,
    /// Query heads of the layer (observations are per query head).
    pub n_heads: usize,
    /// When in generation this is.
    pub phase: Phase,
    /// The rotation of the layer's cached keys (its RoPE), for policies that re-rotate them.
    pub rope: Option<&'a dyn KeyRotation<B>>,
    /// The token ids of this call, `[batch, t]`, for policies that keep tokens by kind
    /// (FastGen's special and punctuation classes); `None` where the caller has none.
    pub tokens: Option<&'a Tensor<B, 2, Int>>,
}

/// A decision over a layer's cache, made after the layer's attention has run.
///
/// The model calls [`observe_request`](Self::observe_request) before a layer's attention so the
/// attention computes only what the policy reads, then [`after_attention`](Self::after_attention)
/// with that observation. A policy may keep per-slot state in the cache's side channels, where it
/// moves with its slot on every retain; it must never change `tokens_seen`.
pub trait CachePolicy<B: Backend> {
    /// A short name for tables and logs.
    fn name(&self) -> String;

    /// What the layer's attention must observe for this policy.
    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest;

    /// Updates scores and/or evicts slots of the layer's cache.
    fn after_attention(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        observation: Option<&Observation<B>>,
    ) -> Result<()>;

    /// What a per-head adaptive policy chose, per layer and (batch row, KV head), by name
    /// (FastGen's profiles); empty for policies that choose nothing per head.
    fn head_choices(&self) -> Vec<Vec<String>> {
        Vec::new()
    }
}

/// The reference policy: keeps every slot and observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullCache;

impl<B: Backend> CachePolicy<B> for FullCache {
    fn name(&self) -> String {
        "full".into()
    }

    fn observe_request(&self, _: &LayerContext<'_, B>) -> ObserveRequest {
        ObserveRequest::default()
    }

    fn after_attention(
        &mut self,
        _: &LayerContext<'_, B>,
        _: &mut LayerCache<B>,
        _: Option<&Observation<B>>,
    ) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_fire_when_due() {
        let d = |step| Phase::Decode { step };
        assert!(Schedule::PrefillOnly.is_due(Phase::Prefill));
        assert!(!Schedule::PrefillOnly.is_due(d(1)));
        assert!(Schedule::EveryStep.is_due(d(7)));
        assert!(!Schedule::EveryN(4).is_due(d(3)));
        assert!(Schedule::EveryN(4).is_due(d(8)));
    }
}
