//! Flash attention on CUDA: bf16, head width 64, tensor cores (`kernels/ops.cu`, `cim_flash_*`).
//!
//! [`super::attention_gemm`] materialises the `N×N` scores and probabilities of every head in
//! global memory and copies q, k, v out of the packed qkv projection and the output back (an H200
//! profile of ViT-B/16, 2026-11-27: ~42 ms of a 205 ms step went to the attention GEMMs, their
//! softmax and the head copies). The flash kernels read q, k, v where the projection wrote them,
//! keep every score tile in shared memory, and write the output where the output projection
//! reads it; the backward recomputes the probabilities from the per-row log-sum-exp (the
//! FlashAttention-2 scheme) and writes `dqkv` in the projection's layout.
//!
//! The computation is four ops, each with a CPU implementation (f32, any head width; the test
//! below checks the four together against [`super::attention_composed`], values and gradients)
//! and a CUDA one (bf16, head width 64; checked against the CPU in `tests/ops_cuda.rs`):
//!
//! - [`FlashStatsOp`]: `lse[b, h, i] = log Σ_j exp(scale · q_i·k_j)`;
//! - [`FlashOutOp`]: `o_i = Σ_j exp(scale · q_i·k_j − lse_i) · v_j`;
//! - [`FlashDeltaOp`]: `D_i = Σ_d do_i·o_i` per head;
//! - [`FlashBwdOp`]: `p = exp(scale·q·k − lse)`, `dv = pᵀ·do`, `ds = scale · p ⊙ (do·vᵀ − D)`,
//!   `dq = ds·k`, `dk = dsᵀ·q`.
//!
//! Off by default (asked for per model: the `flash` argument of [`super::attention_qkv`], config `run.flash_attention`) until its GPU parity
//! check has passed on a GPU: it has not run on one yet.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::slice;
use crate::Result;

/// Whether the flash kernels take this `qkv` `(B, N, 3·H·Dh)`: asked for (`flash`), the CUDA kernels on,
/// bf16, `Dh = 64`, a 16-byte aligned start.
pub(crate) fn flash_applies(qkv: &Tensor, heads: usize, flash: bool) -> bool {
    flash
        && super::kernels_on_cuda(qkv)
        && qkv.dtype() == DType::BF16
        && qkv.dims3().is_ok_and(|(b, n, c3)| {
            n > 0 && heads > 0 && c3 == 3 * heads * 64 && b * heads <= 65_535
        })
        && super::starts_aligned(qkv, 8)
}

/// Attention of a detached `qkv` and its backward through the flash ops (on the CPU for f32 too,
/// which is how the tests check the decomposition).
pub(crate) fn flash_detached(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<(Tensor, crate::AttentionBackward)> {
    Geo::from_layout(qkv.layout(), heads)?;
    let scale = scale as f32;
    let qkv = qkv.contiguous()?;
    let lse = qkv.apply_op1_no_bwd(&FlashStatsOp { heads, scale })?;
    let out = qkv.apply_op2_no_bwd(&lse, &FlashOutOp { heads, scale })?;
    let out_kept = out.clone();
    let backward = move |dout: &Tensor| {
        let dout = dout.to_dtype(qkv.dtype())?.contiguous()?;
        let delta = out_kept.apply_op2_no_bwd(&dout, &FlashDeltaOp { heads })?;
        let stats = Tensor::stack(&[&lse, &delta], 0)?;
        qkv.apply_op3_no_bwd(&dout, &stats, &FlashBwdOp { heads, scale })
    };
    Ok((out, Box::new(backward)))
}

/// Shapes of `qkv` `(B, N, 3·H·Dh)`.
#[derive(Clone, Copy, Debug)]
struct Geo {
    b: usize,
    n: usize,
    h: usize,
    d: usize,
}

impl Geo {
    fn from_layout(l: &Layout, heads: usize) -> candle_core::Result<Self> {
        let (b, n, c3) = l.shape().dims3()?;
        if heads == 0 || c3 % (3 * heads) != 0 || n == 0 {
            candle_core::bail!(
                "flash attention: qkv {:?} is not (B, N ≥ 1, 3 × {heads} × head width)",
                l.dims()
            );
        }
        Ok(Self {
            b,
            n,
            h: heads,
            d: c3 / (3 * heads),
        })
    }
    /// Offset of element 0 of `part` (0 q, 1 k, 2 v) of token `i`, head `h`, item `b` in qkv.
    fn qkv(&self, b: usize, i: usize, part: usize, h: usize) -> usize {
        (((b * self.n + i) * 3 + part) * self.h + h) * self.d
    }
    /// Offset of token `i`, head `h`, item `b` in the output `(B, N, H·Dh)`.
    fn out(&self, b: usize, i: usize, h: usize) -> usize {
        ((b * self.n + i) * self.h + h) * self.d
    }
    /// Offset of row `i` of head `h`, item `b` in the `(B, H, N)` statistics.
    fn stat(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.h + h) * self.n + i
    }
    /// `scale · q_i·k_j` of item `b`, head `h`.
    fn score(&self, x: &[f32], b: usize, h: usize, i: usize, j: usize, scale: f32) -> f32 {
        let (q, k) = (self.qkv(b, i, 0, h), self.qkv(b, j, 1, h));
        scale * (0..self.d).map(|e| x[q + e] * x[k + e]).sum::<f32>()
    }
}

fn f32_only(s: &CpuStorage, what: &str) -> candle_core::Result<()> {
    if s.dtype() != DType::F32 {
        candle_core::bail!(
            "{what}: the CPU implementation takes f32, got {:?}",
            s.dtype()
        );
    }
    Ok(())
}

/// `(B, H, N)` f32 log-sum-exp of the scaled scores per query row.
pub struct FlashStatsOp {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp1 for FlashStatsOp {
    fn name(&self) -> &'static str {
        "flash-attention-stats"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        f32_only(s, self.name())?;
        let g = Geo::from_layout(l, self.heads)?;
        let x = slice(s, l, "qkv")?;
        let mut lse = vec![0f32; g.b * g.h * g.n];
        for b in 0..g.b {
            for h in 0..g.h {
                for i in 0..g.n {
                    let s: Vec<f32> = (0..g.n)
                        .map(|j| g.score(x, b, h, i, j, self.scale))
                        .collect();
                    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    lse[g.stat(b, h, i)] = m + s.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
                }
            }
        }
        Ok((CpuStorage::F32(lse), Shape::from((g.b, g.h, g.n))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::flash_stats(s, l, self.heads, self.scale)
    }
}

/// `(B, N, H·Dh)`: the attention output from qkv and [`FlashStatsOp`]'s statistics.
pub struct FlashOutOp {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp2 for FlashOutOp {
    fn name(&self) -> &'static str {
        "flash-attention-out"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        f32_only(s1, self.name())?;
        let g = Geo::from_layout(l1, self.heads)?;
        let (x, lse) = (slice(s1, l1, "qkv")?, slice(s2, l2, "lse")?);
        let mut out = vec![0f32; g.b * g.n * g.h * g.d];
        for b in 0..g.b {
            for h in 0..g.h {
                for i in 0..g.n {
                    let o = g.out(b, i, h);
                    for j in 0..g.n {
                        let p = (g.score(x, b, h, i, j, self.scale) - lse[g.stat(b, h, i)]).exp();
                        let v = g.qkv(b, j, 2, h);
                        for e in 0..g.d {
                            out[o + e] += p * x[v + e];
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.n, g.h * g.d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::flash_out(s1, l1, s2, l2, self.heads, self.scale)
    }
}

/// `(B, H, N)` f32: `Σ_d dout·out` per row and head, from `out`, `dout` `(B, N, H·Dh)`.
pub struct FlashDeltaOp {
    pub heads: usize,
}

impl CustomOp2 for FlashDeltaOp {
    fn name(&self) -> &'static str {
        "flash-attention-delta"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        f32_only(s1, self.name())?;
        let (b, n, c) = l1.shape().dims3()?;
        let (h, d) = (self.heads, c / self.heads);
        let (o, g) = (slice(s1, l1, "out")?, slice(s2, l2, "dout")?);
        let mut delta = vec![0f32; b * h * n];
        for bi in 0..b {
            for i in 0..n {
                for hi in 0..h {
                    let at = ((bi * n + i) * h + hi) * d;
                    delta[(bi * h + hi) * n + i] =
                        (0..d).map(|e| o[at + e] * g[at + e]).sum::<f32>();
                }
            }
        }
        Ok((CpuStorage::F32(delta), Shape::from((b, h, n))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::flash_delta(s1, l1, s2, l2, self.heads)
    }
}

/// `d qkv` `(B, N, 3·H·Dh)` from qkv, `dout` `(B, N, H·Dh)` and `stats` `(2, B, H, N)` =
/// [lse; delta].
pub struct FlashBwdOp {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp3 for FlashBwdOp {
    fn name(&self) -> &'static str {
        "flash-attention-backward"
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
        f32_only(s1, self.name())?;
        let g = Geo::from_layout(l1, self.heads)?;
        let (x, dout, stats) = (
            slice(s1, l1, "qkv")?,
            slice(s2, l2, "dout")?,
            slice(s3, l3, "stats")?,
        );
        let m = g.b * g.h * g.n;
        let (lse, delta) = stats.split_at(m);
        let mut dx = vec![0f32; x.len()];
        for b in 0..g.b {
            for h in 0..g.h {
                for i in 0..g.n {
                    let st = g.stat(b, h, i);
                    let (o, q) = (g.out(b, i, h), g.qkv(b, i, 0, h));
                    for j in 0..g.n {
                        let p = (g.score(x, b, h, i, j, self.scale) - lse[st]).exp();
                        let (k, v) = (g.qkv(b, j, 1, h), g.qkv(b, j, 2, h));
                        let dp: f32 = (0..g.d).map(|e| dout[o + e] * x[v + e]).sum();
                        let ds = self.scale * p * (dp - delta[st]);
                        for e in 0..g.d {
                            dx[v + e] += p * dout[o + e];
                            dx[q + e] += ds * x[k + e];
                            dx[k + e] += ds * x[q + e];
                        }
                    }
                }
            }
        }
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
        super::cuda::flash_bwd(s1, l1, s2, l2, s3, l3, self.heads, self.scale)
    }
}

/// Attention through the flash ops as one graph node (the path [`super::attention_qkv`] takes
/// where the flash kernels apply: switched on, CUDA, bf16, heads of 64; on the CPU for f32 in
/// the tests).
pub fn attention_flash(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (out, backward) = flash_detached(&qkv.detach(), heads, scale)?;
    super::with_backward(&[qkv], out, move |dout| Ok(vec![Some(backward(dout)?)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::max_diff;
    use candle_core::{Device, Var};

    /// The four flash ops together compute attention: values and `dqkv` against the composed
    /// candle ops, with a head width other than 64 and a token count that is no tile multiple.
    #[test]
    fn flash_ops_equal_composed_attention() -> Result<()> {
        let dev = Device::Cpu;
        for (b, n, h, d) in [(2, 13, 3, 8), (1, 70, 2, 64)] {
            let qkv =
                Var::from_tensor(&(Tensor::randn(0f32, 1.0, (b, n, 3 * h * d), &dev)? * 0.7)?)?;
            let up = Tensor::randn(0f32, 1.0, (b, n, h * d), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let flash = attention_flash(qkv.as_tensor(), h, scale)?;
            let composed = super::super::attention_composed(qkv.as_tensor(), h, scale)?;
            let dv = max_diff(&flash, &composed);
            assert!(dv < 1e-5, "values {dv} at {:?}", (b, n, h, d));
            let g1 = (&flash * &up)?.sum_all()?.backward()?;
            let g2 = (&composed * &up)?.sum_all()?.backward()?;
            let (g1, g2) = (g1.get(&qkv).unwrap(), g2.get(&qkv).unwrap());
            let dg = max_diff(g1, g2);
            let scale_g = g2.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(
                dg < 1e-5 * scale_g.max(1.0),
                "dqkv {dg} (max {scale_g}) at {:?}",
                (b, n, h, d)
            );
            // Every part of dqkv is reached: q, k and v each get a nonzero gradient.
            for part in 0..3 {
                let p = g1
                    .narrow(2, part * h * d, h * d)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                assert!(p > 1e-3, "part {part} of dqkv is {p}");
            }
        }
        Ok(())
    }

    #[test]
    fn flash_is_never_taken_on_the_cpu() -> Result<()> {
        let qkv = Tensor::zeros((1, 4, 3 * 64), DType::BF16, &Device::Cpu)?;
        assert!(!flash_applies(&qkv, 1, false));
        assert!(!flash_applies(&qkv, 1, true));
        Ok(())
    }
}
