//! The AMX-INT8 path of the int8 convolution (see the parent module's notes): tiles of 16
//! output pixels x 16 output channels accumulated by `tdpbusd`, then the parent's
//! requantization epilogue. Tile instructions are written as inline assembly (the AMX
//! intrinsics are not stable Rust); the tile registers belong to this module alone and are
//! configured and released within one call.

use super::super::nhwc::Plane;
use super::{
    c16, epilogue, requantize_vector, FusedBytes, Int8Conv, Int8Out, PackedInt8, RequantBounds,
};
use std::arch::asm;
use std::ops::Range;
use std::sync::OnceLock;

/// Whether the CPU has AMX-INT8 and the operating system lets this process use the tile
/// state (Linux asks each process to request it once: `arch_prctl(ARCH_REQ_XCOMP_PERM)`).
pub(super) fn ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    // Leaf 7, EDX: bit 24 AMX-TILE, bit 25 AMX-INT8.
    *READY.get_or_init(|| tiles_usable(3 << 24))
}

/// Zeroes the four accumulator tiles `tmm0..tmm3` (the int8 and bf16 kernels' layout).
///
/// # Safety
/// The tiles are configured (`ldtilecfg`) with those four as accumulators.
pub(in crate::backend::cpu) unsafe fn zero_accumulators() {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
}

/// Whether CPUID leaf 7 reports every bit of `edx_bits` in EDX (the AMX extensions wanted)
/// and the operating system grants the tile state.
pub(in crate::backend::cpu) fn tiles_usable(edx_bits: u32) -> bool {
    #[allow(unused_unsafe)] // cpuid is a safe function in newer Rust
    // SAFETY: cpuid exists on every x86-64 CPU.
    let (max_leaf, leaf7) = unsafe {
        (
            std::arch::x86_64::__cpuid(0).eax,
            std::arch::x86_64::__cpuid_count(7, 0),
        )
    };
    max_leaf >= 7 && leaf7.edx & edx_bits == edx_bits && request_tile_state()
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this arch_prctl request only extends the process's permitted register state.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// How a convolution's output rows map onto tiles: output pixels run over the input's
/// padded width, `step` bytes apart in the input, so that one tile load with a fixed stride
/// reads 16 of them even across output rows.
pub(super) struct Geometry {
    /// Output pixels per output row in the run (the columns past the output's width are
    /// computed and dropped).
    pitch: usize,
    /// Input bytes between neighbouring output pixels.
    step: usize,
    /// Bytes of one kernel row's taps for one output pixel: `KW * C16`.
    row_bytes: usize,
    /// Bytes of that row one tile multiply takes (at most 64, divides `row_bytes`).
    chunk: usize,
    /// Output pixels in the run of the rows.
    total: usize,
}

impl Geometry {
    /// The tile geometry of `rows` of `conv`, or `None` when the layer does not fit (the
    /// VNNI kernel runs it): dilated columns, a channel stride other than `C16`, an input
    /// row stride that is not a whole number of output pixel steps, under 16 pixels.
    pub(super) fn of(conv: &Int8Conv, packed: &PackedInt8, rows: Range<usize>) -> Option<Self> {
        let (ip, op) = (conv.input, conv.output);
        let (_, kw) = packed.kernel_hw;
        if rows.is_empty() || conv.dilation.1 != 1 || ip.cs != c16(packed.c) || op.w == 0 {
            return None;
        }
        let step = conv.stride.1 * ip.cs;
        let row_in = conv.stride.0 * ip.row_stride();
        if !row_in.is_multiple_of(step) || row_in / step < op.w {
            return None;
        }
        let pitch = row_in / step;
        let total = (rows.len() - 1) * pitch + op.w;
        if total < 16 {
            return None;
        }
        let row_bytes = kw * ip.cs;
        let chunk = (1..=16)
            .rev()
            .map(|q| 4 * q)
            .find(|c| row_bytes.is_multiple_of(*c))?;
        Some(Geometry {
            pitch,
            step,
            row_bytes,
            chunk,
            total,
        })
    }
}

/// Output rows `rows` of `conv` on AMX tiles, written through the parent's epilogue.
pub(super) fn conv_rows(
    conv: &Int8Conv,
    packed: &PackedInt8,
    g: &Geometry,
    input: &[u8],
    out: &mut Int8Out,
    rows: Range<usize>,
) {
    let (ip, op) = (conv.input, conv.output);
    let (kh, _) = packed.kernel_hw;
    let iy = (rows.start * conv.stride.0) as isize - conv.padding.0 as isize;
    let base = ip.at(iy, -(conv.padding.1 as isize));
    let tap_h = conv.dilation.0 * ip.row_stride();
    let reach = base + (g.total - 1) * g.step + (kh - 1) * tap_h + g.row_bytes;
    assert!(reach <= input.len(), "tiles inside the input");
    let block_len = kh * g.row_bytes * 16;
    let blocks = packed.k.div_ceil(16);
    assert!(packed.tiles.len() >= blocks * block_len, "packed tiles");
    let pixels = if g.total >= 32 { 32 } else { 16 };
    let mut config = [0u8; 64];
    config[0] = 1; // palette 1
    for t in 0..8 {
        let (colsb, rows) = match t {
            0..=3 => (64, 16),      // accumulators: 16 pixels x 16 channels of i32
            4 | 5 => (g.chunk, 16), // inputs: 16 pixels x `chunk` bytes
            _ => (64, g.chunk / 4), // weights: `chunk / 4` groups of 4 bytes x 16 channels
        };
        config[16 + 2 * t..18 + 2 * t].copy_from_slice(&(colsb as u16).to_le_bytes());
        config[48 + t] = rows as u8;
    }
    let mut sums = [0i32; 32 * 32];
    let shape = Shape {
        kh,
        tap_h,
        step: g.step,
        row_bytes: g.row_bytes,
        chunk: g.chunk,
        block_len,
    };
    // SAFETY: the CPU has AMX (the kernel was chosen by `Int8Kernel::Amx.available()`) and
    // the configuration is valid for palette 1.
    unsafe { asm!("ldtilecfg [{}]", in(reg) config.as_ptr(), options(nostack, readonly)) };
    for b0 in (0..blocks).step_by(2) {
        let nb = (blocks - b0).min(2);
        let mut done = 0;
        while done < g.total {
            // The last tile moves back to end with the run (its first pixels are recomputed).
            let m = done.min(g.total - pixels);
            // SAFETY: pixel m + pixels - 1 is inside the run, whose reads `reach` bounds;
            // the weight reads stay inside blocks b0..b0 + nb (asserted above); `sums`
            // holds 32 x 32 values.
            unsafe {
                tile_product(
                    &shape,
                    input.as_ptr().add(base + m * g.step),
                    packed.tiles.as_ptr().add(b0 * block_len),
                    pixels == 32,
                    nb == 2,
                    sums.as_mut_ptr(),
                )
            };
            // Requantize the pixels that lie inside the output, a row's run at a time.
            let mut r = done - m;
            while r < pixels {
                let (oy, ox) = ((m + r) / g.pitch, (m + r) % g.pitch);
                if ox >= op.w {
                    r += g.pitch - ox;
                    continue;
                }
                let n = (op.w - ox).min(pixels - r);
                let run_sums = &sums[r * nb * 16..][..n * nb * 16];
                write_run(
                    packed,
                    out,
                    op,
                    (rows.start + oy, ox),
                    b0,
                    (n, nb),
                    run_sums,
                );
                r += n;
            }
            done = m + pixels;
        }
    }
    // SAFETY: releases the tile state configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// Requantizes the sums of `n` pixels x `nb` blocks (`[n][nb][16]`) of one output row,
/// starting at `(oy, ox)`: bytes in registers (as the VNNI kernel's fused epilogue), floats
/// through the parent's epilogue.
fn write_run(
    packed: &PackedInt8,
    out: &mut Int8Out,
    op: Plane,
    (oy, ox): (usize, usize),
    b0: usize,
    (n, nb): (usize, usize),
    sums: &[i32],
) {
    let Int8Out::Bytes {
        data,
        offset,
        zero_point,
        clamp,
        residual,
    } = out
    else {
        return epilogue(packed, out, op, oy, ox, b0, n, nb, sums);
    };
    let ch0 = b0 * 16;
    let first = op.at(oy as isize, ox as isize) + ch0;
    assert!(
        first >= *offset && first - *offset + (n - 1) * op.cs + nb * 16 <= data.len(),
        "run inside the output part"
    );
    assert!(packed.offset.len() >= ch0 + nb * 16 && sums.len() >= n * nb * 16);
    let res = residual.map(|(rd, rp, ratio, zr)| {
        let ra = rp.at(oy as isize, ox as isize) + ch0;
        assert!(ra + (n - 1) * rp.cs + nb * 16 <= rd.len(), "residual run");
        (rd[ra..].as_ptr(), rp.cs, ratio, zr)
    });
    let e = FusedBytes {
        offset: packed.offset[ch0..].as_ptr(),
        bias_q: packed.bias_q[ch0..].as_ptr(),
        mult: packed.mult[ch0..].as_ptr(),
        out: data[first - *offset..].as_mut_ptr(),
        out_pix: op.cs,
        residual: res,
        zero_point: *zero_point,
        clamp: *clamp,
    };
    // SAFETY: the CPU has AVX-512 (AMX implies it, and `Int8Kernel::Amx` checks VNNI); the
    // asserts bound the output, residual, per-channel and sum accesses.
    unsafe { requantize_run(sums.as_ptr(), n, nb, &e) }
}

/// # Safety
/// AVX-512 F and BW; `sums` readable for `n * nb * 16` values, `e`'s pointers for `n`
/// pixels x `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn requantize_run(sums: *const i32, n: usize, nb: usize, e: &FusedBytes) {
    use std::arch::x86_64::*;
    let k = RequantBounds::new(e.zero_point, e.clamp);
    for b in 0..nb {
        let off = _mm512_loadu_si512(e.offset.add(16 * b) as *const _);
        let bq = _mm512_loadu_ps(e.bias_q.add(16 * b));
        let m = _mm512_loadu_ps(e.mult.add(16 * b));
        for r in 0..n {
            let acc = _mm512_loadu_si512(sums.add((r * nb + b) * 16) as *const _);
            let res = e
                .residual
                .map(|(rp, rpix, ratio, zr)| (rp.add(r * rpix + 16 * b), ratio, zr));
            let q = requantize_vector(_mm512_add_epi32(acc, off), bq, m, res, k);
            _mm_storeu_si128(e.out.add(r * e.out_pix + 16 * b) as *mut _, q);
        }
    }
}

/// Byte offsets of one tile product.
struct Shape {
    kh: usize,
    tap_h: usize,
    step: usize,
    row_bytes: usize,
    chunk: usize,
    block_len: usize,
}

/// Integer sums of 16 or 32 pixels (`two_m`) x 16 or 32 output channels (`two_n`) into
/// `sums` (`[pixel][block][16]`, rows of `16 * (1 + two_n)` values).
///
/// # Safety
/// The tiles must be configured as in [`conv_rows`]; `x` must be readable for every tap of
/// the pixels, `w` for one or two weight blocks, `sums` writable for 32 x 32 values.
unsafe fn tile_product(
    s: &Shape,
    x: *const u8,
    w: *const i8,
    two_m: bool,
    two_n: bool,
    sums: *mut i32,
) {
    zero_accumulators();
    let second_m = 16 * s.step;
    for i in 0..s.kh {
        for kc in (0..s.row_bytes).step_by(s.chunk) {
            let a = x.add(i * s.tap_h + kc);
            let b = w.add((i * s.row_bytes + kc) * 16);
            asm!(
                "tileloadd tmm4, [{a} + {step}*1]",
                "tileloadd tmm6, [{b} + {wstep}*1]",
                "tdpbusd tmm0, tmm4, tmm6",
                a = in(reg) a, b = in(reg) b, step = in(reg) s.step, wstep = in(reg) 64usize,
                options(nostack, readonly)
            );
            if two_m {
                asm!(
                    "tileloadd tmm5, [{a} + {step}*1]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    a = in(reg) a.add(second_m), step = in(reg) s.step,
                    options(nostack, readonly)
                );
            }
            if two_n {
                asm!(
                    "tileloadd tmm7, [{b} + {wstep}*1]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    b = in(reg) b.add(s.block_len), wstep = in(reg) 64usize,
                    options(nostack, readonly)
                );
                if two_m {
                    asm!("tdpbusd tmm3, tmm5, tmm7", options(nostack, nomem));
                }
            }
        }
    }
    let row = if two_n { 128usize } else { 64 };
    asm!(
        "tilestored [{c} + {row}*1], tmm0",
        c = in(reg) sums, row = in(reg) row, options(nostack)
    );
    if two_n {
        asm!("tilestored [{c} + {row}*1], tmm1", c = in(reg) sums.add(16), row = in(reg) row, options(nostack));
    }
    if two_m {
        let lower = sums.add(16 * row / 4);
        asm!("tilestored [{c} + {row}*1], tmm2", c = in(reg) lower, row = in(reg) row, options(nostack));
        if two_n {
            asm!("tilestored [{c} + {row}*1], tmm3", c = in(reg) lower.add(16), row = in(reg) row, options(nostack));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{conv_rows as any_conv_rows, ConvQuant, Int8Kernel};
    use super::*;

    /// Runs one convolution on `kernel` into bytes (with a residual) and into floats.
    fn run(
        kernel: Int8Kernel,
        (c, h, w): (usize, usize, usize),
        k: usize,
        (kh, kw): (usize, usize),
        (stride, padding): (usize, usize),
        seed: u32,
    ) -> (Vec<u8>, Vec<f32>, bool) {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let halo = padding;
        let ip = Plane {
            h,
            w,
            c,
            cs: c16(c),
            halo,
        };
        let (oh, ow) = (
            (h + 2 * padding - kh) / stride + 1,
            (w + 2 * padding - kw) / stride + 1,
        );
        let op = Plane {
            h: oh,
            w: ow,
            c: k,
            cs: k.div_ceil(16) * 16,
            halo: 1,
        };
        let input: Vec<u8> = (0..ip.len()).map(|_| next() as u8).collect();
        let residual: Vec<u8> = (0..op.len()).map(|_| next() as u8).collect();
        let weights: Vec<i8> = (0..k * c * kh * kw).map(|_| next() as i8).collect();
        let scales: Vec<f32> = (0..k).map(|i| 0.001 + i as f32 * 1e-4).collect();
        let bias: Vec<f32> = (0..k).map(|i| i as f32 * 0.3 - 2.0).collect();
        let q = ConvQuant {
            input: (0.02, 7),
            weight_scales: &scales,
            bias: Some(&bias),
            output_scale: 0.15,
        };
        let packed = PackedInt8::new(&weights, k, c, (kh, kw), &q, kernel);
        let conv = Int8Conv {
            input: ip,
            output: op,
            stride: (stride, stride),
            padding: (padding, padding),
            dilation: (1, 1),
        };
        let halves = [0..oh / 2, oh / 2..oh];
        let tiled = halves
            .iter()
            .any(|rows| Geometry::of(&conv, &packed, rows.clone()).is_some());
        let mut bytes = vec![0u8; op.len()];
        let mut floats = vec![0f32; op.len()];
        // Two row ranges, as the plan splits an image between threads.
        for rows in halves {
            let out = Int8Out::Bytes {
                data: &mut bytes,
                offset: 0,
                zero_point: 20,
                clamp: (20, 250),
                residual: Some((&residual, op, 0.7, 128)),
            };
            any_conv_rows(&conv, &packed, &input, out, rows.clone());
            let out = Int8Out::Floats {
                data: &mut floats,
                offset: 0,
                act: None,
            };
            any_conv_rows(&conv, &packed, &input, out, rows);
        }
        (bytes, floats, tiled)
    }

    #[test]
    fn tiles_match_the_portable_kernel() {
        if !Int8Kernel::Amx.available() {
            eprintln!("no AMX-INT8 here: nothing to compare");
            return;
        }
        let shapes = [
            ((3, 32, 32), 16, (3, 3), (1, 1)),
            ((16, 8, 8), 32, (3, 3), (1, 1)),
            ((16, 16, 16), 32, (3, 3), (2, 1)),
            ((32, 8, 8), 48, (3, 3), (1, 1)),
            ((64, 9, 7), 64, (3, 3), (1, 1)),
            ((80, 5, 5), 16, (3, 3), (1, 1)),
            ((16, 7, 5), 20, (1, 1), (1, 0)),
            ((100, 1, 64), 10, (1, 1), (1, 0)),
            ((24, 4, 4), 16, (1, 1), (1, 0)),
        ];
        for (i, &(input, k, kernel, sp)) in shapes.iter().enumerate() {
            let (want_b, want_f, _) = run(Int8Kernel::Portable, input, k, kernel, sp, 9 + i as u32);
            let (got_b, got_f, tiled) = run(Int8Kernel::Amx, input, k, kernel, sp, 9 + i as u32);
            // All but the last shape (16 pixels in all, 8 per half) take the tiles.
            assert_eq!(
                tiled,
                i + 1 < shapes.len(),
                "{input:?} {k} {kernel:?}: tiled"
            );
            assert_eq!(got_b, want_b, "{input:?} {k} {kernel:?}: bytes");
            assert_eq!(got_f, want_f, "{input:?} {k} {kernel:?}: floats");
        }
    }
}
