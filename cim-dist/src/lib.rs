//! Data-parallel training across processes.
//!
//! One process per device, started by the launcher users already use (`torchrun`, `mpirun`,
//! `srun`; [`Launch`] reads their variables). The processes talk through one small interface,
//! [`Collective`] — a sum over ranks and a broadcast from one rank — with two backends built on
//! existing engines: MPI on the CPU (feature `mpi`, rsmpi) and NCCL on CUDA devices (feature
//! `nccl`, cudarc). [`Dist`] holds the backend of a run and adds what training needs on top:
//! gradients averaged in flat buckets in a fixed order, scalars averaged, a checksum every rank
//! must agree on, and a watchdog that ends the job when a collective waits longer than
//! `dist.timeout_s` (a rank that died or stalled), naming this rank and what it waited for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use cim_api::{Error, Result};

pub mod launch;
pub mod rendezvous;
mod sync;

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(feature = "nccl")]
mod nccl_backend;

pub use launch::{Launch, Launcher};
pub use sync::SyncSum;

/// The operations between the processes of a job. Every rank calls each operation in the same
/// order with tensors of the same shape and dtype.
pub trait Collective: Send + Sync {
    /// `mpi`, `nccl`, or `single` for a job of one.
    fn backend(&self) -> &'static str;
    /// The element-wise sum of `t` over all ranks, on every rank (same shape, dtype and device).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t`, on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Ends every process of the job with exit code `code` (after a rank's error).
    fn abort(&self, code: i32) -> !;
}

/// Which engine connects the processes (`dist.backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NCCL when the run is on CUDA, MPI on the CPU.
    #[default]
    Auto,
    Mpi,
    Nccl,
}

/// A job of one process: every operation is the identity.
struct Single;

impl Collective for Single {
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// What a collective is waiting for, and since when (the watchdog reads it).
type Waiting = Arc<Mutex<Option<(String, Instant)>>>;

/// The processes of a run and how they talk.
pub struct Dist {
    pub launch: Launch,
    coll: Box<dyn Collective>,
    waiting: Waiting,
    timeout: Duration,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dist({}, {})",
            self.launch.describe(),
            self.coll.backend()
        )
    }
}

impl Dist {
    /// A job of one process.
    pub fn single() -> Self {
        Self {
            launch: Launch::single(),
            coll: Box::new(Single),
            waiting: Default::default(),
            timeout: Duration::from_secs(u64::MAX / 4),
        }
    }

    /// Connects the processes of `launch` through `backend` (`Auto`: NCCL on CUDA, MPI on the
    /// CPU), waiting at most `timeout` for the others here and in every later collective. A job of
    /// one needs no backend with `Auto`; a backend named explicitly is connected even then (a
    /// one-rank check of it).
    pub fn connect(
        launch: Launch,
        backend: Backend,
        device: &Device,
        timeout: Duration,
    ) -> Result<Self> {
        if launch.world == 1 && backend == Backend::Auto {
            return Ok(Self {
                launch,
                ..Self::single()
            });
        }
        let chosen = match backend {
            Backend::Auto if device.is_cuda() => Backend::Nccl,
            Backend::Auto => Backend::Mpi,
            b => b,
        };
        let coll: Box<dyn Collective> = match chosen {
            Backend::Mpi => mpi(&launch)?,
            Backend::Nccl => nccl(&launch, device, timeout)?,
            Backend::Auto => unreachable!("resolved above"),
        };
        Ok(Self::with_collective(launch, coll, timeout))
    }

    /// The processes of `launch` connected by a [`Collective`] of your own (another engine, or a
    /// test's), with the watchdog of `timeout`.
    pub fn with_collective(launch: Launch, coll: Box<dyn Collective>, timeout: Duration) -> Self {
        let dist = Self {
            launch,
            coll,
            waiting: Default::default(),
            timeout,
        };
        if dist.world() > 1 {
            dist.start_watchdog();
        }
        dist
    }

    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    pub fn world(&self) -> usize {
        self.launch.world
    }

    /// Rank 0: the one process that writes files and logs progress.
    pub fn is_leader(&self) -> bool {
        self.launch.rank == 0
    }

    pub fn backend(&self) -> &'static str {
        self.coll.backend()
    }

    /// Marks this rank as waiting on `what` until the guard is dropped: past `dist.timeout_s`
    /// the watchdog ends the job. Wrap a collective together with the host read that waits for it.
    pub fn watch(&self, what: impl Into<String>) -> WatchGuard<'_> {
        if let Ok(mut w) = self.waiting.lock() {
            *w = Some((what.into(), Instant::now()));
        }
        WatchGuard(&self.waiting)
    }

    fn start_watchdog(&self) {
        let (waiting, timeout, who) = (self.waiting.clone(), self.timeout, self.launch.describe());
        std::thread::Builder::new()
            .name("cim-dist-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let stuck = waiting
                    .lock()
                    .ok()
                    .and_then(|w| w.clone())
                    .filter(|(_, since)| since.elapsed() > timeout);
                if let Some((what, since)) = stuck {
                    eprintln!(
                        "error: {who}: {what} has waited {:.0} s for the other ranks (dist.timeout_s = {}); \
                         a rank has failed or stalled — ending the job",
                        since.elapsed().as_secs_f64(),
                        timeout.as_secs()
                    );
                    std::process::exit(3);
                }
            })
            .expect("spawning the watchdog thread");
    }

    /// Whether collectives go through a backend: several ranks, or one with a backend named.
    pub fn is_connected(&self) -> bool {
        self.coll.backend() != "single"
    }

    /// The sum of `t` over ranks.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if !self.is_connected() {
            return Ok(t.clone());
        }
        self.coll.all_reduce_sum(&t.contiguous()?)
    }

    /// Rank `root`'s `t` on every rank.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if !self.is_connected() {
            return Ok(t.clone());
        }
        self.coll.broadcast(&t.contiguous()?, root)
    }

    /// The mean over ranks of each of `values` (a loss, a count), read back to the host.
    pub fn mean_f64(&self, values: &[f64], device: &Device) -> Result<Vec<f64>> {
        if !self.is_connected() || values.is_empty() {
            return Ok(values.to_vec());
        }
        let t = Tensor::from_slice(values, values.len(), device)?;
        let sum: Vec<f64> = self.coll.all_reduce_sum(&t)?.to_vec1()?;
        Ok(sum.into_iter().map(|s| s / self.world() as f64).collect())
    }

    /// The mean over ranks of every tensor of `tensors`, reduced in flat buckets of at most
    /// `bucket_bytes` (one collective per bucket), in the order given — every rank must give the
    /// same tensors in the same order. A bucket holds one dtype: bf16 gradients go as bf16.
    pub fn all_reduce_mean(&self, tensors: &[Tensor], bucket_bytes: usize) -> Result<Vec<Tensor>> {
        let w = self.world();
        if !self.is_connected() {
            return Ok(tensors.to_vec());
        }
        let mut out = Vec::with_capacity(tensors.len());
        let mut start = 0;
        while start < tensors.len() {
            let dtype = tensors[start].dtype();
            let size = |t: &Tensor| t.elem_count() * dtype.size_in_bytes();
            let (mut end, mut bytes) = (start, 0);
            while end < tensors.len()
                && tensors[end].dtype() == dtype
                && (end == start || bytes + size(&tensors[end]) <= bucket_bytes)
            {
                bytes += size(&tensors[end]);
                end += 1;
            }
            let flat: Vec<Tensor> = tensors[start..end]
                .iter()
                .map(|t| t.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let sum = self.coll.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
            let mean = match dtype {
                DType::F32 | DType::F64 => sum.affine(1.0 / w as f64, 0.0)?,
                _ => (sum.to_dtype(DType::F32)? / w as f64)?.to_dtype(dtype)?,
            };
            let mut at = 0;
            for t in &tensors[start..end] {
                let n = t.elem_count();
                out.push(mean.narrow(0, at, n)?.reshape(t.shape())?);
                at += n;
            }
            start = end;
        }
        Ok(out)
    }

    /// Checks that every rank holds the same `value` (a checksum of the weights, say); the error
    /// names each rank that differs from rank 0.
    pub fn agree(&self, what: &str, value: u64, device: &Device) -> Result<()> {
        let w = self.world();
        if !self.is_connected() {
            return Ok(());
        }
        // Four 16-bit pieces per rank: exact in any float sum.
        let mut table = vec![0f64; w * 4];
        for i in 0..4 {
            table[self.rank() * 4 + i] = ((value >> (16 * i)) & 0xFFFF) as f64;
        }
        let t = Tensor::from_vec(table, w * 4, device)?;
        let all: Vec<f64> = self.coll.all_reduce_sum(&t)?.to_vec1()?;
        let of = |r: usize| (0..4).fold(0u64, |acc, i| acc | ((all[r * 4 + i] as u64) << (16 * i)));
        let differ: Vec<String> = (1..w)
            .filter(|&r| of(r) != of(0))
            .map(|r| format!("rank {r} has {:016x}", of(r)))
            .collect();
        if differ.is_empty() {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "{what} differs between ranks: rank 0 has {:016x}, {}",
                of(0),
                differ.join(", ")
            )))
        }
    }

    /// `r`, after ending the whole job if it is an error of this rank's ([`Dist::fail`]).
    pub fn or_end_job<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.fail(&e.to_string());
        }
        r
    }

    /// Reports `error` as this rank's and ends the whole job (a rank that stopped alone would
    /// leave the others waiting). A job of one just returns.
    pub fn fail(&self, error: &str) {
        if self.world() > 1 {
            eprintln!("error: {}: {error}", self.launch.describe());
            self.coll.abort(1);
        }
    }
}

/// While alive, the watchdog times this rank's wait ([`Dist::watch`]).
pub struct WatchGuard<'a>(&'a Waiting);

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut w) = self.0.lock() {
            *w = None;
        }
    }
}

#[cfg(feature = "mpi")]
fn mpi(launch: &Launch) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi_backend::Mpi::init(launch)?))
}

#[cfg(not(feature = "mpi"))]
fn mpi(launch: &Launch) -> Result<Box<dyn Collective>> {
    Err(Error::config(format!(
        "{}: dist.backend = \"mpi\" needs a cim-run built with `--features mpi` (and an MPI library such as OpenMPI)",
        launch.describe()
    )))
}

#[cfg(feature = "nccl")]
fn nccl(launch: &Launch, device: &Device, timeout: Duration) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl_backend::Nccl::init(launch, device, timeout)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl(launch: &Launch, _device: &Device, _timeout: Duration) -> Result<Box<dyn Collective>> {
    Err(Error::config(format!(
        "{}: dist.backend = \"nccl\" (or \"auto\" on CUDA) needs a cim-run built with `--features nccl`",
        launch.describe()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_of_one_reduces_to_itself() {
        let d = Dist::single();
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let out = d.all_reduce_mean(&[t.clone(), t.clone()], 4).unwrap();
        assert_eq!(out[1].to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(d.mean_f64(&[2.5], &Device::Cpu).unwrap(), vec![2.5]);
        d.agree("weights", 7, &Device::Cpu).unwrap();
        assert!(d.is_leader());
    }
}
