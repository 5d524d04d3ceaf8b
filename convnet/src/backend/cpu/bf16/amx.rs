//! The AMX-BF16 kernel of the parent's products: blocks of 32 x 32 results in four tile
//! accumulators (`tmm0..3`), `A` tiles of 16 rows x 32 bf16 (`tmm4`, `tmm5`) and `B` tiles
//! of 16 pairs x 16 columns (`tmm6`, `tmm7`) multiplied by `tdpbf16ps`. Tile instructions
//! are written as inline assembly (the AMX intrinsics are not stable Rust); the tile
//! registers are configured and released within one call.

use super::super::conv::ConvGeom;
use super::super::int8::amx::zero_accumulators;
use super::{to_bf16, Out, PackedA, PackedB};
use std::arch::asm;
use std::sync::OnceLock;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the operating system grants this process
/// the tile state.
pub(super) fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    // Leaf 7, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    *READY.get_or_init(|| super::super::int8::amx::tiles_usable((1 << 22) | (1 << 24)))
}

/// Configures the tiles: accumulators `tmm0..3` of 16 x 16 floats, `A` tiles `tmm4`, `tmm5`
/// of 16 rows x `a_bytes`, `B` tiles `tmm6`, `tmm7` of `b_rows` rows x 64 bytes.
///
/// # Safety
/// [`ready`] must hold; `a_bytes <= 64`, `b_rows <= 16`, `a_bytes == 4 * b_rows`.
unsafe fn configure(a_bytes: usize, b_rows: usize) {
    let mut config = [0u8; 64];
    config[0] = 1; // palette 1
    for t in 0..8 {
        let (colsb, rows) = match t {
            0..=3 => (64, 16),
            4 | 5 => (a_bytes, 16),
            _ => (64, b_rows),
        };
        config[16 + 2 * t..18 + 2 * t].copy_from_slice(&(colsb as u16).to_le_bytes());
        config[48 + t] = rows as u8;
    }
    asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly));
}

/// One step of a block of up to 32 x 32 results: the `A` tiles at `a` and 16 rows below
/// (`two_m`), the `B` tiles at `b` and 16 words to the right (`two_n`), rows `a_stride` and
/// `b_stride` bytes apart.
///
/// # Safety
/// The tiles are configured; every row the loads read is readable.
unsafe fn multiply(
    a: *const u16,
    a_stride: usize,
    b: *const u32,
    b_stride: usize,
    two_m: bool,
    two_n: bool,
) {
    asm!(
        "tileloadd tmm4, [{a} + {sa}*1]",
        "tileloadd tmm6, [{b} + {sb}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        a = in(reg) a, b = in(reg) b, sa = in(reg) a_stride, sb = in(reg) b_stride,
        options(nostack, readonly)
    );
    if two_n {
        asm!(
            "tileloadd tmm7, [{b} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            b = in(reg) b.add(16), sb = in(reg) b_stride,
            options(nostack, readonly)
        );
    }
    if two_m {
        asm!(
            "tileloadd tmm5, [{a} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            a = in(reg) (a as *const u8).add(16 * a_stride), sa = in(reg) a_stride,
            options(nostack, readonly)
        );
        if two_n {
            asm!("tdpbf16ps tmm3, tmm5, tmm7", options(nostack, nomem));
        }
    }
}

/// Stores the accumulators in use into `sums` (rows of 32 floats).
///
/// # Safety
/// The tiles are configured.
unsafe fn store_accumulators(sums: &mut [f32; 32 * 32], two_m: bool, two_n: bool) {
    let (s, row) = (sums.as_mut_ptr(), 128usize);
    asm!("tilestored [{c} + {row}*1], tmm0", c = in(reg) s, row = in(reg) row, options(nostack));
    if two_n {
        asm!("tilestored [{c} + {row}*1], tmm1", c = in(reg) s.add(16), row = in(reg) row, options(nostack));
    }
    if two_m {
        asm!("tilestored [{c} + {row}*1], tmm2", c = in(reg) s.add(16 * 32), row = in(reg) row, options(nostack));
        if two_n {
            asm!("tilestored [{c} + {row}*1], tmm3", c = in(reg) s.add(16 * 32 + 16), row = in(reg) row, options(nostack));
        }
    }
}

/// `out [+]= a @ b` on tiles.
///
/// # Safety
/// [`ready`] must hold; `a` and `b` hold their padded sizes (`mp x kp`, `kp / 2 x np`).
pub(super) unsafe fn gemm(mut out: Out, a: &PackedA, b: &PackedB) {
    configure(64, 16);
    let a_stride = a.kp * 2;
    let b_stride = b.np * 4;
    let mut sums = [0f32; 32 * 32];
    for m0 in (0..a.mp).step_by(32) {
        let two_m = m0 + 16 < a.mp;
        for n0 in (0..b.np).step_by(32) {
            let two_n = n0 + 16 < b.np;
            zero_accumulators();
            for kc in 0..a.kp / 32 {
                let ap = a.data.as_ptr().add(m0 * a.kp + kc * 32);
                let bp = b.data.as_ptr().add(kc * 16 * b.np + n0);
                multiply(ap, a_stride, bp, b_stride, two_m, two_n);
            }
            store_accumulators(&mut sums, two_m, two_n);
            out.write(
                m0,
                n0,
                &sums,
                32,
                if two_m { 32 } else { 16 },
                if two_n { 32 } else { 16 },
            );
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// A stride-1 convolution on tiles, without im2col: the image is laid out as pairs of
/// channels (`[C/2][H + 2PH][W + 2PW]` words, zero border), and output positions run over
/// the padded width (`t = oy * pitch + ox`, the columns past the output's width computed and
/// dropped), so that the input of 16 consecutive positions at one tap is 16 consecutive
/// words and a `B` tile of 16 channel pairs is one strided load. The weights are packed
/// `[K][KH*KW][C']` (C' the padded channels), so that `A` tiles are 16 output channels x
/// one tap's channel chunk.
pub(super) struct DirectConv {
    /// Channel pairs per tile multiply (rows of a `B` tile), and chunks per tap.
    pairs: usize,
    chunks: usize,
    /// Padded width and words per channel pair's plane.
    pitch: usize,
    plane: usize,
    /// Output positions over the padded width, rounded up to 16.
    positions: usize,
    /// Packed weights: `mp` rows of `taps * chunks * pairs * 2` bf16.
    weights: Vec<u16>,
    row: usize,
    mp: usize,
}

impl DirectConv {
    /// Whether `g` fits: stride 1, no dilation, one group, padding below the kernel size.
    pub(super) fn applies(g: &ConvGeom) -> bool {
        g.stride == (1, 1)
            && g.dilation == (1, 1)
            && g.groups == 1
            && g.padding.0 < g.kh
            && g.padding.1 < g.kw
            && g.oh * g.ow > 0
            && ready()
    }

    /// The geometry of `g`, with the weights `w` packed when given (the forward pass).
    pub(super) fn new(w: Option<&[f32]>, g: &ConvGeom) -> Self {
        let cpairs = g.c.div_ceil(2);
        let pairs = cpairs.min(16);
        let chunks = cpairs.div_ceil(pairs);
        let cp = chunks * pairs * 2;
        let taps = g.kh * g.kw;
        let pitch = g.w + 2 * g.padding.1;
        let plane = (g.h + 2 * g.padding.0) * pitch;
        let positions = (g.oh * pitch).div_ceil(16) * 16;
        let row = taps * cp;
        let mp = g.k.div_ceil(16) * 16;
        let mut weights = vec![0u16; if w.is_some() { mp * row } else { 0 }];
        for k in (0..g.k).filter(|_| w.is_some()) {
            let w = w.expect("weights");
            for c in 0..g.c {
                for tap in 0..taps {
                    weights[k * row + tap * cp + c] = to_bf16(w[(k * g.c + c) * taps + tap]);
                }
            }
        }
        DirectConv {
            pairs,
            chunks,
            pitch,
            plane,
            positions,
            weights,
            row,
            mp,
        }
    }

    /// Words of one image's pair layout, with the slack the last tiles read past it.
    fn image_words(&self, g: &ConvGeom) -> usize {
        let reach = self.positions + 16 + (g.kh - 1) * self.pitch + g.kw;
        self.chunks * self.pairs * self.plane + reach
    }

    /// Lays out one image `x [C, H, W]` as channel pairs with a zero border into `xp`.
    pub(super) fn layout(&self, x: &[f32], g: &ConvGeom, xp: &mut Vec<u32>) {
        xp.clear();
        xp.resize(self.image_words(g), 0);
        let (ph, pw) = g.padding;
        let hw = g.h * g.w;
        for q in 0..g.c.div_ceil(2) {
            let lo = &x[2 * q * hw..(2 * q + 1) * hw];
            let hi = (2 * q + 1 < g.c).then(|| &x[(2 * q + 1) * hw..(2 * q + 2) * hw]);
            for y in 0..g.h {
                let at = q * self.plane + (y + ph) * self.pitch + pw;
                super::pack_pairs(
                    &lo[y * g.w..(y + 1) * g.w],
                    hi.map(|h| &h[y * g.w..(y + 1) * g.w]),
                    &mut xp[at..at + g.w],
                );
            }
        }
    }

    /// `y [K, OH, OW] = conv(x) + bias` for one image, `xp` its [`layout`](Self::layout).
    ///
    /// # Safety
    /// [`ready`] must hold; `xp` is this geometry's layout.
    pub(super) unsafe fn image(
        &self,
        xp: &[u32],
        g: &ConvGeom,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        assert!(xp.len() >= self.image_words(g) && y.len() >= g.k * g.oh * g.ow);
        configure(self.pairs * 4, self.pairs);
        let a_stride = self.row * 2;
        let b_stride = self.plane * 4;
        let taps = g.kh * g.kw;
        let cp = self.chunks * self.pairs * 2;
        let mut sums = [0f32; 32 * 32];
        let (ohw, valid) = (g.oh * g.ow, g.oh * self.pitch);
        for m0 in (0..self.mp).step_by(32) {
            let two_m = m0 + 16 < self.mp;
            for t0 in (0..self.positions).step_by(32) {
                let two_n = t0 + 16 < self.positions;
                zero_accumulators();
                for tap in 0..taps {
                    let off = tap / g.kw * self.pitch + tap % g.kw;
                    for chunk in 0..self.chunks {
                        let ap = self
                            .weights
                            .as_ptr()
                            .add(m0 * self.row + tap * cp + chunk * self.pairs * 2);
                        let bp = xp.as_ptr().add(chunk * self.pairs * self.plane + t0 + off);
                        multiply(ap, a_stride, bp, b_stride, two_m, two_n);
                    }
                }
                store_accumulators(&mut sums, two_m, two_n);
                // Scatter the positions inside the output.
                let rows = (if two_m { 32 } else { 16 }).min(g.k - m0.min(g.k));
                let cols = (if two_n { 32 } else { 16 }).min(valid.saturating_sub(t0));
                for r in 0..rows {
                    let k = m0 + r;
                    let b = bias.map_or(0.0, |b| b[k]);
                    let plane = &mut y[k * ohw..(k + 1) * ohw];
                    let src = &sums[r * 32..r * 32 + cols];
                    let mut j = 0;
                    while j < cols {
                        let t = t0 + j;
                        let (oy, ox) = (t / self.pitch, t % self.pitch);
                        if ox >= g.ow {
                            j += self.pitch - ox;
                            continue;
                        }
                        let run = (g.ow - ox).min(cols - j);
                        plane[oy * g.ow + ox..oy * g.ow + ox + run]
                            .iter_mut()
                            .zip(&src[j..j + run])
                            .for_each(|(d, s)| *d = s + b);
                        j += run;
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// The weight gradient of a [`DirectConv`] geometry: `dW [K][C][tap] += sum_t dy[K][t] *
/// x[C][t + offset(tap)]` over the positions `t` of the padded width, on tiles: `A` is `dy`
/// as bf16 rows over the positions (zero at the dropped columns), `B` the input as pairs of
/// neighbouring positions for 16 channels (`[u][C']` words: `even` pairs positions `2u`,
/// `2u + 1`; `odd` pairs `2u + 1`, `2u + 2`, for taps at odd offsets).
pub(super) struct WeightGradImage {
    dy: Vec<u16>,
    plane: Vec<u16>,
    even: Vec<u32>,
    odd: Vec<u32>,
}

impl DirectConv {
    /// Positions of `dy`'s rows, rounded up to 32 (one `A` tile's width).
    fn dy_row(&self) -> usize {
        self.positions.div_ceil(32) * 32
    }

    /// Channels of the pair layouts, rounded up to 16.
    fn channels(g: &ConvGeom) -> usize {
        g.c.div_ceil(16) * 16
    }

    /// Rows of the pair layouts: every `u` a tile reads.
    fn pair_rows(&self, g: &ConvGeom) -> usize {
        self.dy_row() / 2 + ((g.kh - 1) * self.pitch + g.kw) / 2 + 1
    }

    /// Lays out one image's `x [C, H, W]` and `dy [K, OH, OW]` for [`weight_grad`](Self::weight_grad).
    pub(super) fn weight_grad_layout(
        &self,
        x: &[f32],
        dy: &[f32],
        g: &ConvGeom,
        out: &mut WeightGradImage,
    ) {
        let (ph, pw) = g.padding;
        let row = self.dy_row();
        out.dy.clear();
        out.dy.resize(self.mp * row, 0);
        for k in 0..g.k {
            for oy in 0..g.oh {
                let at = k * row + oy * self.pitch;
                super::round_slice(
                    &dy[(k * g.oh + oy) * g.ow..(k * g.oh + oy + 1) * g.ow],
                    &mut out.dy[at..at + g.ow],
                );
            }
        }
        let cs = Self::channels(g);
        let rows = self.pair_rows(g);
        // Each channel's padded plane as bf16 (zero border and tail), then read as words at
        // even and odd positions: a transpose from [C][u] to [u][C'].
        let span = 2 * rows + 2;
        out.plane.clear();
        out.plane.resize(g.c * span, 0);
        for c in 0..g.c {
            for y in 0..g.h {
                let at = c * span + (y + ph) * self.pitch + pw;
                super::round_slice(
                    &x[(c * g.h + y) * g.w..(c * g.h + y + 1) * g.w],
                    &mut out.plane[at..at + g.w],
                );
            }
        }
        out.even.resize(rows * cs, 0);
        out.odd.resize(rows * cs, 0);
        let plane = &out.plane;
        let word = |i: usize| plane[i] as u32 | (plane[i + 1] as u32) << 16;
        for u in 0..rows {
            let (even, odd) = (
                &mut out.even[u * cs..(u + 1) * cs],
                &mut out.odd[u * cs..(u + 1) * cs],
            );
            for c in 0..g.c {
                even[c] = word(c * span + 2 * u);
                odd[c] = word(c * span + 2 * u + 1);
            }
            even[g.c..].fill(0);
            odd[g.c..].fill(0);
        }
    }

    /// Adds one image's weight gradient into `dw [KH*KW][K][C]` (tap-major, so that a
    /// block of results adds as whole rows).
    ///
    /// # Safety
    /// [`ready`] must hold; `img` is this geometry's [`weight_grad_layout`](Self::weight_grad_layout).
    pub(super) unsafe fn weight_grad(&self, img: &WeightGradImage, g: &ConvGeom, dw: &mut [f32]) {
        let taps = g.kh * g.kw;
        let cs = Self::channels(g);
        let row = self.dy_row();
        assert!(img.dy.len() >= self.mp * row);
        assert!(
            img.even.len() >= self.pair_rows(g) * cs && img.odd.len() >= self.pair_rows(g) * cs
        );
        assert!(dw.len() >= g.k * g.c * taps);
        configure(64, 16);
        let (a_stride, b_stride) = (row * 2, cs * 4);
        let mut sums = [0f32; 32 * 32];
        for m0 in (0..self.mp).step_by(32) {
            let two_m = m0 + 16 < self.mp;
            for tap in 0..taps {
                let off = tap / g.kw * self.pitch + tap % g.kw;
                let (pairs, shift) = if off.is_multiple_of(2) {
                    (&img.even, off / 2)
                } else {
                    (&img.odd, (off - 1) / 2)
                };
                for n0 in (0..cs).step_by(32) {
                    let two_n = n0 + 16 < cs;
                    zero_accumulators();
                    for u0 in (0..row / 2).step_by(16) {
                        let ap = img.dy.as_ptr().add(m0 * row + 2 * u0);
                        let bp = pairs.as_ptr().add((u0 + shift) * cs + n0);
                        multiply(ap, a_stride, bp, b_stride, two_m, two_n);
                    }
                    store_accumulators(&mut sums, two_m, two_n);
                    let rows = (if two_m { 32 } else { 16 }).min(g.k.saturating_sub(m0));
                    let cols = (if two_n { 32 } else { 16 }).min(g.c.saturating_sub(n0));
                    for r in 0..rows {
                        let at = (tap * g.k + m0 + r) * g.c + n0;
                        dw[at..at + cols]
                            .iter_mut()
                            .zip(&sums[r * 32..r * 32 + cols])
                            .for_each(|(d, s)| *d += s);
                    }
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

impl WeightGradImage {
    pub(super) const fn new() -> Self {
        WeightGradImage {
            dy: Vec::new(),
            plane: Vec::new(),
            even: Vec::new(),
            odd: Vec::new(),
        }
    }
}
