//! Winograd's minimal filtering F(2x2, 3x3) for 3x3, stride-1, padding-1 convolutions: the
//! inference plan's (channels-last images, see [`super::nhwc`]) and the training step's
//! (NCHW batches, [`forward_nchw`], which also serves their input gradients). Mirrors
//! `torch.nn.functional.conv2d(x, w, b, padding=1)` (+ residual + activation), with 16
//! multiplications per 2x2 outputs and input-output channel pair instead of 36.
//!
//! Each 2x2 output tile reads a 4x4 input tile `d`. With the standard matrices (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016)
//!
//! ```text
//! B^T = [1  0 -1  0]      G = [  1    0    0 ]      A^T = [1  1  1  0]
//!       [0  1  1  0]          [ 1/2  1/2  1/2]            [0  1 -1 -1]
//!       [0 -1  1  0]          [ 1/2 -1/2  1/2]
//!       [0  1  0 -1]          [  0    0    1 ]
//! ```
//!
//! the output is `A^T [ sum_c (G g_kc G^T) * (B^T d_c B) ] A`: the kernel is transformed once
//! when the plan is built (`U = G g G^T`, in float64, rounded once), each input tile once per
//! call (`V = B^T d B`, additions only), and the 16 element-wise products summed over the
//! input channels are 16 independent matrix products `M_xi [tiles, K] = V_xi [tiles, C] @
//! U_xi [C, K]`, run by the direct convolution's register tiles. The output transform
//! `A^T M A` (additions only) adds the bias and the residual and applies the activation.
//!
//! The transforms' coefficients are 0, +-1 and +-1/2, so the result differs from the direct
//! sum only by float32 rounding in a different order: the test `winograd_matches_the_reference`
//! bounds it at 2e-6 of the outputs' scale against a float64 reference. Plans for input
//! gradients keep the direct kernel (see `Plan::keeping_values`).

#[cfg(test)]
use super::nhwc::Plane;
use super::nhwc::{self, DirectConv, Epilogue, OutRows, LANES};
use std::ops::Range;

/// Taps of the 4x4 transformed tile.
const XI: usize = 16;
/// Output tiles per matrix product (or one row of tiles, if wider): small enough that the
/// transformed inputs and the products stay in the core's L1 and L2 caches. Measured with
/// `convnet bench --model resnet20 --mode infer --batch-size 64 --threads 2` on AMD Zen 5:
/// 64 tiles 6630 images/s, 32 7480, 16 7980, 8 8010 (the direct kernel: 6000).
const TILES_PER_PASS: usize = 16;

/// The transformed kernel of a [`DirectConv`] with 3x3 weights: `U [16][ceil(K/16)][C][16]`
/// (for each of the 16 taps, the layout [`nhwc::PackedConv`] gives a 1x1 kernel).
#[derive(Clone, Debug)]
pub struct PackedWinograd {
    u: Vec<f32>,
    k: usize,
    c: usize,
}

impl PackedWinograd {
    /// Transforms PyTorch-layout weights `[K, C, 3, 3]` (`G g G^T` in float64, as `G g`
    /// then `(G g) G^T`; output channels in parallel).
    pub fn new(weight: &[f32], k: usize, c: usize) -> PackedWinograd {
        use rayon::prelude::*;
        assert_eq!(weight.len(), k * c * 9, "weight size");
        // `G` applied to the three values `v`: [v0, (v0+v1+v2)/2, (v0-v1+v2)/2, v2].
        let g_times = |v: [f64; 3]| {
            [
                v[0],
                0.5 * (v[0] + v[1] + v[2]),
                0.5 * (v[0] - v[1] + v[2]),
                v[2],
            ]
        };
        let mut by_pair = vec![[0f32; XI]; k * c];
        by_pair
            .par_chunks_mut(c)
            .zip(weight.par_chunks(c * 9))
            .for_each(|(out, wk)| {
                for (u, g) in out.iter_mut().zip(wk.chunks_exact(9)) {
                    let g = |a: usize, b: usize| g[a * 3 + b] as f64;
                    // Columns of `G g`, then `G` applied to each of its rows.
                    let cols: [[f64; 4]; 3] =
                        std::array::from_fn(|b| g_times([g(0, b), g(1, b), g(2, b)]));
                    for i in 0..4 {
                        let row = g_times([cols[0][i], cols[1][i], cols[2][i]]);
                        for (j, v) in row.iter().enumerate() {
                            u[i * 4 + j] = *v as f32;
                        }
                    }
                }
            });
        let blocks = k.div_ceil(LANES);
        let mut u = vec![0f32; XI * blocks * c * LANES];
        for o in 0..k {
            for ci in 0..c {
                for (xi, v) in by_pair[o * c + ci].iter().enumerate() {
                    u[((xi * blocks + o / LANES) * c + ci) * LANES + o % LANES] = *v;
                }
            }
        }
        PackedWinograd { u, k, c }
    }

    /// True when this kernel computes `conv` (3x3, stride 1, padding 1, no dilation) with
    /// `c` input channels, a multiple of 16, and an output of even height and width, on a
    /// CPU with AVX-512F.
    pub fn applies(
        c: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        out_hw: (usize, usize),
    ) -> bool {
        kernel == (3, 3)
            && stride == (1, 1)
            && padding == (1, 1)
            && dilation == (1, 1)
            && c.is_multiple_of(LANES)
            && out_hw.0.is_multiple_of(2)
            && out_hw.1.is_multiple_of(2)
            && nhwc::use_avx512()
    }
}

/// Output rows `rows` (an even start and end: whole tiles) of `conv` for one image, as
/// [`nhwc::conv_rows`] computes them with `bias` (padded to whole blocks).
pub fn conv_rows(
    conv: &DirectConv,
    packed: &PackedWinograd,
    bias: &[f32],
    input: &[f32],
    epilogue: Epilogue,
    mut out: OutRows,
    rows: Range<usize>,
) {
    let (ip, op) = (conv.input, conv.output);
    let blocks = packed.k.div_ceil(LANES);
    assert!(
        PackedWinograd::applies(
            ip.c,
            conv.kernel,
            conv.stride,
            conv.padding,
            conv.dilation,
            (op.h, op.w)
        ) && packed.c == ip.c
            && packed.k == op.c
            && ip.halo >= 1
            && (ip.h, ip.w) == (op.h, op.w)
            && op.cs >= blocks * LANES
            && bias.len() >= blocks * LANES,
        "winograd::conv_rows called for {conv:?}"
    );
    assert!(input.len() >= ip.len() && rows.start.is_multiple_of(2) && rows.end <= op.h);
    assert!(rows.end.is_multiple_of(2), "whole tiles of two rows");
    if let Some((r, rp)) = epilogue.residual {
        assert!(
            r.len() >= rp.len()
                && (rp.h, rp.w) == (op.h, op.w)
                && rp.c >= op.c
                && rp.cs >= blocks * LANES
        );
    }
    if rows.is_empty() {
        return;
    }
    let first = op.at(rows.start as isize, 0);
    let end = op.at(rows.end as isize - 1, op.w as isize);
    assert!(first >= out.offset && end <= out.offset + out.data.len());
    let per_row = op.w / 2;
    let tile_rows = (TILES_PER_PASS / per_row).max(1);
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (v_len, m_len) = (
            XI * tile_rows * per_row * ip.c,
            XI * tile_rows * per_row * blocks * LANES,
        );
        if s.len() < v_len + m_len {
            s.resize(v_len + m_len, 0.0);
        }
        let (v, m) = s.split_at_mut(v_len);
        let mut ty = rows.start / 2;
        while ty < rows.end / 2 {
            let count = tile_rows.min(rows.end / 2 - ty);
            // SAFETY: the asserts above bound the tiles' reads (input rows 2ty-1 ..
            // 2(ty+count)+1 and columns -1 ..= W lie inside the halo) and writes (rows
            // inside `out`); `use_avx512` was checked by `applies`.
            unsafe {
                pass(
                    conv, packed, bias, input, &epilogue, &mut out, ty, count, v, m,
                );
            }
            ty += count;
        }
    });
}

/// The 3x3, stride-1, padding-1 convolution between two planes: the geometry this kernel
/// computes.
fn conv_3x3(input: nhwc::Plane, output: nhwc::Plane) -> DirectConv {
    DirectConv {
        input,
        output,
        kernel: (3, 3),
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
    }
}

thread_local! {
    /// Whether convolutions started on this thread may take [`forward_nchw`] ([`allow`]).
    static ALLOWED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the float32 convolutions started on this thread now may take Winograd's
/// F(2x2, 3x3) (inside [`allow`]; outside, they never do).
pub fn allowed() -> bool {
    ALLOWED.with(std::cell::Cell::get)
}

/// Runs `f` with the float32 convolutions it starts on this thread allowed (`on`) to take
/// Winograd's F(2x2, 3x3) where it applies, in the forward pass and in the input gradient
/// of the backward pass (each op keeps the choice), then restores the previous setting.
/// The training loop and `convnet bench` run their forward passes inside it; everything
/// else (a tensor's `conv2d`, evaluation, captures and explanations) keeps the direct
/// kernel, whose sums are PyTorch's up to the order of the additions.
///
/// ```
/// use convnet::backend::cpu::winograd;
/// assert!(!winograd::allowed());
/// assert!(winograd::allow(true, winograd::allowed));
/// assert!(!winograd::allowed());
/// ```
pub fn allow<R>(on: bool, f: impl FnOnce() -> R) -> R {
    crate::scoped::with(&ALLOWED, on, f)
}

/// Input channels from which convolutions in [`allow`] take [`forward_nchw`]: with 16, the
/// copies to and from channels-last cost more than Winograd saves. Measured with `convnet
/// bench --model resnet20 --batch-size 128 --threads 2 --profile` on AMD Zen 5, forward +
/// backward ms, direct -> Winograd: 16->16 at 32x32 8.4 + 17.9 -> 9.9 + 20.0, 32->32 at
/// 16x16 7.5 + 15.3 -> 5.8 + 13.6, 64->64 at 8x8 6.4 + 15.5 -> 5.7 + 14.6.
const TRAINING_MIN_CHANNELS: usize = 32;

/// True when [`forward_nchw`] computes `conv2d_forward` for `g`: 3x3, stride 1, padding 1,
/// one group, a multiple of 16 input channels (at least 32) and an even image size, with
/// AVX-512F.
pub fn nchw_applies(g: &super::conv::ConvGeom) -> bool {
    g.groups == 1
        && g.c >= TRAINING_MIN_CHANNELS
        && (g.oh, g.ow) == (g.h, g.w)
        && PackedWinograd::applies(
            g.c,
            (g.kh, g.kw),
            g.stride,
            g.padding,
            g.dilation,
            (g.oh, g.ow),
        )
}

/// `y = conv2d(x, w) + bias` for an NCHW batch where [`nchw_applies`] holds: the training
/// step's stride-1 3x3 convolutions (and, through the flipped kernel, their input
/// gradients). Each image is copied into a zero-bordered channels-last plane, convolved by
/// [`conv_rows`] and copied back; the copies cost a fraction of the multiplications saved.
pub fn forward_nchw(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &super::conv::ConvGeom,
    y: &mut [f32],
) {
    use super::matmul::{transpose, transpose_strided};
    use rayon::prelude::*;
    assert!(nchw_applies(g), "winograd::forward_nchw called for {g:?}");
    let (hw, kp) = (g.h * g.w, g.k.div_ceil(LANES) * LANES);
    assert!(x.len() == g.n * g.c * hw && y.len() == g.n * g.k * hw && w.len() == g.k * g.c * 9);
    let packed = PackedWinograd::new(w, g.k, g.c);
    let mut padded_bias = vec![0f32; kp];
    if let Some(b) = bias {
        padded_bias[..g.k].copy_from_slice(b);
    }
    let ip = nhwc::Plane {
        h: g.h,
        w: g.w,
        c: g.c,
        cs: g.c,
        halo: 1,
    };
    let op = nhwc::Plane {
        h: g.h,
        w: g.w,
        c: g.k,
        cs: kp,
        halo: 0,
    };
    let conv = conv_3x3(ip, op);
    let epilogue = Epilogue {
        residual: None,
        act: None,
    };
    y.par_chunks_mut(g.k * hw)
        .zip(x.par_chunks(g.c * hw))
        .for_each_init(
            // The border of the input plane stays zero; only its interior is written.
            || {
                (
                    vec![0f32; hw * g.c],
                    vec![0f32; ip.len()],
                    vec![0f32; op.len()],
                )
            },
            |(pixels, plane, out), (y_img, x_img)| {
                // [C, H*W] -> [H*W, C], then row by row into the bordered plane.
                transpose(x_img, g.c, hw, pixels);
                for (r, row) in pixels.chunks_exact(g.w * g.c).enumerate() {
                    let at = ip.at(r as isize, 0);
                    plane[at..at + row.len()].copy_from_slice(row);
                }
                conv_rows(
                    &conv,
                    &packed,
                    &padded_bias,
                    plane,
                    epilogue,
                    OutRows::whole(out),
                    0..g.h,
                );
                // [H*W, K] (rows kp apart) -> [K, H*W].
                transpose_strided(out, hw, g.k, kp, y_img);
            },
        );
}

thread_local! {
    /// Transformed inputs and products of a pass, reused across calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Tile rows `ty .. ty+count` (output rows `2ty .. 2(ty+count)`): input transform, 16 matrix
/// products, output transform.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pass(
    conv: &DirectConv,
    packed: &PackedWinograd,
    bias: &[f32],
    input: &[f32],
    epilogue: &Epilogue,
    out: &mut OutRows,
    ty: usize,
    count: usize,
    v: &mut [f32],
    m: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (ip, op) = (conv.input, conv.output);
    let (c, blocks) = (ip.c, packed.k.div_ceil(LANES));
    let kp = blocks * LANES;
    let per_row = op.w / 2;
    let tiles = count * per_row;
    let (rs, cs) = (ip.row_stride(), ip.cs);
    let x = input.as_ptr();
    let vp = v.as_mut_ptr();
    // V_xi [tiles, C]: the 16 transformed values of each tile and input channel.
    for t in 0..tiles {
        let (oy, ox) = (2 * (ty + t / per_row), 2 * (t % per_row));
        let base = x.add(ip.at(oy as isize - 1, ox as isize - 1));
        for cb in (0..c).step_by(LANES) {
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for (i, row) in d.iter_mut().enumerate() {
                for (j, e) in row.iter_mut().enumerate() {
                    *e = _mm512_loadu_ps(base.add(i * rs + j * cs + cb));
                }
            }
            let mut r = [[_mm512_setzero_ps(); 4]; 4];
            for j in 0..4 {
                r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
                r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
                r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
                r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
            }
            for (i, row) in r.iter().enumerate() {
                let e = [
                    _mm512_sub_ps(row[0], row[2]),
                    _mm512_add_ps(row[1], row[2]),
                    _mm512_sub_ps(row[2], row[1]),
                    _mm512_sub_ps(row[1], row[3]),
                ];
                for (j, e) in e.iter().enumerate() {
                    _mm512_storeu_ps(vp.add(((i * 4 + j) * tiles + t) * c + cb), *e);
                }
            }
        }
    }
    // M_xi [tiles, K] = V_xi @ U_xi.
    let mp = m.as_mut_ptr();
    for xi in 0..XI {
        nhwc::matmul_tiles(
            vp.add(xi * tiles * c),
            tiles,
            c,
            packed.u.as_ptr().add(xi * blocks * c * LANES),
            blocks,
            mp.add(xi * tiles * kp),
            kp,
        );
    }
    // Y = A^T M A + bias (+ residual), activation.
    let res = epilogue.residual;
    let od = out.data.as_mut_ptr();
    for t in 0..tiles {
        let (oy, ox) = (2 * (ty + t / per_row), 2 * (t % per_row));
        for kb in 0..blocks {
            let mv = |xi: usize| _mm512_loadu_ps(mp.add((xi * tiles + t) * kp + kb * LANES));
            let mut a = [[_mm512_setzero_ps(); 4]; 2];
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mv(j), mv(4 + j), mv(8 + j), mv(12 + j));
                a[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                a[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            let b = _mm512_loadu_ps(bias.as_ptr().add(kb * LANES));
            for (dy, row) in a.iter().enumerate() {
                let y = [
                    _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(row[0], row[1]), row[2]), b),
                    _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(row[1], row[2]), row[3]), b),
                ];
                for (dx, &y) in y.iter().enumerate() {
                    let (py, px) = ((oy + dy) as isize, (ox + dx) as isize);
                    let mut y = y;
                    if let Some((r, rp)) = res {
                        y = _mm512_add_ps(
                            y,
                            _mm512_loadu_ps(r.as_ptr().add(rp.at(py, px) + kb * LANES)),
                        );
                    }
                    let at = od.add(op.at(py, px) + kb * LANES - out.offset);
                    nhwc::store_activated(y, epilogue.act, at);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn pass(
    _: &DirectConv,
    _: &PackedWinograd,
    _: &[f32],
    _: &[f32],
    _: &Epilogue,
    _: &mut OutRows,
    _: usize,
    _: usize,
    _: &mut [f32],
    _: &mut [f32],
) {
    unreachable!("`applies` holds only with AVX-512")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::activation::Activation;
    use crate::backend::cpu::nhwc::{conv_reference, PackedConv};
    use crate::Rng;

    /// Where an image of `h x w x c` with a halo lives: `cs` rounded up to 16.
    fn plane(h: usize, w: usize, c: usize, halo: usize) -> Plane {
        Plane {
            h,
            w,
            c,
            cs: c.div_ceil(LANES) * LANES,
            halo,
        }
    }

    /// Against the naive reference and the direct kernel: ResNet and seed-cnn shapes, output
    /// channels that are not whole blocks or need several block groups, residual and
    /// activations, and calls on row ranges.
    #[test]
    fn winograd_matches_the_reference() {
        if !nhwc::use_avx512() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(11);
        for (h, w, c, k, residual, act) in [
            (16, 16, 32, 64, false, Some(Activation::Relu)),
            (32, 32, 16, 16, true, Some(Activation::Relu)),
            (8, 8, 64, 64, true, None),
            (6, 10, 16, 24, false, Some(Activation::LeakyRelu(0.1))),
            (4, 2, 32, 80, true, Some(Activation::Relu6)),
            (2, 34, 48, 8, false, None),
        ] {
            let (ip, op) = (plane(h, w, c, 1), plane(h, w, k, 0));
            let conv = conv_3x3(ip, op);
            let mut r = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
            let x = r(c * h * w);
            let wt = r(k * c * 9);
            let b = r(k);
            let res = r(k * h * w);
            let mut xin = vec![0f32; ip.len()];
            nhwc::from_nchw(&x, (&mut xin, ip));
            let mut rin = vec![0f32; op.len()];
            nhwc::from_nchw(&res, (&mut rin, op));
            let epilogue = Epilogue {
                residual: residual.then_some((&rin[..], op)),
                act,
            };
            let direct = PackedConv::new(&wt, Some(&b), k, c, (3, 3));
            let wino = PackedWinograd::new(&wt, k, c);
            let mut want = vec![0f32; op.len()];
            nhwc::conv_rows(
                &conv,
                &direct,
                &xin,
                epilogue,
                OutRows::whole(&mut want),
                0..h,
            );
            let reference = conv_reference(
                &x,
                (c, h, w),
                &wt,
                Some(&b),
                (k, 3, 3),
                crate::tensor::Conv2dParams {
                    stride: (1, 1),
                    padding: (1, 1),
                    dilation: (1, 1),
                    groups: 1,
                },
                residual.then_some(&res[..]),
                act,
            );
            let mut got = vec![f32::NAN; op.len()];
            // Two calls, as the plan splits an image's rows over two threads.
            let mid = (h / 2) & !1;
            let (top, bottom) = OutRows::split(&mut got, op, mid);
            conv_rows(&conv, &wino, &direct.bias, &xin, epilogue, top, 0..mid);
            conv_rows(&conv, &wino, &direct.bias, &xin, epilogue, bottom, mid..h);
            // Through the direct convolution's entry point: whole tiles take this kernel,
            // row ranges that split a tile take the direct kernel.
            let with = PackedConv::new(&wt, Some(&b), k, c, (3, 3)).with_winograd(&wt);
            let mut split = vec![f32::NAN; op.len()];
            let (top, bottom) = OutRows::split(&mut split, op, 1);
            nhwc::conv_rows(&conv, &with, &xin, epilogue, top, 0..1);
            nhwc::conv_rows(&conv, &with, &xin, epilogue, bottom, 1..h);
            let mut whole = vec![f32::NAN; op.len()];
            nhwc::conv_rows(
                &conv,
                &with,
                &xin,
                epilogue,
                OutRows::whole(&mut whole),
                0..h,
            );
            for ch in 0..k {
                for y in 0..h {
                    for xx in 0..w {
                        let at = op.at(y as isize, xx as isize) + ch;
                        assert_eq!(
                            split[at].to_bits(),
                            want[at].to_bits(),
                            "split rows: direct"
                        );
                        assert_eq!(whole[at].to_bits(), got[at].to_bits(), "whole: Winograd");
                    }
                }
            }
            let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
            for ch in 0..k {
                for y in 0..h {
                    for xx in 0..w {
                        let at = op.at(y as isize, xx as isize) + ch;
                        let (g, e) = (got[at], want[at]);
                        assert!(
                            (g - e).abs() <= 2e-6 * (e.abs() + rms),
                            "{h}x{w} {c}->{k} ch {ch} ({y}, {xx}): {g} vs direct {e}"
                        );
                        let e = reference[(ch * h + y) * w + xx];
                        assert!(
                            (g - e).abs() <= 2e-6 * (e.abs() + rms),
                            "{h}x{w} {c}->{k} ch {ch} ({y}, {xx}): {g} vs reference {e}"
                        );
                    }
                }
            }
        }
    }

    /// The training step's NCHW form against the naive reference: forward, and the input
    /// gradient through the flipped kernel (which takes it as well); geometries it does not
    /// take (16 input channels, odd sizes) are left to the direct kernel.
    #[test]
    fn nchw_forward_and_input_gradient_match_the_naive_reference() {
        use crate::backend::cpu::conv::{
            conv2d_backward_input_with, conv2d_forward_with, conv2d_naive, ConvGeom,
        };
        if !nhwc::use_avx512() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(12);
        for (n, c, h, w, k, takes) in [
            (2, 32, 16, 16, 32, true),
            (3, 64, 8, 8, 64, true),
            (2, 32, 4, 6, 48, true),
            (1, 48, 2, 2, 32, true),
            (2, 16, 8, 8, 32, false),
            (2, 32, 5, 8, 32, false),
        ] {
            let g = ConvGeom {
                n,
                c,
                h,
                w,
                k,
                kh: 3,
                kw: 3,
                oh: h,
                ow: w,
                stride: (1, 1),
                padding: (1, 1),
                dilation: (1, 1),
                groups: 1,
            };
            assert_eq!(nchw_applies(&g), takes, "{g:?}");
            let mut r = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
            let (x, wt, b, dy) = (r(n * c * h * w), r(k * c * 9), r(k), r(n * k * h * w));
            let (y_ref, dx_ref, _) = conv2d_naive(&x, &wt, Some(&b), &dy, &g);
            let check = |got: &[f32], want: &[f32], what: &str| {
                let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
                for (i, (a, e)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - e).abs() <= 5e-6 * (e.abs() + rms),
                        "{g:?} {what}[{i}]: {a} vs {e}"
                    );
                }
            };
            let mut y = vec![f32::NAN; y_ref.len()];
            conv2d_forward_with(&x, &wt, Some(&b), &g, &mut y, true);
            check(&y, &y_ref, "y");
            let mut dx = vec![f32::NAN; dx_ref.len()];
            conv2d_backward_input_with(&dy, &wt, &g, &mut dx, true);
            check(&dx, &dx_ref, "dx");
        }
    }
}
