//! Forcing burn's lazily initialised parameters into existence.

use burn::module::ModuleVisitor;
use burn::module::Param;
use burn::prelude::*;

struct Touch;

impl<B: Backend> ModuleVisitor<B> for Touch {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }
}

/// Initialises every parameter of a freshly built module now.
///
/// burn 0.21 parameters are lazy, and a clone of a still-lazy parameter runs the random
/// initialiser again on first use, so `model.clone()` of a new model silently yields different
/// weights (and a checkpoint saved from a clone would not match the original). Every `init` in
/// this workspace that creates parameters calls this before returning; `init_lazy` does not,
/// for loaders that replace every parameter (so no random initialisation runs and a forged
/// config cannot make them allocate).
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    module.visit(&mut Touch);
    module
}
