//! `cim-run export`: the pre-trained enhancer as a PyTorch-loadable state dict — timm's ViT names or
//! torchvision's ResNet-50 names — plus a JSON mapping from cim's names.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use cim_api::{Error, Result};

use crate::config::resolve;

/// Target naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// timm's `VisionTransformer` (`vit_small_patch16_224`, `vit_base_patch16_224`, …), no head.
    Timm,
    /// torchvision's `resnet50`, without `fc`.
    Torchvision,
}

/// Options of `cim-run export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// A pre-training run directory (its `model.safetensors`, else its newest checkpoint).
    pub run_dir: PathBuf,
    #[arg(long, value_enum)]
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

/// Renames `enhancer.*` tensors to the target format. cim's ViT and ResNet plugins already use
/// timm's and torchvision's names under `enhancer.`, so the mapping strips the prefix, checks the
/// format fits the network, and adds torchvision's `num_batches_tracked` buffers (0).
pub fn map_names(
    enhancer: &str,
    weights: &BTreeMap<String, Tensor>,
    format: Format,
) -> Result<BTreeMap<String, (String, Tensor)>> {
    let is_vit = enhancer.starts_with("vit");
    match (format, is_vit, enhancer) {
        (Format::Timm, true, _) | (Format::Torchvision, false, "resnet50") => {}
        _ => {
            return Err(Error::config(format!(
                "--format {format:?} does not fit enhancer `{enhancer}` (timm: vit_*; torchvision: resnet50)"
            )))
        }
    }
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

fn model_name(enhancer: &str, patch: Option<i64>, width: Option<i64>, image: usize) -> String {
    match (enhancer, patch, width, image) {
        ("vit_s16", Some(16), Some(384), 224) => "vit_small_patch16_224".into(),
        ("vit_b16", Some(16), Some(768), 224) => "vit_base_patch16_224".into(),
        ("vit_tiny", Some(16), Some(192), 224) => "vit_tiny_patch16_224".into(),
        ("resnet50", _, _, _) => "resnet50".into(),
        _ => "custom".into(),
    }
}

pub fn export(args: &ExportArgs) -> Result<ExportReport> {
    let res = resolve(&crate::config::run_layers(&args.run_dir, vec![])?)?;
    let enhancer = res.cfg.enhancer["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let table = res
        .cfg
        .enhancer
        .get(&enhancer)
        .and_then(|v| v.as_dict().cloned());
    let get = |k: &str| {
        table
            .as_ref()
            .and_then(|t| t.get(k))
            .and_then(|v| v.to_i128())
            .map(|i| i as i64)
    };
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
        model: model_name(
            &enhancer,
            get("patch_size"),
            get("width"),
            res.cfg.data.image_size,
        ),
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
