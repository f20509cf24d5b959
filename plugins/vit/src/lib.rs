//! # ViT enhancers — `vit_tiny`, `vit_s16`, `vit_b16`
//!
//! The vanilla Vision Transformer (Dosovitskiy et al., 2020; DeiT, Touvron et al., 2021) as the
//! CiM enhancer (paper §2.2 and Table 9): "1-D Absolute Pos. Emb.", no LayerScale, no dropout,
//! no stochastic depth during pre-training.
//!
//! - input: `(B, 3, H, W)` normalised image, `H = W = image_size` from the run config
//! - output: [`Features`] with `(B, (H/p)², D)` patch tokens after the final LayerNorm (the class
//!   token is computed and attended to, but not returned)
//!
//! Parameter names are timm's `vit_*_patch16_224` names (`cls_token`, `pos_embed`,
//! `patch_embed.proj.weight`, `blocks.N.…`, `norm`). Reference: timm
//! `timm/models/vision_transformer.py`.
//!
//! | name       | width | depth | heads | patch |
//! |------------|------:|------:|------:|------:|
//! | `vit_tiny` |   192 |    12 |     3 |    16 |
//! | `vit_s16`  |   384 |    12 |     6 |    16 |
//! | `vit_b16`  |   768 |    12 |    12 |    16 |

pub mod layers;

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Enhancer, EnhancerInfo, Error, Features, Result, TokenGrid};

use layers::{BlockSpec, LayerNorm, PatchEmbed};

/// ViT hyper-parameters. The input size is not here: it comes from the run (`data.image_size`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub patch_size: usize,
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub layer_norm_eps: f64,
    /// Std of the normal initialisation of weights and embeddings (timm/BEiT: 0.02).
    pub init_std: f64,
}

impl VitConfig {
    fn with(patch_size: usize, width: usize, depth: usize, heads: usize) -> Self {
        Self {
            patch_size,
            width,
            depth,
            heads,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            init_std: 0.02,
        }
    }
    /// DeiT-Tiny widths (5.7M parameters).
    pub fn vit_tiny() -> Self {
        Self::with(16, 192, 12, 3)
    }
    /// ViT-S/16 (21.7M parameters in the trunk).
    pub fn vit_s16() -> Self {
        Self::with(16, 384, 12, 6)
    }
    /// ViT-B/16 (85.8M parameters in the trunk).
    pub fn vit_b16() -> Self {
        Self::with(16, 768, 12, 12)
    }
    /// For conformance tests: 32-px inputs, 4-px patches.
    pub fn test_tiny() -> Self {
        Self::with(4, 16, 2, 2)
    }
}

impl Default for VitConfig {
    fn default() -> Self {
        Self::vit_b16()
    }
}

/// The ViT trunk.
#[derive(Clone, Debug)]
pub struct Vit {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<layers::Block>,
    norm: LayerNorm,
    info: EnhancerInfo,
}

impl Vit {
    pub fn new(cfg: &VitConfig, image_size: usize, vb: VarBuilder) -> Result<Self> {
        if cfg.patch_size == 0 || image_size % cfg.patch_size != 0 {
            return Err(Error::config(format!(
                "vit: image size {image_size} is not divisible by patch_size {}",
                cfg.patch_size
            )));
        }
        let grid = image_size / cfg.patch_size;
        let n = grid * grid;
        let std = Init::Randn {
            mean: 0.0,
            stdev: cfg.init_std,
        };
        let spec = BlockSpec {
            dim: cfg.width,
            heads: cfg.heads,
            mlp_ratio: cfg.mlp_ratio,
            eps: cfg.layer_norm_eps,
            init_std: cfg.init_std,
            rescale_residual: false,
        };
        Ok(Self {
            patch_embed: PatchEmbed::new(
                3,
                cfg.patch_size,
                cfg.width,
                cfg.init_std,
                vb.pp("patch_embed"),
            )?,
            cls_token: vb.get_with_hints((1, 1, cfg.width), "cls_token", std)?,
            pos_embed: vb.get_with_hints((1, n + 1, cfg.width), "pos_embed", std)?,
            blocks: layers::blocks(&spec, cfg.depth, vb.clone())?,
            norm: LayerNorm::new(cfg.width, cfg.layer_norm_eps, vb.pp("norm"))?,
            info: EnhancerInfo {
                dim: cfg.width,
                stride: cfg.patch_size,
                image_size,
                shareable_blocks: Some(cfg.depth),
            },
        })
    }

    /// All tokens after the final norm, class token first: `(B, 1 + N, D)`.
    pub fn forward_all(&self, image: &Tensor) -> Result<Tensor> {
        let x = self.patch_embed.forward(image)?;
        let b = x.dim(0)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.info.dim))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        Ok(self.norm.forward(&x)?)
    }
}

impl Enhancer for Vit {
    fn info(&self) -> EnhancerInfo {
        self.info
    }
    fn forward_t(&self, image: &Tensor, _train: bool) -> Result<Features> {
        let x = self.forward_all(image)?;
        let n = x.dim(1)? - 1;
        let grid: TokenGrid = self.info.grid();
        Ok(Features {
            tokens: x.narrow(1, 1, n)?,
            grid,
            stride: self.info.stride,
            cls: Some(x.narrow(1, 0, 1)?.squeeze(1)?),
        })
    }
}

fn build(cfg: VitConfig, ctx: &BuildCtx) -> Result<Vit> {
    Vit::new(&cfg, ctx.image_size, ctx.vb.clone())
}

cim_api::register_enhancer! {
    name: "vit_tiny",
    about: "ViT-Tiny (DeiT-Ti widths: 192 wide, 12 deep, 3 heads, patch 16)",
    config: VitConfig,
    default: VitConfig::vit_tiny(),
    tiny: VitConfig::test_tiny(),
    build: build,
}

cim_api::register_enhancer! {
    name: "vit_s16",
    about: "ViT-S/16 (384 wide, 12 deep, 6 heads), paper Table 1",
    config: VitConfig,
    default: VitConfig::vit_s16(),
    tiny: VitConfig::test_tiny(),
    build: build,
}

cim_api::register_enhancer! {
    name: "vit_b16",
    about: "ViT-B/16 (768 wide, 12 deep, 12 heads), paper Table 1",
    config: VitConfig,
    default: VitConfig::vit_b16(),
    tiny: VitConfig::test_tiny(),
    build: build,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use cim_api::ParamStore;

    #[test]
    fn conformance() -> Result<()> {
        for name in ["vit_tiny", "vit_s16", "vit_b16"] {
            cim_api::testing::check_enhancer(name)?;
        }
        Ok(())
    }

    /// Trunk parameter counts (patch embed + cls + pos + blocks + final norm, no head), as
    /// timm's `vit_small_patch16_224(num_classes=0)` / `vit_base_patch16_224(num_classes=0)`
    /// report: 21,665,664 and 85,798,656 (`sum(p.numel() for p in m.parameters())`).
    #[test]
    fn parameter_counts_match_timm() -> Result<()> {
        for (cfg, expected) in [
            (VitConfig::vit_s16(), 21_665_664),
            (VitConfig::vit_b16(), 85_798_656),
        ] {
            let store = ParamStore::trainable(0);
            // Zero-cost shapes: build on CPU and count.
            let _ = Vit::new(&cfg, 224, store.var_builder(DType::F32, &Device::Cpu))?;
            assert_eq!(store.num_params(), expected, "{cfg:?}");
        }
        Ok(())
    }
}
