//! One prefill, many policies: a prompt is read once with the full cache while the union of what
//! the policies observe is recorded, then each policy compresses its own copy of that cache.
//!
//! Exact, not an approximation: at prefill a policy acts on a layer only after that layer's
//! attention has read the whole prompt, so its choice changes no activation of the prompt, only
//! the cache later tokens read. What differs between policies is therefore only their
//! `after_attention` on each layer's full cache, fed the part of the shared observation it asked
//! for. The evaluation grid uses this to read a needle-in-a-haystack prompt once for every
//! policy and compression.

use crate::model::decoder::DecoderLm;
use crate::model::state::ModelState;
use burn::prelude::*;
use kv_attention::{Observation, ObserveRequest};
use kv_core::{LayerCache, Result};
use kv_policies::{CachePolicy, LayerContext, Phase};

/// A prompt read with the full cache, with everything a set of policies observes at prefill.
pub struct SharedPrefill<B: Backend> {
    cache: ModelState<B>,
    /// Per policy-managed layer: (layer, layers, query heads) and what its attention observed.
    layers: Vec<((usize, usize, usize), Option<Observation<B>>)>,
    /// Logits of the prompt's last position `[1, 1, vocab]`, the same under every policy.
    pub last_logits: Tensor<B, 3>,
    /// The prompt's token ids `[1, t]`, handed to policies as the model hands them.
    tokens: Tensor<B, 2, Int>,
}

/// Observes the union of several policies' requests and evicts nothing.
struct Union<'a, B: Backend> {
    policies: &'a [&'a dyn CachePolicy<B>],
    seen: Vec<((usize, usize, usize), Option<Observation<B>>)>,
}

impl<B: Backend> CachePolicy<B> for Union<'_, B> {
    fn name(&self) -> String {
        "shared prefill".into()
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        self.policies
            .iter()
            .fold(ObserveRequest::default(), |acc, p| {
                acc.union(p.observe_request(ctx))
            })
    }

    fn after_attention(
        &mut self,
        ctx: &LayerContext<'_, B>,
        _: &mut LayerCache<B>,
        observation: Option<&Observation<B>>,
    ) -> Result<()> {
        self.seen
            .push(((ctx.layer, ctx.n_layers, ctx.n_heads), observation.cloned()));
        Ok(())
    }
}

impl<B: Backend> SharedPrefill<B> {
    /// Reads `prompt` (batch 1) once, observing what any of `policies` would at prefill.
    pub fn new(
        model: &DecoderLm<B>,
        prompt: &[u32],
        policies: &[&dyn CachePolicy<B>],
        reserve: usize,
    ) -> Result<Self> {
        let device = model.embed.weight.device();
        let ids: Vec<i32> = prompt.iter().map(|&t| t as i32).collect();
        let x = Tensor::<B, 1, Int>::from_ints(ids.as_slice(), &device).reshape([1, prompt.len()]);
        let mut cache = model.new_state(1);
        cache.reserve(prompt.len() + reserve);
        let mut union = Union {
            policies,
            seen: vec![],
        };
        let last_logits =
            model.forward_last_with_policy(x.clone(), &mut cache, &mut union, Phase::Prefill)?;
        Ok(Self {
            cache,
            layers: union.seen,
            last_logits,
            tokens: x,
        })
    }

    /// The full cache after the prompt, before any policy acted.
    pub fn full_cache(&self) -> &ModelState<B> {
        &self.cache
    }

    /// What policy-managed cache `layer`'s attention observed (the union of the requests).
    pub fn observation(&self, layer: usize) -> Option<&Observation<B>> {
        self.layers
            .iter()
            .find(|((l, ..), _)| *l == layer)
            .and_then(|(_, o)| o.as_ref())
    }

    /// The context the model handed policies for cache `layer` at this prefill.
    pub fn context<'s>(
        &'s self,
        model: &'s DecoderLm<B>,
        layer: usize,
    ) -> Option<LayerContext<'s, B>> {
        self.layers.iter().find(|((l, ..), _)| *l == layer).map(
            |((layer, n_layers, n_heads), _)| LayerContext {
                layer: *layer,
                n_layers: *n_layers,
                n_heads: *n_heads,
                phase: Phase::Prefill,
                rope: model
                    .policy_rope(*layer)
                    .map(|r| r as &dyn kv_core::KeyRotation<B>),
                tokens: Some(&self.tokens),
            },
        )
    }

    /// `policy`'s cache after the prompt: the full cache compressed as `policy` would have at
    /// the end of this prefill (its per-slot state, such as H2O's scores, included).
    pub fn cache_for(
        &self,
        model: &DecoderLm<B>,
        policy: &mut dyn CachePolicy<B>,
    ) -> Result<ModelState<B>> {
        let mut cache = self.cache.clone();
        for ((layer, n_layers, n_heads), observation) in &self.layers {
            let ctx = LayerContext {
                layer: *layer,
                n_layers: *n_layers,
                n_heads: *n_heads,
                phase: Phase::Prefill,
                rope: model
                    .policy_rope(*layer)
                    .map(|r| r as &dyn kv_core::KeyRotation<B>),
                tokens: Some(&self.tokens),
            };
            let request = policy.observe_request(&ctx);
            let mine = observation.as_ref().map(|o| o.restricted(request));
            policy.after_attention(&ctx, cache.layer_mut(*layer), mine.as_ref())?;
        }
        Ok(cache)
    }
}
