//! StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a recent window.

use crate::{LayerContext, Params, Scorer, SpecParams};
use burn::prelude::*;
use kv_core::{LayerCache, Observation, ObserveRequest, Result};
use serde::{Deserialize, Serialize};

/// Scores slots by recency, the first `sinks` tokens of the stream above everything, so a top-k
/// keeps the sinks and the most recent tokens (kvpress's `StreamingLLMPress` is a scorer too).
///
/// Two position modes, chosen by the top-k policy's `rerotate`: by default cached keys keep the
/// RoPE positions they were written at (the next token still rotates at `tokens_seen`); with
/// `rerotate`, the paper's mode, the surviving keys are re-rotated to their in-cache positions
/// after each eviction and later tokens rotate at the cache length, so relative distances never
/// exceed the budget and endless streams stay within the trained range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingScorer {
    /// Leading tokens never evicted.
    pub sinks: usize,
}

impl Default for StreamingScorer {
    fn default() -> Self {
        Self { sinks: 4 }
    }
}

impl SpecParams for StreamingScorer {
    const KEYS: &'static [&'static str] = &["sinks"];

    fn from_params(p: &Params<'_>) -> Result<Self> {
        Ok(Self {
            sinks: p.usize("sinks", Self::default().sinks)?,
        })
    }
}

impl<B: Backend> Scorer<B> for StreamingScorer {
    fn name(&self) -> String {
        format!("streaming(sinks={})", self.sinks)
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, _: bool) -> ObserveRequest {
        ObserveRequest::default()
    }

    fn stream_order_sinks(&self) -> Option<usize> {
        Some(self.sinks)
    }

    /// Slot `j` scores `j`; a sink (original position below `sinks`) scores `2n - j`, above every
    /// other slot and earliest first, so a budget below the sinks keeps the first ones. All scores
    /// are distinct, so the kept set never depends on how a top-k breaks ties.
    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        _: Option<&Observation<B>>,
        _: usize,
    ) -> Result<Tensor<B, 3>> {
        let n = cache.slots();
        let shape = cache.shape();
        // j + sink * (2n - 2j): the slot row is the broadcast operand and the sink mask (per head
        // or shared) the contiguous one, so no op walks a broadcast tensor element by element.
        let index = Tensor::<B, 1, Int>::arange(0..n as i64, &cache.device())
            .float()
            .reshape([1, 1, n]);
        let sink = cache.positions().lower_elem(self.sinks as i64).float();
        let scores = sink * index.clone().mul_scalar(-2.0).add_scalar(2.0 * n as f64) + index;
        Ok(scores.expand([shape.batch, shape.kv_heads, n]))
    }
}
