//! How many slots a cache may keep.

use crate::{KvError, Result};
use serde::{Deserialize, Serialize};

/// A cache budget: a fraction of the tokens seen, or a fixed number of slots (per KV head).
///
/// `Ratio(0.5)` keeps half of the tokens seen (50% compression); `Ratio(1.0)` keeps all of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Budget {
    /// Keep this fraction of the tokens seen, in (0, 1].
    Ratio(f32),
    /// Keep at most this many slots per KV head, at least 1.
    Tokens(usize),
}

impl Budget {
    /// A validated ratio budget.
    pub fn ratio(r: f32) -> Result<Self> {
        let b = Budget::Ratio(r);
        b.validate()?;
        Ok(b)
    }

    /// A validated token-count budget.
    pub fn tokens(n: usize) -> Result<Self> {
        let b = Budget::Tokens(n);
        b.validate()?;
        Ok(b)
    }

    /// Checks the budget's value; a budget built directly from the enum should be validated once.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Budget::Ratio(r) if !(r > 0.0 && r <= 1.0) => Err(KvError::config(
                "budget ratio",
                r,
                "a fraction of tokens kept, in (0, 1]",
            )),
            Budget::Tokens(0) => Err(KvError::config(
                "budget tokens",
                0,
                "at least 1 slot per head",
            )),
            _ => Ok(()),
        }
    }

    /// Slots this budget allows once `seen` tokens have been seen (never more than `seen`).
    ///
    /// Ratios round up, so a non-empty sequence always keeps at least one slot.
    pub fn slots_for(&self, seen: usize) -> usize {
        match *self {
            Budget::Ratio(r) => ((seen as f64 * r as f64).ceil() as usize).min(seen),
            Budget::Tokens(n) => n.min(seen),
        }
    }

    /// Parses `0.5` (a ratio, has a decimal point or is below 1) or `1024` (a token count).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            KvError::config(
                "budget",
                s,
                "a ratio in (0, 1] such as 0.5, or a slot count such as 1024",
            )
        };
        if s.contains('.') || s.contains('e') {
            let r: f32 = s.parse().map_err(|_| bad())?;
            Budget::ratio(r)
        } else {
            let n: usize = s.parse().map_err(|_| bad())?;
            Budget::tokens(n)
        }
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{r}"),
            Budget::Tokens(n) => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_outside_unit_interval_is_rejected_with_its_value() {
        for r in [0.0, -0.5, 1.5, f32::NAN] {
            let err = Budget::ratio(r).unwrap_err().to_string();
            assert!(err.contains("budget ratio"), "{err}");
            assert!(err.contains("(0, 1]"), "{err}");
        }
        assert!(Budget::ratio(1.0).is_ok());
        assert!(Budget::ratio(0.01).is_ok());
    }

    #[test]
    fn zero_token_budget_is_rejected() {
        let err = Budget::tokens(0).unwrap_err().to_string();
        assert!(err.contains("budget tokens = 0"), "{err}");
    }

    #[test]
    fn slots_never_exceed_tokens_seen() {
        assert_eq!(Budget::Ratio(0.5).slots_for(10), 5);
        assert_eq!(Budget::Ratio(0.5).slots_for(11), 6);
        assert_eq!(Budget::Ratio(1.0).slots_for(7), 7);
        assert_eq!(Budget::Tokens(64).slots_for(10), 10);
        assert_eq!(Budget::Tokens(64).slots_for(100), 64);
    }

    #[test]
    fn parse_tells_ratios_from_counts() {
        assert_eq!(Budget::parse("0.5").unwrap(), Budget::Ratio(0.5));
        assert_eq!(Budget::parse("1.0").unwrap(), Budget::Ratio(1.0));
        assert_eq!(Budget::parse("1024").unwrap(), Budget::Tokens(1024));
        assert!(
            Budget::parse("abc")
                .unwrap_err()
                .to_string()
                .contains("abc")
        );
        assert!(Budget::parse("0").is_err());
        assert!(Budget::parse("2.0").is_err());
    }
}
