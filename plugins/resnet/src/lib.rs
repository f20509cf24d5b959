//! # `resnet50` — the vanilla ResNet-50 enhancer
//!
//! Paper §3.1, footnote 5: "The vanilla ResNet-50 model refers to the torchvision ResNet-50 without
//! further architectural change." This is torchvision's `resnet50` (He et al., 2016; v1.5: the stride
//! sits on the 3×3 conv of a bottleneck) without the classifier, with torchvision's parameter names
//! (`conv1.weight`, `bn1.running_mean`, `layer3.2.conv2.weight`, `layer1.0.downsample.1.bias`, …).
//!
//! - input: `(B, 3, H, W)` normalised image
//! - output: [`Features`] `(B, (H/32)², 2048)` from `layer4`, stride 32
//!
//! The maps run channels first or channels last (`layout`, [`MapLayout`]: `"auto"` is channels
//! last on CUDA with cim's cuDNN convolution, as the reference trains ResNet-50): the same
//! network, parameters and checkpoints either way — the weights keep torchvision's
//! `(C_out, C, k, k)` order, and channels last permutes them for cuDNN inside the convolution.
//!
//! BatchNorm trains: batch statistics and a running-statistics update (momentum 0.1, unbiased
//! variance, as PyTorch) when `train` is true, running statistics otherwise. Running statistics are
//! buffers ([`BuildCtx::buffers`]): saved with the weights, never seen by the optimizer.

use candle_core::{DType, Tensor, Var};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use cim_api::{
    BuildCtx, Enhancer, EnhancerInfo, Error, ExecChoices, Features, MapLayout, ParamStore, Result,
    TokenGrid,
};
use cim_ops::BnTail;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3).
    pub layers: [usize; 4],
    /// Width of the first stage (64); stage i has `width·2^i` planes and `4×` that many outputs.
    pub width: usize,
    pub bn_momentum: f64,
    pub bn_eps: f64,
    /// Where the maps keep their channels (see [`MapLayout`]): `"auto"` (channels last on CUDA
    /// with cim's cuDNN convolution and on the CPU), `"nchw"`, `"nhwc"`.
    #[serde(default)]
    pub layout: MapLayout,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            layers: [3, 4, 6, 3],
            width: 64,
            bn_momentum: 0.1,
            bn_eps: 1e-5,
            layout: MapLayout::Auto,
        }
    }
}

impl ResNetConfig {
    pub fn test_tiny() -> Self {
        Self {
            layers: [1, 1, 1, 1],
            width: 4,
            ..Self::default()
        }
    }
}

/// torchvision's conv init: Kaiming normal, fan-out, ReLU gain.
const CONV_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

#[derive(Clone, Debug)]
struct Conv {
    w: Tensor,
    stride: usize,
    pad: usize,
}

impl Conv {
    fn new(c_in: usize, c_out: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            w: vb.get_with_hints((c_out, c_in, k, k), "weight", CONV_INIT)?,
            stride,
            pad: k / 2,
        })
    }
    /// `x` channels first, or channels last with `last`.
    fn forward(&self, x: &Tensor, last: bool) -> Result<Tensor> {
        match last {
            false => Ok(cim_ops::conv2d(x, &self.w, self.pad, self.stride)?),
            true => Ok(cim_ops::conv2d_channels_last(
                x,
                &self.w,
                self.pad,
                self.stride,
            )?),
        }
    }
}

/// BatchNorm2d with trainable affine parameters and running statistics in the buffer store.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
    eps: f64,
    /// In a data-parallel job with `dist.sync_bn`: training statistics over every rank's batch.
    sync: cim_api::CrossRankSlot,
}

impl BatchNorm {
    pub fn new(
        c: usize,
        momentum: f64,
        eps: f64,
        vb: VarBuilder,
        buffers: &ParamStore,
    ) -> Result<Self> {
        let bvb = buffers.var_builder(DType::F32, vb.device()).pp(vb.prefix());
        bvb.get_with_hints(c, "running_mean", Init::Const(0.0))?;
        bvb.get_with_hints(c, "running_var", Init::Const(1.0))?;
        let var = |n: &str| {
            let key = format!("{}.{n}", vb.prefix());
            buffers
                .get(&key)
                .ok_or_else(|| Error::msg(format!("buffer {key} was not created")))
        };
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: var("running_mean")?,
            running_var: var("running_var")?,
            momentum,
            eps,
            sync: Default::default(),
        })
    }

    /// `running ← (1 − momentum)·running + momentum·batch`, the batch variance `var` made unbiased
    /// by `unbias = n / (n − 1)` (as PyTorch); one in-place kernel each where they run.
    fn update_running(&self, mean: &Tensor, var: &Tensor, unbias: f64) -> Result<()> {
        let m = self.momentum;
        cim_ops::running_average(&self.running_mean, mean, m, 1.0)?;
        Ok(cim_ops::running_average(&self.running_var, var, m, unbias)?)
    }

    /// In training, batch statistics (and the running ones updated); else the running ones.
    /// `x` `(B, C, H, W)`, or `(B, H, W, C)` with `last`. bf16 input (mixed precision): in
    /// training on CUDA the fused kernels read and write bf16 (statistics and arithmetic in f32);
    /// elsewhere it is normalised in f32 and handed back in bf16, as LayerNorm is.
    pub fn forward_t(&self, x: &Tensor, train: bool, last: bool) -> Result<Tensor> {
        self.forward_tail(x, train, last, BnTail::default())
    }

    /// `tail(forward_t(x))`: a residual added, then a ReLU ([`BnTail`]) — in training with the
    /// fused kernels one node ([`cim_ops::batch_norm_train_tail`]), elsewhere the separate
    /// ops.
    pub fn forward_tail(
        &self,
        x: &Tensor,
        train: bool,
        last: bool,
        tail: BnTail,
    ) -> Result<Tensor> {
        let (y, done) = self.normalise(x, train, last, tail)?;
        if done {
            return Ok(y);
        }
        let y = match tail.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        match tail.relu {
            true => Ok(cim_ops::relu(&y)?),
            false => Ok(y),
        }
    }

    /// Training statistics over the whole job's batch (SyncBatchNorm): each rank's per-channel
    /// sums of `x` and `x²` are summed across ranks — differentiably, so the backward sums the
    /// ranks' gradients of the statistics as well — and give the mean and the biased variance of
    /// all `n × world` values, with the factor that makes that variance unbiased.
    fn synced_moments(
        x: &Tensor,
        sync: &dyn cim_api::CrossRank,
        n: f64,
        dims: [usize; 3],
    ) -> Result<(Tensor, Tensor, f64)> {
        let sum_over = |t: &Tensor| -> Result<Tensor> {
            Ok(t.sum_keepdim(dims[0])?
                .sum_keepdim(dims[1])?
                .sum_keepdim(dims[2])?)
        };
        let sums = Tensor::cat(&[sum_over(x)?, sum_over(&x.sqr()?)?], 0)?;
        let total = sync.sum(&sums)?;
        let all = n * sync.world() as f64;
        let mean = (total.narrow(0, 0, 1)? / all)?;
        let var = ((total.narrow(0, 1, 1)? / all)? - mean.sqr()?)?.relu()?;
        Ok((mean, var, all / (all - 1.0).max(1.0)))
    }

    /// The normalised map, and whether the fused node applied `tail` already.
    fn normalise(
        &self,
        x: &Tensor,
        train: bool,
        last: bool,
        tail: BnTail,
    ) -> Result<(Tensor, bool)> {
        use cim_ops as ops;
        let c = self.weight.dim(0)?;
        // The statistics' shape, and the dimensions they reduce.
        let (shape, dims) = match last {
            false => ([1, c, 1, 1], [0, 2, 3]),
            true => ([1, 1, 1, c], [0, 1, 2]),
        };
        let n = (x.elem_count() / c.max(1)) as f64;
        let unbias = n / (n - 1.0).max(1.0);
        // Synchronised statistics (several ranks) take the composed path below.
        let sync = self.sync.get();
        if train && sync.is_none() {
            // Fused: one statistics reduction giving [γ; β; mean; var], one normalisation kernel
            // keeping only its input, a backward of two kernels (batch_norm_train_tail).
            let (w, b, eps) = (&self.weight, &self.bias, self.eps);
            if let Some(params) = ops::channel_moments_affine(x, w, b, last)? {
                self.update_running(&params.get(2)?, &params.get(3)?, unbias)?;
                let y = ops::batch_norm_train_tail(x, &params, w, b, eps, last, tail)?;
                return Ok((y, true));
            }
        }
        if x.dtype() == DType::BF16 {
            let y = self.forward_t(&x.to_dtype(DType::F32)?, train, last)?;
            return Ok((y.to_dtype(DType::BF16)?, false));
        }
        let mean_over = |t: &Tensor| -> Result<Tensor> {
            Ok(t.mean_keepdim(dims[0])?
                .mean_keepdim(dims[1])?
                .mean_keepdim(dims[2])?)
        };
        let (mean, var) = if train {
            let (mean, var, unbias) = match sync {
                Some(sync) => Self::synced_moments(x, sync.as_ref(), n, dims)?,
                None => {
                    let mean = mean_over(x)?;
                    let var = mean_over(&x.broadcast_sub(&mean)?.sqr()?)?;
                    (mean, var, unbias)
                }
            };
            let bm = mean.detach().flatten_all()?;
            let bv = var.detach().flatten_all()?;
            self.update_running(&bm, &bv, unbias)?;
            (mean, var)
        } else {
            (
                self.running_mean.as_tensor().reshape(&shape[..])?,
                self.running_var.as_tensor().reshape(&shape[..])?,
            )
        };
        let xn = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = xn
            .broadcast_mul(&self.weight.reshape(&shape[..])?)?
            .broadcast_add(&self.bias.reshape(&shape[..])?)?;
        Ok((y, false))
    }
}

#[derive(Clone, Debug)]
struct Bottleneck {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
    bn3: BatchNorm,
    downsample: Option<(Conv, BatchNorm)>,
}

impl Bottleneck {
    fn new(
        c_in: usize,
        planes: usize,
        stride: usize,
        cfg: &ResNetConfig,
        vb: VarBuilder,
        buf: &ParamStore,
    ) -> Result<Self> {
        let out = planes * 4;
        let bn = |c, name: &str| BatchNorm::new(c, cfg.bn_momentum, cfg.bn_eps, vb.pp(name), buf);
        let downsample = if stride != 1 || c_in != out {
            let d = vb.pp("downsample");
            Some((
                Conv::new(c_in, out, 1, stride, d.pp("0"))?,
                BatchNorm::new(out, cfg.bn_momentum, cfg.bn_eps, d.pp("1"), buf)?,
            ))
        } else {
            None
        };
        Ok(Self {
            conv1: Conv::new(c_in, planes, 1, 1, vb.pp("conv1"))?,
            bn1: bn(planes, "bn1")?,
            conv2: Conv::new(planes, planes, 3, stride, vb.pp("conv2"))?,
            bn2: bn(planes, "bn2")?,
            conv3: Conv::new(planes, out, 1, 1, vb.pp("conv3"))?,
            bn3: bn(out, "bn3")?,
            downsample,
        })
    }
    /// `relu(bn3(conv3(·)) + shortcut)` after two conv → BN → ReLU: each BatchNorm with what
    /// follows it as one node in training ([`BnTail`]).
    fn forward_t(&self, x: &Tensor, train: bool, last: bool) -> Result<Tensor> {
        let cb = |c: &Conv, b: &BatchNorm, x: &Tensor, tail| {
            b.forward_tail(&c.forward(x, last)?, train, last, tail)
        };
        let relu = BnTail {
            residual: None,
            relu: true,
        };
        let h = cb(&self.conv1, &self.bn1, x, relu)?;
        let h = cb(&self.conv2, &self.bn2, &h, relu)?;
        let id = match &self.downsample {
            Some((c, b)) => cb(c, b, x, BnTail::default())?,
            None => x.clone(),
        };
        let out = BnTail {
            residual: Some(&id),
            relu: true,
        };
        cb(&self.conv3, &self.bn3, &h, out)
    }
}

#[derive(Clone, Debug)]
pub struct ResNet {
    conv1: Conv,
    bn1: BatchNorm,
    stages: Vec<Vec<Bottleneck>>,
    info: EnhancerInfo,
    /// Channels-last maps (`layout`, settled at build for the device).
    last: bool,
    /// The bottlenecks as one region in training (`ExecChoices::regions`).
    regions: bool,
}

impl ResNet {
    pub fn new(
        cfg: &ResNetConfig,
        image_size: usize,
        vb: VarBuilder,
        buffers: &ParamStore,
        exec: ExecChoices,
    ) -> Result<Self> {
        // Channels last where cuDNN's NHWC kernels run (MapLayout's "auto"), and on the CPU, whose
        // channels-last convolution and BatchNorm loops make one product of a batch (faster here
        // than the per-image channels-first kernels; book: performance.md).
        let last = match cfg.layout {
            MapLayout::Auto => vb.device().is_cpu() || exec.channels_last,
            layout => layout.channels_last(exec.channels_last),
        };
        if !image_size.is_multiple_of(32) {
            return Err(Error::config(format!(
                "resnet50: image size {image_size} must be a multiple of 32"
            )));
        }
        let w = cfg.width;
        let mut c_in = w;
        let mut stages = vec![];
        for (i, &n) in cfg.layers.iter().enumerate() {
            let planes = w << i;
            let stage = vb.pp(format!("layer{}", i + 1));
            let mut blocks = vec![];
            for j in 0..n {
                let stride = if j == 0 && i > 0 { 2 } else { 1 };
                blocks.push(Bottleneck::new(
                    c_in,
                    planes,
                    stride,
                    cfg,
                    stage.pp(j),
                    buffers,
                )?);
                c_in = planes * 4;
            }
            stages.push(blocks);
        }
        Ok(Self {
            conv1: Conv::new(3, w, 7, 2, vb.pp("conv1"))?,
            bn1: BatchNorm::new(w, cfg.bn_momentum, cfg.bn_eps, vb.pp("bn1"), buffers)?,
            stages,
            info: EnhancerInfo {
                dim: c_in,
                stride: 32,
                image_size,
                shareable_blocks: None,
            },
            last,
            regions: exec.regions,
        })
    }

    /// Whether the maps run channels last.
    pub fn channels_last(&self) -> bool {
        self.last
    }

    /// `layer4` output `(B, 2048, H/32, W/32)` (whatever the layout it ran in).
    pub fn forward_map(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = self.trunk(x, train)?;
        Ok(match self.last {
            false => y,
            true => y.permute((0, 3, 1, 2))?.contiguous()?,
        })
    }

    /// `layer4` output in the network's layout: `(B, 2048, h, w)`, channels last `(B, h, w, 2048)`.
    fn trunk(&self, image: &Tensor, train: bool) -> Result<Tensor> {
        // A region's hand-written backward has no place for the ranks' sums of SyncBatchNorm.
        let synced = self.bn1.sync.get().is_some();
        self.trunk_with(image, train, self.regions && !synced)
    }

    /// Every BatchNorm reads `slot` for the sums across ranks (synchronised BatchNorm).
    pub fn set_cross_rank(&mut self, slot: &cim_api::CrossRankSlot) {
        self.bn1.sync = slot.clone();
        for b in self.stages.iter_mut().flatten() {
            for bn in [&mut b.bn1, &mut b.bn2, &mut b.bn3] {
                bn.sync = slot.clone();
            }
            if let Some((_, bn)) = b.downsample.as_mut() {
                bn.sync = slot.clone();
            }
        }
    }

    /// [`Self::trunk`], the bottlenecks as a region where `regions` and they allow one.
    fn trunk_with(&self, image: &Tensor, train: bool, regions: bool) -> Result<Tensor> {
        let last = self.last;
        let x = match last {
            false => image.clone(),
            true => image.permute((0, 2, 3, 1))?.contiguous()?,
        };
        let relu = BnTail {
            residual: None,
            relu: true,
        };
        let x = self
            .bn1
            .forward_tail(&self.conv1.forward(&x, last)?, train, last, relu)?;
        let x = match last {
            false => max_pool_3x3_s2(&x)?,
            true => max_pool_3x3_s2_nhwc(&x)?,
        };
        let stages = |x: &Tensor| -> Result<Tensor> {
            let mut x = x.clone();
            for stage in &self.stages {
                for b in stage {
                    x = b.forward_t(&x, train, last)?;
                }
            }
            Ok(x)
        };
        // In training, the sixteen bottlenecks as one region (cim_ops::region): their
        // convolutions and BatchNorm nodes hand gradients to each other directly, outside
        // candle's graph, where every op here is a fused node.
        match regions && train && cim_ops::conv_bn_grafted(&x) {
            true => cim_ops::region(&[&x], |xs| stages(&xs[0])),
            false => stages(&x),
        }
    }
}

/// Every `step`-th entry along `dim` starting at `start`, `n` of them (`x[start::step][:n]`).
fn strided(x: &Tensor, dim: usize, start: usize, n: usize, step: usize) -> Result<Tensor> {
    let mut shape = x.dims().to_vec();
    let t = x.narrow(dim, start, n * step)?;
    shape[dim] = n;
    shape.insert(dim + 1, step);
    Ok(t.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)?)
}

/// torchvision's stem pool, `MaxPool2d(3, stride=2, padding=1)`: the fused kernel
/// ([`cim_ops::max_pool_3x3_s2`]) where it applies, else [`max_pool_3x3_s2_composed`].
///
/// bf16 input where the kernel takes f32 only (the CPU) runs on a widened copy: the maximum of
/// rounded values is the rounded maximum, so the result is exact.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = cim_ops::max_pool_3x3_s2(x)? {
        return Ok(y);
    }
    if x.dtype() == DType::BF16 {
        return Ok(max_pool_3x3_s2(&x.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?);
    }
    max_pool_3x3_s2_composed(x)
}

/// [`max_pool_3x3_s2`] of a channels-last map `(B, H, W, C)`: the fused kernel where it applies,
/// else the channels-first pool between transposes.
pub fn max_pool_3x3_s2_nhwc(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = cim_ops::max_pool_3x3_s2_nhwc(x)? {
        return Ok(y);
    }
    let y = max_pool_3x3_s2(&x.permute((0, 3, 1, 2))?.contiguous()?)?;
    Ok(y.permute((0, 2, 3, 1))?.contiguous()?)
}

/// The stem pool as the maximum of 9 strided views (candle's own max-pool has no backward for
/// overlapping windows). Its input follows a ReLU, so zero padding equals PyTorch's −∞ padding.
pub fn max_pool_3x3_s2_composed(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    // Pad 1 before and enough after that every strided view has ho (wo) entries.
    let xp = x
        .pad_with_zeros(2, 1, 2 * ho + 1 - h)?
        .pad_with_zeros(3, 1, 2 * wo + 1 - w)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        let rows = strided(&xp, 2, dy, ho, 2)?;
        for dx in 0..3 {
            let v = strided(&rows, 3, dx, wo, 2)?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    Ok(out.expect("9 views"))
}

impl Enhancer for ResNet {
    fn info(&self) -> EnhancerInfo {
        self.info
    }
    fn forward_t(&self, image: &Tensor, train: bool) -> Result<Features> {
        let x = self.trunk(image, train)?;
        // (B, h·w, C): channels last is that already; channels first is transposed.
        let (tokens, h, w) = match self.last {
            true => {
                let (b, h, w, c) = x.dims4()?;
                (x.reshape((b, h * w, c))?, h, w)
            }
            false => {
                let (_, _, h, w) = x.dims4()?;
                (x.flatten_from(2)?.transpose(1, 2)?, h, w)
            }
        };
        Ok(Features {
            tokens,
            grid: TokenGrid::new(h, w),
            stride: 32,
            cls: None,
        })
    }
}

fn build(cfg: ResNetConfig, ctx: &BuildCtx) -> Result<ResNet> {
    let mut net = ResNet::new(&cfg, ctx.image_size, ctx.vb.clone(), &ctx.buffers, ctx.exec)?;
    net.set_cross_rank(&ctx.cross_rank);
    tracing::info!(
        channels_last = net.channels_last(),
        layout = ?cfg.layout,
        "resnet50 map layout"
    );
    Ok(net)
}

cim_api::register_enhancer! {
    name: "resnet50",
    about: "ResNet-50 (torchvision layout and names, trainable BatchNorm), features from layer4",
    config: ResNetConfig,
    default: ResNetConfig::default(),
    tiny: ResNetConfig::test_tiny(),
    build: build,
    mixed_precision: true,
    export: cim_api::ExportSpec {
        format: "torchvision",
        model: torchvision_model,
    },
}

/// torchvision's `resnet50` where the layout and width are ResNet-50's, else `"custom"` (the
/// names are torchvision's either way).
fn torchvision_model(params: &cim_api::figment::value::Value, _image_size: usize) -> String {
    match params.deserialize::<ResNetConfig>() {
        Ok(c) if c.layers == [3, 4, 6, 3] && c.width == 64 => "resnet50".into(),
        _ => "custom".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_enhancer("resnet50")
    }

    /// Two ranks joined through threads: the sum of what both hand in (a test double of MPI).
    struct Threads {
        rank: usize,
        shared: std::sync::Arc<(std::sync::Mutex<Vec<Vec<f32>>>, std::sync::Barrier)>,
    }

    impl cim_dist::Collective for Threads {
        fn backend(&self) -> &'static str {
            "threads"
        }
        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let (slots, barrier) = &*self.shared;
            slots.lock().unwrap()[self.rank] = t.flatten_all()?.to_vec1::<f32>()?;
            barrier.wait();
            let sum: Vec<f32> = {
                let s = slots.lock().unwrap();
                (0..s[0].len())
                    .map(|i| s.iter().map(|v| v[i]).sum())
                    .collect()
            };
            barrier.wait();
            Ok(Tensor::from_vec(sum, t.shape(), t.device())?)
        }
        fn broadcast(&self, _: &Tensor, _: usize) -> Result<Tensor> {
            Err(Error::msg("not needed"))
        }
        fn abort(&self, _: i32) -> ! {
            panic!("a rank failed")
        }
    }

    /// SyncBatchNorm: two ranks with half a batch each compute what one process computes on the
    /// whole batch — outputs, the input's gradient, the affine parameters' gradients (summed over
    /// ranks, as the trainer's all-reduce does) and the running statistics.
    #[test]
    fn synchronised_batch_norm_over_two_ranks_is_batch_norm_over_the_whole_batch() -> Result<()> {
        let x = (cim_api::testing::uniform((4, 3, 5, 5), 11)? * 3.0)?;
        let r = cim_api::testing::uniform((4, 3, 5, 5), 12)?;
        // Returns y, dL/dx, dL/dweight, dL/dbias and the running mean of rank `rank` of `world`
        // (world 1: the whole batch, no slot).
        let run = |rank: usize, world: usize, shared| -> Result<Vec<Tensor>> {
            let store = ParamStore::trainable(3);
            let buffers = ParamStore::frozen(3);
            let vb = store.var_builder(DType::F32, &Device::Cpu).pp("bn");
            let mut bn = BatchNorm::new(3, 0.1, 1e-5, vb, &buffers)?;
            bn.weight = (cim_api::testing::uniform(3, 4)? + 0.5)?;
            bn.bias = cim_api::testing::uniform(3, 5)?;
            let (w, b) = (Var::from_tensor(&bn.weight)?, Var::from_tensor(&bn.bias)?);
            bn.weight = w.as_tensor().clone();
            bn.bias = b.as_tensor().clone();
            if world > 1 {
                let launch = cim_dist::Launch {
                    rank,
                    world,
                    ..cim_dist::Launch::single()
                };
                let coll = Box::new(Threads { rank, shared });
                let dist = cim_dist::Dist::with_collective(
                    launch,
                    coll,
                    std::time::Duration::from_secs(60),
                );
                bn.sync.set(std::sync::Arc::new(cim_dist::SyncSum::new(
                    std::sync::Arc::new(dist),
                )));
            }
            let per = 4 / world;
            let xs = Var::from_tensor(&x.narrow(0, rank * per, per)?)?;
            let y = bn.forward_t(xs.as_tensor(), true, false)?;
            let loss = (&y * r.narrow(0, rank * per, per)?)?.sum_all()?;
            let g = loss.backward()?;
            let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
            let mean = buffers.get("bn.running_mean").unwrap().as_tensor().clone();
            Ok(vec![y, grad(&xs), grad(&w), grad(&b), mean])
        };
        let pair = || {
            std::sync::Arc::new((
                std::sync::Mutex::new(vec![vec![]; 2]),
                std::sync::Barrier::new(2),
            ))
        };
        let whole = run(0, 1, pair())?;
        let shared = pair();
        let (zero, one) = std::thread::scope(|s| {
            let other = s.spawn(|| run(1, 2, shared.clone()).unwrap());
            let zero = run(0, 2, shared.clone()).unwrap();
            (zero, other.join().unwrap())
        });
        let want = [
            Tensor::cat(&[&zero[0], &one[0]], 0)?,
            Tensor::cat(&[&zero[1], &one[1]], 0)?,
            (&zero[2] + &one[2])?,
            (&zero[3] + &one[3])?,
            zero[4].clone(),
        ];
        for (i, (w, got)) in whole.iter().zip(&want).enumerate() {
            let d = (w - got)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let scale = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "output {i}: differs by {d} (scale {scale})"
            );
        }
        // Both ranks hold the same running statistics.
        assert_eq!(zero[4].to_vec1::<f32>()?, one[4].to_vec1::<f32>()?);
        Ok(())
    }

    /// A training forward moves the running statistics as PyTorch does: `0.9·running + 0.1·batch`
    /// with the unbiased batch variance (the fused statistics and in-place update).
    #[test]
    fn running_statistics_follow_pytorch() -> Result<()> {
        let store = ParamStore::trainable(1);
        let buffers = ParamStore::frozen(1);
        let vb = store.var_builder(DType::F32, &Device::Cpu).pp("bn");
        let bn = BatchNorm::new(3, 0.1, 1e-5, vb, &buffers)?;
        let x = (cim_api::testing::uniform((4, 3, 5, 5), 7)? * 4.0)?;
        bn.forward_t(&x, true, false)?;
        let n = (4 * 5 * 5) as f64;
        let mean = x.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
        let var = x
            .broadcast_sub(&mean)?
            .sqr()?
            .sum_keepdim(0)?
            .sum_keepdim(2)?
            .sum_keepdim(3)?
            .affine(1.0 / (n - 1.0), 0.0)?;
        let want_mean = (mean.flatten_all()? * 0.1)?;
        let want_var = ((var.flatten_all()? * 0.1)? + 0.9)?;
        let got = |name: &str| buffers.get(&format!("bn.{name}")).unwrap();
        let d = |a: &Var, b: &Tensor| -> Result<f32> {
            Ok((a.as_tensor().to_dtype(DType::F32)? - b)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?)
        };
        assert!(d(&got("running_mean"), &want_mean)? < 1e-5, "mean");
        assert!(d(&got("running_var"), &want_var)? < 1e-4, "var");
        Ok(())
    }

    /// torchvision: `sum(p.numel() for n, p in resnet50().named_parameters() if not n.startswith("fc"))`
    /// = 25,557,032 − (2048·1000 + 1000) = 23,508,032.
    #[test]
    fn parameter_count_and_names_match_torchvision() -> Result<()> {
        let store = ParamStore::trainable(0);
        let buffers = ParamStore::frozen(0);
        let _ = ResNet::new(
            &ResNetConfig::default(),
            224,
            store.var_builder(DType::F32, &Device::Cpu),
            &buffers,
            ExecChoices::default(),
        )?;
        assert_eq!(store.num_params(), 23_508_032);
        let names = store.names_under("");
        for n in [
            "conv1.weight",
            "bn1.weight",
            "layer1.0.downsample.0.weight",
            "layer1.0.downsample.1.bias",
            "layer3.5.conv3.weight",
            "layer4.2.bn3.weight",
        ] {
            assert!(names.iter().any(|k| k == n), "missing {n}");
        }
        // 53 BatchNorms, each with running mean and variance.
        assert_eq!(buffers.len(), 2 * 53);
        assert!(buffers.get("layer2.0.downsample.1.running_var").is_some());
        Ok(())
    }

    /// Channels last is the same network: the features, every parameter's gradient and the
    /// running statistics agree with channels first, in training and in eval (f32 on the CPU,
    /// where both layouts run the fused BatchNorm and pool kernels; the convolutions between
    /// transposes) — and the fused bottleneck ends (under a gradient sink) agree with the
    /// separate ops.
    #[test]
    fn channels_last_equals_channels_first() -> Result<()> {
        let store = ParamStore::trainable(3);
        let (buf1, buf2) = (ParamStore::frozen(0), ParamStore::frozen(0));
        let cfg = |layout| ResNetConfig {
            layout,
            width: 8,
            ..ResNetConfig::test_tiny()
        };
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let first = ResNet::new(
            &cfg(MapLayout::Nchw),
            64,
            vb.clone(),
            &buf1,
            ExecChoices::default(),
        )?;
        let last = ResNet::new(&cfg(MapLayout::Nhwc), 64, vb, &buf2, ExecChoices::default())?;
        assert!(last.channels_last() && !first.channels_last());
        // Auto is channels last on the CPU (its channels-last kernels are the faster ones there).
        let auto = ResNet::new(
            &cfg(MapLayout::Auto),
            64,
            store.var_builder(DType::F32, &Device::Cpu),
            &ParamStore::frozen(0),
            ExecChoices::default(),
        )?;
        assert!(auto.channels_last());
        let img = cim_api::testing::uniform((2, 3, 64, 64), 9)?;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        // Channels first as the ops compose without a gradient sink (each bottleneck's residual
        // add and ReLU separate), channels last under one, as a training step runs it (the
        // residual and ReLU inside the last BatchNorm's node).
        let f1 = first.forward_t(&img, true)?;
        let sink = cim_ops::GradSink::install();
        let f2 = last.forward_t(&img, true)?;
        assert_eq!(f1.tokens.dims(), f2.tokens.dims());
        assert_eq!((f1.grid.h, f1.grid.w), (f2.grid.h, f2.grid.w));
        assert!(diff(&f1.tokens, &f2.tokens)? < 1e-4);
        assert!(
            diff(
                &first.forward_map(&img, true)?,
                &last.forward_map(&img, true)?
            )? < 1e-4
        );
        let up = cim_api::testing::uniform(f1.tokens.dims(), 10)?;
        let g1 = (&f1.tokens * &up)?.sum_all()?.backward()?;
        let g2 = sink.backward(&(&f2.tokens * &up)?.sum_all()?)?;
        drop(sink);
        let vars = store.vars();
        // The stem (conv, γ, β) and four bottlenecks of three convolutions and BatchNorms and a
        // downsampling pair each.
        assert_eq!(vars.len(), 3 + 4 * 12);
        for (name, v) in &vars {
            let (a, b) = (g1.get(v).expect(name), g2.get(v).expect(name));
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
            let d = diff(a, b)?;
            assert!(d < 1e-3 * scale, "{name}: {d} (scale {scale})");
        }
        // Two training forwards each: the running statistics moved alike.
        assert_eq!(buf1.len(), buf2.len());
        for (name, v) in buf1.vars() {
            let w = buf2.get(&name).expect("the same buffers");
            assert!(diff(v.as_tensor(), w.as_tensor())? < 1e-5, "{name}");
        }
        // Eval (running statistics, the composed normalisation in either layout).
        let (e1, e2) = (first.forward_t(&img, false)?, last.forward_t(&img, false)?);
        assert!(diff(&e1.tokens, &e2.tokens)? < 1e-4);
        Ok(())
    }

    /// In training under a gradient sink the bottlenecks run as one region, channels first and
    /// last: the features and every parameter's gradient equal those of the same nodes in candle's
    /// graph, and the running statistics move alike.
    #[test]
    fn bottleneck_region_equals_the_graph() -> Result<()> {
        for layout in [MapLayout::Nchw, MapLayout::Nhwc] {
            region_equals_the_graph_in(layout)?;
        }
        Ok(())
    }

    fn region_equals_the_graph_in(layout: MapLayout) -> Result<()> {
        let store = ParamStore::trainable(5);
        let cfg = ResNetConfig {
            width: 8,
            layers: [2, 1, 1, 1],
            layout,
            ..ResNetConfig::test_tiny()
        };
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let (buf1, buf2) = (ParamStore::frozen(0), ParamStore::frozen(0));
        let a = ResNet::new(&cfg, 64, vb.clone(), &buf1, ExecChoices::default())?;
        let b = ResNet::new(&cfg, 64, vb, &buf2, ExecChoices::default())?;
        let img = cim_api::testing::uniform((2, 3, 64, 64), 11)?;
        let run =
            |net: &ResNet, regions: bool| -> Result<(Tensor, candle_core::backprop::GradStore)> {
                let sink = cim_ops::GradSink::install();
                let y = net.trunk_with(&img, true, regions)?;
                let up = cim_api::testing::uniform(y.dims(), 12)?;
                let g = sink.backward(&(&y * &up)?.sum_all()?)?;
                Ok((y, g))
            };
        let (ya, ga) = run(&a, true)?;
        let (yb, gb) = run(&b, false)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            Ok((x - y)?.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        assert_eq!(diff(&ya, &yb)?, 0.0);
        for (name, v) in store.vars() {
            let (x, y) = (ga.get(&v).expect(&name), gb.get(&v).expect(&name));
            let scale = y.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
            let d = diff(x, y)?;
            assert!(d <= 1e-5 * scale, "{name}: {d} (scale {scale})");
        }
        for (name, v) in buf1.vars() {
            assert_eq!(
                diff(v.as_tensor(), buf2.get(&name).unwrap().as_tensor())?,
                0.0,
                "{name}"
            );
        }
        Ok(())
    }

    #[test]
    fn stem_pool_matches_a_direct_max_over_windows() -> Result<()> {
        let x = cim_api::testing::uniform((1, 2, 7, 6), 5)?;
        let got = max_pool_3x3_s2(&x)?;
        assert_eq!(got.dims(), [1, 2, 4, 3]);
        let v = x.squeeze(0)?.to_vec3::<f32>()?;
        let g = got.squeeze(0)?.to_vec3::<f32>()?;
        for c in 0..2 {
            for oy in 0usize..4 {
                for ox in 0usize..3 {
                    let mut m = 0f32; // padding value (inputs are ≥ 0)
                    for y in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(7) {
                        for xx in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(6) {
                            m = m.max(v[c][y][xx]);
                        }
                    }
                    assert_eq!(g[c][oy][ox], m, "({c},{oy},{ox})");
                }
            }
        }
        Ok(())
    }

    /// The fused pool against the 9-view composition: values and the gradient (each output's
    /// gradient lands on its window's maximum; overlapping windows add up).
    #[test]
    fn fused_stem_pool_matches_composed_values_and_gradient() -> Result<()> {
        let x = candle_core::Var::from_tensor(&cim_api::testing::uniform((2, 3, 9, 8), 6)?)?;
        let up = cim_api::testing::uniform((2, 3, 5, 4), 7)?;
        let f = cim_ops::max_pool_3x3_s2(&x)?.expect("f32 on the CPU fuses");
        let c = max_pool_3x3_s2_composed(&x)?;
        let d = (&f - &c)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        let gf = (&f * &up)?.sum_all()?.backward()?;
        let gc = (&c * &up)?.sum_all()?.backward()?;
        let (gf, gc) = (gf.get(&x).unwrap(), gc.get(&x).unwrap());
        let dg = (gf - gc)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(dg < 1e-6, "{dg}");
        // Every output's gradient is routed somewhere: the sums agree.
        let (sf, su) = (
            gf.sum_all()?.to_scalar::<f32>()?,
            up.sum_all()?.to_scalar::<f32>()?,
        );
        assert!((sf - su).abs() < 1e-4, "{sf} vs {su}");
        Ok(())
    }

    #[test]
    fn batchnorm_uses_batch_stats_in_training_and_running_stats_in_eval() -> Result<()> {
        let store = ParamStore::trainable(0);
        let buffers = ParamStore::frozen(0);
        let bn = BatchNorm::new(
            2,
            0.1,
            1e-5,
            store.var_builder(DType::F32, &Device::Cpu).pp("bn"),
            &buffers,
        )?;
        // Channel 0 ~ values 1..=8 (mean 4.5, unbiased var 6), channel 1 constant 3.
        let x = Tensor::from_vec(
            (0..16)
                .map(|i| {
                    if (i / 4) % 2 == 0 {
                        (i / 8 * 4 + i % 4 + 1) as f32
                    } else {
                        3.0
                    }
                })
                .collect::<Vec<_>>(),
            (2, 2, 2, 2),
            &Device::Cpu,
        )?;
        let y = bn.forward_t(&x, true, false)?;
        let m = y
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(m.iter().all(|v| v.abs() < 1e-5), "{m:?}");
        let rm = buffers
            .get("bn.running_mean")
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()?;
        let rv = buffers
            .get("bn.running_var")
            .unwrap()
            .as_tensor()
            .to_vec1::<f32>()?;
        assert!(
            (rm[0] - 0.45).abs() < 1e-5 && (rm[1] - 0.3).abs() < 1e-5,
            "{rm:?}"
        );
        assert!(
            (rv[0] - (0.9 + 0.1 * 6.0)).abs() < 1e-4 && (rv[1] - 0.9).abs() < 1e-5,
            "{rv:?}"
        );
        // Eval normalises with the running statistics and leaves them alone.
        let e = bn.forward_t(&x, false, false)?;
        let first = e.flatten_all()?.to_vec1::<f32>()?[0];
        assert!(
            (first - (1.0 - 0.45) / (1.5f32 + 1e-5).sqrt()).abs() < 1e-4,
            "{first}"
        );
        assert_eq!(
            buffers
                .get("bn.running_mean")
                .unwrap()
                .as_tensor()
                .to_vec1::<f32>()?,
            rm
        );
        Ok(())
    }
}
