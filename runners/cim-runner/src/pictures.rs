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

/// Tiles smaller than this are enlarged by a whole factor (nearest neighbour: every pixel stays a
/// crisp square) until they are at least this tall: a 32-px CIFAR image is drawn at 128 px.
pub const MIN_TILE: usize = 128;

const TITLE_H: usize = 24;
const GAP: usize = 4;

/// A grid column: its title and `(B, 3, H, W)` images in `[0, 1]`.
pub type Column<'a> = (&'a str, Tensor);

/// Writes a PNG with one titled column per entry of `columns` and one row per image (at most
/// `rows`); small tiles are enlarged to [`MIN_TILE`] px.
pub fn write_grid(path: &Path, columns: &[Column], rows: usize) -> Result<()> {
    write_png(path, &grid_image(columns, rows)?)
}

/// Encodes `img` as PNG and writes it atomically.
pub fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::msg(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, bytes.get_ref())
}

/// The picture [`write_grid`] writes.
pub fn grid_image(columns: &[Column], rows: usize) -> Result<RgbImage> {
    use plotters::prelude::*;
    let cols: Vec<Vec<(usize, usize, Vec<u8>)>> = columns
        .iter()
        .map(|(_, t)| to_rgb8(t))
        .collect::<Result<_>>()?;
    let rows = rows.min(cols.first().map(|c| c.len()).unwrap_or(0));
    if rows == 0 {
        return Err(Error::msg("picture grid: nothing to draw"));
    }
    let (h, w) = (cols[0][0].0, cols[0][0].1);
    let k = MIN_TILE.div_ceil(h).max(1);
    let (th, tw) = (h * k, w * k);
    let (width, height) = (
        cols.len() * (tw + GAP) + GAP,
        TITLE_H + rows * (th + GAP) + GAP,
    );
    let mut img = RgbImage::from_pixel(width as u32, height as u32, Rgb([255, 255, 255]));
    for (ci, col) in cols.iter().enumerate() {
        for (ri, (ph, pw, px)) in col.iter().take(rows).enumerate() {
            if (*ph, *pw) != (h, w) {
                return Err(Error::msg(format!(
                    "picture grid: tile {ph}×{pw} of column \"{}\" differs from {h}×{w}",
                    columns[ci].0
                )));
            }
            let (x0, y0) = (GAP + ci * (tw + GAP), TITLE_H + ri * (th + GAP));
            for y in 0..th {
                for x in 0..tw {
                    let o = ((y / k) * w + x / k) * 3;
                    img.put_pixel(
                        (x0 + x) as u32,
                        (y0 + y) as u32,
                        Rgb([px[o], px[o + 1], px[o + 2]]),
                    );
                }
            }
        }
    }
    // Column titles, centred above their column.
    register_font();
    let mut buf = img.into_raw();
    {
        let area =
            BitMapBackend::with_buffer(&mut buf, (width as u32, height as u32)).into_drawing_area();
        let font = ("sans-serif", 15).into_font().color(&BLACK);
        let style = font.pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ));
        for (ci, (title, _)) in columns.iter().enumerate() {
            let cx = (GAP + ci * (tw + GAP) + tw / 2) as i32;
            area.draw(&Text::new(
                title.to_string(),
                (cx, (TITLE_H / 2) as i32),
                &style,
            ))
            .map_err(|e| Error::msg(format!("picture grid: {e}")))?;
        }
        area.present()
            .map_err(|e| Error::msg(format!("picture grid: {e}")))?;
    }
    Ok(RgbImage::from_raw(width as u32, height as u32, buf).expect("w·h·3 bytes"))
}

/// Line colours that read on white (matplotlib's first "tab10" colours).
const COLOURS: [[u8; 3]; 6] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [140, 86, 75],
];

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

/// Makes the embedded font plotters' `sans-serif` (pictures must not depend on system fonts).
pub fn register_font() {
    let _ = plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
}

/// Reads every `loss*` series of `metrics.jsonl` as (step, value) points.
fn loss_series(metrics: &Path) -> Result<std::collections::BTreeMap<String, Vec<(f64, f64)>>> {
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
                if let Some(x) = x
                    .as_f64()
                    .filter(|x| k.starts_with("loss") && x.is_finite())
                {
                    series.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    if series.is_empty() {
        return Err(Error::Data {
            path: metrics.display().to_string(),
            message: "no loss values to plot".into(),
        });
    }
    Ok(series)
}

/// Plots each `loss*` series of `metrics.jsonl` against the step in a panel of its own (linear
/// axes, each scaled to its own series), side by side, into a PNG: the values faint, their running
/// mean bold.
pub fn loss_curve(metrics: &Path, out: &Path) -> Result<()> {
    use plotters::prelude::*;
    let series = loss_series(metrics)?;
    let run = metrics.parent().and_then(|p| p.file_name()).map_or_else(
        || metrics.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    );
    let plot_err = |e: &dyn std::fmt::Display| Error::msg(format!("{}: {e}", out.display()));
    register_font();
    let n = series.len();
    let ncols = n.min(3);
    let nrows = n.div_ceil(ncols);
    let (w, h) = (420 * ncols as u32, 40 + 320 * nrows as u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let root = root
            .titled(&format!("losses — {run}"), ("sans-serif", 18))
            .map_err(|e| plot_err(&e))?;
        let panels = root.split_evenly((nrows, ncols));
        for (i, ((name, pts), panel)) in series.iter().zip(panels.iter()).enumerate() {
            let x1 = pts.iter().map(|p| p.0).fold(1.0f64, f64::max);
            let x0 = pts
                .iter()
                .map(|p| p.0)
                .fold(x1, f64::min)
                .min(x1 - 1.0)
                .max(0.0);
            let (lo, hi) = pts.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
                (lo.min(p.1), hi.max(p.1))
            });
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 1e-3).max(1e-6);
            let mut chart = ChartBuilder::on(panel)
                .caption(name, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(34)
                .y_label_area_size(58)
                .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
                .map_err(|e| plot_err(&e))?;
            chart
                .configure_mesh()
                .x_desc("step")
                .x_labels(6)
                .y_labels(6)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format_tick(*y, hi - lo))
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(|e| plot_err(&e))?;
            // The raw values faint, their running mean over ~2 % of the steps on top.
            let [r, g, b] = COLOURS[i % COLOURS.len()];
            let color = RGBColor(r, g, b).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.mix(0.3)))
                .map_err(|e| plot_err(&e))?;
            chart
                .draw_series(LineSeries::new(
                    running_mean(pts, (pts.len() / 50).max(1)),
                    color.stroke_width(2),
                ))
                .map_err(|e| plot_err(&e))?;
        }
        root.present().map_err(|e| plot_err(&e))?;
    }
    write_png(
        out,
        &RgbImage::from_raw(w, h, buf).expect("buffer has w·h·3 bytes"),
    )
}

/// The mean of each point's `window` latest values (fewer at the start).
fn running_mean(pts: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    pts.iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= pts[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// A y tick with as many decimals as the axis' range needs (4.5, 4.52, 0.0031).
fn format_tick(y: f64, range: f64) -> String {
    let step = (range.abs() / 5.0).max(1e-12);
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{y:.decimals$}")
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
        write_grid(
            &p,
            &[
                ("original", img.clone()),
                ("masked", masked),
                ("normalised", show_normalised(&img)?),
            ],
            2,
        )?;
        let back = image::open(&p).unwrap().to_rgb8();
        // 8-px tiles enlarged 16× to 128 px, a title band on top, 4-px gaps.
        assert_eq!(back.dimensions(), (3 * 132 + 4, 24 + 2 * 132 + 4));
        // Every pixel of a tile is its source pixel: (x, y) = (17, 40) in tile 0 is source (1, 2).
        let src = to_rgb8(&img)?;
        let (_, _, px) = &src[0];
        let o = (2 * 8 + 1) * 3;
        assert_eq!(
            back.get_pixel(4 + 17, 24 + 40).0,
            [px[o], px[o + 1], px[o + 2]]
        );
        // The title band holds dark text pixels above each column, nothing below the last row.
        for c in 0..3 {
            let dark = (0..24)
                .flat_map(|y| (0..128).map(move |x| (4 + c * 132 + x, y)))
                .filter(|&(x, y)| back.get_pixel(x as u32, y as u32).0[0] < 100)
                .count();
            assert!(dark > 20, "column {c} has no title ({dark} dark pixels)");
        }
        let _ = Device::Cpu;
        Ok(())
    }

    #[test]
    fn losses_get_one_panel_each_with_ticks_that_fit_their_range() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        let lines: Vec<String> = (1..=20)
            .map(|s| {
                format!(
                    r#"{{"step":{s},"loss":{},"loss_mim":{},"loss_respix":{},"lr":0.001}}"#,
                    20.0 - s as f64 * 0.1,
                    4.5 - s as f64 * 0.01,
                    1.1 + s as f64 * 1e-4
                )
            })
            .collect();
        std::fs::write(&m, lines.join("\n")).unwrap();
        let out = dir.path().join("loss_curve.png");
        loss_curve(&m, &out)?;
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (3 * 420, 40 + 320));
        assert_eq!(loss_series(&m)?.len(), 3);
        assert_eq!(format_tick(4.52, 0.19), "4.52");
        assert_eq!(format_tick(1.1012, 0.0019), "1.1012");
        assert_eq!(format_tick(18.0, 1.9), "18.0");
        let m = running_mean(&[(1.0, 1.0), (2.0, 3.0), (3.0, 5.0)], 2);
        assert_eq!(m, vec![(1.0, 1.0), (2.0, 2.0), (3.0, 4.0)]);
        Ok(())
    }
}
