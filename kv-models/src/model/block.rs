//! One pre-norm decoder block, whatever its attention kind.

use crate::model::ffn::FeedForward;
use burn::nn::RmsNorm;
use burn::prelude::*;

/// One pre-norm block over attention kind `A`: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
///
/// A Llama-style block holds a [`crate::model::attention::SelfAttention`], YOCO's self-decoder a
/// [`crate::model::yoco::SelfDecoderAttention`] and its cross-decoder a [`kv_attention::CrossAttention`].
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
    /// The whole block over hidden states `h`, its attention given as `mix` (which gets
    /// `norm(h)`): the training and cached paths of every kind differ only there.
    pub fn forward_with(
        &self,
        h: Tensor<B, 3>,
        mix: impl FnOnce(&A, Tensor<B, 3>) -> Tensor<B, 3>,
    ) -> Tensor<B, 3> {
        let h = h.clone() + mix(&self.attention, self.attn_norm.forward(h));
        self.feed_forward(h)
    }

    /// [`forward_with`](Self::forward_with) for an attention that can fail (the cached paths).
    pub fn try_forward_with<E>(
        &self,
        h: Tensor<B, 3>,
        mix: impl FnOnce(&A, Tensor<B, 3>) -> Result<Tensor<B, 3>, E>,
    ) -> Result<Tensor<B, 3>, E> {
        let h = h.clone() + mix(&self.attention, self.attn_norm.forward(h))?;
        Ok(self.feed_forward(h))
    }

    /// `h + ffn(norm(h))`, the block's second half.
    pub fn feed_forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        h.clone() + self.ffn.forward(self.ffn_norm.forward(h))
    }
}
