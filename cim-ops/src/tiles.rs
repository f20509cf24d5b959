//! Register-tiled small matrix products for the CPU kernels (attention's per-head `N×Dh` and
//! `N×N` products) and row reductions in eight lanes (sums, maxima, softmax), written once for
//! both [`super::simd`] instances.
//!
//! A tile of `MR` output rows × `NR` columns is accumulated in registers over the inner
//! dimension: per step one `NR`-wide load of `b`, `MR` scalar loads of `a` and `MR·NR`
//! multiply-adds. The former kernels did a load, a multiply-add and a store per element
//! (`axpy`s), bound by memory operations rather than arithmetic.

use super::simd::madd;

/// A read-only strided matrix: element `(i, p)` at `data[i·rs + p·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major rows of stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }
    /// The transpose of row-major rows of stride `rs`.
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

/// `c(i, j) = alpha · Σₚ a(i, p) · b(p, j)` for `i < m`, `j < n`, `p < k`, overwriting `c`; the
/// rows of `b` are contiguous with stride `ldb`, the rows of `c` have stride `ldc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<const FAST: bool>(
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: View,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
) {
    // AVX2 has sixteen 8-lane registers: 4 × 16 accumulators take eight. SSE2 has sixteen 4-lane
    // ones: 4 × 8 accumulators take eight.
    let out = Out { c, ldc, alpha };
    if FAST {
        columns::<FAST, 16>((m, n, k), a, b, ldb, out);
    } else {
        columns::<FAST, 8>((m, n, k), a, b, ldb, out);
    }
}

struct Out<'c> {
    c: &'c mut [f32],
    ldc: usize,
    alpha: f32,
}

#[inline(always)]
fn columns<const FAST: bool, const NR: usize>(
    (m, n, k): (usize, usize, usize),
    a: View,
    b: &[f32],
    ldb: usize,
    mut out: Out,
) {
    let mut j = 0;
    while j + NR <= n {
        rows::<FAST, NR>((m, k), (j, NR), a, b, ldb, &mut out);
        j += NR;
    }
    // The remainder in 8-wide tiles (the last one zero-padded).
    while j < n {
        let w = (n - j).min(8);
        rows::<FAST, 8>((m, k), (j, w), a, b, ldb, &mut out);
        j += w;
    }
}

#[inline(always)]
fn rows<const FAST: bool, const NR: usize>(
    (m, k): (usize, usize),
    (j, w): (usize, usize),
    a: View,
    b: &[f32],
    ldb: usize,
    out: &mut Out,
) {
    let mut i = 0;
    while i + 4 <= m {
        tile::<FAST, 4, NR>((i, j, w, k), a, b, ldb, out);
        i += 4;
    }
    while i < m {
        tile::<FAST, 1, NR>((i, j, w, k), a, b, ldb, out);
        i += 1;
    }
}

/// Rows `i..i+MR`, columns `j..j+w` (`w ≤ NR`) of the product.
#[inline(always)]
fn tile<const FAST: bool, const MR: usize, const NR: usize>(
    (i, j, w, k): (usize, usize, usize, usize),
    a: View,
    b: &[f32],
    ldb: usize,
    out: &mut Out,
) {
    let mut acc = [[0f32; NR]; MR];
    for p in 0..k {
        let row = &b[p * ldb + j..];
        let mut bv = [0f32; NR];
        if w == NR {
            bv.copy_from_slice(&row[..NR]);
        } else {
            bv[..w].copy_from_slice(&row[..w]);
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = a.data[(i + r) * a.rs + p * a.cs];
            for (x, &bl) in acc.iter_mut().zip(&bv) {
                *x = madd::<FAST>(ar, bl, *x);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let dst = &mut out.c[(i + r) * out.ldc + j..][..w];
        for (d, &x) in dst.iter_mut().zip(acc) {
            *d = out.alpha * x;
        }
    }
}

/// `Σ aᵢ·bᵢ` with eight independent partial sums (so it vectorises).
#[inline(always)]
pub(crate) fn dot<const FAST: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = madd::<FAST>(x[l], y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = madd::<FAST>(*x, *y, s);
    }
    s
}

/// `scale · softmax(row)` in place (max-subtracted, [`super::fast_exp`]).
#[inline(always)]
pub(crate) fn softmax_row(row: &mut [f32], scale: f32) {
    let max = max(row);
    for x in row.iter_mut() {
        *x = super::fast_exp(*x - max);
    }
    let k = scale / sum(row);
    row.iter_mut().for_each(|x| *x *= k);
}

/// `max xᵢ` (`−∞` for none) with eight partial maxima.
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for l in 0..8 {
            mx[l] = mx[l].max(c[l]);
        }
    }
    mx.iter().copied().fold(rest, f32::max)
}

/// `Σ xᵢ` with eight partial sums.
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    sum_zip(xs, xs, |x, _| x)
}

/// `Σ f(aᵢ, bᵢ)` with eight partial sums (the loop vectorises; f32 addition is not associative,
/// so a single running sum would not).
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    /// Deterministic `m × k` and `k × n` operands with small exact values (also the gemm tests').
    pub(crate) fn operands(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0);
        let b = (0..k * n).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0);
        (a.collect(), b.collect())
    }

    #[test]
    fn tiled_products_match_the_naive_one_at_every_remainder() {
        // m crosses the 4-row tiles, n the 16/8-wide tiles and the padded tail.
        for (m, n, k) in [(1, 1, 1), (5, 7, 3), (9, 25, 13), (13, 33, 12), (4, 16, 8)] {
            let (a, b) = operands(m, n, k);
            let want = naive(m, n, k, &a, &b);
            let at: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
            for fast in [false, true] {
                for transposed in [false, true] {
                    // Output rows padded to stride n + 3: the padding must stay untouched.
                    let mut c = vec![7f32; m * (n + 3)];
                    let view = if transposed {
                        View::transposed(&at, m)
                    } else {
                        View::rows(&a, k)
                    };
                    if fast {
                        matmul::<true>((m, n, k), 0.5, view, &b, n, &mut c, n + 3);
                    } else {
                        matmul::<false>((m, n, k), 0.5, view, &b, n, &mut c, n + 3);
                    }
                    for i in 0..m {
                        for j in 0..n + 3 {
                            let got = c[i * (n + 3) + j];
                            let w = if j < n { 0.5 * want[i * n + j] } else { 7.0 };
                            assert!(
                                (got - w).abs() < 1e-4,
                                "{m}x{n}x{k} ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_row_and_dot() {
        for n in [1, 7, 8, 19] {
            let mut row: Vec<f32> = (0..n).map(|i| (i as f32 * 1.3).sin() * 4.0).collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|x| (x - max).exp()).sum();
            let want: Vec<f32> = row.iter().map(|x| (x - max).exp() / z).collect();
            let d = dot::<false>(&row, &want);
            let d_fast = dot::<true>(&row, &want);
            let d_want: f32 = row.iter().zip(&want).map(|(a, b)| a * b).sum();
            assert!((d - d_want).abs() < 1e-5 && (d_fast - d_want).abs() < 1e-5);
            softmax_row(&mut row, 1.0);
            for (g, w) in row.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "{n}: {g} vs {w}");
            }
        }
    }
}
