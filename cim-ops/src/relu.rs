//! ReLU with a one-pass backward, for the ResNet-50 enhancer where its ReLUs are not part of a
//! BatchNorm node (`batch_norm_train_tail`, which a training step uses for all 49): evaluation, and
//! the composed fallback.
//!
//! candle's ReLU backward is four ops — a zero tensor, `x ≥ 0`, a cast of that mask, a product —
//! each a full pass over the activation, and candle then adds the result to a zero-initialised
//! gradient (two more): at batch 128 about 30 GB of traffic a ResNet-50 step, by a count of its
//! activations. Here the forward is one kernel, run as the grafted node's own forward (no copy),
//! and the backward one kernel `dx = dy · [x > 0]` reading the kept input (the mask `y > 0` of
//! PyTorch's rule, which gives no gradient at `x = 0`; candle's passes it there). candle's zero
//! tensor and add for the node's input remain: three passes instead of six.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::slice;
use crate::Result;

/// `max(x, 0)`, differentiable. f32 on the CPU and f32 or bf16 on CUDA with the kernels on (a
/// multiple of 4 elements, aligned views) run the fused kernels; elsewhere candle's `relu`.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    let here = match x.dtype() {
        DType::F32 => super::fusable_device(x),
        DType::BF16 => super::kernels_on_cuda(x),
        _ => false,
    };
    let x = if here { x.contiguous()? } else { x.clone() };
    let cuda_ok =
        !x.device().is_cuda() || (x.elem_count().is_multiple_of(4) && super::starts_aligned(&x, 4));
    if !(here && cuda_ok) {
        return x.relu();
    }
    let xd = x.detach();
    // The forward kernel runs as the node's forward; the backward reads the node's output, which
    // the closure cannot see, so it recomputes the mask from x (one pass, the same kernel shape).
    let out = super::Output::Op2(Box::new(Relu { backward: false }), [xd.clone(), xd.clone()]);
    super::with_backward(&[&x], out, move |dy| {
        let dy = dy.contiguous()?;
        Ok(vec![Some(
            xd.apply_op2_no_bwd(&dy, &Relu { backward: true })?,
        )])
    })
}

/// Forward `max(a, 0)` (the second input unused), or backward `b · [a > 0]` with `a` the input
/// (or output: the mask is the same) and `b` the upstream gradient.
struct Relu {
    backward: bool,
}

impl CustomOp2 for Relu {
    fn name(&self) -> &'static str {
        "cim-relu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "relu input")?;
        let mut out = vec![0f32; x.len()];
        const CHUNK: usize = 1 << 14;
        if self.backward {
            let g = slice(s2, l2, "relu gradient")?;
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
                .for_each(|(o, (x, g))| {
                    for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                        *o = if x > 0.0 { g } else { 0.0 };
                    }
                });
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, x)| {
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = x.max(0.0);
                    }
                });
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::relu((s1, l1), self.backward.then_some((s2, l2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and gradients against candle's `relu`, bit for bit, except the gradient at an exact
    /// 0, which follows PyTorch (none) where candle passes it.
    #[test]
    fn relu_matches_candle_with_pytorchs_gradient_at_zero() -> Result<()> {
        let dev = Device::Cpu;
        let mut v: Vec<f32> = (0..4096)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        v[17] = 0.0;
        v[18] = -0.0;
        let x = Var::from_tensor(&Tensor::from_vec(v.clone(), (4, 16, 8, 8), &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (4, 16, 8, 8), &dev)?;
        let y = relu(x.as_tensor())?;
        let want = x.as_tensor().relu()?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            want.flatten_all()?.to_vec1::<f32>()?
        );
        let g = (&y * &up)?.sum_all()?.backward()?;
        let got: Vec<f32> = g.get(&x).unwrap().flatten_all()?.to_vec1()?;
        let ups: Vec<f32> = up.flatten_all()?.to_vec1()?;
        for (i, (&xi, (&gi, &ui))) in v.iter().zip(got.iter().zip(&ups)).enumerate() {
            let want = if xi > 0.0 { ui } else { 0.0 };
            assert_eq!(gi.to_bits(), want.to_bits(), "element {i}: x = {xi}");
        }
        // candle's own rule differs exactly at x = 0.
        let g0 = (&want * &up)?.sum_all()?.backward()?;
        let candle0: Vec<f32> = g0.get(&x).unwrap().flatten_all()?.to_vec1()?;
        assert_eq!(candle0[17], ups[17]);
        assert_eq!(got[17], 0.0);
        Ok(())
    }
}
