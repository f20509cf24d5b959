//! Custom backward passes for any function: compute the output without recording anything, then
//! graft it onto the graph as ONE node whose backward is a closure.
//!
//! candle's backward pays for every recorded op: each input gradient starts as a zero tensor that
//! the op's gradient is added to (a memset and a full add), `narrow` pads its gradient back to full
//! size, and dtype casts are ops of their own. An H200 profile of ViT-B/16 RESPIX in bf16 spent
//! half of the step in candle's additions. A sub-graph with a known backward (attention, a
//! mixed-precision LayerNorm, a conv's im2col backward) is cheaper as one node.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::Result;

/// The backward of a grafted node: the output gradient in, one gradient per input out (`None`
/// for inputs that need none).
pub type BackwardFn = dyn Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync;

/// `out` as a function of `inputs` (1 to 3 tensors) in the graph, with `backward` as its gradient.
/// `out` must have been computed from detached inputs (nothing recorded) and be a fresh contiguous
/// tensor; the node's forward copies it once. Without tracked inputs `out` comes back as is.
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// # fn main() -> cim_api::Result<()> {
/// // y = x² with a hand-written backward 2·x·dy.
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let xd = x.as_tensor().detach();
/// let y = cim_api::ops::with_backward(&[x.as_tensor()], xd.sqr()?, move |dy| {
///     Ok(vec![Some(((&xd * 2.0)? * dy)?)])
/// })?;
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, [2., 4., 6.]);
/// # Ok(()) }
/// ```
pub fn with_backward(
    inputs: &[&Tensor],
    out: Tensor,
    backward: impl Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !(1..=3).contains(&inputs.len()) {
        return Err(crate::Error::msg(format!(
            "with_backward takes 1 to 3 inputs, got {}",
            inputs.len()
        )));
    }
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(out);
    }
    let op = Graft {
        out: std::sync::Mutex::new(Some(out)),
        backward: Box::new(backward),
        inputs: inputs.len(),
    };
    Ok(match inputs {
        [a] => a.apply_op1(op)?,
        [a, b] => a.apply_op2(b, op)?,
        [a, b, c] => a.apply_op3(b, c, op)?,
        _ => unreachable!("the input count was checked above"),
    })
}

struct Graft {
    /// The precomputed output until the node's forward copies it; then dropped, so the graph keeps
    /// only the node's own output, not a second copy.
    out: std::sync::Mutex<Option<Tensor>>,
    backward: Box<BackwardFn>,
    inputs: usize,
}

impl Graft {
    fn take_out(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("grafted output lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("grafted output already consumed".into()))
    }
    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (s, l) = out.storage_and_layout();
        match &*s {
            Storage::Cpu(s) => copy_fresh(s, l, "grafted output"),
            _ => candle_core::bail!("grafted output is not on the CPU"),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take_out()?;
        let (s, l) = out.storage_and_layout();
        match &*s {
            Storage::Cuda(s) => copy_fresh(s, l, "grafted output"),
            _ => candle_core::bail!("grafted output is not on a CUDA device"),
        }
    }
    fn grads(&self, dy: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut g = (self.backward)(dy)?;
        if g.len() != self.inputs {
            candle_core::bail!(
                "grafted backward returned {} gradients for {} inputs",
                g.len(),
                self.inputs
            );
        }
        g.resize(3, None);
        Ok(g)
    }
}

/// A copy of the precomputed output's storage: the node's forward. The output must be fresh (its
/// own contiguous storage from offset 0), which every computation's result is.
fn copy_fresh<S: candle_core::backend::BackendStorage>(
    s: &S,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{what}: expected a freshly computed contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp1 for Graft {
    fn name(&self) -> &'static str {
        "cim-graft"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.grads(dy)?.swap_remove(0))
    }
}

impl CustomOp2 for Graft {
    fn name(&self) -> &'static str {
        "cim-graft"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Graft {
    fn name(&self) -> &'static str {
        "cim-graft"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    /// Three inputs, one of them without gradient: the grafted node's gradients are the closure's,
    /// and equal the recorded ops' for the same function.
    #[test]
    fn grafted_gradients_match_the_recorded_ones() -> Result<()> {
        let a = Var::from_tensor(&randn(&[4, 5], 1))?;
        let b = Var::from_tensor(&randn(&[4, 5], 2))?;
        let c = Var::from_tensor(&randn(&[4, 5], 3))?;
        let f = |a: &Tensor, b: &Tensor, c: &Tensor| -> candle_core::Result<Tensor> {
            (a * b)? + c.sin()?
        };
        let (ad, bd, cd) = (a.detach(), b.detach(), c.detach());
        let out = f(&ad, &bd, &cd)?;
        let y = with_backward(&[&a, &b, &c], out, move |dy| {
            Ok(vec![Some((dy * &bd)?), Some((dy * &ad)?), None])
        })?;
        let want = f(&a, &b, &c)?;
        assert!(max_diff(&y, &want) == 0.0);
        let up = randn(&[4, 5], 4);
        let gy = (&y * &up)?.sum_all()?.backward()?;
        let gw = (&want * &up)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            assert!(max_diff(gy.get(v).unwrap(), gw.get(v).unwrap()) < 1e-6);
        }
        assert!(gy.get(&c).is_none(), "the closure gave c no gradient");
        // Untracked inputs: the output itself; a wrong gradient count is an error.
        let plain = with_backward(&[&randn(&[2], 5)], randn(&[2], 6), |_| Ok(vec![]))?;
        assert!(!plain.track_op());
        let bad = with_backward(&[&a], randn(&[4, 5], 7), |_| Ok(vec![]))?;
        let e = bad.sum_all()?.backward().unwrap_err().to_string();
        assert!(e.contains("returned 0 gradients for 1 inputs"), "{e}");
        let e = with_backward(&[], randn(&[1], 8), |_| Ok(vec![])).unwrap_err();
        assert!(e.to_string().contains("1 to 3 inputs"), "{e}");
        Ok(())
    }
}
