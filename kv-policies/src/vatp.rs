//! VATP, value-aware token pruning (Guo et al., EMNLP 2024): H2O's accumulated attention times
//! each value's L1 norm, with attention sinks never evicted.

use crate::{H2oPolicy, PolicySpec, Schedule};
use kv_core::{Budget, Result};

/// VATP is H2O with value-norm-weighted scores and a sink guard; see [`H2oPolicy`].
///
/// As in the official code, each step's attention of every query head is multiplied by the L1
/// norm of the value that head reads before it is accumulated, so with GQA the product is summed
/// over the group, and with MLA each head's norm is of its own up-projected value `W_UV^h c`, not
/// of the shared latent (the attention reports the norms). Sinks matter: they draw most attention
/// but have near-zero value norms, and evicting them collapses quality.
pub struct VatpPolicy;

impl VatpPolicy {
    /// Parses `vatp:budget=..,recent=0.5,sinks=4,every=1`.
    pub fn from_spec(spec: &PolicySpec) -> Result<H2oPolicy> {
        let p = spec.params(&["budget", "recent", "sinks", "every"])?;
        Ok(H2oPolicy {
            budget: p.budget("budget", Budget::Ratio(0.5))?,
            recent: p.f32_in("recent", 0.5, 0.0, 1.0)?,
            normalize: false,
            sinks: p.usize("sinks", 4)?,
            value_aware: true,
            schedule: p.schedule(Schedule::EveryStep)?,
        })
    }
}
