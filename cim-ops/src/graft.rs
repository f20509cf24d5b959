//! Custom backward passes for any function: compute the output without recording anything, then
//! graft it onto the graph as ONE node whose backward is a closure ([`with_backward`]).
//!
//! candle's backward pays for every recorded op: each input gradient starts as a zero tensor that
//! the op's gradient is added to (a memset and a full add), `narrow` pads its gradient back to full
//! size, and dtype casts are ops of their own. An H200 profile of ViT-B/16 RESPIX in bf16 spent
//! half of the step in candle's additions. A sub-graph with a known backward (attention, a
//! mixed-precision LayerNorm, a conv's im2col backward) is cheaper as one node.
//!
//! Inside a [`super::region`] the node is recorded on the region's tape; elsewhere it enters
//! candle's graph (`super::node`).

use candle_core::Tensor;

use super::node::Output;
use crate::Result;

/// `out` as a function of `inputs` in the graph, with `backward` as its gradient. `out` must have
/// been computed from detached inputs (nothing recorded) and be a fresh contiguous tensor, which
/// the node's forward copies once — or be the last op of that computation ([`Output::Op2`],
/// [`Output::Op3`]: a custom op on detached tensors), which the node's forward runs, writing its
/// output directly. Without tracked inputs the output comes back as is.
///
/// The node has at most three graph inputs (candle's custom ops take one to three). While a
/// [`GradSink`](crate::GradSink) is installed on this thread, inputs that are variables (parameters) are not graph
/// inputs when another input carries the graph: their gradients go to the sink, which
/// [`GradSink::backward`](crate::GradSink::backward) merges into the gradient store — no zero tensor, no addition, no packing
/// per parameter. So a node may then take any number of parameters beside up to three activations.
///
/// ```
/// # use candle_core::{Device, Tensor, Var};
/// # fn main() -> candle_core::Result<()> {
/// // y = x² with a hand-written backward 2·x·dy.
/// let x = Var::new(&[1f32, 2., 3.], &Device::Cpu)?;
/// let xd = x.as_tensor().detach();
/// let y = cim_ops::with_backward(&[x.as_tensor()], xd.sqr()?, move |dy| {
///     Ok(vec![Some(((&xd * 2.0)? * dy)?)])
/// })?;
/// let g = y.sum_all()?.backward()?;
/// assert_eq!(g.get(&x).unwrap().to_vec1::<f32>()?, [2., 4., 6.]);
/// # Ok(()) }
/// ```
pub fn with_backward(
    inputs: &[&Tensor],
    out: impl Into<Output>,
    backward: impl Fn(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let out = out.into();
    if super::region::recording() {
        return super::region::record(inputs, out, Box::new(backward));
    }
    super::node::attach(inputs, out, Box::new(backward))
}
