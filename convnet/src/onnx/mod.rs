//! ONNX export: a [`Model`] as a standard ONNX graph (opset 17, IR version 8) with its
//! weights as initializers under their `state_dict` names.
//!
//! Each layer adds its own nodes through [`crate::nn::Module::export_onnx`], in eval-mode
//! semantics (Dropout is the identity, BatchNorm uses running statistics). The graph input
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

/// Serialises `model` as an ONNX model named `name`.
pub fn export(model: &Model, name: &str) -> Result<Vec<u8>> {
    let mut g = GraphBuilder::default();
    let mut shape = vec![1];
    shape.extend_from_slice(model.input_shape());
    let out = model.net().export_onnx("", "input", &shape, &mut g)?;
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
    let mut input_dims = vec![None];
    input_dims.extend(model.input_shape().iter().map(|&d| Some(d)));
    let mut output_dims = vec![None];
    output_dims.extend(model.output_shape().dims()[1..].iter().map(|&d| Some(d)));
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
