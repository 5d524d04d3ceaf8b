//! The backward pass of each op on a GPU: given the gradient of an op's output (a device
//! buffer), the gradients of its inputs that track one, computed on the device. Called by
//! autograd when the gradient flowing into an op lives on a GPU; mirrors
//! `autograd::op::Op::backward` for the CPU.

use super::buffer::DeviceBuffer;
use super::general::{contiguous_strides, row_major_gemm, strided_map};
use super::int;
use super::ops::{
    activation_code, adaptive_as_window, bf16_copy, epilogue_code, long, operand, result_slot,
    subsample_args, widen_result, BnStats, CudaOp,
};
use super::runtime::{launch, with, Runtime};
use crate::autograd::{BnEpilogue, Op};
use crate::backend::cpu::elementwise::{broadcast_strides, BinaryKind};
use crate::backend::cpu::pool::PoolGeom;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

type Grads = Vec<(Tensor, DeviceBuffer)>;

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

/// A device buffer holding `values` (the seed of a backward pass: the same at every launch
/// of a captured step).
pub(crate) fn upload(ordinal: usize, values: &[f32]) -> Result<DeviceBuffer> {
    with(ordinal, |rt| rt.upload_constant(values.to_vec()))
}

/// Per-channel sum over N and HW of `g [N, C, HW]` (a bias gradient), split over several
/// blocks per channel, then the slices added in order.
fn channel_sum(rt: &Runtime, g: u64, n: usize, c: usize, hw: usize) -> Result<DeviceBuffer> {
    let (cfg, splits) = rt.split_per_channel(c, n * hw);
    let partial = rt.uninit(2 * c * splits)?;
    launch!(
        rt,
        "channel_sum",
        cfg,
        g,
        partial.ptr(0),
        int(n, "size")?,
        int(c, "size")?,
        int(hw, "size")?
    )?;
    let out = rt.uninit(c)?;
    launch!(
        rt,
        "channel_sum_finish",
        rt.per_channel(c),
        partial.ptr(0),
        out.ptr(0),
        int(c, "size")?,
        splits as i32
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
        int(geom.h, "size")?,
        int(geom.w, "size")?,
        int(geom.oh, "size")?,
        int(geom.ow, "size")?,
        int(geom.kernel.0, "size")?,
        int(geom.kernel.1, "size")?,
        int(geom.stride.0, "size")?,
        int(geom.stride.1, "size")?,
        int(geom.padding.0, "size")?,
        int(geom.padding.1, "size")?,
        i32::from(count_include_pad),
        long(len)
    )?;
    Ok(dx)
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
            ..
        } => {
            let (xp, wp) = (
                input.cuda_ptr("conv2d backward")?,
                weight.cuda_ptr("conv2d backward")?,
            );
            with(ordinal, |rt| {
                // Mixed precision: bfloat16 operands and results, float32 accumulation.
                let gb = bf16_copy(rt, gp, out.numel())?;
                if input.tracks_grad() {
                    let dx = rt.uninit(input.numel())?;
                    let wb = bf16_copy(rt, wp, weight.numel())?;
                    let slot = result_slot(rt, input.numel())?;
                    rt.conv2d_backward_input(
                        geom,
                        operand(&gb, gp),
                        operand(&wb, wp),
                        operand(&slot, dx.ptr(0)),
                    )?;
                    widen_result(rt, &slot, &dx, input.numel())?;
                    grads.push((input.clone(), dx));
                }
                if weight.tracks_grad() {
                    let dw = rt.uninit(weight.numel())?;
                    let xb = bf16_copy(rt, xp, input.numel())?;
                    let slot = result_slot(rt, weight.numel())?;
                    rt.conv2d_backward_weight(
                        geom,
                        operand(&xb, xp),
                        operand(&gb, gp),
                        operand(&slot, dw.ptr(0)),
                    )?;
                    widen_result(rt, &slot, &dw, weight.numel())?;
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
            ..
        } => {
            let (o, i) = (weight.dims()[0], weight.dims()[1]);
            let m = input.numel() / i.max(1);
            let (xp, wp) = (
                input.cuda_ptr("linear backward")?,
                weight.cuda_ptr("linear backward")?,
            );
            with(ordinal, |rt| {
                // Mixed precision: bfloat16 operands, float32 results (cublasGemmEx).
                let gb = bf16_copy(rt, gp, m * o)?;
                if input.tracks_grad() {
                    let dx = rt.uninit(m * i)?;
                    let wb = bf16_copy(rt, wp, o * i)?;
                    rt.linear_backward_input(
                        m,
                        i,
                        o,
                        operand(&gb, gp),
                        operand(&wb, wp),
                        dx.ptr(0),
                    )?;
                    grads.push((input.clone(), dx));
                }
                if weight.tracks_grad() {
                    let dw = rt.uninit(o * i)?;
                    let xb = bf16_copy(rt, xp, m * i)?;
                    rt.linear_backward_weight(
                        m,
                        i,
                        o,
                        operand(&gb, gp),
                        operand(&xb, xp),
                        dw.ptr(0),
                    )?;
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
        Op::Binary { kind, lhs, rhs } => {
            binary_backward(*kind, lhs, rhs, out, gp, ordinal, &mut grads)?
        }
        Op::Affine { input, factor } => {
            let dx = with(ordinal, |rt| scaled_copy(rt, gp, out.numel(), *factor))?;
            grads.push((input.clone(), dx));
        }
        Op::Sum { input, dims, scale } => {
            // Broadcast g (the input's shape with the summed dims as 1) back, times scale.
            let full = if input.dims().is_empty() {
                vec![1]
            } else {
                input.dims().to_vec()
            };
            let small: Vec<usize> = full
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if dims.contains(&i) || input.dims().is_empty() {
                        1
                    } else {
                        d
                    }
                })
                .collect();
            let sg = broadcast_strides(&small, &full);
            let sy = contiguous_strides(&full);
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(input.numel())?;
                strided_map(rt, (gp, &sg), (0, &sy), (dx.ptr(0), &sy), &full, 4, *scale)?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::Softmax {
            input,
            outer,
            d,
            inner,
            log,
        } => {
            let yp = out.cuda_ptr("softmax backward")?;
            let lines = outer * inner;
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(input.numel())?;
                launch!(
                    rt,
                    "softmax_backward",
                    rt.elementwise(lines),
                    yp,
                    gp,
                    dx.ptr(0),
                    int(*d, "size")?,
                    *inner as i64,
                    lines as i64,
                    i32::from(*log)
                )?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::NllLoss {
            input,
            targets,
            divisor,
        } => {
            let (n, c) = (input.dims()[0], input.dims()[1]);
            let host: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
            let per_row = out.numel() > 1 || out.rank() == 1;
            let dx = with(ordinal, |rt| {
                let t = rt.upload_i64(&host)?;
                let dx = rt.uninit(n * c)?;
                launch!(
                    rt,
                    "nll_backward",
                    rt.elementwise(n * c),
                    gp,
                    t.ptr(0),
                    dx.ptr(0),
                    int(c, "size")?,
                    i32::from(per_row),
                    *divisor,
                    long(n * c)
                )?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::MseLoss {
            input,
            target,
            divisor,
        } => {
            let n = input.numel();
            let (ap, bp) = (
                input.cuda_ptr("mse backward")?,
                target.cuda_ptr("mse backward")?,
            );
            with(ordinal, |rt| {
                let da = input.tracks_grad().then(|| rt.uninit(n)).transpose()?;
                let db = target.tracks_grad().then(|| rt.uninit(n)).transpose()?;
                launch!(
                    rt,
                    "mse_backward",
                    rt.elementwise(n),
                    gp,
                    ap,
                    bp,
                    da.as_ref().map_or(0, |b| b.ptr(0)),
                    db.as_ref().map_or(0, |b| b.ptr(0)),
                    long(n),
                    *divisor
                )?;
                if let Some(db) = db {
                    grads.push((target.clone(), db));
                }
                if let Some(da) = da {
                    grads.push((input.clone(), da));
                }
                Ok(())
            })?;
        }
        Op::Matmul { a, b } => {
            let (m, k, n) = (a.dims()[0], a.dims()[1], b.dims()[1]);
            let (ap, bp) = (
                a.cuda_ptr("matmul backward")?,
                b.cuda_ptr("matmul backward")?,
            );
            with(ordinal, |rt| {
                if a.tracks_grad() {
                    // da [M, K] = g [M, N] @ b^T
                    let da = rt.uninit(m * k)?;
                    row_major_gemm(rt, da.ptr(0), (gp, m, n, false), (bp, k, n, true))?;
                    grads.push((a.clone(), da));
                }
                if b.tracks_grad() {
                    // db [K, N] = a^T @ g
                    let db = rt.uninit(k * n)?;
                    row_major_gemm(rt, db.ptr(0), (ap, m, k, true), (gp, m, n, false))?;
                    grads.push((b.clone(), db));
                }
                Ok(())
            })?;
        }
        Op::Permute { input, dims } => {
            // dx in the input's row-major order reads g through the inverse permutation.
            let out_strides = contiguous_strides(out.dims());
            let mut sg = vec![0; dims.len()];
            for (i, &d) in dims.iter().enumerate() {
                sg[d] = out_strides[i];
            }
            let full = input.dims().to_vec();
            let sy = contiguous_strides(&full);
            let dx = with(ordinal, |rt| {
                let dx = rt.uninit(input.numel())?;
                strided_map(rt, (gp, &sg), (0, &sy), (dx.ptr(0), &sy), &full, 4, 1.0)?;
                Ok(dx)
            })?;
            grads.push((input.clone(), dx));
        }
        Op::Concat { inputs, dim } => {
            let out_strides = contiguous_strides(out.dims());
            let inner: usize = out.dims()[dim + 1..].iter().product();
            with(ordinal, |rt| {
                let mut start = 0;
                for t in inputs {
                    if t.tracks_grad() {
                        let sy = contiguous_strides(t.dims());
                        let gi = rt.uninit(t.numel())?;
                        let from = gp + (start * inner * std::mem::size_of::<f32>()) as u64;
                        strided_map(
                            rt,
                            (from, &out_strides),
                            (0, &sy),
                            (gi.ptr(0), &sy),
                            t.dims(),
                            4,
                            1.0,
                        )?;
                        grads.push((t.clone(), gi));
                    }
                    start += t.dims()[*dim];
                }
                Ok(())
            })?;
        }
        Op::Cuda(cuda_op) => cuda_backward(cuda_op, out, gp, ordinal, &mut grads)?,
        // Ops whose saved state is host memory were computed on the CPU; their gradient
        // cannot be on a GPU (moving a tensor between devices starts a new leaf).
        other @ (Op::MaxPool2d { .. }
        | Op::Conv2dReluMaxPool { .. }
        | Op::ConvMaxOverTime { .. }
        | Op::Embedding { .. }
        | Op::CrossEntropy { .. }
        | Op::Masked { .. }
        | Op::BatchNorm2d { .. }) => {
            return Err(Error::Backward(format!(
                "{} ran on the CPU but its gradient arrived on a GPU",
                other.profile_key()
            )))
        }
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
                    int(geom.h, "size")?,
                    int(geom.w, "size")?,
                    int(geom.oh, "size")?,
                    int(geom.ow, "size")?,
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
                    int(c, "size")?,
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
    let code = epilogue_code(epilogue);
    let (ni, ci, hwi) = (int(n, "size")?, int(c, "size")?, int(hw, "size")?);
    with(ordinal, |rt| {
        // With a residual, the gradient through the ReLU is also the residual's gradient,
        // so it is written out during the reduction.
        let gm = match epilogue {
            BnEpilogue::AddRelu(_) => Some(rt.uninit(len)?),
            _ => None,
        };
        let gmp = gm.as_ref().map_or(0, |b| b.ptr(0));
        // Two doubles (four floats) per channel and slice.
        let (cfg, splits) = rt.split_per_channel(c, n * hw);
        let partial = rt.uninit(4 * c * splits)?;
        launch!(
            rt,
            "bn_backward_reduce",
            cfg,
            gp,
            xp,
            rp,
            stats.mean.ptr(0),
            stats.scale.ptr(0),
            stats.shift.ptr(0),
            gmp,
            partial.ptr(0),
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
            partial.ptr(0),
            splits as i32,
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

/// Gradients of `lhs (op) rhs` with broadcasting: each operand's gradient is the upstream
/// gradient times the op's partial derivative, summed over the dimensions it was broadcast
/// along (kernel `reduce_broadcast`, modes as documented there).
#[allow(clippy::too_many_arguments)]
fn binary_backward(
    kind: BinaryKind,
    lhs: &Tensor,
    rhs: &Tensor,
    out: &Tensor,
    gp: u64,
    ordinal: usize,
    grads: &mut Grads,
) -> Result<()> {
    const OP: &str = "binary backward";
    if matches!(kind, BinaryKind::Add | BinaryKind::Sub)
        && lhs.dims() == out.dims()
        && rhs.dims() == out.dims()
    {
        // The common residual add: the gradient passes through (negated for the subtrahend).
        let n = out.numel();
        return with(ordinal, |rt| {
            if lhs.tracks_grad() {
                grads.push((lhs.clone(), scaled_copy(rt, gp, n, 1.0)?));
            }
            if rhs.tracks_grad() {
                let sign = if kind == BinaryKind::Sub { -1.0 } else { 1.0 };
                grads.push((rhs.clone(), scaled_copy(rt, gp, n, sign)?));
            }
            Ok(())
        });
    }
    let full = if out.dims().is_empty() {
        vec![1]
    } else {
        out.dims().to_vec()
    };
    let padded = |t: &Tensor| -> Vec<usize> {
        let mut d = vec![1; full.len() - t.rank().min(full.len())];
        d.extend(t.dims());
        d
    };
    let (lp, rp, op) = (lhs.cuda_ptr(OP)?, rhs.cuda_ptr(OP)?, out.cuda_ptr(OP)?);
    let (ls, rs) = (padded(lhs), padded(rhs));
    let (sl, sr) = (broadcast_strides(&ls, &full), broadcast_strides(&rs, &full));
    let so = contiguous_strides(&full);
    with(ordinal, |rt| {
        if lhs.tracks_grad() {
            let (mode, o1) = match kind {
                BinaryKind::Add | BinaryKind::Sub => (0, (0, &sr)),
                BinaryKind::Mul => (2, (rp, &sr)),
                BinaryKind::Div => (3, (rp, &sr)),
            };
            let gl =
                super::general::reduce_broadcast(rt, gp, &ls, &full, (o1.0, o1.1), (0, &so), mode)?;
            grads.push((lhs.clone(), gl));
        }
        if rhs.tracks_grad() {
            let (mode, o1) = match kind {
                BinaryKind::Add => (0, (0, &sl)),
                BinaryKind::Sub => (1, (0, &sl)),
                BinaryKind::Mul => (2, (lp, &sl)),
                BinaryKind::Div => (4, (rp, &sr)),
            };
            let gr = super::general::reduce_broadcast(
                rt,
                gp,
                &rs,
                &full,
                (o1.0, o1.1),
                (op, &so),
                mode,
            )?;
            grads.push((rhs.clone(), gr));
        }
        Ok(())
    })
}
