//! Learning-rate schedules with `torch.optim.lr_scheduler` semantics, in closed form: the
//! rate after `k` calls of the scheduler's `step()` is `lr_at(k)`.

use super::Optimizer;
use crate::error::{invalid, Result};
use std::f64::consts::PI;

/// A learning-rate (and optionally momentum) schedule indexed by scheduler step.
pub trait LrSchedule: Send + Sync {
    /// Learning rate after `step` scheduler steps (`step = 0` is the initial rate).
    fn lr_at(&self, step: usize) -> f64;

    /// Momentum after `step` steps, for schedules that cycle it (one-cycle).
    fn momentum_at(&self, step: usize) -> Option<f64> {
        let _ = step;
        None
    }

    /// Sets the optimizer's rate (and momentum) for `step`.
    fn apply(&self, opt: &mut dyn Optimizer, step: usize) {
        opt.set_lr(self.lr_at(step));
        if let Some(m) = self.momentum_at(step) {
            opt.set_momentum(m);
        }
    }
}

/// A constant rate.
#[derive(Clone, Copy, Debug)]
pub struct ConstantLr(pub f64);

impl LrSchedule for ConstantLr {
    fn lr_at(&self, _step: usize) -> f64 {
        self.0
    }
}

/// `StepLR`: multiply by `gamma` every `step_size` steps.
#[derive(Clone, Copy, Debug)]
pub struct StepLr {
    base_lr: f64,
    step_size: usize,
    gamma: f64,
}

impl StepLr {
    /// `StepLR(optimizer, step_size, gamma)` for an initial rate `base_lr`.
    pub fn new(base_lr: f64, step_size: usize, gamma: f64) -> Result<Self> {
        if step_size == 0 {
            return Err(invalid("StepLR", "step_size must be positive"));
        }
        Ok(StepLr {
            base_lr,
            step_size,
            gamma,
        })
    }
}

impl LrSchedule for StepLr {
    fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.gamma.powi((step / self.step_size) as i32)
    }
}

/// `MultiStepLR`: multiply by `gamma` at each milestone.
#[derive(Clone, Debug)]
pub struct MultiStepLr {
    base_lr: f64,
    milestones: Vec<usize>,
    gamma: f64,
}

impl MultiStepLr {
    /// `MultiStepLR(optimizer, milestones, gamma)`.
    pub fn new(base_lr: f64, milestones: Vec<usize>, gamma: f64) -> Self {
        MultiStepLr {
            base_lr,
            milestones,
            gamma,
        }
    }
}

impl LrSchedule for MultiStepLr {
    fn lr_at(&self, step: usize) -> f64 {
        let passed = self.milestones.iter().filter(|&&m| m <= step).count();
        self.base_lr * self.gamma.powi(passed as i32)
    }
}

/// `CosineAnnealingLR`: `eta_min + (base - eta_min) * (1 + cos(pi * k / t_max)) / 2`.
#[derive(Clone, Copy, Debug)]
pub struct CosineAnnealingLr {
    base_lr: f64,
    t_max: usize,
    eta_min: f64,
}

impl CosineAnnealingLr {
    /// `CosineAnnealingLR(optimizer, T_max, eta_min)`.
    pub fn new(base_lr: f64, t_max: usize, eta_min: f64) -> Result<Self> {
        if t_max == 0 {
            return Err(invalid("CosineAnnealingLR", "T_max must be positive"));
        }
        Ok(CosineAnnealingLr {
            base_lr,
            t_max,
            eta_min,
        })
    }
}

impl LrSchedule for CosineAnnealingLr {
    fn lr_at(&self, step: usize) -> f64 {
        self.eta_min
            + (self.base_lr - self.eta_min) * (1.0 + (PI * step as f64 / self.t_max as f64).cos())
                / 2.0
    }
}

/// `OneCycleLR` (two phases, cosine annealing, momentum cycled between `base_momentum` and
/// `max_momentum`), with PyTorch's defaults available through [`OneCycleLr::new`].
#[derive(Clone, Copy, Debug)]
pub struct OneCycleLr {
    max_lr: f64,
    total_steps: usize,
    pct_start: f64,
    div_factor: f64,
    final_div_factor: f64,
    base_momentum: f64,
    max_momentum: f64,
}

impl OneCycleLr {
    /// `OneCycleLR(optimizer, max_lr, total_steps)` with `pct_start=0.3`, `div_factor=25`,
    /// `final_div_factor=1e4`, momentum cycled 0.95 -> 0.85 -> 0.95.
    pub fn new(max_lr: f64, total_steps: usize) -> Result<Self> {
        OneCycleLr::with(max_lr, total_steps, 0.3, 25.0, 1e4, (0.85, 0.95))
    }

    /// All settings.
    pub fn with(
        max_lr: f64,
        total_steps: usize,
        pct_start: f64,
        div_factor: f64,
        final_div_factor: f64,
        momentum: (f64, f64),
    ) -> Result<Self> {
        if total_steps < 2 || !(0.0..=1.0).contains(&pct_start) {
            return Err(invalid("OneCycleLR", format!("need total_steps >= 2 and pct_start in [0, 1], got {total_steps} and {pct_start}")));
        }
        Ok(OneCycleLr {
            max_lr,
            total_steps,
            pct_start,
            div_factor,
            final_div_factor,
            base_momentum: momentum.0,
            max_momentum: momentum.1,
        })
    }

    fn phase(&self, step: usize) -> (f64, usize) {
        let warm_end = self.pct_start * self.total_steps as f64 - 1.0;
        let last = (self.total_steps - 1) as f64;
        let k = step as f64;
        if k <= warm_end {
            (k / warm_end, 0)
        } else {
            ((k - warm_end) / (last - warm_end), 1)
        }
    }

    fn anneal(start: f64, end: f64, pct: f64) -> f64 {
        end + (start - end) / 2.0 * ((PI * pct).cos() + 1.0)
    }
}

impl LrSchedule for OneCycleLr {
    fn lr_at(&self, step: usize) -> f64 {
        let initial = self.max_lr / self.div_factor;
        let min_lr = initial / self.final_div_factor;
        match self.phase(step) {
            (pct, 0) => Self::anneal(initial, self.max_lr, pct),
            (pct, _) => Self::anneal(self.max_lr, min_lr, pct),
        }
    }
    fn momentum_at(&self, step: usize) -> Option<f64> {
        Some(match self.phase(step) {
            (pct, 0) => Self::anneal(self.max_momentum, self.base_momentum, pct),
            (pct, _) => Self::anneal(self.base_momentum, self.max_momentum, pct),
        })
    }
}

/// Linear warm-up, `LinearLR(start_factor, end_factor=1, total_iters)`: the factor rises
/// linearly from `start_factor` to 1 over `warmup_steps`, then the rate stays at `base_lr`.
#[derive(Clone, Copy, Debug)]
pub struct LinearWarmup {
    base_lr: f64,
    start_factor: f64,
    warmup_steps: usize,
}

impl LinearWarmup {
    /// Warm-up from `base_lr * start_factor` to `base_lr`.
    pub fn new(base_lr: f64, start_factor: f64, warmup_steps: usize) -> Result<Self> {
        if !(start_factor > 0.0 && start_factor <= 1.0) || warmup_steps == 0 {
            return Err(invalid("LinearLR", format!("start_factor must be in (0, 1] and total_iters positive, got {start_factor} and {warmup_steps}")));
        }
        Ok(LinearWarmup {
            base_lr,
            start_factor,
            warmup_steps,
        })
    }
}

impl LrSchedule for LinearWarmup {
    fn lr_at(&self, step: usize) -> f64 {
        let t = step.min(self.warmup_steps) as f64 / self.warmup_steps as f64;
        self.base_lr * (self.start_factor + (1.0 - self.start_factor) * t)
    }
}
