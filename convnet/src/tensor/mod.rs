//! The `Tensor` handle: storage + layout + the op that produced it.
//!
//! A `Tensor` is cheap to clone (an `Arc`). Views (`reshape` of contiguous data, `permute`)
//! share storage; kernels always receive contiguous row-major data, obtained through
//! [`Tensor::with_data`] or [`Tensor::to_vec`], and never guess a layout from strides.
//! User-facing ops live in the submodules: they validate their inputs, run a kernel from
//! `backend::cpu` (or `backend::cuda` when the operands live on a GPU), and record an `Op`
//! for autograd when a gradient is needed.

mod conv;
mod elementwise;
mod loss;
mod norm;
mod pool;
mod reduce;
mod seq;
mod view;

pub use conv::Conv2dParams;
pub use loss::Reduction;
pub use pool::{AvgPool2dParams, MaxPool2dParams};
pub use seq::{adaptive_pool1d_output_shape, AvgPool1dParams, Conv1dParams, MaxPool1dParams};

use crate::autograd::{self, Op};
use crate::device::Device;
use crate::error::{invalid, shape_mismatch, Result};
use crate::rng::Rng;
use crate::shape::Shape;
use crate::storage::{DType, Storage};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Whether gradients flow to this tensor; a leaf's can be switched off and on again
    /// ([`Tensor::set_requires_grad`]: freezing a parameter for fine-tuning).
    requires_grad: AtomicBool,
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

    /// A copy of the tensor on `device` (the same tensor when it is already there), cut off
    /// from the graph but keeping whether it requires a gradient. With the `cuda` feature,
    /// `Device::Cuda(n)` uploads to GPU `n`; without it, asking for a GPU is an error.
    ///
    /// ```
    /// use convnet::{Device, Tensor};
    /// let x = Tensor::ones([2, 2]);
    /// assert_eq!(x.to_device(Device::Cpu)?.device(), Device::Cpu);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        device.ensure_supported()?;
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = self.storage_on(device)?;
        let shape = self.shape().clone();
        let t = Tensor::from_storage(storage, shape, None);
        Ok(if self.tracks_grad() {
            t.requires_grad()
        } else {
            t
        })
    }

    /// Moves this tensor's storage to `device` in place: every handle sharing the storage
    /// (a layer's parameter and the optimizer's view of it) sees the move. The tensor must
    /// own its whole storage contiguously, as parameters and buffers do.
    pub fn move_to_device(&self, device: Device) -> Result<()> {
        device.ensure_supported()?;
        if self.device() == device {
            return Ok(());
        }
        let whole = read(&self.0.storage).len();
        if !self.is_contiguous() || self.0.offset != 0 || whole.max(1) != self.numel().max(1) {
            return Err(invalid(
                "move_to_device",
                "only a tensor that owns its whole storage (a parameter or buffer) can be moved in place; use to_device for views",
            ));
        }
        let storage = self.storage_on(device)?;
        *write(&self.0.storage) = storage;
        Ok(())
    }

    /// This tensor's elements in a new storage on `device`.
    fn storage_on(&self, device: Device) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(self.try_to_vec()?)),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let buf = match self.device() {
                    // Straight from the host elements (no intermediate copy).
                    Device::Cpu => self.with_data(|host| {
                        crate::backend::cuda::runtime::with(n, |rt| rt.upload(host))
                    })?,
                    Device::Cuda(_) => {
                        let host = self.try_to_vec()?;
                        crate::backend::cuda::runtime::with(n, |rt| rt.upload(&host))?
                    }
                };
                Ok(Storage::Cuda(buf))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(crate::error::Error::CudaNotBuilt),
        }
    }

    /// Builds a contiguous tensor over `storage`; `op` is recorded only if it is `Some`.
    pub(crate) fn from_storage(storage: Storage, shape: Shape, op: Option<Op>) -> Tensor {
        let strides = shape.contiguous_strides();
        let requires_grad = op.is_some();
        Tensor(Arc::new(Inner {
            id: TensorId::fresh(),
            storage: Arc::new(RwLock::new(storage)),
            shape,
            strides,
            offset: 0,
            op,
            requires_grad: AtomicBool::new(requires_grad),
        }))
    }

    /// Runs `f` on this tensor's storage (locked for writing) and its offset.
    #[cfg(feature = "cuda")]
    pub(crate) fn with_storage_mut<R>(&self, f: impl FnOnce(&mut Storage, usize) -> R) -> R {
        let mut guard = write(&self.0.storage);
        f(&mut guard, self.0.offset)
    }

    /// The device address of this view's first element and its strides (any layout), for
    /// the strided CUDA kernels; fails unless the tensor is on a GPU.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_view(&self, op: &'static str) -> Result<(u64, Vec<usize>)> {
        let guard = read(&self.0.storage);
        match &*guard {
            Storage::Cuda(b) => Ok((b.ptr(self.0.offset), self.0.strides.clone())),
            other => Err(crate::error::Error::DeviceMismatch {
                op,
                a: "cuda".into(),
                b: other.device().to_string(),
            }),
        }
    }

    /// The device address of this tensor's first element, for CUDA kernels; fails unless the
    /// tensor is contiguous and on a GPU. The address stays valid while `self` is alive.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_ptr(&self, op: &'static str) -> Result<u64> {
        let guard = read(&self.0.storage);
        match &*guard {
            Storage::Cuda(b) if self.is_contiguous() => Ok(b.ptr(self.0.offset)),
            Storage::Cuda(_) => Err(crate::error::Error::Unsupported(format!(
                "{op}: non-contiguous tensors on a GPU are not supported; call contiguous() on the CPU first"
            ))),
            other => Err(crate::error::Error::DeviceMismatch {
                op,
                a: "cuda".into(),
                b: other.device().to_string(),
            }),
        }
    }

    /// Builds a contiguous result tensor; `op` is recorded only if it is `Some`.
    pub(crate) fn from_parts(data: Vec<f32>, shape: Shape, op: Option<Op>) -> Tensor {
        Tensor::from_storage(Storage::Cpu(data), shape, op)
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
            requires_grad: AtomicBool::new(requires_grad),
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
            requires_grad: AtomicBool::new(requires_grad),
        }))
    }

    /// Whether gradients flow to this tensor.
    pub fn tracks_grad(&self) -> bool {
        self.0.requires_grad.load(Ordering::Relaxed)
    }

    /// Turns gradient tracking of this leaf on or off in place, for every handle of it
    /// (PyTorch's `requires_grad_`): a frozen parameter is left out of the graphs recorded
    /// from now on, so backward computes no gradient for it (nor, when nothing before it is
    /// trained, for the layers it feeds from). Only leaves can be switched; switch between
    /// steps, not while a recorded graph still waits for its backward pass.
    ///
    /// ```
    /// use convnet::Tensor;
    /// let w = Tensor::ones([2]).requires_grad();
    /// let x = Tensor::ones([2]).requires_grad();
    /// w.set_requires_grad(false)?;
    /// let grads = w.mul(&x)?.sum_all()?.backward()?;
    /// assert!(grads.get(&w).is_none() && grads.get(&x).is_some());
    /// assert!(x.relu()?.set_requires_grad(false).is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn set_requires_grad(&self, on: bool) -> Result<()> {
        if !self.is_leaf() {
            return Err(invalid(
                "set_requires_grad",
                "only leaves (parameters and inputs) can be switched; detach() a computed tensor instead",
            ));
        }
        self.0.requires_grad.store(on, Ordering::Relaxed);
        Ok(())
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

    /// Like [`Tensor::backward`], telling `hooks` as each leaf's gradient becomes complete and
    /// after each op (data-parallel training reduces gradients while backward still runs).
    ///
    /// ```
    /// use convnet::autograd::BackwardHooks;
    /// use convnet::{Result, Tensor};
    /// struct Count(usize);
    /// impl BackwardHooks for Count {
    ///     fn leaf_ready(&mut self, _leaf: &Tensor, _grad: &Tensor) -> Result<()> {
    ///         self.0 += 1;
    ///         Ok(())
    ///     }
    /// }
    /// let (a, b) = (Tensor::ones([3]).requires_grad(), Tensor::ones([3]).requires_grad());
    /// let mut seen = Count(0);
    /// let grads = a.mul(&b)?.sum_all()?.backward_with_hooks(&mut seen)?;
    /// assert_eq!((seen.0, grads.len()), (2, 2));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn backward_with_hooks(
        &self,
        hooks: &mut dyn autograd::BackwardHooks,
    ) -> Result<autograd::GradStore> {
        autograd::backward_observed(self, None, Some(hooks))
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
    ///
    /// For a tensor on a GPU this copies the elements to the host first (waiting for the
    /// device). Should the device have failed, the elements read as NaN and the failure is
    /// reported by the next fallible call on that device ([`Tensor::item`],
    /// [`Tensor::try_to_vec`], any op), since CUDA errors persist in the device's context.
    pub fn with_data<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let guard = read(&self.0.storage);
        let Some(all) = guard.host() else {
            let host = self
                .device_elements(&guard)
                .unwrap_or_else(|_| vec![f32::NAN; self.numel()]);
            drop(guard);
            return f(&host);
        };
        if self.is_contiguous() {
            f(&all[self.0.offset..self.0.offset + self.numel()])
        } else {
            let gathered = self.gather(all);
            drop(guard);
            f(&gathered)
        }
    }

    /// The elements of a device tensor in row-major order, copied to the host.
    fn device_elements(&self, storage: &Storage) -> Result<Vec<f32>> {
        if self.is_contiguous() {
            storage.read_range(self.0.offset, self.numel())
        } else {
            // Copy the span the view covers, then gather from it on the host.
            let span = self.storage_span();
            let all = storage.read_range(0, span)?;
            Ok(self.gather(&all))
        }
    }

    /// One past the largest storage index this view reaches.
    fn storage_span(&self) -> usize {
        if self.numel() == 0 {
            return self.0.offset;
        }
        self.0.offset
            + self
                .dims()
                .iter()
                .zip(&self.0.strides)
                .map(|(d, s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// The elements in row-major order, or the device's error when copying them from a GPU
    /// fails.
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        let guard = read(&self.0.storage);
        match guard.host() {
            Some(_) => {
                drop(guard);
                Ok(self.to_vec())
            }
            None => self.device_elements(&guard),
        }
    }

    fn gather(&self, all: &[f32]) -> Vec<f32> {
        let dims = self.dims();
        let strides = &self.0.strides;
        let mut out = Vec::with_capacity(self.numel());
        if self.numel() == 0 {
            return out;
        }
        let Some((&inner, outer)) = dims.split_last() else {
            out.push(all[self.0.offset]);
            return out;
        };
        // The last dimension in one tight loop (a copy when it is contiguous), the others
        // counted like an odometer.
        let step = strides[outer.len()];
        let mut idx = vec![0usize; outer.len()];
        loop {
            let base: usize =
                self.0.offset + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
            if step == 1 {
                out.extend_from_slice(&all[base..base + inner]);
            } else {
                out.extend((0..inner).map(|i| all[base + i * step]));
            }
            let mut d = outer.len();
            loop {
                if d == 0 {
                    return out;
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < outer[d] {
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
        Ok(self.try_to_vec()?[0])
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
        match guard.host_mut() {
            Some(all) => Ok(f(&mut all[off..off + n])),
            None => {
                // Device storage: edit a host copy and write it back.
                let mut host = guard.read_range(off, n)?;
                let r = f(&mut host);
                guard.write_range(off, &host)?;
                Ok(r)
            }
        }
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

/// The GPU the op runs on when any of `inputs` is on one (all must be on the same device),
/// `None` when all are on the CPU.
pub(crate) fn gpu_of(op: &'static str, inputs: &[&Tensor]) -> Result<Option<usize>> {
    let first = inputs.first().map_or(Device::Cpu, |t| t.device());
    for t in inputs.iter().skip(1) {
        let d = t.device();
        if d != first {
            return Err(crate::error::Error::DeviceMismatch {
                op,
                a: first.to_string(),
                b: d.to_string(),
            });
        }
    }
    Ok(match first {
        Device::Cpu => None,
        Device::Cuda(n) => Some(n),
    })
}

/// Records `make_op()` if gradients are enabled and any of `inputs` tracks a gradient.
pub(crate) fn record(inputs: &[&Tensor], make_op: impl FnOnce() -> Op) -> Option<Op> {
    if autograd::is_grad_enabled() && inputs.iter().any(|t| t.tracks_grad()) {
        Some(make_op())
    } else {
        None
    }
}
