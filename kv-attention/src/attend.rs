//! Attention over a layer cache: which kernel a call takes (the dispatch), whatever the cache's
//! storage. The kernels themselves are in `prefill.rs` (fused and host prefill), `decode.rs`
//! (one token on the host) and `explicit.rs` (everything else, and every observation).

use crate::explicit::{Causality, grouped_attention};
use crate::prefill::{fused_prefill, host_observed_prefill};
use crate::{Kernels, Observation, ObserveRequest};
use burn::prelude::*;

/// Attention of `q` `[batch, heads, t, d]` over every slot a layer cache holds, whether its
/// storage is rectangular or ragged; `query_positions` (absolute, `[t]`) masks causally by the
/// positions the slots remember, `None` lets every query see every slot (a single new token).
///
/// Ragged storage (heads with unequal budgets) attends head by head, each KV head's group of
/// query heads over that head's own slots; what it observes is per head too
/// ([`Observation::heads`]), with no norms (no ragged-storage policy reads them).
pub fn attend_cache<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    query_positions: Option<Tensor<B, 1, Int>>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let causality = |key: Tensor<B, 3, Int>| match &query_positions {
        None => Causality::live(cache),
        Some(query) => Causality::ByPosition {
            query: query.clone(),
            key,
        },
    };
    let Some(heads) = cache.head_caches() else {
        let h = q.dims()[1];
        let (o, observation) = grouped_attention(
            q,
            &cache.kv_segments(),
            &causality(cache.positions()),
            scale,
            observe,
        );
        return (
            o,
            Observation::with_plain_norms(observation, observe, cache, h),
        );
    };
    let [b, h, _, _] = q.dims();
    let kv = cache.shape().kv_heads;
    let group = h / kv;
    let per_head_request = ObserveRequest {
        key_norms: false,
        value_norms: false,
        ..observe
    };
    let mut observed = Vec::new();
    let rows = (0..b)
        .map(|row| {
            let per_head = (0..kv)
                .map(|head| {
                    let c = &heads[row * kv + head];
                    let q = q.clone().narrow(0, row, 1).narrow(1, head * group, group);
                    let (o, obs) = grouped_attention(
                        q,
                        &c.kv_segments(),
                        &causality(c.positions()),
                        scale,
                        per_head_request,
                    );
                    observed.extend(obs);
                    o
                })
                .collect();
            Tensor::cat(per_head, 1)
        })
        .collect();
    let observation = (!per_head_request.is_empty()).then(|| Observation {
        heads: Some(observed),
        ..Default::default()
    });
    (Tensor::cat(rows, 0), observation)
}

/// Causal attention of the cache's newest `t` tokens (`q` `[batch, heads, t, d]`, at positions
/// `tokens_seen - t ..`, their K/V already appended) over every slot it holds: what a layer runs
/// after appending a prompt, a chunk or one decoded token.
///
/// A chunk that no policy needs every row of (nothing, or only SnapKV's window) goes through
/// burn's fused kernel or the host one ([`fused_prefill`]), and so does one whose policy sums
/// each slot's attention when the host kernel is on. One token over a rectangular burn-flex f32
/// cache takes the host decode kernel (`decode.rs`) when the host kernels are on, unless band
/// sums or a window of more than one row are asked; what is left (a ragged cache, band sums,
/// column sums without the host kernels, other backends) takes the explicit kernel.
pub fn attend_appended<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    let [_, h, t, _] = q.dims();
    let seen = cache.tokens_seen();
    if t > 1 && !cache.is_ragged() && observe.band == 0 {
        let prefilled = if observe.column_sums {
            host_observed_prefill(q.clone(), cache, scale, observe)
        } else {
            Some(fused_prefill(q.clone(), cache, scale, observe))
        };
        if let Some((o, observation)) = prefilled {
            return (
                o,
                Observation::with_plain_norms(observation, observe, cache, h),
            );
        }
    }
    #[cfg(feature = "flex")]
    if t == 1 && !cache.is_ragged() && host_kernels_on::<B>(&q.device()) {
        let bias = cache.dead_bias();
        if let Some((o, probs)) = crate::decode::decode_attention(
            &q,
            &cache.kv_segments(),
            bias.as_ref(),
            scale,
            observe,
            Kernels::current().isa,
            None,
        ) {
            let observation = (!observe.is_empty()).then(|| Observation {
                column_sums: probs.clone().filter(|_| observe.column_sums),
                window: probs
                    .filter(|_| observe.window > 0)
                    .map(|p| p.unsqueeze_dim(2)),
                ..Default::default()
            });
            return (
                o,
                Observation::with_plain_norms(observation, observe, cache, h),
            );
        }
    }
    if cache.is_ragged() {
        let query_positions =
            (t > 1).then(|| Tensor::arange((seen - t) as i64..seen as i64, &q.device()));
        return attend_cache(q, cache, query_positions, scale, observe);
    }
    let (o, observation) = grouped_attention(
        q,
        &cache.kv_segments(),
        &Causality::appended(cache, t),
        scale,
        observe,
    );
    (
        o,
        Observation::with_plain_norms(observation, observe, cache, h),
    )
}

/// Runs `f` with the host kernels on or off for this thread alone (the rest of the current
/// [`Kernels`] kept), restoring the thread's choice after: what a test compares a kernel against
/// then runs on the path it names, whatever other tests choose on other threads.
pub fn with_host_kernels<R>(enabled: bool, f: impl FnOnce() -> R) -> R {
    Kernels {
        host: enabled,
        ..Kernels::current()
    }
    .scope(f)
}

/// Whether the host kernels may take this call's tensors: the current [`Kernels`] takes them, and
/// no autodiff graph is being recorded on `device` (the kernels' outputs would cut it).
pub fn host_kernels_on<B: Backend>(device: &B::Device) -> bool {
    Kernels::current().host && !B::ad_enabled(device)
}

/// Calls each host kernel served on this thread, so a test can tell whether the kernel it meant
/// to check ran (per thread, so other tests running beside it do not count).
#[cfg(test)]
pub(crate) mod served {
    use std::cell::Cell;

    /// One counter per kernel.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Kernel {
        /// The prefill attention and SwiGLU (`host.rs`).
        Prefill,
        /// The decode attention (`decode.rs`).
        Decode,
        /// The packed-weight product (`packed.rs`).
        Packed,
    }

    thread_local! {
        static CALLS: [Cell<usize>; 3] = const { [Cell::new(0), Cell::new(0), Cell::new(0)] };
    }

    /// Counts one call of `kernel` on this thread.
    pub(crate) fn count(kernel: Kernel) {
        CALLS.with(|c| c[kernel as usize].set(c[kernel as usize].get() + 1));
    }

    /// Calls of `kernel` on this thread so far.
    pub(crate) fn calls(kernel: Kernel) -> usize {
        CALLS.with(|c| c[kernel as usize].get())
    }
}
