//! Optimizers and learning-rate schedules with `torch.optim` semantics.
//!
//! An optimizer owns named parameters (the names of `state_dict`) and per-parameter state
//! named `<param>.<slot>` (`fc1.weight.momentum_buffer`, `fc1.weight.exp_avg`, ...), so that
//! the state can be saved beside a checkpoint and restored. The update of each parameter is
//! one fused in-place pass (`backend::cpu::optim`).

mod adam;
mod schedule;
mod sgd;

pub use adam::{Adam, AdamConfig};
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

/// True for `v >= 0` (false for NaN): the check every rate and decay must pass.
/// A hyperparameter that is a number, not negative and not infinite.
pub(crate) fn non_negative(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

/// Finds `name` in a saved state list.
pub(crate) fn lookup<'a>(state: &'a [(String, Tensor)], name: &str) -> Option<&'a Tensor> {
    state.iter().find(|(n, _)| n == name).map(|(_, t)| t)
}
