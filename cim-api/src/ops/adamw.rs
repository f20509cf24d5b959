//! AdamW, fused: two in-place kernels per parameter instead of ~12 allocating ones.
//!
//! The moments of a parameter live in one `(2, n)` f32 tensor `[m; v]`. [`adamw_update`] runs
//! one kernel updating both moments from the (clip-scaled) gradient, and one updating the parameter
//! in place: decoupled weight decay, then the bias-corrected step. Nothing is allocated, and the
//! parameter's storage is written where it is, so every module holding the parameter sees it.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use super::is_fusable;
use crate::Result;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// The scalars of one AdamW update of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate of this parameter (schedule × layer scale).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of this parameter (0 for biases, norms, tokens).
    pub weight_decay: f64,
    /// Step number, from 1 (bias correction).
    pub t: u64,
    /// Multiplier of the gradient (global-norm clipping).
    pub grad_scale: f64,
}

impl AdamStep {
    fn bias_corrections(&self) -> (f32, f32) {
        let t = self.t.min(i32::MAX as u64) as i32;
        (
            (1.0 - self.beta1.powi(t)) as f32,
            (1.0 - self.beta2.powi(t)) as f32,
        )
    }
}

/// Updates `moments` `(2, n)` and `param` (n elements) in place from `grad`. Returns `false`,
/// touching nothing, when the fused kernels do not apply (not all f32 and contiguous, or CUDA
/// kernels off); the caller then composes the same update from candle ops.
pub fn adamw_update(param: &Tensor, moments: &Tensor, grad: &Tensor, s: &AdamStep) -> Result<bool> {
    let n = param.elem_count();
    if !is_fusable(&[param, moments, grad])
        || !param.is_contiguous()
        || !moments.is_contiguous()
        || moments.dims() != [2, n]
        || grad.elem_count() != n
    {
        return Ok(false);
    }
    let grad = grad.contiguous()?;
    let (bc1, bc2) = s.bias_corrections();
    moments.inplace_op2(
        &grad,
        &MomentsOp {
            beta1: s.beta1 as f32,
            beta2: s.beta2 as f32,
            scale: s.grad_scale as f32,
        },
    )?;
    param.inplace_op2(
        moments,
        &ApplyOp {
            lr: s.lr as f32,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            bc1,
            bc2,
            eps: s.eps as f32,
        },
    )?;
    Ok(true)
}

/// The same update from candle ops, returning the new `(param, moments)` (the reference of the
/// fused kernels, and the path for other dtypes/devices).
pub fn adamw_composed(
    param: &Tensor,
    moments: &Tensor,
    grad: &Tensor,
    s: &AdamStep,
) -> Result<(Tensor, Tensor)> {
    let shape = param.shape();
    let g = (grad.to_dtype(DType::F32)?.flatten_all()? * s.grad_scale)?;
    let (m, v) = (moments.get(0)?, moments.get(1)?);
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let (bc1, bc2) = s.bias_corrections();
    let update = ((&m / bc1 as f64)? / ((&v / bc2 as f64)?.sqrt()? + s.eps)?)?;
    let p = (param.flatten_all()? * (1.0 - s.lr * s.weight_decay))?;
    let p = (p - (update * s.lr)?)?.reshape(shape)?;
    Ok((p, Tensor::stack(&[m, v], 0)?))
}

fn contiguous(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} must be contiguous")).bt())
}

struct MomentsOp {
    beta1: f32,
    beta2: f32,
    scale: f32,
}

impl InplaceOp2 for MomentsOp {
    fn name(&self) -> &'static str {
        "cim-adamw-moments"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (a, b) = contiguous(l1, "moments")?;
        let (ga, gb) = contiguous(l2, "gradient")?;
        let g = &s2.as_slice::<f32>()?[ga..gb];
        let mv = match s1 {
            CpuStorage::F32(v) => &mut v[a..b],
            _ => candle_core::bail!("adamw: moments must be f32"),
        };
        let (m, v) = mv.split_at_mut(g.len());
        let (b1, b2, k) = (self.beta1, self.beta2, self.scale);
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((m, v), g)| {
                for i in 0..g.len() {
                    let gi = g[i] * k;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                }
            });
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::adamw_moments(s1, l1, s2, l2, self.beta1, self.beta2, self.scale)
    }
}

struct ApplyOp {
    lr: f32,
    /// `1 − lr · weight_decay`.
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
}

impl InplaceOp2 for ApplyOp {
    fn name(&self) -> &'static str {
        "cim-adamw-apply"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (a, b) = contiguous(l1, "parameter")?;
        let (ma, mb) = contiguous(l2, "moments")?;
        let p = match s1 {
            CpuStorage::F32(v) => &mut v[a..b],
            _ => candle_core::bail!("adamw: parameter must be f32"),
        };
        let (m, v) = s2.as_slice::<f32>()?[ma..mb].split_at(p.len());
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                for i in 0..p.len() {
                    let update = (m[i] / self.bc1) / ((v[i] / self.bc2).sqrt() + self.eps);
                    p[i] = p[i] * self.decay - self.lr * update;
                }
            });
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::adamw_apply(
            s1, l1, s2, l2, self.lr, self.decay, self.bc1, self.bc2, self.eps,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::randn;
    use candle_core::Device;

    #[test]
    fn fused_adamw_matches_composed_over_several_steps() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17; // several parallel chunks and a ragged tail
        let p0 = randn(&[3, n / 3 + 1], 1).narrow(1, 0, n / 3)?;
        let p0 = p0.contiguous()?;
        let n = p0.elem_count();
        let fused_p = p0.copy()?;
        let fused_mv = Tensor::zeros((2, n), DType::F32, &dev)?;
        let (mut ref_p, mut ref_mv) = (p0.copy()?, fused_mv.copy()?);
        for t in 1..=4u64 {
            let g = randn(p0.dims(), 10 + t);
            let s = AdamStep {
                lr: 0.01 * t as f64,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-8,
                weight_decay: 0.05,
                t,
                grad_scale: 0.7,
            };
            assert!(adamw_update(&fused_p, &fused_mv, &g, &s)?);
            (ref_p, ref_mv) = adamw_composed(&ref_p, &ref_mv, &g, &s)?;
        }
        let dp = (&fused_p - &ref_p)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let dm = (&fused_mv - &ref_mv)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        // f32 rounding only (the composed path multiplies by f64 scalars): |p| ≤ 2.
        assert!(dp < 4e-6 && dm < 1e-6, "param {dp}, moments {dm}");
        // Adam moves a coordinate by ~lr per step (0.01 … 0.04 here), whatever the gradient scale.
        let moved = (&fused_p - &p0)?.abs()?.mean_all()?.to_scalar::<f32>()?;
        assert!(moved > 0.01, "mean move {moved}");
        Ok(())
    }

    #[test]
    fn unfusable_inputs_are_left_alone() -> Result<()> {
        let p = Tensor::ones((4, 4), DType::F64, &Device::Cpu)?;
        let mv = Tensor::zeros((2, 16), DType::F64, &Device::Cpu)?;
        let s = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 1,
            grad_scale: 1.0,
        };
        assert!(!adamw_update(&p, &mv, &p, &s)?);
        assert_eq!(p.sum_all()?.to_scalar::<f64>()?, 16.0);
        Ok(())
    }
}
