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

/// Floats from one tap's block of `block` floats to the next in the transformed tiles: one
/// vector more than the block, so that the 16 taps of a tile, written or read together, do
/// not lie a multiple of 4 KiB apart (in the same L1 set), as blocks of whole vectors of 16
/// or 64 channels often would.
pub(super) fn tap_stride(block: usize) -> usize {
    block + LANES
}

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
        let by_pair = transform_kernel(weight, k, c);
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

/// `U = G g G^T` of each of the `K x C` 3x3 kernels of PyTorch-layout weights
/// `[K, C, 3, 3]`, in float64 (as `G g` then `(G g) G^T`), rounded once; output channels in
/// parallel.
pub(super) fn transform_kernel(weight: &[f32], k: usize, c: usize) -> Vec<[f32; XI]> {
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
        .par_chunks_mut(c.max(1))
        .zip(weight.par_chunks(c.max(1) * 9))
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
    by_pair
}

/// The weight gradient `dg = G^T dU G` of each kernel, from the gradient reaching the
/// transformed kernels, `du(xi, kc)` for tap `xi = 4i + j` and kernel `kc = k * C + c`, into
/// `dw [K, C, 3, 3]` (float64, rounded once).
pub(super) fn kernel_gradient(du: impl Fn(usize, usize) -> f64, dw: &mut [f32]) {
    // `G^T` applied to four values: [x0 + (x1+x2)/2, (x1-x2)/2, (x1+x2)/2 + x3].
    let gt = |x: [f64; 4]| {
        [
            x[0] + 0.5 * (x[1] + x[2]),
            0.5 * (x[1] - x[2]),
            0.5 * (x[1] + x[2]) + x[3],
        ]
    };
    for (kc, out) in dw.chunks_exact_mut(9).enumerate() {
        let at = |i: usize, j: usize| du(i * 4 + j, kc);
        // Columns of `G^T dU`, then `G^T` applied to each of its rows.
        let cols: [[f64; 3]; 4] =
            std::array::from_fn(|j| gt([at(0, j), at(1, j), at(2, j), at(3, j)]));
        for a in 0..3 {
            let row = gt([cols[0][a], cols[1][a], cols[2][a], cols[3][a]]);
            for (b, v) in row.iter().enumerate() {
                out[a * 3 + b] = *v as f32;
            }
        }
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
            XI * tap_stride(tile_rows * per_row * ip.c),
            XI * tap_stride(tile_rows * per_row * blocks * LANES),
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

/// Input channels from which [`nchw_applies`] holds (the rule of
/// [`super::tuning::KernelChoice::Rules`]): with 16, the copies to and from channels-last
/// cost more than Winograd saves on full-width AVX-512. Measured with `convnet bench --model
/// resnet20 --batch-size 128 --threads 2 --profile` on AMD Zen 5, forward + backward ms,
/// direct -> Winograd: 16->16 at 32x32 8.4 + 17.9 -> 9.9 + 20.0, 32->32 at 16x16 7.5 + 15.3
/// -> 5.8 + 13.6, 64->64 at 8x8 6.4 + 15.5 -> 5.7 + 14.6.
const RULE_MIN_CHANNELS: usize = 32;

/// True when [`forward_nchw`] computes `conv2d_forward` for `g`: 3x3, stride 1, padding 1,
/// one group, a multiple of 16 input channels and an even image size, with AVX-512F.
pub fn nchw_possible(g: &super::conv::ConvGeom) -> bool {
    g.groups == 1
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

/// True when [`nchw_possible`] holds and the shape rule takes Winograd: at least 32 input
/// channels.
pub fn nchw_applies(g: &super::conv::ConvGeom) -> bool {
    g.c >= RULE_MIN_CHANNELS && nchw_possible(g)
}

/// `y = conv2d(x, w) + bias` for an NCHW batch where [`nchw_possible`] holds: the training
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
    assert!(nchw_possible(g), "winograd::forward_nchw called for {g:?}");
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

/// True when [`backward_weight_nchw`] computes `conv2d_backward_weight` for `g`: where
/// [`nchw_possible`] holds, with a multiple of 16 output channels.
pub fn nchw_weight_grad_possible(g: &super::conv::ConvGeom) -> bool {
    g.k.is_multiple_of(LANES) && nchw_possible(g)
}

/// `dw = conv2d_weight_grad(x, dy)` summed over an NCHW batch, by F(2x2, 3x3), where
/// [`nchw_weight_grad_possible`] holds.
///
/// With `Y = A^T [U * V] A` per tile and `U = G g G^T`, the gradient reaching `U` is
/// `dU = sum over tiles of V * (A dY A^T)`, and `dg = G^T dU G`. Each image is copied
/// channels-last (input bordered, as in [`forward_nchw`]); its tiles' `V_xi [tiles, C]`
/// and `dY`'s transformed `M_xi [tiles, K]` are formed once, and each of the 16
/// `dU_xi [K, C] += M_xi^T V_xi` runs through register tiles of 16 accumulators. Threads
/// take contiguous runs of images and add their partial `dU`s; `G^T dU G` is formed once,
/// in float64. 16 multiplications per 2x2 outputs and channel pair instead of 36.
pub fn backward_weight_nchw(x: &[f32], dy: &[f32], g: &super::conv::ConvGeom, dw: &mut [f32]) {
    use super::matmul::transpose;
    use rayon::prelude::*;
    assert!(
        nchw_weight_grad_possible(g),
        "winograd::backward_weight_nchw called for {g:?}"
    );
    let (hw, c, k) = (g.h * g.w, g.c, g.k);
    assert!(x.len() == g.n * c * hw && dy.len() == g.n * k * hw && dw.len() == k * c * 9);
    let ip = nhwc::Plane {
        h: g.h,
        w: g.w,
        c,
        cs: c,
        halo: 1,
    };
    let (per_row, tiles) = (g.w / 2, hw / 4);
    let chunk = g.n.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let mut du = vec![0f32; XI * k * c];
            let mut pixels = vec![0f32; hw * c.max(k)];
            // The border of the input plane stays zero; only its interior is written.
            let mut plane = vec![0f32; ip.len()];
            let mut v = vec![0f32; XI * tap_stride(tiles * c)];
            let mut m = vec![0f32; XI * tap_stride(tiles * k)];
            for n in part * chunk..((part + 1) * chunk).min(g.n) {
                transpose(
                    &x[n * c * hw..(n + 1) * c * hw],
                    c,
                    hw,
                    &mut pixels[..hw * c],
                );
                for (r, row) in pixels[..hw * c].chunks_exact(g.w * c).enumerate() {
                    let at = ip.at(r as isize, 0);
                    plane[at..at + row.len()].copy_from_slice(row);
                }
                transpose(
                    &dy[n * k * hw..(n + 1) * k * hw],
                    k,
                    hw,
                    &mut pixels[..hw * k],
                );
                // SAFETY: the plane is bordered by one zero pixel, so every tile's 4x4
                // window lies inside it; the buffers hold the sizes `transform_input`,
                // `transform_output_grad` and `accumulate_du` read and write; AVX-512F was
                // checked by `nchw_possible`.
                unsafe {
                    transform_input(ip, plane.as_ptr(), 0, g.h / 2, per_row, v.as_mut_ptr());
                    transform_output_grad(&pixels[..hw * k], g.w, k, per_row, tiles, &mut m);
                    accumulate_du(&v, &m, tiles, c, k, &mut du);
                }
            }
            du
        })
        .collect();
    let mut it = partials.into_iter();
    let mut du = it.next().unwrap_or_else(|| vec![0f32; XI * k * c]);
    for p in it {
        du.iter_mut().zip(&p).for_each(|(d, s)| *d += s);
    }
    // dg = G^T dU G, from `dU_xi [K, C]`.
    kernel_gradient(|xi, kc| du[xi * k * c + kc] as f64, dw);
}

/// `M_xi [tiles, K]` (`m[xi * tap_stride(tiles * K) + t * K + k]`): `A dY A^T` of each tile's 2x2 outputs
/// of the channels-last gradient `dy [H*W, K]` (rows `w` pixels wide).
///
/// # Safety
/// `dy` holds `4 * tiles * K` floats and `m` `16 * tiles * K`, `K` is a multiple of 16, and
/// the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_output_grad(
    dy: &[f32],
    w: usize,
    k: usize,
    per_row: usize,
    tiles: usize,
    m: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(dy.len() >= 4 * tiles * k && m.len() >= XI * tap_stride(tiles * k));
    let (d, mp) = (dy.as_ptr(), m.as_mut_ptr());
    // `A` applied to two values: [a, a + b, a - b, -b].
    let a_times = |a: __m512, b: __m512| {
        [
            a,
            _mm512_add_ps(a, b),
            _mm512_sub_ps(a, b),
            _mm512_sub_ps(_mm512_setzero_ps(), b),
        ]
    };
    for t in 0..tiles {
        let (oy, ox) = (2 * (t / per_row), 2 * (t % per_row));
        for kb in (0..k).step_by(LANES) {
            let y =
                |r: usize, col: usize| _mm512_loadu_ps(d.add(((oy + r) * w + ox + col) * k + kb));
            let left = a_times(y(0, 0), y(1, 0));
            let right = a_times(y(0, 1), y(1, 1));
            for i in 0..4 {
                for (j, e) in a_times(left[i], right[i]).iter().enumerate() {
                    _mm512_storeu_ps(mp.add((i * 4 + j) * tap_stride(tiles * k) + t * k + kb), *e);
                }
            }
        }
    }
}

/// `du[xi][K][C] += M_xi^T V_xi` for the 16 taps, over `tiles` tiles, in register tiles of
/// `CV` vectors of 16 input channels by `16 / CV` output channels.
///
/// # Safety
/// `C` and `K` are multiples of 16, the slices hold `16 * tiles * C`, `16 * tiles * K` and
/// `16 * K * C` floats, and the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate_du(v: &[f32], m: &[f32], tiles: usize, c: usize, k: usize, du: &mut [f32]) {
    debug_assert!(v.len() >= XI * tap_stride(tiles * c) && m.len() >= XI * tap_stride(tiles * k));
    debug_assert!(du.len() >= XI * k * c);
    for xi in 0..XI {
        let (vx, mx) = (
            v.as_ptr().add(xi * tap_stride(tiles * c)),
            m.as_ptr().add(xi * tap_stride(tiles * k)),
        );
        let dx = du.as_mut_ptr().add(xi * k * c);
        let mut c0 = 0;
        while c0 < c {
            let left = (c - c0) / LANES;
            let cv = if left >= 4 {
                4
            } else if left >= 2 {
                2
            } else {
                1
            };
            for k0 in (0..k).step_by(16 / cv) {
                match cv {
                    4 => du_tile::<4, 4>(vx, mx, tiles, c, k, dx, c0, k0),
                    2 => du_tile::<2, 8>(vx, mx, tiles, c, k, dx, c0, k0),
                    _ => du_tile::<1, 16>(vx, mx, tiles, c, k, dx, c0, k0),
                }
            }
            c0 += cv * LANES;
        }
    }
}

/// `du[k0..k0+KR][c0..c0+16CV] += sum over t of m[t][k] v[t][c]`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn du_tile<const CV: usize, const KR: usize>(
    v: *const f32,
    m: *const f32,
    tiles: usize,
    c: usize,
    k: usize,
    du: *mut f32,
    c0: usize,
    k0: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); CV]; KR];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, a) in row.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(du.add((k0 + r) * c + c0 + j * LANES));
        }
    }
    for t in 0..tiles {
        let vv: [__m512; CV] =
            std::array::from_fn(|j| _mm512_loadu_ps(v.add(t * c + c0 + j * LANES)));
        for (r, row) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*m.add(t * k + k0 + r));
            for (a, vj) in row.iter_mut().zip(&vv) {
                *a = _mm512_fmadd_ps(b, *vj, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            _mm512_storeu_ps(du.add((k0 + r) * c + c0 + j * LANES), *a);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transform_output_grad(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("`nchw_possible` holds only with AVX-512")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn accumulate_du(_: &[f32], _: &[f32], _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("`nchw_possible` holds only with AVX-512")
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
    let vp = v.as_mut_ptr();
    transform_input(ip, input.as_ptr(), ty, count, per_row, vp);
    // M_xi [tiles, K] = V_xi @ U_xi.
    let mp = m.as_mut_ptr();
    for xi in 0..XI {
        nhwc::matmul_tiles(
            vp.add(xi * tap_stride(tiles * c)),
            tiles,
            c,
            packed.u.as_ptr().add(xi * blocks * c * LANES),
            blocks,
            mp.add(xi * tap_stride(tiles * kp)),
            kp,
        );
    }
    // Y = A^T M A + bias (+ residual), activation.
    let res = epilogue.residual;
    let od = out.data.as_mut_ptr();
    for t in 0..tiles {
        let (oy, ox) = (2 * (ty + t / per_row), 2 * (t % per_row));
        for kb in 0..blocks {
            let mv = |xi: usize| {
                _mm512_loadu_ps(mp.add(xi * tap_stride(tiles * kp) + t * kp + kb * LANES))
            };
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

/// `B^T d B` of one 4x4 input tile, 16 lanes at a time (additions only).
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn transform_tile(
    d: &[[std::arch::x86_64::__m512; 4]; 4],
) -> [[std::arch::x86_64::__m512; 4]; 4] {
    use std::arch::x86_64::*;
    // `B^T` down the columns ([v0 - v2, v1 + v2, v2 - v1, v1 - v3]), then along each row.
    let mut r = [[_mm512_setzero_ps(); 4]; 4];
    for j in 0..4 {
        r[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
        r[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
        r[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
        r[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
    }
    let mut v = [[_mm512_setzero_ps(); 4]; 4];
    for (row, out) in r.iter().zip(v.iter_mut()) {
        *out = [
            _mm512_sub_ps(row[0], row[2]),
            _mm512_add_ps(row[1], row[2]),
            _mm512_sub_ps(row[2], row[1]),
            _mm512_sub_ps(row[1], row[3]),
        ];
    }
    v
}

/// `V_xi [tiles, C]` at `v` (`v[xi * tap_stride(tiles * C) + t * C + c]`, `tiles = count * per_row`): the
/// 16 transformed values `B^T d B` of each input channel of the tiles of tile rows
/// `ty .. ty+count`, read from the bordered channels-last plane `ip` at `x`.
///
/// # Safety
/// The tiles' 4x4 windows (rows `2ty-1 .. 2(ty+count)+1`, columns `-1 ..= 2 per_row`) lie
/// inside the plane's halo, `v` holds `16 * tap_stride(tiles * C)` floats, and the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transform_input(
    ip: nhwc::Plane,
    x: *const f32,
    ty: usize,
    count: usize,
    per_row: usize,
    vp: *mut f32,
) {
    use std::arch::x86_64::*;
    let (c, rs, cs) = (ip.c, ip.row_stride(), ip.cs);
    let tiles = count * per_row;
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
            for (i, row) in transform_tile(&d).iter().enumerate() {
                for (j, e) in row.iter().enumerate() {
                    _mm512_storeu_ps(vp.add((i * 4 + j) * tap_stride(tiles * c) + t * c + cb), *e);
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn transform_input(
    _: nhwc::Plane,
    _: *const f32,
    _: usize,
    _: usize,
    _: usize,
    _: *mut f32,
) {
    unreachable!("`applies` holds only with AVX-512")
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
    /// gradient through the flipped kernel (which takes it as well); geometries the rule
    /// leaves out (16 input channels, odd sizes) go to the direct kernel.
    #[test]
    fn nchw_forward_and_input_gradient_match_the_naive_reference() {
        use crate::backend::cpu::conv::{
            assert_within_scale, conv2d_backward_input_with, conv2d_forward_with, conv2d_naive,
            random_operands, same_3x3,
        };
        use crate::backend::cpu::tuning::KernelChoice;
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
            (8, 16, 32, 32, 16, false),
            (2, 32, 5, 8, 32, false),
        ] {
            let g = same_3x3(n, c, h, w, k);
            assert_eq!(nchw_applies(&g), takes, "{g:?}");
            let (x, wt, b, dy) = random_operands(&g, &mut rng);
            let (y_ref, dx_ref, dw_ref) = conv2d_naive(&x, &wt, Some(&b), &dy, &g);
            let check = |got: &[f32], want: &[f32], what: &str| {
                assert_within_scale(got, want, 5e-6, &format!("{g:?} {what}"))
            };
            let mut y = vec![f32::NAN; y_ref.len()];
            conv2d_forward_with(&x, &wt, Some(&b), &g, &mut y, KernelChoice::Rules);
            check(&y, &y_ref, "y");
            let mut dx = vec![f32::NAN; dx_ref.len()];
            conv2d_backward_input_with(&dy, &wt, &g, &mut dx, KernelChoice::Rules);
            check(&dx, &dx_ref, "dx");
            // Below the rule's 32 channels the kernel still computes the convolution (for
            // measured choices).
            assert_eq!(nchw_possible(&g), takes || c == 16, "{g:?}");
            if nchw_possible(&g) {
                let mut y = vec![f32::NAN; y_ref.len()];
                forward_nchw(&x, &wt, Some(&b), &g, &mut y);
                check(&y, &y_ref, "y (forward_nchw)");
                assert!(nchw_weight_grad_possible(&g), "{g:?}");
                let mut dw = vec![f32::NAN; dw_ref.len()];
                backward_weight_nchw(&x, &dy, &g, &mut dw);
                check(&dw, &dw_ref, "dw");
            }
        }
    }
}
