//! What an attention call can hand back for a policy to observe.

use burn::prelude::*;

/// What the caller wants observed; the default asks for nothing and costs nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObserveRequest {
    /// Per-key attention column sums over the queries of this call, per query head.
    pub column_sums: bool,
    /// Attention probabilities of the last `window` queries of this call (0 = none).
    pub window: usize,
}

impl ObserveRequest {
    /// True when nothing is requested.
    pub fn is_empty(&self) -> bool {
        !self.column_sums && self.window == 0
    }

    /// The union of two requests (the larger window).
    pub fn union(self, other: Self) -> Self {
        Self { column_sums: self.column_sums || other.column_sums, window: self.window.max(other.window) }
    }
}

/// Attention statistics of one call, over the keys the cache held during it.
#[derive(Debug, Clone)]
pub struct Observation<B: Backend> {
    /// `[batch, heads, keys]`: for each key, the sum of its attention over this call's queries.
    pub column_sums: Option<Tensor<B, 3>>,
    /// `[batch, heads, w, keys]`: the probabilities of the last `w` queries (causally masked).
    pub window: Option<Tensor<B, 4>>,
}
