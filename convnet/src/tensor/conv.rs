//! `conv2d`: validation, the CPU kernel, and graph recording.

use super::pool::pool_geometry;
use super::{gpu_of, record, Tensor};
use crate::autocast::Precision;
use crate::autograd::{relu_max_pool_key, Op};
use crate::backend::cpu::bf16;
use crate::backend::cpu::conv::{self, ConvGeom};
use crate::backend::cpu::recycle;
use crate::error::{invalid, shape_mismatch, Result};
use crate::shape::{conv_out_size, Shape};
use crate::MaxPool2dParams;

/// Settings of a 2-D convolution, as `torch.nn.functional.conv2d` takes them.
///
/// ```
/// let p = convnet::Conv2dParams::default().stride(2).padding(1);
/// assert_eq!((p.stride, p.padding, p.dilation, p.groups), ((2, 2), (1, 1), (1, 1), 1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Zero padding (vertical, horizontal).
    pub padding: (usize, usize),
    /// Dilation (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Number of channel groups (`C` for depthwise).
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

impl Conv2dParams {
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
    /// Channel groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }

    /// Output shape for input `[N, C, H, W]` and weight `[K, C/groups, KH, KW]`, or a typed
    /// error naming the shapes. This is the shape check that layers run at build time.
    pub fn output_shape(&self, input: &[usize], weight: &[usize]) -> Result<Shape> {
        Ok(Shape::new(self.geometry(input, weight)?.out_dims()))
    }

    pub(crate) fn geometry(&self, input: &[usize], weight: &[usize]) -> Result<ConvGeom> {
        let op = "conv2d";
        if input.len() != 4 {
            return Err(shape_mismatch(
                op,
                "input [N, C, H, W]",
                format!("{}", Shape::from(input)),
            ));
        }
        if weight.len() != 4 {
            return Err(shape_mismatch(
                op,
                "weight [K, C/groups, KH, KW]",
                format!("{}", Shape::from(weight)),
            ));
        }
        let (s, p, d, g) = (self.stride, self.padding, self.dilation, self.groups);
        if s.0 == 0 || s.1 == 0 {
            return Err(invalid(op, format!("stride must be positive, got {s:?}")));
        }
        if d.0 == 0 || d.1 == 0 {
            return Err(invalid(op, format!("dilation must be positive, got {d:?}")));
        }
        if g == 0 {
            return Err(invalid(op, "groups must be positive"));
        }
        let (n, c, h, w) = (input[0], input[1], input[2], input[3]);
        let (k, cg, kh, kw) = (weight[0], weight[1], weight[2], weight[3]);
        if kh == 0 || kw == 0 {
            return Err(invalid(
                op,
                format!("kernel size must be positive, got {kh}x{kw}"),
            ));
        }
        if c % g != 0 || k % g != 0 {
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
        if p.0.max(p.1) > usize::MAX / 4 {
            return Err(invalid(op, format!("padding {p:?} is too large")));
        }
        let oh = conv_out_size(h, kh, s.0, p.0, d.0);
        let ow = conv_out_size(w, kw, s.1, p.1, d.1);
        let (Some(oh), Some(ow)) = (oh, ow) else {
            return Err(invalid(
                op,
                format!("kernel {kh}x{kw} (dilation {d:?}) is larger than the padded input {}x{} (input {h}x{w}, padding {p:?})", h as u128 + 2 * p.0 as u128, w as u128 + 2 * p.1 as u128),
            ));
        };
        Ok(ConvGeom {
            n,
            c,
            h,
            w,
            k,
            kh,
            kw,
            oh,
            ow,
            stride: s,
            padding: p,
            dilation: d,
            groups: g,
        })
    }
}

impl ConvGeom {
    fn out_dims(&self) -> Vec<usize> {
        vec![self.n, self.k, self.oh, self.ow]
    }
}

impl Tensor {
    /// 2-D convolution of `self [N, C, H, W]` with `weight [K, C/groups, KH, KW]` and optional
    /// `bias [K]`, like `torch.nn.functional.conv2d`.
    ///
    /// ```
    /// use convnet::{Conv2dParams, Tensor};
    /// let x = Tensor::ones([1, 1, 3, 3]);
    /// let w = Tensor::ones([1, 1, 3, 3]);
    /// let y = x.conv2d(&w, None, Conv2dParams::default().padding(1))?;
    /// assert_eq!(y.to_vec(), vec![4., 6., 4., 6., 9., 6., 4., 6., 4.]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: Conv2dParams,
    ) -> Result<Tensor> {
        let geom = conv_geometry(self, weight, bias, params)?;
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        if let Some(gpu) = gpu_of("conv2d", &inputs)? {
            return on_gpu!(gpu, |g| crate::backend::cuda::ops::conv2d(
                g, self, weight, bias, geom
            ));
        }
        // conv2d_forward writes every output.
        let mut y = recycle::take_overwritten(geom.n * geom.k * geom.oh * geom.ow);
        let precision = crate::autocast::precision();
        let kernels = match precision {
            Precision::F32 => crate::backend::cpu::tuning::kernels(),
            Precision::Bf16 => crate::backend::cpu::tuning::KernelChoice::Direct,
        };
        let forward = |x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]| {
            match precision {
                Precision::F32 => conv::conv2d_forward_with(x, w, b, g, y, kernels),
                Precision::Bf16 => bf16::conv2d_forward(x, w, b, g, y),
            }
        };
        crate::profile::timed(
            false,
            || geom.describe(),
            || 2.0 * geom.macs() as f64,
            || {
                self.with_data(|x| {
                    weight.with_data(|w| match bias {
                        Some(b) => b.with_data(|bv| forward(x, w, Some(bv), &geom, &mut y)),
                        None => forward(x, w, None, &geom, &mut y),
                    })
                })
            },
        );
        let op = record(&inputs, || Op::Conv2d {
            input: self.clone(),
            weight: weight.clone(),
            bias: bias.cloned(),
            geom,
            precision,
            kernels,
        });
        Ok(Tensor::from_parts(y, Shape::new(geom.out_dims()), op))
    }

    /// `self.conv2d(weight, bias, params)?.relu_max_pool2d(pool)` as one op where convnet has
    /// a fused CPU kernel (float32, the stride-1 geometries of the direct 3x3 convolution,
    /// such as seed-cnn's two convolutions): each image's convolution output is pooled while
    /// it is still in cache and never stored, and the backward pass rebuilds the gradient
    /// reaching it from the pooling's indices. Values and gradients are those of the three
    /// ops, bit for bit (outside [`crate::backend::cpu::tuning::with_kernels`], where the
    /// unfused convolution and the backward pass may take other kernels); everywhere else
    /// (GPU tensors, bfloat16 autocast, other geometries) it runs them one after the other.
    ///
    /// ```
    /// use convnet::{Conv2dParams, MaxPool2dParams, Rng, Tensor};
    /// let mut rng = Rng::new(0);
    /// let x = Tensor::randn([2, 3, 32, 32], &mut rng);
    /// let w = Tensor::randn([8, 3, 3, 3], &mut rng);
    /// let (conv, pool) = (Conv2dParams::default().padding(1), MaxPool2dParams::new(2));
    /// let fused = x.conv2d_relu_max_pool2d(&w, None, conv, pool)?;
    /// let apart = x.conv2d(&w, None, conv)?.relu()?.max_pool2d(pool)?;
    /// assert_eq!(fused.dims(), &[2, 8, 16, 16]);
    /// assert_eq!(fused.to_vec(), apart.to_vec());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn conv2d_relu_max_pool2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        params: Conv2dParams,
        pool: MaxPool2dParams,
    ) -> Result<Tensor> {
        let geom = conv_geometry(self, weight, bias, params)?;
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        if gpu_of("conv2d", &inputs)?.is_some()
            || crate::autocast::precision() != Precision::F32
            || !conv::relu_max_pool_fusable(&geom)
        {
            return self.conv2d(weight, bias, params)?.relu_max_pool2d(pool);
        }
        let pg = pool_geometry(
            "relu_max_pool2d",
            &[geom.n, geom.k, geom.oh, geom.ow],
            pool.kernel,
            pool.stride,
            pool.padding,
            pool.dilation,
            pool.ceil_mode,
        )?;
        let len = pg.planes * pg.oh * pg.ow;
        // The fused forward writes every output.
        let mut y = recycle::take_overwritten(len);
        let mut argmax = vec![0u32; len];
        crate::profile::timed(
            false,
            || relu_max_pool_key(&geom),
            || 2.0 * geom.macs() as f64,
            || {
                self.with_data(|x| {
                    weight.with_data(|w| {
                        let mut run = |b: Option<&[f32]>| {
                            conv::conv2d_relu_max_pool_forward(
                                x,
                                w,
                                b,
                                &geom,
                                &pg,
                                &mut y,
                                &mut argmax,
                            )
                        };
                        match bias {
                            Some(b) => b.with_data(|bv| run(Some(bv))),
                            None => run(None),
                        }
                    })
                })
            },
        );
        let op = record(&inputs, || Op::Conv2dReluMaxPool {
            input: self.clone(),
            weight: weight.clone(),
            bias: bias.cloned(),
            geom,
            argmax,
            pool: pg,
            kernels: crate::backend::cpu::tuning::kernels(),
        });
        Ok(Tensor::from_parts(
            y,
            Shape::new([geom.n, geom.k, pg.oh, pg.ow]),
            op,
        ))
    }
}

/// The geometry of `conv2d(x, weight, bias)`, with the bias's shape checked.
fn conv_geometry(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    params: Conv2dParams,
) -> Result<ConvGeom> {
    let geom = params.geometry(x.dims(), weight.dims())?;
    if let Some(b) = bias {
        if b.dims() != [geom.k] {
            return Err(shape_mismatch(
                "conv2d",
                format!("bias [{}]", geom.k),
                format!("bias {}", b.shape()),
            ));
        }
    }
    Ok(geom)
}
