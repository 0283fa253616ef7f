//! FastGen (Ge et al., "Model Tells You What to Discard", ICLR 2024): every (layer, KV head)
//! profiles the prompt's attention and picks the cheapest of five hybrid policies that recovers
//! enough of it, then keeps applying that policy to the tokens it generates.
//!
//! The recovery rule is the mass-coverage form (cold-compress's `profile_attn_heads`,
//! docs/techniques.md, FastGen): `recovered(C) = mean over prompt queries of the attention mass on the keys
//! C keeps for that query`, without renormalisation, and a head takes the first `C` in FastGen's
//! order with `recovered(C) >= recover`. The paper's `|A - softmax(Q K_C^T)| <= 1 - T` leaves its
//! norm open; mass coverage is the form its threshold reads naturally in (L1 with renormalisation
//! would be `2 (1 - mass)`), and it is computed exactly from two per-key sums the attention
//! accumulates block by block, so no `[t, t]` map is ever held:
//! - the static classes (special, punctuation, frequent) keep a key for every query, so their
//!   mass is the key's column sum;
//! - the local class keeps, for the query at `p`, the keys at `p - local + 1 ..= p`, so its mass
//!   on a key outside the static classes is the key's band sum (its attention from the `local`
//!   queries at or after it).
//!
//! With GQA a KV head is profiled on its group's mean map (the paper evaluated MHA only).
//!
//! **Decode-time ranking** of the frequent class follows cold-compress (`KVCacheHybrid` over
//! `KVCacheHeavyHitter`): every new token is admitted, and a ranked head keeps the slots with the
//! highest *mean* attention per record, where the prompt counts as one record (its attention
//! averaged over the prompt's queries) and each decode query as one more. A generated token
//! that keeps drawing attention then competes on equal terms with prompt tokens, which a sum
//! since prefill (H2O's score) would bury under hundreds of prompt queries. cold-compress forgets
//! records older than 400 decode steps (`history_window_size`), which needs a `[slots, 400]`
//! history per head; here a slot averages every record since it arrived, which is the same rule
//! for the first 400 generated tokens and needs one running sum per slot.

use crate::select::group_sum;
use crate::{CachePolicy, LayerContext, Phase, PolicySpec};
use burn::prelude::*;
use kv_core::readback::ReadBack;
use kv_core::{KvError, LayerCache, Observation, ObserveRequest, Result};
use std::sync::Arc;

/// Side channel holding each slot's attention records summed (the prompt's mean over its queries,
/// then each decode query's; summed over the GQA group), which the frequent class ranks by at
/// decode once divided by the slot's number of records ([`fastgen_records`]).
pub const FASTGEN_ACC: &str = "fastgen.acc";

/// How many attention records a slot at `position` holds after `seen` tokens, when the prompt
/// ended at `prompt_end`: one for the whole prompt (its mean), then one per decode query at or
/// after the slot.
pub fn fastgen_records(position: usize, prompt_end: usize, seen: usize) -> usize {
    if position < prompt_end {
        1 + seen - prompt_end
    } else {
        seen - position
    }
}

const SPECIAL: u8 = 1;
const PUNCT: u8 = 2;

/// Which token ids are special (BOS/EOS, chat markers, control tokens) and which are
/// punctuation (their text is only punctuation and whitespace): FastGen's two cheapest classes,
/// computed once per tokenizer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenClasses {
    flags: Vec<u8>,
}

impl TokenClasses {
    /// Classes for a vocabulary of `vocab` ids from the ids of its special and punctuation tokens
    /// (an id in both is special; ids at or above `vocab` are ignored).
    pub fn new(
        vocab: usize,
        special: impl IntoIterator<Item = u32>,
        punct: impl IntoIterator<Item = u32>,
    ) -> Self {
        let mut flags = vec![0u8; vocab];
        for (ids, flag) in [
            (punct.into_iter().collect::<Vec<_>>(), PUNCT),
            (special.into_iter().collect(), SPECIAL),
        ] {
            for id in ids {
                if let Some(f) = flags.get_mut(id as usize) {
                    *f = flag;
                }
            }
        }
        Self { flags }
    }

    /// Classes of a tokenizer given as `(id, text)` pairs and its special ids: a token is
    /// punctuation when its text is non-empty and only punctuation and whitespace.
    pub fn from_texts<'a>(
        vocab: usize,
        texts: impl IntoIterator<Item = (u32, &'a str)>,
        special: impl IntoIterator<Item = u32>,
    ) -> Self {
        let punct: Vec<u32> = texts
            .into_iter()
            .filter(|(_, text)| is_punctuation_text(text))
            .map(|(id, _)| id)
            .collect();
        Self::new(vocab, special, punct)
    }

    /// The byte tokenizer's classes: control bytes (other than whitespace) are special, ASCII
    /// punctuation and whitespace bytes are punctuation.
    pub fn bytes() -> Self {
        let special = (0u32..32)
            .filter(|b| !(*b as u8).is_ascii_whitespace())
            .chain([127]);
        let punct = (0u32..128)
            .filter(|b| (*b as u8).is_ascii_punctuation() || (*b as u8).is_ascii_whitespace());
        Self::new(256, special, punct)
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.flags.get(id as usize).is_some_and(|f| *f == SPECIAL)
    }

    /// Whether `id` is a punctuation token.
    pub fn is_punct(&self, id: u32) -> bool {
        self.flags.get(id as usize).is_some_and(|f| *f == PUNCT)
    }

    /// How many ids are special and how many punctuation.
    pub fn counts(&self) -> (usize, usize) {
        (
            self.flags.iter().filter(|f| **f == SPECIAL).count(),
            self.flags.iter().filter(|f| **f == PUNCT).count(),
        )
    }

    fn flag(&self, id: u32) -> u8 {
        self.flags.get(id as usize).copied().unwrap_or(0)
    }
}

/// Whether a token's text is only punctuation and whitespace (and not empty).
pub fn is_punctuation_text(text: &str) -> bool {
    const WIDE: &str = "\u{2018}\u{2019}\u{201c}\u{201d}\u{2013}\u{2014}\u{2026}\u{00ab}\u{00bb}\u{00bf}\u{00a1}\u{00b7}";
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_punctuation() || c.is_whitespace() || WIDE.contains(c))
}

/// One of FastGen's hybrid policies, in its order (cheapest first); each keeps what the ones
/// before it keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HeadPolicy {
    /// Special tokens only.
    Special,
    /// Special and punctuation tokens.
    Punct,
    /// Plus the `frequent` slots with the most accumulated attention.
    Frequent,
    /// Plus the `local` most recent tokens.
    Local,
    /// Every token.
    Full,
}

impl HeadPolicy {
    /// The five policies in FastGen's order.
    pub const ORDER: [HeadPolicy; 5] = [
        HeadPolicy::Special,
        HeadPolicy::Punct,
        HeadPolicy::Frequent,
        HeadPolicy::Local,
        HeadPolicy::Full,
    ];

    /// The paper's name for it.
    pub fn name(&self) -> &'static str {
        match self {
            HeadPolicy::Special => "special",
            HeadPolicy::Punct => "special+punct",
            HeadPolicy::Frequent => "special+punct+frequent",
            HeadPolicy::Local => "special+punct+frequent+local",
            HeadPolicy::Full => "full",
        }
    }

    fn keeps_punct(self) -> bool {
        self >= HeadPolicy::Punct
    }

    /// Whether the policy ranks slots by accumulated attention (the frequent class).
    fn ranks(self) -> bool {
        matches!(self, HeadPolicy::Frequent | HeadPolicy::Local)
    }
}

/// What profiling chose for one (batch row, KV head).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadProfile {
    /// The chosen policy.
    pub policy: HeadPolicy,
    /// The attention mass each of the five policies recovers, in [`HeadPolicy::ORDER`].
    pub recovered: [f32; 5],
}

/// Profiles one head: `column[j]` and `band[j]` are key `j`'s attention summed over the
/// `queries` prompt queries and over the ones within the local band after it, `flags[j]` its
/// class; `frequent` keys join the frequent class, taken (as decode takes them) from outside the
/// local window when the local class is there too. Returns the choice and the slots it keeps
/// right after the prompt (the local class: the last `local` slots).
pub fn profile_head(
    column: &[f32],
    band: &[f32],
    flags: &[u8],
    queries: usize,
    recover: f32,
    frequent: usize,
    local: usize,
) -> (HeadProfile, Vec<usize>) {
    let n = column.len();
    let q = queries.max(1) as f64;
    let mass = |keep: &[bool]| {
        (0..n)
            .filter(|&j| keep[j])
            .map(|j| column[j] as f64)
            .sum::<f64>()
            / q
    };
    let special: Vec<bool> = flags.iter().map(|f| *f == SPECIAL).collect();
    let punct: Vec<bool> = flags.iter().map(|f| *f != 0).collect();
    let mut freq = punct.clone();
    let mut rest: Vec<usize> = (0..n).filter(|&j| !punct[j]).collect();
    // Highest column sum first; ties go to the later key, as the newest tokens matter most.
    rest.sort_by(|&a, &b| column[b].total_cmp(&column[a]).then(b.cmp(&a)));
    rest.iter().take(frequent).for_each(|&j| freq[j] = true);
    // With the local class, the frequent keys are the best of those the window will not hold.
    let mut freq_outside = punct.clone();
    rest.iter()
        .filter(|&&j| j + local < n)
        .take(frequent)
        .for_each(|&j| freq_outside[j] = true);
    let local_mass = (mass(&freq_outside)
        + (0..n)
            .filter(|&j| !freq_outside[j])
            .map(|j| band[j] as f64)
            .sum::<f64>()
            / q) as f32;
    let recovered = [
        mass(&special) as f32,
        mass(&punct) as f32,
        mass(&freq) as f32,
        local_mass,
        1.0,
    ];
    // T = 1 asks for everything: only the full cache is certain to recover all of it.
    let policy = HeadPolicy::ORDER
        .into_iter()
        .zip(recovered)
        .find(|(p, r)| *p == HeadPolicy::Full || (recover < 1.0 && *r >= recover))
        .map(|(p, _)| p)
        .unwrap_or(HeadPolicy::Full);
    let keep: Vec<usize> = match policy {
        HeadPolicy::Special => (0..n).filter(|&j| special[j]).collect(),
        HeadPolicy::Punct => (0..n).filter(|&j| punct[j]).collect(),
        HeadPolicy::Frequent => (0..n).filter(|&j| freq[j]).collect(),
        HeadPolicy::Local => (0..n)
            .filter(|&j| freq_outside[j] || j + local >= n)
            .collect(),
        HeadPolicy::Full => (0..n).collect(),
    };
    (HeadProfile { policy, recovered }, keep)
}

/// The slots a head keeps after new tokens arrived: every slot of its classes, the `local`
/// newest positions when its policy has the local class, and of the rest the `frequent` with the
/// highest `scores` when it has the frequent class. `positions` are the slots' original
/// positions (ascending), `flags` their classes, `seen` the tokens seen.
pub fn admit(
    policy: HeadPolicy,
    positions: &[usize],
    flags: &[u8],
    scores: Option<&[f32]>,
    seen: usize,
    frequent: usize,
    local: usize,
) -> Vec<usize> {
    let n = positions.len();
    if policy == HeadPolicy::Full {
        return (0..n).collect();
    }
    let mut keep: Vec<bool> = flags
        .iter()
        .map(|f| *f == SPECIAL || (policy.keeps_punct() && *f != 0))
        .collect();
    if policy == HeadPolicy::Local {
        (0..n)
            .filter(|&j| positions[j] + local >= seen)
            .for_each(|j| keep[j] = true);
    }
    if policy >= HeadPolicy::Frequent {
        let mut rest: Vec<usize> = (0..n).filter(|&j| !keep[j]).collect();
        if let Some(s) = scores {
            rest.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(b.cmp(&a)));
        }
        rest.into_iter().take(frequent).for_each(|j| keep[j] = true);
    }
    (0..n).filter(|&j| keep[j]).collect()
}

/// A layer's profile: per (batch row, KV head), the policy, the positions it holds, the class
/// sizes it was given and where the prompt ended.
#[derive(Debug, Clone)]
struct LayerPlan {
    heads: Vec<HeadProfile>,
    held: Vec<Vec<usize>>,
    frequent: usize,
    local: usize,
    prompt_end: usize,
}

/// FastGen: profiles every (layer, KV head) at prefill and applies each head's policy to every
/// token after; heads keep unequal numbers of slots, in ragged storage, so the bytes shrink.
#[derive(Debug, Clone)]
pub struct FastGenPolicy {
    /// Attention mass a head's policy must recover (the paper's `T`, 0.91-0.98 in its sweeps).
    pub recover: f32,
    /// The local class's window, as a share of the prompt (`r_l`, 0.3).
    pub local: f32,
    /// The frequent class's size, as a share of the prompt (`r_f`, 0.3).
    pub frequent: f32,
    classes: Arc<TokenClasses>,
    plans: Vec<Option<LayerPlan>>,
    /// Classes of the tokens seen, per batch row, by position.
    seen_flags: Vec<Vec<u8>>,
    /// The first layer a prefill reaches (the model's first KV layer): each prefill call reads
    /// its tokens there, even if an earlier generation left flags of the same length.
    first_layer: Option<usize>,
}

impl FastGenPolicy {
    /// A policy that recovers `recover` of each head's attention with the tokenizer's `classes`.
    pub fn new(recover: f32, local: f32, frequent: f32, classes: Arc<TokenClasses>) -> Self {
        Self {
            recover,
            local,
            frequent,
            classes,
            plans: Vec::new(),
            seen_flags: Vec::new(),
            first_layer: None,
        }
    }

    /// Parses `fastgen:recover=0.95,local=0.3,frequent=0.3`.
    pub fn from_spec(spec: &PolicySpec, classes: Arc<TokenClasses>) -> Result<Self> {
        let p = spec.params(&["recover", "local", "frequent"])?;
        let recover = p.f32_in("recover", 0.95, 0.0, 1.0)?;
        if recover <= 0.0 {
            return Err(KvError::config(
                "fastgen:recover",
                recover,
                "a share of attention in (0, 1]",
            ));
        }
        Ok(Self::new(
            recover,
            p.f32_in("local", 0.3, 0.0, 1.0)?,
            p.f32_in("frequent", 0.3, 0.0, 1.0)?,
            classes,
        ))
    }

    /// What profiling chose, per layer (`None` for layers not profiled), per (batch row, KV head).
    pub fn profiles(&self) -> Vec<Option<Vec<HeadProfile>>> {
        self.plans
            .iter()
            .map(|p| p.as_ref().map(|p| p.heads.clone()))
            .collect()
    }

    fn class_sizes(&self, prompt: usize) -> (usize, usize) {
        (
            (self.frequent * prompt as f32).round() as usize,
            (self.local * prompt as f32).round() as usize,
        )
    }

    /// Records the classes of this call's tokens: one read per call, at the first layer it reaches.
    fn note_tokens<B: Backend>(&mut self, ctx: &LayerContext<'_, B>, seen: usize) -> Result<()> {
        let tokens = ctx.tokens.ok_or_else(|| {
            KvError::config(
                "fastgen token ids",
                "none",
                "the token ids of each call (LayerContext::tokens)",
            )
        })?;
        let [b, t] = tokens.dims();
        let first =
            ctx.phase == Phase::Prefill && self.first_layer.is_none_or(|first| ctx.layer <= first);
        if ctx.phase == Phase::Prefill {
            self.first_layer = Some(self.first_layer.map_or(ctx.layer, |f| f.min(ctx.layer)));
        }
        if !first && self.seen_flags.len() == b && self.seen_flags.iter().all(|f| f.len() == seen) {
            return Ok(());
        }
        let ids: Vec<i64> = tokens
            .clone()
            .read_back()
            .convert::<i64>()
            .iter::<i64>()
            .collect();
        self.seen_flags.resize(b, Vec::new());
        for (row, flags) in self.seen_flags.iter_mut().enumerate() {
            flags.truncate(seen - t);
            flags.resize(seen - t, 0);
            flags.extend(
                ids[row * t..(row + 1) * t]
                    .iter()
                    .map(|&id| self.classes.flag(id as u32)),
            );
        }
        Ok(())
    }

    fn profile_layer<B: Backend>(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        let queries = ctx.tokens.map_or(cache.slots(), |t| t.dims()[1]);
        let (frequent, local) = self.class_sizes(queries);
        let missing = || {
            KvError::config(
                "fastgen observation",
                "none",
                "attention column and band sums at prefill (the model ignored the policy's request)",
            )
        };
        let obs = obs.ok_or_else(missing)?;
        let (column, band) = (
            obs.column_sums.clone().ok_or_else(missing)?,
            obs.band_sums.clone(),
        );
        if local > 0 && (band.is_none() || obs.band != local) {
            return Err(KvError::config(
                "fastgen band sums",
                obs.band,
                format!("a band of {local} (the local class), observed at prefill"),
            ));
        }
        let CacheShape { kv_heads, .. } = cache.shape();
        let group = (ctx.n_heads / kv_heads).max(1) as f64;
        let column = group_sum(column, kv_heads);
        let band = band.map(|b| group_sum(b, kv_heads));
        // Column and band sums in one read: `[b, kv, n]` each, side by side.
        let n = cache.slots();
        let sums = match &band {
            Some(band) => Tensor::cat(vec![column.clone(), band.clone()], 2),
            None => column.clone(),
        };
        let sums: Vec<f32> = sums
            .div_scalar(group)
            .read_back()
            .convert::<f32>()
            .iter::<f32>()
            .collect();
        let width = sums.len() / (cache.shape().batch * kv_heads).max(1);
        let col: Vec<f32> = sums.chunks(width).flat_map(|r| r[..n].to_vec()).collect();
        let bnd: Option<Vec<f32>> = band
            .as_ref()
            .map(|_| sums.chunks(width).flat_map(|r| r[n..].to_vec()).collect());
        let positions: Vec<i64> = cache
            .positions()
            .read_back()
            .convert::<i64>()
            .iter::<i64>()
            .collect();
        let mut heads = Vec::new();
        let mut keep = Vec::new();
        let mut held = Vec::new();
        for i in 0..cache.shape().batch * kv_heads {
            let flags: Vec<u8> = positions[i * n..(i + 1) * n]
                .iter()
                .map(|&p| self.seen_flags[i / kv_heads][p as usize])
                .collect();
            let zeros = vec![0.0; n];
            let band_i = bnd.as_ref().map_or(&zeros[..], |b| &b[i * n..(i + 1) * n]);
            let (profile, kept) = profile_head(
                &col[i * n..(i + 1) * n],
                band_i,
                &flags,
                queries,
                self.recover,
                frequent,
                local,
            );
            heads.push(profile);
            held.push(
                kept.iter()
                    .map(|&j| positions[i * n + j] as usize)
                    .collect(),
            );
            keep.push(kept);
        }
        // The prompt is one record: each key's attention averaged over the prompt's queries.
        cache.add_side(FASTGEN_ACC);
        cache.set_side(FASTGEN_ACC, column.div_scalar(queries.max(1) as f64))?;
        if self.plans.len() <= ctx.layer {
            self.plans.resize(ctx.layer + 1, None);
        }
        self.plans[ctx.layer] = Some(LayerPlan {
            heads,
            held,
            frequent,
            local,
            prompt_end: cache.tokens_seen(),
        });
        cache.retain_per_head(&keep)
    }

    fn decode_layer<B: Backend>(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        let not_profiled = || {
            KvError::config(
                format!("fastgen layer {}", ctx.layer),
                "not profiled",
                "a prefill first: FastGen profiles each head on the prompt",
            )
        };
        let plan = self
            .plans
            .get_mut(ctx.layer)
            .and_then(Option::as_mut)
            .ok_or_else(not_profiled)?;
        let kv_heads = cache.shape().kv_heads;
        let seen = cache.tokens_seen();
        if plan.heads.iter().any(|h| h.policy.ranks()) {
            accumulate(cache, obs, kv_heads)?;
        }
        let t = ctx.tokens.map_or(1, |x| x.dims()[1]);
        // Positions are tracked on the host (appends are the newest, retains are ours), so only
        // the ranked heads' accumulated scores come from the device: all of them in one read per
        // layer, since each head keeps its own number of slots and its choice needs the numbers.
        let ranked: Vec<usize> = (0..plan.heads.len())
            .filter(|&i| plan.heads[i].policy.ranks())
            .collect();
        let mut sums: Vec<Option<Vec<f32>>> = vec![None; plan.heads.len()];
        if !ranked.is_empty() {
            let mut sides = Vec::with_capacity(ranked.len());
            for &i in &ranked {
                let side = match cache.head_caches() {
                    Some(hs) => hs[i].side(FASTGEN_ACC)?,
                    None => cache.side(FASTGEN_ACC)?.narrow(0, i / kv_heads, 1).narrow(
                        1,
                        i % kv_heads,
                        1,
                    ),
                };
                let n = side.dims()[2];
                sides.push(side.reshape([n]));
            }
            let lens: Vec<usize> = sides.iter().map(|s| s.dims()[0]).collect();
            let all: Vec<f32> = Tensor::cat(sides, 0)
                .read_back()
                .convert::<f32>()
                .iter::<f32>()
                .collect();
            let mut at = 0;
            for (&i, &n) in ranked.iter().zip(&lens) {
                sums[i] = Some(all[at..at + n].to_vec());
                at += n;
            }
        }
        let mut keep = Vec::with_capacity(plan.heads.len());
        let mut changed = false;
        for (i, head) in plan.heads.iter().enumerate() {
            let held = &mut plan.held[i];
            held.extend(seen - t..seen);
            let scores = sums[i].as_ref().map(|sums| {
                sums.iter()
                    .zip(held.iter())
                    .map(|(&sum, &p)| sum / fastgen_records(p, plan.prompt_end, seen) as f32)
                    .collect::<Vec<f32>>()
            });
            let flags: Vec<u8> = held
                .iter()
                .map(|&p| self.seen_flags[i / kv_heads][p])
                .collect();
            let kept = admit(
                head.policy,
                held,
                &flags,
                scores.as_deref(),
                seen,
                plan.frequent,
                plan.local,
            );
            if kept.len() < held.len() {
                changed = true;
                *held = kept.iter().map(|&j| held[j]).collect();
            }
            keep.push(kept);
        }
        if changed {
            cache.retain_per_head(&keep)
        } else {
            Ok(())
        }
    }
}

use kv_core::CacheShape;

/// Adds this call's column sums (summed over each GQA group) to every slot's accumulated score,
/// head by head when storage is ragged.
fn accumulate<B: Backend>(
    cache: &mut LayerCache<B>,
    obs: Option<&Observation<B>>,
    kv_heads: usize,
) -> Result<()> {
    let missing = || {
        KvError::config(
            "fastgen observation",
            "none",
            "attention column sums at decode (the model ignored the policy's request)",
        )
    };
    let obs = obs.ok_or_else(missing)?;
    match cache.head_caches_mut() {
        Some(heads) => {
            let per_head = obs.heads.as_ref().ok_or_else(missing)?;
            for (h, o) in heads.iter_mut().zip(per_head) {
                let sums = o.column_sums.clone().ok_or_else(missing)?;
                let acc = h.side(FASTGEN_ACC)? + group_sum(sums, 1);
                h.set_side(FASTGEN_ACC, acc)?;
            }
        }
        None => {
            let sums = obs.column_sums.clone().ok_or_else(missing)?;
            let acc = cache.side(FASTGEN_ACC)? + group_sum(sums, kv_heads);
            cache.set_side(FASTGEN_ACC, acc)?;
        }
    }
    Ok(())
}

impl<B: Backend> CachePolicy<B> for FastGenPolicy {
    fn name(&self) -> String {
        format!(
            "fastgen(recover={},local={},frequent={})",
            self.recover, self.local, self.frequent
        )
    }

    fn observe_request(&self, ctx: &LayerContext<'_, B>) -> ObserveRequest {
        match ctx.phase {
            Phase::Prefill => {
                let prompt = ctx.tokens.map_or(0, |t| t.dims()[1]);
                ObserveRequest {
                    column_sums: true,
                    band: self.class_sizes(prompt).1,
                    ..Default::default()
                }
            }
            Phase::Decode { .. } => {
                let ranks = self
                    .plans
                    .get(ctx.layer)
                    .and_then(|p| p.as_ref())
                    .is_some_and(|p| p.heads.iter().any(|h| h.policy.ranks()));
                ObserveRequest {
                    column_sums: ranks,
                    ..Default::default()
                }
            }
        }
    }

    fn head_choices(&self) -> Vec<Vec<String>> {
        self.plans
            .iter()
            .map(|p| {
                p.as_ref().map_or_else(Vec::new, |p| {
                    p.heads
                        .iter()
                        .map(|h| h.policy.name().to_string())
                        .collect()
                })
            })
            .collect()
    }

    fn after_attention(
        &mut self,
        ctx: &LayerContext<'_, B>,
        cache: &mut LayerCache<B>,
        obs: Option<&Observation<B>>,
    ) -> Result<()> {
        let seen = cache.tokens_seen();
        self.note_tokens(ctx, seen)?;
        match ctx.phase {
            Phase::Prefill => self.profile_layer(ctx, cache, obs),
            Phase::Decode { .. } => self.decode_layer(ctx, cache, obs),
        }
    }
}
