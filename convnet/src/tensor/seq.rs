//! Sequence ops over `[N, C, L]`: `conv1d`, `max_pool1d`, `avg_pool1d`,
//! `adaptive_avg_pool1d`, `adaptive_max_pool1d`, `conv1d_relu_max`, `batch_norm1d` (over
//! `[N, C, L]` or `[N, C]`) and the `embedding` lookup.
//!
//! A 1-D op is its 2-D op on the view `[N, C, 1, L]` with a `(1, k)` window — the same
//! arithmetic, so the same kernels, gradients and numerics — between two free reshapes.
//! Each op checks its input first and reports errors with its own name and 1-D shapes.
//! Two have kernels of their own: the embedding lookup (`backend/cpu/embedding.rs`) and
//! `conv1d_relu_max`, a text CNN's convolution, ReLU and maximum over time in one op
//! (`backend/cpu/conv_max.rs`).
//!
//! Embedding ids are carried as a float tensor of whole numbers (the engine has one element
//! type): every id must be an integer in `0..num_embeddings` — exact in float32 up to 2^24,
//! far beyond any vocabulary here — and anything else is an error naming the id.

use super::{gpu_of, record, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::{conv_max, embedding, pool};
use crate::error::{invalid, shape_mismatch, Error, Result};
use crate::shape::{conv_out_size, pool_out_size, Shape};
use crate::tensor::{AvgPool2dParams, Conv2dParams, MaxPool2dParams};

/// Settings of `conv1d`, as in `torch.nn.Conv1d` (stride 1, padding 0, dilation 1, groups 1).
///
/// ```
/// let p = convnet::Conv1dParams { stride: 2, padding: 1, ..Default::default() };
/// assert_eq!(p.output_shape(&[2, 4, 10], &[8, 4, 3])?.dims(), &[2, 8, 5]);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv1dParams {
    /// Step between windows.
    pub stride: usize,
    /// Zeros added at both ends.
    pub padding: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
}

impl Default for Conv1dParams {
    fn default() -> Self {
        Conv1dParams {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

impl Conv1dParams {
    /// The same convolution over `[N, C, 1, L]` with a `(1, k)` kernel.
    pub fn as_2d(&self) -> Conv2dParams {
        Conv2dParams {
            stride: (1, self.stride),
            padding: (0, self.padding),
            dilation: (1, self.dilation),
            groups: self.groups,
        }
    }

    /// Output shape `[N, K, OL]` for input `[N, C, L]` and weight `[K, C/groups, k]`, or an
    /// error naming the shapes.
    pub fn output_shape(&self, input: &[usize], weight: &[usize]) -> Result<Shape> {
        let op = "conv1d";
        if input.len() != 3 {
            return Err(shape_mismatch(
                op,
                "input [N, C, L]",
                Shape::from(input).to_string(),
            ));
        }
        if weight.len() != 3 {
            return Err(shape_mismatch(
                op,
                "weight [K, C/groups, k]",
                Shape::from(weight).to_string(),
            ));
        }
        let (s, p, d, g) = (self.stride, self.padding, self.dilation, self.groups);
        if s == 0 || d == 0 || g == 0 {
            return Err(invalid(
                op,
                format!("stride {s}, dilation {d} and groups {g} must be positive"),
            ));
        }
        let (c, l) = (input[1], input[2]);
        let (k, cg, kl) = (weight[0], weight[1], weight[2]);
        if kl == 0 {
            return Err(invalid(op, "kernel size must be positive"));
        }
        if !c.is_multiple_of(g) || !k.is_multiple_of(g) {
            return Err(invalid(
                op,
                format!(
                    "in_channels {c} and out_channels {k} must both be divisible by groups {g}"
                ),
            ));
        }
        if cg * g != c {
            return Err(shape_mismatch(
                op,
                format!(
                    "weight with {} input channels per group (input has {c} channels, groups={g})",
                    c / g
                ),
                format!("weight {}", Shape::from(weight)),
            ));
        }
        if p > usize::MAX / 4 {
            return Err(invalid(op, format!("padding {p} is too large")));
        }
        let Some(ol) = conv_out_size(l, kl, s, p, d) else {
            return Err(invalid(
                op,
                format!(
                    "kernel {kl} (dilation {d}) is larger than the padded input {} (length {l}, padding {p})",
                    l as u128 + 2 * p as u128
                ),
            ));
        };
        Ok(Shape::new([input[0], k, ol]))
    }
}

/// Settings of `max_pool1d`, as in `torch.nn.MaxPool1d` (stride defaults to the kernel).
///
/// ```
/// let p = convnet::MaxPool1dParams::new(3).stride(2).padding(1);
/// assert_eq!(p.output_shape(&[1, 8, 32])?.dims(), &[1, 8, 16]);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool1dParams {
    /// Window length.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Implicit -inf padding at both ends; at most half the kernel.
    pub padding: usize,
    /// Spacing between window taps.
    pub dilation: usize,
    /// Round the output length up (a last, partial window).
    pub ceil_mode: bool,
}

impl MaxPool1dParams {
    /// Window `k`, stride `k`, no padding.
    pub fn new(k: usize) -> Self {
        MaxPool1dParams {
            kernel: k,
            stride: k,
            padding: 0,
            dilation: 1,
            ceil_mode: false,
        }
    }
    /// Stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }
    /// Padding.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = p;
        self
    }
    /// Dilation.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = d;
        self
    }
    /// Ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }
    /// The same pooling over `[N, C, 1, L]` with a `(1, k)` window.
    pub fn as_2d(&self) -> MaxPool2dParams {
        MaxPool2dParams {
            kernel: (1, self.kernel),
            stride: (1, self.stride),
            padding: (0, self.padding),
            dilation: (1, self.dilation),
            ceil_mode: self.ceil_mode,
        }
    }
    /// Output shape `[N, C, OL]` for input `[N, C, L]`.
    pub fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        pool1d_shape(
            "max_pool1d",
            input,
            (self.kernel, self.stride, self.padding, self.dilation),
            self.ceil_mode,
        )
    }
}

/// Settings of `avg_pool1d`, as in `torch.nn.AvgPool1d` (stride defaults to the kernel).
///
/// ```
/// let p = convnet::AvgPool1dParams::new(2).ceil_mode(true);
/// assert_eq!(p.output_shape(&[1, 3, 7])?.dims(), &[1, 3, 4]);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool1dParams {
    /// Window length.
    pub kernel: usize,
    /// Step between windows.
    pub stride: usize,
    /// Implicit zero padding at both ends; at most half the kernel.
    pub padding: usize,
    /// Round the output length up (a last, partial window).
    pub ceil_mode: bool,
    /// Count padded zeros in the divisor (PyTorch default: true).
    pub count_include_pad: bool,
}

impl AvgPool1dParams {
    /// Window `k`, stride `k`, no padding, `count_include_pad = true`.
    pub fn new(k: usize) -> Self {
        AvgPool1dParams {
            kernel: k,
            stride: k,
            padding: 0,
            ceil_mode: false,
            count_include_pad: true,
        }
    }
    /// Stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }
    /// Padding.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = p;
        self
    }
    /// Ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }
    /// Whether padding counts in the divisor.
    pub fn count_include_pad(mut self, on: bool) -> Self {
        self.count_include_pad = on;
        self
    }
    /// The same pooling over `[N, C, 1, L]` with a `(1, k)` window.
    pub fn as_2d(&self) -> AvgPool2dParams {
        AvgPool2dParams {
            kernel: (1, self.kernel),
            stride: (1, self.stride),
            padding: (0, self.padding),
            ceil_mode: self.ceil_mode,
            count_include_pad: self.count_include_pad,
        }
    }
    /// Output shape `[N, C, OL]` for input `[N, C, L]`.
    pub fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        pool1d_shape(
            "avg_pool1d",
            input,
            (self.kernel, self.stride, self.padding, 1),
            self.ceil_mode,
        )
    }
}

/// The 1-D pooling checks with 1-D messages: rank, positive sizes, PyTorch's
/// `padding <= kernel / 2`, and a non-empty output ([`pool_out_size`]).
fn pool1d_shape(
    op: &'static str,
    input: &[usize],
    (kernel, stride, padding, dilation): (usize, usize, usize, usize),
    ceil: bool,
) -> Result<Shape> {
    if input.len() != 3 {
        return Err(shape_mismatch(
            op,
            "input [N, C, L]",
            Shape::from(input).to_string(),
        ));
    }
    if kernel == 0 || stride == 0 || dilation == 0 {
        return Err(invalid(
            op,
            format!("kernel {kernel}, stride {stride} and dilation {dilation} must be positive"),
        ));
    }
    if padding > kernel / 2 {
        return Err(invalid(
            op,
            format!("padding {padding} must be at most half the kernel size {kernel}"),
        ));
    }
    let l = input[2];
    let Some(ol) = pool_out_size(l, kernel, stride, padding, dilation, ceil) else {
        return Err(invalid(
            op,
            if ceil {
                format!(
                    "kernel {kernel} (stride {stride}, padding {padding}, dilation {dilation}) leaves no window starting inside the input of length {l}: the output would be empty"
                )
            } else {
                format!(
                    "kernel {kernel} is larger than the padded input {} (length {l})",
                    l as u128 + 2 * padding as u128
                )
            },
        ));
    };
    Ok(Shape::new([input[0], input[1], ol]))
}

/// Checks an adaptive pooling's input `[N, C, L]` and output length.
fn adaptive1d_shape(op: &'static str, input: &[usize], out: usize) -> Result<Shape> {
    if input.len() != 3 {
        return Err(shape_mismatch(
            op,
            "input [N, C, L]",
            Shape::from(input).to_string(),
        ));
    }
    if out == 0 || input[2] == 0 {
        return Err(invalid(
            op,
            format!(
                "output and input lengths must be positive, got output {out} for input {}",
                Shape::from(input)
            ),
        ));
    }
    Ok(Shape::new([input[0], input[1], out]))
}

/// Output shape of an adaptive 1-D pooling (max or average) to `out` for input `[N, C, L]`.
///
/// ```
/// let s = convnet::tensor::adaptive_pool1d_output_shape(&[2, 4, 9], 3)?;
/// assert_eq!(s.dims(), &[2, 4, 3]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn adaptive_pool1d_output_shape(input: &[usize], out: usize) -> Result<Shape> {
    adaptive1d_shape("adaptive_pool1d", input, out)
}

impl Tensor {
    /// `[N, C, L]` as `[N, C, 1, L]` (a view).
    fn as_image_row(&self) -> Result<Tensor> {
        let d = self.dims();
        self.reshape([d[0], d[1], 1, d[2]])
    }

    /// `[N, C, 1, L]` back to `[N, C, L]` (a view).
    fn from_image_row(y: Tensor) -> Result<Tensor> {
        let d = y.dims().to_vec();
        y.reshape([d[0], d[1], d[3]])
    }

    /// 1-D convolution of `[N, C, L]` with weight `[K, C/groups, k]` and an optional bias
    /// `[K]`, like `F.conv1d`; runs the 2-D kernels on `[N, C, 1, L]`.
    ///
    /// ```
    /// use convnet::{Conv1dParams, Tensor};
    /// let x = Tensor::from_vec(vec![1., 2., 3., 4.], [1, 1, 4])?;
    /// let w = Tensor::from_vec(vec![1., -1.], [1, 1, 2])?;
    /// let y = x.conv1d(&w, None, Conv1dParams::default())?;
    /// assert_eq!(y.to_vec(), vec![-1., -1., -1.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn conv1d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        p: Conv1dParams,
    ) -> Result<Tensor> {
        let out = p.output_shape(self.dims(), weight.dims())?;
        if let Some(b) = bias {
            if b.dims() != [out.dims()[1]] {
                return Err(shape_mismatch(
                    "conv1d",
                    format!("bias [{}]", out.dims()[1]),
                    format!("bias {}", b.shape()),
                ));
            }
        }
        let w = weight.dims();
        let w4 = weight.reshape([w[0], w[1], 1, w[2]])?;
        let y = self.as_image_row()?.conv2d(&w4, bias, p.as_2d())?;
        Tensor::from_image_row(y)
    }

    /// One filter bank of a text CNN in a single op: `relu(conv1d(x, weight, bias))` with
    /// its maximum over time, `[N, C, L]` -> `[N, K]`, like
    /// `F.relu(F.conv1d(x, weight, bias)).amax(2)` (stride 1, no padding, dilation 1, one
    /// group). The same values as the three ops in a row, without keeping the `[N, K, OL]`
    /// convolution; the backward passes through the one position of each maximum only
    /// (`backend/cpu/conv_max.rs`). CPU only.
    ///
    /// ```
    /// use convnet::{Conv1dParams, Tensor};
    /// let x = Tensor::from_vec(vec![1., -2., 3., 0.5], [1, 1, 4])?;
    /// let w = Tensor::from_vec(vec![1., 1.], [1, 1, 2])?;
    /// assert_eq!(x.conv1d_relu_max(&w, None)?.to_vec(), vec![3.5]);
    /// let y = x.conv1d(&w, None, Conv1dParams::default())?.relu()?.adaptive_max_pool1d(1)?;
    /// assert_eq!(y.to_vec(), vec![3.5]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn conv1d_relu_max(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let op = "conv1d_relu_max";
        let out = Conv1dParams::default().output_shape(self.dims(), weight.dims())?;
        let (n, k) = (out.dims()[0], out.dims()[1]);
        if let Some(b) = bias {
            if b.dims() != [k] {
                return Err(shape_mismatch(
                    op,
                    format!("bias [{k}]"),
                    format!("bias {}", b.shape()),
                ));
            }
        }
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        if gpu_of(op, &inputs)?.is_some() {
            return Err(Error::Unsupported(format!(
                "{op} has no CUDA kernel yet: run it on the CPU"
            )));
        }
        let geom = conv_max::ConvMaxGeom {
            n,
            c: self.dims()[1],
            l: self.dims()[2],
            k,
            kw: weight.dims()[2],
        };
        let mut y = vec![0f32; n * k];
        let mut argmax = vec![0u32; n * k];
        crate::profile::timed(
            false,
            || geom.describe(),
            || 2.0 * geom.macs() as f64,
            || {
                self.with_data(|x| {
                    weight.with_data(|w| match bias {
                        Some(b) => b.with_data(|bv| {
                            conv_max::forward(x, w, Some(bv), &geom, &mut y, &mut argmax)
                        }),
                        None => conv_max::forward(x, w, None, &geom, &mut y, &mut argmax),
                    })
                })
            },
        );
        let rec = record(&inputs, || Op::ConvMaxOverTime {
            input: self.clone(),
            weight: weight.clone(),
            bias: bias.cloned(),
            argmax,
            geom,
        });
        Ok(Tensor::from_parts(y, Shape::new([n, k]), rec))
    }

    /// Max pooling over `[N, C, L]`, like `F.max_pool1d`.
    ///
    /// ```
    /// use convnet::{MaxPool1dParams, Tensor};
    /// let x = Tensor::from_vec(vec![1., 5., 2., 4., 3.], [1, 1, 5])?;
    /// let y = x.max_pool1d(MaxPool1dParams::new(2).ceil_mode(true))?;
    /// assert_eq!(y.to_vec(), vec![5., 4., 3.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn max_pool1d(&self, p: MaxPool1dParams) -> Result<Tensor> {
        p.output_shape(self.dims())?;
        Tensor::from_image_row(self.as_image_row()?.max_pool2d(p.as_2d())?)
    }

    /// Average pooling over `[N, C, L]`, like `F.avg_pool1d`.
    ///
    /// ```
    /// use convnet::{AvgPool1dParams, Tensor};
    /// let x = Tensor::from_vec(vec![1., 3., 5., 7.], [1, 1, 4])?;
    /// assert_eq!(x.avg_pool1d(AvgPool1dParams::new(2))?.to_vec(), vec![2., 6.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn avg_pool1d(&self, p: AvgPool1dParams) -> Result<Tensor> {
        p.output_shape(self.dims())?;
        Tensor::from_image_row(self.as_image_row()?.avg_pool2d(p.as_2d())?)
    }

    /// Adaptive average pooling of `[N, C, L]` to length `out`, like
    /// `F.adaptive_avg_pool1d`.
    ///
    /// ```
    /// let x = convnet::Tensor::from_vec(vec![1., 2., 3., 4., 5.], [1, 1, 5])?;
    /// assert_eq!(x.adaptive_avg_pool1d(1)?.to_vec(), vec![3.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn adaptive_avg_pool1d(&self, out: usize) -> Result<Tensor> {
        adaptive1d_shape("adaptive_avg_pool1d", self.dims(), out)?;
        Tensor::from_image_row(self.as_image_row()?.adaptive_avg_pool2d((1, out))?)
    }

    /// Adaptive max pooling of `[N, C, L]` to length `out`, like `F.adaptive_max_pool1d`
    /// (the argmax is kept for backward, which is max pooling's).
    ///
    /// ```
    /// let x = convnet::Tensor::from_vec(vec![1., 5., 2., 4., 3.], [1, 1, 5])?;
    /// assert_eq!(x.adaptive_max_pool1d(2)?.to_vec(), vec![5., 4.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn adaptive_max_pool1d(&self, out: usize) -> Result<Tensor> {
        let op = "adaptive_max_pool1d";
        let shape = adaptive1d_shape(op, self.dims(), out)?;
        if gpu_of(op, &[self])?.is_some() {
            return Err(Error::Unsupported(format!(
                "{op} has no CUDA kernel yet: run it on the CPU"
            )));
        }
        let x4 = self.as_image_row()?;
        let d = self.dims();
        let geom = pool::PoolGeom {
            planes: d[0] * d[1],
            h: 1,
            w: d[2],
            oh: 1,
            ow: out,
            kernel: (1, 1),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
        };
        let len = shape.numel();
        let mut y = vec![0f32; len];
        let mut argmax = vec![0u32; len];
        x4.with_data(|x| pool::adaptive_max_pool2d_forward(x, &geom, &mut y, &mut argmax));
        // The backward of a max with saved argmax is max pooling's scatter.
        let op = record(&[&x4], || Op::MaxPool2d {
            input: x4.clone(),
            argmax,
            geom,
            relu: false,
        });
        Tensor::from_image_row(Tensor::from_parts(y, Shape::new([d[0], d[1], 1, out]), op))
    }

    /// Batch normalisation of `[N, C, L]` (over N and L) or `[N, C]` (over N), like
    /// `F.batch_norm` under `nn.BatchNorm1d`; arguments as [`Tensor::batch_norm2d`], which
    /// it runs on `[N, C, 1, L]`.
    ///
    /// ```
    /// use convnet::Tensor;
    /// let x = Tensor::from_vec(vec![1., 3., 5., 7.], [2, 2])?;
    /// let (m, v) = (Tensor::zeros([2]), Tensor::ones([2]));
    /// let y = x.batch_norm1d(&m, &v, None, None, true, 0.1, 1e-5)?;
    /// assert!((y.to_vec()[0] + 1.0).abs() < 1e-4); // (1 - 3) / 2
    /// assert!((m.to_vec()[0] - 0.3).abs() < 1e-6); // 0.9 * 0 + 0.1 * 3
    /// # Ok::<(), convnet::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm1d(
        &self,
        running_mean: &Tensor,
        running_var: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<Tensor> {
        let d = self.dims().to_vec();
        let x4 = match d.len() {
            2 => self.reshape([d[0], d[1], 1, 1])?,
            3 => self.as_image_row()?,
            _ => {
                return Err(shape_mismatch(
                    "batch_norm1d",
                    "input [N, C] or [N, C, L]",
                    self.shape().to_string(),
                ))
            }
        };
        let y = x4
            .batch_norm2d(
                running_mean,
                running_var,
                weight,
                bias,
                training,
                momentum,
                eps,
            )
            .map_err(|e| match e {
                Error::InvalidArgument { msg, .. } => invalid(
                    "batch_norm1d",
                    msg.replace(&x4.shape().to_string(), &self.shape().to_string()),
                ),
                Error::ShapeMismatch { expected, got, .. } => {
                    shape_mismatch("batch_norm1d", expected, got)
                }
                other => other,
            })?;
        y.reshape(d)
    }

    /// Embedding lookup, like `F.embedding(ids, weight, padding_idx)`: `self` holds integer
    /// ids (as floats, any shape `[*]`), `weight` is `[num_embeddings, dim]`, the result is
    /// `[*, dim]`. The weight gradient is dense; the row `padding_idx` gets none. The ids
    /// get no gradient.
    ///
    /// ```
    /// use convnet::Tensor;
    /// let w = Tensor::from_vec(vec![0., 0., 1., 1., 2., 2.], [3, 2])?;
    /// let ids = Tensor::from_vec(vec![2., 1.], [2])?;
    /// assert_eq!(ids.embedding(&w, None)?.to_vec(), vec![2., 2., 1., 1.]);
    /// assert!(Tensor::from_vec(vec![3.], [1])?.embedding(&w, None).is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn embedding(&self, weight: &Tensor, padding_idx: Option<usize>) -> Result<Tensor> {
        let op = "embedding";
        if weight.rank() != 2 {
            return Err(shape_mismatch(
                op,
                "weight [num_embeddings, embedding_dim]",
                weight.shape().to_string(),
            ));
        }
        let (num, dim) = (weight.dims()[0], weight.dims()[1]);
        if let Some(p) = padding_idx {
            if p >= num {
                return Err(invalid(
                    op,
                    format!("padding_idx {p} is out of range for {num} embeddings"),
                ));
            }
        }
        if gpu_of(op, &[self, weight])?.is_some() {
            return Err(Error::Unsupported(format!(
                "{op} has no CUDA kernel yet: run it on the CPU"
            )));
        }
        let ids = self.with_data(|v| -> Result<Vec<u32>> {
            v.iter()
                .enumerate()
                .map(|(i, &x)| {
                    // NaN and infinities fail the first test; ids are below `num` (a usize),
                    // compared exactly after the conversion.
                    let whole = x.fract() == 0.0 && x >= 0.0 && x <= u32::MAX as f32;
                    if !whole || (x as u64) >= num as u64 {
                        Err(invalid(
                            op,
                            format!(
                                "id {x} at position {i} is not an index into {num} embeddings (ids must be whole numbers in 0..{num})"
                            ),
                        ))
                    } else {
                        Ok(x as u32)
                    }
                })
                .collect()
        })?;
        let mut out = self.dims().to_vec();
        out.push(dim);
        let shape = Shape::new(out);
        let len = shape
            .checked_numel()
            .ok_or_else(|| invalid(op, format!("output {shape} is too large")))?;
        let mut y = Vec::new();
        y.try_reserve_exact(len)
            .map_err(|_| invalid(op, format!("cannot allocate the output {shape}")))?;
        y.resize(len, 0f32);
        weight.with_data(|w| embedding::embedding_forward(&ids, w, dim, &mut y));
        let rec = record(&[weight], || Op::Embedding {
            weight: weight.clone(),
            ids,
            padding_idx,
        });
        Ok(Tensor::from_parts(y, shape, rec))
    }
}
