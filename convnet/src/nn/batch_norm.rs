//! `nn.BatchNorm2d` and `nn.BatchNorm1d`: one [`BatchNormState`] (parameters, running
//! statistics, batch counter and the two switches a training loop sets) behind each.

use super::{init, Mode, Module, TensorRole};
use crate::error::{invalid, shape_mismatch, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::shape::Shape;
use crate::tensor::Tensor;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a `state_dict` entry is a BatchNorm batch counter (`num_batches_tracked`): an
/// integer in PyTorch's files, host-side bookkeeping here, never read by a kernel.
pub(crate) fn is_batch_counter(name: &str) -> bool {
    name.ends_with("num_batches_tracked")
}

/// What [`BatchNorm2d`] and [`BatchNorm1d`] hold, with PyTorch's names and defaults (eps
/// 1e-5, momentum 0.1); both layers dereference to it, so `bn.weight` or
/// `bn.keep_eval(true)` reads the same on either.
pub struct BatchNormState {
    /// Scale (gamma), initialised to 1.
    pub weight: Tensor,
    /// Shift (beta), initialised to 0.
    pub bias: Tensor,
    /// Running mean, initialised to 0.
    pub running_mean: Tensor,
    /// Running variance, initialised to 1.
    pub running_var: Tensor,
    /// Number of training batches seen (stored as a float scalar).
    pub num_batches_tracked: Tensor,
    /// Added to the variance.
    pub eps: f32,
    /// Weight of the new batch statistics in the running averages.
    pub momentum: f32,
    /// Runs as in eval mode even in a training forward pass (a frozen layer of a model
    /// being fine-tuned): see [`BatchNormState::keep_eval`].
    keep_eval: AtomicBool,
    /// Running statistics are the plain mean over the batches counted since they were
    /// reset, as PyTorch's `momentum=None`: see [`BatchNormState::average_cumulatively`].
    cumulative: AtomicBool,
}

impl BatchNormState {
    fn new(kind: &'static str, num_features: usize) -> Result<BatchNormState> {
        if num_features == 0 {
            return Err(invalid(kind, "num_features must be positive"));
        }
        // weight, bias, running mean and variance.
        init::claim(kind, &[4, num_features])?;
        Ok(BatchNormState {
            weight: Tensor::ones([num_features]).requires_grad(),
            bias: Tensor::zeros([num_features]).requires_grad(),
            running_mean: Tensor::zeros([num_features]),
            running_var: Tensor::ones([num_features]),
            num_batches_tracked: Tensor::scalar(0.0),
            eps: 1e-5,
            momentum: 0.1,
            keep_eval: AtomicBool::new(false),
            cumulative: AtomicBool::new(false),
        })
    }

    /// Keeps this layer in eval mode during training (`true`) or lets it follow the
    /// forward pass's mode again (`false`): a frozen BatchNorm of a model being fine-tuned
    /// normalises with its running statistics, which stay as they are, and counts no
    /// batches — what `bn.eval()` on a module of a model in train mode does in PyTorch.
    ///
    /// ```
    /// use convnet::nn::{BatchNorm1d, BatchNorm2d, Mode, Module};
    /// let bn = BatchNorm2d::new(2)?;
    /// bn.keep_eval(true);
    /// let x = convnet::Tensor::randn([4, 2, 3, 3], &mut convnet::Rng::new(0));
    /// bn.forward(&x, Mode::Train)?;
    /// assert_eq!(bn.running_mean.to_vec(), [0.0, 0.0]);
    /// assert_eq!(bn.num_batches_tracked.item()?, 0.0);
    ///
    /// let bn = BatchNorm1d::new(2)?;
    /// bn.keep_eval(true);
    /// let x = convnet::Tensor::from_vec(vec![1.0, 2.0, 3.0, 5.0], [2, 2])?;
    /// assert_eq!(bn.forward(&x, Mode::Train)?.to_vec(), bn.forward(&x, Mode::Eval)?.to_vec());
    /// assert_eq!(bn.running_mean.to_vec(), [0.0, 0.0]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn keep_eval(&self, on: bool) {
        self.keep_eval.store(on, Ordering::Relaxed);
    }

    /// Whether the layer runs in eval mode whatever the forward pass's mode
    /// ([`BatchNormState::keep_eval`]).
    pub fn keeps_eval(&self) -> bool {
        self.keep_eval.load(Ordering::Relaxed)
    }

    /// With `true`, training passes make the running statistics the plain mean of every
    /// batch's statistics since `num_batches_tracked` was last zero (the n-th batch has
    /// weight 1/n), as PyTorch's `momentum=None`; with `false`, the exponential average of
    /// weight `momentum` again. Recomputing the statistics of averaged weights
    /// ([`crate::optim::update_batch_norm`]) uses it.
    ///
    /// ```
    /// use convnet::nn::{BatchNorm2d, Mode, Module};
    /// let bn = BatchNorm2d::new(1)?;
    /// bn.average_cumulatively(true);
    /// for v in [1.0, 3.0, 8.0] {
    ///     bn.forward(&convnet::Tensor::full(v, [2, 1, 1, 1]), Mode::Train)?;
    /// }
    /// // (1 + 3 + 8) / 3, not the exponential average
    /// assert!((bn.running_mean.to_vec()[0] - 4.0).abs() < 1e-6);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn average_cumulatively(&self, on: bool) {
        self.cumulative.store(on, Ordering::Relaxed);
    }

    /// Whether both parameters are frozen (no gradient): the layer then belongs in eval
    /// mode while the rest of its model trains ([`crate::nn::Model::freeze`]).
    pub(crate) fn is_frozen(&self) -> bool {
        !self.weight.tracks_grad() && !self.bias.tracks_grad()
    }

    /// Runs one forward pass through `norm(x, mean, var, weight, bias, training, momentum,
    /// eps)` in the mode this layer takes for `mode`, and counts the batch when it trains.
    fn run(
        &self,
        mode: Mode,
        norm: impl FnOnce(
            &Tensor,
            &Tensor,
            Option<&Tensor>,
            Option<&Tensor>,
            bool,
            f32,
            f32,
        ) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let train = !self.keeps_eval() && mode.is_train();
        // The weight of this batch's statistics in the running averages: `momentum`, or
        // 1/n for the n-th batch counted when the layer averages cumulatively.
        let momentum = if self.cumulative.load(Ordering::Relaxed) {
            1.0 / (self.num_batches_tracked.item()? + 1.0)
        } else {
            self.momentum
        };
        let y = norm(
            &self.running_mean,
            &self.running_var,
            Some(&self.weight),
            Some(&self.bias),
            train,
            momentum,
            self.eps,
        )?;
        if train {
            self.num_batches_tracked.update_data(|n| n[0] += 1.0)?;
        }
        Ok(y)
    }

    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        for (name, t, role) in [
            ("weight", &self.weight, TensorRole::Parameter),
            ("bias", &self.bias, TensorRole::Parameter),
            ("running_mean", &self.running_mean, TensorRole::Buffer),
            ("running_var", &self.running_var, TensorRole::Buffer),
            (
                "num_batches_tracked",
                &self.num_batches_tracked,
                TensorRole::Buffer,
            ),
        ] {
            f(super::join(prefix, name), t, role);
        }
    }

    /// The graph op's fields, in `Op::BatchNorm2d`'s and `Op::BatchNorm1d`'s order.
    fn op_fields(&self) -> (Tensor, Tensor, Tensor, Tensor, f32, f32, Tensor) {
        (
            self.weight.clone(),
            self.bias.clone(),
            self.running_mean.clone(),
            self.running_var.clone(),
            self.eps,
            self.momentum,
            self.num_batches_tracked.clone(),
        )
    }
}

/// The [`BatchNormState`] of a layer that is a [`BatchNorm2d`] or a [`BatchNorm1d`].
pub(crate) fn batch_norm_state(layer: &dyn Module) -> Option<&BatchNormState> {
    let any = layer.as_any()?;
    any.downcast_ref::<BatchNorm2d>()
        .map(|bn| &bn.0)
        .or_else(|| any.downcast_ref::<BatchNorm1d>().map(|bn| &bn.0))
}

// ----- BatchNorm2d ----------------------------------------------------------------------------

/// `nn.BatchNorm2d(C)` with eps 1e-5 and momentum 0.1 over `[N, C, H, W]`: parameters
/// `weight`, `bias`; buffers `running_mean`, `running_var`, `num_batches_tracked` (fields of
/// its [`BatchNormState`]).
///
/// ```
/// use convnet::nn::{BatchNorm2d, Mode, Module};
/// let bn = BatchNorm2d::new(3)?;
/// let x = convnet::Tensor::randn([4, 3, 5, 5], &mut convnet::Rng::new(0));
/// assert_eq!(bn.forward(&x, Mode::Train)?.dims(), &[4, 3, 5, 5]);
/// assert_eq!(bn.num_batches_tracked.to_vec(), vec![1.0]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct BatchNorm2d(BatchNormState);

impl BatchNorm2d {
    /// Batch norm over `num_features` channels with PyTorch's defaults.
    pub fn new(num_features: usize) -> Result<BatchNorm2d> {
        BatchNormState::new("BatchNorm2d", num_features).map(BatchNorm2d)
    }

    /// `relu(self.forward(x))` as one fused op ([`Tensor::batch_norm2d_relu`]).
    pub fn forward_relu(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.0.run(mode, |m, v, w, b, t, mo, e| {
            x.batch_norm2d_relu(m, v, w, b, t, mo, e)
        })
    }

    /// `relu(self.forward(x) + residual)` as one fused op
    /// ([`Tensor::batch_norm2d_add_relu`]): the end of a residual block.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor, mode: Mode) -> Result<Tensor> {
        self.0.run(mode, |m, v, w, b, t, mo, e| {
            x.batch_norm2d_add_relu(residual, m, v, w, b, t, mo, e)
        })
    }
}

impl Deref for BatchNorm2d {
    type Target = BatchNormState;
    fn deref(&self) -> &BatchNormState {
        &self.0
    }
}

impl DerefMut for BatchNorm2d {
    fn deref_mut(&mut self) -> &mut BatchNormState {
        &mut self.0
    }
}

impl Module for BatchNorm2d {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.0.run(mode, |m, v, w, b, t, mo, e| {
            x.batch_norm2d(m, v, w, b, t, mo, e)
        })
    }
    fn kind(&self) -> &'static str {
        "BatchNorm2d"
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        let (weight, bias, mean, var, eps, momentum, batches) = self.0.op_fields();
        let op = Op::BatchNorm2d {
            weight,
            bias,
            mean,
            var,
            eps,
            momentum,
            batches,
        };
        super::push_leaf(self, path, op, input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let c = self.weight.numel();
        if input.len() != 4 || input[1] != c {
            return Err(shape_mismatch(
                "batch_norm2d",
                format!("input [N, {c}, H, W]"),
                Shape::from(input).to_string(),
            ));
        }
        Ok(Shape::from(input))
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        self.0.visit_tensors(prefix, f)
    }
}

// ----- BatchNorm1d ----------------------------------------------------------------------------

/// `nn.BatchNorm1d(C)` with eps 1e-5 and momentum 0.1 over `[N, C]` or `[N, C, L]`:
/// parameters `weight`, `bias`; buffers `running_mean`, `running_var`,
/// `num_batches_tracked` (fields of its [`BatchNormState`]).
///
/// ```
/// use convnet::nn::{BatchNorm1d, Mode, Module};
/// let bn = BatchNorm1d::new(3)?;
/// let x = convnet::Tensor::randn([4, 3, 5], &mut convnet::Rng::new(0));
/// assert_eq!(bn.forward(&x, Mode::Train)?.dims(), &[4, 3, 5]);
/// assert_eq!(bn.num_batches_tracked.to_vec(), vec![1.0]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct BatchNorm1d(BatchNormState);

impl BatchNorm1d {
    /// Batch norm over `num_features` channels with PyTorch's defaults.
    pub fn new(num_features: usize) -> Result<BatchNorm1d> {
        BatchNormState::new("BatchNorm1d", num_features).map(BatchNorm1d)
    }
}

impl Deref for BatchNorm1d {
    type Target = BatchNormState;
    fn deref(&self) -> &BatchNormState {
        &self.0
    }
}

impl DerefMut for BatchNorm1d {
    fn deref_mut(&mut self) -> &mut BatchNormState {
        &mut self.0
    }
}

impl Module for BatchNorm1d {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.0.run(mode, |m, v, w, b, t, mo, e| {
            x.batch_norm1d(m, v, w, b, t, mo, e)
        })
    }
    fn kind(&self) -> &'static str {
        "BatchNorm1d"
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        let (weight, bias, mean, var, eps, momentum, batches) = self.0.op_fields();
        let op = Op::BatchNorm1d {
            weight,
            bias,
            mean,
            var,
            eps,
            momentum,
            batches,
        };
        super::push_leaf(self, path, op, input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let c = self.weight.numel();
        if !matches!(input.len(), 2 | 3) || input[1] != c {
            return Err(shape_mismatch(
                "batch_norm1d",
                format!("input [N, {c}] or [N, {c}, L]"),
                Shape::from(input).to_string(),
            ));
        }
        Ok(Shape::from(input))
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        self.0.visit_tensors(prefix, f)
    }
}
