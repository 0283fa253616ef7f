//! The one table of policies: spec parsing, `kv --help`, the evaluation grid and AdaKV's scorer
//! list all read it, and code outside this crate extends it with its own scorers and policies.

use crate::{
    AcrossHeads, CachePolicy, FastGenPolicy, FullCache, H2oScorer, KnormScorer, LayerBudget,
    Params, PolicyEnv, PolicySpec, PyramidBudgets, Schedule, Scorer, Selection, SnapKvScorer,
    SpecParams, StreamingScorer, TopKPolicy, TovaScorer, VatpScorer,
};
use burn::prelude::*;
use kv_core::{Budget, KvError, Result};
use std::sync::Arc;

/// Builds a scorer from the parameters of its spec.
pub type ScorerBuilder<B> = Arc<dyn Fn(&Params<'_>) -> Result<Box<dyn Scorer<B>>> + Send + Sync>;

/// Builds a policy from its whole spec, with the registry (for policies over other entries'
/// scorers) and the environment (the tokenizer's token classes).
pub type PolicyBuilder<B> = Arc<
    dyn Fn(&PolicySpec, &Registry<B>, &PolicyEnv) -> Result<Box<dyn CachePolicy<B>>> + Send + Sync,
>;

/// Parameters every scorer entry takes, read by the top-k policy around it.
pub const TOP_K_KEYS: &[&str] = &["budget", "every", "rerotate", "lazy"];

/// How an entry makes its policy.
#[derive(Clone)]
pub enum EntryKind<B: Backend> {
    /// A scorer, run under [`TopKPolicy`] with the spec's `budget`, `every` and `rerotate`.
    Scorer {
        /// Makes the scorer.
        build: ScorerBuilder<B>,
        /// The schedule when the spec gives no `every`.
        schedule: Schedule,
        /// Whether its scores differ between heads, so a layer-wide selection (AdaKV) can use
        /// them (StreamingLLM's are the same for every head).
        per_head: bool,
    },
    /// A policy with its own decision (full cache, AdaKV, PyramidKV, FastGen).
    Policy {
        /// Makes the policy.
        build: PolicyBuilder<B>,
        /// Whether it sets its own compression, so a budget neither applies to it nor comes
        /// from an evaluation grid's compression axis.
        self_budgeted: bool,
    },
}

/// One named method.
#[derive(Clone)]
pub struct PolicyEntry<B: Backend> {
    /// The name specs use (`h2o`).
    pub name: String,
    /// One line on what it keeps, for `kv --help`.
    pub about: String,
    /// The spec parameters it accepts, for help and error messages.
    pub keys: Vec<String>,
    /// How it is built.
    pub kind: EntryKind<B>,
}

/// The policies specs can name, in the order help lists them.
#[derive(Clone)]
pub struct Registry<B: Backend> {
    entries: Vec<PolicyEntry<B>>,
}

impl<B: Backend> Default for Registry<B> {
    fn default() -> Self {
        Self::standard()
    }
}

fn keys_of(own: &[&str]) -> Vec<String> {
    own.iter().map(|k| k.to_string()).collect()
}

impl<B: Backend> Registry<B> {
    /// A registry with nothing in it.
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Every method this crate implements.
    pub fn standard() -> Self {
        let mut r = Self::empty();
        r.register_policy(
            "full",
            "every slot (the reference)",
            &[],
            true,
            |spec, _, _| {
                spec.params(&[])?;
                Ok(Box::new(FullCache))
            },
        );
        r.register_scorer::<StreamingScorer>(
            "streaming",
            "attention sinks + the most recent tokens; rerotate=true re-rotates the kept keys",
            Schedule::EveryStep,
            false,
        );
        r.register_scorer::<H2oScorer>(
            "h2o",
            "accumulated attention + a recent window",
            Schedule::EveryStep,
            true,
        );
        r.register_scorer::<VatpScorer>(
            "vatp",
            "accumulated attention x value L1 norm, sinks kept",
            Schedule::EveryStep,
            true,
        );
        r.register_scorer::<KnormScorer>(
            "knorm",
            "lowest key L2 norm, first layers skipped",
            Schedule::EveryStep,
            true,
        );
        r.register_scorer::<SnapKvScorer>(
            "snapkv",
            "pooled attention of the last prompt queries, once at prefill",
            Schedule::PrefillOnly,
            true,
        );
        r.register_scorer::<TovaScorer>(
            "tova",
            "the latest query's attention, averaged over the layer's heads",
            Schedule::EveryStep,
            true,
        );
        let pyramid_keys: Vec<&str> = ["every", "rerotate", "lazy"]
            .into_iter()
            .chain(SnapKvScorer::KEYS.iter().copied())
            .chain(["beta"])
            .collect();
        r.register_policy(
            "pyramidkv",
            "SnapKV with per-layer budgets shrinking with depth",
            &pyramid_keys,
            false,
            |spec, r, _| {
                let p = r.top_k_params(spec, &[SnapKvScorer::KEYS, &["beta"]].concat())?;
                let snapkv = SnapKvScorer::from_params(&p)?;
                let beta = p.f32_in("beta", 20.0, 1.0, 1e6)?;
                let mut policy =
                    r.top_k(spec, &p, Schedule::PrefillOnly, Box::new(snapkv.clone()))?;
                policy.layer_budget = LayerBudget::Pyramid(PyramidBudgets {
                    beta,
                    window: snapkv.window,
                });
                Ok(Box::new(policy))
            },
        );
        r.register_policy("adakv", "any scorer (scorer=snapkv), one top-k across a layer's heads: unequal per-head budgets", &["min_share", "scorer"], false, build_adakv);
        r.register_policy("fastgen", "per head, the cheapest of five token-class policies that recovers recover= of its attention", &["recover", "local", "frequent"], true, |spec, _, env| {
            let classes = env.token_classes.clone().ok_or_else(|| KvError::config("fastgen token classes", "none", "the tokenizer's special and punctuation tokens (build_policy_in with PolicyEnv::with_classes)"))?;
            Ok(Box::new(FastGenPolicy::from_spec(spec, classes)?))
        });
        r
    }

    /// Adds a scorer under `name`: specs `name:budget=..,every=..,rerotate=..,<S's keys>` run it
    /// under a per-head [`TopKPolicy`]; AdaKV can use it when `per_head` (its scores differ
    /// between heads). A later entry of the same name replaces an earlier one.
    pub fn register_scorer<S>(
        &mut self,
        name: &str,
        about: &str,
        schedule: Schedule,
        per_head: bool,
    ) -> &mut Self
    where
        S: SpecParams + Scorer<B> + 'static,
    {
        let build: ScorerBuilder<B> =
            Arc::new(|p| Ok(Box::new(S::from_params(p)?) as Box<dyn Scorer<B>>));
        self.insert(PolicyEntry {
            name: name.into(),
            about: about.into(),
            keys: keys_of(&[TOP_K_KEYS, S::KEYS].concat()),
            kind: EntryKind::Scorer {
                build,
                schedule,
                per_head,
            },
        })
    }

    /// Adds a policy under `name` that parses its own spec (`keys` are listed in help).
    pub fn register_policy<F>(
        &mut self,
        name: &str,
        about: &str,
        keys: &[&str],
        self_budgeted: bool,
        build: F,
    ) -> &mut Self
    where
        F: Fn(&PolicySpec, &Registry<B>, &PolicyEnv) -> Result<Box<dyn CachePolicy<B>>>
            + Send
            + Sync
            + 'static,
    {
        let all: Vec<&str> = if self_budgeted {
            keys.to_vec()
        } else {
            ["budget"]
                .iter()
                .copied()
                .chain(keys.iter().copied())
                .collect()
        };
        self.insert(PolicyEntry {
            name: name.into(),
            about: about.into(),
            keys: keys_of(&all),
            kind: EntryKind::Policy {
                build: Arc::new(build),
                self_budgeted,
            },
        })
    }

    fn insert(&mut self, entry: PolicyEntry<B>) -> &mut Self {
        match self.entries.iter_mut().find(|e| e.name == entry.name) {
            Some(old) => *old = entry,
            None => self.entries.push(entry),
        }
        self
    }

    /// Every entry, in registration order.
    pub fn entries(&self) -> &[PolicyEntry<B>] {
        &self.entries
    }

    /// The names specs can use.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The entry called `name`, or an error listing the valid names.
    pub fn entry(&self, name: &str) -> Result<&PolicyEntry<B>> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| KvError::Unknown {
                kind: "policy".into(),
                name: name.into(),
                valid: self.names().join(", "),
            })
    }

    /// Parses a spec and checks that it names a registered policy.
    pub fn parse(&self, spec: &str) -> Result<PolicySpec> {
        let parsed = PolicySpec::parse(spec)?;
        self.entry(&parsed.name)?;
        Ok(parsed)
    }

    /// Whether the policy `name` sets its own compression (no budget, one grid cell).
    pub fn is_self_budgeted(&self, name: &str) -> bool {
        self.entries.iter().any(|e| {
            e.name == name
                && matches!(
                    e.kind,
                    EntryKind::Policy {
                        self_budgeted: true,
                        ..
                    }
                )
        })
    }

    /// Scorers a layer-wide selection can use, `first` (the default) first.
    pub fn per_head_scorers(&self, first: &str) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Scorer { per_head: true, .. }))
            .map(|e| e.name.as_str())
            .collect();
        if let Some(i) = names.iter().position(|n| *n == first) {
            let n = names.remove(i);
            names.insert(0, n);
        }
        names
    }

    /// Builds the policy `spec` names, with its parameters validated.
    pub fn build(&self, spec: &str, env: &PolicyEnv) -> Result<Box<dyn CachePolicy<B>>> {
        let spec = self.parse(spec)?;
        match &self.entry(&spec.name)?.kind {
            EntryKind::Scorer {
                build, schedule, ..
            } => {
                let entry = self.entry(&spec.name)?;
                let own: Vec<&str> = entry
                    .keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !TOP_K_KEYS.contains(k))
                    .collect();
                let p = self.top_k_params(&spec, &own)?;
                let scorer = build(&p)?;
                Ok(Box::new(self.top_k(&spec, &p, *schedule, scorer)?))
            }
            EntryKind::Policy { build, .. } => build(&spec, self, env),
        }
    }

    /// The scorer called `name` built from `params` (which must already be checked against the
    /// keys the caller accepts), or an error naming the scorers there are.
    pub fn build_scorer(
        &self,
        name: &str,
        params: &Params<'_>,
        context: &str,
    ) -> Result<Box<dyn Scorer<B>>> {
        match self
            .entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.kind)
        {
            Some(EntryKind::Scorer { build, .. }) => build(params),
            _ => Err(KvError::config(
                context,
                name,
                format!("one of {}", self.per_head_scorers("snapkv").join(", ")),
            )),
        }
    }

    /// The scorer a scorer entry's spec names (its top-k parameters accepted and ignored), to
    /// read the scores a policy would select by.
    pub fn scorer_from_spec(&self, spec: &str) -> Result<Box<dyn Scorer<B>>> {
        let spec = self.parse(spec)?;
        let p = self.top_k_params(&spec, &self.scorer_keys(&spec.name))?;
        self.build_scorer(&spec.name, &p, "scorer")
    }

    /// The keys of the scorer entry `name` besides the top-k ones.
    pub fn scorer_keys(&self, name: &str) -> Vec<&str> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map_or_else(Vec::new, |e| {
                e.keys
                    .iter()
                    .map(String::as_str)
                    .filter(|k| !TOP_K_KEYS.contains(k))
                    .collect()
            })
    }

    /// `spec`'s parameters, allowing the top-k keys and `own`.
    pub fn top_k_params<'a>(&self, spec: &'a PolicySpec, own: &[&str]) -> Result<Params<'a>> {
        spec.params(&[TOP_K_KEYS, own].concat())
    }

    /// A per-head top-k policy over `scorer` with `p`'s budget (default half), schedule
    /// (default `schedule`), re-rotation (default off) and lazy eviction (default on).
    pub fn top_k(
        &self,
        spec: &PolicySpec,
        p: &Params<'_>,
        schedule: Schedule,
        scorer: Box<dyn Scorer<B>>,
    ) -> Result<TopKPolicy<B>> {
        let mut policy = TopKPolicy::new(
            spec.name.clone(),
            p.budget("budget", Budget::Ratio(0.5))?,
            p.schedule(schedule)?,
            scorer,
        );
        policy.rerotate = p.bool("rerotate", false)?;
        policy.lazy = p.bool("lazy", true)?;
        Ok(policy)
    }

    /// A Markdown-free table of the entries for `--help`: name, parameters, what it keeps.
    pub fn help(&self) -> String {
        let width = self.entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
        self.entries
            .iter()
            .map(|e| {
                let keys = if e.keys.is_empty() {
                    "no parameters".to_string()
                } else {
                    e.keys.join(",")
                };
                format!("  {:width$}  {}  [{}]", e.name, e.about, keys)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `adakv:budget=0.5,min_share=0.2,scorer=snapkv,<the scorer's own parameters>`.
fn build_adakv<B: Backend>(
    spec: &PolicySpec,
    r: &Registry<B>,
    _: &PolicyEnv,
) -> Result<Box<dyn CachePolicy<B>>> {
    if let Some((_, every)) = spec.pairs().find(|(k, _)| *k == "every") {
        return Err(KvError::config(
            "adakv:every",
            every,
            "no schedule: AdaKV compresses once, at the end of prefill",
        ));
    }
    let scorer_name = spec
        .pairs()
        .find(|(k, _)| *k == "scorer")
        .map_or("snapkv", |(_, v)| v)
        .to_string();
    let scorers = r.per_head_scorers("snapkv");
    if !scorers.contains(&scorer_name.as_str()) {
        return Err(KvError::config(
            "adakv:scorer",
            &scorer_name,
            format!("one of {}", scorers.join(", ")),
        ));
    }
    let allowed: Vec<&str> = ["budget", "min_share", "scorer"]
        .into_iter()
        .chain(r.scorer_keys(&scorer_name))
        .collect();
    let p = spec.params(&allowed)?;
    let budget = p.budget("budget", Budget::Ratio(0.5))?;
    let min_share = p.f32_in("min_share", 0.2, 0.0, 1.0)?;
    let scorer = r.build_scorer(&scorer_name, &p, "adakv:scorer")?;
    let mut policy = TopKPolicy::new("adakv", budget, Schedule::PrefillOnly, scorer);
    policy.selection = Selection::AcrossHeads(AcrossHeads { min_share });
    Ok(Box::new(policy))
}
