//! Reverse-mode automatic differentiation.
//!
//! The graph is recorded on tensors: each result of a differentiable op holds an `Op` with
//! its inputs and whatever its backward kernel needs. `backward` walks the graph in reverse
//! topological order (iteratively, so deep nets cannot overflow the stack), calls each op's
//! dedicated backward kernel, accumulates gradients of tensors used more than once, frees
//! each intermediate gradient as soon as it has been consumed, and returns the gradients of
//! the leaves in a [`GradStore`]. Only inputs that track gradients get one computed.

mod op;

pub(crate) use op::{relu_max_pool_key, BnEpilogue, Op};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::{Tensor, TensorId};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread currently record a graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Runs `f` without recording any graph (for evaluation and inference).
///
/// ```
/// use convnet::{no_grad, Tensor};
/// let w = Tensor::ones([2]).requires_grad();
/// let y = no_grad(|| w.relu())?;
/// assert!(!y.tracks_grad());
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    crate::scoped::with(&GRAD_ENABLED, false, f)
}

/// Turns recording on or off on this thread until changed again; returns the previous
/// setting (for callers whose recorded region does not fit one closure, such as a layer
/// capture that records only from the captured layer on).
pub(crate) fn set_grad_enabled(on: bool) -> bool {
    GRAD_ENABLED.with(|g| g.replace(on))
}

/// Gradients of the leaves of a graph, keyed by tensor identity.
#[derive(Default, Debug)]
pub struct GradStore {
    grads: HashMap<TensorId, Tensor>,
}

impl GradStore {
    /// The gradient of `t`, if it was reached by the backward pass.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.grads.get(&t.id())
    }

    /// Removes and returns the gradient of `t`.
    pub fn remove(&mut self, t: &Tensor) -> Option<Tensor> {
        self.grads.remove(&t.id())
    }

    /// Number of gradients held.
    pub fn len(&self) -> usize {
        self.grads.len()
    }

    /// True when no gradient is held.
    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// Replaces the gradient of `t` (for gradient clipping or an all-reduce between
    /// backward and the optimizer step).
    pub fn insert(&mut self, t: &Tensor, grad: Tensor) -> Result<()> {
        if grad.shape() != t.shape() {
            return Err(crate::error::shape_mismatch(
                "GradStore::insert",
                t.shape().to_string(),
                grad.shape().to_string(),
            ));
        }
        self.grads.insert(t.id(), grad);
        Ok(())
    }
}

/// Reverse topological order of the nodes that track gradients, reachable from `root`.
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut visited: HashSet<TensorId> = HashSet::new();
    // (node, whether its inputs have been pushed)
    let mut stack = vec![(root.clone(), false)];
    while let Some((node, expanded)) = stack.pop() {
        if expanded {
            order.push(node);
            continue;
        }
        if !visited.insert(node.id()) {
            continue;
        }
        stack.push((node.clone(), true));
        if let Some(op) = node.op() {
            for input in op.inputs() {
                if input.tracks_grad() && !visited.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order.reverse();
    order
}

/// Observes a backward pass as it runs: data-parallel training starts reducing a group of
/// gradients over the network as soon as the group is complete, while the rest of the
/// backward pass is still computing (see [`crate::dist`]).
pub trait BackwardHooks {
    /// The gradient of the leaf `leaf` (a parameter, or an input that requires a gradient)
    /// is complete: no op still to run contributes to it. Called once per leaf reached, in
    /// the order the backward pass completes them; `grad` is what the returned
    /// [`GradStore`] will hold.
    fn leaf_ready(&mut self, leaf: &Tensor, grad: &Tensor) -> Result<()>;

    /// Called after each op's backward kernel (e.g. to let communication progress).
    fn after_op(&mut self) -> Result<()> {
        Ok(())
    }
}

/// For each position in `order`, the leaves whose last consumer is the node at that
/// position: their gradients are complete once that node's backward kernel has run.
fn leaves_completed_at(order: &[Tensor]) -> Vec<Vec<Tensor>> {
    let mut last: HashMap<TensorId, (usize, Tensor)> = HashMap::new();
    for (i, node) in order.iter().enumerate() {
        if let Some(op) = node.op() {
            for input in op.inputs() {
                if input.tracks_grad() && input.op().is_none() {
                    last.insert(input.id(), (i, input.clone()));
                }
            }
        }
    }
    let mut at = vec![Vec::new(); order.len()];
    for (i, leaf) in last.into_values() {
        at[i].push(leaf);
    }
    // Deterministic order within one node (hash-map order is not): by tensor id.
    for leaves in &mut at {
        leaves.sort_by_key(|t| t.id());
    }
    at
}

pub(crate) fn backward(root: &Tensor, grad: Option<&Tensor>) -> Result<GradStore> {
    backward_observed(root, grad, None)
}

pub(crate) fn backward_observed(
    root: &Tensor,
    grad: Option<&Tensor>,
    mut hooks: Option<&mut dyn BackwardHooks>,
) -> Result<GradStore> {
    if !root.tracks_grad() {
        return Err(Error::Backward(format!(
            "the tensor of shape {} does not require a gradient: no parameter or input with requires_grad() contributed to it",
            root.shape()
        )));
    }
    let seed = match grad {
        Some(g) => {
            if g.shape() != root.shape() {
                return Err(crate::error::shape_mismatch(
                    "backward",
                    root.shape().to_string(),
                    g.shape().to_string(),
                ));
            }
            g.try_to_vec()?
        }
        None => {
            if root.numel() != 1 {
                return Err(Error::Backward(format!(
                    "backward() without a gradient needs a scalar, got shape {}; use backward_with",
                    root.shape()
                )));
            }
            vec![1.0]
        }
    };
    let mut pending: HashMap<TensorId, Storage> = HashMap::new();
    pending.insert(root.id(), seed_on(root.device(), seed)?);
    let mut store = GradStore::default();
    let order = topo_order(root);
    let completed = match hooks {
        Some(_) => leaves_completed_at(&order),
        None => Vec::new(),
    };
    for (i, node) in order.iter().enumerate() {
        if let Some(h) = hooks.as_deref_mut() {
            if i > 0 {
                // Leaves whose last consumer ran in the previous iteration are complete.
                for leaf in &completed[i - 1] {
                    if let Some(g) = pending.remove(&leaf.id()) {
                        let t = Tensor::from_storage(g, Shape::from(leaf.dims()), None);
                        h.leaf_ready(leaf, &t)?;
                        store.grads.insert(leaf.id(), t);
                    }
                }
                h.after_op()?;
            }
        }
        let Some(g) = pending.remove(&node.id()) else {
            continue;
        };
        match node.op() {
            None => {
                let t = Tensor::from_storage(g, Shape::from(node.dims()), None);
                if let Some(h) = hooks.as_deref_mut() {
                    h.leaf_ready(node, &t)?;
                }
                store.grads.insert(node.id(), t);
            }
            Some(op) => {
                let input_grads = crate::profile::timed(
                    true,
                    || op.profile_key(),
                    || op.backward_flops(),
                    || op_backward(op, node, &g),
                )?;
                // A host gradient's buffer goes back to the pool when `g` drops here.
                drop(g);
                for (input, gi) in input_grads {
                    match pending.get_mut(&input.id()) {
                        Some(acc) => accumulate(acc, &gi, input.numel())?,
                        None => {
                            pending.insert(input.id(), gi);
                        }
                    }
                }
            }
        }
    }
    Ok(store)
}

/// The seed gradient on the root's device.
fn seed_on(device: Device, seed: Vec<f32>) -> Result<Storage> {
    match device {
        Device::Cpu => Ok(Storage::Cpu(seed)),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(Storage::Cuda(crate::backend::cuda::backward::upload(
            n, &seed,
        )?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(Error::CudaNotBuilt),
    }
}

/// Runs `op`'s backward kernel on the device that holds the gradient `g`.
fn op_backward(op: &Op, out: &Tensor, g: &Storage) -> Result<Vec<(Tensor, Storage)>> {
    match g {
        Storage::Cpu(g) => Ok(op
            .backward(out, g)?
            .into_iter()
            .map(|(t, gi)| {
                debug_assert_eq!(gi.len(), t.numel());
                (t, Storage::Cpu(gi))
            })
            .collect()),
        #[cfg(feature = "cuda")]
        Storage::Cuda(b) => Ok(
            crate::backend::cuda::backward::backward(op, out, b, b.ordinal())?
                .into_iter()
                .map(|(t, gi)| (t, Storage::Cuda(gi)))
                .collect(),
        ),
    }
}

/// `acc += g` for a tensor reached along several paths.
fn accumulate(acc: &mut Storage, g: &Storage, n: usize) -> Result<()> {
    match (acc, g) {
        (Storage::Cpu(acc), Storage::Cpu(g)) => {
            crate::backend::cpu::elementwise::add_assign(acc, g);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda(acc), Storage::Cuda(g)) => {
            crate::backend::cuda::backward::add_assign(acc, g, n)
        }
        #[allow(unreachable_patterns)]
        (acc, g) => {
            let _ = n;
            Err(Error::DeviceMismatch {
                op: "backward",
                a: acc.device().to_string(),
                b: g.device().to_string(),
            })
        }
    }
}
