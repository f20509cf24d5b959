//! Opening a device for training, and its memory high-water mark.
//!
//! On CUDA, cim keeps every kernel and copy of a device on candle's one stream. Two of cudarc's
//! defaults cost time there without doing anything for cim:
//!
//! - **Per-buffer events.** With event tracking on (cudarc's default), every allocation creates
//!   two CUDA events and every free destroys them, although they are only recorded in
//!   multi-stream mode: a step of ViT-B/16 allocates a few thousand buffers. [`prepare`] turns
//!   tracking off.
//! - **The pool's release threshold.** cudarc allocates with `cuMemAllocAsync` from the device's
//!   default pool, whose release threshold is 0: at every stream, event or context
//!   synchronisation the pool hands all memory not in use back to the driver, and the next
//!   allocations map it again. A training step synchronises at least once (the loss is read), and
//!   the timed bench at its end. With `keep_freed` (config `run.cuda_keep_freed`, the default),
//!   [`prepare`] raises the threshold to the maximum, so freed memory stays in the pool for the
//!   next step, as PyTorch's caching allocator keeps it; the pool then holds the step's peak.
//!
//! [`peak_bytes`] reads the pool's high-water mark of memory in use — what PyTorch reports as
//! `max_memory_allocated` — and [`reset_peak`] restarts it.

use candle_core::Device;

use crate::Result;

/// Opens `cuda:ordinal` and [`prepare`]s it.
pub fn open_cuda(ordinal: usize, keep_freed: bool) -> Result<Device> {
    let dev = Device::new_cuda(ordinal)?;
    prepare(&dev, keep_freed)?;
    Ok(dev)
}

/// Sets up a device right after it is opened (before tensors are allocated on it: buffers
/// allocated earlier keep their events). Does nothing on the CPU.
pub fn prepare(device: &Device, keep_freed: bool) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(crate::cuda::prepare_device(d, keep_freed)?),
        _ => {
            let _ = keep_freed;
            Ok(())
        }
    }
}

/// The most device memory in use at once since the device was opened or [`reset_peak`], in
/// bytes: the CUDA pool's high-water mark. `None` on the CPU.
pub fn peak_bytes(device: &Device) -> Result<Option<u64>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(Some(crate::cuda::pool_peak(d)?)),
        _ => Ok(None),
    }
}

/// Restarts [`peak_bytes`] from the memory in use now. Does nothing on the CPU.
pub fn reset_peak(device: &Device) -> Result<()> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(crate::cuda::reset_pool_peak(d)?),
        _ => Ok(()),
    }
}

/// A point in a device's work queue, recorded without waiting for the device: on CUDA a timing
/// event on candle's stream. The time between two marks is the device's time between them — how
/// the PyTorch reference times its phases, with no host synchronisation inside the timed loop.
pub struct Mark {
    #[cfg(feature = "cuda")]
    event: candle_core::cuda_backend::cudarc::driver::CudaEvent,
}

impl Mark {
    /// Records a mark at the end of the work queued on `device` so far; `None` on the CPU (time
    /// it on the host there: its ops run as they are called).
    pub fn now(device: &Device) -> Result<Option<Mark>> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                use candle_core::cuda_backend::WrapErr;
                let event = d
                    .cuda_stream()
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .w()?;
                Ok(Some(Mark { event }))
            }
            _ => Ok(None),
        }
    }

    /// Milliseconds of device time from `self` to `later`; waits until `later` is reached.
    pub fn ms_until(&self, later: &Mark) -> Result<f64> {
        #[cfg(feature = "cuda")]
        {
            use candle_core::cuda_backend::WrapErr;
            Ok(self.event.elapsed_ms(&later.event).w()? as f64)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = later;
            unreachable!("a Mark exists only on CUDA")
        }
    }
}

/// Keeps candle's small-upload cache on while it lives: see [`cache_small_uploads`].
pub struct UploadCache {
    _guard: Option<Box<dyn std::any::Any>>,
}

/// **A measurement switch, not for training.** While the returned value lives, candle 0.11's
/// CUDA-graph upload cache is on for this thread: the dims-and-strides arrays that candle copies
/// to the device before each strided, broadcast, reduction or indexing kernel are uploaded once
/// per distinct array and reused, and so is every other host→device copy of at most 4 KiB, keyed
/// by its bytes. Those copies come from pageable host memory, which CUDA may stage through a
/// synchronisation; `cim-run bench --upload-cache` measures whether they cost the step anything.
/// The cache is never emptied: every distinct small upload stays on the device for the life of
/// the thread, which in training (stochastic depth's random keep masks, small batches' mask
/// indices) would grow without bound — hence a bench flag only. Does nothing on the CPU.
pub fn cache_small_uploads(device: &Device) -> UploadCache {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => UploadCache {
            _guard: Some(Box::new(d.enable_cuda_graph_htod_cache())),
        },
        _ => UploadCache { _guard: None },
    }
}
