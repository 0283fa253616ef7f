//! TOVA, token omission via attention (Oren et al., 2024): keep what the current query attends to.

use crate::{LayerContext, Params, Scorer, SpecParams};
use burn::prelude::*;
use kv_core::{KvError, LayerCache, Observation, ObserveRequest, Result};
use serde::{Deserialize, Serialize};

/// Scores slots by the latest query's attention averaged over all heads of the layer: one
/// decision per layer, as in the paper, so every KV head keeps the same positions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TovaScorer {}

impl SpecParams for TovaScorer {
    const KEYS: &'static [&'static str] = &[];

    fn from_params(_: &Params<'_>) -> Result<Self> {
        Ok(Self {})
    }
}

impl<B: Backend> Scorer<B> for TovaScorer {
    fn name(&self) -> String {
        "tova".into()
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, selecting: bool) -> ObserveRequest {
        ObserveRequest {
            window: usize::from(selecting),
            ..Default::default()
        }
    }

    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        obs: Option<&Observation<B>>,
        _: usize,
    ) -> Result<Tensor<B, 3>> {
        let probs = obs.and_then(|o| o.window.clone()).ok_or_else(|| {
            KvError::config("tova observation", "none", "the last query's attention")
        })?;
        let [b, h, w, n] = probs.dims();
        let last = probs.narrow(2, w - 1, 1).reshape([b, h, n]);
        Ok(last.mean_dim(1).expand([b, cache.shape().kv_heads, n]))
    }
}
