//! `MaxPool2d(3, stride 2, padding 1)` (the ResNet stem pool), fused, channels first or last.
//!
//! candle's max-pool has no backward for overlapping windows, so the composed form is the maximum
//! of 9 strided views: 8 `maximum` results kept for the backward, each the size of the output. Here
//! the forward is one pass keeping nothing, and the backward recomputes each window's arg-max (the
//! first maximum in row-major order, as PyTorch) and routes the gradient there. On CUDA the
//! kernels also take bf16 maps (a maximum of bf16 values is exact, so nothing is widened).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, kernels_on_cuda, slice};
use crate::Result;

/// `MaxPool2d(kernel 3, stride 2, padding 1)` of `x` `(B, C, H, W)` → `(B, C, ⌊(H−1)/2⌋+1, …)`,
/// padding never winning (−∞). `None` when the fused kernels do not apply (f32 on the CPU; f32
/// or bf16 on CUDA with the kernels on).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Option<Tensor>> {
    pool(x, false)
}

/// [`max_pool_3x3_s2`] of a channels-last map `(B, H, W, C)` → `(B, Ho, Wo, C)`.
pub fn max_pool_3x3_s2_nhwc(x: &Tensor) -> Result<Option<Tensor>> {
    pool(x, true)
}

fn pool(x: &Tensor, last: bool) -> Result<Option<Tensor>> {
    let bf16_cuda = x.dtype() == DType::BF16 && kernels_on_cuda(x);
    if !(is_fusable(&[x]) || bf16_cuda) || x.rank() != 4 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(MaxPoolOp { last })?))
}

fn out_size(n: usize) -> usize {
    (n - 1) / 2 + 1
}

/// A map's planes (one channel of one item): `planes` of `h × w`, pixel `q` (row-major) of plane
/// `p` at `base(p) + q·step` — channels first `p·h·w + q`, channels last (`c` channels)
/// `(p / c)·h·w·c + p % c + q·c`.
#[derive(Clone, Copy)]
struct Planes {
    planes: usize,
    c: usize,
    h: usize,
    w: usize,
    last: bool,
}

impl Planes {
    fn of(l: &Layout, last: bool) -> candle_core::Result<Self> {
        let (b, c, h, w) = match last {
            false => l.shape().dims4()?,
            true => {
                let (b, h, w, c) = l.shape().dims4()?;
                (b, c, h, w)
            }
        };
        Ok(Self {
            planes: b * c,
            c,
            h,
            w,
            last,
        })
    }
    /// The same planes, `h × w` replaced (the pool's output).
    fn sized(self, h: usize, w: usize) -> Self {
        Self { h, w, ..self }
    }
    fn base_step(&self, p: usize) -> (usize, usize) {
        match self.last {
            false => (p * self.h * self.w, 1),
            true => ((p / self.c) * self.h * self.w * self.c + p % self.c, self.c),
        }
    }
    /// Plane `p`'s pixels, copied out row-major.
    fn gather(&self, x: &[f32], p: usize) -> Vec<f32> {
        let (base, step) = self.base_step(p);
        (0..self.h * self.w).map(|q| x[base + q * step]).collect()
    }
    /// Writes plane `p`'s pixels from a row-major `src`.
    fn scatter(&self, out: &mut [f32], p: usize, src: &[f32]) {
        let (base, step) = self.base_step(p);
        for (q, &v) in src.iter().enumerate() {
            out[base + q * step] = v;
        }
    }
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

/// The pool of one row-major plane.
fn pool_plane(xp: &[f32], h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (out_size(h), out_size(w));
    let mut y = vec![0f32; ho * wo];
    for oy in 0..ho {
        for ox in 0..wo {
            y[oy * wo + ox] = xp[argmax(xp, h, w, oy, ox)];
        }
    }
    y
}

/// The pool's `dx` of one row-major plane from its output gradient `gp`.
fn unpool_plane(xp: &[f32], gp: &[f32], h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (out_size(h), out_size(w));
    let mut dx = vec![0f32; h * w];
    for oy in 0..ho {
        for ox in 0..wo {
            dx[argmax(xp, h, w, oy, ox)] += gp[oy * wo + ox];
        }
    }
    dx
}

/// `f` on every plane (gathered row-major where the map is channels last), its results written
/// into a map of `out` planes.
fn per_plane(
    src: Planes,
    out: Planes,
    f: impl Fn(usize, &[f32]) -> Vec<f32> + Sync,
    x: &[f32],
) -> Vec<f32> {
    let mut y = vec![0f32; out.planes * out.h * out.w];
    if !src.last {
        let (hw, ohw) = (src.h * src.w, out.h * out.w);
        y.par_chunks_mut(ohw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(p, (yp, xp))| yp.copy_from_slice(&f(p, xp)));
        return y;
    }
    let planes: Vec<Vec<f32>> = (0..src.planes)
        .into_par_iter()
        .map(|p| f(p, &src.gather(x, p)))
        .collect();
    for (p, v) in planes.iter().enumerate() {
        out.scatter(&mut y, p, v);
    }
    y
}

struct MaxPoolOp {
    last: bool,
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "cim-max-pool-3x3-s2"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let src = Planes::of(l, self.last)?;
        let (h, w) = (src.h, src.w);
        let (ho, wo) = (out_size(h), out_size(w));
        let y = per_plane(src, src.sized(ho, wo), |_, xp| pool_plane(xp, h, w), x);
        let d = l.shape().dims();
        let shape = match self.last {
            false => Shape::from((d[0], d[1], ho, wo)),
            true => Shape::from((d[0], ho, wo, d[3])),
        };
        Ok((CpuStorage::F32(y), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::max_pool_fwd(s, l, self.last)
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        let op = MaxPoolBwdOp { last: self.last };
        Ok(Some(x.apply_op2_no_bwd(&dy, &op)?))
    }
}

/// `dx`: each output's gradient at its window's arg-max.
struct MaxPoolBwdOp {
    last: bool,
}

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
        let src = Planes::of(l1, self.last)?;
        let (h, w) = (src.h, src.w);
        let grads = src.sized(out_size(h), out_size(w));
        let dx = per_plane(
            src,
            src,
            |p, xp| {
                let gp = match self.last {
                    false => dy[p * grads.h * grads.w..][..grads.h * grads.w].to_vec(),
                    true => grads.gather(dy, p),
                };
                unpool_plane(xp, &gp, h, w)
            },
            x,
        );
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
        super::cuda::max_pool_bwd(s1, l1, s2, l2, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::Var;

    /// Channels last is the channels-first pool between transposes: values and gradients, with
    /// odd and even sizes (the last window cut by the edge).
    #[test]
    fn channels_last_pool_equals_channels_first() -> Result<()> {
        for (h, w) in [(7, 6), (8, 9)] {
            let x = Var::from_tensor(&randn(&[2, 3, h, w], 7))?;
            let first = max_pool_3x3_s2(&x)?.expect("f32 on the CPU fuses");
            let up = randn(first.dims(), 8);
            let g1 = (&first * &up)?.sum_all()?.backward()?;
            let xl = x.permute((0, 2, 3, 1))?.contiguous()?;
            let last = max_pool_3x3_s2_nhwc(&xl)?.expect("f32 on the CPU fuses");
            assert_eq!(last.dims(), &[2, first.dim(2)?, first.dim(3)?, 3]);
            assert_eq!(max_diff(&last.permute((0, 3, 1, 2))?, &first), 0.0);
            let upl = up.permute((0, 2, 3, 1))?.contiguous()?;
            let g2 = (&last * &upl)?.sum_all()?.backward()?;
            let (a, b) = (g1.get(&x).unwrap(), g2.get(&x).unwrap());
            assert_eq!(max_diff(a, b), 0.0, "{h}×{w}");
            // Every output's gradient lands somewhere: dx sums to dy's sum.
            let (sa, su) = (
                a.sum_all()?.to_scalar::<f32>()?,
                up.sum_all()?.to_scalar::<f32>()?,
            );
            assert!((sa - su).abs() < 1e-4, "{sa} vs {su}");
        }
        Ok(())
    }
}
