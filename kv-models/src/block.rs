//! One pre-norm decoder block, whatever its attention kind.

use crate::FeedForward;
use burn::nn::RmsNorm;
use burn::prelude::*;

/// One pre-norm block over attention kind `A`: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
///
/// A Llama-style block holds a [`crate::SelfAttention`], YOCO's self-decoder a
/// [`crate::SelfDecoderAttention`] and its cross-decoder a [`kv_attention::CrossAttention`].
#[derive(Module, Debug)]
pub struct Block<B: Backend, A: Module<B>> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// The block's token mixer.
    pub attention: A,
    /// Norm before the feed-forward.
    pub ffn_norm: RmsNorm<B>,
    /// SwiGLU feed-forward.
    pub ffn: FeedForward<B>,
}

impl<B: Backend, A: Module<B>> Block<B, A> {
    /// `h + ffn(norm(h))`, the block's second half.
    pub fn feed_forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        h.clone() + self.ffn.forward(self.ffn_norm.forward(h))
    }
}
