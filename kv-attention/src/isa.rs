//! The instruction sets the host kernels are compiled for, and which of them this CPU runs.
//!
//! Every host kernel (the prefill attention, SwiGLU, the decode attention, the packed-weight
//! product) takes an [`Isa`]: callers pass [`Isa::best`], tests pass each of [`Isa::available`]
//! in turn, so every path a machine can run is checked on that machine, not only the widest.
//! A kernel never trusts the value it is given: it runs [`Isa::usable`], the widest instruction
//! set at or below it that this CPU has, so a safe caller cannot make it execute an instruction
//! the CPU lacks.

/// An instruction set a host kernel has a build for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust for any CPU (what the compiler makes of it for the build's target).
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512F, AVX2 and FMA (the AVX-512 builds use all three).
    Avx512,
}

impl Isa {
    /// Every instruction set, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Its name, as `kv` and the tests print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f+avx2+fma",
        }
    }

    /// Whether this CPU has every feature the instruction set's builds are compiled with.
    pub fn runs_here(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Isa::Avx2.runs_here() && std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest instruction set this CPU runs.
    pub fn best() -> Isa {
        Isa::Avx512.usable()
    }

    /// Every instruction set this CPU runs, narrowest first.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.runs_here()).collect()
    }

    /// `self` if this CPU runs it, else the widest narrower one it runs.
    pub fn usable(self) -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| *i <= self && i.runs_here())
            .unwrap_or(Isa::Portable)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says which instruction sets the kernel tests of this run cover (CI prints it), and checks
    /// that the choice is consistent.
    #[test]
    fn simd_paths_this_cpu_runs() {
        let available = Isa::available();
        let names: Vec<&str> = available.iter().map(|i| i.name()).collect();
        let missing: Vec<&str> = Isa::ALL
            .iter()
            .filter(|i| !available.contains(i))
            .map(|i| i.name())
            .collect();
        println!(
            "host-kernel instruction sets tested on this CPU: {} (not here: {})",
            names.join(", "),
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            }
        );
        assert_eq!(
            available.first(),
            Some(&Isa::Portable),
            "the portable build runs everywhere"
        );
        assert_eq!(Isa::best(), *available.last().unwrap());
        for isa in Isa::ALL {
            let used = isa.usable();
            assert!(
                used <= isa && used.runs_here(),
                "{isa} falls back to {used}"
            );
        }
    }
}
