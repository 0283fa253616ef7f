//! SnapKV (Li et al., NeurIPS 2024): select prompt tokens by the attention of an observation
//! window of the last prompt queries.

use crate::select::{group_sum, keep_top_k, protect, recent_mask};
use crate::{CachePolicy, LayerContext, PolicySpec, Schedule, Scorer};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{Budget, KvError, LayerCache, Result};

/// How neighbouring scores are pooled ("clustering").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Max over the kernel.
    Max,
    /// Mean over the kernel, padding counted as zeros (as `avg_pool1d` does).
    Avg,
}

/// Keeps the observation window and the prompt slots the window attended to most.
///
/// Needs only the window's `w x n` attention, which the attention computes as part of its last
/// query block: the softmax is over all keys (then sliced), and causal inside the window.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapKvPolicy {
    /// Slots kept per KV head, window included.
    pub budget: Budget,
    /// Observation window: the last `window` queries of the prompt.
    pub window: usize,
    /// Pooling kernel width (odd; 1 = no pooling).
    pub kernel: usize,
    /// Pooling kind.
    pub pool: Pool,
    /// When to compress (SnapKV's own: once, at the end of prefill).
    pub schedule: Schedule,
}

impl SnapKvPolicy {
    /// Parses `snapkv:budget=..,window=32,kernel=7,pool=max,every=0`.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let p = spec.params(&["budget", "window", "kernel", "pool", "every"])?;
        let kernel = p.usize("kernel", 7)?;
        if kernel == 0 || kernel % 2 == 0 {
            return Err(KvError::config("snapkv:kernel", kernel, "an odd width >= 1"));
        }
        let window = p.usize("window", 32)?;
        if window == 0 {
            return Err(KvError::config("snapkv:window", 0, "at least 1 query"));
        }
        Ok(Self {
            budget: p.budget("budget", Budget::Ratio(0.5))?,
            window,
            kernel,
            pool: if p.choice("pool", "max", &["max", "avg"])? == "max" { Pool::Max } else { Pool::Avg },
            schedule: p.schedule(Schedule::PrefillOnly)?,
        })
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

impl<B: Backend> CachePolicy<B> for SnapKvPolicy {
    fn name(&self) -> String {
        format!("snapkv(budget={},window={},kernel={})", self.budget, self.window, self.kernel)
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        let window = if self.schedule.is_due(ctx.phase) { self.window } else { 0 };
        ObserveRequest { window, ..Default::default() }
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>) -> Result<()> {
        if !self.schedule.is_due(ctx.phase) {
            return Ok(());
        }
        let k = self.budget.slots_for(cache.tokens_seen());
        self.compress(ctx, cache, obs, k)
    }
}

impl SnapKvPolicy {
    /// Keeps `k` slots per KV head: the observation window and the best-voted prefix slots.
    pub fn compress<B: Backend>(&self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>, k: usize) -> Result<()> {
        if cache.slots() <= k {
            return Ok(());
        }
        let scores = self.score(ctx, cache, obs, k)?;
        keep_top_k(cache, scores, k)
    }
}

impl<B: Backend> Scorer<B> for SnapKvPolicy {
    /// The window's pooled votes for the prefix slots, the window itself protected; when `k`
    /// cannot hold the window, the slot order (so the newest `k` slots win).
    fn score(&self, _: &LayerContext<'_, B>, cache: &mut LayerCache<B>, obs: Option<&Observation<B>>, k: usize) -> Result<Tensor<B, 3>> {
        let n = cache.slots();
        let probs = obs
            .and_then(|o| o.window.clone())
            .ok_or_else(|| KvError::config("snapkv observation", "none", "the window's attention (the model ignored the policy's request)"))?;
        let [b, h, w, _] = probs.dims();
        let w = w.min(n);
        let kv = cache.shape().kv_heads;
        if k <= w {
            return Ok(Tensor::<B, 1, Int>::arange(0..n as i64, &cache.device()).float().reshape([1, 1, n]).expand([b, kv, n]));
        }
        // Column sums of the window over the prefix, pooled; the window itself is always kept.
        let votes = probs.narrow(3, 0, n - w).sum_dim(2).reshape([b, h, n - w]);
        let votes = group_sum(pool1d(votes, self.kernel, self.pool), kv);
        let scores = Tensor::cat(vec![votes, Tensor::zeros([b, kv, w], &cache.device())], 2);
        Ok(protect(scores, recent_mask(n, w, &cache.device())))
    }
}
