//! Multi-head self-attention from the packed qkv projection, fused.
//!
//! Composed, attention is: split and permute q, k, v out of the qkv projection (three copies),
//! `q·kᵀ` (an `N×N` score tensor per head, kept for the backward), softmax (another `N×N`, kept),
//! `·v`, and a transpose back (a copy). The CPU kernel of [`attention_qkv`] reads q, k, v where the
//! projection wrote them and, per batch item and head, computes the probabilities into a scratch
//! `N×N` and `P·V` into the layout the output projection reads, with register-tiled products
//! (`tiles::matmul`) in an AVX2 + FMA instance where the CPU has one (`simd`). Nothing `N×N`
//! outlives the call: the backward recomputes the probabilities per head (the flash-attention
//! trade) and writes `dqkv` in the packed layout.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::tiles::{self, View};
use super::{is_fusable, simd, slice};
use crate::{AttentionBackward, Result};

/// Attention of `qkv` `(B, N, 3·H·Dh)` (the qkv projection's output, per token `[q | k | v]`, each
/// `H` heads of `Dh`), `softmax(scale · q·kᵀ)·v` per head, as `(B, N, H·Dh)` (heads concatenated).
///
/// bf16 on CUDA with 64-wide heads runs the flash kernels where `flash` asks for them (the
/// model's choice at build time, `run.flash_attention`); f32 on the CPU runs the fused kernel
/// ([`attention_qkv_kernel`]); everything else (CUDA, bf16) [`attention_gemm`]: on an H200 the
/// CUDA twin of the fused kernel (scalar FMAs, a warp per query row) was slower than cuBLAS
/// matmuls at ViT sizes.
pub fn attention_qkv(qkv: &Tensor, heads: usize, scale: f64, flash: bool) -> Result<Tensor> {
    head_dim(qkv, heads)?;
    if super::flash::flash_applies(qkv, heads, flash) {
        return super::attention_flash(qkv, heads, scale);
    }
    if qkv.device().is_cpu() {
        if let Some(out) = attention_qkv_kernel(qkv, heads, scale)? {
            return Ok(out);
        }
    }
    attention_gemm(qkv, heads, scale)
}

fn head_dim(qkv: &Tensor, heads: usize) -> Result<usize> {
    let (_, _, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        return Err(crate::Error::msg(format!(
            "attention: qkv width {c3} is not 3 × {heads} heads × head width"
        )));
    }
    Ok(c3 / (3 * heads))
}

/// The fused attention kernel (CPU f32, or CUDA f32 with the kernels on and heads ≤ 128 wide);
/// `None` where it does not apply.
pub fn attention_qkv_kernel(qkv: &Tensor, heads: usize, scale: f64) -> Result<Option<Tensor>> {
    let geo = Geometry::of(qkv, heads, scale)?;
    // The CUDA kernel: a warp per query row holds ≤ 128 head dims; items × heads is grid.y.
    let cuda_ok =
        !qkv.device().is_cuda() || (geo.d <= super::cuda_max_head_dim() && geo.b * heads <= 65_535);
    if !(is_fusable(&[qkv]) && cuda_ok) {
        return Ok(None);
    }
    Ok(Some(qkv.contiguous()?.apply_op1(AttentionOp(geo))?))
}

/// Attention through matmuls (cuBLAS on CUDA) as ONE autograd node with a hand-written backward.
///
/// [`attention_composed`] is ~17 candle ops, and candle's backward pays for every op: each input
/// gradient starts as a zero tensor that the op's gradient is added to, `narrow` pads its gradient
/// back to full size with zeros, and the dtype casts around the f32 softmax each add two passes over
/// the `N×N` probabilities. An H200 profile of ViT-B/16 RESPIX in bf16 spent 28% of the step in
/// bf16 additions alone. Here the forward runs on detached tensors (nothing recorded) and keeps
/// q, k, v and the probabilities; one [`super::with_backward`] node hands the output to the graph,
/// and its backward is the textbook one: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P ⊙ (dP − Σ dP ⊙ P)`,
/// `dQ = scale · dS·K`, `dK = dSᵀ·(scale · Q)`, packed into `dqkv`'s layout in one copy. The
/// softmax and its backward compute in f32 whatever the dtype; with bf16 the fused kernels read
/// and write bf16 (no f32 copies of the `N×N` tensors).
pub fn attention_gemm(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (out, backward) = gemm_detached(&qkv.detach(), heads, scale)?;
    super::with_backward(&[qkv], out, move |dout| Ok(vec![Some(backward(dout)?)]))
}

/// Attention of a detached `qkv` and its backward, for callers that graft a larger sub-graph
/// (a whole transformer block, [`super::pre_norm_block`]): the fused kernel on the CPU in f32
/// (nothing `N×N` kept; the backward recomputes the probabilities), [`attention_gemm`]'s matmuls
/// elsewhere.
pub(crate) fn attention_detached(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    flash: bool,
) -> Result<(Tensor, AttentionBackward)> {
    if super::flash::flash_applies(qkv, heads, flash) {
        return super::flash::flash_detached(qkv, heads, scale);
    }
    if qkv.device().is_cpu() && is_fusable(&[qkv]) {
        let geo = Geometry::of(qkv, heads, scale)?;
        let qkv = qkv.contiguous()?;
        let out = qkv.apply_op1_no_bwd(&AttentionOp(geo))?;
        let backward =
            move |dout: &Tensor| qkv.apply_op2_no_bwd(&dout.contiguous()?, &AttentionBwdOp(geo));
        return Ok((out, Box::new(backward)));
    }
    gemm_detached(qkv, heads, scale)
}

/// [`attention_gemm`]'s forward on a detached `qkv`, keeping q, k, v and the probabilities for
/// its backward; on CUDA at [`aligned_rows`].
fn gemm_detached(qkv: &Tensor, heads: usize, scale: f64) -> Result<(Tensor, AttentionBackward)> {
    let rows = aligned_rows(qkv)?;
    gemm_detached_rows(qkv, heads, scale, rows)
}

/// The per-head row count of GEMM attention: on CUDA (kernels on, f32 or bf16) the token count
/// rounded up to a multiple of 8, so that every attention GEMM has 16-byte aligned leading
/// dimensions (at 197 tokens cuBLAS ran cutlass `align1` kernels for all six per block: 16.7 ms of
/// a bf16 ViT-B/16 step on an H200); elsewhere the token count.
fn aligned_rows(qkv: &Tensor) -> Result<usize> {
    let n = qkv.dim(1)?;
    let padded = super::kernels_on_cuda(qkv) && matches!(qkv.dtype(), DType::F32 | DType::BF16);
    Ok(if padded { n.next_multiple_of(8) } else { n })
}

/// GEMM attention with `rows ≥ N` rows per head: q, k, v padded with zero rows (q pre-scaled),
/// the scores' softmax over the N real keys only (the padding keys get probability 0), and only
/// the N real rows copied back. Padding query rows see zero gradients, so the result and the
/// gradient equal the unpadded computation's.
fn gemm_detached_rows(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    rows: usize,
) -> Result<(Tensor, AttentionBackward)> {
    head_dim(qkv, heads)?; // checks the width
    let n = qkv.dim(1)?;
    // The head layout changes are one copy each (`super::heads`), the scale folded into them.
    let parts = super::heads::split_qkv_padded(qkv, heads, rows, scale)?; // (3, B, H, rows, hd)
    let (q, k, v) = (parts.get(0)?, parts.get(1)?, parts.get(2)?);
    let p = softmax_native(&q.matmul(&k.t()?)?, n)?;
    let out = super::heads::merge_heads_rows(&p.matmul(&v)?, n)?;
    let backward = move |dout: &Tensor| {
        let g = super::heads::split_heads_padded(dout, heads, rows)?;
        let dv = p.t()?.matmul(&g)?;
        let ds = softmax_backward(&p, &g.matmul(&v.t()?)?)?;
        // q is pre-scaled: dk = dsᵀ·(scale·q); dq = scale·ds·k, the scale applied in the copy.
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        super::heads::merge_qkv_rows(&dq, &dk, &dv, n, scale)
    };
    Ok((out, Box::new(backward)))
}

/// Softmax of the scores over their first `valid` columns (the rest 0) in the scores' own dtype
/// where a kernel takes it (bf16 storage, f32 arithmetic: no f32 copy of the `N×N` scores), else
/// through f32.
fn softmax_native(s: &Tensor, valid: usize) -> Result<Tensor> {
    if matches!(s.dtype(), DType::BF16 | DType::F32) && super::fusable_device(s) {
        let op = super::SoftmaxOp { valid: Some(valid) };
        return s.contiguous()?.apply_op1_no_bwd(&op);
    }
    let w = s.dim(candle_core::D::Minus1)?;
    let y = super::softmax_last_dim(
        &s.narrow(candle_core::D::Minus1, 0, valid)?
            .to_dtype(DType::F32)?,
    )?
    .to_dtype(s.dtype())?;
    y.pad_with_zeros(candle_core::D::Minus1, 0, w - valid)
}

/// `P ⊙ (dP − Σ dP ⊙ P)` over the last dimension, in f32 arithmetic, returned in `p`'s dtype
/// (bf16 read and written by the kernel directly).
fn softmax_backward(p: &Tensor, dp: &Tensor) -> candle_core::Result<Tensor> {
    if p.dtype() == DType::BF16 && dp.dtype() == DType::BF16 && super::fusable_device(p) {
        return p
            .contiguous()?
            .apply_op2_no_bwd(&dp.contiguous()?, &super::SoftmaxBwdOp);
    }
    let (p32, g32) = (
        p.to_dtype(DType::F32)?.contiguous()?,
        dp.to_dtype(DType::F32)?.contiguous()?,
    );
    let ds = if is_fusable(&[&p32]) {
        p32.apply_op2_no_bwd(&g32, &super::SoftmaxBwdOp)?
    } else {
        let dot = (&p32 * &g32)?.sum_keepdim(candle_core::D::Minus1)?;
        (&p32 * g32.broadcast_sub(&dot)?)?
    };
    ds.to_dtype(p.dtype())
}

/// The same function from candle ops (matmuls and the fused softmax; softmax in f32).
pub fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let hd = c3 / (3 * heads);
    let qkv = qkv
        .reshape((b, n, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?; // (3, B, H, N, hd)
    let q = (qkv.get(0)?.contiguous()? * scale)?;
    let k = qkv.get(1)?.contiguous()?;
    let v = qkv.get(2)?.contiguous()?;
    let attn = q.matmul(&k.t()?)?;
    let attn =
        super::softmax_last_dim(&attn.to_dtype(candle_core::DType::F32)?)?.to_dtype(v.dtype())?;
    attn.matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, n, heads * hd))
}

/// Shapes of one fused attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub d: usize,
    pub scale: f32,
}

impl Geometry {
    /// `[B, N, H, Dh]` as the CUDA kernels take them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn args(&self) -> [i32; 4] {
        [self.b as i32, self.n as i32, self.h as i32, self.d as i32]
    }
    /// The geometry of `qkv` `(B, N, 3·H·Dh)` split into `heads` heads.
    fn of(qkv: &Tensor, heads: usize, scale: f64) -> Result<Self> {
        let (b, n, _) = qkv.dims3()?;
        Ok(Self {
            b,
            n,
            h: heads,
            d: head_dim(qkv, heads)?,
            scale: scale as f32,
        })
    }
    /// Offset of q (`part` 0), k (1) or v (2) of token `t`, head `head` inside one batch item.
    #[inline]
    fn qkv(&self, t: usize, part: usize, head: usize) -> usize {
        ((t * 3 + part) * self.h + head) * self.d
    }
    /// Elements per token of the packed qkv (`3·H·Dh`).
    #[inline]
    fn row(&self) -> usize {
        3 * self.h * self.d
    }
    /// Offset of the output of token `t`, head `head` inside one batch item.
    #[inline]
    fn out(&self, t: usize, head: usize) -> usize {
        (t * self.h + head) * self.d
    }
}

/// Copies part `part` (1: k, 2: v) of head `head` transposed, `(Dh, N)`, into `out`.
#[inline(always)]
fn gather_t(g: &Geometry, item: &[f32], part: usize, head: usize, out: &mut [f32]) {
    let (d, n) = (g.d, g.n);
    for t in 0..n {
        let src = &item[g.qkv(t, part, head)..][..d];
        for (c, &x) in src.iter().enumerate() {
            out[c * n + t] = x;
        }
    }
}

/// The probabilities of one head, `(N, N)` into `p`: `scale · Q·Kᵀ` as a tiled product (q read
/// in place, k transposed into `kt`), then the softmax of every row.
#[inline(always)]
fn head_probs<const FAST: bool>(
    g: &Geometry,
    item: &[f32],
    head: usize,
    kt: &mut [f32],
    p: &mut [f32],
) {
    let (n, d) = (g.n, g.d);
    gather_t(g, item, 1, head, kt);
    let q = View::rows(&item[g.qkv(0, 0, head)..], g.row());
    tiles::matmul::<FAST>((n, n, d), g.scale, q, kt, n, p, n);
    // A plain loop: iterator adaptors are not `inline(always)`, and would compile the softmax
    // outside the AVX2 instance.
    for row in p.chunks_exact_mut(n) {
        tiles::softmax_row(row, 1.0);
    }
}

/// Forward of one batch item: per head, `P = softmax(scale · Q·Kᵀ)` (`N×N`, scratch only) and
/// `O = P·V` (v read in place, o written in the output projection's layout).
struct ForwardItem<'a> {
    g: Geometry,
    item: &'a [f32],
    out: &'a mut [f32],
}

impl simd::Kernel for ForwardItem<'_> {
    type Output = ();
    #[inline(always)]
    fn call<const FAST: bool>(self) {
        let Self { g, item, out } = self;
        let (n, d) = (g.n, g.d);
        let (mut kt, mut p) = (vec![0f32; d * n], vec![0f32; n * n]);
        for head in 0..g.h {
            head_probs::<FAST>(&g, item, head, &mut kt, &mut p);
            let v = &item[g.qkv(0, 2, head)..];
            let o = &mut out[g.out(0, head)..];
            tiles::matmul::<FAST>((n, d, n), 1.0, View::rows(&p, n), v, g.row(), o, g.h * d);
        }
    }
}

/// Backward of one batch item, recomputing the probabilities per head: `dP = dO·Vᵀ`,
/// `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ = dS·K`, `dK = dSᵀ·Q`, `dV = Pᵀ·dO`, written into
/// `dqkv`'s packed layout.
struct BackwardItem<'a> {
    g: Geometry,
    item: &'a [f32],
    dout: &'a [f32],
    dx: &'a mut [f32],
}

impl simd::Kernel for BackwardItem<'_> {
    type Output = ();
    #[inline(always)]
    fn call<const FAST: bool>(self) {
        let Self { g, item, dout, dx } = self;
        let (n, d, row, orow) = (g.n, g.d, g.row(), g.h * g.d);
        let (mut kt, mut vt) = (vec![0f32; d * n], vec![0f32; d * n]);
        let (mut p, mut ds) = (vec![0f32; n * n], vec![0f32; n * n]);
        for head in 0..g.h {
            head_probs::<FAST>(&g, item, head, &mut kt, &mut p);
            gather_t(&g, item, 2, head, &mut vt);
            let do_h = &dout[g.out(0, head)..];
            tiles::matmul::<FAST>((n, n, d), 1.0, View::rows(do_h, orow), &vt, n, &mut ds, n);
            for (ds, p) in ds.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
                let big_d = tiles::dot::<FAST>(p, ds);
                for (x, &pj) in ds.iter_mut().zip(p) {
                    *x = pj * (*x - big_d) * g.scale;
                }
            }
            let (q0, k0, v0) = (g.qkv(0, 0, head), g.qkv(0, 1, head), g.qkv(0, 2, head));
            let dsv = View::rows(&ds, n);
            tiles::matmul::<FAST>((n, d, n), 1.0, dsv, &item[k0..], row, &mut dx[q0..], row);
            let dst = View::transposed(&ds, n);
            tiles::matmul::<FAST>((n, d, n), 1.0, dst, &item[q0..], row, &mut dx[k0..], row);
            let pt = View::transposed(&p, n);
            tiles::matmul::<FAST>((n, d, n), 1.0, pt, do_h, orow, &mut dx[v0..], row);
        }
    }
}

struct AttentionOp(Geometry);

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "cim-attention"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let qkv = slice(s, l, "qkv")?;
        let (n, d, h) = (g.n, g.d, g.h);
        let mut out = vec![0f32; g.b * n * h * d];
        out.par_chunks_mut(n * h * d)
            .zip(qkv.par_chunks(g.row() * n))
            .for_each(|(out, item)| simd::run(ForwardItem { g, item, out }));
        Ok((CpuStorage::F32(out), Shape::from((g.b, n, h * d))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::attention_fwd(s, l, self.0.args(), self.0.scale)
    }
    fn bwd(
        &self,
        qkv: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(
            &dout.contiguous()?,
            &AttentionBwdOp(self.0),
        )?))
    }
}

/// `d qkv` from `qkv` and `d out`, recomputing the probabilities.
struct AttentionBwdOp(Geometry);

impl CustomOp2 for AttentionBwdOp {
    fn name(&self) -> &'static str {
        "cim-attention-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (qkv, dout) = (slice(s1, l1, "qkv")?, slice(s2, l2, "grad")?);
        let (n, d, h) = (g.n, g.d, g.h);
        let mut dqkv = vec![0f32; qkv.len()];
        dqkv.par_chunks_mut(g.row() * n)
            .zip(qkv.par_chunks(g.row() * n).zip(dout.par_chunks(n * h * d)))
            .for_each(|(dx, (item, dout))| simd::run(BackwardItem { g, item, dout, dx }));
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::attention_bwd(s1, l1, s2, l2, self.0.args(), self.0.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::{Var, D};

    /// GEMM attention with padded head rows (CUDA's aligned layout: zero rows, the softmax over
    /// the real keys only, the scale folded into the copies) equals the unpadded computation and
    /// the composed ops, values and `d qkv`; the CPU runs the same copies and masked softmax.
    #[test]
    fn padded_gemm_attention_equals_unpadded() -> Result<()> {
        let (b, n, h, d) = (2, 13, 3, 8);
        let qkv = randn(&[b, n, 3 * h * d], 11);
        let dout = randn(&[b, n, h * d], 12);
        let scale = 1.0 / (d as f64).sqrt();
        let (y0, bwd0) = gemm_detached_rows(&qkv, h, scale, n)?;
        let want = attention_composed(&qkv, h, scale)?;
        assert!(max_diff(&y0, &want) < 1e-5, "unpadded vs composed");
        let g0 = bwd0(&dout)?;
        for rows in [16, 21] {
            let (y, bwd) = gemm_detached_rows(&qkv, h, scale, rows)?;
            assert_eq!(y.dims(), [b, n, h * d]);
            let diff = max_diff(&y, &y0);
            assert!(diff < 1e-6, "{rows} rows: value {diff}");
            let g = bwd(&dout)?;
            assert_eq!(g.dims(), qkv.dims());
            let diff = max_diff(&g, &g0);
            assert!(diff < 1e-6, "{rows} rows: d qkv {diff}");
        }
        // The padded probabilities give the padding keys nothing and sum to one over the rest.
        let parts = super::super::heads::split_qkv_padded(&qkv, h, 16, scale)?;
        let p = softmax_native(&parts.get(0)?.matmul(&parts.get(1)?.t()?)?, n)?;
        let pad: f32 = p
            .narrow(D::Minus1, n, 16 - n)?
            .abs()?
            .sum_all()?
            .to_scalar()?;
        assert_eq!(pad, 0.0);
        let sums = p.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        Ok(())
    }

    #[test]
    fn fused_attention_matches_composed_values_and_gradients() -> Result<()> {
        // Odd sizes: 3 items, 13 tokens, 2 heads of 12 (not a multiple of the 8-wide dot).
        let (b, n, h, d) = (3, 13, 2, 12);
        let qkv = Var::from_tensor(&randn(&[b, n, 3 * h * d], 1))?;
        let up = randn(&[b, n, h * d], 2);
        let scale = 1.0 / (d as f64).sqrt();
        let f = attention_qkv(&qkv, h, scale, false)?;
        let c = attention_composed(&qkv, h, scale)?;
        assert_eq!(f.dims(), [b, n, h * d]);
        assert!(max_diff(&f, &c) < 1e-5, "{}", max_diff(&f, &c));
        let gf = (&f * &up)?.sum_all()?.backward()?;
        let gc = (&c * &up)?.sum_all()?.backward()?;
        let (gf, gc) = (gf.get(&qkv).unwrap(), gc.get(&qkv).unwrap());
        let dg = max_diff(gf, gc);
        assert!(dg < 1e-4, "gradient differs by {dg}");
        // q, k and v parts all receive gradient.
        for part in 0..3 {
            let s = gf
                .narrow(D::Minus1, part * h * d, h * d)?
                .abs()?
                .max_all()?;
            assert!(s.to_scalar::<f32>()? > 1e-3, "part {part}");
        }
        let e = attention_qkv(&qkv, 5, scale, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("qkv width 72"), "{e}");
        Ok(())
    }

    /// The kernel's portable and AVX2 + FMA instances (called directly: the dispatch picks one)
    /// agree, forward and backward; the dispatched one is checked against the composed ops above.
    #[test]
    fn both_kernel_instances_agree() -> Result<()> {
        use simd::Kernel;
        let (n, h, d) = (21, 3, 10);
        let g = Geometry::of(&randn(&[1, n, 3 * h * d], 0), h, 0.3)?;
        let qkv: Vec<f32> = randn(&[n * 3 * h * d], 6).to_vec1()?;
        let dout: Vec<f32> = randn(&[n * h * d], 7).to_vec1()?;
        let run = |fast: bool| {
            let (mut out, mut dx) = (vec![0f32; n * h * d], vec![0f32; qkv.len()]);
            let fwd = ForwardItem {
                g,
                item: &qkv,
                out: &mut out,
            };
            let bwd = BackwardItem {
                g,
                item: &qkv,
                dout: &dout,
                dx: &mut dx,
            };
            if fast {
                fwd.call::<true>();
                bwd.call::<true>();
            } else {
                fwd.call::<false>();
                bwd.call::<false>();
            }
            (out, dx)
        };
        let ((o1, d1), (o2, d2)) = (run(false), run(true));
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(worst(&o1, &o2) < 1e-5, "forward {}", worst(&o1, &o2));
        assert!(worst(&d1, &d2) < 1e-5, "backward {}", worst(&d1, &d2));
        assert!(d1.iter().any(|x| x.abs() > 1e-3));
        Ok(())
    }

    /// The one-node GEMM attention: values and gradients equal the composed ops, in f32 and (with
    /// bf16 tolerances) in bf16; untracked input gives a plain tensor.
    #[test]
    fn gemm_attention_matches_composed_values_and_gradients() -> Result<()> {
        let (b, n, h, d) = (3, 13, 2, 12);
        let scale = 1.0 / (d as f64).sqrt();
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 0.06)] {
            let qkv = Var::from_tensor(&randn(&[b, n, 3 * h * d], 3).to_dtype(dtype)?)?;
            let up = randn(&[b, n, h * d], 4).to_dtype(dtype)?;
            let g = attention_gemm(&qkv, h, scale)?;
            let c = attention_composed(&qkv, h, scale)?;
            assert_eq!((g.dims(), g.dtype()), (c.dims(), dtype));
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            assert!(max_diff(&f32s(&g), &f32s(&c)) < tol, "{dtype:?} value");
            let gg = (&g * &up)?.sum_all()?.backward()?;
            let gc = (&c * &up)?.sum_all()?.backward()?;
            let (gg, gc) = (f32s(gg.get(&qkv).unwrap()), f32s(gc.get(&qkv).unwrap()));
            let scale_g = gc.abs()?.max_all()?.to_scalar::<f32>()?;
            let dg = max_diff(&gg, &gc);
            assert!(
                dg < tol * scale_g.max(1.0),
                "{dtype:?}: gradient differs by {dg}"
            );
        }
        let plain = attention_gemm(&randn(&[1, 4, 6], 5), 1, 1.0)?;
        assert!(!plain.track_op());
        Ok(())
    }
}
