//! Pooling forward and backward, mirroring `torch.nn.functional.max_pool2d` (with indices),
//! `avg_pool2d` and `adaptive_avg_pool2d`.
//!
//! Legend: P = N*C independent planes of H x W input and OH x OW output. Each plane is
//! processed on its own (rayon over planes). Max pooling saves, per output element, the
//! flat index `ih*W + iw` of the winning input inside its plane (the argmax), so its backward
//! is a scatter; NaN wins, as in PyTorch.
//!
//! Windows may reach past the padded input: with `ceil_mode` PyTorch keeps a last window
//! that starts inside the input (or its left padding) however far it reaches, so every
//! kernel here clips each window to the input, and average pooling's divisor follows
//! PyTorch's rule (the window clipped to the padded input, or to the input itself without
//! `count_include_pad`). A dilated max-pool window can hold no input tap at all: its output
//! is -inf, as in PyTorch, and its argmax is [`NO_TAP`], which backward skips.

use rayon::prelude::*;

/// Window geometry shared by max and average pooling (validated by the caller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    /// Number of planes, N*C.
    pub planes: usize,
    /// Input height H.
    pub h: usize,
    /// Input width W.
    pub w: usize,
    /// Output height OH.
    pub oh: usize,
    /// Output width OW.
    pub ow: usize,
    /// Kernel (height, width).
    pub kernel: (usize, usize),
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Padding (vertical, horizontal).
    pub padding: (usize, usize),
    /// Dilation (vertical, horizontal); max pooling only, 1 for average pooling.
    pub dilation: (usize, usize),
}

impl PoolGeom {
    fn in_plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
}

/// The argmax of a max-pool window with no tap inside the input (output -inf, no gradient).
pub const NO_TAP: u32 = u32::MAX;

/// Input rows (or columns) a max-pool window at output position `o` covers:
/// `(start, end, step)` with `start` the first in-bounds tap.
fn max_window(
    o: usize,
    stride: usize,
    pad: usize,
    kernel: usize,
    dil: usize,
    len: usize,
) -> (usize, usize, usize) {
    let mut start = (o * stride) as isize - pad as isize;
    let end = (start + ((kernel - 1) * dil) as isize + 1).min(len as isize);
    while start < 0 {
        start += dil as isize;
    }
    (start as usize, end.max(start) as usize, dil)
}

/// The mask of the first `n` of 16 lanes (all 16 from `n >= 16` on).
#[cfg(target_arch = "x86_64")]
fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// The 2x2 / stride-2 window of one plane with AVX-512: per row, up to 16 outputs at a time;
/// the two input rows are loaded (masked at the row's end), split into even and odd columns
/// with a two-source permute, and reduced with PyTorch's rule (a larger value or a NaN
/// replaces the current one; the first of equal values keeps the index).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_pool_2x2_avx512(
    x_p: &[f32],
    g: &PoolGeom,
    y_p: &mut [f32],
    a_p: &mut [u32],
    relu: bool,
) {
    use std::arch::x86_64::*;
    assert!(x_p.len() >= g.h * g.w && g.h >= 2 * g.oh && g.w >= 2 * g.ow);
    assert!(y_p.len() == g.oh * g.ow && a_p.len() == g.oh * g.ow);
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let lane = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // Takes `t` (index `ti`) over `v` (index `vi`) where t > v, or t is NaN and v is not.
    let step = |v: __m512, vi: __m512i, t: __m512, ti: __m512i| {
        let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, v)
            | (_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(t, t)
                & !_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v));
        (
            _mm512_mask_blend_ps(m, v, t),
            _mm512_mask_blend_epi32(m, vi, ti),
        )
    };
    let xb = x_p.as_ptr();
    for oh in 0..g.oh {
        let row0 = 2 * oh * g.w;
        let row1 = row0 + g.w;
        let mut ow0 = 0;
        while ow0 < g.ow {
            let n = (g.ow - ow0).min(16);
            let (m_lo, m_hi) = (first_lanes(2 * n), first_lanes((2 * n).saturating_sub(16)));
            // SAFETY: columns 2*ow0 .. 2*(ow0+n) of rows 2*oh and 2*oh+1 are inside the
            // plane (W >= 2*OW, H >= 2*OH); masked lanes are not read.
            let load = |row: usize| {
                let p = xb.add(row + 2 * ow0);
                let lo = _mm512_maskz_loadu_ps(m_lo, p);
                let hi = _mm512_maskz_loadu_ps(m_hi, p.add(16));
                (
                    _mm512_permutex2var_ps(lo, even, hi),
                    _mm512_permutex2var_ps(lo, odd, hi),
                )
            };
            let (e0, o0) = load(row0);
            let (e1, o1) = load(row1);
            let c = _mm512_add_epi32(_mm512_set1_epi32((row0 + 2 * ow0) as i32), lane);
            let w = _mm512_set1_epi32(g.w as i32);
            let one = _mm512_set1_epi32(1);
            let (v, i) = (e0, c);
            let (v, i) = step(v, i, o0, _mm512_add_epi32(c, one));
            let (v, i) = step(v, i, e1, _mm512_add_epi32(c, w));
            let (v, i) = step(v, i, o1, _mm512_add_epi32(_mm512_add_epi32(c, w), one));
            // ReLU as `Activation::Relu` computes it: positive values and NaN pass, the
            // rest (-0.0 included) become 0.0.
            let v = if relu {
                let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, _mm512_setzero_ps())
                    | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                _mm512_maskz_mov_ps(keep, v)
            } else {
                v
            };
            let out = first_lanes(n);
            _mm512_mask_storeu_ps(y_p.as_mut_ptr().add(oh * g.ow + ow0), out, v);
            _mm512_mask_storeu_epi32(a_p.as_mut_ptr().add(oh * g.ow + ow0) as *mut i32, out, i);
            ow0 += n;
        }
    }
}

/// Max pooling: writes `y [P, OH, OW]` and `argmax [P, OH, OW]`.
pub fn max_pool2d_forward(x: &[f32], g: &PoolGeom, y: &mut [f32], argmax: &mut [u32]) {
    max_pool_planes(x, g, y, argmax, false)
}

/// `max_pool2d(relu(x))` in one pass: max pooling of `x`, then ReLU on the pooled values
/// (the maximum commutes with ReLU, so the values are the same). Windows without an input
/// tap keep -inf, as the unfused pair gives them. `argmax` is the pooling's of `x`, which
/// is the pair's wherever the output is positive (or NaN), the only places
/// [`max_pool2d_relu_backward`] sends a gradient. Writes every element of `y` and `argmax`.
pub fn max_pool2d_relu_forward(x: &[f32], g: &PoolGeom, y: &mut [f32], argmax: &mut [u32]) {
    max_pool_planes(x, g, y, argmax, true)
}

/// [`max_pool2d_relu_forward`] on the calling thread, for callers that parallelise at a
/// coarser level (the planes of one image): `x` holds whole input planes of `g`'s size,
/// `y` and `argmax` the same number of output planes (`g.planes` is not read).
pub fn max_pool2d_relu_forward_seq(x: &[f32], g: &PoolGeom, y: &mut [f32], argmax: &mut [u32]) {
    let (ip, op) = (g.in_plane(), g.out_plane());
    assert!(x.len().is_multiple_of(ip) && y.len() == x.len() / ip * op && argmax.len() == y.len());
    for ((y_p, a_p), x_p) in y
        .chunks_mut(op)
        .zip(argmax.chunks_mut(op))
        .zip(x.chunks(ip))
    {
        pool_plane(x_p, g, y_p, a_p, true);
    }
}

/// Both forwards: every plane pooled, then (with `relu`) ReLU on its windows that hold a tap.
fn max_pool_planes(x: &[f32], g: &PoolGeom, y: &mut [f32], argmax: &mut [u32], relu: bool) {
    y.par_chunks_mut(g.out_plane())
        .zip(argmax.par_chunks_mut(g.out_plane()))
        .zip(x.par_chunks(g.in_plane()))
        .for_each(|((y_p, a_p), x_p)| pool_plane(x_p, g, y_p, a_p, relu));
}

/// One plane of both forwards. The AVX-512 2x2 kernel applies `relu` in its vector loop;
/// the scalar loops pool first and apply it after, to the windows that hold a tap.
fn pool_plane(x_p: &[f32], g: &PoolGeom, y_p: &mut [f32], a_p: &mut [u32], relu: bool) {
    #[cfg(target_arch = "x86_64")]
    if two_by_two(g) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was just detected; the window checks of `two_by_two` bound every
        // access (see the function).
        unsafe { max_pool_2x2_avx512(x_p, g, y_p, a_p, relu) };
        return;
    }
    max_pool_plane(x_p, g, y_p, a_p);
    if relu {
        for (v, &a) in y_p.iter_mut().zip(a_p.iter()) {
            if a != NO_TAP {
                *v = super::activation::Activation::Relu.apply(*v);
            }
        }
    }
}

/// The common non-overlapping 2x2 / stride-2 window without padding, which the fast paths
/// take: every window lies inside the plane and every input belongs to at most one.
fn two_by_two(g: &PoolGeom) -> bool {
    g.kernel == (2, 2)
        && g.stride == (2, 2)
        && g.padding == (0, 0)
        && g.dilation == (1, 1)
        && g.h >= 2 * g.oh
        && g.w >= 2 * g.ow
}

/// One plane of [`max_pool2d_forward`] with the scalar loops.
fn max_pool_plane(x_p: &[f32], g: &PoolGeom, y_p: &mut [f32], a_p: &mut [u32]) {
    let (kh, kw) = g.kernel;
    // Branch-free selects over the four taps (NaN wins, as in PyTorch), vectorisable.
    if two_by_two(g) {
        for oh in 0..g.oh {
            let r0 = &x_p[2 * oh * g.w..2 * oh * g.w + 2 * g.ow];
            let r1 = &x_p[(2 * oh + 1) * g.w..(2 * oh + 1) * g.w + 2 * g.ow];
            let base = (2 * oh * g.w) as u32;
            let w = g.w as u32;
            let y_row = &mut y_p[oh * g.ow..(oh + 1) * g.ow];
            let a_row = &mut a_p[oh * g.ow..(oh + 1) * g.ow];
            for (ow, ((y, a), (p0, p1))) in y_row
                .iter_mut()
                .zip(a_row.iter_mut())
                .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)))
                .enumerate()
            {
                let c = base + 2 * ow as u32;
                // Non-short-circuit `|`/`&` keep these as selects, not branches.
                let take = |v: f32, t: f32| (t > v) | (t.is_nan() & !v.is_nan());
                let (mut v, mut i) = (p0[0], c);
                for (t, ti) in [(p0[1], c + 1), (p1[0], c + w), (p1[1], c + w + 1)] {
                    let m = take(v, t);
                    v = if m { t } else { v };
                    i = if m { ti } else { i };
                }
                *y = v;
                *a = i;
            }
        }
        return;
    }
    for oh in 0..g.oh {
        let (h0, h1, hs) = max_window(oh, g.stride.0, g.padding.0, kh, g.dilation.0, g.h);
        for ow in 0..g.ow {
            let (w0, w1, ws) = max_window(ow, g.stride.1, g.padding.1, kw, g.dilation.1, g.w);
            let mut best = f32::NEG_INFINITY;
            // PyTorch starts from the first tap, so an all -inf window sends its
            // gradient there.
            let mut best_i = if h0 < h1 && w0 < w1 {
                h0 * g.w + w0
            } else {
                NO_TAP as usize
            };
            'window: for ih in (h0..h1).step_by(hs) {
                for iw in (w0..w1).step_by(ws) {
                    let v = x_p[ih * g.w + iw];
                    if v > best || v.is_nan() {
                        best = v;
                        best_i = ih * g.w + iw;
                        if v.is_nan() {
                            break 'window;
                        }
                    }
                }
            }
            y_p[oh * g.ow + ow] = best;
            a_p[oh * g.ow + ow] = best_i as u32;
        }
    }
}

/// Max pooling backward: `dx[argmax] += dy` per plane (argmax [`NO_TAP`] adds nothing).
/// Writes every element of `dx` (zeros where no window's maximum is).
pub fn max_pool2d_backward(dy: &[f32], argmax: &[u32], g: &PoolGeom, dx: &mut [f32]) {
    scatter_to_maxima(dy, None, argmax, g, dx)
}

/// Backward of [`max_pool2d_relu_forward`] with respect to its input (before the ReLU):
/// `dx[argmax] += dy` where the pooled output `y` is positive, which is ReLU's rule
/// (`dy` where its output is positive) applied at the window's maximum. Writes every
/// element of `dx`.
pub fn max_pool2d_relu_backward(
    dy: &[f32],
    y: &[f32],
    argmax: &[u32],
    g: &PoolGeom,
    dx: &mut [f32],
) {
    scatter_to_maxima(dy, Some(y), argmax, g, dx)
}

/// Both backwards: per plane, zeros, then each output's gradient added at its argmax (where
/// the pooled output `y`, when given, is positive).
fn scatter_to_maxima(dy: &[f32], y: Option<&[f32]>, argmax: &[u32], g: &PoolGeom, dx: &mut [f32]) {
    let (ip, op) = (g.in_plane(), g.out_plane());
    #[cfg(target_arch = "x86_64")]
    let fast = two_by_two(g) && std::arch::is_x86_feature_detected!("avx512f");
    dx.par_chunks_mut(ip).enumerate().for_each(|(p, dx_p)| {
        let outs = p * op..(p + 1) * op;
        let y_p = y.map(|y| &y[outs.clone()]);
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX-512F was just detected; `gather_2x2_avx512` checks the sizes.
            unsafe {
                gather_2x2_avx512(&dy[outs.clone()], y_p, &argmax[outs], g, dx_p);
            }
            return;
        }
        dx_p.fill(0.0);
        for (i, (d, &a)) in dy[outs.clone()].iter().zip(&argmax[outs]).enumerate() {
            if a != NO_TAP && y_p.is_none_or(|y_p| y_p[i] > 0.0) {
                dx_p[a as usize] += d;
            }
        }
    });
}

/// [`scatter_to_maxima`] for one plane of non-overlapping 2x2 / stride-2 windows, written
/// input row by input row instead of scattered: per 16 outputs, each of the four taps
/// takes the output's gradient where the argmax names it (and zero elsewhere), and the
/// even and odd columns are interleaved back into the two input rows. Every input is in at
/// most one window, so this is the scatter's `0.0 + dy` at the argmax and `0.0` elsewhere,
/// bit for bit; inputs outside every window (an odd last row or column) get zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_2x2_avx512(
    dy_p: &[f32],
    y_p: Option<&[f32]>,
    a_p: &[u32],
    g: &PoolGeom,
    dx_p: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (oh, ow, w) = (g.oh, g.ow, g.w);
    assert!(
        dy_p.len() == oh * ow && a_p.len() == oh * ow && y_p.is_none_or(|y| y.len() == oh * ow)
    );
    assert!(dx_p.len() == g.h * w && g.h >= 2 * oh && w >= 2 * ow);
    let lane = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    // Interleaves even columns `e` and odd columns `o`: lanes 0..16 and 16..32 of the row.
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let zero = _mm512_setzero_ps();
    let (one, wv) = (_mm512_set1_epi32(1), _mm512_set1_epi32(w as i32));
    let dx = dx_p.as_mut_ptr();
    for r in 0..oh {
        let row0 = 2 * r * w;
        let mut o0 = 0;
        while o0 < ow {
            let n = (ow - o0).min(16);
            let m = first_lanes(n);
            let at = r * ow + o0;
            // SAFETY: outputs `at..at + n` are inside the plane's `oh * ow` (asserted);
            // masked lanes are not read.
            let d = _mm512_maskz_loadu_ps(m, dy_p.as_ptr().add(at));
            let a = _mm512_maskz_loadu_epi32(m, a_p.as_ptr().add(at) as *const i32);
            let mut valid = m;
            if let Some(y) = y_p {
                let yv = _mm512_maskz_loadu_ps(m, y.as_ptr().add(at));
                valid &= _mm512_cmp_ps_mask::<_CMP_GT_OQ>(yv, zero);
            }
            let v = _mm512_maskz_add_ps(valid, zero, d);
            let c = _mm512_add_epi32(_mm512_set1_epi32((row0 + 2 * o0) as i32), lane);
            let (m_lo, m_hi) = (first_lanes(2 * n), first_lanes((2 * n).saturating_sub(16)));
            for (row, c) in [(row0, c), (row0 + w, _mm512_add_epi32(c, wv))] {
                let even = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(a, c), v);
                let odd =
                    _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(a, _mm512_add_epi32(c, one)), v);
                // SAFETY: columns 2*o0 .. 2*(o0+n) of this row are inside the plane
                // (W >= 2*OW); masked lanes are not written.
                let p = dx.add(row + 2 * o0);
                _mm512_mask_storeu_ps(p, m_lo, _mm512_permutex2var_ps(even, lo, odd));
                _mm512_mask_storeu_ps(p.add(16), m_hi, _mm512_permutex2var_ps(even, hi, odd));
            }
            o0 += n;
        }
        dx_p[row0 + 2 * ow..row0 + w].fill(0.0);
        dx_p[row0 + w + 2 * ow..row0 + 2 * w].fill(0.0);
    }
    dx_p[2 * oh * w..].fill(0.0);
}

/// The clipped window and divisor of average pooling at one output position, as PyTorch's
/// `avg_pool2d` computes them: the divisor counts padded taps when `count_include_pad`.
fn avg_window(
    o: usize,
    stride: usize,
    pad: usize,
    kernel: usize,
    len: usize,
) -> (usize, usize, usize) {
    let start = (o * stride) as isize - pad as isize;
    let end = (start + kernel as isize).min((len + pad) as isize);
    let padded_count = (end - start) as usize;
    let s = start.max(0) as usize;
    let e = end.min(len as isize).max(s as isize) as usize;
    (s, e, padded_count)
}

/// Average pooling forward.
pub fn avg_pool2d_forward(x: &[f32], g: &PoolGeom, count_include_pad: bool, y: &mut [f32]) {
    y.par_chunks_mut(g.out_plane())
        .zip(x.par_chunks(g.in_plane()))
        .for_each(|(y_p, x_p)| {
            for oh in 0..g.oh {
                let (h0, h1, hc) = avg_window(oh, g.stride.0, g.padding.0, g.kernel.0, g.h);
                for ow in 0..g.ow {
                    let (w0, w1, wc) = avg_window(ow, g.stride.1, g.padding.1, g.kernel.1, g.w);
                    let div = if count_include_pad {
                        hc * wc
                    } else {
                        (h1 - h0) * (w1 - w0)
                    };
                    let mut acc = 0f32;
                    for ih in h0..h1 {
                        for v in &x_p[ih * g.w + w0..ih * g.w + w1] {
                            acc += v;
                        }
                    }
                    y_p[oh * g.ow + ow] = if div == 0 { 0.0 } else { acc / div as f32 };
                }
            }
        });
}

/// Average pooling backward: each output's gradient is spread evenly over its window.
/// Writes every element of `dx`.
pub fn avg_pool2d_backward(dy: &[f32], g: &PoolGeom, count_include_pad: bool, dx: &mut [f32]) {
    dx.par_chunks_mut(g.in_plane())
        .zip(dy.par_chunks(g.out_plane()))
        .for_each(|(dx_p, dy_p)| {
            dx_p.fill(0.0);
            for oh in 0..g.oh {
                let (h0, h1, hc) = avg_window(oh, g.stride.0, g.padding.0, g.kernel.0, g.h);
                for ow in 0..g.ow {
                    let (w0, w1, wc) = avg_window(ow, g.stride.1, g.padding.1, g.kernel.1, g.w);
                    let div = if count_include_pad {
                        hc * wc
                    } else {
                        (h1 - h0) * (w1 - w0)
                    };
                    if div == 0 {
                        continue;
                    }
                    let share = dy_p[oh * g.ow + ow] / div as f32;
                    for ih in h0..h1 {
                        for d in &mut dx_p[ih * g.w + w0..ih * g.w + w1] {
                            *d += share;
                        }
                    }
                }
            }
        });
}

/// Adaptive window `[floor(o*len/out), ceil((o+1)*len/out))`.
fn adaptive_window(o: usize, len: usize, out: usize) -> (usize, usize) {
    (o * len / out, ((o + 1) * len).div_ceil(out))
}

/// Adaptive average pooling forward: `x [P, H, W] -> y [P, OH, OW]`.
pub fn adaptive_avg_pool2d_forward(x: &[f32], g: &PoolGeom, y: &mut [f32]) {
    y.par_chunks_mut(g.out_plane())
        .zip(x.par_chunks(g.in_plane()))
        .for_each(|(y_p, x_p)| {
            for oh in 0..g.oh {
                let (h0, h1) = adaptive_window(oh, g.h, g.oh);
                for ow in 0..g.ow {
                    let (w0, w1) = adaptive_window(ow, g.w, g.ow);
                    let mut acc = 0f32;
                    for ih in h0..h1 {
                        for v in &x_p[ih * g.w + w0..ih * g.w + w1] {
                            acc += v;
                        }
                    }
                    y_p[oh * g.ow + ow] = acc / ((h1 - h0) * (w1 - w0)) as f32;
                }
            }
        });
}

/// Adaptive average pooling backward. Writes every element of `dx`.
pub fn adaptive_avg_pool2d_backward(dy: &[f32], g: &PoolGeom, dx: &mut [f32]) {
    dx.par_chunks_mut(g.in_plane())
        .zip(dy.par_chunks(g.out_plane()))
        .for_each(|(dx_p, dy_p)| {
            dx_p.fill(0.0);
            for oh in 0..g.oh {
                let (h0, h1) = adaptive_window(oh, g.h, g.oh);
                for ow in 0..g.ow {
                    let (w0, w1) = adaptive_window(ow, g.w, g.ow);
                    let share = dy_p[oh * g.ow + ow] / ((h1 - h0) * (w1 - w0)) as f32;
                    for ih in h0..h1 {
                        for d in &mut dx_p[ih * g.w + w0..ih * g.w + w1] {
                            *d += share;
                        }
                    }
                }
            }
        });
}

/// Adaptive max pooling forward, like `F.adaptive_max_pool2d(x, (OH, OW), return_indices=True)`:
/// `x [P, H, W] -> y [P, OH, OW]` and the argmax (flat index in the plane) of each window
/// `[floor(o*len/out), ceil((o+1)*len/out))`; a NaN wins. Its backward is
/// [`max_pool2d_backward`] with the same geometry.
pub fn adaptive_max_pool2d_forward(x: &[f32], g: &PoolGeom, y: &mut [f32], argmax: &mut [u32]) {
    y.par_chunks_mut(g.out_plane())
        .zip(argmax.par_chunks_mut(g.out_plane()))
        .zip(x.par_chunks(g.in_plane()))
        .for_each(|((y_p, a_p), x_p)| {
            for oh in 0..g.oh {
                let (h0, h1) = adaptive_window(oh, g.h, g.oh);
                for ow in 0..g.ow {
                    let (w0, w1) = adaptive_window(ow, g.w, g.ow);
                    let mut best = f32::NEG_INFINITY;
                    let mut best_i = h0 * g.w + w0;
                    for ih in h0..h1 {
                        for iw in w0..w1 {
                            let v = x_p[ih * g.w + iw];
                            if v > best || v.is_nan() {
                                best = v;
                                best_i = ih * g.w + iw;
                            }
                        }
                    }
                    y_p[oh * g.ow + ow] = best;
                    a_p[oh * g.ow + ow] = best_i as u32;
                }
            }
        });
}

/// Naive max pooling over every padded tap (padding counts as -inf): reference for tests.
pub fn max_pool2d_naive(x: &[f32], g: &PoolGeom) -> Vec<f32> {
    let mut y = vec![0f32; g.planes * g.out_plane()];
    for p in 0..g.planes {
        for oh in 0..g.oh {
            for ow in 0..g.ow {
                let mut best = f32::NEG_INFINITY;
                for ki in 0..g.kernel.0 {
                    for kj in 0..g.kernel.1 {
                        let ih =
                            (oh * g.stride.0 + ki * g.dilation.0) as isize - g.padding.0 as isize;
                        let iw =
                            (ow * g.stride.1 + kj * g.dilation.1) as isize - g.padding.1 as isize;
                        if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                            best = best.max(x[p * g.in_plane() + ih as usize * g.w + iw as usize]);
                        }
                    }
                }
                y[p * g.out_plane() + oh * g.ow + ow] = best;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::pool_out_size;
    use crate::Rng;

    #[test]
    fn max_pool_matches_naive_including_fast_path() {
        let mut rng = Rng::new(9);
        for &(h, w, k, s, p, d, ceil) in &[
            (8usize, 8usize, 2usize, 2usize, 0usize, 1usize, false),
            (9, 7, 2, 2, 0, 1, true),
            (9, 7, 3, 2, 1, 1, false),
            (10, 11, 3, 2, 1, 2, true),
            (5, 6, 3, 1, 1, 1, false),
            (32, 32, 2, 2, 0, 1, false),
            (16, 16, 2, 2, 0, 1, false),
            (12, 67, 2, 2, 0, 1, false),
        ] {
            let g = PoolGeom {
                planes: 3,
                h,
                w,
                oh: pool_out_size(h, k, s, p, d, ceil).unwrap(),
                ow: pool_out_size(w, k, s, p, d, ceil).unwrap(),
                kernel: (k, k),
                stride: (s, s),
                padding: (p, p),
                dilation: (d, d),
            };
            let x: Vec<f32> = (0..3 * h * w).map(|_| rng.normal()).collect();
            let mut y = vec![0.0; 3 * g.oh * g.ow];
            let mut a = vec![0u32; y.len()];
            max_pool2d_forward(&x, &g, &mut y, &mut a);
            assert_eq!(y, max_pool2d_naive(&x, &g), "{g:?}");
            for (i, &ai) in a.iter().enumerate() {
                let plane = i / (g.oh * g.ow);
                assert_eq!(x[plane * h * w + ai as usize], y[i]);
            }
        }
    }

    /// Windows reaching past the padded input (PyTorch's `ceil_mode` keeps them): clipped,
    /// matching the naive reference, with a gradient for every output; a window with no tap
    /// inside the input gives -inf and no gradient, never an index outside the plane.
    #[test]
    fn max_pool_windows_past_the_padded_input() {
        let mut rng = Rng::new(3);
        // (H, W, kernel, stride, padding, dilation): all with ceil_mode.
        for &(h, w, k, s, p, d) in &[
            (8usize, 2usize, (2, 3), (1, 3), (1, 0), (1, 1)),
            (3, 5, (3, 4), (2, 3), (1, 2), (1, 1)),
            (1, 1, (1, 2), (1, 2), (0, 1), (1, 3)),
        ] {
            let g = PoolGeom {
                planes: 2,
                h,
                w,
                oh: pool_out_size(h, k.0, s.0, p.0, d.0, true).unwrap(),
                ow: pool_out_size(w, k.1, s.1, p.1, d.1, true).unwrap(),
                kernel: k,
                stride: s,
                padding: p,
                dilation: d,
            };
            let x: Vec<f32> = (0..2 * h * w).map(|_| rng.normal()).collect();
            let mut y = vec![0.0; 2 * g.oh * g.ow];
            let mut a = vec![0u32; y.len()];
            max_pool2d_forward(&x, &g, &mut y, &mut a);
            assert_eq!(y, max_pool2d_naive(&x, &g), "{g:?}");
            let mut dx = vec![0.0; x.len()];
            max_pool2d_backward(&vec![1.0; y.len()], &a, &g, &mut dx);
            let hit = y.iter().filter(|v| v.is_finite()).count() as f32;
            assert_eq!(dx.iter().sum::<f32>(), hit, "{g:?}");
        }
        assert_eq!(pool_out_size(8, 2, 1, 1, 1, true), Some(9));
        assert_eq!(pool_out_size(2, 3, 3, 0, 1, true), Some(1));
    }

    #[test]
    fn adaptive_max_pool_takes_the_window_maximum() {
        let mut rng = Rng::new(5);
        let (h, w, oh, ow) = (5usize, 7usize, 2usize, 3usize);
        let g = PoolGeom {
            planes: 3,
            h,
            w,
            oh,
            ow,
            kernel: (1, 1),
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
        };
        let x: Vec<f32> = (0..3 * h * w).map(|_| rng.normal()).collect();
        let mut y = vec![0.0; 3 * oh * ow];
        let mut a = vec![0u32; y.len()];
        adaptive_max_pool2d_forward(&x, &g, &mut y, &mut a);
        for p in 0..3 {
            for i in 0..oh {
                for j in 0..ow {
                    let (h0, h1) = adaptive_window(i, h, oh);
                    let (w0, w1) = adaptive_window(j, w, ow);
                    let mut m = f32::NEG_INFINITY;
                    for r in h0..h1 {
                        for c in w0..w1 {
                            m = m.max(x[p * h * w + r * w + c]);
                        }
                    }
                    let o = p * oh * ow + i * ow + j;
                    assert_eq!(y[o], m);
                    assert_eq!(x[p * h * w + a[o] as usize], m);
                }
            }
        }
    }

    /// Both backwards (the 2x2 row-wise path included) against the plain scatter, bit for
    /// bit: odd trailing rows and columns, widths across the 16-lane blocks, -0.0 and NaN
    /// gradients, outputs at and below zero for the ReLU rule.
    #[test]
    fn max_pool_backward_matches_the_scatter() {
        let mut rng = Rng::new(11);
        for &(h, w, k, s, p) in &[
            (8usize, 8usize, 2usize, 2usize, 0usize),
            (9, 7, 2, 2, 0),
            (5, 67, 2, 2, 0),
            (32, 32, 2, 2, 0),
            (7, 9, 3, 2, 1),
        ] {
            let g = PoolGeom {
                planes: 3,
                h,
                w,
                oh: pool_out_size(h, k, s, p, 1, false).unwrap(),
                ow: pool_out_size(w, k, s, p, 1, false).unwrap(),
                kernel: (k, k),
                stride: (s, s),
                padding: (p, p),
                dilation: (1, 1),
            };
            let x: Vec<f32> = (0..3 * h * w).map(|_| rng.normal()).collect();
            let n = 3 * g.oh * g.ow;
            let (mut y, mut a) = (vec![0.0; n], vec![0u32; n]);
            max_pool2d_relu_forward(&x, &g, &mut y, &mut a);
            let mut dy: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            dy[1] = -0.0;
            dy[n - 1] = f32::NAN;
            for relu in [false, true] {
                let mut want = vec![0f32; x.len()];
                for (i, (&d, &ai)) in dy.iter().zip(&a).enumerate() {
                    if !relu || y[i] > 0.0 {
                        want[i / (g.oh * g.ow) * h * w + ai as usize] += d;
                    }
                }
                let mut dx = vec![7.0f32; x.len()];
                if relu {
                    max_pool2d_relu_backward(&dy, &y, &a, &g, &mut dx);
                } else {
                    max_pool2d_backward(&dy, &a, &g, &mut dx);
                }
                assert_eq!(bits_of(&dx), bits_of(&want), "{g:?} relu {relu}");
            }
            // The fused forward is ReLU of the plain one's values.
            let (mut y0, mut a0) = (vec![0.0; n], vec![0u32; n]);
            max_pool2d_forward(&x, &g, &mut y0, &mut a0);
            assert_eq!(a0, a);
            let relu = |v: f32| if v > 0.0 || v.is_nan() { v } else { 0.0 };
            assert_eq!(
                bits_of(&y),
                bits_of(&y0.iter().map(|&v| relu(v)).collect::<Vec<_>>())
            );
        }
    }

    fn bits_of(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// PyTorch's tie and NaN rules on the 2x2 fast path: equal values keep the first tap,
    /// a NaN wins its window.
    #[test]
    fn max_pool_2x2_ties_keep_the_first_tap_and_nan_wins() {
        let (h, w) = (4, 36);
        let g = PoolGeom {
            planes: 1,
            h,
            w,
            oh: 2,
            ow: 18,
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
            dilation: (1, 1),
        };
        let mut x = vec![1.0f32; h * w];
        x[w + 5] = f32::NAN; // window (0, 2), its bottom-right tap
        let mut y = vec![0.0; 36];
        let mut a = vec![0u32; 36];
        max_pool2d_forward(&x, &g, &mut y, &mut a);
        for oh in 0..2 {
            for ow in 0..18 {
                let i = oh * 18 + ow;
                if (oh, ow) == (0, 2) {
                    assert!(y[i].is_nan());
                    assert_eq!(a[i] as usize, w + 5);
                } else {
                    assert_eq!((y[i], a[i] as usize), (1.0, 2 * oh * w + 2 * ow), "{i}");
                }
            }
        }
    }
}
