//! The plugin registry: one entry kind per component trait, filled at link time through
//! [`inventory`] by the `register_*!` macros, looked up by name.
//!
//! ```ignore
//! cim_api::register_sampler! {
//!     name: "gumbel",
//!     about: "softmax sampling with temperature (paper: τ = 1)",
//!     config: GumbelConfig,
//!     default: GumbelConfig::default(),
//!     tiny: GumbelConfig::default(),
//!     build: |cfg: GumbelConfig, _ctx: &BuildCtx| Gumbel::new(cfg),
//! }
//! ```
//!
//! Each entry knows how to extract its own typed parameters from the figment section
//! `[<kind>.<name>]` (so errors name the file and key) and how to build the component from them.
//! Names are unique per kind; an unknown name lists the available ones.

use std::collections::BTreeMap;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use figment::Figment;

use crate::traits::{Corruption, Enhancer, Generator, Masking, Objective, Sampler, Tokenizer};
use crate::types::{EnhancerInfo, TokenGrid};
use crate::{Error, Result};

/// Which stock parameter set an entry starts from before the config's overrides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The registered name's own defaults (e.g. ViT-B/16's widths for `vit_b16`).
    Default,
    /// A tiny version of the same architecture, for conformance tests on CPU.
    Tiny,
}

/// One registered component implementation.
pub struct Entry<T: ?Sized + 'static> {
    pub name: &'static str,
    pub about: &'static str,
    /// `module_path!()` of the registration, to tell duplicates apart.
    pub origin: &'static str,
    /// Resolved parameters (defaults of `variant` merged with `section`) as a config value.
    pub params: fn(section: &Figment, variant: Variant) -> Result<figment::value::Value>,
    /// Builds the component from its parameters.
    pub build: fn(section: &Figment, variant: Variant, ctx: &BuildCtx) -> Result<Box<T>>,
    /// Whether the component has a mixed-precision path (`run.precision = "bf16"`): bf16
    /// activations against f32 master weights. Components without one run in f32 only, and the
    /// runner refuses bf16 for them by name.
    pub mixed_precision: bool,
    /// For an enhancer whose parameter names are a PyTorch library's: how `cim-run export` hands
    /// them over. `None`: no export.
    pub export: Option<ExportSpec>,
}

/// How an enhancer's weights load into a PyTorch library (`cim-run export`). The plugin's
/// parameter names under `enhancer.` are that library's names already.
#[derive(Clone, Copy, Debug)]
pub struct ExportSpec {
    /// The library: `"timm"` or `"torchvision"`.
    pub format: &'static str,
    /// The library's constructor that these parameters fit at this image size (timm's
    /// `vit_base_patch16_224`, torchvision's `resnet50`), or `"custom"` where none does.
    pub model: fn(params: &figment::value::Value, image_size: usize) -> String,
}

/// A component trait that has a registry. `KIND` is both its display name and its config section.
pub trait Kind: 'static {
    const KIND: &'static str;
}

macro_rules! kinds {
    ($($t:ident => $k:literal),* $(,)?) => {
        $(
            impl Kind for dyn $t {
                const KIND: &'static str = $k;
            }
            inventory::collect!(Entry<dyn $t>);
        )*
        /// Every kind's config section, in pipeline order.
        pub const KINDS: &[&str] = &[$($k),*];
    };
}

kinds! {
    Tokenizer => "tokenizer",
    Masking => "masking",
    Generator => "generator",
    Sampler => "sampler",
    Corruption => "corruption",
    Enhancer => "enhancer",
    Objective => "objective",
}

/// All entries of kind `K` by name. Duplicate names are an error naming both registrations.
pub fn table<K: Kind + ?Sized>() -> Result<BTreeMap<&'static str, &'static Entry<K>>>
where
    Entry<K>: inventory::Collect,
{
    let mut map: BTreeMap<&'static str, &'static Entry<K>> = BTreeMap::new();
    for e in inventory::iter::<Entry<K>> {
        if let Some(prev) = map.insert(e.name, e) {
            return Err(Error::DuplicateComponent {
                kind: K::KIND,
                name: e.name.to_string(),
                first: prev.origin.to_string(),
                second: e.origin.to_string(),
            });
        }
    }
    Ok(map)
}

/// Sorted registered names of kind `K`.
pub fn names<K: Kind + ?Sized>() -> Result<Vec<&'static str>>
where
    Entry<K>: inventory::Collect,
{
    Ok(table::<K>()?.keys().copied().collect())
}

/// The entry called `name`; an unknown name lists the available ones. `origin` says where the
/// name was set (e.g. " (set in --set enhancer.name=vit_b)"), or is empty.
pub fn lookup<K: Kind + ?Sized>(name: &str, origin: &str) -> Result<&'static Entry<K>>
where
    Entry<K>: inventory::Collect,
{
    let table = table::<K>()?;
    table
        .get(name)
        .copied()
        .ok_or_else(|| Error::UnknownComponent {
            kind: K::KIND,
            name: name.to_string(),
            origin: origin.to_string(),
            available: join(table.keys().copied()),
        })
}

pub(crate) fn join<'a>(it: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.into_iter().collect();
    if v.is_empty() {
        "(none registered)".to_string()
    } else {
        v.join(", ")
    }
}

/// `(kind, names)` for every kind, in pipeline order: what `cim-run --list` prints.
pub fn all_names() -> Result<Vec<(&'static str, Vec<&'static str>)>> {
    Ok(vec![
        ("tokenizer", names::<dyn Tokenizer>()?),
        ("masking", names::<dyn Masking>()?),
        ("generator", names::<dyn Generator>()?),
        ("sampler", names::<dyn Sampler>()?),
        ("corruption", names::<dyn Corruption>()?),
        ("enhancer", names::<dyn Enhancer>()?),
        ("objective", names::<dyn Objective>()?),
    ])
}

/// One-line descriptions for `--list`.
pub fn about<K: Kind + ?Sized>() -> Result<Vec<(&'static str, &'static str)>>
where
    Entry<K>: inventory::Collect,
{
    Ok(table::<K>()?.values().map(|e| (e.name, e.about)).collect())
}

/// What a component may need at build time. The runner fills it stage by stage: the tokenizer
/// decides the vocabulary and token grid the generator is built for, the enhancer decides the
/// feature layout the objective's head is built for.
#[derive(Clone)]
pub struct BuildCtx {
    pub device: Device,
    /// Dtype of the component's parameters.
    pub dtype: DType,
    /// Square input size of the generator and the enhancer (224 in the paper).
    pub image_size: usize,
    /// Square input size of the tokenizer view (112 in the paper).
    pub tokenizer_size: usize,
    /// Seed of the run; components that need their own randomness derive from it.
    pub seed: u64,
    pub vocab_size: Option<usize>,
    pub token_grid: Option<TokenGrid>,
    pub enhancer: Option<EnhancerInfo>,
    /// Where the component's parameters live, already prefixed with its section
    /// (`generator.`, `enhancer.`, …). Trainable for all but the tokenizer.
    pub vb: VarBuilder<'static>,
    /// Non-trainable state that belongs in checkpoints (BatchNorm running statistics). Create it
    /// under `vb.prefix()` so its names line up with the parameters'.
    pub buffers: crate::ParamStore,
    /// The enhancer's parameters, for a generator that shares layers with it (paper Table 5).
    pub enhancer_vb: Option<VarBuilder<'static>>,
    /// How the component computes (fast paths it stores at build time).
    pub exec: crate::types::ExecChoices,
    /// Sums across the processes of a data-parallel job, filled once they connect (synchronised
    /// BatchNorm reads it); empty in a job of one.
    pub cross_rank: crate::CrossRankSlot,
}

impl BuildCtx {
    pub fn vocab_size(&self, who: &str) -> Result<usize> {
        self.vocab_size.ok_or_else(|| Error::MissingContext {
            component: who.to_string(),
            what: "the tokenizer's vocabulary size",
        })
    }
    pub fn token_grid(&self, who: &str) -> Result<TokenGrid> {
        self.token_grid.ok_or_else(|| Error::MissingContext {
            component: who.to_string(),
            what: "the tokenizer's token grid",
        })
    }
    pub fn enhancer(&self, who: &str) -> Result<EnhancerInfo> {
        self.enhancer.ok_or_else(|| Error::MissingContext {
            component: who.to_string(),
            what: "the enhancer's feature layout",
        })
    }
    /// The same context with another `VarBuilder`.
    pub fn with_vb(&self, vb: VarBuilder<'static>) -> Self {
        Self { vb, ..self.clone() }
    }
}

/// Registers a component implementation of trait `$trait`. Prefer the per-kind macros
/// ([`register_tokenizer!`](crate::register_tokenizer) …), which fill in the trait.
///
/// `build` is a function or closure `(Config, &BuildCtx) -> cim_api::Result<T>` where `T`
/// implements the trait; `default` and `tiny` are expressions of type `Config`. Two optional
/// declarations follow: `mixed_precision: true` (the component has a bf16 path; default false)
/// and, for enhancers, `export: ExportSpec { … }` (see [`ExportSpec`]).
#[macro_export]
macro_rules! register_component {
    ($trait:path {
        name: $name:expr,
        about: $about:expr,
        config: $cfg:ty,
        default: $default:expr,
        tiny: $tiny:expr,
        build: $build:expr
        $(, mixed_precision: $mp:expr)?
        $(, export: $export:expr)?
        $(,)?
    }) => {
        const _: () = {
            fn __cim_config(
                section: &$crate::figment::Figment,
                variant: $crate::registry::Variant,
            ) -> $crate::Result<$cfg> {
                let base: $cfg = match variant {
                    $crate::registry::Variant::Default => $default,
                    $crate::registry::Variant::Tiny => $tiny,
                };
                $crate::config::extract_params(section, base)
            }
            fn __cim_params(
                section: &$crate::figment::Figment,
                variant: $crate::registry::Variant,
            ) -> $crate::Result<$crate::figment::value::Value> {
                $crate::config::to_value(&__cim_config(section, variant)?)
            }
            fn __cim_build(
                section: &$crate::figment::Figment,
                variant: $crate::registry::Variant,
                ctx: &$crate::registry::BuildCtx,
            ) -> $crate::Result<Box<dyn $trait>> {
                let cfg = __cim_config(section, variant)?;
                let build = $build;
                let component = build(cfg, ctx)?;
                Ok(Box::new(component))
            }
            $crate::inventory::submit! {
                $crate::registry::Entry::<dyn $trait> {
                    name: $name,
                    about: $about,
                    origin: module_path!(),
                    params: __cim_params,
                    build: __cim_build,
                    mixed_precision: false $(|| $mp)?,
                    export: $crate::__cim_export!($($export)?),
                }
            }
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __cim_export {
    () => {
        None
    };
    ($e:expr) => {
        Some($e)
    };
}

/// Registers a [`Tokenizer`](crate::Tokenizer). See [`register_component!`].
#[macro_export]
macro_rules! register_tokenizer {
    ($($body:tt)*) => { $crate::register_component!($crate::Tokenizer { $($body)* }); };
}
/// Registers a [`Masking`](crate::Masking) strategy. See [`register_component!`].
#[macro_export]
macro_rules! register_masking {
    ($($body:tt)*) => { $crate::register_component!($crate::Masking { $($body)* }); };
}
/// Registers a [`Generator`](crate::Generator). See [`register_component!`].
#[macro_export]
macro_rules! register_generator {
    ($($body:tt)*) => { $crate::register_component!($crate::Generator { $($body)* }); };
}
/// Registers a [`Sampler`](crate::Sampler). See [`register_component!`].
#[macro_export]
macro_rules! register_sampler {
    ($($body:tt)*) => { $crate::register_component!($crate::Sampler { $($body)* }); };
}
/// Registers a [`Corruption`](crate::Corruption). See [`register_component!`].
#[macro_export]
macro_rules! register_corruption {
    ($($body:tt)*) => { $crate::register_component!($crate::Corruption { $($body)* }); };
}
/// Registers an [`Enhancer`](crate::Enhancer). See [`register_component!`].
#[macro_export]
macro_rules! register_enhancer {
    ($($body:tt)*) => { $crate::register_component!($crate::Enhancer { $($body)* }); };
}
/// Registers an [`Objective`](crate::Objective). See [`register_component!`].
#[macro_export]
macro_rules! register_objective {
    ($($body:tt)*) => { $crate::register_component!($crate::Objective { $($body)* }); };
}
