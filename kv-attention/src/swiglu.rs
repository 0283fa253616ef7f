//! The gated FFN's activation, `silu(gate) * up`, on the host kernel or the backend's ops.

use crate::Kernels;
use crate::attend::host_kernels_on;
#[cfg(test)]
use crate::attend::served;
use burn::prelude::*;
use burn::tensor::DType;
use kv_core::readback::ReadBack;

/// `silu(gate) * up`, the gated FFN's activation: through the vectorised host kernel
/// ([`crate::host::swiglu`]) when the current [`Kernels`] takes host kernels, the tensors are f32, no autodiff
/// graph is recorded and there are enough elements to pay for moving them (a prefill's, not a
/// decode step's); through the backend's ops otherwise.
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    let device = gate.device();
    let eligible = host_kernels_on::<B>(&device)
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.dims() == up.dims()
        && gate.shape().num_elements() >= HOST_SWIGLU_MIN;
    if !eligible {
        return burn::tensor::activation::silu(gate) * up;
    }
    // Moved, not cloned, so a uniquely held buffer leaves the backend without a copy.
    let dims = gate.dims();
    let (g, u) = (gate.host_data(), up.host_data());
    let out = match (g.as_slice::<f32>(), u.as_slice::<f32>()) {
        (Ok(gs), Ok(us)) => crate::host::swiglu(
            gs,
            us,
            Kernels::current().prefill_threads,
            Kernels::current().isa,
        ),
        _ => None,
    };
    match out {
        Some(out) => {
            #[cfg(test)]
            served::count(served::Kernel::Prefill);
            Tensor::from_data(burn::tensor::TensorData::new(out, dims), &device)
        }
        None => {
            burn::tensor::activation::silu(Tensor::from_data(g, &device))
                * Tensor::from_data(u, &device)
        }
    }
}

/// The fewest elements [`swiglu`] moves to the host for: a few prefill rows of a small FFN.
const HOST_SWIGLU_MIN: usize = 1 << 15;
