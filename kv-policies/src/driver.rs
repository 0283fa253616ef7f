//! The one policy driver: what every model runs around a layer's attention.

use crate::{CachePolicy, LayerContext};
use burn::prelude::*;
use kv_core::{LayerCache, Observation, ObserveRequest, Result};

/// Runs one layer's cached attention under `policy`: asks what to observe, runs `attend` with
/// that request over the layer's `state` (which appends the new keys and values and attends),
/// then hands the policy the state's cache and the observation, and returns the attention's
/// output.
///
/// `state` is anything that holds the layer's [`LayerCache`]: the cache itself, or a
/// [`kv_core::KvState`] that also carries a key shift's input. Every model of this workspace
/// calls it for each policy-managed cache; an outside model only needs an attention that fills
/// an [`Observation`] on request.
pub fn drive_layer<B, S, O, F>(
    policy: &mut dyn CachePolicy<B>,
    ctx: &LayerContext<'_, B>,
    state: &mut S,
    attend: F,
) -> Result<O>
where
    B: Backend,
    S: AsMut<LayerCache<B>>,
    F: FnOnce(&mut S, ObserveRequest) -> Result<(O, Option<Observation<B>>)>,
{
    let request = policy.observe_request(ctx);
    let (output, observation) = attend(state, request)?;
    policy.after_attention(ctx, state.as_mut(), observation.as_ref())?;
    Ok(output)
}
