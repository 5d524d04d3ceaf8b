//! One filter of a text CNN in a single op: a 1-D convolution, ReLU and the maximum over
//! time, `y[n, k] = max_t relu(conv1d(x, w, b))[n, k, t]`, mirroring
//! `F.relu(F.conv1d(x, w, b)).amax(2)` (stride 1, no padding, dilation 1, one group), with
//! its backward.
//!
//! Legend: N batch, C input channels, L input length, K filters, KW filter width,
//! OL = L - KW + 1 output positions. Layouts: input `[N, C, L]`, weight `[K, C, KW]`, bias
//! `[K]`, output and argmax `[N, K]`.
//!
//! Forward: per image, im2col `col [C*KW, OL]` and `z [K, OL] = b + W @ col` (the products of
//! `conv`), then the maximum of each row of `relu(z)` and where it is (the first one; NaN
//! wins, as in max pooling); `z` lives in a per-thread buffer and is never stored.
//!
//! Backward: the maximum passes its gradient to one position `t* = argmax[n, k]` of each
//! row, and ReLU passes it only where the output is positive. So the gradient of `z` has at
//! most one non-zero per row and the convolution's backward products collapse to sums over
//! those: `dW[k, c, j] = sum_n g[n, k] x[n, c, t* + j]`, `dx[n, c, t* + j] += g[n, k]
//! W[k, c, j]`, `db[k] = sum_n g[n, k]` (over the rows with a positive output) — N*K*C*KW
//! multiply-adds instead of three products of N*K*C*KW*OL.

use super::conv::{im2col, ConvGeom};
use super::matmul::{matmul, MatRef, Par};
use rayon::prelude::*;

/// Geometry of one filter bank, validated by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvMaxGeom {
    /// Batch size N.
    pub n: usize,
    /// Input channels C.
    pub c: usize,
    /// Input length L.
    pub l: usize,
    /// Filters K.
    pub k: usize,
    /// Filter width KW (at most L).
    pub kw: usize,
}

impl ConvMaxGeom {
    /// Output positions OL = L - KW + 1.
    pub fn ol(&self) -> usize {
        self.l + 1 - self.kw
    }

    /// The convolution as a 2-D one over `[N, C, 1, L]` (for im2col and the reference).
    fn conv(&self) -> ConvGeom {
        ConvGeom {
            n: self.n,
            c: self.c,
            h: 1,
            w: self.l,
            k: self.k,
            kh: 1,
            kw: self.kw,
            oh: 1,
            ow: self.ol(),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    /// A short description for profiles.
    pub fn describe(&self) -> String {
        format!(
            "conv1d+relu+max [{}, {}, {}] w[{}, {}, {}]",
            self.n, self.c, self.l, self.k, self.c, self.kw
        )
    }

    /// Multiply-accumulates of the forward convolution (for FLOP counts).
    pub fn macs(&self) -> usize {
        self.n * self.k * self.ol() * self.c * self.kw
    }
}

/// `relu` as the activation kernel computes it (NaN passes).
fn relu(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

/// Forward: `y [N, K]` and `argmax [N, K]` (the position in `0..OL` of each maximum).
pub fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvMaxGeom,
    y: &mut [f32],
    argmax: &mut [u32],
) {
    let (ol, rows, cg) = (g.ol(), g.c * g.kw, g.conv());
    debug_assert_eq!(x.len(), g.n * g.c * g.l);
    debug_assert_eq!(w.len(), g.k * rows);
    debug_assert_eq!((y.len(), argmax.len()), (g.n * g.k, g.n * g.k));
    // Threads go to the images unless there are fewer images than threads.
    let par = if g.n >= rayon::current_num_threads() {
        Par::Seq
    } else {
        Par::Rayon
    };
    let wm = MatRef::row_major(w, g.k, rows);
    y.par_chunks_mut(g.k)
        .zip(argmax.par_chunks_mut(g.k))
        .zip(x.par_chunks(g.c * g.l))
        .for_each_init(
            || (vec![0f32; rows * ol], vec![0f32; g.k * ol]),
            |(col, z), ((y_img, a_img), x_img)| {
                im2col(x_img, &cg, col);
                match bias {
                    Some(b) => {
                        for (row, &bk) in z.chunks_mut(ol).zip(b) {
                            row.fill(bk);
                        }
                    }
                    None => z.fill(0.0),
                }
                matmul(z, wm, MatRef::row_major(col, rows, ol), true, par);
                for ((row, yk), ak) in z.chunks(ol).zip(y_img.iter_mut()).zip(a_img.iter_mut()) {
                    let mut best = f32::NEG_INFINITY;
                    let mut at = 0;
                    for (t, &v) in row.iter().enumerate() {
                        let r = relu(v);
                        if r > best || r.is_nan() {
                            best = r;
                            at = t;
                        }
                    }
                    *yk = best;
                    *ak = at as u32;
                }
            },
        );
}

/// Input gradient: `dx [N, C, L]` (overwritten) from `dy [N, K]`, the forward's output `y`
/// and `argmax`.
pub fn backward_input(
    dy: &[f32],
    y: &[f32],
    argmax: &[u32],
    w: &[f32],
    g: &ConvMaxGeom,
    dx: &mut [f32],
) {
    let (c, l, kw) = (g.c, g.l, g.kw);
    dx.par_chunks_mut(c * l)
        .enumerate()
        .for_each(|(n, dx_img)| {
            dx_img.fill(0.0);
            for k in 0..g.k {
                let i = n * g.k + k;
                let passed = y[i] > 0.0;
                if !passed {
                    continue;
                }
                let (gk, t) = (dy[i], argmax[i] as usize);
                let wk = &w[k * c * kw..(k + 1) * c * kw];
                for (ch, taps) in wk.chunks(kw).enumerate() {
                    let dst = &mut dx_img[ch * l + t..ch * l + t + kw];
                    for (d, &wv) in dst.iter_mut().zip(taps) {
                        *d += gk * wv;
                    }
                }
            }
        });
}

/// Weight and bias gradients: `dw [K, C, KW]` and `db [K]` (overwritten; `db` may be
/// empty when there is no bias to train). Each thread sums a run of images into its own
/// `[K, C, KW]` (an image's `[C, L]` stays in cache while every filter reads it); the runs
/// are then added in order.
pub fn backward_params(
    x: &[f32],
    dy: &[f32],
    y: &[f32],
    argmax: &[u32],
    g: &ConvMaxGeom,
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (c, l, kw) = (g.c, g.l, g.kw);
    let per_thread = g.n.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = x
        .par_chunks(per_thread * c * l)
        .enumerate()
        .map(|(run, images)| {
            let mut acc = vec![0f32; dw.len()];
            for (j, x_img) in images.chunks(c * l).enumerate() {
                let n = run * per_thread + j;
                for (k, acc_k) in acc.chunks_mut(c * kw).enumerate() {
                    let i = n * g.k + k;
                    let passed = y[i] > 0.0;
                    if !passed {
                        continue;
                    }
                    let (gk, t) = (dy[i], argmax[i] as usize);
                    for (ch, dst) in acc_k.chunks_mut(kw).enumerate() {
                        for (d, &xv) in dst.iter_mut().zip(&x_img[ch * l + t..ch * l + t + kw]) {
                            *d += gk * xv;
                        }
                    }
                }
            }
            acc
        })
        .collect();
    dw.fill(0.0);
    for p in &partials {
        dw.iter_mut().zip(p).for_each(|(d, s)| *d += s);
    }
    for (k, d) in db.iter_mut().enumerate() {
        *d = (0..g.n)
            .filter(|&n| y[n * g.k + k] > 0.0)
            .map(|n| dy[n * g.k + k] as f64)
            .sum::<f64>() as f32;
    }
}

/// The reference's results: `(y, argmax, dx, dw, db)`.
pub type ConvMaxReference = (Vec<f32>, Vec<u32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// Reference: the full convolution, ReLU and maximum with the naive convolution of `conv`,
/// and the gradients as that convolution's backward of the dense gradient the maximum and
/// ReLU pass on. Returns `(y, argmax, dx, dw, db)`.
pub fn conv_max_naive(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    dy: &[f32],
    g: &ConvMaxGeom,
) -> ConvMaxReference {
    let (cg, ol) = (g.conv(), g.ol());
    let zeros = vec![0f32; g.n * g.k * ol];
    let (z, _, _) = super::conv::conv2d_naive(x, w, bias, &zeros, &cg);
    let mut y = vec![0f32; g.n * g.k];
    let mut argmax = vec![0u32; g.n * g.k];
    let mut dz = vec![0f32; z.len()];
    let mut db = vec![0f32; g.k];
    for i in 0..g.n * g.k {
        let row = &z[i * ol..(i + 1) * ol];
        let mut best = f32::NEG_INFINITY;
        for (t, &v) in row.iter().enumerate() {
            let r = relu(v);
            if r > best || r.is_nan() {
                best = r;
                argmax[i] = t as u32;
            }
        }
        y[i] = best;
        if best > 0.0 {
            dz[i * ol + argmax[i] as usize] = dy[i];
            db[i % g.k] += dy[i];
        }
    }
    let (_, dx, dw) = super::conv::conv2d_naive(x, w, bias, &dz, &cg);
    (y, argmax, dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    #[test]
    fn matches_the_naive_reference() {
        let mut rng = Rng::new(9);
        // Awkward sizes, a filter as wide as the input, one image (threads inside the
        // product), no bias; a bias pushed negative so that some rows never pass ReLU.
        for (n, c, l, k, kw, bias, shift) in [
            (3, 5, 17, 7, 3, true, 0.0),
            (1, 8, 9, 4, 5, true, 0.0),
            (4, 3, 4, 6, 4, false, 0.0),
            (5, 6, 11, 9, 2, true, -4.0),
            (2, 16, 33, 10, 1, true, 0.0),
        ] {
            let g = ConvMaxGeom { n, c, l, k, kw };
            let mut r = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
            let x = r(n * c * l);
            let w = r(k * c * kw);
            let b: Vec<f32> = r(k).iter().map(|v| v + shift).collect();
            let dy = r(n * k);
            let b = bias.then_some(b);
            let (y_ref, a_ref, dx_ref, dw_ref, db_ref) =
                conv_max_naive(&x, &w, b.as_deref(), &dy, &g);
            let close = |got: &[f32], want: &[f32], what: &str| {
                for (i, (a, e)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{g:?} {what}[{i}]: {a} vs {e}"
                    );
                }
            };
            let (mut y, mut a) = (vec![7.0; n * k], vec![7; n * k]);
            forward(&x, &w, b.as_deref(), &g, &mut y, &mut a);
            close(&y, &y_ref, "y");
            assert_eq!(a, a_ref, "{g:?} argmax");
            let mut dx = vec![7.0; x.len()];
            backward_input(&dy, &y, &a, &w, &g, &mut dx);
            close(&dx, &dx_ref, "dx");
            let (mut dw, mut db) = (vec![7.0; w.len()], vec![7.0; k]);
            backward_params(&x, &dy, &y, &a, &g, &mut dw, &mut db);
            close(&dw, &dw_ref, "dw");
            close(&db, &db_ref, "db");
        }
    }
}
