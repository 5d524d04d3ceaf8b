//! Ops of any shape on a GPU: broadcasting arithmetic, `affine`, sums and means over
//! dimensions, strided copies (permuted views made contiguous, concatenation), softmax and
//! log-softmax, NLL and MSE losses, and matrix products. Forward functions here, their
//! backward in `backward`. Shapes are described to the kernels by small arrays of sizes and
//! strides (`meta`, copied to the device per call), rank at most [`MAX_RANK`].

use super::blas::Sgemm;
use super::buffer::DeviceBuffer;
use super::runtime::{launch, with, Runtime};
use crate::autograd::Op;
use crate::backend::cpu::elementwise::{broadcast_strides, BinaryKind};
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::storage::Storage;
use crate::tensor::{record, Tensor};

/// The largest rank the strided kernels take (`MAX_RANK` in kernels.cu).
pub(crate) const MAX_RANK: usize = 8;

fn result(buf: DeviceBuffer, shape: Shape, op: Option<Op>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(buf), shape, op)
}

/// Row-major contiguous strides of `dims`.
pub(crate) fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for d in (0..dims.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * dims[d + 1];
    }
    s
}

/// The kernels' shape arrays on the device (int64), or an error past [`MAX_RANK`]. They
/// are constants of the op, so a captured step may hold them.
pub(crate) fn upload_meta(rt: &mut Runtime, parts: &[&[usize]]) -> Result<DeviceBuffer> {
    let rank = parts.first().map_or(0, |p| p.len());
    if rank > MAX_RANK {
        return Err(Error::Unsupported(format!(
            "tensors of rank {rank} on a GPU (at most {MAX_RANK})"
        )));
    }
    let flat: Vec<i64> = parts
        .iter()
        .flat_map(|p| p.iter().map(|&v| v as i64))
        .collect();
    rt.upload_i64(&flat)
}

/// Broadcast operand strides with a leading 1 for rank 0 (the kernels need rank >= 1).
fn rank1(dims: &[usize]) -> Vec<usize> {
    if dims.is_empty() {
        vec![1]
    } else {
        dims.to_vec()
    }
}

/// `y[iy] = a[ia] op b[ib]` or `a[ia] * scale` (kind 4) over `dims`, with the strides
/// given per operand (kernel `strided_map`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn strided_map(
    rt: &mut Runtime,
    (a, sa): (u64, &[usize]),
    (b, sb): (u64, &[usize]),
    (y, sy): (u64, &[usize]),
    dims: &[usize],
    kind: i32,
    scale: f32,
) -> Result<()> {
    let n: usize = dims.iter().product();
    if n == 0 {
        return Ok(());
    }
    let meta = upload_meta(rt, &[dims, sa, sb, sy])?;
    launch!(
        rt,
        "strided_map",
        rt.elementwise(n),
        a,
        b,
        y,
        meta.ptr(0),
        dims.len() as i32,
        n as i64,
        kind,
        scale
    )
}

fn binary_code(kind: BinaryKind) -> i32 {
    match kind {
        BinaryKind::Add => 0,
        BinaryKind::Sub => 1,
        BinaryKind::Mul => 2,
        BinaryKind::Div => 3,
    }
}

/// `a (op) b` with broadcasting to `out_dims`.
pub(crate) fn binary(
    gpu: usize,
    a: &Tensor,
    b: &Tensor,
    kind: BinaryKind,
    out_dims: Vec<usize>,
) -> Result<Tensor> {
    let (ap, bp) = (a.cuda_ptr("binary")?, b.cuda_ptr("binary")?);
    let dims = rank1(&out_dims);
    let sa = broadcast_strides(&rank1(a.dims()), &dims);
    let sb = broadcast_strides(&rank1(b.dims()), &dims);
    let y = with(gpu, |rt| {
        let y = rt.uninit(dims.iter().product())?;
        strided_map(
            rt,
            (ap, &sa),
            (bp, &sb),
            (y.ptr(0), &contiguous_strides(&dims)),
            &dims,
            binary_code(kind),
            1.0,
        )?;
        Ok(y)
    })?;
    let op = record(&[a, b], || Op::Binary {
        kind,
        lhs: a.clone(),
        rhs: b.clone(),
    });
    Ok(result(y, Shape::new(out_dims), op))
}

/// `x * factor + offset`.
pub(crate) fn affine(gpu: usize, x: &Tensor, factor: f32, offset: f32) -> Result<Tensor> {
    let n = x.numel();
    let xp = x.cuda_ptr("affine")?;
    let y = with(gpu, |rt| {
        let y = rt.uninit(n)?;
        launch!(
            rt,
            "affine_forward",
            rt.elementwise(n),
            xp,
            y.ptr(0),
            n as i64,
            factor,
            offset
        )?;
        Ok(y)
    })?;
    let op = record(&[x], || Op::Affine {
        input: x.clone(),
        factor,
    });
    Ok(result(y, x.shape().clone(), op))
}

/// The elements of a (possibly strided) view, in row-major order, as a new device buffer.
pub(crate) fn gather(gpu: usize, t: &Tensor) -> Result<DeviceBuffer> {
    let (base, strides) = t.cuda_view("contiguous")?;
    let dims = rank1(t.dims());
    let strides = if t.dims().is_empty() {
        vec![1]
    } else {
        strides
    };
    with(gpu, |rt| {
        let y = rt.uninit(t.numel())?;
        let sy = contiguous_strides(&dims);
        strided_map(
            rt,
            (base, &strides),
            (0, &sy),
            (y.ptr(0), &sy),
            &dims,
            4,
            1.0,
        )?;
        Ok(y)
    })
}

/// A contiguous copy of a strided view, recorded as a reshape to `shape`.
pub(crate) fn reshape_copy(gpu: usize, t: &Tensor, shape: Shape, op: Option<Op>) -> Result<Tensor> {
    Ok(result(gather(gpu, t)?, shape, op))
}

/// The sum-reduction arrays of `full` down to `small` (same rank, 1 where reduced):
/// `[small_dims, reduced_dims, s_strides, r_strides]` in `full`'s contiguous layout.
pub(crate) fn reduction_layout(small: &[usize], full: &[usize]) -> [Vec<usize>; 4] {
    let fs = contiguous_strides(full);
    let reduced: Vec<usize> = small
        .iter()
        .zip(full)
        .map(|(&s, &f)| if s == 1 && f != 1 { f } else { 1 })
        .collect();
    let s_strides: Vec<usize> = (0..full.len())
        .map(|d| if reduced[d] == 1 { fs[d] } else { 0 })
        .collect();
    let r_strides: Vec<usize> = (0..full.len())
        .map(|d| if reduced[d] != 1 { fs[d] } else { 0 })
        .collect();
    [small.to_vec(), reduced, s_strides, r_strides]
}

/// `out[s] = sum over the reduced positions of term(g, o1, o2)` (kernel
/// `reduce_broadcast`): `small` is `full` with 1 where reduced; `o1`/`o2` are other operands
/// with their strides in `full`'s index space.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce_broadcast(
    rt: &mut Runtime,
    g: u64,
    small: &[usize],
    full: &[usize],
    (o1, s1): (u64, &[usize]),
    (o2, s2): (u64, &[usize]),
    mode: i32,
) -> Result<DeviceBuffer> {
    let [small_dims, reduced, s_strides, r_strides] = reduction_layout(small, full);
    let n_small: usize = small_dims.iter().product();
    let n_reduced: usize = reduced.iter().product();
    let out = rt.uninit(n_small)?;
    let meta = upload_meta(rt, &[&small_dims, &reduced, &s_strides, &r_strides, s1, s2])?;
    launch!(
        rt,
        "reduce_broadcast",
        rt.elementwise(n_small),
        g,
        o1,
        o2,
        out.ptr(0),
        meta.ptr(0),
        full.len() as i32,
        n_small as i64,
        n_reduced as i64,
        mode
    )?;
    Ok(out)
}

/// Sum over `dims` times `scale` (`mean` passes 1/count), keeping `out_dims`.
pub(crate) fn sum(
    gpu: usize,
    x: &Tensor,
    dims: &[usize],
    scale: f32,
    out_dims: Vec<usize>,
) -> Result<Tensor> {
    let xp = x.cuda_ptr("sum")?;
    let full = rank1(x.dims());
    let small: Vec<usize> = if x.dims().is_empty() {
        vec![1]
    } else {
        full.iter()
            .enumerate()
            .map(|(i, &d)| if dims.contains(&i) { 1 } else { d })
            .collect()
    };
    let zeros = vec![0; full.len()];
    let y = with(gpu, |rt| {
        let y = reduce_broadcast(rt, xp, &small, &full, (0, &zeros), (0, &zeros), 0)?;
        if scale != 1.0 {
            let n: usize = small.iter().product();
            launch!(
                rt,
                "scale_copy",
                rt.elementwise(n),
                y.ptr(0),
                y.ptr(0),
                n as i64,
                scale
            )?;
        }
        Ok(y)
    })?;
    let op = record(&[x], || Op::Sum {
        input: x.clone(),
        dims: dims.to_vec(),
        scale,
    });
    Ok(result(y, Shape::new(out_dims), op))
}

/// (Log-)softmax over the middle axis of `[outer, d, inner]`.
pub(crate) fn softmax(
    gpu: usize,
    x: &Tensor,
    (outer, d, inner): (usize, usize, usize),
    log: bool,
) -> Result<Tensor> {
    let xp = x.cuda_ptr("softmax")?;
    let lines = outer * inner;
    let y = with(gpu, |rt| {
        let y = rt.uninit(x.numel())?;
        launch!(
            rt,
            "softmax_forward",
            rt.elementwise(lines),
            xp,
            y.ptr(0),
            d as i32,
            inner as i64,
            lines as i64,
            i32::from(log)
        )?;
        Ok(y)
    })?;
    let op = record(&[x], || Op::Softmax {
        input: x.clone(),
        outer,
        d,
        inner,
        log,
    });
    Ok(result(y, x.shape().clone(), op))
}

/// Negative log-likelihood of log-probabilities `[N, C]`; `divisor` `None` for one loss per
/// row. Returns the result and the divisor recorded for backward.
pub(crate) fn nll_loss(
    gpu: usize,
    x: &Tensor,
    targets: &[usize],
    divisor: Option<f32>,
) -> Result<Tensor> {
    let (n, c) = (x.dims()[0], x.dims()[1]);
    let xp = x.cuda_ptr("nll_loss")?;
    let host: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let y = with(gpu, |rt| {
        let t = rt.upload_i64(&host)?;
        let rows = rt.uninit(n)?;
        launch!(
            rt,
            "nll_forward",
            rt.elementwise(n),
            xp,
            t.ptr(0),
            rows.ptr(0),
            c as i32,
            n as i64
        )?;
        super::ops::reduce_rows(rt, rows, n, divisor)
    })?;
    let shape = if divisor.is_some() {
        Shape::new(Vec::new())
    } else {
        Shape::new([n])
    };
    let op = record(&[x], || Op::NllLoss {
        input: x.clone(),
        targets: targets.to_vec(),
        divisor: divisor.unwrap_or(1.0),
    });
    Ok(result(y, shape, op))
}

/// `sum((a - b)^2) / divisor`.
pub(crate) fn mse_loss(gpu: usize, a: &Tensor, b: &Tensor, divisor: f32) -> Result<Tensor> {
    let (ap, bp) = (a.cuda_ptr("mse_loss")?, b.cuda_ptr("mse_loss")?);
    let n = a.numel();
    let y = with(gpu, |rt| {
        let y = rt.uninit(1)?;
        let cfg = rt.per_row(1);
        launch!(
            rt,
            "mse_forward",
            cfg,
            ap,
            bp,
            y.ptr(0),
            n as i64,
            f64::from(divisor)
        )?;
        Ok(y)
    })?;
    let op = record(&[a, b], || Op::MseLoss {
        input: a.clone(),
        target: b.clone(),
        divisor,
    });
    Ok(result(y, Shape::new(Vec::new()), op))
}

/// `C [M, N] = op(A) @ op(B)` for row-major operands `(address, rows, cols, transposed)`,
/// as one cuBLAS call on the transposes (`C^T = op(B)^T op(A)^T`).
pub(crate) fn row_major_gemm(
    rt: &Runtime,
    c: u64,
    a: (u64, usize, usize, bool),
    b: (u64, usize, usize, bool),
) -> Result<()> {
    let (m, k) = if a.3 { (a.2, a.1) } else { (a.1, a.2) };
    let n = if b.3 { b.1 } else { b.2 };
    rt.sgemm(Sgemm {
        what: "matmul",
        trans: (b.3, a.3),
        mnk: (n, m, k),
        a: (b.0, b.2),
        b: (a.0, a.2),
        c: (c, n),
        bf16: false,
    })
}

/// `a [M, K] @ b [K, N]`.
pub(crate) fn matmul(gpu: usize, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k, n) = (a.dims()[0], a.dims()[1], b.dims()[1]);
    let (ap, bp) = (a.cuda_ptr("matmul")?, b.cuda_ptr("matmul")?);
    let y = with(gpu, |rt| {
        let y = rt.uninit(m * n)?;
        row_major_gemm(rt, y.ptr(0), (ap, m, k, false), (bp, k, n, false))?;
        Ok(y)
    })?;
    let op = record(&[a, b], || Op::Matmul {
        a: a.clone(),
        b: b.clone(),
    });
    Ok(result(y, Shape::new([m, n]), op))
}

/// Concatenation along `dim` (the inputs validated by the caller).
pub(crate) fn concat(
    gpu: usize,
    tensors: &[Tensor],
    dim: usize,
    out_dims: Vec<usize>,
) -> Result<Tensor> {
    let ptrs = tensors
        .iter()
        .map(|t| t.cuda_ptr("concat"))
        .collect::<Result<Vec<u64>>>()?;
    let inner: usize = out_dims[dim + 1..].iter().product();
    let out_strides = contiguous_strides(&out_dims);
    let y = with(gpu, |rt| {
        let y = rt.uninit(out_dims.iter().product())?;
        let mut start = 0;
        for (t, &p) in tensors.iter().zip(&ptrs) {
            let dims = t.dims();
            let at = y.ptr(start * inner);
            strided_map(
                rt,
                (p, &contiguous_strides(dims)),
                (0, &out_strides),
                (at, &out_strides),
                dims,
                4,
                1.0,
            )?;
            start += dims[dim];
        }
        Ok(y)
    })?;
    let refs: Vec<&Tensor> = tensors.iter().collect();
    let op = record(&refs, || Op::Concat {
        inputs: tensors.to_vec(),
        dim,
    });
    Ok(result(y, Shape::new(out_dims), op))
}
