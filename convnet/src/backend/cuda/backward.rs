//! The backward pass of each op on a GPU: given the gradient of an op's output (a device
//! buffer), the gradients of its inputs that track one, computed on the device. Called by
//! autograd when the gradient flowing into an op lives on a GPU; mirrors
//! `autograd::op::Op::backward` for the CPU.

use super::buffer::DeviceBuffer;
use super::ops::{activation_code, adaptive_as_window, subsample_args, BnStats, CudaOp};
use super::runtime::{launch, with, Runtime};
use crate::autograd::{BnEpilogue, Op};
use crate::backend::cpu::elementwise::BinaryKind;
use crate::backend::cpu::pool::PoolGeom;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

type Grads = Vec<(Tensor, DeviceBuffer)>;

fn int(v: usize) -> Result<i32> {
    i32::try_from(v)
        .map_err(|_| Error::Unsupported(format!("size {v} is too large for the CUDA kernels")))
}

fn long(v: usize) -> i64 {
    v as i64
}

/// `y = x * factor` into a new buffer.
fn scaled_copy(rt: &Runtime, x: u64, n: usize, factor: f32) -> Result<DeviceBuffer> {
    let y = rt.uninit(n)?;
    launch!(
        rt,
        "scale_copy",
        rt.elementwise(n),
        x,
        y.ptr(0),
        long(n),
        factor
    )?;
    Ok(y)
}

/// `acc += g` on the device (gradient accumulation).
pub(crate) fn add_assign(acc: &DeviceBuffer, g: &DeviceBuffer, n: usize) -> Result<()> {
    let ordinal = acc.ordinal();
    if g.ordinal() != ordinal {
        return Err(Error::DeviceMismatch {
            op: "backward",
            a: format!("cuda:{ordinal}"),
            b: format!("cuda:{}", g.ordinal()),
        });
    }
    with(ordinal, |rt| {
        launch!(
            rt,
            "add_assign",
            rt.elementwise(n),
            acc.ptr(0),
            g.ptr(0),
            long(n)
        )
    })
}

/// A device buffer holding `values` (the seed of a backward pass).
pub(crate) fn upload(ordinal: usize, values: &[f32]) -> Result<DeviceBuffer> {
    with(ordinal, |rt| rt.upload(values))
}

/// Per-channel sum over N and HW of `g [N, C, HW]` (a bias gradient).
fn channel_sum(rt: &Runtime, g: u64, n: usize, c: usize, hw: usize) -> Result<DeviceBuffer> {
    let out = rt.uninit(c)?;
    launch!(
        rt,
        "channel_sum",
        rt.per_row(c),
        g,
        out.ptr(0),
        int(n)?,
        int(c)?,
        int(hw)?
    )?;
    Ok(out)
}

fn avg_pool_backward(
    rt: &Runtime,
    g: u64,
    geom: &PoolGeom,
    count_include_pad: bool,
) -> Result<DeviceBuffer> {
    let dx = rt.zeros(geom.planes * geom.h * geom.w)?;
    let len = geom.planes * geom.oh * geom.ow;
    launch!(
        rt,
        "avg_pool2d_backward",
        rt.elementwise(len),
        g,
        dx.ptr(0),
        int(geom.h)?,
        int(geom.w)?,
        int(geom.oh)?,
        int(geom.ow)?,
        int(geom.kernel.0)?,
        int(geom.kernel.1)?,
        int(geom.stride.0)?,
        int(geom.stride.1)?,
        int(geom.padding.0)?,
        int(geom.padding.1)?,
        i32::from(count_include_pad),
        long(len)
    )?;
    Ok(dx)
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported(format!("{what} has no CUDA backward kernel yet"))
}

/// Gradients of the inputs of `op` that track one, given `g` = d(loss)/d(out) on GPU
/// `ordinal`.
pub(crate) fn backward(op: &Op, out: &Tensor, g: &DeviceBuffer, ordinal: usize) -> Result<Grads> {
    let gp = g.ptr(0);
    let mut grads: Grads = Vec::new();
    match op {
        Op::Conv2d {
            input,
            weight,
            bias,
            geom,
        } => {
            let (xp, wp) = (
                input.cuda_ptr("conv2d backward")?,
                weight.cuda_ptr("conv2d backward")?,
            );
            with(ordinal, |rt| {
                if input.tracks_grad() {
                    let dx = rt.uninit(input.numel())?;
                    rt.conv2d_backward_input(geom, gp, wp, dx.ptr(0))?;
                    grads.push((input.clone(), dx));
                }
                if weight.tracks_grad() {
                    let dw = rt.uninit(weight.numel())?;
                    rt.conv2d_backward_weight(geom, xp, gp, dw.ptr(0))?;
                    grads.push((weight.clone(), dw));
                }
                if let Some(b) = bias.as_ref().filter(|b| b.tracks_grad()) {
                    let db = channel_sum(rt, gp, geom.n, geom.k, geom.oh * geom.ow)?;
                    grads.push((b.clone(), db));
                }
                Ok(())
            })?;
        }
        Op::Linear {
            input,
            weight,
            bias,
        } => {
            let (o, i) = (weight.dims()[0], weight.dims()[1]);
            let m = input.numel() / i.max(1);
            let (xp, wp) = (
                input.cuda_ptr("linear backward")?,
                weight.cuda_ptr("linear backward")?,
            );
            with(ordinal, |rt| {
                if input.tracks_grad() {
                    let dx = rt.uninit(m * i)?;
                    rt.linear_backward_input(m, i, o, gp, wp, dx.ptr(0))?;
                    grads.push((input.clone(), dx));
                }
                if weight.tracks_grad() {
                    let dw = rt.uninit(o * i)?;
                    rt.linear_backward_weight(m, i, o, gp, xp, dw.ptr(0))?;
                    grads.push((weight.clone(), dw));
                }
                if let Some(b) = bias.as_ref().filter(|b| b.tracks_grad()) {
                    grads.push((b.clone(), channel_sum(rt, gp, m, o, 1)?));
                }
                Ok(())
            })?;
        }
        Op::Activation { act, input } => {
            let n = input.numel();
            let (xp, yp) = (
                input.cuda_ptr("activation backward")?,
                out.cuda_ptr("activation backward")?,
            );
            let (kind, param) = activation_code(*act);
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(n)?;
                launch!(
                    rt,
                    "activation_backward",
                    rt.elementwise(n),
                    gp,
                    xp,
                    yp,
                    dx.ptr(0),
                    long(n),
                    kind,
                    param
                )?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::Binary {
            kind: BinaryKind::Add,
            lhs,
            rhs,
        } if lhs.dims() == rhs.dims() => {
            let n = out.numel();
            with(ordinal, |rt| {
                for t in [lhs, rhs] {
                    if t.tracks_grad() {
                        grads.push((t.clone(), scaled_copy(rt, gp, n, 1.0)?));
                    }
                }
                Ok(())
            })?;
        }
        Op::Reshape { input } => {
            let dx = with(ordinal, |rt| scaled_copy(rt, gp, out.numel(), 1.0))?;
            grads.push((input.clone(), dx));
        }
        Op::AvgPool2d {
            input,
            geom,
            count_include_pad,
        } => {
            let dx = with(ordinal, |rt| {
                avg_pool_backward(rt, gp, geom, *count_include_pad)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::AdaptiveAvgPool2d { input, geom } => {
            let window = adaptive_as_window(geom)?;
            let dx = with(ordinal, |rt| avg_pool_backward(rt, gp, &window, true))?;
            grads.push((input.clone(), dx));
        }
        Op::SubsamplePadChannels { input, geom } => {
            let n = input.numel();
            let [c, h, w, s, before, oc, oh, ow] = subsample_args(geom)?;
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(n)?;
                launch!(
                    rt,
                    "subsample_pad_backward",
                    rt.elementwise(n),
                    gp,
                    dx.ptr(0),
                    c,
                    h,
                    w,
                    s,
                    before,
                    oc,
                    oh,
                    ow,
                    long(n)
                )?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::Cuda(cuda_op) => cuda_backward(cuda_op, out, gp, ordinal, &mut grads)?,
        other => return Err(unsupported(&other.profile_key())),
    }
    grads.retain(|(t, _)| t.tracks_grad());
    Ok(grads)
}

fn cuda_backward(
    op: &CudaOp,
    out: &Tensor,
    gp: u64,
    ordinal: usize,
    grads: &mut Grads,
) -> Result<()> {
    match op {
        CudaOp::MaxPool2d {
            input,
            argmax,
            geom,
        } => {
            let len = geom.planes * geom.oh * geom.ow;
            let dx = with(ordinal, |rt| {
                let dx = rt.zeros(input.numel())?;
                let ap = argmax.ptr(0);
                launch!(
                    rt,
                    "max_pool2d_backward",
                    rt.elementwise(len),
                    gp,
                    ap,
                    dx.ptr(0),
                    int(geom.h)?,
                    int(geom.w)?,
                    int(geom.oh)?,
                    int(geom.ow)?,
                    long(len)
                )?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        CudaOp::Dropout { input, mask } => {
            let n = input.numel();
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(n)?;
                launch!(
                    rt,
                    "mul_mask",
                    rt.elementwise(n),
                    gp,
                    mask.ptr(0),
                    dx.ptr(0),
                    long(n)
                )?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        CudaOp::CrossEntropy {
            logits,
            targets,
            probs,
            smoothing,
            divisor,
        } => {
            let (n, c) = (logits.dims()[0], logits.dims()[1]);
            let len = n * c;
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(len)?;
                let tp = targets.ptr(0);
                launch!(
                    rt,
                    "softmax_cross_entropy_backward",
                    rt.elementwise(len),
                    probs.ptr(0),
                    tp,
                    gp,
                    i32::from(divisor.is_none()),
                    divisor.unwrap_or(1.0),
                    dx.ptr(0),
                    int(c)?,
                    *smoothing,
                    -100i64,
                    long(len)
                )?;
                Ok(dx)
            })?;
            grads.push((logits.clone(), dx));
        }
        CudaOp::BatchNorm2d {
            input,
            weight,
            bias,
            stats,
            training,
            epilogue,
        } => batch_norm_backward(
            input,
            weight.as_ref(),
            bias.as_ref(),
            stats,
            *training,
            epilogue,
            out,
            gp,
            ordinal,
            grads,
        )?,
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn batch_norm_backward(
    input: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    stats: &BnStats,
    training: bool,
    epilogue: &BnEpilogue,
    out: &Tensor,
    gp: u64,
    ordinal: usize,
    grads: &mut Grads,
) -> Result<()> {
    const OP: &str = "batch_norm2d backward";
    let _ = out;
    let d = input.dims();
    let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
    let len = input.numel();
    let xp = input.cuda_ptr(OP)?;
    let wp = weight.map_or(Ok(0), |w| w.cuda_ptr(OP))?;
    let rp = epilogue.residual().map_or(Ok(0), |r| r.cuda_ptr(OP))?;
    let code: i32 = match epilogue {
        BnEpilogue::None => 0,
        BnEpilogue::Relu => 1,
        BnEpilogue::AddRelu(_) => 2,
    };
    let (ni, ci, hwi) = (int(n)?, int(c)?, int(hw)?);
    with(ordinal, |rt| {
        // With a residual, the gradient through the ReLU is also the residual's gradient,
        // so it is written out during the reduction.
        let gm = match epilogue {
            BnEpilogue::AddRelu(_) => Some(rt.uninit(len)?),
            _ => None,
        };
        let gmp = gm.as_ref().map_or(0, |b| b.ptr(0));
        let sums = rt.uninit(4 * c)?; // 2 doubles per channel
        launch!(
            rt,
            "bn_backward_reduce",
            rt.per_row(c),
            gp,
            xp,
            rp,
            stats.mean.ptr(0),
            stats.scale.ptr(0),
            stats.shift.ptr(0),
            gmp,
            sums.ptr(0),
            ni,
            ci,
            hwi,
            code
        )?;
        let (dweight, dbias) = (rt.uninit(c)?, rt.uninit(c)?);
        let (a, b, c0) = (rt.uninit(c)?, rt.uninit(c)?, rt.uninit(c)?);
        launch!(
            rt,
            "bn_backward_finalize",
            rt.per_channel(c),
            sums.ptr(0),
            stats.mean.ptr(0),
            stats.invstd.ptr(0),
            wp,
            dweight.ptr(0),
            dbias.ptr(0),
            a.ptr(0),
            b.ptr(0),
            c0.ptr(0),
            ci,
            (n * hw) as f64,
            i32::from(training)
        )?;
        if input.tracks_grad() {
            let dx = rt.uninit(len)?;
            launch!(
                rt,
                "bn_backward_dx",
                rt.elementwise(len),
                gp,
                gmp,
                xp,
                stats.scale.ptr(0),
                stats.shift.ptr(0),
                a.ptr(0),
                b.ptr(0),
                c0.ptr(0),
                dx.ptr(0),
                ci,
                hwi,
                long(len),
                code,
                i32::from(training)
            )?;
            grads.push((input.clone(), dx));
        }
        if let Some(w) = weight {
            grads.push((w.clone(), dweight));
        }
        if let Some(bi) = bias {
            grads.push((bi.clone(), dbias));
        }
        if let (Some(res), Some(gm)) = (epilogue.residual(), gm) {
            grads.push((res.clone(), gm));
        }
        Ok(())
    })
}
