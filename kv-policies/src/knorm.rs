//! Key-norm eviction (Devoto et al., EMNLP 2024): keep the keys with the lowest L2 norm.

use crate::{LayerContext, Params, Scorer, SpecParams};
use burn::prelude::*;
use kv_core::{LayerCache, Observation, ObserveRequest, Result};
use serde::{Deserialize, Serialize};

/// Scores slots by minus the squared L2 norm of their keys; needs no attention probabilities.
/// RoPE is a rotation, so the norm of a cached (rotated) key equals its raw norm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KnormScorer {
    /// The first `skip` layers are never pruned (their norm/attention link is weak). The default
    /// skips layers 0 and 1, as the paper's code does (l2compress's README: "we skip compression
    /// of the first two layers"); kvpress's `KnormPress` prunes every layer (`skip=0`).
    pub skip: usize,
}

impl Default for KnormScorer {
    fn default() -> Self {
        Self { skip: 2 }
    }
}

impl SpecParams for KnormScorer {
    const KEYS: &'static [&'static str] = &["skip"];

    fn from_params(p: &Params<'_>) -> Result<Self> {
        Ok(Self {
            skip: p.usize("skip", Self::default().skip)?,
        })
    }
}

impl<B: Backend> Scorer<B> for KnormScorer {
    fn name(&self) -> String {
        format!("knorm(skip={})", self.skip)
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, selecting: bool) -> ObserveRequest {
        ObserveRequest {
            key_norms: selecting,
            ..Default::default()
        }
    }

    /// Minus the squared L2 norm of the keys attention scores at each slot, summed over the KV
    /// head's query group: the smallest norms score highest. The attention reports the norms
    /// (MLA's are of its up-projected keys, not of the cached latent); a cache observed without
    /// them is scored by the keys it holds.
    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        obs: Option<&Observation<B>>,
        _: usize,
    ) -> Result<Tensor<B, 3>> {
        let norms = obs
            .and_then(|o| o.key_norms.clone())
            .unwrap_or_else(|| cache.keys().powi_scalar(2).sum_dim(3).squeeze_dim::<3>(3));
        Ok(norms.neg())
    }

    fn skips_layer(&self, ctx: &LayerContext<'_, B>) -> bool {
        ctx.layer < self.skip
    }
}
