//! The SwiGLU feed-forward of a decoder block.

use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;
use kv_attention::{PackedSet, project};

/// `down(silu(gate(x)) * up(x))`, without biases (Llama's MLP; names match HF's).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `[d_model, hidden]`, passed through SiLU.
    pub gate: Linear<B>,
    /// `[d_model, hidden]`.
    pub up: Linear<B>,
    /// `[hidden, d_model]`.
    pub down: Linear<B>,
    /// `gate`, `up` and `down` as a quantised checkpoint's codes, for decode steps on host
    /// backends ([`kv_attention::project`]); a loader fills it, and whatever changes the weights
    /// must clear it.
    #[module(skip)]
    pub packed: PackedSet<3>,
}

impl<B: Backend> FeedForward<B> {
    /// A randomly initialised feed-forward.
    pub fn new(d_model: usize, hidden: usize, device: &B::Device) -> Self {
        kv_attention::materialize(Self::new_lazy(d_model, hidden, device))
    }

    /// [`new`](Self::new) with the parameters still lazy, for loaders that replace them all.
    pub fn new_lazy(d_model: usize, hidden: usize, device: &B::Device) -> Self {
        let lin = |i, o| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            gate: lin(d_model, hidden),
            up: lin(d_model, hidden),
            down: lin(hidden, d_model),
            packed: PackedSet::default(),
        }
    }

    /// Applies the feed-forward to `[b, t, d_model]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let p = |i| self.packed.get(i);
        let hidden = kv_attention::swiglu(
            project(&self.gate, p(0), x.clone()),
            project(&self.up, p(1), x),
        );
        project(&self.down, p(2), hidden)
    }
}
