//! Winograd's F(2x2, 3x3) on NCHW planes whose width is a multiple of 32, with the 16
//! neighbouring 2x2 tiles of a tile row in the 16 lanes of a vector: the forward pass (and,
//! through the flipped kernel, the input gradient) and the weight gradient of 3x3,
//! stride-1, padding-1 convolutions, without the channels-last copies of
//! [`super::winograd::forward_nchw`]. Suits layers with few channels (a ResNet's 16-channel
//! stage at 32x32), where those copies cost more than Winograd saves; the transforms and
//! the notation are those of [`super::winograd`].
//!
//! A tile vector is 16 tiles of tile row `ty`, columns `x0 .. x0+32`: each of the 16 values
//! `d[i][j]` of their 4x4 input windows is one vector, gathered from two 16-pixel loads of
//! input row `2ty - 1 + i` (even or odd columns, shifted by one lane for `j = 0` and `j = 3`,
//! the pixel past either end from the neighbouring block or the zero border). The products
//! `M_xi [K, tiles] = U_xi [K, C] @ V_xi [C, tiles]` broadcast `U`'s values and run over
//! 16 tiles per vector; the output transform interleaves the even and odd columns back.
//! The weight gradient sums `M_xi V_xi^T` lane by lane and adds the lanes once at the end.

use super::conv::ConvGeom;
use super::winograd::{kernel_gradient, transform_kernel, transform_tile};
use rayon::prelude::*;
use std::arch::x86_64::*;

const LANES: usize = 16;
/// Taps of the 4x4 transformed tile.
const XI: usize = 16;
/// Tile vectors per pass of the forward pass: the transformed inputs and products of a pass
/// (`16 x (C + K) x PASS` vectors) stay in the core's L1 and L2 caches.
const PASS: usize = 4;
/// Output channels per register tile of the products (times [`PASS`] tile vectors).
const KR: usize = 4;

/// Floats from one tap's block of `channels x vectors` vectors to the next (see
/// [`super::winograd::tap_stride`]).
fn tap_stride(channels: usize, vectors: usize) -> usize {
    super::winograd::tap_stride(channels * vectors * LANES)
}

/// True when these kernels compute `g`: 3x3, stride 1, padding 1, one group, the width a
/// multiple of 32 and the height even, on a CPU with AVX-512F.
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == (1, 1)
        && g.padding == (1, 1)
        && g.dilation == (1, 1)
        && g.groups == 1
        && (g.oh, g.ow) == (g.h, g.w)
        && g.w.is_multiple_of(32)
        && g.h.is_multiple_of(2)
        && super::nhwc::use_avx512()
}

/// Tile vectors of an image of `g`, and the tile row and first column of tile vector `tv`.
fn tile_vectors(g: &ConvGeom) -> (usize, impl Fn(usize) -> (usize, usize)) {
    let per_row = g.w / 32;
    (g.h / 2 * per_row, move |tv| {
        (tv / per_row, 32 * (tv % per_row))
    })
}

/// `y = conv2d(x, w) + bias` for an NCHW batch where [`applies`] holds (images in parallel).
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]) {
    assert!(applies(g), "winograd_lanes::forward called for {g:?}");
    let (c, k, hw) = (g.c, g.k, g.h * g.w);
    assert!(x.len() == g.n * c * hw && y.len() == g.n * k * hw && w.len() == k * c * 9);
    // U_xi [C, K].
    let mut u = vec![0f32; XI * c * k];
    for (kc, taps) in transform_kernel(w, k, c).iter().enumerate() {
        for (xi, v) in taps.iter().enumerate() {
            u[(xi * c + kc % c) * k + kc / c] = *v;
        }
    }
    let zeros = vec![0f32; k];
    let bias = bias.unwrap_or(&zeros);
    let (tvs, _) = tile_vectors(g);
    y.par_chunks_mut(k * hw)
        .zip(x.par_chunks(c * hw))
        .for_each_init(
            || {
                (
                    vec![0f32; XI * tap_stride(c, PASS)],
                    vec![0f32; XI * tap_stride(k, PASS)],
                )
            },
            |(v, m), (y_img, x_img)| {
                for t0 in (0..tvs).step_by(PASS) {
                    let count = PASS.min(tvs - t0);
                    // SAFETY: `applies` checked AVX-512F and the geometry; the buffers hold
                    // what the three functions read and write for `count <= PASS` tile vectors.
                    unsafe {
                        transform_input(x_img, g, t0, count, PASS, v);
                        products(&u, v, m, c, k, count);
                        transform_output(m, bias, g, t0, count, y_img);
                    }
                }
            },
        );
}

/// `dw = conv2d_weight_grad(x, dy)` summed over an NCHW batch where [`applies`] holds:
/// `dU_xi [K, C] = sum over tiles of M_xi V_xi^T` with `M = A dY A^T`, lane by lane; threads
/// take contiguous runs of images; the lanes and the threads' sums are added in float64 and
/// `dg = G^T dU G` formed once.
pub fn backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    assert!(
        applies(g),
        "winograd_lanes::backward_weight called for {g:?}"
    );
    let (c, k, hw) = (g.c, g.k, g.h * g.w);
    assert!(x.len() == g.n * c * hw && dy.len() == g.n * k * hw && dw.len() == k * c * 9);
    let (tvs, _) = tile_vectors(g);
    let chunk = g.n.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f64>> = (0..g.n.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let mut du = vec![0f32; XI * k * c * LANES];
            let mut v = vec![0f32; XI * tap_stride(c, tvs)];
            let mut m = vec![0f32; XI * tap_stride(k, tvs)];
            for n in part * chunk..((part + 1) * chunk).min(g.n) {
                // SAFETY: as in `forward`, with passes of all `tvs` tile vectors.
                unsafe {
                    transform_input(&x[n * c * hw..(n + 1) * c * hw], g, 0, tvs, tvs, &mut v);
                    transform_output_grad(&dy[n * k * hw..(n + 1) * k * hw], g, tvs, &mut m);
                    accumulate(&v, &m, c, k, tvs, &mut du);
                }
            }
            du.chunks_exact(LANES)
                .map(|l| l.iter().map(|&v| v as f64).sum())
                .collect()
        })
        .collect();
    let mut it = partials.into_iter();
    let mut du = it.next().unwrap_or_else(|| vec![0f64; XI * k * c]);
    for p in it {
        du.iter_mut().zip(&p).for_each(|(d, s)| *d += s);
    }
    kernel_gradient(|xi, kc| du[xi * k * c + kc], dw);
}

/// Indices of `_mm512_permutex2var_ps` over two 16-pixel loads (`0..16` the first, `16..32`
/// the second): columns `2l` (even), `2l + 1` (odd), `2l - 1` (lane 0 replaced) and `2l + 2`
/// (lane 15 replaced).
#[target_feature(enable = "avx512f")]
unsafe fn gather_indices() -> [__m512i; 4] {
    let idx = |f: fn(i32) -> i32| {
        let v: [i32; 16] = std::array::from_fn(|l| f(l as i32).clamp(0, 31));
        _mm512_loadu_si512(v.as_ptr() as *const __m512i)
    };
    [
        idx(|l| 2 * l),
        idx(|l| 2 * l + 1),
        idx(|l| 2 * l - 1),
        idx(|l| 2 * l + 2),
    ]
}

/// The even and odd columns of 32 pixels at `row`, as two vectors.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn even_odd(row: *const f32, idx: &[__m512i; 4]) -> (__m512, __m512) {
    let (lo, hi) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(LANES)));
    (
        _mm512_permutex2var_ps(lo, idx[0], hi),
        _mm512_permutex2var_ps(lo, idx[1], hi),
    )
}

/// `V_xi [C, stride]` vectors (`v[xi * tap_stride(C, stride) + (c * stride + p) * 16 ..]`):
/// `B^T d B` of tile vectors `t0 .. t0+count` of one image `x [C, H, W]`.
///
/// # Safety
/// [`applies`] holds for `g`, `x` is one image and `v` holds `16 * tap_stride(C, stride)` floats
/// with `count <= stride`.
#[target_feature(enable = "avx512f")]
unsafe fn transform_input(
    x: &[f32],
    g: &ConvGeom,
    t0: usize,
    count: usize,
    stride: usize,
    v: &mut [f32],
) {
    debug_assert!(x.len() == g.c * g.h * g.w && v.len() >= XI * tap_stride(g.c, stride));
    let (h, w, c) = (g.h, g.w, g.c);
    let (_, at) = tile_vectors(g);
    let idx = gather_indices();
    let vp = v.as_mut_ptr();
    for p in 0..count {
        let (ty, x0) = at(t0 + p);
        for ch in 0..c {
            let plane = x.as_ptr().add(ch * h * w);
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for (i, di) in d.iter_mut().enumerate() {
                let r = (2 * ty + i) as isize - 1;
                if r < 0 || r >= h as isize {
                    continue;
                }
                let row = plane.add(r as usize * w + x0);
                let (lo, hi) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(LANES)));
                let before = if x0 > 0 { *row.sub(1) } else { 0.0 };
                let after = if x0 + 32 < w { *row.add(32) } else { 0.0 };
                di[0] = _mm512_mask_mov_ps(
                    _mm512_permutex2var_ps(lo, idx[2], hi),
                    1,
                    _mm512_set1_ps(before),
                );
                di[1] = _mm512_permutex2var_ps(lo, idx[0], hi);
                di[2] = _mm512_permutex2var_ps(lo, idx[1], hi);
                di[3] = _mm512_mask_mov_ps(
                    _mm512_permutex2var_ps(lo, idx[3], hi),
                    1 << 15,
                    _mm512_set1_ps(after),
                );
            }
            for (i, row) in transform_tile(&d).iter().enumerate() {
                for (j, e) in row.iter().enumerate() {
                    _mm512_storeu_ps(
                        vp.add((i * 4 + j) * tap_stride(c, stride) + (ch * stride + p) * LANES),
                        *e,
                    );
                }
            }
        }
    }
}

/// `M_xi [K, PASS] = U_xi^T V_xi` for the 16 taps, `count` tile vectors.
///
/// # Safety
/// `u` holds `16 * C * K` floats, `v` and `m` the passes of [`transform_input`] and
/// [`transform_output`] (stride [`PASS`]), `count <= PASS`; AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn products(u: &[f32], v: &[f32], m: &mut [f32], c: usize, k: usize, count: usize) {
    debug_assert!(u.len() >= XI * c * k && v.len() >= XI * tap_stride(c, PASS));
    debug_assert!(m.len() >= XI * tap_stride(k, PASS) && count <= PASS);
    for xi in 0..XI {
        let (ux, vx) = (
            u.as_ptr().add(xi * c * k),
            v.as_ptr().add(xi * tap_stride(c, PASS)),
        );
        let mx = m.as_mut_ptr().add(xi * tap_stride(k, PASS));
        let mut k0 = 0;
        while k0 < k {
            match (k - k0 >= KR, count == PASS) {
                (true, true) => product_tile::<KR, PASS>(ux, vx, mx, c, k, k0, 0),
                (false, true) => product_tile::<1, PASS>(ux, vx, mx, c, k, k0, 0),
                (true, false) => {
                    for p in 0..count {
                        product_tile::<KR, 1>(ux, vx, mx, c, k, k0, p);
                    }
                }
                (false, false) => {
                    for p in 0..count {
                        product_tile::<1, 1>(ux, vx, mx, c, k, k0, p);
                    }
                }
            }
            k0 += if k - k0 >= KR { KR } else { 1 };
        }
    }
}

/// `m[k0 .. k0+R][p0 .. p0+P] = sum over c of u[c][k] v[c][p]` (vectors of 16 tiles).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn product_tile<const R: usize, const P: usize>(
    u: *const f32,
    v: *const f32,
    m: *mut f32,
    c: usize,
    k: usize,
    k0: usize,
    p0: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for ch in 0..c {
        let vv: [__m512; P] =
            std::array::from_fn(|j| _mm512_loadu_ps(v.add((ch * PASS + p0 + j) * LANES)));
        for (r, row) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*u.add(ch * k + k0 + r));
            for (a, vj) in row.iter_mut().zip(&vv) {
                *a = _mm512_fmadd_ps(b, *vj, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, a) in row.iter().enumerate() {
            _mm512_storeu_ps(m.add(((k0 + r) * PASS + p0 + j) * LANES), *a);
        }
    }
}

/// `y = A^T M A + bias` of tile vectors `t0 .. t0+count` into one image `y [K, H, W]`, the
/// even and odd columns interleaved back.
///
/// # Safety
/// As [`products`]; `y` is one image of `g`'s output.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn transform_output(
    m: &[f32],
    bias: &[f32],
    g: &ConvGeom,
    t0: usize,
    count: usize,
    y: &mut [f32],
) {
    debug_assert!(y.len() == g.k * g.h * g.w && bias.len() >= g.k);
    let (h, w, k) = (g.h, g.w, g.k);
    let (_, at) = tile_vectors(g);
    let lo_idx: [i32; 16] = std::array::from_fn(|l| (l / 2 + 16 * (l % 2)) as i32);
    let hi_idx: [i32; 16] = std::array::from_fn(|l| (8 + l / 2 + 16 * (l % 2)) as i32);
    let (lo_idx, hi_idx) = (
        _mm512_loadu_si512(lo_idx.as_ptr() as *const __m512i),
        _mm512_loadu_si512(hi_idx.as_ptr() as *const __m512i),
    );
    let (mp, yp) = (m.as_ptr(), y.as_mut_ptr());
    for p in 0..count {
        let (ty, x0) = at(t0 + p);
        for (ko, &bias) in bias[..k].iter().enumerate() {
            let mv = |xi: usize| {
                _mm512_loadu_ps(mp.add(xi * tap_stride(k, PASS) + (ko * PASS + p) * LANES))
            };
            let b = _mm512_set1_ps(bias);
            let mut a = [[_mm512_setzero_ps(); 4]; 2];
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mv(j), mv(4 + j), mv(8 + j), mv(12 + j));
                a[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                a[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            for (dy, row) in a.iter().enumerate() {
                let even = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(row[0], row[1]), row[2]), b);
                let odd = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(row[1], row[2]), row[3]), b);
                let out = yp.add((ko * h + 2 * ty + dy) * w + x0);
                _mm512_storeu_ps(out, _mm512_permutex2var_ps(even, lo_idx, odd));
                _mm512_storeu_ps(out.add(LANES), _mm512_permutex2var_ps(even, hi_idx, odd));
            }
        }
    }
}

/// `M_xi [K, tiles]` vectors (`m[xi * tap_stride(K, tvs) + (k * tvs + t) * 16 ..]`): `A dY A^T` of every
/// tile vector of one image's gradient `dy [K, H, W]`.
///
/// # Safety
/// [`applies`] holds for `g`, `dy` is one image and `m` holds `16 * tap_stride(K, tvs)` floats.
#[target_feature(enable = "avx512f")]
unsafe fn transform_output_grad(dy: &[f32], g: &ConvGeom, tvs: usize, m: &mut [f32]) {
    debug_assert!(dy.len() == g.k * g.h * g.w && m.len() >= XI * tap_stride(g.k, tvs));
    let (h, w, k) = (g.h, g.w, g.k);
    let (_, at) = tile_vectors(g);
    let idx = gather_indices();
    let mp = m.as_mut_ptr();
    // `A` applied to two values: [a, a + b, a - b, -b].
    let a_times = |a: __m512, b: __m512| {
        [
            a,
            _mm512_add_ps(a, b),
            _mm512_sub_ps(a, b),
            _mm512_sub_ps(_mm512_setzero_ps(), b),
        ]
    };
    for t in 0..tvs {
        let (ty, x0) = at(t);
        for ko in 0..k {
            let row = dy.as_ptr().add((ko * h + 2 * ty) * w + x0);
            let (y00, y01) = even_odd(row, &idx);
            let (y10, y11) = even_odd(row.add(w), &idx);
            let left = a_times(y00, y10);
            let right = a_times(y01, y11);
            for i in 0..4 {
                for (j, e) in a_times(left[i], right[i]).iter().enumerate() {
                    _mm512_storeu_ps(
                        mp.add((i * 4 + j) * tap_stride(k, tvs) + (ko * tvs + t) * LANES),
                        *e,
                    );
                }
            }
        }
    }
}

/// `du[xi][k][c]` (16 lanes each) `+= M_xi[k][t] * V_xi[c][t]` over the `tvs` tile vectors,
/// in register tiles of 4 output by 4 input channels.
///
/// # Safety
/// `v` and `m` hold the whole-image passes of [`transform_input`] (stride `tvs`) and
/// [`transform_output_grad`], `du` `16 * K * C * 16` floats; AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn accumulate(v: &[f32], m: &[f32], c: usize, k: usize, tvs: usize, du: &mut [f32]) {
    debug_assert!(v.len() >= XI * tap_stride(c, tvs) && m.len() >= XI * tap_stride(k, tvs));
    debug_assert!(du.len() >= XI * k * c * LANES);
    for xi in 0..XI {
        let vx = v.as_ptr().add(xi * tap_stride(c, tvs));
        let mx = m.as_ptr().add(xi * tap_stride(k, tvs));
        let dx = du.as_mut_ptr().add(xi * k * c * LANES);
        let mut k0 = 0;
        while k0 < k {
            let kr = if k - k0 >= 4 { 4 } else { 1 };
            let mut c0 = 0;
            while c0 < c {
                match (kr, c - c0 >= 4) {
                    (4, true) => gradient_tile::<4, 4>(vx, mx, dx, c, tvs, k0, c0),
                    (4, false) => gradient_tile::<4, 1>(vx, mx, dx, c, tvs, k0, c0),
                    (_, true) => gradient_tile::<1, 4>(vx, mx, dx, c, tvs, k0, c0),
                    _ => gradient_tile::<1, 1>(vx, mx, dx, c, tvs, k0, c0),
                }
                c0 += if c - c0 >= 4 { 4 } else { 1 };
            }
            k0 += kr;
        }
    }
}

/// `du[k0 .. k0+R][c0 .. c0+Q] += sum over t of m[k][t] * v[c][t]`, lane by lane.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gradient_tile<const R: usize, const Q: usize>(
    v: *const f32,
    m: *const f32,
    du: *mut f32,
    c: usize,
    tvs: usize,
    k0: usize,
    c0: usize,
) {
    let at = |r: usize, q: usize| du.add(((k0 + r) * c + c0 + q) * LANES);
    let mut acc = [[_mm512_setzero_ps(); Q]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (q, a) in row.iter_mut().enumerate() {
            *a = _mm512_loadu_ps(at(r, q));
        }
    }
    for t in 0..tvs {
        let vv: [__m512; Q] =
            std::array::from_fn(|q| _mm512_loadu_ps(v.add(((c0 + q) * tvs + t) * LANES)));
        for (r, row) in acc.iter_mut().enumerate() {
            let mk = _mm512_loadu_ps(m.add(((k0 + r) * tvs + t) * LANES));
            for (a, vq) in row.iter_mut().zip(&vv) {
                *a = _mm512_fmadd_ps(mk, *vq, *a);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, a) in row.iter().enumerate() {
            _mm512_storeu_ps(at(r, q), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::conv::{assert_within_scale, conv2d_naive, random_operands, same_3x3};
    use crate::Rng;

    /// Forward, input gradient (through the flipped kernel) and weight gradient against the
    /// naive reference: one and two 32-wide blocks per row (the pixel past a block's end
    /// from its neighbour), channel counts that are not multiples of 4, a single tile row
    /// and a batch smaller than the thread count.
    #[test]
    fn lanes_match_the_naive_reference() {
        if !super::super::nhwc::use_avx512() {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(31);
        for (n, c, h, w, k) in [
            (3, 16, 32, 32, 16),
            (2, 5, 6, 64, 7),
            (1, 3, 2, 32, 16),
            (4, 16, 8, 96, 12),
        ] {
            let g = same_3x3(n, c, h, w, k);
            assert!(applies(&g), "{g:?}");
            let (x, wt, b, dy) = random_operands(&g, &mut rng);
            let (y_ref, dx_ref, dw_ref) = conv2d_naive(&x, &wt, Some(&b), &dy, &g);
            let check = |got: &[f32], want: &[f32], what: &str| {
                assert_within_scale(got, want, 5e-6, &format!("{g:?} {what}"))
            };
            let mut y = vec![f32::NAN; y_ref.len()];
            forward(&x, &wt, Some(&b), &g, &mut y);
            check(&y, &y_ref, "y");
            let tg = g.flipped_input_grad().expect("stride 1");
            let flipped = crate::backend::cpu::conv::flip_transpose(&wt, &g);
            let mut dx = vec![f32::NAN; dx_ref.len()];
            forward(&dy, &flipped, None, &tg, &mut dx);
            check(&dx, &dx_ref, "dx");
            let mut dw = vec![f32::NAN; dw_ref.len()];
            backward_weight(&x, &dy, &g, &mut dw);
            check(&dw, &dw_ref, "dw");
        }
    }
}
