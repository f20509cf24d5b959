//! `MaxPool2d(3, stride 2, padding 1)` (the ResNet stem pool), fused.
//!
//! candle's max-pool has no backward for overlapping windows, so the composed form is the maximum
//! of 9 strided views: 8 `maximum` results kept for the backward, each the size of the output. Here
//! the forward is one pass keeping nothing, and the backward recomputes each window's arg-max (the
//! first maximum in row-major order, as PyTorch) and routes the gradient there.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, slice};
use crate::Result;

/// `MaxPool2d(kernel 3, stride 2, padding 1)` of `x` `(B, C, H, W)` → `(B, C, ⌊(H−1)/2⌋+1, …)`,
/// padding never winning (−∞). `None` when the fused kernels do not apply.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Option<Tensor>> {
    if !is_fusable(&[x]) || x.rank() != 4 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(MaxPoolOp)?))
}

fn out_size(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// Row-major index (within the plane) of the first maximum of output `(oy, ox)`'s window.
#[inline]
fn argmax(plane: &[f32], h: usize, w: usize, oy: usize, ox: usize) -> usize {
    let (y0, x0) = ((2 * oy).saturating_sub(1), (2 * ox).saturating_sub(1));
    let (y1, x1) = ((2 * oy + 2).min(h), (2 * ox + 2).min(w));
    let mut best = y0 * w + x0;
    for iy in y0..y1 {
        for ix in x0..x1 {
            if plane[iy * w + ix] > plane[best] {
                best = iy * w + ix;
            }
        }
    }
    best
}

fn dims(l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    l.shape().dims4()
}

struct MaxPoolOp;

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "cim-max-pool-3x3-s2"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let (b, c, h, w) = dims(l)?;
        let (ho, wo) = (out_size(h), out_size(w));
        let mut y = vec![0f32; b * c * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(yp, xp)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        yp[oy * wo + ox] = xp[argmax(xp, h, w, oy, ox)];
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, ho, wo))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool_fwd(s, l)
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &MaxPoolBwdOp)?))
    }
}

/// `dx`: each output's gradient at its window's arg-max.
struct MaxPoolBwdOp;

impl CustomOp2 for MaxPoolBwdOp {
    fn name(&self) -> &'static str {
        "cim-max-pool-3x3-s2-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dy) = (slice(s1, l1, "x")?, slice(s2, l2, "grad")?);
        let (_, _, h, w) = dims(l1)?;
        let (ho, wo) = (out_size(h), out_size(w));
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(dy.par_chunks(ho * wo)))
            .for_each(|(dp, (xp, gp))| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        dp[argmax(xp, h, w, oy, ox)] += gp[oy * wo + ox];
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
        super::cuda::max_pool_bwd(s1, l1, s2, l2)
    }
}
