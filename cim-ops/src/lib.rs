//! Fused operations with a backward pass: LayerNorm and softmax over the last dimension, and
//! softmax cross-entropy over a vocabulary (the MIM loss), the RESPIX target and loss
//! ([`respix_sliding_target`], [`respix_loss`]), self-attention from the packed qkv projection
//! ([`attention_qkv`]), training-mode BatchNorm ([`batch_norm_train`]), the ResNet stem max-pool
//! ([`max_pool_3x3_s2`]), the MLP's bias + GELU ([`bias_gelu`]), the AdamW update ([`adamw_update`]), and the CPU convolution as
//! im2col + GEMM ([`conv2d`]).
//!
//! candle's own fused `layer_norm` / `softmax_last_dim` have no backward, so models built from
//! them cannot train; composed from elementary ops, a LayerNorm is ~6 kernels forward and ~12
//! backward, each a full pass over the activations. These are one pass each way, as candle
//! `CustomOp`s: [`layer_norm`] is one forward kernel, and its backward one kernel giving `dx`, `dw`
//! and `db` together; [`softmax_last_dim`] likewise.
//!
//! The fused kernels run for f32 tensors on the CPU (bf16 ones for LayerNorm, softmax and bias +
//! GELU, through f32 arithmetic); other cases take the composed path, which computes the same
//! function (the tests check both against each other, values and gradients). With the `cuda`
//! feature, CUDA twins of every kernel (`kernels/ops.cu`) are built too, used after
//! [`set_cuda_kernels`]`(true)` (config `run.cuda_kernels`, the default; their parity tests,
//! `tests/ops_cuda.rs`, passed on an H200). [`with_backward`] grafts any detached computation onto
//! the graph as one node; [`pre_norm_block`] does so for a whole transformer block.
//!
//! The hot CPU kernels (attention, LayerNorm, cross-entropy, bias + GELU) are written once and run
//! in an AVX-512 or an AVX2 + FMA instance where the CPU has those instructions ([`cpu_kernels`]),
//! a portable SSE2 one elsewhere ([`set_cpu_kernels`] caps it); see `simd` and `tiles`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Ops fail with candle's error, so model code uses `?` on them as on any tensor op.
pub use candle_core::{Error, Result};

/// Rows per parallel work item.
const CHUNK_ROWS: usize = 64;

mod adamw;
mod argmax;
mod attention;
pub mod backend;
mod batch_norm;
mod bias;
mod block;
mod channel;
mod chunks;
mod conv;
mod conv_cl;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "cudnn")]
mod cudnn;
pub mod device;
mod flash;
mod gemm;
mod graft;
mod heads;
mod im2col;
mod max_pool;
mod node;
mod region;
mod relu;
mod resample;
mod residual;
mod respix;
mod select;
mod simd;
pub mod threads;
mod tiles;

pub use adamw::{
    adamw_composed, adamw_update, adamw_update_all, square_sums_composed, sum_of_squares, AdamItem,
    AdamStep,
};
pub use argmax::{argmax_channels, argmax_last};
pub use attention::{attention_composed, attention_gemm, attention_qkv, attention_qkv_kernel};
pub use backend::{
    cpu_kernels, cuda_kernels, cudnn_conv, set_cpu_kernels, set_cuda_kernels, set_cudnn_conv,
    set_portable_kernels, CpuKernels,
};
pub use batch_norm::{
    batch_norm_train, batch_norm_train_composed, batch_norm_train_composed_nhwc,
    batch_norm_train_nhwc, batch_norm_train_tail, channel_moments, channel_moments_affine,
    channel_moments_nhwc, running_average, BnTail,
};
pub use bias::{bias_add, bias_gelu, bias_gelu_composed, linear};
pub use block::{block_param_shapes, pre_norm_block, BlockParams};
pub use channel::{
    channel_bias, channel_bias_and_relu, channel_bias_and_relu_nhwc, channel_bias_composed,
    channel_bias_nhwc,
};
pub use conv::{conv2d, conv2d_channels_last, conv2d_nhwc, conv2d_with_budget, COL_BUDGET};
#[cfg(feature = "cuda")]
pub use cuda::adamw_multi_launches;
pub use flash::{attention_flash, FlashBwdOp, FlashDeltaOp, FlashOutOp, FlashStatsOp};
pub use graft::with_backward;
pub use heads::{
    merge_heads, merge_heads_rows, merge_qkv, merge_qkv_rows, split_heads, split_heads_padded,
    split_qkv, split_qkv_padded,
};
pub use max_pool::{max_pool_3x3_s2, max_pool_3x3_s2_nhwc};
pub use node::{BackwardFn, GradSink, Output};
pub use region::region;
pub use relu::relu;
pub use resample::{
    max_pool_2x2, max_pool_2x2_nhwc, upsample_nearest_2x, upsample_nearest_2x_nhwc,
};
pub use residual::{residual_add, residual_add_composed};
pub use respix::{respix_loss, respix_sliding_target};
pub use select::select_rows;
pub use simd::avx2_kernels;

/// The backward of a detached attention forward, `d qkv` from `d out` (the GEMM, CPU-kernel and
/// flash paths give the same kind).
pub(crate) type AttentionBackward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// A fused BatchNorm node's settings, shared by its three kernels' ops on the CPU and their CUDA
/// launches: ε, channels last, and the tail's `mode` bits (1: ReLU, 2: residual).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bn {
    pub eps: f32,
    pub last: bool,
    pub mode: u32,
}

/// Widest attention head the CUDA attention kernel takes (one warp per query row, four values
/// per lane); wider heads take the composed path.
fn cuda_max_head_dim() -> usize {
    128
}

/// Whether the fused kernels run on `device` (always on the CPU; on CUDA when switched on).
pub fn kernels_run_on(device: &candle_core::Device) -> bool {
    device.is_cpu() || (cuda_kernels() && device.is_cuda())
}

fn fusable_device(t: &Tensor) -> bool {
    kernels_run_on(t.device())
}

/// Whether [`conv2d`] and [`conv2d_channels_last`] (with f32 master weights) and BatchNorm's
/// fused ops ([`channel_moments_affine`], [`batch_norm_train_tail`], `relu` in its tail) run as
/// grafted nodes on maps like `x` — f32 on the CPU, f32 or bf16 on CUDA with the kernels on —
/// so that a network of them may run as one [`region`] (ResNet-50's bottlenecks). Those ops decide
/// their paths by the same conditions; a test in `plugins/resnet` builds a region wherever this
/// holds.
pub fn conv_bn_grafted(x: &Tensor) -> bool {
    match x.device() {
        candle_core::Device::Cpu => x.dtype() == DType::F32,
        candle_core::Device::Cuda(_) => {
            cuda_kernels() && matches!(x.dtype(), DType::F32 | DType::BF16)
        }
        _ => false,
    }
}

/// `t` is on a CUDA device and the fused CUDA kernels are switched on.
fn kernels_on_cuda(t: &Tensor) -> bool {
    t.device().is_cuda() && cuda_kernels()
}

/// `t`'s view starts on a multiple of `n` elements: the CUDA kernels that move several elements
/// as one word (a float4; 8 or 16 bytes of bf16/f16) need every view aligned so.
fn starts_aligned(t: &Tensor, n: usize) -> bool {
    t.layout().start_offset().is_multiple_of(n)
}

fn is_fusable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32)
        && (ts.iter().all(|t| t.device().is_cpu())
            || (cuda_kernels() && ts.iter().all(|t| t.device().is_cuda())))
}

/// `eᵡ` in f32 without a libm call, so loops over it vectorise: Cody–Waite range reduction
/// `x = k·ln 2 + r` (k rounded with the 1.5·2²³ trick, SSE2-friendly) and Cephes' degree-6
/// polynomial on `|r| ≤ ln2/2`; relative error ≤ 2.5e-7 against `f32::exp` (tested). Inputs are
/// clamped to `[−87.3, 88.3]` (results `≈ 1.2e-38 … 2.1e38`; no infinities, no denormals); NaN
/// stays NaN.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let ki = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((ki + 127) << 23) as u32)
}

/// LayerNorm of `x` over its last dimension `D` with affine `weight`, `bias` of shape `(D,)`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if is_fusable(&[x, weight, bias]) {
        let x = x.contiguous()?;
        Ok(x.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        )?)
    } else {
        layer_norm_composed(x, weight, bias, eps)
    }
}

/// LayerNorm of a reduced-precision `x` (bf16, f16) with f32 `weight`/`bias`, normalised in f32
/// and returned in `x`'s dtype, as ONE graph node ([`with_backward`]) instead of cast → LayerNorm →
/// cast, whose two casts each cost a node (a zero-fill and an add in candle's backward) over an f32
/// activation. With bf16 the fused kernels read and write bf16 directly (the backward's packed
/// `dx, dw, db` is f32; `dx` is rounded to bf16); f16 goes through f32 copies. f32 `x` is
/// [`layer_norm`]; where the fused kernels do not apply, the three recorded ops.
pub fn layer_norm_mixed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    if dt == DType::F32 || !fusable_device(x) {
        return layer_norm(&x.to_dtype(DType::F32)?, weight, bias, eps)?.to_dtype(dt);
    }
    let eps = eps as f32;
    mixed_rowwise(
        x,
        &[weight, bias],
        move |x, p| x.apply_op3_no_bwd(&p[0], &p[1], &LayerNormOp { eps }),
        move |x, p, dy| x.apply_op3_no_bwd(&p[0], dy, &LayerNormBwdOp { eps }),
    )
}

/// The one graph node of a row-wise op over the last dimension `D` of a reduced-precision `x`
/// with `(D,)` parameters (LayerNorm, bias + GELU): `fwd(x, params)` runs the forward kernel,
/// `bwd(x, params, dy)` the backward one, which returns the packed f32 gradient — `dx` rows, then
/// one row per parameter. bf16 goes to the kernels as it is, other dtypes as f32 copies;
/// parameters always as f32. Gradients come back in each input's dtype.
fn mixed_rowwise(
    x: &Tensor,
    params: &[&Tensor],
    fwd: impl Fn(&Tensor, &[Tensor]) -> candle_core::Result<Tensor>,
    bwd: impl Fn(&Tensor, &[Tensor], &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let dt = x.dtype();
    let xk = match dt {
        DType::BF16 => x.detach().contiguous()?,
        _ => x.detach().to_dtype(DType::F32)?.contiguous()?,
    };
    let p32 = params
        .iter()
        .map(|p| p.detach().to_dtype(DType::F32)?.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let pdt: Vec<DType> = params.iter().map(|p| p.dtype()).collect();
    let y = fwd(&xk, &p32)?.to_dtype(dt)?;
    let mut inputs = vec![x];
    inputs.extend_from_slice(params);
    with_backward(&inputs, y, move |dy| {
        let d = xk.dim(D::Minus1)?;
        let rows = xk.elem_count() / d;
        let packed = bwd(&xk, &p32, &dy.to_dtype(xk.dtype())?.contiguous()?)?;
        let mut grads = vec![Some(
            packed
                .narrow(0, 0, rows)?
                .reshape(xk.shape())?
                .to_dtype(dt)?,
        )];
        for (i, &pdt) in pdt.iter().enumerate() {
            grads.push(Some(
                packed.narrow(0, rows + i, 1)?.reshape(d)?.to_dtype(pdt)?,
            ));
        }
        Ok(grads)
    })
}

/// The same function from elementary (differentiable) candle ops.
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if is_fusable(&[x]) {
        Ok(x.contiguous()?.apply_op1(SoftmaxOp::default())?)
    } else {
        softmax_composed(x)
    }
}

/// The same function from elementary (differentiable) candle ops.
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Index of the nearest codebook row for every row of `rows` (`argmin ‖x − c‖²`): the quantiser of
/// the vector-quantising tokenizers (`patch_kmeans`, `vq`). `‖x‖²` is the same for every row of the
/// codebook, so this is `argmin(‖c‖² − 2 x·c)`: one matmul.
pub fn nearest(rows: &Tensor, codebook: &Tensor) -> Result<Tensor> {
    let c2 = codebook.sqr()?.sum(1)?; // (V,)
    let score = rows
        .matmul(&codebook.t()?)?
        .affine(-2.0, 0.0)?
        .broadcast_add(&c2)?;
    score.argmin(D::Minus1)
}

/// Mean cross-entropy of `logits` `(M, V)` against class ids `targets` `(M,)` (u32): the fused
/// form of `candle_nn::loss::cross_entropy` (one pass forward, one pass backward giving
/// `softmax − one-hot`), in f32 arithmetic for f32 or bf16 logits (bf16 ones read and their
/// gradient written in bf16 by the CUDA kernels; widened first elsewhere).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let ids = targets.dtype() == DType::U32 && targets.device().same_device(logits.device());
    if logits.dtype() == DType::BF16 {
        // bf16 logits (the mixed-precision generator): read in bf16 by the CUDA kernels, their
        // gradient written in bf16 — no f32 copy of the (M, V) logits either way; elsewhere the
        // f32 kernels on a widened copy.
        if ids && kernels_on_cuda(logits) {
            let per_row = logits
                .contiguous()?
                .apply_op2(&targets.contiguous()?.detach(), CrossEntropyOp)?;
            return per_row.mean_all();
        }
        return cross_entropy(&logits.to_dtype(DType::F32)?, targets);
    }
    if is_fusable(&[logits]) && ids {
        let per_row = logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?.detach(), CrossEntropyOp)?;
        Ok(per_row.mean_all()?)
    } else {
        Ok(candle_nn::loss::cross_entropy(logits, targets)?)
    }
}

fn ids<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let data = s.as_slice::<u32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("cross_entropy: targets must be contiguous"),
    }
}

/// Per-row `logsumexp(x) − x[t]`.
struct CrossEntropyOp;

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "cim-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, t) = (slice(s1, l1, "logits")?, ids(s2, l2)?);
        let v = last_dim(l1)?;
        let rows = x.len() / v;
        if t.len() != rows {
            candle_core::bail!("cross_entropy: {} targets for {rows} rows", t.len());
        }
        if let Some(&bad) = t.iter().find(|&&c| c as usize >= v) {
            candle_core::bail!("cross_entropy: target {bad} ≥ vocabulary {v}");
        }
        let loss: Vec<f32> = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(r, &c)| simd::run(LogSumExp(r)) - r[c as usize])
            .collect();
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::cross_entropy_fwd(s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(t, &g.contiguous()?, &CrossEntropyBwdOp)?;
        Ok((Some(dx), None))
    }
}

/// `log Σ exp(x)` of one row.
struct LogSumExp<'a>(&'a [f32]);

impl simd::Kernel for LogSumExp<'_> {
    type Output = f32;
    #[inline(always)]
    fn call<const FAST: bool>(self) -> f32 {
        let max = tiles::max(self.0);
        max + tiles::sum_zip(self.0, self.0, |a, _| fast_exp(a - max)).ln()
    }
}

/// `k · softmax(x)` of one row into `out`.
struct SoftmaxScaled<'a> {
    out: &'a mut [f32],
    x: &'a [f32],
    k: f32,
}

impl simd::Kernel for SoftmaxScaled<'_> {
    type Output = ();
    #[inline(always)]
    fn call<const FAST: bool>(self) {
        self.out.copy_from_slice(self.x);
        tiles::softmax_row(self.out, self.k);
    }
}

/// `(softmax(x) − onehot(t)) · g_row`.
struct CrossEntropyBwdOp;

impl CustomOp3 for CrossEntropyBwdOp {
    fn name(&self) -> &'static str {
        "cim-cross-entropy-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, t, g) = (
            slice(s1, l1, "logits")?,
            ids(s2, l2)?,
            slice(s3, l3, "grad")?,
        );
        let v = last_dim(l1)?;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .zip(t.par_iter().zip(g.par_iter()))
            .for_each(|((dr, r), (&c, &gr))| {
                simd::run(SoftmaxScaled {
                    out: dr,
                    x: r,
                    k: gr,
                });
                dr[c as usize] -= gr;
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::cross_entropy_bwd(s1, l1, s2, l2, s3, l3)
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: fused op needs a contiguous tensor"),
    }
}

/// The f32 elements of a contiguous CPU tensor, writable (the target of an in-place op).
fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: fused op needs a contiguous tensor")
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: fused op needs an f32 tensor"),
    }
}

fn last_dim(l: &Layout) -> candle_core::Result<usize> {
    l.shape()
        .dims()
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("fused op needs at least one dimension".into()))
}

/// `(mean, 1/sqrt(var + eps))` of one row.
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = tiles::sum(row) / n;
    let var = tiles::sum_zip(row, row, |v, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// One chunk of the LayerNorm forward: rows of `w.len()`.
struct LayerNormRows<'a> {
    y: &'a mut [f32],
    x: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    eps: f32,
}

impl simd::Kernel for LayerNormRows<'_> {
    type Output = ();
    #[inline(always)]
    fn call<const FAST: bool>(self) {
        let (d, w, b) = (self.w.len(), self.w, self.b);
        for (yr, xr) in self.y.chunks_exact_mut(d).zip(self.x.chunks_exact(d)) {
            let (mean, rstd) = moments(xr, self.eps);
            for j in 0..d {
                yr[j] = simd::madd::<FAST>((xr[j] - mean) * rstd, w[j], b[j]);
            }
        }
    }
}

/// One chunk of the LayerNorm backward: `dx` rows, and this chunk's partial `dw`, `db`.
struct LayerNormGradRows<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    dy: &'a [f32],
    w: &'a [f32],
    eps: f32,
}

impl simd::Kernel for LayerNormGradRows<'_> {
    type Output = (Vec<f32>, Vec<f32>);
    #[inline(always)]
    fn call<const FAST: bool>(self) -> (Vec<f32>, Vec<f32>) {
        let (d, w) = (self.w.len(), self.w);
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        // Per row: x̂ and g = dy · w (scratch), then
        // dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)).
        let (mut xh, mut g) = (vec![0f32; d], vec![0f32; d]);
        let rows = self.dx.chunks_exact_mut(d).zip(self.x.chunks_exact(d));
        for ((dxr, xr), gr) in rows.zip(self.dy.chunks_exact(d)) {
            let (mean, rstd) = moments(xr, self.eps);
            for j in 0..d {
                xh[j] = (xr[j] - mean) * rstd;
                g[j] = gr[j] * w[j];
                dw[j] = simd::madd::<FAST>(gr[j], xh[j], dw[j]);
                db[j] += gr[j];
            }
            let mg = tiles::sum(&g) / d as f32;
            let mgx = tiles::sum_zip(&g, &xh, |g, x| g * x) / d as f32;
            for j in 0..d {
                dxr[j] = rstd * (g[j] - mg - xh[j] * mgx);
            }
        }
        (dw, db)
    }
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "cim-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let Some((s1, l1)) = widened(s1, l1)? {
            let (y, shape) = self.cpu_fwd(&s1, &l1, s2, l2, s3, l3)?;
            return Ok((narrowed(y), shape));
        }
        let (x, w, b) = (
            slice(s1, l1, "x")?,
            slice(s2, l2, "weight")?,
            slice(s3, l3, "bias")?,
        );
        let d = last_dim(l1)?;
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer_norm: weight/bias of {} / {} for rows of {d}",
                w.len(),
                b.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * CHUNK_ROWS)
            .zip(x.par_chunks(d * CHUNK_ROWS))
            .for_each(|(y, x)| {
                let eps = self.eps;
                simd::run(LayerNormRows { y, x, w, b, eps })
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = layer_norm_grads(x, w, dy, self.eps)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// LayerNorm's backward as one kernel ([`LayerNormBwdOp`]: rows of `dx`, then the `dw` row, then
/// the `db` row), split into `(dx, dw, db)`: f32, `dx` shaped like `x`.
fn layer_norm_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let d = w.dim(0)?;
    let rows = x.elem_count() / d;
    let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormBwdOp { eps })?;
    Ok((
        packed.narrow(0, 0, rows)?.reshape(x.shape())?,
        packed.narrow(0, rows, 1)?.reshape(d)?,
        packed.narrow(0, rows + 1, 1)?.reshape(d)?,
    ))
}

struct LayerNormBwdOp {
    eps: f32,
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "cim-layer-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // bf16 x and dy: the f32 kernel on their widened copies; the packed result stays f32.
        if let (Some((s1, l1)), Some((s3, l3))) = (widened(s1, l1)?, widened(s3, l3)?) {
            return self.cpu_fwd(&s1, &l1, s2, l2, &s3, &l3);
        }
        let (x, w, dy) = (
            slice(s1, l1, "x")?,
            slice(s2, l2, "weight")?,
            slice(s3, l3, "grad")?,
        );
        let d = last_dim(l1)?;
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, tail) = out.split_at_mut(rows * d);
        // dx row by row; dw, db as per-chunk partial sums, added up at the end.
        let (dw, db) = dx
            .par_chunks_mut(d * CHUNK_ROWS)
            .zip(
                x.par_chunks(d * CHUNK_ROWS)
                    .zip(dy.par_chunks(d * CHUNK_ROWS)),
            )
            .map(|(dx, (x, dy))| {
                let eps = self.eps;
                simd::run(LayerNormGradRows { dx, x, dy, w, eps })
            })
            .collect::<Vec<_>>()
            .into_iter()
            // Summed in chunk order (fixed chunk boundaries), so the result does not depend on
            // how the thread pool split the work: runs stay bit-reproducible.
            .fold(
                (vec![0f32; d], vec![0f32; d]),
                |(mut aw, mut ab), (bw, bb)| {
                    for j in 0..d {
                        aw[j] += bw[j];
                        ab[j] += bb[j];
                    }
                    (aw, ab)
                },
            );
        tail[..d].copy_from_slice(&dw);
        tail[d..].copy_from_slice(&db);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::layer_norm_bwd(s1, l1, s2, l2, s3, l3, self.eps)
    }
}

/// The CPU twin of a bf16 kernel reads the input widened to f32 (`None` for f32 input) …
pub(crate) fn widened(
    s: &CpuStorage,
    l: &Layout,
) -> candle_core::Result<Option<(CpuStorage, Layout)>> {
    match s {
        CpuStorage::BF16(v) => {
            let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("fused op needs a contiguous tensor".into())
            })?;
            let wide = v[a..b].iter().map(|h| h.to_f32()).collect();
            Ok(Some((CpuStorage::F32(wide), Layout::contiguous(l.shape()))))
        }
        _ => Ok(None),
    }
}

/// … and rounds the f32 kernel's result back to bf16, as the CUDA kernel stores it.
pub(crate) fn narrowed(s: CpuStorage) -> CpuStorage {
    match s {
        CpuStorage::F32(v) => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        other => other,
    }
}

/// Softmax over the last dimension: f32, or bf16 storage with f32 arithmetic (the attention
/// probabilities in mixed precision). With `valid`, over the first `valid` entries of each row,
/// the others 0 (attention scores padded to an aligned width: the padding keys get no weight).
#[derive(Clone, Copy, Default)]
struct SoftmaxOp {
    valid: Option<usize>,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "cim-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if let Some((s, l)) = widened(s, l)? {
            let (y, shape) = self.cpu_fwd(&s, &l)?;
            return Ok((narrowed(y), shape));
        }
        let x = slice(s, l, "x")?;
        let d = last_dim(l)?;
        let valid = self.valid.unwrap_or(d).min(d);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * CHUNK_ROWS)
            .zip(x.par_chunks(d * CHUNK_ROWS))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                    let (yr, xr) = (&mut yr[..valid], &xr[..valid]);
                    let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for j in 0..valid {
                        yr[j] = fast_exp(xr[j] - max);
                        sum += yr[j];
                    }
                    let inv = 1.0 / sum;
                    yr.iter_mut().for_each(|v| *v *= inv);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_fwd(s, l, self.valid.unwrap_or(usize::MAX))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxBwdOp)?))
    }
}

struct SoftmaxBwdOp;

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "cim-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let (Some((s1, l1)), Some((s2, l2))) = (widened(s1, l1)?, widened(s2, l2)?) {
            let (dx, shape) = self.cpu_fwd(&s1, &l1, &s2, &l2)?;
            return Ok((narrowed(dx), shape));
        }
        let (y, g) = (slice(s1, l1, "y")?, slice(s2, l2, "grad")?);
        let d = last_dim(l1)?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d * CHUNK_ROWS)
            .zip(
                y.par_chunks(d * CHUNK_ROWS)
                    .zip(g.par_chunks(d * CHUNK_ROWS)),
            )
            .for_each(|(dc, (yc, gc))| {
                for ((dr, yr), gr) in dc.chunks_mut(d).zip(yc.chunks(d)).zip(gc.chunks(d)) {
                    // dx = y · (dy − Σ dy·y)
                    let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    for j in 0..d {
                        dr[j] = yr[j] * (gr[j] - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_bwd(s1, l1, s2, l2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The f32 bit patterns of `t`'s values (widened from bf16), for exact comparisons.
    pub(super) fn bits(t: &Tensor) -> Vec<u32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    pub(super) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The row kernels' portable and AVX2 + FMA instances, called directly, agree (the
    /// dispatched one is checked against the composed ops by the tests above).
    #[test]
    fn row_kernels_agree_in_both_instances() {
        use simd::Kernel;
        let (rows, d) = (5, 21);
        let x: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let dy: Vec<f32> = (0..rows * d)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0)
            .collect();
        let (w, b) = (&dy[..d], &x[d..2 * d]);
        let run = |fast: bool| {
            let (mut y, mut dx, mut sm) = (vec![0f32; x.len()], vec![0f32; x.len()], vec![0f32; d]);
            let eps = 1e-5;
            let fwd = LayerNormRows {
                y: &mut y,
                x: &x,
                w,
                b,
                eps,
            };
            let bwd = LayerNormGradRows {
                dx: &mut dx,
                x: &x,
                dy: &dy,
                w,
                eps,
            };
            let (lse, soft) = (
                LogSumExp(&x[..d]),
                SoftmaxScaled {
                    out: &mut sm,
                    x: &x[..d],
                    k: 0.7,
                },
            );
            let (grads, l) = if fast {
                fwd.call::<true>();
                soft.call::<true>();
                (bwd.call::<true>(), lse.call::<true>())
            } else {
                fwd.call::<false>();
                soft.call::<false>();
                (bwd.call::<false>(), lse.call::<false>())
            };
            [y, dx, grads.0, grads.1, sm, vec![l]].concat()
        };
        let (a, b) = (run(false), run(true));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "instances differ by {worst}");
        assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|v| v.abs() > 0.1));
    }

    #[test]
    fn fast_exp_is_within_2_5e_7_relative_of_exp() {
        let mut worst = 0f32;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (fast_exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert!(fast_exp(f32::NEG_INFINITY) > 0.0 && fast_exp(f32::NEG_INFINITY) < 1e-37);
        assert!(fast_exp(f32::NAN).is_nan());
        assert_eq!(fast_exp(0.0), 1.0);
    }

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fused_layer_norm_matches_composed_values_and_gradients() -> Result<()> {
        // Non-contiguous input (a transpose), 130 rows: more than two parallel chunks.
        let x = Var::from_tensor(&randn(&[24, 13, 10], 1).transpose(0, 1)?)?;
        let w = Var::from_tensor(&randn(&[24], 2))?;
        let b = Var::from_tensor(&randn(&[24], 3))?;
        let xt = x.as_tensor().transpose(1, 2)?; // (13, 10, 24): normalise over the 24
        let up = randn(&[13, 10, 24], 4);
        let fused = layer_norm(&xt, &w, &b, 1e-6)?;
        let composed = layer_norm_composed(&xt, &w, &b, 1e-6)?;
        assert!(max_diff(&fused, &composed) < 1e-5);
        let gf = (&fused * &up)?.sum_all()?.backward()?;
        let gc = (&composed * &up)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            let d = max_diff(a, c);
            assert!(d < 2e-4, "{name}: {d}");
        }
        Ok(())
    }

    /// bf16 `x`, f32 parameters: the one-node mixed LayerNorm against the recorded
    /// cast → LayerNorm → cast, values and the gradients of x, weight and bias.
    #[test]
    fn mixed_layer_norm_matches_the_cast_sandwich() -> Result<()> {
        let x = Var::from_tensor(&randn(&[3, 7, 24], 1).to_dtype(DType::BF16)?)?;
        let w = Var::from_tensor(&randn(&[24], 2).affine(0.3, 1.0)?)?;
        let b = Var::from_tensor(&randn(&[24], 3))?;
        let up = randn(&[3, 7, 24], 4).to_dtype(DType::BF16)?;
        let mixed = layer_norm_mixed(&x, &w, &b, 1e-6)?;
        let cast = layer_norm(&x.to_dtype(DType::F32)?, &w, &b, 1e-6)?.to_dtype(DType::BF16)?;
        assert_eq!(mixed.dtype(), DType::BF16);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(
            max_diff(&f(&mixed), &f(&cast)) == 0.0,
            "same kernels, same rounding"
        );
        let gm = (&mixed * &up)?.sum_all()?.backward()?;
        let gc = (&cast * &up)?.sum_all()?.backward()?;
        for (what, v, tol) in [("dx", &x, 0.02), ("dw", &w, 0.05), ("db", &b, 0.05)] {
            let (a, e) = (f(gm.get(v).unwrap()), f(gc.get(v).unwrap()));
            let scale = e.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(scale > 0.1, "{what} is not trivially zero");
            assert!(
                max_diff(&a, &e) <= tol * scale,
                "{what}: {}",
                max_diff(&a, &e)
            );
        }
        // f32 input is plain layer_norm.
        let x32 = randn(&[2, 24], 5);
        assert!(
            max_diff(
                &layer_norm_mixed(&x32, &w, &b, 1e-6)?,
                &layer_norm(&x32, &w, &b, 1e-6)?
            ) == 0.0
        );
        Ok(())
    }

    #[test]
    fn fused_softmax_matches_composed_values_and_gradients() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[3, 70, 33], 5) * 4.0)?)?;
        let up = randn(&[3, 70, 33], 6);
        let f = softmax_last_dim(&x)?;
        let c = softmax_composed(&x)?;
        assert!(max_diff(&f, &c) < 1e-6);
        let rows = f.sum(D::Minus1)?;
        assert!(max_diff(&rows, &Tensor::ones_like(&rows)?) < 1e-5);
        let gf = (&f * &up)?.sum_all()?.backward()?;
        let gc = (&c * &up)?.sum_all()?.backward()?;
        let d = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn fused_cross_entropy_matches_candles_values_and_gradients() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[37, 50], 8) * 3.0)?)?;
        let t: Vec<u32> = (0..37).map(|i| (i * 7 % 50) as u32).collect();
        let t = Tensor::new(t.as_slice(), &Device::Cpu)?;
        let f = cross_entropy(&x, &t)?;
        let c = candle_nn::loss::cross_entropy(&x, &t)?;
        assert!(max_diff(&f, &c) < 1e-5, "{f} vs {c}");
        let gf = (f * 2.5)?.backward()?;
        let gc = (c * 2.5)?.backward()?;
        let d = max_diff(gf.get(&x).unwrap(), gc.get(&x).unwrap());
        assert!(d < 1e-6, "{d}");
        let bad = Tensor::new(&[50u32], &Device::Cpu)?;
        let e = cross_entropy(&x.narrow(0, 0, 1)?, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("target 50"), "{e}");
        // bf16 logits: f32 arithmetic on the widened values (on the CPU a widened copy), and the
        // gradient comes back in bf16.
        let xb = Var::from_tensor(&x.to_dtype(DType::BF16)?)?;
        let fb = cross_entropy(&xb, &t)?;
        let want = cross_entropy(&xb.to_dtype(DType::F32)?, &t)?;
        assert_eq!(fb.dtype(), DType::F32);
        assert_eq!(max_diff(&fb, &want), 0.0);
        let gb = fb.backward()?;
        assert_eq!(gb.get(&xb).unwrap().dtype(), DType::BF16);
        Ok(())
    }

    #[test]
    fn cuda_kernels_stay_off_without_the_cuda_feature_or_a_switch() {
        assert!(!cuda_kernels());
        set_cuda_kernels(true);
        assert_eq!(cuda_kernels(), cfg!(feature = "cuda"));
        set_cuda_kernels(false);
        assert!(!cuda_kernels());
    }

    #[test]
    fn other_dtypes_take_the_composed_path() -> Result<()> {
        let x = randn(&[4, 8], 7).to_dtype(DType::F64)?;
        let y = softmax_last_dim(&x)?;
        assert_eq!(y.dtype(), DType::F64);
        let w = Tensor::ones(8, DType::F64, &Device::Cpu)?;
        let z = layer_norm(&x, &w, &w.zeros_like()?, 1e-5)?;
        let m = z.mean(D::Minus1)?.abs()?.max(0)?.to_scalar::<f64>()?;
        assert!(m < 1e-9, "{m}");
        assert!(
            max_diff(
                &z.to_dtype(DType::F32)?,
                &layer_norm(
                    &x.to_dtype(DType::F32)?,
                    &w.to_dtype(DType::F32)?,
                    &w.zeros_like()?.to_dtype(DType::F32)?,
                    1e-5
                )?
            ) < 1e-5
        );
        Ok(())
    }
}
