//! bfloat16 products for mixed-precision training ([`crate::autocast`]): the operands of a
//! product are rounded to bf16 (round to nearest even, as `tensor.bfloat16()` in PyTorch)
//! and multiplied with float32 accumulation; the result is float32. Mirrors what
//! `torch.autocast("cpu", dtype=torch.bfloat16)` does for `mm`/`linear`/`conv2d`, except
//! that the result is not rounded to bf16 afterwards.
//!
//! Layouts: `A (M x K)` is packed row-major as bf16 with rows padded to a multiple of 16 and
//! K to a multiple of 32 ([`PackedA`]); `B (K x N)` in the "VNNI" pair layout both kernels
//! read: `[K/2][N][2]`, the two bf16 of rows `2p` and `2p + 1` of one column side by side in
//! one 32-bit word ([`PackedB`]), N padded to a multiple of 16. Padding is zero.
//!
//! Kernels ([`Bf16Kernel`]): AMX-BF16 tiles (`tdpbf16ps`, blocks of 32 x 32 outputs in four
//! tile accumulators) where the CPU has them and the operating system grants the tile
//! state, otherwise AVX512-BF16 (`vdpbf16ps`, blocks of 8 rows x 32 columns in registers).
//! Without either, mixed precision is refused with the reason ([`unsupported_reason`]).
//!
//! [`matmul_bf16_reference`] is the naive reference: the same rounded operands, products
//! summed in float64. The kernels differ from it only by float32 accumulation.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod weight_grad;

use super::conv::{col2im_add, fill_bias, flip_transpose, im2col_row, ConvGeom};
use super::matmul::{MatRef, Par};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rounds a float32 to bf16 bits, to nearest with ties to even (NaN stays a quiet NaN).
///
/// ```
/// use convnet::backend::cpu::bf16::{from_bf16, to_bf16};
/// assert_eq!(to_bf16(1.0), 0x3f80);
/// assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0); // a tie rounds to even
/// assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
/// assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
/// ```
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The float32 value of bf16 bits (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest bf16 value, as a float32.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// The bf16 product kernels (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX-BF16 tile multiplies (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 dot products (`vdpbf16ps`).
    Avx512,
}

impl Bf16Kernel {
    /// The fastest kernel this CPU can run, or `None` (see [`unsupported_reason`]).
    /// `CONVNET_BF16_KERNEL=avx512` picks the AVX512-BF16 kernel on a CPU with AMX (to
    /// measure what CPUs without AMX run); an unavailable choice is ignored.
    pub fn best() -> Option<Self> {
        static BEST: OnceLock<Option<Bf16Kernel>> = OnceLock::new();
        *BEST.get_or_init(|| {
            let chosen = match std::env::var("CONVNET_BF16_KERNEL").as_deref() {
                Ok("avx512") => Some(Bf16Kernel::Avx512),
                Ok("amx") => Some(Bf16Kernel::Amx),
                _ => None,
            };
            chosen
                .into_iter()
                .chain([Bf16Kernel::Amx, Bf16Kernel::Avx512])
                .find(|k| k.available())
        })
    }

    /// Whether this CPU (and, for AMX, the operating system) can run the kernel.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let vector = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16");
            match self {
                Bf16Kernel::Avx512 => vector,
                Bf16Kernel::Amx => vector && amx::ready(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// A short description, as `convnet bench --machine` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "AMX-BF16 tiles (tdpbf16ps)",
            Bf16Kernel::Avx512 => "AVX512-BF16 (vdpbf16ps)",
        }
    }
}

/// Why bf16 products cannot run here, or `None` when they can.
pub fn unsupported_reason() -> Option<String> {
    match Bf16Kernel::best() {
        Some(_) => None,
        None => Some(
            "bf16 mixed precision needs a CPU with AVX512-BF16 (vdpbf16ps) or AMX-BF16, \
             and this one has neither; train in float32 (--precision fp32)"
                .to_string(),
        ),
    }
}

/// `A (M x K)` as bf16, row-major with `kp` bf16 per row (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct PackedA {
    data: Vec<u16>,
    rows: usize,
    k: usize,
    mp: usize,
    kp: usize,
}

/// `B (K x N)` as bf16 pairs, `[kp / 2][np]` words (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct PackedB {
    data: Vec<u32>,
    k: usize,
    cols: usize,
    np: usize,
    kp: usize,
}

/// Two bf16 values in one word, `lo` in the low half (the even row of a pair).
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// `out[i] = pair(lo[i], hi[i])` (`hi` zero when `None`), over `out.len()` values.
fn pack_pairs(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    let n = out.len();
    assert!(lo.len() >= n && hi.is_none_or(|h| h.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512F/BW are present; the slices hold `n` values (asserted).
        return unsafe { pack_pairs_avx512(lo, hi, out) };
    }
    for i in 0..n {
        out[i] = pair(lo[i], hi.map_or(0.0, |h| h[i]));
    }
}

/// `out[i] = to_bf16(src[i])` over `out.len()` values.
fn round_slice(src: &[f32], out: &mut [u16]) {
    let n = out.len();
    assert!(src.len() >= n);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512F/BW are present; the slices hold `n` values (asserted).
        return unsafe { round_slice_avx512(src, out) };
    }
    out.iter_mut().zip(src).for_each(|(o, &s)| *o = to_bf16(s));
}

/// [`to_bf16`] on 16 lanes, the result in the low half of each 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn round16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_blend_epi32(nan, rounded, quiet)
}

/// # Safety
/// AVX-512F and BW; `lo` (and `hi`) hold `out.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_pairs_avx512(lo: &[f32], hi: Option<&[f32]>, out: &mut [u32]) {
    use std::arch::x86_64::*;
    let n = out.len();
    // The pair words of the `mask`ed lanes of 16 values from `i` on.
    let words = |i: usize, mask: __mmask16| {
        let l = round16(_mm512_maskz_loadu_ps(mask, lo.as_ptr().add(i)));
        match hi {
            Some(h) => {
                let h = round16(_mm512_maskz_loadu_ps(mask, h.as_ptr().add(i)));
                _mm512_or_si512(l, _mm512_slli_epi32::<16>(h))
            }
            None => l,
        }
    };
    let mut i = 0;
    while i + 16 <= n {
        _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut _, words(i, !0));
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1 << (n - i)) - 1;
        _mm512_mask_storeu_epi32(out.as_mut_ptr().add(i) as *mut _, mask, words(i, mask));
    }
}

/// # Safety
/// AVX-512F and BW; `src` holds `out.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn round_slice_avx512(src: &[f32], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = out.len();
    let mut i = 0;
    while i + 16 <= n {
        let r = round16(_mm512_loadu_ps(src.as_ptr().add(i)));
        _mm256_storeu_si256(out.as_mut_ptr().add(i) as *mut _, _mm512_cvtepi32_epi16(r));
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1 << (n - i)) - 1;
        let r = round16(_mm512_maskz_loadu_ps(mask, src.as_ptr().add(i)));
        _mm512_mask_cvtepi32_storeu_epi16(out.as_mut_ptr().add(i) as *mut _, mask, r);
    }
}

impl PackedA {
    /// Packs `a`.
    pub fn new(a: MatRef) -> Self {
        let mut p = PackedA::default();
        p.pack(a);
        p
    }

    /// Sizes the buffer for `rows x k` (every value is written by the packing).
    fn shape(&mut self, rows: usize, k: usize) {
        self.rows = rows;
        self.k = k;
        self.mp = rows.div_ceil(16).max(1) * 16;
        self.kp = k.div_ceil(32).max(1) * 32;
        self.data.resize(self.mp * self.kp, 0);
    }

    /// Packs `rows` rows of `k` values, row `r` written into `dst[..k]` by `fill(r, dst)`
    /// (the padding is zeroed here).
    fn pack_rows(&mut self, rows: usize, k: usize, mut fill: impl FnMut(usize, &mut [u16])) {
        self.shape(rows, k);
        let kp = self.kp;
        for (r, row) in self.data[..self.mp * kp].chunks_mut(kp).enumerate() {
            if r < rows {
                fill(r, &mut row[..k]);
                row[k..].fill(0);
            } else {
                row.fill(0);
            }
        }
    }

    /// Packs `a` into this buffer (reusing its memory).
    pub fn pack(&mut self, a: MatRef) {
        self.pack_rows(a.rows(), a.cols(), |r, dst| match a.row(r) {
            Some(src) => round_slice(src, dst),
            None => dst
                .iter_mut()
                .enumerate()
                .for_each(|(c, d)| *d = to_bf16(a.at(r, c))),
        });
    }

    /// Packs im2col's matrix `[CG*KH*KW, OH*OW]` of one image's group `x [CG, H, W]`
    /// without forming it in float32 (`row` is scratch space of `OH*OW` values).
    pub fn pack_im2col(&mut self, x: &[f32], g: &ConvGeom, row: &mut Vec<f32>) {
        let ohw = g.out_plane();
        row.resize(ohw, 0.0);
        self.pack_rows(g.col_rows(), ohw, |r, dst| {
            if g.is_pointwise() {
                round_slice(&x[r * ohw..(r + 1) * ohw], dst);
            } else {
                im2col_row(x, g, r, row);
                round_slice(row, dst);
            }
        });
    }
}

impl PackedB {
    /// Packs `b`.
    pub fn new(b: MatRef) -> Self {
        let mut p = PackedB::default();
        p.pack(b);
        p
    }

    /// Sizes the buffer for `k x cols` (every value is written by the packing).
    fn shape(&mut self, k: usize, cols: usize) {
        self.k = k;
        self.cols = cols;
        self.np = cols.div_ceil(16).max(1) * 16;
        self.kp = k.div_ceil(32).max(1) * 32;
        self.data.resize(self.kp / 2 * self.np, 0);
    }

    /// Packs `k` rows of `cols` values, the pair of rows `2p`, `2p + 1` written into
    /// `dst[..cols]` by `fill(p, dst)` (the padding is zeroed here).
    fn pack_pairs_of_rows(
        &mut self,
        k: usize,
        cols: usize,
        mut fill: impl FnMut(usize, &mut [u32]),
    ) {
        self.shape(k, cols);
        let np = self.np;
        for (p, words) in self.data.chunks_mut(np).enumerate() {
            if 2 * p < k {
                fill(p, &mut words[..cols]);
                words[cols..].fill(0);
            } else {
                words.fill(0);
            }
        }
    }

    /// Packs `b` into this buffer (reusing its memory).
    pub fn pack(&mut self, b: MatRef) {
        let (k, cols) = (b.rows(), b.cols());
        if b.row(0).is_none() && b.t().row(0).is_some() {
            // Columns contiguous: each column's pairs are adjacent floats.
            self.shape(k, cols);
            let np = self.np;
            self.data.fill(0);
            for c in 0..cols {
                let col = b.t().row(c).expect("columns contiguous");
                for (p, two) in col.chunks(2).enumerate() {
                    self.data[p * np + c] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                }
            }
            return;
        }
        self.pack_pairs_of_rows(k, cols, |p, words| {
            let (r0, r1) = (2 * p, 2 * p + 1);
            match (b.row(r0), (r1 < k).then(|| b.row(r1))) {
                (Some(lo), Some(Some(hi))) => pack_pairs(lo, Some(hi), words),
                (Some(lo), None) => pack_pairs(lo, None, words),
                _ => {
                    for (c, w) in words.iter_mut().enumerate() {
                        let hi = if r1 < k { b.at(r1, c) } else { 0.0 };
                        *w = pair(b.at(r0, c), hi);
                    }
                }
            }
        });
    }

    /// Packs im2col's matrix `[CG*KH*KW, OH*OW]` of one image's group `x [CG, H, W]`
    /// without forming it in float32 (`rows` is scratch space).
    pub fn pack_im2col(&mut self, x: &[f32], g: &ConvGeom, rows: &mut (Vec<f32>, Vec<f32>)) {
        let (k, ohw) = (g.col_rows(), g.out_plane());
        rows.0.resize(ohw, 0.0);
        rows.1.resize(ohw, 0.0);
        self.pack_pairs_of_rows(k, ohw, |p, words| {
            let (r0, r1) = (2 * p, 2 * p + 1);
            if g.is_pointwise() {
                let hi = (r1 < k).then(|| &x[r1 * ohw..(r1 + 1) * ohw]);
                return pack_pairs(&x[r0 * ohw..(r0 + 1) * ohw], hi, words);
            }
            im2col_row(x, g, r0, &mut rows.0);
            if r1 < k {
                im2col_row(x, g, r1, &mut rows.1);
                pack_pairs(&rows.0, Some(&rows.1), words)
            } else {
                pack_pairs(&rows.0, None, words)
            }
        });
    }
}

/// `dst[..rows, ..cols] (row stride ldc) [+]= a @ b` with the chosen kernel, over the
/// column blocks `blocks` of 16 (all of them: `0..b.np / 16`).
fn gemm_packed(
    dst: &mut [f32],
    ldc: usize,
    a: &PackedA,
    b: &PackedB,
    accumulate: bool,
    kernel: Bf16Kernel,
) {
    assert_eq!(a.k, b.k, "inner dimensions differ");
    assert_eq!(a.kp, b.kp);
    assert!(ldc >= b.cols);
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    assert!(
        dst.len() >= (a.rows - 1) * ldc + b.cols,
        "destination too small"
    );
    assert!(a.data.len() >= a.mp * a.kp && b.data.len() >= b.kp / 2 * b.np);
    assert!(
        kernel.available(),
        "{kernel:?} is not available on this CPU"
    );
    let out = Out {
        dst,
        ldc,
        rows: a.rows,
        cols: b.cols,
        accumulate,
    };
    match kernel {
        // SAFETY: the kernel is available (asserted); the packed buffers hold `mp x kp` and
        // `kp / 2 x np` values (asserted) and `Out::write` bounds every store.
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Amx => unsafe { amx::gemm(out, a, b) },
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512 => unsafe { avx512_gemm(out, a, b) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("no bf16 kernel off x86-64"),
    }
}

/// Where a kernel's blocks of results go.
struct Out<'a> {
    dst: &'a mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
}

impl Out<'_> {
    /// Writes (or adds) the block `sums` (row stride `stride`) at `(m0, n0)`, clipped to
    /// the result's size.
    fn write(&mut self, m0: usize, n0: usize, sums: &[f32], stride: usize, bm: usize, bn: usize) {
        let rows = bm.min(self.rows.saturating_sub(m0));
        let cols = bn.min(self.cols.saturating_sub(n0));
        for r in 0..rows {
            let d = &mut self.dst[(m0 + r) * self.ldc + n0..][..cols];
            let s = &sums[r * stride..][..cols];
            if self.accumulate {
                d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
            } else {
                d.copy_from_slice(s);
            }
        }
    }
}

/// Sixteen words as 32 bf16 values (the same bits).
#[cfg(target_arch = "x86_64")]
#[inline]
fn as_bh(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both types are 64 bytes of plain bits.
    unsafe { std::mem::transmute::<std::arch::x86_64::__m512i, std::arch::x86_64::__m512bh>(v) }
}

/// The AVX512-BF16 kernel: blocks of 8 rows x 32 columns, 16 accumulators in registers.
///
/// # Safety
/// AVX-512F and AVX512-BF16; `a` and `b` hold their padded sizes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512_gemm(mut out: Out, a: &PackedA, b: &PackedB) {
    use std::arch::x86_64::*;
    let (kp, np) = (a.kp, b.np);
    let mut sums = [0f32; 8 * 32];
    for m0 in (0..a.mp).step_by(8) {
        for n0 in (0..np).step_by(32) {
            let two = n0 + 16 < np;
            let mut acc = [[_mm512_setzero_ps(); 2]; 8];
            let ap = a.data.as_ptr().add(m0 * kp);
            let bp = b.data.as_ptr().add(n0);
            for p in 0..kp / 2 {
                let b0: __m512bh = as_bh(_mm512_loadu_si512(bp.add(p * np) as _));
                let b1: __m512bh = if two {
                    as_bh(_mm512_loadu_si512(bp.add(p * np + 16) as _))
                } else {
                    as_bh(_mm512_setzero_si512())
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let word = (ap.add(r * kp + 2 * p) as *const i32).read_unaligned();
                    let av: __m512bh = as_bh(_mm512_set1_epi32(word));
                    acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                    if two {
                        acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(sums.as_mut_ptr().add(r * 32), acc[0]);
                _mm512_storeu_ps(sums.as_mut_ptr().add(r * 32 + 16), acc[1]);
            }
            out.write(m0, n0, &sums, 32, 8, if two { 32 } else { 16 });
        }
    }
}

/// `dst = a @ b` (or `dst += a @ b` when `accumulate`) with bf16 operands and float32
/// accumulation; `dst` row-major `a.rows x b.cols`. Panics where no bf16 kernel runs
/// (callers check [`unsupported_reason`] first).
///
/// ```
/// use convnet::backend::cpu::bf16::{matmul_bf16, unsupported_reason};
/// use convnet::backend::cpu::matmul::{MatRef, Par};
/// if unsupported_reason().is_none() {
///     let a = [1.0f32, 2.0, 3.0, 4.0];
///     let b = [1.0f32, 0.0, 0.0, 1.0];
///     let mut c = [0f32; 4];
///     matmul_bf16(&mut c, MatRef::row_major(&a, 2, 2), MatRef::row_major(&b, 2, 2), false, Par::Seq);
///     assert_eq!(c, a);
/// }
/// ```
pub fn matmul_bf16(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool, par: Par) {
    let kernel = Bf16Kernel::best().expect("bf16 products need AVX512-BF16 or AMX-BF16");
    matmul_bf16_with(dst, a, b, accumulate, par, kernel)
}

/// [`matmul_bf16`] with a chosen kernel (for tests and benchmarks).
pub fn matmul_bf16_with(
    dst: &mut [f32],
    a: MatRef,
    b: MatRef,
    accumulate: bool,
    par: Par,
    kernel: Bf16Kernel,
) {
    let (m, n) = (a.rows(), b.cols());
    assert_eq!(a.cols(), b.rows(), "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    let pb = PackedB::new(b);
    let split = par == Par::Rayon
        && rayon::current_num_threads() > 1
        && m > 32
        && m * n * a.cols() >= 64 * 64 * 64;
    if !split {
        return gemm_packed(dst, n, &PackedA::new(a), &pb, accumulate, kernel);
    }
    dst[..m * n]
        .par_chunks_mut(32 * n)
        .enumerate()
        .for_each(|(i, rows)| {
            let pa = PackedA::new(a.rows_range(32 * i..(32 * i + 32).min(m)));
            gemm_packed(rows, n, &pa, &pb, accumulate, kernel);
        });
}

/// The reference for [`matmul_bf16`]: the operands rounded to bf16, products summed in
/// float64.
pub fn matmul_bf16_reference(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    for i in 0..a.rows() {
        for j in 0..b.cols() {
            let acc: f64 = (0..a.cols())
                .map(|p| round_bf16(a.at(i, p)) as f64 * round_bf16(b.at(p, j)) as f64)
                .sum();
            let d = &mut dst[i * b.cols() + j];
            *d = if accumulate {
                *d + acc as f32
            } else {
                acc as f32
            };
        }
    }
}

/// The weights of each group as packed `A` operands: `W_g [KG, CG*KH*KW]`.
fn pack_groups(w: &[f32], g: &ConvGeom, transpose: bool) -> Vec<PackedA> {
    let (kg, rows) = (g.kg(), g.col_rows());
    (0..g.groups)
        .map(|grp| {
            let wg = MatRef::row_major(&w[grp * kg * rows..(grp + 1) * kg * rows], kg, rows);
            PackedA::new(if transpose { wg.t() } else { wg })
        })
        .collect()
}

/// Per-thread buffers of the convolutions, kept between calls (the rayon pool's threads
/// live as long as the process): packed operands and im2col rows.
#[derive(Default)]
struct Scratch {
    a: PackedA,
    b: PackedB,
    rows: (Vec<f32>, Vec<f32>),
    col: Vec<f32>,
}

thread_local! {
    #[cfg(target_arch = "x86_64")]
    static WEIGHT_GRAD: std::cell::RefCell<amx::WeightGradImage> =
        const { std::cell::RefCell::new(amx::WeightGradImage::new()) };
    static XP: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

fn best_kernel() -> Bf16Kernel {
    Bf16Kernel::best().expect("bf16 products need AVX512-BF16 or AMX-BF16")
}

/// `y = conv2d(x, w) + bias` with bf16 products: per image and group, `W_g @ col`, im2col
/// packed straight into bf16 pairs (mirrors [`super::conv::conv2d_forward_im2col`]).
pub fn conv2d_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]) {
    conv2d_forward_with(best_kernel(), x, w, bias, g, y)
}

/// [`conv2d_forward`] on a chosen kernel (stride-1 layers run without im2col on AMX).
pub fn conv2d_forward_with(
    kernel: Bf16Kernel,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Amx && amx::DirectConv::applies(g) {
        let conv = amx::DirectConv::new(Some(w), g);
        y.par_chunks_mut(g.out_image())
            .zip(x.par_chunks(g.in_image()))
            .for_each(|(y_img, x_img)| {
                XP.with(|xp| {
                    let mut xp = xp.borrow_mut();
                    conv.layout(x_img, g, &mut xp);
                    // SAFETY: `applies` checked the tiles; `xp` is the image's layout.
                    unsafe { conv.image(&xp, g, bias, y_img) }
                })
            });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Avx512
        && std::arch::is_x86_feature_detected!("avx512dq")
        && super::conv_direct::applies(g)
    {
        return direct_forward(x, w, bias, g, y);
    }
    let (cg, kg, ohw) = (g.cg(), g.kg(), g.out_plane());
    let weights = pack_groups(w, g, false);
    y.par_chunks_mut(g.out_image())
        .zip(x.par_chunks(g.in_image()))
        .for_each(|(y_img, x_img)| {
            with_scratch(|s| {
                for (grp, wg) in weights.iter().enumerate() {
                    let x_grp = &x_img[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
                    let y_grp = &mut y_img[grp * kg * ohw..(grp + 1) * kg * ohw];
                    fill_bias(y_grp, bias.map(|b| &b[grp * kg..(grp + 1) * kg]), ohw);
                    s.b.pack_im2col(x_grp, g, &mut s.rows);
                    gemm_packed(y_grp, ohw, wg, &s.b, true, kernel);
                }
            })
        });
}

/// [`conv2d_forward`] on the direct 3x3 kernels of [`super::conv_direct`] with `vdpbf16ps`:
/// each image and the weights become words of two bf16 channels (see
/// [`super::conv_direct::Bf16Pairs`]), so each multiply-add instruction takes two input
/// channels, and no im2col matrix is written.
#[cfg(target_arch = "x86_64")]
fn direct_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]) {
    use super::conv_direct;
    let pairs = ConvGeom {
        c: g.c.div_ceil(2),
        ..*g
    };
    let plane = g.h * g.w;
    let packed = conv_direct::pack_weights(&weight_pairs(w, g, true), &pairs);
    let padded = if g.stride == (1, 1) {
        0
    } else {
        pairs.c * (g.h + 2) * (g.w + 2)
    };
    y.par_chunks_mut(g.out_image())
        .zip(x.par_chunks(g.in_image()))
        .for_each_init(
            // Per worker: the image's pair words, and the zero-bordered copy for stride 2.
            || (vec![0u32; pairs.c * plane], vec![0f32; padded]),
            |(image, xp), (y_img, x_img)| {
                pack_plane_pairs(x_img, plane, image);
                // SAFETY: the caller checked AVX-512DQ, `Bf16Kernel::Avx512` (AVX-512F and
                // AVX512-BF16) and `applies`; the buffers have the sizes of `pairs`.
                unsafe {
                    conv_direct::forward_image_bf16_pairs(image, &packed, bias, &pairs, xp, y_img)
                }
            },
        );
}

/// The 3x3 weights `w [K, C, 3, 3]` of `g` as words of two bf16 values (see
/// [`super::conv_direct::Bf16Pairs`]): pairs of input channels, `[K, ceil(C/2), 3, 3]`, when
/// `along_inputs`, else pairs of output channels, `[ceil(K/2), C, 3, 3]`; an odd last
/// channel pairs with zero. The words are carried as float32 bits.
#[cfg(target_arch = "x86_64")]
fn weight_pairs(w: &[f32], g: &ConvGeom, along_inputs: bool) -> Vec<f32> {
    let taps = g.kh * g.kw;
    let weight = |k: usize, c: usize, tap: usize| {
        if k < g.k && c < g.c {
            w[(k * g.c + c) * taps + tap]
        } else {
            0.0
        }
    };
    let (outer, inner) = if along_inputs {
        (g.k, g.c.div_ceil(2))
    } else {
        (g.k.div_ceil(2), g.c)
    };
    let mut words = vec![0f32; outer * inner * taps];
    for (i, word) in words.iter_mut().enumerate() {
        let (o, n, tap) = (i / (inner * taps), i / taps % inner, i % taps);
        let (lo, hi) = if along_inputs {
            (weight(o, 2 * n, tap), weight(o, 2 * n + 1, tap))
        } else {
            (weight(2 * o, n, tap), weight(2 * o + 1, n, tap))
        };
        *word = f32::from_bits(pair(lo, hi));
    }
    words
}

/// The planes (`plane` values each) of one image `src` as words of two bf16 values, planes
/// `2i` and `2i + 1` in word plane `i` of `out` (an odd last plane pairs with zero).
#[cfg(target_arch = "x86_64")]
fn pack_plane_pairs(src: &[f32], plane: usize, out: &mut [u32]) {
    let planes = src.len() / plane;
    for (i, words) in out.chunks_exact_mut(plane).enumerate() {
        let lo = &src[2 * i * plane..(2 * i + 1) * plane];
        let hi = (2 * i + 1 < planes).then(|| &src[(2 * i + 1) * plane..(2 * i + 2) * plane]);
        pack_pairs(lo, hi, words);
    }
}

/// The stride-2 input gradient on the direct kernel of
/// [`super::conv_direct::backward_input_s2`] with `vdpbf16ps`: the sum runs over output
/// channels, so each image's output gradient and the weights become words of two output
/// channels.
#[cfg(target_arch = "x86_64")]
fn direct_input_grad_s2(dy: &[f32], w: &[f32], g: &ConvGeom, pairs: &ConvGeom, dx: &mut [f32]) {
    use super::conv_direct;
    let plane = g.oh * g.ow;
    let packed = conv_direct::pack_input_grad_s2_weights(&weight_pairs(w, g, false), pairs);
    dx.par_chunks_mut(g.in_image())
        .zip(dy.par_chunks(g.out_image()))
        .for_each_init(
            || vec![0u32; pairs.k * plane],
            |image, (dx_img, dy_img)| {
                pack_plane_pairs(dy_img, plane, image);
                // SAFETY: the caller checked `Bf16Kernel::Avx512` (AVX-512F and AVX512-BF16)
                // and `input_grad_s2_applies` for `pairs`, whose sizes the buffers have.
                unsafe {
                    conv_direct::input_grad_image_s2_bf16_pairs(image, &packed, pairs, dx_img)
                }
            },
        );
}

/// The input gradient with bf16 products: the flipped-kernel convolution for stride 1 (as
/// [`super::conv::conv2d_backward_input`]), otherwise `W_g^T @ dY_g` and col2im.
pub fn conv2d_backward_input(dy: &[f32], w: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    conv2d_backward_input_with(best_kernel(), dy, w, g, dx)
}

/// [`conv2d_backward_input`] on a chosen kernel.
pub fn conv2d_backward_input_with(
    kernel: Bf16Kernel,
    dy: &[f32],
    w: &[f32],
    g: &ConvGeom,
    dx: &mut [f32],
) {
    if let Some(tg) = g.flipped_input_grad() {
        let flipped = flip_transpose(w, g);
        return conv2d_forward_with(kernel, dy, &flipped, None, &tg, dx);
    }
    #[cfg(target_arch = "x86_64")]
    {
        // The direct stride-2 kernel on pairs of output channels.
        let pairs = ConvGeom {
            k: g.k.div_ceil(2),
            ..*g
        };
        if kernel == Bf16Kernel::Avx512 && super::conv_direct::input_grad_s2_applies(&pairs) {
            return direct_input_grad_s2(dy, w, g, &pairs, dx);
        }
    }
    let (cg, kg, rows, ohw) = (g.cg(), g.kg(), g.col_rows(), g.out_plane());
    let weights = pack_groups(w, g, true);
    let pointwise = g.is_pointwise();
    dx.par_chunks_mut(g.in_image())
        .zip(dy.par_chunks(g.out_image()))
        .for_each(|(dx_img, dy_img)| {
            with_scratch(|s| {
                for (grp, wt) in weights.iter().enumerate() {
                    let dx_grp = &mut dx_img[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
                    s.b.pack(MatRef::row_major(
                        &dy_img[grp * kg * ohw..(grp + 1) * kg * ohw],
                        kg,
                        ohw,
                    ));
                    if pointwise {
                        gemm_packed(dx_grp, ohw, wt, &s.b, false, kernel);
                    } else {
                        s.col.resize(rows * ohw, 0.0);
                        gemm_packed(&mut s.col, ohw, wt, &s.b, false, kernel);
                        dx_grp.fill(0.0);
                        col2im_add(&s.col, g, dx_grp);
                    }
                }
            })
        });
}

/// The weight gradient with bf16 products, summed over the batch in float32:
/// `dW_g^T [CG*KH*KW, KG] += col @ dY_g^T` per image (im2col packed straight into bf16),
/// each rayon split with its own partial sum, transposed once at the end.
///
/// Without AMX, 3x3 layers with padding 1 take a direct `vdpbf16ps` kernel, which pairs
/// images rather than im2col rows.
pub fn conv2d_backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    conv2d_backward_weight_with(best_kernel(), x, dy, g, dw)
}

/// [`conv2d_backward_weight`] on a chosen kernel (stride-1 layers run without im2col on
/// AMX).
pub fn conv2d_backward_weight_with(
    kernel: Bf16Kernel,
    x: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    dw: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Amx && amx::DirectConv::applies(g) {
        return direct_weight_grad(x, dy, g, dw);
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == Bf16Kernel::Avx512 && weight_grad::applies(g) {
        return weight_grad::backward_weight(x, dy, g, dw);
    }
    let (cg, kg, rows, ohw) = (g.cg(), g.kg(), g.col_rows(), g.out_plane());
    let w_len = g.k * rows;
    let threads = rayon::current_num_threads();
    let chunk = g.n.div_ceil(threads).max(1);
    let partials: Vec<Vec<f32>> = (0..g.n)
        .into_par_iter()
        .chunks(chunk)
        .map(|images| {
            let mut acc = vec![0f32; w_len];
            with_scratch(|s| {
                for n in images {
                    let x_img = &x[n * g.in_image()..(n + 1) * g.in_image()];
                    let dy_img = &dy[n * g.out_image()..(n + 1) * g.out_image()];
                    for grp in 0..g.groups {
                        let x_grp = &x_img[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
                        s.a.pack_im2col(x_grp, g, &mut s.rows.0);
                        let dy_g = &dy_img[grp * kg * ohw..(grp + 1) * kg * ohw];
                        s.b.pack(MatRef::row_major(dy_g, kg, ohw).t());
                        let block = &mut acc[grp * kg * rows..(grp + 1) * kg * rows];
                        gemm_packed(block, kg, &s.a, &s.b, true, kernel);
                    }
                }
            });
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut acc = partials.next().unwrap_or_else(|| vec![0f32; w_len]);
    for p in partials {
        acc.iter_mut().zip(&p).for_each(|(d, s)| *d += s);
    }
    // [rows, kg] -> [kg, rows] per group.
    for grp in 0..g.groups {
        let block = &acc[grp * kg * rows..(grp + 1) * kg * rows];
        let out = &mut dw[grp * kg * rows..(grp + 1) * kg * rows];
        for r in 0..rows {
            for k in 0..kg {
                out[k * rows + r] = block[r * kg + k];
            }
        }
    }
}

/// [`conv2d_backward_weight`] on the tiles of [`amx::DirectConv`], without im2col.
#[cfg(target_arch = "x86_64")]
fn direct_weight_grad(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    let conv = amx::DirectConv::new(None, g);
    let w_len = dw.len().min(g.k * g.col_rows());
    let chunk = g.n.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = (0..g.n)
        .into_par_iter()
        .chunks(chunk)
        .map(|images| {
            let mut acc = vec![0f32; w_len];
            WEIGHT_GRAD.with(|img| {
                let mut img = img.borrow_mut();
                for n in images {
                    let x_img = &x[n * g.in_image()..(n + 1) * g.in_image()];
                    let dy_img = &dy[n * g.out_image()..(n + 1) * g.out_image()];
                    conv.weight_grad_layout(x_img, dy_img, g, &mut img);
                    // SAFETY: `applies` checked the tiles; `img` is this image's layout.
                    unsafe { conv.weight_grad(&img, g, &mut acc) };
                }
            });
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut acc = partials.next().unwrap_or_else(|| vec![0f32; w_len]);
    for p in partials {
        acc.iter_mut().zip(&p).for_each(|(d, s)| *d += s);
    }
    // [tap][K][C] -> [K][C][tap].
    let (taps, kc) = (g.kh * g.kw, g.k * g.c);
    for (i, d) in dw[..w_len].iter_mut().enumerate() {
        *d = acc[(i % taps) * kc + i / taps];
    }
}

#[cfg(test)]
mod tests;
