//! The Llama-style decoder-only language model over grouped attention.

use crate::{DecoderConfig, FeedForward};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use kv_attention::GroupedAttention;
use kv_core::{KvError, ModelCache, Result};
use kv_policies::{CachePolicy, FullCache, LayerContext, Phase};

/// One pre-norm decoder block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Grouped self-attention (MHA, GQA or MQA).
    pub attn: GroupedAttention<B>,
    /// Norm before the feed-forward.
    pub ffn_norm: RmsNorm<B>,
    /// SwiGLU feed-forward.
    pub ffn: FeedForward<B>,
}

/// A decoder-only LM: embedding, blocks, final norm, output head (tied to the embedding or not).
#[derive(Module, Debug)]
pub struct DecoderLm<B: Backend> {
    /// Token embedding `[vocab, d_model]`.
    pub embed: Embedding<B>,
    /// The decoder blocks.
    pub blocks: Vec<DecoderBlock<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output head when embeddings are not tied.
    pub lm_head: Option<Linear<B>>,
}

impl DecoderConfig {
    /// Validates the config and builds a randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<DecoderLm<B>> {
        self.validate()?;
        let norm = || RmsNormConfig::new(self.d_model).with_epsilon(self.norm_eps).init(device);
        let blocks = (0..self.n_layers)
            .map(|_| {
                Ok(DecoderBlock {
                    attn_norm: norm(),
                    attn: self.attention().init(device)?,
                    ffn_norm: norm(),
                    ffn: FeedForward::new(self.d_model, self.ffn_hidden, device),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(crate::materialize(DecoderLm {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device),
            blocks,
            norm: norm(),
            lm_head: (!self.tie_embeddings).then(|| LinearConfig::new(self.d_model, self.vocab_size).with_bias(false).init(device)),
        }))
    }
}

impl<B: Backend> DecoderLm<B> {
    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed.weight.dims()[0]
    }

    /// Number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// An empty cache with one layer cache per block, for a batch of `batch`.
    pub fn new_cache(&self, batch: usize) -> ModelCache<B> {
        let device = self.embed.weight.device();
        let shape = self.blocks[0].attn.cache_shape(batch);
        ModelCache::new(self.blocks.len(), shape, &device)
    }

    fn head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.norm.forward(h);
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => burn::tensor::module::linear(h, self.embed.weight.val().transpose(), None),
        }
    }

    /// Training path: logits `[b, t, vocab]` for tokens `[b, t]` at positions `0..t`, no cache.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut h = self.embed.forward(tokens);
        for block in &self.blocks {
            h = h.clone() + block.attn.forward(block.attn_norm.forward(h));
            h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
        }
        self.head(h)
    }

    /// Inference path with a full cache: logits `[b, t, vocab]` for the new `tokens` `[b, t]`,
    /// which continue at position `cache.tokens_seen()`.
    pub fn forward_cached(&self, tokens: Tensor<B, 2, Int>, cache: &mut ModelCache<B>) -> Result<Tensor<B, 3>> {
        let phase = if cache.tokens_seen() == 0 { Phase::Prefill } else { Phase::Decode { step: cache.tokens_seen() } };
        self.forward_with_policy(tokens, cache, &mut FullCache, phase)
    }

    /// Inference path under a cache policy: after each layer's attention the policy observes what
    /// it asked for and may evict from that layer's cache.
    pub fn forward_with_policy(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        if cache.num_layers() != self.blocks.len() {
            return Err(KvError::config("cache layers", cache.num_layers(), format!("{} (one per block)", self.blocks.len())));
        }
        let mut h = self.embed.forward(tokens);
        let n_layers = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            let layer = cache.layer_mut(i);
            let ctx = LayerContext { layer: i, n_layers, n_heads: block.attn.n_heads(), phase, rope: Some(&block.attn.rope) };
            let request = policy.observe_request(&ctx);
            let out = block.attn.forward_cached(block.attn_norm.forward(h.clone()), layer, request)?;
            policy.after_attention(&ctx, layer, out.observation.as_ref())?;
            h = h + out.output;
            h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
        }
        Ok(self.head(h))
    }
}
