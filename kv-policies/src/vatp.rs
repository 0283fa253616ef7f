//! VATP, value-aware token pruning (Guo et al., EMNLP 2024): H2O's accumulated attention times
//! each value's L1 norm, with attention sinks never evicted.

use crate::h2o::{accumulate, column_sums, protect_recent, sinks_label};
use crate::{ACC_CHANNEL, LayerContext, Params, Scorer, SpecParams};
use burn::prelude::*;
use kv_core::{LayerCache, Observation, ObserveRequest, Result};
use serde::{Deserialize, Serialize};

/// Scores slots by accumulated attention weighted by the L1 norm of the value read.
///
/// As in the official code, each step's attention of every query head is multiplied by the L1
/// norm of the value that head reads before it is accumulated, so with GQA the product is summed
/// over the group, and with MLA each head's norm is of its own up-projected value `W_UV^h c`, not
/// of the shared latent (the attention reports the norms). Sinks matter: they draw most attention
/// but have near-zero value norms, and evicting them collapses quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VatpScorer {
    /// Fraction of the budget reserved for the most recent tokens.
    pub recent: f32,
    /// Leading tokens never evicted.
    pub sinks: usize,
}

impl Default for VatpScorer {
    fn default() -> Self {
        Self {
            recent: 0.5,
            sinks: 4,
        }
    }
}

impl SpecParams for VatpScorer {
    const KEYS: &'static [&'static str] = &["recent", "sinks"];

    fn from_params(p: &Params<'_>) -> Result<Self> {
        let d = Self::default();
        Ok(Self {
            recent: p.f32_in("recent", d.recent, 0.0, 1.0)?,
            sinks: p.usize("sinks", d.sinks)?,
        })
    }
}

impl<B: Backend> Scorer<B> for VatpScorer {
    fn name(&self) -> String {
        format!("vatp(recent={}{})", self.recent, sinks_label(self.sinks))
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, _: bool) -> ObserveRequest {
        ObserveRequest {
            column_sums: true,
            value_norms: true,
            ..Default::default()
        }
    }

    fn observe(
        &self,
        _: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        let sums = column_sums(obs, "vatp")?;
        let [b, h, n] = sums.dims();
        let norms = obs.and_then(|o| o.value_norms.clone()).unwrap_or_else(|| {
            // Observed without norms: the values the cache holds are the ones read.
            let kv = cache.shape().kv_heads;
            cache
                .values()
                .abs()
                .sum_dim(3)
                .reshape([b, kv, 1, n])
                .expand([b, kv, h / kv, n])
                .reshape([b, h, n])
        });
        accumulate(cache, sums * norms)
    }

    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        _: Option<&Observation<B>>,
        k: usize,
    ) -> Result<Tensor<B, 3>> {
        Ok(protect_recent(
            cache,
            cache.side(ACC_CHANNEL)?,
            k,
            self.recent,
            self.sinks,
        ))
    }
}
