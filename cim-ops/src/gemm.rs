//! f32 matrix products on the CPU through the `gemm` crate (the one behind candle's CPU matmul),
//! called directly so that the caller chooses the parallelism.
//!
//! candle's batched matmul loops over the batch and hands each product to `gemm` with all threads;
//! a product of a few MFLOP (a small convolution's per-image GEMM) then runs on one thread anyway,
//! or pays a thread hand-off per call, and the batch runs in series. The convolution kernels
//! instead run one product per image *on each thread* ([`Threads::One`]) and all threads on one
//! product only when there are fewer images than threads ([`Threads::All`]).

// `gemm::gemm` takes raw pointers and strides; the one `unsafe` call below is preceded by checks
// that every element it reads or writes lies inside the slices it was given.
#![allow(unsafe_code)]

use super::tiles::View;

/// Which threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// The calling thread only (the caller runs products in parallel).
    One,
    /// rayon's pool.
    All,
}

/// The number of elements a `rows × cols` strided matrix spans (0 when empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `c = a · b` (`accumulate`: `c += a · b`) for an `m × k` view `a`, a `k × n` view `b` and the
/// `m × n` row-major matrix `c` with row stride `ldc`.
///
/// Panics if a view or `c` is too short for the sizes (a caller's bug, not bad input).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    threads: Threads,
) {
    assert!(
        extent(m, k, a.rs, a.cs) <= a.data.len()
            && extent(k, n, b.rs, b.cs) <= b.data.len()
            && extent(m, n, ldc, 1) <= c.len()
            && (m <= 1 || ldc >= n),
        "sgemm: ({m}, {n}, {k}) does not fit a {} / b {} / c {} (ldc {ldc})",
        a.data.len(),
        b.data.len(),
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in c.chunks_mut(ldc.max(1)).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = match threads {
        Threads::All if rayon::current_num_threads() > 1 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        _ => gemm::Parallelism::None,
    };
    // SAFETY: the assertion above bounds the largest offset read from `a` and `b` and written in
    // `c` by their lengths (all strides are non-negative); `c` is a unique borrow, so it overlaps
    // neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive((m, n, k): (usize, usize, usize), a: View, b: View) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs])
                    .sum();
            }
        }
        c
    }

    /// Plain, transposed and accumulating products, both thread settings, row-stride padding in
    /// `c` untouched; an empty inner dimension clears or keeps `c`.
    #[test]
    fn matches_naive_products() {
        let (m, n, k) = (13, 37, 29);
        let (a, b) = crate::tiles::tests::operands(m, n, k);
        for (at, bt) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if at {
                View::transposed(&a, m)
            } else {
                View::rows(&a, k)
            };
            let bv = if bt {
                View::transposed(&b, k)
            } else {
                View::rows(&b, n)
            };
            let want = naive((m, n, k), av, bv);
            for threads in [Threads::One, Threads::All] {
                let ldc = n + 3;
                let mut c = vec![7f32; m * ldc];
                sgemm((m, n, k), av, bv, &mut c, ldc, false, threads);
                for i in 0..m {
                    for j in 0..n {
                        let d = (c[i * ldc + j] - want[i * n + j]).abs();
                        assert!(d < 1e-4, "{at} {bt} {threads:?} ({i}, {j}): {d}");
                    }
                    assert_eq!(c[i * ldc + n..(i + 1) * ldc], [7.0; 3], "padding kept");
                }
                sgemm((m, n, k), av, bv, &mut c, ldc, true, threads);
                for i in 0..m {
                    for j in 0..n {
                        let d = (c[i * ldc + j] - 2.0 * want[i * n + j]).abs();
                        assert!(d < 1e-4, "accumulated ({i}, {j}): {d}");
                    }
                }
            }
        }
        let mut c = vec![3f32; 4];
        sgemm(
            (2, 2, 0),
            View::rows(&[], 0),
            View::rows(&[], 2),
            &mut c,
            2,
            true,
            Threads::One,
        );
        assert_eq!(c, [3.0; 4]);
        sgemm(
            (2, 2, 0),
            View::rows(&[], 0),
            View::rows(&[], 2),
            &mut c,
            2,
            false,
            Threads::One,
        );
        assert_eq!(c, [0.0; 4]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn rejects_short_operands() {
        let a = [1f32; 5];
        let mut c = [0f32; 4];
        sgemm(
            (2, 2, 3),
            View::rows(&a, 3),
            View::rows(&a, 2),
            &mut c,
            2,
            false,
            Threads::One,
        );
    }
}
