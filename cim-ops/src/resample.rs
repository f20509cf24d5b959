//! 2× resampling of NCHW maps for the frozen dVAE: 2×2 max-pooling (the encoder's group
//! boundaries) and nearest-neighbour upsampling (the decoder's). candle's CPU versions run on one
//! thread; these run plane by plane in parallel (f32). On CUDA (kernels on; f32, bf16 or f16) one
//! thread per output element: candle's CUDA max-pool took 4.9 ms for the dVAE's three pools in
//! an H200 profile (2026-11-27), ~4× the bandwidth bound. Both are forward-only: an input that tracks
//! gradients, another dtype or device takes candle's op, which has the backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::slice;
use crate::Result;

fn kernel_applies(x: &Tensor) -> Result<bool> {
    x.dims4()?;
    let here = match x.device() {
        d if d.is_cpu() => x.dtype() == DType::F32,
        d if d.is_cuda() => {
            super::kernels_on_cuda(x) && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        }
        _ => false,
    };
    Ok(here && !x.track_op() && x.elem_count() > 0)
}

/// `max_pool2d(2)` of `x` `(B, C, H, W)` → `(B, C, H/2, W/2)` (odd sides rounded down), equal to
/// candle's, NaN handling included.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    if !kernel_applies(x)? || x.dim(2)? < 2 || x.dim(3)? < 2 {
        return x.max_pool2d(2);
    }
    x.contiguous()?.apply_op1_no_bwd(&Resample {
        pool: true,
        nhwc: false,
    })
}

/// `upsample_nearest2d(2H, 2W)` of `x` `(B, C, H, W)`, equal to candle's.
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    if !kernel_applies(x)? {
        let (_, _, h, w) = x.dims4()?;
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    x.contiguous()?.apply_op1_no_bwd(&Resample {
        pool: false,
        nhwc: false,
    })
}

/// [`max_pool_2x2`] of a channels-last map `x` `(B, H, W, C)` → `(B, H/2, W/2, C)`, the same
/// values in the same layout.
pub fn max_pool_2x2_nhwc(x: &Tensor) -> Result<Tensor> {
    if !kernel_applies(x)? || x.dim(1)? < 2 || x.dim(2)? < 2 {
        return through_nchw(x, max_pool_2x2);
    }
    x.contiguous()?.apply_op1_no_bwd(&Resample {
        pool: true,
        nhwc: true,
    })
}

/// [`upsample_nearest_2x`] of a channels-last map `x` `(B, H, W, C)` → `(B, 2H, 2W, C)`.
pub fn upsample_nearest_2x_nhwc(x: &Tensor) -> Result<Tensor> {
    if !kernel_applies(x)? {
        return through_nchw(x, upsample_nearest_2x);
    }
    x.contiguous()?.apply_op1_no_bwd(&Resample {
        pool: false,
        nhwc: true,
    })
}

/// `f` of a channels-last map, run channels first between two transposes (tracked inputs, other
/// dtypes and devices: candle's ops and their backward).
fn through_nchw(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let y = f(&x.permute((0, 3, 1, 2))?.contiguous()?)?;
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// 2× max-pooling (`pool`) or nearest upsampling, of NCHW maps or (`nhwc`) channels-last ones.
struct Resample {
    pool: bool,
    nhwc: bool,
}

impl Resample {
    fn cpu_nchw(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = match self.pool {
            true => (h / 2, w / 2),
            false => (2 * h, 2 * w),
        };
        let mut y = vec![0f32; b * c * ho * wo];
        y.par_chunks_mut(ho * wo)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| match self.pool {
                true => {
                    for (oy, row) in dst.chunks_mut(wo).enumerate() {
                        let (r0, r1) = (&src[2 * oy * w..], &src[(2 * oy + 1) * w..]);
                        for (ox, v) in row.iter_mut().enumerate() {
                            // candle's order: the window's first value, replaced by larger ones.
                            let mut m = r0[2 * ox];
                            for s in [r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]] {
                                if s > m {
                                    m = s;
                                }
                            }
                            *v = m;
                        }
                    }
                }
                false => {
                    for (iy, row) in src.chunks(w).enumerate() {
                        let out = &mut dst[2 * iy * wo..(2 * iy + 1) * wo];
                        for (pair, &v) in out.chunks_mut(2).zip(row) {
                            pair.fill(v);
                        }
                        let (done, next) = dst[2 * iy * wo..(2 * iy + 2) * wo].split_at_mut(wo);
                        next.copy_from_slice(done);
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, c, ho, wo))))
    }

    fn cpu_nhwc(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (b, h, w, c) = l.shape().dims4()?;
        let (ho, wo) = match self.pool {
            true => (h / 2, w / 2),
            false => (2 * h, 2 * w),
        };
        let mut y = vec![0f32; b * ho * wo * c];
        // One output row (`wo` pixels of `c` channels) per work item.
        y.par_chunks_mut(wo * c).enumerate().for_each(|(row, dst)| {
            let (bi, oy) = (row / ho, row % ho);
            let img = &x[bi * h * w * c..(bi + 1) * h * w * c];
            match self.pool {
                true => {
                    let (r0, r1) = (&img[2 * oy * w * c..], &img[(2 * oy + 1) * w * c..]);
                    for (ox, px) in dst.chunks_mut(c).enumerate() {
                        let (a, b) = (2 * ox * c, (2 * ox + 1) * c);
                        for (ch, v) in px.iter_mut().enumerate() {
                            // candle's order: the window's first value, replaced by larger ones.
                            let mut m = r0[a + ch];
                            for s in [r0[b + ch], r1[a + ch], r1[b + ch]] {
                                if s > m {
                                    m = s;
                                }
                            }
                            *v = m;
                        }
                    }
                }
                false => {
                    let src = &img[(oy / 2) * w * c..(oy / 2 + 1) * w * c];
                    for (ox, px) in dst.chunks_mut(c).enumerate() {
                        px.copy_from_slice(&src[(ox / 2) * c..(ox / 2 + 1) * c]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((b, ho, wo, c))))
    }
}

impl CustomOp1 for Resample {
    fn name(&self) -> &'static str {
        match (self.pool, self.nhwc) {
            (true, false) => "cim-max-pool-2x2",
            (false, false) => "cim-upsample-nearest-2x",
            (true, true) => "cim-max-pool-2x2-nhwc",
            (false, true) => "cim-upsample-nearest-2x-nhwc",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.nhwc {
            true => self.cpu_nhwc(s, l),
            false => self.cpu_nchw(s, l),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::resample_2x(s, l, self.pool, self.nhwc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{bits, randn};
    use candle_core::Var;

    /// Equal to candle's ops, odd sides and a NaN included; tracked inputs keep candle's backward.
    #[test]
    fn match_candle_and_leave_tracked_inputs_to_it() -> Result<()> {
        for dims in [[2, 3, 8, 6], [1, 2, 7, 5], [1, 1, 1, 3]] {
            let x = randn(&dims, 1);
            let want = x.upsample_nearest2d(2 * dims[2], 2 * dims[3])?;
            assert_eq!(
                upsample_nearest_2x(&x)?.flatten_all()?.to_vec1::<f32>()?,
                want.flatten_all()?.to_vec1::<f32>()?
            );
            if dims[2] >= 2 && dims[3] >= 2 {
                let want = x.max_pool2d(2)?;
                let got = max_pool_2x2(&x)?;
                assert_eq!(got.dims(), want.dims());
                assert_eq!(
                    got.flatten_all()?.to_vec1::<f32>()?,
                    want.flatten_all()?.to_vec1::<f32>()?
                );
            }
        }
        let mut v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        v[0] = f32::NAN; // first in its window
        v[7] = f32::NAN; // last in its window
        let x = Tensor::from_vec(v, (1, 1, 4, 4), &candle_core::Device::Cpu)?;
        let (a, b) = (max_pool_2x2(&x)?, x.max_pool2d(2)?);
        assert_eq!(bits(&a), bits(&b));
        // Channels last: the same values in the other layout (kernel, and the transposed
        // fallback a tracked input takes).
        let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        for dims in [[2, 5, 8, 6], [1, 3, 7, 5]] {
            let x = randn(&dims, 3);
            let xl = nhwc(&x);
            assert_eq!(
                bits(&max_pool_2x2_nhwc(&xl)?),
                bits(&nhwc(&max_pool_2x2(&x)?))
            );
            let up = upsample_nearest_2x_nhwc(&xl)?;
            assert_eq!(bits(&up), bits(&nhwc(&upsample_nearest_2x(&x)?)));
            let xv = Var::from_tensor(&xl)?;
            let tracked = max_pool_2x2_nhwc(&xv)?;
            assert_eq!(bits(&tracked), bits(&max_pool_2x2_nhwc(&xl)?));
            assert!(tracked.track_op());
        }
        let xl = nhwc(&x);
        assert_eq!(bits(&max_pool_2x2_nhwc(&xl)?), bits(&nhwc(&b)));
        let xv = Var::from_tensor(&randn(&[1, 2, 4, 4], 2))?;
        let g = max_pool_2x2(&xv)?.sum_all()?.backward()?;
        assert!(
            g.get(&xv).is_some(),
            "a tracked input keeps candle's backward"
        );
        Ok(())
    }
}
