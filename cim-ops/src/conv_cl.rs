//! The CPU's channels-last convolution: [`super::conv2d_channels_last`] for f32 maps on the CPU.
//!
//! Channels first, the CPU convolution runs one GEMM per image (`(C_out, C·k·k) · (C·k·k, Ho·Wo)`),
//! and its patch matrix gathers single floats from strided planes. Small maps make those GEMMs
//! thin: at the tiny ResNet layout's last stage an image has 2×2 pixels, so the products are
//! `(64, 256) · (256, 4)`, where a GEMM kernel spends its time on edges. Channels last, a batch is
//! ONE matrix of `B·Ho·Wo` rows: a pointwise convolution is `x (B·H·W, C) · wᵀ` with no copy at
//! all, and a k×k one builds its patch rows from runs of contiguous floats (a window row's taps
//! are neighbouring pixels: one run of up to `k·C` floats each, zeros where the window leaves the
//! map) — then one GEMM per group of images in every pass:
//!
//! | pass | product |
//! |---|---|
//! | forward | `y (rows, C_out) = P (rows, k·k·C) · w'ᵀ` |
//! | filter | `dw' (C_out, k·k·C) = dyᵀ · P` per group, the groups' parts added in order |
//! | data | `dP = dy · w'`, then each patch row's runs added back into `dx` (pointwise: `dx = dy · w'`) |
//!
//! `w'` is the filter channels last, `(C_out, k, k, C)` (cuDNN's KRSC), permuted from and back to
//! the master weight's `(C_out, C, k, k)` on the way. Groups hold whole images ([`GROUPS`] at
//! most, [`MIN_ROWS`] output pixels at least where the batch has them, at most [`PATCH_BUDGET`]
//! bytes of patch rows), so the result depends on the sizes, never on the number of threads.

use candle_core::Tensor;
use rayon::prelude::*;

use super::gemm::{sgemm, Threads};
use super::im2col::{add_in_order, cpu_f32, dx_groups, Im2Col};
use super::tiles::View;
use crate::Result;

/// Largest patch matrix one group of images may hold, in bytes.
const PATCH_BUDGET: usize = 64 << 20;

/// The most groups a batch is split into (as the channels-first CPU backward's `DW_GROUPS`).
const GROUPS: usize = 16;

/// Output pixels a group should have at least (the rows of its products).
const MIN_ROWS: usize = 1024;

/// The largest scratch buffer a thread keeps after a call, in bytes. Larger ones (maps of 224-px
/// images) go back to the allocator, so that the memory serves the next activations too: kept per
/// thread, every worker of a many-core machine would end up holding two buffers of up to
/// [`PATCH_BUDGET`] each. The tiny presets' buffers stay under it (at most ~1.2 MB).
const KEEP_BYTES: usize = 4 << 20;

thread_local! {
    /// The calling thread's patch-matrix buffers, kept between calls up to [`KEEP_BYTES`]: a
    /// fresh buffer is zero-filled before the patches overwrite it, a kept one only where it grows.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// Runs `f` with this thread's two scratch buffers (taken out meanwhile, so a nested call gets
/// fresh ones rather than a borrow error); keeps them afterwards unless they are larger than
/// [`KEEP_BYTES`].
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    let [mut a, mut b] = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let r = f(&mut a, &mut b);
    for v in [&mut a, &mut b] {
        if v.capacity() * std::mem::size_of::<f32>() > KEEP_BYTES {
            *v = Vec::new();
        }
    }
    SCRATCH.with(|s| *s.borrow_mut() = [a, b]);
    r
}

/// The sizes of one channels-last convolution.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    op: Im2Col,
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    c_out: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    /// `x` `(B, H, W, C)`, `c_out` output channels.
    pub fn new(op: Im2Col, (b, h, w, c): (usize, usize, usize, usize), c_out: usize) -> Self {
        Self {
            op,
            b,
            h,
            w,
            c,
            c_out,
            ho: op.out(h),
            wo: op.out(w),
        }
    }

    /// `k·k·C`, a patch row's length.
    fn patch_len(&self) -> usize {
        self.op.k * self.op.k * self.c
    }

    /// Output pixels per image.
    fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// Whether the patch matrix is `x` itself (1×1, stride 1, no padding).
    fn pointwise(&self) -> bool {
        self.op.k == 1 && self.op.stride == 1 && self.op.padding == 0
    }

    /// The patch rows of images `x` (a whole number of images, channels last) into `p`
    /// `(images·Ho·Wo, k·k·C)`: row `(i, oy, ox)` holds the window at that output pixel, tap by
    /// tap, each tap `C` contiguous floats (zeros outside the map).
    fn patches(&self, x: &[f32], p: &mut [f32], threads: Threads) {
        let (c, row) = (self.c, self.patch_len());
        let img = self.h * self.w * c;
        let out_row = |(r, dst): (usize, &mut [f32])| {
            // One output row (image i, output row oy) per chunk.
            let (i, oy) = (r / self.ho, r % self.ho);
            let xi = &x[i * img..(i + 1) * img];
            for (ox, prow) in dst.chunks_mut(row).enumerate() {
                self.window(oy, ox, |tap, n, at| {
                    let run = &mut prow[tap * c..(tap + n) * c];
                    match at {
                        Some(o) => run.copy_from_slice(&xi[o..o + n * c]),
                        None => run.fill(0.0),
                    }
                });
            }
        };
        match threads {
            // Work items of at least ~8 K values (small maps have output rows of a few pixels).
            Threads::All => p
                .par_chunks_mut(row * self.wo)
                .with_min_len((8192 / (row * self.wo).max(1)).max(1))
                .enumerate()
                .for_each(out_row),
            Threads::One => p.chunks_mut(row * self.wo).enumerate().for_each(out_row),
        }
    }

    /// Calls `f(tap, n, offset)` for runs of the `k·k` taps of output pixel `(oy, ox)` that lie
    /// together: `n` taps from `tap` on, at `offset` in the image (the taps of a window row are
    /// neighbouring pixels, so their channels are one run of `n·C` floats), or `None` where they
    /// fall in the padding.
    #[inline]
    fn window(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize, Option<usize>)) {
        let Im2Col { k, stride, padding } = self.op;
        // The window's columns inside the map: kx in lo..hi.
        let x0 = ox * stride;
        let lo = padding.saturating_sub(x0).min(k);
        let hi = (self.w + padding).saturating_sub(x0).clamp(lo, k);
        for ky in 0..k {
            let tap = ky * k;
            let y = (oy * stride + ky)
                .checked_sub(padding)
                .filter(|&y| y < self.h);
            let Some(y) = y else {
                f(tap, k, None);
                continue;
            };
            if lo > 0 {
                f(tap, lo, None);
            }
            if hi > lo {
                f(
                    tap + lo,
                    hi - lo,
                    Some((y * self.w + x0 + lo - padding) * self.c),
                );
            }
            if hi < k {
                f(tap + hi, k - hi, None);
            }
        }
    }

    /// Adds patch-row gradients `dp` `(images·Ho·Wo, k·k·C)` back into `dx` (those images,
    /// channels last, zero on entry), images in parallel with [`Threads::All`].
    fn fold(&self, dp: &[f32], dx: &mut [f32], threads: Threads) {
        let (c, row) = (self.c, self.patch_len());
        let (img, per_image) = (self.h * self.w * c, self.pixels() * row);
        let image = |(dxi, dpi): (&mut [f32], &[f32])| {
            for (px, prow) in dpi.chunks(row).enumerate() {
                let (oy, ox) = (px / self.wo, px % self.wo);
                self.window(oy, ox, |tap, n, at| {
                    if let Some(o) = at {
                        let src = &prow[tap * c..(tap + n) * c];
                        for (d, s) in dxi[o..o + n * c].iter_mut().zip(src) {
                            *d += s;
                        }
                    }
                });
            }
        };
        match threads {
            Threads::All => dx
                .par_chunks_mut(img)
                .zip(dp.par_chunks(per_image))
                .for_each(image),
            Threads::One => dx.chunks_mut(img).zip(dp.chunks(per_image)).for_each(image),
        }
    }

    /// `y` `(B, Ho, Wo, C_out)` from `x` `(B, H, W, C)` and `wk` `(C_out, k·k·C)`.
    pub fn forward(&self, x: &[f32], wk: &[f32], y: &mut [f32]) {
        let (row, per) = (self.patch_len(), self.group());
        let (img_in, img_out) = (self.h * self.w * self.c, self.pixels() * self.c_out);
        let one = |xg: &[f32], yg: &mut [f32], threads: Threads| {
            with_scratch(|p, _| {
                let rows = yg.len() / self.c_out;
                let pm = self.patch_matrix(xg, rows, p, threads);
                let dims = (rows, self.c_out, row);
                let (a, b) = (View::rows(pm, row), View::transposed(wk, row));
                sgemm(dims, a, b, yg, self.c_out, false, threads);
            })
        };
        let groups = y.chunks_mut(per * img_out).zip(x.chunks(per * img_in));
        match self.threads() {
            (true, t) => groups
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each(|(yg, xg)| one(xg, yg, t)),
            (false, t) => groups.for_each(|(yg, xg)| one(xg, yg, t)),
        }
    }

    /// Images per group: the batch in at most [`GROUPS`] groups of whole images, each of at
    /// least [`MIN_ROWS`] output pixels where the batch has them (larger products run nearer the
    /// GEMM kernel's speed), fewer images where a group's patch matrix would pass
    /// [`PATCH_BUDGET`].
    fn group(&self) -> usize {
        let per_image = self.pixels() * self.patch_len() * 4;
        let fits = (PATCH_BUDGET / per_image.max(1)).max(1);
        let rows = MIN_ROWS.div_ceil(self.pixels().max(1));
        self.b.div_ceil(GROUPS).max(rows).min(self.b).clamp(1, fits)
    }

    /// How the groups run: in parallel, one thread each with single-threaded products, where
    /// there are at least as many groups as threads (small products split over threads spend
    /// their time synchronising); else one after another, each product on all threads if it is
    /// large enough to gain from them.
    fn threads(&self) -> (bool, Threads) {
        let threads = rayon::current_num_threads();
        if threads > 1 && self.b.div_ceil(self.group()) >= threads {
            return (true, Threads::One);
        }
        let macs = self.group() * self.pixels() * self.patch_len() * self.c_out;
        match macs >= 1 << 22 {
            true => (false, Threads::All),
            false => (false, Threads::One),
        }
    }

    /// The patch matrix of the images `xc` (`rows` output pixels): `xc` itself when pointwise,
    /// else built in `p`.
    fn patch_matrix<'a>(
        &self,
        xc: &'a [f32],
        rows: usize,
        p: &'a mut Vec<f32>,
        threads: Threads,
    ) -> &'a [f32] {
        if self.pointwise() {
            return xc;
        }
        p.resize(rows * self.patch_len(), 0.0);
        self.patches(xc, p, threads);
        p
    }

    /// `(dx, dw')` from `dy` `(B, Ho, Wo, C_out)`: `dw'` `(C_out, k·k·C)`, `dx` channels last
    /// when `need_dx`. Each group sums its `dw'` part; the parts are added in group order, so the
    /// result depends on the sizes only, never on the number of threads.
    pub fn backward(
        &self,
        x: &[f32],
        wk: &[f32],
        dy: &[f32],
        need_dx: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>) {
        let (row, per) = (self.patch_len(), self.group());
        let (img_in, img_out) = (self.h * self.w * self.c, self.pixels() * self.c_out);
        let mut dx = vec![0f32; if need_dx { x.len() } else { 0 }];
        let one = |xg: &[f32], gg: &[f32], dxg: &mut [f32], threads: Threads| -> Vec<f32> {
            let mut dw = vec![0f32; self.c_out * row];
            with_scratch(|p, dp| {
                let rows = gg.len() / self.c_out;
                let pm = self.patch_matrix(xg, rows, p, threads);
                let g = View::transposed(gg, self.c_out);
                sgemm(
                    (self.c_out, row, rows),
                    g,
                    View::rows(pm, row),
                    &mut dw,
                    row,
                    false,
                    threads,
                );
                if !need_dx {
                    return;
                }
                let dims = (rows, row, self.c_out);
                let (g, wv) = (View::rows(gg, self.c_out), View::rows(wk, row));
                if self.pointwise() {
                    sgemm(dims, g, wv, dxg, row, false, threads);
                    return;
                }
                dp.resize(rows * row, 0.0);
                sgemm(dims, g, wv, dp, row, false, threads);
                self.fold(dp, dxg, threads);
            });
            dw
        };
        let dx_len = if need_dx { per * img_in } else { 0 };
        let mut dx_parts = dx_groups(&mut dx, dx_len, self.b.div_ceil(per));
        let items = x
            .chunks(per * img_in)
            .zip(dy.chunks(per * img_out))
            .zip(dx_parts.iter_mut());
        let parts: Vec<Vec<f32>> = match self.threads() {
            (true, t) => {
                let items: Vec<_> = items.collect();
                items
                    .into_par_iter()
                    .map(|((xg, gg), dxg)| one(xg, gg, dxg, t))
                    .collect()
            }
            (false, t) => items.map(|((xg, gg), dxg)| one(xg, gg, dxg, t)).collect(),
        };
        (need_dx.then_some(dx), add_in_order(parts))
    }
}

/// `(C_out, C, k, k)` → `(C_out, k·k·C)` (`to_krsc`), or back.
pub(super) fn permute_filter(
    w: &[f32],
    (c_out, c, k): (usize, usize, usize),
    to_krsc: bool,
) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for o in 0..c_out {
        for ch in 0..c {
            for t in 0..k * k {
                let kcrs = (o * c + ch) * k * k + t;
                let krsc = (o * k * k + t) * c + ch;
                match to_krsc {
                    true => out[krsc] = w[kcrs],
                    false => out[kcrs] = w[krsc],
                }
            }
        }
    }
    out
}

/// Whether [`conv2d`] takes these tensors: f32 on the CPU.
pub(super) fn takes(x: &Tensor, w: &Tensor) -> bool {
    super::is_fusable(&[x, w]) && x.device().is_cpu()
}

/// The channels-last convolution of f32 CPU tensors as one grafted node: `x` `(B, H, W, C)`, `w`
/// `(C_out, C, k, k)` → `(B, Ho, Wo, C_out)`. Keeps `x` and the permuted filter.
pub(super) fn conv2d(x: &Tensor, w: &Tensor, op: Im2Col) -> Result<Tensor> {
    let (b, h, wd, c) = x.dims4()?;
    let c_out = w.dim(0)?;
    let geo = Geometry::new(op, (b, h, wd, c), c_out);
    let xd = x.detach().contiguous()?;
    let wk = cpu_f32(&w.detach().contiguous()?, |ws| {
        permute_filter(ws, (c_out, c, op.k), true)
    })?;
    let mut y = vec![0f32; b * geo.pixels() * c_out];
    cpu_f32(&xd, |xs| geo.forward(xs, &wk, &mut y))?;
    let y = Tensor::from_vec(y, (b, geo.ho, geo.wo, c_out), x.device())?;
    let need_dx = super::region::needs_grad(x);
    let w_shape = w.shape().clone();
    super::with_backward(&[x, w], y, move |dy| {
        let dy = dy.contiguous()?;
        let (dx, dwk) = cpu_f32(&xd, |xs| {
            cpu_f32(&dy, |g| geo.backward(xs, &wk, g, need_dx))
        })
        .and_then(|r| r)?;
        let dev = xd.device();
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, (b, h, wd, c), dev))
            .transpose()?;
        let dw = permute_filter(&dwk, (c_out, c, op.k), false);
        Ok(vec![dx, Some(Tensor::from_vec(dw, &w_shape, dev)?)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use candle_core::Var;

    /// Against the channels-first convolution of the transposed map, for every shape ResNet-50
    /// uses (stem 7×7 s2, 3×3 s1 and s2, 1×1 s1 and s2) and one whose patch matrix needs several
    /// chunks: values, `dx` and `dw`.
    #[test]
    fn equals_the_channels_first_convolution() -> Result<()> {
        for (b, c, h, c_out, k, stride, pad) in [
            (2, 3, 17, 8, 7, 2, 3),
            (3, 5, 9, 6, 3, 1, 1),
            (2, 4, 8, 7, 3, 2, 1),
            (2, 6, 5, 4, 1, 1, 0),
            (2, 6, 7, 4, 1, 2, 0),
        ] {
            let x = Var::from_tensor(&randn(&[b, c, h, h], 31))?;
            let w = Var::from_tensor(&(randn(&[c_out, c, k, k], 32) * 0.3)?)?;
            let want = crate::conv2d(&x, &w, pad, stride)?;
            let g = randn(want.dims(), 33);
            let gw = (&want * &g)?.sum_all()?.backward()?;
            let op = Im2Col {
                k,
                stride,
                padding: pad,
            };
            let got = conv2d(&x.permute((0, 2, 3, 1))?, &w, op)?;
            assert!(max_diff(&got.permute((0, 3, 1, 2))?, &want) < 1e-5);
            let gg = (&got * &g.permute((0, 2, 3, 1))?)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("w", &w)] {
                let d = max_diff(gg.get(v).unwrap(), gw.get(v).unwrap());
                assert!(d < 1e-4, "k{k} s{stride} c{c}: d{name} {d}");
            }
        }
        Ok(())
    }

    /// A batch in groups of images (20 images of 16×16 output pixels: 5 groups of 4, the fewest
    /// images with at least 1024 rows; run in parallel where there are threads) equals its images
    /// one at a time: `y`, `dx`, and `dw` summed over the images.
    /// A thread keeps scratch buffers up to `KEEP_BYTES` between calls, and no larger ones.
    #[test]
    fn scratch_is_kept_up_to_its_cap() {
        let (small, large) = (KEEP_BYTES / 4, KEEP_BYTES / 4 + 1);
        with_scratch(|a, b| {
            a.resize(small, 1.0);
            b.resize(large, 1.0);
        });
        with_scratch(|a, b| {
            assert_eq!((a.len(), b.capacity()), (small, 0));
            assert!(a.iter().all(|&v| v == 1.0));
            a.resize(large, 0.0);
        });
        with_scratch(|a, b| assert_eq!((a.capacity(), b.capacity()), (0, 0)));
    }

    #[test]
    fn a_batch_equals_its_images_one_at_a_time() {
        let op = Im2Col {
            k: 3,
            stride: 1,
            padding: 1,
        };
        let (b, img, out) = (20, 16 * 16 * 4, 256 * 3);
        let geo = Geometry::new(op, (b, 16, 16, 4), 3);
        assert_eq!(geo.group(), 4);
        let x = randn(&[b * img], 41).to_vec1::<f32>().unwrap();
        let wk = randn(&[3 * 9 * 4], 42).to_vec1::<f32>().unwrap();
        let dy = randn(&[b * out], 43).to_vec1::<f32>().unwrap();
        let mut y = vec![0f32; b * out];
        geo.forward(&x, &wk, &mut y);
        let (dx, dw) = geo.backward(&x, &wk, &dy, true);
        let one = Geometry::new(op, (1, 16, 16, 4), 3);
        let (mut dw1, mut dx1, mut y1) = (vec![0f32; dw.len()], vec![], vec![]);
        for i in 0..b {
            let (xi, gi) = (&x[i * img..(i + 1) * img], &dy[i * out..(i + 1) * out]);
            let mut yi = vec![0f32; out];
            one.forward(xi, &wk, &mut yi);
            y1.extend(yi);
            let (dxi, dwi) = one.backward(xi, &wk, gi, true);
            dx1.extend(dxi.unwrap());
            dw1.iter_mut().zip(&dwi).for_each(|(a, b)| *a += b);
        }
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()))
        };
        assert!(close(&y, &y1) && close(&dx.unwrap(), &dx1) && close(&dw, &dw1));
        // Without dx: the same dw, and no dx.
        let (none, dw2) = geo.backward(&x, &wk, &dy, false);
        assert!(none.is_none() && dw2 == dw);
    }

    #[test]
    fn filter_permutation_round_trips() {
        let w: Vec<f32> = (0..2 * 3 * 4).map(|v| v as f32).collect();
        let k = permute_filter(&w, (2, 3, 2), true);
        // (o=0, tap=1, c=2) ← (o=0, c=2, tap=1) = 2·4 + 1.
        assert_eq!(k[3 + 2], 9.0);
        assert_eq!(permute_filter(&k, (2, 3, 2), false), w);
    }
}
