//! Direct 3x3, stride-1, padding-1 convolution with AVX-512: the shape of every convolution
//! in a CIFAR ResNet's stages (and, through the flipped-kernel form, of their input
//! gradients). Mirrors `torch.nn.functional.conv2d(x, w, b, stride=1, padding=1)`.
//!
//! Legend: N batch, C input channels, H/W input size (= OH/OW output size), K output
//! channels. Layouts: input `[N, C, H, W]`, weight `[K, C, 3, 3]`, output `[N, K, H, W]`.
//!
//! Method: each image is copied into a zero-bordered buffer `[C, H+2, W+2]`, so no tap
//! needs a bounds check. Output is produced in blocks of 4 output channels x 4 tiles, a tile
//! being 16 consecutive outputs of one row (one 512-bit register): 16 accumulators stay in
//! registers while the loop runs over C and the 9 taps, loading each input vector once for
//! 4 output channels (the weights are packed so that those 4 are adjacent). im2col + GEMM
//! spends its time writing and re-reading a 9x larger matrix and runs a GEMM whose M is only
//! K; this kernel does neither. Used when W is a multiple of 16, or 8 with an even H (two
//! rows per register), and K a multiple of 4, on CPUs with AVX-512F/DQ; everything else
//! takes the im2col path.

use super::conv::ConvGeom;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Output channels per block.
const OCB: usize = 4;
/// Output vectors (16 outputs each) per block.
const TILES: usize = 4;
const LANES: usize = 16;

/// True when this kernel computes `conv2d_forward` for `g` on this CPU.
pub fn applies(g: &ConvGeom) -> bool {
    g.kh == 3
        && g.kw == 3
        && (g.stride == (1, 1)
            || (g.stride == (2, 2) && g.h.is_multiple_of(2) && g.w.is_multiple_of(2)))
        && g.dilation == (1, 1)
        && g.padding == (1, 1)
        && g.groups == 1
        && g.k.is_multiple_of(OCB)
        && std::arch::is_x86_feature_detected!("avx512f")
        && (g.ow.is_multiple_of(LANES)
            || (g.ow == LANES / 2
                && g.oh.is_multiple_of(2)
                && std::arch::is_x86_feature_detected!("avx512dq")))
}

/// True when [`backward_weight`] is the faster weight gradient for `g`: output rows of 32 or
/// more, or 16 with stride 2. Elsewhere im2col + GEMM wins (measured with `cargo bench -p
/// convnet --bench conv`, 2 threads, batch 64, on full-width AVX-512):
///
/// | layer | direct | im2col + GEMM |
/// |---|---|---|
/// | 3->32 at 32x32 | 0.72 ms | 0.86 ms |
/// | 16->16 at 32x32 | 2.12 ms | 2.39 ms |
/// | 16->32 stride 2, 32x32 in | 1.44 ms | 1.92 ms |
/// | 32->32 at 16x16 | 2.08 ms | 1.93 ms |
/// | 32->64 at 16x16 | 4.20 ms | 2.81 ms |
/// | 64->64 at 8x8 (paired rows) | 179 GFLOP/s | 219 GFLOP/s |
///
/// With one row per tile the kernel reloads its 18 accumulators for every pair of output
/// channels and input channel after only a few tiles.
pub fn weight_grad_applies(g: &ConvGeom) -> bool {
    applies(g) && g.ow.is_multiple_of(LANES) && (g.ow >= 2 * LANES || g.stride == (2, 2))
}

/// Where the 16 outputs of a tile are and where its inputs are in the prepared image (see
/// [`prepare_image`]). Output rows at least 16 wide are cut into 16-wide tiles; 8-wide rows
/// are paired, a tile holding two consecutive rows (contiguous in the output, two 8-float
/// pieces in the input).
#[derive(Clone, Copy)]
struct Tiles {
    per_row: usize,
    paired: bool,
    ow: usize,
    /// Prepared-image floats between the inputs of consecutive output rows: `stride * (W+2)`.
    in_row: usize,
}

impl Tiles {
    fn new(g: &ConvGeom) -> Self {
        Tiles {
            per_row: (g.ow / LANES).max(1),
            paired: g.ow < LANES,
            ow: g.ow,
            in_row: g.stride.0 * (g.w + 2),
        }
    }
    fn count(&self, oh: usize) -> usize {
        if self.paired {
            oh / 2
        } else {
            oh * self.per_row
        }
    }
    /// (offset of the tile's top-left input in a prepared plane, offset of its first output).
    fn offsets(&self, t: usize) -> (usize, usize) {
        if self.paired {
            (2 * t * self.in_row, 2 * t * self.ow)
        } else {
            let (r, v) = (t / self.per_row, t % self.per_row);
            (r * self.in_row + v * LANES, r * self.ow + v * LANES)
        }
    }
    /// Offset of tap `(kh, kw)` from a tile's top-left input in a prepared image with padded
    /// rows `pw` wide, for stride `S` (a constant, so that the offsets fold into addresses).
    #[inline(always)]
    fn tap<const S: usize>(kh: usize, kw: usize, pw: usize) -> usize {
        if S == 1 {
            kh * pw + kw
        } else {
            // Even padded columns first, then odd ones: column 2j + kw of the padded row is
            // entry j + kw/2 of the even (kw = 0, 2) or odd (kw = 1) half.
            kh * pw + (kw % 2) * (pw / 2) + kw / 2
        }
    }
    /// Loads a tile's 16 inputs at `p` (a tap's position for the tile).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn load(&self, p: *const f32) -> __m512 {
        if self.paired {
            let lo = _mm256_loadu_ps(p);
            let hi = _mm256_loadu_ps(p.add(self.in_row));
            _mm512_insertf32x8::<1>(_mm512_castps256_ps512(lo), hi)
        } else {
            _mm512_loadu_ps(p)
        }
    }
}

/// `w [K, C, 3, 3]` -> `[K/4, C, 9, 4]`: the 4 output channels of a block side by side.
fn pack_weights(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    let mut p = vec![0f32; w.len()];
    for kb in 0..g.k / OCB {
        for c in 0..g.c {
            for tap in 0..9 {
                for o in 0..OCB {
                    p[((kb * g.c + c) * 9 + tap) * OCB + o] =
                        w[((kb * OCB + o) * g.c + c) * 9 + tap];
                }
            }
        }
    }
    p
}

/// `y = conv2d(x, w) + bias` for geometries where [`applies`] holds.
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]) {
    assert!(applies(g), "conv_direct::forward called for {g:?}");
    let packed = pack_weights(w, g);
    let (pw, ph) = (g.w + 2, g.h + 2);
    let in_image = g.c * g.h * g.w;
    let out_image = g.k * g.oh * g.ow;
    y.par_chunks_mut(out_image)
        .zip(x.par_chunks(in_image))
        .for_each_init(
            // One zero-bordered image per worker; only the interior is ever written.
            || vec![0f32; g.c * ph * pw],
            |xp, (y_img, x_img)| {
                prepare_image(x_img, g, xp);
                // SAFETY: `applies` checked that the CPU has AVX-512F; the buffers have the
                // sizes the geometry gives (checked by the asserts inside).
                unsafe { forward_image(xp, &packed, bias, g, y_img) };
            },
        );
}

#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn forward_image(xp: &[f32], wp: &[f32], bias: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]) {
    let plane = (g.h + 2) * (g.w + 2);
    let map = Tiles::new(g);
    let tiles = map.count(g.oh);
    assert!(xp.len() >= g.c * plane && wp.len() == g.k * g.c * 9 && y.len() == g.k * g.oh * g.ow);
    if let Some(b) = bias {
        assert!(b.len() == g.k);
    }
    for kb in 0..g.k / OCB {
        let w_block = &wp[kb * g.c * 9 * OCB..(kb + 1) * g.c * 9 * OCB];
        let b4: [f32; OCB] = match bias {
            Some(b) => [
                b[kb * OCB],
                b[kb * OCB + 1],
                b[kb * OCB + 2],
                b[kb * OCB + 3],
            ],
            None => [0.0; OCB],
        };
        let mut t0 = 0;
        while t0 + TILES <= tiles {
            if g.stride.0 == 1 {
                block::<TILES, 1>(xp, w_block, g, map, t0, b4, kb, y);
            } else {
                block::<TILES, 2>(xp, w_block, g, map, t0, b4, kb, y);
            }
            t0 += TILES;
        }
        while t0 < tiles {
            if g.stride.0 == 1 {
                block::<1, 1>(xp, w_block, g, map, t0, b4, kb, y);
            } else {
                block::<1, 2>(xp, w_block, g, map, t0, b4, kb, y);
            }
            t0 += 1;
        }
    }
}

/// Computes `T` tiles starting at tile `t0` for output channels `kb*4 .. kb*4+4`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn block<const T: usize, const S: usize>(
    xp: &[f32],
    w_block: &[f32],
    g: &ConvGeom,
    map: Tiles,
    t0: usize,
    b4: [f32; OCB],
    kb: usize,
    y: &mut [f32],
) {
    let pw = g.w + 2;
    let plane = (g.h + 2) * pw;
    let mut acc = [[_mm512_setzero_ps(); T]; OCB];
    for (o, row) in acc.iter_mut().enumerate() {
        *row = [_mm512_set1_ps(b4[o]); T];
    }
    // Offset of each tile's first input element (top-left tap) in a padded plane.
    let mut offs = [0usize; T];
    for (t, off) in offs.iter_mut().enumerate() {
        *off = map.offsets(t0 + t).0;
    }
    let xb = xp.as_ptr();
    let wb = w_block.as_ptr();
    for c in 0..g.c {
        // SAFETY: every load reads 16 floats starting at most at (H+1)*pw + W - 16 + 2 +
        // c*plane, inside the padded image; weights stay inside the block.
        let xc = xb.add(c * plane);
        let wc = wb.add(c * 9 * OCB);
        for kh in 0..3 {
            for kw in 0..3 {
                let tap = kh * 3 + kw;
                let w0 = _mm512_set1_ps(*wc.add(tap * OCB));
                let w1 = _mm512_set1_ps(*wc.add(tap * OCB + 1));
                let w2 = _mm512_set1_ps(*wc.add(tap * OCB + 2));
                let w3 = _mm512_set1_ps(*wc.add(tap * OCB + 3));
                for t in 0..T {
                    let xv = map.load(xc.add(offs[t] + Tiles::tap::<S>(kh, kw, pw)));
                    acc[0][t] = _mm512_fmadd_ps(w0, xv, acc[0][t]);
                    acc[1][t] = _mm512_fmadd_ps(w1, xv, acc[1][t]);
                    acc[2][t] = _mm512_fmadd_ps(w2, xv, acc[2][t]);
                    acc[3][t] = _mm512_fmadd_ps(w3, xv, acc[3][t]);
                }
            }
        }
    }
    let ohw = g.oh * g.ow;
    let yp = y.as_mut_ptr();
    for (o, row) in acc.iter().enumerate() {
        for (t, v) in row.iter().enumerate() {
            // SAFETY: a tile's 16 outputs are contiguous and inside channel kb*4+o.
            _mm512_storeu_ps(yp.add((kb * OCB + o) * ohw + map.offsets(t0 + t).1), *v);
        }
    }
}

/// Copies image `x_img [C, H, W]` into the interior of the zero-bordered `xp [C, H+2, W+2]`.
/// For stride 2, each padded row is stored as its even columns then its odd ones, so that
/// every tap of 16 outputs (inputs two columns apart) is 16 consecutive floats.
fn prepare_image(x_img: &[f32], g: &ConvGeom, xp: &mut [f32]) {
    let (pw, ph) = (g.w + 2, g.h + 2);
    let half = pw / 2;
    for c in 0..g.c {
        for r in 0..g.h {
            let src = &x_img[(c * g.h + r) * g.w..(c * g.h + r + 1) * g.w];
            let row = c * ph * pw + (r + 1) * pw;
            if g.stride.0 == 1 {
                xp[row + 1..row + 1 + g.w].copy_from_slice(src);
            } else {
                // Padded column j+1: odd columns (even j) to the odd half, even ones to the even.
                let (even, odd) = xp[row..row + pw].split_at_mut(half);
                for (j, pair) in src.chunks_exact(2).enumerate() {
                    odd[j] = pair[0];
                    even[j + 1] = pair[1];
                }
            }
        }
    }
}

/// `dw = conv2d_weight_grad(x, dy)` summed over the batch, for geometries where [`applies`]
/// holds. For each pair of output channels and each input channel, 18 vector accumulators
/// (2 channels x 9 taps) run over every output tile of a thread's images, each loaded `dy`
/// vector serving 9 taps and each input vector 2 channels; the lanes are summed once at the
/// end. Threads take contiguous runs of images and add their partial sums.
pub fn backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    assert!(applies(g), "conv_direct::backward_weight called for {g:?}");
    let plane = (g.h + 2) * (g.w + 2);
    let in_image = g.c * g.h * g.w;
    let out_image = g.k * g.oh * g.ow;
    let chunk = g.n.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let images = part * chunk..((part + 1) * chunk).min(g.n);
            let count = images.len();
            let mut xp = vec![0f32; count * g.c * plane];
            for (i, n) in images.clone().enumerate() {
                prepare_image(
                    &x[n * in_image..(n + 1) * in_image],
                    g,
                    &mut xp[i * g.c * plane..(i + 1) * g.c * plane],
                );
            }
            let mut lanes = vec![0f32; g.k * g.c * 9 * LANES];
            // Images are taken a few at a time, as many as keep their inputs and output
            // gradients within about 256 KiB (L2), so each (channel pair, input channel)
            // pass reads from cache while its accumulators span several images.
            let per_image_bytes = 4 * (g.c * plane + out_image);
            let group = (256 * 1024 / per_image_bytes).clamp(1, count.max(1));
            for first in (0..count).step_by(group) {
                let last = (first + group).min(count);
                let xs = &xp[first * g.c * plane..last * g.c * plane];
                let dys =
                    &dy[(images.start + first) * out_image..(images.start + last) * out_image];
                // SAFETY: `applies` checked AVX-512F/DQ; sizes are asserted inside.
                unsafe {
                    if g.stride.0 == 1 {
                        weight_images::<1>(xs, dys, last - first, g, &mut lanes)
                    } else {
                        weight_images::<2>(xs, dys, last - first, g, &mut lanes)
                    }
                };
            }
            lanes
        })
        .collect();
    for (i, d) in dw.iter_mut().enumerate() {
        let mut s = 0f64;
        for p in &partials {
            s += p[i * LANES..(i + 1) * LANES]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        }
        *d = s as f32;
    }
}

/// Adds to the lane partial sums `lanes [K, C, 9, 16]` the weight gradient of `count` images:
/// padded inputs `xp [count, C, H+2, W+2]`, output gradients `dys [count, K, OH, OW]`.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn weight_images<const S: usize>(
    xp: &[f32],
    dys: &[f32],
    count: usize,
    g: &ConvGeom,
    lanes: &mut [f32],
) {
    let pw = g.w + 2;
    let plane = (g.h + 2) * pw;
    let ohw = g.oh * g.ow;
    let map = Tiles::new(g);
    let tiles = map.count(g.oh);
    assert!(xp.len() == count * g.c * plane && dys.len() == count * g.k * ohw);
    assert!(lanes.len() == g.k * g.c * 9 * LANES && g.k.is_multiple_of(2));
    let (xb, db) = (xp.as_ptr(), dys.as_ptr());
    for kp in 0..g.k / 2 {
        for c in 0..g.c {
            let mut acc = [[_mm512_setzero_ps(); 9]; 2];
            for n in 0..count {
                let xc = xb.add((n * g.c + c) * plane);
                let d0p = db.add((n * g.k + 2 * kp) * ohw);
                let d1p = d0p.add(ohw);
                for t in 0..tiles {
                    let (xo, o) = map.offsets(t);
                    // SAFETY: o + 16 <= OH*OW; the input loads stay inside the padded
                    // plane (see `block`).
                    let d0 = _mm512_loadu_ps(d0p.add(o));
                    let d1 = _mm512_loadu_ps(d1p.add(o));
                    let base = xc.add(xo);
                    for kh in 0..3 {
                        for kw in 0..3 {
                            let xv = map.load(base.add(Tiles::tap::<S>(kh, kw, pw)));
                            acc[0][kh * 3 + kw] = _mm512_fmadd_ps(d0, xv, acc[0][kh * 3 + kw]);
                            acc[1][kh * 3 + kw] = _mm512_fmadd_ps(d1, xv, acc[1][kh * 3 + kw]);
                        }
                    }
                }
            }
            for (o, taps) in acc.iter().enumerate() {
                for (tap, v) in taps.iter().enumerate() {
                    let p = lanes
                        .as_mut_ptr()
                        .add((((2 * kp + o) * g.c + c) * 9 + tap) * LANES);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
                }
            }
        }
    }
}
