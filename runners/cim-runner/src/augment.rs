//! Fine-tuning augmentations: RandAugment (a documented subset of its operations), Mixup and
//! CutMix with their soft targets, and label smoothing.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_distr::{Beta, Distribution};

/// The RandAugment operations implemented (timm's `rand-m9-mstd0.5` list minus Equalize,
/// Sharpness, SolarizeAdd and Invert).
pub const RANDAUGMENT_OPS: [&str; 12] = [
    "identity",
    "auto_contrast",
    "rotate",
    "solarize",
    "color",
    "posterize",
    "contrast",
    "brightness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
];

fn map_pixels(img: &mut RgbImage, f: impl Fn(u8, usize) -> u8) {
    for p in img.pixels_mut() {
        for c in 0..3 {
            p[c] = f(p[c], c);
        }
    }
}

fn gray(p: &Rgb<u8>) -> f32 {
    0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
}

/// Blend with a degenerate image: `out = deg + factor · (img − deg)` (PIL's ImageEnhance).
fn blend(img: &mut RgbImage, degenerate: impl Fn(&Rgb<u8>) -> [f32; 3], factor: f32) {
    for p in img.pixels_mut() {
        let d = degenerate(p);
        for c in 0..3 {
            p[c] = (d[c] + factor * (p[c] as f32 - d[c]))
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
}

/// Inverse-affine warp with bilinear sampling; outside pixels are grey (128), as timm fills.
fn affine(img: &RgbImage, inv: [f32; 6]) -> RgbImage {
    let (w, h) = img.dimensions();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let sx = inv[0] * dx + inv[1] * dy + inv[2] + cx - 0.5;
        let sy = inv[3] * dx + inv[4] * dy + inv[5] + cy - 0.5;
        if sx < -0.5 || sy < -0.5 || sx > w as f32 - 0.5 || sy > h as f32 - 0.5 {
            return Rgb([128, 128, 128]);
        }
        let (x0, y0) = (sx.floor().max(0.0), sy.floor().max(0.0));
        let (fx, fy) = (sx - x0, sy - y0);
        let (x0, y0) = (x0 as u32, y0 as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
        let g = |xx: u32, yy: u32| img.get_pixel(xx, yy);
        let mut out = [0u8; 3];
        for (c, o) in out.iter_mut().enumerate() {
            let top = g(x0, y0)[c] as f32 * (1.0 - fx) + g(x1, y0)[c] as f32 * fx;
            let bot = g(x0, y1)[c] as f32 * (1.0 - fx) + g(x1, y1)[c] as f32 * fx;
            *o = (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8;
        }
        Rgb(out)
    })
}

/// Applies operation `op` at magnitude `m` (0–10, timm's scale) in place; signed operations take
/// a random sign.
pub fn apply_op(img: &mut RgbImage, op: &str, m: f64, rng: &mut impl Rng) {
    let m = (m / 10.0).clamp(0.0, 1.0) as f32;
    let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
    let (w, h) = img.dimensions();
    match op {
        "identity" => {}
        "auto_contrast" => {
            for c in 0..3 {
                let (lo, hi) = img
                    .pixels()
                    .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p[c]), hi.max(p[c])));
                if hi > lo {
                    let scale = 255.0 / (hi - lo) as f32;
                    for p in img.pixels_mut() {
                        p[c] = ((p[c] - lo) as f32 * scale).round() as u8;
                    }
                }
            }
        }
        "rotate" => {
            let a = (sign * 30.0 * m).to_radians();
            let (s, c) = a.sin_cos();
            *img = affine(img, [c, s, 0.0, -s, c, 0.0]);
        }
        "solarize" => {
            let t = (256.0 - 256.0 * m) as u16;
            map_pixels(img, |v, _| if (v as u16) >= t { 255 - v } else { v });
        }
        "color" => blend(
            img,
            |p| {
                let g = gray(p);
                [g, g, g]
            },
            1.0 + sign * 0.9 * m,
        ),
        "posterize" => {
            let bits = (8.0 - 4.0 * m).round().clamp(1.0, 8.0) as u32;
            let mask = !((1u16 << (8 - bits)) - 1) as u8;
            map_pixels(img, |v, _| v & mask);
        }
        "contrast" => {
            let mean = img.pixels().map(gray).sum::<f32>() / (w * h) as f32;
            blend(img, |_| [mean; 3], 1.0 + sign * 0.9 * m);
        }
        "brightness" => blend(img, |_| [0.0; 3], 1.0 + sign * 0.9 * m),
        "shear_x" => *img = affine(img, [1.0, -sign * 0.3 * m, 0.0, 0.0, 1.0, 0.0]),
        "shear_y" => *img = affine(img, [1.0, 0.0, 0.0, -sign * 0.3 * m, 1.0, 0.0]),
        "translate_x" => *img = affine(img, [1.0, 0.0, -sign * 0.45 * m * w as f32, 0.0, 1.0, 0.0]),
        "translate_y" => *img = affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, -sign * 0.45 * m * h as f32]),
        other => unreachable!("unknown RandAugment op {other}"),
    }
}

/// RandAugment: `n` operations drawn uniformly (with replacement), each at magnitude
/// `N(m, mstd²)` clipped to [0, 10].
pub fn rand_augment(img: &mut RgbImage, n: usize, m: f64, mstd: f64, rng: &mut impl Rng) {
    for _ in 0..n {
        let op = RANDAUGMENT_OPS[rng.gen_range(0..RANDAUGMENT_OPS.len())];
        let mag = if mstd > 0.0 {
            let normal = rand_distr::Normal::new(m, mstd).expect("std > 0");
            normal.sample(rng).clamp(0.0, 10.0)
        } else {
            m
        };
        apply_op(img, op, mag, rng);
    }
}

/// One-hot targets with label smoothing: `1 − ε + ε/C` on the label, `ε/C` elsewhere (timm).
pub fn smooth_targets(labels: &[u32], classes: usize, smoothing: f64) -> Vec<f32> {
    let off = (smoothing / classes as f64) as f32;
    let on = (1.0 - smoothing) as f32 + off;
    let mut t = vec![off; labels.len() * classes];
    for (i, &y) in labels.iter().enumerate() {
        t[i * classes + y as usize] = on;
    }
    t
}

/// What a batch-level mix did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mix {
    None,
    /// `x ← λ·x + (1 − λ)·flip(x)`.
    Mixup {
        lambda: f64,
    },
    /// The box `(x0, y0, x1, y1)` of `flip(x)` pasted into `x`; `lambda` = kept area fraction.
    Cutmix {
        lambda: f64,
        bbox: (usize, usize, usize, usize),
    },
}

impl Mix {
    pub fn lambda(&self) -> f64 {
        match *self {
            Mix::None => 1.0,
            Mix::Mixup { lambda } | Mix::Cutmix { lambda, .. } => lambda,
        }
    }
}

/// timm's batch Mixup/CutMix: with probability `mix_prob` mix the batch with its reverse
/// (sample `i` with sample `B − 1 − i`), choosing CutMix with probability `switch_prob` when
/// both are on. `images` is `(B, 3, H, W)` CHW floats, `targets` `(B, C)`; both are mixed by the
/// same λ (for CutMix, λ is recomputed as the exact kept area after clipping the box).
pub fn mix_batch(
    images: &mut [f32],
    targets: &mut [f32],
    b: usize,
    side: usize,
    mixup: f64,
    cutmix: f64,
    mix_prob: f64,
    switch_prob: f64,
    rng: &mut impl Rng,
) -> Mix {
    if b < 2 || (mixup <= 0.0 && cutmix <= 0.0) || !rng.gen_bool(mix_prob.clamp(0.0, 1.0)) {
        return Mix::None;
    }
    let use_cutmix = cutmix > 0.0 && (mixup <= 0.0 || rng.gen_bool(switch_prob.clamp(0.0, 1.0)));
    let alpha = if use_cutmix { cutmix } else { mixup };
    let lam: f64 = Beta::new(alpha, alpha).expect("alpha > 0").sample(rng);
    let per = 3 * side * side;
    let src = images.to_vec();
    let mix = if use_cutmix {
        let cut = (1.0 - lam).sqrt();
        let (cw, ch) = ((side as f64 * cut) as usize, (side as f64 * cut) as usize);
        let (cx, cy) = (rng.gen_range(0..side), rng.gen_range(0..side));
        let x0 = cx.saturating_sub(cw / 2);
        let y0 = cy.saturating_sub(ch / 2);
        let x1 = (cx + cw / 2).min(side);
        let y1 = (cy + ch / 2).min(side);
        for i in 0..b {
            let j = b - 1 - i;
            for c in 0..3 {
                for y in y0..y1 {
                    let row = c * side * side + y * side;
                    images[i * per + row + x0..i * per + row + x1]
                        .copy_from_slice(&src[j * per + row + x0..j * per + row + x1]);
                }
            }
        }
        let lambda = 1.0 - ((x1 - x0) * (y1 - y0)) as f64 / (side * side) as f64;
        Mix::Cutmix {
            lambda,
            bbox: (x0, y0, x1, y1),
        }
    } else {
        for i in 0..b {
            let j = b - 1 - i;
            for k in 0..per {
                images[i * per + k] =
                    (lam * src[i * per + k] as f64 + (1.0 - lam) * src[j * per + k] as f64) as f32;
            }
        }
        Mix::Mixup { lambda: lam }
    };
    let lam = mix.lambda();
    let classes = targets.len() / b;
    let t = targets.to_vec();
    for i in 0..b {
        let j = b - 1 - i;
        for c in 0..classes {
            targets[i * classes + c] =
                (lam * t[i * classes + c] as f64 + (1.0 - lam) * t[j * classes + c] as f64) as f32;
        }
    }
    mix
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn batch(b: usize, side: usize) -> Vec<f32> {
        // Image i is constant i+1, so every pixel says where it came from.
        (0..b)
            .flat_map(|i| vec![(i + 1) as f32; 3 * side * side])
            .collect()
    }

    #[test]
    fn mixup_mixes_images_and_labels_by_the_same_lambda() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (b, side) = (4, 8);
        let mut x = batch(b, side);
        let mut t = smooth_targets(&[0, 1, 2, 3], 4, 0.0);
        let m = mix_batch(&mut x, &mut t, b, side, 0.8, 0.0, 1.0, 0.5, &mut rng);
        let Mix::Mixup { lambda } = m else {
            panic!("{m:?}")
        };
        // Image 0 = λ·1 + (1 − λ)·4; its target puts λ on class 0 and 1 − λ on class 3.
        let want = lambda * 1.0 + (1.0 - lambda) * 4.0;
        assert!((x[0] as f64 - want).abs() < 1e-5);
        assert!((t[0] as f64 - lambda).abs() < 1e-6);
        assert!((t[3] as f64 - (1.0 - lambda)).abs() < 1e-6);
    }

    #[test]
    fn cutmix_lambda_is_the_kept_area() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (b, side) = (2, 32);
        for _ in 0..20 {
            let mut x = batch(b, side);
            let mut t = smooth_targets(&[0, 1], 2, 0.0);
            let m = mix_batch(&mut x, &mut t, b, side, 0.0, 1.0, 1.0, 0.5, &mut rng);
            let Mix::Cutmix { lambda, .. } = m else {
                panic!("{m:?}")
            };
            // Pixels of image 0 that now come from image 1 (value 2), over all its pixels.
            let pasted = x[..3 * side * side].iter().filter(|&&v| v == 2.0).count();
            let kept = 1.0 - pasted as f64 / (3 * side * side) as f64;
            assert!((kept - lambda).abs() < 1e-9, "{kept} vs {lambda}");
            assert!((t[0] as f64 - lambda).abs() < 1e-6);
        }
    }

    #[test]
    fn smoothing_and_no_mix() {
        let t = smooth_targets(&[1], 4, 0.1);
        assert!((t[1] - 0.925).abs() < 1e-6 && (t[0] - 0.025).abs() < 1e-6);
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let mut x = batch(2, 4);
        let mut tt = t.repeat(2);
        let m = mix_batch(&mut x, &mut tt, 2, 4, 0.8, 1.0, 0.0, 0.5, &mut rng);
        assert_eq!(m, Mix::None);
    }

    #[test]
    fn every_randaugment_op_keeps_the_size_and_most_change_pixels() {
        let img = RgbImage::from_fn(40, 30, |x, y| Rgb([(x * 6) as u8, (y * 8) as u8, 100]));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut changed = 0;
        for op in RANDAUGMENT_OPS {
            let mut out = img.clone();
            apply_op(&mut out, op, 9.0, &mut rng);
            assert_eq!(out.dimensions(), (40, 30), "{op}");
            changed += (out != img) as usize;
        }
        assert!(changed >= RANDAUGMENT_OPS.len() - 1, "{changed}"); // all but identity
        let mut out = img.clone();
        rand_augment(&mut out, 2, 9.0, 0.5, &mut rng);
        assert_eq!(out.dimensions(), (40, 30));
    }
}
