//! The inference plan: an eval-mode model compiled for fast inference on the CPU, in float32
//! or with int8 layers (a quantized model, [`crate::quant`]).
//!
//! The model's graph is fused ([`crate::graph::fold::fuse`]: BatchNorm folded into the
//! convolution before it, activations and residual additions into the convolution's
//! epilogue), weights are packed once for the kernels of [`crate::backend::cpu::nhwc`]
//! (float) and [`crate::backend::cpu::int8`] (int8), and images flow channels-last through
//! buffers allocated once and reused: no autograd bookkeeping, no allocation per layer.
//! Layers up to the first `flatten` run image by image, so one image's activations stay in
//! the core's cache (a batch is split over the threads; a single image is split by rows);
//! the layers after it (the classifier) run on the whole batch.
//!
//! In a quantized plan each value is float or bytes with a scale and zero point; a layer
//! that runs in int8 reads bytes, one that runs in float reads floats, and the plan inserts
//! the conversions where they meet.
//!
//! ```
//! use convnet::infer::Plan;
//! use convnet::nn::Mode;
//! let model = convnet::models::build("resnet20", [3, 32, 32], 10)?;
//! let plan = Plan::new(&model)?;
//! let x = convnet::Tensor::randn([2, 3, 32, 32], &mut convnet::Rng::new(0));
//! let fast = plan.run(&x)?.to_vec();
//! let slow = model.forward(&x, Mode::Eval)?.to_vec();
//! for (a, b) in fast.iter().zip(&slow) {
//!     assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0));
//! }
//! # Ok::<(), convnet::Error>(())
//! ```

use crate::backend::cpu::activation::Activation;
use crate::backend::cpu::int8::{
    self, ConvQuant, Int8Conv, Int8Kernel, Int8Out, PackedInt8, PackedInt8Depthwise,
};
use crate::backend::cpu::nhwc::{
    self, DirectConv, Epilogue, OutRows, PackedConv, PackedDepthwise, PackedLinear, Plane,
};
use crate::backend::cpu::winograd::PackedWinograd;
use crate::device::Device;
use crate::error::{invalid, Error, Result};
use crate::graph::{fold, Graph, Op, ValueId};
use crate::nn::{Mode, Model};
use crate::quant::QParams;
use crate::tensor::{AvgPool2dParams, MaxPool2dParams, Tensor};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

pub mod gradient;

/// Something that maps a batch of inputs to outputs in eval mode: a [`Model`] run layer by
/// layer, its compiled [`Plan`], or a quantized model. Evaluation and prediction take any.
pub trait Predictor: Send + Sync {
    /// The outputs (logits) for a batch `[N, ...input]`.
    fn predict(&self, x: &Tensor) -> Result<Tensor>;

    /// Where inputs must be.
    fn device(&self) -> Device {
        Device::Cpu
    }
}

impl Predictor for Model {
    fn predict(&self, x: &Tensor) -> Result<Tensor> {
        crate::autograd::no_grad(|| self.forward(x, Mode::Eval))
    }

    fn device(&self) -> Device {
        Model::device(self)
    }
}

impl Predictor for Plan {
    fn predict(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x)
    }
}

/// The fastest way to run a model for inference: its [`Plan`] when the model is on the CPU
/// and the plan covers every layer, the model itself otherwise.
pub enum Compiled<'a> {
    /// The compiled plan.
    Plan(Plan),
    /// The model, layer by layer (on a GPU, or with a layer the plan does not cover).
    Model(&'a Model),
}

impl Compiled<'_> {
    /// Compiles `model` when it can.
    ///
    /// ```
    /// use convnet::infer::{Compiled, Predictor};
    /// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
    /// let fast = Compiled::new(&model);
    /// assert!(matches!(fast, Compiled::Plan(_)));
    /// let x = convnet::Tensor::zeros([1, 3, 32, 32]);
    /// assert_eq!(fast.predict(&x)?.dims(), &[1, 10]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn new(model: &Model) -> Compiled<'_> {
        if model.device() != Device::Cpu {
            return Compiled::Model(model);
        }
        match Plan::new(model) {
            Ok(plan) => Compiled::Plan(plan),
            Err(_) => Compiled::Model(model),
        }
    }
}

impl Predictor for Compiled<'_> {
    fn predict(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Compiled::Plan(p) => p.run(x),
            Compiled::Model(m) => m.predict(x),
        }
    }

    fn device(&self) -> Device {
        match self {
            Compiled::Plan(_) => Device::Cpu,
            Compiled::Model(m) => Predictor::device(*m),
        }
    }
}

/// Int8 weights of a convolution or linear layer: `[out, in/groups, KH, KW]` (or `[out,
/// in]`) with one symmetric scale per output channel, and the float bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weights {
    /// The quantized weights, PyTorch's layout.
    pub weight: Vec<i8>,
    /// Per-output-channel scales (zero points are 0).
    pub scales: Vec<f32>,
    /// The float bias.
    pub bias: Option<Vec<f32>>,
}

/// How one node of a fused graph runs in a quantized plan.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeQuant {
    /// Run the layer on int8 kernels: convolutions and linear layers with [`Self::weights`];
    /// pooling, flatten, shortcuts and additions on bytes.
    pub int8: bool,
    /// The quantization of the node's output: how an int8 layer stores it, or how a float
    /// value is quantized for an int8 reader. `None` keeps it float.
    pub output: Option<QParams>,
    /// Int8 weights (int8 convolutions and linear layers).
    pub weights: Option<Int8Weights>,
}

/// The element type of a value.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Elem {
    F32,
    U8(QParams),
}

impl Elem {
    fn key(self) -> (bool, i32) {
        match self {
            Elem::F32 => (false, 0),
            Elem::U8(q) => (true, q.zero_point),
        }
    }
}

/// A per-image value: where it lives.
#[derive(Clone, Copy, Debug)]
struct Slot {
    plane: Plane,
    elem: Elem,
    buffer: usize,
}

#[derive(Debug)]
enum FloatKernel {
    Direct(PackedConv),
    Depthwise(PackedDepthwise),
}

#[derive(Debug)]
enum Int8ConvKernel {
    Direct(PackedInt8),
    Depthwise(PackedInt8Depthwise),
}

/// The output side of an int8 convolution.
#[derive(Debug, Clone, Copy)]
enum QOut {
    Bytes {
        zero_point: i32,
        clamp: (i32, i32),
        /// Residual value and `s_r / s_out`.
        residual: Option<(usize, f32, i32)>,
    },
    Floats(Option<Activation>),
}

/// One op of the per-image part; numbers are value ids.
#[derive(Debug)]
enum ImageStep {
    Conv {
        input: usize,
        residual: Option<usize>,
        out: usize,
        geometry: DirectConv,
        kernel: FloatKernel,
        act: Option<Activation>,
    },
    QConv {
        input: usize,
        out: usize,
        geometry: Int8Conv,
        kernel: Int8ConvKernel,
        q: QOut,
    },
    Map {
        input: usize,
        affine: Option<(Vec<f32>, Vec<f32>)>,
        act: Option<Activation>,
        out: usize,
    },
    Add {
        a: usize,
        b: usize,
        out: usize,
    },
    QAdd {
        a: usize,
        b: usize,
        out: usize,
        clamp: (i32, i32),
    },
    MaxPool {
        input: usize,
        params: MaxPool2dParams,
        out: usize,
    },
    AvgPool {
        input: usize,
        params: AvgPool2dParams,
        out: usize,
    },
    AdaptiveAvgPool {
        input: usize,
        out: usize,
    },
    PadChannels {
        input: usize,
        stride: usize,
        before: usize,
        out: usize,
    },
    Quantize {
        input: usize,
        out: usize,
    },
    Dequantize {
        input: usize,
        out: usize,
    },
}

impl ImageStep {
    /// The values the step reads, then the one it writes.
    fn io(&self) -> (Vec<usize>, usize) {
        use ImageStep::*;
        match self {
            Conv {
                input,
                residual,
                out,
                ..
            } => {
                let mut v = vec![*input];
                v.extend(residual);
                (v, *out)
            }
            QConv { input, out, q, .. } => {
                let mut v = vec![*input];
                if let QOut::Bytes {
                    residual: Some((r, _, _)),
                    ..
                } = q
                {
                    v.push(*r);
                }
                (v, *out)
            }
            Add { a, b, out } | QAdd { a, b, out, .. } => (vec![*a, *b], *out),
            Map { input, out, .. }
            | MaxPool { input, out, .. }
            | AvgPool { input, out, .. }
            | AdaptiveAvgPool { input, out }
            | PadChannels { input, out, .. }
            | Quantize { input, out }
            | Dequantize { input, out } => (vec![*input], *out),
        }
    }
}

/// Rows of the batch part: `[N, features]`, floats (contiguous) or bytes (rows `stride`
/// bytes apart).
#[derive(Clone, Copy, Debug, PartialEq)]
enum RowsKind {
    F32,
    U8(QParams),
}

/// One op of the batch part.
#[derive(Debug)]
enum BatchStep {
    Linear {
        packed: PackedLinear,
        act: Option<Activation>,
    },
    QLinear {
        packed: Box<PackedInt8>,
        outputs: usize,
        q: QOut,
    },
    Activation(Activation),
    Softmax,
    Quantize(QParams),
    Dequantize(QParams),
}

/// A compiled eval-mode model (see the module documentation).
pub struct Plan {
    input_shape: Vec<usize>,
    output_dims: Vec<usize>,
    slots: Vec<Slot>,
    /// Buffer sizes and fill values (0.0, or a zero point for bytes).
    buffers: Vec<(usize, Elem)>,
    input_value: usize,
    image_steps: Vec<ImageStep>,
    image_out: usize,
    /// Whether images are flattened in (pixel, channel) order (see the plan's build).
    nhwc_rows: bool,
    batch_steps: Vec<BatchStep>,
    /// Whether one image is worth splitting between threads (see [`SPLIT_IMAGE_WORK`]).
    split_images: bool,
    /// Spare per-image buffer sets, reused across calls.
    arenas: Mutex<Vec<Vec<Buffer>>>,
}

/// The per-image work, in float multiply-adds (an int8 one counts a quarter: the int8
/// kernels do about four in the time of one float), from which a single image's
/// convolutions are split by rows between two threads. Below it the hand-overs cost more
/// than they save (measured: seed-cnn, 6 M, runs faster on one thread; resnet20, 41 M
/// float, 1.8x faster on two; its int8 plan about the same either way).
const SPLIT_IMAGE_WORK: f64 = 16e6;

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Plan({} image steps, {} batch steps)",
            self.image_steps.len(),
            self.batch_steps.len()
        )
    }
}

#[derive(Debug)]
enum Buffer {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

impl Buffer {
    fn f32(&self) -> &[f32] {
        match self {
            Buffer::F32(v) => v,
            Buffer::U8(_) => unreachable!("the plan types every buffer"),
        }
    }
    fn u8(&self) -> &[u8] {
        match self {
            Buffer::U8(v) => v,
            Buffer::F32(_) => unreachable!("the plan types every buffer"),
        }
    }
    fn f32_mut(&mut self) -> &mut [f32] {
        match self {
            Buffer::F32(v) => v,
            Buffer::U8(_) => unreachable!("the plan types every buffer"),
        }
    }
    fn u8_mut(&mut self) -> &mut [u8] {
        match self {
            Buffer::U8(v) => v,
            Buffer::F32(_) => unreachable!("the plan types every buffer"),
        }
    }
}

fn unsupported(name: &str, kind: &str, why: &str) -> Error {
    Error::Unsupported(format!("{name} ({kind}) has no inference-plan form: {why}"))
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m) * m
}

/// The byte clamp of an activation fused into a requantization.
fn clamp_of(act: Option<Activation>, q: QParams) -> Option<(i32, i32)> {
    match act {
        None => Some((0, 255)),
        Some(Activation::Relu) => Some((q.zero_point.clamp(0, 255), 255)),
        Some(Activation::Relu6) => {
            let six = q.zero_point as f32 + (6.0 / q.scale).round_ties_even();
            Some((q.zero_point.clamp(0, 255), six.clamp(0.0, 255.0) as i32))
        }
        Some(_) => None,
    }
}

/// Values and steps of the per-image part while they are being compiled.
struct Draft {
    /// `(c, h, w)`, element type and border of each value.
    shapes: Vec<(usize, usize, usize)>,
    elems: Vec<Elem>,
    halos: Vec<usize>,
    steps: Vec<ImageStep>,
    /// Conversions made so far: (value, bytes?) -> converted value.
    converted: HashMap<(usize, bool), usize>,
}

impl Draft {
    fn value(&mut self, shape: (usize, usize, usize), elem: Elem) -> usize {
        self.shapes.push(shape);
        self.elems.push(elem);
        self.halos.push(0);
        self.shapes.len() - 1
    }

    /// `v` as floats, dequantizing it once if it is bytes.
    fn floats(&mut self, v: usize) -> usize {
        match self.elems[v] {
            Elem::F32 => v,
            Elem::U8(_) => {
                if let Some(&c) = self.converted.get(&(v, false)) {
                    return c;
                }
                let out = self.value(self.shapes[v], Elem::F32);
                self.steps.push(ImageStep::Dequantize { input: v, out });
                self.converted.insert((v, false), out);
                out
            }
        }
    }

    /// `v` as bytes, quantizing it once with `q` if it is floats.
    fn bytes(&mut self, v: usize, q: Option<QParams>, name: &str) -> Result<usize> {
        match self.elems[v] {
            Elem::U8(_) => Ok(v),
            Elem::F32 => {
                if let Some(&c) = self.converted.get(&(v, true)) {
                    return Ok(c);
                }
                let q = q.ok_or_else(|| {
                    invalid(
                        "plan",
                        format!("{name} reads a float value that has no quantization"),
                    )
                })?;
                let out = self.value(self.shapes[v], Elem::U8(q));
                self.steps.push(ImageStep::Quantize { input: v, out });
                self.converted.insert((v, true), out);
                Ok(out)
            }
        }
    }

    fn qparams(&self, v: usize) -> QParams {
        match self.elems[v] {
            Elem::U8(q) => q,
            Elem::F32 => unreachable!("asked for the quantization of a float value"),
        }
    }
}

impl Plan {
    /// Compiles `model` (its current weights, eval-mode semantics) for float32. Models with
    /// a layer the plan does not cover (grouped but not depthwise convolutions, layers after
    /// `flatten` other than linear layers and activations) are an `Unsupported` error
    /// naming it; callers can then run the model itself.
    pub fn new(model: &Model) -> Result<Plan> {
        Plan::from_graph(&fold::fuse(&model.graph()?)?)
    }

    /// Compiles a fused graph for float32.
    pub fn from_graph(graph: &Graph) -> Result<Plan> {
        Plan::compile(graph, None, true, true)
    }

    /// Compiles a fused graph with per-node quantization (one entry per node).
    pub fn quantized(graph: &Graph, quant: &[NodeQuant]) -> Result<Plan> {
        if quant.len() != graph.nodes().len() {
            return Err(invalid("plan", "one quantization entry per graph node"));
        }
        Plan::compile(graph, Some(quant), true, true)
    }

    /// Compiles a fused graph for float32 with every per-image value in a buffer of its own,
    /// so that all of them are there after a run (what a backward pass reads). Its
    /// convolutions are all direct, so that the forward pass the gradients go back through
    /// has the direct kernel's rounding (attributions are held to 1e-4 of float64
    /// references, and a ReLU's mask flips with the smallest change of its input).
    fn keeping_values(graph: &Graph) -> Result<Plan> {
        Plan::compile(graph, None, false, false)
    }

    /// `share_buffers`: values whose lifetimes do not overlap may share a buffer.
    /// `winograd`: 3x3 stride-1 convolutions may take Winograd's F(2x2, 3x3) (see
    /// [`PackedWinograd::applies`]).
    fn compile(
        graph: &Graph,
        quant: Option<&[NodeQuant]>,
        share_buffers: bool,
        winograd: bool,
    ) -> Result<Plan> {
        let nodes = graph.nodes();
        let nq = |i: usize| quant.map(|q| &q[i]);
        let declared = |i: usize| nq(i).and_then(|q| q.output);
        let flatten = nodes
            .iter()
            .position(|n| matches!(n.op, Op::Flatten { .. }));
        let image_end = flatten.unwrap_or(nodes.len());
        if flatten.is_none() && graph.output().0 != nodes.len() - 1 {
            return Err(invalid("plan", "the output must be the last node"));
        }
        let shape3 = |v: ValueId| -> Result<(usize, usize, usize)> {
            let d = graph.shape(v).dims();
            if d.len() != 4 {
                let n = graph.node(v);
                return Err(unsupported(
                    &n.name,
                    n.op.kind(),
                    "expects [N, C, H, W] values before flatten",
                ));
            }
            Ok((d[1], d[2], d[3]))
        };
        let mut draft = Draft {
            shapes: Vec::new(),
            elems: Vec::new(),
            halos: Vec::new(),
            steps: Vec::new(),
            converted: HashMap::new(),
        };
        // The physical value of each graph node.
        let mut of = vec![usize::MAX; nodes.len()];
        let input_elem = match (nq(0), declared(0)) {
            (Some(q), Some(p)) if q.int8 => Elem::U8(p),
            _ => Elem::F32,
        };
        of[0] = draft.value(shape3(ValueId(0))?, input_elem);
        let input_value = of[0];
        for (i, node) in nodes.iter().enumerate().take(image_end).skip(1) {
            let shape = shape3(ValueId(i))?;
            let int8 = nq(i).is_some_and(|q| q.int8);
            let inp = |k: usize| of[node.inputs[k].0];
            let out = match &node.op {
                Op::Conv2d {
                    weight,
                    bias,
                    params,
                    act,
                } => {
                    let d = weight.dims();
                    let (k, cg, kh, kw) = (d[0], d[1], d[2], d[3]);
                    let in_c = draft.shapes[inp(0)].0;
                    let depthwise = cg == 1 && params.groups == k && k == in_c && params.groups > 1;
                    if params.groups != 1 && !depthwise {
                        return Err(unsupported(
                            &node.name,
                            "Conv2d",
                            "grouped convolutions other than depthwise",
                        ));
                    }
                    if int8 {
                        let w8 = nq(i).and_then(|q| q.weights.as_ref()).ok_or_else(|| {
                            invalid(
                                "plan",
                                format!("{}: an int8 convolution without int8 weights", node.name),
                            )
                        })?;
                        let input = draft.bytes(inp(0), declared(node.inputs[0].0), &node.name)?;
                        let in_q = draft.qparams(input);
                        let out_q = declared(i);
                        let cq = ConvQuant {
                            input: (in_q.scale, in_q.zero_point),
                            weight_scales: &w8.scales,
                            bias: w8.bias.as_deref(),
                            output_scale: out_q.map_or(1.0, |q| q.scale),
                        };
                        let (q, elem) = match out_q {
                            Some(oq) => {
                                let clamp = clamp_of(*act, oq).ok_or_else(|| {
                                    unsupported(
                                        &node.name,
                                        "Conv2d",
                                        "an int8 layer fuses only ReLU and ReLU6",
                                    )
                                })?;
                                let residual = match node.inputs.get(1) {
                                    Some(r) => {
                                        let rv = draft.bytes(of[r.0], declared(r.0), &node.name)?;
                                        let rq = draft.qparams(rv);
                                        Some((rv, rq.scale / oq.scale, rq.zero_point))
                                    }
                                    None => None,
                                };
                                (
                                    QOut::Bytes {
                                        zero_point: oq.zero_point,
                                        clamp,
                                        residual,
                                    },
                                    Elem::U8(oq),
                                )
                            }
                            None => {
                                if node.inputs.len() > 1 {
                                    return Err(unsupported(
                                        &node.name,
                                        "Conv2d",
                                        "a residual addition needs an int8 output",
                                    ));
                                }
                                (QOut::Floats(*act), Elem::F32)
                            }
                        };
                        let kernel = if depthwise {
                            Int8ConvKernel::Depthwise(PackedInt8Depthwise::new(
                                &w8.weight,
                                k,
                                (kh, kw),
                                &cq,
                                round_up(k, nhwc::LANES),
                            ))
                        } else {
                            Int8ConvKernel::Direct(PackedInt8::new(
                                &w8.weight,
                                k,
                                cg,
                                (kh, kw),
                                &cq,
                                Int8Kernel::detect(),
                            ))
                        };
                        let out = draft.value(shape, elem);
                        draft.halos[input] =
                            draft.halos[input].max(params.padding.0.max(params.padding.1));
                        draft.steps.push(ImageStep::QConv {
                            input,
                            out,
                            geometry: Int8Conv {
                                input: Plane {
                                    h: 0,
                                    w: 0,
                                    c: 0,
                                    cs: 0,
                                    halo: 0,
                                },
                                output: Plane {
                                    h: 0,
                                    w: 0,
                                    c: 0,
                                    cs: 0,
                                    halo: 0,
                                },
                                stride: params.stride,
                                padding: params.padding,
                                dilation: params.dilation,
                            },
                            kernel,
                            q,
                        });
                        out
                    } else {
                        let input = draft.floats(inp(0));
                        let residual = node.inputs.get(1).map(|r| draft.floats(of[r.0]));
                        let w = weight.try_to_vec()?;
                        let b = bias.as_ref().map(|b| b.try_to_vec()).transpose()?;
                        let kernel = if depthwise {
                            FloatKernel::Depthwise(PackedDepthwise::new(
                                &w,
                                b.as_deref(),
                                k,
                                (kh, kw),
                                round_up(k, nhwc::LANES),
                            ))
                        } else {
                            let packed = PackedConv::new(&w, b.as_deref(), k, cg, (kh, kw));
                            // shape = (C, H, W) of the output.
                            FloatKernel::Direct(
                                if winograd
                                    && PackedWinograd::applies(
                                        cg,
                                        (kh, kw),
                                        params.stride,
                                        params.padding,
                                        params.dilation,
                                        (shape.1, shape.2),
                                    )
                                {
                                    packed.with_winograd(&w)
                                } else {
                                    packed
                                },
                            )
                        };
                        let out = draft.value(shape, Elem::F32);
                        draft.halos[input] =
                            draft.halos[input].max(params.padding.0.max(params.padding.1));
                        draft.steps.push(ImageStep::Conv {
                            input,
                            residual,
                            out,
                            geometry: DirectConv {
                                input: Plane {
                                    h: 0,
                                    w: 0,
                                    c: 0,
                                    cs: 0,
                                    halo: 0,
                                },
                                output: Plane {
                                    h: 0,
                                    w: 0,
                                    c: 0,
                                    cs: 0,
                                    halo: 0,
                                },
                                kernel: (kh, kw),
                                stride: params.stride,
                                padding: params.padding,
                                dilation: params.dilation,
                            },
                            kernel,
                            act: *act,
                        });
                        out
                    }
                }
                Op::BatchNorm2d {
                    weight,
                    bias,
                    mean,
                    var,
                    eps,
                    ..
                } => {
                    let input = draft.floats(inp(0));
                    let (g, b, m, var) = (
                        weight.try_to_vec()?,
                        bias.try_to_vec()?,
                        mean.try_to_vec()?,
                        var.try_to_vec()?,
                    );
                    let scale: Vec<f32> = g
                        .iter()
                        .zip(&var)
                        .map(|(g, v)| (*g as f64 / (*v as f64 + *eps as f64).sqrt()) as f32)
                        .collect();
                    let shift: Vec<f32> = (0..g.len())
                        .map(|k| (b[k] as f64 - m[k] as f64 * scale[k] as f64) as f32)
                        .collect();
                    let out = draft.value(shape, Elem::F32);
                    draft.steps.push(ImageStep::Map {
                        input,
                        affine: Some((scale, shift)),
                        act: None,
                        out,
                    });
                    out
                }
                Op::Activation(a) => {
                    let input = draft.floats(inp(0));
                    let out = draft.value(shape, Elem::F32);
                    draft.steps.push(ImageStep::Map {
                        input,
                        affine: None,
                        act: Some(*a),
                        out,
                    });
                    out
                }
                Op::Add => {
                    if int8 {
                        let oq = declared(i).ok_or_else(|| {
                            invalid(
                                "plan",
                                format!(
                                    "{}: an int8 addition without output quantization",
                                    node.name
                                ),
                            )
                        })?;
                        let a = draft.bytes(inp(0), declared(node.inputs[0].0), &node.name)?;
                        let b = draft.bytes(inp(1), declared(node.inputs[1].0), &node.name)?;
                        let out = draft.value(shape, Elem::U8(oq));
                        draft.steps.push(ImageStep::QAdd {
                            a,
                            b,
                            out,
                            clamp: (0, 255),
                        });
                        out
                    } else {
                        let (a, b) = (draft.floats(inp(0)), draft.floats(inp(1)));
                        let out = draft.value(shape, Elem::F32);
                        draft.steps.push(ImageStep::Add { a, b, out });
                        out
                    }
                }
                Op::MaxPool2d(_)
                | Op::AvgPool2d(_)
                | Op::AdaptiveAvgPool2d(_)
                | Op::PadChannels { .. } => {
                    // Bytes stay bytes (in the input's quantization) when the layer runs in
                    // int8; otherwise floats.
                    let input = if int8 && matches!(draft.elems[inp(0)], Elem::U8(_)) {
                        inp(0)
                    } else {
                        draft.floats(inp(0))
                    };
                    let out = draft.value(shape, draft.elems[input]);
                    draft.steps.push(match &node.op {
                        Op::MaxPool2d(p) => ImageStep::MaxPool {
                            input,
                            params: *p,
                            out,
                        },
                        Op::AvgPool2d(p) => ImageStep::AvgPool {
                            input,
                            params: *p,
                            out,
                        },
                        Op::AdaptiveAvgPool2d(_) => ImageStep::AdaptiveAvgPool { input, out },
                        Op::PadChannels { stride, before, .. } => ImageStep::PadChannels {
                            input,
                            stride: *stride,
                            before: *before,
                            out,
                        },
                        _ => unreachable!(),
                    });
                    out
                }
                other => return Err(unsupported(&node.name, other.kind(), "not before flatten")),
            };
            of[i] = out;
        }
        // The batch part: flatten, then linear layers, activations and softmax.
        let mut batch_steps = Vec::new();
        let (image_out, mut features) = match flatten {
            Some(f) => {
                let node = &nodes[f];
                if !matches!(node.op, Op::Flatten { start_dim: 1 }) {
                    return Err(unsupported(&node.name, "Flatten", "only start_dim 1"));
                }
                (of[node.inputs[0].0], node.shape.dims()[1])
            }
            None => (of[graph.output().0], 0),
        };
        let mut rows = match draft.elems[image_out] {
            Elem::F32 => RowsKind::F32,
            Elem::U8(q) => RowsKind::U8(q),
        };
        // When a linear layer follows the flatten directly, images are flattened in their
        // planes' (pixel, channel) order and that layer's weight columns are permuted to
        // match, instead of reordering every image to (channel, pixel).
        let nhwc_rows = flatten.and_then(|f| {
            let dims = graph.shape(nodes[f].inputs[0]).dims().to_vec();
            let next = nodes.get(f + 1)?;
            let pixels: usize = dims.get(2..)?.iter().product();
            (dims.len() == 4 && pixels > 1 && matches!(next.op, Op::Linear { .. }))
                .then_some((dims[1], pixels))
        });
        // Column `ch * pixels + p` of the model's weight goes to `p * c + ch`.
        let permute_columns = |w: &[f32], outs: usize| -> Vec<f32> {
            let Some((c, pixels)) = nhwc_rows else {
                return w.to_vec();
            };
            let ins = c * pixels;
            let mut out = vec![0f32; w.len()];
            for o in 0..outs {
                for ch in 0..c {
                    for p in 0..pixels {
                        out[o * ins + p * c + ch] = w[o * ins + ch * pixels + p];
                    }
                }
            }
            out
        };
        let mut first_linear = true;
        if let Some(f) = flatten {
            let mut last = ValueId(f);
            for (i, node) in nodes.iter().enumerate().skip(f + 1) {
                if node.inputs != [last] {
                    return Err(unsupported(
                        &node.name,
                        node.op.kind(),
                        "after flatten, layers must form a chain",
                    ));
                }
                let to_floats = |rows: &mut RowsKind, steps: &mut Vec<BatchStep>| {
                    if let RowsKind::U8(q) = *rows {
                        steps.push(BatchStep::Dequantize(q));
                        *rows = RowsKind::F32;
                    }
                };
                match &node.op {
                    Op::Linear { weight, bias, act } => {
                        let d = weight.dims();
                        if nq(i).is_some_and(|q| q.int8) {
                            let w8 = nq(i).and_then(|q| q.weights.as_ref()).ok_or_else(|| {
                                invalid(
                                    "plan",
                                    format!(
                                        "{}: an int8 linear layer without int8 weights",
                                        node.name
                                    ),
                                )
                            })?;
                            let in_q = match rows {
                                RowsKind::U8(q) => q,
                                RowsKind::F32 => {
                                    let q = declared(last.0).ok_or_else(|| {
                                        invalid(
                                            "plan",
                                            format!(
                                                "{} reads a float value that has no quantization",
                                                node.name
                                            ),
                                        )
                                    })?;
                                    batch_steps.push(BatchStep::Quantize(q));
                                    q
                                }
                            };
                            let out_q = declared(i);
                            let cq = ConvQuant {
                                input: (in_q.scale, in_q.zero_point),
                                weight_scales: &w8.scales,
                                bias: w8.bias.as_deref(),
                                output_scale: out_q.map_or(1.0, |q| q.scale),
                            };
                            let weight8: Vec<i8> = if std::mem::take(&mut first_linear) {
                                let as_f: Vec<f32> = w8.weight.iter().map(|&v| v as f32).collect();
                                permute_columns(&as_f, d[0])
                                    .iter()
                                    .map(|&v| v as i8)
                                    .collect()
                            } else {
                                w8.weight.clone()
                            };
                            let packed = PackedInt8::new(
                                &weight8,
                                d[0],
                                d[1],
                                (1, 1),
                                &cq,
                                Int8Kernel::detect(),
                            );
                            let (q, kind) = match out_q {
                                Some(oq) => (
                                    QOut::Bytes {
                                        zero_point: oq.zero_point,
                                        clamp: clamp_of(*act, oq).ok_or_else(|| {
                                            unsupported(
                                                &node.name,
                                                "Linear",
                                                "an int8 layer fuses only ReLU and ReLU6",
                                            )
                                        })?,
                                        residual: None,
                                    },
                                    RowsKind::U8(oq),
                                ),
                                None => (QOut::Floats(*act), RowsKind::F32),
                            };
                            batch_steps.push(BatchStep::QLinear {
                                packed: Box::new(packed),
                                outputs: d[0],
                                q,
                            });
                            rows = kind;
                        } else {
                            to_floats(&mut rows, &mut batch_steps);
                            let w = weight.try_to_vec()?;
                            let w = if std::mem::take(&mut first_linear) {
                                permute_columns(&w, d[0])
                            } else {
                                w
                            };
                            let bias = bias.as_ref().map(|b| b.try_to_vec()).transpose()?;
                            batch_steps.push(BatchStep::Linear {
                                packed: PackedLinear::new(&w, bias.as_deref(), d[0]),
                                act: *act,
                            });
                        }
                        features = d[0];
                    }
                    Op::Activation(a) => {
                        to_floats(&mut rows, &mut batch_steps);
                        batch_steps.push(BatchStep::Activation(*a));
                    }
                    Op::Softmax(dim) if crate::shape::normalize_dim(*dim, 2)? == 1 => {
                        to_floats(&mut rows, &mut batch_steps);
                        batch_steps.push(BatchStep::Softmax);
                    }
                    other => return Err(unsupported(&node.name, other.kind(), "after flatten")),
                }
                last = ValueId(i);
            }
            if graph.output() != last {
                return Err(invalid("plan", "the output must be the last node"));
            }
        }
        if let RowsKind::U8(q) = rows {
            batch_steps.push(BatchStep::Dequantize(q));
        }
        let _ = features;
        // Planes: every value channels-last with 16-channel-aligned pixels and the border its
        // convolution readers need.
        let planes: Vec<Plane> = (0..draft.shapes.len())
            .map(|v| {
                let (c, h, w) = draft.shapes[v];
                Plane {
                    h,
                    w,
                    c,
                    cs: round_up(c, nhwc::LANES),
                    halo: draft.halos[v],
                }
            })
            .collect();
        for step in &mut draft.steps {
            match step {
                ImageStep::Conv {
                    input,
                    out,
                    geometry,
                    ..
                } => {
                    geometry.input = planes[*input];
                    geometry.output = planes[*out];
                }
                ImageStep::QConv {
                    input,
                    out,
                    geometry,
                    ..
                } => {
                    geometry.input = planes[*input];
                    geometry.output = planes[*out];
                }
                _ => {}
            }
        }
        // Buffers: values with the same plane and element type share one when their
        // lifetimes do not overlap (borders stay as filled: kernels write interiors only).
        let nv = draft.shapes.len();
        let mut born = vec![0usize; nv];
        let mut last_use = vec![0usize; nv];
        for (s, step) in draft.steps.iter().enumerate() {
            let (reads, writes) = step.io();
            for r in reads {
                last_use[r] = last_use[r].max(s + 1);
            }
            born[writes] = s + 1;
        }
        last_use[image_out] = usize::MAX;
        let mut order: Vec<usize> = (0..nv).collect();
        order.sort_by_key(|&v| born[v]);
        let mut slots = vec![
            Slot {
                plane: planes[0],
                elem: Elem::F32,
                buffer: 0
            };
            nv
        ];
        let mut buffers: Vec<(usize, Elem)> = Vec::new();
        let mut free: Vec<(Plane, (bool, i32), usize)> = Vec::new();
        let mut releases: Vec<(usize, Plane, (bool, i32), usize)> = Vec::new();
        for &v in &order {
            // Release buffers whose last reader ran before this value is written.
            releases.retain(|&(at, p, k, b)| {
                if at < born[v] {
                    free.push((p, k, b));
                    false
                } else {
                    true
                }
            });
            let key = draft.elems[v].key();
            let plane = planes[v];
            let reuse = free
                .iter()
                .position(|(p, k, _)| share_buffers && *p == plane && *k == key);
            let buffer = match reuse {
                Some(i) => free.swap_remove(i).2,
                None => {
                    buffers.push((plane.len(), draft.elems[v]));
                    buffers.len() - 1
                }
            };
            slots[v] = Slot {
                plane,
                elem: draft.elems[v],
                buffer,
            };
            if last_use[v] != usize::MAX {
                releases.push((last_use[v].max(born[v]), plane, key, buffer));
            }
        }
        let input_shape = graph.shape(graph.input()).dims()[1..].to_vec();
        let output_dims = graph.shape(graph.output()).dims()[1..].to_vec();
        let work: f64 = draft
            .steps
            .iter()
            .map(|step| {
                let pixels = |v: usize| (slots[v].plane.h * slots[v].plane.w) as f64;
                match step {
                    ImageStep::Conv { out, kernel, .. } => {
                        pixels(*out)
                            * match kernel {
                                FloatKernel::Direct(p) => {
                                    (p.k * p.c * p.kernel.0 * p.kernel.1) as f64
                                }
                                FloatKernel::Depthwise(p) => {
                                    (slots[*out].plane.c * p.kernel.0 * p.kernel.1) as f64
                                }
                            }
                    }
                    ImageStep::QConv { out, kernel, .. } => {
                        pixels(*out)
                            * match kernel {
                                Int8ConvKernel::Direct(p) => {
                                    (p.k * p.c * p.kernel_hw.0 * p.kernel_hw.1) as f64
                                }
                                Int8ConvKernel::Depthwise(p) => {
                                    (slots[*out].plane.c * p.kernel_hw.0 * p.kernel_hw.1) as f64
                                }
                            }
                            / 4.0
                    }
                    _ => 0.0,
                }
            })
            .sum();
        Ok(Plan {
            input_shape,
            output_dims,
            slots,
            buffers,
            input_value,
            image_steps: draft.steps,
            image_out,
            nhwc_rows: nhwc_rows.is_some(),
            batch_steps,
            split_images: work >= SPLIT_IMAGE_WORK,
            arenas: Mutex::new(Vec::new()),
        })
    }

    /// Input shape without the batch dimension.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    fn take_arena(&self) -> Vec<Buffer> {
        let spare = self.arenas.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| {
            self.buffers
                .iter()
                .map(|&(n, elem)| match elem {
                    Elem::F32 => Buffer::F32(vec![0.0; n]),
                    Elem::U8(q) => Buffer::U8(vec![q.zero_point as u8; n]),
                })
                .collect()
        })
    }

    fn return_arena(&self, arena: Vec<Buffer>) {
        self.arenas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(arena);
    }

    /// Runs the model on a batch `[N, ...input]` and returns its output `[N, ...]`.
    pub fn run(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != self.input_shape.len() + 1 || x.dims()[1..] != self.input_shape[..] {
            return Err(crate::error::shape_mismatch(
                "Plan::run",
                format!(
                    "input [N, {}]",
                    self.input_shape
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                x.shape().to_string(),
            ));
        }
        if x.device() != Device::Cpu {
            return Err(invalid(
                "plan",
                "the inference plan runs on the CPU: move the input there",
            ));
        }
        let n = x.dims()[0];
        x.with_data(|data| self.run_on(data, n))
    }

    /// [`Plan::run`] on the input's elements.
    fn run_on(&self, data: &[f32], n: usize) -> Result<Tensor> {
        if n >= 2 && rayon::current_num_threads() > 1 && rayon::current_thread_index().is_none() {
            // One hand-over to the thread pool for the whole batch: the per-image part and
            // the batch part's parallel loops then start from a worker, as cheap local joins.
            return rayon::scope(|_| self.run_batch(data, n));
        }
        self.run_batch(data, n)
    }

    fn run_batch(&self, data: &[f32], n: usize) -> Result<Tensor> {
        let per_in: usize = self.input_shape.iter().product();
        let out_slot = self.slots[self.image_out];
        let per_out = out_slot.plane.c * out_slot.plane.h * out_slot.plane.w;
        let threads = rayon::current_num_threads().max(1);
        let mut rows = match out_slot.elem {
            Elem::F32 => Rows::F32(vec![0f32; n * per_out], per_out),
            Elem::U8(q) => {
                let stride = round_up(per_out, nhwc::LANES);
                Rows::U8(vec![q.zero_point as u8; n * stride], per_out, stride)
            }
        };
        let stride = rows.stride();
        let each = |img: usize, arena: &mut Vec<Buffer>, out: RowOut, split: bool| {
            self.run_image(arena, &data[img * per_in..(img + 1) * per_in], out, split);
        };
        if n >= 2 && threads > 1 {
            let per_chunk = n.div_ceil(threads);
            match &mut rows {
                Rows::F32(v, _) => {
                    v.par_chunks_mut(per_chunk * stride)
                        .enumerate()
                        .for_each(|(ci, outs)| {
                            let mut arena = self.take_arena();
                            for (k, out) in outs.chunks_mut(stride).enumerate() {
                                each(ci * per_chunk + k, &mut arena, RowOut::F32(out), false);
                            }
                            self.return_arena(arena);
                        })
                }
                Rows::U8(v, _, _) => {
                    v.par_chunks_mut(per_chunk * stride)
                        .enumerate()
                        .for_each(|(ci, outs)| {
                            let mut arena = self.take_arena();
                            for (k, out) in outs.chunks_mut(stride).enumerate() {
                                each(ci * per_chunk + k, &mut arena, RowOut::U8(out), false);
                            }
                            self.return_arena(arena);
                        })
                }
            }
        } else {
            let mut arena = self.take_arena();
            let split = threads > 1 && self.split_images;
            let mut images = || {
                for img in 0..n {
                    let out = match &mut rows {
                        Rows::F32(v, _) => RowOut::F32(&mut v[img * stride..(img + 1) * stride]),
                        Rows::U8(v, _, s) => RowOut::U8(&mut v[img * *s..(img + 1) * *s]),
                    };
                    each(img, &mut arena, out, split);
                }
            };
            if split {
                // On a worker thread, each layer's row split is a cheap local join instead
                // of a hand-over from outside the pool.
                rayon::scope(|_| images());
            } else {
                images();
            }
            self.return_arena(arena);
        }
        for step in &self.batch_steps {
            rows = self.batch_step(step, rows, n);
        }
        let Rows::F32(out, _) = rows else {
            return Err(invalid("plan", "the output must be float"));
        };
        let mut dims = vec![n];
        dims.extend_from_slice(&self.output_dims);
        Tensor::from_vec(out, dims)
    }

    fn batch_step(&self, step: &BatchStep, rows: Rows, n: usize) -> Rows {
        match (step, rows) {
            (BatchStep::Linear { packed, act }, Rows::F32(x, features)) => {
                debug_assert_eq!(features, packed.inputs());
                Rows::F32(packed.forward(&x, n, *act), packed.outputs())
            }
            (BatchStep::QLinear { packed, outputs, q }, Rows::U8(x, features, stride)) => {
                // A 1x1 convolution over an image of N pixels whose channels are the features.
                let ip = Plane {
                    h: 1,
                    w: n,
                    c: features,
                    cs: stride,
                    halo: 0,
                };
                let out_stride = round_up(*outputs, nhwc::LANES);
                let op = Plane {
                    h: 1,
                    w: n,
                    c: *outputs,
                    cs: out_stride,
                    halo: 0,
                };
                let conv = Int8Conv {
                    input: ip,
                    output: op,
                    stride: (1, 1),
                    padding: (0, 0),
                    dilation: (1, 1),
                };
                match *q {
                    QOut::Bytes {
                        zero_point, clamp, ..
                    } => {
                        let mut y = vec![zero_point as u8; n * out_stride];
                        int8::conv_rows(
                            &conv,
                            packed,
                            &x,
                            Int8Out::Bytes {
                                data: &mut y,
                                offset: 0,
                                zero_point,
                                clamp,
                                residual: None,
                            },
                            0..1,
                        );
                        Rows::U8(y, *outputs, out_stride)
                    }
                    QOut::Floats(act) => {
                        let mut y = vec![0f32; n * out_stride];
                        int8::conv_rows(
                            &conv,
                            packed,
                            &x,
                            Int8Out::Floats {
                                data: &mut y,
                                offset: 0,
                                act,
                            },
                            0..1,
                        );
                        let compact: Vec<f32> = y
                            .chunks(out_stride)
                            .flat_map(|r| r[..*outputs].to_vec())
                            .collect();
                        Rows::F32(compact, *outputs)
                    }
                }
            }
            (BatchStep::Activation(a), Rows::F32(mut x, f)) => {
                let pre = x.clone();
                crate::backend::cpu::activation::forward(*a, &pre, &mut x);
                Rows::F32(x, f)
            }
            (BatchStep::Softmax, Rows::F32(mut x, f)) => {
                let pre = x.clone();
                crate::backend::cpu::loss::softmax_forward(&pre, n, f, 1, false, &mut x);
                Rows::F32(x, f)
            }
            (BatchStep::Quantize(q), Rows::F32(x, f)) => {
                let stride = round_up(f, nhwc::LANES);
                let mut y = vec![q.zero_point as u8; n * stride];
                for (src, dst) in x.chunks(f.max(1)).zip(y.chunks_mut(stride)) {
                    int8::quantize_slice(src, 1.0 / q.scale, q.zero_point, &mut dst[..f]);
                }
                Rows::U8(y, f, stride)
            }
            (BatchStep::Dequantize(q), Rows::U8(x, f, stride)) => {
                let y = x
                    .chunks(stride.max(1))
                    .take(n)
                    .flat_map(|r| {
                        r[..f]
                            .iter()
                            .map(|&v| (v as i32 - q.zero_point) as f32 * q.scale)
                    })
                    .collect();
                Rows::F32(y, f)
            }
            (step, _) => unreachable!("the plan checks the element type of {step:?}"),
        }
    }

    /// Runs the per-image steps on one NCHW image and writes the last per-image value, in
    /// NCHW order, to `out`. With `split_rows`, convolutions split their rows over two
    /// threads.
    fn run_image(&self, arena: &mut [Buffer], image: &[f32], out: RowOut, split_rows: bool) {
        let slot = |v: usize| self.slots[v];
        let si = slot(self.input_value);
        match si.elem {
            Elem::F32 => nhwc::from_nchw(image, (arena[si.buffer].f32_mut(), si.plane)),
            Elem::U8(q) => {
                // Quantize the whole image in one vector loop, then lay it out in the plane.
                let p = si.plane;
                let mut bytes = vec![0u8; p.c * p.h * p.w];
                int8::quantize_slice(image, 1.0 / q.scale, q.zero_point, &mut bytes);
                int8::bytes_from_nchw(&bytes, (arena[si.buffer].u8_mut(), p));
            }
        }
        for step in &self.image_steps {
            let (_, o) = step.io();
            let so = slot(o);
            let mut dst = std::mem::replace(&mut arena[so.buffer], Buffer::F32(Vec::new()));
            self.image_step(step, arena, &mut dst, split_rows);
            arena[so.buffer] = dst;
        }
        let s = slot(self.image_out);
        let len = s.plane.c * s.plane.h * s.plane.w;
        match (out, self.nhwc_rows) {
            (RowOut::F32(o), false) => {
                nhwc::to_nchw((arena[s.buffer].f32(), s.plane), &mut o[..len])
            }
            (RowOut::U8(o), false) => nhwc::to_nchw((arena[s.buffer].u8(), s.plane), &mut o[..len]),
            (RowOut::F32(o), true) => {
                nhwc::to_nhwc((arena[s.buffer].f32(), s.plane), &mut o[..len])
            }
            (RowOut::U8(o), true) => nhwc::to_nhwc((arena[s.buffer].u8(), s.plane), &mut o[..len]),
        }
    }

    fn image_step(&self, step: &ImageStep, arena: &[Buffer], dst: &mut Buffer, split_rows: bool) {
        let slot = |v: usize| self.slots[v];
        let qp = |v: usize| match slot(v).elem {
            Elem::U8(q) => q,
            Elem::F32 => unreachable!("the plan types every value"),
        };
        match step {
            ImageStep::Conv {
                input,
                residual,
                out,
                geometry,
                kernel,
                act,
            } => {
                let so = slot(*out);
                let res = residual.map(|r| (arena[slot(r).buffer].f32(), slot(r).plane));
                let epilogue = Epilogue {
                    residual: res,
                    act: *act,
                };
                let src = arena[slot(*input).buffer].f32();
                let rows_of = |part: OutRows, rows: std::ops::Range<usize>| match kernel {
                    FloatKernel::Direct(p) => {
                        nhwc::conv_rows(geometry, p, src, epilogue, part, rows)
                    }
                    FloatKernel::Depthwise(p) => {
                        nhwc::depthwise_rows(geometry, p, src, epilogue, part, rows)
                    }
                };
                let h = so.plane.h;
                let data = dst.f32_mut();
                if split_rows && h >= 2 {
                    let mid = h / 2;
                    let (top, bottom) = OutRows::split(data, so.plane, mid);
                    rayon::join(|| rows_of(top, 0..mid), || rows_of(bottom, mid..h));
                } else {
                    rows_of(OutRows::whole(data), 0..h);
                }
            }
            ImageStep::QConv {
                input,
                out,
                geometry,
                kernel,
                q,
            } => {
                let so = slot(*out);
                let src = arena[slot(*input).buffer].u8();
                let h = so.plane.h;
                let conv_part = |part: Int8Out, rows: std::ops::Range<usize>| match kernel {
                    Int8ConvKernel::Direct(p) => int8::conv_rows(geometry, p, src, part, rows),
                    Int8ConvKernel::Depthwise(p) => {
                        int8::depthwise_rows(geometry, p, src, part, rows)
                    }
                };
                let mid = if split_rows && h >= 2 { h / 2 } else { h };
                let at = so
                    .plane
                    .at(mid as isize, -(so.plane.halo as isize))
                    .min(so.plane.len());
                match *q {
                    QOut::Bytes {
                        zero_point,
                        clamp,
                        residual,
                    } => {
                        let res = residual.map(|(r, ratio, zr)| {
                            (arena[slot(r).buffer].u8(), slot(r).plane, ratio, zr)
                        });
                        let (top, bottom) = dst.u8_mut().split_at_mut(at);
                        let top = Int8Out::Bytes {
                            data: top,
                            offset: 0,
                            zero_point,
                            clamp,
                            residual: res,
                        };
                        if mid < h {
                            let bottom = Int8Out::Bytes {
                                data: bottom,
                                offset: at,
                                zero_point,
                                clamp,
                                residual: res,
                            };
                            rayon::join(|| conv_part(top, 0..mid), || conv_part(bottom, mid..h));
                        } else {
                            conv_part(top, 0..h);
                        }
                    }
                    QOut::Floats(act) => {
                        let (top, bottom) = dst.f32_mut().split_at_mut(at);
                        if mid < h {
                            rayon::join(
                                || {
                                    conv_part(
                                        Int8Out::Floats {
                                            data: top,
                                            offset: 0,
                                            act,
                                        },
                                        0..mid,
                                    )
                                },
                                || {
                                    conv_part(
                                        Int8Out::Floats {
                                            data: bottom,
                                            offset: at,
                                            act,
                                        },
                                        mid..h,
                                    )
                                },
                            );
                        } else {
                            conv_part(
                                Int8Out::Floats {
                                    data: top,
                                    offset: 0,
                                    act,
                                },
                                0..h,
                            );
                        }
                    }
                }
            }
            ImageStep::Map {
                input,
                affine,
                act,
                out,
            } => {
                let (si, so) = (slot(*input), slot(*out));
                nhwc::map_plane(
                    (arena[si.buffer].f32(), si.plane),
                    affine.as_ref().map(|(s, b)| (s.as_slice(), b.as_slice())),
                    *act,
                    (dst.f32_mut(), so.plane),
                );
            }
            ImageStep::Add { a, b, out } => {
                let (sa, sb, so) = (slot(*a), slot(*b), slot(*out));
                nhwc::add_planes(
                    (arena[sa.buffer].f32(), sa.plane),
                    (arena[sb.buffer].f32(), sb.plane),
                    None,
                    (dst.f32_mut(), so.plane),
                );
            }
            ImageStep::QAdd { a, b, out, clamp } => {
                let (sa, sb, so) = (slot(*a), slot(*b), slot(*out));
                let (qa, qb, qo) = (qp(*a), qp(*b), qp(*out));
                int8::add_planes(
                    (arena[sa.buffer].u8(), sa.plane, (qa.scale, qa.zero_point)),
                    (arena[sb.buffer].u8(), sb.plane, (qb.scale, qb.zero_point)),
                    (dst.u8_mut(), so.plane, (qo.scale, qo.zero_point)),
                    *clamp,
                );
            }
            ImageStep::MaxPool { input, params, out } => {
                let (si, so) = (slot(*input), slot(*out));
                match si.elem {
                    Elem::F32 => nhwc::max_pool_plane(
                        (arena[si.buffer].f32(), si.plane),
                        *params,
                        (dst.f32_mut(), so.plane),
                    ),
                    Elem::U8(_) => int8::max_pool_plane(
                        (arena[si.buffer].u8(), si.plane),
                        *params,
                        (dst.u8_mut(), so.plane),
                    ),
                }
            }
            ImageStep::AvgPool { input, params, out } => {
                let (si, so) = (slot(*input), slot(*out));
                match si.elem {
                    Elem::F32 => nhwc::avg_pool_plane(
                        (arena[si.buffer].f32(), si.plane),
                        *params,
                        (dst.f32_mut(), so.plane),
                    ),
                    Elem::U8(q) => int8::avg_pool_plane(
                        (arena[si.buffer].u8(), si.plane),
                        q.zero_point,
                        *params,
                        (dst.u8_mut(), so.plane),
                    ),
                }
            }
            ImageStep::AdaptiveAvgPool { input, out } => {
                let (si, so) = (slot(*input), slot(*out));
                match si.elem {
                    Elem::F32 => nhwc::adaptive_avg_pool_plane(
                        (arena[si.buffer].f32(), si.plane),
                        (dst.f32_mut(), so.plane),
                    ),
                    Elem::U8(q) => int8::adaptive_avg_pool_plane(
                        (arena[si.buffer].u8(), si.plane),
                        q.zero_point,
                        (dst.u8_mut(), so.plane),
                    ),
                }
            }
            ImageStep::PadChannels {
                input,
                stride,
                before,
                out,
            } => {
                let (si, so) = (slot(*input), slot(*out));
                match si.elem {
                    Elem::F32 => nhwc::pad_channels_plane(
                        (arena[si.buffer].f32(), si.plane),
                        *stride,
                        *before,
                        (dst.f32_mut(), so.plane),
                    ),
                    Elem::U8(q) => int8::pad_channels_plane(
                        (arena[si.buffer].u8(), si.plane),
                        *stride,
                        *before,
                        q.zero_point,
                        (dst.u8_mut(), so.plane),
                    ),
                }
            }
            ImageStep::Quantize { input, out } => {
                let (si, so) = (slot(*input), slot(*out));
                let q = qp(*out);
                int8::quantize_plane(
                    (arena[si.buffer].f32(), si.plane),
                    (q.scale, q.zero_point),
                    (dst.u8_mut(), so.plane),
                );
            }
            ImageStep::Dequantize { input, out } => {
                let (si, so) = (slot(*input), slot(*out));
                let q = qp(*input);
                int8::dequantize_plane(
                    (arena[si.buffer].u8(), si.plane),
                    (q.scale, q.zero_point),
                    (dst.f32_mut(), so.plane),
                );
            }
        }
    }
}

/// Where one image's output row goes.
enum RowOut<'a> {
    F32(&'a mut [f32]),
    U8(&'a mut [u8]),
}

/// The batch part's current values.
enum Rows {
    /// Floats `[N, features]`.
    F32(Vec<f32>, usize),
    /// Bytes: features and the row stride.
    U8(Vec<u8>, usize, usize),
}

impl Rows {
    fn stride(&self) -> usize {
        match self {
            Rows::F32(_, f) => *f,
            Rows::U8(_, _, s) => *s,
        }
    }
}
