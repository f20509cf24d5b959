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

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

/// Plots every `loss*` series of `metrics.jsonl` against the step (log-scale y) into a PNG.
pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Data {
            path: format!("{}:{}", metrics.display(), n + 1),
            message: e.to_string(),
        })?;
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(obj) = v.as_object() {
            for (k, x) in obj {
                if let Some(x) = x.as_f64().filter(|x| k.starts_with("loss") && *x > 0.0) {
                    series.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    let points = series.values().flatten();
    let (x1, lo, hi) = points.fold((1.0f64, f64::MAX, f64::MIN), |(x, lo, hi), &(s, v)| {
        (x.max(s), lo.min(v), hi.max(v))
    });
    if series.is_empty() {
        return Err(Error::Data {
            path: metrics.display().to_string(),
            message: "no loss values to plot".into(),
        });
    }
    let plot_err = |e: &dyn std::fmt::Display| Error::msg(format!("{}: {e}", out.display()));
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let (w, h) = (900u32, 540u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "losses — {}",
                    metrics.parent().and_then(|p| p.file_name()).map_or_else(
                        || metrics.display().to_string(),
                        |n| n.to_string_lossy().to_string()
                    )
                ),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x1.max(1.0), (lo * 0.9..hi * 1.1).log_scale())
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (log scale)")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| plot_err(&e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| plot_err(&e))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| plot_err(&e))?;
        root.present().map_err(|e| plot_err(&e))?;
    }
    let img = RgbImage::from_raw(w, h, buf).expect("buffer has w·h·3 bytes");
    let mut png = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| plot_err(&e))?;
    write_atomic(out, &png)
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
            [true, false, false, false].repeat(3),
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
