//! Measuring a model under a policy: task accuracy and perplexity through the cache, the
//! evaluation grid, and the shared prefill that serves a grid's policies one prompt.

pub mod fanout;
pub mod grid;
pub mod scores;
