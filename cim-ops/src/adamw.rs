//! AdamW, fused: two in-place kernels per parameter instead of ~12 allocating ones — and on CUDA
//! one launch per 64 parameters.
//!
//! The moments of a parameter live in one `(2, n)` f32 tensor `[m; v]`. [`adamw_update`] runs
//! one kernel updating both moments from the (clip-scaled) gradient, and one updating the parameter
//! in place: decoupled weight decay, then the bias-corrected step. Nothing is allocated, and the
//! parameter's storage is written where it is, so every module holding the parameter sees it.
//!
//! [`adamw_update_all`] updates a whole parameter list: on CUDA one multi-tensor kernel per group
//! of 64 parameters (a table of addresses and lengths, one thread block per 4096 elements), the
//! same arithmetic per element; on the CPU [`adamw_update`] per parameter. [`sum_of_squares`]
//! (the global gradient norm for clipping) is one launch on CUDA for every tensor, partial sums per
//! 4096-element chunk added in order on the host; on the CPU the same chunks in parallel. A ViT-B
//! step has ~250 parameters: ~1000 launches of the optimizer phase become ~6.

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor};
use rayon::prelude::*;

use super::chunks::SQ_CHUNK;
use super::is_fusable;
use crate::Result;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// The scalars of one AdamW update of one parameter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Learning rate of this parameter (schedule × layer scale).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay of this parameter (0 for biases, norms, tokens).
    pub weight_decay: f64,
    /// Step number, from 1 (bias correction).
    pub t: u64,
    /// Multiplier of the gradient (global-norm clipping).
    pub grad_scale: f64,
}

impl AdamStep {
    fn bias_corrections(&self) -> (f32, f32) {
        let t = self.t.min(i32::MAX as u64) as i32;
        (
            (1.0 - self.beta1.powi(t)) as f32,
            (1.0 - self.beta2.powi(t)) as f32,
        )
    }
}

/// Updates `moments` `(2, n)` and `param` (n elements) in place from `grad`. Returns `false`,
/// touching nothing, when the fused kernels do not apply (not all f32 and contiguous, or CUDA
/// kernels off); the caller then composes the same update from candle ops.
pub fn adamw_update(param: &Tensor, moments: &Tensor, grad: &Tensor, s: &AdamStep) -> Result<bool> {
    if !fusable(param, moments, grad) {
        return Ok(false);
    }
    let grad = grad.contiguous()?;
    let (bc1, bc2) = s.bias_corrections();
    moments.inplace_op2(
        &grad,
        &MomentsOp {
            beta1: s.beta1 as f32,
            beta2: s.beta2 as f32,
            scale: s.grad_scale as f32,
        },
    )?;
    param.inplace_op2(
        moments,
        &ApplyOp {
            lr: s.lr as f32,
            decay: (1.0 - s.lr * s.weight_decay) as f32,
            bc1,
            bc2,
            eps: s.eps as f32,
        },
    )?;
    Ok(true)
}

fn fusable(param: &Tensor, moments: &Tensor, grad: &Tensor) -> bool {
    let n = param.elem_count();
    is_fusable(&[param, moments, grad])
        && param.is_contiguous()
        && moments.is_contiguous()
        && moments.dims() == [2, n]
        && grad.elem_count() == n
}

/// One parameter's part of [`adamw_update_all`].
#[derive(Clone, Copy, Debug)]
pub struct AdamItem<'a> {
    pub param: &'a Tensor,
    /// `(2, n)` f32: `[m; v]`.
    pub moments: &'a Tensor,
    pub grad: &'a Tensor,
    pub step: AdamStep,
}

/// [`adamw_update`] for every item. Returns `false`, touching nothing, when any item is not
/// fusable (the caller composes the update per parameter then). On CUDA, when every item is
/// contiguous on one device, the items share β, ε, the step number and the gradient scale (their
/// learning rates and weight decays may differ), and no two written tensors share a storage: one
/// multi-tensor launch per 64 items. Otherwise (and always on the CPU) [`adamw_update`] per item.
pub fn adamw_update_all(items: &[AdamItem]) -> Result<bool> {
    if !items.iter().all(|i| fusable(i.param, i.moments, i.grad)) {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    if multi_tensor_applies(items) {
        let s = &items[0].step;
        let (bc1, bc2) = s.bias_corrections();
        let tensors: Vec<_> = items
            .iter()
            .map(|i| super::cuda::AdamTensors {
                param: i.param,
                moments: i.moments,
                grad: i.grad,
                lr: i.step.lr as f32,
                decay: (1.0 - i.step.lr * i.step.weight_decay) as f32,
            })
            .collect();
        let shared = (
            s.beta1 as f32,
            s.beta2 as f32,
            s.grad_scale as f32,
            bc1,
            bc2,
            s.eps as f32,
        );
        super::cuda::adamw_multi(&tensors, shared)?;
        return Ok(true);
    }
    for i in items {
        let done = adamw_update(i.param, i.moments, i.grad, &i.step)?;
        debug_assert!(done, "checked fusable above");
    }
    Ok(true)
}

/// Whether [`adamw_update_all`]'s CUDA multi-tensor kernel takes `items` (all fusable).
#[cfg(feature = "cuda")]
fn multi_tensor_applies(items: &[AdamItem]) -> bool {
    let Some(first) = items.first() else {
        return false;
    };
    let (dev, s0) = (first.param.device(), first.step);
    let shared = |s: &AdamStep| {
        (s.beta1, s.beta2, s.eps, s.t, s.grad_scale)
            == (s0.beta1, s0.beta2, s0.eps, s0.t, s0.grad_scale)
    };
    let on_one_gpu = items.iter().all(|i| {
        [i.param, i.moments, i.grad]
            .iter()
            .all(|t| t.device().is_cuda() && t.device().same_device(dev))
    });
    if !on_one_gpu
        || !items
            .iter()
            .all(|i| i.grad.is_contiguous() && shared(&i.step))
    {
        return false;
    }
    // Written storages must be distinct (each is write-locked once) and no gradient may be one
    // of them.
    let mut written = std::collections::HashSet::new();
    let all_distinct = items
        .iter()
        .all(|i| written.insert(storage_id(i.param)) && written.insert(storage_id(i.moments)));
    all_distinct && items.iter().all(|i| !written.contains(&storage_id(i.grad)))
}

/// The address of `t`'s storage: equal for tensors that share one.
#[cfg(feature = "cuda")]
fn storage_id(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    std::ptr::from_ref(&*s).addr()
}

/// `Σ x²` over every element of every tensor, in f64: the squared global gradient norm. f32
/// contiguous tensors sum in chunks of 4096 elements in f32, the chunks' sums added in f64 in order
/// — on CUDA (kernels on, one device) all tensors in one launch, on the CPU in parallel chunks;
/// other tensors ([`square_sums_composed`]) in rows.
pub fn sum_of_squares(ts: &[&Tensor]) -> Result<f64> {
    let plain = |t: &&Tensor| t.dtype() == DType::F32 && t.is_contiguous();
    #[cfg(feature = "cuda")]
    if let Some(first) = ts.first() {
        let dev = first.device();
        if super::cuda_kernels()
            && ts
                .iter()
                .all(|t| plain(t) && t.device().is_cuda() && t.device().same_device(dev))
        {
            return Ok(super::cuda::sum_squares_multi(ts)?.iter().sum());
        }
    }
    // CPU f32 contiguous tensors: every chunk of every tensor in one parallel pass.
    let on_cpu: Vec<&Tensor> = ts
        .iter()
        .copied()
        .filter(|t| plain(t) && t.device().is_cpu())
        .collect();
    let guards: Vec<_> = on_cpu.iter().map(|t| t.storage_and_layout()).collect();
    let mut chunks: Vec<&[f32]> = vec![];
    for (s, l) in &guards {
        let x = match &**s {
            candle_core::Storage::Cpu(s) => super::slice(s, l, "sum of squares")?,
            _ => unreachable!("filtered to the CPU"),
        };
        chunks.extend(x.chunks(SQ_CHUNK));
    }
    let partials: Vec<f64> = chunks.par_iter().map(|c| square_sum(c) as f64).collect();
    let mut total: f64 = partials.iter().sum();
    for t in ts.iter().filter(|t| !(plain(t) && t.device().is_cpu())) {
        total += square_sums_composed(t)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total)
}

/// `Σ x²` of one chunk in f32, eight running sums (so the loop vectorises).
fn square_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i] * c[i];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().map(|v| v * v).sum::<f32>()
}

/// Partial sums of squares of `t` in f32 from candle ops, one per row of up to 4096 elements: on
/// CUDA a reduction of a whole tensor to one value runs on a single thread block (215 such sums
/// were 7.5 ms of an H200 ViT-B/16 step), a reduction over rows spreads over one block per row.
pub fn square_sums_composed(t: &Tensor) -> Result<Tensor> {
    let n = t.elem_count();
    let (mut a, mut b) = (n.max(1), SQ_CHUNK);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let width = a; // gcd(n, 4096): rows of `width` tile the tensor exactly
    t.to_dtype(DType::F32)?
        .reshape((n / width, width))?
        .sqr()?
        .sum(1)
}

/// The same update from candle ops, returning the new `(param, moments)` (the reference of the
/// fused kernels, and the path for other dtypes/devices).
pub fn adamw_composed(
    param: &Tensor,
    moments: &Tensor,
    grad: &Tensor,
    s: &AdamStep,
) -> Result<(Tensor, Tensor)> {
    let shape = param.shape();
    let g = (grad.to_dtype(DType::F32)?.flatten_all()? * s.grad_scale)?;
    let (m, v) = (moments.get(0)?, moments.get(1)?);
    let m = ((m * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
    let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let (bc1, bc2) = s.bias_corrections();
    let update = ((&m / bc1 as f64)? / ((&v / bc2 as f64)?.sqrt()? + s.eps)?)?;
    let p = (param.flatten_all()? * (1.0 - s.lr * s.weight_decay))?;
    let p = (p - (update * s.lr)?)?.reshape(shape)?;
    Ok((p, Tensor::stack(&[m, v], 0)?))
}

struct MomentsOp {
    beta1: f32,
    beta2: f32,
    scale: f32,
}

impl InplaceOp2 for MomentsOp {
    fn name(&self) -> &'static str {
        "cim-adamw-moments"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = super::slice(s2, l2, "adamw gradient")?;
        let mv = super::slice_mut(s1, l1, "adamw moments")?;
        let (m, v) = mv.split_at_mut(g.len());
        let (b1, b2, k) = (self.beta1, self.beta2, self.scale);
        m.par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((m, v), g)| {
                for i in 0..g.len() {
                    let gi = g[i] * k;
                    m[i] = b1 * m[i] + (1.0 - b1) * gi;
                    v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                }
            });
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
        super::cuda::adamw_moments(s1, l1, s2, l2, self.beta1, self.beta2, self.scale)
    }
}

struct ApplyOp {
    lr: f32,
    /// `1 − lr · weight_decay`.
    decay: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
}

impl InplaceOp2 for ApplyOp {
    fn name(&self) -> &'static str {
        "cim-adamw-apply"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let p = super::slice_mut(s1, l1, "adamw parameter")?;
        let (m, v) = super::slice(s2, l2, "adamw moments")?.split_at(p.len());
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                for i in 0..p.len() {
                    let update = (m[i] / self.bc1) / ((v[i] / self.bc2).sqrt() + self.eps);
                    p[i] = p[i] * self.decay - self.lr * update;
                }
            });
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
        super::cuda::adamw_apply(
            s1, l1, s2, l2, self.lr, self.decay, self.bc1, self.bc2, self.eps,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::randn;
    use candle_core::Device;

    #[test]
    fn fused_adamw_matches_composed_over_several_steps() -> Result<()> {
        let dev = Device::Cpu;
        let n = 3 * CHUNK + 17; // several parallel chunks and a ragged tail
        let p0 = randn(&[3, n / 3 + 1], 1).narrow(1, 0, n / 3)?;
        let p0 = p0.contiguous()?;
        let n = p0.elem_count();
        let fused_p = p0.copy()?;
        let fused_mv = Tensor::zeros((2, n), DType::F32, &dev)?;
        let (mut ref_p, mut ref_mv) = (p0.copy()?, fused_mv.copy()?);
        for t in 1..=4u64 {
            let g = randn(p0.dims(), 10 + t);
            let s = AdamStep {
                lr: 0.01 * t as f64,
                beta1: 0.9,
                beta2: 0.98,
                eps: 1e-8,
                weight_decay: 0.05,
                t,
                grad_scale: 0.7,
            };
            assert!(adamw_update(&fused_p, &fused_mv, &g, &s)?);
            (ref_p, ref_mv) = adamw_composed(&ref_p, &ref_mv, &g, &s)?;
        }
        let dp = (&fused_p - &ref_p)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let dm = (&fused_mv - &ref_mv)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        // f32 rounding only (the composed path multiplies by f64 scalars): |p| ≤ 2.
        assert!(dp < 4e-6 && dm < 1e-6, "param {dp}, moments {dm}");
        // Adam moves a coordinate by ~lr per step (0.01 … 0.04 here), whatever the gradient scale.
        let moved = (&fused_p - &p0)?.abs()?.mean_all()?.to_scalar::<f32>()?;
        assert!(moved > 0.01, "mean move {moved}");
        Ok(())
    }

    fn step(lr: f64, weight_decay: f64, t: u64) -> AdamStep {
        AdamStep {
            lr,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay,
            t,
            grad_scale: 0.6,
        }
    }

    /// The whole-list update is the per-parameter one (here, on the CPU, it is that loop; the
    /// CUDA multi-tensor kernel is checked against it in `tests/ops_cuda.rs`), and a list with
    /// one unfusable item is refused whole, nothing touched.
    #[test]
    fn update_all_is_the_per_parameter_update_and_refuses_as_a_whole() -> Result<()> {
        let dev = Device::Cpu;
        let shapes: [&[usize]; 4] = [&[3, 5], &[4097], &[2, 4096], &[1]];
        let params: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(s, 40 + i as u64))
            .collect();
        let mvs: Vec<Tensor> = params
            .iter()
            .map(|p| Tensor::zeros((2, p.elem_count()), DType::F32, &dev))
            .collect::<candle_core::Result<_>>()?;
        let (ref_p, ref_mv): (Vec<Tensor>, Vec<Tensor>) = params
            .iter()
            .zip(&mvs)
            .map(|(p, mv)| (p.copy().unwrap(), mv.copy().unwrap()))
            .unzip();
        for t in 1..=3u64 {
            let grads: Vec<Tensor> = params
                .iter()
                .enumerate()
                .map(|(i, p)| randn(p.dims(), 100 * t + i as u64))
                .collect();
            let steps: Vec<AdamStep> = (0..params.len())
                .map(|i| step(0.01 * (i + 1) as f64, 0.05 * (i % 2) as f64, t))
                .collect();
            let items: Vec<AdamItem> = (0..params.len())
                .map(|i| AdamItem {
                    param: &params[i],
                    moments: &mvs[i],
                    grad: &grads[i],
                    step: steps[i],
                })
                .collect();
            assert!(adamw_update_all(&items)?);
            for i in 0..params.len() {
                assert!(adamw_update(&ref_p[i], &ref_mv[i], &grads[i], &steps[i])?);
            }
        }
        for i in 0..params.len() {
            assert_eq!(
                params[i].flatten_all()?.to_vec1::<f32>()?,
                ref_p[i].flatten_all()?.to_vec1::<f32>()?
            );
            assert_eq!(
                mvs[i].flatten_all()?.to_vec1::<f32>()?,
                ref_mv[i].flatten_all()?.to_vec1::<f32>()?
            );
        }
        // An f64 item among f32 ones: refused, and the f32 items are left as they were.
        let before = params[0].flatten_all()?.to_vec1::<f32>()?;
        let p64 = Tensor::ones(4, DType::F64, &dev)?;
        let mv64 = Tensor::zeros((2, 4), DType::F64, &dev)?;
        let g = randn(&[3, 5], 7);
        let items = [
            AdamItem {
                param: &params[0],
                moments: &mvs[0],
                grad: &g,
                step: step(0.1, 0.0, 4),
            },
            AdamItem {
                param: &p64,
                moments: &mv64,
                grad: &p64,
                step: step(0.1, 0.0, 4),
            },
        ];
        assert!(!adamw_update_all(&items)?);
        assert_eq!(params[0].flatten_all()?.to_vec1::<f32>()?, before);
        assert_eq!(p64.sum_all()?.to_scalar::<f64>()?, 4.0);
        Ok(())
    }

    /// Every path of `sum_of_squares` — contiguous f32 (several chunks, a ragged tail), a
    /// contiguous view starting inside its storage, a transposed view, bf16, an empty tensor —
    /// against the sum computed in f64 from the values.
    #[test]
    fn sum_of_squares_adds_every_element_once() -> Result<()> {
        let dev = Device::Cpu;
        let big = randn(&[3 * SQ_CHUNK + 5], 1);
        let rows = randn(&[6, 700], 2);
        let view = rows.narrow(0, 2, 3)?; // contiguous, offset 1400
        let transposed = randn(&[33, 17], 3).t()?;
        let half = randn(&[9, 9], 4).to_dtype(DType::BF16)?;
        let empty = Tensor::zeros((0, 3), DType::F32, &dev)?;
        let ts = [&big, &view, &transposed, &half, &empty];
        assert!(view.is_contiguous() && !transposed.is_contiguous());
        let want: f64 = ts
            .iter()
            .map(|t| {
                let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                v.to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
            })
            .sum();
        let got = sum_of_squares(&ts)?;
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
        assert_eq!(sum_of_squares(&[])?, 0.0);
        let nan = Tensor::new(&[1.0f32, f32::NAN], &dev)?;
        assert!(sum_of_squares(&[&big, &nan])?.is_nan());
        Ok(())
    }

    #[test]
    fn unfusable_inputs_are_left_alone() -> Result<()> {
        let p = Tensor::ones((4, 4), DType::F64, &Device::Cpu)?;
        let mv = Tensor::zeros((2, 16), DType::F64, &Device::Cpu)?;
        let s = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            t: 1,
            grad_scale: 1.0,
        };
        assert!(!adamw_update(&p, &mv, &p, &s)?);
        assert_eq!(p.sum_all()?.to_scalar::<f64>()?, 16.0);
        Ok(())
    }
}
