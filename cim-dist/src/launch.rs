//! Who this process is in a job — its rank, the world size, its rank on its node — read from the
//! variables its launcher sets: `torchrun` (and any launcher that sets PyTorch's `RANK` /
//! `WORLD_SIZE`), `mpirun` of OpenMPI, MPICH or Intel MPI (PMI), and Slurm's `srun`. With none
//! of them the process is a job of one.

use cim_api::{Error, Result};

/// The launcher a process was started by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Started on its own.
    Single,
    /// `torchrun` (or a script exporting `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
    Torchrun,
    /// OpenMPI's `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// MPICH's or Intel MPI's `mpiexec` (`PMI_RANK`, `PMI_SIZE`).
    Pmi,
    /// Slurm's `srun` (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`).
    Slurm,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Single => "single process",
            Launcher::Torchrun => "torchrun",
            Launcher::OpenMpi => "OpenMPI mpirun",
            Launcher::Pmi => "MPI (PMI)",
            Launcher::Slurm => "Slurm srun",
        }
    }

    /// Whether the processes are an MPI job (so the `mpi` backend can connect them).
    pub fn is_mpi(self) -> bool {
        matches!(self, Launcher::OpenMpi | Launcher::Pmi)
    }
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    /// 0-based rank among all processes.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank among the processes on this node (the CUDA device a rank uses).
    pub local_rank: usize,
    /// Processes on this node (they share its CPU cores).
    pub local_world: usize,
    /// `MASTER_ADDR` and `MASTER_PORT`: where rank 0 hands out NCCL's id.
    pub master: Option<(String, u16)>,
    /// `torchrun`'s agent holds `MASTER_PORT` itself (its own store); the rendezvous then uses
    /// the port above it.
    pub agent_store: bool,
}

impl Launch {
    /// A job of one process.
    pub fn single() -> Self {
        Self {
            launcher: Launcher::Single,
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master: None,
            agent_store: false,
        }
    }

    /// From this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From the variables `get` returns (the environment, or a test's table). A variable that is
    /// set but malformed, or a rank outside the world, is an error naming it.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |k: &str| -> Result<Option<usize>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                    Error::config(format!("environment variable {k}={v:?} is not a count"))
                }),
            }
        };
        // The leading count of Slurm's task lists, "4(x2),3" → 4.
        let leading = |k: &str| -> Option<usize> {
            let v = get(k)?;
            let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        };
        type Names = (
            Launcher,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
        );
        let known: [Names; 4] = [
            (
                Launcher::Torchrun,
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
            ),
            (
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            (
                Launcher::Pmi,
                "PMI_RANK",
                "PMI_SIZE",
                "MPI_LOCALRANKID",
                "MPI_LOCALNRANKS",
            ),
            (
                Launcher::Slurm,
                "SLURM_PROCID",
                "SLURM_STEP_NUM_TASKS",
                "SLURM_LOCALID",
                "SLURM_STEP_TASKS_PER_NODE",
            ),
        ];
        let mut launch = Self::single();
        for (launcher, rank_k, world_k, local_k, local_world_k) in known {
            let (Some(rank), Some(world)) = (num(rank_k)?, num(world_k)?) else {
                continue;
            };
            if world == 0 || rank >= world {
                return Err(Error::config(format!(
                    "environment: {rank_k}={rank} is not a rank of {world_k}={world}"
                )));
            }
            let local_rank = num(local_k)?.unwrap_or(rank);
            let local_world = match launcher {
                Launcher::Slurm => leading(local_world_k),
                _ => num(local_world_k)?,
            }
            .unwrap_or(world);
            launch = Self {
                launcher,
                rank,
                world,
                local_rank,
                local_world: local_world.max(1),
                ..Self::single()
            };
            break;
        }
        if let (Some(addr), Some(port)) = (get("MASTER_ADDR"), get("MASTER_PORT")) {
            let port = port.trim().parse::<u16>().map_err(|_| {
                Error::config(format!(
                    "environment variable MASTER_PORT={port:?} is not a port"
                ))
            })?;
            launch.master = Some((addr, port));
        }
        launch.agent_store = launch.launcher == Launcher::Torchrun
            && get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(launch)
    }

    /// `rank R of W (launcher)`.
    pub fn describe(&self) -> String {
        format!(
            "rank {} of {} ({}; local rank {} of {})",
            self.rank,
            self.world,
            self.launcher.name(),
            self.local_rank,
            self.local_world
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn each_launcher_maps_to_rank_world_and_local_rank() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
        let t = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap();
        assert_eq!(
            (t.launcher, t.rank, t.world, t.local_rank, t.local_world),
            (Launcher::Torchrun, 3, 8, 1, 2)
        );
        assert_eq!(t.master, Some(("node0".into(), 29500)));
        assert!(t.agent_store);
        let o = launch(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(
            (o.launcher, o.rank, o.world, o.local_rank, o.local_world),
            (Launcher::OpenMpi, 1, 2, 1, 2)
        );
        assert!(o.launcher.is_mpi() && o.master.is_none() && !o.agent_store);
        let p = launch(&[("PMI_RANK", "0"), ("PMI_SIZE", "4")]).unwrap();
        assert_eq!((p.launcher, p.world, p.local_world), (Launcher::Pmi, 4, 4));
        let s = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)"),
        ])
        .unwrap();
        assert_eq!(
            (s.launcher, s.rank, s.world, s.local_rank, s.local_world),
            (Launcher::Slurm, 5, 8, 1, 4)
        );
        // An sbatch script itself (no srun step) is not a job of many.
        assert_eq!(
            launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")])
                .unwrap()
                .world,
            1
        );
    }

    #[test]
    fn malformed_variables_are_named() {
        let e = launch(&[("RANK", "two"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"two\""), "{e}");
        let e = launch(&[("RANK", "2"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=2") && e.contains("WORLD_SIZE=2"), "{e}");
        let e = launch(&[("MASTER_ADDR", "h"), ("MASTER_PORT", "http")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT=\"http\""), "{e}");
    }
}
