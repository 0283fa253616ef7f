//! Test support shared by every crate of the workspace.

/// Generates one `#[test]` per listed generic test body, for every backend the build enables.
///
/// Each body is a `fn name<B: Backend>(device: &B::Device)`; the macro instantiates it on Flex,
/// burn's CPU test backend, so test code is written once and never names a backend. A crate built
/// with its `cuda-tests` feature also gets a `cuda` module of the same tests on burn's CUDA
/// backend (`scripts/gpu-check.sh` builds those without a GPU and runs them on one), and one built
/// with `wgpu-tests` a `wgpu` module on burn's WGPU backend (any Vulkan device: in CI, Mesa's
/// lavapipe, a CPU emulation).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod flex {
            $(#[test] fn $name() { super::$name::<burn::backend::Flex>(&Default::default()); })*
        }
        #[cfg(feature = "cuda-tests")]
        mod cuda {
            $(#[test] fn $name() { super::$name::<burn::backend::Cuda>(&Default::default()); })*
        }
        #[cfg(feature = "wgpu-tests")]
        mod wgpu {
            $(#[test] fn $name() { super::$name::<burn::backend::Wgpu>(&Default::default()); })*
        }
    };
}
