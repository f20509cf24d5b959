//! A whole pre-norm transformer block as ONE graph node with a hand-written backward.
//!
//! Recorded op by op, a ViT block is ~40 candle ops, and candle's backward pays for each: every
//! input gradient starts as a zero tensor the op's gradient is added to, reshapes and transposes
//! are nodes, the bf16 casts of the weights are nodes, and the residual stream's gradient is
//! accumulated by an add per use. [`pre_norm_block`] runs the forward on detached tensors with the
//! fused kernels (LayerNorm, attention, bias + GELU), keeps what the backward needs, and grafts the
//! result onto the graph ([`super::with_backward`]) with the block's backward written out: six
//! GEMM pairs, two LayerNorm backward kernels, the attention backward, one bias + GELU backward
//! kernel, and four bias-gradient column sums. Under a [`GradSink`] (a training step) the twelve
//! parameter gradients go to the sink as they are; otherwise the parameters enter the node as one
//! packed f32 vector (a graft has at most three graph inputs), so their gradients leave it as one.

use candle_core::{DType, Tensor, D};

use super::node::GradSink;
use super::residual::{residual_add, residual_add_output};
use super::{attention::attention_detached, bias, bias_add, fusable_device, is_fusable};
use super::{layer_norm_grads, LayerNormOp};
use crate::Result;

/// The twelve parameters of a pre-norm block, each a `(weight, bias)` pair with PyTorch's shapes
/// (`Linear.weight` is `(out, in)`): `x + proj(attn(qkv(norm1(x))))`, then
/// `x + fc2(gelu(fc1(norm2(x))))`.
#[derive(Clone, Copy, Debug)]
pub struct BlockParams<'a> {
    pub norm1: (&'a Tensor, &'a Tensor),
    pub qkv: (&'a Tensor, &'a Tensor),
    pub proj: (&'a Tensor, &'a Tensor),
    pub norm2: (&'a Tensor, &'a Tensor),
    pub fc1: (&'a Tensor, &'a Tensor),
    pub fc2: (&'a Tensor, &'a Tensor),
}

/// The parameters' timm names (under `blocks.N.`) and shapes for width `dim` and MLP width
/// `hidden`, in [`BlockParams`] order (norm1, qkv, proj, norm2, fc1, fc2; weight, then bias).
pub fn block_param_shapes(dim: usize, hidden: usize) -> [(&'static str, Vec<usize>); 12] {
    [
        ("norm1.weight", vec![dim]),
        ("norm1.bias", vec![dim]),
        ("attn.qkv.weight", vec![3 * dim, dim]),
        ("attn.qkv.bias", vec![3 * dim]),
        ("attn.proj.weight", vec![dim, dim]),
        ("attn.proj.bias", vec![dim]),
        ("norm2.weight", vec![dim]),
        ("norm2.bias", vec![dim]),
        ("mlp.fc1.weight", vec![hidden, dim]),
        ("mlp.fc1.bias", vec![hidden]),
        ("mlp.fc2.weight", vec![dim, hidden]),
        ("mlp.fc2.bias", vec![dim]),
    ]
}

impl<'a> BlockParams<'a> {
    /// The twelve tensors in the order of [`block_param_shapes`].
    pub fn from_slice(p: &[&'a Tensor; 12]) -> Self {
        Self {
            norm1: (p[0], p[1]),
            qkv: (p[2], p[3]),
            proj: (p[4], p[5]),
            norm2: (p[6], p[7]),
            fc1: (p[8], p[9]),
            fc2: (p[10], p[11]),
        }
    }

    fn list(&self) -> [&'a Tensor; 12] {
        [
            self.norm1.0,
            self.norm1.1,
            self.qkv.0,
            self.qkv.1,
            self.proj.0,
            self.proj.1,
            self.norm2.0,
            self.norm2.1,
            self.fc1.0,
            self.fc1.1,
            self.fc2.0,
            self.fc2.1,
        ]
    }
}

/// The shape of one block call, checked once.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    tokens: usize,
    dim: usize,
    heads: usize,
    /// Whether the attention may take the flash kernels (the model's choice).
    flash: bool,
}

/// The block `(B, N, D) → (B, N, D)` in `x`'s dtype (f32, or bf16 with f32 parameters: matmuls in
/// bf16, LayerNorm, softmax and GELU computed in f32 by the kernels), as one graph node; `None`
/// where the fused kernels do not run (CUDA without `run.cuda_kernels`, other dtypes): the caller
/// then records the block op by op ([`super::layer_norm_mixed`], [`super::attention_qkv`], …),
/// which computes the same function (the tests compare values and every gradient). `keep`:
/// stochastic depth's per-sample `(B, 1, 1)` factors of the attention and MLP branches (0 or
/// `1/keep_prob`), which scale each branch before its residual add.
pub fn pre_norm_block(
    x: &Tensor,
    p: &BlockParams,
    heads: usize,
    eps: f64,
    keep: Option<(&Tensor, &Tensor)>,
    flash: bool,
) -> Result<Option<Tensor>> {
    let dt = x.dtype();
    if !matches!(dt, DType::F32 | DType::BF16) || !fusable_device(x) {
        return Ok(None);
    }
    let (b, n, dim) = x.dims3()?;
    let hidden = p.fc1.0.dim(0)?;
    let pdt = p.norm1.0.dtype();
    for ((name, want), t) in block_param_shapes(dim, hidden).into_iter().zip(p.list()) {
        if t.dims() != want || t.dtype() != pdt || !t.device().same_device(x.device()) {
            return Err(crate::Error::msg(format!(
                "pre_norm_block: {name} is {:?} {:?} on {:?}; expected {want:?} {pdt:?} on {:?}",
                t.dims(),
                t.dtype(),
                t.device().location(),
                x.device().location()
            )));
        }
    }
    let keep = match keep {
        None => None,
        Some((a, m)) => {
            for (name, k) in [("attention", a), ("MLP", m)] {
                if k.elem_count() != b || !k.device().same_device(x.device()) {
                    return Err(crate::Error::msg(format!(
                        "pre_norm_block: the {name} branch's keep factors are {:?} on {:?}; expected ({b}, 1, 1) on {:?}",
                        k.dims(),
                        k.device().location(),
                        x.device().location()
                    )));
                }
            }
            let rows = |k: &Tensor| k.detach().to_dtype(dt)?.reshape((b, 1, 1));
            Some([rows(a)?, rows(m)?])
        }
    };
    if heads == 0 || dim % heads != 0 {
        return Err(crate::Error::msg(format!(
            "pre_norm_block: width {dim} is not divisible by {heads} heads"
        )));
    }
    let dims = Dims {
        batch: b,
        tokens: n,
        dim,
        heads,
        flash,
    };
    let list = p.list();
    if !x.track_op() && !list.iter().any(|t| t.track_op()) {
        // Nothing to differentiate (inference): no node, nothing kept.
        let (y, _) = Forward::run(x, &list, dims, eps, keep)?;
        return Ok(Some(y.run()?));
    }
    // The output `(B, N, D)`: its last op (the MLP's residual add) runs as the node's forward.
    let (y, saved) = Forward::run(&x.detach(), &list, dims, eps, keep)?;
    let to_param = move |g: &Tensor| g.to_dtype(pdt);
    if GradSink::takes(&[x]) && list.iter().all(|t| t.is_variable()) {
        // The parameters' gradients go to the sink one by one: no packing.
        let mut inputs = vec![x];
        inputs.extend(list);
        return Ok(Some(super::with_backward(&inputs, y, move |dy| {
            let (dx, grads) = saved.backward(&dy.reshape((b * n, dim))?)?;
            let mut out = vec![Some(dx.reshape((b, n, dim))?)];
            for g in &grads {
                out.push(Some(to_param(g)?));
            }
            Ok(out)
        })?));
    }
    let packed = Tensor::cat(
        &list
            .iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    let y = super::with_backward(&[x, &packed], y, move |dy| {
        let (dx, grads) = saved.backward(&dy.reshape((b * n, dim))?)?;
        let flat = grads
            .iter()
            .map(|g| to_param(g)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(vec![
            Some(dx.reshape((b, n, dim))?),
            Some(Tensor::cat(&flat, 0)?),
        ])
    })?;
    Ok(Some(y))
}

/// What the backward needs, all detached: the block input and the activations in the compute
/// dtype, the weights cast to it, the LayerNorm / GELU parameters in f32.
struct Forward {
    dims: Dims,
    eps: f32,
    /// `norm1.weight, norm1.bias, qkv.bias, proj.bias, norm2.weight, norm2.bias, fc1.bias,
    /// fc2.bias` in f32.
    vec32: [Tensor; 8],
    /// `qkv, proj, fc1, fc2` weights in the compute dtype.
    w: [Tensor; 4],
    x: Tensor,
    xn1: Tensor,
    attn: Tensor,
    attn_bwd: crate::AttentionBackward,
    x1: Tensor,
    xn2: Tensor,
    h: Tensor,
    g: Tensor,
    /// Stochastic depth's per-sample factors of the attention and MLP branches, `(B, 1, 1)`.
    keep: Option<[Tensor; 2]>,
}

/// `x + keep · (y + b)`: a branch's Linear output `y` with its bias, added to the residual stream
/// `x`. Without stochastic depth one fused pass ([`residual_add`]); with it, the bias add, the
/// per-sample scaling and the add.
fn stream_add(
    x: &Tensor,
    y: &Tensor,
    b: &Tensor,
    keep: Option<&Tensor>,
    dims: Dims,
) -> Result<Tensor> {
    match keep {
        None => residual_add(x, y, Some(b)),
        Some(_) => Ok((x + scale_rows(bias_add(y, b)?, keep, dims)?)?),
    }
}

/// `dy + d` in `dy`'s dtype: the stream's gradient plus a LayerNorm's f32 input gradient, in one
/// pass ([`residual_add`]; the cast and the add composed where no kernel takes them).
fn grad_add(dy: &Tensor, d: &Tensor) -> candle_core::Result<Tensor> {
    residual_add(dy, d, None)
}

/// `(rows, D)` rows scaled by their sample's factor `(B, 1, 1)` (stochastic depth); as is without.
fn scale_rows(t: Tensor, keep: Option<&Tensor>, dims: Dims) -> candle_core::Result<Tensor> {
    match keep {
        None => Ok(t),
        Some(k) => t
            .reshape((dims.batch, dims.tokens, dims.dim))?
            .broadcast_mul(k)?
            .reshape((dims.batch * dims.tokens, dims.dim)),
    }
}

impl Forward {
    /// The block's output `(B, N, D)` (its last op possibly left to the graft) and what its
    /// backward keeps.
    fn run(
        x: &Tensor,
        p: &[&Tensor; 12],
        dims: Dims,
        eps: f64,
        keep: Option<[Tensor; 2]>,
    ) -> Result<(super::Output, Self)> {
        let dt = x.dtype();
        let f32v = |t: &Tensor| t.detach().to_dtype(DType::F32)?.contiguous();
        let vec32 = [
            f32v(p[0])?,
            f32v(p[1])?,
            f32v(p[3])?,
            f32v(p[5])?,
            f32v(p[6])?,
            f32v(p[7])?,
            f32v(p[9])?,
            f32v(p[11])?,
        ];
        let cast = |t: &Tensor| t.detach().to_dtype(dt);
        let w = [cast(p[2])?, cast(p[4])?, cast(p[8])?, cast(p[10])?];
        let eps = eps as f32;
        let Dims {
            batch,
            tokens,
            dim,
            heads,
            flash,
        } = dims;
        let x = x.reshape((batch * tokens, dim))?.contiguous()?;
        let xn1 = x.apply_op3_no_bwd(&vec32[0], &vec32[1], &LayerNormOp { eps })?;
        let qkv = bias_add(&xn1.matmul(&w[0].t()?)?, &vec32[2])?;
        let scale = 1.0 / ((dim / heads) as f64).sqrt();
        let (attn, attn_bwd) =
            attention_detached(&qkv.reshape((batch, tokens, 3 * dim))?, heads, scale, flash)?;
        let attn = attn.reshape((batch * tokens, dim))?;
        let ka = keep.as_ref().map(|k| &k[0]);
        let km = keep.as_ref().map(|k| &k[1]);
        let x1 = stream_add(&x, &attn.matmul(&w[1].t()?)?, &vec32[3], ka, dims)?;
        let xn2 = x1.apply_op3_no_bwd(&vec32[4], &vec32[5], &LayerNormOp { eps })?;
        let h = xn2.matmul(&w[2].t()?)?;
        let g = h.apply_op2_no_bwd(&vec32[6], &bias::BiasGeluOp)?;
        let m = g.matmul(&w[3].t()?)?;
        // `(B, N, D)`, the last op left undone where it is the fused residual add.
        let y = match km {
            None => {
                let bnd = |t: &Tensor| t.reshape((batch, tokens, dim));
                residual_add_output(&bnd(&x1)?, &bnd(&m)?, Some(&vec32[7]), dim)?
            }
            Some(_) => super::Output::Done(
                stream_add(&x1, &m, &vec32[7], km, dims)?.reshape((batch, tokens, dim))?,
            ),
        };
        let saved = Self {
            dims,
            eps,
            vec32,
            w,
            x,
            xn1,
            attn,
            attn_bwd,
            x1,
            xn2,
            h,
            g,
            keep,
        };
        Ok((y, saved))
    }

    /// `dx` and the twelve parameter gradients (f32, in [`BlockParams`] order) from `dy`
    /// `(rows, D)`.
    fn backward(&self, dy: &Tensor) -> candle_core::Result<(Tensor, [Tensor; 12])> {
        let dt = self.x.dtype();
        let Dims {
            batch, tokens, dim, ..
        } = self.dims;
        let rows = batch * tokens;
        let eps = self.eps;
        let dy = dy.to_dtype(dt)?.contiguous()?;
        let keep = |i: usize| self.keep.as_ref().map(|k| &k[i]);
        // y = x1 + keep_mlp · (fc2(g) + b).
        let dm = scale_rows(dy.clone(), keep(1), self.dims)?;
        let d_fc2_w = dm.t()?.matmul(&self.g)?;
        let d_fc2_b = col_sum(&dm)?;
        let dg = dm.matmul(&self.w[3])?;
        // g = gelu(h + b).
        let (dh, d_fc1_b) = bias::bias_gelu_grads_native(&self.h, &self.vec32[6], &dg)?;
        let d_fc1_w = dh.t()?.matmul(&self.xn2)?;
        let dxn2 = dh.matmul(&self.w[2])?;
        // xn2 = norm2(x1).
        let (dx1_norm, d_norm2_w, d_norm2_b) =
            layer_norm_grads(&self.x1, &self.vec32[4], &dxn2, eps)?;
        let dx1 = grad_add(&dy, &dx1_norm)?;
        // x1 = x + keep_attn · (proj(attn) + b).
        let da = scale_rows(dx1.clone(), keep(0), self.dims)?;
        let d_proj_w = da.t()?.matmul(&self.attn)?;
        let d_proj_b = col_sum(&da)?;
        let dattn = da.matmul(&self.w[1])?.reshape((batch, tokens, dim))?;
        let dqkv = (self.attn_bwd)(&dattn)?
            .reshape((rows, 3 * dim))?
            .contiguous()?;
        let d_qkv_w = dqkv.t()?.matmul(&self.xn1)?;
        let d_qkv_b = col_sum(&dqkv)?;
        let dxn1 = dqkv.matmul(&self.w[0])?;
        let (dx_norm, d_norm1_w, d_norm1_b) =
            layer_norm_grads(&self.x, &self.vec32[0], &dxn1, eps)?;
        let dx = grad_add(&dx1, &dx_norm)?;
        Ok((
            dx,
            [
                d_norm1_w, d_norm1_b, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, d_norm2_w, d_norm2_b,
                d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b,
            ],
        ))
    }
}

/// Column sums of `(rows, d)` gradients in f32: the parallel kernel for f32 input.
fn col_sum(g: &Tensor) -> candle_core::Result<Tensor> {
    let d = g.dim(D::Minus1)?;
    // A bf16 gradient on CUDA: the kernel sums the stored values in f32 (no f32 copy).
    if g.dtype() == DType::BF16 && g.device().is_cuda() && fusable_device(g) {
        return g.contiguous()?.apply_op1_no_bwd(&bias::ColSumOp(d));
    }
    let g32 = g.to_dtype(DType::F32)?.contiguous()?;
    if is_fusable(&[&g32]) {
        g32.apply_op1_no_bwd(&bias::ColSumOp(d))
    } else {
        g32.sum(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::Var;

    /// Random parameters of a block of width `d`, MLP `hidden` (LayerNorm weights near 1).
    fn params(d: usize, hidden: usize) -> Vec<Var> {
        block_param_shapes(d, hidden)
            .iter()
            .enumerate()
            .map(|(i, (_, s))| {
                let t = randn(s, 10 + i as u64);
                let t = if s.len() == 2 {
                    t.affine(0.25, 0.0).unwrap()
                } else if i == 0 || i == 6 {
                    t.affine(0.2, 1.0).unwrap()
                } else {
                    t.affine(0.1, 0.0).unwrap()
                };
                Var::from_tensor(&t).unwrap()
            })
            .collect()
    }

    fn names() -> Vec<&'static str> {
        block_param_shapes(1, 1).iter().map(|(n, _)| *n).collect()
    }

    fn block_params(v: &[Var]) -> BlockParams<'_> {
        BlockParams::from_slice(&std::array::from_fn(|i| v[i].as_tensor()))
    }

    /// The block from candle's elementary differentiable ops only (no fused kernel), in `x`'s
    /// dtype with the parameters cast to it.
    fn reference(x: &Tensor, p: &BlockParams, heads: usize, eps: f64) -> Result<Tensor> {
        let dt = x.dtype();
        let c = |t: &Tensor| t.to_dtype(dt);
        let lin = |x: &Tensor, (w, b): (&Tensor, &Tensor)| -> Result<Tensor> {
            x.broadcast_matmul(&c(w)?.t()?)?.broadcast_add(&c(b)?)
        };
        let ln = |x: &Tensor, (w, b): (&Tensor, &Tensor)| -> Result<Tensor> {
            super::super::layer_norm_composed(x, &c(w)?, &c(b)?, eps)
        };
        let d = x.dim(D::Minus1)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let qkv = lin(&ln(x, p.norm1)?, p.qkv)?;
        let a = super::super::attention_composed(&qkv, heads, scale)?;
        let x1 = (x + lin(&a, p.proj)?)?;
        let h = lin(&ln(&x1, p.norm2)?, p.fc1)?.gelu_erf()?;
        &x1 + lin(&h, p.fc2)?
    }

    /// Values and all thirteen gradients of the one-node block against the recorded reference,
    /// at a size where every kernel splits its rows into several parallel chunks.
    #[test]
    fn block_node_matches_the_recorded_block_in_f32() -> Result<()> {
        let (b, n, d, hidden, heads) = (3, 50, 16, 40, 4);
        let vars = params(d, hidden);
        let p = block_params(&vars);
        let x = Var::from_tensor(&randn(&[b, n, d], 1))?;
        let up = randn(&[b, n, d], 2);
        let fused =
            pre_norm_block(&x, &p, heads, 1e-6, None, false)?.expect("CPU f32 takes the node");
        let want = reference(&x, &p, heads, 1e-6)?;
        assert_eq!(fused.dims(), [b, n, d]);
        let dv = max_diff(&fused, &want);
        assert!(dv < 2e-5, "values: {dv}");
        let gf = (&fused * &up)?.sum_all()?.backward()?;
        let gw = (&want * &up)?.sum_all()?.backward()?;
        let mut checked = 0;
        for (name, v) in std::iter::once(("x", &x)).chain(names().into_iter().zip(&vars)) {
            let (a, w) = (gf.get(v).expect(name), gw.get(v).expect(name));
            let scale = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
            let rel = max_diff(a, w) / scale;
            assert!(rel < 1e-4, "{name}: relative gradient difference {rel}");
            checked += 1;
        }
        assert_eq!(checked, 13);
        Ok(())
    }

    /// bf16 activations with f32 parameters: values and gradients within bf16 rounding of the
    /// f32 reference; the parameter gradients come back in f32 for f32 master weights.
    #[test]
    fn bf16_block_node_is_within_bf16_rounding_of_f32() -> Result<()> {
        let (b, n, d, hidden, heads) = (2, 17, 16, 32, 2);
        let vars = params(d, hidden);
        let p = block_params(&vars);
        let x32 = randn(&[b, n, d], 3);
        let x = Var::from_tensor(&x32.to_dtype(DType::BF16)?)?;
        let xr = Var::from_tensor(&x32)?;
        let up = randn(&[b, n, d], 4);
        let fused =
            pre_norm_block(&x, &p, heads, 1e-6, None, false)?.expect("CPU bf16 takes the node");
        assert_eq!(fused.dtype(), DType::BF16);
        let want = reference(&xr, &p, heads, 1e-6)?;
        let f = fused.to_dtype(DType::F32)?;
        let dv = max_diff(&f, &want) / want.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(dv < 2e-2, "values: relative {dv}");
        let gf = (f * &up)?.sum_all()?.backward()?;
        let gw = (&want * &up)?.sum_all()?.backward()?;
        let dx = gf.get(&x).unwrap();
        assert_eq!(dx.dtype(), DType::BF16);
        let pairs = std::iter::once(("x", dx.to_dtype(DType::F32)?, gw.get(&xr).unwrap().clone()));
        let params = names().into_iter().zip(&vars).map(|(name, v)| {
            let g = gf.get(v).unwrap();
            assert_eq!(g.dtype(), DType::F32, "{name}");
            (name, g.clone(), gw.get(v).unwrap().clone())
        });
        for (name, a, w) in pairs.chain(params) {
            let scale = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
            let rel = max_diff(&a, &w) / scale;
            assert!(rel < 5e-2, "{name}: relative gradient difference {rel}");
        }
        Ok(())
    }

    /// Under a gradient sink the block node takes its twelve parameters unpacked: the same
    /// gradients as the packed node (bit for bit: the same kernels), the parameters now outside
    /// the graph. A parameter also used by a recorded op gets both contributions summed.
    #[test]
    fn sunk_block_gradients_equal_the_packed_ones() -> Result<()> {
        let (b, n, d, hidden, heads) = (2, 9, 8, 16, 2);
        let vars = params(d, hidden);
        let p = block_params(&vars);
        let xv = Var::from_tensor(&randn(&[b, n, d], 21))?;
        let up = randn(&[b, n, d], 22);
        // x enters as a tracked activation (not a variable), as in a model.
        let run = |sink: Option<&GradSink>| -> Result<candle_core::backprop::GradStore> {
            let x = (xv.as_tensor() * 1.0)?;
            let y =
                pre_norm_block(&x, &p, heads, 1e-6, None, false)?.expect("CPU f32 takes the node");
            let extra = p.norm2.1.sqr()?.sum_all()?;
            let loss = ((&y * &up)?.sum_all()? + extra)?;
            Ok(match sink {
                Some(s) => s.backward(&loss)?,
                None => loss.backward()?,
            })
        };
        let packed = run(None)?;
        let sink = GradSink::install();
        let sunk = run(Some(&sink))?;
        drop(sink);
        for (name, v) in std::iter::once(("x", &xv)).chain(names().into_iter().zip(&vars)) {
            let (a, w) = (sunk.get(v).expect(name), packed.get(v).expect(name));
            assert_eq!(a.dims(), v.dims(), "{name}");
            assert_eq!(max_diff(a, w), 0.0, "{name}");
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_named_other_dtypes_decline_inference_adds_no_node() -> Result<()> {
        let vars = params(8, 16);
        let p = block_params(&vars);
        let x = randn(&[2, 3, 8], 5);
        let wrong = randn(&[8, 8], 6);
        let bad = BlockParams {
            qkv: (&wrong, p.qkv.1),
            ..p
        };
        let e = pre_norm_block(&x, &bad, 2, 1e-6, None, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("qkv.weight is [8, 8]") && e.contains("[24, 8]"),
            "{e}"
        );
        let e = pre_norm_block(&x, &p, 3, 1e-6, None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("width 8 is not divisible by 3 heads"), "{e}");
        assert!(pre_norm_block(&x.to_dtype(DType::F16)?, &p, 2, 1e-6, None, false)?.is_none());
        let three = randn(&[3, 1, 1], 7);
        let e = pre_norm_block(&x, &p, 2, 1e-6, Some((&three, &three)), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention branch's keep factors are [3, 1, 1]"),
            "{e}"
        );
        // Detached inputs (inference): the same values, and no graph node.
        let plain: Vec<Tensor> = vars.iter().map(|v| v.detach()).collect();
        let q = BlockParams::from_slice(&std::array::from_fn(|i| &plain[i]));
        let y = pre_norm_block(&x, &q, 2, 1e-6, None, false)?.unwrap();
        assert!(!y.track_op());
        let tracked = pre_norm_block(&x, &p, 2, 1e-6, None, false)?.unwrap();
        assert!(tracked.track_op());
        assert_eq!(max_diff(&y, &tracked), 0.0);
        Ok(())
    }
}
