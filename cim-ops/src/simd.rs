//! Run-time choice of the CPU's vector instructions for the hot CPU kernels.
//!
//! The portable build targets baseline x86-64 (SSE2: four f32 lanes, no fused multiply-add), so
//! loops the compiler vectorises run at a quarter of what an AVX2 + FMA core does. A [`Kernel`] is
//! written once, generic over a `const FAST: bool`; [`run`] calls its `FAST = true` instance
//! compiled for the widest instructions the CPU has (checked once) — AVX-512 (sixteen f32 lanes;
//! `F`, `VL`, `BW`, `DQ`) or else AVX2 + FMA (eight) — and the portable one on CPUs with neither.
//! Kernels use [`madd`] for their multiply-adds, which is one fused instruction in the fast
//! instances and a multiply and an add in the portable one; everything a kernel calls must be
//! `#[inline(always)]` to be compiled for the fast instances' instructions.
//!
//! Results of the fast and the portable instances differ by rounding only (fused multiply-adds
//! round once); the two fast instances compute the same operations in the same order (the
//! compiler does not reorder float arithmetic), so they agree bit for bit. A run is deterministic
//! on one machine. [`set_cpu_kernels`] caps the instance process-wide (the `fused_ops` bench
//! times each one; `cim-run bench --cpu-kernels`).

// Calling a `#[target_feature]` function is `unsafe`: the `unsafe` blocks here are guarded by a
// run-time check that the CPU has those features.
#![allow(unsafe_code)]

use crate::backend::{cpu_kernels, CpuKernels};

/// A kernel body with two instances: `FAST` (compiled for AVX2 + FMA or for AVX-512) and
/// portable.
pub(crate) trait Kernel {
    /// What the kernel returns.
    type Output;
    /// The body; must be `#[inline(always)]` in implementations.
    fn call<const FAST: bool>(self) -> Self::Output;
}

/// Whether cim's hot CPU kernels run one of their fast instances (AVX2 + FMA or AVX-512).
pub fn avx2_kernels() -> bool {
    cpu_kernels() >= CpuKernels::Avx2Fma
}

/// Runs `kernel`: its fast instance compiled for the widest instructions [`cpu_kernels`] allows,
/// else the portable one.
#[inline]
pub(crate) fn run<K: Kernel>(kernel: K) -> K::Output {
    match cpu_kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `avx512` only requires AVX-512 F/VL/BW/DQ, AVX2 and FMA, which `detected`
        // checked with `is_x86_feature_detected!` (`cpu_kernels` is never above it).
        CpuKernels::Avx512 => unsafe { avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `avx2_fma` only requires AVX2 and FMA, checked the same way.
        CpuKernels::Avx2Fma => unsafe { avx2_fma(kernel) },
        _ => kernel.call::<false>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_fma<K: Kernel>(kernel: K) -> K::Output {
    kernel.call::<true>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
fn avx512<K: Kernel>(kernel: K) -> K::Output {
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
    use crate::backend::detected;

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

    #[test]
    fn kernel_names_round_trip_and_order_by_width() {
        for k in [
            CpuKernels::Portable,
            CpuKernels::Avx2Fma,
            CpuKernels::Avx512,
        ] {
            assert_eq!(CpuKernels::parse(k.name()), Some(k));
        }
        assert_eq!(CpuKernels::parse("avx2"), Some(CpuKernels::Avx2Fma));
        assert_eq!(CpuKernels::parse("neon"), None);
        assert!(CpuKernels::Portable < CpuKernels::Avx2Fma);
        assert!(CpuKernels::Avx2Fma < CpuKernels::Avx512);
        // Never above what the CPU has.
        assert!(cpu_kernels() <= detected());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_and_avx2_instances_agree_bit_for_bit() {
        if detected() < CpuKernels::Avx512 {
            eprintln!("this CPU has no AVX-512: only the AVX2 instance can run");
            return;
        }
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        // SAFETY: `detected` just found AVX-512 F/VL/BW/DQ (and with them AVX2 and FMA).
        let (wide, narrow) = unsafe { (avx512(Dot(&a, &b)), avx2_fma(Dot(&a, &b))) };
        assert_eq!(wide.to_bits(), narrow.to_bits());
    }
}
