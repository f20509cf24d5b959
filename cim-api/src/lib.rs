//! # cim-api — the contract every cim component is written against
//!
//! Corrupted Image Modeling (CiM; Fang et al., 2022, "Corrupted Image Modeling for Self-Supervised
//! Visual Pre-Training", §2, Figure 1b) trains two networks at once:
//!
//! ```text
//!   image ──► Tokenizer::encode (frozen) ──► golden ids ─┐
//!     │                                                   ├─► replace at masked positions ──► Tokenizer::decode (frozen)
//!     └─► Masking ──► Generator (small BEiT, MIM loss) ─► Sampler ─┘                                  │
//!                                                                                        corrupted image
//!                                                                                                │
//!                                                              Objective (RESPIX / REVDET) ◄── Enhancer
//! ```
//!
//! This crate holds the five component traits of that picture ([`Tokenizer`], [`Generator`],
//! [`Sampler`], [`Enhancer`], [`Objective`]) plus [`Masking`], the shared types that flow between them
//! ([`TokenGrid`], [`Mask`], [`Features`], [`Losses`]), the plugin [`registry`] (inventory-based, one
//! entry kind per trait), the deterministic parameter store ([`ParamStore`]) and the pixel maps of the
//! DALL-E tokenizer ([`pixels`]). With the `testing` feature it also exports the conformance checks
//! every registered component must pass (`cim_api::testing`).
//!
//! Traits are object-safe and not generic over a backend: the device comes from tensors and
//! `VarBuilder`s.

pub mod config;
pub mod cross_rank;
pub mod error;
pub mod params;
pub mod pixels;
pub mod registry;
pub mod traits;
pub mod types;
pub mod weights;

#[cfg(feature = "testing")]
pub mod testing;

pub use cross_rank::{CrossRank, CrossRankSlot};
pub use error::{Error, Result};
pub use params::ParamStore;
pub use registry::{BuildCtx, ExportSpec, Kind};
pub use traits::{Corruption, Enhancer, Generator, Masking, Objective, Sampler, Tokenizer};
pub use types::{
    Corrupted, CorruptionInput, DecoderPrecisionReport, EnhancerInfo, ExecChoices, Features,
    Losses, MapLayout, Mask, ObjectiveBatch, ObjectiveOutput, PrecisionReport, TokenGrid,
};

/// What a plugin crate needs in one import: `use cim_api::prelude::*;` brings the component
/// traits, the types that flow between them, the build context, the error type, the candle types
/// the traits use, `VarBuilder`, the RNG trait samplers and maskings take, and serde's
/// `Serialize`/`Deserialize` (traits and derives; the crate still lists `serde` as a dependency,
/// as serde's derives require).
pub mod prelude {
    pub use crate::registry::BuildCtx;
    pub use crate::{
        Corrupted, Corruption, CorruptionInput, Enhancer, EnhancerInfo, Error, ExecChoices,
        Features, Generator, Losses, MapLayout, Mask, Masking, Objective, ObjectiveBatch,
        ObjectiveOutput, ParamStore, Result, Sampler, TokenGrid, Tokenizer,
    };
    pub use candle_core::{DType, Device, Module, ModuleT, Tensor, Var, D};
    pub use candle_nn::VarBuilder;
    pub use rand::{Rng, RngCore};
    pub use serde::{Deserialize, Serialize};
}

// Re-exported so plugin crates and the registration macros name one version of each.
pub use candle_core as candle;
pub use candle_nn;
pub use figment;
#[doc(hidden)]
pub use inventory;
pub use rand;
