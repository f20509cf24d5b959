//! Convolutions through cuDNN, called by cim (`--features cudnn`, `run.cudnn_conv`): the forward,
//! and the backward passes for the input and for the filter.
//!
//! candle 0.11's cuDNN convolution took 8.1 ms in bf16 against 0.96 ms in f32 for a 3×3 256→256
//! at 56², batch 64, on an H200: ~29 TFLOP/s, a speed without tensor
//! cores. It leaves the descriptor at `CUDNN_DEFAULT_MATH`, documented as permitting TF32 tensor
//! cores on A100 and newer; PyTorch asks for `CUDNN_TENSOR_OP_MATH` for half-precision data (that
//! this is the cause is for the GPU parity test and benches to confirm). candle also asks
//! cuDNN's heuristics for an algorithm and allocates (and zero-fills) a workspace on every call,
//! and has no cuDNN backward. Here bf16/f16 convolutions run with `CUDNN_TENSOR_OP_MATH` (f32
//! accumulation), f32 ones with the default math when TF32 is allowed (candle's
//! `gemm_reduced_precision_f32`, `run.tf32`) and `CUDNN_FMA_MATH` otherwise; the algorithm and
//! workspace size are looked up once per shape and pass, and one workspace per thread is reused.
//! Outputs are written with β = 0, so they are allocated without zero-filling. cuDNN's heuristics
//! may pick a non-deterministic backward algorithm (as PyTorch does unless told otherwise).

// cuDNN calls are FFI.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, WithDType};

use super::im2col::Im2Col;

/// Which convolution pass a [`CudnnConv`] runs, and so what its two inputs are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Pass {
    /// `(x, w) → y`.
    Forward,
    /// `(w, dy) → dx`.
    BackwardData,
    /// `(x, dy) → dw`.
    BackwardFilter,
}

/// One convolution pass (NCHW, or NHWC with `nhwc`; one group, no dilation) on CUDA. Both inputs
/// contiguous, of one dtype (f32, bf16 or f16); the output has that dtype. No backward of its own.
pub(super) struct CudnnConv {
    pub op: Im2Col,
    pub pass: Pass,
    /// `(B, C, H, W)` of the convolution's input `x` (its sizes, whatever the layout).
    pub x_dims: [usize; 4],
    /// `C_out`.
    pub c_out: usize,
    /// Channels last: maps `(B, H, W, C)`, the filter `(C_out, k, k, C)` (cuDNN's NHWC / KRSC).
    pub nhwc: bool,
}

/// What picks an algorithm: device, data type, math, pass, layout and the convolution's sizes.
type Key = (
    DeviceId,
    DType,
    sys::cudnnMathType_t,
    Pass,
    bool,
    [usize; 8],
);

#[derive(Clone, Copy, Debug)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

thread_local! {
    /// cuDNN handles are neither `Send` nor `Sync`: one per thread and device.
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    /// The algorithm and workspace bytes chosen per [`Key`].
    static PLANS: RefCell<HashMap<Key, (Algo, usize)>> = RefCell::new(HashMap::new());
    /// The workspace of this thread per device, grown as needed, never zero-filled.
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
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
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        if s1.dtype() != s2.dtype() {
            candle_core::bail!(
                "cim-cudnn-conv2d ({:?}): inputs {:?} and {:?}",
                self.pass,
                s1.dtype(),
                s2.dtype()
            );
        }
        match s1.dtype() {
            DType::F32 => self.run::<f32>(s1, l1, s2, l2),
            DType::BF16 => self.run::<half::bf16>(s1, l1, s2, l2),
            DType::F16 => self.run::<half::f16>(s1, l1, s2, l2),
            dt => candle_core::bail!("cim-cudnn-conv2d: no cuDNN path for {dt:?}"),
        }
    }
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

fn i32s(v: usize) -> candle_core::Result<i32> {
    i32::try_from(v)
        .map_err(|_| candle_core::Error::Msg(format!("cim-cudnn-conv2d: {v} exceeds i32")))
}

fn handle(dev: &CudaDevice) -> candle_core::Result<Arc<Cudnn>> {
    HANDLES.with(|h| {
        if let Some(c) = h.borrow().get(&dev.id()) {
            return Ok(c.clone());
        }
        let c = Cudnn::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?;
        h.borrow_mut().insert(dev.id(), c.clone());
        Ok(c)
    })
}

/// Runs `f` with this thread's workspace on `dev`, at least `bytes` long.
fn with_workspace<R>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(&mut CudaSlice<u8>) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    WORKSPACES.with(|wsp| {
        let mut wsp = wsp.borrow_mut();
        if wsp.get(&dev.id()).is_none_or(|w| w.len() < bytes.max(1)) {
            // SAFETY: a workspace is scratch memory; cuDNN never reads what it did not write.
            let fresh = unsafe { dev.alloc::<u8>(bytes.max(1)) }?;
            wsp.insert(dev.id(), fresh);
        }
        f(wsp.get_mut(&dev.id()).expect("inserted above"))
    })
}

/// The descriptors of one convolution: input, filter, output, and the convolution itself.
struct Descriptors<T: CudnnDataType> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
}

impl CudnnConv {
    fn out_dims(&self) -> (usize, usize) {
        (self.op.out(self.x_dims[2]), self.op.out(self.x_dims[3]))
    }

    /// The dims of this pass's output and its two inputs, in order.
    fn dims(&self) -> [[usize; 4]; 3] {
        let [b, c, _, _] = self.x_dims;
        let k = self.op.k;
        let (ho, wo) = self.out_dims();
        let (x, w, y) = match self.nhwc {
            false => (self.x_dims, [self.c_out, c, k, k], [b, self.c_out, ho, wo]),
            true => {
                let [_, _, h, wd] = self.x_dims;
                (
                    [b, h, wd, c],
                    [self.c_out, k, k, c],
                    [b, ho, wo, self.c_out],
                )
            }
        };
        match self.pass {
            Pass::Forward => [y, x, w],
            Pass::BackwardData => [x, w, y],
            Pass::BackwardFilter => [w, x, y],
        }
    }

    /// Whether this pass already has a plan (an algorithm and workspace size) on `dev` for
    /// `dtype`: cuDNN took this shape before, so running it as a graft's forward (where a failure
    /// could no longer fall back) is safe.
    pub fn planned(&self, dev: &CudaDevice, dtype: DType) -> bool {
        let key = self.key(dev, dtype, Self::math(dtype));
        PLANS.with(|plans| plans.borrow().contains_key(&key))
    }

    fn key(&self, dev: &CudaDevice, dtype: DType, math: sys::cudnnMathType_t) -> Key {
        let [bb, c, h, w] = self.x_dims;
        (
            dev.id(),
            dtype,
            math,
            self.pass,
            self.nhwc,
            [
                bb,
                c,
                h,
                w,
                self.c_out,
                self.op.k,
                self.op.padding,
                self.op.stride,
            ],
        )
    }

    fn math(dtype: DType) -> sys::cudnnMathType_t {
        if dtype != DType::F32 {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        } else if candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        }
    }

    fn descriptors<T: CudnnDataType>(
        &self,
        cudnn: &Arc<Cudnn>,
        math: sys::cudnnMathType_t,
    ) -> candle_core::Result<Descriptors<T>> {
        let wrap = candle_core::Error::wrap;
        // The dims are given in NCHW order whatever the layout; the format says how they lie.
        let format = match self.nhwc {
            true => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            false => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        };
        let dims = |d: [usize; 4]| -> candle_core::Result<[i32; 4]> {
            Ok([i32s(d[0])?, i32s(d[1])?, i32s(d[2])?, i32s(d[3])?])
        };
        let [b, c, h, w] = self.x_dims;
        let (ho, wo) = self.out_dims();
        let k = self.op.k;
        let (p, s) = (i32s(self.op.padding)?, i32s(self.op.stride)?);
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
        Ok(Descriptors {
            x: cudnn
                .create_4d_tensor::<T>(format, dims([b, c, h, w])?)
                .map_err(wrap)?,
            w: cudnn
                .create_4d_filter::<T>(format, dims([self.c_out, c, k, k])?)
                .map_err(wrap)?,
            y: cudnn
                .create_4d_tensor::<T>(format, dims([b, self.c_out, ho, wo])?)
                .map_err(wrap)?,
            conv,
        })
    }

    fn run<T>(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudaDType + CudnnDataType + DeviceRepr + WithDType,
    {
        let [out, d1, d2] = self.dims();
        if l1.dims() != d1 || l2.dims() != d2 {
            candle_core::bail!(
                "cim-cudnn-conv2d ({:?}): inputs {:?} and {:?}, expected {d1:?} and {d2:?}",
                self.pass,
                l1.dims(),
                l2.dims()
            );
        }
        let dev = s1.device().clone();
        let (a, b) = (
            view::<T>(s1, l1, "first input")?,
            view::<T>(s2, l2, "second input")?,
        );
        let cudnn = handle(&dev)?;
        let math = Self::math(s1.dtype());
        let d = self.descriptors::<T>(&cudnn, math)?;
        let wrap = candle_core::Error::wrap;
        let key = self.key(&dev, s1.dtype(), math);
        let plan = PLANS.with(|plans| plans.borrow().get(&key).copied());
        let (algo, bytes) = match plan {
            Some(plan) => plan,
            None => {
                let plan = match self.pass {
                    Pass::Forward => {
                        let f = ConvForward {
                            conv: &d.conv,
                            x: &d.x,
                            w: &d.w,
                            y: &d.y,
                        };
                        let algo = f.pick_algorithm().map_err(wrap)?;
                        (
                            Algo::Forward(algo),
                            f.get_workspace_size(algo).map_err(wrap)?,
                        )
                    }
                    Pass::BackwardData => {
                        let f = ConvBackwardData {
                            conv: &d.conv,
                            dx: &d.x,
                            w: &d.w,
                            dy: &d.y,
                        };
                        let algo = f.pick_algorithm().map_err(wrap)?;
                        (Algo::Data(algo), f.get_workspace_size(algo).map_err(wrap)?)
                    }
                    Pass::BackwardFilter => {
                        let f = ConvBackwardFilter {
                            conv: &d.conv,
                            x: &d.x,
                            dw: &d.w,
                            dy: &d.y,
                        };
                        let algo = f.pick_algorithm().map_err(wrap)?;
                        (
                            Algo::Filter(algo),
                            f.get_workspace_size(algo).map_err(wrap)?,
                        )
                    }
                };
                PLANS.with(|plans| plans.borrow_mut().insert(key, plan));
                tracing::debug!(?key, ?plan, "cudnn convolution plan");
                plan
            }
        };
        // SAFETY: cuDNN writes every output element (β = 0: the output is not read).
        let mut y = unsafe { dev.alloc::<T>(out.iter().product()) }?;
        let one_zero = (T::one(), T::zero());
        with_workspace(&dev, bytes, |ws| {
            // SAFETY (all three): the descriptors describe x (B, C, H, W), w (C_out, C, k, k)
            // and y (B, C_out, Ho, Wo), contiguous NCHW (or, with `nhwc`, NHWC and KRSC) of type
            // T; the views and the output hold exactly those (dims checked above); the workspace
            // holds at least the bytes cuDNN asked for this algorithm.
            match (algo, self.pass) {
                (Algo::Forward(algo), Pass::Forward) => unsafe {
                    ConvForward {
                        conv: &d.conv,
                        x: &d.x,
                        w: &d.w,
                        y: &d.y,
                    }
                    .launch::<CudaSlice<u8>, _, _, _>(
                        algo,
                        Some(ws),
                        one_zero,
                        &a,
                        &b,
                        &mut y,
                    )
                },
                (Algo::Data(algo), Pass::BackwardData) => unsafe {
                    ConvBackwardData {
                        conv: &d.conv,
                        dx: &d.x,
                        w: &d.w,
                        dy: &d.y,
                    }
                    .launch::<CudaSlice<u8>, _, _, _>(
                        algo,
                        Some(ws),
                        one_zero,
                        &mut y,
                        &a,
                        &b,
                    )
                },
                (Algo::Filter(algo), Pass::BackwardFilter) => unsafe {
                    ConvBackwardFilter {
                        conv: &d.conv,
                        x: &d.x,
                        dw: &d.w,
                        dy: &d.y,
                    }
                    .launch::<CudaSlice<u8>, _, _, _>(
                        algo,
                        Some(ws),
                        one_zero,
                        &a,
                        &mut y,
                        &b,
                    )
                },
                _ => unreachable!("plans are keyed by pass"),
            }
            .map_err(wrap)
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from(out.to_vec()),
        ))
    }
}
