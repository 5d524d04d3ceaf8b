//! PyTorch's default parameter initialisation.
//!
//! `nn.Conv2d` and `nn.Linear` call `kaiming_uniform_(w, a=sqrt(5))`, which with
//! `gain = sqrt(2 / (1 + a^2))` gives the bound `gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)`,
//! and draw the bias from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. BatchNorm starts at weight 1,
//! bias 0. The numbers come from convnet's seeded generator, so the distribution matches
//! PyTorch but not its bit stream.

use crate::error::{invalid, Result};
use crate::rng::with_global_rng;
use crate::shape::Shape;
use crate::tensor::Tensor;
use std::cell::Cell;

/// The most parameters (and BatchNorm buffers) one model may have: 2^30, 4 GiB of
/// float32 — ten times the largest torchvision classifier. Model files, checkpoints and
/// data-sized zoo models are built under this limit, so that a description asking for an
/// absurd layer fails before anything is allocated.
pub const MAX_PARAMETERS: usize = 1 << 30;

thread_local! {
    /// Parameters the model being built on this thread may still allocate.
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Runs `f` (which builds a model) allowing its layers at most `limit` parameters and
/// buffers in all: a layer that would pass it fails before allocating, with an error
/// saying how many it needed. Outside such a scope each tensor alone is held to
/// [`MAX_PARAMETERS`].
///
/// ```
/// use convnet::nn::{with_parameter_limit, Linear};
/// assert!(with_parameter_limit(1000, || Linear::new(100, 100)).is_err());
/// assert!(with_parameter_limit(20_000, || Linear::new(100, 100)).is_ok());
/// ```
pub fn with_parameter_limit<R>(limit: usize, f: impl FnOnce() -> R) -> R {
    /// The enclosing scope's budget and this scope's starting one: on leaving, the
    /// enclosing budget pays for what this scope used.
    struct Restore(Option<usize>, usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.with(|b| {
                let used = self.1 - b.get().unwrap_or(0).min(self.1);
                b.set(self.0.map(|outer| outer.saturating_sub(used)));
            });
        }
    }
    let outer = BUDGET.with(Cell::get);
    // A scope never allows more than the one it is in.
    let start = outer.map_or(limit, |o| o.min(limit));
    BUDGET.with(|b| b.set(Some(start)));
    let _restore = Restore(outer, start);
    f()
}

/// Takes a tensor of `dims` from the parameter budget before it is allocated; `what` names
/// the layer kind in the error. Returns the element count.
pub(crate) fn claim(what: &'static str, dims: &[usize]) -> Result<usize> {
    let n = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_PARAMETERS);
    let Some(n) = n else {
        return Err(invalid(
            what,
            format!(
                "a {} tensor is more than the {MAX_PARAMETERS} parameters (4 GiB of float32) a model may have",
                dims.iter().map(usize::to_string).collect::<Vec<_>>().join(" x ")
            ),
        ));
    };
    BUDGET.with(|b| match b.get() {
        Some(left) if n > left => Err(invalid(
            what,
            format!(
                "its {} tensor ({n} values) does not fit in what is left of the model's parameter limit ({left} of {})",
                dims.iter().map(usize::to_string).collect::<Vec<_>>().join(" x "),
                MAX_PARAMETERS
            ),
        )),
        Some(left) => {
            b.set(Some(left - n));
            Ok(n)
        }
        None => Ok(n),
    })
}

/// `kaiming_uniform_(a = sqrt(5))` for a weight with the given `fan_in`, from the global
/// generator; returns a trainable leaf.
///
/// ```
/// let w = convnet::nn::kaiming_uniform([16, 27], 27);
/// let bound = 1.0 / 27f32.sqrt();
/// assert!(w.to_vec().iter().all(|v| v.abs() <= bound));
/// ```
pub fn kaiming_uniform(shape: impl Into<Shape>, fan_in: usize) -> Tensor {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let bound = (gain * (3.0 / fan_in.max(1) as f64).sqrt()) as f32;
    with_global_rng(|r| Tensor::rand_uniform(shape, -bound, bound, r)).requires_grad()
}

/// Bias drawn from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`; returns a trainable leaf.
pub fn uniform_bias(len: usize, fan_in: usize) -> Tensor {
    let bound = if fan_in > 0 {
        1.0 / (fan_in as f32).sqrt()
    } else {
        0.0
    };
    with_global_rng(|r| Tensor::rand_uniform([len], -bound, bound, r)).requires_grad()
}
