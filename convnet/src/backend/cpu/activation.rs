//! Pointwise activations and their derivatives, mirroring `torch.relu`, `relu6`, `leaky_relu`,
//! `sigmoid`, `tanh` and `gelu` (exact erf form and the tanh approximation).
//!
//! Backward kernels receive the forward input `x` and/or output `y`, whichever the
//! derivative is cheapest in (sigmoid and tanh use `y`).

use super::PAR_MIN_ELEMS;
use rayon::prelude::*;

/// A pointwise activation function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x` if positive else `slope * x`.
    LeakyRelu(f32),
    /// `min(max(x, 0), 6)` (`nn.ReLU6`, a `hardtanh(0, 6)`).
    Relu6,
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
    /// `x * Phi(x)` with the exact normal CDF.
    Gelu,
    /// GELU with PyTorch's `approximate="tanh"` formula.
    GeluTanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl Activation {
    /// `f(x)`.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => {
                if x > 0.0 || x.is_nan() {
                    x
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu(s) => {
                if x > 0.0 {
                    x
                } else {
                    x * s
                }
            }
            Activation::Relu6 => {
                if x.is_nan() {
                    x
                } else {
                    x.clamp(0.0, 6.0)
                }
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                let inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + inner.tanh())
            }
        }
    }

    /// `f'(x)` expressed through the input `x` and output `y`.
    #[inline]
    pub fn derivative(self, x: f32, y: f32) -> f32 {
        match self {
            Activation::Relu => {
                if y > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu(s) => {
                if x > 0.0 {
                    1.0
                } else {
                    s
                }
            }
            Activation::Relu6 => {
                if x > 0.0 && x < 6.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Sigmoid => y * (1.0 - y),
            Activation::Tanh => 1.0 - y * y,
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + libm::erff(x * FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * x * x).exp();
                cdf + x * pdf
            }
            Activation::GeluTanh => {
                let x2 = x * x;
                let inner = SQRT_2_OVER_PI * (x + 0.044715 * x2 * x);
                let t = inner.tanh();
                let d_inner = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x2);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
            }
        }
    }

    /// Name as in PyTorch's `torch.nn` class.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "ReLU",
            Activation::LeakyRelu(_) => "LeakyReLU",
            Activation::Relu6 => "ReLU6",
            Activation::Sigmoid => "Sigmoid",
            Activation::Tanh => "Tanh",
            Activation::Gelu | Activation::GeluTanh => "GELU",
        }
    }
}

/// `y = f(x)` elementwise (ReLU gets a branch-free loop of its own).
pub fn forward(act: Activation, x: &[f32], y: &mut [f32]) {
    if act == Activation::Relu {
        let body = |yc: &mut [f32], xc: &[f32]| {
            yc.iter_mut()
                .zip(xc)
                .for_each(|(o, &i)| *o = if i > 0.0 || i.is_nan() { i } else { 0.0 })
        };
        if x.len() >= PAR_MIN_ELEMS {
            y.par_chunks_mut(PAR_MIN_ELEMS / 4)
                .zip(x.par_chunks(PAR_MIN_ELEMS / 4))
                .for_each(|(yc, xc)| body(yc, xc));
        } else {
            body(y, x);
        }
        return;
    }
    if x.len() >= PAR_MIN_ELEMS {
        y.par_chunks_mut(PAR_MIN_ELEMS / 4)
            .zip(x.par_chunks(PAR_MIN_ELEMS / 4))
            .for_each(|(yc, xc)| yc.iter_mut().zip(xc).for_each(|(o, &i)| *o = act.apply(i)));
    } else {
        y.iter_mut().zip(x).for_each(|(o, &i)| *o = act.apply(i));
    }
}

/// `dx = dy * f'(x)` elementwise (ReLU gets a branch-free loop of its own).
pub fn backward(act: Activation, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
    if act == Activation::Relu {
        let body = |dxc: &mut [f32], yc: &[f32], dyc: &[f32]| {
            for ((d, &y), &g) in dxc.iter_mut().zip(yc).zip(dyc) {
                *d = if y > 0.0 { g } else { 0.0 };
            }
        };
        if x.len() >= PAR_MIN_ELEMS {
            let c = PAR_MIN_ELEMS / 4;
            dx.par_chunks_mut(c)
                .zip(y.par_chunks(c))
                .zip(dy.par_chunks(c))
                .for_each(|((dxc, yc), dyc)| body(dxc, yc, dyc));
        } else {
            body(dx, y, dy);
        }
        return;
    }
    let body = |dxc: &mut [f32], xc: &[f32], yc: &[f32], dyc: &[f32]| {
        for (((d, &x), &y), &g) in dxc.iter_mut().zip(xc).zip(yc).zip(dyc) {
            *d = g * act.derivative(x, y);
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        let c = PAR_MIN_ELEMS / 4;
        dx.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .zip(y.par_chunks(c))
            .zip(dy.par_chunks(c))
            .for_each(|(((dxc, xc), yc), dyc)| body(dxc, xc, yc, dyc));
    } else {
        body(dx, x, y, dy);
    }
}
