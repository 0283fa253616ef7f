//! Test support shared by every crate of the workspace.

/// Generates one `#[test]` per listed generic test body, for every CPU backend the build enables.
///
/// Each body is a `fn name<B: Backend>(device: &B::Device)`; the macro instantiates it on Flex,
/// burn's CPU test backend, so test code is written once and never names a backend (a GPU test
/// run adds its backend here).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod flex {
            $(#[test] fn $name() { super::$name::<burn::backend::Flex>(&Default::default()); })*
        }
    };
}
