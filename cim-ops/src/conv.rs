//! 2-D convolution as im2col + GEMM, with a backward.
//!
//! candle 0.11's CPU `conv2d` converts the input to NHWC on one thread, scatters each 512-pixel
//! tile's patches column by column and runs one small GEMM per tile; its backward runs a
//! `conv_transpose2d` (dx) and a second convolution over transposed copies (dw). Here, on the CPU,
//! each image's patch matrix `(C·k·k, Ho·Wo)`, in the weight's `(c, ky, kx)` order, is written row
//! by row into a scratch buffer of the thread (each row a shifted copy of one input plane) and
//! multiplied by the `(C_out, C·k·k)` weight in one GEMM that lands in NCHW. Images run in
//! parallel, one per thread with a single-threaded GEMM (`super::gemm`), when there are at least
//! as many images as threads — candle's batched matmul runs the batch's small GEMMs one after the
//! other, so a small convolution hardly used the second core — and one at a time on all threads
//! otherwise. Only the input is kept for the backward, which recomputes each image's patches:
//! `dW += dYᵢ · colsᵢᵀ` and `dXᵢ = col2im(Wᵀ · dYᵢ)`, per image, in fixed groups of images.
//!
//! On CUDA with the fused kernels switched on, the forward stays candle's (cuDNN with the `cudnn`
//! feature) and only the backward is im2col + GEMM + col2im ([`conv_backward`], CUDA im2col/col2im
//! kernels), in chunks of images whose patch matrix stays within [`COL_BUDGET`] bytes; other
//! dtypes run candle's `conv2d` both ways. With [`set_cudnn_conv`] (`cudnn` builds), the forward
//! and both backward passes run through cim's own cuDNN calls instead (`super::cudnn`).

use crate::backend::cudnn_conv;

#[cfg(feature = "cudnn")]
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::gemm::{sgemm, Threads};
use super::im2col::{add_in_order, cpu_f32, dx_groups, Col2Im, Im2Col};
use super::tiles::View;
use crate::Result;

/// Largest patch matrix one chunk of images may hold, in bytes.
pub const COL_BUDGET: usize = 256 << 20;

/// `conv2d(x, w)` with square kernels, no dilation, one group: `x` `(B, C, H, W)`, `w`
/// `(C_out, C, k, k)` → `(B, C_out, Ho, Wo)`, `Ho = (H + 2·padding − k) / stride + 1`. No bias.
/// f32 CPU tensors run im2col + GEMM; everything else candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_with_budget(x, w, padding, stride, COL_BUDGET)
}

/// [`conv2d`] with an explicit patch-matrix budget (bytes per chunk of images) for the CUDA
/// backward; the CPU kernel keeps one image's patch matrix per thread whatever the budget.
pub fn conv2d_with_budget(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    budget: usize,
) -> Result<Tensor> {
    // bf16 activations with an f32 (master) weight: mixed precision (`run.precision = "bf16"`).
    let mixed = x.dtype() == DType::BF16 && w.dtype() == DType::F32;
    let (_, _, kh, kw) = w.dims4()?;
    let empty = x.elem_count() == 0 || w.elem_count() == 0;
    if !fused_path(x, w) || kh != kw || stride == 0 || empty {
        // candle's convolution, the weight cast to the input's dtype (a no-op when they agree);
        // untracked (a frozen network, e.g. the dVAE in bf16/f16) cim's cuDNN call where it runs.
        let w = w.to_dtype(x.dtype())?;
        if kh == kw && stride > 0 && !empty && !x.track_op() && !w.track_op() {
            let op = Im2Col {
                k: kh,
                stride,
                padding,
            };
            if let Some(y) = cudnn_forward(x, &w, op)? {
                return y.run();
            }
        }
        return x.conv2d(&w, padding, stride, 1, 1);
    }
    let (_, c, h, wd) = x.dims4()?;
    let (_, c_w, k, _) = w.dims4()?;
    if c_w != c {
        return Err(crate::Error::msg(format!(
            "conv2d: input has {c} channels, weight expects {c_w}"
        )));
    }
    if h + 2 * padding < k || wd + 2 * padding < k {
        return Err(crate::Error::msg(format!(
            "conv2d: {h}×{wd} input with padding {padding} is smaller than the {k}×{k} kernel"
        )));
    }
    let op = Im2Col { k, stride, padding };
    if mixed {
        return mixed_conv2d(x, w, op, budget);
    }
    if x.device().is_cuda() {
        return im2col_backward(x, w, op, budget);
    }
    cpu_conv2d(x, w, op)
}

/// Whether [`conv2d`] takes `x` and `w` on its own paths (grafted nodes): both f32, or bf16 `x`
/// with an f32 (master) `w`, on the CPU or on CUDA with the kernels on.
fn fused_path(x: &Tensor, w: &Tensor) -> bool {
    let mixed = x.dtype() == DType::BF16 && w.dtype() == DType::F32;
    let ours = mixed || [x, w].iter().all(|t| t.dtype() == DType::F32);
    let on_cpu = [x, w].iter().all(|t| t.device().is_cpu());
    let on_cuda = super::cuda_kernels() && [x, w].iter().all(|t| t.device().is_cuda());
    ours && (on_cpu || on_cuda)
}

/// bf16 `x` with an f32 master weight `w`. Without cim's cuDNN calls: bf16 storage, f32
/// arithmetic — the forward on a widened copy of `x` against the f32 weight, its output rounded to
/// bf16 (on CUDA candle's f32 convolution, cuDNN with `--features cudnn`, on TF32 tensor cores when
/// `run.tf32`; on the CPU, which has no bf16 GEMM, the f32 kernel), not candle's bf16 convolution:
/// cuDNN's bf16 NCHW kernels as candle calls them measured 8.1 ms against 0.96 ms in f32 for a 3×3
/// 256→256 at 56², batch 64, on an H200, so the widening (one
/// elementwise pass each way) is the cheap side. The backward likewise in f32 (on CUDA im2col,
/// GEMM and col2im, or the CPU kernel), from widened copies of `x` and the output gradient: `dx`
/// rounded to bf16 for the bf16 graph, `dw` in f32 for the master weight. With cim's cuDNN calls
/// ([`set_cudnn_conv`], CUDA): all three passes in bf16 on tensor cores (f32 accumulation) against
/// the weight rounded to bf16 once, `dw` widened for the master weight. Keeps only the bf16 input
/// (and, with cuDNN, the bf16 weight).
fn mixed_conv2d(x: &Tensor, w: &Tensor, op: Im2Col, budget: usize) -> Result<Tensor> {
    let (xd, wd) = (x.detach(), w.detach());
    let w16 = match x.device().is_cuda() && cudnn_conv() {
        true => Some(wd.to_dtype(DType::BF16)?),
        false => None,
    };
    let bf16 = match &w16 {
        Some(w16) => cudnn_forward(&xd, w16, op)?,
        None => None,
    };
    let y: super::Output = match bf16 {
        Some(y) => y,
        None => plain_forward(&xd, &wd, op)?.into(),
    };
    let need_dx = super::region::needs_grad(x);
    super::with_backward(&[x, w], y, move |dy| {
        if let Some(w16) = &w16 {
            if let Some((dx, dw)) =
                cudnn_backward(&xd, w16, op, &dy.to_dtype(DType::BF16)?, need_dx)?
            {
                return Ok(vec![dx, Some(dw.to_dtype(DType::F32)?)]);
            }
        }
        let (x32, dy32) = (xd.to_dtype(DType::F32)?, dy.to_dtype(DType::F32)?);
        let (dx, dw) = f32_grads(&x32, &wd, op, budget, &dy32, need_dx)?;
        Ok(vec![
            dx.map(|d| d.to_dtype(DType::BF16)).transpose()?,
            Some(dw),
        ])
    })
}

/// Whether cim's cuDNN calls take `ts` (switched on, a CUDA device, one dtype among f32, bf16,
/// f16).
#[cfg(feature = "cudnn")]
fn cudnn_takes(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    cudnn_conv()
        && ts[0].device().is_cuda()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        && ts.iter().all(|t| t.dtype() == dtype)
}

/// One cuDNN pass of `conv2d(x, ·)`, `x` `(B, C, H, W)`, `c_out` output channels.
#[cfg(feature = "cudnn")]
fn cudnn_pass(
    x: &Tensor,
    c_out: usize,
    op: Im2Col,
    pass: super::cudnn::Pass,
) -> candle_core::Result<super::cudnn::CudnnConv> {
    let (b, c, h, w) = x.dims4()?;
    Ok(super::cudnn::CudnnConv {
        op,
        pass,
        x_dims: [b, c, h, w],
        c_out,
        nhwc: false,
    })
}

/// The forward of [`conv2d_nhwc`] through cim's cuDNN call, where [`cudnn_takes`] them.
#[cfg(feature = "cudnn")]
fn cudnn_forward_nhwc(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Option<Tensor>> {
    if !cudnn_takes(&[x, w]) {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (b, h, wd, c) = x.dims4()?;
    let conv = super::cudnn::CudnnConv {
        op,
        pass: super::cudnn::Pass::Forward,
        x_dims: [b, c, h, wd],
        c_out: w.dim(0)?,
        nhwc: true,
    };
    Ok(cudnn_fallible(x.apply_op2_no_bwd(&w, &conv)))
}

#[cfg(not(feature = "cudnn"))]
fn cudnn_forward_nhwc(_: &Tensor, _: &Tensor, _: Im2Col) -> Result<Option<Tensor>> {
    Ok(None)
}

/// `conv2d` of channels-last maps, forward only (a frozen network: the dVAE on CUDA): `x`
/// `(B, H, W, C)`, `w` `(C_out, k, k, C)` → `(B, Ho, Wo, C_out)`, the same sizes as [`conv2d`].
/// With cim's cuDNN convolution ([`set_cudnn_conv`](crate::set_cudnn_conv)) cuDNN's NHWC kernels, which is what the
/// layout is for: on NCHW data, cuDNN's tensor-core kernels transpose every input and output
/// (14.4 ms of a ViT-B/16 RESPIX step in an H200 profile (2026-11-27)). Elsewhere [`conv2d`]
/// between transposes: the same function, for the CPU tests and as the GPU parity reference.
/// Inputs that track gradients are an error (there is no backward here).
pub fn conv2d_nhwc(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, h, wd, c) = x.dims4()?;
    let (_, kh, kw, c_w) = w.dims4()?;
    if x.track_op() || w.track_op() {
        return Err(crate::Error::msg(
            "conv2d_nhwc is forward only (frozen networks): its inputs must not track gradients",
        ));
    }
    if c_w != c || kh != kw || stride == 0 {
        return Err(crate::Error::msg(format!(
            "conv2d_nhwc: input {:?} and weight {:?} (expected (C_out, k, k, {c})), stride {stride}",
            x.dims(),
            w.dims()
        )));
    }
    if h + 2 * padding < kh || wd + 2 * padding < kh {
        return Err(crate::Error::msg(format!(
            "conv2d_nhwc: {h}×{wd} input with padding {padding} is smaller than the {kh}×{kh} kernel"
        )));
    }
    let op = Im2Col {
        k: kh,
        stride,
        padding,
    };
    if let Some(y) = cudnn_forward_nhwc(x, w, op)? {
        return Ok(y);
    }
    let to_nchw = |t: &Tensor| t.permute((0, 3, 1, 2))?.contiguous();
    let y = conv2d(&to_nchw(x)?, &to_nchw(w)?, padding, stride)?;
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// `conv2d` of a channels-last map `x` `(B, H, W, C)` with a weight `w` in [`conv2d`]'s (and
/// PyTorch's) `(C_out, C, k, k)` order → `(B, Ho, Wo, C_out)`, with a backward for both: the
/// trainable twin of [`conv2d_nhwc`] (the ResNet-50 enhancer channels last). With cim's cuDNN
/// convolution on CUDA all three passes run on cuDNN's NHWC kernels — NCHW maps make its
/// tensor-core kernels transpose every input and output, which is why the reference trains its
/// convnets channels last — the weight permuted to `(C_out, k, k, C)` in `x`'s dtype on the way
/// (one kernel, the cast it needs anyway in bf16), and `dw` permuted back in `w`'s dtype. Keeps
/// `x` and that weight. Elsewhere, where [`conv2d`] has a fused path, its forward on a transposed
/// copy and its f32 backward on transposed copies, one grafted node (so a [`super::region`] may
/// hold it whether or not cuDNN runs); otherwise [`conv2d`] between transposes, its backward
/// through candle's graph.
pub fn conv2d_channels_last(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, h, wd, c) = x.dims4()?;
    let (_, c_w, kh, kw) = w.dims4()?;
    if c_w != c || kh != kw || stride == 0 {
        return Err(crate::Error::msg(format!(
            "conv2d_channels_last: input {:?} and weight {:?} (expected (C_out, {c}, k, k)), \
             stride {stride}",
            x.dims(),
            w.dims()
        )));
    }
    if h + 2 * padding < kh || wd + 2 * padding < kh {
        return Err(crate::Error::msg(format!(
            "conv2d_channels_last: {h}×{wd} input with padding {padding} is smaller than the \
             {kh}×{kh} kernel"
        )));
    }
    let op = Im2Col {
        k: kh,
        stride,
        padding,
    };
    if let Some(y) = cudnn_channels_last(x, w, op)? {
        return Ok(y);
    }
    if super::conv_cl::takes(x, w) {
        return super::conv_cl::conv2d(x, w, op);
    }
    if let Some(y) = transposed_channels_last(x, w, op)? {
        return Ok(y);
    }
    let y = conv2d(&x.permute((0, 3, 1, 2))?.contiguous()?, w, padding, stride)?;
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// [`conv2d_channels_last`] without cuDNN where [`conv2d`] has a fused path (f32, or bf16 with an
/// f32 weight; the CPU, or CUDA with the kernels on): the channels-first forward on a transposed
/// copy and [`nhwc_grads`] as its backward, ONE grafted node — so it may run inside a
/// [`super::region`], where the transposes as candle ops would not (the CPU's channels-last
/// ResNet-50, and CUDA's when cuDNN is off or failed). `None` elsewhere.
fn transposed_channels_last(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Option<Tensor>> {
    if !fused_path(x, w) {
        return Ok(None);
    }
    let (xd, wd) = (x.detach().contiguous()?, w.detach());
    let y = plain_forward(&xd.permute((0, 3, 1, 2))?.contiguous()?, &wd, op)?;
    let y = y.permute((0, 2, 3, 1))?.contiguous()?;
    let need_dx = super::region::needs_grad(x);
    let out = super::with_backward(&[x, w], y, move |dy| {
        let (dx, dw) = nhwc_grads(&xd, &wd, op, dy, need_dx)?;
        Ok(vec![dx, Some(dw)])
    })?;
    Ok(Some(out))
}

/// `conv2d(x, w)` of channels-first `x` (f32, or bf16 with an f32 `w`) as a plain tensor, no
/// node: the CPU kernel, or candle's f32 convolution on CUDA; computed in f32, returned in `x`'s
/// dtype.
fn plain_forward(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32)?;
    let y = match x.device().is_cpu() {
        true => cpu_forward(&x32, &w.to_dtype(DType::F32)?, op)?,
        false => x32.conv2d(&w.to_dtype(DType::F32)?, op.padding, op.stride, 1, 1)?,
    };
    y.to_dtype(x.dtype())
}

/// `(dx, dw)` of a channels-last convolution, `x` `(B, H, W, C)` and `dy` `(B, Ho, Wo, C_out)`,
/// from the f32 channels-first backward ([`f32_grads`]) on transposed copies: `dx` (when
/// `need_dx`) back channels last in `x`'s dtype, `dw` `(C_out, C, k, k)` in `w`'s.
fn nhwc_grads(
    x: &Tensor,
    w: &Tensor,
    op: Im2Col,
    dy: &Tensor,
    need_dx: bool,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let nchw = |t: &Tensor| t.permute((0, 3, 1, 2))?.to_dtype(DType::F32)?.contiguous();
    let w32 = w.to_dtype(DType::F32)?;
    let (dx, dw) = f32_grads(&nchw(x)?, &w32, op, COL_BUDGET, &nchw(dy)?, need_dx)?;
    let dx = dx
        .map(|d| d.permute((0, 2, 3, 1))?.to_dtype(x.dtype())?.contiguous())
        .transpose()?;
    Ok((dx, dw.to_dtype(w.dtype())?))
}

/// `(dx, dw)` of `conv2d(x, w)` for f32 `x`, `w`, `dy` (`dx` when `need_dx`): the CPU kernel, or on
/// CUDA the im2col + GEMM + col2im backward (patch matrices of at most `budget` bytes).
fn f32_grads(
    x: &Tensor,
    w: &Tensor,
    op: Im2Col,
    budget: usize,
    dy: &Tensor,
    need_dx: bool,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    match x.device().is_cpu() {
        true => cpu_conv_grads(x, w, op, dy, need_dx),
        false => {
            let (dx, dw) = conv_backward(x, w, op, budget, dy)?;
            Ok((need_dx.then_some(dx), dw))
        }
    }
}

/// [`conv2d_channels_last`] on cuDNN, where it runs (`x` f32, bf16 or f16 on CUDA, cim's cuDNN
/// convolution on); `None` elsewhere, or when cuDNN fails on the forward.
#[cfg(feature = "cudnn")]
fn cudnn_channels_last(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Option<Tensor>> {
    use super::cudnn::{CudnnConv, Pass};
    let dtype = x.dtype();
    let takes = cudnn_conv()
        && x.device().is_cuda()
        && w.device().is_cuda()
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16);
    if !takes {
        return Ok(None);
    }
    let xd = x.detach().contiguous()?;
    let (wd, wdt) = (w.detach(), w.dtype());
    // (C_out, k, k, C) in x's dtype: cuDNN's KRSC filter for NHWC maps.
    let krsc = filter_layout(&wd, true, dtype)?;
    let (b, h, width, c) = xd.dims4()?;
    let c_out = wd.dim(0)?;
    let conv = move |pass| CudnnConv {
        op,
        pass,
        x_dims: [b, c, h, width],
        c_out,
        nhwc: true,
    };
    let Some(y) = cudnn_output(xd.clone(), krsc.clone(), conv(Pass::Forward)) else {
        return Ok(None);
    };
    let need_dx = super::region::needs_grad(x);
    let out = super::with_backward(&[x, w], y, move |dy| {
        let dy = dy.to_dtype(dtype)?.contiguous()?;
        let dw = cudnn_fallible(xd.apply_op2_no_bwd(&dy, &conv(Pass::BackwardFilter)));
        let dx = match (need_dx, &dw) {
            (true, Some(_)) => {
                cudnn_fallible(krsc.apply_op2_no_bwd(&dy, &conv(Pass::BackwardData)))
            }
            _ => None,
        };
        match (dw, dx) {
            (Some(dw), dx) if dx.is_some() || !need_dx => {
                Ok(vec![dx, Some(filter_layout(&dw, false, wdt)?)])
            }
            // cuDNN failed (and is now off): the f32 backward on transposed copies.
            _ => {
                let (dx, dw) = nhwc_grads(&xd, &wd, op, &dy, need_dx)?;
                Ok(vec![dx, Some(dw)])
            }
        }
    })?;
    Ok(Some(out))
}

/// A filter `(O, C, k, k)` to channels last `(O, k, k, C)` (`to_krsc`) or back, in `dtype`: one
/// kernel on CUDA where one exists (f32 → f32/bf16 there, f32/bf16 → f32 back), else candle's
/// permute and cast.
#[cfg(feature = "cudnn")]
fn filter_layout(w: &Tensor, to_krsc: bool, dtype: DType) -> candle_core::Result<Tensor> {
    let kernel = w.device().is_cuda()
        && matches!(
            (w.dtype(), dtype, to_krsc),
            (DType::F32, DType::F32, _)
                | (DType::F32, DType::BF16, true)
                | (DType::BF16, DType::F32, false)
        );
    if kernel {
        return w
            .contiguous()?
            .apply_op1_no_bwd(&FilterLayout { to_krsc, dtype });
    }
    let p = match to_krsc {
        true => w.permute((0, 2, 3, 1))?,
        false => w.permute((0, 3, 1, 2))?,
    };
    p.to_dtype(dtype)?.contiguous()
}

/// [`filter_layout`]'s CUDA kernel as a candle op (CUDA only; the CPU path never builds it).
#[cfg(feature = "cudnn")]
struct FilterLayout {
    to_krsc: bool,
    dtype: DType,
}

#[cfg(feature = "cudnn")]
impl CustomOp1 for FilterLayout {
    fn name(&self) -> &'static str {
        "cim-filter-layout"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cim-filter-layout runs on CUDA tensors only")
    }
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::filter_layout(s, l, self.to_krsc, self.dtype)
    }
}

#[cfg(not(feature = "cudnn"))]
fn cudnn_channels_last(_: &Tensor, _: &Tensor, _: Im2Col) -> Result<Option<Tensor>> {
    Ok(None)
}

/// The forward `conv2d(x, w)` through cim's cuDNN call (no backward), where [`cudnn_takes`] them;
/// `None` elsewhere. See [`cudnn_output`] for what it gives.
#[cfg(feature = "cudnn")]
fn cudnn_forward(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Option<super::Output>> {
    if !cudnn_takes(&[x, w]) {
        return Ok(None);
    }
    let (x, w) = (x.detach().contiguous()?, w.detach().contiguous()?);
    let conv = cudnn_pass(&x, w.dim(0)?, op, super::cudnn::Pass::Forward)?;
    Ok(cudnn_output(x, w, conv))
}

/// A cuDNN forward as a grafted node's output: the op itself (the node's forward then writes the
/// output: no copy of it) where cuDNN has planned this shape already, as in every training step
/// after the first; otherwise run now, so that a first call that fails switches cuDNN off and
/// gives `None` for the caller to fall back (the node then copies the output once).
#[cfg(feature = "cudnn")]
fn cudnn_output(x: Tensor, w: Tensor, conv: super::cudnn::CudnnConv) -> Option<super::Output> {
    if let candle_core::Device::Cuda(dev) = x.device() {
        if conv.planned(dev, x.dtype()) {
            return Some(super::Output::Op2(Box::new(conv), [x, w]));
        }
    }
    cudnn_fallible(x.apply_op2_no_bwd(&w, &conv)).map(super::Output::Done)
}

/// `(dx, dw)` of `conv2d(x, w)` for the output gradient `dy` through cim's cuDNN call (`dx` when
/// `need_dx`), all of `x`'s dtype, where [`cudnn_takes`] them; `None` elsewhere.
#[cfg(feature = "cudnn")]
fn cudnn_backward(
    x: &Tensor,
    w: &Tensor,
    op: Im2Col,
    dy: &Tensor,
    need_dx: bool,
) -> candle_core::Result<Option<(Option<Tensor>, Tensor)>> {
    use super::cudnn::Pass;
    if !cudnn_takes(&[x, w, dy]) {
        return Ok(None);
    }
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let c_out = w.dim(0)?;
    let conv = cudnn_pass(&x, c_out, op, Pass::BackwardFilter)?;
    let Some(dw) = cudnn_fallible(x.apply_op2_no_bwd(&dy, &conv)) else {
        return Ok(None);
    };
    if !need_dx {
        return Ok(Some((None, dw)));
    }
    let conv = cudnn_pass(&x, c_out, op, Pass::BackwardData)?;
    Ok(cudnn_fallible(w.apply_op2_no_bwd(&dy, &conv)).map(|dx| (Some(dx), dw)))
}

/// A cuDNN pass's result; an error switches cim's cuDNN call off (with a warning) and gives
/// `None`, so that the caller runs the convolution another way.
#[cfg(feature = "cudnn")]
fn cudnn_fallible(r: candle_core::Result<Tensor>) -> Option<Tensor> {
    match r {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(
                "cim's cuDNN convolution failed ({e}); candle's convolution and cim's im2col \
                 backward from here on"
            );
            crate::backend::set_cudnn_conv(false);
            None
        }
    }
}

#[cfg(not(feature = "cudnn"))]
fn cudnn_forward(_: &Tensor, _: &Tensor, _: Im2Col) -> Result<Option<super::Output>> {
    Ok(None)
}

#[cfg(not(feature = "cudnn"))]
fn cudnn_backward(
    _: &Tensor,
    _: &Tensor,
    _: Im2Col,
    _: &Tensor,
    _: bool,
) -> candle_core::Result<Option<(Option<Tensor>, Tensor)>> {
    Ok(None)
}

/// The most groups the CPU backward splits a batch into: each group (`⌈B / 16⌉` consecutive images)
/// sums its images' `dW` in order into a partial of its own, and the partials are added in group
/// order, so the result depends on the batch size only, not on the number of threads, and at most
/// 16 weight-sized partials exist at once.
const DW_GROUPS: usize = 16;

/// The CPU convolution: per image, its patch matrix into a scratch buffer of the thread and one
/// GEMM against the `(C_out, C·k·k)` weight, landing in NCHW; images in parallel (single-threaded
/// GEMMs) when there are at least as many as threads, else one image at a time on all threads.
/// Only the input is kept for the backward ([`Geometry::backward`], grafted), which recomputes
/// each image's patches.
fn cpu_conv2d(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Tensor> {
    let (xd, wt) = (x.detach().contiguous()?, w.detach().contiguous()?);
    let y = cpu_forward(&xd, &wt, op)?;
    let need_dx = super::region::needs_grad(x);
    super::with_backward(&[x, w], y, move |dy| {
        let (dx, dw) = cpu_conv_grads(&xd, &wt, op, dy, need_dx)?;
        Ok(vec![dx, Some(dw)])
    })
}

/// The CPU kernel's forward of contiguous f32 `x` and `w`, no node.
fn cpu_forward(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let c_out = w.dim(0)?;
    let (ho, wo) = (op.out(h), op.out(wd));
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let y = cpu_f32(&x, |xs| {
        cpu_f32(&w, |ws| {
            let geo = Geometry::new(op, (b, c, h, wd), c_out);
            let mut y = vec![0f32; b * c_out * ho * wo];
            geo.forward(xs, ws, &mut y);
            y
        })
    })??;
    Tensor::from_vec(y, (b, c_out, ho, wo), x.device())
}

/// The CPU kernel's `(dx, dw)` for f32 `x`, `w` and output gradient `dy` (`dx` when `need_dx`).
fn cpu_conv_grads(
    x: &Tensor,
    w: &Tensor,
    op: Im2Col,
    dy: &Tensor,
    need_dx: bool,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let (b, c, h, wd) = x.dims4()?;
    let geo = Geometry::new(op, (b, c, h, wd), w.dim(0)?);
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let (dx, dw) = cpu_f32(&x, |xs| {
        cpu_f32(&w, |ws| cpu_f32(&dy, |g| geo.backward(xs, ws, g, need_dx)))
    })
    .and_then(|r| r)
    .and_then(|r| r)?;
    let dev = x.device();
    let dx = dx
        .map(|dx| Tensor::from_vec(dx, (b, c, h, wd), dev))
        .transpose()?;
    Ok((dx, Tensor::from_vec(dw, w.shape(), dev)?))
}

/// The sizes of one CPU convolution call.
struct Geometry {
    op: Im2Col,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    c_out: usize,
    /// Output pixels per image.
    hw: usize,
    /// `C·k·k`, the patch length.
    ckk: usize,
}

impl Geometry {
    fn new(op: Im2Col, (b, c, h, w): (usize, usize, usize, usize), c_out: usize) -> Self {
        let hw = op.out(h) * op.out(w);
        Self {
            op,
            b,
            c,
            h,
            w,
            c_out,
            hw,
            ckk: c * op.k * op.k,
        }
    }

    /// Whether images run in parallel (one thread each) rather than one at a time on all threads.
    fn images_in_parallel(&self, items: usize) -> bool {
        items >= rayon::current_num_threads()
    }

    /// The patch matrix `(C·k·k, Ho·Wo)` of image `xi`: `xi` itself for a pointwise convolution,
    /// else written into `cols`.
    fn patches<'a>(&self, xi: &'a [f32], cols: &'a mut Vec<f32>, threads: Threads) -> &'a [f32] {
        if self.op.pointwise() {
            return xi;
        }
        cols.resize(self.ckk * self.hw, 0.0);
        let (kk, plane) = (self.op.k * self.op.k * self.hw, self.h * self.w);
        let (op, h, w) = (self.op, self.h, self.w);
        per_plane(threads, (cols, kk), (xi, plane), |dst, p| {
            op.plane_patches(p, h, w, dst)
        });
        cols
    }

    /// `y` `(B, C_out, Ho·Wo)` from `x` `(B, C, H, W)` and `w` `(C_out, C·k·k)`.
    fn forward(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        let one = |xi: &[f32], yi: &mut [f32], cols: &mut Vec<f32>, threads| {
            let p = self.patches(xi, cols, threads);
            let dims = (self.c_out, self.hw, self.ckk);
            sgemm(
                dims,
                View::rows(w, self.ckk),
                View::rows(p, self.hw),
                yi,
                self.hw,
                false,
                threads,
            );
        };
        let (x_img, y_img) = (self.c * self.h * self.w, self.c_out * self.hw);
        if self.images_in_parallel(self.b) {
            y.par_chunks_mut(y_img)
                .zip(x.par_chunks(x_img))
                .for_each_init(Vec::new, |cols, (yi, xi)| one(xi, yi, cols, Threads::One));
        } else {
            let mut cols = Vec::new();
            for (yi, xi) in y.chunks_mut(y_img).zip(x.chunks(x_img)) {
                one(xi, yi, &mut cols, Threads::All);
            }
        }
    }

    /// `(dx, dw)` from `dy` `(B, C_out, Ho·Wo)`: per image `dW += dYᵢ · colsᵢᵀ` and
    /// `dXᵢ = col2im(Wᵀ · dYᵢ)` (`dx` only when `need_dx`), in at most [`DW_GROUPS`] groups.
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        need_dx: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>) {
        let (x_img, y_img) = (self.c * self.h * self.w, self.c_out * self.hw);
        let per_group = self.b.div_ceil(DW_GROUPS);
        let groups = self.b.div_ceil(per_group);
        let mut dx = vec![0f32; if need_dx { self.b * x_img } else { 0 }];
        // One group: its images' dx and the sum of their dW.
        let group = |g: usize, dxg: &mut [f32], threads: Threads| -> Vec<f32> {
            let (mut dw, mut cols, mut dcols) =
                (vec![0f32; self.c_out * self.ckk], Vec::new(), Vec::new());
            let images = g * per_group..((g + 1) * per_group).min(self.b);
            for (j, i) in images.enumerate() {
                let xi = &x[i * x_img..(i + 1) * x_img];
                let gi = &dy[i * y_img..(i + 1) * y_img];
                let p = self.patches(xi, &mut cols, threads);
                let dims = (self.c_out, self.ckk, self.hw);
                sgemm(
                    dims,
                    View::rows(gi, self.hw),
                    View::transposed(p, self.hw),
                    &mut dw,
                    self.ckk,
                    j > 0,
                    threads,
                );
                if !need_dx {
                    continue;
                }
                let dxi = &mut dxg[j * x_img..(j + 1) * x_img];
                let wt = View::transposed(w, self.ckk);
                let dims = (self.ckk, self.hw, self.c_out);
                if self.op.pointwise() {
                    sgemm(
                        dims,
                        wt,
                        View::rows(gi, self.hw),
                        dxi,
                        self.hw,
                        false,
                        threads,
                    );
                    continue;
                }
                dcols.resize(self.ckk * self.hw, 0.0);
                sgemm(
                    dims,
                    wt,
                    View::rows(gi, self.hw),
                    &mut dcols,
                    self.hw,
                    false,
                    threads,
                );
                let (kk, plane) = (self.op.k * self.op.k * self.hw, self.h * self.w);
                let (op, h, wd) = (self.op, self.h, self.w);
                per_plane(threads, (dxi, plane), (&dcols, kk), |p, src| {
                    op.fold_plane(src, h, wd, p)
                });
            }
            dw
        };
        let group_len = if need_dx { per_group * x_img } else { 0 };
        let partials: Vec<Vec<f32>> = if self.images_in_parallel(groups) {
            (0..groups)
                .into_par_iter()
                .zip(dx_groups(&mut dx, group_len, groups).into_par_iter())
                .map(|(g, dxg)| group(g, dxg, Threads::One))
                .collect()
        } else {
            dx_groups(&mut dx, group_len, groups)
                .into_iter()
                .enumerate()
                .map(|(g, dxg)| group(g, dxg, Threads::All))
                .collect()
        };
        (need_dx.then_some(dx), add_in_order(partials))
    }
}

/// `f(dst chunk, src chunk)` over the paired chunks of `dst` and `src` (one per input plane), in
/// parallel when the caller runs on all threads.
fn per_plane(
    threads: Threads,
    (dst, dst_len): (&mut [f32], usize),
    (src, src_len): (&[f32], usize),
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) {
    if threads == Threads::All {
        dst.par_chunks_mut(dst_len)
            .zip(src.par_chunks(src_len))
            .for_each(|(d, s)| f(d, s));
    } else {
        for (d, s) in dst.chunks_mut(dst_len).zip(src.chunks(src_len)) {
            f(d, s);
        }
    }
}

/// candle's convolution forward (cuDNN on CUDA), with a backward through im2col + GEMM and col2im
/// ([`conv_backward`], grafted with [`super::with_backward`]): candle's own backward runs its
/// direct `conv2d_f32` / `conv_transpose2d_f32` kernels on CUDA, which took 4.4 s of the ResNet-50
/// enhancer's 4.6 s per step at batch 128 (measured on an H200). Untracked inputs (the frozen dVAE)
/// take the plain forward.
fn im2col_backward(x: &Tensor, w: &Tensor, op: Im2Col, budget: usize) -> Result<Tensor> {
    let (xd, wd) = (x.detach(), w.detach());
    let y = match cudnn_forward(&xd, &wd, op)? {
        Some(y) => y,
        None => xd.conv2d(&wd, op.padding, op.stride, 1, 1)?.into(),
    };
    let need_dx = super::region::needs_grad(x);
    super::with_backward(&[x, w], y, move |dy| {
        if let Some((dx, dw)) = cudnn_backward(&xd, &wd, op, dy, need_dx)? {
            return Ok(vec![dx, Some(dw)]);
        }
        let (dx, dw) = conv_backward(&xd, &wd, op, budget, dy)?;
        Ok(vec![Some(dx), Some(dw)])
    })
}

/// Per chunk of images, `dW += dY · colsᵀ` (one batched GEMM, summed over the chunk) and
/// `dX = col2im(Wᵀ · dY)`; the patch matrix is recomputed here, not kept by the forward.
fn conv_backward(
    x: &Tensor,
    w: &Tensor,
    op: Im2Col,
    budget: usize,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (b, c, h, wd) = x.dims4()?;
    let (c_out, _, k, _) = w.dims4()?;
    let (ho, wo) = (op.out(h), op.out(wd));
    let w2 = w.reshape((c_out, c * k * k))?;
    let chunk = op.chunk(x.dims(), budget);
    let dy = dy.contiguous()?;
    let (mut dxs, mut dw) = (Vec::with_capacity(b.div_ceil(chunk)), None);
    for start in (0..b).step_by(chunk) {
        let n = chunk.min(b - start);
        let g = dy.narrow(0, start, n)?.reshape((n, c_out, ho * wo))?;
        let cols = op.patches(&x.narrow(0, start, n)?)?;
        let part = g.matmul(&cols.t()?)?.sum(0)?;
        dw = Some(match dw {
            None => part,
            Some(acc) => (acc + part)?,
        });
        let dcols = w2.t()?.broadcast_left(n)?.matmul(&g)?;
        dxs.push(if op.pointwise() {
            dcols.reshape((n, c, h, wd))?
        } else {
            dcols.apply_op1_no_bwd(&Col2Im { op, h, w: wd })?
        });
    }
    let dw = dw
        .expect("a batch has at least one image")
        .reshape(w.shape())?;
    Ok((Tensor::cat(&dxs, 0)?, dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::Var;

    /// The trainable channels-last convolution is `conv2d` of the transposed map (values, `dx`,
    /// `dw` in the weight's own order), and names both shapes when they do not fit.
    #[test]
    fn channels_last_conv_matches_conv2d() -> Result<()> {
        for (k, stride, pad) in [(3, 2, 1), (1, 1, 0), (7, 2, 3)] {
            let x = Var::from_tensor(&randn(&[2, 4, 9, 8], 21))?;
            let w = Var::from_tensor(&randn(&[6, 4, k, k], 22))?;
            let want = conv2d(&x, &w, pad, stride)?;
            let g = randn(want.dims(), 23);
            let gw = (&want * &g)?.sum_all()?.backward()?;
            let xl = x.permute((0, 2, 3, 1))?;
            let got = conv2d_channels_last(&xl, &w, pad, stride)?;
            let (b, co, ho, wo) = want.dims4()?;
            assert_eq!(got.dims(), &[b, ho, wo, co]);
            // The CPU's channels-last kernel sums the taps in another order.
            assert!(max_diff(&got.permute((0, 3, 1, 2))?, &want) < 1e-4);
            let gl = g.permute((0, 2, 3, 1))?;
            let gg = (&got * &gl)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &w)] {
                let d = max_diff(gg.get(v).unwrap(), gw.get(v).unwrap());
                assert!(d < 1e-4, "k{k} s{stride}: d{name} {d}");
            }
        }
        // bf16 maps with the f32 master weight: the mixed convolution's arithmetic exactly (the
        // same CPU kernel on the same widened values), dx bf16, dw f32.
        let x = Var::from_tensor(&randn(&[2, 4, 9, 8], 24).to_dtype(DType::BF16)?)?;
        let w = Var::from_tensor(&randn(&[6, 4, 3, 3], 25))?;
        let want = conv2d(&x, &w, 1, 2)?;
        let g = randn(want.dims(), 26).to_dtype(DType::BF16)?;
        let gw = (&want * &g)?.sum_all()?.backward()?;
        let got = conv2d_channels_last(&x.permute((0, 2, 3, 1))?, &w, 1, 2)?;
        assert_eq!(got.dtype(), DType::BF16);
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        assert_eq!(
            max_diff(&f32(&got.permute((0, 3, 1, 2))?)?, &f32(&want)?),
            0.0
        );
        let gg = (&got * &g.permute((0, 2, 3, 1))?)?.sum_all()?.backward()?;
        let (dx, dw) = (gg.get(&x).unwrap(), gg.get(&w).unwrap());
        assert_eq!((dx.dtype(), dw.dtype()), (DType::BF16, DType::F32));
        assert_eq!(max_diff(&f32(dx)?, &f32(gw.get(&x).unwrap())?), 0.0);
        assert!(max_diff(dw, gw.get(&w).unwrap()) < 1e-4);
        let e = conv2d_channels_last(&randn(&[1, 5, 5, 3], 1), &randn(&[2, 4, 3, 3], 2), 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[1, 5, 5, 3]") && e.contains("[2, 4, 3, 3]"),
            "{e}"
        );
        Ok(())
    }

    /// Values and both gradients against candle's `conv2d`, for the kernel/stride/padding
    /// combinations the plugins use (dVAE 7×7/3×3/1×1, ResNet stem 7×7 s2, strided 3×3 and 1×1,
    /// ViT patch embedding k = stride) and an uneven input.
    #[test]
    fn matches_candle_conv2d_values_and_gradients() -> Result<()> {
        for (i, &(b, c, h, w, c_out, k, stride, pad)) in [
            (2, 3, 12, 12, 5, 7, 1, 3),
            (2, 4, 9, 7, 6, 3, 1, 1),
            (3, 4, 8, 8, 5, 1, 1, 0),
            (2, 3, 15, 13, 4, 7, 2, 3),
            (2, 4, 9, 9, 3, 3, 2, 1),
            (2, 6, 8, 8, 4, 1, 2, 0),
            (2, 3, 16, 16, 8, 4, 4, 0),
            (1, 2, 5, 6, 3, 3, 1, 0),
            // Stride 3 dividing the padded extent: when it does not, candle's own conv2d
            // backward returns a dx of the wrong shape (its transposed convolution drops a row).
            (2, 2, 12, 12, 3, 5, 3, 2),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&randn(&[b, c, h, w], 10 + i as u64))?;
            let wt = Var::from_tensor(&randn(&[c_out, c, k, k], 20 + i as u64))?;
            let g = randn(
                &[
                    b,
                    c_out,
                    (h + 2 * pad - k) / stride + 1,
                    (w + 2 * pad - k) / stride + 1,
                ],
                30 + i as u64,
            );
            let fused = conv2d(&x, &wt, pad, stride)?;
            let want = x.conv2d(&wt, pad, stride, 1, 1)?;
            assert_eq!(fused.dims(), want.dims(), "case {i}");
            let d = max_diff(&fused, &want);
            assert!(d < 1e-4, "case {i}: forward differs by {d}");
            let gf = (fused * &g)?.sum_all()?.backward()?;
            let gw = (want * &g)?.sum_all()?.backward()?;
            for (what, v) in [("dx", &x), ("dw", &wt)] {
                let (a, e) = (gf.get(v).unwrap(), gw.get(v).unwrap());
                let d = max_diff(a, e);
                let scale = e.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                assert!(d < 1e-4 * scale, "case {i}: {what} differs by {d}");
            }
        }
        Ok(())
    }

    /// Where the stride does not divide the padded extent (candle's own backward fails there), the
    /// values and gradients equal a stride-1 convolution sampled every `stride` pixels.
    #[test]
    fn uneven_stride_matches_subsampled_stride_one() -> Result<()> {
        let (stride, pad, k) = (3, 2, 5);
        let x = Var::from_tensor(&randn(&[2, 2, 11, 10], 7))?;
        let wt = Var::from_tensor(&randn(&[3, 2, k, k], 8))?;
        let ours = conv2d(&x, &wt, pad, stride)?;
        let full = x.conv2d(&wt, pad, 1, 1, 1)?;
        let pick = |n: usize| -> Result<Tensor> {
            let idx: Vec<u32> = (0..n).step_by(stride).map(|i| i as u32).collect();
            Tensor::new(idx.as_slice(), &candle_core::Device::Cpu)
        };
        let (ho, wo) = (full.dim(2)?, full.dim(3)?);
        let want = full
            .index_select(&pick(ho)?, 2)?
            .index_select(&pick(wo)?, 3)?;
        assert_eq!(ours.dims(), want.dims());
        assert!(max_diff(&ours, &want) < 1e-4);
        let g = randn(ours.dims(), 9);
        let go = (ours * &g)?.sum_all()?.backward()?;
        let gw = (want * &g)?.sum_all()?.backward()?;
        for v in [&x, &wt] {
            let (a, e) = (go.get(v).unwrap(), gw.get(v).unwrap());
            assert_eq!(a.dims(), e.dims());
            let scale = e.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            assert!(max_diff(a, e) < 1e-4 * scale);
        }
        Ok(())
    }

    /// The CPU kernel's two schedules — images in parallel with one-thread GEMMs, and one image at
    /// a time on all threads — give the same values and gradients: a batch of five in a 4-thread
    /// pool (parallel, five weight-gradient groups) and of 40 (parallel, groups of three) against
    /// each image alone (one at a time), and the frozen case keeps no graph.
    #[test]
    fn parallel_images_match_one_image_at_a_time() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        pool.install(|| -> Result<()> {
            for (b, k, stride, pad) in [
                (5, 3, 1, 1),
                (5, 1, 1, 0),
                (5, 4, 4, 0),
                (5, 7, 2, 3),
                (40, 3, 2, 1),
            ] {
                let x = Var::from_tensor(&randn(&[b, 3, 12, 12], 1))?;
                let wt = Var::from_tensor(&randn(&[4, 3, k, k], 2))?;
                let o = (12 + 2 * pad - k) / stride + 1;
                let g = randn(&[b, 4, o, o], 3);
                let all = conv2d(&x, &wt, pad, stride)?;
                let grads = (&all * &g)?.sum_all()?.backward()?;
                let mut dw = Tensor::zeros_like(&wt)?;
                for i in 0..b {
                    let xi = Var::from_tensor(&x.narrow(0, i, 1)?)?;
                    let one = conv2d(&xi, &wt, pad, stride)?;
                    let d = max_diff(&one, &all.narrow(0, i, 1)?);
                    assert!(d < 1e-5, "B{b} k{k}: image {i} differs by {d}");
                    let gi = (&one * &g.narrow(0, i, 1)?)?.sum_all()?.backward()?;
                    let dxi = gi.get(&xi).unwrap();
                    assert!(max_diff(dxi, &grads.get(&x).unwrap().narrow(0, i, 1)?) < 1e-5);
                    dw = (dw + gi.get(&wt).unwrap())?;
                }
                let want = grads.get(&wt).unwrap();
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(max_diff(&dw, want) < 1e-5 * scale, "B{b} k{k}: dw");
            }
            let frozen = conv2d(&randn(&[2, 3, 8, 8], 4), &randn(&[4, 3, 3, 3], 5), 1, 1)?;
            assert!(!frozen.track_op());
            Ok(())
        })
    }

    /// bf16 activations with an f32 master weight: the output is bf16 and within bf16 rounding of
    /// the f32 convolution of the same (rounded) input; `dx` is bf16, `dw` f32, both close to the
    /// f32 path's gradients; a frozen bf16 input gets no `dx`.
    #[test]
    fn bf16_input_with_f32_weight_matches_f32_within_rounding() -> Result<()> {
        for (k, stride, pad) in [(3, 1, 1), (1, 2, 0), (7, 2, 3)] {
            let x16 = Var::from_tensor(&randn(&[3, 4, 10, 10], 11).to_dtype(DType::BF16)?)?;
            let wt = Var::from_tensor(&randn(&[5, 4, k, k], 12))?;
            let o = (10 + 2 * pad - k) / stride + 1;
            let g = randn(&[3, 5, o, o], 13);
            let y = conv2d(&x16, &wt, pad, stride)?;
            assert_eq!(y.dtype(), DType::BF16);
            let x32 = Var::from_tensor(&x16.to_dtype(DType::F32)?)?;
            let want = conv2d(&x32, &wt, pad, stride)?;
            let rel = |a: &Tensor, e: &Tensor| -> Result<f32> {
                let scale = e.abs()?.max_all()?.to_scalar::<f32>()?;
                Ok(max_diff(&a.to_dtype(DType::F32)?, e) / scale)
            };
            assert!(rel(&y, &want)? < 1e-2, "k{k}: forward");
            let gm = (y.to_dtype(DType::F32)? * &g)?.sum_all()?.backward()?;
            let gf = (want * &g)?.sum_all()?.backward()?;
            let (dx, dw) = (gm.get(&x16).unwrap(), gm.get(&wt).unwrap());
            assert_eq!((dx.dtype(), dw.dtype()), (DType::BF16, DType::F32));
            assert!(rel(dx, gf.get(&x32).unwrap())? < 1e-2, "k{k}: dx");
            assert!(rel(dw, gf.get(&wt).unwrap())? < 1e-2, "k{k}: dw");
        }
        let frozen = randn(&[2, 4, 6, 6], 14).to_dtype(DType::BF16)?;
        let wt = Var::from_tensor(&randn(&[3, 4, 3, 3], 15))?;
        let grads = conv2d(&frozen, &wt, 1, 1)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(&frozen).is_none() && grads.get(&wt).is_some());
        Ok(())
    }

    /// Only the weight tracked (a first layer): its gradient is right and no input gradient is
    /// produced.
    #[test]
    fn input_gradient_only_when_tracked() -> Result<()> {
        let x = randn(&[3, 2, 9, 9], 6);
        let wt = Var::from_tensor(&randn(&[5, 2, 3, 3], 7))?;
        let ours = conv2d(&x, &wt, 1, 2)?;
        let want = x.conv2d(&wt, 1, 2, 1, 1)?;
        let go = ours.sqr()?.sum_all()?.backward()?;
        let gw = want.sqr()?.sum_all()?.backward()?;
        let (a, e) = (go.get(&wt).unwrap(), gw.get(&wt).unwrap());
        let scale = e.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max_diff(a, e) < 1e-5 * scale);
        assert!(go.get(&x).is_none());
        Ok(())
    }

    /// The CUDA route (candle forward, im2col backward) run on the CPU, chunked and not: values
    /// and both gradients equal candle's.
    #[test]
    fn im2col_backward_matches_candle_conv2d() -> Result<()> {
        for (i, &(b, c, h, w, c_out, k, stride, pad, budget)) in [
            (3, 3, 12, 12, 5, 7, 2, 3, usize::MAX),
            (3, 4, 9, 9, 6, 3, 1, 1, 1),
            (2, 4, 8, 8, 5, 1, 1, 0, usize::MAX),
            (3, 6, 8, 8, 4, 1, 2, 0, 1),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&randn(&[b, c, h, w], 40 + i as u64))?;
            let wt = Var::from_tensor(&randn(&[c_out, c, k, k], 50 + i as u64))?;
            let ours = im2col_backward(
                &x,
                &wt,
                Im2Col {
                    k,
                    stride,
                    padding: pad,
                },
                budget,
            )?;
            let want = x.conv2d(&wt, pad, stride, 1, 1)?;
            assert!(max_diff(&ours, &want) < 1e-4, "case {i}");
            let g = randn(want.dims(), 60 + i as u64);
            let go = (ours * &g)?.sum_all()?.backward()?;
            let gw = (want * &g)?.sum_all()?.backward()?;
            for (what, v) in [("dx", &x), ("dw", &wt)] {
                let (a, e) = (go.get(v).unwrap(), gw.get(v).unwrap());
                let scale = e.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let d = max_diff(a, e);
                assert!(d < 1e-4 * scale, "case {i}: {what} differs by {d}");
            }
        }
        // Frozen inputs: the plain forward, no custom op in the graph.
        let y = im2col_backward(
            &randn(&[1, 2, 5, 5], 1),
            &randn(&[3, 2, 3, 3], 2),
            Im2Col {
                k: 3,
                stride: 1,
                padding: 1,
            },
            COL_BUDGET,
        )?;
        assert!(!y.track_op());
        Ok(())
    }

    /// An empty batch (nothing to split into images) takes candle's convolution.
    #[test]
    fn empty_batches_take_candles_path() -> Result<()> {
        let y = conv2d(
            &randn(&[2, 3, 8, 8], 1).narrow(0, 0, 0)?,
            &randn(&[4, 3, 3, 3], 2),
            1,
            1,
        )?;
        assert_eq!(y.dims(), [0, 4, 8, 8]);
        Ok(())
    }

    #[test]
    fn rejects_mismatched_channels_and_small_inputs() {
        let x = randn(&[1, 3, 4, 4], 1);
        let e = conv2d(&x, &randn(&[2, 4, 3, 3], 2), 1, 1).unwrap_err();
        assert!(e.to_string().contains("3 channels"), "{e}");
        let e = conv2d(&x, &randn(&[2, 3, 7, 7], 2), 1, 1).unwrap_err();
        assert!(e.to_string().contains("smaller than the 7×7"), "{e}");
    }

    /// Channels last, on the CPU: `conv2d` between transposes, the same values; sizes and
    /// tracked inputs are errors naming the function.
    #[test]
    fn nhwc_convolution_is_the_transposed_one() -> Result<()> {
        let x = crate::tests::randn(&[2, 3, 9, 7], 1);
        let w = crate::tests::randn(&[4, 3, 3, 3], 2);
        let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        for (pad, stride) in [(1, 1), (0, 2)] {
            let want = nhwc(&conv2d(&x, &w, pad, stride)?);
            let got = conv2d_nhwc(&nhwc(&x), &nhwc(&w), pad, stride)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(crate::tests::max_diff(&got, &want), 0.0);
        }
        let wrong = crate::tests::randn(&[4, 3, 3, 5], 3);
        let e = conv2d_nhwc(&nhwc(&x), &wrong, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("conv2d_nhwc") && e.contains("(C_out, k, k, 3)"),
            "{e}"
        );
        let tracked = candle_core::Var::from_tensor(&nhwc(&x))?;
        let e = conv2d_nhwc(&tracked, &nhwc(&w), 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("forward only"), "{e}");
        Ok(())
    }
}
