//! A model as a graph of layer values: the one description that ONNX export, the inference
//! plan (BatchNorm folding, fused epilogues), quantization and layer capture read.
//!
//! Every [`crate::nn::Module`] describes itself through [`crate::nn::Module::describe`]:
//! it appends [`Node`]s (an [`Op`] with its parameters, the values it reads, its output
//! shape) named by the layer's `state_dict` path. Parameter tensors are shared with the
//! model, not copied, so a graph reads the model's current weights.
//!
//! ```
//! use convnet::graph::Op;
//! let model = convnet::models::build("resnet20", [3, 32, 32], 10)?;
//! let g = model.graph()?;
//! let convs = g.nodes().iter().filter(|n| matches!(n.op, Op::Conv2d { .. })).count();
//! assert_eq!(convs, 19);
//! assert_eq!(g.node(g.output()).shape.dims(), &[1, 10]);
//! assert_eq!(g.node(g.output()).name, "fc");
//! # Ok::<(), convnet::Error>(())
//! ```

pub mod capture;
pub mod eval;
pub mod fold;

use crate::backend::cpu::activation::Activation;
use crate::error::{invalid, Result};
use crate::shape::Shape;
use crate::tensor::{
    AvgPool1dParams, AvgPool2dParams, Conv1dParams, Conv2dParams, MaxPool1dParams, MaxPool2dParams,
    Tensor,
};

/// A value of the graph: the output of the node with this index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

/// What a node computes (eval-mode semantics; training-only behaviour such as Dropout is
/// absent).
#[derive(Clone, Debug)]
pub enum Op {
    /// The model input `[1, C, H, W]`.
    Input,
    /// `nn.Conv2d`: weight `[K, C/groups, KH, KW]`, optional bias `[K]`. A fused graph
    /// ([`fold::fuse`]) may give it a second input, added to the convolution's output
    /// before `act` (the end of a residual block), and an activation.
    Conv2d {
        /// Kernel weights.
        weight: Tensor,
        /// Bias, if any.
        bias: Option<Tensor>,
        /// Stride, padding, dilation and groups.
        params: Conv2dParams,
        /// Activation applied to the output (after the residual), if fused.
        act: Option<Activation>,
    },
    /// `nn.Linear`: weight `[out, in]`, optional bias `[out]`, and a fused activation.
    Linear {
        /// Weight.
        weight: Tensor,
        /// Bias, if any.
        bias: Option<Tensor>,
        /// Activation applied to the output, if fused.
        act: Option<Activation>,
    },
    /// `nn.BatchNorm2d` with running statistics.
    BatchNorm2d {
        /// Scale (gamma).
        weight: Tensor,
        /// Shift (beta).
        bias: Tensor,
        /// Running mean.
        mean: Tensor,
        /// Running variance.
        var: Tensor,
        /// Added to the variance.
        eps: f32,
        /// Weight of a batch's statistics in the running ones (training).
        momentum: f32,
        /// Batches seen (`num_batches_tracked`), counted in training.
        batches: Tensor,
    },
    /// `nn.Conv1d` over `[N, C, L]`: weight `[K, C/groups, k]`, optional bias `[K]`.
    Conv1d {
        /// Kernel weights.
        weight: Tensor,
        /// Bias, if any.
        bias: Option<Tensor>,
        /// Stride, padding, dilation and groups.
        params: Conv1dParams,
    },
    /// `nn.BatchNorm1d` over `[N, C]` or `[N, C, L]` with running statistics.
    BatchNorm1d {
        /// Scale (gamma).
        weight: Tensor,
        /// Shift (beta).
        bias: Tensor,
        /// Running mean.
        mean: Tensor,
        /// Running variance.
        var: Tensor,
        /// Added to the variance.
        eps: f32,
        /// Weight of a batch's statistics in the running ones (training).
        momentum: f32,
        /// Batches seen (`num_batches_tracked`), counted in training.
        batches: Tensor,
    },
    /// `nn.MaxPool1d`.
    MaxPool1d(MaxPool1dParams),
    /// `nn.AvgPool1d`.
    AvgPool1d(AvgPool1dParams),
    /// `nn.AdaptiveAvgPool1d` to a length.
    AdaptiveAvgPool1d(usize),
    /// `nn.AdaptiveMaxPool1d` to a length.
    AdaptiveMaxPool1d(usize),
    /// `nn.Embedding`: the rows of `weight [V, D]` picked by integer ids (carried as floats).
    Embedding {
        /// The table.
        weight: Tensor,
        /// The padding row, if any.
        padding_idx: Option<usize>,
    },
    /// `nn.Dropout(p)`: the identity in eval mode.
    Dropout(f32),
    /// An element-wise activation.
    Activation(Activation),
    /// `nn.MaxPool2d`.
    MaxPool2d(MaxPool2dParams),
    /// `nn.AvgPool2d`.
    AvgPool2d(AvgPool2dParams),
    /// `nn.AdaptiveAvgPool2d` to (height, width).
    AdaptiveAvgPool2d((usize, usize)),
    /// `nn.Flatten(start_dim)`.
    Flatten {
        /// First dimension flattened.
        start_dim: usize,
    },
    /// `nn.Softmax(dim)`.
    Softmax(isize),
    /// Element-wise sum of two values of the same shape (a residual connection).
    Add,
    /// `x.permute(dims)`: the input's dimensions reordered (`[0, 2, 1]` turns embeddings
    /// `[N, L, D]` into channels `[N, D, L]`).
    Permute(Vec<usize>),
    /// `torch.cat(inputs, dim)`: the inputs joined along `dim` (the other sizes agree).
    Concat(usize),
    /// The option-A ResNet shortcut: subsample by `stride`, then put `before` zero channels
    /// in front and zero channels after, `planes` in all.
    PadChannels {
        /// Spatial subsampling step.
        stride: usize,
        /// Zero channels before the input's.
        before: usize,
        /// Output channels.
        planes: usize,
    },
}

impl Op {
    /// A short name of the op (`"Conv2d"`, `"Add"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input => "Input",
            Op::Conv2d { .. } => "Conv2d",
            Op::Linear { .. } => "Linear",
            Op::BatchNorm2d { .. } => "BatchNorm2d",
            Op::Conv1d { .. } => "Conv1d",
            Op::BatchNorm1d { .. } => "BatchNorm1d",
            Op::MaxPool1d(_) => "MaxPool1d",
            Op::AvgPool1d(_) => "AvgPool1d",
            Op::AdaptiveAvgPool1d(_) => "AdaptiveAvgPool1d",
            Op::AdaptiveMaxPool1d(_) => "AdaptiveMaxPool1d",
            Op::Embedding { .. } => "Embedding",
            Op::Dropout(_) => "Dropout",
            Op::Activation(a) => a.name(),
            Op::MaxPool2d(_) => "MaxPool2d",
            Op::AvgPool2d(_) => "AvgPool2d",
            Op::AdaptiveAvgPool2d(_) => "AdaptiveAvgPool2d",
            Op::Flatten { .. } => "Flatten",
            Op::Softmax(_) => "Softmax",
            Op::Add => "Add",
            Op::Permute(_) => "Permute",
            Op::Concat(_) => "Concat",
            Op::PadChannels { .. } => "PadChannels",
        }
    }

    /// The op's tensors, in the order of [`Op::tensors`], to replace them.
    pub(crate) fn tensors_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Op::Conv2d { weight, bias, .. }
            | Op::Conv1d { weight, bias, .. }
            | Op::Linear { weight, bias, .. } => {
                let mut v = vec![weight];
                v.extend(bias.as_mut());
                v
            }
            Op::BatchNorm2d {
                weight,
                bias,
                mean,
                var,
                ..
            }
            | Op::BatchNorm1d {
                weight,
                bias,
                mean,
                var,
                ..
            } => vec![weight, bias, mean, var],
            Op::Embedding { weight, .. } => vec![weight],
            _ => Vec::new(),
        }
    }

    /// The named tensors of the op (`weight`, `bias`, ...), in `state_dict` order.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Op::Conv2d { weight, bias, .. }
            | Op::Conv1d { weight, bias, .. }
            | Op::Linear { weight, bias, .. } => {
                let mut v = vec![("weight", weight)];
                if let Some(b) = bias {
                    v.push(("bias", b));
                }
                v
            }
            Op::BatchNorm2d {
                weight,
                bias,
                mean,
                var,
                ..
            }
            | Op::BatchNorm1d {
                weight,
                bias,
                mean,
                var,
                ..
            } => vec![
                ("weight", weight),
                ("bias", bias),
                ("running_mean", mean),
                ("running_var", var),
            ],
            Op::Embedding { weight, .. } => vec![("weight", weight)],
            _ => Vec::new(),
        }
    }
}

/// One node: an op named after its layer, the values it reads and its output shape for a
/// batch of one.
#[derive(Clone, Debug)]
pub struct Node {
    /// The layer's `state_dict` path (`layer1.0.conv1`); unique within a graph.
    pub name: String,
    /// What it computes.
    pub op: Op,
    /// The values it reads.
    pub inputs: Vec<ValueId>,
    /// Its output shape with a batch of one.
    pub shape: Shape,
}

/// A model as nodes in execution order (every node reads only earlier nodes); node 0 is the
/// input.
#[derive(Clone, Debug)]
pub struct Graph {
    nodes: Vec<Node>,
    output: ValueId,
}

impl Graph {
    /// A graph holding only the input of shape `[C, H, W]` (or any shape, without the batch
    /// dimension); layers append to it with [`Graph::push`].
    pub fn new(input_shape: &[usize]) -> Graph {
        let mut dims = vec![1];
        dims.extend_from_slice(input_shape);
        Graph {
            nodes: vec![Node {
                name: "input".into(),
                op: Op::Input,
                inputs: Vec::new(),
                shape: Shape::new(dims),
            }],
            output: ValueId(0),
        }
    }

    /// The graph `net` describes for inputs of shape `input_shape` (batch excluded).
    pub fn of(net: &dyn crate::nn::Module, input_shape: &[usize]) -> Result<Graph> {
        let mut g = Graph::new(input_shape);
        let out = net.describe("", g.input(), &mut g)?;
        g.set_output(out);
        Ok(g)
    }

    /// The input value.
    pub fn input(&self) -> ValueId {
        ValueId(0)
    }

    /// The value the model returns (the last pushed node unless set).
    pub fn output(&self) -> ValueId {
        self.output
    }

    /// Makes `v` the model's output.
    pub fn set_output(&mut self, v: ValueId) {
        self.output = v;
    }

    /// The nodes in execution order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The nodes, to replace their tensors (the structure stays).
    pub(crate) fn nodes_mut(&mut self) -> &mut [Node] {
        &mut self.nodes
    }

    /// The node producing `v`.
    pub fn node(&self, v: ValueId) -> &Node {
        &self.nodes[v.0]
    }

    /// The shape of `v` (batch of one).
    pub fn shape(&self, v: ValueId) -> &Shape {
        &self.nodes[v.0].shape
    }

    /// Appends a node named `name` (made unique with a `#2`, `#3`, ... suffix when a layer
    /// is applied twice) and returns its value, which becomes the output.
    pub fn push(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[ValueId],
        shape: Shape,
    ) -> Result<ValueId> {
        if let Some(bad) = inputs.iter().find(|v| v.0 >= self.nodes.len()) {
            return Err(invalid(
                "graph",
                format!("{name} reads value {} that does not exist yet", bad.0),
            ));
        }
        let base = if name.is_empty() { op.kind() } else { name };
        let mut unique = base.to_string();
        let mut n = 1;
        while self.nodes.iter().any(|node| node.name == unique) {
            n += 1;
            unique = format!("{base}#{n}");
        }
        self.nodes.push(Node {
            name: unique,
            op,
            inputs: inputs.to_vec(),
            shape,
        });
        self.output = ValueId(self.nodes.len() - 1);
        Ok(self.output)
    }

    /// How many nodes read each value (the output counts as one reader).
    pub fn readers(&self) -> Vec<usize> {
        let mut n = vec![0; self.nodes.len()];
        for node in &self.nodes {
            for v in &node.inputs {
                n[v.0] += 1;
            }
        }
        n[self.output.0] += 1;
        n
    }

    /// Finds the node named `name`.
    pub fn find(&self, name: &str) -> Option<ValueId> {
        self.nodes.iter().position(|n| n.name == name).map(ValueId)
    }

    /// The graph without nodes the output does not depend on, and for each old node its
    /// new index (`usize::MAX` if removed).
    pub(crate) fn pruned_with_map(self) -> (Graph, Vec<usize>) {
        let mut live = vec![false; self.nodes.len()];
        live[self.output.0] = true;
        live[0] = true;
        for i in (0..self.nodes.len()).rev() {
            if live[i] {
                for v in &self.nodes[i].inputs {
                    live[v.0] = true;
                }
            }
        }
        let mut map = vec![usize::MAX; self.nodes.len()];
        let mut nodes = Vec::new();
        for (i, mut node) in self.nodes.into_iter().enumerate() {
            if live[i] {
                map[i] = nodes.len();
                for v in &mut node.inputs {
                    v.0 = map[v.0];
                }
                nodes.push(node);
            }
        }
        (
            Graph {
                output: ValueId(map[self.output.0]),
                nodes,
            },
            map,
        )
    }
}
