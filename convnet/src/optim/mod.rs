//! Optimizers and learning-rate schedules with `torch.optim` semantics.
//!
//! An optimizer owns named parameters (the names of `state_dict`) and per-parameter state
//! named `<param>.<slot>` (`fc1.weight.momentum_buffer`, `fc1.weight.exp_avg`, ...), so that
//! the state can be saved beside a checkpoint and restored. The update of each parameter is
//! one fused in-place pass (`backend::cpu::optim`). Parameters can be split into
//! [`ParamGroup`]s with their own learning rates (a smaller one for a pretrained backbone).

mod adam;
mod average;
mod schedule;
mod sgd;

pub use adam::{Adam, AdamConfig};
pub(crate) use average::{host_copies, STATE_AVERAGE_PREFIX};
pub use average::{update_batch_norm, Averaging, WeightAverage};
pub use schedule::{
    ConstantLr, CosineAnnealingLr, LinearWarmup, LrSchedule, MultiStepLr, OneCycleLr, StepLr,
};
pub use sgd::{Sgd, SgdConfig};

use crate::autograd::GradStore;
use crate::error::Result;
use crate::tensor::Tensor;

/// Something that updates parameters from their gradients.
pub trait Optimizer {
    /// Applies one update using the gradients in `grads`; parameters without a gradient are
    /// left alone (as PyTorch skips parameters whose `.grad` is `None`).
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// Current learning rate.
    fn lr(&self) -> f64;

    /// Sets the learning rate (schedules call this).
    fn set_lr(&mut self, lr: f64);

    /// Sets the momentum (SGD) or beta1 (Adam); used by one-cycle schedules.
    fn set_momentum(&mut self, momentum: f64);

    /// Named state tensors (`<param>.<slot>`), plus `step` counts where the optimizer keeps them.
    fn state_dict(&self) -> Vec<(String, Tensor)>;

    /// Restores state saved by [`Optimizer::state_dict`].
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()>;

    /// Whether a step of this optimizer on a GPU can be captured in a CUDA graph and
    /// replayed: its hyperparameters are read from device memory that
    /// [`Optimizer::stage_hyperparameters`] fills before each launch. False by default.
    fn supports_step_graphs(&self) -> bool {
        false
    }

    /// Copies the current hyperparameters to where a captured step reads them (before the
    /// first launch of the graph). Nothing to do by default.
    fn stage_hyperparameters(&mut self) -> Result<()> {
        Ok(())
    }

    /// Before each further launch of a captured step: does the host-side bookkeeping the
    /// step's host code would have done (Adam's step counts) and stages the hyperparameters.
    fn advance_for_replay(&mut self) -> Result<()> {
        self.stage_hyperparameters()
    }
}

/// Parameters that share a learning rate (PyTorch's param groups): the group's rate is the
/// optimizer's rate, as [`Optimizer::set_lr`] and the schedules set it, times `lr_scale`, so
/// a schedule moves every group alike (for the schedules here, which scale the peak rate,
/// the same rates PyTorch gives each group from its own initial rate). Everything else is
/// the optimizer's.
///
/// ```
/// use convnet::optim::{Optimizer, ParamGroup, Sgd, SgdConfig};
/// use convnet::Tensor;
/// let (backbone, head) = (Tensor::ones([2]).requires_grad(), Tensor::ones([2]).requires_grad());
/// let groups = vec![
///     ParamGroup::new(vec![("backbone".into(), backbone.clone())]).lr_scale(0.1),
///     ParamGroup::new(vec![("head".into(), head.clone())]),
/// ];
/// let mut sgd = Sgd::with_groups(groups, SgdConfig { lr: 0.5, ..Default::default() })?;
/// let grads = backbone.add(&head)?.sum_all()?.backward()?;
/// sgd.step(&grads)?;
/// assert_eq!((backbone.to_vec()[0], head.to_vec()[0]), (0.95, 0.5));
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// The parameters with their `state_dict` names.
    pub params: Vec<(String, Tensor)>,
    /// This group's rate as a multiple of the optimizer's (1 for the optimizer's own).
    pub lr_scale: f64,
}

impl ParamGroup {
    /// A group at the optimizer's rate.
    pub fn new(params: Vec<(String, Tensor)>) -> Self {
        ParamGroup {
            params,
            lr_scale: 1.0,
        }
    }

    /// The group at `scale` times the optimizer's rate.
    pub fn lr_scale(mut self, scale: f64) -> Self {
        self.lr_scale = scale;
        self
    }
}

/// The groups' rate multipliers and each named parameter with its group's number.
pub(crate) type Flattened = (Vec<f64>, Vec<(String, Tensor, usize)>);

/// The groups' rate multipliers, checked, and each parameter with its group's number.
pub(crate) fn flatten_groups(op: &'static str, groups: Vec<ParamGroup>) -> Result<Flattened> {
    let mut scales = Vec::with_capacity(groups.len());
    let mut params = Vec::new();
    for (g, group) in groups.into_iter().enumerate() {
        if !non_negative(group.lr_scale) {
            return Err(crate::error::invalid(
                op,
                format!(
                    "learning-rate scale {} of parameter group {g} must be finite and non-negative",
                    group.lr_scale
                ),
            ));
        }
        scales.push(group.lr_scale);
        params.extend(group.params.into_iter().map(|(n, t)| (n, t, g)));
    }
    Ok((scales, params))
}

/// True for `v >= 0` (false for NaN): the check every rate and decay must pass.
/// A hyperparameter that is a number, not negative and not infinite.
pub(crate) fn non_negative(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// Finds `name` in a saved state list.
pub(crate) fn lookup<'a>(state: &'a [(String, Tensor)], name: &str) -> Option<&'a Tensor> {
    state.iter().find(|(n, _)| n == name).map(|(_, t)| t)
}
