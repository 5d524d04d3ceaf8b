//! The `Tensor` handle: storage + layout + the op that produced it.
//!
//! A `Tensor` is cheap to clone (an `Arc`). Views (`reshape` of contiguous data, `permute`)
//! share storage; kernels always receive contiguous row-major data, obtained through
//! [`Tensor::with_data`] or [`Tensor::to_vec`], and never guess a layout from strides.
//! User-facing ops live in the submodules: they validate their inputs, run a CPU kernel from
//! `backend::cpu`, and record an [`Op`] for autograd when a gradient is needed.

mod conv;
mod elementwise;
mod loss;
mod norm;
mod pool;
mod reduce;
mod view;

pub use conv::Conv2dParams;
pub use loss::Reduction;
pub use pool::{AvgPool2dParams, MaxPool2dParams};

use crate::autograd::{self, Op};
use crate::device::Device;
use crate::error::{invalid, shape_mismatch, Result};
use crate::rng::Rng;
use crate::shape::Shape;
use crate::storage::{DType, Storage};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Unique identity of a tensor node; gradients are keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

pub(crate) struct Inner {
    id: TensorId,
    storage: Arc<RwLock<Storage>>,
    shape: Shape,
    strides: Vec<usize>,
    offset: usize,
    op: Option<Op>,
    requires_grad: bool,
}

/// An n-dimensional `f32` array with optional gradient tracking.
///
/// ```
/// use convnet::Tensor;
/// let x = Tensor::from_vec(vec![1.0, -2.0, 3.0, -4.0], [2, 2])?.requires_grad();
/// let y = x.relu()?.sum_all()?;
/// let grads = y.backward()?;
/// assert_eq!(grads.get(&x).unwrap().to_vec(), vec![1.0, 0.0, 1.0, 0.0]);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<Inner>);

fn read(s: &RwLock<Storage>) -> RwLockReadGuard<'_, Storage> {
    s.read().unwrap_or_else(|e| e.into_inner())
}

fn write(s: &RwLock<Storage>) -> RwLockWriteGuard<'_, Storage> {
    s.write().unwrap_or_else(|e| e.into_inner())
}

impl Tensor {
    // ----- construction -------------------------------------------------------------------

    /// Creates a tensor from row-major data; fails if the length does not match the shape.
    pub fn from_vec(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(shape_mismatch(
                "from_vec",
                format!("{} elements for shape {shape}", shape.numel()),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Tensor::from_parts(data, shape, None))
    }

    /// Creates a tensor from a slice (copied).
    pub fn from_slice(data: &[f32], shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)
    }

    /// A tensor filled with `value`.
    pub fn full(value: f32, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        Tensor::from_parts(vec![value; shape.numel()], shape, None)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>) -> Tensor {
        Tensor::full(0.0, shape)
    }

    /// A tensor of ones.
    pub fn ones(shape: impl Into<Shape>) -> Tensor {
        Tensor::full(1.0, shape)
    }

    /// A 0-dimensional tensor holding one value.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::from_parts(vec![value], Shape::new(Vec::new()), None)
    }

    /// Uniform random values in `[low, high)` from the given generator.
    pub fn rand_uniform(shape: impl Into<Shape>, low: f32, high: f32, rng: &mut Rng) -> Tensor {
        let shape = shape.into();
        let data = (0..shape.numel()).map(|_| rng.uniform(low, high)).collect();
        Tensor::from_parts(data, shape, None)
    }

    /// Standard-normal random values from the given generator.
    pub fn randn(shape: impl Into<Shape>, rng: &mut Rng) -> Tensor {
        let shape = shape.into();
        let data = (0..shape.numel()).map(|_| rng.normal()).collect();
        Tensor::from_parts(data, shape, None)
    }

    /// Places a tensor on a device. Only `Cpu` is available in this build.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        device.ensure_supported()?;
        Ok(self.clone())
    }

    /// Builds a contiguous result tensor; `op` is recorded only if it is `Some`.
    pub(crate) fn from_parts(data: Vec<f32>, shape: Shape, op: Option<Op>) -> Tensor {
        let strides = shape.contiguous_strides();
        let requires_grad = op.is_some();
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: Arc::new(RwLock::new(Storage::Cpu(data))),
            shape,
            strides,
            offset: 0,
            op,
            requires_grad,
        }))
    }

    /// A new handle on the same storage with another layout (a view).
    pub(crate) fn view_with(
        &self,
        shape: Shape,
        strides: Vec<usize>,
        offset: usize,
        op: Option<Op>,
    ) -> Tensor {
        let requires_grad = op.is_some();
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            shape,
            strides,
            offset,
            op,
            requires_grad,
        }))
    }

    // ----- gradient tracking ---------------------------------------------------------------

    /// Returns a leaf handle on the same data that records gradients (a trainable parameter).
    pub fn requires_grad(&self) -> Tensor {
        self.leaf(true)
    }

    /// Returns a leaf handle on the same data that is cut off from the graph.
    pub fn detach(&self) -> Tensor {
        self.leaf(false)
    }

    fn leaf(&self, requires_grad: bool) -> Tensor {
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: self.0.storage.clone(),
            shape: self.0.shape.clone(),
            strides: self.0.strides.clone(),
            offset: self.0.offset,
            op: None,
            requires_grad,
        }))
    }

    /// Whether gradients flow to this tensor.
    pub fn tracks_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// True for tensors not produced by a recorded op (inputs and parameters).
    pub fn is_leaf(&self) -> bool {
        self.0.op.is_none()
    }

    /// This node's identity.
    pub fn id(&self) -> TensorId {
        self.0.id
    }

    pub(crate) fn op(&self) -> Option<&Op> {
        self.0.op.as_ref()
    }

    /// Backpropagates from this scalar (e.g. a loss), returning the gradients of every leaf
    /// that requires one.
    pub fn backward(&self) -> Result<autograd::GradStore> {
        autograd::backward(self, None)
    }

    /// Backpropagates an upstream gradient of this tensor's shape.
    pub fn backward_with(&self, grad: &Tensor) -> Result<autograd::GradStore> {
        autograd::backward(self, Some(grad))
    }

    // ----- layout and data -----------------------------------------------------------------

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }

    /// The dimensions as a slice.
    pub fn dims(&self) -> &[usize] {
        self.0.shape.dims()
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.shape.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.shape.numel()
    }

    /// The device the data lives on.
    pub fn device(&self) -> Device {
        read(&self.0.storage).device()
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        read(&self.0.storage).dtype()
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.0.strides
    }

    /// True when the elements are laid out row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (d, s) in self.dims().iter().zip(&self.0.strides).rev() {
            if *d != 1 && *s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// Runs `f` on the elements in row-major order, borrowing them when the tensor is
    /// contiguous and gathering a copy otherwise.
    pub fn with_data<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let guard = read(&self.0.storage);
        let all = guard.as_slice();
        if self.is_contiguous() {
            f(&all[self.0.offset..self.0.offset + self.numel()])
        } else {
            let gathered = self.gather(all);
            drop(guard);
            f(&gathered)
        }
    }

    fn gather(&self, all: &[f32]) -> Vec<f32> {
        let dims = self.dims();
        let strides = &self.0.strides;
        let mut out = Vec::with_capacity(self.numel());
        let mut idx = vec![0usize; dims.len()];
        if self.numel() == 0 {
            return out;
        }
        loop {
            let off: usize =
                self.0.offset + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
            out.push(all[off]);
            let mut d = dims.len();
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < dims[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }

    /// The elements in row-major order.
    pub fn to_vec(&self) -> Vec<f32> {
        self.with_data(|d| d.to_vec())
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(shape_mismatch(
                "item",
                "one element",
                self.shape().to_string(),
            ));
        }
        Ok(self.with_data(|d| d[0]))
    }

    /// Mutates the elements in place (for optimizers and running statistics). The tensor
    /// must be contiguous. Tensors recorded in a graph that is still to be differentiated
    /// see the change, as in PyTorch.
    pub fn update_data<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        if !self.is_contiguous() {
            return Err(invalid("update_data", "tensor is not contiguous"));
        }
        let mut guard = write(&self.0.storage);
        let n = self.numel();
        let off = self.0.offset;
        Ok(f(&mut guard.as_mut_slice()[off..off + n]))
    }

    /// Overwrites the elements with `data` (same number of elements).
    pub fn copy_from_slice(&self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(shape_mismatch(
                "copy_from_slice",
                format!("{} elements", self.numel()),
                format!("{} elements", data.len()),
            ));
        }
        self.update_data(|d| d.copy_from_slice(data))
    }

    /// Whether both handles share one storage buffer.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// Checks that the tensor has `rank` dimensions, naming `op` in the error.
    pub(crate) fn expect_rank(&self, op: &'static str, rank: usize, layout: &str) -> Result<()> {
        if self.rank() != rank {
            return Err(shape_mismatch(
                op,
                format!("a {rank}-d tensor ({layout})"),
                format!("shape {}", self.shape()),
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor(shape={}, requires_grad={}",
            self.shape(),
            self.tracks_grad()
        )?;
        if self.numel() <= 8 {
            write!(f, ", data={:?}", self.to_vec())?;
        }
        write!(f, ")")
    }
}

/// Records `make_op()` if gradients are enabled and any of `inputs` tracks a gradient.
pub(crate) fn record(inputs: &[&Tensor], make_op: impl FnOnce() -> Op) -> Option<Op> {
    if autograd::is_grad_enabled() && inputs.iter().any(|t| t.tracks_grad()) {
        Some(make_op())
    } else {
        None
    }
}
