//! Elementwise ops (broadcasting arithmetic, activations, dropout) and matrix products
//! (`matmul`, `linear`).

use super::{gpu_of, record, Tensor};
use crate::autocast::Precision;
use crate::autograd::Op;
use crate::backend::cpu::activation::{self, Activation};
use crate::backend::cpu::bf16;
use crate::backend::cpu::elementwise::{self as ew, BinaryKind};
use crate::backend::cpu::matmul::{matmul, MatRef, Par};
use crate::error::{invalid, shape_mismatch, Result};
use crate::rng::Rng;
use crate::shape::Shape;

impl Tensor {
    fn binary(&self, rhs: &Tensor, kind: BinaryKind, op_name: &'static str) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("{} {}", op_name, self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                let out_shape = ew::broadcast_shape(self.dims(), rhs.dims()).ok_or_else(|| {
                    shape_mismatch(
                        op_name,
                        format!("a shape broadcastable with {}", self.shape()),
                        rhs.shape().to_string(),
                    )
                })?;
                if let Some(gpu) = gpu_of(op_name, &[self, rhs])? {
                    return on_gpu!(gpu, |g| {
                        if kind == BinaryKind::Add && self.dims() == rhs.dims() {
                            crate::backend::cuda::ops::add(g, self, rhs)
                        } else {
                            crate::backend::cuda::general::binary(
                                g,
                                self,
                                rhs,
                                kind,
                                out_shape.clone(),
                            )
                        }
                    });
                }
                let mut out = vec![0f32; out_shape.iter().product()];
                self.with_data(|a| {
                    rhs.with_data(|b| {
                        ew::binary_forward(
                            kind,
                            a,
                            self.dims(),
                            b,
                            rhs.dims(),
                            &out_shape,
                            &mut out,
                        )
                    })
                });
                let op = record(&[self, rhs], || Op::Binary {
                    kind,
                    lhs: self.clone(),
                    rhs: rhs.clone(),
                });
                Ok(Tensor::from_parts(out, Shape::new(out_shape), op))
            },
        )
    }

    /// `self + rhs` with broadcasting (bias, per-channel shift, residual add).
    ///
    /// ```
    /// use convnet::Tensor;
    /// let x = Tensor::zeros([2, 3, 1, 1]);
    /// let b = Tensor::from_vec(vec![1., 2., 3.], [3, 1, 1])?;
    /// assert_eq!(x.add(&b)?.to_vec(), vec![1., 2., 3., 1., 2., 3.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Add, "add")
    }
    /// `self - rhs` with broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Sub, "sub")
    }
    /// `self * rhs` with broadcasting (per-channel scale).
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Mul, "mul")
    }
    /// `self / rhs` with broadcasting.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryKind::Div, "div")
    }

    /// `self * factor + offset`.
    pub fn affine(&self, factor: f32, offset: f32) -> Result<Tensor> {
        if let Some(gpu) = gpu_of("affine", &[self])? {
            return on_gpu!(gpu, |g| crate::backend::cuda::general::affine(
                g, self, factor, offset
            ));
        }
        let out = self.with_data(|x| x.iter().map(|v| v * factor + offset).collect());
        let op = record(&[self], || Op::Affine {
            input: self.clone(),
            factor,
        });
        Ok(Tensor::from_parts(out, self.shape().clone(), op))
    }

    /// `self * factor`.
    pub fn scale(&self, factor: f32) -> Result<Tensor> {
        self.affine(factor, 0.0)
    }

    /// Applies a pointwise activation.
    pub fn activation(&self, act: Activation) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("{} {}", act.name().to_lowercase(), self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                if let Some(gpu) = gpu_of("activation", &[self])? {
                    return on_gpu!(gpu, |g| crate::backend::cuda::ops::activation(g, self, act));
                }
                // activation::forward writes every element.
                let mut out = crate::backend::cpu::recycle::take_overwritten(self.numel());
                self.with_data(|x| activation::forward(act, x, &mut out));
                let op = record(&[self], || Op::Activation {
                    act,
                    input: self.clone(),
                });
                Ok(Tensor::from_parts(out, self.shape().clone(), op))
            },
        )
    }

    /// `max(x, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        self.activation(Activation::Relu)
    }
    /// `min(max(x, 0), 6)`, as `torch.nn.functional.relu6`.
    pub fn relu6(&self) -> Result<Tensor> {
        self.activation(Activation::Relu6)
    }
    /// Leaky ReLU with the given negative slope (PyTorch default 0.01).
    pub fn leaky_relu(&self, negative_slope: f32) -> Result<Tensor> {
        self.activation(Activation::LeakyRelu(negative_slope))
    }
    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.activation(Activation::Sigmoid)
    }
    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.activation(Activation::Tanh)
    }
    /// GELU (exact erf form, PyTorch's default).
    pub fn gelu(&self) -> Result<Tensor> {
        self.activation(Activation::Gelu)
    }

    /// Dropout: in training, zeroes each element with probability `p` (drawn from `rng`) and
    /// scales the rest by `1/(1-p)`; otherwise the identity, like `F.dropout`.
    pub fn dropout(&self, p: f32, training: bool, rng: &mut Rng) -> Result<Tensor> {
        if !(0.0..=1.0).contains(&p) || p.is_nan() {
            return Err(invalid(
                "dropout",
                format!("probability must be in [0, 1], got {p}"),
            ));
        }
        if !training || p == 0.0 {
            return Ok(self.clone());
        }
        let keep = 1.0 - p;
        let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
        let mask: Vec<f32> = (0..self.numel())
            .map(|_| if rng.next_f32() < p { 0.0 } else { scale })
            .collect();
        if let Some(gpu) = gpu_of("dropout", &[self])? {
            return on_gpu!(gpu, |g| crate::backend::cuda::ops::dropout(g, self, &mask));
        }
        let out = self.with_data(|x| x.iter().zip(&mask).map(|(a, b)| a * b).collect());
        let op = record(&[self], || Op::Masked {
            input: self.clone(),
            mask,
            name: "dropout",
        });
        Ok(Tensor::from_parts(out, self.shape().clone(), op))
    }

    /// Matrix product of 2-d tensors `[M, K] @ [K, N]`.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.expect_rank("matmul", 2, "[M, K]")?;
        rhs.expect_rank("matmul", 2, "[K, N]")?;
        let (m, k, n) = (self.dims()[0], self.dims()[1], rhs.dims()[1]);
        if rhs.dims()[0] != k {
            return Err(shape_mismatch(
                "matmul",
                format!("rhs with {k} rows (lhs is {})", self.shape()),
                format!("rhs {}", rhs.shape()),
            ));
        }
        if let Some(gpu) = gpu_of("matmul", &[self, rhs])? {
            return on_gpu!(gpu, |g| crate::backend::cuda::general::matmul(g, self, rhs));
        }
        let mut out = vec![0f32; m * n];
        self.with_data(|a| {
            rhs.with_data(|b| {
                matmul(
                    &mut out,
                    MatRef::row_major(a, m, k),
                    MatRef::row_major(b, k, n),
                    false,
                    Par::Rayon,
                )
            })
        });
        let op = record(&[self, rhs], || Op::Matmul {
            a: self.clone(),
            b: rhs.clone(),
        });
        Ok(Tensor::from_parts(out, Shape::new([m, n]), op))
    }

    /// `self [*, I] @ weight[O, I]^T + bias[O]`, like `F.linear`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("linear {} w{}", self.shape(), weight.shape()),
            || 2.0 * (self.numel() * weight.dims()[0]) as f64,
            || -> Result<Tensor> {
                weight.expect_rank("linear", 2, "weight [out_features, in_features]")?;
                let (o, i) = (weight.dims()[0], weight.dims()[1]);
                if self.rank() == 0 || *self.dims().last().unwrap_or(&0) != i {
                    return Err(shape_mismatch(
                        "linear",
                        format!("input [*, {i}]"),
                        format!("input {}", self.shape()),
                    ));
                }
                if let Some(b) = bias {
                    if b.dims() != [o] {
                        return Err(shape_mismatch(
                            "linear",
                            format!("bias [{o}]"),
                            format!("bias {}", b.shape()),
                        ));
                    }
                }
                let mut inputs = vec![self, weight];
                inputs.extend(bias);
                if let Some(gpu) = gpu_of("linear", &inputs)? {
                    let mut dims = self.dims().to_vec();
                    *dims.last_mut().expect("rank checked") = o;
                    return on_gpu!(gpu, |g| crate::backend::cuda::ops::linear(
                        g, self, weight, bias, dims
                    ));
                }
                let m = self.numel() / i.max(1);
                let mut out = vec![0f32; m * o];
                if let Some(b) = bias {
                    b.with_data(|bv| out.chunks_mut(o).for_each(|row| row.copy_from_slice(bv)));
                }
                let precision = crate::autocast::precision();
                self.with_data(|x| {
                    weight.with_data(|w| {
                        if precision == Precision::Bf16 {
                            // Packing lays W^T out for the kernel whichever way it is viewed.
                            return bf16::matmul_bf16(
                                &mut out,
                                MatRef::row_major(x, m, i),
                                MatRef::row_major(w, o, i).t(),
                                bias.is_some(),
                                Par::Rayon,
                            );
                        }
                        matmul(
                            &mut out,
                            MatRef::row_major(x, m, i),
                            MatRef::row_major(w, o, i).t(),
                            bias.is_some(),
                            Par::Rayon,
                        )
                    })
                });
                let mut dims = self.dims().to_vec();
                *dims.last_mut().expect("rank checked") = o;
                let op = record(&inputs, || Op::Linear {
                    input: self.clone(),
                    weight: weight.clone(),
                    bias: bias.cloned(),
                    precision,
                });
                Ok(Tensor::from_parts(out, Shape::new(dims), op))
            },
        )
    }
}
