//! The language model around any decoder stack: token embedding (with an optional token shift),
//! the stack (Llama-style in `llama.rs`, YOCO in `yoco.rs`), final norm and output head.

use crate::model::attention::SelfAttention;
use crate::model::block::Block;
use crate::model::config::DecoderConfig;
use crate::model::ffn::FeedForward;
use crate::model::llama::{DecoderBlock, Llama};
use crate::model::state::ModelState;
use crate::model::yoco::{SelfDecoderAttention, Yoco};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig, RmsNorm, RmsNormConfig,
};
use burn::prelude::*;
use kv_attention::{MlaPath, PackedSet, Rotary, project, project_packed};
use kv_core::{KvError, Result};
use kv_policies::{CachePolicy, FullCache, Phase};

/// The decoder stack of a [`DecoderLm`], recorded under its architecture's name.
// One value per block (or per model): the size gap between variants costs nothing worth a Box,
// which burn's Module derive does not support.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Stack<B: Backend> {
    /// Llama-style blocks, each with its own cache (MHA, GQA, MQA or MLA).
    Llama(Llama<B>),
    /// YOCO's self-decoder, one global K/V and cross-decoder.
    Yoco(Yoco<B>),
}

/// A decoder-only LM: embedding, a decoder stack, final norm, output head (tied to the embedding
/// or not).
#[derive(Module, Debug)]
pub struct DecoderLm<B: Backend> {
    /// Token embedding `[vocab, d_model]`.
    pub embed: Embedding<B>,
    /// The decoder blocks.
    pub stack: Stack<B>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// Output head when embeddings are not tied.
    pub lm_head: Option<Linear<B>>,
    /// Projection of the previous tokens' embeddings (`[w * d, d]`) added to each input (`token_shift`).
    pub token_shift: Option<Linear<B>>,
    /// The output head (`lm_head`, or the tied embedding) as a quantised checkpoint's codes, for
    /// decode steps on host backends; a loader fills it, and whatever changes the weights must
    /// clear it.
    #[module(skip)]
    pub packed_head: PackedSet<1>,
    /// Positions the model was trained for (its config's `max_positions`): generation stops
    /// before a RoPE position past them unless asked to go on.
    #[module(skip)]
    pub max_positions: usize,
}

impl DecoderConfig {
    /// Validates the config and builds a randomly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<DecoderLm<B>> {
        Ok(crate::model::ordinal::ordinal_ids(
            kv_attention::materialize(self.init_lazy(device)?),
        ))
    }

    /// [`init`](Self::init) with every parameter still lazy, for loaders that replace them all
    /// (so no random initialisation runs).
    pub(crate) fn init_lazy<B: Backend>(&self, device: &B::Device) -> Result<DecoderLm<B>> {
        self.validate()?;
        let norm = || {
            RmsNormConfig::new(self.d_model)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let stack = if let Some(cross) = self.yoco_cross() {
            // YOCO: the first half self-decoder, the second half cross-decoder.
            let half = self.n_layers / 2;
            let self_attention = || -> Result<SelfDecoderAttention<B>> {
                match (self.yoco_window(), self.yoco_retention()) {
                    (Some(window), _) => {
                        Ok(SelfDecoderAttention::Window(window.init_lazy(device)?))
                    }
                    (None, Some(retention)) => Ok(SelfDecoderAttention::Retention(
                        retention.init_lazy(device)?,
                    )),
                    (None, None) => Err(KvError::config(
                        "yoco self_attention",
                        "none",
                        "window or retention",
                    )),
                }
            };
            let self_decoder = (0..half)
                .map(|_| Ok(block_of(&norm, self_attention()?, self, device)))
                .collect::<Result<Vec<_>>>()?;
            let cross_decoder = (0..self.n_layers - half)
                .map(|_| Ok(block_of(&norm, cross.init_lazy(device)?, self, device)))
                .collect::<Result<Vec<_>>>()?;
            Stack::Yoco(Yoco {
                self_decoder,
                cross_decoder,
                global_kv: cross.init_global_lazy(device)?,
            })
        } else {
            let attention = || -> Result<SelfAttention<B>> {
                Ok(match (self.mla_attention(), self.dmc_attention()) {
                    (Some(mla), _) => SelfAttention::Latent(mla.init_lazy(device)?),
                    (None, Some(dmc)) => SelfAttention::Dmc(dmc.init_lazy(device)?),
                    (None, None) => SelfAttention::Grouped(self.attention().init_lazy(device)?),
                })
            };
            Stack::Llama(Llama {
                blocks: (0..self.n_layers)
                    .map(|_| Ok(block_of(&norm, attention()?, self, device)))
                    .collect::<Result<Vec<_>>>()?,
            })
        };
        Ok(DecoderLm {
            embed: EmbeddingConfig::new(self.vocab_size, self.d_model)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            stack,
            norm: norm(),
            lm_head: (!self.tie_embeddings).then(|| {
                LinearConfig::new(self.d_model, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
            token_shift: self.token_shift.then(|| {
                LinearConfig::new(self.shift_width() * self.d_model, self.d_model)
                    .with_bias(false)
                    .init(device)
            }),
            packed_head: PackedSet::default(),
            max_positions: self.max_positions,
        })
    }
}

fn not_llama() -> KvError {
    KvError::config(
        "model stack",
        "yoco",
        "a Llama-style stack (grouped or latent attention blocks)",
    )
}

/// A block of any kind with this config's norms and feed-forward, parameters lazy.
fn block_of<B: Backend, A: Module<B>>(
    norm: &impl Fn() -> RmsNorm<B>,
    attention: A,
    config: &DecoderConfig,
    device: &B::Device,
) -> Block<B, A> {
    Block {
        attn_norm: norm(),
        attention,
        ffn_norm: norm(),
        ffn: FeedForward::new_lazy(config.d_model, config.ffn_hidden, device),
    }
}

impl<B: Backend> DecoderLm<B> {
    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.embed.weight.dims()[0]
    }

    /// Number of decoder blocks (YOCO: both halves).
    pub fn num_layers(&self) -> usize {
        match &self.stack {
            Stack::Llama(s) => s.blocks.len(),
            Stack::Yoco(s) => s.num_blocks(),
        }
    }

    /// The Llama-style stack, if this model has one.
    pub fn llama(&self) -> Option<&Llama<B>> {
        match &self.stack {
            Stack::Llama(s) => Some(s),
            Stack::Yoco(_) => None,
        }
    }

    /// The Llama-style stack, mutably, if this model has one.
    pub fn llama_mut(&mut self) -> Option<&mut Llama<B>> {
        match &mut self.stack {
            Stack::Llama(s) => Some(s),
            Stack::Yoco(_) => None,
        }
    }

    /// The Llama-style blocks; an error for a YOCO model.
    pub fn blocks(&self) -> Result<&[DecoderBlock<B>]> {
        self.llama()
            .map(|s| s.blocks.as_slice())
            .ok_or_else(not_llama)
    }

    /// The Llama-style blocks, mutably; an error for a YOCO model.
    pub fn blocks_mut(&mut self) -> Result<&mut [DecoderBlock<B>]> {
        self.llama_mut()
            .map(|s| s.blocks.as_mut_slice())
            .ok_or_else(not_llama)
    }

    /// The packed copies of the weights ([`kv_attention::PackedMatrix`]): the bytes they hold and
    /// the weights they stand for, `(0, 0)` when the loader made none. A decode step reads these
    /// bytes instead of 4 a weight.
    pub fn packed_weights(&self) -> (usize, usize) {
        let mut total = (self.packed_head.bytes(), self.packed_head.values());
        for b in self.blocks().unwrap_or_default() {
            let attention = b
                .attention
                .grouped()
                .map_or((0, 0), |a| (a.packed.bytes(), a.packed.values()));
            total = (
                total.0 + b.ffn.packed.bytes() + attention.0,
                total.1 + b.ffn.packed.values() + attention.1,
            );
        }
        total
    }

    /// Drops the packed copies of the weights, so every projection runs on the f32 weights:
    /// what code that changes the weights must do.
    pub fn clear_packed(&mut self) {
        self.packed_head = PackedSet::default();
        if let Ok(blocks) = self.blocks_mut() {
            for b in blocks {
                b.ffn.packed = PackedSet::default();
                if let Some(a) = b.attention.grouped_mut() {
                    a.packed = PackedSet::default();
                }
            }
        }
    }

    /// The YOCO stack, if this model has one.
    pub fn yoco(&self) -> Option<&Yoco<B>> {
        match &self.stack {
            Stack::Yoco(s) => Some(s),
            Stack::Llama(_) => None,
        }
    }

    /// An empty inference state for a batch of `batch`: one KV state per block, or for YOCO the
    /// one global cache plus one local state per self-decoder block.
    pub fn new_state(&self, batch: usize) -> ModelState<B> {
        let device = self.embed.weight.device();
        ModelState::new(match &self.stack {
            Stack::Llama(s) => s.new_cache(batch, &device),
            Stack::Yoco(s) => s.new_cache(batch, &device),
        })
    }

    /// Checks the stack's layout (YOCO: equal halves, one self-decoder kind); a Llama-style
    /// stack is valid by construction.
    pub fn check_blocks(&self) -> Result<()> {
        match &self.stack {
            Stack::Llama(_) => Ok(()),
            Stack::Yoco(s) => s.check(),
        }
    }

    /// Chooses how every MLA layer attends over its cache in the cached paths (absorbed by
    /// default; naive is the reference); no effect on other layers or on `forward`.
    pub fn set_mla_path(&mut self, path: MlaPath) {
        if let Some(s) = self.llama_mut() {
            s.set_mla_path(path);
        }
    }

    /// The rotary embedding of the keys in policy-managed cache `layer` (a YOCO model has one,
    /// its global cache), as the model hands it to policies in `LayerContext`.
    pub fn policy_rope(&self, layer: usize) -> Option<&Rotary<B>> {
        match &self.stack {
            Stack::Llama(s) => s.policy_rope(layer),
            Stack::Yoco(s) => (layer == 0).then_some(&s.global_kv.rope),
        }
    }

    pub(crate) fn head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.norm.forward(h);
        match &self.lm_head {
            Some(head) => project(head, self.packed_head.get(0), h),
            None => {
                if let Some(logits) = self.packed_head.get(0).and_then(|p| project_packed(p, &h)) {
                    return logits;
                }
                // Tied head: logits = h E^T. A transposed view of E is copied whole by the CPU
                // backends before the matmul (vocab x d_model per call: 113 MB for SmolLM2, most
                // of a decode step), so for a few rows compute (E h^T)^T, whose transposes
                // touch only rows x vocab values.
                let [b, t, d] = h.dims();
                let w = self.embed.weight.val();
                if b * t < d {
                    let v = w.dims()[0];
                    w.matmul(h.reshape([b * t, d]).transpose())
                        .transpose()
                        .reshape([b, t, v])
                } else {
                    burn::tensor::module::linear(h, w.transpose(), None)
                }
            }
        }
    }

    /// Previous tokens the token shift reads (0 without token shift).
    pub fn shift_width(&self) -> usize {
        self.token_shift
            .as_ref()
            .map_or(0, |s| s.weight.dims()[0] / self.embed.weight.dims()[1])
    }

    /// Input embeddings `[b, t, d]`; with token shift each position also gets a projection of the
    /// embeddings of the `w` tokens before it (`previous` `[b, <= w]`, the latest last, continues
    /// an earlier chunk; positions before the first token contribute zeros).
    pub(crate) fn embed_inputs(
        &self,
        tokens: Tensor<B, 2, Int>,
        previous: Option<Tensor<B, 2, Int>>,
    ) -> Tensor<B, 3> {
        let e = self.embed.forward(tokens);
        let Some(shift) = &self.token_shift else {
            return e;
        };
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
        let shifted: Vec<Tensor<B, 3>> = (1..=w)
            .map(|k| full.clone().slice([0..b, w - k..w - k + t, 0..d]))
            .collect();
        e + shift.forward(Tensor::cat(shifted, 2))
    }

    /// Training path: logits `[b, t, vocab]` for tokens `[b, t]` at positions `0..t`, no cache.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let h = self.embed_inputs(tokens, None);
        let h = match &self.stack {
            Stack::Llama(s) => s.forward(h),
            Stack::Yoco(s) => s.forward(h),
        };
        self.head(h)
    }

    /// [`forward`](Self::forward), plus the share of tokens a DMC model merged per sequence
    /// `[b]` (mean over layers and KV heads, straight-through gradient), which the training loss
    /// pushes towards its target compression; `None` for a model without DMC layers.
    pub fn forward_train(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let h = self.embed_inputs(tokens, None);
        let (h, shares) = match &self.stack {
            Stack::Llama(s) => s.forward_train(h),
            Stack::Yoco(s) => (s.forward(h), vec![]),
        };
        let merged = (!shares.is_empty()).then(|| {
            let b = shares[0].dims()[0];
            Tensor::stack::<2>(shares, 0).mean_dim(0).reshape([b])
        });
        (self.head(h), merged)
    }

    /// Inference path with a full cache: logits `[b, t, vocab]` for the new `tokens` `[b, t]`,
    /// which continue at position `state.tokens_seen()`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        state: &mut ModelState<B>,
    ) -> Result<Tensor<B, 3>> {
        let phase = if state.tokens_seen() == 0 {
            Phase::Prefill
        } else {
            Phase::Decode {
                step: state.tokens_seen(),
            }
        };
        self.forward_with_policy(tokens, state, &mut FullCache, phase)
    }

    /// Inference path under a cache policy: after each layer's attention the policy observes what
    /// it asked for and may evict from that layer's cache (YOCO: from the one global cache).
    pub fn forward_with_policy(
        &self,
        tokens: Tensor<B, 2, Int>,
        state: &mut ModelState<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        self.forward_policy_rows(tokens, state, policy, phase, false)
    }

    /// [`forward_with_policy`](Self::forward_with_policy) returning only the last position's
    /// logits `[b, 1, vocab]`, which is all generation needs. YOCO exits early: its cross-decoder
    /// runs only for that position (and the prompt queries a policy asks to observe).
    pub fn forward_last_with_policy(
        &self,
        tokens: Tensor<B, 2, Int>,
        state: &mut ModelState<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
    ) -> Result<Tensor<B, 3>> {
        self.forward_policy_rows(tokens, state, policy, phase, true)
    }

    fn forward_policy_rows(
        &self,
        tokens: Tensor<B, 2, Int>,
        state: &mut ModelState<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
        last_only: bool,
    ) -> Result<Tensor<B, 3>> {
        let t = tokens.dims()[1];
        if t == 0 {
            return Err(KvError::config("new tokens", 0, "at least 1"));
        }
        let h = self.embed_continuing(tokens.clone(), state);
        let mut h = match &self.stack {
            Stack::Llama(s) => s.forward_cached(h, &tokens, state.cache_mut(), policy, phase)?,
            Stack::Yoco(s) => {
                s.forward_cached(h, &tokens, state.cache_mut(), policy, phase, last_only)?
            }
        };
        let rows = h.dims()[1];
        if last_only && rows > 1 {
            h = h.narrow(1, rows - 1, 1);
        }
        Ok(self.head(h))
    }

    /// Input embeddings of new tokens that continue the cached ones: the token shift reads the
    /// previous call's last tokens, and the state keeps this call's for the next one.
    pub(crate) fn embed_continuing(
        &self,
        tokens: Tensor<B, 2, Int>,
        state: &mut ModelState<B>,
    ) -> Tensor<B, 3> {
        let [b, t] = tokens.dims();
        let previous = if state.tokens_seen() > 0 {
            state.previous_tokens().cloned()
        } else {
            None
        };
        let w = self.shift_width();
        if w > 0 && t > 0 {
            // Keep the last w tokens seen, for the next call's shift.
            let all = match &previous {
                Some(p) => Tensor::cat(vec![p.clone(), tokens.clone()], 1),
                None => tokens.clone(),
            };
            let n = all.dims()[1];
            state.set_previous_tokens(all.slice([0..b, n.saturating_sub(w)..n]));
        }
        self.embed_inputs(tokens, previous)
    }
}
