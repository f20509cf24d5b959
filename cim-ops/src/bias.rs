//! Bias ops over the last dimension with a one-pass backward: the Linear layers' bias add
//! ([`bias_add`]) and the MLP's bias + exact (erf) GELU ([`bias_gelu`]).
//!
//! Composed, a bias is a broadcast add whose backward sums the gradient over the rows: candle's
//! sum over a leading dimension walks each column with the row stride on one thread. Here the bias
//! gradient is per-chunk partial column sums in parallel, added in a fixed order (deterministic),
//! and `dx` of a bias add is the incoming gradient itself. candle's `gelu_erf` backward is ~11
//! elementwise kernels (square, negate, divide, exp, erf, three scalings, three adds), each a full
//! pass over the MLP's widest activation and a fresh allocation; fused, the forward is one pass and
//! the backward one pass giving `dx` and the partial sums of `db`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{is_fusable, last_dim, simd, slice, CHUNK_ROWS};
use crate::Result;

/// `x + b`: `x` `(…, D)`, `b` `(D,)`. On CUDA (kernels on) also a bf16 `x` with its f32 bias,
/// the Linear layers of bf16 training: one kernel reading bf16 and the f32 bias, rounding once;
/// composed, the bias is first cast to bf16 and added by candle's broadcast add, which indexes
/// both operands through their strides (an H200 profile (2026-11-27): 188 such adds, 41 ms of a
/// 262 ms ViT-B/16 step). Its backward sums the bf16 gradient's columns in f32.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_shapes("bias_add", x, b)?;
    let mixed = x.dtype() == DType::BF16
        && b.dtype() == DType::F32
        && super::kernels_on_cuda(x)
        && b.device().same_device(x.device());
    if is_fusable(&[x, b]) || mixed {
        Ok(x.contiguous()?.apply_op2(&b.contiguous()?, BiasAddOp)?)
    } else {
        Ok(x.broadcast_add(&b.to_dtype(x.dtype())?)?)
    }
}

/// A linear layer `x · wᵀ (+ b)`: `x` `(…, in)`, `w` `(out, in)` (PyTorch's `Linear.weight`, cast
/// to `x`'s dtype at use, so an f32 master weight serves bf16 activations), `b` `(out,)` →
/// `(…, out)`. One 2-D GEMM over all leading dimensions — candle_nn's `Linear` runs a batched
/// matmul against a broadcast weight, whose backward is a GEMM per batch item in series and which
/// returns wrong values on a transposed view such as a ResNet's token layout — and the fused
/// [`bias_add`].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let lead = &x.dims()[..x.rank().saturating_sub(1)];
    let rows: usize = lead.iter().product();
    let y = x
        .reshape((rows, x.dim(candle_core::D::Minus1)?))?
        .matmul(&w.to_dtype(x.dtype())?.t()?)?;
    let y = match b {
        Some(b) => bias_add(&y, b)?,
        None => y,
    };
    let mut shape = lead.to_vec();
    shape.push(w.dim(0)?);
    y.reshape(shape)
}

/// `b` must be `(D,)` for `x` `(…, D)`: the one shape check of both ops (their kernels take `D`
/// from `x`'s layout).
fn check_shapes(op: &str, x: &Tensor, b: &Tensor) -> Result<()> {
    let d = x.dims().last().copied();
    if x.rank() == 0 || b.dims() != [d.unwrap_or(0)] {
        return Err(crate::Error::msg(format!(
            "{op}: bias of shape {:?} does not match x of shape {:?} (wants ({},))",
            b.dims(),
            x.dims(),
            d.unwrap_or(0)
        )));
    }
    Ok(())
}

/// Adds the column sums of the rows of `a` (`d` wide) to `db`: per-chunk partials in parallel,
/// added in chunk order.
fn add_col_sums(a: &[f32], d: usize, db: &mut [f32]) {
    let partial: Vec<Vec<f32>> = a
        .par_chunks(d * CHUNK_ROWS)
        .map(|c| {
            let mut acc = vec![0f32; d];
            for r in c.chunks(d) {
                acc.iter_mut().zip(r).for_each(|(s, v)| *s += v);
            }
            acc
        })
        .collect();
    for p in &partial {
        db.iter_mut().zip(p).for_each(|(s, v)| *s += v);
    }
}

/// `f(x + b)` elementwise, `b` broadcast over the rows: the forward of both bias ops.
fn map_with_bias(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f: impl Fn(f32) -> f32 + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (x, b) = (slice(s1, l1, "x")?, slice(s2, l2, "bias")?);
    let d = last_dim(l1)?;
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d * CHUNK_ROWS)
        .zip(x.par_chunks(d * CHUNK_ROWS))
        .for_each(|(y, x)| simd::run(BiasMap { y, x, b, f: &f }));
    Ok((CpuStorage::F32(y), l1.shape().clone()))
}

/// One chunk of [`map_with_bias`]: rows of `b.len()`.
struct BiasMap<'a, F> {
    y: &'a mut [f32],
    x: &'a [f32],
    b: &'a [f32],
    f: &'a F,
}

impl<F: Fn(f32) -> f32> simd::Kernel for BiasMap<'_, F> {
    type Output = ();
    #[inline(always)]
    fn call<const FAST: bool>(self) {
        let d = self.b.len();
        for (yr, xr) in self.y.chunks_exact_mut(d).zip(self.x.chunks_exact(d)) {
            for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(self.b) {
                *y = (self.f)(x + b);
            }
        }
    }
}

/// One chunk of the bias + GELU backward: `dx = dy · gelu'(x + b)`.
struct GeluGrad<'a> {
    dx: &'a mut [f32],
    x: &'a [f32],
    dy: &'a [f32],
    b: &'a [f32],
}

impl simd::Kernel for GeluGrad<'_> {
    type Output = ();
    #[inline(always)]
    fn call<const FAST: bool>(self) {
        let d = self.b.len();
        let rows = self.dx.chunks_exact_mut(d).zip(self.x.chunks_exact(d));
        for ((dr, xr), gr) in rows.zip(self.dy.chunks_exact(d)) {
            for j in 0..d {
                dr[j] = gr[j] * gelu_grad(xr[j] + self.b[j]);
            }
        }
    }
}

pub(super) struct BiasAddOp;

impl CustomOp2 for BiasAddOp {
    fn name(&self) -> &'static str {
        "cim-bias-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_with_bias(s1, l1, s2, l2, |z| z)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::bias_add_fwd(s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = dy.contiguous()?.apply_op1_no_bwd(&ColSumOp(b.dim(0)?))?;
        Ok((Some(dy.clone()), Some(db)))
    }
}

/// `(d,)`: the column sums of a contiguous tensor's rows of `d`.
pub(super) struct ColSumOp(pub(super) usize);

impl CustomOp1 for ColSumOp {
    fn name(&self) -> &'static str {
        "cim-col-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = slice(s, l, "grad")?;
        let mut db = vec![0f32; self.0];
        add_col_sums(a, self.0, &mut db);
        Ok((CpuStorage::F32(db), Shape::from(self.0)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::col_sum(s, l, self.0)
    }
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `gelu_erf(x + b)`: `x` `(…, D)`, `b` `(D,)`.
pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_shapes("bias_gelu", x, b)?;
    if is_fusable(&[x, b]) {
        Ok(x.contiguous()?.apply_op2(&b.contiguous()?, BiasGeluOp)?)
    } else if x.dtype() != DType::F32 && super::fusable_device(x) {
        bias_gelu_mixed(x, b)
    } else {
        bias_gelu_composed(x, b)
    }
}

/// bf16 `x` with an f32 bias: the kernels read and write bf16 (f32 arithmetic), as one graph node
/// ([`super::mixed_rowwise`]; candle's `gelu_erf` backward in bf16 is ~11 kernels plus a zero-fill
/// and an add per op). The backward's packed `dx, db` comes back in f32 and `dx` is rounded to
/// bf16. Other reduced dtypes go through f32 copies.
fn bias_gelu_mixed(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    super::mixed_rowwise(
        x,
        &[b],
        |x, p| x.apply_op2_no_bwd(&p[0], &BiasGeluOp),
        |x, p, dy| x.apply_op3_no_bwd(&p[0], dy, &BiasGeluBwdOp),
    )
}

/// The same function from candle's differentiable ops.
pub fn bias_gelu_composed(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(&b.to_dtype(x.dtype())?)?.gelu_erf()
}

/// `(erf(z/√2), exp(−z²/2))`: erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), whose
/// exponential is the Gaussian's, so the backward gets φ(z) from the same `exp`. libm's `erff` is
/// ~5× slower and made the fused kernel mostly erf.
#[inline(always)]
fn erf_and_gauss(z: f32) -> (f32, f32) {
    let a = z.abs() * FRAC_1_SQRT_2;
    let e = super::fast_exp(-a * a);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    ((1.0 - poly * e).copysign(z), e)
}

#[inline(always)]
fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + erf_and_gauss(z).0)
}

/// d gelu / dz = Φ(z) + z·φ(z).
#[inline(always)]
fn gelu_grad(z: f32) -> f32 {
    let (erf, gauss) = erf_and_gauss(z);
    0.5 * (1.0 + erf) + z * INV_SQRT_2PI * gauss
}

pub(super) struct BiasGeluOp;

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "cim-bias-gelu"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let Some((s1, l1)) = super::widened(s1, l1)? {
            let (y, shape) = self.cpu_fwd(&s1, &l1, s2, l2)?;
            return Ok((super::narrowed(y), shape));
        }
        map_with_bias(s1, l1, s2, l2, gelu)
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::bias_gelu_fwd(s1, l1, s2, l2)
    }
    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = bias_gelu_grads(x, b, dy)?;
        Ok((Some(dx), Some(db)))
    }
}

/// The bias + GELU backward as one kernel ([`BiasGeluBwdOp`]: rows of `dx`, then the `db` row),
/// split into `(dx, db)`: f32, `dx` shaped like `x`.
pub(super) fn bias_gelu_grads(
    x: &Tensor,
    b: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let d = b.dim(0)?;
    let rows = x.elem_count() / d;
    let packed = x.apply_op3_no_bwd(b, &dy.contiguous()?, &BiasGeluBwdOp)?;
    Ok((
        packed.narrow(0, 0, rows)?.reshape(x.shape())?,
        packed.narrow(0, rows, 1)?.reshape(d)?,
    ))
}

/// `(dx, db)` of bias + GELU with `dx` in `x`'s dtype (`db` f32). On CUDA in bf16 one kernel
/// writes `dx` in bf16 and `db` is the column sums of that `dx` (f32 accumulation) — no f32 copy of
/// the MLP's widest gradient and no cast pass, as under PyTorch's autocast; elsewhere
/// [`bias_gelu_grads`] and a cast.
pub(super) fn bias_gelu_grads_native(
    x: &Tensor,
    b: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let bf16 = x.dtype() == DType::BF16 && dy.dtype() == DType::BF16;
    if bf16 && super::kernels_on_cuda(x) {
        let dx = x
            .contiguous()?
            .apply_op3_no_bwd(b, &dy.contiguous()?, &BiasGeluDxOp)?;
        let db = dx.apply_op1_no_bwd(&ColSumOp(b.dim(0)?))?;
        return Ok((dx, db));
    }
    let (dx, db) = bias_gelu_grads(x, b, dy)?;
    Ok((dx.to_dtype(x.dtype())?, db))
}

/// `dx` of bias + GELU in `x`'s dtype, from `x`, the f32 bias and `dy` (of `x`'s dtype).
struct BiasGeluDxOp;

impl CustomOp3 for BiasGeluDxOp {
    fn name(&self) -> &'static str {
        "cim-bias-gelu-dx"
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
        // The packed kernel's dx rows, rounded to x's dtype.
        let narrow = matches!(s1, CpuStorage::BF16(_));
        let (packed, _) = BiasGeluBwdOp.cpu_fwd(s1, l1, s2, l2, s3, l3)?;
        let n = l1.shape().elem_count();
        let mut dx = match packed {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("bias_gelu dx: the packed backward is f32"),
        };
        dx.truncate(n);
        let dx = CpuStorage::F32(dx);
        Ok((
            if narrow { super::narrowed(dx) } else { dx },
            l1.shape().clone(),
        ))
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
        super::cuda::bias_gelu_bwd_bf16_dx(s1, l1, s2, l2, s3, l3)
    }
}

/// `(rows + 1, d)`: `dx` rows, then `db`.
pub(super) struct BiasGeluBwdOp;

impl CustomOp3 for BiasGeluBwdOp {
    fn name(&self) -> &'static str {
        "cim-bias-gelu-bwd"
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
        // bf16 x and dy: the f32 kernel on their widened copies; the packed result stays f32.
        if let (Some((s1, l1)), Some((s3, l3))) = (super::widened(s1, l1)?, super::widened(s3, l3)?)
        {
            return self.cpu_fwd(&s1, &l1, s2, l2, &s3, &l3);
        }
        let (x, b, g) = (
            slice(s1, l1, "x")?,
            slice(s2, l2, "bias")?,
            slice(s3, l3, "grad")?,
        );
        let d = last_dim(l1)?;
        let rows = x.len() / d;
        let mut out = vec![0f32; (rows + 1) * d];
        let (dx, db) = out.split_at_mut(rows * d);
        dx.par_chunks_mut(d * CHUNK_ROWS)
            .zip(
                x.par_chunks(d * CHUNK_ROWS)
                    .zip(g.par_chunks(d * CHUNK_ROWS)),
            )
            .for_each(|(dx, (x, dy))| simd::run(GeluGrad { dx, x, dy, b }));
        add_col_sums(dx, d, db);
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, d))))
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
        super::cuda::bias_gelu_bwd(s1, l1, s2, l2, s3, l3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::Var;

    /// bf16 `x` with an f32 bias: the one-node mixed path against candle's bf16 ops.
    #[test]
    fn mixed_bias_gelu_matches_composed_bf16() -> Result<()> {
        let x = Var::from_tensor(&randn(&[5, 9, 16], 1).to_dtype(DType::BF16)?)?;
        let b = Var::from_tensor(&randn(&[16], 2))?;
        let up = randn(&[5, 9, 16], 3).to_dtype(DType::BF16)?;
        let mixed = bias_gelu(&x, &b)?;
        let composed = bias_gelu_composed(&x, &b)?;
        assert_eq!(mixed.dtype(), DType::BF16);
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert!(max_diff(&f(&mixed), &f(&composed)) < 0.05);
        let gm = (&mixed * &up)?.sum_all()?.backward()?;
        let gc = (&composed * &up)?.sum_all()?.backward()?;
        for (what, v, tol) in [("dx", &x, 0.02), ("db", &b, 0.03)] {
            let (a, e) = (f(gm.get(v).unwrap()), f(gc.get(v).unwrap()));
            assert_eq!(gm.get(v).unwrap().dtype(), v.dtype(), "{what} dtype");
            let scale = e.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                max_diff(&a, &e) <= tol * scale,
                "{what}: {} of {scale}",
                max_diff(&a, &e)
            );
        }
        Ok(())
    }

    /// Values, `dx` and `db` against the composed ops, for a 3-D input whose row count is not a
    /// multiple of the chunk size and for a 2-D one.
    /// The dx-only op (CUDA's bf16 path) on the CPU: the packed backward's dx rows, in f32 and
    /// rounded to bf16 for bf16 inputs.
    #[test]
    fn dx_only_op_is_the_packed_backwards_dx() -> Result<()> {
        let (x, b, dy) = (randn(&[7, 9], 1), randn(&[9], 2), randn(&[7, 9], 3));
        let (want, _) = bias_gelu_grads(&x, &b, &dy)?;
        let got = x.apply_op3_no_bwd(&b, &dy, &BiasGeluDxOp)?;
        assert_eq!(got.dims(), x.dims());
        assert!(max_diff(&got, &want) == 0.0);
        let (xb, dyb) = (x.to_dtype(DType::BF16)?, dy.to_dtype(DType::BF16)?);
        let got = xb.apply_op3_no_bwd(&b, &dyb, &BiasGeluDxOp)?;
        assert_eq!(got.dtype(), DType::BF16);
        let (want, _) = bias_gelu_grads(&xb, &b, &dyb)?;
        let want = want.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        assert!(max_diff(&got.to_dtype(DType::F32)?, &want) == 0.0);
        Ok(())
    }

    #[test]
    fn bias_gelu_matches_composed_values_and_gradients() -> Result<()> {
        for (i, shape) in [vec![3, 67, 40], vec![5, 8]].into_iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(&randn(&shape, 40 + i as u64))?;
            let b = Var::from_tensor(&randn(&[d], 50 + i as u64))?;
            let up = randn(&shape, 60 + i as u64);
            let fused = bias_gelu(&x, &b)?;
            let want = bias_gelu_composed(&x, &b)?;
            assert!(max_diff(&fused, &want) < 1e-5, "case {i}: forward");
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gc = (want * &up)?.sum_all()?.backward()?;
            for (what, v) in [("dx", &x), ("db", &b)] {
                let (a, e) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert_eq!(a.dims(), e.dims(), "case {i}: {what} shape");
                let scale = e.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let diff = max_diff(a, e);
                assert!(diff < 1e-4 * scale, "case {i}: {what} differs by {diff}");
            }
        }
        Ok(())
    }

    /// Values, `dx` and `db` of the bias add against candle's broadcast add.
    #[test]
    fn bias_add_matches_broadcast_add() -> Result<()> {
        for (i, shape) in [vec![3, 67, 40], vec![5, 8]].into_iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(&randn(&shape, 70 + i as u64))?;
            let b = Var::from_tensor(&randn(&[d], 80 + i as u64))?;
            let up = randn(&shape, 90 + i as u64);
            let fused = bias_add(&x, &b)?;
            let want = x.broadcast_add(&b)?;
            assert!(max_diff(&fused, &want) < 1e-6, "case {i}: forward");
            let gf = (fused * &up)?.sum_all()?.backward()?;
            let gc = (want * &up)?.sum_all()?.backward()?;
            for (what, v) in [("dx", &x), ("db", &b)] {
                let (a, e) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert_eq!(a.dims(), e.dims(), "case {i}: {what} shape");
                let diff = max_diff(a, e);
                assert!(diff < 1e-4, "case {i}: {what} differs by {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_bias_is_a_named_error() {
        let x = randn(&[4, 6], 1);
        for (name, e) in [
            ("bias_add", bias_add(&x, &randn(&[5], 2)).unwrap_err()),
            ("bias_gelu", bias_gelu(&x, &randn(&[6, 1], 2)).unwrap_err()),
        ] {
            let m = e.to_string();
            assert!(m.contains(name) && m.contains("wants (6,)"), "{m}");
        }
    }

    /// Known values: gelu(0) = 0, gelu(1) = 0.841345, gelu(−1) = −0.158655, gelu'(0) = 0.5; the
    /// erf approximation within 5e-7 of libm's over [−6, 6] (1.5e-7 plus the f32 rounding of 1 − poly·e).
    #[test]
    fn bias_gelu_known_values() -> Result<()> {
        for i in -600..=600 {
            let z = i as f32 / 100.0;
            let d = (erf_and_gauss(z).0 - libm::erff(z * FRAC_1_SQRT_2)).abs();
            assert!(d < 5e-7, "erf({z}/√2): off by {d}");
        }
        let x = Tensor::new(&[[0f32, 1.0, -1.0]], &candle_core::Device::Cpu)?;
        let b = Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let y = bias_gelu(&x, &b)?.flatten_all()?.to_vec1::<f32>()?;
        for (got, want) in y.iter().zip([0.0, 0.841_345, -0.158_655]) {
            assert!((got - want).abs() < 1e-5, "{y:?}");
        }
        assert!((gelu_grad(0.0) - 0.5).abs() < 1e-6);
        Ok(())
    }
}
