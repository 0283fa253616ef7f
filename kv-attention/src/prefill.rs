//! A prefill chunk's attention when no policy needs every row of it: burn's fused kernel in
//! causal blocks, or the host kernel ([`crate::host`]) with column sums when a policy asks.

use crate::attend::host_kernels_on;
#[cfg(test)]
use crate::attend::served;
use crate::explicit::{Causality, grouped_attention, in_blocks};
use crate::{Kernels, Observation, ObserveRequest};
use burn::prelude::*;
use burn::tensor::DType;
use kv_core::readback::ReadBack;

/// Query rows per call of the fused kernel at prefill: each block attends only over the keys up
/// to its last query, so a causal prefill does about half the work of one call over the square.
pub const FUSED_BLOCK: usize = 512;

/// The first `rows` queries of `q` over the first `visible` keys through the host kernel, with
/// each query head's column sums when asked, if the current [`Kernels`] takes host kernels and the tensors
/// suit it.
fn host_prefill<B: Backend>(
    q: &Tensor<B, 4>,
    keys: &Tensor<B, 4>,
    values: &Tensor<B, 4>,
    rows: usize,
    visible: usize,
    scale: f64,
    column_sums: bool,
) -> Option<(Tensor<B, 4>, Option<Tensor<B, 3>>)> {
    let device = q.device();
    let f32s = [q.dtype(), keys.dtype(), values.dtype()]
        .iter()
        .all(|&d| d == DType::F32);
    if !host_kernels_on::<B>(&device) || !f32s {
        return None;
    }
    let [batch, heads, t, head_dim] = q.dims();
    let [_, kv_heads, keys_len, dv] = values.dims();
    if dv != head_dim || !crate::host::HEAD_DIMS.contains(&head_dim) {
        return None;
    }
    let q = if rows == t {
        q.clone()
    } else {
        q.clone().narrow(2, 0, rows)
    }
    .host_data();
    let (k, v) = (keys.clone().host_data(), values.clone().host_data());
    let shape = crate::host::HostShape {
        batch,
        heads,
        kv_heads,
        queries: rows,
        keys: keys_len,
        visible,
        head_dim,
    };
    let threads = Kernels::current().prefill_threads;
    let out = crate::host::causal_attention(
        q.as_slice().ok()?,
        k.as_slice().ok()?,
        v.as_slice().ok()?,
        shape,
        scale as f32,
        column_sums,
        threads,
        Kernels::current().isa,
    )?;
    #[cfg(test)]
    served::count(served::Kernel::Prefill);
    let output = Tensor::from_data(
        burn::tensor::TensorData::new(out.output, [batch, heads, rows, head_dim]),
        &device,
    );
    let sums = out.column_sums.map(|c| {
        Tensor::from_data(
            burn::tensor::TensorData::new(c, [batch, heads, visible]),
            &device,
        )
    });
    Some((output, sums))
}

/// A chunk whose policy sums each slot's attention (H2O, VATP) through the host kernel, its
/// window rows (if also observed) through the explicit kernel for their probabilities; `None`
/// where the host kernel cannot take it.
pub(crate) fn host_observed_prefill<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    scale: f64,
    observe: ObserveRequest,
) -> Option<(Tensor<B, 4>, Option<Observation<B>>)> {
    // Checked before reading the keys out, which copies a cache that has a tail.
    if !host_kernels_on::<B>(&q.device()) {
        return None;
    }
    let t = q.dims()[2];
    let n = cache.slots();
    let (out, column_sums) = host_prefill(&q, &cache.keys(), &cache.values(), t, n, scale, true)?;
    let w = observe.window.min(t);
    let window = (w > 0).then(|| {
        let rows = ObserveRequest {
            window: w,
            ..Default::default()
        };
        let (_, obs) = grouped_attention(
            q.narrow(2, t - w, w),
            &cache.kv_segments(),
            &Causality::newest(cache, w),
            scale,
            rows,
        );
        obs.and_then(|o| o.window)
            .expect("the window was asked for")
    });
    Some((
        out,
        Some(Observation {
            column_sums,
            window,
            ..Default::default()
        }),
    ))
}

/// Causal attention of a chunk of `t` new queries (the cache's last `t` slots) through burn's
/// fused `attention` (flash on Flex and CubeCL) or the host kernel ([`crate::Kernels`]),
/// except for the last `observe.window` rows, which the explicit kernel computes so their
/// probabilities can be observed.
///
/// Exact, not an approximation: appended slots are the newest, so query `i` of the chunk sees
/// the `n - t` older slots and new slots `0..=i`, which is the bottom-right causal mask; the rows
/// before the window see no window key, so they attend over the first `n - w` slots alone. They
/// go in blocks of [`FUSED_BLOCK`] rows, each over the keys up to its last query (the same
/// bottom-right mask, cut), on up to [`Kernels::prefill_threads`](crate::Kernels) threads. Query and key heads must
/// match for the fused kernel, so each KV head is broadcast to its group for this call (a
/// temporary the size of the keys, never held).
pub(crate) fn fused_prefill<B: Backend>(
    q: Tensor<B, 4>,
    cache: &kv_core::LayerCache<B>,
    scale: f64,
    observe: ObserveRequest,
) -> (Tensor<B, 4>, Option<Observation<B>>) {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    let [b, h, t, dk] = q.dims();
    let (keys, values) = (cache.keys(), cache.values());
    let [_, kv, n, _] = keys.dims();
    let dv = values.dims()[3];
    let w = observe.window.min(t);
    let head = t - w;
    let mut outs = Vec::new();
    let visible = n - w;
    if let Some((o, _)) = (head > 0)
        .then(|| host_prefill(&q, &keys, &values, head, visible, scale, false))
        .flatten()
    {
        outs.push(o);
    } else if head > 0 {
        let older = visible - head;
        let spread = |x: Tensor<B, 4>, d: usize| {
            x.narrow(2, 0, visible)
                .reshape([b, kv, 1, visible, d])
                .expand([b, kv, h / kv, visible, d])
                .reshape([b, h, visible, d])
        };
        let (ks, vs) = (spread(keys.clone(), dk), spread(values.clone(), dv));
        // An explicit scale drops CubeCL to its unfused fallback; the usual one is the default.
        let default_scale = ((scale * scale * dk as f64) - 1.0).abs() < 1e-9;
        let device = q.device();
        let block = |lo: usize| {
            let rows = FUSED_BLOCK.min(head - lo);
            let len = older + lo + rows;
            let cut = |x: &Tensor<B, 4>| {
                if len == visible {
                    x.clone()
                } else {
                    x.clone().narrow(2, 0, len)
                }
            };
            // Flex aligns a non-square causal mask bottom-right, CubeCL's flash kernel top-left:
            // only a square one is portable, so any other block gets an explicit mask.
            let (mask, is_causal) = if rows == len {
                (None, true)
            } else {
                (
                    Some(
                        Tensor::<B, 2, Bool>::tril_mask([rows, len], (len - rows) as i64, &device)
                            .reshape([1, 1, rows, len]),
                    ),
                    false,
                )
            };
            let options = AttentionModuleOptions {
                scale: (!default_scale).then_some(scale),
                softcap: None,
                is_causal,
            };
            attention(
                q.clone().narrow(2, lo, rows),
                cut(&ks),
                cut(&vs),
                mask,
                None,
                options,
            )
        };
        let starts: Vec<usize> = (0..head).step_by(FUSED_BLOCK).collect();
        outs.extend(in_blocks::<B, _>(&starts, &device, block));
    }
    let mut observation = None;
    if w > 0 {
        let qw = q.narrow(2, head, w);
        let causality = Causality::newest(cache, w);
        let (o, obs) = grouped_attention(qw, &cache.kv_segments(), &causality, scale, observe);
        outs.push(o);
        observation = obs;
    }
    let out = if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(outs, 2)
    };
    debug_assert_eq!(out.dims(), [b, h, t, dv]);
    (out, observation)
}
