//! Int8 convolution (and, as a 1x1 convolution over rows, linear) kernels for quantized
//! inference: unsigned 8-bit activations times signed 8-bit weights, summed in 32-bit
//! integers, then requantized in the epilogue. Mirrors PyTorch's quantized `conv2d` /
//! `linear` (fbgemm's requantization, bit for bit).
//!
//! Layouts are those of [`super::nhwc`]: channels-last planes of bytes with a border that
//! holds the input's zero point (so padding taps need no test). Weights are packed per
//! kernel:
//!
//! - **AVX512-VNNI** (`vpdpbusd`): `[K/16][KH][KW][C4/4][16][4]` bytes; one instruction
//!   multiplies 4 input channels (broadcast) by 16 output channels x 4 and adds the 4
//!   products into each 32-bit lane. No intermediate 16-bit sums, so no saturation.
//! - **AVX2** (no VNNI): `vpmaddubsw` would add two u8 x s8 products into a saturating
//!   16-bit lane (255 * -128 * 2 < -32768); instead bytes are widened to 16 bits and
//!   `vpmaddwd` adds pairs into 32-bit lanes: `[K/8][KH][KW][C2/2][8][2]` 16-bit weights.
//! - **AMX-INT8** (`tdpbusd`, when the CPU has it and the kernel grants the tile state): the
//!   VNNI packing with the input channels padded to 16, so that for one kernel row the taps'
//!   channels lie contiguous in a channels-last plane (`KW * C16` bytes per output pixel).
//!   A tile multiplies 16 output pixels x up to 64 of those bytes by 16 output channels;
//!   output pixels are taken as one run over the plane's padded width (the border columns
//!   are computed and dropped), so rows narrower than a tile still fill it. Layers whose
//!   plane does not fit (dilated columns, other channel strides, fewer than 16 pixels) use
//!   the VNNI kernel.
//! - **Portable**: plain integer loops on the VNNI packing.
//!
//! The kernel is chosen at run time ([`Int8Kernel::detect`]) and every path gives the same
//! integers: sums are exact; the epilogue is the same float32 operations in the same order.
//!
//! Epilogue for output channel `o` (`atw = s_in * s_w[o]`, all float32):
//! `acc = sum (x - z_in) * w + ...` (exact), then either
//! - a byte: `v = f32(acc) + bias[o] / atw`; `y = v * (atw / s_out)` (+ `f32(r - z_r) *
//!   (s_r / s_out)` with a residual); `q = clamp(round_half_even(y) + z_out, lo, hi)`,
//!   `lo`/`hi` the range or the activation's clamp (ReLU: `z_out`), as fbgemm's
//!   `ReQuantizeOutput` with a float bias;
//! - or a float: `f32(acc) * atw + bias[o]`, then the activation (a layer whose output
//!   stays float, such as the classifier).

use super::activation::Activation;
use super::nhwc::Plane;
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
pub(in crate::backend::cpu) mod amx;

/// Which int8 code path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX-INT8 tiles (`tdpbusd`), with the AVX512-VNNI kernel for layers that do not fit.
    Amx,
    /// AVX-512 with VNNI (`vpdpbusd`).
    Vnni512,
    /// AVX2 with 16-bit products (`vpmaddwd`), no saturation.
    Avx2,
    /// Plain Rust.
    Portable,
}

thread_local! {
    static FORCED: std::cell::Cell<Option<Int8Kernel>> = const { std::cell::Cell::new(None) };
}

impl Int8Kernel {
    /// Every path, fastest first.
    pub const ALL: [Int8Kernel; 4] = [
        Int8Kernel::Amx,
        Int8Kernel::Vnni512,
        Int8Kernel::Avx2,
        Int8Kernel::Portable,
    ];

    /// The path's name, as `CONVNET_INT8_KERNEL` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Amx => "amx",
            Int8Kernel::Vnni512 => "vnni512",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::Portable => "portable",
        }
    }

    /// The best path this CPU supports (or the one forced on this thread). The environment
    /// variable `CONVNET_INT8_KERNEL` (`amx`, `vnni512`, `avx2`, `portable`) caps the
    /// choice, to compare the paths on one machine: the best available path at or below
    /// the one named.
    ///
    /// ```
    /// use convnet::backend::cpu::int8::Int8Kernel;
    /// let k = Int8Kernel::detect();
    /// assert!(k.available());
    /// ```
    pub fn detect() -> Int8Kernel {
        if let Some(k) = FORCED.with(|f| f.get()) {
            return k;
        }
        static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let cap = *CAP.get_or_init(|| {
            std::env::var("CONVNET_INT8_KERNEL")
                .ok()
                .and_then(|v| {
                    let v = v.trim().to_ascii_lowercase();
                    Int8Kernel::ALL.iter().position(|k| k.name() == v)
                })
                .unwrap_or(0)
        });
        Int8Kernel::ALL[cap..]
            .iter()
            .copied()
            .find(|k| k.available())
            .unwrap_or(Int8Kernel::Portable)
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Int8Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Vnni512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Amx => Int8Kernel::Vnni512.available() && amx::ready(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Makes [`Int8Kernel::detect`] on this thread return `kernel` (`None`: the CPU's
    /// best); returns the previous setting. For tests and benchmarks of each path.
    pub fn force(kernel: Option<Int8Kernel>) -> Option<Int8Kernel> {
        FORCED.with(|f| f.replace(kernel))
    }

    /// Whether the AVX512-VNNI kernel (and its packing) serves this path.
    fn vnni(self) -> bool {
        matches!(self, Int8Kernel::Vnni512 | Int8Kernel::Amx)
    }

    /// Output channels per packed block.
    fn block(self) -> usize {
        match self {
            Int8Kernel::Avx2 => 8,
            _ => 16,
        }
    }
}

/// A convolution's weights packed for one kernel path, with what the epilogue needs.
#[derive(Clone, Debug)]
pub struct PackedInt8 {
    /// The path the packing is for.
    pub kernel: Int8Kernel,
    /// VNNI/portable packing (bytes) or AVX2 packing (16-bit values, as bytes).
    data: Vec<i8>,
    wide: Vec<i16>,
    /// AMX: the VNNI packing with the input channels padded to 16 (empty on other paths).
    tiles: Vec<i8>,
    /// Output channels K.
    pub k: usize,
    /// Input channels C.
    pub c: usize,
    /// Kernel (height, width).
    pub kernel_hw: (usize, usize),
    /// Per output channel (padded to the block): `-z_in * sum(w)`, added to the sums.
    offset: Vec<i32>,
    /// Per output channel: `bias / atw`, `atw / s_out`, `atw`, `bias` (float output).
    bias_q: Vec<f32>,
    mult: Vec<f32>,
    atw: Vec<f32>,
    bias: Vec<f32>,
}

/// The quantization of a convolution's input, weights and output.
#[derive(Clone, Debug)]
pub struct ConvQuant<'a> {
    /// Input scale and zero point.
    pub input: (f32, i32),
    /// Per-output-channel weight scales (zero points are 0).
    pub weight_scales: &'a [f32],
    /// Float bias, if any.
    pub bias: Option<&'a [f32]>,
    /// Output scale (ignored for float output).
    pub output_scale: f32,
}

fn c4(c: usize) -> usize {
    c.div_ceil(4) * 4
}

fn c16(c: usize) -> usize {
    c.div_ceil(16) * 16
}

impl PackedInt8 {
    /// Packs int8 weights `[K, C, KH, KW]` for `kernel`.
    pub fn new(
        weights: &[i8],
        k: usize,
        c: usize,
        kernel_hw: (usize, usize),
        q: &ConvQuant,
        kernel: Int8Kernel,
    ) -> PackedInt8 {
        let (kh, kw) = kernel_hw;
        assert_eq!(weights.len(), k * c * kh * kw, "weight size");
        assert_eq!(q.weight_scales.len(), k, "one scale per output channel");
        let block = kernel.block();
        let blocks = k.div_ceil(block);
        let w_at =
            |o: usize, ci: usize, i: usize, j: usize| weights[((o * c + ci) * kh + i) * kw + j];
        let (mut data, mut wide, mut tiles) = (Vec::new(), Vec::new(), Vec::new());
        let pack4 = |cp: usize| {
            let q4 = cp / 4;
            let mut data = vec![0i8; blocks * kh * kw * q4 * block * 4];
            for o in 0..k {
                for ci in 0..c {
                    for i in 0..kh {
                        for j in 0..kw {
                            let at = ((((o / block * kh + i) * kw + j) * q4 + ci / 4) * block
                                + o % block)
                                * 4
                                + ci % 4;
                            data[at] = w_at(o, ci, i, j);
                        }
                    }
                }
            }
            data
        };
        if kernel == Int8Kernel::Amx {
            tiles = pack4(c16(c));
        }
        if kernel == Int8Kernel::Avx2 {
            let c2 = c.div_ceil(2);
            wide = vec![0i16; blocks * kh * kw * c2 * block * 2];
            for o in 0..k {
                for ci in 0..c {
                    for i in 0..kh {
                        for j in 0..kw {
                            let at = ((((o / block * kh + i) * kw + j) * c2 + ci / 2) * block
                                + o % block)
                                * 2
                                + ci % 2;
                            wide[at] = w_at(o, ci, i, j) as i16;
                        }
                    }
                }
            }
        } else {
            data = pack4(c4(c));
        }
        let padded = blocks * block;
        let (mut offset, mut bias_q, mut mult, mut atw, mut bias) = (
            vec![0i32; padded],
            vec![0f32; padded],
            vec![0f32; padded],
            vec![0f32; padded],
            vec![0f32; padded],
        );
        let (s_in, z_in) = q.input;
        for o in 0..k {
            let sum: i32 = (0..c * kh * kw)
                .map(|t| weights[o * c * kh * kw + t] as i32)
                .sum();
            offset[o] = -z_in * sum;
            atw[o] = s_in * q.weight_scales[o];
            mult[o] = atw[o] / q.output_scale;
            let b = q.bias.map_or(0.0, |b| b[o]);
            bias[o] = b;
            bias_q[o] = b / atw[o];
        }
        PackedInt8 {
            kernel,
            data,
            wide,
            tiles,
            k,
            c,
            kernel_hw,
            offset,
            bias_q,
            mult,
            atw,
            bias,
        }
    }

    fn block_len(&self) -> usize {
        let (kh, kw) = self.kernel_hw;
        match self.kernel {
            Int8Kernel::Avx2 => kh * kw * self.c.div_ceil(2) * 16,
            _ => kh * kw * c4(self.c) / 4 * 64,
        }
    }
}

/// A convolution between byte planes (groups 1).
#[derive(Clone, Copy, Debug)]
pub struct Int8Conv {
    /// Input plane (bytes; border filled with the input zero point; `cs >= C` rounded up to
    /// 4 for VNNI and portable, 2 for AVX2).
    pub input: Plane,
    /// Output plane.
    pub output: Plane,
    /// Stride.
    pub stride: (usize, usize),
    /// Padding (at most the input's border).
    pub padding: (usize, usize),
    /// Dilation.
    pub dilation: (usize, usize),
}

/// Where a convolution writes: bytes with a requantization, or floats.
pub enum Int8Out<'a> {
    /// Requantized bytes: zero point, clamp range, and an optional residual byte plane with
    /// its scale and zero point (added before the clamp).
    Bytes {
        /// The output buffer and the plane offset of its first element.
        data: &'a mut [u8],
        /// Plane offset of `data[0]`.
        offset: usize,
        /// Output zero point.
        zero_point: i32,
        /// Clamp (the quantized range, or an activation's).
        clamp: (i32, i32),
        /// Residual: its buffer, plane, scale ratio `s_r / s_out` and zero point.
        residual: Option<(&'a [u8], Plane, f32, i32)>,
    },
    /// Float output with an optional activation.
    Floats {
        /// The output buffer and the plane offset of its first element.
        data: &'a mut [f32],
        /// Plane offset of `data[0]`.
        offset: usize,
        /// Activation.
        act: Option<Activation>,
    },
}

/// Output rows `rows` of `conv` for one image.
pub fn conv_rows(
    conv: &Int8Conv,
    packed: &PackedInt8,
    input: &[u8],
    mut out: Int8Out,
    rows: Range<usize>,
) {
    let (ip, op) = (conv.input, conv.output);
    let (kh, kw) = packed.kernel_hw;
    assert!(input.len() >= ip.len(), "input plane size");
    assert!(packed.c == ip.c && packed.k == op.c, "channels");
    let need_cs = match packed.kernel {
        Int8Kernel::Avx2 => packed.c.div_ceil(2) * 2,
        _ => c4(packed.c),
    };
    assert!(ip.cs >= need_cs, "input channel stride");
    assert!(
        conv.padding.0 <= ip.halo && conv.padding.1 <= ip.halo,
        "padding within the border"
    );
    let last_y = (op.h - 1) * conv.stride.0 + (kh - 1) * conv.dilation.0;
    let last_x = (op.w - 1) * conv.stride.1 + (kw - 1) * conv.dilation.1;
    assert!(
        last_y < ip.h + ip.halo + conv.padding.0 && last_x < ip.w + ip.halo + conv.padding.1,
        "taps inside"
    );
    assert!(rows.end <= op.h && packed.kernel.available());
    let block = packed.kernel.block();
    assert!(
        op.cs >= packed.k.div_ceil(block) * block,
        "output channel stride"
    );
    if !rows.is_empty() {
        let first = op.at(rows.start as isize, 0);
        let end = op.at(rows.end as isize - 1, op.w as isize);
        let (off, len) = match &out {
            Int8Out::Bytes {
                data,
                offset,
                residual,
                ..
            } => {
                if let Some((r, rp, _, _)) = residual {
                    assert!(
                        r.len() >= rp.len()
                            && (rp.h, rp.w) == (op.h, op.w)
                            && rp.cs >= packed.k.div_ceil(block) * block,
                        "residual plane"
                    );
                }
                (*offset, data.len())
            }
            Int8Out::Floats { data, offset, .. } => (*offset, data.len()),
        };
        assert!(
            first >= off && end <= off + len,
            "rows inside the output part"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if packed.kernel == Int8Kernel::Amx {
        if let Some(geometry) = amx::Geometry::of(conv, packed, rows.clone()) {
            amx::conv_rows(conv, packed, &geometry, input, &mut out, rows);
            return;
        }
    }
    let blocks = packed.k.div_ceil(block);
    let mut sums = vec![0i32; op.w * block * 4];
    for oy in rows {
        let iy = (oy * conv.stride.0) as isize - conv.padding.0 as isize;
        let mut b0 = 0;
        while b0 < blocks {
            let nb = (blocks - b0).min(4);
            let rmax = max_pixels(nb);
            let tiles = op.w.div_ceil(rmax);
            let r = op.w.div_ceil(tiles);
            let mut ox = 0;
            while ox < op.w {
                let n = r.min(op.w - ox);
                let ix = (ox * conv.stride.1) as isize - conv.padding.1 as isize;
                let x = &input[ip.at(iy, ix)..];
                let t = Tile {
                    kh,
                    kw,
                    c: packed.c,
                    pix: conv.stride.1 * ip.cs,
                    tap_h: conv.dilation.0 * ip.row_stride(),
                    tap_w: conv.dilation.1 * ip.cs,
                    wblock: packed.block_len(),
                };
                let tile_sums = &mut sums[..n * nb * block];
                #[cfg(target_arch = "x86_64")]
                if packed.kernel.vnni() {
                    if let Int8Out::Bytes {
                        data,
                        offset,
                        zero_point,
                        clamp,
                        residual,
                    } = &mut out
                    {
                        let ch0 = b0 * block;
                        let reach =
                            (t.kh - 1) * t.tap_h + (t.kw - 1) * t.tap_w + (n - 1) * t.pix + c4(t.c);
                        assert!(reach <= x.len(), "tile inside the input");
                        let w = &packed.data[b0 * t.wblock..];
                        assert!(w.len() >= nb * t.wblock);
                        let at = op.at(oy as isize, ox as isize) + ch0 - *offset;
                        assert!(at + (n - 1) * op.cs + nb * block <= data.len());
                        let res = residual.map(|(rd, rp, ratio, zr)| {
                            let ra = rp.at(oy as isize, ox as isize) + ch0;
                            assert!(ra + (n - 1) * rp.cs + nb * block <= rd.len());
                            (rd[ra..].as_ptr(), rp.cs, ratio, zr)
                        });
                        let epi = FusedBytes {
                            offset: packed.offset[ch0..].as_ptr(),
                            bias_q: packed.bias_q[ch0..].as_ptr(),
                            mult: packed.mult[ch0..].as_ptr(),
                            out: data[at..].as_mut_ptr(),
                            out_pix: op.cs,
                            residual: res,
                            zero_point: *zero_point,
                            clamp: *clamp,
                        };
                        // SAFETY: the asserts above bound the input, weight, output and
                        // residual accesses; the per-channel arrays hold whole blocks.
                        unsafe {
                            vnni_dispatch(n, nb, &t, x.as_ptr(), w.as_ptr(), Some(&epi), tile_sums)
                        };
                        ox += n;
                        continue;
                    }
                }
                tile(packed, &t, x, b0, n, nb, tile_sums);
                epilogue(packed, &mut out, op, oy, ox, b0, n, nb, tile_sums);
                ox += n;
            }
            b0 += nb;
        }
    }
}

fn max_pixels(blocks: usize) -> usize {
    match blocks {
        1 => 28,
        2 => 12,
        3 => 8,
        _ => 6,
    }
}

/// A requantization done in registers at the end of a VNNI tile: pointers at the tile's
/// first output channel and pixel.
struct FusedBytes {
    offset: *const i32,
    bias_q: *const f32,
    mult: *const f32,
    out: *mut u8,
    out_pix: usize,
    residual: Option<(*const u8, usize, f32, i32)>,
    zero_point: i32,
    clamp: (i32, i32),
}

/// Offsets the tile kernels read with (in bytes of the input plane, or weight units).
#[derive(Clone, Copy)]
struct Tile {
    kh: usize,
    kw: usize,
    c: usize,
    pix: usize,
    tap_h: usize,
    tap_w: usize,
    wblock: usize,
}

/// Integer sums of `n` pixels x `nb` blocks into `sums` (`[n][nb][block]`).
fn tile(packed: &PackedInt8, t: &Tile, x: &[u8], b0: usize, n: usize, nb: usize, sums: &mut [i32]) {
    // One past the last byte any tap reads.
    let reach = (t.kh - 1) * t.tap_h + (t.kw - 1) * t.tap_w + (n - 1) * t.pix + c4(t.c);
    match packed.kernel {
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Vnni512 | Int8Kernel::Amx => {
            assert!(reach <= x.len(), "tile inside the input");
            let w = &packed.data[b0 * t.wblock..];
            assert!(w.len() >= nb * t.wblock);
            // SAFETY: the asserts bound every input and weight read; the CPU has VNNI
            // (checked by `conv_rows`).
            unsafe { vnni_dispatch(n, nb, t, x.as_ptr(), w.as_ptr(), None, sums) }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => {
            let need =
                (t.kh - 1) * t.tap_h + (t.kw - 1) * t.tap_w + (n - 1) * t.pix + t.c.div_ceil(2) * 2;
            assert!(need <= x.len());
            let w = &packed.wide[b0 * t.wblock..];
            assert!(w.len() >= nb * t.wblock);
            // SAFETY: as above, with AVX2.
            unsafe { avx2_dispatch(n, nb, t, x.as_ptr(), w.as_ptr(), sums) }
        }
        _ => {
            assert!(reach <= x.len(), "tile inside the input");
            portable_tile(packed, t, x, b0, n, nb, sums)
        }
    }
}

fn portable_tile(
    packed: &PackedInt8,
    t: &Tile,
    x: &[u8],
    b0: usize,
    n: usize,
    nb: usize,
    sums: &mut [i32],
) {
    let q4 = c4(t.c) / 4;
    sums.fill(0);
    for b in 0..nb {
        let wb = &packed.data[(b0 + b) * t.wblock..][..t.wblock];
        for r in 0..n {
            let acc = &mut sums[(r * nb + b) * 16..][..16];
            for i in 0..t.kh {
                for j in 0..t.kw {
                    let xp = &x[r * t.pix + i * t.tap_h + j * t.tap_w..];
                    let wt = &wb[(i * t.kw + j) * q4 * 64..][..q4 * 64];
                    for q in 0..q4 {
                        let xs = &xp[q * 4..q * 4 + 4];
                        let ws = &wt[q * 64..q * 64 + 64];
                        for (lane, a) in acc.iter_mut().enumerate() {
                            let w4 = &ws[lane * 4..lane * 4 + 4];
                            *a += xs[0] as i32 * w4[0] as i32
                                + xs[1] as i32 * w4[1] as i32
                                + xs[2] as i32 * w4[2] as i32
                                + xs[3] as i32 * w4[3] as i32;
                        }
                    }
                }
            }
        }
    }
}

macro_rules! dispatch_int8 {
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

/// # Safety
/// `x` and `w` must cover every offset the tile reads; the CPU must have AVX512-VNNI.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_dispatch(
    n: usize,
    nb: usize,
    t: &Tile,
    x: *const u8,
    w: *const i8,
    epi: Option<&FusedBytes>,
    sums: &mut [i32],
) {
    dispatch_int8!(vnni_tile, n, nb, t, x, w, epi, sums)
}

/// # Safety
/// As [`vnni_dispatch`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::needless_range_loop)] // indices keep the spill loop simple enough to unroll
#[allow(clippy::too_many_arguments)]
unsafe fn vnni_tile<const R: usize, const B: usize>(
    t: &Tile,
    x: *const u8,
    w: *const i8,
    epi: Option<&FusedBytes>,
    sums: &mut [i32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); B]; R];
    let q4 = c4(t.c) / 4;
    let mut wp = w;
    for i in 0..t.kh {
        for j in 0..t.kw {
            let xp = x.add(i * t.tap_h + j * t.tap_w);
            for q in 0..q4 {
                let mut wv = [_mm512_setzero_si512(); B];
                for (b, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(wp.add(b * t.wblock) as *const _);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_epi32(
                        (xp.add(r * t.pix + q * 4) as *const i32).read_unaligned(),
                    );
                    for (b, a) in row.iter_mut().enumerate() {
                        *a = _mm512_dpbusd_epi32(*a, xv, wv[b]);
                    }
                }
                wp = wp.add(64);
            }
        }
    }
    let Some(e) = epi else {
        for r in 0..R {
            for b in 0..B {
                _mm512_storeu_si512(sums.as_mut_ptr().add((r * B + b) * 16) as *mut _, acc[r][b]);
            }
        }
        return;
    };
    // The requantization of `requantize_avx512`, in registers.
    let k = RequantBounds::new(e.zero_point, e.clamp);
    for b in 0..B {
        let off = _mm512_loadu_si512(e.offset.add(16 * b) as *const _);
        let bq = _mm512_loadu_ps(e.bias_q.add(16 * b));
        let m = _mm512_loadu_ps(e.mult.add(16 * b));
        for r in 0..R {
            let res = e
                .residual
                .map(|(rp, rpix, ratio, zr)| (rp.add(r * rpix + 16 * b), ratio, zr));
            let q = requantize_vector(_mm512_add_epi32(acc[r][b], off), bq, m, res, k);
            _mm_storeu_si128(e.out.add(r * e.out_pix + 16 * b) as *mut _, q);
        }
    }
}

/// # Safety
/// `x` and `w` must cover every offset the tile reads; the CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
unsafe fn avx2_dispatch(
    n: usize,
    nb: usize,
    t: &Tile,
    x: *const u8,
    w: *const i16,
    sums: &mut [i32],
) {
    match nb {
        1 => avx2_run::<1>(n, t, x, w, sums),
        2 => avx2_run::<2>(n, t, x, w, sums),
        3 => avx2_run::<3>(n, t, x, w, sums),
        _ => avx2_run::<4>(n, t, x, w, sums),
    }
}

/// # Safety
/// As [`avx2_dispatch`].
#[cfg(target_arch = "x86_64")]
unsafe fn avx2_run<const B: usize>(
    n: usize,
    t: &Tile,
    x: *const u8,
    w: *const i16,
    sums: &mut [i32],
) {
    // 16 registers: R x B accumulators, B weights and a broadcast.
    let most = match B {
        1 => 4,
        2 => 3,
        _ => 2,
    };
    let mut r0 = 0;
    while r0 < n {
        let m = (n - r0).min(most);
        let xs = x.add(r0 * t.pix);
        let out = &mut sums[r0 * B * 8..];
        match m {
            1 => avx2_tile::<1, B>(t, xs, w, out),
            2 => avx2_tile::<2, B>(t, xs, w, out),
            3 => avx2_tile::<3, B>(t, xs, w, out),
            _ => avx2_tile::<4, B>(t, xs, w, out),
        }
        r0 += m;
    }
}

/// # Safety
/// As [`avx2_dispatch`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::needless_range_loop)] // indices keep the spill loop simple enough to unroll
unsafe fn avx2_tile<const R: usize, const B: usize>(
    t: &Tile,
    x: *const u8,
    w: *const i16,
    sums: &mut [i32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_si256(); B]; R];
    let c2 = t.c.div_ceil(2);
    let mut wp = w;
    for i in 0..t.kh {
        for j in 0..t.kw {
            let xp = x.add(i * t.tap_h + j * t.tap_w);
            for q in 0..c2 {
                let mut wv = [_mm256_setzero_si256(); B];
                for (b, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_si256(wp.add(b * t.wblock) as *const _);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let p = xp.add(r * t.pix + q * 2);
                    let pair = (*p as i32) | ((*p.add(1) as i32) << 16);
                    let xv = _mm256_set1_epi32(pair);
                    for (b, a) in row.iter_mut().enumerate() {
                        *a = _mm256_add_epi32(*a, _mm256_madd_epi16(xv, wv[b]));
                    }
                }
                wp = wp.add(16);
            }
        }
    }
    for r in 0..R {
        for b in 0..B {
            _mm256_storeu_si256(sums.as_mut_ptr().add((r * B + b) * 8) as *mut _, acc[r][b]);
        }
    }
}

/// Requantizes a tile's sums (`[n][nb][block]`) into the output.
#[allow(clippy::too_many_arguments)]
fn epilogue(
    packed: &PackedInt8,
    out: &mut Int8Out,
    op: Plane,
    oy: usize,
    ox: usize,
    b0: usize,
    n: usize,
    nb: usize,
    sums: &[i32],
) {
    let block = packed.kernel.block();
    for r in 0..n {
        let at = op.at(oy as isize, (ox + r) as isize);
        for b in 0..nb {
            let ch0 = (b0 + b) * block;
            let s = &sums[(r * nb + b) * block..][..block];
            match out {
                Int8Out::Bytes {
                    data,
                    offset,
                    zero_point,
                    clamp,
                    residual,
                } => {
                    let dst = &mut data[at + ch0 - *offset..][..block];
                    let res = residual.map(|(rd, rp, ratio, zr)| {
                        (
                            &rd[rp.at(oy as isize, (ox + r) as isize) + ch0..][..block],
                            ratio,
                            zr,
                        )
                    });
                    requantize_block(
                        s,
                        &packed.offset[ch0..ch0 + block],
                        &packed.bias_q[ch0..ch0 + block],
                        &packed.mult[ch0..ch0 + block],
                        res,
                        *zero_point,
                        *clamp,
                        dst,
                    );
                }
                Int8Out::Floats { data, offset, act } => {
                    let dst = &mut data[at + ch0 - *offset..][..block];
                    for l in 0..block {
                        let acc = s[l] + packed.offset[ch0 + l];
                        let v = acc as f32 * packed.atw[ch0 + l] + packed.bias[ch0 + l];
                        dst[l] = act.map_or(v, |a| a.apply(v));
                    }
                }
            }
        }
    }
}

/// Bounds applied to a requantized value before it is rounded to an integer, so that no
/// scale can make the conversion overflow (the result is clamped to a byte anyway).
const REQUANT_LIMIT: f32 = 1e9;

/// The constants of [`requantize_vector`] for one output quantization.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct RequantBounds {
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
    zero_point: std::arch::x86_64::__m512i,
}

#[cfg(target_arch = "x86_64")]
impl RequantBounds {
    /// Clamping to the byte bounds less the zero point before rounding gives the bytes of
    /// [`requantize_block`]'s clamp to `REQUANT_LIMIT`, round, add, clamp (rounding commutes
    /// with a clamp to integers; NaN meets the upper bound first in both).
    #[inline(always)]
    unsafe fn new(zero_point: i32, clamp: (i32, i32)) -> RequantBounds {
        use std::arch::x86_64::*;
        const { assert!(REQUANT_LIMIT > 512.0) };
        RequantBounds {
            lo: _mm512_set1_ps((clamp.0 - zero_point) as f32),
            hi: _mm512_set1_ps((clamp.1 - zero_point) as f32),
            zero_point: _mm512_set1_epi32(zero_point),
        }
    }
}

/// 16 output bytes from 16 sums already offset (`acc`): `(f32(acc) + bias_q) * mult`, plus
/// `f32(r - z_r) * ratio` for a residual's 16 bytes at `residual`, clamped, rounded half to
/// even (the default rounding mode), plus the zero point.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn requantize_vector(
    acc: std::arch::x86_64::__m512i,
    bias_q: std::arch::x86_64::__m512,
    mult: std::arch::x86_64::__m512,
    residual: Option<(*const u8, f32, i32)>,
    k: RequantBounds,
) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let mut v = _mm512_mul_ps(_mm512_add_ps(_mm512_cvtepi32_ps(acc), bias_q), mult);
    if let Some((r, ratio, zr)) = residual {
        let rb = _mm512_cvtepu8_epi32(_mm_loadu_si128(r as *const _));
        let rf = _mm512_cvtepi32_ps(_mm512_sub_epi32(rb, _mm512_set1_epi32(zr)));
        v = _mm512_add_ps(v, _mm512_mul_ps(rf, _mm512_set1_ps(ratio)));
    }
    v = _mm512_max_ps(_mm512_min_ps(v, k.hi), k.lo);
    _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(v), k.zero_point))
}

/// `dst = clamp(round(((f32(sum + offset) + bias_q) * mult [+ f32(r - zr) * ratio])) + zp)`,
/// rounding half to even; AVX-512 when the CPU has it, the same operations in Rust
/// otherwise.
#[allow(clippy::too_many_arguments)]
fn requantize_block(
    sums: &[i32],
    offset: &[i32],
    bias_q: &[f32],
    mult: &[f32],
    residual: Option<(&[u8], f32, i32)>,
    zero_point: i32,
    clamp: (i32, i32),
    dst: &mut [u8],
) {
    let n = dst.len();
    assert!(sums.len() >= n && offset.len() >= n && bias_q.len() >= n && mult.len() >= n);
    assert!(residual.is_none_or(|(r, _, _)| r.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if n.is_multiple_of(16) && crate::backend::cpu::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512 and every slice holds at least `n` values.
        unsafe { requantize_avx512(sums, offset, bias_q, mult, residual, zero_point, clamp, dst) };
        return;
    }
    for l in 0..n {
        let v = ((sums[l] + offset[l]) as f32 + bias_q[l]) * mult[l];
        let v = match residual {
            Some((r, ratio, zr)) => v + (r[l] as i32 - zr) as f32 * ratio,
            None => v,
        };
        let q = v.clamp(-REQUANT_LIMIT, REQUANT_LIMIT).round_ties_even() as i32 + zero_point;
        dst[l] = q.clamp(clamp.0, clamp.1) as u8;
    }
}

/// # Safety
/// The CPU must have AVX-512 (F, BW); `dst.len()` a multiple of 16 and every slice at least
/// as long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[allow(clippy::too_many_arguments)]
unsafe fn requantize_avx512(
    sums: &[i32],
    offset: &[i32],
    bias_q: &[f32],
    mult: &[f32],
    residual: Option<(&[u8], f32, i32)>,
    zero_point: i32,
    clamp: (i32, i32),
    dst: &mut [u8],
) {
    use std::arch::x86_64::*;
    let k = RequantBounds::new(zero_point, clamp);
    for l in (0..dst.len()).step_by(16) {
        let acc = _mm512_add_epi32(
            _mm512_loadu_si512(sums.as_ptr().add(l) as *const _),
            _mm512_loadu_si512(offset.as_ptr().add(l) as *const _),
        );
        let res = residual.map(|(r, ratio, zr)| (r.as_ptr().add(l), ratio, zr));
        let q = requantize_vector(
            acc,
            _mm512_loadu_ps(bias_q.as_ptr().add(l)),
            _mm512_loadu_ps(mult.as_ptr().add(l)),
            res,
            k,
        );
        _mm_storeu_si128(dst.as_mut_ptr().add(l) as *mut _, q);
    }
}

/// The naive quantized convolution the kernels are checked against: input bytes `[C, H,
/// W]` (NCHW) with zero point `z_in` outside the image, weights `[K, C, KH, KW]`, the same
/// epilogue formula; returns bytes or floats `[K, OH, OW]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_reference(
    x: &[u8],
    (c, h, w): (usize, usize, usize),
    weights: &[i8],
    (k, kh, kw): (usize, usize, usize),
    p: crate::tensor::Conv2dParams,
    q: &ConvQuant,
    out: ReferenceOut,
) -> (Vec<u8>, Vec<f32>) {
    let oh = (h + 2 * p.padding.0 - p.dilation.0 * (kh - 1) - 1) / p.stride.0 + 1;
    let ow = (w + 2 * p.padding.1 - p.dilation.1 * (kw - 1) - 1) / p.stride.1 + 1;
    let (s_in, z_in) = q.input;
    let (mut bytes, mut floats) = (Vec::new(), Vec::new());
    for o in 0..k {
        let atw = s_in * q.weight_scales[o];
        let b = q.bias.map_or(0.0, |b| b[o]);
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc: i64 = 0;
                for ci in 0..c {
                    for i in 0..kh {
                        for j in 0..kw {
                            let iy = (oy * p.stride.0 + i * p.dilation.0) as isize
                                - p.padding.0 as isize;
                            let ix = (ox * p.stride.1 + j * p.dilation.1) as isize
                                - p.padding.1 as isize;
                            let xv = if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                z_in
                            } else {
                                x[(ci * h + iy as usize) * w + ix as usize] as i32
                            };
                            acc += ((xv - z_in) * weights[((o * c + ci) * kh + i) * kw + j] as i32)
                                as i64;
                        }
                    }
                }
                let acc = acc as i32;
                let idx = (o * oh + oy) * ow + ox;
                match &out {
                    ReferenceOut::Bytes {
                        zero_point,
                        clamp,
                        residual,
                    } => {
                        let mut v = (acc as f32 + b / atw) * (atw / q.output_scale);
                        if let Some((r, ratio, zr)) = residual {
                            v += (r[idx] as i32 - zr) as f32 * ratio;
                        }
                        let qv = v.clamp(-REQUANT_LIMIT, REQUANT_LIMIT).round_ties_even() as i32
                            + zero_point;
                        bytes.push(qv.clamp(clamp.0, clamp.1) as u8);
                    }
                    ReferenceOut::Floats { act } => {
                        let v = acc as f32 * atw + b;
                        floats.push(act.map_or(v, |a| a.apply(v)));
                    }
                }
            }
        }
    }
    (bytes, floats)
}

/// The output form of [`conv_reference`].
pub enum ReferenceOut<'a> {
    /// Requantized bytes (as [`Int8Out::Bytes`], the residual as NCHW bytes `[K, OH, OW]`).
    Bytes {
        /// Output zero point.
        zero_point: i32,
        /// Clamp.
        clamp: (i32, i32),
        /// Residual bytes, scale ratio, zero point.
        residual: Option<(&'a [u8], f32, i32)>,
    },
    /// Floats with an activation.
    Floats {
        /// Activation.
        act: Option<Activation>,
    },
}

// ----- Depthwise convolution, pooling, additions and conversions on byte planes ----------

/// A depthwise convolution's int8 weights widened to 32 bits and packed `[KH][KW][cs]`,
/// with the epilogue's per-channel values.
#[derive(Clone, Debug)]
pub struct PackedInt8Depthwise {
    weights: Vec<i32>,
    /// Kernel (height, width).
    pub kernel_hw: (usize, usize),
    /// Channel stride of the planes.
    pub cs: usize,
    offset: Vec<i32>,
    bias_q: Vec<f32>,
    mult: Vec<f32>,
    atw: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedInt8Depthwise {
    /// Packs int8 weights `[C, 1, KH, KW]` for planes of channel stride `cs`.
    pub fn new(
        weights: &[i8],
        c: usize,
        kernel_hw: (usize, usize),
        q: &ConvQuant,
        cs: usize,
    ) -> Self {
        let (kh, kw) = kernel_hw;
        assert_eq!(weights.len(), c * kh * kw, "weight size");
        let mut w = vec![0i32; kh * kw * cs];
        let (mut offset, mut bias_q, mut mult, mut atw, mut bias) = (
            vec![0i32; cs],
            vec![0f32; cs],
            vec![0f32; cs],
            vec![0f32; cs],
            vec![0f32; cs],
        );
        for ch in 0..c {
            let mut sum = 0;
            for t in 0..kh * kw {
                let v = weights[ch * kh * kw + t] as i32;
                w[t * cs + ch] = v;
                sum += v;
            }
            offset[ch] = -q.input.1 * sum;
            atw[ch] = q.input.0 * q.weight_scales[ch];
            mult[ch] = atw[ch] / q.output_scale;
            bias[ch] = q.bias.map_or(0.0, |b| b[ch]);
            bias_q[ch] = bias[ch] / atw[ch];
        }
        PackedInt8Depthwise {
            weights: w,
            kernel_hw,
            cs,
            offset,
            bias_q,
            mult,
            atw,
            bias,
        }
    }
}

crate::backend::cpu::simd::vectorized_fn! {
    fn widen_multiply_add(acc: &mut [i32], x: &[u8], w: &[i32]) {
        for ((a, &x), &w) in acc.iter_mut().zip(x).zip(w) {
            *a += x as i32 * w;
        }
    }
}

/// Output rows `rows` of a depthwise convolution between byte planes (same channel stride).
pub fn depthwise_rows(
    conv: &Int8Conv,
    packed: &PackedInt8Depthwise,
    input: &[u8],
    mut out: Int8Out,
    rows: Range<usize>,
) {
    let (ip, op) = (conv.input, conv.output);
    let cs = packed.cs;
    assert!(input.len() >= ip.len() && ip.cs == cs && op.cs == cs && rows.end <= op.h);
    assert!(conv.padding.0 <= ip.halo && conv.padding.1 <= ip.halo);
    let (kh, kw) = packed.kernel_hw;
    let mut acc = vec![0i32; cs];
    for oy in rows {
        for ox in 0..op.w {
            acc.fill(0);
            for i in 0..kh {
                let iy =
                    (oy * conv.stride.0 + i * conv.dilation.0) as isize - conv.padding.0 as isize;
                for j in 0..kw {
                    let ix = (ox * conv.stride.1 + j * conv.dilation.1) as isize
                        - conv.padding.1 as isize;
                    widen_multiply_add(
                        &mut acc,
                        &input[ip.at(iy, ix)..][..cs],
                        &packed.weights[(i * kw + j) * cs..][..cs],
                    );
                }
            }
            let at = op.at(oy as isize, ox as isize);
            match &mut out {
                Int8Out::Bytes {
                    data,
                    offset,
                    zero_point,
                    clamp,
                    residual,
                } => {
                    let res = residual.map(|(rd, rp, ratio, zr)| {
                        (&rd[rp.at(oy as isize, ox as isize)..][..cs], ratio, zr)
                    });
                    requantize_block(
                        &acc,
                        &packed.offset,
                        &packed.bias_q,
                        &packed.mult,
                        res,
                        *zero_point,
                        *clamp,
                        &mut data[at - *offset..][..cs],
                    );
                }
                Int8Out::Floats { data, offset, act } => {
                    let dst = &mut data[at - *offset..][..cs];
                    for l in 0..cs {
                        let v = (acc[l] + packed.offset[l]) as f32 * packed.atw[l] + packed.bias[l];
                        dst[l] = act.map_or(v, |a| a.apply(v));
                    }
                }
            }
        }
    }
}

/// Max pooling of bytes (the quantization is monotonic, so the input's scale and zero
/// point carry over).
pub fn max_pool_plane(
    x: (&[u8], Plane),
    p: crate::tensor::MaxPool2dParams,
    out: (&mut [u8], Plane),
) {
    let (ip, op) = (x.1, out.1);
    let c = ip.c;
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::simd::has_avx512() {
        assert!(x.0.len() >= ip.len() && out.0.len() >= op.len() && op.c == c);
        assert!(c <= ip.cs && c <= op.cs);
        // SAFETY: AVX-512 (F, BW) is present; every tap and output pixel lies inside the
        // planes, and lanes past `c` are masked.
        unsafe { max_pool_avx512(x.0, ip, p, out.0, op) };
        return;
    }
    let mut taps = Vec::new();
    for oy in 0..op.h {
        for ox in 0..op.w {
            let o = op.at(oy as isize, ox as isize);
            let dst = &mut out.0[o..o + c];
            dst.fill(0);
            crate::backend::cpu::nhwc::window_taps(ip, p, (oy, ox), &mut taps);
            for &t in &taps {
                for (d, &v) in dst.iter_mut().zip(&x.0[t..][..c]) {
                    *d = (*d).max(v);
                }
            }
        }
    }
}

/// [`max_pool_plane`] 64 channels at a time.
///
/// # Safety
/// AVX-512 F and BW; the planes as asserted by [`max_pool_plane`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn max_pool_avx512(
    x: &[u8],
    ip: Plane,
    p: crate::tensor::MaxPool2dParams,
    out: &mut [u8],
    op: Plane,
) {
    use std::arch::x86_64::*;
    let c = ip.c;
    let mut taps = Vec::with_capacity(p.kernel.0 * p.kernel.1);
    let (kh, kw) = p.kernel;
    let whole = p.padding == (0, 0) && p.dilation == (1, 1);
    for oy in 0..op.h {
        for ox in 0..op.w {
            let dst = out.as_mut_ptr().add(op.at(oy as isize, ox as isize));
            let (y0, x0) = (oy * p.stride.0, ox * p.stride.1);
            if whole && c <= 64 && y0 + kh <= ip.h && x0 + kw <= ip.w {
                // The usual case: a window inside the image, channels in one vector.
                let mask: __mmask64 = if c == 64 { u64::MAX } else { (1u64 << c) - 1 };
                let base = x.as_ptr().add(ip.at(y0 as isize, x0 as isize));
                let mut acc = _mm512_setzero_si512();
                for i in 0..kh {
                    for j in 0..kw {
                        let at = base.add(i * ip.row_stride() + j * ip.cs) as *const i8;
                        acc = _mm512_max_epu8(acc, _mm512_maskz_loadu_epi8(mask, at));
                    }
                }
                _mm512_mask_storeu_epi8(dst as *mut i8, mask, acc);
                continue;
            }
            super::nhwc::window_taps(ip, p, (oy, ox), &mut taps);
            for l in (0..c).step_by(64) {
                let mask: __mmask64 = if c - l >= 64 {
                    u64::MAX
                } else {
                    (1u64 << (c - l)) - 1
                };
                let mut acc = _mm512_setzero_si512();
                for &t in &taps {
                    let v = _mm512_maskz_loadu_epi8(mask, x.as_ptr().add(t + l) as *const i8);
                    acc = _mm512_max_epu8(acc, v);
                }
                _mm512_mask_storeu_epi8(dst.add(l) as *mut i8, mask, acc);
            }
        }
    }
}

/// The mean of `count` quantized values whose sum is `sum`, `padded` of them padding (the
/// float zero, `zero_point`), in the same quantization: `zp + round((sum - valid*zp) /
/// count)`, half to even.
#[inline]
fn mean_q(sum: i64, valid: i64, count: i64, zero_point: i32) -> u8 {
    let v = ((sum - valid * zero_point as i64) as f64 / count as f64).round_ties_even() as i64
        + zero_point as i64;
    v.clamp(0, 255) as u8
}

/// Average pooling of bytes in the input's quantization (PyTorch's divisor rules).
pub fn avg_pool_plane(
    x: (&[u8], Plane),
    zero_point: i32,
    p: crate::tensor::AvgPool2dParams,
    out: (&mut [u8], Plane),
) {
    let (ip, op) = (x.1, out.1);
    let c = ip.c;
    let mut sum = vec![0i64; c];
    for oy in 0..op.h {
        for ox in 0..op.w {
            sum.fill(0);
            let win = super::nhwc::avg_window(ip, p, (oy, ox));
            for iy in win.rows.clone() {
                for ix in win.cols.clone() {
                    for (s, &v) in sum.iter_mut().zip(&x.0[ip.at(iy, ix)..][..c]) {
                        *s += v as i64;
                    }
                }
            }
            let (valid, count) = (win.valid as i64, win.divisor as i64);
            let o = op.at(oy as isize, ox as isize);
            for (d, &s) in out.0[o..o + c].iter_mut().zip(&sum) {
                *d = mean_q(s, valid, count, zero_point);
            }
        }
    }
}

/// Adaptive average pooling of bytes in the input's quantization.
pub fn adaptive_avg_pool_plane(x: (&[u8], Plane), zero_point: i32, out: (&mut [u8], Plane)) {
    let (ip, op) = (x.1, out.1);
    let c = ip.c;
    let mut sum = vec![0i64; c];
    for oy in 0..op.h {
        let rows = super::nhwc::adaptive_range(oy, ip.h, op.h);
        for ox in 0..op.w {
            let cols = super::nhwc::adaptive_range(ox, ip.w, op.w);
            sum.fill(0);
            for iy in rows.clone() {
                for ix in cols.clone() {
                    for (s, &v) in sum
                        .iter_mut()
                        .zip(&x.0[ip.at(iy as isize, ix as isize)..][..c])
                    {
                        *s += v as i64;
                    }
                }
            }
            let n = (rows.len() * cols.len()) as i64;
            let o = op.at(oy as isize, ox as isize);
            for (d, &s) in out.0[o..o + c].iter_mut().zip(&sum) {
                *d = mean_q(s, n, n, zero_point);
            }
        }
    }
}

/// The option-A shortcut on bytes: new channels hold the zero point (the float zero).
pub fn pad_channels_plane(
    x: (&[u8], Plane),
    stride: usize,
    before: usize,
    zero_point: i32,
    out: (&mut [u8], Plane),
) {
    let (ip, op) = (x.1, out.1);
    for oy in 0..op.h {
        for ox in 0..op.w {
            let src = &x.0[ip.at((oy * stride) as isize, (ox * stride) as isize)..][..ip.c];
            let o = op.at(oy as isize, ox as isize);
            let dst = &mut out.0[o..o + op.c];
            dst.fill(zero_point as u8);
            dst[before..before + ip.c].copy_from_slice(src);
        }
    }
}

/// `q_out = clamp(round(f32(a - za) * (sa / s) + f32(b - zb) * (sb / s)) + z, lo, hi)`:
/// the sum of two byte planes requantized (`clamp` carries a fused ReLU).
#[allow(clippy::too_many_arguments)]
pub fn add_planes(
    a: (&[u8], Plane, (f32, i32)),
    b: (&[u8], Plane, (f32, i32)),
    out: (&mut [u8], Plane, (f32, i32)),
    clamp: (i32, i32),
) {
    let (op, (s, z)) = (out.1, out.2);
    let (ma, mb) = (a.2 .0 / s, b.2 .0 / s);
    for y in 0..op.h as isize {
        for x in 0..op.w as isize {
            let av = &a.0[a.1.at(y, x)..][..op.c];
            let bv = &b.0[b.1.at(y, x)..][..op.c];
            let o = op.at(y, x);
            for ((d, &p), &q) in out.0[o..o + op.c].iter_mut().zip(av).zip(bv) {
                let v = (p as i32 - a.2 .1) as f32 * ma + (q as i32 - b.2 .1) as f32 * mb;
                *d = (v.round_ties_even() as i32 + z).clamp(clamp.0, clamp.1) as u8;
            }
        }
    }
}

/// Quantizes a float plane into a byte plane: `clamp(z + round(x * (1 / s)))`, PyTorch's
/// `quantize_per_tensor`.
pub fn quantize_plane(x: (&[f32], Plane), q: (f32, i32), out: (&mut [u8], Plane)) {
    let (ip, op) = (x.1, out.1);
    let inv = 1.0 / q.0;
    for y in 0..op.h as isize {
        for xx in 0..op.w as isize {
            let src = &x.0[ip.at(y, xx)..][..op.c];
            let o = op.at(y, xx);
            quantize_slice(src, inv, q.1, &mut out.0[o..o + op.c]);
        }
    }
}

/// Bytes `clamp(zero_point + round_half_even(x * inv_scale), 0, 255)` (NaN gives 0), in
/// float32 operations: AVX-512 when the CPU has it, the same operations in Rust otherwise.
pub fn quantize_slice(x: &[f32], inv_scale: f32, zero_point: i32, out: &mut [u8]) {
    let n = out.len().min(x.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::backend::cpu::simd::has_avx512() {
        done = n / 16 * 16;
        // SAFETY: AVX-512 is present; both slices hold at least `done` values.
        unsafe { quantize_avx512(&x[..done], inv_scale, zero_point, &mut out[..done]) };
    }
    for (o, &v) in out[done..n].iter_mut().zip(&x[done..n]) {
        *o = quantize_one(v, inv_scale, zero_point);
    }
}

#[inline]
fn quantize_one(v: f32, inv_scale: f32, zero_point: i32) -> u8 {
    let q = zero_point as f32 + (v * inv_scale).round_ties_even();
    if q.is_nan() {
        0
    } else {
        q.clamp(0.0, 255.0) as u8
    }
}

/// # Safety
/// AVX-512F; `x` and `out` of the same length, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(x: &[f32], inv_scale: f32, zero_point: i32, out: &mut [u8]) {
    use std::arch::x86_64::*;
    let (inv, zp) = (_mm512_set1_ps(inv_scale), _mm512_set1_ps(zero_point as f32));
    let (zero, top) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
    for i in (0..out.len()).step_by(16) {
        let t = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), inv);
        // Round to nearest, ties to even, without exceptions.
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        // vmaxps returns its second operand (0) when the first is NaN.
        let q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, zp), zero), top);
        _mm_storeu_si128(
            out.as_mut_ptr().add(i) as *mut _,
            _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)),
        );
    }
}

/// [`super::nhwc::from_nchw`] for bytes; images of up to 4 channels (RGB, grey) are written
/// a pixel's 4 bytes at a time, the channels past `C` set to 0 (their weights are zero in
/// every kernel's packing).
pub fn bytes_from_nchw(x: &[u8], out: (&mut [u8], Plane)) {
    let p = out.1;
    if p.c > 4 || p.cs < 4 {
        return super::nhwc::from_nchw(x, out);
    }
    assert!(x.len() >= p.c * p.h * p.w && out.0.len() >= p.len());
    let hw = p.h * p.w;
    for y in 0..p.h {
        let base = p.at(y as isize, 0);
        let dst = &mut out.0[base..base + p.w * p.cs];
        for (xx, px) in dst.chunks_exact_mut(p.cs).enumerate() {
            let at = y * p.w + xx;
            let mut word = [0u8; 4];
            for (ch, b) in word.iter_mut().take(p.c).enumerate() {
                *b = x[ch * hw + at];
            }
            px[..4].copy_from_slice(&word);
        }
    }
}

/// Dequantizes a byte plane into a float plane: `f32(q - z) * s`.
pub fn dequantize_plane(x: (&[u8], Plane), q: (f32, i32), out: (&mut [f32], Plane)) {
    let (ip, op) = (x.1, out.1);
    for y in 0..op.h as isize {
        for xx in 0..op.w as isize {
            let src = &x.0[ip.at(y, xx)..][..op.c];
            let o = op.at(y, xx);
            for (d, &v) in out.0[o..o + op.c].iter_mut().zip(src) {
                *d = (v as i32 - q.1) as f32 * q.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_quantization_matches_the_scalar_one() {
        let mut x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        // Ties (k + 0.5 after scaling), the clamps, and values no byte can hold.
        x.extend([
            0.25,
            0.75,
            -0.25,
            2.5 / 4.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            -0.0,
        ]);
        x.extend((0..6).map(|i| i as f32 * 0.125));
        for (inv, zp) in [(4.0, 0), (4.0, 128), (0.5, 255), (1e-3, 17)] {
            let mut got = vec![0u8; x.len()];
            quantize_slice(&x, inv, zp, &mut got);
            let want: Vec<u8> = x.iter().map(|&v| quantize_one(v, inv, zp)).collect();
            assert_eq!(got, want, "inv {inv} zp {zp}");
        }
    }
}
