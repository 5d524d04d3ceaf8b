//! Capturing a named layer: its output in one forward pass and the gradient of a chosen
//! score reaching it — the one mechanism every attribution method uses (Grad-CAM reads a
//! convolutional stage, saliency and integrated gradients read the input).
//!
//! A layer is named as in `convnet summary` and the `state_dict`: a leaf layer (`conv2`,
//! `features.28`, `layer4.1.conv2`) or a container (`layer4`, `layer4.1`, `features.18`),
//! whose output is its last node's. The capture runs the model's graph with the captured
//! value replaced by a fresh leaf that records gradients, so the backward pass stops there;
//! the layers before it run without recording anything, and the weights are cut off from
//! autograd, so no weight gradient is ever computed. When the rest of the model reads only
//! the captured value (a stage's output, as Grad-CAM reads), the part before it runs as a
//! compiled inference plan (BatchNorm folded, epilogues fused) on the CPU.

use super::{eval, Graph, ValueId};
use crate::error::{invalid, Result};
use crate::nn::Model;
use crate::tensor::Tensor;

/// A model's graph prepared to capture one value.
///
/// ```
/// use convnet::graph::capture::LayerCapture;
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let capture = LayerCapture::new(&model, "conv2")?;
/// let x = convnet::Tensor::randn([2, 3, 32, 32], &mut convnet::Rng::new(0));
/// let run = capture.forward(&x)?;
/// assert_eq!(run.activation.dims(), &[2, 64, 16, 16]);
/// // The gradient of each image's class-3 logit with respect to conv2's output.
/// let g = run.gradient(&[3, 3])?;
/// assert_eq!(g.dims(), run.activation.dims());
/// // A name that is not a layer lists the ones that are.
/// let err = LayerCapture::new(&model, "conv9").unwrap_err().to_string();
/// assert!(err.contains("conv1, relu1, pool1, conv2"), "{err}");
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Debug)]
pub struct LayerCapture {
    graph: Graph,
    value: ValueId,
    name: String,
    /// The plan of the layers up to the captured one and the graph of those after it, when
    /// the latter read nothing else.
    split: Option<(crate::infer::Plan, Graph)>,
}

/// One forward pass of a [`LayerCapture`].
#[derive(Debug)]
pub struct CaptureRun {
    /// The model's output `[N, classes]` (logits for classifiers).
    pub output: Tensor,
    /// The captured value `[N, ...]`, a leaf that gradients reach.
    pub activation: Tensor,
}

impl CaptureRun {
    /// The gradient, with respect to the captured value, of the sum over images of each
    /// image's output `targets[n]` (one backward pass; images do not mix).
    pub fn gradient(&self, targets: &[usize]) -> Result<Tensor> {
        let dims = self.output.dims();
        if dims.len() != 2 || targets.len() != dims[0] {
            return Err(invalid(
                "capture",
                format!(
                    "{} targets for an output of shape {}",
                    targets.len(),
                    self.output.shape()
                ),
            ));
        }
        let classes = dims[1];
        if let Some(&bad) = targets.iter().find(|&&t| t >= classes) {
            return Err(invalid(
                "capture",
                format!("target class {bad} is out of range: the model has {classes} outputs"),
            ));
        }
        let mut seed = vec![0f32; targets.len() * classes];
        for (n, &t) in targets.iter().enumerate() {
            seed[n * classes + t] = 1.0;
        }
        let seed = Tensor::from_vec(seed, dims.to_vec())?.to_device(self.output.device())?;
        let grads = self.output.backward_with(&seed)?;
        match grads.get(&self.activation) {
            Some(g) => Ok(g.clone()),
            // The output does not depend on the captured value (it cannot for a layer on
            // the path, but a zero gradient is the honest answer).
            None => Ok(Tensor::zeros(self.activation.dims().to_vec())),
        }
    }
}

impl LayerCapture {
    /// Prepares `model` to capture the layer `layer` (`"input"` for the model's input).
    pub fn new(model: &Model, layer: &str) -> Result<LayerCapture> {
        LayerCapture::of_graph(&model.graph()?, layer)
    }

    /// As [`LayerCapture::new`], for a model's graph.
    pub fn of_graph(graph: &Graph, layer: &str) -> Result<LayerCapture> {
        let value = resolve(graph, layer)?;
        let graph = frozen(graph);
        let split = split(&graph, value);
        Ok(LayerCapture {
            graph,
            value,
            name: layer.to_string(),
            split,
        })
    }

    /// The captured layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The captured value's shape for a batch of one.
    pub fn shape(&self) -> &[usize] {
        self.graph.shape(self.value).dims()
    }

    /// Runs the model on `x`, recording from the captured layer on.
    pub fn forward(&self, x: &Tensor) -> Result<CaptureRun> {
        if let (Some((plan, rest)), crate::Device::Cpu) = (&self.split, x.device()) {
            let activation = plan.run(x)?.requires_grad();
            let output = eval::run(rest, &activation, &mut |_, _| Ok(eval::Visit::Keep))?;
            return Ok(CaptureRun { output, activation });
        }
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                crate::autograd::set_grad_enabled(self.0);
            }
        }
        let _restore = Restore(crate::autograd::set_grad_enabled(false));
        let mut activation = None;
        let target = self.value.0;
        let mut index = 0;
        let output = eval::run(&self.graph, x, &mut |_, y| {
            let i = index;
            index += 1;
            if i == target {
                let leaf = y.detach().requires_grad();
                activation = Some(leaf.clone());
                crate::autograd::set_grad_enabled(true);
                return Ok(eval::Visit::Replace(leaf));
            }
            Ok(eval::Visit::Keep)
        })?;
        let activation = activation.ok_or_else(|| invalid("capture", "the layer never ran"))?;
        Ok(CaptureRun { output, activation })
    }
}

/// The layer names a capture accepts: every node and every container above one, in the
/// order they first run.
pub fn layer_names(graph: &Graph) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for node in graph.nodes() {
        let parts: Vec<&str> = node.name.split('.').collect();
        for k in 1..=parts.len() {
            let prefix = parts[..k].join(".");
            if !names.contains(&prefix) {
                names.push(prefix);
            }
        }
    }
    names
}

/// The value a layer name stands for: the node of that name, or the last node inside the
/// container of that name.
pub fn resolve(graph: &Graph, layer: &str) -> Result<ValueId> {
    if let Some(v) = graph.find(layer) {
        return Ok(v);
    }
    let inside = format!("{layer}.");
    let last = graph
        .nodes()
        .iter()
        .rposition(|n| n.name.starts_with(&inside));
    last.map(ValueId).ok_or_else(|| {
        let names = layer_names(graph);
        let listed: Vec<&str> = names
            .iter()
            .filter(|n| *n != "input")
            .map(|s| s.as_str())
            .collect();
        invalid(
            "capture",
            format!(
                "the model has no layer named '{layer}'; its layers: {}",
                listed.join(", ")
            ),
        )
    })
}

/// The compiled layers up to `value` and the graph of the layers after it, reading `value` as
/// its input; `None` when a later layer reads an earlier value (a residual around the
/// capture), for the input itself, or when the plan does not cover a layer.
fn split(graph: &Graph, value: ValueId) -> Option<(crate::infer::Plan, Graph)> {
    if value.0 == 0 {
        return None;
    }
    let mut prefix = graph.clone();
    prefix.nodes.truncate(value.0 + 1);
    prefix.set_output(value);
    let plan = crate::infer::Plan::from_graph(&super::fold::fuse(&prefix).ok()?).ok()?;
    let mut rest = Graph::new(&graph.shape(value).dims()[1..]);
    let mut map = std::collections::HashMap::from([(value.0, 0usize)]);
    for (i, node) in graph.nodes().iter().enumerate().skip(value.0 + 1) {
        let inputs: Option<Vec<ValueId>> = node
            .inputs
            .iter()
            .map(|v| map.get(&v.0).map(|&n| ValueId(n)))
            .collect();
        let v = rest
            .push(&node.name, node.op.clone(), &inputs?, node.shape.clone())
            .ok()?;
        map.insert(i, v.0);
    }
    rest.set_output(ValueId(*map.get(&graph.output().0)?));
    Some((plan, rest))
}

/// The graph with every weight cut off from autograd (same storage).
fn frozen(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for node in g.nodes_mut() {
        for t in node.op.tensors_mut() {
            *t = t.detach();
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compiled-prefix path and the recorded path give the same output and gradient
    /// (within float32 summation-order noise); a layer inside a residual block takes the
    /// recorded path.
    #[test]
    fn the_compiled_prefix_matches_the_recorded_run() {
        let model = crate::models::build("resnet20", [3, 32, 32], 10).unwrap();
        let x = Tensor::randn([2, 3, 32, 32], &mut crate::Rng::new(1));
        let fast = LayerCapture::new(&model, "layer2").unwrap();
        assert!(fast.split.is_some());
        assert!(LayerCapture::new(&model, "layer2.1.conv1")
            .unwrap()
            .split
            .is_none());
        let slow = LayerCapture {
            split: None,
            ..LayerCapture::new(&model, "layer2").unwrap()
        };
        let (a, b) = (fast.forward(&x).unwrap(), slow.forward(&x).unwrap());
        let close = |p: Vec<f32>, q: Vec<f32>, what: &str| {
            let scale = q.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (u, v)) in p.iter().zip(&q).enumerate() {
                assert!((u - v).abs() <= 1e-5 * scale, "{what} {i}: {u} vs {v}");
            }
        };
        close(a.output.to_vec(), b.output.to_vec(), "output");
        close(a.activation.to_vec(), b.activation.to_vec(), "activation");
        close(
            a.gradient(&[1, 7]).unwrap().to_vec(),
            b.gradient(&[1, 7]).unwrap().to_vec(),
            "gradient",
        );
    }
}
