//! The gradient of one output of a compiled float plan with respect to its input: the
//! backward pass that saliency and integrated gradients need, on the channels-last kernels
//! of the forward pass.
//!
//! With the weights fixed, an input gradient needs no weight gradient and, through a
//! convolution, nothing of the convolution's input: only its kernel. So the forward pass
//! runs as the inference plan does (BatchNorm folded, activations and residual additions
//! fused) with every value kept, and the backward pass walks the plan's steps in reverse:
//! an activation's derivative is read from its output, a stride-1 convolution's input
//! gradient is the convolution of its output gradient with the flipped, transposed kernel
//! (the forward kernel's register tiles), a strided one's is a 1x1 convolution to the
//! kernel's taps followed by adding each tap back to the pixel it read. Max pooling sends
//! the gradient to the first maximum of its window, as PyTorch does.
//!
//! Images run in parallel, one per thread. Plans with layers this pass does not cover
//! (depthwise or int8 convolutions, GELU, softmax) are an `Unsupported` error; callers then
//! use the recorded autograd path ([`crate::graph::capture`]).
//!
//! ```
//! use convnet::infer::gradient::InputGradient;
//! use convnet::graph::capture::LayerCapture;
//! let model = convnet::models::build("resnet20", [3, 32, 32], 10)?;
//! let x = convnet::Tensor::randn([2, 3, 32, 32], &mut convnet::Rng::new(0));
//! let (logits, grad) = InputGradient::new(&model)?.run(&x, &[3, 7])?;
//! assert_eq!((logits.dims(), grad.dims()), (&[2, 10][..], &[2, 3, 32, 32][..]));
//! // The same gradient through the recorded autograd graph.
//! let run = LayerCapture::new(&model, "input")?.forward(&x)?;
//! let slow = run.gradient(&[3, 7])?.to_vec();
//! let scale = slow.iter().fold(0f32, |m, v| m.max(v.abs()));
//! for (a, b) in grad.to_vec().iter().zip(&slow) {
//!     assert!((a - b).abs() <= 1e-4 * scale);
//! }
//! # Ok::<(), convnet::Error>(())
//! ```

use super::{BatchStep, Buffer, FloatKernel, ImageStep, Plan, RowOut, Rows};
use crate::backend::cpu::activation::Activation;
use crate::backend::cpu::nhwc::{self, DirectConv, Epilogue, OutRows, PackedConv, Plane, LANES};
use crate::device::Device;
use crate::error::{invalid, Error, Result};
use crate::graph::{fold, Graph};
use crate::nn::Model;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Mutex;

/// A model compiled for input gradients (see the module documentation).
pub struct InputGradient {
    plan: Plan,
    /// The backward form of each image step that is a convolution.
    convs: Vec<Option<ConvBack>>,
    /// The weights `[outputs, inputs]` of each batch step that is a linear layer.
    linears: Vec<Option<Vec<f32>>>,
    /// Spare workspaces, reused across calls.
    spare: Mutex<Vec<Workspace>>,
}

impl std::fmt::Debug for InputGradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InputGradient({:?})", self.plan)
    }
}

/// How one convolution's input gradient is computed.
#[derive(Debug)]
enum ConvBack {
    /// Stride 1: the output gradient convolved with the flipped, transposed kernel.
    Transposed {
        conv: DirectConv,
        packed: PackedConv,
    },
    /// Other strides: each output pixel's gradient times the kernel, one value per tap
    /// (`conv`, a 1x1 convolution to `KH * KW * C` channels), then each tap's value added
    /// to the input pixel it read.
    Columns {
        conv: DirectConv,
        packed: PackedConv,
        forward: DirectConv,
    },
}

impl ConvBack {
    fn new(forward: &DirectConv, packed: &PackedConv) -> ConvBack {
        let w = packed.unpack();
        let (k, c, (kh, kw)) = (packed.k, packed.c, packed.kernel);
        let (pad, dil) = (forward.padding, forward.dilation);
        let reach = (dil.0 * (kh - 1), dil.1 * (kw - 1));
        if forward.stride == (1, 1) && pad.0 <= reach.0 && pad.1 <= reach.1 {
            let tpad = (reach.0 - pad.0, reach.1 - pad.1);
            let mut flipped = vec![0f32; w.len()];
            for o in 0..k {
                for ci in 0..c {
                    for i in 0..kh {
                        for j in 0..kw {
                            flipped[((ci * k + o) * kh + i) * kw + j] =
                                w[((o * c + ci) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
                        }
                    }
                }
            }
            return ConvBack::Transposed {
                conv: DirectConv {
                    input: Plane {
                        halo: tpad.0.max(tpad.1),
                        ..forward.output
                    },
                    output: forward.input,
                    kernel: (kh, kw),
                    stride: (1, 1),
                    padding: tpad,
                    dilation: dil,
                },
                packed: PackedConv::new(&flipped, None, c, k, (kh, kw)),
            };
        }
        let taps = kh * kw * c;
        let mut columns = vec![0f32; w.len()];
        for o in 0..k {
            for ci in 0..c {
                for i in 0..kh {
                    for j in 0..kw {
                        columns[((i * kw + j) * c + ci) * k + o] =
                            w[((o * c + ci) * kh + i) * kw + j];
                    }
                }
            }
        }
        let op = forward.output;
        ConvBack::Columns {
            conv: DirectConv {
                input: Plane { halo: 0, ..op },
                output: Plane {
                    h: op.h,
                    w: op.w,
                    c: taps,
                    cs: taps.div_ceil(LANES) * LANES,
                    halo: 0,
                },
                kernel: (1, 1),
                stride: (1, 1),
                padding: (0, 0),
                dilation: (1, 1),
            },
            packed: PackedConv::new(&columns, None, taps, k, (1, 1)),
            forward: *forward,
        }
    }

    /// The plane of the masked output gradient this backward reads.
    fn grad_plane(&self) -> Plane {
        match self {
            ConvBack::Transposed { conv, .. } | ConvBack::Columns { conv, .. } => conv.input,
        }
    }
}

/// One thread's buffers: the forward values, the gradients, and the convolutions' scratch.
struct Workspace {
    values: Vec<Buffer>,
    /// The gradient of each value, in its plane; `written` says which hold this image's.
    grads: Vec<Vec<f32>>,
    written: Vec<bool>,
    /// Per convolution step: its masked output gradient (zero border) and, for strided
    /// ones, the per-tap columns.
    masked: Vec<Vec<f32>>,
    columns: Vec<Vec<f32>>,
    scratch: Vec<f32>,
}

/// `d act(x) / dx` from `y = act(x)`, for the activations where the output determines it.
fn derivative_known(act: Option<Activation>) -> bool {
    match act {
        None
        | Some(Activation::Relu | Activation::Relu6 | Activation::Sigmoid | Activation::Tanh) => {
            true
        }
        Some(Activation::LeakyRelu(slope)) => slope > 0.0,
        Some(Activation::Gelu | Activation::GeluTanh) => false,
    }
}

/// `out[i] = g[i] * act'(y[i])`, the derivative read from the output (see
/// [`derivative_known`]).
fn mask(act: Option<Activation>, g: &[f32], y: &[f32], out: &mut [f32]) {
    let it = out.iter_mut().zip(g.iter().zip(y));
    match act {
        None => out.copy_from_slice(g),
        Some(Activation::Relu) => it.for_each(|(o, (&g, &y))| *o = if y > 0.0 { g } else { 0.0 }),
        Some(Activation::Relu6) => {
            it.for_each(|(o, (&g, &y))| *o = if y > 0.0 && y < 6.0 { g } else { 0.0 })
        }
        Some(Activation::LeakyRelu(s)) => {
            it.for_each(|(o, (&g, &y))| *o = if y > 0.0 { g } else { g * s })
        }
        Some(Activation::Sigmoid) => it.for_each(|(o, (&g, &y))| *o = g * y * (1.0 - y)),
        Some(Activation::Tanh) => it.for_each(|(o, (&g, &y))| *o = g * (1.0 - y * y)),
        Some(Activation::Gelu | Activation::GeluTanh) => {
            unreachable!("refused when the gradient was compiled")
        }
    }
}

/// Output rows per strip of a strided convolution's backward: about 64K floats of per-tap
/// values (a core's L2 holds them until they are added back).
fn strip_rows(columns: Plane) -> usize {
    (65536 / columns.row_stride().max(1)).clamp(1, columns.h.max(1))
}

/// Adds one output row's per-tap values `row` (`cs` floats per output pixel, taps in
/// `(i, j, channel)` order) to the input gradient `gi` (plane `ip`) at the pixels the taps
/// of `conv` read.
fn col2im_row(row: &[f32], cs: usize, oy: usize, conv: &DirectConv, ip: Plane, gi: &mut [f32]) {
    let (kh, kw) = conv.kernel;
    let c = ip.c;
    let kwc = kw * c;
    let (sx, dx, px) = (conv.stride.1, conv.dilation.1, conv.padding.1 as isize);
    for i in 0..kh {
        let iy = (oy * conv.stride.0 + i * conv.dilation.0) as isize - conv.padding.0 as isize;
        if iy < 0 || iy >= ip.h as isize {
            continue;
        }
        let base = ip.at(iy, 0);
        let dst = &mut gi[base..base + ip.w * ip.cs];
        for (ox, px_taps) in row.chunks_exact(cs).enumerate() {
            let taps = &px_taps[i * kwc..(i + 1) * kwc];
            let x0 = (ox * sx) as isize - px;
            // The taps that land inside the row.
            let j0 = if x0 < 0 {
                ((-x0) as usize).div_ceil(dx)
            } else {
                0
            };
            let j1 = if x0 >= ip.w as isize {
                0
            } else {
                ((ip.w as isize - 1 - x0) as usize / dx + 1).min(kw)
            };
            for j in j0..j1 {
                let at = (x0 + (j * dx) as isize) as usize * ip.cs;
                for (d, &v) in dst[at..at + c].iter_mut().zip(&taps[j * c..j * c + c]) {
                    *d += v;
                }
            }
        }
    }
}

fn add_into(dst: &mut [f32], x: &[f32]) {
    for (d, &v) in dst.iter_mut().zip(x) {
        *d += v;
    }
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported(format!("input gradients of the inference plan: {what}"))
}

impl InputGradient {
    /// Compiles `model` (its current weights, eval-mode semantics).
    pub fn new(model: &Model) -> Result<InputGradient> {
        InputGradient::from_graph(&fold::fuse(&model.graph()?)?)
    }

    /// Compiles a fused graph.
    pub fn from_graph(graph: &Graph) -> Result<InputGradient> {
        let plan = Plan::keeping_values(graph)?;
        let mut convs = Vec::with_capacity(plan.image_steps.len());
        for step in &plan.image_steps {
            convs.push(match step {
                ImageStep::Conv {
                    geometry,
                    kernel,
                    act,
                    ..
                } => {
                    let FloatKernel::Direct(packed) = kernel else {
                        return Err(unsupported("depthwise convolutions are not covered"));
                    };
                    if !derivative_known(*act) {
                        return Err(unsupported(&format!("activation {act:?} is not covered")));
                    }
                    Some(ConvBack::new(geometry, packed))
                }
                ImageStep::Map { act, .. } if !derivative_known(*act) => {
                    return Err(unsupported(&format!("activation {act:?} is not covered")));
                }
                ImageStep::Map { .. }
                | ImageStep::Add { .. }
                | ImageStep::MaxPool { .. }
                | ImageStep::AvgPool { .. }
                | ImageStep::AdaptiveAvgPool { .. }
                | ImageStep::PadChannels { .. } => None,
                ImageStep::QConv { .. }
                | ImageStep::QAdd { .. }
                | ImageStep::Quantize { .. }
                | ImageStep::Dequantize { .. } => {
                    return Err(unsupported("int8 layers have no gradient"))
                }
            });
        }
        let mut linears = Vec::with_capacity(plan.batch_steps.len());
        for step in &plan.batch_steps {
            linears.push(match step {
                BatchStep::Linear { packed, act } if derivative_known(*act) => {
                    Some(packed.weight())
                }
                BatchStep::Activation(a) if derivative_known(Some(*a)) => None,
                other => {
                    return Err(unsupported(&format!(
                        "{other:?} after flatten is not covered"
                    )))
                }
            });
        }
        Ok(InputGradient {
            plan,
            convs,
            linears,
            spare: Mutex::new(Vec::new()),
        })
    }

    /// The model's output for `x` (`[N, ...input]`, on the CPU), no gradient.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.plan.run(x)
    }

    /// Runs the model on `x` (`[N, ...input]`, on the CPU) and returns its output
    /// `[N, ...]` and, for each image `n`, the gradient of its output `targets[n]` (a
    /// flattened index into one image's output) with respect to the image.
    pub fn run(&self, x: &Tensor, targets: &[usize]) -> Result<(Tensor, Tensor)> {
        let want = &self.plan.input_shape;
        if x.rank() != want.len() + 1 || x.dims()[1..] != want[..] {
            return Err(crate::error::shape_mismatch(
                "InputGradient::run",
                format!(
                    "input [N, {}]",
                    want.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                x.shape().to_string(),
            ));
        }
        if x.device() != Device::Cpu {
            return Err(invalid(
                "InputGradient::run",
                "input gradients of the plan run on the CPU: move the input there",
            ));
        }
        let n = x.dims()[0];
        let per_out: usize = self.plan.output_dims.iter().product();
        if targets.len() != n {
            return Err(invalid(
                "InputGradient::run",
                format!("{} targets for {n} images", targets.len()),
            ));
        }
        if let Some(&bad) = targets.iter().find(|&&t| t >= per_out) {
            return Err(invalid(
                "InputGradient::run",
                format!("target {bad} is out of range: the model has {per_out} outputs"),
            ));
        }
        let per_in: usize = want.iter().product();
        let mut outputs = vec![0f32; n * per_out];
        let mut grads = vec![0f32; n * per_in];
        x.with_data(|data| {
            let threads = rayon::current_num_threads().max(1);
            let per_chunk = n.div_ceil(threads).max(1);
            let chunk = |(ci, (outs, gs)): (usize, (&mut [f32], &mut [f32]))| {
                let mut ws = self.take_workspace();
                for (k, (out, g)) in outs
                    .chunks_mut(per_out)
                    .zip(gs.chunks_mut(per_in))
                    .enumerate()
                {
                    let img = ci * per_chunk + k;
                    let image = &data[img * per_in..(img + 1) * per_in];
                    self.one_image(&mut ws, image, targets[img], out, g);
                }
                self.spare
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ws);
            };
            if n >= 2 && threads > 1 {
                outputs
                    .par_chunks_mut(per_chunk * per_out)
                    .zip(grads.par_chunks_mut(per_chunk * per_in))
                    .enumerate()
                    .for_each(chunk);
            } else {
                chunk((0, (&mut outputs[..], &mut grads[..])));
            }
        });
        let mut out_dims = vec![n];
        out_dims.extend_from_slice(&self.plan.output_dims);
        Ok((
            Tensor::from_vec(outputs, out_dims)?,
            Tensor::from_vec(grads, x.dims().to_vec())?,
        ))
    }

    fn take_workspace(&self) -> Workspace {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| {
            let nv = self.plan.slots.len();
            Workspace {
                values: self.plan.take_arena(),
                grads: vec![Vec::new(); nv],
                written: vec![false; nv],
                masked: self
                    .convs
                    .iter()
                    .map(|c| {
                        c.as_ref()
                            .map_or(Vec::new(), |c| vec![0.0; c.grad_plane().len()])
                    })
                    .collect(),
                columns: self
                    .convs
                    .iter()
                    .map(|c| match c {
                        Some(ConvBack::Columns { conv, .. }) => {
                            vec![0.0; strip_rows(conv.output) * conv.output.row_stride()]
                        }
                        _ => Vec::new(),
                    })
                    .collect(),
                scratch: Vec::new(),
            }
        })
    }

    /// The gradient buffer of value `v` for this image: zeroed on first use.
    fn touch<'w>(&self, ws: &'w mut Workspace, v: usize) -> &'w mut Vec<f32> {
        let len = self.plan.slots[v].plane.len();
        let g = &mut ws.grads[v];
        if g.len() != len {
            *g = vec![0.0; len];
        } else if !ws.written[v] {
            g.fill(0.0);
        }
        ws.written[v] = true;
        g
    }

    /// The gradient buffer of value `v` for this image, for a kernel that writes its whole
    /// interior (the border stays zero: nothing writes there).
    fn overwrite<'w>(&self, ws: &'w mut Workspace, v: usize) -> &'w mut [f32] {
        let len = self.plan.slots[v].plane.len();
        let g = &mut ws.grads[v];
        if g.len() != len {
            *g = vec![0.0; len];
        }
        ws.written[v] = true;
        g
    }

    /// Forward and backward for one image: `out` gets its output, `grad` (NCHW) the
    /// gradient of output `target`.
    fn one_image(
        &self,
        ws: &mut Workspace,
        image: &[f32],
        target: usize,
        out: &mut [f32],
        grad: &mut [f32],
    ) {
        let plan = &self.plan;
        let slots = &plan.slots;
        ws.written.fill(false);
        // Forward, every value kept; the batch part on this one image, its rows kept.
        let so = slots[plan.image_out];
        let mut row = vec![0f32; so.plane.c * so.plane.h * so.plane.w];
        plan.run_image(&mut ws.values, image, RowOut::F32(&mut row), false);
        let mut rows = vec![row];
        for step in &plan.batch_steps {
            let x = rows[rows.len() - 1].clone();
            let f = x.len();
            match plan.batch_step(step, Rows::F32(x, f), 1) {
                Rows::F32(y, _) => rows.push(y),
                Rows::U8(..) => unreachable!("a float plan"),
            }
        }
        out.copy_from_slice(&rows[rows.len() - 1]);
        // Backward through the batch part.
        let mut g = vec![0f32; out.len()];
        g[target] = 1.0;
        for (k, step) in plan.batch_steps.iter().enumerate().rev() {
            let y = &rows[k + 1];
            let act = match step {
                BatchStep::Linear { act, .. } => *act,
                BatchStep::Activation(a) => Some(*a),
                _ => unreachable!("refused when the gradient was compiled"),
            };
            let pre = g.clone();
            mask(act, &pre, y, &mut g);
            if let Some(w) = &self.linears[k] {
                let inputs = rows[k].len();
                let mut gx = vec![0f32; inputs];
                for (o, &go) in g.iter().enumerate() {
                    if go != 0.0 {
                        for (d, &wv) in gx.iter_mut().zip(&w[o * inputs..(o + 1) * inputs]) {
                            *d += go * wv;
                        }
                    }
                }
                g = gx;
            }
        }
        // Into the last per-image value's plane, in the order the plan flattened it.
        let p = so.plane;
        let gout = self.touch(ws, plan.image_out);
        if plan.nhwc_rows {
            for y in 0..p.h {
                for x in 0..p.w {
                    let src = &g[(y * p.w + x) * p.c..][..p.c];
                    gout[p.at(y as isize, x as isize)..][..p.c].copy_from_slice(src);
                }
            }
        } else {
            nhwc::from_nchw(&g, (gout.as_mut_slice(), p));
        }
        for (s, step) in plan.image_steps.iter().enumerate().rev() {
            let (_, o) = step.io();
            if ws.written[o] {
                self.backward_step(ws, s, step);
            }
        }
        let si = slots[plan.input_value];
        if ws.written[plan.input_value] {
            nhwc::to_nchw((&ws.grads[plan.input_value], si.plane), grad);
        } else {
            grad.fill(0.0);
        }
    }

    /// Adds the gradients of step `s`'s inputs, from its output's.
    fn backward_step(&self, ws: &mut Workspace, s: usize, step: &ImageStep) {
        let slots = &self.plan.slots;
        let (_, o) = step.io();
        let op = slots[o].plane;
        let g_out = std::mem::take(&mut ws.grads[o]);
        match step {
            ImageStep::Conv {
                input,
                residual,
                act,
                ..
            } => {
                let back = self.convs[s].as_ref().expect("a convolution's backward");
                let tp = back.grad_plane();
                let y = ws.values[slots[o].buffer].f32();
                let mut masked = std::mem::take(&mut ws.masked[s]);
                for row in 0..op.h {
                    let (a, t) = (op.at(row as isize, 0), tp.at(row as isize, 0));
                    let len = op.w * op.cs;
                    mask(
                        *act,
                        &g_out[a..a + len],
                        &y[a..a + len],
                        &mut masked[t..t + len],
                    );
                }
                if let Some(r) = *residual {
                    let rp = slots[r].plane;
                    let gr = self.touch(ws, r);
                    for row in 0..op.h as isize {
                        for x in 0..op.w as isize {
                            add_into(
                                &mut gr[rp.at(row, x)..][..op.c],
                                &masked[tp.at(row, x)..][..op.c],
                            );
                        }
                    }
                }
                let ip = slots[*input].plane;
                match back {
                    ConvBack::Transposed { conv, packed } => {
                        let none = Epilogue {
                            residual: None,
                            act: None,
                        };
                        if !ws.written[*input] {
                            let gi = self.overwrite(ws, *input);
                            nhwc::conv_rows(
                                conv,
                                packed,
                                &masked,
                                none,
                                OutRows::whole(gi),
                                0..ip.h,
                            );
                        } else {
                            let mut scratch = std::mem::take(&mut ws.scratch);
                            scratch.resize(scratch.len().max(ip.len()), 0.0);
                            nhwc::conv_rows(
                                conv,
                                packed,
                                &masked,
                                none,
                                OutRows::whole(&mut scratch),
                                0..ip.h,
                            );
                            let gi = self.touch(ws, *input);
                            for row in 0..ip.h as isize {
                                let a = ip.at(row, 0);
                                add_into(
                                    &mut gi[a..a + ip.w * ip.cs],
                                    &scratch[a..a + ip.w * ip.cs],
                                );
                            }
                            ws.scratch = scratch;
                        }
                    }
                    ConvBack::Columns {
                        conv,
                        packed,
                        forward,
                    } => {
                        let mut cols = std::mem::take(&mut ws.columns[s]);
                        let none = Epilogue {
                            residual: None,
                            act: None,
                        };
                        let cp = conv.output;
                        let strip = strip_rows(cp);
                        let gi = self.touch(ws, *input);
                        // A strip of output rows at a time: its per-tap values stay in cache
                        // until they are added to the input pixels.
                        for r0 in (0..op.h).step_by(strip) {
                            let r1 = (r0 + strip).min(op.h);
                            let offset = cp.at(r0 as isize, 0);
                            nhwc::conv_rows(
                                conv,
                                packed,
                                &masked,
                                none,
                                OutRows {
                                    data: &mut cols[..(r1 - r0) * cp.row_stride()],
                                    offset,
                                },
                                r0..r1,
                            );
                            for oy in r0..r1 {
                                let row = &cols[(oy - r0) * cp.row_stride()..][..cp.row_stride()];
                                col2im_row(&row[..op.w * cp.cs], cp.cs, oy, forward, ip, gi);
                            }
                        }
                        ws.columns[s] = cols;
                    }
                }
                ws.masked[s] = masked;
            }
            ImageStep::Map {
                input, affine, act, ..
            } => {
                let ip = slots[*input].plane;
                let mut tmp = vec![0f32; op.c];
                let y = std::mem::replace(&mut ws.values[slots[o].buffer], Buffer::F32(Vec::new()));
                let gi = self.touch(ws, *input);
                for row in 0..op.h as isize {
                    for x in 0..op.w as isize {
                        let a = op.at(row, x);
                        mask(*act, &g_out[a..a + op.c], &y.f32()[a..a + op.c], &mut tmp);
                        if let Some((scale, _)) = affine {
                            for (t, s) in tmp.iter_mut().zip(scale) {
                                *t *= s;
                            }
                        }
                        add_into(&mut gi[ip.at(row, x)..][..op.c], &tmp);
                    }
                }
                ws.values[slots[o].buffer] = y;
            }
            ImageStep::Add { a, b, .. } => {
                for v in [*a, *b] {
                    let vp = slots[v].plane;
                    let gv = self.touch(ws, v);
                    for row in 0..op.h as isize {
                        for x in 0..op.w as isize {
                            add_into(
                                &mut gv[vp.at(row, x)..][..op.c],
                                &g_out[op.at(row, x)..][..op.c],
                            );
                        }
                    }
                }
            }
            ImageStep::MaxPool { input, params, .. } => {
                let ip = slots[*input].plane;
                let xin = std::mem::replace(
                    &mut ws.values[slots[*input].buffer],
                    Buffer::F32(Vec::new()),
                );
                let xs = xin.f32();
                let y = std::mem::replace(&mut ws.values[slots[o].buffer], Buffer::F32(Vec::new()));
                let ys = y.f32();
                let gi = self.touch(ws, *input);
                let mut taps = Vec::new();
                let mut left = vec![0f32; op.c];
                for oy in 0..op.h {
                    for ox in 0..op.w {
                        nhwc::window_taps(ip, *params, (oy, ox), &mut taps);
                        let o = op.at(oy as isize, ox as isize);
                        let (go, best) = (&g_out[o..o + op.c], &ys[o..o + op.c]);
                        // The gradient goes to the first tap (in scan order) that holds the
                        // window's maximum, a NaN if there is one (PyTorch's rule): `left`
                        // is 1 until a channel's tap is found.
                        left.fill(1.0);
                        for &t in &taps {
                            let (xv, gv) = (&xs[t..t + op.c], &mut gi[t..t + op.c]);
                            for ((l, g), ((&x, &m), &d)) in
                                left.iter_mut().zip(gv).zip(xv.iter().zip(best).zip(go))
                            {
                                let hit = if x == m || (x.is_nan() && m.is_nan()) {
                                    *l
                                } else {
                                    0.0
                                };
                                *g += d * hit;
                                *l -= hit;
                            }
                        }
                    }
                }
                ws.values[slots[o].buffer] = y;
                ws.values[slots[*input].buffer] = xin;
            }
            ImageStep::AvgPool {
                input, params: p, ..
            } => {
                let ip = slots[*input].plane;
                let gi = self.touch(ws, *input);
                let mut share = vec![0f32; op.c];
                for oy in 0..op.h {
                    for ox in 0..op.w {
                        let win = nhwc::avg_window(ip, *p, (oy, ox));
                        let go = &g_out[op.at(oy as isize, ox as isize)..][..op.c];
                        for (s, &gv) in share.iter_mut().zip(go) {
                            *s = gv / win.divisor as f32;
                        }
                        for iy in win.rows.clone() {
                            for ix in win.cols.clone() {
                                add_into(&mut gi[ip.at(iy, ix)..][..op.c], &share);
                            }
                        }
                    }
                }
            }
            ImageStep::AdaptiveAvgPool { input, .. } => {
                let ip = slots[*input].plane;
                let gi = self.touch(ws, *input);
                let mut share = vec![0f32; op.c];
                for oy in 0..op.h {
                    let rows = nhwc::adaptive_range(oy, ip.h, op.h);
                    for ox in 0..op.w {
                        let cols = nhwc::adaptive_range(ox, ip.w, op.w);
                        let n = (rows.len() * cols.len()) as f32;
                        let go = &g_out[op.at(oy as isize, ox as isize)..][..op.c];
                        for (s, &gv) in share.iter_mut().zip(go) {
                            *s = gv / n;
                        }
                        for iy in rows.clone() {
                            for ix in cols.clone() {
                                add_into(
                                    &mut gi[ip.at(iy as isize, ix as isize)..][..op.c],
                                    &share,
                                );
                            }
                        }
                    }
                }
            }
            ImageStep::PadChannels {
                input,
                stride,
                before,
                ..
            } => {
                let ip = slots[*input].plane;
                let gi = self.touch(ws, *input);
                for oy in 0..op.h {
                    for ox in 0..op.w {
                        let src = &g_out[op.at(oy as isize, ox as isize) + before..][..ip.c];
                        let at = ip.at((oy * stride) as isize, (ox * stride) as isize);
                        add_into(&mut gi[at..at + ip.c], src);
                    }
                }
            }
            ImageStep::QConv { .. }
            | ImageStep::QAdd { .. }
            | ImageStep::Quantize { .. }
            | ImageStep::Dequantize { .. } => {
                unreachable!("refused when the gradient was compiled")
            }
        }
        ws.grads[o] = g_out;
    }
}
