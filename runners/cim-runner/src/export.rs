//! `cim-run export`: the pre-trained enhancer as a PyTorch-loadable state dict — timm's ViT names or
//! torchvision's ResNet-50 names — plus a JSON mapping from cim's names.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use cim_api::{Enhancer, Error, Result};

use crate::config::resolve;

/// Target naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// timm's `VisionTransformer` (`vit_small_patch16_224`, `vit_base_patch16_224`, …), no head.
    Timm,
    /// torchvision's `resnet50`, without `fc`.
    Torchvision,
}

/// Options of `cim-run export`.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    /// A pre-training run directory (its `model.safetensors`, else its newest checkpoint).
    pub run_dir: PathBuf,
    pub format: Format,
    /// The output `.safetensors`; the mapping goes beside it as `.json`.
    pub out: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct MappedTensor {
    pub from: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub format: Format,
    /// The timm/torchvision constructor these names fit (`custom` for non-standard sizes).
    pub model: String,
    pub enhancer: String,
    pub source: String,
    pub tensors: BTreeMap<String, MappedTensor>,
}

impl Format {
    /// The name an enhancer's [`cim_api::ExportSpec`] gives its format by.
    pub fn name(self) -> &'static str {
        match self {
            Format::Timm => "timm",
            Format::Torchvision => "torchvision",
        }
    }
}

/// The export declaration of the registered enhancer `enhancer` in `format`, or an error naming
/// what it exports to instead.
fn export_spec(enhancer: &str, format: Format) -> Result<cim_api::ExportSpec> {
    let entry = cim_api::registry::lookup::<dyn Enhancer>(enhancer, "")?;
    match entry.export {
        Some(spec) if spec.format == format.name() => Ok(spec),
        Some(spec) => Err(Error::config(format!(
            "--format {} does not fit enhancer `{enhancer}`: its parameters carry {}'s names (--format {})",
            format.name(),
            spec.format,
            spec.format
        ))),
        None => Err(Error::config(format!(
            "enhancer `{enhancer}` declares no export format (its plugin registers no `export`)"
        ))),
    }
}

/// Renames `enhancer.*` tensors to the target format. An exporting plugin's parameters already
/// carry the library's names under `enhancer.` (its [`cim_api::ExportSpec`]), so the mapping strips
/// the prefix, checks the format is the one the plugin declares, and adds torchvision's
/// `num_batches_tracked` buffers (0).
pub fn map_names(
    enhancer: &str,
    weights: &BTreeMap<String, Tensor>,
    format: Format,
) -> Result<BTreeMap<String, (String, Tensor)>> {
    export_spec(enhancer, format)?;
    let mut out = BTreeMap::new();
    for (k, t) in weights {
        let Some(name) = k.strip_prefix("enhancer.") else {
            continue;
        };
        out.insert(name.to_string(), (k.clone(), t.clone()));
        if format == Format::Torchvision {
            if let Some(bn) = name.strip_suffix(".running_var") {
                let tracked = Tensor::zeros((), DType::I64, &Device::Cpu)?;
                out.insert(
                    format!("{bn}.num_batches_tracked"),
                    ("(0: cim does not count BatchNorm batches)".into(), tracked),
                );
            }
        }
    }
    if out.is_empty() {
        return Err(Error::msg("the weights hold no `enhancer.*` tensor"));
    }
    Ok(out)
}

pub fn export(args: &ExportArgs) -> Result<ExportReport> {
    let res = resolve(&crate::config::run_layers(&args.run_dir, vec![])?)?;
    let enhancer = res.cfg.enhancer["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let spec = export_spec(&enhancer, args.format)?;
    let params = res
        .components
        .get("enhancer")
        .map(|(_, params)| params.clone())
        .ok_or_else(|| Error::msg("the run's configuration has no enhancer"))?;
    let source = crate::checkpoint::weights_file(&args.run_dir)?;
    let weights: BTreeMap<String, Tensor> = candle_core::safetensors::load(&source, &Device::Cpu)
        .map_err(|e| Error::Data {
            path: source.display().to_string(),
            message: e.to_string(),
        })?
        .into_iter()
        .collect();
    let mapped = map_names(&enhancer, &weights, args.format)?;
    let tensors: HashMap<String, Tensor> = mapped
        .iter()
        .map(|(k, (_, t))| (k.clone(), t.clone()))
        .collect();
    crate::checkpoint::save_safetensors(&args.out, &tensors)?;
    let report = ExportReport {
        format: args.format,
        model: (spec.model)(&params, res.cfg.data.image_size),
        enhancer,
        source: source.display().to_string(),
        tensors: mapped
            .into_iter()
            .map(|(k, (from, t))| {
                (
                    k,
                    MappedTensor {
                        from,
                        shape: t.dims().to_vec(),
                    },
                )
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::msg(e.to_string()))?;
    crate::checkpoint::write_atomic(&mapping_path(&args.out), json.as_bytes())?;
    Ok(report)
}

/// `OUT.safetensors` → `OUT.json`.
pub fn mapping_path(out: &Path) -> PathBuf {
    out.with_extension("json")
}
