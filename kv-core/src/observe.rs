//! What an attention call can hand back for a policy to observe, and how a policy rotates keys.

use burn::prelude::*;

/// What the caller wants observed; the default asks for nothing and costs nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObserveRequest {
    /// Per-key attention column sums over the queries of this call, per query head.
    pub column_sums: bool,
    /// Attention probabilities of the last `window` queries of this call (0 = none).
    pub window: usize,
    /// Squared norms of the keys the query heads read, per slot (key-norm eviction).
    pub key_norms: bool,
    /// L1 norms of the values the query heads read, per slot (value-aware eviction).
    pub value_norms: bool,
    /// Per-key attention of the queries at most `band - 1` positions after it (0 = none): the
    /// mass a local window of `band` keys keeps (FastGen's profiling).
    pub band: usize,
}

impl ObserveRequest {
    /// True when nothing is requested.
    pub fn is_empty(&self) -> bool {
        !self.column_sums
            && self.window == 0
            && !self.key_norms
            && !self.value_norms
            && self.band == 0
    }

    /// The union of two requests (the larger window).
    pub fn union(self, other: Self) -> Self {
        Self {
            column_sums: self.column_sums || other.column_sums,
            window: self.window.max(other.window),
            key_norms: self.key_norms || other.key_norms,
            value_norms: self.value_norms || other.value_norms,
            band: self.band.max(other.band),
        }
    }
}

/// Attention statistics of one call, over the keys the cache held during it.
#[derive(Debug, Clone, Default)]
pub struct Observation<B: Backend> {
    /// `[batch, heads, keys]`: for each key, the sum of its attention over this call's queries.
    pub column_sums: Option<Tensor<B, 3>>,
    /// `[batch, heads, w, keys]`: the probabilities of the last `w` queries (causally masked).
    pub window: Option<Tensor<B, 4>>,
    /// `[batch, kv_heads, keys]`: for each slot, the squared L2 norms of the keys its query heads
    /// score, summed over the group. A cache that holds keys as they are scored gives
    /// `group x |k|^2`; MLA's, whose heads score different up-projections of one latent, gives
    /// `sum_h |W_UK^h c|^2 + heads x |k_R|^2`.
    pub key_norms: Option<Tensor<B, 3>>,
    /// `[batch, heads, keys]`: the L1 norm of the value each query head reads from each slot
    /// (MLA: of `W_UV^h c`, not of the latent).
    pub value_norms: Option<Tensor<B, 3>>,
    /// `[batch, heads, keys]`: for each key at position `p`, the attention it gets from this
    /// call's queries at positions `p .. p + band` (a causal call only).
    pub band_sums: Option<Tensor<B, 3>>,
    /// The `band` the band sums were taken over (0 when there are none).
    pub band: usize,
    /// With ragged storage, the observation of each (batch row, KV head) over its own slots
    /// (index `b * kv_heads + h`, tensors `[1, group, n_i]`); the fields above are then empty.
    pub heads: Option<Vec<Observation<B>>>,
}

impl<B: Backend> Observation<B> {
    /// What `request` asks for out of a richer observation: the column sums and norms if asked,
    /// the last `request.window` rows of the window. Lets several policies share one attention
    /// call that observed the union of their requests.
    pub fn restricted(&self, request: ObserveRequest) -> Self {
        let window = self
            .window
            .as_ref()
            .filter(|_| request.window > 0)
            .map(|w| {
                let rows = w.dims()[2];
                let keep = request.window.min(rows);
                w.clone().narrow(2, rows - keep, keep)
            });
        Self {
            column_sums: self.column_sums.clone().filter(|_| request.column_sums),
            window,
            key_norms: self.key_norms.clone().filter(|_| request.key_norms),
            value_norms: self.value_norms.clone().filter(|_| request.value_norms),
            band_sums: self.band_sums.clone().filter(|_| request.band > 0),
            band: if request.band > 0 { self.band } else { 0 },
            heads: self
                .heads
                .as_ref()
                .map(|hs| hs.iter().map(|h| h.restricted(request)).collect()),
        }
    }

    /// `observation` (or an empty one) with the norms `request` asks for, computed from the keys
    /// and values `cache` holds as they are scored and read (any cache but MLA's latent).
    pub fn with_plain_norms(
        observation: Option<Self>,
        request: ObserveRequest,
        cache: &crate::LayerCache<B>,
        heads: usize,
    ) -> Option<Self> {
        if !(request.key_norms || request.value_norms) || cache.is_ragged() || cache.slots() == 0 {
            return observation;
        }
        let mut o = observation.unwrap_or_default();
        let [b, kv, n] = cache.positions().dims();
        let group = heads / kv.max(1);
        if request.key_norms {
            o.key_norms = Some(
                cache
                    .keys()
                    .powi_scalar(2)
                    .sum_dim(3)
                    .reshape([b, kv, n])
                    .mul_scalar(group as f64),
            );
        }
        if request.value_norms {
            let per_kv = cache.values().abs().sum_dim(3).reshape([b, kv, 1, n]);
            o.value_norms = Some(per_kv.expand([b, kv, group, n]).reshape([b, heads, n]));
        }
        Some(o)
    }
}

/// Rotates cached keys by per-slot position deltas (RoPE's `R(a)R(b) = R(a+b)`), for policies
/// that move kept keys to new positions (StreamingLLM's re-rotation).
pub trait KeyRotation<B: Backend>: core::fmt::Debug {
    /// `keys` `[b, kv_heads, n, d]` rotated by `delta` `[b|1, kv_heads|1, n]` positions.
    fn rotate_by(&self, keys: Tensor<B, 4>, delta: Tensor<B, 3, Int>) -> Tensor<B, 4>;
}
