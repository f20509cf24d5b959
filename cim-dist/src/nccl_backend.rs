//! The `nccl` backend: collectives on CUDA device memory through NCCL (cudarc's bindings). Rank 0
//! makes NCCL's unique id and hands it to the other ranks through the TCP rendezvous at
//! `MASTER_ADDR:MASTER_PORT` ([`crate::rendezvous`]) — or, under mpirun without those variables
//! and in a binary built with the `mpi` feature too, by an MPI broadcast.
//!
//! The collectives are candle custom ops, so they queue on the device's stream like any other
//! kernel; a host read after them waits for them (the watchdog times that wait).
// cudarc's `Comm` holds NCCL's raw communicator: sending it between threads needs an assertion.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use cim_api::{Error, Result};

use crate::{rendezvous, Collective, Launch};

/// NCCL's communicator of this rank.
struct Shared(Comm);
// SAFETY: NCCL communicators may be used from any host thread as long as calls on one
// communicator do not overlap; cim calls them from the training thread only, in order.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

pub struct Nccl {
    comm: Arc<Shared>,
    /// MPI, when it carried the id: kept until the end, when it is finalised.
    _mpi: Option<Box<dyn Collective>>,
}

impl Nccl {
    pub fn init(launch: &Launch, device: &Device, timeout: Duration) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(Error::config(
                "dist.backend = \"nccl\" needs run.device on CUDA; on the CPU use dist.backend = \"mpi\"",
            ));
        };
        let nccl = |e: candle_core::cuda_backend::cudarc::nccl::result::NcclError| {
            Error::msg(format!("{}: NCCL: {e:?}", launch.describe()))
        };
        let mine = if launch.rank == 0 {
            let id = Id::new().map_err(nccl)?;
            Some(id.internal().iter().map(|&c| c as u8).collect::<Vec<u8>>())
        } else {
            None
        };
        #[allow(unused_mut)]
        let mut mpi: Option<Box<dyn Collective>> = None;
        let bytes = match (launch.world, mine) {
            (1, Some(id)) => id, // a job of one: nobody to hand the id to
            #[cfg(feature = "mpi")]
            (_, mine) if launch.master.is_none() && launch.launcher.is_mpi() => {
                let m = crate::mpi_backend::Mpi::init(launch)?;
                let id = Tensor::from_vec(mine.unwrap_or(vec![0u8; 128]), 128, &Device::Cpu)?;
                let id = m.broadcast(&id, 0)?.to_vec1::<u8>()?;
                mpi = Some(Box::new(m));
                id
            }
            (_, mine) => {
                let Some((host, port)) = launch.master.clone() else {
                    return Err(Error::config(format!(
                        "{}: NCCL's rendezvous needs MASTER_ADDR and MASTER_PORT (torchrun sets them; \
                         with mpirun or srun export them in the job script)",
                        launch.describe()
                    )));
                };
                // torchrun's agent listens on MASTER_PORT itself.
                let port = if launch.agent_store {
                    port.wrapping_add(1)
                } else {
                    port
                };
                rendezvous::share(
                    launch.rank,
                    launch.world,
                    &host,
                    port,
                    mine.as_deref(),
                    timeout,
                )?
            }
        };
        let internal: [core::ffi::c_char; 128] = bytes
            .iter()
            .map(|&b| b as core::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| {
                Error::msg(format!(
                    "rendezvous: NCCL's id has {} bytes, not 128",
                    bytes.len()
                ))
            })?;
        let comm = Comm::from_rank(
            dev.cuda_stream(),
            launch.rank,
            launch.world,
            Id::uninit(internal),
        )
        .map_err(nccl)?;
        tracing::info!(
            rank = launch.rank,
            world = launch.world,
            "NCCL communicator ready"
        );
        Ok(Self {
            comm: Arc::new(Shared(comm)),
            _mpi: mpi,
        })
    }
}

/// Which collective a [`NcclOp`] runs.
#[derive(Clone, Copy)]
enum Op {
    Sum,
    Broadcast(usize),
}

struct NcclOp {
    comm: Arc<Shared>,
    op: Op,
}

impl NcclOp {
    fn run<T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits>(
        &self,
        s: &CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let src: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
        let n = l.shape().elem_count();
        let src = match l.contiguous_offsets() {
            Some((0, end)) if end == n => src.slice(0..n),
            _ => candle_core::bail!("nccl: the tensor must be contiguous from its start"),
        };
        let dev: CudaDevice = s.device().clone();
        let mut dst = dev.alloc_zeros::<T>(n)?;
        let comm = &self.comm.0;
        let r = match self.op {
            Op::Sum => comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Op::Broadcast(root) => comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        r.map_err(|e| candle_core::Error::Msg(format!("NCCL: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl CustomOp1 for NcclOp {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the nccl backend reduces CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::F64 => self.run::<f64>(s, l),
            DType::BF16 => self.run::<half::bf16>(s, l),
            DType::F16 => self.run::<half::f16>(s, l),
            DType::U8 => self.run::<u8>(s, l),
            DType::U32 => self.run::<u32>(s, l),
            other => candle_core::bail!("nccl: no collective for {other:?} tensors"),
        }
    }
}

impl Collective for Nccl {
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = NcclOp {
            comm: self.comm.clone(),
            op: Op::Sum,
        };
        Ok(t.detach().apply_op1_no_bwd(&op)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = NcclOp {
            comm: self.comm.clone(),
            op: Op::Broadcast(root),
        };
        Ok(t.detach().apply_op1_no_bwd(&op)?)
    }

    fn abort(&self, code: i32) -> ! {
        // torchrun and srun end the other ranks when one exits with an error.
        std::process::exit(code)
    }
}
