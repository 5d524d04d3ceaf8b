//! ONNX export: a [`Model`] as a standard ONNX graph (opset 17, IR version 8) with its
//! weights as initializers under their `state_dict` names.
//!
//! The export is a pass over the model's [`crate::graph::Graph`], in eval-mode semantics
//! (Dropout is the identity, BatchNorm uses running statistics). The graph input
//! `input` is `[batch, C, H, W]` float32 with a symbolic batch size; the output `logits` is
//! `[batch, classes]`.
//!
//! ```
//! let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
//! let bytes = convnet::onnx::export(&model, "seed-cnn")?;
//! assert!(bytes.len() > 4 * model.num_parameters());
//! # Ok::<(), convnet::Error>(())
//! ```

mod proto;

use crate::backend::cpu::activation::Activation;
use crate::error::{Error, Result};
use crate::graph::{Node, Op};
use crate::nn::Model;
use crate::tensor::Tensor;
use prost::Message;
use proto::*;

/// The ONNX operator set the exporter targets.
pub const OPSET: i64 = 17;
const IR_VERSION: i64 = 8;

/// An ONNX node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    /// One integer.
    Int(i64),
    /// A list of integers.
    Ints(Vec<i64>),
    /// One float.
    Float(f32),
}

/// Collects nodes and initializers while layers export themselves.
#[derive(Default)]
pub struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    counter: usize,
}

impl GraphBuilder {
    /// Adds a float32 initializer named `name` (a `state_dict` key) and returns the name.
    pub fn weight(&mut self, name: &str, t: &Tensor) -> String {
        let raw = t.with_data(|d| d.iter().flat_map(|v| v.to_le_bytes()).collect());
        self.initializers.push(TensorProto {
            dims: t.dims().iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.to_string(),
            raw_data: raw,
        });
        name.to_string()
    }

    /// Adds an initializer of raw little-endian bytes with ONNX data type `data_type`.
    fn raw(&mut self, name: &str, dims: &[usize], data_type: i32, raw_data: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.to_string(),
            raw_data,
        });
        name.to_string()
    }

    /// Adds a float32 scalar constant and returns its name.
    pub fn scalar(&mut self, hint: &str, value: f32) -> String {
        self.counter += 1;
        let name = format!("{hint}/const{}", self.counter);
        self.initializers.push(TensorProto {
            dims: vec![],
            data_type: FLOAT,
            name: name.clone(),
            raw_data: value.to_le_bytes().to_vec(),
        });
        name
    }

    /// Adds a 1-D int64 constant and returns its name.
    pub fn ints(&mut self, hint: &str, values: &[i64]) -> String {
        self.counter += 1;
        let name = format!("{hint}/const{}", self.counter);
        self.initializers.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: INT64,
            name: name.clone(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
        name
    }

    /// Adds node `op` named after the layer `path`, reading `inputs`; returns its output.
    pub fn node(
        &mut self,
        op: &str,
        path: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
    ) -> String {
        self.counter += 1;
        let base = if path.is_empty() { op } else { path };
        let name = format!("{base}/{op}{}", self.counter);
        let output = format!("{name}:0");
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name,
            op_type: op.to_string(),
            attribute: attrs
                .iter()
                .map(|(n, a)| {
                    let mut p = AttributeProto {
                        name: n.to_string(),
                        ..Default::default()
                    };
                    match a {
                        Attr::Int(i) => {
                            p.i = *i;
                            p.r#type = attr_type::INT;
                        }
                        Attr::Ints(v) => {
                            p.ints = v.clone();
                            p.r#type = attr_type::INTS;
                        }
                        Attr::Float(f) => {
                            p.f = *f;
                            p.r#type = attr_type::FLOAT;
                        }
                    }
                    p
                })
                .collect(),
        });
        output
    }

    /// Renames the output of the last node (used to name the graph output).
    fn rename_last_output(&mut self, from: &str, to: &str) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .rev()
            .find(|n| n.output.iter().any(|o| o == from))
            .ok_or_else(|| Error::Unsupported("an ONNX graph without nodes".into()))?;
        for o in node.output.iter_mut().filter(|o| *o == from) {
            *o = to.to_string();
        }
        Ok(())
    }
}

/// An error for a layer setting ONNX cannot express.
pub fn unsupported(path: &str, kind: &str, why: &str) -> Error {
    Error::Unsupported(format!("{path} ({kind}) cannot be exported to ONNX: {why}"))
}

/// Nodes computing `act(input)`; returns the output name.
pub fn activation(
    g: &mut GraphBuilder,
    act: Activation,
    path: &str,
    input: &str,
) -> Result<String> {
    Ok(match act {
        Activation::Relu => g.node("Relu", path, &[input], &[]),
        Activation::Relu6 => {
            let (lo, hi) = (g.scalar(path, 0.0), g.scalar(path, 6.0));
            g.node("Clip", path, &[input, &lo, &hi], &[])
        }
        Activation::LeakyRelu(s) => {
            g.node("LeakyRelu", path, &[input], &[("alpha", Attr::Float(s))])
        }
        Activation::Sigmoid => g.node("Sigmoid", path, &[input], &[]),
        Activation::Tanh => g.node("Tanh", path, &[input], &[]),
        Activation::Gelu => {
            // x * 0.5 * (1 + erf(x / sqrt(2))); opset 17 has no Gelu.
            let c = g.scalar(path, std::f32::consts::FRAC_1_SQRT_2);
            let scaled = g.node("Mul", path, &[input, &c], &[]);
            let erf = g.node("Erf", path, &[&scaled], &[]);
            half_x_times_one_plus(g, path, input, &erf)
        }
        Activation::GeluTanh => {
            // x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
            let three = g.scalar(path, 3.0);
            let cube = g.node("Pow", path, &[input, &three], &[]);
            let k = g.scalar(path, 0.044715);
            let kc = g.node("Mul", path, &[&cube, &k], &[]);
            let inner = g.node("Add", path, &[input, &kc], &[]);
            let s = g.scalar(path, (2.0 / std::f32::consts::PI).sqrt());
            let scaled = g.node("Mul", path, &[&inner, &s], &[]);
            let t = g.node("Tanh", path, &[&scaled], &[]);
            half_x_times_one_plus(g, path, input, &t)
        }
    })
}

/// `x * 0.5 * (1 + t)`.
fn half_x_times_one_plus(g: &mut GraphBuilder, path: &str, x: &str, t: &str) -> String {
    let one = g.scalar(path, 1.0);
    let sum = g.node("Add", path, &[t, &one], &[]);
    let half = g.scalar(path, 0.5);
    let h = g.node("Mul", path, &[&sum, &half], &[]);
    g.node("Mul", path, &[x, &h], &[])
}

fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: FLOAT,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| match d {
                            Some(v) => Dimension {
                                dim_value: Some(*v as i64),
                                dim_param: None,
                            },
                            None => Dimension {
                                dim_value: None,
                                dim_param: Some("batch".into()),
                            },
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

/// ONNX `pads` (begin H, begin W, end H, end W) for symmetric padding.
fn pads(p: (usize, usize)) -> Vec<i64> {
    vec![p.0 as i64, p.1 as i64, p.0 as i64, p.1 as i64]
}

fn pair(p: (usize, usize)) -> Vec<i64> {
    vec![p.0 as i64, p.1 as i64]
}

/// Adds the ONNX nodes of one graph node reading `inputs` (whose first has shape `shape`);
/// returns the name of its output.
fn node_onnx(
    node: &Node,
    inputs: &[String],
    shape: &[usize],
    g: &mut GraphBuilder,
) -> Result<String> {
    let path = node.name.as_str();
    let input = inputs[0].as_str();
    let weights = |g: &mut GraphBuilder| -> Vec<String> {
        let mut v = vec![input.to_string()];
        for (name, t) in node.op.tensors() {
            v.push(g.weight(&format!("{path}.{name}"), t));
        }
        v
    };
    Ok(match &node.op {
        Op::Input => input.to_string(),
        Op::Conv2d {
            weight,
            params,
            act,
            ..
        } => {
            let refs = weights(g);
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            let d = weight.dims();
            let conv = g.node(
                "Conv",
                path,
                &refs,
                &[
                    ("kernel_shape", Attr::Ints(vec![d[2] as i64, d[3] as i64])),
                    ("strides", Attr::Ints(pair(params.stride))),
                    ("pads", Attr::Ints(pads(params.padding))),
                    ("dilations", Attr::Ints(pair(params.dilation))),
                    ("group", Attr::Int(params.groups as i64)),
                ],
            );
            let sum = match inputs.get(1) {
                Some(residual) => g.node("Add", path, &[&conv, residual], &[]),
                None => conv,
            };
            match act {
                Some(act) => activation(g, *act, path, &sum)?,
                None => sum,
            }
        }
        Op::Linear { act, .. } => {
            if shape.len() != 2 {
                return Err(unsupported(
                    path,
                    "Linear",
                    "only [N, features] inputs are exported",
                ));
            }
            let refs = weights(g);
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            let y = g.node("Gemm", path, &refs, &[("transB", Attr::Int(1))]);
            match act {
                Some(act) => activation(g, *act, path, &y)?,
                None => y,
            }
        }
        Op::BatchNorm2d { eps, .. } => {
            let refs = weights(g);
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            g.node(
                "BatchNormalization",
                path,
                &refs,
                &[
                    ("epsilon", Attr::Float(*eps)),
                    ("momentum", Attr::Float(0.9)),
                ],
            )
        }
        Op::Activation(act) => activation(g, *act, path, input)?,
        Op::Dropout(_) => g.node("Identity", path, &[input], &[]),
        Op::MaxPool2d(p) => g.node(
            "MaxPool",
            path,
            &[input],
            &[
                ("kernel_shape", Attr::Ints(pair(p.kernel))),
                ("strides", Attr::Ints(pair(p.stride))),
                ("pads", Attr::Ints(pads(p.padding))),
                ("dilations", Attr::Ints(pair(p.dilation))),
                ("ceil_mode", Attr::Int(p.ceil_mode as i64)),
            ],
        ),
        Op::AvgPool2d(p) => {
            if p.ceil_mode {
                // PyTorch drops windows that start in the right padding; ONNX does not.
                return Err(unsupported(
                    path,
                    "AvgPool2d",
                    "ceil_mode has no exact ONNX form",
                ));
            }
            g.node(
                "AveragePool",
                path,
                &[input],
                &[
                    ("kernel_shape", Attr::Ints(pair(p.kernel))),
                    ("strides", Attr::Ints(pair(p.stride))),
                    ("pads", Attr::Ints(pads(p.padding))),
                    ("count_include_pad", Attr::Int(p.count_include_pad as i64)),
                ],
            )
        }
        Op::AdaptiveAvgPool2d((oh, ow)) => {
            if (*oh, *ow) == (1, 1) {
                return Ok(g.node("GlobalAveragePool", path, &[input], &[]));
            }
            let (h, w) = (shape[2], shape[3]);
            if h % oh != 0 || w % ow != 0 {
                return Err(unsupported(
                    path,
                    "AdaptiveAvgPool2d",
                    &format!("{h}x{w} does not divide into {oh}x{ow} equal windows"),
                ));
            }
            let k = vec![(h / oh) as i64, (w / ow) as i64];
            g.node(
                "AveragePool",
                path,
                &[input],
                &[
                    ("kernel_shape", Attr::Ints(k.clone())),
                    ("strides", Attr::Ints(k)),
                ],
            )
        }
        Op::Conv1d { weight, params, .. } => {
            let refs = weights(g);
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            let p = *params;
            g.node(
                "Conv",
                path,
                &refs,
                &[
                    ("kernel_shape", Attr::Ints(vec![weight.dims()[2] as i64])),
                    ("strides", Attr::Ints(vec![p.stride as i64])),
                    ("pads", Attr::Ints(vec![p.padding as i64; 2])),
                    ("dilations", Attr::Ints(vec![p.dilation as i64])),
                    ("group", Attr::Int(p.groups as i64)),
                ],
            )
        }
        Op::BatchNorm1d { eps, .. } => {
            // ONNX BatchNormalization normalises axis 1 of [N, C, D1, ...] and of [N, C].
            let refs = weights(g);
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            g.node(
                "BatchNormalization",
                path,
                &refs,
                &[
                    ("epsilon", Attr::Float(*eps)),
                    ("momentum", Attr::Float(0.9)),
                ],
            )
        }
        Op::MaxPool1d(p) => g.node(
            "MaxPool",
            path,
            &[input],
            &[
                ("kernel_shape", Attr::Ints(vec![p.kernel as i64])),
                ("strides", Attr::Ints(vec![p.stride as i64])),
                ("pads", Attr::Ints(vec![p.padding as i64; 2])),
                ("dilations", Attr::Ints(vec![p.dilation as i64])),
                ("ceil_mode", Attr::Int(p.ceil_mode as i64)),
            ],
        ),
        Op::AvgPool1d(p) => {
            if p.ceil_mode {
                // As for AvgPool2d: PyTorch's partial last window has no exact ONNX form.
                return Err(unsupported(
                    path,
                    "AvgPool1d",
                    "ceil_mode has no exact ONNX form",
                ));
            }
            g.node(
                "AveragePool",
                path,
                &[input],
                &[
                    ("kernel_shape", Attr::Ints(vec![p.kernel as i64])),
                    ("strides", Attr::Ints(vec![p.stride as i64])),
                    ("pads", Attr::Ints(vec![p.padding as i64; 2])),
                    ("count_include_pad", Attr::Int(p.count_include_pad as i64)),
                ],
            )
        }
        Op::AdaptiveAvgPool1d(out) | Op::AdaptiveMaxPool1d(out) => {
            let max = matches!(node.op, Op::AdaptiveMaxPool1d(_));
            let kind = node.op.kind();
            if *out == 1 {
                let op = if max {
                    "GlobalMaxPool"
                } else {
                    "GlobalAveragePool"
                };
                return Ok(g.node(op, path, &[input], &[]));
            }
            let l = shape[2];
            if !l.is_multiple_of(*out) {
                return Err(unsupported(
                    path,
                    kind,
                    &format!("length {l} does not divide into {out} equal windows"),
                ));
            }
            let k = vec![(l / out) as i64];
            g.node(
                if max { "MaxPool" } else { "AveragePool" },
                path,
                &[input],
                &[
                    ("kernel_shape", Attr::Ints(k.clone())),
                    ("strides", Attr::Ints(k)),
                ],
            )
        }
        Op::Embedding { weight, .. } => {
            // Ids travel as floats: cast to int64 indices, then gather rows of the table.
            let ids = g.node("Cast", path, &[input], &[("to", Attr::Int(INT64 as i64))]);
            let w = g.weight(&format!("{path}.weight"), weight);
            g.node("Gather", path, &[&w, &ids], &[("axis", Attr::Int(0))])
        }
        Op::Flatten { start_dim } => {
            if *start_dim != 1 {
                return Err(unsupported(path, "Flatten", "only start_dim 1 is exported"));
            }
            g.node("Flatten", path, &[input], &[("axis", Attr::Int(1))])
        }
        Op::Softmax(dim) => {
            let axis = crate::shape::normalize_dim(*dim, shape.len())? as i64;
            g.node("Softmax", path, &[input], &[("axis", Attr::Int(axis))])
        }
        Op::Add => g.node("Add", path, &[input, &inputs[1]], &[]),
        Op::Permute(dims) => g.node(
            "Transpose",
            path,
            &[input],
            &[("perm", Attr::Ints(dims.iter().map(|&d| d as i64).collect()))],
        ),
        Op::Concat(dim) => {
            let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
            g.node("Concat", path, &refs, &[("axis", Attr::Int(*dim as i64))])
        }
        Op::PadChannels {
            stride,
            before,
            planes,
        } => {
            let s = *stride as i64;
            let starts = g.ints(path, &[0, 0]);
            let ends = g.ints(path, &[i64::MAX, i64::MAX]);
            let axes = g.ints(path, &[2, 3]);
            let steps = g.ints(path, &[s, s]);
            let sub = g.node("Slice", path, &[input, &starts, &ends, &axes, &steps], &[]);
            let after = (planes - shape[1] - before) as i64;
            let pads = g.ints(path, &[0, *before as i64, 0, 0, 0, after, 0, 0]);
            g.node("Pad", path, &[&sub, &pads], &[])
        }
    })
}

/// Serialises `model` as an ONNX model named `name`.
pub fn export(model: &Model, name: &str) -> Result<Vec<u8>> {
    let graph = model.graph()?;
    let mut g = GraphBuilder::default();
    let mut names: Vec<String> = Vec::with_capacity(graph.nodes().len());
    for node in graph.nodes() {
        let name = if matches!(node.op, Op::Input) {
            "input".to_string()
        } else {
            let inputs: Vec<String> = node.inputs.iter().map(|v| names[v.0].clone()).collect();
            let shape = graph.shape(node.inputs[0]).dims().to_vec();
            node_onnx(node, &inputs, &shape, &mut g)?
        };
        names.push(name);
    }
    let out = names[graph.output().0].clone();
    if out == "input" {
        g.node("Identity", "", &["input"], &[]);
        let last = g
            .nodes
            .last()
            .map(|n| n.output[0].clone())
            .unwrap_or_default();
        g.rename_last_output(&last, "logits")?;
    } else {
        g.rename_last_output(&out, "logits")?;
    }
    finish(
        g,
        name,
        model.input_shape(),
        &model.output_shape().dims()[1..],
    )
}

/// Wraps the nodes and initializers of `g` (input `input`, output `logits`) into a model.
fn finish(
    g: GraphBuilder,
    name: &str,
    input_shape: &[usize],
    output_shape: &[usize],
) -> Result<Vec<u8>> {
    let mut input_dims = vec![None];
    input_dims.extend(input_shape.iter().map(|&d| Some(d)));
    let mut output_dims = vec![None];
    output_dims.extend(output_shape.iter().map(|&d| Some(d)));
    let proto = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "convnet".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: format!("{name}, exported by convnet"),
        graph: Some(GraphProto {
            node: g.nodes,
            name: name.to_string(),
            initializer: g.initializers,
            input: vec![value_info("input", &input_dims)],
            output: vec![value_info("logits", &output_dims)],
        }),
    };
    Ok(proto.encode_to_vec())
}

/// Serialises a quantized model in ONNX's QDQ form (opset 17): every value the int8 plan
/// stores as bytes is a `QuantizeLinear` / `DequantizeLinear` pair with its scale and uint8
/// zero point; int8 weights are int8 initializers dequantized per output channel (`axis`
/// 0), their bias int32 at scale `s_in * s_w`; the ops between are the float ones, which
/// ONNX Runtime fuses into its int8 kernels (`QLinearConv`, `QGemm`, ...). A convolution
/// with a fused residual addition is written as convolution, addition and activation
/// before one quantization, as convnet computes it (ONNX Runtime then runs that
/// convolution in float). Layers that stay float are written as in [`export`].
pub fn export_quantized(model: &crate::quant::QuantizedModel, name: &str) -> Result<Vec<u8>> {
    use crate::quant::QParams;
    let graph = model.graph();
    let quant = model.nodes();
    let mut g = GraphBuilder::default();
    // Q then DQ of `value` with `q`: the name of the dequantized float.
    let qdq = |g: &mut GraphBuilder, path: &str, value: &str, q: QParams| -> String {
        g.counter += 1;
        let scale = g.raw(
            &format!("{path}/scale{}", g.counter),
            &[],
            FLOAT,
            q.scale.to_le_bytes().to_vec(),
        );
        let zp = g.raw(
            &format!("{path}/zero_point{}", g.counter),
            &[],
            UINT8,
            vec![q.zero_point as u8],
        );
        let quantized = g.node("QuantizeLinear", path, &[value, &scale, &zp], &[]);
        g.node("DequantizeLinear", path, &[&quantized, &scale, &zp], &[])
    };
    let mut names: Vec<String> = Vec::with_capacity(graph.nodes().len());
    for (i, node) in graph.nodes().iter().enumerate() {
        let q = &quant[i];
        let bytes = q.int8 && q.output.is_some();
        let mut inputs: Vec<String> = node.inputs.iter().map(|v| names[v.0].clone()).collect();
        // An int8 layer reading a float value reads it quantized.
        if q.int8 && (q.weights.is_some() || matches!(node.op, Op::Add)) {
            for (k, v) in node.inputs.iter().enumerate() {
                let src = &quant[v.0];
                if !(src.int8 && src.output.is_some()) {
                    if let Some(p) = src.output {
                        inputs[k] = qdq(&mut g, &node.name, &inputs[k], p);
                    }
                }
            }
        }
        let out = match (&node.op, &q.weights) {
            (Op::Input, _) => "input".to_string(),
            (op @ (Op::Conv2d { .. } | Op::Linear { .. }), Some(w8)) => {
                let path = node.name.as_str();
                let (weight, act) = match op {
                    Op::Conv2d { weight, act, .. } | Op::Linear { weight, act, .. } => {
                        (weight, act)
                    }
                    _ => unreachable!(),
                };
                let k = weight.dims()[0];
                let w = g.raw(
                    &format!("{path}.weight"),
                    weight.dims(),
                    INT8,
                    w8.weight.iter().map(|&v| v as u8).collect(),
                );
                let ws = g.raw(
                    &format!("{path}.weight_scale"),
                    &[k],
                    FLOAT,
                    w8.scales.iter().flat_map(|v| v.to_le_bytes()).collect(),
                );
                let wz = g.raw(&format!("{path}.weight_zero_point"), &[k], INT8, vec![0; k]);
                let wf = g.node(
                    "DequantizeLinear",
                    path,
                    &[&w, &ws, &wz],
                    &[("axis", Attr::Int(0))],
                );
                let mut refs = vec![inputs[0].clone(), wf];
                if let Some(b) = &w8.bias {
                    let in_q = quant[node.inputs[0].0].output.unwrap_or(QParams {
                        scale: 1.0,
                        zero_point: 0,
                    });
                    let bs: Vec<f32> = w8.scales.iter().map(|s| in_q.scale * s).collect();
                    let bq: Vec<i32> = b
                        .iter()
                        .zip(&bs)
                        .map(|(b, s)| {
                            (b / s)
                                .round_ties_even()
                                .clamp(i32::MIN as f32, i32::MAX as f32)
                                as i32
                        })
                        .collect();
                    let bi = g.raw(
                        &format!("{path}.bias"),
                        &[k],
                        INT32,
                        bq.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    );
                    let bsn = g.raw(
                        &format!("{path}.bias_scale"),
                        &[k],
                        FLOAT,
                        bs.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    );
                    let bz = g.raw(
                        &format!("{path}.bias_zero_point"),
                        &[k],
                        INT32,
                        vec![0; 4 * k],
                    );
                    refs.push(g.node(
                        "DequantizeLinear",
                        path,
                        &[&bi, &bsn, &bz],
                        &[("axis", Attr::Int(0))],
                    ));
                }
                let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
                let y = match op {
                    Op::Conv2d { params, .. } => {
                        let d = weight.dims();
                        let conv = g.node(
                            "Conv",
                            path,
                            &refs,
                            &[
                                ("kernel_shape", Attr::Ints(vec![d[2] as i64, d[3] as i64])),
                                ("strides", Attr::Ints(pair(params.stride))),
                                ("pads", Attr::Ints(pads(params.padding))),
                                ("dilations", Attr::Ints(pair(params.dilation))),
                                ("group", Attr::Int(params.groups as i64)),
                            ],
                        );
                        match inputs.get(1) {
                            Some(r) => g.node("Add", path, &[&conv, r], &[]),
                            None => conv,
                        }
                    }
                    _ => g.node("Gemm", path, &refs, &[("transB", Attr::Int(1))]),
                };
                match act {
                    Some(a) => activation(&mut g, *a, path, &y)?,
                    None => y,
                }
            }
            _ => {
                let shape = graph.shape(node.inputs[0]).dims().to_vec();
                node_onnx(node, &inputs, &shape, &mut g)?
            }
        };
        let out = match (bytes, q.output) {
            (true, Some(p)) => qdq(&mut g, &node.name, &out, p),
            _ => out,
        };
        names.push(out);
    }
    let out = names[graph.output().0].clone();
    if out == "input" {
        return Err(Error::Unsupported(
            "a quantized model without layers".into(),
        ));
    }
    g.rename_last_output(&out, "logits")?;
    let input_shape = &graph.shape(graph.input()).dims()[1..];
    let output_shape = &graph.shape(graph.output()).dims()[1..];
    finish(g, name, input_shape, output_shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{AvgPool2d, Flatten, Linear, Sequential};
    use crate::tensor::AvgPool2dParams;

    #[test]
    fn weights_are_initializers_under_state_dict_names() {
        let model = crate::models::build("resnet20", [3, 32, 32], 10).unwrap();
        let bytes = export(&model, "resnet20").unwrap();
        let m = ModelProto::decode(bytes.as_slice()).unwrap();
        assert_eq!((m.ir_version, m.opset_import[0].version), (8, 17));
        let g = m.graph.unwrap();
        for (name, t) in model.state_dict() {
            if crate::nn::is_batch_counter(&name) {
                continue;
            }
            let init = g
                .initializer
                .iter()
                .find(|i| i.name == name)
                .unwrap_or_else(|| panic!("no initializer {name}"));
            let want: Vec<u8> = t.to_vec().iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(init.raw_data, want, "{name}");
        }
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops.iter().filter(|o| **o == "Conv").count(), 19);
        assert_eq!(ops.iter().filter(|o| **o == "Pad").count(), 2);
        assert_eq!(ops.last(), Some(&"Gemm"));
        assert_eq!(g.node.last().unwrap().output, vec!["logits".to_string()]);
        let dims = &g.input[0]
            .r#type
            .as_ref()
            .unwrap()
            .tensor_type
            .as_ref()
            .unwrap();
        let shape: Vec<Option<i64>> = dims
            .shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| d.dim_value)
            .collect();
        assert_eq!(shape, vec![None, Some(3), Some(32), Some(32)]);
    }

    /// The 1-D layers export as ONNX's 1-D forms: Conv and pools with one-element
    /// attributes, BatchNormalization, GlobalMaxPool, and Cast + Gather for Embedding.
    #[test]
    fn sequence_layers_export_with_1d_attributes() {
        use crate::nn::{
            AdaptiveMaxPool1d, AvgPool1d, BatchNorm1d, Conv1d, Embedding, MaxPool1d, ReLU,
        };
        let model = Sequential::new()
            .add(
                "conv",
                Conv1d::new(4, 6, 3)
                    .padding(1)
                    .dilation(2)
                    .groups(2)
                    .build()
                    .unwrap(),
            )
            .add("bn", BatchNorm1d::new(6).unwrap())
            .add("relu", ReLU)
            .add(
                "pool",
                MaxPool1d::with(crate::MaxPool1dParams::new(3).stride(2).padding(1)),
            )
            .add("avg", AvgPool1d::new(2))
            .add("gmax", AdaptiveMaxPool1d(1))
            .add("flatten", Flatten::new())
            .add("fc", Linear::new(6, 3).unwrap())
            .build(&[4, 21])
            .unwrap();
        let m = ModelProto::decode(export(&model, "seq").unwrap().as_slice()).unwrap();
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(
            ops,
            [
                "Conv",
                "BatchNormalization",
                "Relu",
                "MaxPool",
                "AveragePool",
                "GlobalMaxPool",
                "Flatten",
                "Gemm"
            ]
        );
        let ints = |node: usize, name: &str| -> Vec<i64> {
            let a = g.node[node]
                .attribute
                .iter()
                .find(|a| a.name == name)
                .unwrap();
            a.ints.clone()
        };
        assert_eq!(ints(0, "kernel_shape"), [3]);
        assert_eq!(ints(0, "pads"), [1, 1]);
        assert_eq!(ints(0, "dilations"), [2]);
        assert_eq!(ints(3, "strides"), [2]);
        let conv_w = g
            .initializer
            .iter()
            .find(|i| i.name == "conv.weight")
            .unwrap();
        assert_eq!(conv_w.dims, [6, 2, 3]);

        let model = Sequential::new()
            .add("emb", Embedding::new(10, 4, Some(0)).unwrap())
            .add("flatten", Flatten::new())
            .add("fc", Linear::new(5 * 4, 2).unwrap())
            .build(&[5])
            .unwrap();
        let m = ModelProto::decode(export(&model, "emb").unwrap().as_slice()).unwrap();
        let g = m.graph.unwrap();
        let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Cast", "Gather", "Flatten", "Gemm"]);
        assert_eq!(g.node[1].input[0], "emb.weight");
    }

    #[test]
    fn a_layer_without_an_exact_onnx_form_is_named() {
        let model = Sequential::new()
            .add(
                "pool",
                AvgPool2d::with(AvgPool2dParams::new(3).ceil_mode(true)),
            )
            .add("flatten", Flatten::new())
            .add("fc", Linear::new(3 * 3 * 3, 2).unwrap())
            .build(&[3, 8, 8])
            .unwrap();
        let err = export(&model, "net").unwrap_err().to_string();
        assert_eq!(
            err,
            "pool (AvgPool2d) cannot be exported to ONNX: ceil_mode has no exact ONNX form"
        );
    }
}
