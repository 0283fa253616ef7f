//! Forcing burn's lazily initialised parameters into existence.

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
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
/// this crate calls this before returning.
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    module.visit(&mut Touch);
    module
}

struct Ordinal(u64);

impl<B: Backend> ModuleMapper<B> for Ordinal {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.0 += 1;
        let (_, tensor, mapper) = param.consume();
        Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
    }
}

/// Numbers a module's parameters 1, 2, 3, ... in visiting order.
///
/// burn draws each parameter's id at random, and ids are written into records (the optimiser's
/// state is keyed by them), so two runs of the same seeded command would otherwise save different
/// checkpoint bytes. With ordinal ids the same command writes the same file, which is what lets
/// a test compare a killed-and-resumed run with an uninterrupted one byte for byte.
pub fn ordinal_ids<B: Backend, M: Module<B>>(module: M) -> M {
    module.map(&mut Ordinal(0))
}
