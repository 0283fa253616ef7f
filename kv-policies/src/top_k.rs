//! The one selection policy: any [`Scorer`], a budget, a schedule, per-layer budgets and a
//! selection rule, so no scoring method repeats the "over budget, score, keep the top k" tail.

use crate::select::top_k_indices;
use crate::{
    AcrossHeads, CachePolicy, LayerContext, Phase, PyramidBudgets, Schedule, Scorer,
    evict_after_sinks, rerotate_kept, restore_in_cache_positions,
};
use burn::prelude::*;
use kv_core::{Budget, LayerCache, Observation, ObserveRequest, Result};

/// How many slots each layer keeps out of the flat budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LayerBudget {
    /// Every layer keeps the flat budget.
    Flat,
    /// PyramidKV's budgets, shrinking with depth around the flat mean.
    Pyramid(PyramidBudgets),
}

impl LayerBudget {
    /// Slots layer `ctx.layer` may keep once `seen` tokens have been seen under `budget`.
    pub fn slots<B: Backend>(
        &self,
        budget: Budget,
        seen: usize,
        ctx: &LayerContext<'_, B>,
    ) -> Result<usize> {
        match self {
            Self::Flat => Ok(budget.slots_for(seen)),
            Self::Pyramid(p) => p.slots(budget, seen, ctx.layer, ctx.n_layers),
        }
    }
}

/// Which slots of a layer survive, given their scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// The `k` best slots of every KV head (kept in position order).
    PerHead,
    /// AdaKV: the layer's `kv_heads x k` best slots wherever they are, each head guaranteed a
    /// minimum share; heads end with unequal counts in ragged storage.
    AcrossHeads(AcrossHeads),
}

/// Keeps the highest-scoring slots of a layer's cache whenever its schedule is due and the cache
/// holds more than its budget allows.
pub struct TopKPolicy<B: Backend> {
    /// The registry name of the method, for tables (`h2o`, `pyramidkv`, ...).
    pub label: String,
    /// Slots kept per KV head (the mean over layers and heads where those differ).
    pub budget: Budget,
    /// When to select.
    pub schedule: Schedule,
    /// Per-layer budgets.
    pub layer_budget: LayerBudget,
    /// Per-head or layer-wide selection.
    pub selection: Selection,
    /// Re-rotate the kept keys to their in-cache positions after each eviction, so later tokens
    /// rotate at the cache length (StreamingLLM's mode; kvpress's `KeyRerotationPress`).
    pub rerotate: bool,
    /// What ranks the slots.
    pub scorer: Box<dyn Scorer<B>>,
    /// Drop the one slot a step puts over budget by marking it dead ([`LayerCache::evict_one`]),
    /// which costs a few ops on `[batch, kv_heads, slots]`, instead of copying the cache without
    /// it. Both keep the same slots; off only to compare the two. Under re-rotation only a
    /// stream-order scorer (StreamingLLM) evicts lazily; others re-rotate eagerly.
    pub lazy: bool,
}

impl<B: Backend> TopKPolicy<B> {
    /// A per-head top-k policy with a flat budget over `scorer`.
    pub fn new(
        label: impl Into<String>,
        budget: Budget,
        schedule: Schedule,
        scorer: Box<dyn Scorer<B>>,
    ) -> Self {
        Self {
            label: label.into(),
            budget,
            schedule,
            layer_budget: LayerBudget::Flat,
            selection: Selection::PerHead,
            rerotate: false,
            scorer,
            lazy: true,
        }
    }

    /// No selection can happen from this phase on (a prefill-only policy while decoding), so
    /// nothing needs observing.
    fn finished(&self, phase: Phase) -> bool {
        self.schedule == Schedule::PrefillOnly && phase != Phase::Prefill
    }
}

impl<B: Backend> CachePolicy<B> for TopKPolicy<B> {
    /// `h2o(budget=0.5,recent=0.5)` when the label is the scorer's own name, else the scorer
    /// after the label's parameters: `adakv(budget=0.5,min_share=0.2; snapkv(window=32,..))`.
    fn name(&self) -> String {
        let mut own = format!("budget={}", self.budget);
        if let Schedule::EveryN(n) = self.schedule {
            own.push_str(&format!(",every={n}"));
        }
        if let LayerBudget::Pyramid(p) = self.layer_budget {
            own.push_str(&format!(",beta={}", p.beta));
        }
        if let Selection::AcrossHeads(a) = self.selection {
            own.push_str(&format!(",min_share={}", a.min_share));
        }
        if self.rerotate {
            own.push_str(",rerotate");
        }
        if !self.lazy {
            own.push_str(",lazy=false");
        }
        let scorer = self.scorer.name();
        match scorer
            .strip_prefix(self.label.as_str())
            .and_then(|rest| rest.strip_prefix('('))
        {
            Some(args) => format!("{}({own},{args}", self.label),
            None if scorer == self.label => format!("{}({own})", self.label),
            None => format!("{}({own}; {scorer})", self.label),
        }
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        if self.finished(ctx.phase) || self.scorer.skips_layer(ctx) {
            return ObserveRequest::default();
        }
        self.scorer
            .observe_request(ctx, self.schedule.is_due(ctx.phase))
    }

    fn after_attention(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        if self.finished(ctx.phase) || self.scorer.skips_layer(ctx) {
            return Ok(());
        }
        if cache.is_ragged() {
            return self.per_head_storage(ctx, cache, obs);
        }
        self.scorer.observe(ctx, cache, obs)?;
        if !self.schedule.is_due(ctx.phase) {
            return Ok(());
        }
        let live = cache.live_slots();
        let k = self
            .layer_budget
            .slots(self.budget, cache.tokens_seen(), ctx)?;
        if live <= k {
            return Ok(());
        }
        // One slot over budget (every decode step of a per-step policy): drop the lowest-scoring
        // live slot by marking it dead. Under re-rotation only a stream-order scorer can: its
        // victim has only the sinks before it, so they are all that moves.
        let one_over = self.selection == Selection::PerHead && live == k + 1 && k > 0 && self.lazy;
        let after_sinks = self.scorer.stream_order_sinks().filter(|&s| k > s);
        let lazy = one_over && (!self.rerotate || after_sinks.is_some());
        if self.rerotate && !lazy {
            restore_in_cache_positions(ctx, cache, &self.label)?;
        }
        // Scores cover every slot stored; dead ones must never be kept (nor evicted again).
        let scores = self.scorer.score(ctx, cache, obs, k)?;
        let dead = cache.dead_bias();
        if lazy {
            // The bias goes on the left, so a score row shared by the heads (TOVA's) is the
            // broadcast right-hand side, which burn-flex adds without a per-element walk.
            let victim = match dead {
                Some(bias) => (bias.neg() + scores).argmin(2),
                None => scores.argmin(2),
            };
            return match (self.rerotate, after_sinks) {
                (true, Some(sinks)) => evict_after_sinks(ctx, cache, victim, sinks, &self.label),
                _ => cache.evict_one(victim),
            };
        }
        let scores = match dead {
            Some(bias) => scores + bias,
            None => scores,
        };
        match self.selection {
            Selection::PerHead => {
                let n = cache.slots();
                let idx = if n == k + 1 && k > 0 {
                    // One slot over budget: the top k are all but the lowest score, found
                    // without a sort, and already in order.
                    all_but(scores.argmin(2), n)
                } else {
                    // Slots are held in position order, so sorting the kept indices keeps it.
                    top_k_indices(scores, k.max(1)).sort(2)
                };
                cache.retain(idx.clone())?;
                if self.rerotate {
                    rerotate_kept(ctx, cache, idx, n, &self.label)?;
                }
                Ok(())
            }
            Selection::AcrossHeads(rule) => {
                let keep = rule.select(scores, k);
                cache.retain_per_head(&keep)
            }
        }
    }
}

impl<B: Backend> TopKPolicy<B> {
    /// Scoring and selection over ragged storage (a DMC cache, or heads an earlier selection left
    /// unequal): every (batch row, KV head) is a cache of its own, so each is scored as a layer of
    /// one KV head with its query group (`ctx.n_heads / kv_heads` heads) and the head's own
    /// observation ([`Observation::heads`]), and keeps its own top `k`.
    fn per_head_storage(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        if self.rerotate || self.selection != Selection::PerHead {
            return Err(kv_core::KvError::config(
                format!("{} on ragged storage", self.label),
                if self.rerotate {
                    "rerotate"
                } else {
                    "selection across heads"
                },
                "per-head top-k without re-rotation: each head of ragged storage (DMC, AdaKV) holds its own positions",
            ));
        }
        let group = ctx.n_heads / cache.shape().kv_heads.max(1);
        let head_ctx = LayerContext {
            n_heads: group,
            ..*ctx
        };
        let due = self.schedule.is_due(ctx.phase);
        let observed = obs.and_then(|o| o.heads.as_deref());
        let heads = cache
            .head_caches_mut()
            .expect("ragged storage has head caches");
        for (i, head) in heads.iter_mut().enumerate() {
            let obs = observed.and_then(|o| o.get(i));
            self.scorer.observe(&head_ctx, head, obs)?;
            if !due {
                continue;
            }
            let (n, k) = (
                head.slots(),
                self.layer_budget
                    .slots(self.budget, head.tokens_seen(), ctx)?,
            );
            if n > k {
                let scores = self.scorer.score(&head_ctx, head, obs, k)?;
                let idx = if n == k + 1 && k > 0 {
                    all_but(scores.argmin(2), n)
                } else {
                    top_k_indices(scores, k.max(1)).sort(2)
                };
                head.retain(idx)?;
            }
        }
        Ok(())
    }
}

/// The slot indices `0..n` of every head except its `victim` (`[b, kv_heads, 1]`), in order:
/// `[b, kv_heads, n - 1]`.
fn all_but<B: Backend>(victim: Tensor<B, 3, Int>, n: usize) -> Tensor<B, 3, Int> {
    let [b, h, _] = victim.dims();
    let j = Tensor::<B, 1, Int>::arange(0..(n - 1) as i64, &victim.device())
        .reshape([1, 1, n - 1])
        .expand([b, h, n - 1]);
    j.clone() + j.greater_equal(victim.expand([b, h, n - 1])).int()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn one_over_budget_drops_exactly_what_the_sorted_top_k_drops<B: Backend>(dev: &B::Device) {
        for n in [2, 3, 17, 300] {
            let scores = Tensor::<B, 3>::random([2, 3, n], Distribution::Normal(0.0, 1.0), dev);
            let sorted: Vec<i64> = top_k_indices(scores.clone(), n - 1)
                .sort(2)
                .into_data()
                .iter::<i64>()
                .collect();
            let fast: Vec<i64> = all_but(scores.argmin(2), n)
                .into_data()
                .iter::<i64>()
                .collect();
            assert_eq!(fast, sorted, "n = {n}");
        }
    }

    kv_core::backend_tests!(one_over_budget_drops_exactly_what_the_sorted_top_k_drops);
}
