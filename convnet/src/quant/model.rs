//! Post-training quantization and quantized models.
//!
//! [`quantize`] takes an eval-mode model and calibration batches. The model's fused graph
//! (BatchNorm folded, activations and residual additions in the convolution) decides what
//! runs in int8:
//!
//! - convolutions (plain and depthwise) and linear layers whose fused activation is none,
//!   ReLU or ReLU6: int8 weights with one symmetric scale per output channel
//!   (`PerChannelMinMaxObserver`, range -128..127), float bias, uint8 inputs and outputs
//!   with one affine scale and zero point per tensor; ReLU and ReLU6 become the clamp of
//!   the requantization, a residual addition is added before it;
//! - max and average pooling, flatten and the option-A shortcut: on bytes, in their input's
//!   quantization; additions that were not fused: int8;
//! - everything else (a BatchNorm after something other than a convolution, sigmoid, tanh,
//!   GELU, leaky ReLU, softmax, grouped convolutions): float, with a note saying so; values
//!   are dequantized into them and quantized out of them.
//!
//! The classifier's output (the last layer) stays float: logits are `f32(acc) * s_in * s_w
//! + bias`, not rounded to a byte. Activation ranges come from an observer over the
//! calibration batches: `histogram` (PyTorch's `HistogramObserver`, the default), `minmax`
//! or `percentile`.
//!
//! A [`QuantizedModel`] runs on the int8 inference plan; [`QuantizedModel::fake_quant`] runs
//! the same arithmetic in float (fake quantization), the reference it is tested against.

use super::observer::{Histogram, MinMax, PerChannelMinMax, QParams, QRange, Scheme};
use crate::checkpoint::CheckpointMeta;
use crate::data::DataLoader;
use crate::error::{invalid, Error, Result};
use crate::graph::{eval, fold, Graph, Node, Op};
use crate::infer::{Int8Weights, NodeQuant, Plan, Predictor};
use crate::nn::Model;
use crate::tensor::Tensor;
use crate::Activation;
use std::collections::HashMap;
use std::path::Path;

/// How calibration chooses activation ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ObserverKind {
    /// The minimum and maximum seen.
    MinMax,
    /// PyTorch's histogram search (minimises the L2 quantization error).
    Histogram,
    /// The range holding this fraction of the values (e.g. 0.9999).
    Percentile(f64),
}

impl ObserverKind {
    /// The name used on the command line and in files.
    pub fn name(&self) -> String {
        match self {
            ObserverKind::MinMax => "minmax".into(),
            ObserverKind::Histogram => "histogram".into(),
            ObserverKind::Percentile(p) => format!("percentile:{p}"),
        }
    }
}

/// Settings of [`quantize`].
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// Activation observer.
    pub observer: ObserverKind,
    /// At most this many calibration images are used (the loader's first batches).
    pub calibration_images: usize,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            observer: ObserverKind::Histogram,
            calibration_images: 512,
        }
    }
}

/// A model whose layers run on int8 kernels where they can (see the module documentation).
pub struct QuantizedModel {
    graph: Graph,
    nodes: Vec<NodeQuant>,
    plan: Plan,
    notes: Vec<String>,
    observer: String,
    calibration_images: usize,
}

impl std::fmt::Debug for QuantizedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantizedModel({} int8 layers, {} float)",
            self.int8_layers(),
            self.notes.len()
        )
    }
}

/// An activation an int8 layer can fuse (into the clamp of its requantization).
fn int8_activation(act: Option<Activation>) -> bool {
    matches!(act, None | Some(Activation::Relu) | Some(Activation::Relu6))
}

/// Why `node` cannot run in int8 (`None` when it can).
fn float_reason(node: &Node, graph: &Graph) -> Option<String> {
    match &node.op {
        Op::Conv2d {
            weight,
            params,
            act,
            ..
        } => {
            let (k, cg) = (weight.dims()[0], weight.dims()[1]);
            let in_c = graph.shape(node.inputs[0]).dims()[1];
            if params.groups != 1 && !(cg == 1 && params.groups == k && k == in_c) {
                Some("grouped convolutions other than depthwise have no int8 kernel".into())
            } else if !int8_activation(*act) {
                Some(format!(
                    "its fused {} has no int8 form",
                    act.map_or("", |a| a.name())
                ))
            } else {
                None
            }
        }
        Op::Linear { act, .. } => (!int8_activation(*act)).then(|| {
            format!(
                "its fused {} has no int8 form",
                act.map_or("", |a| a.name())
            )
        }),
        Op::BatchNorm2d { .. } => {
            Some("a BatchNorm that does not follow a convolution is not folded".into())
        }
        Op::Activation(a) => Some(format!("{} has no int8 form", a.name())),
        Op::Softmax(_) => Some("softmax runs in float".into()),
        _ => None,
    }
}

/// Symmetric per-channel int8 quantization of `w` (`[K, ...]`): PyTorch's
/// `PerChannelMinMaxObserver(qint8, per_channel_symmetric)` and `quantize_per_channel`.
pub fn quantize_weights(w: &[f32], channels: usize) -> (Vec<i8>, Vec<f32>) {
    let mut obs = PerChannelMinMax::default();
    obs.observe(w, channels);
    let qs = obs.qparams(QRange::I8, Scheme::Symmetric);
    let per = w.len() / channels.max(1);
    let mut out = Vec::with_capacity(w.len());
    for (c, chunk) in w.chunks(per.max(1)).enumerate() {
        out.extend(
            super::fake::quantize(chunk, qs[c], QRange::I8)
                .into_iter()
                .map(|v| v as i8),
        );
    }
    (out, qs.iter().map(|q| q.scale).collect())
}

enum Observer {
    MinMax(MinMax),
    Histogram(Histogram),
}

impl Observer {
    fn new(kind: ObserverKind) -> Observer {
        match kind {
            ObserverKind::MinMax => Observer::MinMax(MinMax::default()),
            _ => Observer::Histogram(Histogram::default()),
        }
    }
    fn observe(&mut self, x: &[f32]) {
        match self {
            Observer::MinMax(o) => o.observe(x),
            Observer::Histogram(o) => o.observe(x),
        }
    }
    fn qparams(&self, kind: ObserverKind) -> QParams {
        match (self, kind) {
            (Observer::MinMax(o), _) => o.qparams(QRange::U8, Scheme::Affine),
            (Observer::Histogram(o), ObserverKind::Percentile(p)) => {
                let (lo, hi) = o.percentile_range(p);
                super::observer::calculate_qparams(lo, hi, QRange::U8, Scheme::Affine)
            }
            (Observer::Histogram(o), _) => o.qparams(QRange::U8, Scheme::Affine),
        }
    }
}

/// Which nodes run in int8 and which values are stored as bytes: the decisions of
/// [`quantize`], before any value is observed.
pub(crate) struct Layout {
    pub(crate) int8: Vec<bool>,
    pub(crate) bytes: Vec<bool>,
    /// Values whose quantization is needed: stored as bytes, or read by an int8 layer.
    pub(crate) wanted: Vec<bool>,
    pub(crate) notes: Vec<String>,
}

/// Whether the value of fused node `i` is rounded when stored as bytes (max pooling,
/// flatten and the shortcut only move bytes).
pub(crate) fn rounds(graph: &Graph, layout: &Layout, i: usize) -> bool {
    i == 0
        || computes_int8(graph, layout, i)
        || matches!(
            graph.nodes()[i].op,
            Op::AvgPool2d(_) | Op::AdaptiveAvgPool2d(_)
        )
}

/// Whether fused node `i` computes in int8 (a convolution, linear layer or addition).
pub(crate) fn computes_int8(graph: &Graph, layout: &Layout, i: usize) -> bool {
    layout.int8[i]
        && matches!(
            graph.nodes()[i].op,
            Op::Conv2d { .. } | Op::Linear { .. } | Op::Add
        )
}

/// The fused graph quantization reads: activations fused only where int8 can apply them.
pub(crate) fn fuse_for_int8(graph: &Graph) -> Result<(Graph, Vec<usize>)> {
    fold::fuse_mapped(graph, |a| int8_activation(Some(a)))
}

pub(crate) fn layout(graph: &Graph) -> Layout {
    let nodes = graph.nodes();
    let n = nodes.len();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in nodes.iter().enumerate() {
        for v in &node.inputs {
            readers[v.0].push(i);
        }
    }
    let compute = |op: &Op| matches!(op, Op::Conv2d { .. } | Op::Linear { .. } | Op::Add);
    let passthrough = |op: &Op| {
        matches!(
            op,
            Op::MaxPool2d(_)
                | Op::AvgPool2d(_)
                | Op::AdaptiveAvgPool2d(_)
                | Op::PadChannels { .. }
                | Op::Flatten { .. }
        )
    };
    let mut int8 = vec![false; n];
    let mut notes = Vec::new();
    let output = graph.output().0;
    for (i, node) in nodes.iter().enumerate() {
        if compute(&node.op) && i == output && node.inputs.len() > 1 {
            notes.push(format!(
                "{} ({}) stays float: a residual addition at the model output",
                node.name,
                node.op.kind()
            ));
        } else if compute(&node.op) {
            match float_reason(node, graph) {
                None => int8[i] = true,
                Some(why) => notes.push(format!(
                    "{} ({}) stays float: {why}",
                    node.name,
                    node.op.kind()
                )),
            }
        } else if let Some(why) = float_reason(node, graph) {
            notes.push(format!(
                "{} ({}) stays float: {why}",
                node.name,
                node.op.kind()
            ));
        }
    }
    // Bytes flow: the input is quantized when an int8 layer reads it; int8 layers write
    // bytes unless every reader is float (or they are the output); pass-through layers keep
    // bytes as bytes.
    let mut bytes = vec![false; n];
    for i in 0..n {
        let node = &nodes[i];
        let reader_int8 = |r: &usize| int8[*r] || passthrough(&nodes[*r].op);
        bytes[i] = match &node.op {
            Op::Input => readers[i].iter().any(|r| int8[*r]),
            op if compute(op) && int8[i] => {
                let has_residual = node.inputs.len() > 1 && matches!(op, Op::Conv2d { .. });
                i != output && (has_residual || readers[i].iter().any(reader_int8))
            }
            op if passthrough(op) => bytes[node.inputs[0].0] && i != output,
            _ => false,
        };
        if passthrough(&node.op) {
            int8[i] = bytes[i];
        }
        if matches!(node.op, Op::Input) {
            int8[i] = bytes[i];
        }
    }
    let mut wanted = bytes.clone();
    for (i, node) in nodes.iter().enumerate() {
        if int8[i] && compute(&node.op) {
            for v in &node.inputs {
                wanted[v.0] = true;
            }
        }
    }
    Layout {
        int8,
        bytes,
        wanted,
        notes,
    }
}

/// Puts a quantized model together from the fused graph (float weights, BatchNorm folded),
/// its layout and the observed quantization of every wanted value.
pub(crate) fn assemble(
    graph: Graph,
    plan_layout: Layout,
    mut qparams: Vec<Option<QParams>>,
    observer: String,
    images: usize,
) -> Result<QuantizedModel> {
    let nodes = graph.nodes();
    // Pass-through layers keep their input's quantization.
    for (i, node) in nodes.iter().enumerate() {
        if plan_layout.bytes[i]
            && matches!(
                node.op,
                Op::MaxPool2d(_)
                    | Op::AvgPool2d(_)
                    | Op::AdaptiveAvgPool2d(_)
                    | Op::PadChannels { .. }
                    | Op::Flatten { .. }
            )
        {
            qparams[i] = qparams[node.inputs[0].0];
        }
    }
    let mut quant = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let weights = match (&node.op, plan_layout.int8[i]) {
            (Op::Conv2d { weight, bias, .. } | Op::Linear { weight, bias, .. }, true) => {
                let w = weight.try_to_vec()?;
                if w.iter().any(|v| !v.is_finite()) {
                    return Err(invalid(
                        "quantize",
                        format!("{}: weights are not finite", node.name),
                    ));
                }
                let (q, scales) = quantize_weights(&w, weight.dims()[0]);
                Some(Int8Weights {
                    weight: q,
                    scales,
                    bias: bias.as_ref().map(|b| b.try_to_vec()).transpose()?,
                })
            }
            _ => None,
        };
        let output =
            if plan_layout.wanted[i] {
                Some(qparams[i].ok_or_else(|| {
                    invalid("quantize", format!("{}: no observed range", node.name))
                })?)
            } else {
                None
            };
        quant.push(NodeQuant {
            int8: plan_layout.int8[i],
            output,
            weights,
        });
    }
    let mut fused = graph;
    set_dequantized_weights(&mut fused, &quant)?;
    QuantizedModel::from_parts(fused, quant, plan_layout.notes, observer, images)
}

/// Quantizes `model` after training: observes activations over the first
/// `config.calibration_images` images of `calibration` (in eval mode), quantizes weights per
/// output channel, and compiles the int8 plan.
///
/// ```
/// use convnet::quant::{quantize, QuantConfig};
/// use convnet::data::{DataLoader, ImageDataset, Normalize};
/// use std::sync::Arc;
/// convnet::manual_seed(0);
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let pixels: Vec<u8> = (0..16 * 3 * 32 * 32).map(|i| (i * 7 % 251) as u8).collect();
/// let data = ImageDataset::new(pixels, (0..16).map(|i| i % 10).collect(), [3, 32, 32],
///     (0..10).map(|i| i.to_string()).collect(), "calibration")?;
/// let loader = DataLoader::for_evaluation(Arc::new(data), Normalize::default_for(3))?;
/// let q = quantize(&model, &loader, &QuantConfig::default())?;
/// assert_eq!(q.int8_layers(), 4); // conv1, conv2, fc1, fc2
/// let x = convnet::Tensor::randn([2, 3, 32, 32], &mut convnet::Rng::new(1));
/// assert_eq!(q.run(&x)?.dims(), &[2, 10]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn quantize(
    model: &Model,
    calibration: &DataLoader,
    config: &QuantConfig,
) -> Result<QuantizedModel> {
    if config.calibration_images == 0 {
        return Err(invalid(
            "quantize",
            "at least one calibration image is needed",
        ));
    }
    if let ObserverKind::Percentile(p) = config.observer {
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid(
                "quantize",
                format!("the percentile must be in (0, 1], got {p}"),
            ));
        }
    }
    let (graph, _) = fuse_for_int8(&model.graph()?)?;
    let plan_layout = layout(&graph);
    let nodes = graph.nodes();
    let mut observers: Vec<Option<Observer>> = plan_layout
        .wanted
        .iter()
        .map(|&w| w.then(|| Observer::new(config.observer)))
        .collect();
    let mut seen = 0;
    crate::autograd::no_grad(|| -> Result<()> {
        for batch in calibration.epoch(0) {
            if seen >= config.calibration_images {
                break;
            }
            let batch = batch?;
            let take = (config.calibration_images - seen).min(batch.labels.len());
            let images = if take < batch.labels.len() {
                let per: usize = batch.images.dims()[1..].iter().product();
                let mut dims = batch.images.dims().to_vec();
                dims[0] = take;
                Tensor::from_vec(batch.images.try_to_vec()?[..take * per].to_vec(), dims)?
            } else {
                batch.images
            };
            seen += take;
            let index: HashMap<&str, usize> = nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.name.as_str(), i))
                .collect();
            eval::run(&graph, &images, &mut |node, value| {
                if let Some(Some(o)) = index
                    .get(node.name.as_str())
                    .map(|&i| observers[i].as_mut())
                {
                    value.with_data(|d| o.observe(d));
                }
                Ok(eval::Visit::Keep)
            })?;
        }
        Ok(())
    })?;
    if seen == 0 {
        return Err(invalid("quantize", "the calibration data gave no images"));
    }
    let qparams: Vec<Option<QParams>> = observers
        .iter()
        .map(|o| o.as_ref().map(|o| o.qparams(config.observer)))
        .collect();
    assemble(graph, plan_layout, qparams, config.observer.name(), seen)
}

/// Replaces the float weights of int8 layers by their dequantized values, so the graph is
/// the model the int8 plan computes.
fn set_dequantized_weights(graph: &mut Graph, quant: &[NodeQuant]) -> Result<()> {
    for (node, q) in graph.nodes_mut().iter_mut().zip(quant) {
        let Some(w8) = &q.weights else { continue };
        if let Op::Conv2d { weight, .. } | Op::Linear { weight, .. } = &mut node.op {
            let k = weight.dims()[0];
            let per = w8.weight.len() / k.max(1);
            let values: Vec<f32> = w8
                .weight
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f32 * w8.scales[i / per])
                .collect();
            *weight = Tensor::from_vec(values, weight.dims())?;
        }
    }
    Ok(())
}

impl QuantizedModel {
    pub(crate) fn from_parts(
        graph: Graph,
        nodes: Vec<NodeQuant>,
        notes: Vec<String>,
        observer: String,
        calibration_images: usize,
    ) -> Result<QuantizedModel> {
        let plan = Plan::quantized(&graph, &nodes)?;
        Ok(QuantizedModel {
            graph,
            nodes,
            plan,
            notes,
            observer,
            calibration_images,
        })
    }

    /// The fused graph (int8 layers hold their dequantized weights).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Per node: int8 or float, output quantization, int8 weights.
    pub fn nodes(&self) -> &[NodeQuant] {
        &self.nodes
    }

    /// Layers that stay float, and why.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Convolutions and linear layers that run in int8.
    pub fn int8_layers(&self) -> usize {
        self.nodes.iter().filter(|q| q.weights.is_some()).count()
    }

    /// The observer that chose the activation ranges, and how many images it saw.
    pub fn calibration(&self) -> (&str, usize) {
        (&self.observer, self.calibration_images)
    }

    /// Runs the int8 plan on a batch.
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        self.plan.run(x)
    }

    /// The same model in float with fake quantization: every value the plan stores as bytes
    /// is rounded to its quantization, int8 layers read their inputs quantized and use the
    /// dequantized weights. The int8 plan computes this up to the rounding of ties.
    pub fn fake_quant(&self, x: &Tensor) -> Result<Tensor> {
        let nodes = self.graph.nodes();
        let bytes = |i: usize| self.nodes[i].int8 && self.nodes[i].output.is_some();
        let computes_int8 = |i: usize| {
            let q = &self.nodes[i];
            q.int8 && (q.weights.is_some() || matches!(nodes[i].op, Op::Add))
        };
        let mut values: Vec<Option<Tensor>> = vec![None; nodes.len()];
        crate::autograd::no_grad(|| -> Result<()> {
            for (i, node) in nodes.iter().enumerate() {
                let mut y = if i == 0 {
                    x.clone()
                } else {
                    let mut inputs = Vec::with_capacity(node.inputs.len());
                    for v in &node.inputs {
                        let t = values[v.0].clone().ok_or_else(|| {
                            invalid("quantize", "a value read before it was computed")
                        })?;
                        // An int8 layer reads bytes: a float value is quantized first.
                        inputs.push(
                            match (computes_int8(i) && !bytes(v.0), self.nodes[v.0].output) {
                                (true, Some(p)) => t.fake_quantize(p, QRange::U8)?,
                                _ => t,
                            },
                        );
                    }
                    let refs: Vec<&Tensor> = inputs.iter().collect();
                    eval::run_node(node, &refs)?
                };
                // Values stored as bytes are rounded; max pooling, flatten and the shortcut
                // only move bytes, so their values are already on the grid.
                let rounds = i == 0
                    || computes_int8(i)
                    || matches!(node.op, Op::AvgPool2d(_) | Op::AdaptiveAvgPool2d(_));
                if bytes(i) && rounds {
                    let p = self.nodes[i].output.expect("bytes have a quantization");
                    y = y.fake_quantize(p, QRange::U8)?;
                }
                values[i] = Some(y);
            }
            Ok(())
        })?;
        values[self.graph.output().0]
            .take()
            .ok_or_else(|| invalid("quantize", "no output"))
    }
}

impl Predictor for QuantizedModel {
    fn predict(&self, x: &Tensor) -> Result<Tensor> {
        self.plan.run(x)
    }
}

// ----- Files ----------------------------------------------------------------------------

/// The `format` of quantized checkpoints' metadata.
pub const QUANTIZED_FORMAT: &str = "convnet-quantized";

impl QuantizedModel {
    /// Saves the model as safetensors: int8 layers' weights as `I8` tensors under the float
    /// model's names (`conv1.weight`, with `conv1.weight_scale` per output channel and the
    /// float `conv1.bias`), float layers' (BatchNorm-folded) weights as `F32`, and every
    /// stored quantization as `NAME.output_scale` / `NAME.output_zero_point` (`input.` for
    /// the model input); `meta` (the float checkpoint's metadata) with `format =
    /// convnet-quantized` and the quantization settings.
    pub fn save(&self, path: &Path, meta: &CheckpointMeta) -> Result<()> {
        let mut entries: Vec<(String, crate::checkpoint::RawTensor)> = Vec::new();
        use crate::checkpoint::RawTensor;
        for (node, q) in self.graph.nodes().iter().zip(&self.nodes) {
            let name = &node.name;
            match &q.weights {
                Some(w8) => {
                    let (Op::Conv2d { weight, .. } | Op::Linear { weight, .. }) = &node.op else {
                        return Err(invalid(
                            "quantize",
                            format!("{name}: int8 weights on a {}", node.op.kind()),
                        ));
                    };
                    entries.push((
                        format!("{name}.weight"),
                        RawTensor::i8(weight.dims(), &w8.weight),
                    ));
                    entries.push((
                        format!("{name}.weight_scale"),
                        RawTensor::f32(&[w8.scales.len()], &w8.scales),
                    ));
                    if let Some(b) = &w8.bias {
                        entries.push((format!("{name}.bias"), RawTensor::f32(&[b.len()], b)));
                    }
                }
                None => {
                    for (t, tensor) in node.op.tensors() {
                        entries.push((
                            format!("{name}.{t}"),
                            RawTensor::f32(tensor.dims(), &tensor.try_to_vec()?),
                        ));
                    }
                }
            }
            if let Some(p) = q.output {
                entries.push((
                    format!("{name}.output_scale"),
                    RawTensor::f32(&[1], &[p.scale]),
                ));
                entries.push((
                    format!("{name}.output_zero_point"),
                    RawTensor::i32(&[1], &[p.zero_point]),
                ));
            }
        }
        let mut map = meta.to_map();
        map.insert("format".into(), QUANTIZED_FORMAT.into());
        let int8: Vec<&str> = self
            .graph
            .nodes()
            .iter()
            .zip(&self.nodes)
            .filter(|(_, q)| q.int8)
            .map(|(n, _)| n.name.as_str())
            .collect();
        map.insert(
            "quantization".into(),
            serde_json::json!({
                "observer": self.observer,
                "calibration_images": self.calibration_images,
                "int8": int8,
                "float_notes": self.notes,
            })
            .to_string(),
        );
        crate::checkpoint::save_raw(path, &entries, map)
    }

    /// Loads a quantized checkpoint: the float model is rebuilt from the metadata (as for a
    /// float checkpoint), fused, and given the file's weights and quantizations, which must
    /// match it name for name and shape for shape.
    pub fn load(path: &Path) -> Result<(QuantizedModel, CheckpointMeta)> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// [`QuantizedModel::load`] for a file in memory; `path` names it in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<(QuantizedModel, CheckpointMeta)> {
        Self::from_bytes_with_limit(path, bytes, crate::nn::MAX_PARAMETERS)
    }

    /// [`QuantizedModel::from_bytes`] refusing a model of more than `max_parameters`
    /// parameters before it is built (as [`crate::models::ModelSpec::build_with_limit`]).
    pub fn from_bytes_with_limit(
        path: &Path,
        bytes: &[u8],
        max_parameters: usize,
    ) -> Result<(QuantizedModel, CheckpointMeta)> {
        let (tensors, map) = crate::checkpoint::tensors_from_bytes(path, bytes)?;
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        if map.get("format").map(String::as_str) != Some(QUANTIZED_FORMAT) {
            return Err(bad(
                "not a quantized convnet checkpoint (no format = convnet-quantized)".into(),
            ));
        }
        let meta = CheckpointMeta::from_map(path, &map)?;
        let settings: serde_json::Value = map
            .get("quantization")
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("missing or invalid quantization metadata".into()))?;
        let int8_names: Vec<String> = serde_json::from_value(settings["int8"].clone())
            .map_err(|_| bad("quantization metadata: int8 is not a list of names".into()))?;
        let notes: Vec<String> =
            serde_json::from_value(settings["float_notes"].clone()).unwrap_or_default();
        let observer = settings["observer"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        let calibration_images = settings["calibration_images"].as_u64().unwrap_or(0) as usize;
        let spec = crate::models::ModelSpec::from_checkpoint(
            &meta.architecture,
            meta.model_spec.as_deref(),
        )?;
        let model = spec.build_with_limit(meta.input_shape, meta.classes.len(), max_parameters)?;
        let (mut graph, _) = fuse_for_int8(&model.graph()?)?;
        let mut by_name: HashMap<String, Tensor> = tensors.into_iter().collect();
        let take = |by_name: &mut HashMap<String, Tensor>,
                    name: String,
                    dims: &[usize]|
         -> Result<Tensor> {
            let t = by_name
                .remove(&name)
                .ok_or_else(|| bad(format!("missing tensor {name}")))?;
            if t.dims() != dims {
                return Err(bad(format!(
                    "{name}: expected shape {:?}, got {:?}",
                    dims,
                    t.dims()
                )));
            }
            Ok(t)
        };
        let mut quant = Vec::with_capacity(graph.nodes().len());
        for node in graph.nodes_mut() {
            let name = node.name.clone();
            let int8 = int8_names.contains(&name);
            let output = if by_name.contains_key(&format!("{name}.output_scale")) {
                let scale = take(&mut by_name, format!("{name}.output_scale"), &[1])?.to_vec()[0];
                let zp = take(&mut by_name, format!("{name}.output_zero_point"), &[1])?.to_vec()[0];
                let valid = scale.is_finite() && scale > 0.0 && (0.0..=255.0).contains(&zp);
                if !valid || zp.fract() != 0.0 {
                    return Err(bad(format!(
                        "{name}: invalid output quantization (scale {scale}, zero point {zp})"
                    )));
                }
                Some(QParams {
                    scale,
                    zero_point: zp as i32,
                })
            } else {
                None
            };
            let mut weights = None;
            match &mut node.op {
                Op::Conv2d { weight, bias, .. } | Op::Linear { weight, bias, .. } if int8 => {
                    let dims = weight.dims().to_vec();
                    let w = take(&mut by_name, format!("{name}.weight"), &dims)?.to_vec();
                    if w.iter()
                        .any(|v| !(-128.0..=127.0).contains(v) || v.fract() != 0.0)
                    {
                        return Err(bad(format!(
                            "{name}.weight: int8 weights outside -128..127"
                        )));
                    }
                    let scales =
                        take(&mut by_name, format!("{name}.weight_scale"), &dims[..1])?.to_vec();
                    if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                        return Err(bad(format!(
                            "{name}.weight_scale: scales must be positive and finite"
                        )));
                    }
                    let b = match bias {
                        Some(b) => {
                            Some(take(&mut by_name, format!("{name}.bias"), b.dims())?.to_vec())
                        }
                        None => None,
                    };
                    weights = Some(Int8Weights {
                        weight: w.iter().map(|&v| v as i8).collect(),
                        scales,
                        bias: b,
                    });
                }
                op => {
                    let names: Vec<(&'static str, Vec<usize>)> = op
                        .tensors()
                        .iter()
                        .map(|(n, t)| (*n, t.dims().to_vec()))
                        .collect();
                    let mut loaded = Vec::new();
                    for (t, dims) in names {
                        loaded.push(take(&mut by_name, format!("{name}.{t}"), &dims)?);
                    }
                    set_tensors(op, loaded);
                }
            }
            quant.push(NodeQuant {
                int8,
                output,
                weights,
            });
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(bad(format!(
                "unexpected tensor {extra}: the file does not fit {}",
                meta.architecture
            )));
        }
        set_dequantized_weights(&mut graph, &quant)?;
        let model = QuantizedModel::from_parts(graph, quant, notes, observer, calibration_images)
            .map_err(|e| bad(format!("does not describe a runnable int8 model: {e}")))?;
        Ok((model, meta))
    }
}

/// Puts `loaded` (in [`Op::tensors`] order) into `op`.
fn set_tensors(op: &mut Op, loaded: Vec<Tensor>) {
    for (slot, t) in op.tensors_mut().into_iter().zip(loaded) {
        *slot = t;
    }
}

/// Whether a checkpoint file's metadata says it is quantized (reads the header only).
pub fn is_quantized_file(path: &Path) -> bool {
    crate::checkpoint::read_format(path).is_some_and(|f| f == QUANTIZED_FORMAT)
}
