//! The Llama-style decoder-only language model over grouped (MHA/GQA/MQA) or latent (MLA)
//! attention, or YOCO's decoder-decoder (its paths are in `yoco.rs`).

use crate::{BlockAttention, BlockKind, DecoderConfig, FeedForward};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use kv_attention::{CrossAttention, GatedRetention, GlobalKv, GroupedAttention, MlaAttention, MlaPath, SlidingWindowAttention};
use kv_core::{CacheShape, KvError, LayerCache, ModelCache, Result};
use kv_policies::{CachePolicy, FullCache, LayerContext, Phase, drive_layer};

/// One pre-norm decoder block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
#[derive(Module, Debug)]
pub struct DecoderBlock<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Grouped self-attention (MHA, GQA or MQA); `None` in an MLA block.
    pub attn: Option<GroupedAttention<B>>,
    /// Multi-head latent attention; `None` in a grouped block. Exactly one of the attention
    /// fields is set (see [`BlockAttention`] for why they are separate fields).
    pub mla: Option<MlaAttention<B>>,
    /// YOCO self-decoder sliding-window attention; `None` elsewhere.
    pub swa: Option<SlidingWindowAttention<B>>,
    /// YOCO self-decoder gated retention; `None` elsewhere.
    pub retention: Option<GatedRetention<B>>,
    /// YOCO cross-decoder attention over the global K/V; `None` elsewhere.
    pub cross: Option<CrossAttention<B>>,
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
    /// Projection of the previous tokens' embeddings (`[w * d, d]`) added to each input (`token_shift`).
    pub token_shift: Option<Linear<B>>,
    /// YOCO's global K/V projection between the self- and the cross-decoder; `None` elsewhere.
    pub global_kv: Option<GlobalKv<B>>,
}

impl DecoderConfig {
    /// Validates the config and builds a randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<DecoderLm<B>> {
        Ok(crate::ordinal::ordinal_ids(crate::materialize(self.init_lazy(device)?)))
    }

    /// [`init`](Self::init) with every parameter still lazy, for loaders that replace them all
    /// (so no random initialisation runs).
    pub(crate) fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<DecoderLm<B>> {
        self.validate()?;
        let norm = || RmsNormConfig::new(self.d_model).with_epsilon(self.norm_eps).init(device);
        let blocks = (0..self.n_layers)
            .map(|i| {
                let mut block = DecoderBlock {
                    attn_norm: norm(),
                    attn: None,
                    mla: None,
                    swa: None,
                    retention: None,
                    cross: None,
                    ffn_norm: norm(),
                    ffn: FeedForward::new_lazy(self.d_model, self.ffn_hidden, device),
                };
                if let Some(cross) = self.yoco_cross() {
                    // YOCO: the first half self-decoder, the second half cross-decoder.
                    if i >= self.n_layers / 2 {
                        block.cross = Some(cross.init_lazy(device)?);
                    } else if let Some(window) = self.yoco_window() {
                        block.swa = Some(window.init_lazy(device)?);
                    } else if let Some(retention) = self.yoco_retention() {
                        block.retention = Some(retention.init_lazy(device)?);
                    }
                } else if let Some(mla) = self.mla_attention() {
                    block.mla = Some(mla.init_lazy(device)?);
                } else {
                    block.attn = Some(self.attention().init_lazy(device)?);
                }
                Ok(block)
            })
            .collect::<Result<Vec<_>>>()?;
        let global_kv = self.yoco_cross().map(|c| c.init_global_lazy(device)).transpose()?;
        Ok(DecoderLm {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
                .init(device),
            blocks,
            norm: norm(),
            lm_head: (!self.tie_embeddings).then(|| LinearConfig::new(self.d_model, self.vocab_size).with_bias(false).init(device)),
            token_shift: self.token_shift.then(|| LinearConfig::new(self.shift_width() * self.d_model, self.d_model).with_bias(false).init(device)),
            global_kv,
        })
    }
}

impl<B: Backend> DecoderBlock<B> {
    /// What the block mixes tokens with; an error unless exactly one attention field is set.
    pub fn kind(&self) -> Result<BlockKind<'_, B>> {
        let mut set = Vec::with_capacity(1);
        if let Some(a) = &self.attn {
            set.push(("grouped", BlockKind::Attention(BlockAttention::Grouped(a))));
        }
        if let Some(a) = &self.mla {
            set.push(("mla", BlockKind::Attention(BlockAttention::Latent(a))));
        }
        if let Some(a) = &self.swa {
            set.push(("swa", BlockKind::Window(a)));
        }
        if let Some(a) = &self.retention {
            set.push(("retention", BlockKind::Retention(a)));
        }
        if let Some(a) = &self.cross {
            set.push(("cross", BlockKind::Cross(a)));
        }
        match set.len() {
            1 => Ok(set.pop().unwrap().1),
            _ => Err(KvError::config(
                "decoder block attention",
                if set.is_empty() { "none set".to_string() } else { set.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" and ") },
                "exactly one of grouped, mla, swa, retention, cross set",
            )),
        }
    }

    /// The block's cached self-attention (grouped or MLA); an error for YOCO blocks or unless
    /// exactly one attention field is set.
    pub fn attention(&self) -> Result<BlockAttention<'_, B>> {
        match self.kind()? {
            BlockKind::Attention(a) => Ok(a),
            other => Err(KvError::config("decoder block attention", other.name(), "grouped or latent attention (a YOCO block has no per-layer cache)")),
        }
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

    /// An empty cache with one layer cache per block, for a batch of `batch`; for YOCO, the one
    /// global cache plus one window cache per sliding-window block.
    pub fn new_cache(&self, batch: usize) -> ModelCache<B> {
        if let Some(global) = &self.global_kv {
            return self.yoco_cache(global, batch);
        }
        let device = self.embed.weight.device();
        // A malformed block (no attention) gets an empty shape; forward_with_policy reports it.
        let empty = CacheShape { batch, kv_heads: 0, key_dim: 0, value_dim: 0 };
        let layers = self.blocks.iter().map(|b| LayerCache::new(b.attention().map_or(empty, |a| a.cache_shape(batch)), &device)).collect();
        ModelCache::from_layers(layers)
    }

    /// Checks that every block holds exactly one attention module (a load_record whose record
    /// lacks a block's attention would silently drop it), and YOCO's layout when it has one.
    pub fn check_blocks(&self) -> Result<()> {
        match &self.global_kv {
            Some(_) => self.check_yoco_blocks(),
            None => self.blocks.iter().try_for_each(|b| b.attention().map(|_| ())),
        }
    }

    /// Chooses how every MLA layer attends over its cache in the cached paths (absorbed by
    /// default; naive is the reference); no effect on grouped layers or on `forward`.
    pub fn set_mla_path(&mut self, path: MlaPath) {
        self.blocks.iter_mut().filter_map(|b| b.mla.as_mut()).for_each(|m| m.set_path(path));
    }

    /// The rotary embedding of the keys in policy-managed cache `layer` (a YOCO model has one,
    /// its global cache), as the model hands it to policies in [`LayerContext`].
    pub fn policy_rope(&self, layer: usize) -> Option<&kv_attention::Rotary<B>> {
        match &self.global_kv {
            Some(global) => Some(&global.rope),
            None => self.blocks.get(layer).and_then(|b| b.attention().ok()).map(|a| a.rope()),
        }
    }

    pub(crate) fn head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.norm.forward(h);
        match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                // Tied head: logits = h E^T. A transposed view of E is copied whole by the CPU
                // backends before the matmul (vocab x d_model per call: 113 MB for SmolLM2, most
                // of a decode step), so for a few rows compute (E h^T)^T, whose transposes
                // touch only rows x vocab values.
                let [b, t, d] = h.dims();
                let w = self.embed.weight.val();
                if b * t < d {
                    let v = w.dims()[0];
                    w.matmul(h.reshape([b * t, d]).transpose()).transpose().reshape([b, t, v])
                } else {
                    burn::tensor::module::linear(h, w.transpose(), None)
                }
            }
        }
    }

    /// Previous tokens the token shift reads (0 without token shift).
    pub fn shift_width(&self) -> usize {
        self.token_shift.as_ref().map_or(0, |s| s.weight.dims()[0] / self.embed.weight.dims()[1])
    }

    /// Input embeddings `[b, t, d]`; with token shift each position also gets a projection of the
    /// embeddings of the `w` tokens before it (`previous` `[b, <= w]`, the latest last, continues
    /// an earlier chunk; positions before the first token contribute zeros).
    pub(crate) fn embed_inputs(&self, tokens: Tensor<B, 2, Int>, previous: Option<Tensor<B, 2, Int>>) -> Tensor<B, 3> {
        let e = self.embed.forward(tokens);
        let Some(shift) = &self.token_shift else { return e };
        let w = self.shift_width();
        let [b, t, d] = e.dims();
        let mut context = vec![];
        let have = previous.as_ref().map_or(0, |p| p.dims()[1].min(w));
        if have < w {
            context.push(Tensor::zeros([b, w - have, d], &e.device()));
        }
        if let Some(p) = previous {
            let n = p.dims()[1];
            context.push(self.embed.forward(p.slice([0..b, n - have..n])));
        }
        context.push(e.clone());
        // [b, w + t, d]: row w + i is token i; offset k of token i is row w + i - k.
        let full = Tensor::cat(context, 1);
        let shifted: Vec<Tensor<B, 3>> = (1..=w).map(|k| full.clone().slice([0..b, w - k..w - k + t, 0..d])).collect();
        e + shift.forward(Tensor::cat(shifted, 2))
    }

    /// Training path: logits `[b, t, vocab]` for tokens `[b, t]` at positions `0..t`, no cache.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        if let Some(global) = &self.global_kv {
            return self.yoco_forward(global, tokens);
        }
        let mut h = self.embed_inputs(tokens, None);
        for block in &self.blocks {
            // init and load_model only make blocks with exactly one attention (check_blocks); a
            // block assembled by hand without one adds no attention rather than panicking here.
            if let Ok(attn) = block.attention() {
                h = h.clone() + attn.forward(block.attn_norm.forward(h));
            }
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
    /// it asked for and may evict from that layer's cache (YOCO: from the one global cache).
    pub fn forward_with_policy(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        self.forward_policy_rows(tokens, cache, policy, phase, false)
    }

    /// [`forward_with_policy`](Self::forward_with_policy) returning only the last position's
    /// logits `[b, 1, vocab]`, which is all generation needs. YOCO exits early: its cross-decoder
    /// runs only for that position (and the prompt queries a policy asks to observe).
    pub fn forward_last_with_policy(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        self.forward_policy_rows(tokens, cache, policy, phase, true)
    }

    fn forward_policy_rows(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
        last_only: bool,
    ) -> Result<Tensor<B, 3>> {
        if let Some(global) = &self.global_kv {
            return self.yoco_forward_cached(global, tokens, cache, policy, phase, last_only);
        }
        if cache.num_layers() != self.blocks.len() {
            return Err(KvError::config("cache layers", cache.num_layers(), format!("{} (one per block)", self.blocks.len())));
        }
        let t = tokens.dims()[1];
        let mut h = self.embed_continuing(tokens.clone(), cache);
        let n_layers = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            let attn = block.attention()?;
            let layer = cache.layer_mut(i);
            let ctx = LayerContext { layer: i, n_layers, n_heads: attn.n_heads(), phase, rope: Some(attn.rope()), tokens: Some(&tokens) };
            let x = block.attn_norm.forward(h.clone());
            h = h + drive_layer(policy, &ctx, layer, |layer, request| attn.forward_cached(x, layer, request).map(|o| (o.output, o.observation)))?;
            h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
        }
        if last_only && t > 1 {
            h = h.narrow(1, t - 1, 1);
        }
        Ok(self.head(h))
    }

    /// Input embeddings of new tokens that continue the cached ones: the token shift reads the
    /// previous call's last tokens, and the cache keeps this call's for the next one.
    pub(crate) fn embed_continuing(&self, tokens: Tensor<B, 2, Int>, cache: &mut ModelCache<B>) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let previous = if cache.tokens_seen() > 0 { cache.previous_tokens().cloned() } else { None };
        let w = self.shift_width();
        if w > 0 && t > 0 {
            // Keep the last w tokens seen, for the next call's shift.
            let all = match &previous {
                Some(p) => Tensor::cat(vec![p.clone(), tokens.clone()], 1),
                None => tokens.clone(),
            };
            let n = all.dims()[1];
            cache.set_previous_tokens(all.slice([0..b, n.saturating_sub(w)..n]));
        }
        self.embed_inputs(tokens, previous)
    }
}
