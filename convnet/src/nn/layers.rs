//! The layers of `torch.nn` used by CNNs: Conv2d, pooling, Linear, activations, Dropout
//! and Flatten (BatchNorm2d lives with BatchNorm1d in `batch_norm`).

use super::{init, Mode, Module, TensorRole};
use crate::backend::cpu::activation::Activation;
use crate::error::{invalid, shape_mismatch, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::rng::with_global_rng;
use crate::shape::Shape;
use crate::tensor::{AvgPool2dParams, Conv2dParams, MaxPool2dParams, Tensor};

fn visit_opt(
    prefix: &str,
    name: &str,
    t: &Option<Tensor>,
    role: TensorRole,
    f: &mut dyn FnMut(String, &Tensor, TensorRole),
) {
    if let Some(t) = t {
        f(super::join(prefix, name), t, role);
    }
}

// ----- Conv2d ---------------------------------------------------------------------------------

/// `nn.Conv2d`: weight `[out, in/groups, KH, KW]`, optional bias `[out]`.
pub struct Conv2d {
    /// Kernel weights (`weight` in `state_dict`).
    pub weight: Tensor,
    /// Bias (`bias`), if enabled.
    pub bias: Option<Tensor>,
    /// Stride, padding, dilation and groups.
    pub params: Conv2dParams,
}

/// Builder for [`Conv2d`] with PyTorch's defaults (stride 1, padding 0, dilation 1, groups 1,
/// bias on).
pub struct Conv2dBuilder {
    in_channels: usize,
    out_channels: usize,
    kernel: (usize, usize),
    params: Conv2dParams,
    bias: bool,
}

impl Conv2d {
    /// Starts a square-kernel convolution `in_channels -> out_channels`.
    ///
    /// ```
    /// let conv = convnet::nn::Conv2d::new(3, 32, 3).padding(1).build()?;
    /// assert_eq!(conv.weight.dims(), &[32, 3, 3, 3]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Conv2dBuilder {
        Conv2dBuilder {
            in_channels,
            out_channels,
            kernel: (kernel_size, kernel_size),
            params: Conv2dParams::default(),
            bias: true,
        }
    }
}

impl Conv2dBuilder {
    /// Non-square kernel (height, width).
    pub fn kernel_size(mut self, kh: usize, kw: usize) -> Self {
        self.kernel = (kh, kw);
        self
    }
    /// Stride on both axes.
    pub fn stride(mut self, s: usize) -> Self {
        self.params.stride = (s, s);
        self
    }
    /// Padding on both axes.
    pub fn padding(mut self, p: usize) -> Self {
        self.params.padding = (p, p);
        self
    }
    /// Padding (vertical, horizontal).
    pub fn padding_hw(mut self, ph: usize, pw: usize) -> Self {
        self.params.padding = (ph, pw);
        self
    }
    /// Dilation on both axes.
    pub fn dilation(mut self, d: usize) -> Self {
        self.params.dilation = (d, d);
        self
    }
    /// Channel groups (`groups == in_channels` for depthwise).
    pub fn groups(mut self, g: usize) -> Self {
        self.params.groups = g;
        self
    }
    /// Whether to learn a bias (default true).
    pub fn bias(mut self, on: bool) -> Self {
        self.bias = on;
        self
    }
    /// Validates the settings and initialises the weights from the global generator.
    pub fn build(self) -> Result<Conv2d> {
        let p = self.params;
        let (kh, kw) = self.kernel;
        if self.in_channels == 0 || self.out_channels == 0 || kh == 0 || kw == 0 {
            return Err(invalid(
                "Conv2d",
                "channels and kernel size must be positive",
            ));
        }
        if p.stride.0 == 0
            || p.stride.1 == 0
            || p.dilation.0 == 0
            || p.dilation.1 == 0
            || p.groups == 0
        {
            return Err(invalid(
                "Conv2d",
                format!(
                    "stride {:?}, dilation {:?} and groups {} must be positive",
                    p.stride, p.dilation, p.groups
                ),
            ));
        }
        if !self.in_channels.is_multiple_of(p.groups) || !self.out_channels.is_multiple_of(p.groups)
        {
            return Err(invalid(
                "Conv2d",
                format!(
                    "in_channels {} and out_channels {} must be divisible by groups {}",
                    self.in_channels, self.out_channels, p.groups
                ),
            ));
        }
        let weight_dims = [self.out_channels, self.in_channels / p.groups, kh, kw];
        init::claim("Conv2d", &weight_dims)?;
        if self.bias {
            init::claim("Conv2d", &[self.out_channels])?;
        }
        let fan_in = self.in_channels / p.groups * kh * kw;
        let weight = init::kaiming_uniform(
            [self.out_channels, self.in_channels / p.groups, kh, kw],
            fan_in,
        );
        let bias = self
            .bias
            .then(|| init::uniform_bias(self.out_channels, fan_in));
        Ok(Conv2d {
            weight,
            bias,
            params: p,
        })
    }
}

impl Conv2d {
    /// `max_pool(relu(self.forward(x)))` as one op ([`Tensor::conv2d_relu_max_pool2d`]).
    pub fn forward_relu_max_pool(&self, x: &Tensor, pool: &MaxPool2d) -> Result<Tensor> {
        x.conv2d_relu_max_pool2d(&self.weight, self.bias.as_ref(), self.params, pool.0)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.conv2d(&self.weight, self.bias.as_ref(), self.params)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn kind(&self) -> &'static str {
        "Conv2d"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(
            self,
            path,
            Op::Conv2d {
                weight: self.weight.clone(),
                bias: self.bias.clone(),
                params: self.params,
                act: None,
            },
            input,
            g,
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let c = self.weight.dims()[1] * self.params.groups;
        if input.len() == 4 && input[1] != c {
            return Err(shape_mismatch(
                "conv2d",
                format!("{c} input channels"),
                format!("{} channels (input {})", input[1], Shape::from(input)),
            ));
        }
        self.params.output_shape(input, self.weight.dims())
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        f(
            super::join(prefix, "weight"),
            &self.weight,
            TensorRole::Parameter,
        );
        visit_opt(prefix, "bias", &self.bias, TensorRole::Parameter, f);
    }
}

// ----- Linear ---------------------------------------------------------------------------------

/// `nn.Linear`: `y = x W^T + b`, weight `[out, in]`.
pub struct Linear {
    /// Weight `[out_features, in_features]`.
    pub weight: Tensor,
    /// Bias `[out_features]`, if enabled.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A linear layer with bias, initialised like PyTorch.
    pub fn new(in_features: usize, out_features: usize) -> Result<Linear> {
        Linear::with_bias(in_features, out_features, true)
    }

    /// A linear layer with or without bias.
    pub fn with_bias(in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        if in_features == 0 || out_features == 0 {
            return Err(invalid(
                "Linear",
                format!("features must be positive, got {in_features} -> {out_features}"),
            ));
        }
        init::claim("Linear", &[out_features, in_features])?;
        if bias {
            init::claim("Linear", &[out_features])?;
        }
        let weight = init::kaiming_uniform([out_features, in_features], in_features);
        let bias = bias.then(|| init::uniform_bias(out_features, in_features));
        Ok(Linear { weight, bias })
    }

    /// Number of input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref())
    }
    fn kind(&self) -> &'static str {
        "Linear"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(
            self,
            path,
            Op::Linear {
                weight: self.weight.clone(),
                bias: self.bias.clone(),
                act: None,
            },
            input,
            g,
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let want = self.in_features();
        match input.last() {
            Some(&got) if got == want => {
                let mut out = input.to_vec();
                *out.last_mut().expect("non-empty") = self.weight.dims()[0];
                Ok(Shape::new(out))
            }
            Some(&got) => Err(invalid(
                "linear",
                format!("expected {want} input features, got {got}"),
            )),
            None => Err(invalid(
                "linear",
                format!("expected input [*, {want}], got a scalar"),
            )),
        }
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        f(
            super::join(prefix, "weight"),
            &self.weight,
            TensorRole::Parameter,
        );
        visit_opt(prefix, "bias", &self.bias, TensorRole::Parameter, f);
    }
}

// ----- Pooling --------------------------------------------------------------------------------

pool_layer!(
    /// `nn.MaxPool2d`.
    ///
    /// ```
    /// use convnet::nn::{MaxPool2d, Module};
    /// assert_eq!(MaxPool2d::new(2).output_shape(&[1, 3, 8, 6])?.dims(), &[1, 3, 4, 3]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    MaxPool2d(MaxPool2dParams), max_pool2d, MaxPool2d, {
        fn forward_after_relu(&self, x: &Tensor, _mode: Mode) -> Option<Result<Tensor>> {
            Some(x.relu_max_pool2d(self.0))
        }
        fn as_any(&self) -> Option<&dyn std::any::Any> {
            Some(self)
        }
    }
);

pool_layer!(
    /// `nn.AvgPool2d`.
    ///
    /// ```
    /// use convnet::nn::{AvgPool2d, Module};
    /// let pool = AvgPool2d::with(convnet::AvgPool2dParams::new(3).stride(2).padding(1));
    /// assert_eq!(pool.output_shape(&[1, 3, 8, 8])?.dims(), &[1, 3, 4, 4]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    AvgPool2d(AvgPool2dParams), avg_pool2d, AvgPool2d
);

/// `nn.AdaptiveAvgPool2d` to a fixed output size.
#[derive(Clone, Copy, Debug)]
pub struct AdaptiveAvgPool2d(pub (usize, usize));

impl AdaptiveAvgPool2d {
    /// Output (height, width).
    pub fn new(oh: usize, ow: usize) -> Self {
        AdaptiveAvgPool2d((oh, ow))
    }
}

impl Module for AdaptiveAvgPool2d {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.adaptive_avg_pool2d(self.0)
    }
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(self, path, Op::AdaptiveAvgPool2d(self.0), input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        if input.len() != 4 {
            return Err(shape_mismatch(
                "adaptive_avg_pool2d",
                "input [N, C, H, W]",
                Shape::from(input).to_string(),
            ));
        }
        if self.0 .0 == 0 || self.0 .1 == 0 {
            return Err(invalid(
                "adaptive_avg_pool2d",
                "output size must be positive",
            ));
        }
        Ok(Shape::new([input[0], input[1], self.0 .0, self.0 .1]))
    }
}

// ----- Activations ----------------------------------------------------------------------------

macro_rules! activation_layer {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $act:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name;
        impl Module for $name {
            fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
                x.activation($act)
            }
            fn kind(&self) -> &'static str {
                $kind
            }
            fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
                super::push_leaf(self, path, Op::Activation($act), input, g)
            }
            fn output_shape(&self, input: &[usize]) -> Result<Shape> {
                Ok(Shape::from(input))
            }
        }
    };
}

activation_layer!(
    /// `nn.ReLU`.
    ReLU, "ReLU", Activation::Relu);
activation_layer!(
    /// `nn.ReLU6`: `min(max(x, 0), 6)`, MobileNet's activation.
    ReLU6, "ReLU6", Activation::Relu6);
activation_layer!(
    /// `nn.Sigmoid`.
    Sigmoid, "Sigmoid", Activation::Sigmoid);
activation_layer!(
    /// `nn.Tanh`.
    Tanh, "Tanh", Activation::Tanh);
activation_layer!(
    /// `nn.GELU` (exact form).
    GELU, "GELU", Activation::Gelu);
activation_layer!(
    /// `nn.GELU(approximate="tanh")`.
    GELUTanh, "GELU", Activation::GeluTanh);

/// `nn.LeakyReLU` with its negative slope (PyTorch default 0.01).
#[derive(Clone, Copy, Debug)]
pub struct LeakyReLU(pub f32);

impl Default for LeakyReLU {
    fn default() -> Self {
        LeakyReLU(0.01)
    }
}

impl Module for LeakyReLU {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.leaky_relu(self.0)
    }
    fn kind(&self) -> &'static str {
        "LeakyReLU"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(
            self,
            path,
            Op::Activation(Activation::LeakyRelu(self.0)),
            input,
            g,
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        Ok(Shape::from(input))
    }
}

/// `nn.Softmax(dim)`.
#[derive(Clone, Copy, Debug)]
pub struct Softmax(pub isize);

impl Module for Softmax {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.softmax(self.0)
    }
    fn kind(&self) -> &'static str {
        "Softmax"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(self, path, Op::Softmax(self.0), input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        crate::shape::normalize_dim(self.0, input.len())?;
        Ok(Shape::from(input))
    }
}

// ----- Dropout, Flatten ----------------------------------------------------------------------

/// `nn.Dropout(p)`: active only in [`Mode::Train`]; masks come from the global generator.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    p: f32,
}

impl Dropout {
    /// Dropout with probability `p` in `[0, 1]`.
    ///
    /// ```
    /// assert!(convnet::nn::Dropout::new(-0.1).is_err());
    /// ```
    pub fn new(p: f32) -> Result<Dropout> {
        if !(0.0..=1.0).contains(&p) {
            return Err(invalid(
                "Dropout",
                format!("probability must be in [0, 1], got {p}"),
            ));
        }
        Ok(Dropout { p })
    }
}

impl Module for Dropout {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if !mode.is_train() {
            return Ok(x.clone());
        }
        with_global_rng(|r| x.dropout(self.p, true, r))
    }
    fn kind(&self) -> &'static str {
        "Dropout"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(self, path, Op::Dropout(self.p), input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        Ok(Shape::from(input))
    }
}

/// `nn.Flatten()`: flattens all dimensions after the batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Flatten {
    start_dim: usize,
}

impl Flatten {
    /// Flattens from dimension 1 (PyTorch's default).
    pub fn new() -> Self {
        Flatten { start_dim: 1 }
    }
}

impl Module for Flatten {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.flatten(self.start_dim)
    }
    fn kind(&self) -> &'static str {
        "Flatten"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(
            self,
            path,
            Op::Flatten {
                start_dim: self.start_dim,
            },
            input,
            g,
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        if self.start_dim >= input.len() {
            return Err(invalid(
                "flatten",
                format!(
                    "start_dim {} is out of range for input {}",
                    self.start_dim,
                    Shape::from(input)
                ),
            ));
        }
        let mut out = input[..self.start_dim].to_vec();
        out.push(
            crate::shape::checked_numel(&input[self.start_dim..]).ok_or_else(|| {
                invalid(
                    "flatten",
                    format!("input {} has too many elements", Shape::from(input)),
                )
            })?,
        );
        Ok(Shape::new(out))
    }
}
