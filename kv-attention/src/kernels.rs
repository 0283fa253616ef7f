//! Which kernels attention and the gated FFN take: one value, [`Kernels`], chosen per process
//! ([`Kernels::set_default`]) or per thread for a scope ([`Kernels::scope`]), read by every call.
//!
//! | path | backend ops (`Kernels::backend_ops`) | host kernels (`Kernels::host`) |
//! |---|---|---|
//! | prefill attention, rows no policy reads | burn's fused attention, in blocks of [`crate::FUSED_BLOCK`] | `host::causal_attention` (flash-style, vectorised) |
//! | prefill attention with column sums (H2O, VATP) | the explicit kernel | `host::causal_attention` with column sums |
//! | one decoded token, rectangular f32 burn-flex cache | the explicit kernel | `decode.rs` (one pass, threads over heads) |
//! | band sums, a window of rows, ragged caches | the explicit kernel | the explicit kernel |
//! | SwiGLU of a prefill | `silu(gate) * up` | `host::swiglu` |
//! | quantised projections of a decode step | f32 weights | `PackedMatrix` codes (when the loader kept them) |
//!
//! The host kernels read host memory, so they pay only on CPU backends (burn-flex, ndarray), for
//! f32 tensors, and never while an autodiff graph is recorded; a call they cannot take falls back
//! to the backend's ops, so either choice is correct on every backend.

use crate::Isa;
use std::cell::Cell;
use std::sync::RwLock;

/// The kernel choice every attention and FFN call reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// Take the host kernels where a call suits them (see the module's table).
    pub host: bool,
    /// The instruction set the host kernels are built for ([`Isa::best`] unless a test or
    /// benchmark pins another).
    pub isa: Isa,
    /// Threads a prefill spreads its query blocks over (at least 1), in the fused, explicit and
    /// host kernels alike; burn-flex 0.21's fused kernel runs one (batch, head) after another.
    pub prefill_threads: usize,
}

impl Default for Kernels {
    /// The backend's own ops on one thread: right for every backend, fastest on GPUs.
    fn default() -> Self {
        Self::backend_ops()
    }
}

/// The process default; None until [`Kernels::set_default`]: [`Kernels::backend_ops`].
static DEFAULT: RwLock<Option<Kernels>> = RwLock::new(None);

thread_local! {
    /// This thread's scoped choice ([`Kernels::scope`]), over the process default.
    static HERE: Cell<Option<Kernels>> = const { Cell::new(None) };
}

impl Kernels {
    /// The backend's own ops only, prefill on one thread (GPU backends, or to compare with); the
    /// instruction set is the best this CPU runs, for whoever switches `host` on from here.
    pub fn backend_ops() -> Self {
        Self {
            host: false,
            isa: Isa::best(),
            prefill_threads: 1,
        }
    }

    /// The host kernels on the best instruction set this CPU runs, prefill over every core
    /// (CPU backends).
    pub fn host() -> Self {
        Self {
            host: true,
            isa: Isa::best(),
            prefill_threads: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }

    /// The usual choice for a backend: [`host`](Self::host) where its tensors live in host
    /// memory (`cpu`), [`backend_ops`](Self::backend_ops) otherwise.
    pub fn for_backend(cpu: bool) -> Self {
        if cpu {
            Self::host()
        } else {
            Self::backend_ops()
        }
    }

    /// What calls on this thread take now: its [`scope`](Self::scope), else the process default.
    pub fn current() -> Self {
        HERE.with(Cell::get).unwrap_or_else(|| {
            DEFAULT
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_else(Self::backend_ops)
        })
    }

    /// Makes this the process default (threads inside a [`scope`](Self::scope) keep theirs).
    pub fn set_default(self) {
        *DEFAULT
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(self.normalised());
    }

    /// Runs `f` with this choice on this thread alone, restoring the thread's previous one after
    /// (also on a panic); work `f` hands to other threads reads their own choice.
    pub fn scope<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<Kernels>);
        impl Drop for Restore {
            fn drop(&mut self) {
                HERE.with(|h| h.set(self.0));
            }
        }
        let _restore = Restore(HERE.with(|h| h.replace(Some(self.normalised()))));
        f()
    }

    /// One line for logs and results: `host kernels (avx512f+avx2+fma, 2 prefill threads)` or
    /// `backend ops (1 prefill thread)`.
    pub fn describe(&self) -> String {
        let threads = match self.prefill_threads {
            1 => "1 prefill thread".to_string(),
            n => format!("{n} prefill threads"),
        };
        match self.host {
            true => format!("host kernels ({}, {threads})", self.isa.name()),
            false => format!("backend ops ({threads})"),
        }
    }

    /// At least one thread, and an instruction set this CPU runs.
    fn normalised(self) -> Self {
        Self {
            prefill_threads: self.prefill_threads.max(1),
            isa: if self.isa.runs_here() {
                self.isa
            } else {
                Isa::best()
            },
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_overrides_the_default_on_its_thread_only_and_is_restored() {
        let outer = Kernels::current();
        let pinned = Kernels {
            host: !outer.host,
            isa: Isa::Portable,
            prefill_threads: 3,
        };
        let (inner, other_thread) = pinned.scope(|| {
            let other = std::thread::spawn(Kernels::current).join().unwrap();
            (Kernels::current(), other)
        });
        assert_eq!(inner, pinned);
        assert_ne!(other_thread, pinned);
        assert_eq!(Kernels::current(), outer);
        let zero = Kernels {
            prefill_threads: 0,
            ..pinned
        };
        assert_eq!(zero.scope(|| Kernels::current().prefill_threads), 1);
        assert!(Kernels::host().describe().starts_with("host kernels ("));
        assert_eq!(
            Kernels::backend_ops().describe(),
            "backend ops (1 prefill thread)"
        );
    }
}
