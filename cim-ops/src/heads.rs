//! The head layout changes of GEMM attention, as one copy each: the packed qkv projection
//! `(B, N, 3·H·hd)` into per-head `q`, `k`, `v` `(3, B, H, N, hd)`; the per-head output `(B, H, N,
//! hd)` back to tokens `(B, N, H·hd)` and the output gradient the other way; and the three
//! per-head gradients into the packed `d qkv`.
//!
//! Composed from candle ops these are permute + contiguous copies (and, for the gradients, a
//! `stack` and then a second copy): on an H200, a ViT-B/16 profile (2026-11-27) had 67 strided bf16
//! copies per step taking 29 ms (`ucopy_bf16`, ~0.4 ms per ~100 MB, a fraction of the memory
//! bandwidth). Here one pass each, one element per thread, consecutive threads on consecutive
//! head-dimension elements (f32 or bf16 storage, a plain copy). Forward only: callers graft them
//! into detached attention ([`super::attention_gemm`], the block node).
//!
//! The `_padded`/`_rows` forms give the per-head side more rows than tokens (zero rows after the
//! tokens) and fold the score scale into q and dq: at 197 tokens every attention GEMM
//! of an H200 profile (2026-11-27) ran a cutlass `align1` kernel (an odd leading dimension; 16.7 ms
//! per ViT-B/16 step), and the scale was a separate pass over q and over dq (`affine_bf16`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use crate::Result;

/// `(B, N, 3·H·hd)` → `(3, B, H, N, hd)`, contiguous.
pub fn split_qkv(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    split_qkv_padded(qkv, heads, qkv.dim(1)?, 1.0)
}

/// `(B, N, 3·H·hd)` → `(3, B, H, rows, hd)` with rows `N..rows` zero and `q` (part 0) multiplied
/// by `q_scale`: GEMM attention's operands at an aligned row count, the score scale applied in the
/// same pass.
pub fn split_qkv_padded(qkv: &Tensor, heads: usize, rows: usize, q_scale: f64) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 || rows < n {
        return Err(crate::Error::msg(format!(
            "split_qkv: width {c3} is not 3 × {heads} heads, or {rows} rows < {n} tokens"
        )));
    }
    let hd = c3 / (3 * heads);
    let op = Heads::Split {
        parts: 3,
        heads,
        hd,
        rows,
        scale: q_scale as f32,
    };
    if applies(&[qkv]) {
        return qkv.contiguous()?.apply_op1_no_bwd(&op);
    }
    let p = qkv
        .reshape((b, n, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?;
    let p = p.pad_with_zeros(3, 0, rows - n)?;
    scale_first(&p, q_scale)?.contiguous()
}

/// `(B, N, H·hd)` → `(B, H, N, hd)`, contiguous (the inverse of [`merge_heads`]).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    split_heads_padded(x, heads, x.dim(1)?)
}

/// `(B, N, H·hd)` → `(B, H, rows, hd)`, rows `N..rows` zero.
pub fn split_heads_padded(x: &Tensor, heads: usize, rows: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 || rows < n {
        return Err(crate::Error::msg(format!(
            "split_heads: width {c} is not a multiple of {heads} heads, or {rows} rows < {n} tokens"
        )));
    }
    let hd = c / heads;
    if applies(&[x]) {
        let op = Heads::Split {
            parts: 1,
            heads,
            hd,
            rows,
            scale: 1.0,
        };
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    x.reshape((b, n, heads, hd))?
        .transpose(1, 2)?
        .pad_with_zeros(2, 0, rows - n)?
        .contiguous()
}

/// `(B, H, N, hd)` → `(B, N, H·hd)`, contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    merge_heads_rows(x, x.dim(2)?)
}

/// `(B, H, rows, hd)` → `(B, n, H·hd)` from the first `n` rows of each head.
pub fn merge_heads_rows(x: &Tensor, n: usize) -> Result<Tensor> {
    let (b, h, rows, hd) = x.dims4()?;
    if n > rows {
        return Err(crate::Error::msg(format!(
            "merge_heads: {n} tokens from {rows} rows"
        )));
    }
    if applies(&[x]) {
        let op = Heads::Merge { n, scale: 1.0 };
        return x.contiguous()?.apply_op1_no_bwd(&op);
    }
    x.narrow(2, 0, n)?.transpose(1, 2)?.reshape((b, n, h * hd))
}

/// `dq`, `dk`, `dv` `(B, H, N, hd)` → the packed `(B, N, 3·H·hd)` (the layout of `split_qkv`'s
/// input), contiguous.
pub fn merge_qkv(dq: &Tensor, dk: &Tensor, dv: &Tensor) -> Result<Tensor> {
    merge_qkv_rows(dq, dk, dv, dq.dim(2)?, 1.0)
}

/// `dq`, `dk`, `dv` `(B, H, rows, hd)` → the packed `(B, n, 3·H·hd)` from the first `n` rows, `dq`
/// multiplied by `dq_scale`.
pub fn merge_qkv_rows(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    n: usize,
    dq_scale: f64,
) -> Result<Tensor> {
    let (b, h, rows, hd) = dq.dims4()?;
    if dk.dims() != dq.dims() || dv.dims() != dq.dims() || n > rows {
        return Err(crate::Error::msg(format!(
            "merge_qkv: {:?}, {:?}, {:?} differ, or {n} tokens from {rows} rows",
            dq.dims(),
            dk.dims(),
            dv.dims()
        )));
    }
    if applies(&[dq, dk, dv]) {
        let (dq, dk, dv) = (dq.contiguous()?, dk.contiguous()?, dv.contiguous()?);
        let op = Heads::Merge {
            n,
            scale: dq_scale as f32,
        };
        return dq.apply_op3_no_bwd(&dk, &dv, &op);
    }
    let packed = scale_first(&Tensor::stack(&[dq, dk, dv], 0)?, dq_scale)?;
    packed
        .narrow(3, 0, n)?
        .permute((1, 3, 0, 2, 4))?
        .reshape((b, n, 3 * h * hd))
}

/// `t` with its first entry along dimension 0 multiplied by `scale` (the composed paths).
fn scale_first(t: &Tensor, scale: f64) -> Result<Tensor> {
    if scale == 1.0 {
        return Ok(t.clone());
    }
    let first = (t.narrow(0, 0, 1)? * scale)?;
    let rest = t.narrow(0, 1, t.dim(0)? - 1)?;
    Tensor::cat(&[&first, &rest], 0)
}

/// The kernels run for f32/bf16 tensors of one dtype on the CPU and (kernels on) on CUDA.
fn applies(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    matches!(dtype, DType::F32 | DType::BF16)
        && ts.iter().all(|t| t.dtype() == dtype)
        && ts.iter().all(|t| super::kernels_run_on(t.device()))
        && ts.iter().all(|t| t.device().same_device(ts[0].device()))
}

#[derive(Clone, Copy, Debug)]
enum Heads {
    /// `(B, N, parts·H·hd)` → `(parts, B, H, rows, hd)`: [`split_qkv_padded`] (3 parts),
    /// [`split_heads_padded`] (1); part 0 times `scale`.
    Split {
        parts: usize,
        heads: usize,
        hd: usize,
        rows: usize,
        scale: f32,
    },
    /// One or three `(B, H, rows, hd)` → `(B, n, parts·H·hd)`: [`merge_heads_rows`],
    /// [`merge_qkv_rows`]; the first input times `scale`.
    Merge { n: usize, scale: f32 },
}

impl Heads {
    fn out_shape(&self, in_dims: &[usize], inputs: usize) -> Shape {
        match *self {
            Heads::Split {
                parts,
                heads,
                hd,
                rows,
                ..
            } => match parts {
                3 => Shape::from((3, in_dims[0], heads, rows, hd)),
                _ => Shape::from((in_dims[0], heads, rows, hd)),
            },
            Heads::Merge { n, .. } => {
                Shape::from((in_dims[0], n, inputs * in_dims[1] * in_dims[3]))
            }
        }
    }

    /// The CPU copy: `out[i] = srcs[src(i)][idx(i)]` (zero for padding rows), the CUDA kernels'
    /// index arithmetic; `scaled` multiplies a row of part 0.
    fn copy<T: Copy + Default>(
        &self,
        srcs: &[&[T]],
        in_dims: &[usize],
        out: &mut [T],
        scaled: impl Fn(&mut [T], &[T]),
    ) {
        match *self {
            Heads::Split {
                parts,
                heads,
                hd,
                rows,
                scale,
            } => {
                let (b, n) = (in_dims[0], in_dims[1]);
                // out (parts, B, H, rows, hd) ← in (B, N, parts, H, hd)
                let mut i = 0;
                for s in 0..parts {
                    for bb in 0..b {
                        for h in 0..heads {
                            for t in 0..rows {
                                let o = &mut out[i..i + hd];
                                if t >= n {
                                    o.fill(T::default());
                                } else {
                                    let at = (((bb * n + t) * parts + s) * heads + h) * hd;
                                    let src = &srcs[0][at..at + hd];
                                    match s == 0 && scale != 1.0 {
                                        true => scaled(o, src),
                                        false => o.copy_from_slice(src),
                                    }
                                }
                                i += hd;
                            }
                        }
                    }
                }
            }
            Heads::Merge { n, scale } => {
                let (b, h, rows, hd) = (in_dims[0], in_dims[1], in_dims[2], in_dims[3]);
                // out (B, n, [3,] H, hd) ← in (B, H, rows, hd)
                let mut i = 0;
                for bb in 0..b {
                    for t in 0..n {
                        for (s, src) in srcs.iter().enumerate() {
                            for hh in 0..h {
                                let at = ((bb * h + hh) * rows + t) * hd;
                                let (o, src) = (&mut out[i..i + hd], &src[at..at + hd]);
                                match s == 0 && scale != 1.0 {
                                    true => scaled(o, src),
                                    false => o.copy_from_slice(src),
                                }
                                i += hd;
                            }
                        }
                    }
                }
            }
        }
    }

    fn scale(&self) -> f32 {
        match *self {
            Heads::Split { scale, .. } | Heads::Merge { scale, .. } => scale,
        }
    }

    fn cpu(&self, srcs: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = srcs[0].1.dims().to_vec();
        let shape = self.out_shape(&dims, srcs.len());
        let n = shape.elem_count();
        let g = self.scale();
        macro_rules! run {
            ($t:ty, $variant:ident, $scaled:expr) => {{
                let slices = srcs
                    .iter()
                    .map(|(s, l)| {
                        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                            candle_core::Error::Msg("head copy: input must be contiguous".into())
                        })?;
                        Ok(&s.as_slice::<$t>()?[a..b])
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let mut out = vec![<$t>::default(); n];
                self.copy(&slices, &dims, &mut out, $scaled);
                CpuStorage::$variant(out)
            }};
        }
        let out = match srcs[0].0.dtype() {
            DType::F32 => run!(f32, F32, |o: &mut [f32], s: &[f32]| {
                o.iter_mut().zip(s).for_each(|(o, &v)| *o = v * g)
            }),
            DType::BF16 => run!(
                half::bf16,
                BF16,
                |o: &mut [half::bf16], s: &[half::bf16]| {
                    o.iter_mut()
                        .zip(s)
                        .for_each(|(o, &v)| *o = half::bf16::from_f32(v.to_f32() * g))
                }
            ),
            dt => candle_core::bail!("head copy: no kernel for {dt:?}"),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        srcs: &[(&candle_core::CudaStorage, &Layout)],
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let d = srcs[0].1.dims();
        let shape = self.out_shape(d, srcs.len());
        let (kernel, g) = match *self {
            // in (B, N, parts·H·hd)
            Heads::Split {
                parts,
                heads,
                hd,
                rows,
                scale,
            } => (
                if parts == 3 {
                    "cim_split_qkv"
                } else {
                    "cim_split_heads"
                },
                super::cuda::HeadGeometry {
                    b: d[0],
                    n: d[1],
                    h: heads,
                    hd,
                    rows,
                    scale,
                },
            ),
            // in (B, H, rows, hd)
            Heads::Merge { n, scale } => (
                if srcs.len() == 3 {
                    "cim_merge_qkv"
                } else {
                    "cim_merge_heads"
                },
                super::cuda::HeadGeometry {
                    b: d[0],
                    n,
                    h: d[1],
                    hd: d[3],
                    rows: d[2],
                    scale,
                },
            ),
        };
        super::cuda::head_copy(kernel, srcs, shape, g)
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "cim-head-layout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(&[(s, l)])
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(&[(s, l)])
    }
}

impl CustomOp3 for Heads {
    fn name(&self) -> &'static str {
        "cim-head-layout-qkv"
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
        self.cpu(&[(s1, l1), (s2, l2), (s3, l3)])
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
        self.cuda(&[(s1, l1), (s2, l2), (s3, l3)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{bits, randn};

    /// Each copy equals candle's permute/stack composition exactly (f32 and bf16, odd sizes),
    /// and split then merge gives the packed tensor back.
    #[test]
    fn head_copies_equal_candles_permutes() -> Result<()> {
        let (b, n, h, hd) = (2, 5, 3, 4);
        for dt in [DType::F32, DType::BF16] {
            let qkv = randn(&[b, n, 3 * h * hd], 1).to_dtype(dt)?;
            let parts = split_qkv(&qkv, h)?;
            let want = qkv
                .reshape((b, n, 3, h, hd))?
                .permute((2, 0, 3, 1, 4))?
                .contiguous()?;
            assert_eq!(parts.dims(), [3, b, h, n, hd]);
            assert_eq!(bits(&parts), bits(&want), "split {dt:?}");
            let (q, k, v) = (parts.get(0)?, parts.get(1)?, parts.get(2)?);
            let merged = merge_heads(&q)?;
            let want = q.transpose(1, 2)?.reshape((b, n, h * hd))?;
            assert_eq!(merged.dims(), [b, n, h * hd]);
            assert_eq!(bits(&merged), bits(&want), "merge {dt:?}");
            let back = split_heads(&merged, h)?;
            assert_eq!(back.dims(), [b, h, n, hd]);
            assert_eq!(bits(&back), bits(&q), "split_heads {dt:?}");
            let packed = merge_qkv(&q, &k, &v)?;
            assert_eq!(packed.dims(), qkv.dims());
            assert_eq!(bits(&packed), bits(&qkv), "split then merge_qkv {dt:?}");
        }
        assert!(split_qkv(&randn(&[1, 2, 10], 2), 3).is_err());
        Ok(())
    }

    /// The padded forms: zero rows after the tokens, part 0 scaled (exactly, by a power of two),
    /// the merges reading the first `n` rows; the kernels (CPU) equal the composed fallbacks (f16
    /// takes them), and split then merge gives the packed tensor back.
    #[test]
    fn padded_copies_pad_scale_and_round_trip() -> Result<()> {
        let (b, n, h, hd, rows) = (2, 5, 3, 4, 8);
        let qkv = randn(&[b, n, 3 * h * hd], 3);
        let parts = split_qkv_padded(&qkv, h, rows, 0.25)?;
        assert_eq!(parts.dims(), [3, b, h, rows, hd]);
        let plain = split_qkv(&qkv, h)?;
        let real = parts.narrow(3, 0, n)?;
        assert_eq!(
            bits(&real.get(0)?),
            bits(&(plain.get(0)? * 0.25)?),
            "q scaled"
        );
        assert_eq!(
            bits(&real.narrow(0, 1, 2)?),
            bits(&plain.narrow(0, 1, 2)?),
            "k, v"
        );
        let pad: f32 = parts
            .narrow(3, n, rows - n)?
            .abs()?
            .sum_all()?
            .to_scalar()?;
        assert_eq!(pad, 0.0, "padding rows");
        // Composed fallbacks (f16 has no kernel) against the kernels on the widened f16 values.
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let f16 = split_qkv_padded(&half(&qkv), h, rows, 0.25)?;
        let want = split_qkv_padded(&wide(&half(&qkv)), h, rows, 0.25)?;
        assert_eq!(bits(&wide(&f16)), bits(&want), "f16 split");
        let x = randn(&[b, n, h * hd], 4);
        let xs = split_heads_padded(&x, h, rows)?;
        let xs16 = split_heads_padded(&half(&x), h, rows)?;
        let want = split_heads_padded(&wide(&half(&x)), h, rows)?;
        assert_eq!(bits(&wide(&xs16)), bits(&want), "f16 split_heads");
        assert_eq!(
            bits(&merge_heads_rows(&xs, n)?),
            bits(&x),
            "split_heads then merge"
        );
        let (q, k, v) = (parts.get(0)?, parts.get(1)?, parts.get(2)?);
        let packed = merge_qkv_rows(&q, &k, &v, n, 4.0)?;
        assert_eq!(
            bits(&packed),
            bits(&qkv),
            "split then merge_qkv, q scaled back"
        );
        let (q16, k16, v16) = (half(&q), half(&k), half(&v));
        let packed16 = merge_qkv_rows(&q16, &k16, &v16, n, 4.0)?;
        let want = merge_qkv_rows(&wide(&q16), &wide(&k16), &wide(&v16), n, 4.0)?;
        assert_eq!(bits(&wide(&packed16)), bits(&want), "f16 merge_qkv");
        assert_eq!(
            bits(&wide(&merge_heads_rows(&xs16, n)?)),
            bits(&merge_heads_rows(&wide(&xs16), n)?),
            "f16 merge_heads"
        );
        assert!(merge_heads_rows(&xs, rows + 1).is_err());
        assert!(split_heads_padded(&x, h, n - 1).is_err());
        Ok(())
    }
}
