//! BatchNorm in training mode (batch statistics), fused.
//!
//! Composed, a training BatchNorm is ~10 kernels forward — three reductions for the mean, a
//! subtraction, a square, three more reductions, the normalisation and the affine — and autograd
//! keeps about six activation-sized intermediates per layer for the backward. ResNet-50 has 53 of
//! them, which is where its memory goes. Here the statistics are one reduction ([`channel_moments`],
//! no gradient), the normalisation one kernel ([`batch_norm_train`]) that keeps nothing but its
//! input, and the backward a reduction giving `dγ`, `dβ` and one elementwise kernel giving `dx`,
//! with the gradient through the batch statistics folded in:
//! `dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))` per channel. On CUDA the reductions run on a
//! grid of (channel, chunk of planes) blocks with f64 partial sums added in a fixed order (since
//! session 11; one block per channel before), and the kernels also take bf16 maps.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, slice};
use crate::Result;

/// Per-channel `[mean; biased variance]` `(2, C)` of `x` `(B, C, H, W)`. No gradient. `None` when
/// the fused kernels do not apply (f32 on the CPU; f32 or bf16 on CUDA with the kernels on).
pub fn channel_moments(x: &Tensor) -> Result<Option<Tensor>> {
    moments_in(x, false)
}

/// [`channel_moments`] of a channels-last map `x` `(B, H, W, C)`.
pub fn channel_moments_nhwc(x: &Tensor) -> Result<Option<Tensor>> {
    moments_in(x, true)
}

fn moments_in(x: &Tensor, last: bool) -> Result<Option<Tensor>> {
    if !(is_fusable(&[x]) || bf16_on_cuda(x)) || x.rank() != 4 {
        return Ok(None);
    }
    Ok(Some(
        x.detach()
            .contiguous()?
            .apply_op1_no_bwd(&MomentsOp { last })?,
    ))
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` per channel, with `stats` = [`channel_moments`]
/// of this same `x` (the backward differentiates through them). `x` `(B, C, H, W)`; `weight`,
/// `bias` `(C,)`. Falls back to the composed ops where the fused kernels do not apply.
pub fn batch_norm_train(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    train_in(x, stats, weight, bias, eps, false)
}

/// [`batch_norm_train`] of a channels-last map `x` `(B, H, W, C)`, `stats` from
/// [`channel_moments_nhwc`].
pub fn batch_norm_train_nhwc(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    train_in(x, stats, weight, bias, eps, true)
}

fn train_in(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    last: bool,
) -> Result<Tensor> {
    let fused = is_fusable(&[x, stats, weight, bias])
        || (bf16_on_cuda(x) && is_fusable(&[stats, weight, bias]));
    if fused && x.rank() == 4 {
        // One grafted node over (x, γ, β): the normalisation kernel is its forward (no copy), the
        // two backward kernels its backward; under a GradSink γ and β skip candle's graph.
        let eps = eps as f32;
        let xd = x.detach().contiguous()?;
        let st = stats.detach().contiguous()?;
        let affine = Tensor::stack(&[weight.detach(), bias.detach()], 0)?; // (2, C)
        let (wdt, bdt) = (weight.dtype(), bias.dtype());
        let args = [xd.clone(), st.clone(), affine.clone()];
        let out = super::Output::Op3(Box::new(ApplyOp { eps, last }), args);
        return super::with_backward(&[x, weight, bias], out, move |dy| {
            // [dγ; dβ] from [γ; β; mean; var], then dx from those six rows: each kernel has three
            // inputs.
            let params = Tensor::cat(&[&affine, &st], 0)?.contiguous()?;
            let dy = dy.contiguous()?;
            let daffine = xd.apply_op3_no_bwd(&dy, &params, &GradSumsOp { eps, last })?;
            let all = Tensor::cat(&[&params, &daffine], 0)?;
            let dx = xd.apply_op3_no_bwd(&dy, &all, &DxOp { eps, last })?;
            Ok(vec![
                Some(dx),
                Some(daffine.get(0)?.to_dtype(wdt)?),
                Some(daffine.get(1)?.to_dtype(bdt)?),
            ])
        });
    }
    composed_in(x, weight, bias, eps, last)
}

/// A bf16 map on CUDA with the kernels on: the kernels read and write bf16 (statistics and
/// arithmetic in f32; session 11 — before, the ResNet plugin normalised an f32 copy, two casts
/// each way per layer).
fn bf16_on_cuda(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::BF16 && super::kernels_on_cuda(x)
}

/// BatchNorm's running statistic, in place: `running ← (1 − momentum)·running +
/// momentum·scale·batch` (`scale`: the variance's `n / (n − 1)`, or 1 for the mean). One kernel
/// for f32 tensors of one length on the CPU or (kernels on) CUDA — ResNet-50 updates 106 of them
/// a step, each four candle ops and a copy when composed; other cases compose the same formula
/// (`batch` cast to `running`'s dtype).
pub fn running_average(
    running: &candle_core::Var,
    batch: &Tensor,
    momentum: f64,
    scale: f64,
) -> Result<()> {
    if running.dims() != batch.dims() {
        return Err(crate::Error::msg(format!(
            "running_average: running {:?} and batch {:?} differ",
            running.dims(),
            batch.dims()
        )));
    }
    let (keep, add) = ((1.0 - momentum) as f32, (momentum * scale) as f32);
    let r = running.as_tensor();
    if is_fusable(&[r, batch]) && r.is_contiguous() {
        let batch = batch.detach().contiguous()?;
        r.inplace_op2(&batch, &RunningAverage { keep, add })?;
        return Ok(());
    }
    let batch = batch.detach().to_dtype(r.dtype())?;
    let next = ((r * (1.0 - momentum))? + (batch * (momentum * scale))?)?;
    running.set(&next)?;
    Ok(())
}

struct RunningAverage {
    keep: f32,
    add: f32,
}

impl candle_core::InplaceOp2 for RunningAverage {
    fn name(&self) -> &'static str {
        "cim-running-average"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let x = super::slice(s2, l2, "running_average batch statistic")?;
        let r = super::slice_mut(s1, l1, "running_average running statistic")?;
        for (r, &x) in r.iter_mut().zip(x) {
            *r = self.keep * *r + self.add * x;
        }
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
        super::cuda::running_average(s1, l1, s2, l2, self.keep, self.add)
    }
}

/// The same function from candle ops (statistics computed from `x`, differentiably).
pub fn batch_norm_train_composed(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    composed_in(x, weight, bias, eps, false)
}

/// [`batch_norm_train_composed`] of a channels-last map `(B, H, W, C)`.
pub fn batch_norm_train_composed_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    composed_in(x, weight, bias, eps, true)
}

fn composed_in(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, last: bool) -> Result<Tensor> {
    let c = weight.dim(0)?;
    // The statistics' shape, and the three dimensions they reduce.
    let (shape, dims) = match last {
        false => ([1, c, 1, 1], [0, 2, 3]),
        true => ([1, 1, 1, c], [0, 1, 2]),
    };
    let mean_over = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.mean_keepdim(dims[0])?
            .mean_keepdim(dims[1])?
            .mean_keepdim(dims[2])
    };
    let mean = mean_over(x)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = mean_over(&xc.sqr()?)?;
    Ok(xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape(&shape[..])?)?
        .broadcast_add(&bias.reshape(&shape[..])?)?)
}

/// `(outer, channels, inner)` of a map: `(B, C, H·W)` channels first, `(B·H·W, C, 1)` channels
/// last (`last`, dims `(B, H, W, C)`). Element `(o, c, i)` is at `(o·C + c)·inner + i`.
fn bchw(l: &Layout, last: bool) -> candle_core::Result<(usize, usize, usize)> {
    let (a, b, c, d) = l.shape().dims4()?;
    Ok(match last {
        false => (a, b, c * d),
        true => (a * b * c, d, 1),
    })
}

/// Per channel: sums of `f(x)` over every plane of that channel, in plane order.
fn channel_sum(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    f: impl Fn(usize, f32) -> f64 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut s = 0f64;
            for item in 0..b {
                let plane = &x[(item * c + ch) * hw..][..hw];
                s += plane.iter().map(|&v| f(ch, v)).sum::<f64>();
            }
            s
        })
        .collect()
}

fn moments(x: &[f32], b: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let n = (b * hw) as f64;
    let mean = channel_sum(x, b, c, hw, |_, v| v as f64);
    let mean: Vec<f64> = mean.into_iter().map(|s| s / n).collect();
    let var = channel_sum(x, b, c, hw, |ch, v| {
        let d = v as f64 - mean[ch];
        d * d
    });
    (
        mean.iter().map(|&m| m as f32).collect(),
        var.into_iter().map(|s| (s / n) as f32).collect(),
    )
}

struct MomentsOp {
    last: bool,
}

impl CustomOp1 for MomentsOp {
    fn name(&self) -> &'static str {
        "cim-channel-moments"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let (b, c, hw) = bchw(l, self.last)?;
        let (mut mean, var) = moments(x, b, c, hw);
        mean.extend(var);
        Ok((CpuStorage::F32(mean), Shape::from((2, c))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::channel_moments(s, l, self.last)
    }
}

struct ApplyOp {
    eps: f32,
    last: bool,
}

impl CustomOp3 for ApplyOp {
    fn name(&self) -> &'static str {
        "cim-batch-norm"
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
        let (x, stats, affine) = (
            slice(s1, l1, "x")?,
            slice(s2, l2, "stats")?,
            slice(s3, l3, "affine")?,
        );
        let (_, c, hw) = bchw(l1, self.last)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(hw)
            .zip(x.par_chunks(hw))
            .enumerate()
            .for_each(|(plane, (yp, xp))| {
                let ch = plane % c;
                let rstd = 1.0 / (stats[c + ch] + self.eps).sqrt();
                let (scale, mean, shift) = (affine[ch] * rstd, stats[ch], affine[c + ch]);
                for (yi, &xi) in yp.iter_mut().zip(xp) {
                    *yi = (xi - mean) * scale + shift;
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
        super::cuda::batch_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps, self.last)
    }
}

/// `[dγ; dβ]` `(2, C)` = per channel `[Σ dy·x̂; Σ dy]`, from `x`, `dy` and `[γ; β; mean; var]`.
struct GradSumsOp {
    eps: f32,
    last: bool,
}

/// `1/sqrt(var + ε)` per channel.
fn rstd(var: &[f32], eps: f32) -> Vec<f32> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
}

impl CustomOp3 for GradSumsOp {
    fn name(&self) -> &'static str {
        "cim-batch-norm-grad-sums"
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
        let (x, dy, p) = (
            slice(s1, l1, "x")?,
            slice(s2, l2, "grad")?,
            slice(s3, l3, "params")?,
        );
        let (b, c, hw) = bchw(l1, self.last)?;
        let (mean, rstd) = (&p[2 * c..3 * c], rstd(&p[3 * c..4 * c], self.eps));
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mut sd, mut sdx) = (0f64, 0f64);
                for item in 0..b {
                    let at = (item * c + ch) * hw;
                    for (&g, &xi) in dy[at..at + hw].iter().zip(&x[at..at + hw]) {
                        sd += g as f64;
                        sdx += (g * (xi - mean[ch]) * rstd[ch]) as f64;
                    }
                }
                (sd, sdx)
            })
            .collect();
        let mut out: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        out.extend(sums.iter().map(|s| s.0 as f32));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
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
        super::cuda::batch_norm_grad_sums(s1, l1, s2, l2, s3, l3, self.eps, self.last)
    }
}

/// `dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂))` in `x`'s dtype, from `x`, `dy` and
/// `[γ; β; mean; var; dγ; dβ]` `(6, C)`.
struct DxOp {
    eps: f32,
    last: bool,
}

impl CustomOp3 for DxOp {
    fn name(&self) -> &'static str {
        "cim-batch-norm-dx"
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
        let (x, dy, p) = (
            slice(s1, l1, "x")?,
            slice(s2, l2, "grad")?,
            slice(s3, l3, "params")?,
        );
        let (b, c, hw) = bchw(l1, self.last)?;
        let (gamma, mean) = (&p[..c], &p[2 * c..3 * c]);
        let rstd = rstd(&p[3 * c..4 * c], self.eps);
        let (sdx, sd) = (&p[4 * c..5 * c], &p[5 * c..]);
        let n = (b * hw) as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(hw)
            .zip(x.par_chunks(hw).zip(dy.par_chunks(hw)))
            .enumerate()
            .for_each(|(plane, (dp, (xp, gp)))| {
                let ch = plane % c;
                let (md, mdx) = (sd[ch] / n, sdx[ch] / n);
                let k = gamma[ch] * rstd[ch];
                for ((d, &xi), &g) in dp.iter_mut().zip(xp).zip(gp) {
                    let xh = (xi - mean[ch]) * rstd[ch];
                    *d = k * (g - md - xh * mdx);
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::batch_norm_dx(s1, l1, s2, l2, s3, l3, self.eps, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::Var;

    /// Channels last: the statistics, the normalisation and every gradient equal the channels-first
    /// ones of the transposed map, and the composed channels-last form.
    #[test]
    fn channels_last_matches_channels_first() -> Result<()> {
        let (b, c, h, w) = (2, 5, 4, 3);
        let x = Var::from_tensor(&((randn(&[b, c, h, w], 11) * 2.0)? - 0.5)?)?;
        let gamma = Var::from_tensor(&randn(&[c], 12))?;
        let beta = Var::from_tensor(&randn(&[c], 13))?;
        let up = randn(&[b, c, h, w], 14);
        let to_last = |t: &Tensor| t.permute((0, 2, 3, 1))?.contiguous();
        let stats = channel_moments(&x)?.expect("f32 on the CPU fuses");
        let first = batch_norm_train(&x, &stats, &gamma, &beta, 1e-5)?;
        let g1 = (&first * &up)?.sum_all()?.backward()?;
        let xl = to_last(&x)?;
        let stats_l = channel_moments_nhwc(&xl)?.expect("f32 on the CPU fuses");
        assert!(max_diff(&stats_l, &stats) < 1e-6);
        let last = batch_norm_train_nhwc(&xl, &stats_l, &gamma, &beta, 1e-5)?;
        assert_eq!(last.dims(), &[b, h, w, c]);
        assert!(max_diff(&last, &to_last(&first)?) < 1e-5);
        let composed = batch_norm_train_composed_nhwc(&xl, &gamma, &beta, 1e-5)?;
        assert!(max_diff(&composed, &last) < 1e-4);
        let g2 = (&last * &to_last(&up)?)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &gamma), ("bias", &beta)] {
            let d = max_diff(g2.get(v).unwrap(), g1.get(v).unwrap());
            assert!(d < 1e-4, "{name}: {d}");
        }
        Ok(())
    }

    #[test]
    fn fused_batch_norm_matches_composed_values_and_gradients() -> Result<()> {
        let (b, c, h, w) = (3, 5, 7, 6);
        // Shifted and scaled per channel, so mean and variance matter.
        let x = Var::from_tensor(&((randn(&[b, c, h, w], 1) * 3.0)? + 1.5)?)?;
        let gamma = Var::from_tensor(&randn(&[c], 2))?;
        let beta = Var::from_tensor(&randn(&[c], 3))?;
        let up = randn(&[b, c, h, w], 4);
        let stats = channel_moments(&x)?.expect("f32 on the CPU fuses");
        let mean = x
            .mean_keepdim(0)?
            .mean_keepdim(2)?
            .mean_keepdim(3)?
            .flatten_all()?;
        assert!(max_diff(&stats.get(0)?, &mean) < 1e-5);
        let f = batch_norm_train(&x, &stats, &gamma, &beta, 1e-5)?;
        let cmp = batch_norm_train_composed(&x, &gamma, &beta, 1e-5)?;
        assert!(max_diff(&f, &cmp) < 1e-4, "{}", max_diff(&f, &cmp));
        let gf = (&f * &up)?.sum_all()?.backward()?;
        let gc = (&cmp * &up)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("weight", &gamma), ("bias", &beta)] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-3, "{name}: {d}");
        }
        // The gradient through the statistics is there: dx sums to ~0 per channel.
        let s = gf
            .get(&x)
            .unwrap()
            .sum((0, 2, 3))?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(s < 1e-3, "{s}");
        // The running statistics: the fused in-place update against the composed formula, with a
        // batch statistic that is a view inside the (2, C) stats.
        let run = Var::from_tensor(&randn(&[c], 5))?;
        let want = ((run.as_tensor() * 0.9)? + (stats.get(1)? * (0.1 * 1.25))?)?;
        running_average(&run, &stats.get(1)?, 0.1, 1.25)?;
        assert!(max_diff(run.as_tensor(), &want) < 1e-6);
        // Composed where the kernel does not apply (an f64 batch statistic, cast).
        let run2 = Var::from_tensor(&randn(&[c], 5))?;
        let want = ((run2.as_tensor() * 0.9)? + (stats.get(1)? * (0.1 * 1.25))?)?;
        running_average(
            &run2,
            &stats.get(1)?.to_dtype(candle_core::DType::F64)?,
            0.1,
            1.25,
        )?;
        assert!(max_diff(run2.as_tensor(), &want) < 1e-6);
        let e = running_average(&run, &stats, 0.1, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("differ"), "{e}");
        // Under a gradient sink (x an activation, γ and β sunk): the same gradients bit for bit.
        let sink = crate::ops::GradSink::install();
        let xa = (x.as_tensor() * 1.0)?;
        let stats = channel_moments(&xa)?.expect("f32 on the CPU fuses");
        let y = batch_norm_train(&xa, &stats, &gamma, &beta, 1e-5)?;
        let gs = sink.backward(&(&y * &up)?.sum_all()?)?;
        drop(sink);
        for (name, v) in [("x", &x), ("weight", &gamma), ("bias", &beta)] {
            let d = max_diff(gs.get(v).expect(name), gf.get(v).unwrap());
            assert_eq!(d, 0.0, "{name} under the sink");
        }
        Ok(())
    }
}
