//! Figure-2/3-style picture grids: for a few images, the original, the generator's masked input,
//! the corrupted image the enhancer saw, and — for pixel objectives — the enhancer's prediction and
//! its target.

use std::path::Path;

use candle_core::{DType, Tensor};
use image::{Rgb, RgbImage};

use cim_api::pixels::to_rgb8;
use cim_api::{Error, Mask, Result};

use crate::checkpoint::write_atomic;

/// `(B, 3, H, W)` with masked patches greyed out (50 % grey), as the generator's input is shown.
pub fn masked_view(image: &Tensor, mask: &Mask) -> Result<Tensor> {
    let (b, _, h, w) = image.dims4()?;
    let g = mask.grid();
    let m = mask
        .to_tensor(DType::F32, image.device())?
        .reshape((b, 1, g.h, g.w))?
        .upsample_nearest2d(h, w)?;
    Ok((image.broadcast_mul(&(1.0 - &m)?)? + (m * 0.5)?.broadcast_as(image.shape())?)?)
}

/// Normalised maps (RESPIX targets and predictions, ~zero mean, unit variance) shown as
/// `clamp(0.5 + 0.25·x, 0, 1)`.
pub fn show_normalised(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?
        .affine(0.25, 0.5)?
        .clamp(0f32, 1f32)?)
}

/// Writes a PNG with one row per image (at most `rows`) and one column per entry of `columns`
/// (each `(B, 3, H, W)` in `[0, 1]`), separated by 2-px white lines.
pub fn write_grid(path: &Path, columns: &[Tensor], rows: usize) -> Result<()> {
    let cols: Vec<Vec<(usize, usize, Vec<u8>)>> =
        columns.iter().map(to_rgb8).collect::<Result<_>>()?;
    let rows = rows.min(cols.first().map(|c| c.len()).unwrap_or(0));
    if rows == 0 {
        return Err(Error::msg("picture grid: nothing to draw"));
    }
    let (h, w) = (cols[0][0].0, cols[0][0].1);
    let gap = 2;
    let mut img = RgbImage::from_pixel(
        (cols.len() * (w + gap) + gap) as u32,
        (rows * (h + gap) + gap) as u32,
        Rgb([255, 255, 255]),
    );
    for (ci, col) in cols.iter().enumerate() {
        for (ri, (th, tw, px)) in col.iter().take(rows).enumerate() {
            if (*th, *tw) != (h, w) {
                return Err(Error::msg(format!(
                    "picture grid: tile {th}×{tw} differs from {h}×{w}"
                )));
            }
            for y in 0..h {
                for x in 0..w {
                    let o = (y * w + x) * 3;
                    img.put_pixel(
                        (gap + ci * (w + gap) + x) as u32,
                        (gap + ri * (h + gap) + y) as u32,
                        Rgb([px[o], px[o + 1], px[o + 2]]),
                    );
                }
            }
        }
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, bytes.get_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use cim_api::TokenGrid;

    #[test]
    fn grid_is_a_valid_png_with_the_expected_layout() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let img = cim_api::testing::uniform((3, 3, 8, 8), 1)?;
        let mask = Mask::new(
            3,
            TokenGrid::new(2, 2),
            vec![true, false, false, false].repeat(3),
        )?;
        let masked = masked_view(&img, &mask)?;
        // The masked quadrant is grey, the rest untouched.
        let v = masked.get(0)?.get(0)?.to_vec2::<f32>()?;
        assert_eq!(v[0][0], 0.5);
        assert_eq!(v[7][7], img.get(0)?.get(0)?.to_vec2::<f32>()?[7][7]);
        let p = dir.path().join("g.png");
        write_grid(&p, &[img.clone(), masked, show_normalised(&img)?], 2)?;
        let back = image::open(&p).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), (3 * 10 + 2, 2 * 10 + 2));
        let _ = Device::Cpu;
        Ok(())
    }
}
