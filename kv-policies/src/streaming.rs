//! StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a recent window.

use crate::select::over_budget;
use crate::{CachePolicy, LayerContext, PolicySpec, Schedule};
use burn::prelude::*;
use kv_attention::{ObserveRequest, Observation};
use kv_core::{Budget, KvError, LayerCache, Result};

/// Keeps the first `sinks` tokens of the stream and the most recent ones, up to the budget.
///
/// Two position modes: by default cached keys keep the RoPE positions they were written at (the
/// next token still rotates at `tokens_seen`); with `rerotate`, the paper's mode, the surviving
/// window is re-rotated down to its in-cache positions after each eviction (a delta rotation,
/// `R(a)R(b) = R(a+b)`) and later tokens rotate at the cache length, so relative distances never
/// exceed the budget and endless streams stay within the trained range.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamingPolicy {
    /// Slots kept per KV head, sinks included.
    pub budget: Budget,
    /// Leading tokens never evicted.
    pub sinks: usize,
    /// Re-rotate the window to in-cache positions (the paper's mode).
    pub rerotate: bool,
    /// When to evict.
    pub schedule: Schedule,
}

impl StreamingPolicy {
    /// Parses `streaming:budget=..,sinks=4,rerotate=false,every=1`.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self> {
        let p = spec.params(&["budget", "sinks", "rerotate", "every"])?;
        Ok(Self {
            budget: p.budget("budget", Budget::Ratio(0.5))?,
            sinks: p.usize("sinks", 4)?,
            rerotate: p.bool("rerotate", false)?,
            schedule: p.schedule(Schedule::EveryStep)?,
        })
    }
}

impl<B: Backend> CachePolicy<B> for StreamingPolicy {
    fn name(&self) -> String {
        format!("streaming(budget={},sinks={}{})", self.budget, self.sinks, if self.rerotate { ",rerotate" } else { "" })
    }

    fn observe_request(&self, _: &LayerContext<'_, B>) -> ObserveRequest {
        ObserveRequest::default()
    }

    fn after_attention(&mut self, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, _: Option<&Observation<B>>) -> Result<()> {
        let Some((n, k)) = over_budget(self.schedule, self.budget, ctx.phase, cache) else { return Ok(()) };
        let sinks = self.sinks.min(k);
        let window = k - sinks;
        let evicted = n - k;
        let device = cache.device();
        let shape = cache.shape();
        let idx = Tensor::cat(
            vec![
                Tensor::<B, 1, Int>::arange(0..sinks as i64, &device),
                Tensor::<B, 1, Int>::arange((n - window) as i64..n as i64, &device),
            ]
            .into_iter()
            .filter(|t| t.dims()[0] > 0)
            .collect(),
            0,
        )
        .reshape([1, 1, k])
        .expand([shape.batch, shape.kv_heads, k]);
        cache.retain(idx)?;
        if self.rerotate {
            let rope = ctx.rope.ok_or_else(|| KvError::config("streaming:rerotate", true, "a layer with RoPE (this one has none)"))?;
            // With a budget at or below the sinks there is no window to move, but the next token
            // must still rotate at the cache length, so the shift applies either way.
            if window > 0 {
                let keys = cache.keys();
                let recent = keys.clone().narrow(2, sinks, window);
                let delta = Tensor::<B, 1, Int>::full([window], -(evicted as i64), &device).reshape([1, 1, window]);
                let recent = rope.apply(recent, delta);
                let keys = if sinks > 0 { Tensor::cat(vec![keys.narrow(2, 0, sinks), recent], 2) } else { recent };
                cache.set_keys(keys)?;
            }
            cache.shift_rope(evicted)?;
        }
        Ok(())
    }
}
