//! YOCO (You Only Cache Once, Sun et al. 2024): a self-decoder of constant-state blocks, one
//! global K/V computed from its output, and a cross-decoder whose layers all read that one cache.
//!
//! Cache layout ([`ModelCache`]): the one policy-managed layer is the global K/V (so every
//! kv-policies policy applies to it unchanged); local state `j` is self-decoder block `j`'s
//! window or recurrent state.

use crate::model::block::Block;
use burn::prelude::*;
use kv_attention::{
    AttentionOutput, CachedAttention, CrossAttention, GatedRetention, GlobalKv, ObserveRequest,
    SlidingWindowAttention,
};
use kv_core::{KvError, LocalState, ModelCache, Result};
use kv_policies::{CachePolicy, LayerContext, Phase, drive_layer};

/// The token mixer of a YOCO self-decoder block, recorded under its kind's name.
// One value per block (or per model): the size gap between variants costs nothing worth a Box,
// which burn's Module derive does not support.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum SelfDecoderAttention<B: Backend> {
    /// Sliding-window attention (YOCO-SWA).
    Window(SlidingWindowAttention<B>),
    /// Gated retention (YOCO-gRet).
    Retention(GatedRetention<B>),
}

impl<B: Backend> SelfDecoderAttention<B> {
    /// A short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Window(_) => "sliding-window attention",
            Self::Retention(_) => "gated retention",
        }
    }

    /// An empty state for a batch of `batch`.
    pub fn new_state(&self, batch: usize, device: &B::Device) -> LocalState<B> {
        match self {
            Self::Window(a) => LocalState::Window(a.new_state(batch, device)),
            Self::Retention(a) => LocalState::Recurrent(a.new_state(batch, device)),
        }
    }

    /// Training path over `x` `[b, t, d_model]` at positions `0..t` (retention: chunkwise).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Window(a) => a.forward(x),
            Self::Retention(a) => a.forward(x),
        }
    }
}

impl<B: Backend> CachedAttention<B> for SelfDecoderAttention<B> {
    type State = LocalState<B>;

    fn n_heads(&self) -> usize {
        match self {
            Self::Window(a) => a.n_heads(),
            Self::Retention(a) => a.n_heads(),
        }
    }

    fn forward_cached(
        &self,
        x: Tensor<B, 3>,
        state: &mut LocalState<B>,
        observe: ObserveRequest,
    ) -> Result<AttentionOutput<B>> {
        match (self, state) {
            (Self::Window(a), LocalState::Window(s)) => a.forward_cached(x, s, observe),
            (Self::Retention(a), LocalState::Recurrent(s)) => a.forward_cached(x, s, observe),
            (a, s) => Err(KvError::config(
                format!("{} state", a.name()),
                if matches!(s, LocalState::Window(_)) {
                    "a window cache"
                } else {
                    "a recurrent state"
                },
                "the state its own new_state makes",
            )),
        }
    }
}

/// A block of YOCO's self-decoder.
pub type SelfDecoderBlock<B> = Block<B, SelfDecoderAttention<B>>;
/// A block of YOCO's cross-decoder.
pub type CrossDecoderBlock<B> = Block<B, CrossAttention<B>>;

/// YOCO's decoder-decoder between the embedding and the output head of a [`crate::model::decoder::DecoderLm`].
#[derive(Module, Debug)]
pub struct Yoco<B: Backend> {
    /// The self-decoder: constant-state blocks, all of one kind.
    pub self_decoder: Vec<SelfDecoderBlock<B>>,
    /// The cross-decoder: blocks attending over the one global K/V.
    pub cross_decoder: Vec<CrossDecoderBlock<B>>,
    /// The global K/V projection of the self-decoder's output.
    pub global_kv: GlobalKv<B>,
}

impl<B: Backend> Yoco<B> {
    /// Blocks in both halves.
    pub fn num_blocks(&self) -> usize {
        self.self_decoder.len() + self.cross_decoder.len()
    }

    /// An empty cache: the global cache and one local state per self-decoder block.
    pub fn new_cache(&self, batch: usize, device: &B::Device) -> ModelCache<B> {
        let locals = self
            .self_decoder
            .iter()
            .map(|b| b.attention.new_state(batch, device))
            .collect();
        ModelCache::with_local(vec![self.global_kv.new_state(batch, device).into()], locals)
    }

    /// Checks YOCO's layout: two halves of equal, positive length, the self-decoder all
    /// sliding-window or all retention.
    pub fn check(&self) -> Result<()> {
        let (n_self, n_cross) = (self.self_decoder.len(), self.cross_decoder.len());
        if n_self == 0 || n_self != n_cross {
            return Err(KvError::config(
                "n_layers",
                n_self + n_cross,
                "an even number >= 2 with yoco: half self-decoder, half cross-decoder",
            ));
        }
        let first = &self.self_decoder[0].attention;
        for (i, block) in self.self_decoder.iter().enumerate() {
            if std::mem::discriminant(&block.attention) != std::mem::discriminant(first) {
                return Err(KvError::config(
                    format!("yoco block {i}"),
                    block.attention.name(),
                    format!("{} (as block 0)", first.name()),
                ));
            }
        }
        Ok(())
    }

    /// Training path: the self-decoder in its parallel form over hidden states `h`, the global
    /// K/V of every position, then the cross-decoder with causal attention over it.
    pub fn forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self
            .self_decoder
            .iter()
            .fold(h, |h, block| block.forward_with(h, |a, x| a.forward(x)));
        let (keys, values) = self.global_kv.project(h.clone(), 0);
        self.cross_decoder.iter().fold(h, |h, block| {
            block.forward_with(h, |a, x| a.forward(x, keys.clone(), values.clone()))
        })
    }

    /// Inference path: the new tokens' hidden states `h` pass the self-decoder (updating its
    /// states), their K/V are appended to the global cache once, and the cross-decoder runs for
    /// every position or, with `last_only`, only for the positions whose logits or observations
    /// are needed.
    ///
    /// The policy is asked what to observe in the first cross-decoder layer and acts on the
    /// global cache after the last one, so within a call every cross layer attends over the same
    /// slots (as every layer of a grouped model sees its whole cache during its own call).
    pub fn forward_cached(
        &self,
        mut h: Tensor<B, 3>,
        tokens: &Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
        last_only: bool,
    ) -> Result<Tensor<B, 3>> {
        let n_self = self.self_decoder.len();
        if cache.num_layers() != 1 || cache.num_local() != n_self {
            return Err(KvError::config(
                "cache layout",
                format!(
                    "{} layer caches and {} local states",
                    cache.num_layers(),
                    cache.num_local()
                ),
                format!(
                    "1 global cache and {n_self} self-decoder states (a YOCO model's new_state)"
                ),
            ));
        }
        let t = h.dims()[1];
        let (globals, locals) = cache.parts_mut();
        for (block, state) in self.self_decoder.iter().zip(locals.iter_mut()) {
            h = block.try_forward_with(h, |a, x| {
                a.forward_cached(x, state, ObserveRequest::default())
                    .map(|o| o.output)
            })?;
        }
        let global = &mut globals[0].cache;
        self.global_kv.append(h.clone(), global)?;
        let Some(first) = self.cross_decoder.first() else {
            return Err(KvError::config(
                "yoco cross-decoder",
                0,
                "at least one block",
            ));
        };
        let ctx = LayerContext {
            layer: 0,
            n_layers: 1,
            n_heads: first.attention.n_heads(),
            phase,
            rope: Some(&self.global_kv.rope),
            tokens: Some(tokens),
        };
        // The whole cross-decoder is the "attention" of the one policy-managed cache.
        drive_layer(policy, &ctx, global, |global, request| {
            // Early exit: only the rows someone reads go through the cross-decoder; the first
            // layer also runs the prompt queries the policy observes (H2O: all; SnapKV: its window).
            let rows = if last_only {
                t.min(if request.column_sums || request.band > 0 {
                    t
                } else {
                    request.window.max(1)
                })
            } else {
                t
            };
            if rows < t {
                h = h.narrow(1, t - rows, rows);
            }
            let mut observation = None;
            for (j, block) in self.cross_decoder.iter().enumerate() {
                let observe = if j == 0 {
                    request
                } else {
                    ObserveRequest::default()
                };
                h = block.try_forward_with(h, |a, x| {
                    let out = a.forward_cached(x, global, observe)?;
                    if j == 0 {
                        observation = out.observation;
                    }
                    Ok::<_, KvError>(out.output)
                })?;
                let m = h.dims()[1];
                if last_only && m > 1 {
                    h = h.narrow(1, m - 1, 1);
                }
            }
            Ok((h, observation))
        })
    }
}
