//! Pooling ops: `max_pool2d` (argmax saved for backward), `avg_pool2d`,
//! `adaptive_avg_pool2d`.

use super::{gpu_of, record, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::pool::{self, PoolGeom};
use crate::error::{invalid, shape_mismatch, Result};
use crate::shape::{pool_out_size, Shape};

/// Settings of `max_pool2d`, as in `torch.nn.MaxPool2d` (stride defaults to the kernel).
///
/// ```
/// let p = convnet::MaxPool2dParams::new(3).stride(2).padding(1);
/// assert_eq!(p.output_shape(&[1, 8, 32, 32]).unwrap().dims(), &[1, 8, 16, 16]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2dParams {
    /// Window (height, width).
    pub kernel: (usize, usize),
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Implicit -inf padding (vertical, horizontal); at most half the kernel.
    pub padding: (usize, usize),
    /// Spacing between window taps.
    pub dilation: (usize, usize),
    /// Use ceiling instead of floor when computing the output size.
    pub ceil_mode: bool,
}

impl MaxPool2dParams {
    /// Square window of size `k`, stride `k`, no padding.
    pub fn new(k: usize) -> Self {
        MaxPool2dParams {
            kernel: (k, k),
            stride: (k, k),
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        }
    }
    /// Same stride on both axes.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    /// Same padding on both axes.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = (p, p);
        self
    }
    /// Same dilation on both axes.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = (d, d);
        self
    }
    /// Ceil mode.
    pub fn ceil_mode(mut self, on: bool) -> Self {
        self.ceil_mode = on;
        self
    }
    /// Output shape for input `[N, C, H, W]`.
    pub fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let g = pool_geometry(
            "max_pool2d",
            input,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
        )?;
        Ok(Shape::new([input[0], input[1], g.oh, g.ow]))
    }
}

/// Settings of `avg_pool2d`, as in `torch.nn.AvgPool2d` (stride defaults to the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AvgPool2dParams {
    /// Window (height, width).
    pub kernel: (usize, usize),
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Implicit zero padding; at most half the kernel.
    pub padding: (usize, usize),
    /// Use ceiling instead of floor when computing the output size.
    pub ceil_mode: bool,
    /// Count padded zeros in the divisor (PyTorch default: true).
    pub count_include_pad: bool,
}

impl AvgPool2dParams {
    /// Square window of size `k`, stride `k`, no padding, `count_include_pad = true`.
    pub fn new(k: usize) -> Self {
        AvgPool2dParams {
            kernel: (k, k),
            stride: (k, k),
            padding: (0, 0),
            ceil_mode: false,
            count_include_pad: true,
        }
    }
    /// Same stride on both axes.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = (s, s);
        self
    }
    /// Same padding on both axes.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = (p, p);
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
    /// Output shape for input `[N, C, H, W]`.
    pub fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let g = pool_geometry(
            "avg_pool2d",
            input,
            self.kernel,
            self.stride,
            self.padding,
            (1, 1),
            self.ceil_mode,
        )?;
        Ok(Shape::new([input[0], input[1], g.oh, g.ow]))
    }
}

pub(super) fn pool_geometry(
    op: &'static str,
    input: &[usize],
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil: bool,
) -> Result<PoolGeom> {
    if input.len() != 4 {
        return Err(shape_mismatch(
            op,
            "input [N, C, H, W]",
            format!("{}", Shape::from(input)),
        ));
    }
    if kernel.0 == 0
        || kernel.1 == 0
        || stride.0 == 0
        || stride.1 == 0
        || dilation.0 == 0
        || dilation.1 == 0
    {
        return Err(invalid(
            op,
            format!(
                "kernel {kernel:?}, stride {stride:?} and dilation {dilation:?} must be positive"
            ),
        ));
    }
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(invalid(
            op,
            format!("padding {padding:?} must be at most half the kernel size {kernel:?}"),
        ));
    }
    let (h, w) = (input[2], input[3]);
    let oh = pool_out_size(h, kernel.0, stride.0, padding.0, dilation.0, ceil);
    let ow = pool_out_size(w, kernel.1, stride.1, padding.1, dilation.1, ceil);
    let (Some(oh), Some(ow)) = (oh, ow) else {
        let (ph, pw) = (
            h as u128 + 2 * padding.0 as u128,
            w as u128 + 2 * padding.1 as u128,
        );
        return Err(invalid(
            op,
            if ceil {
                format!(
                    "kernel {}x{} (stride {stride:?}, padding {padding:?}, dilation {dilation:?}) \
                     leaves no window starting inside the input {h}x{w}: the output would be empty",
                    kernel.0, kernel.1
                )
            } else {
                format!(
                    "kernel {}x{} is larger than the padded input {ph}x{pw} (input {h}x{w})",
                    kernel.0, kernel.1
                )
            },
        ));
    };
    Ok(PoolGeom {
        planes: input[0] * input[1],
        h,
        w,
        oh,
        ow,
        kernel,
        stride,
        padding,
        dilation,
    })
}

impl Tensor {
    /// Max pooling over `[N, C, H, W]`, like `F.max_pool2d`; the argmax is kept for backward.
    ///
    /// ```
    /// use convnet::{MaxPool2dParams, Tensor};
    /// let x = Tensor::from_vec((0..16).map(|v| v as f32).collect(), [1, 1, 4, 4])?;
    /// assert_eq!(x.max_pool2d(MaxPool2dParams::new(2))?.to_vec(), vec![5., 7., 13., 15.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn max_pool2d(&self, p: MaxPool2dParams) -> Result<Tensor> {
        self.max_pool2d_maybe_relu(p, false)
    }

    /// `relu(self).max_pool2d(p)` as one op: the same values and gradients, computed as max
    /// pooling of `self` followed by ReLU on the pooled output (the maximum commutes with
    /// ReLU), so neither the ReLU pass nor its full-size output exist; the backward sends
    /// the gradient to each window's maximum where the output is positive.
    ///
    /// ```
    /// use convnet::{MaxPool2dParams, Tensor};
    /// let x = Tensor::from_vec(vec![-1., -2., 3., -4., -5., -6., -7., -8.], [1, 2, 2, 2])?;
    /// let p = MaxPool2dParams::new(2);
    /// let fused = x.relu_max_pool2d(p)?;
    /// assert_eq!(fused.to_vec(), vec![3., 0.]);
    /// assert_eq!(fused.to_vec(), x.relu()?.max_pool2d(p)?.to_vec());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn relu_max_pool2d(&self, p: MaxPool2dParams) -> Result<Tensor> {
        if self.device() != crate::Device::Cpu {
            return self.relu()?.max_pool2d(p);
        }
        self.max_pool2d_maybe_relu(p, true)
    }

    fn max_pool2d_maybe_relu(&self, p: MaxPool2dParams, relu: bool) -> Result<Tensor> {
        let name = if relu {
            "relu_max_pool2d"
        } else {
            "max_pool2d"
        };
        crate::profile::timed(
            false,
            || format!("{name} {}", self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                let geom = pool_geometry(
                    name,
                    self.dims(),
                    p.kernel,
                    p.stride,
                    p.padding,
                    p.dilation,
                    p.ceil_mode,
                )?;
                if let Some(gpu) = gpu_of(name, &[self])? {
                    return on_gpu!(gpu, |g| crate::backend::cuda::ops::max_pool2d(
                        g, self, geom
                    ));
                }
                let len = geom.planes * geom.oh * geom.ow;
                // Both forwards write every output.
                let mut y = crate::backend::cpu::recycle::take_overwritten(len);
                let mut argmax = vec![0u32; len];
                self.with_data(|x| {
                    if relu {
                        pool::max_pool2d_relu_forward(x, &geom, &mut y, &mut argmax)
                    } else {
                        pool::max_pool2d_forward(x, &geom, &mut y, &mut argmax)
                    }
                });
                let op = record(&[self], || Op::MaxPool2d {
                    input: self.clone(),
                    argmax,
                    geom,
                    relu,
                });
                Ok(Tensor::from_parts(
                    y,
                    Shape::new([self.dims()[0], self.dims()[1], geom.oh, geom.ow]),
                    op,
                ))
            },
        )
    }

    /// Average pooling over `[N, C, H, W]`, like `F.avg_pool2d`.
    pub fn avg_pool2d(&self, p: AvgPool2dParams) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("avg_pool2d {}", self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                let geom = pool_geometry(
                    "avg_pool2d",
                    self.dims(),
                    p.kernel,
                    p.stride,
                    p.padding,
                    (1, 1),
                    p.ceil_mode,
                )?;
                let record_as = || Op::AvgPool2d {
                    input: self.clone(),
                    geom,
                    count_include_pad: p.count_include_pad,
                };
                if let Some(gpu) = gpu_of("avg_pool2d", &[self])? {
                    return on_gpu!(gpu, |g| crate::backend::cuda::ops::avg_pool2d(
                        g,
                        self,
                        geom,
                        p.count_include_pad,
                        record_as
                    ));
                }
                let mut y = vec![0f32; geom.planes * geom.oh * geom.ow];
                self.with_data(|x| pool::avg_pool2d_forward(x, &geom, p.count_include_pad, &mut y));
                let op = record(&[self], record_as);
                Ok(Tensor::from_parts(
                    y,
                    Shape::new([self.dims()[0], self.dims()[1], geom.oh, geom.ow]),
                    op,
                ))
            },
        )
    }

    /// Adaptive average pooling to `out` = (OH, OW), like `F.adaptive_avg_pool2d`.
    pub fn adaptive_avg_pool2d(&self, out: (usize, usize)) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("adaptive_avg_pool2d {}", self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                self.expect_rank("adaptive_avg_pool2d", 4, "[N, C, H, W]")?;
                if out.0 == 0 || out.1 == 0 {
                    return Err(invalid(
                        "adaptive_avg_pool2d",
                        format!("output size must be positive, got {out:?}"),
                    ));
                }
                let d = self.dims();
                let geom = PoolGeom {
                    planes: d[0] * d[1],
                    h: d[2],
                    w: d[3],
                    oh: out.0,
                    ow: out.1,
                    kernel: (1, 1),
                    stride: (1, 1),
                    padding: (0, 0),
                    dilation: (1, 1),
                };
                if d[2] == 0 || d[3] == 0 {
                    return Err(invalid(
                        "adaptive_avg_pool2d",
                        format!("input spatial size must be positive, got {}", self.shape()),
                    ));
                }
                if let Some(gpu) = gpu_of("adaptive_avg_pool2d", &[self])? {
                    return on_gpu!(gpu, |g| {
                        let window = crate::backend::cuda::ops::adaptive_as_window(&geom)?;
                        crate::backend::cuda::ops::avg_pool2d(g, self, window, true, || {
                            Op::AdaptiveAvgPool2d {
                                input: self.clone(),
                                geom,
                            }
                        })
                    });
                }
                let mut y = vec![0f32; geom.planes * out.0 * out.1];
                self.with_data(|x| pool::adaptive_avg_pool2d_forward(x, &geom, &mut y));
                let op = record(&[self], || Op::AdaptiveAvgPool2d {
                    input: self.clone(),
                    geom,
                });
                Ok(Tensor::from_parts(
                    y,
                    Shape::new([d[0], d[1], out.0, out.1]),
                    op,
                ))
            },
        )
    }
}
