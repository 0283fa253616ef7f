//! Process-level tests of the `kv` binary: every bad input is one readable error line, a training
//! run killed with SIGKILL resumes exactly, and the same command gives the same output.

mod bad_input;
mod common;
mod determinism;
mod killed_training;
