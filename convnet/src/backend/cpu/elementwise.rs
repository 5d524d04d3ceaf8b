//! Broadcasting binary arithmetic (`torch.add/sub/mul/div`) and axis reductions
//! (`torch.sum`/`mean` over dimensions), with the gradient reductions they need.
//!
//! Broadcasting follows NumPy rules: shapes are right-aligned and a dimension of size 1
//! stretches. Same-shape operands and a per-channel operand (`[C, 1, 1]` against `[N, C, H,
//! W]`, the bias/scale pattern) take fast paths; other patterns use a general strided walk.

use super::simd::vectorized_fn;
use super::PAR_MIN_ELEMS;
use rayon::prelude::*;

/// The four arithmetic operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
}

impl BinaryKind {
    #[inline]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryKind::Add => a + b,
            BinaryKind::Sub => a - b,
            BinaryKind::Mul => a * b,
            BinaryKind::Div => a / b,
        }
    }
}

/// `acc += g` element by element, in parallel over large buffers (gradient accumulation).
pub fn add_assign(acc: &mut [f32], g: &[f32]) {
    assert_eq!(acc.len(), g.len(), "add_assign of different lengths");
    if acc.len() < PAR_MIN_ELEMS {
        return add_assign_chunk(acc, g);
    }
    acc.par_chunks_mut(PAR_MIN_ELEMS)
        .zip(g.par_chunks(PAR_MIN_ELEMS))
        .for_each(|(a, b)| add_assign_chunk(a, b));
}

vectorized_fn! {
fn add_assign_chunk(acc: &mut [f32], g: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(g) {
        *a += b;
    }
}
}

/// The result shape of broadcasting `a` with `b`, or `None` if they are incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Strides of `shape` (contiguous) seen through broadcasting to `out`: 0 where it stretches.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; out.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        let o = i + out.len() - shape.len();
        strides[o] = if shape[i] == 1 && out[o] != 1 { 0 } else { acc };
        acc *= shape[i];
    }
    strides
}

/// Walks every index of `out`, calling `f(out_index, offset_a, offset_b)`.
fn walk2(out: &[usize], sa: &[usize], sb: &[usize], mut f: impl FnMut(usize, usize, usize)) {
    let total: usize = out.iter().product();
    if total == 0 {
        return;
    }
    let rank = out.len();
    let mut idx = vec![0usize; rank];
    let (mut oa, mut ob) = (0usize, 0usize);
    for i in 0..total {
        f(i, oa, ob);
        let mut d = rank;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            oa += sa[d];
            ob += sb[d];
            if idx[d] < out[d] {
                break;
            }
            oa -= sa[d] * out[d];
            ob -= sb[d] * out[d];
            idx[d] = 0;
        }
    }
}

/// If `small` broadcast to `out` varies only along one block of dims, returns
/// `(outer, mid, inner)` such that `out = outer x mid x inner` and `small` indexes by `mid`.
fn channel_pattern(small: &[usize], out: &[usize]) -> Option<(usize, usize, usize)> {
    let pad = out.len() - small.len();
    let full: Vec<usize> = std::iter::repeat_n(1, pad)
        .chain(small.iter().copied())
        .collect();
    let non1: Vec<usize> = (0..full.len()).filter(|&i| full[i] != 1).collect();
    let (first, last) = match (non1.first(), non1.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Some((1, 1, out.iter().product())),
    };
    if (first..=last).any(|i| full[i] != out[i]) {
        return None;
    }
    let outer = out[..first].iter().product();
    let mid = out[first..=last].iter().product();
    let inner = out[last + 1..].iter().product();
    Some((outer, mid, inner))
}

/// `out = a (op) b` with broadcasting; `out` has the broadcast shape `out_shape`.
pub fn binary_forward(
    kind: BinaryKind,
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    out_shape: &[usize],
    out: &mut [f32],
) {
    if a_shape == b_shape {
        let body = |o: &mut [f32], x: &[f32], y: &[f32]| {
            for i in 0..o.len() {
                o[i] = kind.apply(x[i], y[i]);
            }
        };
        if out.len() >= PAR_MIN_ELEMS {
            let c = PAR_MIN_ELEMS / 4;
            out.par_chunks_mut(c)
                .zip(a.par_chunks(c))
                .zip(b.par_chunks(c))
                .for_each(|((o, x), y)| body(o, x, y));
        } else {
            body(out, a, b);
        }
        return;
    }
    if a_shape == out_shape {
        if let Some((_, mid, inner)) = channel_pattern(b_shape, out_shape) {
            for (blk, (o, x)) in out.chunks_mut(inner).zip(a.chunks(inner)).enumerate() {
                let v = b[blk % mid];
                for (oi, &xi) in o.iter_mut().zip(x) {
                    *oi = kind.apply(xi, v);
                }
            }
            return;
        }
    }
    let sa = broadcast_strides(a_shape, out_shape);
    let sb = broadcast_strides(b_shape, out_shape);
    walk2(out_shape, &sa, &sb, |i, ia, ib| {
        out[i] = kind.apply(a[ia], b[ib])
    });
}

/// Sums `g` (of shape `out_shape`) down to `target` (broadcastable to `out_shape`): the
/// gradient of a broadcast. When `scale_by` is given, each term is first multiplied by that
/// tensor's element at the same output position (it has shape `other_shape`).
pub fn reduce_to_shape(
    g: &[f32],
    out_shape: &[usize],
    target: &[usize],
    scale_by: Option<(&[f32], &[usize])>,
    map: impl Fn(f32, f32) -> f32,
) -> Vec<f32> {
    let n: usize = target.iter().product();
    let mut acc = vec![0f64; n];
    let st = broadcast_strides(target, out_shape);
    match scale_by {
        Some((other, other_shape)) => {
            let so = broadcast_strides(other_shape, out_shape);
            walk2(out_shape, &st, &so, |i, it, io| {
                acc[it] += map(g[i], other[io]) as f64
            });
        }
        None => {
            let zeros = vec![0; out_shape.len()];
            walk2(out_shape, &st, &zeros, |i, it, _| {
                acc[it] += map(g[i], 0.0) as f64
            });
        }
    }
    acc.into_iter().map(|v| v as f32).collect()
}

/// Sums `x` over the dimensions in `dims` (sorted, unique); the result has those
/// dimensions removed. Accumulates in `f64`.
pub fn sum_dims(x: &[f32], shape: &[usize], dims: &[usize]) -> Vec<f32> {
    let kept: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if dims.contains(&i) { 1 } else { d })
        .collect();
    let n: usize = kept.iter().product();
    let mut acc = vec![0f64; n];
    let st = broadcast_strides(&kept, shape);
    let zeros = vec![0; shape.len()];
    walk2(shape, &st, &zeros, |i, it, _| acc[it] += x[i] as f64);
    acc.into_iter().map(|v| v as f32).collect()
}

/// Broadcasts `g` (shape `small`, with reduced dims kept as 1) back to `shape`, times `scale`.
pub fn expand_to(g: &[f32], small: &[usize], shape: &[usize], scale: f32) -> Vec<f32> {
    let total: usize = shape.iter().product();
    let mut out = vec![0f32; total];
    let ss = broadcast_strides(small, shape);
    let zeros = vec![0; shape.len()];
    walk2(shape, &ss, &zeros, |i, is, _| out[i] = g[is] * scale);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_shapes() {
        assert_eq!(
            broadcast_shape(&[2, 3, 4, 5], &[3, 1, 1]),
            Some(vec![2, 3, 4, 5])
        );
        assert_eq!(broadcast_shape(&[1, 4], &[3, 1]), Some(vec![3, 4]));
        assert_eq!(broadcast_shape(&[2, 3], &[4]), None);
    }

    #[test]
    fn channel_fast_path_matches_general_walk() {
        let a: Vec<f32> = (0..2 * 3 * 2 * 2).map(|v| v as f32).collect();
        let b = [10.0, 20.0, 30.0];
        let shape = [2, 3, 2, 2];
        let mut fast = vec![0.0; a.len()];
        binary_forward(
            BinaryKind::Add,
            &a,
            &shape,
            &b,
            &[3, 1, 1],
            &shape,
            &mut fast,
        );
        let mut slow = vec![0.0; a.len()];
        let sa = broadcast_strides(&shape, &shape);
        let sb = broadcast_strides(&[3, 1, 1], &shape);
        walk2(&shape, &sa, &sb, |i, ia, ib| slow[i] = a[ia] + b[ib]);
        assert_eq!(fast, slow);
    }
}
