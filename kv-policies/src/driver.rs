//! The one policy driver: what every model runs around a layer's attention.

use crate::{CachePolicy, LayerContext};
use burn::prelude::*;
use kv_core::{LayerCache, ObserveRequest, Observation, Result};

/// Runs one layer's cached attention under `policy`: asks what to observe, runs `attend` with
/// that request over `cache` (which appends the layer's new keys and values and attends), then
/// hands the policy the cache and the observation, and returns the attention's output.
///
/// Every model of this workspace calls it for each policy-managed cache; an outside model only
/// needs an attention that fills an [`Observation`] on request.
pub fn drive_layer<B, O, F>(policy: &mut dyn CachePolicy<B>, ctx: &LayerContext<'_, B>, cache: &mut LayerCache<B>, attend: F) -> Result<O>
where
    B: Backend,
    F: FnOnce(&mut LayerCache<B>, ObserveRequest) -> Result<(O, Option<Observation<B>>)>,
{
    let request = policy.observe_request(ctx);
    let (output, observation) = attend(cache, request)?;
    policy.after_attention(ctx, cache, observation.as_ref())?;
    Ok(output)
}
