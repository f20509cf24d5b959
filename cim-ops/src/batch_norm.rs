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
//! rather than one block per channel), and the kernels also take bf16 maps.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, slice};
use crate::{Bn, Result};

/// Per-channel `[mean; biased variance]` `(2, C)` of `x` `(B, C, H, W)`. No gradient. `None` when
/// the fused kernels do not apply (f32 on the CPU; f32 or bf16 on CUDA with the kernels on).
pub fn channel_moments(x: &Tensor) -> Result<Option<Tensor>> {
    moments_in(x, false)
}

/// [`channel_moments`] of a channels-last map `x` `(B, H, W, C)`.
pub fn channel_moments_nhwc(x: &Tensor) -> Result<Option<Tensor>> {
    moments_in(x, true)
}

/// `[γ; β; mean; biased variance]` `(4, C)`: [`channel_moments`] of `x` (channels first, or
/// `(B, H, W, C)` with `channels_last`) with the affine parameters ahead of them — the form
/// [`batch_norm_train_tail`] takes its statistics in without concatenating anything. No gradient.
/// `None` where the fused kernels do not apply or `weight`, `bias` are not f32 `(C,)` there.
pub fn channel_moments_affine(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    channels_last: bool,
) -> Result<Option<Tensor>> {
    let c = x.dims().get(if channels_last { 3 } else { 1 }).copied();
    let fits = |t: &Tensor| {
        t.dims() == [c.unwrap_or(0)] && is_fusable(&[t]) && t.device().same_device(x.device())
    };
    if !(fits(weight) && fits(bias)) {
        return Ok(None);
    }
    let affine = (weight.detach().contiguous()?, bias.detach().contiguous()?);
    moments_with(x, channels_last, Some(affine))
}

fn moments_in(x: &Tensor, last: bool) -> Result<Option<Tensor>> {
    moments_with(x, last, None)
}

fn moments_with(
    x: &Tensor,
    last: bool,
    affine: Option<(Tensor, Tensor)>,
) -> Result<Option<Tensor>> {
    if !(is_fusable(&[x]) || bf16_on_cuda(x)) || x.rank() != 4 {
        return Ok(None);
    }
    let op = MomentsOp { last, affine };
    Ok(Some(x.detach().contiguous()?.apply_op1_no_bwd(&op)?))
}

/// `(x − mean) / sqrt(var + eps) · weight + bias` per channel, with `stats` = [`channel_moments`]
/// of this same `x` (the backward differentiates through them), or [`channel_moments_affine`] of
/// it with this `weight` and `bias`. `x` `(B, C, H, W)`; `weight`, `bias` `(C,)`. Falls back to
/// the composed ops where the fused kernels do not apply.
pub fn batch_norm_train(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    batch_norm_train_tail(x, stats, weight, bias, eps, false, BnTail::default())
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
    batch_norm_train_tail(x, stats, weight, bias, eps, true, BnTail::default())
}

/// What follows a training BatchNorm's affine map inside its node: a residual added (a
/// bottleneck's shortcut, `x`'s shape and dtype), then a ReLU — `relu(bn(x) + r)`, the end of a
/// ResNet bottleneck, or `relu(bn(x))` after its first two convolutions.
#[derive(Clone, Copy, Debug, Default)]
pub struct BnTail<'a> {
    pub residual: Option<&'a Tensor>,
    pub relu: bool,
}

/// The kernels' `mode` bits (`kernels/ops.cu`): a ReLU, a residual.
const RELU: u32 = 1;
const RESIDUAL: u32 = 2;

impl BnTail<'_> {
    fn mode(&self) -> u32 {
        (if self.relu { RELU } else { 0 }) | (if self.residual.is_some() { RESIDUAL } else { 0 })
    }
}

/// `tail(batch_norm_train(x))` as one node ([`BnTail`]), channels first or (`channels_last`)
/// last. Fused, the forward is one pass (read `x` and `r`, write the output) where the separate
/// ops make three (normalise, add, ReLU) and keep the normalised map and the sum for the backward;
/// the node keeps only `x` (its output is the next convolution's input, kept there anyway) and
/// its backward recomputes the ReLU's mask from `x` and `r` inside BatchNorm's two backward
/// kernels, the second also writing the shortcut's gradient. A residual needs a [`GradSink`]
/// (γ and β go there, leaving `x` and `r` as the node's inputs); without one, or where the fused
/// kernels do not apply, the same function is composed from the plain node, an add and
/// [`super::relu`].
///
/// [`GradSink`]: super::GradSink
pub fn batch_norm_train_tail(
    x: &Tensor,
    stats: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    channels_last: bool,
    tail: BnTail,
) -> Result<Tensor> {
    let last = channels_last;
    let fused = is_fusable(&[x, stats, weight, bias])
        || (bf16_on_cuda(x) && is_fusable(&[stats, weight, bias]));
    let residual_fits = match tail.residual {
        None => true,
        Some(r) => {
            r.dims() == x.dims()
                && r.dtype() == x.dtype()
                && r.device().same_device(x.device())
                && (super::GradSink::takes(&[x, r]) || super::region::recording())
                && weight.is_variable()
                && bias.is_variable()
        }
    };
    if !(fused && x.rank() == 4 && residual_fits) {
        let y = match fused && x.rank() == 4 {
            true => batch_norm_train_tail(x, stats, weight, bias, eps, last, BnTail::default())?,
            false => composed_in(x, weight, bias, eps, last)?,
        };
        let y = match tail.residual {
            Some(r) => (y + r)?,
            None => y,
        };
        return match tail.relu {
            true => super::relu(&y),
            false => Ok(y),
        };
    }
    // One grafted node over (x, γ, β[, r]): the normalisation kernel is its forward (no copy),
    // the two backward kernels its backward; under a GradSink γ and β skip candle's graph.
    let bn = Bn {
        eps: eps as f32,
        last,
        mode: tail.mode(),
    };
    let xd = x.detach().contiguous()?;
    // [γ; β; mean; var] (4, C): every kernel's per-channel constants — as given by
    // `channel_moments_affine`, or assembled from [mean; var].
    let params = match stats.dim(0)? {
        4 => stats.detach().contiguous()?,
        _ => Tensor::cat(
            &[
                &weight.detach().unsqueeze(0)?,
                &bias.detach().unsqueeze(0)?,
                &stats.detach(),
            ],
            0,
        )?
        .contiguous()?,
    };
    let rd = tail.residual.map(|r| r.detach().contiguous()).transpose()?;
    let (wdt, bdt) = (weight.dtype(), bias.dtype());
    // The forward's third input is the residual, or x again (unread).
    let args = [
        xd.clone(),
        params.clone(),
        rd.clone().unwrap_or_else(|| xd.clone()),
    ];
    let out = super::Output::Op3(Box::new(ApplyOp { bn }), args);
    let mut inputs = vec![x, weight, bias];
    inputs.extend(tail.residual);
    super::with_backward(&inputs, out, move |dy| {
        // [dγ; dβ] from [γ; β; mean; var], then dx (and dr) from those six rows.
        let dy = dy.contiguous()?;
        let sums = GradSumsOp {
            bn,
            residual: rd.clone(),
        };
        // [γ; β; mean; var; dγ; dβ] (6, C): the sums kernel copies the parameters ahead.
        let all = xd.apply_op3_no_bwd(&dy, &params, &sums)?;
        let dx_op = DxOp {
            bn,
            residual: rd.clone(),
        };
        let both = xd.apply_op3_no_bwd(&dy, &all, &dx_op)?;
        // With a ReLU and a residual the kernel wrote [dx; dr]; a residual without a ReLU gets
        // the output's gradient as it is.
        let (dx, dr) = match bn.mode {
            m if m == RELU | RESIDUAL => (both.get(0)?, Some(both.get(1)?)),
            m if m == RESIDUAL => (both, Some(dy.clone())),
            _ => (both, None),
        };
        let mut grads = vec![
            Some(dx),
            Some(all.get(4)?.to_dtype(wdt)?),
            Some(all.get(5)?.to_dtype(bdt)?),
        ];
        if dr.is_some() {
            grads.push(dr);
        }
        Ok(grads)
    })
}

/// A bf16 map on CUDA with the kernels on: the kernels read and write bf16 (statistics and
/// arithmetic in f32; no f32 copy, no casts
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
    xc.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&weight.reshape(&shape[..])?)?
        .broadcast_add(&bias.reshape(&shape[..])?)
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

/// Per channel: sums of `f(x)` over every plane of that channel, in plane order (channels last,
/// `hw == 1`: over the rows, see [`row_sums`]).
fn channel_sum(
    x: &[f32],
    b: usize,
    c: usize,
    hw: usize,
    f: impl Fn(usize, f32) -> f64 + Sync,
) -> Vec<f64> {
    if hw == 1 {
        return row_sums(x, c, 1, |_, row, acc| {
            for (ch, (a, &v)) in acc.iter_mut().zip(row).enumerate() {
                *a += f(ch, v);
            }
        })
        .remove(0);
    }
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

/// `[mean; var]`, or with `affine` (γ, β: f32 `(C,)`) `[γ; β; mean; var]`.
struct MomentsOp {
    last: bool,
    affine: Option<(Tensor, Tensor)>,
}

impl CustomOp1 for MomentsOp {
    fn name(&self) -> &'static str {
        "cim-channel-moments"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let (b, c, hw) = bchw(l, self.last)?;
        let (mean, var) = moments(x, b, c, hw);
        let mut out = match &self.affine {
            None => vec![],
            Some((g, bt)) => held_cpu(g, "γ", |g| held_cpu(bt, "β", |bt| Ok([g, bt].concat())))?,
        };
        let rows = out.len() / c.max(1) + 2;
        out.extend(mean);
        out.extend(var);
        Ok((CpuStorage::F32(out), Shape::from((rows, c))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let Some((g, b)) = &self.affine else {
            return super::cuda::channel_moments(s, l, self.last, None);
        };
        held_cuda(g, "γ", |sg, lg| {
            held_cuda(b, "β", |sb, lb| {
                super::cuda::channel_moments(s, l, self.last, Some(((sg, lg), (sb, lb))))
            })
        })
    }
}

/// The forward `tail((x − mean)·rstd·γ + β)` from `x`, `[γ; β; mean; var]` `(4, C)` and the
/// residual (or `x` again, unread, without one).
struct ApplyOp {
    bn: Bn,
}

/// The per-channel constants the CPU kernels use: γ, β, mean, `1/sqrt(var + ε)`.
struct Consts<'a> {
    gamma: &'a [f32],
    beta: &'a [f32],
    mean: &'a [f32],
    rstd: Vec<f32>,
}

impl<'a> Consts<'a> {
    fn of(p: &'a [f32], c: usize, eps: f32) -> Self {
        Self {
            gamma: &p[..c],
            beta: &p[c..2 * c],
            mean: &p[2 * c..3 * c],
            rstd: p[3 * c..4 * c]
                .iter()
                .map(|v| 1.0 / (v + eps).sqrt())
                .collect(),
        }
    }
}

/// The CPU kernels' inner loops over one plane of channel `ch` (`x`, and the residual `r` — `x`
/// again, unread, without one), specialised on the tail so that each loop is branch-free: the
/// affine output `pre = x̂·γ + β (+ r)` exactly as the CUDA kernels' `bn_pre` writes it.
struct Plane<'a> {
    mean: f32,
    rstd: f32,
    gamma: f32,
    beta: f32,
    x: &'a [f32],
    r: &'a [f32],
}

impl<'a> Plane<'a> {
    fn new(k: &Consts, ch: usize, x: &'a [f32], r: &'a [f32]) -> Self {
        Self {
            mean: k.mean[ch],
            rstd: k.rstd[ch],
            gamma: k.gamma[ch],
            beta: k.beta[ch],
            x,
            r,
        }
    }

    /// `y = tail(pre)`.
    fn apply<const RELU: bool, const RES: bool>(&self, y: &mut [f32]) {
        let r = &self.r[..self.x.len()];
        for ((y, &x), &r) in y.iter_mut().zip(self.x).zip(r) {
            let mut pre = ((x - self.mean) * self.rstd) * self.gamma + self.beta;
            if RES {
                pre += r;
            }
            *y = if RELU { pre.max(0.0) } else { pre };
        }
    }

    /// The gradient at the affine output: `dy`, zero where the ReLU's input was not positive.
    #[inline(always)]
    fn grad<const RELU: bool, const RES: bool>(&self, xh: f32, r: f32, dy: f32) -> f32 {
        if !RELU {
            return dy;
        }
        let mut pre = xh * self.gamma + self.beta;
        if RES {
            pre += r;
        }
        if pre > 0.0 {
            dy
        } else {
            0.0
        }
    }

    /// `(Σ g, Σ g·x̂)` over the plane.
    fn sums<const RELU: bool, const RES: bool>(&self, dy: &[f32]) -> (f64, f64) {
        let (mut sd, mut sdx) = (0f64, 0f64);
        let r = &self.r[..self.x.len()];
        for ((&x, &dy), &r) in self.x.iter().zip(dy).zip(r) {
            let xh = (x - self.mean) * self.rstd;
            let g = self.grad::<RELU, RES>(xh, r, dy);
            sd += g as f64;
            sdx += (g * xh) as f64;
        }
        (sd, sdx)
    }

    /// `dx = γ·rstd·(g − md − x̂·mdx)`, and `dr = g` where given.
    fn dx<const RELU: bool, const RES: bool>(
        &self,
        dy: &[f32],
        (md, mdx): (f32, f32),
        dx: &mut [f32],
        dr: Option<&mut [f32]>,
    ) {
        let scale = self.gamma * self.rstd;
        let r = &self.r[..self.x.len()];
        match dr {
            Some(dr) => {
                for ((((d, o), &x), &dy), &r) in
                    dx.iter_mut().zip(dr.iter_mut()).zip(self.x).zip(dy).zip(r)
                {
                    let xh = (x - self.mean) * self.rstd;
                    let g = self.grad::<RELU, RES>(xh, r, dy);
                    *d = scale * (g - md - xh * mdx);
                    *o = g;
                }
            }
            None => {
                for (((d, &x), &dy), &r) in dx.iter_mut().zip(self.x).zip(dy).zip(r) {
                    let xh = (x - self.mean) * self.rstd;
                    let g = self.grad::<RELU, RES>(xh, r, dy);
                    *d = scale * (g - md - xh * mdx);
                }
            }
        }
    }
}

/// Rows of `C` channels per parallel work item in the channels-last CPU loops (about 16 K values).
fn rows_per_item(c: usize) -> usize {
    (16 * 1024 / c.max(1)).max(1)
}

/// `n` per-channel sums over the channels-last rows of `x` (`(rows, C)`): `f(i, row, acc)` adds
/// row `i` into `acc` (`n` sums of `C` each, laid end to end). Rows are summed in fixed blocks of
/// [`rows_per_item`], in parallel, and the blocks' sums added in block order — the same result
/// whatever the number of threads. Channels last, a channel's values are `C` apart: a loop per
/// channel (the channels-first kernels' planes) would be one value per plane.
fn row_sums(
    x: &[f32],
    c: usize,
    n: usize,
    f: impl Fn(usize, &[f32], &mut [f64]) + Sync,
) -> Vec<Vec<f64>> {
    let per = rows_per_item(c);
    let partials: Vec<Vec<f64>> = x
        .par_chunks(per * c)
        .enumerate()
        .map(|(b, xb)| {
            let mut acc = vec![0f64; n * c];
            for (r, row) in xb.chunks(c).enumerate() {
                f(b * per + r, row, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; n * c];
    for p in partials {
        total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
    }
    total.chunks(c).map(|s| s.to_vec()).collect()
}

/// The CPU kernels' loops over channels-last rows (`(B·H·W, C)`, every row all channels): the
/// arithmetic of [`Plane`]'s, element by element, with the per-channel constants indexed along
/// the row. Every slice is cut to `C` before a row's loop, so the loops carry no bounds checks
/// and vectorise.
struct Rows<'a> {
    k: &'a Consts<'a>,
    /// `γ·rstd` per channel (`Plane::dx`'s `scale`).
    scale: Vec<f32>,
}

/// [`Plane::grad`] with the channel's γ and β.
#[inline(always)]
fn row_grad<const RELU: bool, const RES: bool>(g: f32, b: f32, xh: f32, r: f32, dy: f32) -> f32 {
    if !RELU {
        return dy;
    }
    let mut pre = xh * g + b;
    if RES {
        pre += r;
    }
    if pre > 0.0 {
        dy
    } else {
        0.0
    }
}

impl<'a> Rows<'a> {
    fn new(k: &'a Consts<'a>) -> Self {
        let scale = k.gamma.iter().zip(&k.rstd).map(|(g, r)| g * r).collect();
        Self { k, scale }
    }

    /// `(mean, rstd, γ, β)`, each cut to `C`.
    fn consts(&self) -> (&[f32], &[f32], &[f32], &[f32]) {
        let (k, c) = (self.k, self.scale.len());
        (&k.mean[..c], &k.rstd[..c], &k.gamma[..c], &k.beta[..c])
    }

    /// `y = tail(pre)` for the rows `x` (residual rows `r`).
    fn apply<const RELU: bool, const RES: bool>(&self, x: &[f32], r: &[f32], y: &mut [f32]) {
        let c = self.scale.len();
        let (mean, rstd, gamma, beta) = self.consts();
        for ((y, x), r) in y.chunks_mut(c).zip(x.chunks(c)).zip(r.chunks(c)) {
            let (y, x, r) = (&mut y[..c], &x[..c], &r[..c]);
            for ch in 0..c {
                let mut pre = ((x[ch] - mean[ch]) * rstd[ch]) * gamma[ch] + beta[ch];
                if RES {
                    pre += r[ch];
                }
                y[ch] = if RELU { pre.max(0.0) } else { pre };
            }
        }
    }

    /// Per channel `[Σ g; Σ g·x̂]` over all rows.
    fn sums<const RELU: bool, const RES: bool>(
        &self,
        x: &[f32],
        r: &[f32],
        dy: &[f32],
    ) -> Vec<Vec<f64>> {
        let c = self.scale.len();
        let (mean, rstd, gamma, beta) = self.consts();
        row_sums(x, c, 2, |i, row, acc| {
            let (row, g_row, r_row) = (&row[..c], &dy[i * c..][..c], &r[i * c..][..c]);
            let (sd, sdx) = acc.split_at_mut(c);
            let (sd, sdx) = (&mut sd[..c], &mut sdx[..c]);
            for ch in 0..c {
                let xh = (row[ch] - mean[ch]) * rstd[ch];
                let g = row_grad::<RELU, RES>(gamma[ch], beta[ch], xh, r_row[ch], g_row[ch]);
                sd[ch] += g as f64;
                sdx[ch] += (g * xh) as f64;
            }
        })
    }

    /// `dx = γ·rstd·(g − md − x̂·mdx)` per channel for the rows `x`, and `dr = g` where given.
    #[allow(clippy::too_many_arguments)]
    fn dx<const RELU: bool, const RES: bool>(
        &self,
        x: &[f32],
        r: &[f32],
        dy: &[f32],
        (md, mdx): (&[f32], &[f32]),
        dx: &mut [f32],
        mut dr: Option<&mut [f32]>,
    ) {
        let c = self.scale.len();
        let (mean, rstd, gamma, beta) = self.consts();
        let (scale, md, mdx) = (&self.scale[..c], &md[..c], &mdx[..c]);
        let rows = x.chunks(c).zip(dy.chunks(c).zip(r.chunks(c)));
        for (i, (d, (x, (g, r)))) in dx.chunks_mut(c).zip(rows).enumerate() {
            let (d, x, g, r) = (&mut d[..c], &x[..c], &g[..c], &r[..c]);
            match dr.as_deref_mut() {
                Some(dr) => {
                    let o = &mut dr[i * c..][..c];
                    for ch in 0..c {
                        let xh = (x[ch] - mean[ch]) * rstd[ch];
                        let gr = row_grad::<RELU, RES>(gamma[ch], beta[ch], xh, r[ch], g[ch]);
                        d[ch] = scale[ch] * (gr - md[ch] - xh * mdx[ch]);
                        o[ch] = gr;
                    }
                }
                None => {
                    for ch in 0..c {
                        let xh = (x[ch] - mean[ch]) * rstd[ch];
                        let gr = row_grad::<RELU, RES>(gamma[ch], beta[ch], xh, r[ch], g[ch]);
                        d[ch] = scale[ch] * (gr - md[ch] - xh * mdx[ch]);
                    }
                }
            }
        }
    }
}

/// Calls `$plane.$f::<RELU, RES>($args)` for the tail `$mode`.
macro_rules! by_tail {
    ($mode:expr, $plane:expr, $f:ident($($arg:expr),*)) => {
        match ($mode & RELU != 0, $mode & RESIDUAL != 0) {
            (false, false) => $plane.$f::<false, false>($($arg),*),
            (false, true) => $plane.$f::<false, true>($($arg),*),
            (true, false) => $plane.$f::<true, false>($($arg),*),
            (true, true) => $plane.$f::<true, true>($($arg),*),
        }
    };
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
        let (x, p) = (slice(s1, l1, "x")?, slice(s2, l2, "params")?);
        // The third input is the residual, or x again (unread).
        let r = match self.bn.mode & RESIDUAL {
            0 => x,
            _ => slice(s3, l3, "residual")?,
        };
        let (_, c, hw) = bchw(l1, self.bn.last)?;
        let k = Consts::of(p, c, self.bn.eps);
        let mut y = vec![0f32; x.len()];
        if hw == 1 {
            let rows = Rows::new(&k);
            let block = rows_per_item(c) * c;
            y.par_chunks_mut(block).enumerate().for_each(|(i, yb)| {
                let span = i * block..i * block + yb.len();
                by_tail!(self.bn.mode, rows, apply(&x[span.clone()], &r[span], yb));
            });
            return Ok((CpuStorage::F32(y), l1.shape().clone()));
        }
        y.par_chunks_mut(hw).enumerate().for_each(|(plane, yp)| {
            let span = plane * hw..(plane + 1) * hw;
            let pl = Plane::new(&k, plane % c, &x[span.clone()], &r[span]);
            by_tail!(self.bn.mode, pl, apply(yp));
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
        super::cuda::batch_norm_fwd((s1, l1), (s2, l2), (s3, l3), self.bn)
    }
}

/// Runs `f` with the CPU slice of `t`, a tensor an op holds beside its inputs (`what` names it).
fn held_cpu<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => f(slice(c, l, what)?),
        _ => candle_core::bail!("batch_norm: {what} is not on the CPU"),
    }
}

/// Runs `f` with the CUDA storage of `t`, a tensor an op holds beside its inputs.
#[cfg(feature = "cuda")]
fn held_cuda<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&candle_core::CudaStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cuda(c) => f(c, l),
        _ => candle_core::bail!("batch_norm: {what} is not on CUDA"),
    }
}

/// Runs `f` with the residual's CPU slice (`None` without one).
fn with_cpu_residual<R>(
    r: &Option<Tensor>,
    f: impl FnOnce(Option<&[f32]>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match r {
        None => f(None),
        Some(t) => held_cpu(t, "the residual", |r| f(Some(r))),
    }
}

/// Runs `f` with the residual's CUDA storage (`None` without one).
#[cfg(feature = "cuda")]
fn with_cuda_residual<R>(
    r: &Option<Tensor>,
    f: impl FnOnce(Option<(&candle_core::CudaStorage, &Layout)>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    match r {
        None => f(None),
        Some(t) => held_cuda(t, "the residual", |s, l| f(Some((s, l)))),
    }
}

/// `[γ; β; mean; var; dγ; dβ]` `(6, C)`: the parameters `p` copied ahead of the sums per channel
/// `[Σ g·x̂; Σ g]`, `g` the gradient at the affine output (`dy` through the tail's ReLU), from `x`,
/// `dy` and `p = [γ; β; mean; var]`; the residual rides along.
struct GradSumsOp {
    bn: Bn,
    residual: Option<Tensor>,
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
        let (b, c, hw) = bchw(l1, self.bn.last)?;
        let k = Consts::of(p, c, self.bn.eps);
        let sums: Vec<(f64, f64)> = with_cpu_residual(&self.residual, |r| {
            let r = r.unwrap_or(x);
            if hw == 1 {
                let rows = Rows::new(&k);
                let s = by_tail!(self.bn.mode, rows, sums(x, r, dy));
                return Ok(s[0].iter().copied().zip(s[1].iter().copied()).collect());
            }
            Ok((0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut sd, mut sdx) = (0f64, 0f64);
                    for item in 0..b {
                        let span = (item * c + ch) * hw..(item * c + ch + 1) * hw;
                        let pl = Plane::new(&k, ch, &x[span.clone()], &r[span.clone()]);
                        let (a, b) = by_tail!(self.bn.mode, pl, sums(&dy[span]));
                        sd += a;
                        sdx += b;
                    }
                    (sd, sdx)
                })
                .collect())
        })?;
        // [γ; β; mean; var] ahead of [dγ; dβ], as the CUDA kernel writes it.
        let mut out = p[..4 * c].to_vec();
        out.extend(sums.iter().map(|s| s.1 as f32));
        out.extend(sums.iter().map(|s| s.0 as f32));
        Ok((CpuStorage::F32(out), Shape::from((6, c))))
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
        with_cuda_residual(&self.residual, |r| {
            super::cuda::batch_norm_grad_sums((s1, l1), (s2, l2), (s3, l3), r, self.bn)
        })
    }
}

/// The shape of [`DxOp`]'s output for `x`'s layout: `x`'s, or `(2, …)` for `[dx; dr]`.
pub(super) fn dx_shape(x: &Layout, both: bool) -> Shape {
    match both {
        true => {
            let mut d = vec![2];
            d.extend_from_slice(x.dims());
            Shape::from(d)
        }
        false => x.shape().clone(),
    }
}

/// `dx = γ·rstd·(g − mean(g) − x̂·mean(g·x̂))` in `x`'s dtype, `g` as [`GradSumsOp`]'s, from `x`,
/// `dy` and `[γ; β; mean; var; dγ; dβ]` `(6, C)`; with a ReLU and a residual `[dx; dr]`
/// `(2, …)`, `dr = g` the shortcut's gradient.
struct DxOp {
    bn: Bn,
    residual: Option<Tensor>,
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
        let (b, c, hw) = bchw(l1, self.bn.last)?;
        let k = Consts::of(p, c, self.bn.eps);
        let (sdx, sd) = (&p[4 * c..5 * c], &p[5 * c..6 * c]);
        let n = (b * hw) as f32;
        let both = self.bn.mode == RELU | RESIDUAL;
        let len = x.len();
        let mut out = vec![0f32; if both { 2 * len } else { len }];
        with_cpu_residual(&self.residual, |r| {
            let r = r.unwrap_or(x);
            let (dx, dr) = out.split_at_mut(len);
            if hw == 1 {
                let means: (Vec<f32>, Vec<f32>) =
                    (0..c).map(|ch| (sd[ch] / n, sdx[ch] / n)).unzip();
                let m = (means.0.as_slice(), means.1.as_slice());
                let rows = Rows::new(&k);
                let block = rows_per_item(c) * c;
                let run = |i: usize, db: &mut [f32], rb: Option<&mut [f32]>| {
                    let span = i * block..i * block + db.len();
                    let (xs, rs, gs) = (&x[span.clone()], &r[span.clone()], &dy[span]);
                    by_tail!(self.bn.mode, rows, dx(xs, rs, gs, m, db, rb));
                };
                if both {
                    dx.par_chunks_mut(block)
                        .zip(dr.par_chunks_mut(block))
                        .enumerate()
                        .for_each(|(i, (db, rb))| run(i, db, Some(rb)));
                } else {
                    dx.par_chunks_mut(block)
                        .enumerate()
                        .for_each(|(i, db)| run(i, db, None));
                }
                return Ok(());
            }
            let plane = |p: usize| {
                let ch = p % c;
                let span = p * hw..(p + 1) * hw;
                let pl = Plane::new(&k, ch, &x[span.clone()], &r[span.clone()]);
                (pl, &dy[span], (sd[ch] / n, sdx[ch] / n))
            };
            if both {
                dx.par_chunks_mut(hw)
                    .zip(dr.par_chunks_mut(hw))
                    .enumerate()
                    .for_each(|(p, (dp, rp))| {
                        let (pl, g, m) = plane(p);
                        by_tail!(self.bn.mode, pl, dx(g, m, dp, Some(rp)));
                    });
            } else {
                dx.par_chunks_mut(hw).enumerate().for_each(|(p, dp)| {
                    let (pl, g, m) = plane(p);
                    by_tail!(self.bn.mode, pl, dx(g, m, dp, None));
                });
            }
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), dx_shape(l1, both)))
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
        with_cuda_residual(&self.residual, |r| {
            let both = self.bn.mode == RELU | RESIDUAL;
            let shape = dx_shape(l1, both);
            super::cuda::batch_norm_dx((s1, l1), (s2, l2), (s3, l3), r, self.bn, shape)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::Var;

    /// The fused tails — `relu(bn(x))`, `relu(bn(x) + r)`, `bn(x) + r` — against the same
    /// functions composed (values and the gradients of x, γ, β and r), in both layouts; with a
    /// residual under a gradient sink (the fused node) and without one (composed from the plain
    /// node).
    #[test]
    fn fused_tails_match_composed() -> Result<()> {
        use crate::GradSink;
        for last in [false, true] {
            for (relu, res) in [(true, false), (true, true), (false, true)] {
                for sunk in [true, false] {
                    // Channels last, 9216 rows of 3 channels: the CPU loops' row blocks
                    // (rows_per_item: 5461) are two, the second partial.
                    let dims = if last { [4, 48, 48, 3] } else { [2, 5, 4, 3] };
                    let x = Var::from_tensor(&((randn(&dims, 31) * 2.0)? + 0.3)?)?;
                    let r = Var::from_tensor(&randn(&dims, 32))?;
                    let gamma = Var::from_tensor(&randn(&[dims[if last { 3 } else { 1 }]], 33))?;
                    let beta = Var::from_tensor(&randn(gamma.dims(), 34))?;
                    let up = randn(&dims, 35);
                    let want = {
                        let y = composed_in(&x, &gamma, &beta, 1e-5, last)?;
                        let y = if res { (y + r.as_tensor())? } else { y };
                        if relu {
                            y.relu()?
                        } else {
                            y
                        }
                    };
                    let gw = (&want * &up)?.sum_all()?.backward()?;
                    let sink = GradSink::install_if(sunk);
                    let (xa, ra) = ((x.as_tensor() * 1.0)?, (r.as_tensor() * 1.0)?);
                    let stats = moments_in(&xa, last)?.expect("f32 on the CPU fuses");
                    let tail = BnTail {
                        residual: res.then_some(&ra),
                        relu,
                    };
                    let got = batch_norm_train_tail(&xa, &stats, &gamma, &beta, 1e-5, last, tail)?;
                    let what = format!("last {last} relu {relu} residual {res} sunk {sunk}");
                    assert!(max_diff(&got, &want) < 1e-4, "{what}: value");
                    let gg = sink.backward(&(&got * &up)?.sum_all()?)?;
                    drop(sink);
                    for (name, v) in [("x", &x), ("weight", &gamma), ("bias", &beta), ("r", &r)] {
                        if name == "r" && !res {
                            continue;
                        }
                        let d = max_diff(gg.get(v).expect(name), gw.get(v).expect(name));
                        assert!(d < 1e-3, "{what}: d{name} {d}");
                    }
                }
            }
        }
        Ok(())
    }

    /// `channel_moments_affine` is `[γ; β]` over `channel_moments`, in either layout, and the node
    /// takes it as its statistics with the same result; γ and β of the wrong size give `None`.
    #[test]
    fn affine_moments_are_the_parameters_over_the_statistics() -> Result<()> {
        let x = Var::from_tensor(&((randn(&[2, 5, 4, 3], 41) * 2.0)? + 0.3)?)?;
        let gamma = Var::from_tensor(&randn(&[5], 42))?;
        let beta = Var::from_tensor(&randn(&[5], 43))?;
        let up = randn(&[2, 5, 4, 3], 44);
        for last in [false, true] {
            let xs = match last {
                false => x.as_tensor().clone(),
                true => x.permute((0, 2, 3, 1))?.contiguous()?,
            };
            let both = channel_moments_affine(&xs, &gamma, &beta, last)?.expect("CPU f32");
            let stats = moments_in(&xs, last)?.expect("CPU f32");
            let want = Tensor::cat(&[&gamma.unsqueeze(0)?, &beta.unsqueeze(0)?, &stats], 0)?;
            assert_eq!(both.dims(), &[4, 5]);
            assert_eq!(max_diff(&both, &want), 0.0);
            let relu = BnTail {
                residual: None,
                relu: true,
            };
            let a = batch_norm_train_tail(&xs, &both, &gamma, &beta, 1e-5, last, relu)?;
            let b = batch_norm_train_tail(&xs, &stats, &gamma, &beta, 1e-5, last, relu)?;
            assert_eq!(max_diff(&a, &b), 0.0);
            let upl = match last {
                false => up.clone(),
                true => up.permute((0, 2, 3, 1))?.contiguous()?,
            };
            let ga = (&a * &upl)?.sum_all()?.backward()?;
            let gb = (&b * &upl)?.sum_all()?.backward()?;
            for v in [&x, &gamma, &beta] {
                assert_eq!(max_diff(ga.get(v).unwrap(), gb.get(v).unwrap()), 0.0);
            }
        }
        let short = Var::from_tensor(&randn(&[4], 45))?;
        assert!(channel_moments_affine(&x, &short, &beta, false)?.is_none());
        Ok(())
    }

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
        let sink = crate::GradSink::install();
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
