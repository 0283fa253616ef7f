//! Every read of a tensor back to the host goes through here, so it can be counted.
//!
//! On a GPU backend a read is a device-to-host transfer and a synchronisation: a decode step that
//! reads once per layer waits for the device once per layer. Library code reads only through
//! [`ReadBack`] (`read_back`, `read_scalar`; `host_data` for a CPU backend's own memory), which
//! the workspace's clippy configuration enforces (`disallowed-methods` in `clippy.toml`), so
//! [`count`] is every read the library makes. `kv bench` reports it per decode step and policy.
//!
//! The count is per thread: a generation runs its model on one thread, so two generations on two
//! threads do not mix their counts.

use burn::prelude::*;
use burn::tensor::{BasicOps, Element, ElementConversion, TensorData};
use std::cell::Cell;

thread_local! {
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// Reads this thread has made through [`ReadBack::read_back`] and [`ReadBack::read_scalar`].
pub fn count() -> u64 {
    READS.with(Cell::get)
}

/// The counted ways to read a tensor back to the host.
pub trait ReadBack: Sized {
    /// Reads the tensor back to the host, counting one read.
    fn read_back(self) -> TensorData;

    /// Reads a one-element tensor back as `f64`, counting one read.
    fn read_scalar(self) -> f64;

    /// Takes the data of a tensor that a CPU backend already holds in host memory, uncounted:
    /// only the host kernels call it, after checking the backend is a CPU one, where no bytes
    /// move between devices.
    fn host_data(self) -> TensorData;
}

impl<B: Backend, const D: usize, K: BasicOps<B>> ReadBack for Tensor<B, D, K>
where
    K::Elem: Element,
{
    #[allow(clippy::disallowed_methods)]
    fn read_back(self) -> TensorData {
        READS.with(|r| r.set(r.get() + 1));
        self.into_data()
    }

    #[allow(clippy::disallowed_methods)]
    fn read_scalar(self) -> f64 {
        READS.with(|r| r.set(r.get() + 1));
        self.into_scalar().elem::<f64>()
    }

    #[allow(clippy::disallowed_methods)]
    fn host_data(self) -> TensorData {
        self.into_data()
    }
}
