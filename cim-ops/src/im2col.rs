//! The patch geometry of a convolution ([`Im2Col`]: the patch matrix and its adjoint, on the CPU
//! and CUDA) and the helpers every CPU convolution kernel shares (`conv`, `conv_cl`, `cudnn`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::slice;
use crate::Result;

/// Runs `f` on the f32 data of a contiguous CPU tensor.
pub(crate) fn cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(s) => Ok(f(slice(s, l, "conv2d")?)),
        _ => Err(crate::Error::msg(
            "conv2d: the CPU kernel got a tensor off the CPU",
        )),
    }
}

/// `dx` split into the groups' parts (`groups` empty slices when `dx` is not wanted).
pub(crate) fn dx_groups(dx: &mut [f32], group_len: usize, groups: usize) -> Vec<&mut [f32]> {
    if group_len == 0 {
        return (0..groups).map(|_| <&mut [f32]>::default()).collect();
    }
    dx.chunks_mut(group_len).collect()
}

/// The groups' `dW` parts added in group order (at least one part): a sum that depends on the
/// grouping only, never on which thread finished first.
pub(crate) fn add_in_order(parts: Vec<Vec<f32>>) -> Vec<f32> {
    let mut parts = parts.into_iter();
    let mut sum = parts.next().expect("a batch has at least one image");
    for p in parts {
        sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    sum
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Im2Col {
    pub k: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Im2Col {
    pub fn out(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.k) / self.stride + 1
    }

    /// A 1×1 stride-1 unpadded convolution: the patch matrix is the input itself.
    pub(crate) fn pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.padding == 0
    }

    /// Images per chunk so that one chunk's patch matrix stays within `budget` bytes (≥ 1).
    pub(crate) fn chunk(&self, x_dims: &[usize], budget: usize) -> usize {
        let (b, c, h, w) = (x_dims[0], x_dims[1], x_dims[2], x_dims[3]);
        let per_image = c * self.k * self.k * self.out(h) * self.out(w) * 4;
        (budget / per_image.max(1)).clamp(1, b)
    }

    /// The patch matrix `(n, C·k·k, Ho·Wo)` of a chunk `xc` `(n, C, H, W)` (not recorded).
    pub(crate) fn patches(&self, xc: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = xc.dims4()?;
        Ok(if self.pointwise() {
            xc.reshape((n, c, h * w))?
        } else {
            xc.contiguous()?.apply_op1_no_bwd(self)?
        })
    }

    /// The `k·k` rows of the patch matrix that one `h × w` input plane contributes, into `dst`
    /// (`k·k × Ho·Wo`): each row a shifted (strided) copy of the plane; every entry is written,
    /// zeros where the kernel reads padding, so `dst` may hold anything before.
    pub(crate) fn plane_patches(&self, plane: &[f32], h: usize, w: usize, dst: &mut [f32]) {
        let (k, ho, wo) = (self.k, self.out(h), self.out(w));
        for (kk, rows) in dst.chunks_mut(ho * wo).take(k * k).enumerate() {
            let (ky, kx) = (kk / k, kk % k);
            let (ox0, ox1, ix0) = self.span(kx, w, wo);
            for (oy, row) in rows.chunks_mut(wo).enumerate() {
                let Some(iy) = self.src(oy, ky, h) else {
                    row.fill(0.0); // a padding row
                    continue;
                };
                row[..ox0].fill(0.0);
                row[ox1..].fill(0.0);
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
    }

    /// The adjoint of [`Self::plane_patches`]: adds the patch-matrix gradient rows `src` of one
    /// plane (`k·k × Ho·Wo`) onto the input pixels they read.
    pub(crate) fn fold_plane(&self, src: &[f32], h: usize, w: usize, plane: &mut [f32]) {
        let (k, ho, wo) = (self.k, self.out(h), self.out(w));
        for (kk, rows) in src.chunks(ho * wo).take(k * k).enumerate() {
            let (ky, kx) = (kk / k, kk % k);
            let (ox0, ox1, ix0) = self.span(kx, w, wo);
            for (oy, row) in rows.chunks(wo).enumerate() {
                let Some(iy) = self.src(oy, ky, h) else {
                    continue;
                };
                let dst = &mut plane[iy * w + ix0..(iy + 1) * w];
                for (d, v) in dst.iter_mut().step_by(self.stride).zip(&row[ox0..ox1]) {
                    *d += v;
                }
            }
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn geometry(&self, h: usize, w: usize) -> super::cuda::ConvGeometry {
        let (k, s, p) = (self.k as i32, self.stride as i32, self.padding as i32);
        let (ho, wo) = (self.out(h) as i32, self.out(w) as i32);
        [h as i32, w as i32, k, s, p, ho, wo]
    }

    /// The input index read by output index `o` at kernel offset `kk` (rows or columns), if
    /// inside an input of `n`.
    #[inline]
    pub(crate) fn src(&self, o: usize, kk: usize, n: usize) -> Option<usize> {
        (o * self.stride + kk)
            .checked_sub(self.padding)
            .filter(|&i| i < n)
    }

    /// The outputs `o0..o1` of a row of `n_out` whose input `o·stride + kk − padding` lies inside
    /// `0..n`, and the input index of `o0`.
    #[inline]
    pub(crate) fn span(&self, kk: usize, n: usize, n_out: usize) -> (usize, usize, usize) {
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
            .for_each(|(dst, plane)| self.plane_patches(plane, h, w, dst));
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
}

/// The im2col backward: each input pixel's gradient is the sum over the patch entries that read
/// it. Parallel over input planes, so no two workers write the same pixel.
pub(crate) struct Col2Im {
    pub op: Im2Col,
    pub h: usize,
    pub w: usize,
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
            .for_each(|(plane, src)| op.fold_plane(src, h, w, plane));
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
