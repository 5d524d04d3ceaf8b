//! Quantization-aware training: a float model trained through the rounding its int8 form
//! will do, then converted to that form.
//!
//! [`QatNet`] wraps a float model's network (same parameters, same `state_dict` names) and
//! runs its graph with fake quantization exactly where the int8 plan of [`super::quantize`]
//! rounds: every value stored as bytes (after a convolution's fused ReLU/ReLU6 and residual
//! addition, the input, average pooling) and every float value an int8 layer reads. Weights
//! of int8 layers are fake-quantized per output channel with the range of their current
//! values (what conversion will use). A convolution followed by BatchNorm trains as
//! PyTorch's `ConvBn2d` (`_forward_approximate`): the weights are scaled by `gamma /
//! sqrt(running_var + eps)` and fake-quantized, the convolution's output divided by that
//! scale and passed through the BatchNorm, so the rounding seen in training is the rounding
//! of the folded weights. Gradients pass straight through the rounding (zero where a value
//! was clamped).
//!
//! Activation ranges are moving averages of each batch's minimum and maximum (constant
//! 0.01, PyTorch's `MovingAverageMinMaxObserver`). [`QatNet::freeze`] stops them and the
//! BatchNorm statistics (PyTorch's `disable_observer` and `freeze_bn_stats`), usually for
//! the last epochs. [`QatNet::convert`] folds the BatchNorms with their running statistics
//! and builds the [`QuantizedModel`] with the learned ranges.

use super::model::{
    assemble, computes_int8, fuse_for_int8, layout, rounds, Layout, QuantizedModel,
};
use super::observer::{MovingAverage, PerChannelMinMax, QParams, QRange, Scheme};
use crate::error::{invalid, Result};
use crate::graph::{Graph, Node, Op, ValueId};
use crate::nn::{Mode, Model, Module, SummaryRow, TensorRole};
use crate::rng::with_global_rng;
use crate::shape::Shape;
use crate::tensor::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// PyTorch's averaging constant for QAT activation observers.
pub const AVERAGING_CONSTANT: f32 = 0.01;

/// What the QAT forward does at one node of the float graph.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// Run the layer as in training.
    Plain,
    /// A convolution whose BatchNorm (the node given) computes both.
    FoldedConv,
    /// The BatchNorm of the convolution given: runs the `ConvBn2d` forward.
    FoldedBn(usize),
    /// A convolution or linear layer run in int8: weights fake-quantized.
    QuantWeights,
}

/// A float network trained with fake quantization (see the module documentation).
pub struct QatNet {
    inner: Box<dyn Module>,
    input_shape: Vec<usize>,
    graph: Graph,
    roles: Vec<Role>,
    /// Per node: the observer of its output (a value the int8 plan quantizes).
    observe: Vec<Option<usize>>,
    /// Per node: the observer whose quantization rounds the output (a value the int8 plan
    /// stores as bytes; pooling and flatten keep their input's quantization).
    round: Vec<Option<usize>>,
    /// Per node and input: whether the input is quantized on read (a float value read by
    /// an int8 layer), with the observer of that value.
    read_quant: Vec<Vec<Option<usize>>>,
    observers: Mutex<Vec<MovingAverage>>,
    frozen: AtomicBool,
}

impl std::fmt::Debug for QatNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QatNet({} fake-quantized values)",
            self.observers.lock().map(|o| o.len()).unwrap_or(0)
        )
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl QatNet {
    /// Wraps `model` (its current weights: usually a trained float model) for QAT.
    ///
    /// ```
    /// use convnet::quant::qat::QatNet;
    /// use convnet::nn::Mode;
    /// convnet::manual_seed(0);
    /// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
    /// let qat = QatNet::new(model)?.into_model()?;
    /// let x = convnet::Tensor::randn([4, 3, 32, 32], &mut convnet::Rng::new(1));
    /// let y = qat.forward(&x, Mode::Train)?;
    /// assert_eq!(y.dims(), &[4, 10]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn new(model: Model) -> Result<QatNet> {
        let graph = model.graph()?;
        let (fused, map) = fuse_for_int8(&graph)?;
        let lay = layout(&fused);
        let nodes = graph.nodes();
        let n = nodes.len();
        // The source node holding each fused value: the last one mapped to it.
        let mut holder = vec![usize::MAX; fused.nodes().len()];
        for (s, &f) in map.iter().enumerate() {
            if f != usize::MAX {
                holder[f] = s;
            }
        }
        let mut roles = vec![Role::Plain; n];
        for (s, node) in nodes.iter().enumerate() {
            let f = map[s];
            if f == usize::MAX || !computes_int8(&fused, &lay, f) {
                continue;
            }
            match &node.op {
                Op::Conv2d { .. } => {
                    // Its BatchNorm, if folded into the same fused node.
                    let bn = (s + 1..n).find(|&j| {
                        map[j] == f
                            && matches!(nodes[j].op, Op::BatchNorm2d { .. })
                            && nodes[j].inputs == [ValueId(s)]
                    });
                    match bn {
                        Some(j) => {
                            roles[s] = Role::FoldedConv;
                            roles[j] = Role::FoldedBn(s);
                        }
                        None => roles[s] = Role::QuantWeights,
                    }
                }
                Op::Linear { .. } => roles[s] = Role::QuantWeights,
                _ => {}
            }
        }
        let mut observe = vec![None; n];
        let mut round = vec![None; n];
        let mut count = 0;
        // The observer of each fused value: its own, or its input's for layers that keep
        // their input's quantization.
        let mut observer_of = vec![None; fused.nodes().len()];
        for (f, &s) in holder.iter().enumerate() {
            if s == usize::MAX || !lay.wanted[f] {
                continue;
            }
            let keeps_input = lay.bytes[f] && passes_through(&fused.nodes()[f].op);
            observer_of[f] = if keeps_input {
                observer_of[fused.nodes()[f].inputs[0].0]
            } else {
                observe[s] = Some(count);
                count += 1;
                Some(count - 1)
            };
            if lay.bytes[f] && rounds(&fused, &lay, f) {
                round[s] = observer_of[f];
            }
        }
        let read_quant = nodes
            .iter()
            .enumerate()
            .map(|(s, node)| {
                let f = map[s];
                node.inputs
                    .iter()
                    .map(|v| {
                        let g = map[v.0];
                        let reader_int8 = f != usize::MAX && computes_int8(&fused, &lay, f);
                        if reader_int8
                            && g != f
                            && g != usize::MAX
                            && !lay.bytes[g]
                            && lay.wanted[g]
                        {
                            observer_of[g]
                        } else {
                            None
                        }
                    })
                    .collect()
            })
            .collect();
        let input_shape = model.input_shape().to_vec();
        Ok(QatNet {
            inner: model.into_net(),
            input_shape,
            graph,
            roles,
            observe,
            round,
            read_quant,
            observers: Mutex::new(vec![MovingAverage::new(AVERAGING_CONSTANT); count]),
            frozen: AtomicBool::new(false),
        })
    }

    /// The QAT network inside `model`, if it is one.
    pub fn of(model: &Model) -> Option<&QatNet> {
        model.net().as_any()?.downcast_ref::<QatNet>()
    }

    /// This network in a [`Model`] (for the trainer).
    pub fn into_model(self) -> Result<Model> {
        let shape = self.input_shape.clone();
        Model::new(Box::new(self), &shape)
    }

    /// Stops the observers and the BatchNorm statistics (or restarts them).
    pub fn freeze(&self, on: bool) {
        self.frozen.store(on, Ordering::Relaxed);
    }

    /// Whether observers and BatchNorm statistics are frozen.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    /// The learned activation ranges, as `(min, max)` per observed value (for saving).
    pub fn ranges(&self) -> Vec<(f32, f32)> {
        lock(&self.observers)
            .iter()
            .map(|o| (o.min, o.max))
            .collect()
    }

    /// Restores [`QatNet::ranges`].
    pub fn set_ranges(&self, ranges: &[(f32, f32)]) -> Result<()> {
        let mut obs = lock(&self.observers);
        if ranges.len() != obs.len() {
            return Err(invalid(
                "qat",
                format!("{} ranges for {} observed values", ranges.len(), obs.len()),
            ));
        }
        for (o, &(lo, hi)) in obs.iter_mut().zip(ranges) {
            (o.min, o.max) = (lo, hi);
        }
        Ok(())
    }

    fn qparams(&self, k: usize) -> QParams {
        lock(&self.observers)[k].qparams(QRange::U8, Scheme::Affine)
    }

    /// Observes value `y` with observer `observe` (when training and not frozen) and rounds
    /// it with observer `round`'s quantization.
    fn observe_and_round(
        &self,
        observe: Option<usize>,
        round: Option<usize>,
        y: Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        if let (Some(k), true) = (observe, mode.is_train() && !self.is_frozen()) {
            let values = y.try_to_vec()?;
            lock(&self.observers)[k].observe(&values);
        }
        match round {
            Some(k) => y.fake_quantize(self.qparams(k), QRange::U8),
            None => Ok(y),
        }
    }

    /// Converts to the int8 model: BatchNorms folded with their running statistics, weights
    /// quantized per output channel, activations with the learned ranges.
    pub fn convert(&self) -> Result<QuantizedModel> {
        let graph = Graph::of(self.inner.as_ref(), &self.input_shape)?;
        let (fused, map) = fuse_for_int8(&graph)?;
        let lay: Layout = layout(&fused);
        let mut holder = vec![usize::MAX; fused.nodes().len()];
        for (s, &f) in map.iter().enumerate() {
            if f != usize::MAX {
                holder[f] = s;
            }
        }
        // Layers that keep their input's quantization get it in `assemble`.
        let qparams = (0..fused.nodes().len())
            .map(|f| {
                if lay.wanted[f] && holder[f] != usize::MAX {
                    self.observe[holder[f]].map(|k| self.qparams(k))
                } else {
                    None
                }
            })
            .collect();
        assemble(fused, lay, qparams, "qat moving average".into(), 0)
    }
}

/// Layers that move bytes without computing (they keep their input's quantization).
fn passes_through(op: &Op) -> bool {
    matches!(
        op,
        Op::MaxPool2d(_)
            | Op::AvgPool2d(_)
            | Op::AdaptiveAvgPool2d(_)
            | Op::PadChannels { .. }
            | Op::Flatten { .. }
    )
}

/// PyTorch's `ConvBn2d._forward_approximate`: the convolution with `gamma / sqrt(var +
/// eps)`-scaled, fake-quantized weights (`weight_q` chooses their quantization from the
/// scaled values), divided back, plus the convolution's bias, then the BatchNorm (batch
/// statistics and running-statistics update when `train_bn`, else the running ones).
#[allow(clippy::too_many_arguments)]
pub fn conv_bn_forward(
    x: &Tensor,
    conv: &Node,
    bn: &Node,
    train_bn: bool,
    weight_q: &dyn Fn(&Tensor) -> Result<Vec<QParams>>,
) -> Result<Tensor> {
    let (
        Op::Conv2d {
            weight,
            bias,
            params,
            ..
        },
        Op::BatchNorm2d {
            weight: gamma,
            bias: beta,
            mean,
            var,
            eps,
            momentum,
            batches,
        },
    ) = (&conv.op, &bn.op)
    else {
        return Err(invalid(
            "qat",
            "conv_bn_forward takes a convolution and a BatchNorm",
        ));
    };
    let k = weight.dims()[0];
    let std: Vec<f32> = var.try_to_vec()?.iter().map(|v| (v + eps).sqrt()).collect();
    let std = Tensor::from_vec(std, [k])?;
    let scale = gamma.div(&std)?;
    let scaled = weight.mul(&scale.reshape([k, 1, 1, 1])?)?;
    let qs = weight_q(&scaled)?;
    let wq = scaled.fake_quantize_per_channel(&qs, QRange::I8)?;
    let mut y = x
        .conv2d(&wq, None, *params)?
        .div(&scale.reshape([1, k, 1, 1])?)?;
    if let Some(b) = bias {
        y = y.add(&b.reshape([1, k, 1, 1])?)?;
    }
    let out = y.batch_norm2d(
        mean,
        var,
        Some(gamma),
        Some(beta),
        train_bn,
        *momentum,
        *eps,
    )?;
    if train_bn {
        batches.update_data(|n| n[0] += 1.0)?;
    }
    Ok(out)
}

/// Per-channel symmetric int8 quantization of `w`'s current values.
pub fn weight_qparams(w: &Tensor) -> Result<Vec<QParams>> {
    let mut o = PerChannelMinMax::default();
    o.observe(&w.try_to_vec()?, w.dims()[0]);
    Ok(o.qparams(QRange::I8, Scheme::Symmetric))
}

impl Module for QatNet {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let nodes = self.graph.nodes();
        let train_bn = mode.is_train() && !self.is_frozen();
        let mut values: Vec<Option<Tensor>> = vec![None; nodes.len()];
        // Input `k` of node `at`, quantized on read when an int8 layer reads a float value.
        let read = |values: &[Option<Tensor>], at: usize, k: usize| -> Result<Tensor> {
            let v = nodes[at].inputs[k];
            let t = values[v.0].clone().ok_or_else(|| {
                invalid(
                    "qat",
                    format!("{} reads a value not computed", nodes[at].name),
                )
            })?;
            match self.read_quant[at][k] {
                Some(o) => t.fake_quantize(self.qparams(o), QRange::U8),
                None => Ok(t),
            }
        };
        for (i, node) in nodes.iter().enumerate() {
            let inputs: Vec<Tensor> = match self.roles[i] {
                // Computed by its BatchNorm.
                Role::FoldedConv => continue,
                // A folded BatchNorm reads its convolution's input.
                Role::FoldedBn(c) => vec![read(&values, c, 0)?],
                _ => (0..node.inputs.len())
                    .map(|k| read(&values, i, k))
                    .collect::<Result<_>>()?,
            };
            let y = match (&node.op, self.roles[i]) {
                (Op::Input, _) => x.clone(),
                (_, Role::FoldedBn(c)) => {
                    conv_bn_forward(&inputs[0], &nodes[c], node, train_bn, &weight_qparams)?
                }
                (
                    Op::Conv2d {
                        weight,
                        bias,
                        params,
                        act,
                    },
                    Role::QuantWeights,
                ) => {
                    let wq =
                        weight.fake_quantize_per_channel(&weight_qparams(weight)?, QRange::I8)?;
                    let mut y = inputs[0].conv2d(&wq, bias.as_ref(), *params)?;
                    if let Some(r) = inputs.get(1) {
                        y = y.add(r)?;
                    }
                    match act {
                        Some(a) => y.activation(*a)?,
                        None => y,
                    }
                }
                (Op::Linear { weight, bias, act }, Role::QuantWeights) => {
                    let wq =
                        weight.fake_quantize_per_channel(&weight_qparams(weight)?, QRange::I8)?;
                    let y = inputs[0].linear(&wq, bias.as_ref())?;
                    match act {
                        Some(a) => y.activation(*a)?,
                        None => y,
                    }
                }
                (
                    Op::BatchNorm2d {
                        weight,
                        bias,
                        mean,
                        var,
                        eps,
                        momentum,
                        batches,
                    },
                    _,
                ) => {
                    let y = inputs[0].batch_norm2d(
                        mean,
                        var,
                        Some(weight),
                        Some(bias),
                        train_bn,
                        *momentum,
                        *eps,
                    )?;
                    if train_bn {
                        batches.update_data(|n| n[0] += 1.0)?;
                    }
                    y
                }
                (Op::Dropout(p), _) => {
                    if mode.is_train() {
                        with_global_rng(|r| inputs[0].dropout(*p, true, r))?
                    } else {
                        inputs[0].clone()
                    }
                }
                _ => {
                    let refs: Vec<&Tensor> = inputs.iter().collect();
                    crate::graph::eval::run_node(node, &refs)?
                }
            };
            let y = self.observe_and_round(self.observe[i], self.round[i], y, mode)?;
            values[i] = Some(y);
        }
        values[self.graph.output().0]
            .take()
            .ok_or_else(|| invalid("qat", "no output"))
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        self.inner.output_shape(input)
    }

    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        self.inner.visit_tensors(prefix, f)
    }

    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        self.inner.describe(path, input, g)
    }

    fn infer(&self, path: &str, input: &[usize], rows: &mut Vec<SummaryRow>) -> Result<Shape> {
        self.inner.infer(path, input, rows)
    }
}
