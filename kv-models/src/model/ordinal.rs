//! Parameter ids that do not depend on the run.

use burn::module::{ModuleMapper, Param, ParamId};
use burn::prelude::*;

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
