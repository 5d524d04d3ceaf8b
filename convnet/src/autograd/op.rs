//! The differentiable operations recorded in the graph, one variant per op, and the dispatch
//! from each variant to its dedicated backward kernel in `backend::cpu`.

use crate::autocast::Precision;
use crate::backend::cpu::{
    activation::{self, Activation},
    bf16,
    conv::{self, ConvGeom},
    conv_max::{self, ConvMaxGeom},
    elementwise::{self, BinaryKind},
    embedding, loss,
    matmul::{matmul, MatRef, Par},
    norm,
    pool::{self, PoolGeom},
    recycle, shortcut,
    tuning::KernelChoice,
};
use crate::error::Result;
use crate::tensor::Tensor;

/// What a batch-norm op applied to its output in the same pass.
pub(crate) enum BnEpilogue {
    None,
    Relu,
    /// `relu(bn(x) + residual)`.
    AddRelu(Tensor),
}

impl BnEpilogue {
    /// The op's name in profiles.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            BnEpilogue::None => "batch_norm2d",
            BnEpilogue::Relu => "batch_norm2d+relu",
            BnEpilogue::AddRelu(_) => "batch_norm2d+add+relu",
        }
    }

    /// The residual input, if any.
    pub(crate) fn residual(&self) -> Option<&Tensor> {
        match self {
            BnEpilogue::AddRelu(r) => Some(r),
            _ => None,
        }
    }

    /// Runs `f` with the kernels' form of this epilogue (the residual's data borrowed).
    pub(crate) fn with_kernel_form<R>(&self, f: impl FnOnce(norm::Epilogue<'_>) -> R) -> R {
        match self {
            BnEpilogue::None => f(norm::Epilogue::None),
            BnEpilogue::Relu => f(norm::Epilogue::Relu),
            BnEpilogue::AddRelu(res) => res.with_data(|r| f(norm::Epilogue::AddRelu(r))),
        }
    }
}

/// How a result was computed: the inputs and what the backward kernel needs.
pub(crate) enum Op {
    Conv2d {
        input: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        geom: ConvGeom,
        /// The products' precision in the forward pass, and so in the backward pass.
        precision: Precision,
        /// How the forward pass chose its kernel, and so how the backward pass chooses
        /// ([`crate::backend::cpu::tuning::with_kernels`]).
        kernels: KernelChoice,
    },
    /// `max_pool2d(relu(conv2d(input)))` in one pass (float32): `argmax` indexes the
    /// convolution's output planes (`pool` is the pooling over them); the convolution's
    /// output itself is never kept.
    Conv2dReluMaxPool {
        input: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        geom: ConvGeom,
        argmax: Vec<u32>,
        pool: PoolGeom,
        /// How the backward pass chooses its kernels (as in `Conv2d`).
        kernels: KernelChoice,
    },
    /// `y [N, K] = max_t relu(conv1d(x, w, b))`, with the position of each maximum.
    ConvMaxOverTime {
        input: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        argmax: Vec<u32>,
        geom: ConvMaxGeom,
    },
    /// Max pooling, or with `relu` max pooling of `relu(input)` (computed as ReLU of the
    /// pooled values).
    MaxPool2d {
        input: Tensor,
        argmax: Vec<u32>,
        geom: PoolGeom,
        relu: bool,
    },
    AvgPool2d {
        input: Tensor,
        geom: PoolGeom,
        count_include_pad: bool,
    },
    AdaptiveAvgPool2d {
        input: Tensor,
        geom: PoolGeom,
    },
    /// `y [M, O] = x [M, I] @ w[O, I]^T + b`
    Linear {
        input: Tensor,
        weight: Tensor,
        bias: Option<Tensor>,
        /// The products' precision in the forward pass, and so in the backward pass.
        precision: Precision,
    },
    /// `y [M, N] = a [M, K] @ b [K, N]`
    Matmul {
        a: Tensor,
        b: Tensor,
    },
    Binary {
        kind: BinaryKind,
        lhs: Tensor,
        rhs: Tensor,
    },
    /// `y = x * factor + offset`
    Affine {
        input: Tensor,
        factor: f32,
    },
    Activation {
        act: Activation,
        input: Tensor,
    },
    /// (log-)softmax over the middle axis of `[outer, d, inner]`.
    Softmax {
        input: Tensor,
        outer: usize,
        d: usize,
        inner: usize,
        log: bool,
    },
    CrossEntropy {
        logits: Tensor,
        targets: Vec<usize>,
        probs: Vec<f32>,
        smoothing: f32,
        divisor: f32,
    },
    NllLoss {
        input: Tensor,
        targets: Vec<usize>,
        divisor: f32,
    },
    MseLoss {
        input: Tensor,
        target: Tensor,
        divisor: f32,
    },
    /// An op whose gradient is `dy * mask`: dropout (`y = x * mask`, mask 0 or 1/(1-p)) and
    /// fake quantization (mask 1 where the value was inside the quantized range).
    Masked {
        input: Tensor,
        mask: Vec<f32>,
        name: &'static str,
    },
    BatchNorm2d {
        input: Tensor,
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        mean: Vec<f32>,
        invstd: Vec<f32>,
        training: bool,
        /// What was fused after the normalisation.
        epilogue: BnEpilogue,
        /// Synchronised batch norm: the ranks' group and the global count per channel.
        synced: Option<crate::dist::sync_bn::Synced>,
    },
    /// `y [M, D] = weight[ids]`: the rows of `weight [V, D]` picked by the (validated) ids;
    /// the row `padding_idx` gets no gradient.
    Embedding {
        weight: Tensor,
        ids: Vec<u32>,
        padding_idx: Option<usize>,
    },
    /// A view with another shape over the same elements.
    Reshape {
        input: Tensor,
    },
    Permute {
        input: Tensor,
        dims: Vec<usize>,
    },
    Concat {
        inputs: Vec<Tensor>,
        dim: usize,
    },
    /// Sum over `dims` times `scale` (`mean` uses 1/count).
    Sum {
        input: Tensor,
        dims: Vec<usize>,
        scale: f32,
    },
    /// `y[:, c, h, w] = x[:, c - before, h*s, w*s]` for channels in range, else 0: the
    /// parameter-free shortcut of CIFAR ResNets (option A).
    SubsamplePadChannels {
        input: Tensor,
        geom: shortcut::Subsample,
    },
    /// An op computed on a GPU whose saved state lives in device memory.
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::ops::CudaOp),
}

fn opt_need(t: &Option<Tensor>) -> bool {
    t.as_ref().is_some_and(Tensor::tracks_grad)
}

impl Op {
    /// The tensors this op read.
    pub(crate) fn inputs(&self) -> Vec<&Tensor> {
        match self {
            Op::Conv2d {
                input,
                weight,
                bias,
                ..
            }
            | Op::Conv2dReluMaxPool {
                input,
                weight,
                bias,
                ..
            }
            | Op::ConvMaxOverTime {
                input,
                weight,
                bias,
                ..
            }
            | Op::Linear {
                input,
                weight,
                bias,
                ..
            } => {
                let mut v = vec![input, weight];
                v.extend(bias.as_ref());
                v
            }
            Op::BatchNorm2d {
                input,
                weight,
                bias,
                epilogue,
                ..
            } => {
                let mut v = vec![input];
                v.extend(weight.as_ref());
                v.extend(bias.as_ref());
                v.extend(epilogue.residual());
                v
            }
            Op::Matmul { a, b } => vec![a, b],
            Op::Binary { lhs, rhs, .. } => vec![lhs, rhs],
            Op::MseLoss { input, target, .. } => vec![input, target],
            Op::Concat { inputs, .. } => inputs.iter().collect(),
            Op::MaxPool2d { input, .. }
            | Op::AvgPool2d { input, .. }
            | Op::AdaptiveAvgPool2d { input, .. }
            | Op::Affine { input, .. }
            | Op::Activation { input, .. }
            | Op::Softmax { input, .. }
            | Op::NllLoss { input, .. }
            | Op::Masked { input, .. }
            | Op::Reshape { input }
            | Op::Permute { input, .. }
            | Op::Sum { input, .. }
            | Op::SubsamplePadChannels { input, .. } => vec![input],
            Op::CrossEntropy { logits, .. } => vec![logits],
            Op::Embedding { weight, .. } => vec![weight],
            #[cfg(feature = "cuda")]
            Op::Cuda(op) => op.inputs(),
        }
    }

    /// Op name and input shape, the key of profile rows (the forward uses the same key).
    pub(crate) fn profile_key(&self) -> String {
        let first = |name: &str, t: &Tensor| format!("{name} {}", t.shape());
        match self {
            Op::Conv2d { geom, .. } => geom.describe(),
            Op::Conv2dReluMaxPool { geom, .. } => relu_max_pool_key(geom),
            Op::ConvMaxOverTime { geom, .. } => geom.describe(),
            Op::Linear { input, weight, .. } => {
                format!("linear {} w{}", input.shape(), weight.shape())
            }
            Op::Matmul { a, b } => format!("matmul {} {}", a.shape(), b.shape()),
            Op::MaxPool2d {
                input, relu: false, ..
            } => first("max_pool2d", input),
            Op::MaxPool2d {
                input, relu: true, ..
            } => first("relu_max_pool2d", input),
            Op::AvgPool2d { input, .. } => first("avg_pool2d", input),
            Op::AdaptiveAvgPool2d { input, .. } => first("adaptive_avg_pool2d", input),
            Op::Binary { kind, lhs, .. } => first(&format!("{kind:?}").to_lowercase(), lhs),
            Op::Affine { input, .. } => first("affine", input),
            Op::Activation { act, input } => first(&act.name().to_lowercase(), input),
            Op::Softmax { input, log, .. } => {
                first(if *log { "log_softmax" } else { "softmax" }, input)
            }
            Op::CrossEntropy { logits, .. } => first("cross_entropy", logits),
            Op::NllLoss { input, .. } => first("nll_loss", input),
            Op::MseLoss { input, .. } => first("mse_loss", input),
            Op::Masked { input, name, .. } => first(name, input),
            Op::BatchNorm2d { input, .. } => first("batch_norm2d", input),
            Op::Embedding { weight, ids, .. } => {
                format!("embedding {} ids w{}", ids.len(), weight.shape())
            }
            Op::Reshape { input } => first("reshape", input),
            Op::Permute { input, .. } => first("permute", input),
            Op::Concat { inputs, .. } => first("concat", &inputs[0]),
            Op::Sum { input, .. } => first("sum", input),
            Op::SubsamplePadChannels { input, .. } => first("subsample_pad_channels", input),
            #[cfg(feature = "cuda")]
            Op::Cuda(op) => op.profile_key(),
        }
    }

    /// Floating-point operations of the backward kernels (conv and linear only).
    pub(crate) fn backward_flops(&self) -> f64 {
        match self {
            Op::Conv2d { input, geom, .. } | Op::Conv2dReluMaxPool { input, geom, .. } => {
                2.0 * geom.macs() as f64 * if input.tracks_grad() { 2.0 } else { 1.0 }
            }
            Op::Linear { input, weight, .. } => {
                2.0 * (input.numel() * weight.dims()[0]) as f64
                    * if input.tracks_grad() { 2.0 } else { 1.0 }
            }
            _ => 0.0,
        }
    }

    /// Gradients of the inputs that track one, given `g` = d(loss)/d(out).
    pub(crate) fn backward(&self, out: &Tensor, g: &[f32]) -> Result<Vec<(Tensor, Vec<f32>)>> {
        let mut grads = Vec::new();
        match self {
            Op::Conv2d {
                input,
                weight,
                bias,
                geom,
                precision,
                kernels,
            } => conv2d_grads(
                input,
                weight,
                bias.as_ref(),
                geom,
                (*precision, *kernels),
                g,
                &mut grads,
            ),
            Op::Conv2dReluMaxPool {
                input,
                weight,
                bias,
                geom,
                argmax,
                pool,
                kernels,
            } => {
                // The gradient reaching the convolution's output, then its backward.
                // max_pool2d_relu_backward writes every element.
                let mut dz = recycle::take_overwritten(geom.n * geom.k * geom.oh * geom.ow);
                out.with_data(|y| pool::max_pool2d_relu_backward(g, y, argmax, pool, &mut dz));
                conv2d_grads(
                    input,
                    weight,
                    bias.as_ref(),
                    geom,
                    (Precision::F32, *kernels),
                    &dz,
                    &mut grads,
                );
                recycle::give_back(dz);
            }
            Op::ConvMaxOverTime {
                input,
                weight,
                bias,
                argmax,
                geom,
            } => out.with_data(|y| {
                if input.tracks_grad() {
                    // backward_input writes every element.
                    let mut dx = recycle::take_overwritten(input.numel());
                    weight.with_data(|w| conv_max::backward_input(g, y, argmax, w, geom, &mut dx));
                    grads.push((input.clone(), dx));
                }
                let train_b = bias.as_ref().filter(|b| b.tracks_grad());
                if weight.tracks_grad() || train_b.is_some() {
                    let mut dw = vec![0f32; weight.numel()];
                    let mut db = vec![0f32; train_b.map_or(0, |b| b.numel())];
                    input.with_data(|x| {
                        conv_max::backward_params(x, g, y, argmax, geom, &mut dw, &mut db)
                    });
                    grads.push((weight.clone(), dw));
                    if let Some(b) = train_b {
                        grads.push((b.clone(), db));
                    }
                }
            }),
            Op::MaxPool2d {
                input,
                argmax,
                geom,
                relu,
            } => {
                // Both backwards write every element.
                let mut dx = recycle::take_overwritten(input.numel());
                if *relu {
                    out.with_data(|y| pool::max_pool2d_relu_backward(g, y, argmax, geom, &mut dx));
                } else {
                    pool::max_pool2d_backward(g, argmax, geom, &mut dx);
                }
                grads.push((input.clone(), dx));
            }
            Op::AvgPool2d {
                input,
                geom,
                count_include_pad,
            } => {
                // avg_pool2d_backward writes every element.
                let mut dx = recycle::take_overwritten(input.numel());
                pool::avg_pool2d_backward(g, geom, *count_include_pad, &mut dx);
                grads.push((input.clone(), dx));
            }
            Op::AdaptiveAvgPool2d { input, geom } => {
                // adaptive_avg_pool2d_backward writes every element.
                let mut dx = recycle::take_overwritten(input.numel());
                pool::adaptive_avg_pool2d_backward(g, geom, &mut dx);
                grads.push((input.clone(), dx));
            }
            Op::Linear {
                input,
                weight,
                bias,
                precision,
            } => {
                let (o, i) = (weight.dims()[0], weight.dims()[1]);
                let m = input.numel() / i;
                let gm = MatRef::row_major(g, m, o);
                let matmul = match precision {
                    Precision::F32 => matmul,
                    Precision::Bf16 => bf16::matmul_bf16,
                };
                if input.tracks_grad() {
                    let mut dx = vec![0f32; m * i];
                    weight.with_data(|w| {
                        matmul(&mut dx, gm, MatRef::row_major(w, o, i), false, Par::Rayon)
                    });
                    grads.push((input.clone(), dx));
                }
                if weight.tracks_grad() {
                    let mut dw = vec![0f32; o * i];
                    input.with_data(|x| {
                        matmul(
                            &mut dw,
                            gm.t(),
                            MatRef::row_major(x, m, i),
                            false,
                            Par::Rayon,
                        )
                    });
                    grads.push((weight.clone(), dw));
                }
                if let Some(b) = bias.as_ref().filter(|b| b.tracks_grad()) {
                    grads.push((b.clone(), elementwise::sum_dims(g, &[m, o], &[0])));
                }
            }
            Op::Matmul { a, b } => {
                let (m, k, n) = (a.dims()[0], a.dims()[1], b.dims()[1]);
                let gm = MatRef::row_major(g, m, n);
                if a.tracks_grad() {
                    let mut da = vec![0f32; m * k];
                    b.with_data(|bv| {
                        matmul(
                            &mut da,
                            gm,
                            MatRef::row_major(bv, k, n).t(),
                            false,
                            Par::Rayon,
                        )
                    });
                    grads.push((a.clone(), da));
                }
                if b.tracks_grad() {
                    let mut db = vec![0f32; k * n];
                    a.with_data(|av| {
                        matmul(
                            &mut db,
                            MatRef::row_major(av, m, k).t(),
                            gm,
                            false,
                            Par::Rayon,
                        )
                    });
                    grads.push((b.clone(), db));
                }
            }
            Op::Binary { kind, lhs, rhs } => binary_backward(*kind, lhs, rhs, out, g, &mut grads),
            Op::Affine { input, factor } => {
                grads.push((input.clone(), g.iter().map(|v| v * factor).collect()));
            }
            Op::Activation { act, input } => {
                // activation::backward writes every element.
                let mut dx = recycle::take_overwritten(g.len());
                input
                    .with_data(|x| out.with_data(|y| activation::backward(*act, x, y, g, &mut dx)));
                grads.push((input.clone(), dx));
            }
            Op::Softmax {
                input,
                outer,
                d,
                inner,
                log,
            } => {
                let mut dx = vec![0f32; g.len()];
                out.with_data(|y| loss::softmax_backward(y, g, *outer, *d, *inner, *log, &mut dx));
                grads.push((input.clone(), dx));
            }
            Op::CrossEntropy {
                logits,
                targets,
                probs,
                smoothing,
                divisor,
            } => {
                let c = logits.dims()[1];
                let mut dx = vec![0f32; logits.numel()];
                let scale: Vec<f32> = if g.len() == 1 {
                    vec![g[0] / divisor]
                } else {
                    g.to_vec()
                };
                loss::cross_entropy_backward(probs, targets, c, *smoothing, &scale, &mut dx);
                grads.push((logits.clone(), dx));
            }
            Op::NllLoss {
                input,
                targets,
                divisor,
            } => {
                let c = input.dims()[1];
                let mut dx = vec![0f32; input.numel()];
                for (n, &t) in targets.iter().enumerate() {
                    dx[n * c + t] = -(if g.len() == 1 { g[0] / divisor } else { g[n] });
                }
                grads.push((input.clone(), dx));
            }
            Op::MseLoss {
                input,
                target,
                divisor,
            } => {
                let s = g[0] * 2.0 / divisor;
                let diff: Vec<f32> = input.with_data(|a| {
                    target.with_data(|b| a.iter().zip(b).map(|(x, y)| s * (x - y)).collect())
                });
                if target.tracks_grad() {
                    grads.push((target.clone(), diff.iter().map(|v| -v).collect()));
                }
                if input.tracks_grad() {
                    grads.push((input.clone(), diff));
                }
            }
            Op::Masked { input, mask, .. } => {
                grads.push((
                    input.clone(),
                    g.iter().zip(mask).map(|(a, b)| a * b).collect(),
                ));
            }
            Op::BatchNorm2d {
                input,
                weight,
                bias,
                mean,
                invstd,
                training,
                epilogue,
                synced,
            } => {
                let d = input.dims();
                let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
                let w = weight.as_ref().map(Tensor::to_vec);
                let b = bias.as_ref().map(Tensor::to_vec);
                let reduce = |sums: &mut [f64]| match synced {
                    Some(s) => s.group.reduce_sums(sums),
                    None => Ok(()),
                };
                let r = input.with_data(|x| {
                    epilogue.with_kernel_form(|fused| {
                        norm::backward(
                            x,
                            g,
                            mean,
                            invstd,
                            w.as_deref(),
                            b.as_deref(),
                            n,
                            c,
                            hw,
                            *training,
                            fused,
                            input.tracks_grad(),
                            synced.as_ref().map(|s| norm::SyncedSums {
                                count: s.count,
                                contributes: s.contributes,
                                reduce: &reduce,
                            }),
                        )
                    })
                })?;
                if let Some(dx) = r.dx {
                    grads.push((input.clone(), dx));
                }
                if opt_need(weight) {
                    grads.push((weight.clone().expect("checked"), r.dweight));
                }
                if opt_need(bias) {
                    grads.push((bias.clone().expect("checked"), r.dbias));
                }
                if let (Some(res), Some(dres)) = (epilogue.residual(), r.dresidual) {
                    if res.tracks_grad() {
                        grads.push((res.clone(), dres));
                    }
                }
            }
            Op::Embedding {
                weight,
                ids,
                padding_idx,
            } => {
                let mut dw = vec![0f32; weight.numel()];
                let dim = weight.dims()[1];
                embedding::embedding_backward(ids, g, dim, *padding_idx, &mut dw);
                grads.push((weight.clone(), dw));
            }
            Op::Reshape { input } => grads.push((input.clone(), g.to_vec())),
            Op::Permute { input, dims } => {
                // out[idx] = in[perm(idx)]: scatter g back through the inverse permutation.
                let mut inverse = vec![0; dims.len()];
                for (i, &d) in dims.iter().enumerate() {
                    inverse[d] = i;
                }
                let gt = Tensor::from_parts(g.to_vec(), out.shape().clone(), None);
                let back = crate::autograd::no_grad(|| gt.permute(&inverse))?;
                grads.push((input.clone(), back.to_vec()));
            }
            Op::Concat { inputs, dim } => {
                let dims = out.dims();
                let outer: usize = dims[..*dim].iter().product();
                let inner: usize = dims[dim + 1..].iter().product();
                let total = dims[*dim] * inner;
                let mut start = 0;
                for t in inputs {
                    let len = t.dims()[*dim] * inner;
                    if t.tracks_grad() {
                        let mut gi = Vec::with_capacity(t.numel());
                        for o in 0..outer {
                            gi.extend_from_slice(&g[o * total + start..o * total + start + len]);
                        }
                        grads.push((t.clone(), gi));
                    }
                    start += len;
                }
            }
            Op::Sum { input, dims, scale } => {
                let small: Vec<usize> = input
                    .dims()
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| if dims.contains(&i) { 1 } else { d })
                    .collect();
                grads.push((
                    input.clone(),
                    elementwise::expand_to(g, &small, input.dims(), *scale),
                ));
            }
            Op::SubsamplePadChannels { input, geom } => {
                let mut dx = vec![0f32; input.numel()];
                shortcut::backward(g, geom, &mut dx);
                grads.push((input.clone(), dx));
            }
            #[cfg(feature = "cuda")]
            Op::Cuda(op) => {
                return Err(crate::error::Error::Backward(format!(
                    "{} ran on a GPU but its gradient arrived in host memory",
                    op.profile_key()
                )))
            }
        }
        grads.retain(|(t, _)| t.tracks_grad());
        Ok(grads)
    }
}

fn binary_backward(
    kind: BinaryKind,
    lhs: &Tensor,
    rhs: &Tensor,
    out: &Tensor,
    g: &[f32],
    grads: &mut Vec<(Tensor, Vec<f32>)>,
) {
    let os = out.dims();
    let (ls, rs) = (lhs.dims(), rhs.dims());
    let same = ls == os && rs == os;
    if lhs.tracks_grad() {
        let gl = match kind {
            BinaryKind::Add | BinaryKind::Sub if ls == os => g.to_vec(),
            BinaryKind::Add | BinaryKind::Sub => {
                elementwise::reduce_to_shape(g, os, ls, None, |a, _| a)
            }
            BinaryKind::Mul if same => {
                rhs.with_data(|r| g.iter().zip(r).map(|(a, b)| a * b).collect())
            }
            BinaryKind::Mul => rhs.with_data(|r| {
                elementwise::reduce_to_shape(g, os, ls, Some((r, rs)), |a, b| a * b)
            }),
            BinaryKind::Div if same => {
                rhs.with_data(|r| g.iter().zip(r).map(|(a, b)| a / b).collect())
            }
            BinaryKind::Div => rhs.with_data(|r| {
                elementwise::reduce_to_shape(g, os, ls, Some((r, rs)), |a, b| a / b)
            }),
        };
        grads.push((lhs.clone(), gl));
    }
    if rhs.tracks_grad() {
        let gr = match kind {
            BinaryKind::Add if rs == os => g.to_vec(),
            BinaryKind::Sub if rs == os => g.iter().map(|v| -v).collect(),
            BinaryKind::Add => elementwise::reduce_to_shape(g, os, rs, None, |a, _| a),
            BinaryKind::Sub => elementwise::reduce_to_shape(g, os, rs, None, |a, _| -a),
            BinaryKind::Mul if same => {
                lhs.with_data(|l| g.iter().zip(l).map(|(a, b)| a * b).collect())
            }
            BinaryKind::Mul => lhs.with_data(|l| {
                elementwise::reduce_to_shape(g, os, rs, Some((l, ls)), |a, b| a * b)
            }),
            BinaryKind::Div => {
                // d(a/b)/db = -a/b^2 = -out/b
                let mut q = vec![0f32; g.len()];
                out.with_data(|o| {
                    rhs.with_data(|r| {
                        elementwise::binary_forward(BinaryKind::Div, o, os, r, rs, os, &mut q)
                    })
                });
                q.iter_mut().for_each(|v| *v = -*v);
                if rs == os {
                    g.iter().zip(&q).map(|(a, b)| a * b).collect()
                } else {
                    elementwise::reduce_to_shape(g, os, rs, Some((&q, os)), |a, b| a * b)
                }
            }
        };
        grads.push((rhs.clone(), gr));
    }
}

/// The profile key of a fused convolution, ReLU and max pooling.
pub(crate) fn relu_max_pool_key(geom: &ConvGeom) -> String {
    format!("{} +relu+max_pool", geom.describe())
}

/// The gradients of a convolution's tracked inputs, given `g` = d(loss)/d(output).
fn conv2d_grads(
    input: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    geom: &ConvGeom,
    (precision, kernels): (Precision, KernelChoice),
    g: &[f32],
    grads: &mut Vec<(Tensor, Vec<f32>)>,
) {
    if input.tracks_grad() {
        // conv2d_backward_input writes every element.
        let mut dx = recycle::take_overwritten(input.numel());
        weight.with_data(|w| match precision {
            Precision::F32 => conv::conv2d_backward_input_with(g, w, geom, &mut dx, kernels),
            Precision::Bf16 => bf16::conv2d_backward_input(g, w, geom, &mut dx),
        });
        grads.push((input.clone(), dx));
    }
    if weight.tracks_grad() {
        let mut dw = vec![0f32; weight.numel()];
        input.with_data(|x| match precision {
            Precision::F32 => conv::conv2d_backward_weight_with(x, g, geom, &mut dw, kernels),
            Precision::Bf16 => bf16::conv2d_backward_weight(x, g, geom, &mut dw),
        });
        grads.push((weight.clone(), dw));
    }
    if let Some(b) = bias.filter(|b| b.tracks_grad()) {
        let mut db = vec![0f32; b.numel()];
        conv::conv2d_backward_bias(g, geom, &mut db);
        grads.push((b.clone(), db));
    }
}
