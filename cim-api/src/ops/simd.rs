//! Run-time choice of the CPU's vector instructions for the hot CPU kernels.
//!
//! The portable build targets baseline x86-64 (SSE2: four f32 lanes, no fused multiply-add), so
//! loops the compiler vectorises run at a quarter of what an AVX2 + FMA core does. A [`Kernel`] is
//! written once, generic over a `const FAST: bool`; [`run`] calls its `FAST = true` instance
//! compiled with AVX2 and FMA enabled when the CPU has them (checked once), the portable one
//! otherwise. Kernels use [`madd`] for their multiply-adds, which is one fused instruction in the
//! fast instance and a multiply and an add in the portable one; everything a kernel calls must be
//! `#[inline(always)]` to be compiled for the fast instance's instructions.
//!
//! Results of the two instances differ by rounding only (fused multiply-adds round once); a run
//! is deterministic on one machine. [`set_portable_kernels`] forces the portable instance process-wide (the
//! `fused_ops` bench times both).

// Calling a `#[target_feature]` function is `unsafe`: the one `unsafe` block here is guarded by a
// run-time check that the CPU has those features.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

/// A kernel body with two instances: `FAST` (AVX2 + FMA code) and portable.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The body; must be `#[inline(always)]` in implementations.
    fn call<const FAST: bool>(self) -> Self::Output;
}

static PORTABLE: AtomicBool = AtomicBool::new(false);

/// Forces the portable (SSE2) instance of cim's hot CPU kernels process-wide (`true`), or lets
/// them pick the CPU's best (`false`, the default).
pub fn set_portable_kernels(on: bool) {
    PORTABLE.store(on, Ordering::Relaxed);
}

/// Whether cim's hot CPU kernels run their AVX2 + FMA instances on this CPU.
pub fn avx2_kernels() -> bool {
    !PORTABLE.load(Ordering::Relaxed) && detected()
}

/// AVX2 and FMA present (`is_x86_feature_detected!` caches what it probed).
fn detected() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Runs `kernel`, its AVX2 + FMA instance where the CPU has both.
#[inline]
pub(crate) fn run<K: Kernel>(kernel: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    if avx2_kernels() {
        // SAFETY: `avx2_fma` only requires that the CPU supports AVX2 and FMA, which
        // `avx2_kernels` has just checked with `is_x86_feature_detected!`.
        return unsafe { avx2_fma(kernel) };
    }
    kernel.call::<false>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_fma<K: Kernel>(kernel: K) -> K::Output {
    kernel.call::<true>()
}

/// `a·b + c`: one fused multiply-add in the fast instance, a multiply and an add otherwise (a
/// libm `fmaf` call would be far slower on CPUs without FMA).
#[inline(always)]
pub(crate) fn madd<const FAST: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FAST {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dot<'a>(&'a [f32], &'a [f32]);

    impl Kernel for Dot<'_> {
        type Output = f32;
        #[inline(always)]
        fn call<const FAST: bool>(self) -> f32 {
            self.0
                .iter()
                .zip(self.1)
                .fold(0.0, |s, (&a, &b)| madd::<FAST>(a, b, s))
        }
    }

    #[test]
    fn both_instances_compute_the_same_function() {
        let a: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..100).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        // Both instances called directly (the fast one outside AVX2 code computes the same
        // function, slowly), and the dispatched one. `set_portable_kernels` is process-wide, so tests
        // running alongside never toggle it.
        let (fast, portable) = (Dot(&a, &b).call::<true>(), Dot(&a, &b).call::<false>());
        for got in [fast, portable, run(Dot(&a, &b))] {
            assert!((got as f64 - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}
