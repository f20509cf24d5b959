//! [`SyncSum`]: the job's differentiable sum across ranks, for synchronised BatchNorm.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use cim_api::{CrossRank, Result};

use crate::Dist;

/// `sum(t)`: every rank's `t` summed; in the backward, every rank's gradient summed.
pub struct SyncSum {
    dist: Arc<Dist>,
}

impl SyncSum {
    pub fn new(dist: Arc<Dist>) -> Self {
        Self { dist }
    }
}

impl CrossRank for SyncSum {
    fn world(&self) -> usize {
        self.dist.world()
    }

    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        let total = {
            let _waiting = self.dist.watch("synchronised BatchNorm's statistics");
            self.dist.all_reduce_sum(&t.detach())?
        };
        let op = GradSum {
            dist: self.dist.clone(),
        };
        Ok(t.apply_op2(&total, op)?)
    }
}

/// Forward: its second argument (the sum, computed outside the graph). Backward: the gradient
/// of the first argument is the sum over ranks of the result's gradient — each rank's input
/// reaches every rank's loss through the sum.
struct GradSum {
    dist: Arc<Dist>,
}

fn whole(l: &Layout) -> candle_core::Result<()> {
    match l.contiguous_offsets() {
        Some((0, end)) if end == l.shape().elem_count() => Ok(()),
        _ => candle_core::bail!("sync sum: the sum must be a fresh contiguous tensor"),
    }
}

impl CustomOp2 for GradSum {
    fn name(&self) -> &'static str {
        "sync-sum"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        whole(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        whole(l2)?;
        Ok((s2.try_clone(l2)?, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _waiting = self.dist.watch("synchronised BatchNorm's gradients");
        let g = self
            .dist
            .all_reduce_sum(&grad.contiguous()?)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(g), None))
    }
}
