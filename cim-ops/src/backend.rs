//! Process-wide backend switches: which kernel families run, set once by the binary's `main`
//! before any model is built, the way candle's own `set_gemm_reduced_precision_f32` is.
//!
//! These are the only mutable statics of cim's kernels. They choose *how* an op runs on a device
//! (cim's CUDA kernels or candle's, cim's cuDNN convolutions or candle's, the widest CPU
//! instruction set), never *what* it computes. Choices that belong to one model (fused blocks,
//! flash attention, regions, channels-last maps) are made when the model is built and stored in
//! it (`cim_api::ExecChoices`).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::simd::CpuKernels;

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
    CpuKernels::from_u8(CAP.load(Ordering::Relaxed)).min(crate::simd::detected())
}

