//! The head layout changes of GEMM attention, as one copy each: the packed qkv projection
//! `(B, N, 3·H·hd)` into per-head `q`, `k`, `v` `(3, B, H, N, hd)`; the per-head output `(B, H, N,
//! hd)` back to tokens `(B, N, H·hd)` and the output gradient the other way; and the three
//! per-head gradients into the packed `d qkv`.
//!
//! Composed from candle ops these are permute + contiguous copies (and, for the gradients, a
//! `stack` and then a second copy): on an H200, session 6's ViT-B/16 profile had 67 strided bf16
//! copies per step taking 29 ms (`ucopy_bf16`, ~0.4 ms per ~100 MB, a fraction of the memory
//! bandwidth). Here one pass each, one element per thread, consecutive threads on consecutive
//! head-dimension elements (f32 or bf16 storage, a plain copy). Forward only: callers graft them
//! into detached attention ([`super::attention_gemm`], the block node).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};

use crate::Result;

/// `(B, N, 3·H·hd)` → `(3, B, H, N, hd)`, contiguous.
pub fn split_qkv(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    if heads == 0 || c3 % (3 * heads) != 0 {
        return Err(crate::Error::msg(format!(
            "split_qkv: width {c3} is not 3 × {heads} heads"
        )));
    }
    let hd = c3 / (3 * heads);
    if applies(&[qkv]) {
        return Ok(qkv
            .contiguous()?
            .apply_op1_no_bwd(&Heads::Split { heads, hd })?);
    }
    Ok(qkv
        .reshape((b, n, 3, heads, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?)
}

/// `(B, N, H·hd)` → `(B, H, N, hd)`, contiguous (the inverse of [`merge_heads`]).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 {
        return Err(crate::Error::msg(format!(
            "split_heads: width {c} is not a multiple of {heads} heads"
        )));
    }
    let hd = c / heads;
    if applies(&[x]) {
        return Ok(x
            .contiguous()?
            .apply_op1_no_bwd(&Heads::Unmerge { heads, hd })?);
    }
    Ok(x.reshape((b, n, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `(B, H, N, hd)` → `(B, N, H·hd)`, contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, hd) = x.dims4()?;
    if applies(&[x]) {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&Heads::Merge)?);
    }
    Ok(x.transpose(1, 2)?.reshape((b, n, h * hd))?)
}

/// `dq`, `dk`, `dv` `(B, H, N, hd)` → the packed `(B, N, 3·H·hd)` (the layout of `split_qkv`'s
/// input), contiguous.
pub fn merge_qkv(dq: &Tensor, dk: &Tensor, dv: &Tensor) -> Result<Tensor> {
    let (b, h, n, hd) = dq.dims4()?;
    if dk.dims() != dq.dims() || dv.dims() != dq.dims() {
        return Err(crate::Error::msg(format!(
            "merge_qkv: {:?}, {:?}, {:?} differ",
            dq.dims(),
            dk.dims(),
            dv.dims()
        )));
    }
    if applies(&[dq, dk, dv]) {
        let (dq, dk, dv) = (dq.contiguous()?, dk.contiguous()?, dv.contiguous()?);
        return Ok(dq.apply_op3_no_bwd(&dk, &dv, &Heads::MergeQkv)?);
    }
    Ok(Tensor::stack(&[dq, dk, dv], 0)?
        .permute((1, 3, 0, 2, 4))?
        .reshape((b, n, 3 * h * hd))?)
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
    Split {
        heads: usize,
        hd: usize,
    },
    /// `(B, N, H·hd)` → `(B, H, N, hd)` ([`split_heads`]).
    Unmerge {
        heads: usize,
        hd: usize,
    },
    Merge,
    MergeQkv,
}

/// Output shape and, per output element (in order), the input element it copies: `(input,
/// index)` with `input` 0, 1, 2 for `MergeQkv`'s dq, dk, dv.
impl Heads {
    fn out_shape(&self, in_dims: &[usize]) -> Shape {
        match *self {
            Heads::Split { heads, hd } => Shape::from((3, in_dims[0], heads, in_dims[1], hd)),
            Heads::Unmerge { heads, hd } => Shape::from((in_dims[0], heads, in_dims[1], hd)),
            Heads::Merge => Shape::from((in_dims[0], in_dims[2], in_dims[1] * in_dims[3])),
            Heads::MergeQkv => Shape::from((in_dims[0], in_dims[2], 3 * in_dims[1] * in_dims[3])),
        }
    }

    /// The CPU copy: `out[i] = srcs[src(i)][idx(i)]`, the CUDA kernels' index arithmetic.
    fn copy<T: Copy>(&self, srcs: &[&[T]], in_dims: &[usize], out: &mut [T]) {
        match *self {
            Heads::Split { heads, hd } | Heads::Unmerge { heads, hd } => {
                let (b, n) = (in_dims[0], in_dims[1]);
                let parts = if matches!(self, Heads::Split { .. }) {
                    3
                } else {
                    1
                };
                // out (parts, B, H, N, hd) ← in (B, N, parts, H, hd)
                let mut i = 0;
                for s in 0..parts {
                    for bb in 0..b {
                        for h in 0..heads {
                            for t in 0..n {
                                let at = (((bb * n + t) * parts + s) * heads + h) * hd;
                                out[i..i + hd].copy_from_slice(&srcs[0][at..at + hd]);
                                i += hd;
                            }
                        }
                    }
                }
            }
            Heads::Merge | Heads::MergeQkv => {
                let (b, h, n, hd) = (in_dims[0], in_dims[1], in_dims[2], in_dims[3]);
                // out (B, N, [3,] H, hd) ← in (B, H, N, hd)
                let mut i = 0;
                for bb in 0..b {
                    for t in 0..n {
                        for src in srcs {
                            for hh in 0..h {
                                let at = ((bb * h + hh) * n + t) * hd;
                                out[i..i + hd].copy_from_slice(&src[at..at + hd]);
                                i += hd;
                            }
                        }
                    }
                }
            }
        }
    }

    fn cpu(&self, srcs: &[(&CpuStorage, &Layout)]) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = srcs[0].1.dims().to_vec();
        let shape = self.out_shape(&dims);
        let n = shape.elem_count();
        macro_rules! run {
            ($t:ty, $variant:ident) => {{
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
                self.copy(&slices, &dims, &mut out);
                CpuStorage::$variant(out)
            }};
        }
        let out = match srcs[0].0.dtype() {
            DType::F32 => run!(f32, F32),
            DType::BF16 => run!(half::bf16, BF16),
            dt => candle_core::bail!("head copy: no kernel for {dt:?}"),
        };
        Ok((out, shape))
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
        let d = l.dims();
        let (kernel, sizes) = match *self {
            // in (B, N, 3·H·hd)
            Heads::Split { heads, hd } => ("cim_split_qkv", (d[0], d[1], heads, hd)),
            // in (B, N, H·hd)
            Heads::Unmerge { heads, hd } => ("cim_split_heads", (d[0], d[1], heads, hd)),
            // in (B, H, N, hd)
            _ => ("cim_merge_heads", (d[0], d[2], d[1], d[3])),
        };
        super::cuda::head_copy(kernel, &[(s, l)], self.out_shape(d), sizes)
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
        let d = l1.dims();
        super::cuda::head_copy(
            "cim_merge_qkv",
            &[(s1, l1), (s2, l2), (s3, l3)],
            self.out_shape(d),
            (d[0], d[2], d[1], d[3]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{bits, randn};

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
}
