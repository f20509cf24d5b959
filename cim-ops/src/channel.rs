//! Per-channel bias on NCHW maps, fused with a scaled residual and a ReLU: the epilogue of a
//! convolution, `y = act(r + g·(x + b[c]))`.
//!
//! Composed, the dVAE's `conv + bias → relu` is two passes over the map with candle's broadcast add
//! (which indexes every element through its strides), and a residual block's last conv
//! `id + g·(conv + b)` three. On an H200 those passes over the frozen dVAE's f32 maps (up to
//! 1.6 GB each at batch 128) cost more than its convolutions. Fused: one pass, four elements per
//! CUDA thread. The backward (for trainable uses) is composed from the output's ReLU mask. On
//! CUDA the kernel also takes bf16 or f16 maps (all inputs of one dtype, untracked: the dVAE in
//! reduced precision), computing in f32 and rounding once.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, slice};
use crate::{Error, Result};

/// `act(r + gain·(x + b[c]))` for `x` `(B, C, H, W)`, `b` `(C)`, `r` (optional) shaped like `x`;
/// `act` is ReLU when `relu`, the identity otherwise. Fused for f32 on the CPU and (kernels on,
/// `H·W` a multiple of 4) on CUDA; composed from candle ops otherwise.
pub fn channel_bias(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    relu: bool,
) -> Result<Tensor> {
    channel_bias_in(x, b, residual, gain, relu, false)
}

/// [`channel_bias`] on a channels-last map `x` `(B, H, W, C)` (the dVAE on cuDNN's NHWC
/// convolutions); on CUDA the kernel needs `B·H·W·C` to be a multiple of 4.
pub fn channel_bias_nhwc(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    relu: bool,
) -> Result<Tensor> {
    channel_bias_in(x, b, residual, gain, relu, true)
}

fn channel_bias_in(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    relu: bool,
    nhwc: bool,
) -> Result<Tensor> {
    let op = ChannelBias {
        gain: gain as f32,
        relu,
        pair: false,
        nhwc,
    };
    let Some((x, b, r)) = fused_inputs(x, b, residual, nhwc)? else {
        return composed(x, b, residual, gain, relu, nhwc);
    };
    Ok(match &r {
        Some(r) => x.apply_op3(&b, r, op)?,
        None => x.apply_op2(&b, op)?,
    })
}

/// `y = r + gain·(x + b[c])` and `relu(y)` from one pass (shapes as [`channel_bias`]): the output
/// of a frozen residual block and the input of the next block's residual path, which starts with
/// a ReLU — one pass instead of a second one reading `y` back. Forward only: where an input tracks
/// gradients (or the fused kernels do not apply) it is `channel_bias` followed by `relu`.
pub fn channel_bias_and_relu(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
) -> Result<(Tensor, Tensor)> {
    channel_bias_and_relu_in(x, b, residual, gain, false)
}

/// [`channel_bias_and_relu`] on a channels-last map `x` `(B, H, W, C)`.
pub fn channel_bias_and_relu_nhwc(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
) -> Result<(Tensor, Tensor)> {
    channel_bias_and_relu_in(x, b, residual, gain, true)
}

fn channel_bias_and_relu_in(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    nhwc: bool,
) -> Result<(Tensor, Tensor)> {
    let tracked = x.track_op() || b.track_op() || residual.is_some_and(|r| r.track_op());
    let fused = match tracked {
        true => None,
        false => fused_inputs(x, b, residual, nhwc)?,
    };
    let Some((x, b, r)) = fused else {
        let y = channel_bias_in(x, b, residual, gain, false, nhwc)?;
        let yr = y.relu()?;
        return Ok((y, yr));
    };
    let op = ChannelBias {
        gain: gain as f32,
        relu: false,
        pair: true,
        nhwc,
    };
    let both = match &r {
        Some(r) => x.apply_op3_no_bwd(&b, r, &op)?,
        None => x.apply_op2_no_bwd(&b, &op)?,
    };
    Ok((both.get(0)?, both.get(1)?))
}

/// Checks the shapes; the contiguous inputs when the fused kernel applies, `None` when the
/// composed ops must run.
fn fused_inputs(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    nhwc: bool,
) -> Result<Option<(Tensor, Tensor, Option<Tensor>)>> {
    let (d0, d1, d2, d3) = x.dims4().map_err(|_| {
        let want = if nhwc { "(B, H, W, C)" } else { "(B, C, H, W)" };
        Error::msg(format!(
            "channel_bias: x must be {want}, got {:?}",
            x.dims()
        ))
    })?;
    // Channels, and the elements the CUDA kernel's 4-element words must not straddle a channel
    // in (channels first: a plane; channels last: each element has its own channel).
    let (c, unit) = match nhwc {
        true => (d3, d0 * d1 * d2 * d3),
        false => (d1, d2 * d3),
    };
    if b.dims() != [c] {
        return Err(Error::msg(format!(
            "channel_bias: bias {:?} does not match the {c} channels of x {:?}",
            b.dims(),
            x.dims()
        )));
    }
    if let Some(r) = residual {
        if r.dims() != x.dims() {
            return Err(Error::msg(format!(
                "channel_bias: residual {:?} differs from x {:?}",
                r.dims(),
                x.dims()
            )));
        }
    }
    let mut all = vec![x, b];
    all.extend(residual);
    let on_cuda = x.device().is_cuda();
    // bf16 or f16 (the frozen dVAE in reduced precision): the CUDA kernel, for inputs of one
    // dtype that track no gradient.
    let half = super::kernels_on_cuda(x)
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && all
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.device().is_cuda() && !t.track_op());
    if !(is_fusable(&all) || half) || (on_cuda && unit % 4 != 0) {
        return Ok(None);
    }
    let (x, b) = (x.contiguous()?, b.contiguous()?);
    let r = residual.map(|r| r.contiguous()).transpose()?;
    let aligned = |t: &Tensor| super::starts_aligned(t, 4);
    if on_cuda && !(aligned(&x) && r.as_ref().is_none_or(aligned)) {
        return Ok(None);
    }
    Ok(Some((x, b, r)))
}

/// [`channel_bias`] from candle ops (the reference of the fused kernels).
pub fn channel_bias_composed(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    relu: bool,
) -> Result<Tensor> {
    composed(x, b, residual, gain, relu, false)
}

fn composed(
    x: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    gain: f64,
    relu: bool,
    nhwc: bool,
) -> Result<Tensor> {
    let c = b.dim(0)?;
    let shape = if nhwc { (1, 1, 1, c) } else { (1, c, 1, 1) };
    let mut y = x.broadcast_add(&b.to_dtype(x.dtype())?.reshape(shape)?)?;
    if gain != 1.0 {
        y = (y * gain)?;
    }
    if let Some(r) = residual {
        y = (y + r)?;
    }
    Ok(if relu { y.relu()? } else { y })
}

#[derive(Clone, Copy)]
struct ChannelBias {
    gain: f32,
    relu: bool,
    /// Output `(2, B, C, H, W)`: `y`, then `relu(y)` ([`channel_bias_and_relu`]; forward only).
    pair: bool,
    /// Channels last: `(B, H, W, C)`.
    nhwc: bool,
}

impl ChannelBias {
    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        b: (&CpuStorage, &Layout),
        r: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = slice(x.0, x.1, "x")?;
        let bs = slice(b.0, b.1, "bias")?;
        let rs = r.map(|(s, l)| slice(s, l, "residual")).transpose()?;
        let (d0, d1, d2, d3) = x.1.shape().dims4()?;
        // Channels first: work items are channel planes (one bias each); channels last: runs of
        // pixels (`CL_PIXELS` rows of `c`), the bias indexed by the element.
        const CL_PIXELS: usize = 64;
        let (c, hw) = match self.nhwc {
            true => (d3, d3 * CL_PIXELS),
            false => (d1, d2 * d3),
        };
        let (g, relu, nhwc) = (self.gain, self.relu, self.nhwc);
        let n = xs.len();
        let mut y = vec![0f32; if self.pair { 2 * n } else { n }];
        let (first, second) = y.split_at_mut(n);
        let planes = first.par_chunks_mut(hw).zip(xs.par_chunks(hw)).enumerate();
        let epilogue = |p: usize, yp: &mut [f32], xp: &[f32]| {
            let plane_bias = bs[p % c];
            let rp = rs.map(|r| &r[p * hw..p * hw + yp.len()]);
            for (i, (o, &v)) in yp.iter_mut().zip(xp).enumerate() {
                let bc = if nhwc { bs[i % c] } else { plane_bias };
                let mut z = g * (v + bc);
                if let Some(rp) = rp {
                    z += rp[i];
                }
                *o = if relu { z.max(0.0) } else { z };
            }
        };
        if self.pair {
            planes
                .zip(second.par_chunks_mut(hw))
                .for_each(|((p, (yp, xp)), rp)| {
                    epilogue(p, yp, xp);
                    for (o, &v) in rp.iter_mut().zip(yp.iter()) {
                        *o = v.max(0.0);
                    }
                });
            return Ok((CpuStorage::F32(y), Shape::from((2, d0, d1, d2, d3))));
        }
        planes.for_each(|(p, (yp, xp))| epilogue(p, yp, xp));
        Ok((CpuStorage::F32(y), x.1.shape().clone()))
    }

    /// `(dx, db, dr)` from the output and its gradient.
    fn grads(&self, y: &Tensor, dy: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        if self.pair {
            candle_core::bail!("channel_bias_and_relu has no backward (frozen networks only)");
        }
        let dz = if self.relu {
            (dy * y.gt(0.0)?.to_dtype(DType::F32)?)?
        } else {
            dy.clone()
        };
        let g = self.gain as f64;
        let db = match self.nhwc {
            true => (dz.sum((0, 1, 2))? * g)?,
            false => (dz.sum((0, 2, 3))? * g)?,
        };
        Ok(((&dz * g)?, db, dz))
    }
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "cim-channel-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let flags = (self.relu, self.pair, self.nhwc);
        super::cuda::channel_bias((s1, l1), (s2, l2), None, self.gain, flags)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db, _) = self.grads(y, dy)?;
        Ok((Some(dx), Some(db)))
    }
}

impl CustomOp3 for ChannelBias {
    fn name(&self) -> &'static str {
        "cim-channel-bias-residual"
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
        self.cpu((s1, l1), (s2, l2), Some((s3, l3)))
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
        super::cuda::channel_bias(
            (s1, l1),
            (s2, l2),
            Some((s3, l3)),
            self.gain,
            (self.relu, self.pair, self.nhwc),
        )
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _r: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, db, dr) = self.grads(y, dy)?;
        Ok((Some(dx), Some(db), Some(dr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{bits, max_diff, randn};
    use candle_core::Var;

    /// Every combination of residual / ReLU / gain: values and all gradients against the composed
    /// ops, on an odd plane size.
    #[test]
    fn matches_composed_values_and_gradients() -> Result<()> {
        for (i, &(res, relu, gain)) in [
            (false, true, 1.0),
            (false, false, 1.0),
            (true, false, 1.0 / 64.0),
            (true, true, 0.5),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&randn(&[2, 3, 5, 7], 1 + i as u64))?;
            let b = Var::from_tensor(&randn(&[3], 11 + i as u64))?;
            let r = Var::from_tensor(&randn(&[2, 3, 5, 7], 21 + i as u64))?;
            let up = randn(&[2, 3, 5, 7], 31 + i as u64);
            let rr = res.then(|| r.as_tensor());
            let fused = channel_bias(&x, &b, rr, gain, relu)?;
            let want = channel_bias_composed(&x, &b, rr, gain, relu)?;
            assert!(max_diff(&fused, &want) < 1e-6, "case {i} value");
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gw = (want * &up)?.sum_all()?.backward()?;
            let mut vars = vec![("dx", &x), ("db", &b)];
            if res {
                vars.push(("dr", &r));
            }
            for (what, v) in vars {
                let d = max_diff(gf.get(v).unwrap(), gw.get(v).unwrap());
                assert!(d < 1e-5, "case {i}: {what} differs by {d}");
            }
        }
        Ok(())
    }

    /// The pair is `(channel_bias(…, relu = false), its ReLU)` exactly, with and without a
    /// residual; a tracked input takes the composed path and keeps its gradient.
    /// Channels last: the values of the channels-first op on the transposed map, bit for bit
    /// (the same arithmetic per element), more than one 64-pixel work item and a short last one;
    /// gradients through the fused node equal the composed ones; the pair form likewise.
    #[test]
    fn channels_last_matches_channels_first() -> Result<()> {
        let nhwc = |t: &Tensor| t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        for (i, &(res, relu, gain)) in [(false, true, 1.0), (true, false, 0.25)].iter().enumerate()
        {
            let x = randn(&[2, 5, 9, 11], 71 + i as u64);
            let b = randn(&[5], 81 + i as u64);
            let r = randn(&[2, 5, 9, 11], 91 + i as u64);
            let rr = res.then_some(&r);
            let want = nhwc(&channel_bias(&x, &b, rr, gain, relu)?);
            let rl = rr.map(nhwc);
            let got = channel_bias_nhwc(&nhwc(&x), &b, rl.as_ref(), gain, relu)?;
            assert_eq!(got.dims(), [2, 9, 11, 5]);
            assert_eq!(bits(&got), bits(&want), "case {i}");
            let (y, yr) = channel_bias_and_relu_nhwc(&nhwc(&x), &b, rl.as_ref(), gain)?;
            let plain = nhwc(&channel_bias(&x, &b, rr, gain, false)?);
            assert_eq!(bits(&y), bits(&plain), "case {i} pair value");
            assert_eq!(bits(&yr), bits(&plain.relu()?), "case {i} pair relu");
            // Gradients: the fused node against the composed channels-last ops.
            let xv = Var::from_tensor(&nhwc(&x))?;
            let bv = Var::from_tensor(&b)?;
            let up = nhwc(&randn(&[2, 5, 9, 11], 101 + i as u64));
            let fused = channel_bias_nhwc(&xv, &bv, rl.as_ref(), gain, relu)?;
            let comp = composed(&xv, &bv, rl.as_ref(), gain, relu, true)?;
            assert!(max_diff(&fused, &comp) < 1e-6);
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gc = (comp * &up)?.sum_all()?.backward()?;
            for (what, v) in [("dx", &xv), ("db", &bv)] {
                let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-5, "case {i}: {what} differs by {d}");
            }
        }
        let e = channel_bias_nhwc(&randn(&[2, 3], 1), &randn(&[3], 2), None, 1.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(B, H, W, C)"), "{e}");
        Ok(())
    }

    #[test]
    fn pair_is_the_value_and_its_relu() -> Result<()> {
        for (i, res) in [false, true].into_iter().enumerate() {
            let x = randn(&[2, 3, 5, 7], 41 + i as u64);
            let b = randn(&[3], 51 + i as u64);
            let r = randn(&[2, 3, 5, 7], 61 + i as u64);
            let rr = res.then_some(&r);
            let (y, yr) = channel_bias_and_relu(&x, &b, rr, 0.25)?;
            let want = channel_bias(&x, &b, rr, 0.25, false)?;
            assert_eq!((y.dims(), yr.dims()), (x.dims(), x.dims()));
            assert_eq!(bits(&y), bits(&want), "case {i} value");
            assert_eq!(bits(&yr), bits(&want.relu()?), "case {i} relu");
            assert!(y.is_contiguous() && yr.is_contiguous());
        }
        let xv = Var::from_tensor(&randn(&[1, 2, 2, 2], 3))?;
        let (y, yr) = channel_bias_and_relu(&xv, &randn(&[2], 4), None, 1.0)?;
        let g = (y + yr)?.sum_all()?.backward()?;
        assert!(g.get(&xv).is_some(), "tracked input keeps its gradient");
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let x = randn(&[1, 3, 2, 2], 1);
        let e = channel_bias(&x, &randn(&[4], 2), None, 1.0, false).unwrap_err();
        assert!(
            e.to_string().contains("does not match the 3 channels"),
            "{e}"
        );
        let r = randn(&[1, 3, 2, 3], 3);
        let e = channel_bias(&x, &randn(&[3], 2), Some(&r), 1.0, false).unwrap_err();
        assert!(e.to_string().contains("residual [1, 3, 2, 3]"), "{e}");
        let e = channel_bias(&randn(&[3, 4], 1), &randn(&[4], 2), None, 1.0, false).unwrap_err();
        assert!(e.to_string().contains("(B, C, H, W)"), "{e}");
    }
}
