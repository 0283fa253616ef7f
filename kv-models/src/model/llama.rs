//! The Llama-style stack: every block a cached self-attention (grouped or latent) with a cache
//! of its own, then a SwiGLU feed-forward.

use crate::model::attention::SelfAttention;
use crate::model::block::Block;
use burn::prelude::*;
use kv_attention::{CachedAttention, MlaPath, Rotary};
use kv_core::{KvError, ModelCache, Result};
use kv_policies::{CachePolicy, LayerContext, Phase, drive_layer};

/// A block of the Llama-style stack.
pub type DecoderBlock<B> = Block<B, SelfAttention<B>>;

/// The blocks of a Llama-style decoder (MHA, GQA, MQA or MLA attention), between the embedding
/// and the output head of a [`crate::model::decoder::DecoderLm`].
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// The decoder blocks, in order.
    pub blocks: Vec<DecoderBlock<B>>,
}

impl<B: Backend> Llama<B> {
    /// Empty layer states, one KV state per block, for a batch of `batch`.
    pub fn new_cache(&self, batch: usize, device: &B::Device) -> ModelCache<B> {
        ModelCache::with_local(
            self.blocks
                .iter()
                .map(|b| b.attention.new_state(batch, device))
                .collect(),
            vec![],
        )
    }

    /// Training path over hidden states `h` `[b, t, d_model]` at positions `0..t`.
    pub fn forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.blocks
            .iter()
            .fold(h, |h, block| block.forward_with(h, |a, x| a.forward(x)))
    }

    /// [`forward`](Self::forward), plus every DMC layer's share of merged tokens per sequence
    /// (`[b]` each; none without DMC layers), for the compression loss.
    pub fn forward_train(&self, h: Tensor<B, 3>) -> (Tensor<B, 3>, Vec<Tensor<B, 1>>) {
        let mut shares = vec![];
        let h = self.blocks.iter().fold(h, |h, block| {
            block.forward_with(h, |a, x| {
                let (o, share) = a.forward_train(x);
                shares.extend(share);
                o
            })
        });
        (h, shares)
    }

    /// Inference path over the hidden states of new tokens: every block's attention runs under
    /// `policy` over its own cache, through [`drive_layer`].
    pub fn forward_cached(
        &self,
        mut h: Tensor<B, 3>,
        tokens: &Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        if cache.num_layers() != self.blocks.len() || cache.num_local() != 0 {
            return Err(KvError::config(
                "cache layers",
                cache.num_layers(),
                format!("{} (one per block)", self.blocks.len()),
            ));
        }
        let n_layers = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            let state = cache.layer_state_mut(i);
            h = block.try_forward_with(h, |attn, x| {
                let ctx = LayerContext {
                    layer: i,
                    n_layers,
                    n_heads: attn.n_heads(),
                    phase,
                    rope: Some(attn.rope()),
                    tokens: Some(tokens),
                };
                drive_layer(&mut *policy, &ctx, state, |state, request| {
                    attn.forward_cached(x, state, request)
                        .map(|o| (o.output, o.observation))
                })
            })?;
        }
        Ok(h)
    }

    /// The rotary embedding of block `layer`'s cached keys.
    pub fn policy_rope(&self, layer: usize) -> Option<&Rotary<B>> {
        self.blocks.get(layer).map(|b| b.attention.rope())
    }

    /// Chooses how every MLA layer attends over its cache (no effect on grouped layers).
    pub fn set_mla_path(&mut self, path: MlaPath) {
        self.blocks
            .iter_mut()
            .filter_map(|b| b.attention.latent_mut())
            .for_each(|m| m.set_path(path));
    }
}
