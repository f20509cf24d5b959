//! # cim-run — the command line
//!
//! `cim-run --preset NAME` pre-trains; its subcommands evaluate, export and measure. The clap
//! structures and the process set-up (threads, allocator options, backend switches, logging) live
//! here; the work is the `cim-runner` library's.
//!
//! A custom runner that links more plugin crates calls [`main`] from its own `main` (and declares
//! mimalloc as its global allocator, as `cim-run`'s binary does) and gets the same command line
//! with its plugins registered.

mod alloc;
pub mod cli;

pub use alloc::{keep_freed_memory, purge_delay_ms};
pub use cli::{main, run};
/// The allocator `cim-run` runs on; a custom runner declares it too (see the crate docs).
pub use mimalloc::MiMalloc;
