//! The forward pass of each tensor op on a GPU, called by the tensor ops (which validate
//! shapes first) when their operands live on a CUDA device. Results stay on the device;
//! what a backward kernel needs is saved in the op, on the device too ([`CudaOp`] for the
//! state that differs from the CPU's).

use super::buffer::DeviceBuffer;
use super::int;
use super::runtime::{launch, with, Runtime};
use crate::autograd::{BnEpilogue, Op};
use crate::backend::cpu::activation::Activation;
use crate::backend::cpu::conv::ConvGeom;
use crate::backend::cpu::pool::PoolGeom;
use crate::backend::cpu::shortcut::Subsample;
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::{record, Tensor};

/// Ops whose saved state for backward lives in device memory.
pub(crate) enum CudaOp {
    MaxPool2d {
        input: Tensor,
        /// Flat index (int32) of each output's maximum in its input plane (-1: empty window).
        argmax: DeviceBuffer,
        geom: PoolGeom,
    },
    Dropout {
        input: Tensor,
        /// 0 or 1/(1-p) per element.
        mask: DeviceBuffer,
    },
    CrossEntropy {
        logits: Tensor,
        /// Class indices, int64 (shared with the trainer's staging buffer in a captured step).
        targets: std::sync::Arc<DeviceBuffer>,
        probs: DeviceBuffer,
        smoothing: f32,
        /// The reduction's divisor (1 for sum, N for mean); `None` for reduction "none".
        divisor: Option<f32>,
    },
    BatchNorm2d {
        input: Tensor,
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        /// Per channel: the mean and 1/std used, and the affine form `x * scale + shift`.
        stats: BnStats,
        training: bool,
        epilogue: BnEpilogue,
    },
}

/// Per-channel batch-norm constants on the device, float32.
pub(crate) struct BnStats {
    pub(crate) mean: DeviceBuffer,
    pub(crate) invstd: DeviceBuffer,
    pub(crate) scale: DeviceBuffer,
    pub(crate) shift: DeviceBuffer,
}

impl CudaOp {
    /// The tensors this op read.
    pub(crate) fn inputs(&self) -> Vec<&Tensor> {
        match self {
            CudaOp::MaxPool2d { input, .. } | CudaOp::Dropout { input, .. } => vec![input],
            CudaOp::CrossEntropy { logits, .. } => vec![logits],
            CudaOp::BatchNorm2d {
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
        }
    }

    /// Op name and input shape, the key of profile rows.
    pub(crate) fn profile_key(&self) -> String {
        let first = |name: &str, t: &Tensor| format!("{name} {} (cuda)", t.shape());
        match self {
            CudaOp::MaxPool2d { input, .. } => first("max_pool2d", input),
            CudaOp::Dropout { input, .. } => first("dropout", input),
            CudaOp::CrossEntropy { logits, .. } => first("cross_entropy", logits),
            CudaOp::BatchNorm2d {
                input, epilogue, ..
            } => first(epilogue.label(), input),
        }
    }
}

/// Device address of an optional tensor (0 for none).
fn opt_ptr(t: Option<&Tensor>, op: &'static str) -> Result<u64> {
    t.map_or(Ok(0), |t| t.cuda_ptr(op))
}

/// A count as the kernels' 64-bit integer.
pub(crate) fn long(v: usize) -> i64 {
    v as i64
}

/// The epilogue's number in the batch-norm kernels: 0 none, 1 ReLU, 2 add then ReLU.
pub(crate) fn epilogue_code(e: &BnEpilogue) -> i32 {
    match e {
        BnEpilogue::None => 0,
        BnEpilogue::Relu => 1,
        BnEpilogue::AddRelu(_) => 2,
    }
}

/// Wraps a device result.
fn result(buf: DeviceBuffer, shape: Shape, op: Option<Op>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(buf), shape, op)
}

/// Activation kind numbers of `kernels.cu`, with the parameter (leaky slope).
pub(crate) fn activation_code(act: Activation) -> (i32, f32) {
    match act {
        Activation::Relu => (0, 0.0),
        Activation::LeakyRelu(s) => (1, s),
        Activation::Relu6 => (2, 0.0),
        Activation::Sigmoid => (3, 0.0),
        Activation::Tanh => (4, 0.0),
        Activation::Gelu => (5, 0.0),
        Activation::GeluTanh => (6, 0.0),
    }
}

/// `y = f(x)`.
pub(crate) fn activation(gpu: usize, x: &Tensor, act: Activation) -> Result<Tensor> {
    let n = x.numel();
    let xp = x.cuda_ptr("activation")?;
    let y = with(gpu, |rt| {
        let y = rt.uninit(n)?;
        let (kind, param) = activation_code(act);
        launch!(
            rt,
            "activation_forward",
            rt.elementwise(n),
            xp,
            y.ptr(0),
            long(n),
            kind,
            param
        )?;
        Ok(y)
    })?;
    let op = record(&[x], || Op::Activation {
        act,
        input: x.clone(),
    });
    Ok(result(y, x.shape().clone(), op))
}

/// `a + b` of equal shapes.
pub(crate) fn add(gpu: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::Unsupported(format!(
            "add: broadcasting ({} + {}) has no CUDA kernel yet; only equal shapes",
            a.shape(),
            b.shape()
        )));
    }
    let n = a.numel();
    let (ap, bp) = (a.cuda_ptr("add")?, b.cuda_ptr("add")?);
    let y = with(gpu, |rt| {
        let y = rt.uninit(n)?;
        launch!(
            rt,
            "add_forward",
            rt.elementwise(n),
            ap,
            bp,
            y.ptr(0),
            long(n)
        )?;
        Ok(y)
    })?;
    let op = record(&[a, b], || Op::Binary {
        kind: crate::backend::cpu::elementwise::BinaryKind::Add,
        lhs: a.clone(),
        rhs: b.clone(),
    });
    Ok(result(y, a.shape().clone(), op))
}

/// `y = x * mask`, the mask drawn on the host (so that one seed drops the same units on
/// both devices) and copied over.
pub(crate) fn dropout(gpu: usize, x: &Tensor, mask: &[f32]) -> Result<Tensor> {
    let n = x.numel();
    let xp = x.cuda_ptr("dropout")?;
    let (y, mask) = with(gpu, |rt| {
        let mask = rt.upload(mask)?;
        let y = rt.uninit(n)?;
        launch!(
            rt,
            "mul_mask",
            rt.elementwise(n),
            xp,
            mask.ptr(0),
            y.ptr(0),
            long(n)
        )?;
        Ok((y, mask))
    })?;
    let op = record(&[x], || {
        Op::Cuda(CudaOp::Dropout {
            input: x.clone(),
            mask,
        })
    });
    Ok(result(y, x.shape().clone(), op))
}

/// A bfloat16 copy of the `n` floats at `src` (mixed precision), unless `bf16` is off: then
/// `None` and the float32 data is used as it is.
pub(crate) fn bf16_copy(rt: &Runtime, src: u64, n: usize) -> Result<Option<DeviceBuffer>> {
    if !rt.bf16 {
        return Ok(None);
    }
    let b = rt.uninit(n.div_ceil(2))?;
    launch!(rt, "to_bf16", rt.elementwise(n), src, b.ptr(0), long(n))?;
    Ok(Some(b))
}

/// The address an operand is read from (or a result written to): its bfloat16 buffer with
/// mixed precision, else the float32 one.
pub(crate) fn operand(copy: &Option<DeviceBuffer>, f32_addr: u64) -> u64 {
    copy.as_ref().map_or(f32_addr, |b| b.ptr(0))
}

/// Where a result of `n` values goes: a bfloat16 buffer with mixed precision, widened into
/// `dst` by [`widen_result`], else `dst` itself.
pub(crate) fn result_slot(rt: &Runtime, n: usize) -> Result<Option<DeviceBuffer>> {
    if rt.bf16 {
        Ok(Some(rt.uninit(n.div_ceil(2))?))
    } else {
        Ok(None)
    }
}

/// Widens a bfloat16 result into the float32 buffer `dst` (nothing without one).
pub(crate) fn widen_result(
    rt: &Runtime,
    slot: &Option<DeviceBuffer>,
    dst: &DeviceBuffer,
    n: usize,
) -> Result<()> {
    match slot {
        Some(b) => launch!(
            rt,
            "from_bf16",
            rt.elementwise(n),
            b.ptr(0),
            dst.ptr(0),
            long(n)
        ),
        None => Ok(()),
    }
}

/// Adds `bias [C]` to `y [N, C, HW]` in place.
fn add_channel_bias(
    rt: &Runtime,
    y: &DeviceBuffer,
    bias: u64,
    c: usize,
    hw: usize,
    n: usize,
) -> Result<()> {
    launch!(
        rt,
        "add_channel_bias",
        rt.elementwise(n),
        y.ptr(0),
        bias,
        int(c, "channels")?,
        int(hw, "plane size")?,
        long(n)
    )
}

/// `x [*, I] @ w [O, I]^T + b`.
pub(crate) fn linear(
    gpu: usize,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    out_dims: Vec<usize>,
) -> Result<Tensor> {
    let (o, i) = (w.dims()[0], w.dims()[1]);
    let m = x.numel() / i.max(1);
    let (xp, wp, bp) = (
        x.cuda_ptr("linear")?,
        w.cuda_ptr("linear")?,
        opt_ptr(b, "linear")?,
    );
    let y = with(gpu, |rt| {
        let y = rt.uninit(m * o)?;
        // Mixed precision: bfloat16 inputs, float32 output (cublasGemmEx).
        let (xb, wb) = (bf16_copy(rt, xp, m * i)?, bf16_copy(rt, wp, o * i)?);
        rt.linear_forward(m, i, o, operand(&xb, xp), operand(&wb, wp), y.ptr(0))?;
        if b.is_some() {
            add_channel_bias(rt, &y, bp, o, 1, m * o)?;
        }
        Ok(y)
    })?;
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let op = record(&inputs, || Op::Linear {
        input: x.clone(),
        weight: w.clone(),
        bias: b.cloned(),
        // The GPU runs float32 whatever the autocast precision.
        precision: crate::autocast::Precision::F32,
    });
    Ok(result(y, Shape::new(out_dims), op))
}

/// 2-D convolution through cuDNN, then the bias.
pub(crate) fn conv2d(
    gpu: usize,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    geom: ConvGeom,
) -> Result<Tensor> {
    let (xp, wp, bp) = (
        x.cuda_ptr("conv2d")?,
        w.cuda_ptr("conv2d")?,
        opt_ptr(b, "conv2d")?,
    );
    let len = geom.n * geom.k * geom.oh * geom.ow;
    let y = with(gpu, |rt| {
        let y = rt.uninit(len)?;
        // Mixed precision: bfloat16 input, filter and output, float32 accumulation.
        let xb = bf16_copy(rt, xp, geom.n * geom.c * geom.h * geom.w)?;
        let wb = bf16_copy(rt, wp, geom.k * (geom.c / geom.groups) * geom.kh * geom.kw)?;
        let yb = result_slot(rt, len)?;
        rt.conv2d_forward(
            &geom,
            operand(&xb, xp),
            operand(&wb, wp),
            operand(&yb, y.ptr(0)),
        )?;
        widen_result(rt, &yb, &y, len)?;
        if b.is_some() {
            add_channel_bias(rt, &y, bp, geom.k, geom.oh * geom.ow, len)?;
        }
        Ok(y)
    })?;
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let op = record(&inputs, || Op::Conv2d {
        input: x.clone(),
        weight: w.clone(),
        bias: b.cloned(),
        geom,
        // The GPU runs float32 whatever the autocast precision.
        precision: crate::autocast::Precision::F32,
        // The GPU's backward has its own kernels.
        kernels: crate::backend::cpu::tuning::KernelChoice::Direct,
    });
    Ok(result(
        y,
        Shape::new([geom.n, geom.k, geom.oh, geom.ow]),
        op,
    ))
}

/// Window arguments of the pooling kernels: h, w, oh, ow, kh, kw, sh, sw, ph, pw.
fn pool_args(g: &PoolGeom) -> Result<[i32; 10]> {
    Ok([
        int(g.h, "height")?,
        int(g.w, "width")?,
        int(g.oh, "height")?,
        int(g.ow, "width")?,
        int(g.kernel.0, "kernel")?,
        int(g.kernel.1, "kernel")?,
        int(g.stride.0, "stride")?,
        int(g.stride.1, "stride")?,
        int(g.padding.0, "padding")?,
        int(g.padding.1, "padding")?,
    ])
}

/// Max pooling with the argmax kept on the device.
pub(crate) fn max_pool2d(gpu: usize, x: &Tensor, geom: PoolGeom) -> Result<Tensor> {
    let xp = x.cuda_ptr("max_pool2d")?;
    let len = geom.planes * geom.oh * geom.ow;
    let [h, w, oh, ow, kh, kw, sh, sw, ph, pw] = pool_args(&geom)?;
    let (dh, dw) = (
        int(geom.dilation.0, "dilation")?,
        int(geom.dilation.1, "dilation")?,
    );
    let (y, argmax) = with(gpu, |rt| {
        let y = rt.uninit(len)?;
        // int32 indices, one float's room each; max_pool2d_forward writes every element.
        let argmax = rt.uninit(len)?;
        let ap = argmax.ptr(0);
        launch!(
            rt,
            "max_pool2d_forward",
            rt.elementwise(len),
            xp,
            y.ptr(0),
            ap,
            h,
            w,
            oh,
            ow,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            dh,
            dw,
            long(len)
        )?;
        Ok((y, argmax))
    })?;
    let op = record(&[x], || {
        Op::Cuda(CudaOp::MaxPool2d {
            input: x.clone(),
            argmax,
            geom,
        })
    });
    let d = x.dims();
    Ok(result(y, Shape::new([d[0], d[1], geom.oh, geom.ow]), op))
}

/// Average pooling; `record_as` builds the op recorded for backward (average or adaptive).
pub(crate) fn avg_pool2d(
    gpu: usize,
    x: &Tensor,
    geom: PoolGeom,
    count_include_pad: bool,
    record_as: impl FnOnce() -> Op,
) -> Result<Tensor> {
    let xp = x.cuda_ptr("avg_pool2d")?;
    let len = geom.planes * geom.oh * geom.ow;
    let [h, w, oh, ow, kh, kw, sh, sw, ph, pw] = pool_args(&geom)?;
    let y = with(gpu, |rt| {
        let y = rt.uninit(len)?;
        launch!(
            rt,
            "avg_pool2d_forward",
            rt.elementwise(len),
            xp,
            y.ptr(0),
            h,
            w,
            oh,
            ow,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            i32::from(count_include_pad),
            long(len)
        )?;
        Ok(y)
    })?;
    let op = record(&[x], record_as);
    let d = x.dims();
    Ok(result(y, Shape::new([d[0], d[1], geom.oh, geom.ow]), op))
}

/// The average-pooling window equal to adaptive pooling from `H x W` to `OH x OW` when the
/// sizes divide (global pooling included); other sizes have no CUDA kernel yet.
pub(crate) fn adaptive_as_window(g: &PoolGeom) -> Result<PoolGeom> {
    if !g.h.is_multiple_of(g.oh) || !g.w.is_multiple_of(g.ow) {
        return Err(Error::Unsupported(format!(
            "adaptive_avg_pool2d from {}x{} to {}x{} (sizes that do not divide) has no CUDA kernel yet",
            g.h, g.w, g.oh, g.ow
        )));
    }
    let k = (g.h / g.oh, g.w / g.ow);
    Ok(PoolGeom {
        kernel: k,
        stride: k,
        padding: (0, 0),
        dilation: (1, 1),
        ..*g
    })
}

/// Shortcut arguments: c, h, w, stride, before, out_channels, oh, ow.
pub(crate) fn subsample_args(s: &Subsample) -> Result<[i32; 8]> {
    let (oh, ow) = s.out_hw();
    Ok([
        int(s.c, "channels")?,
        int(s.h, "height")?,
        int(s.w, "width")?,
        int(s.stride, "stride")?,
        int(s.before, "channels")?,
        int(s.out_channels, "channels")?,
        int(oh, "height")?,
        int(ow, "width")?,
    ])
}

/// The option-A shortcut `x[:, :, ::s, ::s]` among zero channels.
pub(crate) fn subsample_pad_channels(gpu: usize, x: &Tensor, geom: Subsample) -> Result<Tensor> {
    let xp = x.cuda_ptr("subsample_pad_channels")?;
    let n = x.dims()[0];
    let (oh, ow) = geom.out_hw();
    let len = n * geom.out_channels * oh * ow;
    let [c, h, w, s, before, oc, ohi, owi] = subsample_args(&geom)?;
    let y = with(gpu, |rt| {
        let y = rt.uninit(len)?;
        launch!(
            rt,
            "subsample_pad_forward",
            rt.elementwise(len),
            xp,
            y.ptr(0),
            c,
            h,
            w,
            s,
            before,
            oc,
            ohi,
            owi,
            long(len)
        )?;
        Ok(y)
    })?;
    let op = record(&[x], || Op::SubsamplePadChannels {
        input: x.clone(),
        geom,
    });
    Ok(result(y, Shape::new([n, geom.out_channels, oh, ow]), op))
}

/// Batch norm with its epilogue; statistics, running-stat update and the per-channel
/// constants are computed on the device (nothing is copied back).
#[allow(clippy::too_many_arguments)]
pub(crate) fn batch_norm2d(
    gpu: usize,
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f32,
    eps: f32,
    epilogue: BnEpilogue,
) -> Result<Tensor> {
    const OP: &str = "batch_norm2d";
    let d = x.dims();
    let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
    let len = x.numel();
    let xp = x.cuda_ptr(OP)?;
    let (rmp, rvp) = (running_mean.cuda_ptr(OP)?, running_var.cuda_ptr(OP)?);
    let (wp, bp) = (opt_ptr(weight, OP)?, opt_ptr(bias, OP)?);
    let rp = opt_ptr(epilogue.residual(), OP)?;
    let (ni, ci, hwi) = (
        int(n, "batch")?,
        int(c, "channels")?,
        int(hw, "plane size")?,
    );
    let code = epilogue_code(&epilogue);
    let count = n * hw;
    let unbias = if count > 1 {
        count as f64 / (count - 1) as f64
    } else {
        1.0
    };
    let (y, stats) = with(gpu, |rt| {
        // Per-slice count, sum and squared deviations in double (two floats each), training
        // only; bn_finalize combines them.
        let (partial, splits) = if training {
            let (cfg, splits) = rt.split_per_channel(c, count);
            let partial = rt.uninit(6 * c * splits)?;
            launch!(rt, "bn_stats", cfg, xp, partial.ptr(0), ni, ci, hwi)?;
            (Some(partial), splits)
        } else {
            (None, 1)
        };
        let stats = BnStats {
            mean: rt.uninit(c)?,
            invstd: rt.uninit(c)?,
            scale: rt.uninit(c)?,
            shift: rt.uninit(c)?,
        };
        launch!(
            rt,
            "bn_finalize",
            rt.per_channel(c),
            partial.as_ref().map_or(0, |b| b.ptr(0)),
            splits as i32,
            rmp,
            rvp,
            wp,
            bp,
            stats.mean.ptr(0),
            stats.invstd.ptr(0),
            stats.scale.ptr(0),
            stats.shift.ptr(0),
            ci,
            eps,
            momentum,
            unbias,
            i32::from(training)
        )?;
        let y = rt.uninit(len)?;
        launch!(
            rt,
            "bn_normalize",
            rt.elementwise(len),
            xp,
            stats.scale.ptr(0),
            stats.shift.ptr(0),
            rp,
            y.ptr(0),
            ci,
            hwi,
            long(len),
            code
        )?;
        Ok((y, stats))
    })?;
    let residual = epilogue.residual().cloned();
    let mut inputs = vec![x];
    inputs.extend(weight);
    inputs.extend(bias);
    inputs.extend(residual.as_ref());
    let op = record(&inputs, || {
        Op::Cuda(CudaOp::BatchNorm2d {
            input: x.clone(),
            weight: weight.cloned(),
            bias: bias.cloned(),
            stats,
            training,
            epilogue,
        })
    });
    Ok(result(y, x.shape().clone(), op))
}

/// Adds a batch's `loss * N` and correct predictions of `logits [N, C]` to `acc` (two
/// doubles on the device): a training epoch's running figures without a copy to the host
/// per step.
pub(crate) fn accumulate_metrics(
    gpu: usize,
    acc: &DeviceBuffer,
    loss: &Tensor,
    logits: &Tensor,
    labels: &[usize],
) -> Result<()> {
    let (n, c) = (logits.dims()[0], logits.dims()[1]);
    let (lp, zp) = (loss.cuda_ptr("metrics")?, logits.cuda_ptr("metrics")?);
    // The loss's own copy of the targets, when it kept one for backward.
    let saved = match loss.op() {
        Some(Op::Cuda(CudaOp::CrossEntropy { targets, .. })) => Some(targets.ptr(0)),
        _ => None,
    };
    with(gpu, |rt| {
        let uploaded = match saved {
            Some(_) => None,
            None => {
                let host: Vec<i64> = labels.iter().map(|&t| t as i64).collect();
                Some(rt.upload_i64(&host)?)
            }
        };
        let targets = saved.unwrap_or_else(|| uploaded.as_ref().map_or(0, |t| t.ptr(0)));
        let cfg = rt.per_row(1);
        launch!(
            rt,
            "accumulate_metrics",
            cfg,
            lp,
            zp,
            targets,
            acc.ptr(0),
            int(n, "batch")?,
            int(c, "classes")?
        )
    })
}

/// Per-row losses `rows [N]` as the reduction asks: themselves (`divisor` `None`), or
/// their sum in double divided by `divisor` (one value).
pub(crate) fn reduce_rows(
    rt: &Runtime,
    rows: DeviceBuffer,
    n: usize,
    divisor: Option<f32>,
) -> Result<DeviceBuffer> {
    let Some(div) = divisor else {
        return Ok(rows);
    };
    let total = rt.uninit(1)?;
    let cfg = rt.per_row(1);
    launch!(
        rt,
        "sum_scaled",
        cfg,
        rows.ptr(0),
        total.ptr(0),
        long(n),
        f64::from(div)
    )?;
    Ok(total)
}

/// Softmax cross-entropy of `logits [N, C]` against class indices (validated by the
/// caller); `divisor` is `None` for reduction "none" (one loss per row), else the loss is
/// the sum of the rows divided by it.
pub(crate) fn cross_entropy(
    gpu: usize,
    logits: &Tensor,
    targets: &[usize],
    smoothing: f32,
    divisor: Option<f32>,
) -> Result<Tensor> {
    let host: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let targets = with(gpu, |rt| rt.upload_i64(&host))?;
    cross_entropy_on_device(
        gpu,
        logits,
        std::sync::Arc::new(targets),
        smoothing,
        divisor,
    )
}

/// [`cross_entropy`] with the class indices already on the device (int64, one per row).
pub(crate) fn cross_entropy_on_device(
    gpu: usize,
    logits: &Tensor,
    targets: std::sync::Arc<DeviceBuffer>,
    smoothing: f32,
    divisor: Option<f32>,
) -> Result<Tensor> {
    let (n, c) = (logits.dims()[0], logits.dims()[1]);
    let lp = logits.cuda_ptr("cross_entropy")?;
    let tp = targets.ptr(0);
    let (out, probs) = with(gpu, |rt| {
        let probs = rt.uninit(n * c)?;
        let rows = rt.uninit(n)?;
        launch!(
            rt,
            "softmax_cross_entropy_forward",
            rt.per_row(n),
            lp,
            tp,
            probs.ptr(0),
            rows.ptr(0),
            int(c, "classes")?,
            smoothing,
            -100i64
        )?;
        let out = reduce_rows(rt, rows, n, divisor)?;
        Ok((out, probs))
    })?;
    let shape = match divisor {
        None => Shape::new([n]),
        Some(_) => Shape::new(Vec::new()),
    };
    let op = record(&[logits], || {
        Op::Cuda(CudaOp::CrossEntropy {
            logits: logits.clone(),
            targets,
            probs,
            smoothing,
            divisor,
        })
    });
    Ok(result(out, shape, op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(h: usize, w: usize, oh: usize, ow: usize) -> PoolGeom {
        PoolGeom {
            planes: 2,
            h,
            w,
            oh,
            ow,
            kernel: (1, 1),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
        }
    }

    #[test]
    fn adaptive_pooling_maps_to_a_window_only_when_sizes_divide() {
        let g = adaptive_as_window(&pool(8, 6, 1, 1)).unwrap();
        assert_eq!((g.kernel, g.stride, g.padding), ((8, 6), (8, 6), (0, 0)));
        let g = adaptive_as_window(&pool(8, 6, 4, 3)).unwrap();
        assert_eq!((g.kernel, g.stride), ((2, 2), (2, 2)));
        let err = adaptive_as_window(&pool(7, 7, 3, 3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("7x7 to 3x3") && err.contains("no CUDA kernel"),
            "{err}"
        );
    }

    /// The kernels' activation switch has one case per code, in the order of
    /// `activation_code`; a new activation must be added to both.
    #[test]
    fn activation_codes_are_distinct_and_known_to_the_kernels() {
        let all = [
            Activation::Relu,
            Activation::LeakyRelu(0.1),
            Activation::Relu6,
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Gelu,
            Activation::GeluTanh,
        ];
        let codes: Vec<i32> = all.iter().map(|&a| activation_code(a).0).collect();
        assert_eq!(codes, (0..7).collect::<Vec<_>>());
        assert_eq!(activation_code(Activation::LeakyRelu(0.1)).1, 0.1);
        let src = super::super::kernels::SOURCE;
        for code in 0..6 {
            assert!(
                src.contains(&format!("case {code}:")),
                "no case {code} in kernels.cu"
            );
        }
        assert!(src.contains("default: {"), "GELU-tanh is the default case");
    }
}
