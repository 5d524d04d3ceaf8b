//! PyTorch's default parameter initialisation.
//!
//! `nn.Conv2d` and `nn.Linear` call `kaiming_uniform_(w, a=sqrt(5))`, which with
//! `gain = sqrt(2 / (1 + a^2))` gives the bound `gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in)`,
//! and draw the bias from `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. BatchNorm starts at weight 1,
//! bias 0. The numbers come from convnet's seeded generator, so the distribution matches
//! PyTorch but not its bit stream.

use crate::rng::with_global_rng;
use crate::shape::Shape;
use crate::tensor::Tensor;

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
