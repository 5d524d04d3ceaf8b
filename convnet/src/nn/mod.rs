//! Neural-network layers with `torch.nn`'s constructor arguments, default initialisation and
//! `state_dict` names, plus [`Sequential`] containers and [`Model`], which runs shape
//! inference when it is built and prints a summary table.

/// A pooling layer: a `Copy` wrapper of its parameters with `new(k)` (window `k`, stride
/// `k`) and `with(params)`, whose forward pass is one tensor method and whose graph op
/// carries the parameters; extra `Module` methods go in the trailing braces.
macro_rules! pool_layer {
    ($(#[$doc:meta])* $name:ident($params:ty), $method:ident, $op:ident $(, { $($extra:tt)* })?) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(pub $params);

        impl $name {
            /// Window `k`, stride `k`.
            pub fn new(k: usize) -> Self {
                $name(<$params>::new(k))
            }
            /// With explicit parameters.
            pub fn with(params: $params) -> Self {
                $name(params)
            }
        }

        impl Module for $name {
            fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
                x.$method(self.0)
            }
            fn kind(&self) -> &'static str {
                stringify!($name)
            }
            fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
                super::push_leaf(self, path, Op::$op(self.0), input, g)
            }
            fn output_shape(&self, input: &[usize]) -> Result<Shape> {
                self.0.output_shape(input)
            }
            $($($extra)*)?
        }
    };
}

mod batch_norm;
mod init;
mod layers;
mod mobilenet;
mod model;
mod resnet;
mod seq;
mod sequential;

pub(crate) use batch_norm::{batch_norm_state, is_batch_counter};
pub use batch_norm::{BatchNorm1d, BatchNorm2d, BatchNormState};
pub use init::{kaiming_uniform, uniform_bias, with_parameter_limit, MAX_PARAMETERS};
pub use layers::{
    AdaptiveAvgPool2d, AvgPool2d, Conv2d, Conv2dBuilder, Dropout, Flatten, GELUTanh, LeakyReLU,
    Linear, MaxPool2d, ReLU, ReLU6, Sigmoid, Softmax, Tanh, GELU,
};
pub use mobilenet::{conv_bn_relu6, InvertedResidual};
pub use model::{Model, SummaryRow};
pub use resnet::{BasicBlock, Bottleneck, Shortcut};
pub use seq::{
    AdaptiveAvgPool1d, AdaptiveMaxPool1d, AvgPool1d, Conv1d, Conv1dBuilder, ConvBank1d, Embedding,
    MaxPool1d, Permute,
};
pub use sequential::Sequential;

use crate::error::{Error, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// Whether a forward pass is for training or evaluation. Passed explicitly so that Dropout
/// and BatchNorm can never silently run in the wrong mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Dropout active, BatchNorm uses and updates batch statistics.
    Train,
    /// Dropout is the identity, BatchNorm uses running statistics.
    Eval,
}

impl Mode {
    /// True for [`Mode::Train`].
    pub fn is_train(self) -> bool {
        self == Mode::Train
    }
}

/// What a named tensor of a module is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorRole {
    /// Trained by the optimizer (`nn.Parameter`).
    Parameter,
    /// State that is saved but not trained (BatchNorm running statistics).
    Buffer,
}

/// A layer or a container of layers.
pub trait Module: Send + Sync {
    /// Runs the layer on a batch.
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor>;

    /// The `torch.nn` class name, e.g. `"Conv2d"`.
    fn kind(&self) -> &'static str;

    /// Output shape for an input shape (batch dimension included), or an error saying why
    /// the input does not fit.
    fn output_shape(&self, input: &[usize]) -> Result<Shape>;

    /// Calls `f` for every parameter and buffer with its `state_dict` name under `prefix`.
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        let _ = (prefix, f);
    }

    /// Appends this layer's nodes to `g` (eval-mode semantics), reading the value `input`,
    /// named under the layer's `state_dict` path `path`; returns the layer's output value.
    /// This one description is what ONNX export, the inference plan and quantization read.
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        let _ = (input, g);
        Err(Error::Unsupported(format!(
            "{path} ({}) has no graph description",
            self.kind()
        )))
    }

    /// Calls `f` for every layer inside this one (not for this one), each with its
    /// `state_dict` path under `prefix`: a container's children before their own children.
    /// Leaves have none. With [`Module::as_any`] this finds layers of a kind by name (the
    /// BatchNorm layers that [`Model::freeze`] keeps in eval mode).
    fn visit_modules(&self, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
        let _ = (prefix, f);
    }

    /// `self.forward(relu(x))` as one fused op, where the layer has one (max pooling: the
    /// maximum commutes with ReLU); `None` otherwise. [`Sequential`] uses it for a ReLU
    /// followed by such a layer; the values and gradients are those of the two layers.
    fn forward_after_relu(&self, x: &Tensor, mode: Mode) -> Option<Result<Tensor>> {
        let _ = (x, mode);
        None
    }

    /// The module as `Any`, for callers that need a layer's or wrapper's own methods (such
    /// as a quantization-aware network's, or a BatchNorm layer's); `None` for most layers.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Shape inference with summary rows; containers override it to recurse. Errors name the
    /// layer by its path.
    fn infer(&self, path: &str, input: &[usize], rows: &mut Vec<SummaryRow>) -> Result<Shape> {
        let out = self
            .output_shape(input)
            .and_then(|out| match out.checked_numel() {
                Some(n) if n <= MAX_ACTIVATION => Ok(out),
                _ => Err(crate::error::invalid(
                    "shape",
                    format!(
                        "its output {out} for one image is larger than the {MAX_ACTIVATION} values a layer may produce"
                    ),
                )),
            })
            .map_err(|e| match e {
                Error::Layer { .. } => e,
                other => Error::Layer {
                    layer: path.to_string(),
                    kind: self.kind(),
                    msg: layer_message(&other),
                },
            })?;
        let mut params = 0;
        self.visit_tensors("", &mut |_, t, role| {
            if role == TensorRole::Parameter {
                params += t.numel();
            }
        });
        rows.push(SummaryRow {
            name: path.to_string(),
            kind: self.kind(),
            output_shape: out.clone(),
            params,
        });
        Ok(out)
    }
}

/// The most values one layer may produce for one image (2^34, 64 GiB of float32): shape
/// inference refuses anything larger, naming the layer, before data flows.
pub const MAX_ACTIVATION: usize = 1 << 34;

/// The part of an op's error worth repeating under a layer name (without the op prefix).
fn layer_message(e: &Error) -> String {
    match e {
        Error::InvalidArgument { msg, .. } => msg.clone(),
        Error::ShapeMismatch { expected, got, .. } => format!("expected {expected}, got {got}"),
        other => other.to_string(),
    }
}

/// Appends the single node `op` of a leaf layer, with the output shape the layer infers.
pub(crate) fn push_leaf(
    layer: &dyn Module,
    path: &str,
    op: Op,
    input: ValueId,
    g: &mut Graph,
) -> Result<ValueId> {
    let shape = layer
        .output_shape(g.shape(input).dims())
        .map_err(|e| Error::Layer {
            layer: path.to_string(),
            kind: layer.kind(),
            msg: layer_message(&e),
        })?;
    g.push(path, op, &[input], shape)
}

/// Joins a module path and a child name the way `state_dict` keys are joined.
pub(crate) fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Named parameters of a module, in registration order.
pub fn named_parameters(m: &dyn Module) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    m.visit_tensors("", &mut |name, t, role| {
        if role == TensorRole::Parameter {
            out.push((name, t.clone()));
        }
    });
    out
}

/// Named parameters and buffers of a module, as `state_dict()` orders them.
pub fn state_dict(m: &dyn Module) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    m.visit_tensors("", &mut |name, t, _| out.push((name, t.clone())));
    out
}
