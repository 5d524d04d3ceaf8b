//! Direct 3x3, padding-1 convolution with AVX-512, stride 1 or 2: the shape of every
//! convolution in a CIFAR ResNet's stages (and, through the flipped-kernel form, of their
//! stride-1 input gradients). Mirrors `torch.nn.functional.conv2d(x, w, b, stride, padding=1)`.
//!
//! Legend: N batch, C input channels, H/W input size, OH/OW output size, K output channels.
//! Layouts: input `[N, C, H, W]`, weight `[K, C, 3, 3]`, output `[N, K, OH, OW]`.
//!
//! Vectors are 16 outputs of one row (or two consecutive 8-wide rows) and blocks of 4 output
//! channels share every loaded input vector (the weights are packed so that those 4 are
//! adjacent). im2col + GEMM spends its time writing and re-reading a 9x larger matrix and
//! runs a GEMM whose M is only K; these kernels do neither.
//!
//! - Stride 1 (`row_block`, `weight_rows`, `weight_row_pairs`) reads the images as they
//!   are: the input rows of a block stay in registers across the three row taps, and the
//!   padding is masked out of the loads (or out of lanes rotated within a register) rather
//!   than stored.
//! - Stride 2 (`block`, `weight_images`) copies each image into a zero-bordered buffer
//!   `[C, H+2, W+2]` whose rows are split into even and odd columns, so that a tap of 16
//!   outputs is 16 consecutive floats.
//!
//! Used when OW is a multiple of 16, or 8 with an even OH, and K a multiple of 4, on CPUs
//! with AVX-512F/DQ; everything else takes the im2col path.

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

/// True when [`backward_weight`] is the faster weight gradient for `g`: every stride-1
/// geometry of [`applies`], and stride-2 rows a multiple of 16 wide (paired 8-wide stride-2
/// rows are slower than GEMM). Measured with `cargo bench -p convnet --bench conv`, 2
/// threads, batch 64, on two full-width AVX-512 machines, an Intel Xeon and an AMD Zen 5; on
/// the Xeon 16-wide rows with 64 output channels draw level with im2col + GEMM's larger
/// matrix product, on Zen 5 the direct kernel is a fifth faster there:
///
/// | layer | direct | im2col + GEMM |
/// |---|---|---|
/// | 3->32 at 32x32 (Xeon) | 0.55 ms | 0.84 ms |
/// | 16->16 at 32x32 (Xeon) | 1.25 ms | 2.41 ms |
/// | 16->32 stride 2, 32x32 in (Xeon) | 1.54 ms | 1.89 ms |
/// | 32->32 at 16x16 (Xeon) | 1.51-1.65 ms | 2.04 ms |
/// | 32->64 at 16x16 (Xeon) | 2.99-3.19 ms | 2.86-3.06 ms |
/// | 32->64 at 16x16 (Zen 5) | 1.51-1.57 ms | 1.93-1.98 ms |
/// | 64->64 at 8x8 (Zen 5) | 1.07-1.14 ms | 1.24-1.28 ms |
pub fn weight_grad_applies(g: &ConvGeom) -> bool {
    applies(g) && (g.stride == (1, 1) || g.ow.is_multiple_of(LANES))
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
    /// rows `pw` wide. Even padded columns come first, then odd ones: column 2j + kw of the
    /// padded row is entry j + kw/2 of the even (kw = 0, 2) or odd (kw = 1) half.
    #[inline(always)]
    fn tap(kh: usize, kw: usize, pw: usize) -> usize {
        kh * pw + (kw % 2) * (pw / 2) + kw / 2
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
pub(crate) fn pack_weights(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    pack_blocks::<OCB>(w, g.k, g.c, |k, c| (k * g.c + c) * 9)
}

/// The 3x3 weights `w` with `B` channels of the blocked side next to each other:
/// `[blocked/B, other, 9, B]`, where `at(blocked, other)` is the offset of that channel
/// pair's 9 taps in `w`.
fn pack_blocks<const B: usize>(
    w: &[f32],
    blocked: usize,
    other: usize,
    at: impl Fn(usize, usize) -> usize,
) -> Vec<f32> {
    let mut p = vec![0f32; w.len()];
    for bb in 0..blocked / B {
        for i in 0..other {
            for tap in 0..9 {
                for o in 0..B {
                    p[((bb * other + i) * 9 + tap) * B + o] = w[at(bb * B + o, i) + tap];
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
    let in_image = g.c * g.h * g.w;
    let out_image = g.k * g.oh * g.ow;
    if g.stride == (1, 1) {
        y.par_chunks_mut(out_image)
            .zip(x.par_chunks(in_image))
            .for_each(|(y_img, x_img)| {
                // SAFETY: `applies` checked that the CPU has AVX-512F; the sizes are asserted
                // inside.
                unsafe { forward_rows_f32(x_img, &packed, bias, g, y_img) };
            });
        return;
    }
    let (pw, ph) = (g.w + 2, g.h + 2);
    y.par_chunks_mut(out_image)
        .zip(x.par_chunks(in_image))
        .for_each_init(
            // One zero-bordered image per worker; only the interior is ever written.
            || vec![0f32; g.c * ph * pw],
            |xp, (y_img, x_img)| {
                prepare_image(x_img, g, xp);
                // SAFETY: `applies` checked that the CPU has AVX-512F; the buffers have the
                // sizes the geometry gives (checked by the asserts inside).
                unsafe { forward_padded_f32(xp, &packed, bias, g, y_img) };
            },
        );
}

/// [`forward_image_rows`] on float32 images.
#[target_feature(enable = "avx512f")]
unsafe fn forward_rows_f32(
    x: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    forward_image_rows::<Float32>(x, wp, bias, g, y)
}

/// [`forward_image`] on a float32 zero-bordered image.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn forward_padded_f32(
    xp: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    forward_image::<Float32>(xp, wp, bias, g, y)
}

/// One image of [`forward`] with bf16 products and float32 sums. `x` is the image as
/// `[C2, H, W]` words that each hold two bf16 values, channel `2i` in the low half and `2i +
/// 1` in the high one (see [`Bf16Pairs`]); `packed` is [`pack_weights`] of the weights as
/// `[K, C2, 3, 3]` words paired the same way; `g` is the geometry with `C2` input channels.
/// Stride 2 copies the image into `xp`, which must hold `C2 * (H+2) * (W+2)` values with a
/// zero border (only the interior is written).
///
/// # Safety
/// The CPU has AVX-512F/DQ and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512dq,avx512bf16")]
pub(crate) unsafe fn forward_image_bf16_pairs(
    x: &[u32],
    packed: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    xp: &mut [f32],
    y: &mut [f32],
) {
    assert!(
        applies(g),
        "conv_direct::forward_image_bf16_pairs called for {g:?}"
    );
    let words = as_words(x);
    if g.stride == (1, 1) {
        forward_image_rows::<Bf16Pairs>(words, packed, bias, g, y)
    } else {
        prepare_image(words, g, xp);
        forward_image::<Bf16Pairs>(xp, packed, bias, g, y)
    }
}

/// True when [`forward_relu_max_pool`] computes `max_pool2d(relu(conv2d(x)))` for `g`: the
/// stride-1 geometries of [`applies`].
pub fn relu_max_pool_applies(g: &ConvGeom) -> bool {
    applies(g) && g.stride == (1, 1)
}

/// `y = max_pool2d(relu(conv2d(x, w) + bias))` with the pooling's `argmax` (indices into the
/// convolution's output planes, as [`super::pool::max_pool2d_relu_forward`] gives them), for
/// geometries where [`relu_max_pool_applies`] holds. Image by image: the convolution's
/// output of one image goes to a per-thread buffer that stays in cache and is pooled from
/// there, so the full-size output is never written to memory and read back. The same
/// values, bit for bit, as this kernel's convolution followed by the fused ReLU and pooling.
pub fn forward_relu_max_pool(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    pool: &super::pool::PoolGeom,
    y: &mut [f32],
    argmax: &mut [u32],
) {
    assert!(
        relu_max_pool_applies(g),
        "conv_direct::forward_relu_max_pool called for {g:?}"
    );
    assert!((pool.planes, pool.h, pool.w) == (g.n * g.k, g.oh, g.ow));
    let packed = pack_weights(w, g);
    let (in_image, out_image) = (g.c * g.h * g.w, g.k * g.oh * g.ow);
    let pooled_image = g.k * pool.oh * pool.ow;
    assert!(x.len() == g.n * in_image && y.len() == g.n * pooled_image && argmax.len() == y.len());
    y.par_chunks_mut(pooled_image)
        .zip(argmax.par_chunks_mut(pooled_image))
        .zip(x.par_chunks(in_image))
        .for_each_init(
            || vec![0f32; out_image],
            |z, ((y_img, a_img), x_img)| {
                // SAFETY: `applies` checked that the CPU has AVX-512F; the sizes are asserted
                // inside.
                unsafe { forward_rows_f32(x_img, &packed, bias, g, z) };
                super::pool::max_pool2d_relu_forward_seq(z, pool, y_img, a_img);
            },
        );
}

/// The weights of tap `tap` for the 4 output channels of a block, broadcast (`wc` points at
/// one input channel's `[9, 4]` in the packed `[K/4, C, 9, 4]`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tap_weights(wc: *const f32, tap: usize) -> [__m512; OCB] {
    [
        _mm512_set1_ps(*wc.add(tap * OCB)),
        _mm512_set1_ps(*wc.add(tap * OCB + 1)),
        _mm512_set1_ps(*wc.add(tap * OCB + 2)),
        _mm512_set1_ps(*wc.add(tap * OCB + 3)),
    ]
}

/// `acc[o][at] += w[o] * xv` for the 4 output channels of a block, the products formed as
/// `P` forms them. Inlined into callers that enable `P`'s instructions.
#[inline(always)]
unsafe fn fma_channels<P: Products, const N: usize>(
    acc: &mut [[__m512; N]; OCB],
    w: &[__m512; OCB],
    xv: __m512,
    at: usize,
) {
    for (row, &wo) in acc.iter_mut().zip(w) {
        row[at] = P::mul_add(wo, xv, row[at]);
    }
}

/// How the forward kernels multiply a broadcast weight word by a vector of 16 input words
/// and add to 16 float32 sums. The kernels only move 32-bit words, so the same loops serve
/// float32 images (one channel per plane) and bf16 images whose planes hold pairs of
/// channels (see [`forward_bf16_pairs`]).
pub(crate) trait Products {
    /// `acc + w * x`, lane by lane.
    ///
    /// # Safety
    /// The CPU has the instructions of the implementation.
    unsafe fn mul_add(w: __m512, x: __m512, acc: __m512) -> __m512;
}

/// Words of bf16 pairs as the float32 slices the kernels take: they only move the bits,
/// and multiply them through [`Bf16Pairs`].
fn as_words(pairs: &[u32]) -> &[f32] {
    // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is an f32.
    unsafe { std::slice::from_raw_parts(pairs.as_ptr().cast::<f32>(), pairs.len()) }
}

/// float32 words: one fused multiply-add (AVX-512F).
pub(crate) struct Float32;

impl Products for Float32 {
    #[inline(always)]
    unsafe fn mul_add(w: __m512, x: __m512, acc: __m512) -> __m512 {
        _mm512_fmadd_ps(w, x, acc)
    }
}

/// Words of two bf16 values, the even channel in the low half: `acc + w.lo * x.lo + w.hi *
/// x.hi` in one `vdpbf16ps` (AVX512-BF16), which sums the two exact products in float32.
pub(crate) struct Bf16Pairs;

impl Products for Bf16Pairs {
    #[inline(always)]
    unsafe fn mul_add(w: __m512, x: __m512, acc: __m512) -> __m512 {
        // SAFETY: both casts reinterpret 64 bytes of plain bits.
        let (w, x) = unsafe {
            (
                std::mem::transmute::<__m512, __m512bh>(w),
                std::mem::transmute::<__m512, __m512bh>(x),
            )
        };
        _mm512_dpbf16_ps(acc, w, x)
    }
}

/// The four bias values of output-channel block `kb` (zeros without a bias).
fn block_bias(bias: Option<&[f32]>, kb: usize) -> [f32; OCB] {
    match bias {
        Some(b) => [
            b[kb * OCB],
            b[kb * OCB + 1],
            b[kb * OCB + 2],
            b[kb * OCB + 3],
        ],
        None => [0.0; OCB],
    }
}

/// Output rows (or, for 8-wide images, pairs of rows) per [`row_block`].
const ROWS: usize = 4;

/// Stride 1, read straight from the image (no zero-bordered copy). Output rows a multiple of
/// 16 wide: blocks of 4 rows x 16 columns x 4 output channels ([`row_block`]), then single
/// rows for the last `H % 4`. 8-wide rows (`H` even): the same with each vector holding two
/// consecutive rows, blocks of 4 such pairs, then single pairs.
#[inline(always)]
unsafe fn forward_image_rows<P: Products>(
    x: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    let plane = g.h * g.w;
    let paired = g.w == LANES / 2;
    assert!(g.stride == (1, 1) && (g.oh, g.ow) == (g.h, g.w));
    assert!(g.w.is_multiple_of(LANES) || (paired && g.h.is_multiple_of(2)));
    assert!(x.len() == g.c * plane && wp.len() == g.k * g.c * 9 && y.len() == g.k * plane);
    if let Some(b) = bias {
        assert!(b.len() == g.k);
    }
    // Output rows per row of vectors, and the column tiles of a row.
    let (step, cols) = if paired { (2, 1) } else { (1, g.w / LANES) };
    let (xb, yb) = (x.as_ptr(), y.as_mut_ptr());
    for kb in 0..g.k / OCB {
        let wb = wp.as_ptr().add(kb * g.c * 9 * OCB);
        let y_block = yb.add(kb * OCB * plane);
        let b4 = block_bias(bias, kb);
        let full = g.h / (ROWS * step) * ROWS * step;
        let mut r0 = 0;
        while r0 < g.h {
            let r = if r0 < full { ROWS } else { 1 };
            let (top, bottom) = (r0 == 0, r0 + r * step == g.h);
            for col in 0..cols {
                macro_rules! run {
                    ($r:expr, $p:expr) => {
                        match (top, bottom) {
                            (false, false) => row_block::<P, $r, $p, false, false>(
                                xb, wb, g, r0, col, b4, y_block,
                            ),
                            (true, false) => {
                                row_block::<P, $r, $p, true, false>(xb, wb, g, r0, col, b4, y_block)
                            }
                            (false, true) => {
                                row_block::<P, $r, $p, false, true>(xb, wb, g, r0, col, b4, y_block)
                            }
                            (true, true) => {
                                row_block::<P, $r, $p, true, true>(xb, wb, g, r0, col, b4, y_block)
                            }
                        }
                    };
                }
                match (r == ROWS, paired) {
                    (true, false) => run!(ROWS, false),
                    (false, false) => run!(1, false),
                    (true, true) => run!(ROWS, true),
                    (false, true) => run!(1, true),
                }
            }
            r0 += r * step;
        }
    }
}

/// Output rows `r0 .. r0+R` (paired: `r0 .. r0+2R`), columns `16*col .. 16*col+16`, of output
/// channels `kb*4 .. kb*4+4` (`y_block` points at channel `kb*4` of the image's output).
///
/// For each input channel and each column tap `kw`, the input vectors the block needs are
/// loaded once into registers and serve all three row taps of 4 channels. Vector `i` starts
/// at input row `r0 - 1 + i` (16 columns of it, or two 8-wide rows when paired), and output
/// vector `r` takes row tap `kh` from vector `step*r + kh`. Padding is never read: rows above
/// and below the image (`TOP` / `BOTTOM` say whether the block touches them) and columns left
/// and right of it are masked out of the loads. 4R accumulators, `3(step*(R-1)+3)` input
/// loads and 36 weight broadcasts per `36R` multiply-adds.
#[inline(always)]
unsafe fn row_block<
    P: Products,
    const R: usize,
    const PAIRED: bool,
    const TOP: bool,
    const BOTTOM: bool,
>(
    x: *const f32,
    w_block: *const f32,
    g: &ConvGeom,
    r0: usize,
    col: usize,
    b4: [f32; OCB],
    y_block: *mut f32,
) {
    let (h, w) = (g.h, g.w);
    let plane = h * w;
    let step = if PAIRED { 2 } else { 1 };
    let count = step * (R - 1) + 3;
    // Column -1 is lane 0 of the left tap (lanes 0 and 8 when paired), column W lane 15 of
    // the right tap (lanes 7 and 15).
    let masks: [__mmask16; 3] = if PAIRED {
        [0xfefe, 0xffff, 0x7f7f]
    } else {
        [
            if col == 0 { 0xfffe } else { 0xffff },
            0xffff,
            if col + 1 == w / LANES { 0x7fff } else { 0xffff },
        ]
    };
    let mut acc = [[_mm512_setzero_ps(); R]; OCB];
    for (o, row) in acc.iter_mut().enumerate() {
        *row = [_mm512_set1_ps(b4[o]); R];
    }
    for c in 0..g.c {
        // Input row r0 - 1, column 16*col - 1: the top-left tap of the block. Pointers are
        // formed with wrapping arithmetic because this one may lie before the image; only
        // unmasked lanes, all inside the image, are read.
        let xc = x
            .wrapping_add(c * plane + r0 * w + col * LANES)
            .wrapping_sub(w + 1);
        let wc = w_block.add(c * 9 * OCB);
        for (kw, &column_mask) in masks.iter().enumerate() {
            let mut xs = [_mm512_setzero_ps(); 2 * ROWS + 1];
            for (i, v) in xs.iter_mut().enumerate().take(count) {
                let mut mask = column_mask;
                if TOP && i == 0 {
                    // Row -1: all of the vector, or its first half when paired.
                    mask &= if PAIRED { 0xff00 } else { 0 };
                }
                if BOTTOM && i + 1 == count {
                    // Row H: all of the vector, or its second half when paired.
                    mask &= if PAIRED { 0x00ff } else { 0 };
                }
                if mask != 0 {
                    // SAFETY: the unmasked lanes are columns 0..W of rows 0..H.
                    *v = _mm512_maskz_loadu_ps(mask, xc.wrapping_add(i * w + kw));
                }
            }
            for kh in 0..3 {
                let wt = tap_weights(wc, kh * 3 + kw);
                for r in 0..R {
                    fma_channels::<P, R>(&mut acc, &wt, xs[step * r + kh], r);
                }
            }
        }
    }
    for (o, rows) in acc.iter().enumerate() {
        for (r, v) in rows.iter().enumerate() {
            // SAFETY: rows r0 + step*r (.. +step) < H of channel kb*4 + o, 16 outputs.
            _mm512_storeu_ps(
                y_block.add(o * plane + (r0 + step * r) * w + col * LANES),
                *v,
            );
        }
    }
}

#[inline(always)]
unsafe fn forward_image<P: Products>(
    xp: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    let plane = (g.h + 2) * (g.w + 2);
    let map = Tiles::new(g);
    let tiles = map.count(g.oh);
    assert!(xp.len() >= g.c * plane && wp.len() == g.k * g.c * 9 && y.len() == g.k * g.oh * g.ow);
    if let Some(b) = bias {
        assert!(b.len() == g.k);
    }
    for kb in 0..g.k / OCB {
        let w_block = &wp[kb * g.c * 9 * OCB..(kb + 1) * g.c * 9 * OCB];
        let b4 = block_bias(bias, kb);
        let mut t0 = 0;
        while t0 + TILES <= tiles {
            block::<P, TILES>(xp, w_block, g, map, t0, b4, kb, y);
            t0 += TILES;
        }
        while t0 < tiles {
            block::<P, 1>(xp, w_block, g, map, t0, b4, kb, y);
            t0 += 1;
        }
    }
}

/// Computes `T` tiles starting at tile `t0` for output channels `kb*4 .. kb*4+4`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<P: Products, const T: usize>(
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
                let wt = tap_weights(wc, kh * 3 + kw);
                for (t, &off) in offs.iter().enumerate() {
                    let xv = map.load(xc.add(off + Tiles::tap(kh, kw, pw)));
                    fma_channels::<P, T>(&mut acc, &wt, xv, t);
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
            // Padded column j+1: odd columns (even j) to the odd half, even ones to the even.
            let (even, odd) = xp[row..row + pw].split_at_mut(half);
            for (j, pair) in src.chunks_exact(2).enumerate() {
                odd[j] = pair[0];
                even[j + 1] = pair[1];
            }
        }
    }
}

/// Input channels (planes of `dx`) per block of the stride-2 input gradient.
const ICB: usize = 2;
/// Tiles of 16 `dy` values per block of the stride-2 input gradient.
const S2_TILES: usize = 2;

/// True when [`backward_input_s2`] computes `conv2d_backward_input` for `g`: the stride-2
/// geometries of [`applies`] with a multiple of 2 input channels.
pub fn input_grad_s2_applies(g: &ConvGeom) -> bool {
    applies(g) && g.stride == (2, 2) && g.c.is_multiple_of(ICB)
}

/// `dx = conv2d_input_grad(dy, w)` for a 3x3, padding-1, stride-2 convolution where
/// [`input_grad_s2_applies`] holds, without im2col's `[C*9, OH*OW]` matrix and its col2im.
///
/// Input pixel `(2m + p, 2n + q)` only receives from the taps whose parity fits: row tap 1
/// (from `dy` row `m`) when `p = 0`, row taps 0 (row `m + 1`) and 2 (row `m`) when `p = 1`,
/// and the same for columns. So the four parity phases of `dx` are four small stride-1
/// convolutions of `dy` (1x1, 1x2, 2x1 and 2x2 taps, 9 in all: the forward pass's
/// arithmetic), which share every `dy` vector they load: `dy[m, n]`, `dy[m, n+1]`,
/// `dy[m+1, n]` and `dy[m+1, n+1]` for 16 positions `n` (or two 8-wide rows), with the
/// column right of the image and the row below it masked to zero. The even and odd columns
/// of a phase are interleaved on the way out, and every `dx` value is written once.
pub fn backward_input_s2(dy: &[f32], w: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    assert!(
        input_grad_s2_applies(g),
        "conv_direct::backward_input_s2 called for {g:?}"
    );
    let (in_image, out_image) = (g.c * g.h * g.w, g.k * g.oh * g.ow);
    assert!(dy.len() == g.n * out_image && w.len() == g.k * g.c * 9 && dx.len() == g.n * in_image);
    let packed = pack_input_grad_s2_weights(w, g);
    dx.par_chunks_mut(in_image)
        .zip(dy.par_chunks(out_image))
        .for_each(|(dx_img, dy_img)| {
            // SAFETY: `applies` checked that the CPU has AVX-512F; the sizes were asserted
            // above.
            unsafe { input_grad_image_s2_f32(dy_img, &packed, g, dx_img) };
        });
}

/// `w [K, C, 3, 3]` -> `[C/ICB, K, 9, ICB]`: a block's input channels side by side, as
/// [`backward_input_s2`]'s kernel reads them.
pub(crate) fn pack_input_grad_s2_weights(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    pack_blocks::<ICB>(w, g.c, g.k, |c, k| (k * g.c + c) * 9)
}

/// [`input_grad_image_s2`] on float32 planes.
#[target_feature(enable = "avx512f")]
unsafe fn input_grad_image_s2_f32(dy: &[f32], wp: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    input_grad_image_s2::<Float32>(dy, wp, g, dx)
}

/// One image of [`backward_input_s2`] with bf16 products and float32 sums: `dy` is the
/// image's output gradient as `[K2, OH, OW]` words that each hold two bf16 values, channel
/// `2i` in the low half and `2i + 1` in the high one (see [`Bf16Pairs`]); `wp` is
/// [`pack_input_grad_s2_weights`] of the weights as `[K2, C, 3, 3]` words paired the same
/// way; `g` is the geometry with `K2` output channels, one where [`input_grad_s2_applies`]
/// holds.
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn input_grad_image_s2_bf16_pairs(
    dy: &[u32],
    wp: &[f32],
    g: &ConvGeom,
    dx: &mut [f32],
) {
    assert!(input_grad_s2_applies(g));
    assert!(dy.len() == g.k * g.oh * g.ow && wp.len() == g.k * g.c * 9);
    assert!(dx.len() == g.c * g.h * g.w);
    input_grad_image_s2::<Bf16Pairs>(as_words(dy), wp, g, dx)
}

#[inline(always)]
unsafe fn input_grad_image_s2<P: Products>(dy: &[f32], wp: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    let map = Tiles::new(g);
    let tiles = map.count(g.oh);
    for cb in 0..g.c / ICB {
        let w_block = wp.as_ptr().add(cb * g.k * 9 * ICB);
        let mut t0 = 0;
        while t0 + S2_TILES <= tiles {
            phase_block::<P, S2_TILES>(dy, w_block, g, map, t0, cb, dx);
            t0 += S2_TILES;
        }
        while t0 < tiles {
            phase_block::<P, 1>(dy, w_block, g, map, t0, cb, dx);
            t0 += 1;
        }
    }
}

/// The four parity phases of `dx` for `T` tiles of `dy` from tile `t0`, input channels
/// `cb*ICB .. cb*ICB+ICB` (see [`backward_input_s2`]). Phases are indexed `2p + q`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices keep the loops simple enough to unroll
unsafe fn phase_block<P: Products, const T: usize>(
    dy: &[f32],
    w_block: *const f32,
    g: &ConvGeom,
    map: Tiles,
    t0: usize,
    cb: usize,
    dx: &mut [f32],
) {
    let ohw = g.oh * g.ow;
    // Each tile's first `dy` offset, and the lanes of its right (`n + 1`) and lower
    // (`m + 1`) neighbours that lie inside the image.
    let mut offs = [0usize; T];
    let mut right = [0xffff as __mmask16; T];
    let mut below = [0xffff as __mmask16; T];
    for t in 0..T {
        let off = map.offsets(t0 + t).1;
        offs[t] = off;
        let (row, col) = (off / g.ow, off % g.ow);
        if map.paired {
            // Lanes 7 and 15 end their rows; the second row of the last pair is the last.
            right[t] = 0x7f7f;
            if row + 2 == g.oh {
                below[t] = 0x00ff;
            }
        } else {
            if col + LANES == g.ow {
                right[t] = 0x7fff;
            }
            if row + 1 == g.oh {
                below[t] = 0;
            }
        }
    }
    let mut acc = [[[_mm512_setzero_ps(); 4]; ICB]; T];
    let dyb = dy.as_ptr();
    for k in 0..g.k {
        let mut v = [[_mm512_setzero_ps(); 4]; T];
        for t in 0..T {
            // Pointers are formed with wrapping arithmetic: the neighbours of the last row
            // and column may lie past the slice; only unmasked lanes, inside it, are read.
            let p = dyb.wrapping_add(k * ohw + offs[t]);
            v[t] = [
                _mm512_loadu_ps(p),
                _mm512_maskz_loadu_ps(right[t], p.wrapping_add(1)),
                _mm512_maskz_loadu_ps(below[t], p.wrapping_add(g.ow)),
                _mm512_maskz_loadu_ps(right[t] & below[t], p.wrapping_add(g.ow + 1)),
            ];
        }
        let wk = w_block.add(k * 9 * ICB);
        for o in 0..ICB {
            let wt = |tap: usize| _mm512_set1_ps(*wk.add(tap * ICB + o));
            let (w0, w1, w2, w3, w4) = (wt(0), wt(1), wt(2), wt(3), wt(4));
            let (w5, w6, w7, w8) = (wt(5), wt(6), wt(7), wt(8));
            for t in 0..T {
                let [here, next_col, next_row, diag] = v[t];
                let a = &mut acc[t][o];
                a[0] = P::mul_add(w4, here, a[0]);
                a[1] = P::mul_add(w3, next_col, P::mul_add(w5, here, a[1]));
                a[2] = P::mul_add(w1, next_row, P::mul_add(w7, here, a[2]));
                a[3] = P::mul_add(
                    w0,
                    diag,
                    P::mul_add(
                        w2,
                        next_row,
                        P::mul_add(w6, next_col, P::mul_add(w8, here, a[3])),
                    ),
                );
            }
        }
    }
    // Interleaving the even-column (q = 0) and odd-column phases: lanes 0-7 of each give 16
    // consecutive columns, lanes 8-15 the next 16 (16-wide tiles) or the next row's (pairs).
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let hi_step = if map.paired { 2 * g.w } else { LANES };
    let dxp = dx.as_mut_ptr();
    for t in 0..T {
        let (row, col) = (offs[t] / g.ow, offs[t] % g.ow);
        for o in 0..ICB {
            let plane = dxp.add((cb * ICB + o) * g.h * g.w);
            for p in 0..2 {
                let (even, odd) = (acc[t][o][2 * p], acc[t][o][2 * p + 1]);
                let at = (2 * row + p) * g.w + 2 * col;
                // SAFETY: input rows 2*row + p (and, paired, 2*row + 2 + p) < H, 16 columns
                // from 2*col (and 2*col + 16 < W for 16-wide tiles) of channel cb*ICB + o.
                _mm512_storeu_ps(plane.add(at), _mm512_permutex2var_ps(even, lo, odd));
                _mm512_storeu_ps(
                    plane.add(at + hi_step),
                    _mm512_permutex2var_ps(even, hi, odd),
                );
            }
        }
    }
}

/// `dw = conv2d_weight_grad(x, dy)` summed over the batch, for geometries where [`applies`]
/// holds. For each pair of output channels and each input channel, 18 vector accumulators (2
/// channels x 9 taps) run over every output vector of a thread's images (`weight_rows`,
/// `weight_row_pairs` for 8-wide rows, `weight_images` at stride 2); the lanes are summed
/// once at the end. Threads take contiguous runs of images and add their partial sums.
pub fn backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    assert!(applies(g), "conv_direct::backward_weight called for {g:?}");
    let plane = (g.h + 2) * (g.w + 2);
    let in_image = g.c * g.h * g.w;
    let out_image = g.k * g.oh * g.ow;
    // The row kernel (stride 1) reads the images as they are; the tile kernel (stride 2)
    // needs them zero-bordered.
    let rows = g.stride == (1, 1);
    let chunk = g.n.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = (0..g.n.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let images = part * chunk..((part + 1) * chunk).min(g.n);
            let count = images.len();
            let mut lanes = vec![0f32; g.k * g.c * 9 * LANES];
            let mut xp = vec![0f32; if rows { 0 } else { count * g.c * plane }];
            for (i, n) in images
                .clone()
                .enumerate()
                .take(if rows { 0 } else { count })
            {
                prepare_image(
                    &x[n * in_image..(n + 1) * in_image],
                    g,
                    &mut xp[i * g.c * plane..(i + 1) * g.c * plane],
                );
            }
            // Images are taken a few at a time, as many as keep their inputs and output
            // gradients within about 256 KiB (L2), so each (channel pair, input channel)
            // pass reads from cache while its accumulators span several images.
            let per_image_bytes = 4 * (g.c * plane + out_image);
            let group = (256 * 1024 / per_image_bytes).clamp(1, count.max(1));
            for first in (0..count).step_by(group) {
                let last = (first + group).min(count);
                let dys =
                    &dy[(images.start + first) * out_image..(images.start + last) * out_image];
                if rows {
                    let xs =
                        &x[(images.start + first) * in_image..(images.start + last) * in_image];
                    // SAFETY: `applies` checked AVX-512F; sizes are asserted inside.
                    unsafe { weight_rows_f32(xs, dys, last - first, g, &mut lanes) };
                    continue;
                }
                let xs = &xp[first * g.c * plane..last * g.c * plane];
                // SAFETY: `applies` checked AVX-512F/DQ; sizes are asserted inside.
                unsafe { weight_images_f32(xs, dys, last - first, g, &mut lanes) };
            }
            lanes
        })
        .collect();
    sum_lanes(&partials, dw);
}

/// `dw[i]` = the sum, in float64, of the 16 lane sums `p[16i .. 16i + 16]` of every worker's
/// `p` in `partials` (each `[K, C, 9, 16]`, as the weight-gradient kernels leave them).
pub(crate) fn sum_lanes(partials: &[Vec<f32>], dw: &mut [f32]) {
    for (i, d) in dw.iter_mut().enumerate() {
        let mut s = 0f64;
        for p in partials {
            s += p[i * LANES..(i + 1) * LANES]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>();
        }
        *d = s as f32;
    }
}

/// [`weight_rows`] (or [`weight_row_pairs`] for 8-wide rows) on float32 planes.
#[target_feature(enable = "avx512f")]
unsafe fn weight_rows_f32(xs: &[f32], dys: &[f32], count: usize, g: &ConvGeom, lanes: &mut [f32]) {
    if g.w == LANES / 2 {
        weight_row_pairs::<Float32>(xs, dys, count, g, lanes)
    } else {
        weight_rows::<Float32>(xs, dys, count, g, lanes)
    }
}

/// [`weight_images`] on float32 planes.
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn weight_images_f32(
    xp: &[f32],
    dys: &[f32],
    count: usize,
    g: &ConvGeom,
    lanes: &mut [f32],
) {
    weight_images::<Float32>(xp, dys, count, g, lanes)
}

/// Adds to the lane sums `lanes [K, C, 9, 16]` the weight gradient of `count` pairs of images
/// with bf16 products and float32 sums: `xs [count, C, H, W]` and `dys [count, K, OH, OW]`
/// are words that each hold the same value of two images as bf16, the even image in the low
/// half (see [`Bf16Pairs`]), so each multiply-add instruction sums the products of both
/// images. `g` is the geometry of one image, one where [`weight_grad_applies`] holds. Stride
/// 2 copies the inputs into `xp`, which must then hold `count * C * (H+2) * (W+2)` values
/// with zero borders (only the interiors are written).
///
/// # Safety
/// The CPU has AVX-512F/DQ and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512dq,avx512bf16")]
pub(crate) unsafe fn weight_grad_bf16_image_pairs(
    xs: &[u32],
    dys: &[u32],
    count: usize,
    g: &ConvGeom,
    xp: &mut [f32],
    lanes: &mut [f32],
) {
    assert!(weight_grad_applies(g));
    let (xs, dys) = (as_words(xs), as_words(dys));
    if g.stride != (1, 1) {
        let (image, padded) = (g.c * g.h * g.w, g.c * (g.h + 2) * (g.w + 2));
        let xp = &mut xp[..count * padded];
        for (x_img, xp_img) in xs.chunks_exact(image).zip(xp.chunks_exact_mut(padded)) {
            prepare_image(x_img, g, xp_img);
        }
        weight_images::<Bf16Pairs>(xp, dys, count, g, lanes)
    } else if g.w == LANES / 2 {
        weight_row_pairs::<Bf16Pairs>(xs, dys, count, g, lanes)
    } else {
        weight_rows::<Bf16Pairs>(xs, dys, count, g, lanes)
    }
}

/// Adds the 18 accumulators of output channels `2kp, 2kp+1` and input channel `c` (9 taps
/// each) to the lane partial sums `lanes [K, C, 9, 16]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn add_lanes(lanes: &mut [f32], acc: &[[__m512; 9]; 2], g: &ConvGeom, kp: usize, c: usize) {
    for (o, taps) in acc.iter().enumerate() {
        let at = ((2 * kp + o) * g.c + c) * 9 * LANES;
        for (tap, v) in taps.iter().enumerate() {
            let lane = &mut lanes[at + tap * LANES..at + (tap + 1) * LANES];
            // SAFETY: `lane` holds 16 floats.
            let p = lane.as_mut_ptr();
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
        }
    }
}

/// The planes a stride-1 weight-gradient kernel reads: `count` images' inputs `[count, C, H, W]`
/// and output gradients `[count, K, H, W]`, their sizes (and those of the lane sums `[K, C, 9,
/// 16]`) checked once.
struct StrideOnePlanes {
    x: *const f32,
    dy: *const f32,
    plane: usize,
    c: usize,
    k: usize,
}

impl StrideOnePlanes {
    fn new(xs: &[f32], dys: &[f32], count: usize, g: &ConvGeom, lanes: &[f32]) -> Self {
        let plane = g.h * g.w;
        assert!(g.stride == (1, 1) && (g.oh, g.ow) == (g.h, g.w));
        assert!(xs.len() == count * g.c * plane && dys.len() == count * g.k * plane);
        assert!(lanes.len() == g.k * g.c * 9 * LANES && g.k.is_multiple_of(2));
        StrideOnePlanes {
            x: xs.as_ptr(),
            dy: dys.as_ptr(),
            plane,
            c: g.c,
            k: g.k,
        }
    }

    /// Image `n`'s input plane `c` and its output-gradient planes `2kp` and `2kp + 1`.
    ///
    /// # Safety
    /// `n < count`, `c < C`, `kp < K / 2`.
    #[inline(always)]
    unsafe fn at(&self, n: usize, c: usize, kp: usize) -> (*const f32, [*const f32; 2]) {
        let d = self.dy.add((n * self.k + 2 * kp) * self.plane);
        (
            self.x.add((n * self.c + c) * self.plane),
            [d, d.add(self.plane)],
        )
    }
}

/// Adds to the lane partial sums `lanes [K, C, 9, 16]` the weight gradient of `count` images
/// at stride 1 with output rows a multiple of 16 wide: inputs `xs [count, C, H, W]` as they
/// are, output gradients `dys [count, K, H, W]`.
///
/// For each pair of output channels and each input channel, 18 accumulators (2 channels x 9
/// taps) run down every 16-wide column of every image one input row at a time: the row's
/// three column taps are loaded (the columns outside the image masked out), and the output
/// gradient rows it meets through the three row taps (the rows below, at and above it) stay
/// in registers as a window that moves one row per step: 5 loads per 18 multiply-adds.
#[inline(always)]
unsafe fn weight_rows<P: Products>(
    xs: &[f32],
    dys: &[f32],
    count: usize,
    g: &ConvGeom,
    lanes: &mut [f32],
) {
    let (h, w) = (g.h, g.w);
    assert!(w.is_multiple_of(LANES));
    let planes = StrideOnePlanes::new(xs, dys, count, g, lanes);
    let cols = w / LANES;
    let zero = _mm512_setzero_ps();
    for kp in 0..g.k / 2 {
        for c in 0..g.c {
            let mut acc = [[zero; 9]; 2];
            for n in 0..count {
                let (x_plane, d_plane) = planes.at(n, c, kp);
                for col in 0..cols {
                    let masks: [__mmask16; 3] = [
                        if col == 0 { 0xfffe } else { 0xffff },
                        0xffff,
                        if col + 1 == cols { 0x7fff } else { 0xffff },
                    ];
                    // SAFETY (all loads below): rows 0..H of the planes, columns
                    // 16*col-1 ..= 16*col+16 of which only those inside the row are unmasked.
                    let dy_row =
                        |o: usize, r: usize| _mm512_loadu_ps(d_plane[o].add(r * w + col * LANES));
                    // Output-gradient rows i+1, i and i-1 for input row i (row taps 0, 1, 2).
                    let mut below = [dy_row(0, 0), dy_row(1, 0)];
                    let mut at = [zero; 2];
                    let mut above;
                    for i in 0..h {
                        above = at;
                        at = below;
                        below = if i + 1 < h {
                            [dy_row(0, i + 1), dy_row(1, i + 1)]
                        } else {
                            [zero; 2]
                        };
                        let row = x_plane.add(i * w + col * LANES).wrapping_sub(1);
                        for kw in 0..3 {
                            let xv = _mm512_maskz_loadu_ps(masks[kw], row.wrapping_add(kw));
                            for o in 0..2 {
                                acc[o][kw] = P::mul_add(below[o], xv, acc[o][kw]);
                                acc[o][3 + kw] = P::mul_add(at[o], xv, acc[o][3 + kw]);
                                acc[o][6 + kw] = P::mul_add(above[o], xv, acc[o][6 + kw]);
                            }
                        }
                    }
                }
            }
            add_lanes(lanes, &acc, g, kp, c);
        }
    }
}

/// [`weight_rows`] for 8-wide images (`H` even): a vector holds two consecutive rows, which
/// in an 8-wide plane are 16 consecutive floats. For output-gradient rows `2j, 2j+1` the row
/// taps read input rows `2j-1, 2j` (tap 0), `2j, 2j+1` (tap 1) and `2j+1, 2j+2` (tap 2); tap
/// 2's vectors are the next pair's tap 0. Each step loads the two output-gradient vectors and
/// two input vectors (rows `2j, 2j+1`, aligned, and `2j+1, 2j+2`) and makes the column taps
/// of each by rotating it one lane within the register ([`shift_columns`]): 4 loads and 4
/// lane rotations per 18 multiply-adds, where loading each column tap would take 6 loads,
/// 5 of them split across cache lines.
#[inline(always)]
unsafe fn weight_row_pairs<P: Products>(
    xs: &[f32],
    dys: &[f32],
    count: usize,
    g: &ConvGeom,
    lanes: &mut [f32],
) {
    let (h, w) = (g.h, g.w);
    assert!(w == LANES / 2 && h.is_multiple_of(2));
    let planes = StrideOnePlanes::new(xs, dys, count, g, lanes);
    let pairs = h / 2;
    let zero = _mm512_setzero_ps();
    for kp in 0..g.k / 2 {
        for c in 0..g.c {
            let mut acc = [[zero; 9]; 2];
            for n in 0..count {
                let (x_plane, d_plane) = planes.at(n, c, kp);
                // Tap 0 of the first pair: rows -1 and 0, of which row -1 (the low half) is
                // padding. SAFETY: the unmasked lanes are row 0.
                let mut up = shift_columns(_mm512_maskz_loadu_ps(
                    0xff00,
                    x_plane.wrapping_sub(LANES / 2),
                ));
                for j in 0..pairs {
                    // SAFETY (all loads): rows 2j .. 2j+2 of the planes; row H (the high half
                    // of the last pair's tap 2) is masked out.
                    let d = [
                        _mm512_loadu_ps(d_plane[0].add(j * LANES)),
                        _mm512_loadu_ps(d_plane[1].add(j * LANES)),
                    ];
                    let mid = shift_columns(_mm512_loadu_ps(x_plane.add(j * LANES)));
                    let down_at = x_plane.add(j * LANES + LANES / 2);
                    let down = shift_columns(if j + 1 < pairs {
                        _mm512_loadu_ps(down_at)
                    } else {
                        _mm512_maskz_loadu_ps(0x00ff, down_at)
                    });
                    for kw in 0..3 {
                        for o in 0..2 {
                            acc[o][kw] = P::mul_add(d[o], up[kw], acc[o][kw]);
                            acc[o][3 + kw] = P::mul_add(d[o], mid[kw], acc[o][3 + kw]);
                            acc[o][6 + kw] = P::mul_add(d[o], down[kw], acc[o][6 + kw]);
                        }
                    }
                    up = down;
                }
            }
            add_lanes(lanes, &acc, g, kp, c);
        }
    }
}

/// The three column taps of two 8-wide rows held in one vector: lane `i` of tap `kw` is
/// column `i % 8 + kw - 1` of its row, zero where that is outside the row (column -1 of tap
/// 0, column 8 of tap 2).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn shift_columns(v: __m512) -> [__m512; 3] {
    let i = _mm512_castps_si512(v);
    [
        _mm512_castsi512_ps(_mm512_maskz_alignr_epi32::<15>(0xfefe, i, i)),
        v,
        _mm512_castsi512_ps(_mm512_maskz_alignr_epi32::<1>(0x7f7f, i, i)),
    ]
}

/// Adds to the lane partial sums `lanes [K, C, 9, 16]` the weight gradient of `count` images:
/// padded inputs `xp [count, C, H+2, W+2]`, output gradients `dys [count, K, OH, OW]`.
#[inline(always)]
unsafe fn weight_images<P: Products>(
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
                            let xv = map.load(base.add(Tiles::tap(kh, kw, pw)));
                            acc[0][kh * 3 + kw] = P::mul_add(d0, xv, acc[0][kh * 3 + kw]);
                            acc[1][kh * 3 + kw] = P::mul_add(d1, xv, acc[1][kh * 3 + kw]);
                        }
                    }
                }
            }
            add_lanes(lanes, &acc, g, kp, c);
        }
    }
}
