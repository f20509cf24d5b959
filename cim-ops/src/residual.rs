//! The residual adds inside the block node ([`super::pre_norm_block`]), one pass each, no backward
//! (the node writes its own): `x + (y + b)` in the forward — a Linear layer's output with its bias,
//! added to the residual stream — and `dy + d` in the backward, where `d` is a LayerNorm's f32
//! input gradient and `dy` the stream's gradient in the block's dtype.
//!
//! Composed, the forward is a bias add and an add (two passes, and in bf16 an intermediate
//! rounding), the backward a cast and an add. In an H200 profile (2026-11-27) of a bf16 ViT-B/16
//! step, candle's bf16 adds were 12.8 ms in 125 calls (~1.2 TB/s: scalar 2-byte loads) and its
//! f32 → bf16 casts 6.8 ms; the block's share of those is 4 adds and 2 casts per block and step.
//! Fused: f32 arithmetic, one rounding to the output dtype, four elements per CUDA thread moved as
//! one word.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{slice, CHUNK_ROWS};
use crate::{Error, Result};

/// `a + b (+ bias)`, no backward: `a` `(…, D)` f32 or bf16, `b` shaped like `a` in `a`'s dtype or
/// in f32, `bias` `(D,)` f32. The result has `a`'s dtype. One fused pass on the CPU (all f32) and
/// on CUDA with the kernels on (`a` f32 with `b` f32; `a` bf16 with `b` bf16 or f32; `D` and every
/// view's start a multiple of 4); composed from candle ops otherwise.
pub fn residual_add(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    if a.dims() != b.dims() || a.rank() == 0 {
        return Err(Error::msg(format!(
            "residual_add: b {:?} differs from a {:?}",
            b.dims(),
            a.dims()
        )));
    }
    let d = a.dims()[a.rank() - 1];
    if let Some(bias) = bias {
        if bias.dims() != [d] {
            return Err(Error::msg(format!(
                "residual_add: bias {:?} does not match a {:?} (wants ({d},))",
                bias.dims(),
                a.dims()
            )));
        }
    }
    residual_add_output(a, b, bias, d)?.run()
}

/// [`residual_add`] as a grafted node's output ([`super::Output`]): the fused kernel left for the
/// node's forward to run, or the composed result. Shapes checked by the caller.
pub(super) fn residual_add_output(
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    d: usize,
) -> Result<super::Output> {
    Ok(match fusable(a, b, bias, d)? {
        Some((a, b, bias)) => {
            let op = ResidualAdd {
                has_bias: bias.is_some(),
            };
            // Without a bias the kernel ignores its third input: `b` stands in.
            let third = bias.unwrap_or_else(|| b.clone());
            super::Output::Op3(Box::new(op), [a, b, third])
        }
        None => super::Output::Done(residual_add_composed(a, b, bias)?),
    })
}

/// [`residual_add`] from candle ops: `b (+ bias)` in `b`'s dtype, cast to `a`'s, added to `a`.
pub fn residual_add_composed(a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let t = match bias {
        Some(bias) => super::bias_add(b, bias)?,
        None => b.clone(),
    };
    a + t.to_dtype(a.dtype())?
}

type Fusable = (Tensor, Tensor, Option<Tensor>);

/// The contiguous inputs when one of the fused kernels takes them.
fn fusable(a: &Tensor, b: &Tensor, bias: Option<&Tensor>, d: usize) -> Result<Option<Fusable>> {
    let dev = a.device();
    let same_device =
        b.device().same_device(dev) && bias.is_none_or(|t| t.device().same_device(dev));
    let bias_f32 = bias.is_none_or(|t| t.dtype() == DType::F32);
    let here = match (a.dtype(), b.dtype()) {
        (DType::F32, DType::F32) => super::fusable_device(a),
        (DType::BF16, DType::BF16 | DType::F32) => super::kernels_on_cuda(a),
        _ => false,
    };
    if !(here && same_device && bias_f32) || (dev.is_cuda() && !d.is_multiple_of(4)) {
        return Ok(None);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let aligned = |t: &Tensor| super::starts_aligned(t, 4);
    if dev.is_cuda() && !(aligned(&a) && aligned(&b) && bias.as_ref().is_none_or(aligned)) {
        return Ok(None);
    }
    Ok(Some((a, b, bias)))
}

struct ResidualAdd {
    has_bias: bool,
}

impl CustomOp3 for ResidualAdd {
    fn name(&self) -> &'static str {
        "cim-residual-add"
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
        let (a, b) = (slice(s1, l1, "a")?, slice(s2, l2, "b")?);
        let bias = match self.has_bias {
            true => Some(slice(s3, l3, "bias")?),
            false => None,
        };
        let d = *l1.shape().dims().last().unwrap_or(&1);
        let mut y = vec![0f32; a.len()];
        let chunk = d.max(1) * CHUNK_ROWS;
        y.par_chunks_mut(chunk)
            .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
            .for_each(|(y, (a, b))| match bias {
                Some(bias) => {
                    for ((yr, ar), br) in y
                        .chunks_exact_mut(d)
                        .zip(a.chunks_exact(d))
                        .zip(b.chunks_exact(d))
                    {
                        for j in 0..d {
                            yr[j] = ar[j] + (br[j] + bias[j]);
                        }
                    }
                }
                None => {
                    for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
                        *y = a + b;
                    }
                }
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
        super::cuda::residual_add((s1, l1), (s2, l2), (s3, l3), self.has_bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};

    /// The fused CPU pass against the composed ops, with and without a bias, at a ViT width and
    /// an odd one (the CPU kernel takes any width).
    #[test]
    fn fused_matches_composed() -> Result<()> {
        for (rows, d) in [(2 * 197, 768), (7, 13)] {
            let a = randn(&[rows, d], 1);
            let b = randn(&[rows, d], 2);
            let bias = randn(&[d], 3);
            for with_bias in [false, true] {
                let bias = with_bias.then_some(&bias);
                let got = residual_add(&a, &b, bias)?;
                let want = residual_add_composed(&a, &b, bias)?;
                assert_eq!(got.dims(), a.dims());
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-6, "{rows}x{d} bias={with_bias}: {diff}");
            }
        }
        // A view: the fused op reads it through a contiguous copy.
        let a = randn(&[6, 8], 4);
        let bt = randn(&[8, 6], 5).t()?;
        let diff = max_diff(
            &residual_add(&a, &bt, None)?,
            &residual_add_composed(&a, &bt, None)?,
        );
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    /// Known values: `a + (b + bias)` per row.
    #[test]
    fn known_values() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let b = Tensor::new(&[[10f32, 20.0], [30.0, 40.0]], &dev)?;
        let bias = Tensor::new(&[0.5f32, -0.5], &dev)?;
        let y = residual_add(&a, &b, Some(&bias))?.to_vec2::<f32>()?;
        assert_eq!(y, vec![vec![11.5, 21.5], vec![33.5, 43.5]]);
        let y = residual_add(&a, &b, None)?.to_vec2::<f32>()?;
        assert_eq!(y, vec![vec![11.0, 22.0], vec![33.0, 44.0]]);
        Ok(())
    }

    /// Mismatched shapes are errors that name both shapes.
    #[test]
    fn shape_errors_name_the_shapes() {
        let a = randn(&[4, 6], 6);
        let e = residual_add(&a, &randn(&[4, 5], 7), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 5]") && e.contains("[4, 6]"), "{e}");
        let e = residual_add(&a, &a, Some(&randn(&[5], 8)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("wants (6,)"), "{e}");
    }
}
