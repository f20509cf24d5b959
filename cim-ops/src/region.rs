//! A chain of grafted nodes differentiated as ONE node of candle's graph: [`region`].
//!
//! candle's backward gives every input of every node a zero tensor the size of the input and adds
//! the node's gradient to it (`GradStore::or_insert` in candle 0.11's `backprop.rs`): a memset and
//! an addition per edge of the graph. Between grafted nodes ([`super::with_backward`]) those edges
//! carry activations — a ResNet-50 bottleneck has about eight, each a map of up to 100 M values at
//! batch 128. Inside a region, grafted nodes are recorded on a tape instead of candle's graph: their
//! outputs are plain tensors, and the region is one grafted node whose backward runs the tape in
//! reverse, handing each node's gradient to the nodes that made its inputs directly — a gradient
//! is added to another only where an activation feeds two nodes (a shortcut), and nothing is
//! zero-filled. Parameters' gradients go to the [`GradSink`] as before.
//!
//! Only grafted ops may make the activations inside a region: an input of a grafted node that is
//! neither a region input, the output of a grafted node of the region, nor a parameter (a variable)
//! is an error — an ordinary candle op there would have been differentiated by candle, and here its
//! gradient would be lost. Regions need an installed [`GradSink`] (the parameters' gradients must
//! go somewhere); without one, or when no input tracks a gradient,
//! [`region`] just calls its function. Regions do not nest: one inside another records onto the
//! outer tape.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Tensor, TensorId};

use super::node::{BackwardFn, GradSink, Output, SinkInner};
use crate::Result;

/// One grafted node recorded on a tape.
struct Node {
    /// Its output.
    out: TensorId,
    /// Per input, in order: where its gradient goes — an activation of the tape (by id) or a
    /// parameter (to the sink).
    inputs: Vec<Edge>,
    backward: Box<BackwardFn>,
}

enum Edge {
    Activation(TensorId),
    Sunk(Tensor),
}

struct Tape {
    /// The region's inputs (detached copies' ids) and the nodes' outputs so far.
    known: std::collections::HashSet<TensorId>,
    nodes: Vec<Node>,
    sink: Arc<SinkInner>,
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// `f(inputs)` as one node of candle's graph whose backward runs the grafted nodes `f` built, in
/// reverse (see the module documentation). `f` gets the inputs detached; what it returns is the
/// region's output, which the node's forward copies once.
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// use cim_ops::{self as ops, GradSink};
/// let x = Var::from_tensor(&Tensor::new(&[-1f32, 2., 3.], &Device::Cpu)?.reshape((1, 3, 1, 1))?)?;
/// let w = Var::from_tensor(&Tensor::ones((3, 3, 1, 1), candle_core::DType::F32, &Device::Cpu)?)?;
/// let sink = GradSink::install();
/// let xa = (x.as_tensor() * 1.0)?; // an activation
/// // Two grafted ops (a 1×1 convolution, a ReLU) as one node. A view (`reshape`, `narrow`) of
/// // an activation inside would be an error: it is not a grafted op.
/// let y = ops::region(&[&xa], |xs| ops::relu(&ops::conv2d(&xs[0], &w, 0, 1)?))?;
/// let grads = sink.backward(&y.sum_all()?)?;
/// // Each output channel is x summed (4 > 0): dx = 3 everywhere, dw = x.
/// assert_eq!(grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?, [3., 3., 3.]);
/// assert!(grads.get(&x).is_some() && grads.get(&w).is_some());
/// # Ok(()) }
/// ```
pub fn region<E: From<candle_core::Error>>(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> std::result::Result<Tensor, E>,
) -> std::result::Result<Tensor, E> {
    let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    let sink = GradSink::current_inner();
    let tracked = inputs.iter().any(|t| t.track_op());
    let (Some(sink), true, false) = (sink, tracked, recording()) else {
        return f(&owned);
    };
    if inputs.is_empty() || inputs.len() > 3 {
        return Err(crate::Error::msg(format!(
            "ops::region takes 1 to 3 inputs, got {}",
            inputs.len()
        ))
        .into());
    }
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let ids: Vec<TensorId> = detached.iter().map(|t| t.id()).collect();
    if ids.iter().enumerate().any(|(i, id)| ids[..i].contains(id)) {
        return Err(
            crate::Error::msg("ops::region: the same tensor twice among the inputs").into(),
        );
    }
    TAPE.with(|t| {
        *t.borrow_mut() = Some(Tape {
            known: ids.iter().copied().collect(),
            nodes: vec![],
            sink,
        })
    });
    // Uninstalls the tape however `f` ends — an error, or a panic caught further up (a stale tape
    // would capture the thread's later grafted nodes).
    struct Uninstall;
    impl Drop for Uninstall {
        fn drop(&mut self) {
            TAPE.with(|t| t.borrow_mut().take());
        }
    }
    let guard = Uninstall;
    let y = f(&detached);
    let tape = TAPE
        .with(|t| t.borrow_mut().take())
        .expect("installed above");
    drop(guard);
    let y = y?;
    let out = y.id();
    if !tape.known.contains(&out) {
        return Err(crate::Error::msg(
            "ops::region: the output was not made by a grafted op inside the region",
        )
        .into());
    }
    let (nodes, sink) = (tape.nodes, tape.sink);
    let backward = move |dy: &Tensor| {
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(out, dy.clone());
        for node in nodes.iter().rev() {
            let Some(g) = grads.remove(&node.out) else {
                continue; // nothing of the output depends on this node
            };
            let gs = (node.backward)(&g)?;
            if gs.len() != node.inputs.len() {
                candle_core::bail!(
                    "grafted backward returned {} gradients for {} inputs",
                    gs.len(),
                    node.inputs.len()
                );
            }
            for (edge, gi) in node.inputs.iter().zip(gs) {
                let Some(gi) = gi else { continue };
                match edge {
                    Edge::Sunk(var) => sink.push(var, gi)?,
                    Edge::Activation(id) => {
                        let sum = match grads.remove(id) {
                            Some(prev) => (prev + gi)?,
                            None => gi,
                        };
                        grads.insert(*id, sum);
                    }
                }
            }
        }
        Ok(ids.iter().map(|id| grads.remove(id)).collect())
    };
    super::node::attach(inputs, Output::Done(y), Box::new(backward)).map_err(E::from)
}

/// Whether a region is recording on this thread (then [`super::with_backward`] calls
/// [`record`]).
pub(super) fn recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// Whether a grafted op should compute `t`'s gradient: `t` tracks one in candle's graph, or is an
/// activation of the region being recorded (whose tensors are outside candle's graph).
pub(super) fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
        || TAPE.with(|tape| {
            tape.borrow()
                .as_ref()
                .is_some_and(|tape| tape.known.contains(&t.id()))
        })
}

/// Inside a region: records a grafted node (called by [`super::with_backward`]) and gives its
/// output, computed outside any graph.
pub(super) fn record(inputs: &[&Tensor], out: Output, backward: Box<BackwardFn>) -> Result<Tensor> {
    let edges = TAPE.with(|t| {
        let t = t.borrow();
        let tape = t.as_ref().expect("recording");
        inputs
            .iter()
            .map(|x| {
                if x.is_variable() {
                    Ok(Edge::Sunk((*x).clone()))
                } else if tape.known.contains(&x.id()) {
                    Ok(Edge::Activation(x.id()))
                } else {
                    Err(crate::Error::msg(format!(
                        "ops::region: an input {:?} of a grafted op inside the region is neither a \
                         region input, the output of a grafted op in it, nor a parameter — only \
                         grafted ops (conv2d, batch_norm_train_tail, relu, …) may make the \
                         activations inside a region (`run.graft_regions = false` runs without \
                         regions)",
                        x.dims()
                    )))
                }
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let mut y = out.run()?;
    let known = |id| TAPE.with(|t| t.borrow().as_ref().expect("recording").known.contains(&id));
    if known(y.id()) {
        // A node handing back one of its inputs as is: its output needs an identity of its own.
        y = y.copy()?;
    }
    TAPE.with(|t| {
        let mut t = t.borrow_mut();
        let tape = t.as_mut().expect("recording");
        tape.known.insert(y.id());
        tape.nodes.push(Node {
            out: y.id(),
            inputs: edges,
            backward,
        });
    });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{max_diff, randn};
    use crate::{self as ops, BnTail};
    use candle_core::Var;

    /// A residual block's worth of grafted ops — conv → BN + ReLU → conv → BN + shortcut + ReLU,
    /// the shortcut being the region's input, which thus feeds two nodes — as one region under a
    /// sink: the value and every gradient equal the same ops through candle's graph.
    #[test]
    fn region_equals_the_graph() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 4, 6, 6], 1))?;
        let w1 = Var::from_tensor(&(randn(&[4, 4, 3, 3], 2) * 0.3)?)?;
        let w2 = Var::from_tensor(&(randn(&[4, 4, 3, 3], 3) * 0.3)?)?;
        let g1 = Var::from_tensor(&randn(&[4], 4))?;
        let b1 = Var::from_tensor(&randn(&[4], 5))?;
        let g2 = Var::from_tensor(&randn(&[4], 6))?;
        let b2 = Var::from_tensor(&randn(&[4], 7))?;
        let up = randn(&[2, 4, 6, 6], 8);
        let block = |x: &Tensor| -> Result<Tensor> {
            let bn = |c: &Tensor, g: &Var, b: &Var, tail| {
                let stats = ops::channel_moments(c)?.expect("f32 on the CPU fuses");
                ops::batch_norm_train_tail(c, &stats, g, b, 1e-5, false, tail)
            };
            let relu = BnTail {
                residual: None,
                relu: true,
            };
            let h = bn(&ops::conv2d(x, &w1, 1, 1)?, &g1, &b1, relu)?;
            let end = BnTail {
                residual: Some(x),
                relu: true,
            };
            bn(&ops::conv2d(&h, &w2, 1, 1)?, &g2, &b2, end)
        };
        let vars = [&x, &w1, &w2, &g1, &b1, &g2, &b2];
        let run = |in_region: bool| -> Result<(Tensor, Vec<Tensor>)> {
            let sink = GradSink::install();
            let xa = (x.as_tensor() * 1.0)?;
            let y = match in_region {
                true => region(&[&xa], |xs| block(&xs[0]))?,
                false => block(&xa)?,
            };
            let g = sink.backward(&(&y * &up)?.sum_all()?)?;
            let grads = vars.iter().map(|v| g.get(v).unwrap().clone()).collect();
            Ok((y, grads))
        };
        let (yr, gr) = run(true)?;
        let (yg, gg) = run(false)?;
        assert_eq!(max_diff(&yr, &yg), 0.0);
        for (i, (a, b)) in gr.iter().zip(&gg).enumerate() {
            let d = max_diff(a, b);
            assert!(d < 1e-5, "gradient {i}: {d}");
        }
        Ok(())
    }

    /// A candle op between grafted ops inside a region is an error naming the rule; a region
    /// without a sink is its function; a node whose output is not used is skipped.
    #[test]
    fn region_rules() -> Result<()> {
        let x = Var::from_tensor(&randn(&[4, 8], 1))?;
        let sink = GradSink::install();
        let xa = (x.as_tensor() * 1.0)?;
        let e = region(&[&xa], |xs| ops::relu(&(&xs[0] * 2.0)?)).unwrap_err();
        assert!(e.to_string().contains("neither a region input"), "{e}");
        // The unused branch (a ReLU of the input) is recorded and skipped by the backward.
        let y = region(&[&xa], |xs| {
            let _unused = ops::relu(&xs[0])?;
            ops::relu(&ops::relu(&xs[0])?)
        })?;
        let g = sink.backward(&y.sum_all()?)?;
        let want = xa.ge(0f32)?.to_dtype(candle_core::DType::F32)?;
        assert_eq!(max_diff(g.get(&x).unwrap(), &want), 0.0);
        drop(sink);
        // A panic inside a region leaves no tape behind (the next grafted node goes to the graph).
        let sink = GradSink::install();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = region(&[&xa], |_| -> Result<Tensor> {
                panic!("inside the region")
            });
        }));
        assert!(caught.is_err() && !recording());
        drop(sink);
        // No sink: the plain graph.
        let y = region(&[&xa], |xs| ops::relu(&(&xs[0] * 2.0)?))?;
        let g = y.sum_all()?.backward()?;
        assert_eq!(max_diff(g.get(&x).unwrap(), &(want * 2.0)?), 0.0);
        Ok(())
    }
}
