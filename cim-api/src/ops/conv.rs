//! 2-D convolution on the CPU as im2col + one GEMM per image, with a backward.
//!
//! candle 0.11's CPU `conv2d` converts the input to NHWC on one thread, scatters each 512-pixel
//! tile's patches column by column and runs one small GEMM per tile; its backward runs a
//! `conv_transpose2d` (dx) and a second convolution over transposed copies (dw). Here the patch
//! matrix of each image, `(C·k·k, Ho·Wo)` in the weight's `(c, ky, kx)` order, is written row by row
//! (each row a shifted copy of one input plane, in parallel over planes), and the convolution is one
//! batched GEMM against the `(C_out, C·k·k)` weight that lands directly in NCHW. The backward is
//! the GEMM's (candle's matmul backward) plus one col2im pass that folds the patch gradients back
//! onto the input planes. Batches whose patch matrix would exceed [`COL_BUDGET`] bytes are split
//! into chunks of images, so the real dVAE at 112 px (C·k·k = 2304, 12 544 pixels per image) does
//! not hold a batch-sized patch matrix.
//!
//! f32 CPU tensors take this path. On CUDA with the fused kernels switched on, the forward stays
//! candle's (cuDNN with the `cudnn` feature) and only the backward is im2col + GEMM + col2im
//! ([`conv_backward`], CUDA im2col/col2im kernels); other dtypes run candle's `conv2d` both ways.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::slice;
use crate::Result;

/// Largest patch matrix one chunk of images may hold, in bytes.
pub const COL_BUDGET: usize = 256 << 20;

/// `conv2d(x, w)` with square kernels, no dilation, one group: `x` `(B, C, H, W)`, `w`
/// `(C_out, C, k, k)` → `(B, C_out, Ho, Wo)`, `Ho = (H + 2·padding − k) / stride + 1`. No bias.
/// f32 CPU tensors run im2col + GEMM; everything else candle's `conv2d`.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    conv2d_with_budget(x, w, padding, stride, COL_BUDGET)
}

/// [`conv2d`] with an explicit patch-matrix budget (bytes per chunk of images).
pub fn conv2d_with_budget(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
    budget: usize,
) -> Result<Tensor> {
    let f32s = [x, w].iter().all(|t| t.dtype() == DType::F32);
    let on_cpu = f32s && [x, w].iter().all(|t| t.device().is_cpu());
    let on_cuda = f32s && super::cuda_kernels() && [x, w].iter().all(|t| t.device().is_cuda());
    let (_, _, kh, kw) = w.dims4()?;
    if !(on_cpu || on_cuda) || kh != kw || stride == 0 {
        return Ok(x.conv2d(w, padding, stride, 1, 1)?);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (c_out, c_w, k, _) = w.dims4()?;
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
    if on_cuda {
        return im2col_backward(x, w, op, budget);
    }
    let (ho, wo) = (op.out(h), op.out(wd));
    let w2 = w.reshape((c_out, c * k * k))?;
    let chunk = op.chunk(x.dims(), budget);
    let x = x.contiguous()?;
    let mut outs = Vec::with_capacity(b.div_ceil(chunk));
    // One chunk: candle's narrow and cat of the whole batch return it as is.
    for start in (0..b).step_by(chunk) {
        let xc = x.narrow(0, start, chunk.min(b - start))?;
        outs.push(w2.broadcast_matmul(&op.patches(&xc, true)?)?);
    }
    Ok(Tensor::cat(&outs, 0)?.reshape((b, c_out, ho, wo))?)
}

/// candle's convolution forward (cuDNN on CUDA), with a backward through im2col + GEMM and col2im
/// ([`conv_backward`], grafted with [`super::with_backward`]): candle's own backward runs its
/// direct `conv2d_f32` / `conv_transpose2d_f32` kernels on CUDA, which took 4.4 s of the ResNet-50
/// enhancer's 4.6 s per step at batch 128 (measured on an H200). Untracked inputs (the frozen dVAE)
/// take the plain forward.
fn im2col_backward(x: &Tensor, w: &Tensor, op: Im2Col, budget: usize) -> Result<Tensor> {
    let y = x
        .detach()
        .conv2d(&w.detach(), op.padding, op.stride, 1, 1)?;
    let (xd, wd) = (x.detach(), w.detach());
    super::with_backward(&[x, w], y, move |dy| {
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
        let cols = op
            .patches(&x.narrow(0, start, n)?, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
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

#[derive(Clone, Copy)]
struct Im2Col {
    k: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn out(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.k) / self.stride + 1
    }

    /// A 1×1 stride-1 unpadded convolution: the patch matrix is the input itself.
    fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// Images per chunk so that one chunk's patch matrix stays within `budget` bytes (≥ 1).
    fn chunk(&self, x_dims: &[usize], budget: usize) -> usize {
        let (b, c, h, w) = (x_dims[0], x_dims[1], x_dims[2], x_dims[3]);
        let per_image = c * self.k * self.k * self.out(h) * self.out(w) * 4;
        (budget / per_image.max(1)).clamp(1, b)
    }

    /// The patch matrix `(n, C·k·k, Ho·Wo)` of a chunk `xc` `(n, C, H, W)`, recorded for the
    /// backward (`record`) or not.
    fn patches(&self, xc: &Tensor, record: bool) -> Result<Tensor> {
        let (n, c, h, w) = xc.dims4()?;
        Ok(if self.pointwise() {
            xc.reshape((n, c, h * w))?
        } else if record {
            xc.contiguous()?.apply_op1(*self)?
        } else {
            xc.contiguous()?.apply_op1_no_bwd(self)?
        })
    }

    #[cfg(feature = "cuda")]
    fn geometry(&self, h: usize, w: usize) -> super::cuda::ConvGeometry {
        let (k, s, p) = (self.k as i32, self.stride as i32, self.padding as i32);
        let (ho, wo) = (self.out(h) as i32, self.out(w) as i32);
        [h as i32, w as i32, k, s, p, ho, wo]
    }

    /// The input index read by output index `o` at kernel offset `kk` (rows or columns), if
    /// inside an input of `n`.
    #[inline]
    fn src(&self, o: usize, kk: usize, n: usize) -> Option<usize> {
        (o * self.stride + kk)
            .checked_sub(self.padding)
            .filter(|&i| i < n)
    }

    /// The outputs `o0..o1` of a row of `n_out` whose input `o·stride + kk − padding` lies inside
    /// `0..n`, and the input index of `o0`.
    #[inline]
    fn span(&self, kk: usize, n: usize, n_out: usize) -> (usize, usize, usize) {
        let s = self.stride;
        let o0 = self.padding.saturating_sub(kk).div_ceil(s);
        // Last valid o: o·s + kk − padding ≤ n − 1.
        let o1 = if n + self.padding > kk {
            ((n - 1 + self.padding - kk) / s + 1).min(n_out)
        } else {
            0
        };
        let o0 = o0.min(o1);
        (o0, o1, (o0 * s + kk).saturating_sub(self.padding))
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "cim-im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (k, ho, wo) = (self.k, self.out(h), self.out(w));
        let mut cols = vec![0f32; b * c * k * k * ho * wo];
        cols.par_chunks_mut(k * k * ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, plane)| {
                for (kk, rows) in dst.chunks_mut(ho * wo).enumerate() {
                    let (ky, kx) = (kk / k, kk % k);
                    let (ox0, ox1, ix0) = self.span(kx, w, wo);
                    for (oy, row) in rows.chunks_mut(wo).enumerate() {
                        let Some(iy) = self.src(oy, ky, h) else {
                            continue; // padding rows stay zero
                        };
                        let src = &plane[iy * w + ix0..(iy + 1) * w];
                        let row = &mut row[ox0..ox1];
                        if self.stride == 1 {
                            row.copy_from_slice(&src[..row.len()]);
                        } else {
                            for (v, x) in row.iter_mut().zip(src.iter().step_by(self.stride)) {
                                *v = *x;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(cols), Shape::from((b, c * k * k, ho * wo))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, h, w) = l.shape().dims4()?;
        super::cuda::im2col(s, l, self.geometry(h, w))
    }
    fn bwd(
        &self,
        x: &Tensor,
        _cols: &Tensor,
        dcols: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let op = Col2Im { op: *self, h, w };
        Ok(Some(dcols.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// The im2col backward: each input pixel's gradient is the sum over the patch entries that read
/// it. Parallel over input planes, so no two workers write the same pixel.
struct Col2Im {
    op: Im2Col,
    h: usize,
    w: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "cim-col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = slice(s, l, "grad")?;
        let (b, ckk, _) = l.shape().dims3()?;
        let (op, h, w) = (self.op, self.h, self.w);
        let (k, ho, wo) = (op.k, op.out(h), op.out(w));
        let c = ckk / (k * k);
        let mut dx = vec![0f32; b * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(g.par_chunks(k * k * ho * wo))
            .for_each(|(plane, src)| {
                for (kk, rows) in src.chunks(ho * wo).enumerate() {
                    let (ky, kx) = (kk / k, kk % k);
                    let (ox0, ox1, ix0) = op.span(kx, w, wo);
                    for (oy, row) in rows.chunks(wo).enumerate() {
                        let Some(iy) = op.src(oy, ky, h) else {
                            continue;
                        };
                        let dst = &mut plane[iy * w + ix0..(iy + 1) * w];
                        for (d, v) in dst.iter_mut().step_by(op.stride).zip(&row[ox0..ox1]) {
                            *d += v;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((b, c, h, w))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::col2im(s, l, self.op.geometry(self.h, self.w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

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
            Ok(Tensor::new(idx.as_slice(), &candle_core::Device::Cpu)?)
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

    /// A budget smaller than one image's patch matrix splits the batch image by image and gives
    /// the same values and gradients as one chunk.
    #[test]
    fn chunked_batches_match_one_chunk() -> Result<()> {
        let x = Var::from_tensor(&randn(&[5, 3, 10, 10], 1))?;
        let wt = Var::from_tensor(&randn(&[4, 3, 3, 3], 2))?;
        let one = conv2d_with_budget(&x, &wt, 1, 1, usize::MAX)?;
        let many = conv2d_with_budget(&x, &wt, 1, 1, 1)?;
        assert!(max_diff(&one, &many) < 1e-6);
        let g1 = one.sqr()?.sum_all()?.backward()?;
        let g2 = many.sqr()?.sum_all()?.backward()?;
        for v in [&x, &wt] {
            let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            let scale = e.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                max_diff(a, e) < 1e-5 * scale,
                "{} vs {scale}",
                max_diff(a, e)
            );
        }
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

    #[test]
    fn rejects_mismatched_channels_and_small_inputs() {
        let x = randn(&[1, 3, 4, 4], 1);
        let e = conv2d(&x, &randn(&[2, 4, 3, 3], 2), 1, 1).unwrap_err();
        assert!(e.to_string().contains("3 channels"), "{e}");
        let e = conv2d(&x, &randn(&[2, 3, 7, 7], 2), 1, 1).unwrap_err();
        assert!(e.to_string().contains("smaller than the 7×7"), "{e}");
    }
}
