//! # cim-run — configuration, data and the CiM training step
//!
//! The `cim-run` binary is a thin shell over this library: [`config::resolve`] layers and
//! validates the configuration, [`pipeline::Cim::build`] assembles the six components through the
//! registry, [`train::Trainer`] runs the steps. A custom binary that links extra plugin crates
//! calls [`cli::main`] and gets the same CLI with its plugins registered.

mod alloc;
pub mod augment;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod export;
pub mod finetune;
pub mod fit;
pub mod inspect;
pub mod optim;
pub mod pictures;
pub mod pipeline;
pub mod probe;
pub mod tokenizer_train;
pub mod train;

// inventory drops registrations from crates nothing references: name every plugin crate here.
use cim_plugin_beit as _;
use cim_plugin_dalle_dvae as _;
use cim_plugin_masking as _;
use cim_plugin_objectives as _;
use cim_plugin_patch_kmeans as _;
use cim_plugin_resnet as _;
use cim_plugin_samplers as _;
use cim_plugin_vit as _;
use cim_plugin_vq as _;

// candle allocates a fresh buffer for every op; glibc's malloc hands large ones back to the kernel
// each time (page faults on every step). mimalloc keeps them: ~20% faster CPU steps here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use alloc::{keep_freed_memory, purge_delay_ms};
pub use cim_ops::threads::settle_cpu_threads;
