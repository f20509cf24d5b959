//! Process-wide backend switches: which kernel families run, set once by the binary's `main`
//! before any model is built, the way candle's own `set_gemm_reduced_precision_f32` is.
//!
//! These are the only mutable statics of cim's kernels. They choose *how* an op runs on a device
//! (cim's CUDA kernels or candle's, cim's cuDNN convolutions or candle's, the widest CPU
//! instruction set), never *what* it computes. Choices that belong to one model (fused blocks,
//! flash attention, regions, channels-last maps) are made when the model is built and stored in
//! it (`cim_api::ExecChoices`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

static CUDA_KERNELS: AtomicBool = AtomicBool::new(false);

/// Lets tensors on CUDA use the fused CUDA kernels (builds with the `cuda` feature only; elsewhere
/// it has no effect). Off until called; `cim-run` calls it with `run.cuda_kernels` (default true).
pub fn set_cuda_kernels(on: bool) {
    CUDA_KERNELS.store(on && cfg!(feature = "cuda"), Ordering::Relaxed);
}

/// Whether [`set_cuda_kernels`] switched the CUDA kernels on.
pub fn cuda_kernels() -> bool {
    CUDA_KERNELS.load(Ordering::Relaxed)
}

static CUDNN_CONV: AtomicBool = AtomicBool::new(false);

/// Runs CUDA convolutions through cim's cuDNN calls (tensor-core bf16/f16, an algorithm and
/// workspace kept per shape and pass; `ops::cudnn`): the forward instead of candle's, the backward
/// of trainable ones instead of the im2col + GEMM + col2im kernels (config `run.cudnn_conv`;
/// builds with the `cudnn` feature only, elsewhere no effect). Off until called (`cim-run` calls
/// it with `run.cudnn_conv`, on by default). A cuDNN error
/// switches it off again, with a warning, and convolutions run as without it.
pub fn set_cudnn_conv(on: bool) {
    CUDNN_CONV.store(on && cfg!(feature = "cudnn"), Ordering::Relaxed);
}

/// Whether [`set_cudnn_conv`] switched cim's cuDNN convolution on.
pub fn cudnn_conv() -> bool {
    CUDNN_CONV.load(Ordering::Relaxed)
}

/// The widest instance allowed ([`set_cpu_kernels`]); the CPU may offer less.
static CAP: AtomicU8 = AtomicU8::new(CpuKernels::Avx512 as u8);

/// Caps cim's hot CPU kernels at `cap` process-wide: they run the widest instance that is both
/// at most `cap` and supported by the CPU. The default is no cap ([`CpuKernels::Avx512`]).
pub fn set_cpu_kernels(cap: CpuKernels) {
    CAP.store(cap as u8, Ordering::Relaxed);
}

/// Forces the portable (SSE2) instance of cim's hot CPU kernels process-wide (`true`), or lets
/// them pick the CPU's best (`false`, the default); [`set_cpu_kernels`] with a cap.
pub fn set_portable_kernels(on: bool) {
    set_cpu_kernels(if on {
        CpuKernels::Portable
    } else {
        CpuKernels::Avx512
    });
}

/// The instance of cim's hot CPU kernels that runs now: the CPU's widest, at most the cap.
pub fn cpu_kernels() -> CpuKernels {
    CpuKernels::from_u8(CAP.load(Ordering::Relaxed)).min(detected())
}

/// The instance of cim's hot CPU kernels that runs, from the narrowest to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuKernels {
    /// Baseline x86-64 (SSE2) or another architecture's baseline: no fused multiply-add.
    Portable,
    /// AVX2 and FMA: eight f32 lanes.
    Avx2Fma,
    /// AVX-512 (F, VL, BW, DQ) and FMA: sixteen f32 lanes.
    Avx512,
}

impl CpuKernels {
    /// The name `cim-run bench` reports: `"portable"`, `"avx2+fma"` or `"avx512"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2Fma => "avx2+fma",
            Self::Avx512 => "avx512",
        }
    }

    /// The instance named `name` (one of [`CpuKernels::name`]'s; `"avx2"` also names AVX2 + FMA).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "portable" | "sse2" => Some(Self::Portable),
            "avx2+fma" | "avx2" => Some(Self::Avx2Fma),
            "avx512" => Some(Self::Avx512),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Portable,
            1 => Self::Avx2Fma,
            _ => Self::Avx512,
        }
    }
}

/// The widest instance this CPU runs (`is_x86_feature_detected!` caches what it probed).
pub(crate) fn detected() -> CpuKernels {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if !(has!("avx2") && has!("fma")) {
            return CpuKernels::Portable;
        }
        if has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq") {
            return CpuKernels::Avx512;
        }
        CpuKernels::Avx2Fma
    }
    #[cfg(not(target_arch = "x86_64"))]
    CpuKernels::Portable
}
