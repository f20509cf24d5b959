//! # `vq` — a VQ-VAE tokenizer you train yourself
//!
//! The frozen tokenizer of CiM only has to turn images into discrete tokens and tokens back into
//! images. DALL-E's dVAE does that at ImageNet scale; where its weights are not at hand (or the
//! images are not ImageNet-like), this tokenizer is trained on your own images with
//! `cim-run tokenizer-train` and then used as the frozen tokenizer of any preset:
//! `--set tokenizer.name=vq --set tokenizer.vq.weights=PATH`.
//!
//! Architecture (VQ-VAE, van den Oord et al. 2017; downsampling by space-to-depth + conv):
//!
//! ```text
//! encoder: [0,1] → 2x−1 → conv3×3 (3→c₀) → per stage i: space-to-depth ×2, conv3×3 (4cᵢ→cᵢ₊₁), res blocks
//!          → ReLU → conv1×1 (→ code_dim)                                   (B, D, h/2ˢ, w/2ˢ)
//! quantise: nearest codebook row (squared distance)                       (B, h/2ˢ, w/2ˢ) ids
//! decoder: conv3×3 (D→c_s) → per stage, deepest first: res blocks, ReLU, nearest ×2, conv3×3
//!          (cᵢ₊₁→cᵢ) → ReLU → conv3×3 (c₀→3) → y/2 + ½                      (B, 3, h, w)
//! ```
//!
//! A res block is `x + conv1×1(ReLU(conv3×3(ReLU(x))))`. Training ([`VqModel::losses`]) uses the
//! straight-through estimator `z_q = z_e + sg(e − z_e)`, the loss
//! `‖x − x̂‖² + ‖sg(z_e) − e‖² + β‖z_e − sg(e)‖²` (β = 0.25), a codebook initialised from encoder
//! outputs and periodic re-seeding of codes no batch used ([`reset_dead_codes`]).
//!
//! The embedded default ([`EMBEDDED`], `weights = "embedded"`): 512 codes of width 32 on an 8×8 grid
//! for 32-px views, channels [16, 32, 64], trained on CIFAR-10's training images by
//! `cim-run tokenizer-train --preset vq_cifar10 --out plugins/vq/assets/cifar10_vq512.safetensors`
//! (numbers in the book's Tokenizers chapter). Weight files carry their architecture in the
//! safetensors metadata (`cim.vq`), so a mismatch with the config is reported by key.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::Rng;
use serde::{Deserialize, Serialize};

use cim_api::{BuildCtx, Error, Result, TokenGrid, Tokenizer};

/// The embedded CIFAR-10 tokenizer (see the module docs for the command that made it).
pub const EMBEDDED: &[u8] = include_bytes!("../assets/cifar10_vq512.safetensors");

/// Metadata key holding the architecture of a weight file.
pub const META_KEY: &str = "cim.vq";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VqConfig {
    /// Codebook size (number of distinct tokens).
    pub vocab_size: usize,
    /// Width of a code.
    pub code_dim: usize,
    /// Channel widths: `channels[0]` at full resolution, then one stride-2 stage per further entry
    /// (so the grid is the view divided by `2^(len − 1)`).
    pub channels: Vec<usize>,
    /// Residual blocks per stage, in the encoder and in the decoder.
    pub res_blocks: usize,
    /// Commitment weight β.
    pub beta: f64,
    /// `"embedded"` (the CIFAR-10 tokenizer shipped in this crate), `"random"` (seeded
    /// initialisation: for tests and as the start of training), a local path or
    /// `hub:OWNER/REPO[@REV]/FILE`.
    pub weights: String,
}

impl Default for VqConfig {
    fn default() -> Self {
        Self {
            vocab_size: 512,
            code_dim: 32,
            channels: vec![16, 32, 64],
            res_blocks: 1,
            beta: 0.25,
            weights: "embedded".into(),
        }
    }
}

impl VqConfig {
    /// Conformance-test size: 64 codes, 4× downsampling, narrow.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 64,
            code_dim: 8,
            channels: vec![8, 16, 16],
            res_blocks: 1,
            beta: 0.25,
            weights: "random".into(),
        }
    }
    /// Spatial downsampling factor.
    pub fn factor(&self) -> usize {
        1 << (self.channels.len() - 1)
    }
    /// The architecture part (what a weight file must agree with).
    fn arch(&self) -> serde_json::Value {
        serde_json::json!({
            "vocab_size": self.vocab_size,
            "code_dim": self.code_dim,
            "channels": self.channels,
            "res_blocks": self.res_blocks,
        })
    }
    fn validate(&self) -> Result<()> {
        if self.channels.len() < 2 || self.channels.contains(&0) {
            return Err(Error::config(format!(
                "tokenizer.vq.channels must list at least two non-zero widths (one per resolution), got {:?}",
                self.channels
            )));
        }
        if self.vocab_size < 2 || self.code_dim == 0 {
            return Err(Error::config(format!(
                "tokenizer.vq: vocab_size must be ≥ 2 and code_dim ≥ 1 (got {} and {})",
                self.vocab_size, self.code_dim
            )));
        }
        Ok(())
    }
}

/// A stride-1 "same" `k×k` convolution with bias (PyTorch's `Conv2d` names: `weight`, `bias`)
/// through [`cim_ops::conv2d`]: im2col + GEMM on the CPU, whose backward is a matmul's and one
/// col2im pass (candle's own CPU convolution backward, a direct transposed-convolution loop, made
/// training ~10× slower).
#[derive(Clone, Debug)]
struct Conv {
    w: Tensor,
    b: Tensor,
    k: usize,
}

impl Conv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: usize) -> Result<Self> {
        let fan_in = (cin * k * k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let w = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let b = vb.get_with_hints(
            cout,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self { w, b, k })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cout = self.w.dim(0)?;
        Ok(cim_ops::conv2d(x, &self.w, self.k / 2, 1)?
            .broadcast_add(&self.b.reshape((1, cout, 1, 1))?)?)
    }
}

/// Space-to-depth: `(B, C, H, W)` → `(B, 4C, H/2, W/2)` (PyTorch's `pixel_unshuffle(x, 2)`).
fn unshuffle2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * 4, h / 2, w / 2))?)
}

#[derive(Clone, Debug)]
struct ResBlock {
    conv1: Conv,
    conv2: Conv,
}

impl ResBlock {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            conv1: Conv::new(vb.pp("conv1"), c, c, 3)?,
            conv2: Conv::new(vb.pp("conv2"), c, c, 1)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&x.relu()?)?;
        let h = self.conv2.forward(&h.relu()?)?;
        Ok((x + h)?)
    }
}

/// Nearest-neighbour ×2 upsampling written as a broadcast (its backward is a sum, which candle
/// has for every device).
fn upsample2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// `(B, D, h, w)` → `(B·h·w, D)`, rows in row-major grid order.
fn to_rows(z: &Tensor) -> Result<Tensor> {
    let (b, d, h, w) = z.dims4()?;
    Ok(z.permute((0, 2, 3, 1))?.reshape((b * h * w, d))?)
}

fn from_rows(rows: &Tensor, b: usize, h: usize, w: usize) -> Result<Tensor> {
    let d = rows.dim(1)?;
    Ok(rows
        .reshape((b, h, w, d))?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// Index of the nearest codebook row for every row (shared with the other quantising tokenizer).
pub use cim_ops::nearest;

/// The network and codebook; [`Vq`] is the frozen tokenizer around it.
#[derive(Clone, Debug)]
pub struct VqModel {
    cfg: VqConfig,
    enc_in: Conv,
    enc_down: Vec<Conv>,
    enc_res: Vec<Vec<ResBlock>>,
    enc_out: Conv,
    dec_in: Conv,
    dec_res: Vec<Vec<ResBlock>>,
    dec_up: Vec<Conv>,
    dec_out: Conv,
    codebook: Tensor,
}

/// One training forward: the loss terms and what the trainer needs for codebook upkeep.
#[derive(Debug)]
pub struct VqStep {
    /// `recon + codebook + β·commit`.
    pub total: Tensor,
    pub recon: Tensor,
    pub codebook: Tensor,
    pub commit: Tensor,
    /// Chosen code per position `(B·h·w,)` u32.
    pub ids: Tensor,
    /// Encoder outputs as rows `(B·h·w, D)`, detached (to re-seed dead codes from).
    pub rows: Tensor,
    /// Reconstruction `(B, 3, H, W)` (unclamped).
    pub image: Tensor,
}

impl VqModel {
    /// Builds the network under `vb` (`encoder.*`, `decoder.*`, `codebook`).
    pub fn new(cfg: VqConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.channels;
        let stages = ch.len() - 1;
        let (e, d) = (vb.pp("encoder"), vb.pp("decoder"));
        let res = |vb: VarBuilder, i: usize, c: usize| -> Result<Vec<ResBlock>> {
            (0..cfg.res_blocks)
                .map(|j| ResBlock::new(vb.pp(format!("res.{i}.{j}")), c))
                .collect()
        };
        let enc_in = Conv::new(e.pp("conv_in"), 3, ch[0], 3)?;
        let mut enc_down = vec![];
        let mut enc_res = vec![];
        for i in 0..stages {
            enc_down.push(Conv::new(
                e.pp(format!("down.{i}")),
                4 * ch[i],
                ch[i + 1],
                3,
            )?);
            enc_res.push(res(e.clone(), i, ch[i + 1])?);
        }
        let enc_out = Conv::new(e.pp("conv_out"), ch[stages], cfg.code_dim, 1)?;
        let dec_in = Conv::new(d.pp("conv_in"), cfg.code_dim, ch[stages], 3)?;
        let mut dec_res = vec![];
        let mut dec_up = vec![];
        for i in 0..stages {
            dec_res.push(res(d.clone(), i, ch[i + 1])?);
            dec_up.push(Conv::new(d.pp(format!("up.{i}")), ch[i + 1], ch[i], 3)?);
        }
        let dec_out = Conv::new(d.pp("conv_out"), ch[0], 3, 3)?;
        let codebook = vb.get_with_hints(
            (cfg.vocab_size, cfg.code_dim),
            "codebook",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self {
            cfg,
            enc_in,
            enc_down,
            enc_res,
            enc_out,
            dec_in,
            dec_res,
            dec_up,
            dec_out,
            codebook,
        })
    }

    pub fn config(&self) -> &VqConfig {
        &self.cfg
    }
    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }
    /// Number of tensors the model reads (to refuse files with extra ones).
    pub fn num_tensors(&self) -> usize {
        let stages = self.cfg.channels.len() - 1;
        // conv = 2 tensors; res block = 2 convs.
        2 * (4 + 2 * stages + 2 * 2 * stages * self.cfg.res_blocks) + 1
    }

    /// `(B, 3, H, W)` in `[0, 1]` → continuous codes `(B, D, H/f, W/f)`.
    pub fn encode_latent(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.enc_in.forward(&x.affine(2.0, -1.0)?)?;
        for (down, res) in self.enc_down.iter().zip(&self.enc_res) {
            h = down.forward(&unshuffle2(&h)?)?;
            for r in res {
                h = r.forward(&h)?;
            }
        }
        self.enc_out.forward(&h.relu()?)
    }

    /// Codes `(B, D, h, w)` → pixels `(B, 3, h·f, w·f)` around `[0, 1]` (not clamped).
    pub fn decode_latent(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.dec_in.forward(z)?;
        for i in (0..self.dec_up.len()).rev() {
            for r in &self.dec_res[i] {
                h = r.forward(&h)?;
            }
            h = self.dec_up[i].forward(&upsample2(&h.relu()?)?)?;
        }
        Ok(self.dec_out.forward(&h.relu()?)?.affine(0.5, 0.5)?)
    }

    /// Token ids `(B, h, w)` of images in `[0, 1]`.
    pub fn tokens(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.encode_latent(&x.detach())?;
        let (b, _, h, w) = z.dims4()?;
        Ok(nearest(&to_rows(&z)?, &self.codebook.detach())?.reshape((b, h, w))?)
    }

    /// Pixels (unclamped) of token ids `(B, h, w)`.
    pub fn render(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, h, w) = ids.dims3()?;
        let rows = self.codebook.index_select(&ids.flatten_all()?, 0)?;
        self.decode_latent(&from_rows(&rows, b, h, w)?)
    }

    /// The training forward on images in `[0, 1]` (mean squared errors per element).
    pub fn losses(&self, x: &Tensor) -> Result<VqStep> {
        let z = self.encode_latent(x)?;
        let (b, _, h, w) = z.dims4()?;
        let rows = to_rows(&z)?;
        let ids = nearest(&rows.detach(), &self.codebook.detach())?;
        let q = self.codebook.index_select(&ids, 0)?;
        let codebook = (&q - rows.detach())?.sqr()?.mean_all()?;
        let commit = (&rows - q.detach())?.sqr()?.mean_all()?;
        // Straight-through: the decoder sees the codes, the encoder gets the decoder's gradient.
        let st = (&rows + (&q - &rows)?.detach())?;
        let image = self.decode_latent(&from_rows(&st, b, h, w)?)?;
        let recon = (&image - x)?.sqr()?.mean_all()?;
        let total = ((&recon + &codebook)? + commit.affine(self.cfg.beta, 0.0)?)?;
        Ok(VqStep {
            total,
            recon,
            codebook,
            commit,
            ids,
            rows: rows.detach(),
            image,
        })
    }
}

/// Re-seeds every code with `counts[k] == 0` from a random row of `rows` (encoder outputs), plus
/// a little noise so two re-seeded codes never coincide. Returns how many codes were re-seeded.
pub fn reset_dead_codes(
    codebook: &Var,
    counts: &[u64],
    rows: &Tensor,
    rng: &mut impl Rng,
) -> Result<usize> {
    let (v, d) = codebook.dims2()?;
    if counts.len() != v {
        return Err(Error::msg(format!(
            "{} usage counts for {v} codes",
            counts.len()
        )));
    }
    let dead: Vec<usize> = (0..v).filter(|&k| counts[k] == 0).collect();
    if dead.is_empty() {
        return Ok(0);
    }
    let host: Vec<f32> = rows.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let n = rows.dim(0)?;
    let mut cb: Vec<f32> = codebook
        .as_tensor()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let scale = (host.iter().map(|x| x * x).sum::<f32>() / host.len().max(1) as f32).sqrt();
    for &k in &dead {
        let r = rng.gen_range(0..n);
        for j in 0..d {
            let noise: f32 = rng.gen_range(-1.0..1.0);
            cb[k * d + j] = host[r * d + j] + 0.01 * scale * noise;
        }
    }
    codebook.set(&Tensor::from_vec(cb, (v, d), codebook.device())?.to_dtype(codebook.dtype())?)?;
    Ok(dead.len())
}

/// `exp(entropy)` of the code usage histogram: the effective number of codes in use (1 … V).
pub fn perplexity(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// Serialises trained weights (names as [`VqModel::new`] reads them) with the architecture in the
/// metadata, so a later mismatch names the differing key.
pub fn to_safetensors(tensors: &HashMap<String, Tensor>, cfg: &VqConfig) -> Result<Vec<u8>> {
    let meta = HashMap::from([(META_KEY.to_string(), cfg.arch().to_string())]);
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize(cpu, Some(meta))
        .map_err(|e| Error::msg(format!("serialising the VQ tokenizer: {e}")))
}

/// The frozen tokenizer.
#[derive(Clone, Debug)]
pub struct Vq {
    model: VqModel,
}

impl Vq {
    /// `cfg.weights` decides where the weights come from (see [`VqConfig::weights`]); `vb` only
    /// serves `"random"`.
    pub fn new(cfg: VqConfig, vb: VarBuilder, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let model = match cfg.weights.as_str() {
            "random" => VqModel::new(cfg, vb)?,
            "embedded" => {
                Self::from_bytes(cfg, EMBEDDED, "the embedded CIFAR-10 VQ tokenizer", device)?
            }
            spec => {
                let path = cim_api::weights::resolve(spec, "tokenizer.vq.weights")?;
                let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                Self::from_bytes(cfg, &bytes, &path.display().to_string(), device)?
            }
        };
        Ok(Self { model })
    }

    /// Loads a weight file's bytes, checking its recorded architecture against `cfg`.
    pub fn from_bytes(
        cfg: VqConfig,
        bytes: &[u8],
        source: &str,
        device: &Device,
    ) -> Result<VqModel> {
        let data = |m: String| Error::Data {
            path: source.to_string(),
            message: m,
        };
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| data(format!("not a safetensors file: {e}")))?;
        if let Some(arch) = meta.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
            let file: serde_json::Value = serde_json::from_str(arch)
                .map_err(|e| data(format!("bad `{META_KEY}` metadata: {e}")))?;
            let want = cfg.arch();
            for (k, v) in want.as_object().expect("arch is an object") {
                if file.get(k) != Some(v) {
                    return Err(data(format!(
                        "was trained with {k} = {}, but tokenizer.vq.{k} = {v}; set tokenizer.vq.{k} = {} to use it",
                        file.get(k).map_or("(missing)".to_string(), |x| x.to_string()),
                        file.get(k).map_or("?".to_string(), |x| x.to_string()),
                    )));
                }
            }
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| data(format!("cannot read VQ weights: {e}")))?;
        let n = tensors.len();
        let model = VqModel::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, device))
            .map_err(|e| data(format!("{e} (tokenizer.vq sizes must match the file)")))?;
        if model.num_tensors() != n {
            return Err(data(format!(
                "holds {n} tensors, the configured VQ tokenizer uses {}",
                model.num_tensors()
            )));
        }
        Ok(model)
    }

    pub fn model(&self) -> &VqModel {
        &self.model
    }
}

impl Tokenizer for Vq {
    fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }
    fn grid(&self, (h, w): (usize, usize)) -> Result<TokenGrid> {
        let f = self.model.cfg.factor();
        if h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(Error::config(format!(
                "vq with {} stride-2 stages: the tokenizer view {h}×{w} must be a non-zero multiple of {f}",
                self.model.cfg.channels.len() - 1
            )));
        }
        Ok(TokenGrid::new(h / f, w / f))
    }
    fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = pixels.dims4()?;
        self.grid((h, w))?;
        self.model.tokens(&pixels.to_dtype(DType::F32)?)
    }
    fn decode(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.model.render(ids)?.detach().clamp(0f32, 1f32)?)
    }
}

fn build(cfg: VqConfig, ctx: &BuildCtx) -> Result<Vq> {
    Vq::new(cfg, ctx.vb.clone(), &ctx.device)
}

cim_api::register_tokenizer! {
    name: "vq",
    about: "VQ-VAE tokenizer trained with `cim-run tokenizer-train` (embedded: 512 codes, CIFAR-10, 32-px view → 8×8)",
    config: VqConfig,
    default: VqConfig::default(),
    tiny: VqConfig::tiny(),
    build: build,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;
    use cim_api::ParamStore;
    use rand::SeedableRng;

    fn smooth_images(b: usize, size: usize, seed: u64) -> Result<Tensor> {
        // Low-frequency images: 4×4 random colours upsampled, like coarse photos.
        let coarse = cim_api::testing::uniform((b, 3, 4, 4), seed)?;
        Ok(coarse.upsample_nearest2d(size, size)?)
    }

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_tokenizer("vq")
    }

    #[test]
    fn matmul_convolution_matches_candles_conv2d() -> Result<()> {
        let store = ParamStore::frozen(4);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let x = cim_api::testing::uniform((2, 5, 6, 7), 2)?;
        for k in [1, 3] {
            let conv = Conv::new(vb.pp(format!("c{k}")), 5, 4, k)?;
            let want = x
                .conv2d(&conv.w, k / 2, 1, 1, 1)?
                .broadcast_add(&conv.b.reshape((1, 4, 1, 1))?)?;
            let diff = (conv.forward(&x)? - want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "k = {k}: {diff}");
        }
        // Space-to-depth puts pixel (2i+a, 2j+b) of channel c at channel 4c + 2a + b.
        let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))?;
        let u = unshuffle2(&x)?;
        assert_eq!(u.dims(), [1, 4, 2, 2]);
        assert_eq!(u.i((0, 1))?.to_vec2::<f32>()?, [[1., 3.], [9., 11.]]);
        Ok(())
    }

    #[test]
    fn upsample_matches_nearest_and_rows_round_trip() -> Result<()> {
        let x = cim_api::testing::uniform((2, 3, 4, 5), 1)?;
        let a = upsample2(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let b = x
            .upsample_nearest2d(8, 10)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(a, b);
        let back = from_rows(&to_rows(&x)?, 2, 4, 5)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn every_parameter_gets_a_gradient_and_training_lowers_the_loss() -> Result<()> {
        let store = ParamStore::trainable(3);
        let dev = Device::Cpu;
        let model = VqModel::new(VqConfig::tiny(), store.var_builder(DType::F32, &dev))?;
        let vars = store.vars();
        assert_eq!(vars.len(), model.num_tensors());
        let x = smooth_images(8, 16, 5)?;
        let step = model.losses(&x)?;
        let grads = step.total.backward()?;
        for (name, v) in &vars {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let n = g.sqr()?.sum_all()?.to_scalar::<f32>()?;
            // Codes nobody chose get none; at least the chosen ones must move.
            assert!(n > 0.0 && n.is_finite(), "{name}: |g|² = {n}");
        }
        // Straight-through: the encoder's first conv gets gradient from the reconstruction alone.
        let g = step.recon.backward()?;
        let w = &vars
            .iter()
            .find(|(n, _)| n == "encoder.conv_in.weight")
            .unwrap()
            .1;
        assert!(g.get(w).unwrap().abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

        let mut opt = <candle_nn::AdamW as candle_nn::Optimizer>::new(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            candle_nn::ParamsAdamW {
                lr: 3e-3,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let cb = &vars.iter().find(|(n, _)| n == "codebook").unwrap().1;
        reset_dead_codes(cb, &vec![0; 64], &model.losses(&x)?.rows, &mut rng)?;
        let first = model.losses(&x)?.recon.to_scalar::<f32>()?;
        for _ in 0..60 {
            let s = model.losses(&x)?;
            candle_nn::Optimizer::backward_step(&mut opt, &s.total)?;
        }
        let last = model.losses(&x)?.recon.to_scalar::<f32>()?;
        assert!(last < 0.5 * first, "reconstruction mse {first} → {last}");
        Ok(())
    }

    #[test]
    fn dead_codes_are_reseeded_from_encoder_rows_and_live_ones_kept() -> Result<()> {
        let cb = Var::from_tensor(&Tensor::zeros((4, 2), DType::F32, &Device::Cpu)?)?;
        let rows = Tensor::new(&[[10f32, 10.], [20., 20.], [30., 30.]], &Device::Cpu)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = reset_dead_codes(&cb, &[5, 0, 1, 0], &rows, &mut rng)?;
        assert_eq!(n, 2);
        let v: Vec<Vec<f32>> = cb.as_tensor().to_vec2()?;
        assert_eq!((v[0].clone(), v[2].clone()), (vec![0., 0.], vec![0., 0.]));
        for k in [1, 3] {
            // Within the 1 % noise of one of the rows.
            assert!(
                [10f32, 20., 30.].iter().any(|r| (v[k][0] - r).abs() < 0.5),
                "{v:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn perplexity_counts_effective_codes() {
        assert!((perplexity(&[5, 5, 5, 5]) - 4.0).abs() < 1e-9);
        assert!((perplexity(&[7, 0, 0]) - 1.0).abs() < 1e-9);
        assert_eq!(perplexity(&[0, 0]), 0.0);
    }

    #[test]
    fn saved_weights_load_back_and_a_mismatch_names_the_key() -> Result<()> {
        let store = ParamStore::trainable(9);
        let dev = Device::Cpu;
        let cfg = VqConfig::tiny();
        let model = VqModel::new(cfg.clone(), store.var_builder(DType::F32, &dev))?;
        let tensors: HashMap<String, Tensor> = store
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        let bytes = to_safetensors(&tensors, &cfg)?;
        let loaded = Vq::from_bytes(cfg.clone(), &bytes, "mem", &dev)?;
        let x = smooth_images(2, 16, 7)?;
        assert_eq!(
            loaded.tokens(&x)?.flatten_all()?.to_vec1::<u32>()?,
            model.tokens(&x)?.flatten_all()?.to_vec1::<u32>()?
        );
        let wrong = VqConfig {
            channels: vec![8, 16],
            ..cfg
        };
        let e = Vq::from_bytes(wrong, &bytes, "w.safetensors", &dev)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("w.safetensors")
                && e.contains("tokenizer.vq.channels")
                && e.contains("[8,16,16]"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn embedded_tokenizer_reconstructs_cifar10_test_images() -> Result<()> {
        // The first 256 images of CIFAR-10's test split (never seen in training): the embedded
        // tokenizer reached 23.1 dB on held-out training images (assets/cifar10_vq512.json).
        let path = std::path::Path::new(&std::env::var("CIFAR10_DIR").unwrap_or_default())
            .join("test.bin");
        let Ok(bytes) = std::fs::read(&path) else {
            eprintln!(
                "SKIPPED embedded_tokenizer_reconstructs_cifar10_test_images: {} is absent (CIFAR10_DIR)",
                path.display()
            );
            return Ok(());
        };
        let n = 256;
        let pix: Vec<f32> = bytes
            .chunks(3073)
            .take(n)
            .flat_map(|r| r[1..].iter().map(|&b| b as f32 / 255.0))
            .collect();
        let dev = Device::Cpu;
        let x = Tensor::from_vec(pix, (n, 3, 32, 32), &dev)?;
        let tok = Vq::new(
            VqConfig::default(),
            ParamStore::frozen(0).var_builder(DType::F32, &dev),
            &dev,
        )?;
        let ids = tok.encode(&x)?;
        assert_eq!(ids.dims(), [n, 8, 8]);
        let rec = tok.decode(&ids)?;
        let mse: Vec<f32> = (&rec - &x)?.sqr()?.flatten_from(1)?.mean(1)?.to_vec1()?;
        let psnr = mse.iter().map(|m| -10.0 * (*m as f64).log10()).sum::<f64>() / n as f64;
        assert!(psnr > 21.5, "PSNR {psnr:.2} dB");
        let mut counts = vec![0u64; 512];
        for id in ids.flatten_all()?.to_vec1::<u32>()? {
            counts[id as usize] += 1;
        }
        let ppl = perplexity(&counts);
        eprintln!("embedded vq on CIFAR-10 test[..{n}]: PSNR {psnr:.2} dB, perplexity {ppl:.1}");
        assert!(ppl > 200.0, "perplexity {ppl:.1}");
        Ok(())
    }
}
