//! RESPIX target and loss, fused.
//!
//! Composed from candle ops, the sliding-window target is ~2·k shifted-slice adds per pass over the
//! image (x and x²) plus the normalisation, and the loss needs the prediction unpatchified (a
//! permute + copy forward and backward) before `|d| + d²`. Here the target is one kernel
//! ([`respix_sliding_target`]) and the loss one kernel each way ([`respix_loss`]), reading the
//! prediction in the head's token layout, so no layout copy is made at all.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, slice};
use crate::Result;

/// The sliding-window target of `x` `(B, C, H, W)`: every pixel normalised by the mean and
/// variance of the `k×k` window over rows `i − k/2 … i + k/2 − 1` (and the same columns), clipped
/// at the borders: `(x − mean) / sqrt(var + eps)`. Not differentiable (a target). `None` when the
/// fused kernel does not apply (not f32, or CUDA kernels off): the caller composes it.
pub fn respix_sliding_target(x: &Tensor, k: usize, eps: f64) -> Result<Option<Tensor>> {
    if !is_fusable(&[x]) || x.rank() != 4 || k == 0 {
        return Ok(None);
    }
    let x = x.detach().contiguous()?;
    Ok(Some(x.apply_op1_no_bwd(&SlidingTargetOp {
        k,
        eps: eps as f32,
    })?))
}

/// `mean|d| + mean d²` with `d = unpatchify(pred) − target`: `pred` `(B, gh·gw, p·p·C)` in the
/// head's per-position layout `(p, p, C)`, `target` `(B, C, gh·p, gw·p)`. Differentiable in
/// `pred` only. `None` when the fused kernel does not apply.
pub fn respix_loss(pred: &Tensor, target: &Tensor, p: usize) -> Result<Option<Tensor>> {
    if !is_fusable(&[pred, target]) || pred.rank() != 3 || target.rank() != 4 {
        return Ok(None);
    }
    let (b, l, e) = pred.dims3()?;
    let (tb, c, h, w) = target.dims4()?;
    if tb != b || p == 0 || h % p != 0 || w % p != 0 || (h / p) * (w / p) != l || e != p * p * c {
        return Err(crate::Error::msg(format!(
            "respix_loss: prediction {:?} does not tile target {:?} with patch {p}",
            pred.dims(),
            target.dims()
        )));
    }
    let op = PatchMap { p, c, h, w };
    let per_row = pred
        .contiguous()?
        .apply_op2(&target.detach().contiguous()?, LossOp(op))?;
    Ok(Some((per_row.sum_all()? / (b * l * e) as f64)?))
}

/// Geometry shared by the loss kernels: element `(b, l, (py, px, c))` of the prediction is pixel
/// `(b, c, gy·p + py, gx·p + px)` of the target, `l = gy·gw + gx`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PatchMap {
    pub p: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl PatchMap {
    /// `[p, c, h, w]` as the CUDA kernels take them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn args(&self) -> [i32; 4] {
        [self.p as i32, self.c as i32, self.h as i32, self.w as i32]
    }
    fn row_len(&self) -> usize {
        self.p * self.p * self.c
    }
    /// Index into the target of element `j` of prediction row `row`.
    #[inline]
    fn target_index(&self, row: usize, j: usize) -> usize {
        let (gh, gw) = (self.h / self.p, self.w / self.p);
        let (b, l) = (row / (gh * gw), row % (gh * gw));
        let (gy, gx) = (l / gw, l % gw);
        let (py, rest) = (j / (self.p * self.c), j % (self.p * self.c));
        let (px, ch) = (rest / self.c, rest % self.c);
        ((b * self.c + ch) * self.h + gy * self.p + py) * self.w + gx * self.p + px
    }
}

struct SlidingTargetOp {
    k: usize,
    eps: f32,
}

/// Window sums along one axis of a plane: `out[i] = Σ_{s<k} v[i − before + s]` (zero outside).
fn box_sum_rows(src: &[f32], dst: &mut [f32], h: usize, w: usize, k: usize, vertical: bool) {
    let before = k / 2;
    let n = if vertical { h } else { w };
    for i in 0..h {
        for j in 0..w {
            let at = if vertical { i } else { j };
            let lo = at.saturating_sub(before);
            let hi = (at + k - before).min(n);
            let mut s = 0f32;
            for t in lo..hi {
                s += if vertical {
                    src[t * w + j]
                } else {
                    src[i * w + t]
                };
            }
            dst[i * w + j] = s;
        }
    }
}

impl CustomOp1 for SlidingTargetOp {
    fn name(&self) -> &'static str {
        "cim-respix-target"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "x")?;
        let (_, _, h, w) = l.shape().dims4()?;
        let (k, before) = (self.k, self.k / 2);
        let count =
            |i: usize, n: usize| ((i + k - before).min(n) - i.saturating_sub(before)) as f32;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(yp, xp)| {
                let sq: Vec<f32> = xp.iter().map(|v| v * v).collect();
                let (mut t1, mut t2) = (vec![0f32; h * w], vec![0f32; h * w]);
                let (mut s1, mut s2) = (vec![0f32; h * w], vec![0f32; h * w]);
                box_sum_rows(xp, &mut t1, h, w, k, true);
                box_sum_rows(&sq, &mut t2, h, w, k, true);
                box_sum_rows(&t1, &mut s1, h, w, k, false);
                box_sum_rows(&t2, &mut s2, h, w, k, false);
                for i in 0..h {
                    for j in 0..w {
                        let n = count(i, h) * count(j, w);
                        let at = i * w + j;
                        let mean = s1[at] / n;
                        let var = (s2[at] / n - mean * mean).max(0.0);
                        yp[at] = (xp[at] - mean) / (var + self.eps).sqrt();
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::respix_target(s, l, self.k, self.eps)
    }
}

/// Per prediction row: `Σ |d| + d²`.
struct LossOp(PatchMap);

impl CustomOp2 for LossOp {
    fn name(&self) -> &'static str {
        "cim-respix-loss"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (pred, target) = (slice(s1, l1, "prediction")?, slice(s2, l2, "target")?);
        let m = self.0;
        let e = m.row_len();
        let rows = pred.len() / e;
        let out: Vec<f32> = pred
            .par_chunks(e)
            .enumerate()
            .map(|(r, pr)| {
                pr.iter()
                    .enumerate()
                    .map(|(j, &v)| {
                        let d = v - target[m.target_index(r, j)];
                        d.abs() + d * d
                    })
                    .sum()
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::respix_loss_fwd(s1, l1, s2, l2, self.0.args())
    }
    fn bwd(
        &self,
        pred: &Tensor,
        target: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = pred.apply_op3_no_bwd(target, &g.contiguous()?, &LossBwdOp(self.0))?;
        Ok((Some(d), None))
    }
}

/// `g_row · (sign(d) + 2d)` in the prediction's layout.
struct LossBwdOp(PatchMap);

impl CustomOp3 for LossBwdOp {
    fn name(&self) -> &'static str {
        "cim-respix-loss-bwd"
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
        let (pred, target, g) = (
            slice(s1, l1, "prediction")?,
            slice(s2, l2, "target")?,
            slice(s3, l3, "grad")?,
        );
        let m = self.0;
        let e = m.row_len();
        let mut dp = vec![0f32; pred.len()];
        dp.par_chunks_mut(e)
            .zip(pred.par_chunks(e))
            .enumerate()
            .for_each(|(r, (dr, pr))| {
                for j in 0..e {
                    let d = pr[j] - target[m.target_index(r, j)];
                    let sign = if d > 0.0 {
                        1.0
                    } else if d < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    dr[j] = g[r] * (sign + 2.0 * d);
                }
            });
        Ok((CpuStorage::F32(dp), l1.shape().clone()))
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
        super::cuda::respix_loss_bwd(s1, l1, s2, l2, s3, l3, self.0.args())
    }
}
