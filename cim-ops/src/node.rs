//! A grafted node of candle's graph ([`Output`], the custom op behind [`crate::with_backward`]) and
//! the [`GradSink`] that takes its parameters' gradients past the graph.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::Result;

/// The backward of a grafted node: the output gradient in, one gradient per input out (`None`
/// for inputs that need none).
pub type BackwardFn = dyn Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync;

/// Enters `out` into candle's graph as one node of `inputs` with `backward` as its gradient (see
/// [`crate::with_backward`], which records onto a region's tape instead while one is recording).
pub(crate) fn attach(inputs: &[&Tensor], out: Output, backward: Box<BackwardFn>) -> Result<Tensor> {
    let sink = GradSink::current().filter(|_| GradSink::takes(inputs));
    // Which inputs are graph edges; the others (variables, with a sink) are sunk.
    let sunk: Vec<bool> = inputs
        .iter()
        .map(|t| sink.is_some() && t.is_variable())
        .collect();
    let graph: Vec<&Tensor> = inputs
        .iter()
        .zip(&sunk)
        .filter(|(_, &s)| !s)
        .map(|(t, _)| *t)
        .collect();
    if !(1..=3).contains(&graph.len()) {
        return Err(crate::Error::msg(format!(
            "with_backward takes 1 to 3 inputs besides sunk parameters, got {}",
            graph.len()
        )));
    }
    if !graph.iter().any(|t| t.track_op()) {
        return out.run();
    }
    let sink = sink.map(|s| {
        let vars = inputs
            .iter()
            .zip(&sunk)
            .map(|(t, &s)| s.then(|| (*t).clone()))
            .collect();
        (s, vars)
    });
    let op = Graft {
        out: Mutex::new(Some(out)),
        backward,
        inputs: inputs.len(),
        sink,
    };
    Ok(match graph[..] {
        [a] => a.apply_op1(op)?,
        [a, b] => a.apply_op2(b, op)?,
        [a, b, c] => a.apply_op3(b, c, op)?,
        _ => unreachable!("the graph input count was checked above"),
    })
}

/// A grafted node's output: computed already — the node's forward copies it once — or the last op
/// of its computation (a candle custom op on detached tensors), which the node's forward runs
/// itself, writing the node's output with no copy. A `Tensor` converts into the first.
pub enum Output {
    Done(Tensor),
    Op2(Box<dyn CustomOp2 + Send + Sync>, [Tensor; 2]),
    Op3(Box<dyn CustomOp3 + Send + Sync>, [Tensor; 3]),
}

impl From<Tensor> for Output {
    fn from(t: Tensor) -> Self {
        Self::Done(t)
    }
}

impl Output {
    /// The value, outside any graph (the op applied to its detached arguments).
    pub fn run(self) -> Result<Tensor> {
        Ok(match self {
            Self::Done(t) => t,
            Self::Op2(op, [a, b]) => a.detach().apply_op2_arc(&b.detach(), Arc::new(op))?,
            Self::Op3(op, [a, b, c]) => {
                a.detach()
                    .apply_op3_arc(&b.detach(), &c.detach(), Arc::new(op))?
            }
        })
    }
}

/// Where grafted nodes send their parameters' gradients (see [`crate::with_backward`]), for the graphs
/// built on this thread while it is installed. A training step installs one before the forward
/// and takes the gradients with [`GradSink::backward`] instead of `Tensor::backward`:
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// use candle_core::DType;
/// use cim_ops::{layer_norm_mixed, GradSink};
/// let x = Var::new(&[[1f32, 2., 4.]], &Device::Cpu)?;
/// let w = Var::new(&[1f32, 1., 1.], &Device::Cpu)?;
/// let b = Var::new(&[0f32, 0., 0.], &Device::Cpu)?;
/// let sink = GradSink::install();
/// // One node: the bf16 activation in the graph, w and b sunk.
/// let y = layer_norm_mixed(&x.to_dtype(DType::BF16)?, &w, &b, 1e-5)?;
/// let loss = (y.to_dtype(DType::F32)? * &Tensor::new(&[[1f32, 0., -1.]], &Device::Cpu)?)?;
/// let grads = sink.backward(&loss.sum_all()?)?;
/// assert!(grads.get(&x).is_some() && grads.get(&w).is_some() && grads.get(&b).is_some());
/// # Ok(()) }
/// ```
///
/// Why: candle gives every input of every node a zero tensor its gradient is added to. For a
/// parameter that is a memset and an addition; for the pre-norm block's twelve parameters packed
/// into one graph input it was also a concatenation each way and a gradient per parameter padded
/// back to the packed length — ~75 launches per block that the sink replaces with none.
///
/// A graph built under a sink must be differentiated through [`GradSink::backward`] while the sink
/// is installed: `Tensor::backward` on it, or a backward after the sink was dropped, fails with an
/// error saying so (the parameters' gradients would otherwise be lost silently).
#[must_use = "the sink is active only while this value lives"]
pub struct GradSink {
    inner: Arc<SinkInner>,
    /// The sink this one replaced on the thread; `None` inside when this one was not installed.
    previous: Option<Option<Arc<SinkInner>>>,
}

#[derive(Default)]
pub(super) struct SinkInner {
    /// Set by [`GradSink::backward`] while candle's backward runs.
    collecting: AtomicBool,
    grads: Mutex<Vec<(Tensor, Tensor)>>,
}

thread_local! {
    static CURRENT_SINK: std::cell::RefCell<Option<Arc<SinkInner>>> = const { std::cell::RefCell::new(None) };
}

impl GradSink {
    /// Installs a sink on this thread (nested sinks restore the outer one when dropped).
    pub fn install() -> Self {
        Self::install_if(true)
    }

    /// [`GradSink::install`] when `on`; otherwise a sink that is not installed, whose
    /// [`GradSink::backward`] is plain `Tensor::backward` (a switch for measuring the difference).
    pub fn install_if(on: bool) -> Self {
        let inner = Arc::new(SinkInner::default());
        let previous = on.then(|| CURRENT_SINK.with(|c| c.borrow_mut().replace(inner.clone())));
        Self { inner, previous }
    }

    /// The sink installed on this thread, if any.
    pub(super) fn current_inner() -> Option<Arc<SinkInner>> {
        Self::current()
    }

    fn current() -> Option<Arc<SinkInner>> {
        CURRENT_SINK.with(|c| c.borrow().clone())
    }

    /// Whether a sink is installed on this thread.
    pub fn active() -> bool {
        CURRENT_SINK.with(|c| c.borrow().is_some())
    }

    /// Whether a node over `inputs` built now sends its variables' gradients to the sink: one is
    /// installed, and an input that is not a variable carries the node in the graph.
    pub fn takes(inputs: &[&Tensor]) -> bool {
        Self::active() && inputs.iter().any(|t| !t.is_variable() && t.track_op())
    }

    /// `loss.backward()`, with the sunk parameter gradients added to the store (summed with any
    /// gradient candle's graph gave the same variable).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.inner.collecting.store(true, Ordering::SeqCst);
        let grads = loss.backward();
        self.inner.collecting.store(false, Ordering::SeqCst);
        let sunk = std::mem::take(&mut *self.inner.lock()?);
        let mut grads = grads?;
        for (var, g) in sunk {
            let g = match grads.remove(&var) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(&var, g);
        }
        Ok(grads)
    }
}

impl SinkInner {
    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Vec<(Tensor, Tensor)>>> {
        self.grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink lock poisoned".into()))
    }
    pub(super) fn push(&self, var: &Tensor, g: Tensor) -> candle_core::Result<()> {
        if !self.collecting.load(Ordering::SeqCst) {
            candle_core::bail!(
                "this graph was built while a GradSink was installed: differentiate it with \
                 GradSink::backward while the sink lives (Tensor::backward would lose the \
                 parameters' gradients)"
            );
        }
        if g.shape() != var.shape() || g.dtype() != var.dtype() {
            candle_core::bail!(
                "grafted backward gave a parameter {:?} {:?} a gradient {:?} {:?}",
                var.dims(),
                var.dtype(),
                g.dims(),
                g.dtype()
            );
        }
        self.lock()?.push((var.clone(), g));
        Ok(())
    }
}

impl Drop for GradSink {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            CURRENT_SINK.with(|c| *c.borrow_mut() = previous);
        }
    }
}

struct Graft {
    /// The precomputed output until the node's forward copies it; then dropped, so the graph keeps
    /// only the node's own output, not a second copy.
    out: std::sync::Mutex<Option<Output>>,
    backward: Box<BackwardFn>,
    inputs: usize,
    /// With a sink: the sink, and per input the variable whose gradient goes there (`None` for
    /// graph inputs).
    sink: Option<(Arc<SinkInner>, Vec<Option<Tensor>>)>,
}

impl Graft {
    fn take_out(&self) -> candle_core::Result<Output> {
        self.out
            .lock()
            .map_err(|_| candle_core::Error::Msg("grafted output lock poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("grafted output already consumed".into()))
    }
    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        fn cpu(s: &Storage) -> candle_core::Result<&CpuStorage> {
            match s {
                Storage::Cpu(s) => Ok(s),
                _ => candle_core::bail!("grafted output: an input is not on the CPU"),
            }
        }
        match self.take_out()? {
            Output::Done(out) => {
                let (s, l) = out.storage_and_layout();
                copy_fresh(cpu(&s)?, l, "grafted output")
            }
            Output::Op2(op, [a, b]) => {
                let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
                op.cpu_fwd(cpu(&sa)?, la, cpu(&sb)?, lb)
            }
            Output::Op3(op, [a, b, c]) => {
                let (sa, la) = a.storage_and_layout();
                let ((sb, lb), (sc, lc)) = (b.storage_and_layout(), c.storage_and_layout());
                op.cpu_fwd(cpu(&sa)?, la, cpu(&sb)?, lb, cpu(&sc)?, lc)
            }
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        fn cuda(s: &Storage) -> candle_core::Result<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(s) => Ok(s),
                _ => candle_core::bail!("grafted output: an input is not on a CUDA device"),
            }
        }
        match self.take_out()? {
            Output::Done(out) => {
                let (s, l) = out.storage_and_layout();
                copy_fresh(cuda(&s)?, l, "grafted output")
            }
            Output::Op2(op, [a, b]) => {
                let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
                op.cuda_fwd(cuda(&sa)?, la, cuda(&sb)?, lb)
            }
            Output::Op3(op, [a, b, c]) => {
                let (sa, la) = a.storage_and_layout();
                let ((sb, lb), (sc, lc)) = (b.storage_and_layout(), c.storage_and_layout());
                op.cuda_fwd(cuda(&sa)?, la, cuda(&sb)?, lb, cuda(&sc)?, lc)
            }
        }
    }
    fn grads(&self, dy: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let mut g = (self.backward)(dy)?;
        if g.len() != self.inputs {
            candle_core::bail!(
                "grafted backward returned {} gradients for {} inputs",
                g.len(),
                self.inputs
            );
        }
        if let Some((sink, vars)) = &self.sink {
            let mut graph = Vec::with_capacity(3);
            for (g, var) in g.into_iter().zip(vars) {
                match (var, g) {
                    (Some(var), Some(g)) => sink.push(var, g)?,
                    (Some(_), None) => {}
                    (None, g) => graph.push(g),
                }
            }
            g = graph;
        }
        g.resize(3, None);
        Ok(g)
    }
}

/// A copy of the precomputed output's storage: the node's forward. The output must be fresh (its
/// own contiguous storage from offset 0), which every computation's result is.
fn copy_fresh<S: candle_core::backend::BackendStorage>(
    s: &S,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{what}: expected a freshly computed contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp1 for Graft {
    fn name(&self) -> &'static str {
        "cim-graft"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(self.grads(dy)?.swap_remove(0))
    }
}

impl CustomOp2 for Graft {
    fn name(&self) -> &'static str {
        "cim-graft"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Graft {
    fn name(&self) -> &'static str {
        "cim-graft"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(dy)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use crate::with_backward;
    use candle_core::Var;

    /// Three inputs, one of them without gradient: the grafted node's gradients are the closure's,
    /// and equal the recorded ops' for the same function.
    #[test]
    fn grafted_gradients_match_the_recorded_ones() -> Result<()> {
        let a = Var::from_tensor(&randn(&[4, 5], 1))?;
        let b = Var::from_tensor(&randn(&[4, 5], 2))?;
        let c = Var::from_tensor(&randn(&[4, 5], 3))?;
        let f = |a: &Tensor, b: &Tensor, c: &Tensor| -> candle_core::Result<Tensor> {
            (a * b)? + c.sin()?
        };
        let (ad, bd, cd) = (a.detach(), b.detach(), c.detach());
        let out = f(&ad, &bd, &cd)?;
        let y = with_backward(&[&a, &b, &c], out, move |dy| {
            Ok(vec![Some((dy * &bd)?), Some((dy * &ad)?), None])
        })?;
        let want = f(&a, &b, &c)?;
        assert!(max_diff(&y, &want) == 0.0);
        let up = randn(&[4, 5], 4);
        let gy = (&y * &up)?.sum_all()?.backward()?;
        let gw = (&want * &up)?.sum_all()?.backward()?;
        for v in [&a, &b] {
            assert!(max_diff(gy.get(v).unwrap(), gw.get(v).unwrap()) < 1e-6);
        }
        assert!(gy.get(&c).is_none(), "the closure gave c no gradient");
        // Untracked inputs: the output itself; a wrong gradient count is an error.
        let plain = with_backward(&[&randn(&[2], 5)], randn(&[2], 6), |_| Ok(vec![]))?;
        assert!(!plain.track_op());
        let bad = with_backward(&[&a], randn(&[4, 5], 7), |_| Ok(vec![]))?;
        let e = bad.sum_all()?.backward().unwrap_err().to_string();
        assert!(e.contains("returned 0 gradients for 1 inputs"), "{e}");
        let e = with_backward(&[], randn(&[1], 8), |_| Ok(vec![])).unwrap_err();
        assert!(e.to_string().contains("1 to 3 inputs"), "{e}");
        Ok(())
    }

    /// `a + b·c` on the CPU (f32): a custom op to leave as a graft's last op.
    struct MulAdd;
    impl CustomOp3 for MulAdd {
        fn name(&self) -> &'static str {
            "test-mul-add"
        }
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            let (a, b, c) = (
                crate::slice(s1, l1, "a")?,
                crate::slice(s2, l2, "b")?,
                crate::slice(s3, l3, "c")?,
            );
            let y = a
                .iter()
                .zip(b)
                .zip(c)
                .map(|((a, b), c)| a + b * c)
                .collect();
            Ok((CpuStorage::F32(y), l1.shape().clone()))
        }
    }

    /// A node whose output is its last op left undone ([`Output::Op3`]): the node's forward runs
    /// it — the same value as the op applied beforehand, the same gradients — and without
    /// tracked inputs the op runs at once.
    #[test]
    fn a_last_op_left_to_the_node_gives_the_same_node() -> Result<()> {
        let xv = Var::from_tensor(&randn(&[3, 4], 21))?;
        let (b, c) = (randn(&[3, 4], 22), randn(&[3, 4], 23));
        let up = randn(&[3, 4], 24);
        let node = |deferred: bool| -> Result<(Tensor, Tensor)> {
            let x = xv.as_tensor().sin()?;
            let xd = x.detach();
            let out: Output = match deferred {
                true => Output::Op3(Box::new(MulAdd), [xd.clone(), b.clone(), c.clone()]),
                false => Output::Done(xd.apply_op3_no_bwd(&b, &c, &MulAdd)?),
            };
            let y = with_backward(&[&x], out, move |dy| Ok(vec![Some(dy.clone())]))?;
            let g = (&y * &up)?.sum_all()?.backward()?;
            Ok((y, g.get(&xv).unwrap().clone()))
        };
        let ((y1, g1), (y2, g2)) = (node(true)?, node(false)?);
        assert_eq!(max_diff(&y1, &y2), 0.0);
        assert_eq!(max_diff(&g1, &g2), 0.0);
        let want = ((xv.as_tensor().sin()? + (&b * &c)?)?).detach();
        assert!(max_diff(&y1, &want) < 1e-6);
        let plain = with_backward(
            &[&b],
            Output::Op3(Box::new(MulAdd), [b.clone(), b.clone(), c.clone()]),
            |_| Ok(vec![]),
        )?;
        assert!(!plain.track_op());
        assert!(max_diff(&plain, &(&b + (&b * &c)?)?) < 1e-6);
        Ok(())
    }

    /// `y = a·x + x·b + w²`-like node with an activation and three parameters: under a sink the
    /// parameters leave the graph and their gradients (one also used by a recorded op) come out of
    /// `GradSink::backward` equal to the plain graph's; `Tensor::backward` on a sunk graph, and a
    /// backward after the sink is gone, fail with errors naming the sink.
    #[test]
    fn sunk_parameter_gradients_match_the_graph_ones() -> Result<()> {
        let xv = Var::from_tensor(&randn(&[4, 5], 11))?;
        let (a, b, w) = (
            Var::from_tensor(&randn(&[4, 5], 12))?,
            Var::from_tensor(&randn(&[4, 5], 13))?,
            Var::from_tensor(&randn(&[5], 14))?,
        );
        let up = randn(&[4, 5], 15);
        let build = || -> Result<Tensor> {
            let x = xv.as_tensor().sin()?; // an activation: tracked, not a variable
            let (xd, ad, bd, wd) = (x.detach(), a.detach(), b.detach(), w.detach());
            let out = (((&xd * &ad)? + (&xd * &bd)?)?.broadcast_add(&wd.sqr()?))?;
            let y = with_backward(&[&x, &a, &b, &w], out, move |dy| {
                Ok(vec![
                    Some((dy * (&ad + &bd)?)?),
                    Some((dy * &xd)?),
                    None,
                    Some((dy.sum(0)? * (&wd * 2.0)?)?),
                ])
            })?;
            // `a` is also used by a recorded op.
            (&y * &up)?.sum_all()? + a.as_tensor().sum_all()?
        };
        // Four inputs need the sink: without one they are four graph inputs.
        let e = build().unwrap_err().to_string();
        assert!(
            e.contains("1 to 3 inputs besides sunk parameters, got 4"),
            "{e}"
        );
        let sink = GradSink::install();
        assert!(GradSink::active());
        let g = sink.backward(&build()?)?;
        let e = build()?.backward().unwrap_err().to_string();
        assert!(e.contains("GradSink::backward"), "{e}");
        let late = build()?;
        drop(sink);
        assert!(!GradSink::active());
        let e = late.backward().unwrap_err().to_string();
        assert!(e.contains("GradSink::backward"), "{e}");
        // Not installed: nothing is sunk, and its backward is the plain one.
        let off = GradSink::install_if(false);
        assert!(!GradSink::active());
        assert!(build().unwrap_err().to_string().contains("got 4"));
        let plain = with_backward(&[&xv, &a], randn(&[4, 5], 16), |dy| {
            Ok(vec![Some(dy.clone()), Some(dy.clone())])
        })?;
        assert!(off.backward(&plain.sum_all()?)?.get(&a).is_some());
        drop(off);
        // The same function recorded op by op.
        let x = xv.as_tensor().sin()?;
        let want = (((&x * a.as_tensor())? + (&x * b.as_tensor())?)?
            .broadcast_add(&w.as_tensor().sqr()?))?;
        let gw = (((&want * &up)?.sum_all()? + a.as_tensor().sum_all()?)?).backward()?;
        for (name, v) in [("x", &xv), ("a", &a), ("w", &w)] {
            let d = max_diff(g.get(v).expect(name), gw.get(v).unwrap());
            assert!(d < 1e-5, "{name}: {d}");
        }
        assert!(g.get(&b).is_none(), "the closure gave b no gradient");
        Ok(())
    }
}
