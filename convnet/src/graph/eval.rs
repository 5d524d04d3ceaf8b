//! Runs a graph node by node with tensor ops (NCHW, eval-mode semantics, autograd recorded
//! when enabled), calling a hook on every value: the reference the inference plan is
//! checked against, the way calibration observes activations, and the way fake
//! quantization is inserted.

use super::{Graph, Node, Op};
use crate::error::{invalid, Result};
use crate::tensor::Tensor;

/// What a hook does with a node's output.
pub enum Visit {
    /// Keep the value.
    Keep,
    /// Use this tensor instead (same shape).
    Replace(Tensor),
}

/// Runs one node on its input values.
pub fn run_node(node: &Node, inputs: &[&Tensor]) -> Result<Tensor> {
    let x = inputs[0];
    let y = match &node.op {
        Op::Input => x.clone(),
        Op::Conv2d {
            weight,
            bias,
            params,
            act,
        } => {
            let mut y = x.conv2d(weight, bias.as_ref(), *params)?;
            if let Some(r) = inputs.get(1) {
                y = y.add(r)?;
            }
            match act {
                Some(a) => y.activation(*a)?,
                None => y,
            }
        }
        Op::Linear { weight, bias, act } => {
            let y = x.linear(weight, bias.as_ref())?;
            match act {
                Some(a) => y.activation(*a)?,
                None => y,
            }
        }
        Op::BatchNorm2d {
            weight,
            bias,
            mean,
            var,
            eps,
            ..
        } => x.batch_norm2d(mean, var, Some(weight), Some(bias), false, 0.0, *eps)?,
        Op::Conv1d {
            weight,
            bias,
            params,
        } => x.conv1d(weight, bias.as_ref(), *params)?,
        Op::BatchNorm1d {
            weight,
            bias,
            mean,
            var,
            eps,
            ..
        } => x.batch_norm1d(mean, var, Some(weight), Some(bias), false, 0.0, *eps)?,
        Op::MaxPool1d(p) => x.max_pool1d(*p)?,
        Op::AvgPool1d(p) => x.avg_pool1d(*p)?,
        Op::AdaptiveAvgPool1d(l) => x.adaptive_avg_pool1d(*l)?,
        Op::AdaptiveMaxPool1d(l) => x.adaptive_max_pool1d(*l)?,
        Op::Embedding {
            weight,
            padding_idx,
        } => x.embedding(weight, *padding_idx)?,
        Op::Dropout(_) => x.clone(),
        Op::Activation(a) => x.activation(*a)?,
        Op::MaxPool2d(p) => x.max_pool2d(*p)?,
        Op::AvgPool2d(p) => x.avg_pool2d(*p)?,
        Op::AdaptiveAvgPool2d(s) => x.adaptive_avg_pool2d(*s)?,
        Op::Flatten { start_dim } => x.flatten(*start_dim)?,
        Op::Softmax(d) => x.softmax(*d)?,
        Op::Add => x.add(inputs[1])?,
        Op::Permute(dims) => x.permute(dims)?,
        Op::Concat(dim) => {
            let all: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
            Tensor::concat(&all, *dim as isize)?
        }
        Op::PadChannels {
            stride,
            before,
            planes,
        } => x.subsample_pad_channels(*stride, *before, *planes)?,
    };
    Ok(y)
}

/// Runs `graph` on a batch `x` (`[N, ...input]`), calling `hook` on every node's output
/// (the input included) in execution order; returns the output value.
///
/// ```
/// use convnet::graph::{eval, fold};
/// use convnet::nn::Mode;
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let x = convnet::Tensor::randn([2, 3, 32, 32], &mut convnet::Rng::new(0));
/// let fused = fold::fuse(&model.graph()?)?;
/// let mut values = 0;
/// let y = eval::run(&fused, &x, &mut |_, _| { values += 1; Ok(eval::Visit::Keep) })?;
/// assert_eq!(values, fused.nodes().len());
/// let want = model.forward(&x, Mode::Eval)?.to_vec();
/// for (a, b) in y.to_vec().iter().zip(&want) {
///     assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0));
/// }
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn run(
    graph: &Graph,
    x: &Tensor,
    hook: &mut dyn FnMut(&Node, &Tensor) -> Result<Visit>,
) -> Result<Tensor> {
    let want = graph.shape(graph.input());
    if x.rank() != want.rank() || x.dims()[1..] != want.dims()[1..] {
        return Err(invalid(
            "graph",
            format!(
                "input {} does not fit the graph's input [N, {}]",
                x.shape(),
                want.dims()[1..]
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let readers = graph.readers();
    let mut left = readers.clone();
    let mut values: Vec<Option<Tensor>> = vec![None; graph.nodes().len()];
    for (i, node) in graph.nodes().iter().enumerate() {
        let y = if i == 0 {
            x.clone()
        } else {
            let inputs: Vec<&Tensor> = node
                .inputs
                .iter()
                .map(|v| {
                    values[v.0]
                        .as_ref()
                        .expect("inputs run before their readers")
                })
                .collect();
            run_node(node, &inputs)?
        };
        let y = match hook(node, &y)? {
            Visit::Keep => y,
            Visit::Replace(t) => t,
        };
        // Free values as soon as their last reader has run.
        for v in &node.inputs {
            left[v.0] -= 1;
            if left[v.0] == 0 && v.0 != graph.output().0 {
                values[v.0] = None;
            }
        }
        values[i] = Some(y);
    }
    Ok(values[graph.output().0]
        .take()
        .expect("the output was computed"))
}
