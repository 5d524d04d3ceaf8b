//! Float32 inference kernels on channels-last images, for the inference plan: a direct
//! convolution with a fused epilogue (bias, residual, activation), a depthwise convolution,
//! and the pooling, addition and shortcut ops between them. Each works on one image in the
//! plan's layout and on a range of output rows, so the plan can split an image or a batch
//! over threads. Mirrors `torch.nn.functional.conv2d` (+ add + activation) in eval mode.
//!
//! Layout ([`Plane`]): an image `[H, W, C]` stored row-major with a channel stride `cs >= C`
//! (a multiple of 16 for every value but the model input) and a zero border of `halo` rows
//! and columns, so a convolution with padding up to the halo reads no out-of-bounds tap.
//!
//! Direct convolution: the weights are packed `[K/16][KH][KW][C][16]` (the last block padded
//! with zero channels); a tile of `R` consecutive output pixels x `B` blocks of 16 output
//! channels keeps `R * B` accumulators in registers while the loop runs over the taps and
//! input channels, broadcasting each input value once for `B` blocks and loading each
//! weight vector once for `R` pixels. `R` and `B` are chosen so that `R * B + B + 1` fit in
//! the 32 AVX-512 registers. Without AVX-512 the same loops run on plain arrays.
//!
//! The reference [`conv_reference`] computes the same result naively, in NCHW terms.

use crate::backend::cpu::activation::Activation;
use std::ops::Range;

/// Lanes of one AVX-512 vector of floats: the block of output channels.
pub const LANES: usize = 16;

/// Where an image lives in a buffer: `[H, W, C]` with channel stride `cs` inside a zero
/// border of `halo` rows and columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Plane {
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Channel stride (floats between neighbouring pixels).
    pub cs: usize,
    /// Zero border on every side, in pixels.
    pub halo: usize,
}

impl Plane {
    /// Floats between rows.
    pub fn row_stride(&self) -> usize {
        (self.w + 2 * self.halo) * self.cs
    }
    /// Floats of the whole bordered image.
    pub fn len(&self) -> usize {
        (self.h + 2 * self.halo) * self.row_stride()
    }
    /// True for an empty image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Offset of pixel (`y`, `x`) of the interior; `y` and `x` may reach into the border.
    pub fn at(&self, y: isize, x: isize) -> usize {
        let y = (y + self.halo as isize) as usize;
        let x = (x + self.halo as isize) as usize;
        y * self.row_stride() + x * self.cs
    }
}

/// A convolution (groups 1) between two planes.
#[derive(Clone, Copy, Debug)]
pub struct DirectConv {
    /// Input plane.
    pub input: Plane,
    /// Output plane.
    pub output: Plane,
    /// Kernel (height, width).
    pub kernel: (usize, usize),
    /// Stride.
    pub stride: (usize, usize),
    /// Zero padding (at most the input's halo).
    pub padding: (usize, usize),
    /// Dilation.
    pub dilation: (usize, usize),
}

/// Weights packed for [`DirectConv`]: `[ceil(K/16)][KH][KW][C][16]`, with the bias padded
/// to whole blocks.
#[derive(Clone, Debug)]
pub struct PackedConv {
    /// Packed weights.
    pub weights: Vec<f32>,
    /// Bias `[ceil(K/16) * 16]`.
    pub bias: Vec<f32>,
    /// Output channels K.
    pub k: usize,
    /// Input channels C.
    pub c: usize,
    /// Kernel (height, width).
    pub kernel: (usize, usize),
    /// The same kernel transformed for Winograd's F(2x2, 3x3), where the plan chose it
    /// ([`PackedConv::with_winograd`]).
    pub winograd: Option<super::winograd::PackedWinograd>,
}

impl PackedConv {
    /// Packs PyTorch-layout weights `[K, C, KH, KW]` and an optional bias `[K]`.
    pub fn new(
        weight: &[f32],
        bias: Option<&[f32]>,
        k: usize,
        c: usize,
        kernel: (usize, usize),
    ) -> PackedConv {
        let (kh, kw) = kernel;
        assert_eq!(weight.len(), k * c * kh * kw, "weight size");
        let blocks = k.div_ceil(LANES);
        let mut packed = vec![0.0; blocks * kh * kw * c * LANES];
        for o in 0..k {
            let (blk, lane) = (o / LANES, o % LANES);
            for ci in 0..c {
                for i in 0..kh {
                    for j in 0..kw {
                        let dst = (((blk * kh + i) * kw + j) * c + ci) * LANES + lane;
                        packed[dst] = weight[((o * c + ci) * kh + i) * kw + j];
                    }
                }
            }
        }
        let mut b = vec![0.0; blocks * LANES];
        if let Some(bias) = bias {
            b[..k].copy_from_slice(&bias[..k]);
        }
        PackedConv {
            weights: packed,
            bias: b,
            k,
            c,
            kernel,
            winograd: None,
        }
    }

    /// Adds the Winograd form of the kernel (PyTorch-layout `weight`), which [`conv_rows`]
    /// then runs on whole tiles of two output rows.
    pub fn with_winograd(mut self, weight: &[f32]) -> PackedConv {
        self.winograd = Some(super::winograd::PackedWinograd::new(weight, self.k, self.c));
        self
    }

    fn block_len(&self) -> usize {
        self.kernel.0 * self.kernel.1 * self.c * LANES
    }

    /// The weights back in PyTorch's layout `[K, C, KH, KW]`.
    ///
    /// ```
    /// use convnet::backend::cpu::nhwc::PackedConv;
    /// let w: Vec<f32> = (0..2 * 3 * 2 * 2).map(|v| v as f32).collect();
    /// assert_eq!(PackedConv::new(&w, None, 2, 3, (2, 2)).unpack(), w);
    /// ```
    pub fn unpack(&self) -> Vec<f32> {
        let (kh, kw) = self.kernel;
        let mut w = vec![0.0; self.k * self.c * kh * kw];
        for o in 0..self.k {
            let (blk, lane) = (o / LANES, o % LANES);
            for ci in 0..self.c {
                for i in 0..kh {
                    for j in 0..kw {
                        w[((o * self.c + ci) * kh + i) * kw + j] =
                            self.weights[(((blk * kh + i) * kw + j) * self.c + ci) * LANES + lane];
                    }
                }
            }
        }
        w
    }
}

/// The epilogue of a convolution: an optional residual plane added to the output, then an
/// optional activation.
#[derive(Clone, Copy, Debug)]
pub struct Epilogue<'a> {
    /// The residual's buffer and plane (same H, W, C as the output).
    pub residual: Option<(&'a [f32], Plane)>,
    /// Activation.
    pub act: Option<Activation>,
}

/// Register tiles: (pixels `R`, channel blocks `B`) with `R * B + B + 1 <= 32`.
fn max_pixels(blocks: usize) -> usize {
    match blocks {
        1 => 28,
        2 => 12,
        3 => 8,
        _ => 6,
    }
}

/// The widest channel-block group a tile takes.
const MAX_BLOCKS: usize = 4;

/// Geometry the tile kernels read, in floats.
#[derive(Clone, Copy)]
struct Tile {
    kh: usize,
    kw: usize,
    c: usize,
    /// Input offset between consecutive output pixels.
    pix: usize,
    /// Input offset per kernel row / column.
    tap_h: usize,
    tap_w: usize,
    /// Weight offset between channel blocks.
    wblock: usize,
    out_pix: usize,
    res_pix: usize,
}

/// The part of an output plane a kernel call may write: `data` holds the plane's floats
/// from offset `offset` on (a whole plane, or the rows one thread writes).
pub struct OutRows<'a> {
    /// The floats.
    pub data: &'a mut [f32],
    /// Plane offset of `data[0]`.
    pub offset: usize,
}

impl<'a> OutRows<'a> {
    /// A whole plane.
    pub fn whole(data: &'a mut [f32]) -> Self {
        OutRows { data, offset: 0 }
    }

    /// Splits a whole plane's buffer into the parts holding rows `..mid` and `mid..`.
    pub fn split(data: &'a mut [f32], plane: Plane, mid: usize) -> (Self, Self) {
        let at = plane.at(mid as isize, -(plane.halo as isize));
        let (a, b) = data.split_at_mut(at);
        (
            OutRows { data: a, offset: 0 },
            OutRows {
                data: b,
                offset: at,
            },
        )
    }

    /// Checks that rows `rows` of `plane` lie inside.
    fn check(&self, plane: Plane, rows: &Range<usize>) {
        if rows.is_empty() {
            return;
        }
        let first = plane.at(rows.start as isize, 0);
        let end = plane.at(rows.end as isize - 1, plane.w as isize);
        assert!(
            first >= self.offset && end <= self.offset + self.data.len(),
            "rows inside the output part"
        );
    }
}

/// Output rows `rows` of `conv` for one image: `input` holds the input plane, `out` the
/// output plane's rows (only the interior is written).
pub fn conv_rows(
    conv: &DirectConv,
    packed: &PackedConv,
    input: &[f32],
    epilogue: Epilogue,
    out: OutRows,
    rows: Range<usize>,
) {
    if let Some(wino) = &packed.winograd {
        if rows.start.is_multiple_of(2) && rows.end.is_multiple_of(2) && use_avx512() {
            return super::winograd::conv_rows(
                conv,
                wino,
                &packed.bias,
                input,
                epilogue,
                out,
                rows,
            );
        }
    }
    let (ip, op) = (conv.input, conv.output);
    assert!(input.len() >= ip.len(), "plane sizes");
    out.check(op, &rows);
    assert!(
        conv.padding.0 <= ip.halo && conv.padding.1 <= ip.halo,
        "padding within the halo"
    );
    assert!(packed.c == ip.c && packed.k == op.c && op.cs >= packed.k.div_ceil(LANES) * LANES);
    let (kh, kw) = packed.kernel;
    // The last tap of the last output pixel must stay inside the bordered input.
    let last_y = (op.h - 1) * conv.stride.0 + (kh - 1) * conv.dilation.0;
    let last_x = (op.w - 1) * conv.stride.1 + (kw - 1) * conv.dilation.1;
    assert!(
        last_y < ip.h + ip.halo + conv.padding.0 && last_x < ip.w + ip.halo + conv.padding.1,
        "taps inside the input"
    );
    assert!(rows.end <= op.h);
    if let Some((r, rp)) = epilogue.residual {
        assert!(r.len() >= rp.len() && (rp.h, rp.w) == (op.h, op.w) && rp.c >= op.c);
    }
    let t = Tile {
        kh,
        kw,
        c: packed.c,
        pix: conv.stride.1 * ip.cs,
        tap_h: conv.dilation.0 * ip.row_stride(),
        tap_w: conv.dilation.1 * ip.cs,
        wblock: packed.block_len(),
        out_pix: op.cs,
        res_pix: epilogue.residual.map_or(0, |(_, p)| p.cs),
    };
    let blocks = packed.k.div_ceil(LANES);
    let fast = use_avx512();
    for oy in rows {
        let iy = (oy * conv.stride.0) as isize - conv.padding.0 as isize;
        let mut b0 = 0;
        while b0 < blocks {
            let nb = (blocks - b0).min(MAX_BLOCKS);
            let rmax = max_pixels(nb);
            let tiles = op.w.div_ceil(rmax);
            let r = op.w.div_ceil(tiles);
            let mut ox = 0;
            while ox < op.w {
                let n = r.min(op.w - ox);
                let ix = (ox * conv.stride.1) as isize - conv.padding.1 as isize;
                let x_off = ip.at(iy, ix);
                let o_off = op.at(oy as isize, ox as isize) + b0 * LANES - out.offset;
                let w_off = b0 * t.wblock;
                let bias = &packed.bias[b0 * LANES..];
                let res = epilogue
                    .residual
                    .map(|(r, rp)| &r[rp.at(oy as isize, ox as isize) + b0 * LANES..]);
                // SAFETY: the asserts above bound every tap of every tile: the input
                // offsets stay inside the bordered plane, the output and residual offsets
                // inside theirs, the weights inside the packed blocks.
                unsafe {
                    tile(
                        fast,
                        n,
                        nb,
                        &t,
                        input.as_ptr().add(x_off),
                        packed.weights.as_ptr().add(w_off),
                        bias.as_ptr(),
                        res.map(|r| r.as_ptr()),
                        epilogue.act,
                        out.data.as_mut_ptr().add(o_off),
                    );
                }
                ox += n;
            }
            b0 += nb;
        }
    }
}

/// True when the AVX-512 tiles run (and the plain ones otherwise).
pub fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !FORCE_PORTABLE.with(|f| f.get()) && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    static FORCE_PORTABLE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the kernels of this module, called on this thread, take their portable path (for
/// tests on machines with AVX-512); returns the previous setting.
pub fn force_portable(on: bool) -> bool {
    FORCE_PORTABLE.with(|f| f.replace(on))
}

macro_rules! dispatch_tile {
    ($f:ident, $n:expr, $nb:expr, $($args:expr),*) => {
        match ($nb, $n) {
            (1, 1) => $f::<1, 1>($($args),*), (1, 2) => $f::<2, 1>($($args),*),
            (1, 3) => $f::<3, 1>($($args),*), (1, 4) => $f::<4, 1>($($args),*),
            (1, 5) => $f::<5, 1>($($args),*), (1, 6) => $f::<6, 1>($($args),*),
            (1, 7) => $f::<7, 1>($($args),*), (1, 8) => $f::<8, 1>($($args),*),
            (1, 9) => $f::<9, 1>($($args),*), (1, 10) => $f::<10, 1>($($args),*),
            (1, 11) => $f::<11, 1>($($args),*), (1, 12) => $f::<12, 1>($($args),*),
            (1, 13) => $f::<13, 1>($($args),*), (1, 14) => $f::<14, 1>($($args),*),
            (1, 15) => $f::<15, 1>($($args),*), (1, 16) => $f::<16, 1>($($args),*),
            (1, 17) => $f::<17, 1>($($args),*), (1, 18) => $f::<18, 1>($($args),*),
            (1, 19) => $f::<19, 1>($($args),*), (1, 20) => $f::<20, 1>($($args),*),
            (1, 21) => $f::<21, 1>($($args),*), (1, 22) => $f::<22, 1>($($args),*),
            (1, 23) => $f::<23, 1>($($args),*), (1, 24) => $f::<24, 1>($($args),*),
            (1, 25) => $f::<25, 1>($($args),*), (1, 26) => $f::<26, 1>($($args),*),
            (1, 27) => $f::<27, 1>($($args),*), (1, _) => $f::<28, 1>($($args),*),
            (2, 1) => $f::<1, 2>($($args),*), (2, 2) => $f::<2, 2>($($args),*),
            (2, 3) => $f::<3, 2>($($args),*), (2, 4) => $f::<4, 2>($($args),*),
            (2, 5) => $f::<5, 2>($($args),*), (2, 6) => $f::<6, 2>($($args),*),
            (2, 7) => $f::<7, 2>($($args),*), (2, 8) => $f::<8, 2>($($args),*),
            (2, 9) => $f::<9, 2>($($args),*), (2, 10) => $f::<10, 2>($($args),*),
            (2, 11) => $f::<11, 2>($($args),*), (2, _) => $f::<12, 2>($($args),*),
            (3, 1) => $f::<1, 3>($($args),*), (3, 2) => $f::<2, 3>($($args),*),
            (3, 3) => $f::<3, 3>($($args),*), (3, 4) => $f::<4, 3>($($args),*),
            (3, 5) => $f::<5, 3>($($args),*), (3, 6) => $f::<6, 3>($($args),*),
            (3, 7) => $f::<7, 3>($($args),*), (3, _) => $f::<8, 3>($($args),*),
            (_, 1) => $f::<1, 4>($($args),*), (_, 2) => $f::<2, 4>($($args),*),
            (_, 3) => $f::<3, 4>($($args),*), (_, 4) => $f::<4, 4>($($args),*),
            (_, 5) => $f::<5, 4>($($args),*), (_, _) => $f::<6, 4>($($args),*),
        }
    };
}

/// `out [T, kp] = x [T, c] @ w` for `T` rows of `x` (`c` apart) and `w` packed as a 1x1
/// [`PackedConv`] (`[blocks][c][16]`), `out`'s rows `kp` apart: the convolution's register
/// tiles with the rows as pixels.
///
/// # Safety
/// The pointers must cover those extents, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn matmul_tiles(
    x: *const f32,
    rows: usize,
    c: usize,
    w: *const f32,
    blocks: usize,
    out: *mut f32,
    kp: usize,
) {
    static ZERO_BIAS: [f32; MAX_BLOCKS * LANES] = [0.0; MAX_BLOCKS * LANES];
    let t = Tile {
        kh: 1,
        kw: 1,
        c,
        pix: c,
        tap_h: 0,
        tap_w: 0,
        wblock: c * LANES,
        out_pix: kp,
        res_pix: 0,
    };
    let mut b0 = 0;
    while b0 < blocks {
        let nb = (blocks - b0).min(MAX_BLOCKS);
        let tiles = rows.div_ceil(max_pixels(nb));
        let r = rows.div_ceil(tiles);
        let mut row = 0;
        while row < rows {
            let n = r.min(rows - row);
            dispatch_tile!(
                tile_avx512,
                n,
                nb,
                &t,
                x.add(row * c),
                w.add(b0 * t.wblock),
                ZERO_BIAS.as_ptr(),
                None,
                None,
                out.add(row * kp + b0 * LANES)
            );
            row += n;
        }
        b0 += nb;
    }
}

/// Stores `act(v)` at `out` (16 floats).
///
/// # Safety
/// `out` must hold 16 floats, on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_activated(
    v: std::arch::x86_64::__m512,
    act: Option<Activation>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    match act {
        None => _mm512_storeu_ps(out, v),
        Some(Activation::Relu) => _mm512_storeu_ps(out, relu(v, zero)),
        Some(Activation::Relu6) => {
            _mm512_storeu_ps(out, _mm512_min_ps(_mm512_set1_ps(6.0), relu(v, zero)))
        }
        Some(other) => {
            _mm512_storeu_ps(out, v);
            act_lanes(Some(other), &mut *(out as *mut [f32; LANES]));
        }
    }
}

/// One tile of `n` pixels x `nb` channel blocks.
///
/// # Safety
/// The pointers must cover every offset the tile reads and writes (see [`conv_rows`]).
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    fast: bool,
    n: usize,
    nb: usize,
    t: &Tile,
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    res: Option<*const f32>,
    act: Option<Activation>,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    if fast {
        dispatch_tile!(tile_avx512, n, nb, t, x, w, bias, res, act, out);
        return;
    }
    let _ = fast;
    dispatch_tile!(tile_portable, n, nb, t, x, w, bias, res, act, out);
}

/// Applies `act` to 16 values in place.
#[inline(always)]
fn act_lanes(act: Option<Activation>, v: &mut [f32; LANES]) {
    if let Some(a) = act {
        for x in v.iter_mut() {
            *x = a.apply(*x);
        }
    }
}

/// # Safety
/// As [`tile`].
unsafe fn tile_portable<const R: usize, const B: usize>(
    t: &Tile,
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    res: Option<*const f32>,
    act: Option<Activation>,
    out: *mut f32,
) {
    // Bias last, as in the AVX-512 tile.
    let mut acc = [[[0f32; LANES]; B]; R];
    let mut wp = w;
    for i in 0..t.kh {
        for j in 0..t.kw {
            let xp = x.add(i * t.tap_h + j * t.tap_w);
            for c in 0..t.c {
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = *xp.add(r * t.pix + c);
                    for (b, a) in row.iter_mut().enumerate() {
                        let wv = std::slice::from_raw_parts(wp.add(b * t.wblock), LANES);
                        for l in 0..LANES {
                            a[l] += xv * wv[l];
                        }
                    }
                }
                wp = wp.add(LANES);
            }
        }
    }
    for (r, row) in acc.iter_mut().enumerate() {
        for (b, a) in row.iter_mut().enumerate() {
            let bv = std::slice::from_raw_parts(bias.add(b * LANES), LANES);
            for l in 0..LANES {
                a[l] += bv[l];
            }
            if let Some(res) = res {
                let rv = std::slice::from_raw_parts(res.add(r * t.res_pix + b * LANES), LANES);
                for l in 0..LANES {
                    a[l] += rv[l];
                }
            }
            act_lanes(act, a);
            std::ptr::copy_nonoverlapping(a.as_ptr(), out.add(r * t.out_pix + b * LANES), LANES);
        }
    }
}

/// # Safety
/// As [`tile`], on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const R: usize, const B: usize>(
    t: &Tile,
    x: *const f32,
    w: *const f32,
    bias: *const f32,
    res: Option<*const f32>,
    act: Option<Activation>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    // The sums start at zero and the bias comes last, as in PyTorch: a bias added first
    // would round away the low bits of every small term after it.
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    let mut wp = w;
    for i in 0..t.kh {
        for j in 0..t.kw {
            let xp = x.add(i * t.tap_h + j * t.tap_w);
            for c in 0..t.c {
                let mut wv = [_mm512_setzero_ps(); B];
                for (b, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(wp.add(b * t.wblock));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*xp.add(r * t.pix + c));
                    for (b, a) in row.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(xv, wv[b], *a);
                    }
                }
                wp = wp.add(LANES);
            }
        }
    }
    // Spill the accumulators once, in a loop simple enough to unroll, so that the main loop
    // keeps them in registers; the epilogue then reads memory.
    let mut sums = [[[0f32; LANES]; B]; R];
    for b in 0..B {
        let bv = _mm512_loadu_ps(bias.add(b * LANES));
        for r in 0..R {
            _mm512_storeu_ps(sums[r][b].as_mut_ptr(), _mm512_add_ps(acc[r][b], bv));
        }
    }
    epilogue_avx512::<R, B>(&sums, t, res, act, out);
}

/// `out = act(sums + residual)` for a tile's `R x B` vectors, unrolled per tile shape with
/// the activation chosen once.
///
/// # Safety
/// As [`tile`], on a CPU with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue_avx512<const R: usize, const B: usize>(
    sums: &[[[f32; LANES]; B]; R],
    t: &Tile,
    res: Option<*const f32>,
    act: Option<Activation>,
    out: *mut f32,
) {
    match act {
        None => epilogue_rows::<R, B, 0>(sums, t, res, out),
        Some(Activation::Relu) => epilogue_rows::<R, B, 1>(sums, t, res, out),
        Some(Activation::Relu6) => epilogue_rows::<R, B, 2>(sums, t, res, out),
        Some(other) => {
            epilogue_rows::<R, B, 0>(sums, t, res, out);
            for r in 0..R {
                for b in 0..B {
                    let v = &mut *(out.add(r * t.out_pix + b * LANES) as *mut [f32; LANES]);
                    act_lanes(Some(other), v);
                }
            }
        }
    }
}

/// The body of [`epilogue_avx512`]: `KIND` 0 stores, 1 applies ReLU, 2 ReLU6 (NaN kept:
/// `vmaxps`/`vminps` return their second operand when either is NaN).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices keep the loops simple enough to unroll
unsafe fn epilogue_rows<const R: usize, const B: usize, const KIND: u8>(
    sums: &[[[f32; LANES]; B]; R],
    t: &Tile,
    res: Option<*const f32>,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let zero = _mm512_setzero_ps();
    let six = _mm512_set1_ps(6.0);
    for r in 0..R {
        for b in 0..B {
            let mut v = _mm512_loadu_ps(sums[r][b].as_ptr());
            if let Some(res) = res {
                v = _mm512_add_ps(v, _mm512_loadu_ps(res.add(r * t.res_pix + b * LANES)));
            }
            v = match KIND {
                1 => relu(v, zero),
                2 => _mm512_min_ps(six, relu(v, zero)),
                _ => v,
            };
            _mm512_storeu_ps(out.add(r * t.out_pix + b * LANES), v);
        }
    }
}

/// `max(v, 0)` that keeps NaN, as `Activation::Relu` does.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn relu(
    v: std::arch::x86_64::__m512,
    zero: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // vmaxps returns its second operand when either is NaN.
    _mm512_max_ps(zero, v)
}

// ----- Linear layers on a batch ----------------------------------------------------------------

/// A linear layer for a batch of rows, run as a 1x1 convolution over an image of `N` pixels
/// whose channels are the features: the same register tiles, with the images as the tile's
/// pixels. The outputs are packed in parts of at most four blocks of 16 (64 outputs),
/// so that threads can take a part each and keep its weights in their own cache.
///
/// ```
/// use convnet::backend::cpu::nhwc::PackedLinear;
/// // y = x W^T + b for W = [[1, 2], [3, 4], [5, 6]] (3 outputs, 2 inputs).
/// let linear = PackedLinear::new(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], Some(&[0.5, 0.0, -1.0]), 3);
/// let y = linear.forward(&[1.0, 1.0, 2.0, 0.0], 2, None);
/// assert_eq!(y, vec![3.5, 7.0, 10.0, 2.5, 6.0, 9.0]);
/// ```
#[derive(Clone, Debug)]
pub struct PackedLinear {
    parts: Vec<PackedConv>,
    inputs: usize,
    outputs: usize,
}

/// Rows from which a batched linear layer is split between threads; below, the hand-over
/// costs more than the second thread saves (measured: seed-cnn's 4096 x 128 layer on one
/// image is 1.5x faster on one thread).
const PARALLEL_ROWS: usize = 4;

impl PackedLinear {
    /// Packs PyTorch-layout weights `[outputs, inputs]` and an optional bias `[outputs]`.
    pub fn new(weight: &[f32], bias: Option<&[f32]>, outputs: usize) -> PackedLinear {
        let inputs = weight.len() / outputs.max(1);
        assert_eq!(weight.len(), inputs * outputs, "weight size");
        let per_part = MAX_BLOCKS * LANES;
        let parts = (0..outputs)
            .step_by(per_part)
            .map(|o0| {
                let k = per_part.min(outputs - o0);
                PackedConv::new(
                    &weight[o0 * inputs..(o0 + k) * inputs],
                    bias.map(|b| &b[o0..o0 + k]),
                    k,
                    inputs,
                    (1, 1),
                )
            })
            .collect();
        PackedLinear {
            parts,
            inputs,
            outputs,
        }
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output features.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// The weights back in PyTorch's layout `[outputs, inputs]`.
    pub fn weight(&self) -> Vec<f32> {
        self.parts.iter().flat_map(PackedConv::unpack).collect()
    }

    /// `act(x W^T + b)` for `n` rows `x` `[n, inputs]`; returns `[n, outputs]`. Parts of the
    /// outputs and ranges of rows run in parallel on the current thread pool.
    pub fn forward(&self, x: &[f32], n: usize, act: Option<Activation>) -> Vec<f32> {
        use rayon::prelude::*;
        assert_eq!(x.len(), n * self.inputs, "rows of the input");
        let mut y = vec![0f32; n * self.outputs];
        if n == 0 || self.outputs == 0 {
            return y;
        }
        let threads = rayon::current_num_threads().max(1);
        // Rows per item: every thread gets work, and each part's weights are read by as few
        // threads as that allows.
        let row_chunks = threads.div_ceil(self.parts.len()).min(n);
        let rows_per = n.div_ceil(row_chunks);
        let items: Vec<(usize, usize)> = (0..self.parts.len())
            .flat_map(|p| (0..n).step_by(rows_per).map(move |r0| (p, r0)))
            .collect();
        let run = |&(p, r0): &(usize, usize)| {
            let part = &self.parts[p];
            let rows = rows_per.min(n - r0);
            let cs = part.k.div_ceil(LANES) * LANES;
            let input = Plane {
                h: 1,
                w: rows,
                c: self.inputs,
                cs: self.inputs,
                halo: 0,
            };
            let output = Plane {
                h: 1,
                w: rows,
                c: part.k,
                cs,
                halo: 0,
            };
            let conv = DirectConv {
                input,
                output,
                kernel: (1, 1),
                stride: (1, 1),
                padding: (0, 0),
                dilation: (1, 1),
            };
            let mut out = vec![0f32; rows * cs];
            conv_rows(
                &conv,
                part,
                &x[r0 * self.inputs..(r0 + rows) * self.inputs],
                Epilogue {
                    residual: None,
                    act,
                },
                OutRows::whole(&mut out),
                0..1,
            );
            out
        };
        let outs: Vec<Vec<f32>> = if items.len() > 1 && threads > 1 && n >= PARALLEL_ROWS {
            items.par_iter().map(run).collect()
        } else {
            items.iter().map(run).collect()
        };
        let per_part = MAX_BLOCKS * LANES;
        for (&(p, r0), out) in items.iter().zip(&outs) {
            let part = &self.parts[p];
            let cs = part.k.div_ceil(LANES) * LANES;
            for (i, src) in out.chunks_exact(cs).enumerate() {
                let o = (r0 + i) * self.outputs + p * per_part;
                y[o..o + part.k].copy_from_slice(&src[..part.k]);
            }
        }
        y
    }
}

// ----- Depthwise convolution ---------------------------------------------------------------

/// Weights of a depthwise convolution (groups = C = K) packed `[KH][KW][cs]`, bias `[cs]`.
#[derive(Clone, Debug)]
pub struct PackedDepthwise {
    /// Packed weights.
    pub weights: Vec<f32>,
    /// Bias padded to the channel stride.
    pub bias: Vec<f32>,
    /// Kernel (height, width).
    pub kernel: (usize, usize),
    /// Channel stride of the packing.
    pub cs: usize,
}

impl PackedDepthwise {
    /// Packs PyTorch-layout weights `[C, 1, KH, KW]` for planes of channel stride `cs`.
    pub fn new(
        weight: &[f32],
        bias: Option<&[f32]>,
        c: usize,
        kernel: (usize, usize),
        cs: usize,
    ) -> PackedDepthwise {
        let (kh, kw) = kernel;
        assert_eq!(weight.len(), c * kh * kw, "weight size");
        let mut packed = vec![0.0; kh * kw * cs];
        for ch in 0..c {
            for t in 0..kh * kw {
                packed[t * cs + ch] = weight[ch * kh * kw + t];
            }
        }
        let mut b = vec![0.0; cs];
        if let Some(bias) = bias {
            b[..c].copy_from_slice(&bias[..c]);
        }
        PackedDepthwise {
            weights: packed,
            bias: b,
            kernel,
            cs,
        }
    }
}

/// Output rows `rows` of a depthwise convolution with a fused epilogue.
pub fn depthwise_rows(
    conv: &DirectConv,
    packed: &PackedDepthwise,
    input: &[f32],
    epilogue: Epilogue,
    out: OutRows,
    rows: Range<usize>,
) {
    let (ip, op) = (conv.input, conv.output);
    assert!(input.len() >= ip.len());
    out.check(op, &rows);
    assert!(conv.padding.0 <= ip.halo && conv.padding.1 <= ip.halo);
    assert!(ip.cs == packed.cs && op.cs == packed.cs && rows.end <= op.h);
    let cs = packed.cs;
    let (kh, kw) = packed.kernel;
    let mut acc = vec![0f32; cs];
    for oy in rows {
        for ox in 0..op.w {
            acc.copy_from_slice(&packed.bias);
            for i in 0..kh {
                let iy =
                    (oy * conv.stride.0 + i * conv.dilation.0) as isize - conv.padding.0 as isize;
                for j in 0..kw {
                    let ix = (ox * conv.stride.1 + j * conv.dilation.1) as isize
                        - conv.padding.1 as isize;
                    let x = &input[ip.at(iy, ix)..][..cs];
                    let w = &packed.weights[(i * kw + j) * cs..][..cs];
                    multiply_add(&mut acc, x, w);
                }
            }
            let o = op.at(oy as isize, ox as isize) - out.offset;
            let res = epilogue
                .residual
                .map(|(r, rp)| &r[rp.at(oy as isize, ox as isize)..][..cs]);
            finish(&acc, res, epilogue.act, &mut out.data[o..o + cs]);
        }
    }
}

crate::backend::cpu::simd::vectorized_fn! {
    fn multiply_add(acc: &mut [f32], x: &[f32], w: &[f32]) {
        for ((a, &x), &w) in acc.iter_mut().zip(x).zip(w) {
            *a += x * w;
        }
    }
}

crate::backend::cpu::simd::vectorized_fn! {
    /// `out = act(acc + residual)`.
    fn finish(acc: &[f32], residual: Option<&[f32]>, act: Option<Activation>, out: &mut [f32]) {
        match residual {
            Some(r) => {
                for ((o, &a), &r) in out.iter_mut().zip(acc).zip(r) {
                    *o = a + r;
                }
            }
            None => out.copy_from_slice(&acc[..out.len()]),
        }
        match act {
            Some(Activation::Relu) => {
                for o in out.iter_mut() {
                    *o = Activation::Relu.apply(*o);
                }
            }
            Some(Activation::Relu6) => {
                for o in out.iter_mut() {
                    *o = Activation::Relu6.apply(*o);
                }
            }
            Some(a) => {
                for o in out.iter_mut() {
                    *o = a.apply(*o);
                }
            }
            None => {}
        }
    }
}

// ----- Element-wise ops, pooling, shortcuts, layout changes ----------------------------------

/// `out = act(a + b)` over the interiors of three planes of the same size.
pub fn add_planes(
    a: (&[f32], Plane),
    b: (&[f32], Plane),
    act: Option<Activation>,
    out: (&mut [f32], Plane),
) {
    let (op, c) = (out.1, out.1.c);
    for y in 0..op.h as isize {
        for x in 0..op.w as isize {
            let av = &a.0[a.1.at(y, x)..][..c];
            let bv = &b.0[b.1.at(y, x)..][..c];
            let o = op.at(y, x);
            finish(av, Some(bv), act, &mut out.0[o..o + c]);
        }
    }
}

/// `out = act(x)`, or `x * scale + shift` per channel first (an unfolded BatchNorm).
pub fn map_plane(
    x: (&[f32], Plane),
    affine: Option<(&[f32], &[f32])>,
    act: Option<Activation>,
    out: (&mut [f32], Plane),
) {
    let (op, c) = (out.1, out.1.c);
    let mut tmp = vec![0f32; c];
    for y in 0..op.h as isize {
        for xx in 0..op.w as isize {
            let xv = &x.0[x.1.at(y, xx)..][..c];
            match affine {
                Some((scale, shift)) => {
                    for k in 0..c {
                        tmp[k] = xv[k] * scale[k] + shift[k];
                    }
                }
                None => tmp.copy_from_slice(xv),
            }
            let o = op.at(y, xx);
            finish(&tmp, None, act, &mut out.0[o..o + c]);
        }
    }
}

/// Max pooling (windows clipped to the image, as PyTorch's -inf padding does).
pub fn max_pool_plane(
    x: (&[f32], Plane),
    p: crate::tensor::MaxPool2dParams,
    out: (&mut [f32], Plane),
) {
    let (ip, op) = (x.1, out.1);
    let c = ip.c;
    #[cfg(target_arch = "x86_64")]
    if use_avx512() {
        assert!(x.0.len() >= ip.len() && out.0.len() >= op.len() && op.c == c);
        assert!(c <= ip.cs && c <= op.cs);
        // SAFETY: AVX-512 is present; every tap and output pixel lies inside the planes
        // (the taps are those the loop below keeps), and lanes past `c` are masked.
        unsafe { max_pool_avx512(x.0, ip, p, out.0, op) };
        return;
    }
    let mut taps = Vec::new();
    for oy in 0..op.h {
        for ox in 0..op.w {
            let o = op.at(oy as isize, ox as isize);
            let dst = &mut out.0[o..o + c];
            dst.fill(f32::NEG_INFINITY);
            window_taps(ip, p, (oy, ox), &mut taps);
            for &t in &taps {
                max_into(dst, &x.0[t..][..c]);
            }
        }
    }
}

/// The plane offsets of the taps of pooling window `(oy, ox)` that lie inside the image.
pub(crate) fn window_taps(
    ip: Plane,
    p: crate::tensor::MaxPool2dParams,
    (oy, ox): (usize, usize),
    taps: &mut Vec<usize>,
) {
    taps.clear();
    for i in 0..p.kernel.0 {
        let iy = (oy * p.stride.0 + i * p.dilation.0) as isize - p.padding.0 as isize;
        if iy < 0 || iy >= ip.h as isize {
            continue;
        }
        for j in 0..p.kernel.1 {
            let ix = (ox * p.stride.1 + j * p.dilation.1) as isize - p.padding.1 as isize;
            if ix >= 0 && ix < ip.w as isize {
                taps.push(ip.at(iy, ix));
            }
        }
    }
}

/// Max pooling whole 16-channel vectors at a time: one pass over the window's taps per
/// vector, NaN winning as in [`max_into`].
///
/// # Safety
/// AVX-512F; the planes as asserted by [`max_pool_plane`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_pool_avx512(
    x: &[f32],
    ip: Plane,
    p: crate::tensor::MaxPool2dParams,
    out: &mut [f32],
    op: Plane,
) {
    use std::arch::x86_64::*;
    let c = ip.c;
    let mut taps = Vec::with_capacity(p.kernel.0 * p.kernel.1);
    let (kh, kw) = p.kernel;
    let whole = p.padding == (0, 0) && p.dilation == (1, 1);
    for oy in 0..op.h {
        for ox in 0..op.w {
            let (y0, x0) = (oy * p.stride.0, ox * p.stride.1);
            if whole && y0 + kh <= ip.h && x0 + kw <= ip.w {
                // The usual case: a window inside the image, its taps at fixed offsets.
                let base = x.as_ptr().add(ip.at(y0 as isize, x0 as isize));
                let dst = out.as_mut_ptr().add(op.at(oy as isize, ox as isize));
                for l in (0..c).step_by(LANES) {
                    let mask: __mmask16 = if c - l >= LANES {
                        0xffff
                    } else {
                        (1u16 << (c - l)) - 1
                    };
                    let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
                    for i in 0..kh {
                        for j in 0..kw {
                            let at = base.add(i * ip.row_stride() + j * ip.cs + l);
                            let v = _mm512_maskz_loadu_ps(mask, at);
                            let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, acc)
                                | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                            acc = _mm512_mask_mov_ps(acc, take, v);
                        }
                    }
                    _mm512_mask_storeu_ps(dst.add(l), mask, acc);
                }
                continue;
            }
            window_taps(ip, p, (oy, ox), &mut taps);
            let dst = out.as_mut_ptr().add(op.at(oy as isize, ox as isize));
            for l in (0..c).step_by(LANES) {
                let mask: __mmask16 = if c - l >= LANES {
                    0xffff
                } else {
                    (1u16 << (c - l)) - 1
                };
                let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
                for &t in &taps {
                    let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(t + l));
                    let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, acc)
                        | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    acc = _mm512_mask_mov_ps(acc, take, v);
                }
                _mm512_mask_storeu_ps(dst.add(l), mask, acc);
            }
        }
    }
}

crate::backend::cpu::simd::vectorized_fn! {
    /// `dst = max(dst, x)`, NaN winning as in PyTorch's max pooling.
    fn max_into(dst: &mut [f32], x: &[f32]) {
        for (d, &v) in dst.iter_mut().zip(x) {
            if v > *d || v.is_nan() {
                *d = v;
            }
        }
    }
}

/// Average pooling with PyTorch's divisor rules (`count_include_pad`, windows clipped at
/// the padded edge in ceil mode).
pub fn avg_pool_plane(
    x: (&[f32], Plane),
    p: crate::tensor::AvgPool2dParams,
    out: (&mut [f32], Plane),
) {
    let (ip, op) = (x.1, out.1);
    let c = ip.c;
    let mut sum = vec![0f32; c];
    for oy in 0..op.h {
        for ox in 0..op.w {
            sum.fill(0.0);
            let win = avg_window(ip, p, (oy, ox));
            for iy in win.rows.clone() {
                for ix in win.cols.clone() {
                    add_into(&mut sum, &x.0[ip.at(iy, ix)..][..c]);
                }
            }
            let o = op.at(oy as isize, ox as isize);
            for (d, s) in out.0[o..o + c].iter_mut().zip(&sum) {
                *d = s / win.divisor as f32;
            }
        }
    }
}

/// The part of average-pooling window `(oy, ox)` inside the image, and its divisor.
pub(crate) struct AvgWindow {
    /// Input rows and columns the window covers inside the image.
    pub rows: Range<isize>,
    pub cols: Range<isize>,
    /// Taps inside the image.
    pub valid: usize,
    /// What the sum is divided by: the taps inside the padded input with
    /// `count_include_pad`, the valid ones without (PyTorch's rules; a ceil-mode window is
    /// clipped at the padded edge).
    pub divisor: usize,
}

/// The window of output `(oy, ox)` of average pooling `p` over plane `ip` (one home for the
/// rule the float, int8 and gradient passes share).
pub(crate) fn avg_window(
    ip: Plane,
    p: crate::tensor::AvgPool2dParams,
    (oy, ox): (usize, usize),
) -> AvgWindow {
    let y0 = (oy * p.stride.0) as isize - p.padding.0 as isize;
    let x0 = (ox * p.stride.1) as isize - p.padding.1 as isize;
    let y1 = (y0 + p.kernel.0 as isize).min((ip.h + p.padding.0) as isize);
    let x1 = (x0 + p.kernel.1 as isize).min((ip.w + p.padding.1) as isize);
    let pool_size = ((y1 - y0) * (x1 - x0)) as usize;
    let rows = y0.max(0)..y1.min(ip.h as isize);
    let cols = x0.max(0)..x1.min(ip.w as isize);
    let valid = rows.len() * cols.len();
    AvgWindow {
        rows,
        cols,
        valid,
        divisor: if p.count_include_pad {
            pool_size
        } else {
            valid
        },
    }
}

/// The input range of adaptive pooling output `o` of `out_len` over `in_len` (PyTorch's
/// bounds: `floor(o * in / out)` to `ceil((o + 1) * in / out)`).
pub(crate) fn adaptive_range(o: usize, in_len: usize, out_len: usize) -> Range<usize> {
    o * in_len / out_len..((o + 1) * in_len).div_ceil(out_len)
}

/// Adaptive average pooling to the output plane's size (PyTorch's window bounds).
pub fn adaptive_avg_pool_plane(x: (&[f32], Plane), out: (&mut [f32], Plane)) {
    let (ip, op) = (x.1, out.1);
    let c = ip.c;
    let mut sum = vec![0f32; c];
    for oy in 0..op.h {
        let rows = adaptive_range(oy, ip.h, op.h);
        for ox in 0..op.w {
            let cols = adaptive_range(ox, ip.w, op.w);
            sum.fill(0.0);
            for iy in rows.clone() {
                for ix in cols.clone() {
                    add_into(&mut sum, &x.0[ip.at(iy as isize, ix as isize)..][..c]);
                }
            }
            let n = (rows.len() * cols.len()) as f32;
            let o = op.at(oy as isize, ox as isize);
            for (d, s) in out.0[o..o + c].iter_mut().zip(&sum) {
                *d = s / n;
            }
        }
    }
}

crate::backend::cpu::simd::vectorized_fn! {
    fn add_into(dst: &mut [f32], x: &[f32]) {
        for (d, &v) in dst.iter_mut().zip(x) {
            *d += v;
        }
    }
}

/// The option-A shortcut: `x[::stride, ::stride]` with `before` zero channels in front and
/// zeros up to the output's channels.
pub fn pad_channels_plane(
    x: (&[f32], Plane),
    stride: usize,
    before: usize,
    out: (&mut [f32], Plane),
) {
    let (ip, op) = (x.1, out.1);
    for oy in 0..op.h {
        for ox in 0..op.w {
            let src = &x.0[ip.at((oy * stride) as isize, (ox * stride) as isize)..][..ip.c];
            let o = op.at(oy as isize, ox as isize);
            let dst = &mut out.0[o..o + op.c];
            dst.fill(0.0);
            dst[before..before + ip.c].copy_from_slice(src);
        }
    }
}

/// Copies image `[C, H, W]` (NCHW) into the interior of a plane.
pub fn from_nchw<T: Copy>(x: &[T], out: (&mut [T], Plane)) {
    let p = out.1;
    assert!(x.len() >= p.c * p.h * p.w && p.c <= p.cs);
    for y in 0..p.h {
        // One output row at a time, all channels: the row's pixels stay in cache.
        let base = p.at(y as isize, 0);
        let dst = &mut out.0[base..base + p.w * p.cs];
        for ch in 0..p.c {
            let src = &x[(ch * p.h + y) * p.w..][..p.w];
            for (px, &v) in dst.chunks_exact_mut(p.cs).zip(src) {
                px[ch] = v;
            }
        }
    }
}

/// Copies the interior of a plane into `[H, W, C]` order (channels-last without the border
/// or the channel padding).
pub fn to_nhwc<T: Copy>(x: (&[T], Plane), out: &mut [T]) {
    let p = x.1;
    assert!(out.len() >= p.h * p.w * p.c && p.c <= p.cs);
    for y in 0..p.h {
        let src = &x.0[p.at(y as isize, 0)..][..p.w * p.cs];
        let dst = &mut out[y * p.w * p.c..][..p.w * p.c];
        for (d, s) in dst.chunks_exact_mut(p.c).zip(src.chunks_exact(p.cs)) {
            d.copy_from_slice(&s[..p.c]);
        }
    }
}

/// Copies the interior of a plane into `[C, H, W]` order (NCHW, also the order of
/// `flatten`).
pub fn to_nchw<T: Copy>(x: (&[T], Plane), out: &mut [T]) {
    let p = x.1;
    for y in 0..p.h {
        for xx in 0..p.w {
            let px = &x.0[p.at(y as isize, xx as isize)..][..p.c];
            for (ch, &v) in px.iter().enumerate() {
                out[(ch * p.h + y) * p.w + xx] = v;
            }
        }
    }
}

/// The naive convolution the kernels are tested against: NCHW input `[C, H, W]`, weight
/// `[K, C/groups, KH, KW]`, then residual `[K, OH, OW]` and activation; float64 sums.
#[allow(clippy::too_many_arguments)]
pub fn conv_reference(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    weight: &[f32],
    bias: Option<&[f32]>,
    (k, kh, kw): (usize, usize, usize),
    p: crate::tensor::Conv2dParams,
    residual: Option<&[f32]>,
    act: Option<Activation>,
) -> Vec<f32> {
    let oh = (h + 2 * p.padding.0 - p.dilation.0 * (kh - 1) - 1) / p.stride.0 + 1;
    let ow = (w + 2 * p.padding.1 - p.dilation.1 * (kw - 1) - 1) / p.stride.1 + 1;
    let (cg, kg) = (c / p.groups, k / p.groups);
    let mut out = vec![0f32; k * oh * ow];
    for o in 0..k {
        let g = o / kg;
        for oy in 0..oh {
            for ox in 0..ow {
                let mut s = bias.map_or(0.0, |b| b[o] as f64);
                for ci in 0..cg {
                    for i in 0..kh {
                        for j in 0..kw {
                            let iy = (oy * p.stride.0 + i * p.dilation.0) as isize
                                - p.padding.0 as isize;
                            let ix = (ox * p.stride.1 + j * p.dilation.1) as isize
                                - p.padding.1 as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let xv = x[((g * cg + ci) * h + iy as usize) * w + ix as usize];
                            s += xv as f64 * weight[((o * cg + ci) * kh + i) * kw + j] as f64;
                        }
                    }
                }
                let idx = (o * oh + oy) * ow + ox;
                let mut v = s as f32;
                if let Some(r) = residual {
                    v += r[idx];
                }
                out[idx] = act.map_or(v, |a| a.apply(v));
            }
        }
    }
    out
}
