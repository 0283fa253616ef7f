//! SnapKV (Li et al., NeurIPS 2024): select prompt tokens by the attention of an observation
//! window of the last prompt queries.

use crate::select::{group_sum, protect_recent_slots};
use crate::{LayerContext, Params, Scorer, SpecParams};
use burn::prelude::*;
use kv_core::{KvError, LayerCache, Observation, ObserveRequest, Result};
use serde::{Deserialize, Serialize};

/// How neighbouring scores are pooled ("clustering").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// Max over the kernel.
    Max,
    /// Mean over the kernel, padding counted as zeros (as `avg_pool1d` does).
    Avg,
}

/// Scores prompt slots by the pooled attention of an observation window, the window protected.
///
/// Needs only the window's `w x n` attention, which the attention computes as part of its last
/// query block: the softmax is over all keys (then sliced), and causal inside the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapKvScorer {
    /// Observation window: the last `window` queries of the prompt.
    pub window: usize,
    /// Pooling kernel width (odd; 1 = no pooling).
    pub kernel: usize,
    /// Pooling kind.
    pub pool: Pool,
}

impl Default for SnapKvScorer {
    fn default() -> Self {
        Self {
            window: 32,
            kernel: 7,
            pool: Pool::Max,
        }
    }
}

impl SnapKvScorer {
    /// Checks the window and the kernel.
    pub fn validate(&self) -> Result<()> {
        if self.kernel == 0 || self.kernel.is_multiple_of(2) {
            return Err(KvError::config(
                "snapkv:kernel",
                self.kernel,
                "an odd width >= 1",
            ));
        }
        if self.window == 0 {
            return Err(KvError::config("snapkv:window", 0, "at least 1 query"));
        }
        Ok(())
    }
}

impl SpecParams for SnapKvScorer {
    const KEYS: &'static [&'static str] = &["window", "kernel", "pool"];

    fn from_params(p: &Params<'_>) -> Result<Self> {
        let d = Self::default();
        let scorer = Self {
            window: p.usize("window", d.window)?,
            kernel: p.usize("kernel", d.kernel)?,
            pool: if p.choice("pool", "max", &["max", "avg"])? == "max" {
                Pool::Max
            } else {
                Pool::Avg
            },
        };
        scorer.validate()?;
        Ok(scorer)
    }
}

/// Pools `x` `[b, h, n]` along dim 2 with a centred kernel of odd width `k` and stride 1.
pub fn pool1d<B: Backend>(x: Tensor<B, 3>, k: usize, pool: Pool) -> Tensor<B, 3> {
    if k == 1 {
        return x;
    }
    let [b, h, n] = x.dims();
    let pad = k / 2;
    let fill = match pool {
        Pool::Max => f32::NEG_INFINITY,
        Pool::Avg => 0.0,
    };
    let edge = Tensor::<B, 3>::full([b, h, pad], fill, &x.device());
    let padded = Tensor::cat(vec![edge.clone(), x, edge], 2);
    let mut out = padded.clone().narrow(2, 0, n);
    for i in 1..k {
        let s = padded.clone().narrow(2, i, n);
        out = match pool {
            Pool::Max => out.max_pair(s),
            Pool::Avg => out + s,
        };
    }
    match pool {
        Pool::Max => out,
        Pool::Avg => out.div_scalar(k as f64),
    }
}

impl<B: Backend> Scorer<B> for SnapKvScorer {
    fn name(&self) -> String {
        format!(
            "snapkv(window={},kernel={},pool={:?})",
            self.window, self.kernel, self.pool
        )
        .to_lowercase()
    }

    fn observe_request(&self, _: &LayerContext<'_, B>, selecting: bool) -> ObserveRequest {
        ObserveRequest {
            window: if selecting { self.window } else { 0 },
            ..Default::default()
        }
    }

    /// The window's pooled votes for the prefix slots, the window itself protected; when `k`
    /// cannot hold the window, the slot order (so the newest `k` slots win).
    fn score(
        &self,
        _: &LayerContext<'_, B>,
        cache: &LayerCache<B>,
        obs: Option<&Observation<B>>,
        k: usize,
    ) -> Result<Tensor<B, 3>> {
        let n = cache.slots();
        let probs = obs.and_then(|o| o.window.clone()).ok_or_else(|| {
            KvError::config(
                "snapkv observation",
                "none",
                "the window's attention (the model ignored the policy's request)",
            )
        })?;
        let [b, h, w, _] = probs.dims();
        let w = w.min(n);
        let kv = cache.shape().kv_heads;
        if k <= w {
            return Ok(Tensor::<B, 1, Int>::arange(0..n as i64, &cache.device())
                .float()
                .reshape([1, 1, n])
                .expand([b, kv, n]));
        }
        // Column sums of the window over the prefix, pooled; the window itself is always kept.
        let votes = probs.narrow(3, 0, n - w).sum_dim(2).reshape([b, h, n - w]);
        let votes = group_sum(pool1d(votes, self.kernel, self.pool), kv);
        let scores = Tensor::cat(vec![votes, Tensor::zeros([b, kv, w], &cache.device())], 2);
        Ok(protect_recent_slots(scores, w))
    }
}
