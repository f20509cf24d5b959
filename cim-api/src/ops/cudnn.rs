//! The forward convolution through cuDNN, called by cim (`--features cudnn`, `run.cudnn_conv`).
//!
//! candle 0.11's cuDNN convolution took 8.1 ms in bf16 against 0.96 ms in f32 for a 3×3 256→256
//! at 56², batch 64, on an H200 (`../shared/cuda/README.md`): ~29 TFLOP/s, a speed without tensor
//! cores. It leaves the descriptor at `CUDNN_DEFAULT_MATH`, documented as permitting TF32 tensor
//! cores on A100 and newer; PyTorch asks for `CUDNN_TENSOR_OP_MATH` for half-precision data (that
//! this is the cause is for the GPU parity test and benches to confirm). candle also asks cuDNN's heuristics for an algorithm and allocates (and zero-fills) a
//! workspace on every call. Here bf16/f16 convolutions run with `CUDNN_TENSOR_OP_MATH` (f32
//! accumulation), f32 ones with the default math when TF32 is allowed (candle's
//! `gemm_reduced_precision_f32`, `run.tf32`) and `CUDNN_FMA_MATH` otherwise; the algorithm and
//! workspace size are looked up once per shape, and one workspace per thread is reused. The output
//! is written with β = 0, so it is allocated without zero-filling. Forward only: the trainable
//! convolutions' backward is [`super::conv`]'s.

// cuDNN calls are FFI.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvForward, Cudnn, CudnnDataType};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape};

use super::conv::Im2Col;

/// What picks an algorithm: device, data type, math, and the convolution's sizes.
type Key = (DeviceId, DType, bool, [usize; 8]);

thread_local! {
    /// cuDNN handles are neither `Send` nor `Sync`: one per thread and device.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    /// The algorithm and workspace bytes chosen per [`Key`].
    static PLANS: RefCell<HashMap<Key, (sys::cudnnConvolutionFwdAlgo_t, usize)>> =
        RefCell::new(HashMap::new());
    /// The workspace of this thread per device, grown as needed, never zero-filled.
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

fn view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("cim-cudnn-conv2d: {what} must be contiguous"))
    })?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// `conv2d(x, w)` (NCHW, one group, no dilation) on CUDA; `x` contiguous, `w` of `x`'s dtype
/// (f32, bf16 or f16). No backward.
pub(super) struct CudnnConv {
    pub op: Im2Col,
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "cim-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cim-cudnn-conv2d runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match xs.dtype() {
            DType::F32 => self.run::<f32>(xs, xl, ws, wl),
            DType::BF16 => self.run::<half::bf16>(xs, xl, ws, wl),
            DType::F16 => self.run::<half::f16>(xs, xl, ws, wl),
            dt => candle_core::bail!("cim-cudnn-conv2d: no cuDNN path for {dt:?}"),
        }
    }
}

impl CudnnConv {
    fn run<T>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudaDType
            + CudnnDataType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::WithDType,
    {
        let dev = xs.device().clone();
        if ws.dtype() != xs.dtype() {
            candle_core::bail!(
                "cim-cudnn-conv2d: input {:?}, weight {:?}",
                xs.dtype(),
                ws.dtype()
            );
        }
        let (x, w) = (view::<T>(xs, xl, "input")?, view::<T>(ws, wl, "weight")?);
        let (b, c, h, wd) = xl.shape().dims4()?;
        let (c_out, c_w, k, k2) = wl.shape().dims4()?;
        let op = self.op;
        if c_w != c || k != k2 || k != op.k {
            candle_core::bail!(
                "cim-cudnn-conv2d: weight {:?} for input {:?}",
                wl.dims(),
                xl.dims()
            );
        }
        let (ho, wo) = (op.out(h), op.out(wd));
        let tensor_ops = xs.dtype() != DType::F32;
        let math = if tensor_ops {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else if candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        let i32s = |v: usize| -> candle_core::Result<i32> {
            i32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("cim-cudnn-conv2d: {v} exceeds i32")))
        };
        let cudnn = HANDLES.with(|h| -> candle_core::Result<Arc<Cudnn>> {
            if let Some(c) = h.borrow().get(&dev.id()) {
                return Ok(c.clone());
            }
            let c = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
            h.borrow_mut().insert(dev.id(), c.clone());
            Ok(c)
        })?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let wrap = candle_core::Error::wrap;
        let xd = cudnn
            .create_4d_tensor::<T>(nchw, [i32s(b)?, i32s(c)?, i32s(h)?, i32s(wd)?])
            .map_err(wrap)?;
        let fd = cudnn
            .create_4d_filter::<T>(nchw, [i32s(c_out)?, i32s(c)?, i32s(k)?, i32s(k)?])
            .map_err(wrap)?;
        let yd = cudnn
            .create_4d_tensor::<T>(nchw, [i32s(b)?, i32s(c_out)?, i32s(ho)?, i32s(wo)?])
            .map_err(wrap)?;
        let (p, s) = (i32s(op.padding)?, i32s(op.stride)?);
        // f32 accumulation for every data type (bf16 has no other; f16 as PyTorch does).
        let mut conv = cudnn
            .create_conv2d::<f32>(
                [p, p],
                [s, s],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(wrap)?;
        conv.set_math_type(math).map_err(wrap)?;
        let fwd = ConvForward {
            conv: &conv,
            x: &xd,
            w: &fd,
            y: &yd,
        };
        let key: Key = (
            dev.id(),
            xs.dtype(),
            tensor_ops || math == sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            [b, c, h, wd, c_out, k, op.padding, op.stride],
        );
        let plan = PLANS.with(|plans| plans.borrow().get(&key).copied());
        let (algo, ws_bytes) = match plan {
            Some(plan) => plan,
            None => {
                let algo = fwd.pick_algorithm().map_err(wrap)?;
                let bytes = fwd.get_workspace_size(algo).map_err(wrap)?;
                PLANS.with(|plans| plans.borrow_mut().insert(key, (algo, bytes)));
                tracing::debug!(?key, ?algo, bytes, "cudnn conv plan");
                (algo, bytes)
            }
        };
        // SAFETY: cuDNN writes every output element (β = 0 means the output is not read).
        let mut y = unsafe { dev.alloc::<T>(b * c_out * ho * wo) }?;
        WORKSPACES.with(|wsp| -> candle_core::Result<()> {
            let mut wsp = wsp.borrow_mut();
            let grow = wsp.get(&dev.id()).is_none_or(|w| w.len() < ws_bytes.max(1));
            if grow {
                // SAFETY: a workspace is scratch memory; cuDNN never reads what it did not write.
                let fresh = unsafe { dev.alloc::<u8>(ws_bytes.max(1)) }?;
                wsp.insert(dev.id(), fresh);
            }
            let workspace = wsp.get_mut(&dev.id()).expect("inserted above");
            // SAFETY: the descriptors describe `x` (b, c, h, w), `w` (c_out, c, k, k) and `y`
            // (b, c_out, ho, wo), contiguous NCHW of type T, as the views and `y` hold; the
            // workspace holds at least the bytes cuDNN asked for this algorithm.
            unsafe {
                fwd.launch::<CudaSlice<u8>, _, _, _>(
                    algo,
                    Some(workspace),
                    (T::one(), T::zero()),
                    &x,
                    &w,
                    &mut y,
                )
            }
            .map_err(wrap)
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from((b, c_out, ho, wo)),
        ))
    }
}
