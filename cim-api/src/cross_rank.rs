//! Sums across the processes of a data-parallel job, for components whose forward pass needs the
//! whole global batch (synchronised BatchNorm). The runner fills a [`CrossRankSlot`] once the
//! processes are connected; in a job of one it stays empty and components compute as always.

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use crate::Result;

/// A differentiable sum over ranks: `sum(t)` is the element-wise sum of every rank's `t`, and
/// the gradient reaching each rank's `t` is the sum of every rank's gradient of the result.
pub trait CrossRank: Send + Sync {
    /// Processes in the job.
    fn world(&self) -> usize;
    fn sum(&self, t: &Tensor) -> Result<Tensor>;
}

/// Where a component finds the job's [`CrossRank`] at run time (it is built before the
/// processes connect). Clones share the slot.
#[derive(Clone, Default)]
pub struct CrossRankSlot(Arc<OnceLock<Arc<dyn CrossRank>>>);

impl std::fmt::Debug for CrossRankSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.get() {
            Some(c) => write!(f, "CrossRankSlot(world {})", c.world()),
            None => f.write_str("CrossRankSlot(single process)"),
        }
    }
}

impl CrossRankSlot {
    /// Fills the slot (the runner, once); later calls change nothing.
    pub fn set(&self, c: Arc<dyn CrossRank>) {
        let _ = self.0.set(c);
    }

    /// The job's sum across ranks, when there are several ranks.
    pub fn get(&self) -> Option<&Arc<dyn CrossRank>> {
        self.0.get().filter(|c| c.world() > 1)
    }
}
