//! # `beit` — the small BEiT generator
//!
//! Paper §2.1/§2.3: "a small trainable BEiT" sees the patch embeddings of the image with k
//! positions replaced by a learned `[MASK]` embedding (Eq. 1) and is trained to maximise
//! `log p(g | x_masked)` of the golden tokens at the masked positions. Its size is "typically a
//! quarter or a half of the enhancer"; Table 9: depth 4–6, width = the enhancer's width for ViT
//! enhancers, 384 for ResNet-50.
//!
//! - input: `(B, 3, H, W)` normalised image whose `p×p` patch grid equals the token grid
//!   (`p = H / grid`: 16 for 224 px and a 14×14 grid) and a [`Mask`] on that grid
//! - output: logits `(M, V)` at the M masked positions, in [`Mask::flat_indices`] order
//!
//! Layout follows BEiT's `VisionTransformerForMaskedImageModeling` (microsoft/unilm, beit/
//! modeling_pretrain.py): patch embed, cls token, mask token, absolute position embedding,
//! pre-norm blocks with BEiT's residual rescaling at init, final norm, linear `lm_head`.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use cim_nn::Linear;
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Error, ExecChoices, Generator, Mask, Result, TokenGrid};
use cim_nn::{self as layers, BlockSpec, LayerNorm, PatchEmbed};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeitConfig {
    /// Transformer depth (paper: 4–6).
    pub depth: usize,
    /// Width; `None` takes the enhancer's feature width (paper Table 9 for ViT enhancers).
    pub width: Option<usize>,
    /// Attention heads; `None` uses 64-wide heads (`width / 64`, at least 1).
    pub heads: Option<usize>,
    pub mlp_ratio: f64,
    pub layer_norm_eps: f64,
    pub init_std: f64,
    /// Share the patch embedding and the first `share_blocks` transformer blocks with a ViT
    /// enhancer (paper Table 5 uses 2); 0 = no sharing.
    pub share_blocks: usize,
}

impl Default for BeitConfig {
    fn default() -> Self {
        Self {
            depth: 4,
            width: None,
            heads: None,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            init_std: 0.02,
            share_blocks: 0,
        }
    }
}

impl BeitConfig {
    pub fn test_tiny() -> Self {
        Self {
            depth: 2,
            width: Some(16),
            heads: Some(2),
            ..Self::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct Beit {
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    mask_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<layers::Block>,
    norm: LayerNorm,
    lm_head: Linear,
    grid: TokenGrid,
    dim: usize,
}

impl Beit {
    /// `image_size`: square input side; `grid`: the tokenizer's token grid; `vocab`: its size;
    /// `shared`: the enhancer's `VarBuilder`, whose `patch_embed` and first `cfg.share_blocks`
    /// blocks this generator reuses (the same variables, so both losses train them).
    pub fn new(
        cfg: &BeitConfig,
        width: usize,
        image_size: usize,
        grid: TokenGrid,
        vocab: usize,
        vb: VarBuilder,
        shared: Option<VarBuilder>,
        exec: ExecChoices,
    ) -> Result<Self> {
        if grid.h != grid.w || grid.h == 0 || !image_size.is_multiple_of(grid.h) {
            return Err(Error::config(format!(
                "beit: the {image_size}-px image cannot be cut into the tokenizer's {grid} token grid \
                 (needs a square grid dividing the image size)"
            )));
        }
        let patch = image_size / grid.h;
        let heads = cfg.heads.unwrap_or((width / 64).max(1));
        if width == 0 || heads == 0 || !width.is_multiple_of(heads) {
            let whence = match cfg.width {
                Some(_) => "generator.beit.width".to_string(),
                None => "the enhancer's width, which the generator follows unless generator.beit.width is set".to_string(),
            };
            return Err(Error::config(format!(
                "generator.beit: width {width} ({whence}) is not divisible by {heads} attention heads; \
                 set generator.beit.heads to a divisor of {width}, or generator.beit.width"
            )));
        }
        let spec = BlockSpec {
            dim: width,
            heads,
            mlp_ratio: cfg.mlp_ratio,
            eps: cfg.layer_norm_eps,
            init_std: cfg.init_std,
            rescale_residual: true,
            exec,
        };
        let std = Init::Randn {
            mean: 0.0,
            stdev: cfg.init_std,
        };
        let n_shared = if shared.is_some() {
            cfg.share_blocks.min(cfg.depth)
        } else {
            0
        };
        let pe_vb = shared
            .as_ref()
            .map(|s| s.pp("patch_embed"))
            .unwrap_or_else(|| vb.pp("patch_embed"));
        let blocks = (0..cfg.depth)
            .map(|i| {
                let owner = if i < n_shared {
                    shared.as_ref().expect("n_shared > 0")
                } else {
                    &vb
                };
                layers::Block::new(&spec, i, owner.pp("blocks").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed: PatchEmbed::new(3, patch, width, cfg.init_std, pe_vb)?,
            cls_token: vb.get_with_hints((1, 1, width), "cls_token", std)?,
            mask_token: vb.get_with_hints((1, 1, width), "mask_token", std)?,
            pos_embed: vb.get_with_hints((1, grid.len() + 1, width), "pos_embed", std)?,
            blocks,
            norm: LayerNorm::new(width, cfg.layer_norm_eps, vb.pp("norm"))?,
            lm_head: layers::linear(width, vocab, cfg.init_std, vb.pp("lm_head"))?,
            grid,
            dim: width,
        })
    }

    /// Hidden states after the final norm for every patch position, `(B, N, D)`.
    pub fn hidden(&self, image: &Tensor, mask: &Mask) -> Result<Tensor> {
        if mask.grid() != self.grid {
            return Err(Error::msg(format!(
                "beit: mask grid {} differs from the token grid {}",
                mask.grid(),
                self.grid
            )));
        }
        let x = self.patch_embed.forward(image)?;
        let (b, n, d) = x.dims3()?;
        // Eq. (1): replace(x, m, [MASK]) as a blend, so the mask token gets its gradient.
        let w = mask.to_tensor(x.dtype(), x.device())?.reshape((b, n, 1))?;
        let dt = x.dtype();
        // The mask token's share `w ⊗ token` as a rank-1 product, so its gradient is one GEMM
        // (`wᵀ · dY`) rather than a broadcast's strided sum over all positions.
        let mask_tok = w
            .reshape((b * n, 1))?
            .matmul(&self.mask_token.to_dtype(dt)?.reshape((1, d))?)?
            .reshape((b, n, d))?;
        let x = (x.broadcast_mul(&(1.0 - &w)?)? + mask_tok)?;
        let cls = self.cls_token.to_dtype(dt)?.broadcast_as((b, 1, d))?;
        let mut x = layers::add_pos_embed(&Tensor::cat(&[&cls, &x], 1)?, &self.pos_embed)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        Ok(self.norm.forward(&x)?.narrow(1, 1, n)?)
    }

    pub fn width(&self) -> usize {
        self.dim
    }
}

impl Generator for Beit {
    fn forward(&self, image: &Tensor, mask: &Mask) -> Result<Tensor> {
        let h = self.hidden(image, mask)?;
        let (b, n, d) = h.dims3()?;
        // The head only runs where it is needed: at the masked positions (a row gather whose
        // backward is a gather too: candle's index_add backward is serial over the rows on CUDA).
        let at_mask = cim_ops::select_rows(&h.reshape((b * n, d))?, &mask.flat_indices())?;
        Ok(self.lm_head.forward(&at_mask)?)
    }

    fn mim_loss(&self, logits: &Tensor, golden: &Tensor) -> Result<Tensor> {
        // f32 arithmetic whatever the logits' dtype (bf16 ones are read as they are on CUDA).
        Ok(cim_ops::cross_entropy(logits, golden)?)
    }
}

fn build(cfg: BeitConfig, ctx: &BuildCtx) -> Result<Beit> {
    let width = match cfg.width {
        Some(w) => w,
        None => ctx.enhancer("generator beit (width = enhancer width)")?.dim,
    };
    let grid = ctx.token_grid("generator beit")?;
    let shared = if cfg.share_blocks > 0 {
        let info = ctx.enhancer("generator beit (share_blocks)")?;
        let depth = info.shareable_blocks.ok_or_else(|| {
            Error::config(format!(
                "generator.beit.share_blocks = {} needs a ViT enhancer to share its patch embedding and blocks with; \
                 the selected enhancer ({}-wide features at stride {}) has no transformer blocks — set share_blocks = 0",
                cfg.share_blocks, info.dim, info.stride
            ))
        })?;
        let patch = ctx.image_size / grid.h.max(1);
        if cfg.share_blocks > depth.min(cfg.depth) || width != info.dim || patch != info.stride {
            return Err(Error::config(format!(
                "generator.beit.share_blocks = {}: sharing needs the generator's width ({width}) and patch ({patch}) to equal \
                 the enhancer's ({}, {}) and at most min(generator depth {}, enhancer depth {depth}) blocks",
                cfg.share_blocks, info.dim, info.stride, cfg.depth
            )));
        }
        Some(ctx.enhancer_vb.clone().ok_or_else(|| {
            Error::msg("share_blocks: the runner did not pass the enhancer's parameters")
        })?)
    } else {
        None
    };
    Beit::new(
        &cfg,
        width,
        ctx.image_size,
        grid,
        ctx.vocab_size("generator beit")?,
        ctx.vb.clone(),
        shared,
        ctx.exec,
    )
}

cim_api::register_generator! {
    name: "beit",
    about: "small BEiT doing masked image modeling on the token grid (paper §2.1; depth 4, width = enhancer's)",
    config: BeitConfig,
    default: BeitConfig::default(),
    tiny: BeitConfig::test_tiny(),
    build: build,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use cim_api::ParamStore;

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_generator("beit")
    }

    #[test]
    fn masked_positions_do_not_see_their_own_pixels() -> Result<()> {
        // Changing the pixels of a masked patch must not change any output: the patch embedding
        // there is replaced by the mask token before the transformer.
        let store = ParamStore::trainable(0);
        let g = Beit::new(
            &BeitConfig::test_tiny(),
            16,
            32,
            TokenGrid::new(8, 8),
            64,
            store.var_builder(DType::F32, &Device::Cpu),
            None,
            ExecChoices::default(),
        )?;
        let mask = cim_api::testing::simple_mask(1, TokenGrid::new(8, 8), 5)?;
        assert!(mask.is_masked(0, 0));
        let img = cim_api::testing::uniform((1, 3, 32, 32), 1)?;
        // Overwrite patch (0,0) — pixels [0..4, 0..4] — with other values.
        let patch = cim_api::testing::uniform((1, 3, 4, 4), 2)?;
        let rest_right = img.narrow(2, 0, 4)?.narrow(3, 4, 28)?;
        let top = Tensor::cat(&[&patch, &rest_right], 3)?;
        let img2 = Tensor::cat(&[&top, &img.narrow(2, 4, 28)?], 2)?;
        let a = g.forward(&img, &mask)?;
        let b = g.forward(&img2, &mask)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "masked patch leaked into the output: {diff}");
        Ok(())
    }
}
