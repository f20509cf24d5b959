//! # cim — Corrupted Image Modeling in Rust
//!
//! The workspace facade: [`api`] is the component contract (traits, registry, shared types),
//! [`ops`] the fused operations, [`run`] the runner library and [`cli`] the `cim-run` command
//! line. The integration tests under `tests/` exercise them through the public surface, on CPU.

pub use cim_api as api;
pub use cim_ops as ops;
pub use cim_run as cli;
pub use cim_runner as run;
