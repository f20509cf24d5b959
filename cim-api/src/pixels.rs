//! Pixel maps and normalisation shared by tokenizers, the runner and objectives.

use candle_core::{DType, Tensor};

use crate::Result;

/// DALL-E's ε of the logit-Laplace pixel map (Ramesh et al., 2021, §A.3).
pub const LOGIT_LAPLACE_EPS: f64 = 0.1;

/// `map_pixels(x) = (1 − 2ε)·x + ε`: `[0, 1]` → `[ε, 1 − ε]`, applied before the dVAE encoder.
pub fn map_pixels(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.affine(1.0 - 2.0 * eps, eps)?)
}

/// `unmap_pixels(x) = clamp((x − ε) / (1 − 2ε), 0, 1)`, applied to the dVAE decoder's sigmoid output.
pub fn unmap_pixels(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.affine(1.0 / (1.0 - 2.0 * eps), -eps / (1.0 - 2.0 * eps))?
        .clamp(0f32, 1f32)?)
}

/// Per-channel `(x − mean) / std` for `(B, 3, H, W)` images in `[0, 1]`.
pub fn normalize(x: &Tensor, mean: [f64; 3], std: [f64; 3]) -> Result<Tensor> {
    let dev = x.device();
    let m = Tensor::new(&[mean[0] as f32, mean[1] as f32, mean[2] as f32], dev)?
        .to_dtype(x.dtype())?
        .reshape((1, 3, 1, 1))?;
    let s = Tensor::new(&[std[0] as f32, std[1] as f32, std[2] as f32], dev)?
        .to_dtype(x.dtype())?
        .reshape((1, 3, 1, 1))?;
    Ok(x.broadcast_sub(&m)?.broadcast_div(&s)?)
}

/// Converts `(B, 3, H, W)` f32 in `[0,1]` to u8 RGB images (row-major HWC), for pictures.
pub fn to_rgb8(x: &Tensor) -> Result<Vec<(usize, usize, Vec<u8>)>> {
    let x = x
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.5)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let (b, h, w, _) = x.dims4()?;
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    Ok((0..b)
        .map(|i| {
            let s = &v[i * h * w * 3..(i + 1) * h * w * 3];
            (h, w, s.iter().map(|&p| p as u8).collect())
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn map_and_unmap_are_inverse_on_unit_interval() -> Result<()> {
        let x = Tensor::new(&[0.0f32, 0.25, 0.5, 1.0], &Device::Cpu)?;
        let m = map_pixels(&x, LOGIT_LAPLACE_EPS)?;
        // 0.8·x + 0.1
        for (a, b) in m.to_vec1::<f32>()?.iter().zip([0.1f32, 0.3, 0.5, 0.9]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let back = unmap_pixels(&m, LOGIT_LAPLACE_EPS)?.to_vec1::<f32>()?;
        for (a, b) in back.iter().zip([0.0f32, 0.25, 0.5, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // Values outside [ε, 1−ε] clamp to the unit interval.
        let out = unmap_pixels(&Tensor::new(&[0.0f32, 1.0], &Device::Cpu)?, 0.1)?;
        assert_eq!(out.to_vec1::<f32>()?, vec![0.0, 1.0]);
        Ok(())
    }
}
