//! # cim — Corrupted Image Modeling in Rust
//!
//! The workspace facade: [`api`] is the component contract (traits, registry, shared types),
//! [`run`] the runner library behind `cim-run`. The integration tests under `tests/` exercise
//! both through the public surface, on CPU.

pub use cim_api as api;
pub use cim_run as run;
