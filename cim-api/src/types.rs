//! Shared types that flow between components during one CiM step.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The grid of discrete visual tokens (and of generator patches): 14×14 for a 224-px image with
/// 16-px patches and a 112-px tokenizer view with DALL-E's 8× downsampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrid {
    pub h: usize,
    pub w: usize,
}

impl TokenGrid {
    pub fn new(h: usize, w: usize) -> Self {
        Self { h, w }
    }
    /// Number of positions, `n` in the paper's Eq. (1).
    pub fn len(&self) -> usize {
        self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Display for TokenGrid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}", self.h, self.w)
    }
}

/// Which token positions the generator masks, per image. Host-side: masks are drawn on the CPU
/// from a seeded RNG, so they are identical on every device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    batch: usize,
    grid: TokenGrid,
    /// Row-major `(batch, grid.len())`.
    flags: Vec<bool>,
}

impl Mask {
    pub fn new(batch: usize, grid: TokenGrid, flags: Vec<bool>) -> Result<Self> {
        if flags.len() != batch * grid.len() {
            return Err(Error::msg(format!(
                "mask has {} flags, expected batch {batch} × grid {grid} = {}",
                flags.len(),
                batch * grid.len()
            )));
        }
        Ok(Self { batch, grid, flags })
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn grid(&self) -> TokenGrid {
        self.grid
    }
    pub fn flags(&self) -> &[bool] {
        &self.flags
    }
    /// Whether position `pos` (row-major in the grid) of image `b` is masked.
    pub fn is_masked(&self, b: usize, pos: usize) -> bool {
        self.flags[b * self.grid.len() + pos]
    }
    /// Masked positions per image (`k` in the paper).
    pub fn counts(&self) -> Vec<usize> {
        self.flags
            .chunks(self.grid.len())
            .map(|c| c.iter().filter(|&&m| m).count())
            .collect()
    }
    /// All masked positions of the batch (`M = Σ k`).
    pub fn total(&self) -> usize {
        self.flags.iter().filter(|&&m| m).count()
    }
    /// Flat indices `b·n + pos` of masked positions, in row-major order. Generators return their
    /// logits in this order and samplers' outputs follow it.
    pub fn flat_indices(&self) -> Vec<u32> {
        self.flags
            .iter()
            .enumerate()
            .filter(|(_, &m)| m)
            .map(|(i, _)| i as u32)
            .collect()
    }
    /// `(B, n)` tensor with 1 at masked positions.
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.flags.iter().map(|&m| m as u8 as f32).collect();
        Ok(Tensor::from_vec(v, (self.batch, self.grid.len()), device)?.to_dtype(dtype)?)
    }
    /// `(M,)` u32 tensor of [`Mask::flat_indices`].
    pub fn indices_tensor(&self, device: &Device) -> Result<Tensor> {
        let idx = self.flat_indices();
        let n = idx.len();
        Ok(Tensor::from_vec(idx, n, device)?)
    }
}

/// What an enhancer tells the objective about its output, known at build time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnhancerInfo {
    /// Feature width `D`.
    pub dim: usize,
    /// Pixels per feature position along each axis (16 for ViT-B/16, 32 for ResNet-50).
    pub stride: usize,
    /// Input resolution (square).
    pub image_size: usize,
    /// Set by transformer enhancers whose patch embedding and blocks use the shared ViT layout
    /// (`patch_embed.proj`, `blocks.N.…`), so a generator may share them (paper Table 5).
    pub shareable_blocks: Option<usize>,
}

impl EnhancerInfo {
    pub fn grid(&self) -> TokenGrid {
        TokenGrid::new(self.image_size / self.stride, self.image_size / self.stride)
    }
}

/// Enhancer output: one feature vector per position of its grid.
#[derive(Clone, Debug)]
pub struct Features {
    /// `(B, grid.len(), D)`, row-major over the grid; no class token.
    pub tokens: Tensor,
    pub grid: TokenGrid,
    pub stride: usize,
    /// The network's own image summary where it has one: a ViT's class token after the final
    /// norm, `(B, D)`. `None` for networks without one (ResNet: pool `tokens` instead).
    pub cls: Option<Tensor>,
}

impl Features {
    /// The same features in `dtype` (mixed precision: the objective sees f32).
    pub fn to_dtype(&self, dtype: candle_core::DType) -> crate::Result<Self> {
        Ok(Self {
            tokens: self.tokens.to_dtype(dtype)?,
            grid: self.grid,
            stride: self.stride,
            cls: self.cls.as_ref().map(|c| c.to_dtype(dtype)).transpose()?,
        })
    }
}

/// Everything an objective may look at besides the enhancer output.
#[derive(Clone, Copy, Debug)]
pub struct ObjectiveBatch<'a> {
    /// Original images, `(B, 3, H, W)` in `[0, 1]` (not normalised): RESPIX's target source.
    pub original: &'a Tensor,
    /// The corrupted images the enhancer saw, `(B, 3, H, W)` in `[0, 1]`.
    pub corrupted: &'a Tensor,
    /// The generator's mask on the token grid.
    pub mask: &'a Mask,
    /// `(B, n)` f32, 1 where the sampled token differs from the golden one: REVDET's label.
    pub replaced: &'a Tensor,
}

/// An objective's loss and, for pictures, its prediction and target in image layout.
#[derive(Clone, Debug)]
pub struct ObjectiveOutput {
    /// Scalar loss, unweighted (the runner multiplies by [`crate::Objective::weight`]).
    pub loss: Tensor,
    /// `(B, 3, H, W)` prediction when the objective predicts pixels.
    pub prediction: Option<Tensor>,
    /// `(B, 3, H, W)` target when the objective regresses pixels.
    pub target: Option<Tensor>,
}

/// Named scalar losses and metrics of one step, in a stable order for logs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Losses(pub BTreeMap<String, f64>);

impl Losses {
    pub fn insert(&mut self, name: impl Into<String>, value: f64) {
        self.0.insert(name.into(), value);
    }
    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
    /// The first non-finite entry, if any.
    pub fn first_non_finite(&self) -> Option<(&str, f64)> {
        self.0
            .iter()
            .find(|(_, v)| !v.is_finite())
            .map(|(k, v)| (k.as_str(), *v))
    }
}

/// Which precision a frozen tokenizer runs in, and how often its tokens equal the f32 ones
/// (measured on the batch where it chose; 1 for f32).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PrecisionReport {
    /// `"f32"`, `"bf16"` or `"f16"`.
    pub dtype: String,
    /// Fraction of token ids equal to the f32 encoder's.
    pub agreement: f64,
    /// Number of tokens the agreement was measured on (0 when nothing was compared).
    pub tokens: usize,
    /// The decoder's precision where it differs from the encoder's (`None`: the same network).
    pub decoder: Option<DecoderPrecisionReport>,
}

/// A frozen decoder run in its own precision, and how far its images are from the f32 decoder's
/// (pixels in `[0, 1]`, measured on the first batch it decoded; `None` before that).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DecoderPrecisionReport {
    /// `"f32"`, `"bf16"` or `"f16"`.
    pub dtype: String,
    /// Largest absolute pixel difference from the f32 decoder's output.
    pub max_abs_diff: Option<f64>,
    /// Mean absolute pixel difference from the f32 decoder's output.
    pub mean_abs_diff: Option<f64>,
}

/// Where a convnet's maps keep their channels (a plugin's `layout` key): `"nchw"`, `"nhwc"`
/// (channels last), or `"auto"` (the default): what [`ExecChoices::channels_last`] says for the
/// device — channels last where cim's cuDNN convolution runs, whose tensor-core kernels work in
/// NHWC (on NCHW maps cuDNN transposes every convolution's input and output). The same network
/// either way. A plugin may choose channels last for `"auto"` elsewhere too (the ResNet-50
/// enhancer does on the CPU, where its channels-last kernels are the faster ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapLayout {
    #[default]
    Auto,
    Nchw,
    Nhwc,
}

impl MapLayout {
    /// Whether maps are channels last, `auto` being what `"auto"` means where the component is
    /// built ([`ExecChoices::channels_last`]).
    pub fn channels_last(self, auto: bool) -> bool {
        match self {
            Self::Nchw => false,
            Self::Nhwc => true,
            Self::Auto => auto,
        }
    }
}

/// Execution choices a component fixes when it is built and keeps (the runner fills them from
/// the `run.*` keys into [`crate::BuildCtx::exec`]). They choose how a component computes, never
/// what: every choice has a composed path that computes the same function. Being data, not
/// process-wide switches, two models in one process may differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecChoices {
    /// Each transformer block as one graph node with a hand-written backward where the fused
    /// kernels run (`run.fused_blocks`); off, blocks are recorded op by op.
    pub fused_blocks: bool,
    /// bf16 attention with 64-wide heads on CUDA through the flash kernels
    /// (`run.flash_attention`).
    pub flash_attention: bool,
    /// Chains of fused nodes (ResNet-50's bottlenecks) as one node of candle's graph in training
    /// (`run.graft_regions`).
    pub regions: bool,
    /// What a `layout = "auto"` key means on the device: channels last where cim's NHWC
    /// convolution runs on cuDNN's tensor-core kernels (CUDA with `run.cudnn_conv` and
    /// `run.cuda_kernels`).
    pub channels_last: bool,
}

impl Default for ExecChoices {
    /// The choices on the CPU: fused blocks and regions on, no flash attention, channels first.
    fn default() -> Self {
        Self {
            fused_blocks: true,
            flash_attention: false,
            regions: true,
            channels_last: false,
        }
    }
}

/// What a [`Corruption`](crate::Corruption) gets.
pub struct CorruptionInput<'a> {
    /// The original view `(B, 3, H, W)` in `[0, 1]` at the enhancer's size.
    pub image: &'a Tensor,
    /// Golden tokens `(B, gh, gw)` u32.
    pub golden: &'a Tensor,
    pub mask: &'a Mask,
    /// Flat positions `(M,)` u32 of the masked tokens in `golden` ([`Mask::flat_indices`] order).
    pub at_mask: &'a Tensor,
    /// The sampler's tokens `(M,)` u32 for the masked positions, in the same order.
    pub sampled: &'a Tensor,
    /// The frozen tokenizer (its decoder renders token grids).
    pub tokenizer: &'a dyn crate::Tokenizer,
}

/// What a [`Corruption`](crate::Corruption) returns.
pub struct Corrupted {
    /// `(B, 3, H, W)` in `[0, 1]`, detached.
    pub image: Tensor,
    /// `(B, N)` f32: 1 where the token position was changed.
    pub replaced: Tensor,
}
