//! # cim-runner — configuration, data, assembly and the CiM training loop
//!
//! The library behind the `cim-run` command line: [`config::resolve`] layers and validates the
//! configuration, [`pipeline::Cim::build`] assembles the seven components through the registry,
//! [`train::Trainer`] runs the steps in a run directory, and [`probe`], [`finetune`] and
//! [`export`] evaluate and hand over the pre-trained enhancer. It sets no process-wide state: the
//! allocator, thread pools and backend switches belong to the binary's `main` (`cim-run`).

pub mod augment;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod datasets;
pub mod export;
pub mod finetune;
pub mod fit;
pub mod inspect;
pub mod optim;
pub mod pictures;
pub mod pipeline;
pub mod probe;
pub mod rundir;
pub mod sweep;
pub mod tensorboard;
pub mod tokenizer_train;
pub mod train;

// inventory drops registrations from crates nothing references: name every plugin crate here.
use cim_plugin_beit as _;
use cim_plugin_corruption as _;
use cim_plugin_dalle_dvae as _;
use cim_plugin_masking as _;
use cim_plugin_objectives as _;
use cim_plugin_patch_kmeans as _;
use cim_plugin_resnet as _;
use cim_plugin_samplers as _;
use cim_plugin_vit as _;
use cim_plugin_vq as _;
