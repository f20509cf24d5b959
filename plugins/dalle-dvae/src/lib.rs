//! # `dalle_dvae` — the DALL-E discrete VAE tokenizer
//!
//! Paper §2.1: "We directly use the DALL-E (Ramesh et al., 2021) tokenizer, following BEiT." This is
//! OpenAI's architecture (openai/DALL-E, `dall_e/encoder.py`, `dall_e/decoder.py`) with every size
//! taken from config, so a tiny one runs on a CPU:
//!
//! - encoder: `map_pixels` (ε = 0.1) → 7×7 conv → `group_count` groups of `n_blk_per_group`
//!   residual blocks of widths `n_hid·2^g`, 2×2 max-pool after every group but the last → ReLU →
//!   1×1 conv to `vocab_size` logits → argmax. `(B, 3, s, s)` → `(B, s/2^(G−1), s/2^(G−1))` ids.
//!   With the paper's 4 groups: 112 px → 14×14 tokens.
//! - decoder: one-hot ids → 1×1 conv to `dec_n_init` channels → groups of widths
//!   `dec_n_hid·2^(G−1−g)` with nearest ×2 upsampling after every group but the last → ReLU →
//!   1×1 conv to 6 channels; the first 3 go through a sigmoid and `unmap_pixels`.
//! - residual blocks: `id_path(x) + post_gain · res_path(x)`, `post_gain = 1 / n_layers²`,
//!   `n_layers = group_count · n_blk_per_group`; encoder res path 3×3,3×3,3×3,1×1 convs, decoder
//!   res path 1×1,3×3,3×3,3×3, both at a quarter of the block's output width.
//!
//! Parameter names are OpenAI's (`encoder.blocks.group_1.block_1.res_path.conv_1.w`, `.b`,
//! `encoder.blocks.input.w`, `decoder.blocks.output.conv.w`, …), so their checkpoints load
//! key-for-key under `encoder.` / `decoder.`. The tokenizer is frozen: its tensors never track
//! gradients.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use cim_api::pixels::{map_pixels, unmap_pixels, LOGIT_LAPLACE_EPS};
use cim_api::{BuildCtx, Error, Result, TokenGrid, Tokenizer};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvaeConfig {
    pub vocab_size: usize,
    /// Encoder base width (OpenAI: 256).
    pub n_hid: usize,
    /// Decoder base width (OpenAI: 256).
    pub dec_n_hid: usize,
    /// Decoder width after the input 1×1 conv (OpenAI: 128).
    pub dec_n_init: usize,
    /// Number of groups (OpenAI: 4, i.e. 8× downsampling).
    pub group_count: usize,
    /// Residual blocks per group (OpenAI: 2).
    pub n_blk_per_group: usize,
    /// ε of the logit-Laplace pixel map (OpenAI: 0.1).
    pub eps: f64,
    /// A safetensors file with OpenAI's parameter names (`encoder.blocks.input.w`, …,
    /// `decoder.blocks.output.conv.b`), e.g. written by `tools/convert_dalle.py`. Every tensor is
    /// shape-checked by name. A local path or `hub:OWNER/REPO[@REVISION]/FILE`
    /// ([`cim_api::weights`]), or `"random"`: a seeded random initialisation, which carries no
    /// image information (for tests and benchmarks). Unset is an error saying where OpenAI's
    /// weights come from ([`WEIGHTS_HOWTO`]).
    pub weights: Option<String>,
    /// `"f32"`, `"bf16"`, `"f16"`, or `"auto"`: on CUDA the first of f16, bf16 whose tokens on
    /// the first batch agree with the f32 encoder's at least `min_agreement` of the time, else
    /// f32; on the CPU (where reduced precision is slower) f32. Any precision other than f32
    /// measures its agreement on the first batch and reports it (logs, `cim-run bench`).
    pub precision: Precision,
    /// Lowest token agreement with f32 that `precision = "auto"` accepts (0–1).
    pub min_agreement: f64,
    /// The decoder's precision: `"same"` (the encoder's, as `precision` settled it), or `"f32"`,
    /// `"bf16"`, `"f16"`. The decoder renders pixels, not tokens, so the agreement bar does not
    /// apply; instead a reduced decoder's distance from the f32 decoder's images (max and mean
    /// absolute pixel difference) is measured on the first batch it decodes and reported.
    #[serde(default)]
    pub decoder_precision: DecoderPrecision,
    /// Where the maps keep their channels: `"nchw"`, `"nhwc"` (channels last), or `"auto"`:
    /// channels last where cim's cuDNN convolution runs (CUDA, `run.cudnn_conv` and
    /// `run.cuda_kernels` on), whose tensor-core kernels work in NHWC — on NCHW maps cuDNN
    /// transposes every convolution's input and output. The same network and tokens either way;
    /// `"nhwc"` elsewhere runs each convolution between transposes (for tests).
    #[serde(default)]
    pub layout: MapLayout,
}

/// The dVAE's map layout (see [`DvaeConfig::layout`]); shared with the ResNet-50 enhancer.
pub use cim_api::MapLayout;

/// The decoder's precision (see [`DvaeConfig::decoder_precision`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderPrecision {
    #[default]
    Same,
    F32,
    Bf16,
    F16,
}

impl DecoderPrecision {
    fn dtype(self) -> Option<DType> {
        match self {
            Self::Same => None,
            Self::F32 => Some(DType::F32),
            Self::Bf16 => Some(DType::BF16),
            Self::F16 => Some(DType::F16),
        }
    }
}

/// The dVAE's compute precision (see [`DvaeConfig::precision`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
    Auto,
}

impl Default for DvaeConfig {
    /// OpenAI's released dVAE.
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            n_hid: 256,
            dec_n_hid: 256,
            dec_n_init: 128,
            group_count: 4,
            n_blk_per_group: 2,
            eps: LOGIT_LAPLACE_EPS,
            weights: None,
            precision: Precision::Auto,
            min_agreement: 0.99,
            decoder_precision: DecoderPrecision::Same,
            layout: MapLayout::Auto,
        }
    }
}

impl DvaeConfig {
    /// For conformance tests: 3 groups (4× downsampling), 64 tokens.
    pub fn test_tiny() -> Self {
        Self {
            vocab_size: 64,
            n_hid: 8,
            dec_n_hid: 8,
            dec_n_init: 16,
            group_count: 3,
            n_blk_per_group: 1,
            eps: LOGIT_LAPLACE_EPS,
            weights: Some("random".into()),
            precision: Precision::Auto,
            min_agreement: 0.99,
            decoder_precision: DecoderPrecision::Same,
            layout: MapLayout::Auto,
        }
    }
    /// Spatial downsampling factor of the encoder.
    pub fn downsample(&self) -> usize {
        1 << (self.group_count - 1)
    }
}

/// OpenAI's `Conv2d`: weight `w` `(out, in, k, k)` ~ N(0, 1/(in·k²)), bias `b` zeros, "same" padding.
/// Channels last, `w` is held as `(out, k, k, in)`.
#[derive(Clone, Debug)]
struct Conv {
    w: Tensor,
    b: Tensor,
    pad: usize,
    nhwc: bool,
}

impl Conv {
    fn new(n_in: usize, n_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let std = 1.0 / ((n_in * k * k) as f64).sqrt();
        Ok(Self {
            w: vb.get_with_hints(
                (n_out, n_in, k, k),
                "w",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            b: vb.get_with_hints(n_out, "b", Init::Const(0.0))?,
            pad: (k - 1) / 2,
            nhwc: false,
        })
    }
    /// Like [`Conv::new`], but a freshly initialised bias cancels the response to a uniform
    /// mid-grey input (`map_pixels(0.5) = 0.5`): `b = −0.5 · Σ w`. With OpenAI's zero bias, the
    /// always-positive pixel map makes every position's features share one large component and a
    /// random encoder's argmax collapses onto a handful of tokens (measured: 16 of 512 used on
    /// CIFAR-10); centred, the random tokens spread over the vocabulary. Loaded weights replace it.
    fn centered(n_in: usize, n_out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let fresh = !vb.contains_tensor("b");
        let mut c = Self::new(n_in, n_out, k, vb)?;
        if fresh {
            let b = (c.w.sum((1, 2, 3))? * -0.5)?;
            c.b = b;
        }
        Ok(c)
    }

    fn to_dtype(&self, dt: DType) -> Result<Self> {
        Ok(Self {
            w: self.w.to_dtype(dt)?,
            b: self.b.to_dtype(dt)?,
            ..*self
        })
    }

    /// The same convolution on channels-last maps (`nhwc`) or channels-first ones.
    fn with_layout(&self, nhwc: bool) -> Result<Self> {
        let w = match (self.nhwc, nhwc) {
            (false, true) => self.w.permute((0, 2, 3, 1))?.contiguous()?,
            (true, false) => self.w.permute((0, 3, 1, 2))?.contiguous()?,
            _ => self.w.clone(),
        };
        Ok(Self {
            w,
            b: self.b.clone(),
            pad: self.pad,
            nhwc,
        })
    }

    /// The kernel size (the weight's third dimension in either layout).
    fn k(&self) -> Result<usize> {
        Ok(self.w.dim(2)?)
    }

    /// The convolution without its bias.
    fn conv(&self, x: &Tensor) -> Result<Tensor> {
        match self.nhwc {
            true => cim_ops::conv2d_nhwc(x, &self.w, self.pad, 1).map_err(Error::from),
            false => cim_ops::conv2d(x, &self.w, self.pad, 1).map_err(Error::from),
        }
    }

    /// `conv(x) + b`, then ReLU when `relu` (one fused pass: [`cim_ops::channel_bias`]).
    fn forward(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        channel_bias(self.nhwc, &self.conv(x)?, &self.b, None, 1.0, relu)
    }
}

/// [`cim_ops::channel_bias`] in either layout.
fn channel_bias(
    nhwc: bool,
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    relu: bool,
) -> Result<Tensor> {
    match nhwc {
        true => cim_ops::channel_bias_nhwc(x, b, residual, gain, relu).map_err(Error::from),
        false => cim_ops::channel_bias(x, b, residual, gain, relu).map_err(Error::from),
    }
}

#[derive(Clone, Debug)]
struct ResBlock {
    id_path: Option<Conv>,
    res_path: Vec<Conv>,
    post_gain: f64,
}

impl ResBlock {
    /// `kernels`: the four res-path kernel sizes (encoder 3,3,3,1; decoder 1,3,3,3).
    fn new(
        n_in: usize,
        n_out: usize,
        n_layers: usize,
        kernels: [usize; 4],
        vb: VarBuilder,
    ) -> Result<Self> {
        if !n_out.is_multiple_of(4) {
            return Err(Error::config(format!(
                "dalle_dvae: block width {n_out} must be divisible by 4"
            )));
        }
        let hid = n_out / 4;
        let widths = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)];
        let res = vb.pp("res_path");
        let res_path = widths
            .iter()
            .zip(kernels)
            .enumerate()
            .map(|(i, (&(a, b), k))| Conv::new(a, b, k, res.pp(format!("conv_{}", i + 1))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            id_path: if n_in != n_out {
                Some(Conv::new(n_in, n_out, 1, vb.pp("id_path"))?)
            } else {
                None
            },
            res_path,
            post_gain: 1.0 / (n_layers * n_layers) as f64,
        })
    }
    /// `id_path(x) + post_gain · res_path(x)`. Each res-path conv's bias is fused with the ReLU
    /// the next conv applies to it, and the last one's with the gain and the residual add; an
    /// id-path conv's bias folds into that same pass as `b_id / post_gain`.
    #[cfg(test)]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_act(&mut Act::new(x.clone()), false)?.x)
    }
    /// [`Self::forward`] on an activation whose ReLU may already exist (the previous block made
    /// it in its last pass); with `want_relu` the output's ReLU comes from the same last pass.
    fn forward_act(&self, x: &mut Act, want_relu: bool) -> Result<Act> {
        let xr = x.relu()?;
        self.forward_from(&x.x, xr, 0, false, want_relu)
    }
    /// `forward(upsample₂(x))` (nearest, 2×) without upsampling `x` itself: nearest upsampling
    /// commutes with ReLU, channel biases and 1×1 convolutions, so when the res path starts with a
    /// 1×1 conv (the decoder's blocks) the block runs its id-path conv and its first res conv
    /// (+ ReLU) at the low resolution and upsamples their outputs (`n_out` and `n_out / 4`
    /// channels instead of `n_in`): 4× fewer FLOPs in those convs and less upsampled data.
    fn forward_upsampled(&self, x: &mut Act, want_relu: bool) -> Result<Act> {
        let nhwc = self.res_path[0].nhwc;
        if self.res_path[0].k()? != 1 {
            return self.forward_act(&mut Act::new(upsample2(&x.x, nhwc)?), want_relu);
        }
        let h = upsample2(&self.res_path[0].forward(&x.relu()?, true)?, nhwc)?;
        self.forward_from(&x.x, h, 1, true, want_relu)
    }
    /// The res path from its conv `start` on (`h` is that conv's input), and the residual sum with
    /// the id path of `x`, whose output is upsampled first when `upsample`.
    fn forward_from(
        &self,
        x: &Tensor,
        mut h: Tensor,
        start: usize,
        upsample: bool,
        want_relu: bool,
    ) -> Result<Act> {
        let (last, first) = self
            .res_path
            .split_last()
            .expect("a residual block has four convolutions");
        for c in &first[start..] {
            h = c.forward(&h, true)?;
        }
        let h = last.conv(&h)?;
        let g = self.post_gain;
        let (identity, bias) = match &self.id_path {
            Some(id) => (id.conv(x)?, (&last.b + (&id.b / g)?)?),
            None => (x.clone(), last.b.clone()),
        };
        let nhwc = last.nhwc;
        let identity = if upsample {
            upsample2(&identity, nhwc)?
        } else {
            identity
        };
        if want_relu {
            let (y, yr) = match nhwc {
                true => cim_ops::channel_bias_and_relu_nhwc(&h, &bias, Some(&identity), g)?,
                false => cim_ops::channel_bias_and_relu(&h, &bias, Some(&identity), g)?,
            };
            return Ok(Act {
                x: y,
                relu: Some(yr),
            });
        }
        Ok(Act::new(channel_bias(
            nhwc,
            &h,
            &bias,
            Some(&identity),
            g,
            false,
        )?))
    }
    /// The block with every convolution mapped by `f` (a dtype, a layout).
    fn map(&self, f: impl Fn(&Conv) -> Result<Conv>) -> Result<Self> {
        Ok(Self {
            id_path: self.id_path.as_ref().map(&f).transpose()?,
            res_path: self.res_path.iter().map(&f).collect::<Result<_>>()?,
            post_gain: self.post_gain,
        })
    }
}

/// A map between blocks and, once made, its ReLU (every residual path starts with one): a block
/// writes both in its last pass when the next block will read the ReLU.
struct Act {
    x: Tensor,
    relu: Option<Tensor>,
}

impl Act {
    fn new(x: Tensor) -> Self {
        Self { x, relu: None }
    }
    fn relu(&mut self) -> Result<Tensor> {
        if self.relu.is_none() {
            self.relu = Some(self.x.relu()?);
        }
        Ok(self.relu.clone().expect("set above"))
    }
}

/// 2× nearest upsampling of an NCHW map, or with `nhwc` a channels-last one.
fn upsample2(t: &Tensor, nhwc: bool) -> Result<Tensor> {
    match nhwc {
        true => cim_ops::upsample_nearest_2x_nhwc(t).map_err(Error::from),
        false => cim_ops::upsample_nearest_2x(t).map_err(Error::from),
    }
}

/// What runs between groups: the encoder's 2× max-pool, the decoder's 2× nearest upsampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resample {
    MaxPool,
    Upsample,
}

/// `group_count` groups of blocks; a [`Resample`] runs between groups.
#[derive(Clone, Debug)]
struct Groups {
    groups: Vec<Vec<ResBlock>>,
}

impl Groups {
    fn new(
        widths: &[(usize, usize)],
        cfg: &DvaeConfig,
        kernels: [usize; 4],
        vb: VarBuilder,
    ) -> Result<Self> {
        let n_layers = cfg.group_count * cfg.n_blk_per_group;
        let groups = widths
            .iter()
            .enumerate()
            .map(|(g, &(w_in, w_out))| {
                (0..cfg.n_blk_per_group)
                    .map(|i| {
                        let n_in = if i == 0 { w_in } else { w_out };
                        ResBlock::new(
                            n_in,
                            w_out,
                            n_layers,
                            kernels,
                            vb.pp(format!("group_{}", g + 1))
                                .pp(format!("block_{}", i + 1)),
                        )
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { groups })
    }
    fn map(&self, f: impl Fn(&Conv) -> Result<Conv>) -> Result<Self> {
        let groups = self
            .groups
            .iter()
            .map(|g| g.iter().map(|b| b.map(&f)).collect::<Result<_>>())
            .collect::<Result<_>>()?;
        Ok(Self { groups })
    }
    /// The groups on `x`; the output carries its ReLU (the output conv's input).
    fn forward(&self, x: &Tensor, resample: Resample) -> Result<Act> {
        let mut x = Act::new(x.clone());
        let last = self.groups.len() - 1;
        for (g, blocks) in self.groups.iter().enumerate() {
            for (i, b) in blocks.iter().enumerate() {
                // The ReLU is read next unless a max-pool comes first (cheaper on the pooled map).
                let pool_next = i + 1 == blocks.len() && g < last && resample == Resample::MaxPool;
                x = match resample {
                    // The previous group's upsampling, folded into this block.
                    Resample::Upsample if g > 0 && i == 0 => {
                        b.forward_upsampled(&mut x, !pool_next)?
                    }
                    _ => b.forward_act(&mut x, !pool_next)?,
                };
            }
            if g < last && resample == Resample::MaxPool {
                x = Act::new(match blocks[0].res_path[0].nhwc {
                    true => cim_ops::max_pool_2x2_nhwc(&x.x)?,
                    false => cim_ops::max_pool_2x2(&x.x)?,
                });
            }
        }
        Ok(x)
    }
}

#[derive(Clone, Debug)]
pub struct DalleDvae {
    cfg: DvaeConfig,
    enc_input: Conv,
    enc_groups: Groups,
    enc_output: Conv,
    /// Decoder input 1×1 conv as a `(V, n_init)` lookup table (one-hot · W = row gather).
    dec_table: Tensor,
    dec_bias: Tensor,
    dec_groups: Groups,
    dec_output: Conv,
    /// Compute dtype of every layer (weights are stored in it).
    dtype: DType,
    /// Channels-last maps (see [`DvaeConfig::layout`]).
    nhwc: bool,
}

impl DalleDvae {
    pub fn new(cfg: DvaeConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.group_count == 0 || cfg.n_blk_per_group == 0 {
            return Err(Error::config(
                "dalle_dvae: group_count and n_blk_per_group must be ≥ 1",
            ));
        }
        let g = cfg.group_count;
        let enc = vb.pp("encoder").pp("blocks");
        let enc_widths: Vec<(usize, usize)> = (0..g)
            .map(|i| (cfg.n_hid << i.saturating_sub(1), cfg.n_hid << i))
            .collect();
        let dec = vb.pp("decoder").pp("blocks");
        let dec_widths: Vec<(usize, usize)> = (0..g)
            .map(|i| {
                let w_in = if i == 0 {
                    cfg.dec_n_init
                } else {
                    cfg.dec_n_hid << (g - i)
                };
                (w_in, cfg.dec_n_hid << (g - 1 - i))
            })
            .collect();
        let dec_in = Conv::new(cfg.vocab_size, cfg.dec_n_init, 1, dec.pp("input"))?;
        let enc_input = Conv::centered(3, cfg.n_hid, 7, enc.pp("input"))?;
        Ok(Self {
            enc_input,
            enc_groups: Groups::new(&enc_widths, &cfg, [3, 3, 3, 1], enc.clone())?,
            // The encoder's last group is n_hid·2^(G−1) wide.
            enc_output: Conv::new(
                cfg.n_hid << (g - 1),
                cfg.vocab_size,
                1,
                enc.pp("output").pp("conv"),
            )?,
            dec_table: dec_in
                .w
                .reshape((cfg.dec_n_init, cfg.vocab_size))?
                .t()?
                .contiguous()?,
            dec_bias: dec_in.b.clone(),
            dec_groups: Groups::new(&dec_widths, &cfg, [1, 3, 3, 3], dec.clone())?,
            dec_output: Conv::new(cfg.dec_n_hid, 6, 1, dec.pp("output").pp("conv"))?,
            cfg,
            dtype: DType::F32,
            nhwc: false,
        })
    }

    /// The same network computing in `dtype` (weights converted; inputs cast on entry, logits and
    /// decoder statistics returned in f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            dec_table: self.dec_table.to_dtype(dtype)?,
            dec_bias: self.dec_bias.to_dtype(dtype)?,
            dtype,
            ..self.map_convs(|c| c.to_dtype(dtype))?
        })
    }

    /// The same network on channels-last maps (`nhwc`) or channels-first ones (the convolution
    /// weights permuted once; see [`DvaeConfig::layout`]). Inputs and outputs keep their NCHW
    /// shapes either way.
    pub fn with_layout(&self, nhwc: bool) -> Result<Self> {
        Ok(Self {
            nhwc,
            ..self.map_convs(|c| c.with_layout(nhwc))?
        })
    }

    /// Whether the maps are channels last.
    pub fn channels_last(&self) -> bool {
        self.nhwc
    }

    fn map_convs(&self, f: impl Fn(&Conv) -> Result<Conv>) -> Result<Self> {
        Ok(Self {
            cfg: self.cfg.clone(),
            enc_input: f(&self.enc_input)?,
            enc_groups: self.enc_groups.map(&f)?,
            enc_output: f(&self.enc_output)?,
            dec_table: self.dec_table.clone(),
            dec_bias: self.dec_bias.clone(),
            dec_groups: self.dec_groups.map(&f)?,
            dec_output: f(&self.dec_output)?,
            dtype: self.dtype,
            nhwc: self.nhwc,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Encoder logits `(B, V, s/d, s/d)` in f32 for pixels in `[0, 1]`.
    pub fn encoder_logits(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.logits(pixels)?.to_dtype(DType::F32)?;
        Ok(match self.nhwc {
            true => x.permute((0, 3, 1, 2))?.contiguous()?,
            false => x,
        })
    }

    /// The token ids `(B, s/d, s/d)`: the argmax of the logits, taken in the compute dtype and
    /// layout (no f32 copy, no transpose of the `V`-channel map).
    pub fn token_ids(&self, pixels: &Tensor) -> Result<Tensor> {
        let logits = self.logits(&pixels.detach())?;
        match self.nhwc {
            true => cim_ops::argmax_last(&logits).map_err(Error::from),
            false => cim_ops::argmax_channels(&logits).map_err(Error::from),
        }
    }

    /// The logits in the compute dtype and layout: `(B, V, h, w)`, channels last `(B, h, w, V)`.
    fn logits(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = map_pixels(pixels, self.cfg.eps)?.to_dtype(self.dtype)?;
        let x = match self.nhwc {
            true => x.permute((0, 2, 3, 1))?.contiguous()?,
            false => x,
        };
        let x = self.enc_input.forward(&x, false)?;
        let mut x = self.enc_groups.forward(&x, Resample::MaxPool)?;
        self.enc_output.forward(&x.relu()?, false)
    }

    /// Decoder statistics `(B, 6, h, w)` before the sigmoid.
    pub fn decoder_stats(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, h, w) = ids.dims3()?;
        let d = self.cfg.dec_n_init;
        // The input 1×1 conv as a row lookup lands channels last.
        let x = self
            .dec_table
            .index_select(&ids.flatten_all()?, 0)?
            .broadcast_add(&self.dec_bias)?
            .reshape((b, h, w, d))?;
        let x = match self.nhwc {
            true => x,
            false => x.permute((0, 3, 1, 2))?.contiguous()?,
        };
        let mut x = self.dec_groups.forward(&x, Resample::Upsample)?;
        let y = self.dec_output.forward(&x.relu()?, false)?;
        let y = match self.nhwc {
            true => y.permute((0, 3, 1, 2))?,
            false => y,
        };
        Ok(y.to_dtype(DType::F32)?.contiguous()?)
    }
}

impl Tokenizer for DalleDvae {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn grid(&self, (h, w): (usize, usize)) -> Result<TokenGrid> {
        let d = self.cfg.downsample();
        if h % d != 0 || w % d != 0 {
            return Err(Error::config(format!(
                "dalle_dvae with {} groups downsamples by {d}: the tokenizer view {h}×{w} must be a multiple of {d}",
                self.cfg.group_count
            )));
        }
        Ok(TokenGrid::new(h / d, w / d))
    }

    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        self.grid((h, w))?;
        if c != 3 {
            return Err(Error::msg(format!(
                "dalle_dvae: expected 3 channels, got {c}"
            )));
        }
        self.token_ids(pixels)
    }

    fn decode(&self, ids: &Tensor) -> Result<Tensor> {
        let stats = self.decoder_stats(&ids.to_dtype(DType::U32)?)?;
        let rgb = candle_nn::ops::sigmoid(&stats.narrow(1, 0, 3)?)?;
        Ok(unmap_pixels(&rgb, self.cfg.eps)?.detach())
    }
}

/// Top-1 agreement of two id tensors (for precision checks and tests).
pub fn agreement(a: &Tensor, b: &Tensor) -> Result<f64> {
    let eq = a
        .eq(b)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(eq as f64)
}

/// How to get OpenAI's dVAE weights, in the error an unset `tokenizer.dalle_dvae.weights` gives.
pub const WEIGHTS_HOWTO: &str = "tokenizer.dalle_dvae.weights is not set, and a randomly \
initialised dVAE carries no image information (its corrupted images are grey): pre-training on it \
would waste the run. OpenAI publishes the dVAE as https://cdn.openai.com/dall-e/encoder.pkl and \
https://cdn.openai.com/dall-e/decoder.pkl; convert them once with `python3 tools/convert_dalle.py \
encoder.pkl decoder.pkl dvae.safetensors` and set tokenizer.dalle_dvae.weights = \"dvae.safetensors\" \
(or a hub:OWNER/REPO@REVISION/FILE holding that file). To run with a random dVAE on purpose \
(tests, benchmarks), set tokenizer.dalle_dvae.weights = \"random\".";

fn build(cfg: DvaeConfig, ctx: &BuildCtx) -> Result<DvaeTokenizer> {
    let net = match cfg.weights.clone() {
        None => return Err(Error::config(WEIGHTS_HOWTO)),
        Some(spec) if spec == "random" => DalleDvae::new(cfg, ctx.vb.clone())?,
        Some(spec) => {
            let path = cim_api::weights::resolve(&spec, "tokenizer.dalle_dvae.weights")?;
            DalleDvae::from_file(cfg, &path, &ctx.device)?
        }
    };
    let channels_last = net.cfg.layout.channels_last(ctx.exec.channels_last);
    tracing::info!(
        channels_last,
        layout = ?net.cfg.layout,
        "dalle_dvae map layout"
    );
    let net = net.with_layout(channels_last)?;
    DvaeTokenizer::new(net, ctx.device.is_cuda())
}

fn dtype_name(dt: DType) -> &'static str {
    match dt {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// The registered `dalle_dvae` tokenizer: the f32 network and, for `precision` other than f32,
/// the reduced-precision candidates, settled on the first batch it encodes (see
/// [`DvaeConfig::precision`]).
pub struct DvaeTokenizer {
    min_agreement: f64,
    state: std::sync::RwLock<PrecisionState>,
    /// The decoder in its own precision (`decoder_precision` other than `"same"`).
    decoder: Option<OwnDecoder>,
}

/// A decoder precision of its own: the converted network, the f32 one it is measured against on
/// the first decoded batch, and that measurement.
struct OwnDecoder {
    net: DalleDvae,
    f32_net: DalleDvae,
    report: std::sync::OnceLock<cim_api::DecoderPrecisionReport>,
}

impl OwnDecoder {
    fn decode(&self, ids: &Tensor) -> Result<Tensor> {
        let out = self.net.decode(ids)?;
        if self.report.get().is_none() {
            let diff = (&out - self.f32_net.decode(ids)?)?.abs()?.flatten_all()?;
            let max = diff.max(0)?.to_scalar::<f32>()? as f64;
            let mean = diff.mean(0)?.to_scalar::<f32>()? as f64;
            let dtype = dtype_name(self.net.dtype());
            tracing::info!(
                dtype,
                max_abs_diff = max,
                mean_abs_diff = mean,
                "dalle_dvae decoder precision check (pixels in [0, 1])"
            );
            let _ = self.report.set(cim_api::DecoderPrecisionReport {
                dtype: dtype.into(),
                max_abs_diff: Some(max),
                mean_abs_diff: Some(mean),
            });
        }
        Ok(out)
    }

    fn report(&self) -> cim_api::DecoderPrecisionReport {
        self.report
            .get()
            .cloned()
            .unwrap_or_else(|| cim_api::DecoderPrecisionReport {
                dtype: dtype_name(self.net.dtype()).into(),
                max_abs_diff: None,
                mean_abs_diff: None,
            })
    }
}

enum PrecisionState {
    /// Not settled yet: the f32 network and the candidates, in order of preference.
    Pending(DalleDvae, Vec<DalleDvae>),
    Settled(DalleDvae, cim_api::PrecisionReport),
}

impl DvaeTokenizer {
    /// `on_cuda` decides what `precision = "auto"` tries (nothing on the CPU).
    pub fn new(net: DalleDvae, on_cuda: bool) -> Result<Self> {
        let cfg = net.cfg.clone();
        if !(0.0..=1.0).contains(&cfg.min_agreement) {
            return Err(Error::config(format!(
                "tokenizer.dalle_dvae.min_agreement must be in [0, 1], got {}",
                cfg.min_agreement
            )));
        }
        let wanted: Vec<DType> = match cfg.precision {
            Precision::F32 => vec![],
            Precision::Bf16 => vec![DType::BF16],
            Precision::F16 => vec![DType::F16],
            Precision::Auto if on_cuda => vec![DType::F16, DType::BF16],
            Precision::Auto => vec![],
        };
        // An explicitly requested precision is used whatever its agreement (and reported).
        let min = if cfg.precision == Precision::Auto {
            cfg.min_agreement
        } else {
            0.0
        };
        let candidates = wanted
            .iter()
            .map(|&dt| net.to_dtype(dt))
            .collect::<Result<_>>()?;
        let decoder = match cfg.decoder_precision.dtype() {
            Some(dt) => Some(OwnDecoder {
                net: net.to_dtype(dt)?,
                f32_net: net.clone(),
                report: std::sync::OnceLock::new(),
            }),
            None => None,
        };
        Ok(Self {
            decoder,
            ..Self::with_candidates(net, candidates, min)
        })
    }

    /// Tries `candidates` (the same network in other precisions) in order on the first batch,
    /// keeping the first whose token agreement with `net` (f32) reaches `min_agreement`; `net`
    /// when none does or there are none.
    pub fn with_candidates(net: DalleDvae, candidates: Vec<DalleDvae>, min_agreement: f64) -> Self {
        let state = if candidates.is_empty() {
            let report = cim_api::PrecisionReport {
                dtype: "f32".into(),
                agreement: 1.0,
                tokens: 0,
                decoder: None,
            };
            PrecisionState::Settled(net, report)
        } else {
            PrecisionState::Pending(net, candidates)
        };
        Self {
            min_agreement,
            state: std::sync::RwLock::new(state),
            decoder: None,
        }
    }

    fn net(&self) -> std::sync::RwLockReadGuard<'_, PrecisionState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Encodes the first batch with f32 and every candidate; keeps the first candidate whose
    /// agreement reaches `min_agreement`, else f32. Returns the kept network's ids.
    fn settle(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let (f32_net, candidates) = match &*state {
            PrecisionState::Settled(net, _) => return encode_ids(net, pixels),
            PrecisionState::Pending(a, b) => (a.clone(), b.clone()),
        };
        let golden = encode_ids(&f32_net, pixels)?;
        let tokens = golden.elem_count();
        let mut kept = (f32_net, golden.clone(), 1.0);
        for c in candidates {
            let ids = encode_ids(&c, pixels)?;
            let a = agreement(&ids, &golden)?;
            tracing::info!(
                dtype = dtype_name(c.dtype()),
                agreement = a,
                tokens,
                "dalle_dvae precision check"
            );
            if a >= self.min_agreement {
                kept = (c, ids, a);
                break;
            }
        }
        let (net, ids, agreement) = kept;
        let report = cim_api::PrecisionReport {
            dtype: dtype_name(net.dtype()).into(),
            agreement,
            tokens,
            decoder: None,
        };
        tracing::info!(
            dtype = %report.dtype,
            agreement = report.agreement,
            "dalle_dvae runs in {}",
            report.dtype
        );
        *state = PrecisionState::Settled(net, report);
        Ok(ids)
    }
}

fn encode_ids(net: &DalleDvae, pixels: &Tensor) -> Result<Tensor> {
    net.token_ids(pixels)
}

impl Tokenizer for DvaeTokenizer {
    fn vocab_size(&self) -> usize {
        match &*self.net() {
            PrecisionState::Pending(n, _) | PrecisionState::Settled(n, _) => n.vocab_size(),
        }
    }
    fn grid(&self, size: (usize, usize)) -> Result<TokenGrid> {
        match &*self.net() {
            PrecisionState::Pending(n, _) | PrecisionState::Settled(n, _) => n.grid(size),
        }
    }
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        if let PrecisionState::Settled(net, _) = &*self.net() {
            return net.encode(pixels);
        }
        match &*self.net() {
            PrecisionState::Pending(net, _) => {
                // Shape checks before the comparison.
                let (_, c, h, w) = pixels.dims4()?;
                net.grid((h, w))?;
                if c != 3 {
                    return Err(Error::msg(format!(
                        "dalle_dvae: expected 3 channels, got {c}"
                    )));
                }
            }
            PrecisionState::Settled(..) => {}
        }
        self.settle(pixels)
    }
    fn decode(&self, ids: &Tensor) -> Result<Tensor> {
        if let Some(d) = &self.decoder {
            return d.decode(ids);
        }
        match &*self.net() {
            // Decoding before any encode (a decode-only tool) uses the f32 network.
            PrecisionState::Pending(n, _) | PrecisionState::Settled(n, _) => n.decode(ids),
        }
    }
    fn precision(&self) -> Option<cim_api::PrecisionReport> {
        match &*self.net() {
            PrecisionState::Settled(_, r) => Some(cim_api::PrecisionReport {
                decoder: self.decoder.as_ref().map(OwnDecoder::report),
                ..r.clone()
            }),
            PrecisionState::Pending(..) => None,
        }
    }
}

impl DalleDvae {
    /// Builds the dVAE from a safetensors file with OpenAI's names; a missing tensor or a shape
    /// that does not fit the configured sizes is an error naming the file and the key.
    pub fn from_file(
        cfg: DvaeConfig,
        path: &std::path::Path,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Data {
            path: path.display().to_string(),
            message: format!("cannot read dVAE weights: {e}"),
        })?;
        for (name, t) in &tensors {
            cim_api::params::check_float(name, t.dtype()).map_err(|e| Error::Data {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let n = tensors.len();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = Self::new(cfg, vb).map_err(|e| Error::Data {
            path: path.display().to_string(),
            message: format!("{e} (tokenizer.dalle_dvae sizes must match the file)"),
        })?;
        if model.num_tensors() != n {
            return Err(Error::Data {
                path: path.display().to_string(),
                message: format!(
                    "holds {n} tensors, the configured dVAE uses {} (sizes differ?)",
                    model.num_tensors()
                ),
            });
        }
        Ok(model)
    }

    /// Number of weight and bias tensors (for completeness checks against a file).
    pub fn num_tensors(&self) -> usize {
        let conv = |c: &Conv| 2 * (c.w.elem_count() > 0) as usize;
        let groups = |g: &Groups| -> usize {
            g.groups
                .iter()
                .flatten()
                .map(|b| {
                    b.res_path.iter().map(conv).sum::<usize>() + b.id_path.as_ref().map_or(0, conv)
                })
                .sum()
        };
        conv(&self.enc_input)
            + groups(&self.enc_groups)
            + conv(&self.enc_output)
            + 2
            + groups(&self.dec_groups)
            + conv(&self.dec_output)
    }
}

cim_api::register_tokenizer! {
    name: "dalle_dvae",
    about: "DALL-E dVAE (OpenAI architecture; 8192 tokens, 8× downsampling by default)",
    config: DvaeConfig,
    default: DvaeConfig::default(),
    tiny: DvaeConfig::test_tiny(),
    build: build,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parity with the PyTorch re-implementation of OpenAI's dVAE in
    /// `tests/fixtures/dalle/make.py` (small widths, random weights with OpenAI's names).
    #[test]
    fn matches_the_pytorch_reference_on_openai_named_weights() -> Result<()> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dalle");
        let dev = candle_core::Device::Cpu;
        let cfg = DvaeConfig {
            vocab_size: 64,
            n_hid: 16,
            dec_n_hid: 16,
            dec_n_init: 8,
            group_count: 3,
            n_blk_per_group: 2,
            eps: LOGIT_LAPLACE_EPS,
            weights: Some(dir.join("dvae_small.safetensors").display().to_string()),
            precision: Precision::F32,
            min_agreement: 0.99,
            decoder_precision: DecoderPrecision::Same,
            layout: MapLayout::Auto,
        };
        let dvae = DalleDvae::from_file(cfg.clone(), cfg.weights.as_ref().unwrap().as_ref(), &dev)?;
        let want = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
        };
        let logits = dvae.encoder_logits(&want["input"])?;
        assert!(max_diff(&logits, &want["logits"])? < 1e-4);
        let tokens = dvae.encode(&want["input"])?;
        let expect: Vec<u32> = want["tokens"]
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(
            tokens.flatten_all()?.to_vec1::<u32>()?,
            expect,
            "tokens must match exactly"
        );
        let pixels = dvae.decode(&tokens)?;
        let d = max_diff(&pixels, &want["pixels"])?;
        assert!(d < 1e-4, "decoded pixels differ by {d}");
        let grid = want["grid"].to_dtype(DType::U32)?;
        let d = max_diff(&dvae.decode(&grid)?, &want["grid_pixels"])?;
        assert!(d < 1e-4, "decoded pixels (all tokens) differ by {d}");
        // A file that does not fit the configured sizes names the key.
        let wrong = DvaeConfig {
            n_hid: 32,
            ..cfg.clone()
        };
        let e = DalleDvae::from_file(wrong, cfg.weights.as_ref().unwrap().as_ref(), &dev)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("dvae_small.safetensors") && e.contains("encoder.blocks.input.w"),
            "{e}"
        );
        Ok(())
    }
    use candle_core::Device;
    use cim_api::ParamStore;

    /// The fixture dVAE (PyTorch-made weights) and a batch made from the fixture's input.
    fn fixture_net(precision: Precision, min: f64) -> Result<(DalleDvae, Tensor)> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dalle");
        let dev = Device::Cpu;
        let cfg = DvaeConfig {
            vocab_size: 64,
            n_hid: 16,
            dec_n_hid: 16,
            dec_n_init: 8,
            group_count: 3,
            n_blk_per_group: 2,
            eps: LOGIT_LAPLACE_EPS,
            weights: None,
            precision,
            min_agreement: min,
            decoder_precision: DecoderPrecision::Same,
            layout: MapLayout::Auto,
        };
        let net = DalleDvae::from_file(cfg, &dir.join("dvae_small.safetensors"), &dev)?;
        let want = candle_core::safetensors::load(dir.join("expected.safetensors"), &dev)?;
        // The fixture image and flipped / inverted copies.
        let x = &want["input"];
        let x = Tensor::cat(&[x.clone(), x.flip(&[3])?, x.flip(&[2])?, (1.0 - x)?], 0)?;
        Ok((net, x))
    }

    fn ids(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<u32>().unwrap()
    }

    // (candle's CPU matmul has no bf16, so the CPU tests use f16; on CUDA both run.)
    #[test]
    fn reduced_precision_is_measured_against_f32_and_reported() -> Result<()> {
        // Explicit f16: used whatever its agreement, agreement measured on the first batch.
        let (net, x) = fixture_net(Precision::F16, 0.99)?;
        let tok = DvaeTokenizer::new(net.clone(), false)?;
        assert!(
            tok.precision().is_none(),
            "not settled before the first batch"
        );
        let got = tok.encode(&x)?;
        let r = tok.precision().unwrap();
        let golden = net.encode(&x)?;
        let half = net.to_dtype(DType::F16)?.encode(&x)?;
        let a = agreement(&half, &golden)?;
        assert_eq!((r.dtype.as_str(), r.tokens), ("f16", golden.elem_count()));
        assert_eq!(ids(&got), ids(&half));
        assert!((r.agreement - a).abs() < 1e-12, "{} vs {a}", r.agreement);
        eprintln!(
            "f16 token agreement with f32 on the fixture batch: {a} of {}",
            r.tokens
        );
        assert!(a > 0.5, "f16 agreement {a}");
        assert_eq!(tok.decode(&got)?.dtype(), DType::F32);
        // Later batches run in f16 without re-checking.
        assert_eq!(ids(&tok.encode(&x)?), ids(&half));

        // auto on the CPU: f32 straight away, nothing compared.
        let (net, x) = fixture_net(Precision::Auto, 0.99)?;
        let tok = DvaeTokenizer::new(net.clone(), false)?;
        assert_eq!(tok.precision().unwrap().dtype, "f32");
        assert_eq!(ids(&tok.encode(&x)?), ids(&golden));

        // The choice: a candidate reaching the bar is kept; one below it falls back to f32. The
        // low-agreement candidate is a differently initialised network of the same sizes.
        let unrelated = || {
            DalleDvae::new(
                net.cfg.clone(),
                ParamStore::frozen(7).var_builder(DType::F32, &Device::Cpu),
            )
        };
        let f16 = net.to_dtype(DType::F16)?;
        let tok = DvaeTokenizer::with_candidates(net.clone(), vec![f16.clone()], a);
        assert_eq!(ids(&tok.encode(&x)?), ids(&half));
        assert_eq!(tok.precision().unwrap().dtype, "f16");
        let other = unrelated()?;
        let poor = agreement(&other.encode(&x)?, &golden)?;
        assert!(poor < 0.5, "an unrelated network agrees on {poor}");
        let tok = DvaeTokenizer::with_candidates(net.clone(), vec![other, f16], 0.9);
        assert_eq!(
            ids(&tok.encode(&x)?),
            ids(&half),
            "the first candidate over the bar"
        );
        let r = tok.precision().unwrap();
        assert_eq!((r.dtype.as_str(), r.agreement), ("f16", a));
        let other = unrelated()?;
        let tok = DvaeTokenizer::with_candidates(net.clone(), vec![other], 0.9);
        assert_eq!(
            ids(&tok.encode(&x)?),
            ids(&golden),
            "none over the bar: f32"
        );
        let r = tok.precision().unwrap();
        assert_eq!((r.dtype.as_str(), r.agreement), ("f32", 1.0));
        let (net, _) = fixture_net(Precision::Auto, 1.5)?;
        let e = DvaeTokenizer::new(net, true).err().unwrap().to_string();
        assert!(e.contains("min_agreement") && e.contains("1.5"), "{e}");
        Ok(())
    }

    /// Channels last is the same network: on the CPU (convolutions channels first between
    /// transposes, the bias/ReLU epilogues, pools, upsampling and argmax with channels-last
    /// kernels) the logits, tokens and decoder statistics equal the channels-first ones bit for
    /// bit, in f32 and in f16 (candle's ops there, the composed epilogue); and back.
    #[test]
    fn channels_last_is_the_same_network() -> Result<()> {
        let (net, x) = fixture_net(Precision::F32, 0.99)?;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            v.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let nhwc = net.with_layout(true)?;
        assert!(nhwc.channels_last() && !net.channels_last());
        for dt in [DType::F32, DType::F16] {
            let (a, b) = (net.to_dtype(dt)?, nhwc.to_dtype(dt)?);
            assert!(b.channels_last());
            let (la, lb) = (a.encoder_logits(&x)?, b.encoder_logits(&x)?);
            assert_eq!(lb.dims(), la.dims());
            assert_eq!(bits(&lb), bits(&la), "{dt:?} logits");
            let tokens = a.encode(&x)?;
            assert_eq!(ids(&b.encode(&x)?), ids(&tokens), "{dt:?} tokens");
            let (sa, sb) = (a.decoder_stats(&tokens)?, b.decoder_stats(&tokens)?);
            assert_eq!(sb.dims(), sa.dims());
            assert_eq!(bits(&sb), bits(&sa), "{dt:?} decoder");
        }
        let back = nhwc.with_layout(false)?;
        assert_eq!(
            bits(&back.encoder_logits(&x)?),
            bits(&net.encoder_logits(&x)?)
        );
        // "auto" is channels first on the CPU; "nhwc" is what it says anywhere.
        assert!(!MapLayout::Auto.channels_last(false) && MapLayout::Auto.channels_last(true));
        assert!(MapLayout::Nhwc.channels_last(false));
        assert!(!MapLayout::Nchw.channels_last(true));
        Ok(())
    }

    /// `decoder_precision`: the decoder alone in f16 (the CPU's reduced precision; bf16 on CUDA),
    /// its distance from the f32 decoder's pixels measured on the first decode and reported;
    /// `"same"` adds no decoder report.
    #[test]
    fn decoder_precision_of_its_own_is_measured_and_reported() -> Result<()> {
        let (net, x) = fixture_net(Precision::F32, 0.99)?;
        let mut cfg = net.cfg.clone();
        cfg.decoder_precision = DecoderPrecision::F16;
        let net = DalleDvae { cfg, ..net };
        let tok = DvaeTokenizer::new(net.clone(), false)?;
        let tokens = tok.encode(&x)?;
        assert_eq!(ids(&tokens), ids(&net.encode(&x)?), "the encoder stays f32");
        let report = tok.precision().unwrap().decoder.unwrap();
        assert_eq!((report.dtype.as_str(), report.max_abs_diff), ("f16", None));
        let got = tok.decode(&tokens)?;
        let want = net.decode(&tokens)?;
        assert_eq!((got.dims(), got.dtype()), (want.dims(), DType::F32));
        let diff = (&got - &want)?.abs()?.flatten_all()?;
        let max = diff.max(0)?.to_scalar::<f32>()? as f64;
        let mean = diff.mean(0)?.to_scalar::<f32>()? as f64;
        eprintln!("f16 decoder vs f32: max {max}, mean {mean} (pixels in [0, 1])");
        assert!(max > 0.0 && max < 0.05, "f16 decoder differs by {max}");
        let half = net.to_dtype(DType::F16)?.decode(&tokens)?;
        let same = (&got - &half)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0, "decodes with the f16 network");
        let report = tok.precision().unwrap().decoder.unwrap();
        assert_eq!(report.max_abs_diff, Some(max));
        assert!((report.mean_abs_diff.unwrap() - mean).abs() < 1e-9);
        let (net, _) = fixture_net(Precision::F32, 0.99)?;
        let tok = DvaeTokenizer::new(net, false)?;
        tok.encode(&x)?;
        assert_eq!(tok.precision().unwrap().decoder, None);
        Ok(())
    }

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_tokenizer("dalle_dvae")
    }

    /// Key names are OpenAI's; the parameter count of a small instance equals a hand count of
    /// the architecture (worked out in the comment below).
    #[test]
    fn parameter_names_and_counts_follow_openai_layout() -> Result<()> {
        let store = ParamStore::frozen(0);
        let cfg = DvaeConfig {
            vocab_size: 16,
            n_hid: 8,
            dec_n_hid: 8,
            dec_n_init: 4,
            group_count: 2,
            n_blk_per_group: 1,
            eps: 0.1,
            weights: None,
            precision: Precision::F32,
            min_agreement: 0.99,
            decoder_precision: DecoderPrecision::Same,
            layout: MapLayout::Auto,
        };
        let _ = DalleDvae::new(cfg, store.var_builder(DType::F32, &Device::Cpu))?;
        let names = store.names_under("");
        for key in [
            "encoder.blocks.input.w",
            "encoder.blocks.group_1.block_1.res_path.conv_1.w",
            "encoder.blocks.group_2.block_1.id_path.w",
            "encoder.blocks.output.conv.b",
            "decoder.blocks.input.w",
            "decoder.blocks.group_1.block_1.id_path.w",
            "decoder.blocks.group_2.block_1.res_path.conv_4.b",
            "decoder.blocks.output.conv.w",
        ] {
            assert!(names.iter().any(|n| n == key), "missing {key} in {names:?}");
        }
        // Hand count. Encoder: input 3·8·49+8 = 1184; group_1 block (8→8, hid 2):
        // 8·2·9+2 + 2·2·9+2 + 2·2·9+2 + 2·8·1+8 = 146+38+38+24 = 246;
        // group_2 block (8→16, hid 4): id 8·16+16 = 144; res 8·4·9+4 + 4·4·9+4 ·2 + 4·16+16
        // = 292+148+148+80 = 668; output 16·16+16 = 272. Encoder total 1184+246+144+668+272 = 2514.
        // Decoder: input 16·4+4 = 68; group_1 block (4→16, hid 4): id 4·16+16 = 80;
        // res 4·4+4 + (4·4·9+4)·2 + 4·16·9+16 = 20+296+592 = 908; group_2 block (16→8, hid 2):
        // id 16·8+8 = 136; res 16·2+2 + (2·2·9+2)·2 + 2·8·9+8 = 34+76+152 = 262;
        // output 8·6+6 = 54. Decoder total 68+80+908+136+262+54 = 1508.
        assert_eq!(store.num_params(), 2514 + 1508);
        Ok(())
    }

    #[test]
    fn paper_size_gives_a_14x14_grid_for_the_112_px_view() -> Result<()> {
        let cfg = DvaeConfig::default();
        assert_eq!(cfg.downsample(), 8);
        // Build only the shape logic on a tiny instance with the paper's group count.
        let small = DvaeConfig {
            vocab_size: 32,
            n_hid: 4,
            dec_n_hid: 4,
            dec_n_init: 8,
            ..cfg
        };
        let tok = DalleDvae::new(
            small,
            ParamStore::frozen(0).var_builder(DType::F32, &Device::Cpu),
        )?;
        assert_eq!(tok.grid((112, 112))?, TokenGrid::new(14, 14));
        let ids = tok.encode(&cim_api::testing::uniform((1, 3, 112, 112), 0)?)?;
        assert_eq!(ids.dims(), [1, 14, 14]);
        assert_eq!(tok.decode(&ids)?.dims(), [1, 3, 112, 112]);
        let err = tok.grid((100, 100)).unwrap_err().to_string();
        assert!(err.contains("multiple of 8"), "{err}");
        Ok(())
    }

    /// The decoder's folded upsampling equals upsampling first, with and without an id-path conv;
    /// an encoder-style block (3×3 first) upsamples first.
    #[test]
    fn folded_upsampling_equals_upsampling_first() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let store = ParamStore::frozen(3);
        let vb = store.var_builder(DType::F32, &dev);
        let mut blocks = [
            ResBlock::new(12, 8, 4, [1, 3, 3, 3], vb.pp("a"))?,
            ResBlock::new(8, 8, 4, [1, 3, 3, 3], vb.pp("b"))?,
            ResBlock::new(8, 8, 4, [3, 3, 3, 1], vb.pp("c"))?,
        ];
        // Non-zero biases everywhere (fresh ones are zero), so the bias folding is exercised.
        let mut seed = 40;
        for blk in &mut blocks {
            for c in blk.res_path.iter_mut().chain(blk.id_path.as_mut()) {
                seed += 1;
                c.b = cim_api::testing::uniform(c.b.dims1()?, seed)?;
            }
        }
        for (i, blk) in blocks.iter().enumerate() {
            let n_in = if i == 0 { 12 } else { 8 };
            let x = cim_api::testing::uniform((2, n_in, 5, 3), 4 + i as u64)?.affine(2.0, -1.0)?;
            let folded = blk.forward_upsampled(&mut Act::new(x.clone()), false)?.x;
            let first = blk.forward(&x.upsample_nearest2d(10, 6)?)?;
            assert_eq!(folded.dims(), [2, 8, 10, 6]);
            let d = (folded - first)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "block {i}: {d}");
        }
        Ok(())
    }

    #[test]
    fn decode_lookup_equals_one_hot_convolution() -> Result<()> {
        let cfg = DvaeConfig::test_tiny();
        let store = ParamStore::frozen(3);
        let tok = DalleDvae::new(cfg.clone(), store.var_builder(DType::F32, &Device::Cpu))?;
        let ids = Tensor::new(&[[[1u32, 5], [63, 0]]], &Device::Cpu)?;
        let ours = tok.decoder_stats(&ids)?;
        // Reference: one-hot (B, V, h, w) through the input conv, then the same groups.
        let one_hot = candle_nn::encoding::one_hot(ids.clone(), cfg.vocab_size, 1f32, 0f32)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let w = store
            .get("decoder.blocks.input.w")
            .unwrap()
            .as_detached_tensor();
        let b = store
            .get("decoder.blocks.input.b")
            .unwrap()
            .as_detached_tensor();
        let x = one_hot.conv2d(&w, 0, 1, 1, 1)?.broadcast_add(&b.reshape((
            1,
            cfg.dec_n_init,
            1,
            1,
        ))?)?;
        let x = tok.dec_groups.forward(&x, Resample::Upsample)?.x;
        let reference = tok.dec_output.forward(&x.relu()?, false)?;
        let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
