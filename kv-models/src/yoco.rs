//! YOCO's paths through a [`DecoderLm`]: a self-decoder of constant-state blocks, one global K/V
//! computed from its output, and a cross-decoder whose layers all read that one cache.
//!
//! Cache layout ([`ModelCache`]): layer cache 0 is the global K/V, the only cache policies see
//! (so every kv-policies policy applies to it unchanged); local cache `j` is the window of the
//! `j`-th sliding-window block; state `retention.{i}` is block `i`'s retention state.

use crate::{BlockKind, DecoderLm};
use burn::prelude::*;
use kv_attention::{GlobalKv, ObserveRequest};
use kv_core::{KvError, LayerCache, ModelCache, Result};
use kv_policies::{CachePolicy, LayerContext, Phase, drive_layer};

/// Name of block `i`'s retention state in the model cache.
pub fn retention_state_name(block: usize) -> String {
    format!("retention.{block}")
}

impl<B: Backend> DecoderLm<B> {
    /// The self-decoder's blocks (the first half).
    fn self_decoder(&self) -> &[crate::DecoderBlock<B>] {
        &self.blocks[..self.blocks.len() / 2]
    }

    /// The cross-decoder's blocks (the second half).
    fn cross_decoder(&self) -> &[crate::DecoderBlock<B>] {
        &self.blocks[self.blocks.len() / 2..]
    }

    /// An empty YOCO cache: the global cache and one window cache per sliding-window block.
    pub(crate) fn yoco_cache(&self, global: &GlobalKv<B>, batch: usize) -> ModelCache<B> {
        let device = self.embed.weight.device();
        let windows = self.self_decoder().iter().filter_map(|b| b.swa.as_ref()).map(|a| LayerCache::new(a.cache_shape(batch), &device)).collect();
        ModelCache::with_local(vec![LayerCache::new(global.cache_shape(batch), &device)], windows)
    }

    /// Checks YOCO's layout: an even number of blocks, the first half all sliding-window or all
    /// retention, the second half all cross-attention.
    pub(crate) fn check_yoco_blocks(&self) -> Result<()> {
        let n = self.blocks.len();
        if n < 2 || n % 2 != 0 {
            return Err(KvError::config("n_layers", n, "an even number >= 2 with yoco: half self-decoder, half cross-decoder"));
        }
        let first = self.blocks[0].kind()?;
        for (i, block) in self.blocks.iter().enumerate() {
            let kind = block.kind()?;
            let fits = if i < n / 2 {
                matches!((kind, first), (BlockKind::Window(_), BlockKind::Window(_)) | (BlockKind::Retention(_), BlockKind::Retention(_)))
            } else {
                matches!(kind, BlockKind::Cross(_))
            };
            if !fits {
                let want = if i < n / 2 { format!("{} (as block 0)", first.name()) } else { "cross-attention".to_string() };
                return Err(KvError::config(format!("yoco block {i}"), kind.name(), want));
            }
        }
        Ok(())
    }

    /// Training path: the self-decoder in its parallel form, the global K/V of every position,
    /// then the cross-decoder with causal attention over it.
    pub(crate) fn yoco_forward(&self, global: &GlobalKv<B>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut h = self.embed_inputs(tokens, None);
        for block in self.self_decoder() {
            let x = block.attn_norm.forward(h.clone());
            // Blocks of another kind only come from hand-assembled models (load_model checks the
            // layout); they add no attention rather than panicking here.
            match block.kind() {
                Ok(BlockKind::Window(a)) => h = h + a.forward(x),
                Ok(BlockKind::Retention(a)) => h = h + a.forward(x),
                _ => {}
            }
            h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
        }
        let (keys, values) = global.project(h.clone(), 0);
        for block in self.cross_decoder() {
            if let Ok(BlockKind::Cross(a)) = block.kind() {
                h = h.clone() + a.forward(block.attn_norm.forward(h), keys.clone(), values.clone());
            }
            h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
        }
        self.head(h)
    }

    /// Inference path: the new tokens pass the self-decoder (updating windows and states), their
    /// K/V are appended to the global cache once, and the cross-decoder runs for every position
    /// or, with `last_only`, only for the positions whose logits or observations are needed.
    ///
    /// The policy is asked what to observe in the first cross-decoder layer and acts on the
    /// global cache after the last one, so within a call every cross layer attends over the same
    /// slots (as every layer of a grouped model sees its whole cache during its own call).
    pub(crate) fn yoco_forward_cached(
        &self,
        global: &GlobalKv<B>,
        tokens: Tensor<B, 2, Int>,
        cache: &mut ModelCache<B>,
        policy: &mut dyn CachePolicy<B>,
        phase: Phase,
        last_only: bool,
    ) -> Result<Tensor<B, 3>> {
        let windows = self.self_decoder().iter().filter(|b| b.swa.is_some()).count();
        if cache.num_layers() != 1 || cache.num_local() != windows {
            return Err(KvError::config(
                "cache layout",
                format!("{} layer caches and {} window caches", cache.num_layers(), cache.num_local()),
                format!("1 global cache and {windows} window caches (a YOCO model's new_cache)"),
            ));
        }
        let t = tokens.dims()[1];
        if t == 0 {
            return Err(KvError::config("new tokens", 0, "at least 1"));
        }
        let start = cache.tokens_seen();
        let mut h = self.embed_continuing(tokens.clone(), cache);
        let mut window = 0;
        for (i, block) in self.self_decoder().iter().enumerate() {
            let x = block.attn_norm.forward(h.clone());
            let out = match block.kind()? {
                BlockKind::Window(a) => {
                    window += 1;
                    a.forward_cached(x, cache.local_mut(window - 1))?.output
                }
                BlockKind::Retention(a) => {
                    let name = retention_state_name(i);
                    let (out, state) = a.forward_cached(x, start, cache.state(&name).cloned())?;
                    cache.set_state(&name, state);
                    out
                }
                other => return Err(KvError::config(format!("yoco block {i}"), other.name(), "sliding-window attention or gated retention")),
            };
            h = h + out;
            h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
        }
        global.append(h.clone(), cache.layer_mut(0))?;
        let cross_layers = self.cross_decoder();
        let n_heads = match cross_layers.first().map(|b| b.kind()).transpose()? {
            Some(BlockKind::Cross(a)) => a.n_heads(),
            _ => return Err(KvError::config("yoco block", self.blocks.len() / 2, "a cross-attention block")),
        };
        let ctx = LayerContext { layer: 0, n_layers: 1, n_heads, phase, rope: Some(&global.rope), tokens: Some(&tokens) };
        // The whole cross-decoder is the "attention" of the one policy-managed cache.
        let h = drive_layer(policy, &ctx, cache.layer_mut(0), |global_cache, request| {
            // Early exit: only the rows someone reads go through the cross-decoder; the first
            // layer also runs the prompt queries the policy observes (H2O: all; SnapKV: its window).
            let rows = if last_only { t.min(if request.column_sums || request.band > 0 { t } else { request.window.max(1) }) } else { t };
            if rows < t {
                h = h.narrow(1, t - rows, rows);
            }
            let mut observation = None;
            for (j, block) in cross_layers.iter().enumerate() {
                let BlockKind::Cross(a) = block.kind()? else {
                    return Err(KvError::config(format!("yoco block {}", self.blocks.len() / 2 + j), block.kind()?.name(), "cross-attention"));
                };
                let observe = if j == 0 { request } else { ObserveRequest::default() };
                let out = a.forward_cached(block.attn_norm.forward(h.clone()), global_cache, observe)?;
                if j == 0 {
                    observation = out.observation;
                }
                h = h + out.output;
                h = h.clone() + block.ffn.forward(block.ffn_norm.forward(h));
                let m = h.dims()[1];
                if last_only && m > 1 {
                    h = h.narrow(1, m - 1, 1);
                }
            }
            Ok((h, observation))
        })?;
        Ok(self.head(h))
    }
}
