//! Policy specs: one string syntax for the CLI and config files, e.g.
//! `snapkv:budget=0.5,window=32,kernel=7,pool=max`.

use crate::{CachePolicy, Registry, Schedule, TokenClasses};
use burn::prelude::*;
use kv_core::{Budget, KvError, Result};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A method's own parameters, read from a spec with their defaults and validated (each scorer's
/// config struct, which is also its serde form).
pub trait SpecParams: Sized {
    /// The spec keys it reads.
    const KEYS: &'static [&'static str];

    /// Reads the keys from `p`, defaulting the ones not given.
    fn from_params(p: &Params<'_>) -> Result<Self>;
}

/// What some policies need beyond their spec: the tokenizer's token classes (FastGen).
#[derive(Debug, Clone, Default)]
pub struct PolicyEnv {
    /// Special and punctuation token ids of the model's tokenizer.
    pub token_classes: Option<Arc<TokenClasses>>,
}

impl PolicyEnv {
    /// An environment with the tokenizer's token classes.
    pub fn with_classes(classes: TokenClasses) -> Self {
        Self {
            token_classes: Some(Arc::new(classes)),
        }
    }
}

/// A parsed `name:key=value,...` spec.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    /// The policy's name.
    pub name: String,
    params: BTreeMap<String, String>,
}

impl PolicySpec {
    /// Parses `name` or `name:key=value,key=value` (the syntax only: [`Registry::parse`] also
    /// checks the name).
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let name = name.trim().to_ascii_lowercase();
        let mut params = BTreeMap::new();
        for pair in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| KvError::config(format!("{name} parameter"), pair, "key=value"))?;
            let key = k.trim().to_ascii_lowercase();
            if params.contains_key(&key) {
                return Err(KvError::config(
                    format!("{name}:{key}"),
                    format!("given twice in {spec:?}"),
                    "each parameter at most once",
                ));
            }
            params.insert(key, v.trim().to_string());
        }
        Ok(Self { name, params })
    }

    /// The raw `key=value` pairs, in key order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Reads the parameters, rejecting any that `allowed` does not list.
    pub fn params(&self, allowed: &[&str]) -> Result<Params<'_>> {
        if let Some(bad) = self.params.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(KvError::Unknown {
                kind: format!("{} parameter", self.name),
                name: bad.clone(),
                valid: if allowed.is_empty() {
                    "none".into()
                } else {
                    allowed.join(", ")
                },
            });
        }
        Ok(Params { spec: self })
    }
}

/// Typed access to a spec's parameters, each with a default.
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    spec: &'a PolicySpec,
}

impl Params<'_> {
    fn raw(&self, key: &str) -> Option<&str> {
        self.spec.params.get(key).map(String::as_str)
    }

    fn bad(&self, key: &str, v: &str, expected: &str) -> KvError {
        KvError::config(format!("{}:{key}", self.spec.name), v, expected)
    }

    /// A budget (`0.5` = keep half of the tokens seen, `1024` = keep 1024 slots).
    pub fn budget(&self, key: &str, default: Budget) -> Result<Budget> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => Budget::parse(v).map_err(|_| {
                self.bad(
                    key,
                    v,
                    "a ratio in (0, 1] such as 0.5, or a slot count such as 1024",
                )
            }),
        }
    }

    /// A non-negative integer.
    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        self.raw(key).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| self.bad(key, v, "a whole number >= 0"))
        })
    }

    /// A number in `[lo, hi]`.
    pub fn f32_in(&self, key: &str, default: f32, lo: f32, hi: f32) -> Result<f32> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => match v.parse::<f32>() {
                Ok(x) if (lo..=hi).contains(&x) => Ok(x),
                _ => Err(self.bad(key, v, &format!("a number in [{lo}, {hi}]"))),
            },
        }
    }

    /// `true` or `false`.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(v) => Err(self.bad(key, v, "true or false")),
        }
    }

    /// One of `choices`.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        choices: &[&'static str],
    ) -> Result<&'static str> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => choices
                .iter()
                .find(|c| **c == v)
                .copied()
                .ok_or_else(|| self.bad(key, v, &format!("one of {}", choices.join(", ")))),
        }
    }

    /// `every=0` evicts at prefill only, `every=1` after every step, `every=N` every N decode steps.
    pub fn schedule(&self, default: Schedule) -> Result<Schedule> {
        Ok(match self.raw("every") {
            None => default,
            Some(_) => match self.usize("every", 1)? {
                0 => Schedule::PrefillOnly,
                1 => Schedule::EveryStep,
                n => Schedule::EveryN(n),
            },
        })
    }
}

/// Splits a comma-separated list of specs whose own parameters are comma-separated too:
/// `full,snapkv:window=64,kernel=5,h2o` is `full`, `snapkv:window=64,kernel=5` and `h2o`. A piece
/// with `=` and no `:` continues the spec before it (a policy name never holds `=`).
pub fn split_specs(list: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in list
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match out.last_mut() {
            Some(last) if piece.contains('=') && !piece.contains(':') => {
                last.push(if last.contains(':') { ',' } else { ':' });
                last.push_str(piece);
            }
            _ => out.push(piece.to_string()),
        }
    }
    out
}

/// Builds the policy a spec names from the standard [`Registry`], with its parameters validated;
/// policies that need the tokenizer (FastGen) are an error here: build them with
/// [`build_policy_in`].
pub fn build_policy<B: Backend>(spec: &str) -> Result<Box<dyn CachePolicy<B>>> {
    build_policy_in(spec, &PolicyEnv::default())
}

/// Builds the policy a spec names from the standard [`Registry`] in `env` (which hands FastGen
/// the tokenizer's classes).
pub fn build_policy_in<B: Backend>(spec: &str, env: &PolicyEnv) -> Result<Box<dyn CachePolicy<B>>> {
    Registry::<B>::standard().build(spec, env)
}
