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

use cim_nn as layers;

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Enhancer, EnhancerInfo, Error, ExecChoices, Features, Result, TokenGrid};

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
    /// Stochastic depth: the drop rate of the last block's residual branches, rising linearly
    /// from 0 at the first block (timm/BEiT); active only in training. Pre-training (Table 9)
    /// uses none; fine-tuning (Table 10) uses 0.1.
    pub drop_path: f64,
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
            drop_path: 0.0,
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
    drop_path: f64,
    /// Stochastic depth's draws (seeded from the run's seed).
    rng: std::sync::Arc<std::sync::Mutex<rand::rngs::StdRng>>,
}

impl Vit {
    pub fn new(cfg: &VitConfig, image_size: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_seed(cfg, image_size, vb, 0, ExecChoices::default())
    }

    /// As [`Vit::new`], seeding stochastic depth's random draws with `seed` and computing as
    /// `exec` says (fused blocks, flash attention).
    pub fn with_seed(
        cfg: &VitConfig,
        image_size: usize,
        vb: VarBuilder,
        seed: u64,
        exec: ExecChoices,
    ) -> Result<Self> {
        use rand::SeedableRng;
        if !(0.0..1.0).contains(&cfg.drop_path) {
            return Err(Error::config(format!(
                "vit: drop_path = {} must be in [0, 1)",
                cfg.drop_path
            )));
        }
        if cfg.width == 0 || cfg.heads == 0 || !cfg.width.is_multiple_of(cfg.heads) {
            return Err(Error::config(format!(
                "vit: width = {} must be a positive multiple of heads = {}",
                cfg.width, cfg.heads
            )));
        }
        if cfg.patch_size == 0 || !image_size.is_multiple_of(cfg.patch_size) {
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
            exec,
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
            drop_path: cfg.drop_path,
            rng: std::sync::Arc::new(std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(
                seed ^ 0xD80F_9A7E,
            ))),
        })
    }

    /// All tokens after the final norm, class token first: `(B, 1 + N, D)` (inference).
    pub fn forward_all(&self, image: &Tensor) -> Result<Tensor> {
        self.forward_all_t(image, false)
    }

    /// As [`Vit::forward_all`]; in training with `drop_path > 0`, block `i` of `L` drops each
    /// sample's attention and MLP branches independently at rate `drop_path · i / (L − 1)`.
    pub fn forward_all_t(&self, image: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.patch_embed.forward(image)?;
        let b = x.dim(0)?;
        let dt = x.dtype();
        let cls = self
            .cls_token
            .to_dtype(dt)?
            .broadcast_as((b, 1, self.info.dim))?;
        let mut x = layers::add_pos_embed(&Tensor::cat(&[&cls, &x], 1)?, &self.pos_embed)?;
        let depth = self.blocks.len();
        for (i, blk) in self.blocks.iter().enumerate() {
            let rate = self.drop_path * i as f64 / (depth.max(2) - 1) as f64;
            x = if train && rate > 0.0 {
                let mut rng = self.rng.lock().expect("drop-path rng poisoned");
                let mut keep = || -> Result<Tensor> {
                    let k = layers::drop_path_keep(b, rate, &mut *rng);
                    Ok(Tensor::from_vec(k, (b, 1, 1), x.device())?.to_dtype(x.dtype())?)
                };
                let (ka, km) = (keep()?, keep()?);
                blk.forward_drop(&x, Some(&ka), Some(&km))?
            } else {
                blk.forward(&x)?
            };
        }
        Ok(self.norm.forward(&x)?)
    }
}

impl Enhancer for Vit {
    fn info(&self) -> EnhancerInfo {
        self.info
    }
    fn forward_t(&self, image: &Tensor, train: bool) -> Result<Features> {
        let x = self.forward_all_t(image, train)?;
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
    Vit::with_seed(&cfg, ctx.image_size, ctx.vb.clone(), ctx.seed, ctx.exec)
}

/// The parameters are timm's `VisionTransformer`'s, by name and layout.
const TIMM: cim_api::ExportSpec = cim_api::ExportSpec {
    format: "timm",
    model: timm_model,
};

/// timm's constructor for a ViT of these parameters at `image_size` px, or `"custom"`.
fn timm_model(params: &cim_api::figment::value::Value, image_size: usize) -> String {
    let Ok(c) = params.deserialize::<VitConfig>() else {
        return "custom".into();
    };
    let standard = c.patch_size == 16 && c.depth == 12 && c.mlp_ratio == 4.0 && image_size == 224;
    match (standard, c.width, c.heads) {
        (true, 192, 3) => "vit_tiny_patch16_224".into(),
        (true, 384, 6) => "vit_small_patch16_224".into(),
        (true, 768, 12) => "vit_base_patch16_224".into(),
        _ => "custom".into(),
    }
}

cim_api::register_enhancer! {
    name: "vit_tiny",
    about: "ViT-Tiny (DeiT-Ti widths: 192 wide, 12 deep, 3 heads, patch 16)",
    config: VitConfig,
    default: VitConfig::vit_tiny(),
    tiny: VitConfig::test_tiny(),
    build: build,
    mixed_precision: true,
    export: TIMM,
}

cim_api::register_enhancer! {
    name: "vit_s16",
    about: "ViT-S/16 (384 wide, 12 deep, 6 heads), paper Table 1",
    config: VitConfig,
    default: VitConfig::vit_s16(),
    tiny: VitConfig::test_tiny(),
    build: build,
    mixed_precision: true,
    export: TIMM,
}

cim_api::register_enhancer! {
    name: "vit_b16",
    about: "ViT-B/16 (768 wide, 12 deep, 12 heads), paper Table 1",
    config: VitConfig,
    default: VitConfig::vit_b16(),
    tiny: VitConfig::test_tiny(),
    build: build,
    mixed_precision: true,
    export: TIMM,
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

    #[test]
    fn stochastic_depth_drops_whole_branches_in_training_only() -> Result<()> {
        use rand::SeedableRng;
        // The keep factors: 0 at the configured rate, else 1/(1 − rate).
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let k = layers::drop_path_keep(20_000, 0.3, &mut rng);
        let dropped = k.iter().filter(|&&v| v == 0.0).count() as f64 / k.len() as f64;
        assert!((dropped - 0.3).abs() < 0.015, "{dropped}");
        assert!(k.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.7).abs() < 1e-6));

        let image = cim_api::testing::uniform((4, 3, 32, 32), 1)?;
        let run = |drop_path: f64, train: bool| -> Result<Vec<f32>> {
            let store = ParamStore::trainable(0);
            let cfg = VitConfig {
                drop_path,
                ..VitConfig::test_tiny()
            };
            let vit = Vit::with_seed(
                &cfg,
                32,
                store.var_builder(DType::F32, &Device::Cpu),
                0,
                ExecChoices::default(),
            )?;
            Ok(vit
                .forward_t(&image, train)?
                .tokens
                .flatten_all()?
                .to_vec1()?)
        };
        // Evaluation ignores drop_path; training with drop_path 0 is the plain network.
        assert_eq!(run(0.5, false)?, run(0.0, false)?);
        assert_eq!(run(0.0, true)?, run(0.0, false)?);
        // Training with drop_path changes the output (2 blocks: the second drops at 0.5).
        assert_ne!(run(0.5, true)?, run(0.0, true)?);
        let store = ParamStore::trainable(0);
        let bad = VitConfig {
            drop_path: 1.0,
            ..VitConfig::test_tiny()
        };
        let e = Vit::new(&bad, 32, store.var_builder(DType::F32, &Device::Cpu))
            .err()
            .unwrap();
        assert!(e.to_string().contains("drop_path"), "{e}");
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
