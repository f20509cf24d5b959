//! The `mpi` backend: collectives through MPI (rsmpi), on host memory. Tensors on a device are
//! copied to the host and back; bf16 and f16 travel as f32 (MPI has no 16-bit float type).

use candle_core::{DType, Tensor};
use mpi::collective::SystemOperation;
use mpi::traits::*;

use cim_api::{Error, Result};

use crate::{Collective, Launch};

pub struct Mpi {
    /// Finalises MPI when dropped.
    universe: mpi::environment::Universe,
}

impl Mpi {
    /// Initialises MPI (any thread may call it, one at a time) and checks that MPI sees the job
    /// the launcher's variables describe.
    pub fn init(launch: &Launch) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::msg("MPI was initialised already in this process"))?;
        if threading < mpi::Threading::Serialized {
            tracing::warn!(
                ?threading,
                "the MPI library does not offer serialized threading"
            );
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if (rank, size) != (launch.rank, launch.world) {
            return Err(Error::msg(format!(
                "MPI says rank {rank} of {size}, the launcher's variables {}: launch with mpirun \
                 (or srun --mpi=pmix) so MPI connects the processes",
                launch.describe()
            )));
        }
        Ok(Self { universe })
    }
}

/// The host values of `t` in the type MPI carries, and how to turn them back.
enum Host {
    F32(Vec<f32>),
    F64(Vec<f64>),
    U8(Vec<u8>),
    U32(Vec<u32>),
}

fn to_host(t: &Tensor) -> Result<Host> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => Host::F64(flat.to_vec1()?),
        DType::U8 => Host::U8(flat.to_vec1()?),
        DType::U32 => Host::U32(flat.to_vec1()?),
        DType::F32 | DType::BF16 | DType::F16 => Host::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        other => {
            return Err(Error::msg(format!(
                "mpi backend: no collective for {other:?} tensors"
            )))
        }
    })
}

fn from_host(h: Host, like: &Tensor) -> Result<Tensor> {
    let (shape, dev) = (like.shape(), like.device());
    let t = match h {
        Host::F32(v) => Tensor::from_vec(v, shape, dev)?,
        Host::F64(v) => Tensor::from_vec(v, shape, dev)?,
        Host::U8(v) => Tensor::from_vec(v, shape, dev)?,
        Host::U32(v) => Tensor::from_vec(v, shape, dev)?,
    };
    Ok(t.to_dtype(like.dtype())?)
}

impl Collective for Mpi {
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let world = self.universe.world();
        fn sum<T: Equivalence + Default + Clone>(c: &impl Communicator, v: Vec<T>) -> Vec<T> {
            let mut out = vec![T::default(); v.len()];
            c.all_reduce_into(&v[..], &mut out[..], SystemOperation::sum());
            out
        }
        let h = match to_host(t)? {
            Host::F32(v) => Host::F32(sum(&world, v)),
            Host::F64(v) => Host::F64(sum(&world, v)),
            Host::U8(v) => Host::U8(sum(&world, v)),
            Host::U32(v) => Host::U32(sum(&world, v)),
        };
        from_host(h, t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let world = self.universe.world();
        let from = world.process_at_rank(root as i32);
        let mut h = to_host(t)?;
        match &mut h {
            Host::F32(v) => from.broadcast_into(&mut v[..]),
            Host::F64(v) => from.broadcast_into(&mut v[..]),
            Host::U8(v) => from.broadcast_into(&mut v[..]),
            Host::U32(v) => from.broadcast_into(&mut v[..]),
        }
        from_host(h, t)
    }

    fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}
