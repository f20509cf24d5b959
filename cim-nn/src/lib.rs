//! # cim-nn — transformer layers shared by the ViT enhancers and the BEiT generator
//!
//! Execution choices (fused blocks, flash attention) are fixed when a block is built
//! ([`BlockSpec`], from the build context's `cim_api::ExecChoices`) and kept in it.
//!
//! Parameter names follow timm's `VisionTransformer` (`patch_embed.proj`, `blocks.N.attn.qkv`,
//! `blocks.N.mlp.fc1`, `norm`, …) so export to timm is a key-for-key copy. Every operation has a
//! backward pass: LayerNorm and the attention softmax are [`cim_ops`]' fused kernels (candle's
//! own fused softmax / LayerNorm have no backward), the rest candle's differentiable ops.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use cim_api::{Error, ExecChoices, Result};

/// Linear layer with weights ~ N(0, std²) (BEiT/timm use a truncated normal with std 0.02,
/// truncated at ±2 — i.e. at 100σ, which never triggers) and zero bias.
pub fn linear(d_in: usize, d_out: usize, std: f64, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (d_out, d_in),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: std,
        },
    )?;
    let b = vb.get_with_hints(d_out, "bias", Init::Const(0.0))?;
    Ok(Linear { weight: w, bias: b })
}

/// `y = x Wᵀ + b` over the last dimension (PyTorch's names `weight` `(out, in)`, `bias`). The
/// parameters are cast to the input's dtype at use, so f32 master weights serve a bf16 forward
/// (mixed precision, `run.precision = "bf16"`); in f32 the cast is a no-op.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Linear {
    /// `x · Wᵀ` without the bias, shaped `(…, out)`: for ops that fuse the bias into what follows
    /// ([`Mlp`]'s bias + GELU).
    pub fn forward_no_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        cim_ops::linear(x, &self.weight, None)
    }
}

impl Module for Linear {
    /// [`cim_ops::linear`]: one 2-D GEMM and the fused bias add, whose backward sums the bias
    /// gradient in parallel chunks (candle's strided column sum is single-threaded).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        cim_ops::linear(x, &self.weight, Some(&self.bias))
    }
}

/// LayerNorm over the last dimension ([`cim_ops::layer_norm`]: fused forward and backward on
/// CPU f32, composed from differentiable ops elsewhere).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    /// Computed in f32 whatever the input dtype (mixed precision keeps normalisation in f32;
    /// [`cim_ops::layer_norm_mixed`] makes the casts part of one graph node).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        cim_ops::layer_norm_mixed(x, &self.weight, &self.bias, self.eps)
    }
}

/// Non-overlapping patches → tokens. The weight keeps timm's conv layout `(D, 3, p, p)`; the
/// forward pass is a reshape + matmul, which equals a stride-p convolution.
#[derive(Clone, Debug)]
pub struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch: usize,
    dim: usize,
    channels: usize,
}

impl PatchEmbed {
    pub fn new(
        channels: usize,
        patch: usize,
        dim: usize,
        std: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let vb = vb.pp("proj");
        Ok(Self {
            weight: vb.get_with_hints(
                (dim, channels, patch, patch),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            patch,
            dim,
            channels,
        })
    }

    /// `(B, C, H, W)` → `(B, (H/p)·(W/p), D)`, row-major over the patch grid.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        if c != self.channels || h % p != 0 || w % p != 0 {
            return Err(Error::msg(format!(
                "patch embedding expects {} channels and sides divisible by {p}, got {:?}",
                self.channels,
                x.dims()
            )));
        }
        let (gh, gw) = (h / p, w / p);
        // One 2-D GEMM over all images' patches and the fused bias add (`ops::linear`): a batched
        // matmul against a broadcast weight would leave candle's backward a per-image GEMM loop
        // and a strided sum over the batch, and a broadcast bias a strided sum over all patches.
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let w = self.weight.reshape((self.dim, c * p * p))?;
        Ok(cim_ops::linear(&patches, &w, Some(&self.bias))?)
    }
}

/// `x + pos` for tokens `x` `(B, N, D)` and a position embedding `pos` `(1, N, D)`, as the fused
/// bias add over each image's `N·D` values: the embedding's gradient is a parallel sum over the
/// batch, where a broadcast add's backward is candle's strided sum on one thread.
pub fn add_pos_embed(x: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    if pos.dims() != [1, n, d] {
        return Err(Error::msg(format!(
            "position embedding of shape {:?} does not match tokens of shape {:?}",
            pos.dims(),
            x.dims()
        )));
    }
    let y = cim_ops::bias_add(&x.reshape((b, n * d))?, &pos.reshape(n * d)?)?;
    Ok(y.reshape((b, n, d))?)
}

/// Multi-head self-attention with a fused qkv projection.
#[derive(Clone, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    scale: f64,
    /// bf16 attention with 64-wide heads on CUDA through the flash kernels.
    flash: bool,
}

impl Attention {
    pub fn new(
        dim: usize,
        heads: usize,
        std: f64,
        proj_std: f64,
        flash: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        if dim == 0 || heads == 0 || !dim.is_multiple_of(heads) {
            return Err(Error::config(format!(
                "width {dim} is not divisible by {heads} attention heads"
            )));
        }
        Ok(Self {
            qkv: linear(dim, 3 * dim, std, vb.pp("qkv"))?,
            proj: linear(dim, dim, proj_std, vb.pp("proj"))?,
            heads,
            scale: 1.0 / ((dim / heads) as f64).sqrt(),
            flash,
        })
    }
}

impl Module for Attention {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // CPU f32: the fused kernel (no N×N tensors, no q/k/v copies); CUDA and bf16: matmuls
        // around an f32 softmax as one graph node (cim_ops::attention_gemm).
        let out =
            cim_ops::attention_qkv(&self.qkv.forward(x)?, self.heads, self.scale, self.flash)?;
        self.proj.forward(&out)
    }
}

/// The MLP of a transformer block: fc1 → GELU (erf) → fc2, fc1's bias and the GELU fused
/// ([`cim_ops::bias_gelu`]: one pass each way; bf16 through the f32 kernels as one graph node).
#[derive(Clone, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, std: f64, proj_std: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, hidden, std, vb.pp("fc1"))?,
            fc2: linear(hidden, dim, proj_std, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = cim_ops::bias_gelu(&self.fc1.forward_no_bias(x)?, &self.fc1.bias)?;
        self.fc2.forward(&h)
    }
}

/// Shape of a stack of pre-norm transformer blocks.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    pub dim: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub eps: f64,
    pub init_std: f64,
    /// BEiT's `fix_init_weight`: scale the output projections of block `i` by `1/sqrt(2(i+1))`.
    pub rescale_residual: bool,
    /// How the blocks compute (fused nodes, flash attention), fixed here at build time.
    pub exec: ExecChoices,
}

/// Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
/// No LayerScale; drop-path only when the caller passes keep factors (fine-tuning, Table 10).
#[derive(Clone, Debug)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
    /// One graph node per block where the fused kernels run ([`Self::forward_fused`]).
    fused: bool,
}

impl Block {
    pub fn new(spec: &BlockSpec, index: usize, vb: VarBuilder) -> Result<Self> {
        let proj_std = if spec.rescale_residual {
            spec.init_std / (2.0 * (index + 1) as f64).sqrt()
        } else {
            spec.init_std
        };
        let hidden = (spec.dim as f64 * spec.mlp_ratio).round() as usize;
        Ok(Self {
            norm1: LayerNorm::new(spec.dim, spec.eps, vb.pp("norm1"))?,
            attn: Attention::new(
                spec.dim,
                spec.heads,
                spec.init_std,
                proj_std,
                spec.exec.flash_attention,
                vb.pp("attn"),
            )?,
            norm2: LayerNorm::new(spec.dim, spec.eps, vb.pp("norm2"))?,
            mlp: Mlp::new(spec.dim, hidden, spec.init_std, proj_std, vb.pp("mlp"))?,
            fused: spec.exec.fused_blocks,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_drop(x, None, None)
    }
}

impl Block {
    /// The block, with stochastic depth when keep factors are given: one graph node
    /// ([`Self::forward_fused`]) where the fused kernels run and the block was built fused, else
    /// recorded op by op ([`Self::forward_recorded`]).
    pub fn forward_drop(
        &self,
        x: &Tensor,
        keep_attn: Option<&Tensor>,
        keep_mlp: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        if self.fused {
            let ones;
            let keep = match (keep_attn, keep_mlp) {
                (None, None) => None,
                (a, m) => {
                    ones = a.or(m).expect("one factor is given").ones_like()?;
                    Some((a.unwrap_or(&ones), m.unwrap_or(&ones)))
                }
            };
            if let Some(y) = self.forward_fused(x, keep)? {
                return Ok(y);
            }
        }
        self.forward_recorded(x, keep_attn, keep_mlp)
    }

    /// The block as one graph node with a hand-written backward ([`cim_ops::pre_norm_block`]),
    /// with stochastic depth's `(B, 1, 1)` keep factors of the attention and MLP branches when
    /// given; `None` where its kernels do not run (then [`Self::forward_recorded`] is the same
    /// function).
    pub fn forward_fused(
        &self,
        x: &Tensor,
        keep: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Option<Tensor>> {
        fn pair(l: &Linear) -> (&Tensor, &Tensor) {
            (&l.weight, &l.bias)
        }
        let p = cim_ops::BlockParams {
            norm1: (&self.norm1.weight, &self.norm1.bias),
            qkv: pair(&self.attn.qkv),
            proj: pair(&self.attn.proj),
            norm2: (&self.norm2.weight, &self.norm2.bias),
            fc1: pair(&self.mlp.fc1),
            fc2: pair(&self.mlp.fc2),
        };
        // Both norms take the block spec's eps; the attention scale is 1/√(head width) as here.
        cim_ops::pre_norm_block(
            x,
            &p,
            self.attn.heads,
            self.norm1.eps,
            keep,
            self.attn.flash,
        )
    }

    /// The block recorded op by op (candle's autograd through each op), with stochastic depth:
    /// each residual branch is multiplied by its per-sample `(B, 1, 1)` keep factor (0 or
    /// `1/keep_prob`) when one is given.
    pub fn forward_recorded(
        &self,
        x: &Tensor,
        keep_attn: Option<&Tensor>,
        keep_mlp: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let scaled = |branch: Tensor, keep: Option<&Tensor>| match keep {
            Some(k) => branch.broadcast_mul(k),
            None => Ok(branch),
        };
        let x = (x + scaled(self.attn.forward(&self.norm1.forward(x)?)?, keep_attn)?)?;
        &x + scaled(self.mlp.forward(&self.norm2.forward(&x)?)?, keep_mlp)?
    }
}

/// Per-sample keep factors of stochastic depth (Huang et al. 2016) at drop rate `rate`: each
/// entry is 0 with probability `rate`, else `1 / (1 - rate)` so the expectation is unchanged.
pub fn drop_path_keep(batch: usize, rate: f64, rng: &mut impl rand::Rng) -> Vec<f32> {
    let scale = (1.0 / (1.0 - rate)) as f32;
    (0..batch)
        .map(|_| if rng.gen_bool(rate) { 0.0 } else { scale })
        .collect()
}

/// `depth` blocks named `blocks.0 … blocks.{depth-1}` under `vb`.
pub fn blocks(spec: &BlockSpec, depth: usize, vb: VarBuilder) -> Result<Vec<Block>> {
    (0..depth)
        .map(|i| Block::new(spec, i, vb.pp("blocks").pp(i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use cim_api::ParamStore;

    #[test]
    fn patch_embed_equals_strided_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::trainable(1);
        let pe = PatchEmbed::new(3, 4, 5, 0.1, store.var_builder(DType::F32, &dev))?;
        let x = cim_api::testing::uniform((2, 3, 8, 12), 3)?;
        let ours = pe.forward(&x)?; // (2, 6, 5)
        let conv = x
            .conv2d(&pe.weight, 0, 4, 1, 1)?
            .broadcast_add(&pe.bias.reshape((1, 5, 1, 1))?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let diff = (ours - conv)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    /// The block as one node against the same block recorded op by op: values and the gradients
    /// of the input and all twelve parameters (what the ViT and BEiT trunks train through),
    /// without and with stochastic depth's keep factors.
    #[test]
    fn fused_block_matches_the_recorded_block() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let store = ParamStore::trainable(7);
        let spec = BlockSpec {
            dim: 24,
            heads: 3,
            mlp_ratio: 2.0,
            eps: 1e-6,
            init_std: 0.3,
            rescale_residual: true,
            exec: ExecChoices::default(),
        };
        let block = Block::new(&spec, 1, store.var_builder(DType::F32, &dev))?;
        let x = Var::from_tensor(&cim_api::testing::uniform((3, 9, 24), 5)?)?;
        let up = cim_api::testing::uniform((3, 9, 24), 6)?;
        // Sample 0 drops its attention branch, sample 1 its MLP branch, sample 2 neither.
        let ka = Tensor::new(&[[[0f32]], [[1.25]], [[1.25]]], &dev)?;
        let km = Tensor::new(&[[[1.25f32]], [[0.0]], [[1.25]]], &dev)?;
        for keep in [None, Some((&ka, &km))] {
            let fused = block
                .forward_fused(&x, keep)?
                .expect("the CPU runs the block node");
            let recorded = block.forward_recorded(&x, keep.map(|k| k.0), keep.map(|k| k.1))?;
            let d = (&fused - &recorded)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "values differ by {d} (keep: {})", keep.is_some());
            let gf = (&fused * &up)?.sum_all()?.backward()?;
            let gr = (&recorded * &up)?.sum_all()?.backward()?;
            let mut vars = store.vars();
            assert_eq!(vars.len(), 12, "a block has twelve parameters");
            vars.push(("x".into(), x.clone()));
            for (name, v) in &vars {
                let (a, b) = (gf.get(v).expect(name), gr.get(v).expect(name));
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    d <= 1e-4 * s.max(1e-3),
                    "{name}: gradient differs by {d} (max {s}, keep: {})",
                    keep.is_some()
                );
            }
        }
        // Through forward_drop with one branch's factors only.
        let one = block.forward_drop(&x, Some(&ka), None)?;
        let want = block.forward_recorded(&x, Some(&ka), None)?;
        assert!((one - want)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        Ok(())
    }

    #[test]
    fn layer_norm_normalises_last_dim() -> Result<()> {
        let dev = Device::Cpu;
        let store = ParamStore::trainable(1);
        let ln = LayerNorm::new(6, 1e-6, store.var_builder(DType::F32, &dev))?;
        let x = cim_api::testing::uniform((3, 6), 2)?.affine(10.0, 3.0)?;
        let y = ln.forward(&x)?;
        let m = y.mean_keepdim(1)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let v = y.sqr()?.mean_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(m < 1e-5);
        for v in v {
            assert!((v - 1.0).abs() < 1e-3, "{v}");
        }
        Ok(())
    }
}
