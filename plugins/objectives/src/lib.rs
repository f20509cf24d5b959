//! # Objectives — `respix`, `revdet`
//!
//! RESPIX, "pixel residual learning" (paper §2.2, Figures 3–4): a linear head on every enhancer
//! position regresses ALL original pixels of its `stride × stride` patch; the target is the
//! original image normalised inside a sliding 8×8 window centred on each pixel; the loss is
//! `l1 + l2` (§2.3), weighted by 10 in the total (Table 9).
//!
//! - input: [`Features`] `(B, N, D)` on a grid with `stride` pixels per position; the original
//!   image `(B, 3, H, W)` in `[0, 1]`
//! - output: loss (scalar), prediction and target `(B, 3, H, W)`
//!
//! ## Target normalisation (book: architecture, "One training step")
//! For pixel `(i, j)` and each channel: `(x − μ) / sqrt(σ² + eps)`, μ and σ² (population variance)
//! over the `k×k` window rows `i − k/2 … i + k/2 − 1` and the same columns — for k = 8 that is 4
//! pixels before and 3 after, the extra pixel on the top/left side. Windows are clipped at the
//! borders: only pixels inside the image count. `target = "patch"` is MAE's non-overlapping
//! variant with the same `k`, estimator and `eps` (it equals the sliding one evaluated with the
//! window snapped to the k-aligned grid); `target = "none"` regresses raw `[0, 1]` pixels.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use cim_api::{
    BuildCtx, EnhancerInfo, Error, Features, Objective, ObjectiveBatch, ObjectiveOutput, Result,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RespixTarget {
    /// Sliding-window normalisation (the paper's default).
    Sliding,
    /// Non-overlapping k×k patch normalisation (MAE).
    Patch,
    /// Raw pixels in `[0, 1]`.
    None,
}

/// A linear head on every token, `(B, L, D) → (B, L, out)` ([`cim_ops::linear`]: one 2-D
/// GEMM over all rows and the fused bias add; candle_nn's `Linear` returned wrong values on a
/// ResNet's transposed token view).
#[derive(Clone, Debug)]
struct Head {
    /// `(out, D)`, PyTorch's `Linear.weight`.
    w: Tensor,
    /// `(out,)`.
    b: Tensor,
}

impl Head {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(cim_ops::linear(x, &self.w, Some(&self.b))?)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespixConfig {
    /// Loss weight in the total (paper Table 9: 10).
    pub weight: f64,
    pub target: RespixTarget,
    /// Normalisation window side `k` (paper: 8).
    pub window: usize,
    pub eps: f64,
    /// Std of the head's weight initialisation.
    pub init_std: f64,
}

impl Default for RespixConfig {
    fn default() -> Self {
        Self {
            weight: 10.0,
            target: RespixTarget::Sliding,
            window: 8,
            eps: 1e-6,
            init_std: 0.02,
        }
    }
}

/// Sum over a `k`-long window `[i − before, i − before + k)` along `dim`, clipped at the borders.
fn box_sum(x: &Tensor, dim: usize, k: usize, before: usize) -> Result<Tensor> {
    let n = x.dim(dim)?;
    let after = k - 1 - before;
    let padded = x.pad_with_zeros(dim, before, after)?;
    let mut acc = padded.narrow(dim, 0, n)?;
    for s in 1..k {
        acc = (acc + padded.narrow(dim, s, n)?)?;
    }
    Ok(acc)
}

/// Number of in-image pixels of each clipped window along an axis of length `n`.
fn window_counts(n: usize, k: usize, before: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(before);
            let hi = (i + k - before).min(n);
            (hi - lo) as f32
        })
        .collect()
}

/// The RESPIX target of `x` `(B, C, H, W)` (see the module docs).
pub fn respix_target(x: &Tensor, kind: RespixTarget, k: usize, eps: f64) -> Result<Tensor> {
    let x = x.detach().to_dtype(DType::F32)?;
    let (b, c, h, w) = x.dims4()?;
    match kind {
        RespixTarget::None => Ok(x),
        RespixTarget::Sliding => {
            if let Some(t) = cim_ops::respix_sliding_target(&x, k, eps)? {
                return Ok(t);
            }
            respix_sliding_composed(&x, k, eps)
        }
        RespixTarget::Patch => {
            if h % k != 0 || w % k != 0 {
                return Err(Error::config(format!(
                    "objective.respix: target \"patch\" needs the image sides ({h}×{w}) divisible by window {k}"
                )));
            }
            let p = x.reshape((b, c, h / k, k, w / k, k))?;
            let mean = p.mean_keepdim(5)?.mean_keepdim(3)?;
            let xc = p.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(5)?.mean_keepdim(3)?;
            Ok(xc
                .broadcast_div(&(var + eps)?.sqrt()?)?
                .reshape((b, c, h, w))?)
        }
    }
}

/// The sliding-window target from elementary candle ops (the fused kernel's reference).
pub fn respix_sliding_composed(x: &Tensor, k: usize, eps: f64) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let before = k / 2;
    let sum = |t: &Tensor| -> Result<Tensor> { box_sum(&box_sum(t, 2, k, before)?, 3, k, before) };
    let ch = Tensor::from_vec(window_counts(h, k, before), (h, 1), &Device::Cpu)?;
    let cw = Tensor::from_vec(window_counts(w, k, before), (1, w), &Device::Cpu)?;
    let count = ch
        .broadcast_mul(&cw)?
        .reshape((1, 1, h, w))?
        .to_device(x.device())?;
    let mean = sum(x)?.broadcast_div(&count)?;
    let mean_sq = sum(&x.sqr()?)?.broadcast_div(&count)?;
    let var = (mean_sq - mean.sqr()?)?.relu()?;
    Ok(x.sub(&mean)?.div(&(var + eps)?.sqrt()?)?)
}

/// `(B, gh·gw, p·p·C)` → `(B, C, gh·p, gw·p)`, the per-position layout being `(p, p, C)` (MAE's).
pub fn unpatchify(x: &Tensor, gh: usize, gw: usize, p: usize, c: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    Ok(x.reshape((b, gh, gw, p, p, c))?
        .permute((0, 5, 1, 3, 2, 4))?
        .contiguous()?
        .reshape((b, c, gh * p, gw * p))?)
}

#[derive(Clone, Debug)]
pub struct Respix {
    cfg: RespixConfig,
    head: Head,
    info: EnhancerInfo,
}

impl Respix {
    pub fn new(cfg: RespixConfig, info: EnhancerInfo, vb: VarBuilder) -> Result<Self> {
        if cfg.window == 0 {
            return Err(Error::config("objective.respix.window must be ≥ 1"));
        }
        let out = info.stride * info.stride * 3;
        let head = vb.pp("head");
        let w = head.get_with_hints(
            (out, info.dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: cfg.init_std,
            },
        )?;
        let b = head.get_with_hints(out, "bias", Init::Const(0.0))?;
        Ok(Self {
            cfg,
            head: Head { w, b },
            info,
        })
    }
}

impl Objective for Respix {
    fn weight(&self) -> f64 {
        self.cfg.weight
    }

    fn forward(&self, f: &Features, batch: &ObjectiveBatch<'_>) -> Result<ObjectiveOutput> {
        let p = f.stride;
        if p != self.info.stride {
            return Err(Error::msg(format!(
                "respix: features have stride {p}, head built for {}",
                self.info.stride
            )));
        }
        let tokens = self.head.forward(&f.tokens)?.to_dtype(DType::F32)?; // (B, L, p·p·3)
        let target = respix_target(
            batch.original,
            self.cfg.target,
            self.cfg.window,
            self.cfg.eps,
        )?;
        let (b, _, h, w) = target.dims4()?;
        if tokens.dim(1)? != f.grid.h * f.grid.w || (h, w) != (f.grid.h * p, f.grid.w * p) {
            return Err(Error::msg(format!(
                "respix: prediction {:?} (grid {}×{}, stride {p}) and original image {:?} differ in size",
                tokens.dims(),
                f.grid.h,
                f.grid.w,
                target.dims()
            )));
        }
        // Fused: the loss reads the head's token layout directly (no unpatchify copy in the
        // backward); the prediction image is then only for pictures, so it is detached.
        if let Some(loss) = cim_ops::respix_loss(&tokens, &target, p)? {
            let pred = unpatchify(&tokens.detach(), f.grid.h, f.grid.w, p, 3)?;
            return Ok(ObjectiveOutput {
                loss,
                prediction: Some(pred),
                target: Some(target),
            });
        }
        let pred = unpatchify(&tokens, f.grid.h, f.grid.w, p, 3)?;
        debug_assert_eq!(pred.dims(), [b, 3, h, w]);
        let diff = (&pred - &target)?;
        let loss = (diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?;
        Ok(ObjectiveOutput {
            loss,
            prediction: Some(pred),
            target: Some(target),
        })
    }
}

/// REVDET, "replaced visual token detection" (paper §2.2): a linear head on every enhancer
/// position predicts whether the token there was replaced by a generator sample *that differs from
/// the golden token* (a sample equal to the golden token counts as not replaced); binary
/// cross-entropy; weight 1 in the total (Table 9). When the enhancer's grid differs from the token
/// grid (ResNet-50: 7×7 against 14×14), the logit map is brought to the token grid by bilinear
/// interpolation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevdetConfig {
    /// Loss weight in the total (paper Table 9: 1).
    pub weight: f64,
    pub init_std: f64,
}

impl Default for RevdetConfig {
    fn default() -> Self {
        Self {
            weight: 1.0,
            init_std: 0.02,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Revdet {
    cfg: RevdetConfig,
    head: Head,
}

/// The `(out, in)` matrix of 1-D bilinear resizing with PyTorch's `align_corners=False` rule:
/// source coordinate `(dst + 0.5)·in/out − 0.5`, clamped at the borders.
pub fn bilinear_matrix(out: usize, inp: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let l = (src - i0 as f64) as f32;
        m[o * inp + i0] += 1.0 - l;
        m[o * inp + i1] += l;
    }
    Ok(Tensor::from_vec(m, (out, inp), device)?)
}

/// Mean binary cross-entropy of `logits` against `targets` in {0, 1}, in the stable form
/// `max(x, 0) − x·y + log(1 + exp(−|x|))`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = logits.to_dtype(DType::F32)?;
    let y = targets.to_dtype(DType::F32)?;
    let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? - (&x * &y)? + softplus)?.mean_all()?)
}

impl Revdet {
    pub fn new(cfg: RevdetConfig, info: EnhancerInfo, vb: VarBuilder) -> Result<Self> {
        let head = vb.pp("head");
        let w = head.get_with_hints(
            (1, info.dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: cfg.init_std,
            },
        )?;
        let b = head.get_with_hints(1, "bias", Init::Const(0.0))?;
        Ok(Self {
            cfg,
            head: Head { w, b },
        })
    }
}

impl Objective for Revdet {
    fn weight(&self) -> f64 {
        self.cfg.weight
    }

    fn forward(&self, f: &Features, batch: &ObjectiveBatch<'_>) -> Result<ObjectiveOutput> {
        let b = f.tokens.dim(0)?;
        let tgrid = batch.mask.grid();
        let mut logits = self
            .head
            .forward(&f.tokens)?
            .reshape((b, f.grid.h, f.grid.w))?;
        if f.grid != tgrid {
            // Bilinear resize as two matrix products (differentiable, unlike candle's upsample).
            let dev = logits.device();
            let rh = bilinear_matrix(tgrid.h, f.grid.h, dev)?; // (Th, h)
            let rw = bilinear_matrix(tgrid.w, f.grid.w, dev)?; // (Tw, w)
            logits = rh.broadcast_matmul(&logits)?.broadcast_matmul(&rw.t()?)?;
        }
        let logits = logits.reshape((b, tgrid.len()))?;
        let loss = bce_with_logits(&logits, batch.replaced)?;
        Ok(ObjectiveOutput {
            loss,
            prediction: None,
            target: None,
        })
    }
}

fn build_revdet(cfg: RevdetConfig, ctx: &BuildCtx) -> Result<Revdet> {
    Revdet::new(cfg, ctx.enhancer("objective revdet")?, ctx.vb.clone())
}

cim_api::register_objective! {
    name: "revdet",
    about: "REVDET: per-token binary 'was this token replaced?', BCE (paper §2.2; weight 1)",
    config: RevdetConfig,
    default: RevdetConfig::default(),
    tiny: RevdetConfig::default(),
    build: build_revdet,
}

fn build(cfg: RespixConfig, ctx: &BuildCtx) -> Result<Respix> {
    Respix::new(cfg, ctx.enhancer("objective respix")?, ctx.vb.clone())
}

cim_api::register_objective! {
    name: "respix",
    about: "RESPIX: regress all pixels, sliding-window normalised target, l1 + l2 (paper §2.2; weight 10)",
    config: RespixConfig,
    default: RespixConfig::default(),
    tiny: RespixConfig::default(),
    build: build,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ResNet enhancer's tokens are a transposed view of its feature map. candle_nn's `Linear`
    /// gave wrong values on that layout — its batched matmul against
    /// the broadcast weight; 22.6 off here — so the head must equal itself on a contiguous copy.
    #[test]
    fn head_on_a_transposed_token_view_equals_the_contiguous_one() -> Result<()> {
        let dev = Device::Cpu;
        let map = Tensor::randn(0f32, 1.0, (4, 32, 2, 2), &dev)?; // (B, D, h, w)
        let tokens = map.flatten_from(2)?.transpose(1, 2)?; // (B, L, D), not contiguous
        assert!(!tokens.is_contiguous());
        let head = Head {
            w: Tensor::randn(0f32, 1.0, (12, 32), &dev)?,
            b: Tensor::randn(0f32, 1.0, 12, &dev)?,
        };
        let (a, c) = (head.forward(&tokens)?, head.forward(&tokens.contiguous()?)?);
        assert_eq!(a.dims(), [4, 4, 12]);
        let d = (a - &c)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        // Against the definition: token (b, l) is the map's column (b, :, l).
        let want = map
            .flatten_from(2)?
            .get(1)?
            .t()?
            .matmul(&head.w.t()?)?
            .broadcast_add(&head.b)?;
        let d = (c.get(1)? - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn conformance() -> Result<()> {
        cim_api::testing::check_objective("respix")?;
        cim_api::testing::check_objective("revdet")
    }

    #[test]
    fn bilinear_matrix_matches_candles_bilinear_upsampling() -> Result<()> {
        let x = cim_api::testing::uniform((1, 1, 7, 5), 2)?;
        let reference = x
            .upsample_bilinear2d(14, 10, false)?
            .squeeze(0)?
            .squeeze(0)?;
        let rh = bilinear_matrix(14, 7, &Device::Cpu)?;
        let rw = bilinear_matrix(10, 5, &Device::Cpu)?;
        let ours = rh.matmul(&x.squeeze(0)?.squeeze(0)?)?.matmul(&rw.t()?)?;
        let d = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn bce_matches_the_textbook_formula() -> Result<()> {
        let x = Tensor::new(&[-3.0f32, -0.5, 0.0, 2.0, 30.0], &Device::Cpu)?;
        let y = Tensor::new(&[0.0f32, 1.0, 1.0, 0.0, 1.0], &Device::Cpu)?;
        let got = bce_with_logits(&x, &y)?.to_scalar::<f32>()? as f64;
        let xs = [-3.0f64, -0.5, 0.0, 2.0, 30.0];
        let ys = [0.0f64, 1.0, 1.0, 0.0, 1.0];
        let want = xs
            .iter()
            .zip(ys)
            .map(|(&x, y)| {
                let p = 1.0 / (1.0 + (-x).exp());
                -(y * p.ln() + (1.0 - y) * (1.0 - p).max(1e-300).ln())
            })
            .sum::<f64>()
            / 5.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        Ok(())
    }

    /// The fused target and loss kernels against the composed candle ops: values and the
    /// gradient reaching the head's token-layout output.
    #[test]
    fn fused_respix_matches_composed_target_loss_and_gradient() -> Result<()> {
        use candle_core::Var;
        let (b, p, gh, gw) = (2, 4, 3, 5);
        let x = cim_api::testing::uniform((b, 3, gh * p, gw * p), 11)?;
        let fused = cim_ops::respix_sliding_target(&x, 8, 1e-6)?.expect("f32 on CPU fuses");
        let composed = respix_sliding_composed(&x, 8, 1e-6)?;
        let d = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4, "target differs by {d}");
        // A 3-wide window (odd k, before = 1) as well.
        let f3 = cim_ops::respix_sliding_target(&x, 3, 1e-6)?.unwrap();
        let d3 = (&f3 - respix_sliding_composed(&x, 3, 1e-6)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d3 < 1e-4, "k = 3: {d3}");

        let tokens = Var::from_tensor(&cim_api::testing::uniform((b, gh * gw, p * p * 3), 12)?)?;
        let fl = cim_ops::respix_loss(&tokens, &composed, p)?.unwrap();
        let diff = (unpatchify(&tokens, gh, gw, p, 3)? - &composed)?;
        let cl = (diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?;
        let (a, c) = (fl.to_scalar::<f32>()?, cl.to_scalar::<f32>()?);
        assert!((a - c).abs() < 1e-5 * c.abs().max(1.0), "{a} vs {c}");
        let gf = (fl * 3.0)?.backward()?;
        let gc = (cl * 3.0)?.backward()?;
        let (gf, gc) = (gf.get(&tokens).unwrap(), gc.get(&tokens).unwrap());
        let dg = (gf - gc)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(dg < 1e-7, "gradient differs by {dg}");
        assert!(gf.abs()?.max_all()?.to_scalar::<f32>()? > 1e-5);
        let bad = cim_ops::respix_loss(&tokens, &composed.narrow(3, 0, 16)?, p).unwrap_err();
        assert!(bad.to_string().contains("does not tile"), "{bad}");
        Ok(())
    }

    /// Hand-computed sliding-window normalisation at corners, edges and the interior.
    #[test]
    fn sliding_target_matches_hand_computed_windows() -> Result<()> {
        let (h, w) = (11, 13);
        let x = cim_api::testing::uniform((1, 2, h, w), 42)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let t = respix_target(&x, RespixTarget::Sliding, 8, 1e-6)?;
        let ts: Vec<f32> = t.flatten_all()?.to_vec1()?;
        for &(c, i, j) in &[
            (0usize, 0usize, 0usize),
            (1, 0, 12),
            (0, 10, 0),
            (1, 10, 12),
            (0, 5, 6),
            (1, 4, 4),
            (0, 7, 3),
        ] {
            // Window rows i−4 ..= i+3, clipped; population variance.
            let rows = i.saturating_sub(4)..(i + 4).min(h);
            let cols = j.saturating_sub(4)..(j + 4).min(w);
            let mut vals = vec![];
            for r in rows.clone() {
                for q in cols.clone() {
                    vals.push(xs[c * h * w + r * w + q] as f64);
                }
            }
            let n = vals.len() as f64;
            let mu = vals.iter().sum::<f64>() / n;
            let var = vals.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n;
            let expected = (xs[c * h * w + i * w + j] as f64 - mu) / (var + 1e-6).sqrt();
            let got = ts[c * h * w + i * w + j] as f64;
            assert!(
                (got - expected).abs() < 1e-4,
                "({c},{i},{j}): {got} vs {expected} over {} px",
                vals.len()
            );
        }
        // The corner window holds 4×4 pixels, the interior one 8×8.
        assert_eq!(window_counts(11, 8, 4)[0], 4.0);
        assert_eq!(window_counts(11, 8, 4)[5], 8.0);
        Ok(())
    }

    #[test]
    fn patch_target_normalises_each_patch() -> Result<()> {
        let x = cim_api::testing::uniform((1, 3, 16, 16), 1)?;
        let t = respix_target(&x, RespixTarget::Patch, 8, 1e-6)?;
        let p = t.reshape((1, 3, 2, 8, 2, 8))?;
        let mean = p
            .mean_keepdim(5)?
            .mean_keepdim(3)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let var = p
            .sqr()?
            .mean_keepdim(5)?
            .mean_keepdim(3)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(mean < 1e-5);
        assert!(var.iter().all(|v| (v - 1.0).abs() < 1e-3), "{var:?}");
        let err = respix_target(&x.narrow(2, 0, 12)?, RespixTarget::Patch, 8, 1e-6).unwrap_err();
        assert!(err.to_string().contains("divisible by window 8"));
        Ok(())
    }

    #[test]
    fn unpatchify_places_each_position_in_its_patch() -> Result<()> {
        // Position (gy, gx) of a 2×3 grid predicts value 10·gy + gx + channel/10 everywhere.
        let (gh, gw, p) = (2, 3, 2);
        let mut v = vec![];
        for gy in 0..gh {
            for gx in 0..gw {
                for _ in 0..p * p {
                    for c in 0..3 {
                        v.push((10 * gy + gx) as f32 + c as f32 / 10.0);
                    }
                }
            }
        }
        let x = Tensor::from_vec(v, (1, gh * gw, p * p * 3), &Device::Cpu)?;
        let img = unpatchify(&x, gh, gw, p, 3)?;
        assert_eq!(img.dims(), [1, 3, 4, 6]);
        let t = img.squeeze(0)?.to_vec3::<f32>()?;
        let px = |c: usize, y: usize, xx: usize| t[c][y][xx];
        assert_eq!(px(0, 0, 0), 0.0);
        assert_eq!(px(0, 3, 5), 12.0);
        assert!((px(2, 1, 2) - 1.2).abs() < 1e-6);
        Ok(())
    }
}
