//! Matrix products on the `gemm` crate: `dst (M x N) [+]= A (M x K) @ B (K x N)`, with A and
//! B given as strided views so that transposes are free. Mirrors `torch.mm`/`addmm`.

use rayon::prelude::*;

/// A read-only strided matrix view over a slice.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix view exceeds its slice");
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The element at row `r`, column `c`.
    pub fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.row_stride + c * self.col_stride]
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` as a slice, when the row's elements are adjacent (`None` otherwise).
    pub fn row(&self, r: usize) -> Option<&'a [f32]> {
        (self.col_stride == 1 || self.cols <= 1)
            .then(|| &self.data[r * self.row_stride..r * self.row_stride + self.cols])
    }

    /// The rows `range` of this view (no copy).
    pub fn rows_range(self, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= self.rows,
            "rows inside the view"
        );
        MatRef {
            data: if range.is_empty() {
                &[]
            } else {
                &self.data[range.start * self.row_stride..]
            },
            rows: range.len(),
            ..self
        }
    }
}

/// How a product may use threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Single-threaded (the caller parallelises at a coarser level).
    Seq,
    /// Use the rayon pool.
    Rayon,
}

/// `dst = a @ b` (or `dst += a @ b` when `accumulate`), `dst` row-major `a.rows x b.cols`.
///
/// A `b` laid out column by column (a transposed row-major matrix, such as `W^T` in a linear
/// layer or `dy^T` in a weight gradient) is first transposed into a row-major scratch
/// buffer: the `gemm` crate gathers such a `b` element by element while packing it, which
/// made `[64, 4096] @ W^T [4096, 128]` run at 39 GFLOP/s against 204 with `b` row-major
/// (and a 27-row product of a convolution's weight gradient at 51 against 164), while the
/// transpose costs one pass over `b`.
pub fn matmul(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool, par: Par) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ");
    assert!(dst.len() >= m * n, "destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // Bounds of the strided views, checked once so the unsafe calls below stay in range.
    let span = |v: &MatRef| (v.rows - 1) * v.row_stride + (v.cols - 1) * v.col_stride;
    assert!(span(&a) < a.data.len() && span(&b) < b.data.len());
    let threads = match par {
        Par::Rayon if m * n * k >= 64 * 64 * 64 => rayon::current_num_threads(),
        _ => 1,
    };
    let column_major_b = b.row_stride == 1 && b.col_stride != 1 && n > 1 && k > 1;
    if column_major_b && m >= MIN_ROWS_TO_TRANSPOSE && k * n >= MIN_TRANSPOSED_LEN {
        // Each thread takes a block of columns of `b` (rows of the row-major `[n, k]` matrix
        // at `b.data`, `col_stride` apart), transposes it and multiplies it into its columns
        // of `dst`; the gemm crate's own threading is slower than this split here.
        let blocks = threads.min(n / 16).max(1);
        let width = n.div_ceil(blocks);
        let out = SharedDst(dst.as_mut_ptr());
        let block = |i: usize| {
            let cols = i * width..((i + 1) * width).min(n);
            // Taken out of its slot while in use, so that a product nested in this one on
            // the same thread (rayon work stealing) gets a scratch of its own.
            let mut scratch = TRANSPOSED_B.with(|s| s.take());
            if scratch.len() < k * cols.len() {
                scratch.resize(k * cols.len(), 0.0);
            }
            let bt = &mut scratch[..k * cols.len()];
            transpose_strided(
                &b.data[cols.start * b.col_stride..],
                cols.len(),
                k,
                b.col_stride,
                bt,
            );
            // SAFETY: `a` was bounds-checked above and `bt` is a full `k x cols` row-major
            // matrix; rows 0..m of columns `cols` of `dst` (row stride n, length checked at
            // the top) are inside it and written by this block only.
            unsafe {
                gemm_into(
                    out.at(cols.start),
                    n,
                    a,
                    MatRef::row_major(bt, k, cols.len()),
                    accumulate,
                    gemm::Parallelism::None,
                )
            };
            TRANSPOSED_B.with(|s| s.set(scratch));
        };
        if blocks == 1 {
            block(0);
        } else {
            (0..blocks).into_par_iter().for_each(block);
        }
        return;
    }
    let parallelism = match threads {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: all three views were bounds-checked above; dst is uniquely borrowed and holds
    // m rows of n.
    unsafe { gemm_into(dst.as_mut_ptr(), n, a, b, accumulate, parallelism) };
}

/// `dst` for the blocks of [`matmul`] that write disjoint columns of it from several threads.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);
// SAFETY: the blocks that share it write disjoint elements (see `matmul`).
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// The address `offset` elements in (a method, so that closures capture the whole
    /// wrapper rather than its raw pointer).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst [m, n] (row stride dst_stride) [+]= a @ b` through the gemm crate.
///
/// # Safety
/// `a` and `b` must be in bounds of their slices, and `dst` valid for writes of rows 0..m,
/// columns 0..n at row stride `dst_stride`, not accessed by anything else meanwhile.
unsafe fn gemm_into(
    dst: *mut f32,
    dst_stride: usize,
    a: MatRef,
    b: MatRef,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        a.data.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.data.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// Smallest row count of `a` for which a column-major `b` is transposed first (below it the
/// transpose costs more than the slower packing).
const MIN_ROWS_TO_TRANSPOSE: usize = 4;
/// Smallest `b` (elements) worth transposing.
const MIN_TRANSPOSED_LEN: usize = 1024;

thread_local! {
    /// Row-major copies of column-major `b` operands, reused across products.
    static TRANSPOSED_B: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `dst [cols, rows] = src [rows, cols]^T`, both row-major.
///
/// ```
/// use convnet::backend::cpu::matmul::transpose;
/// let mut t = vec![0.0; 6];
/// transpose(&[1., 2., 3., 4., 5., 6.], 2, 3, &mut t);
/// assert_eq!(t, vec![1., 4., 2., 5., 3., 6.]);
/// ```
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    transpose_strided(src, rows, cols, cols, dst)
}

/// [`transpose`] of a source whose rows are `src_stride` apart (`src_stride >= cols`).
pub(crate) fn transpose_strided(
    src: &[f32],
    rows: usize,
    cols: usize,
    src_stride: usize,
    dst: &mut [f32],
) {
    assert!(src_stride >= cols && dst.len() >= rows * cols);
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        src.len() >= (rows - 1) * src_stride + cols,
        "source too small"
    );
    const T: usize = 16;
    let (full_r, full_c) = (rows / T * T, cols / T * T);
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx512() {
        for r0 in (0..full_r).step_by(T) {
            for c0 in (0..full_c).step_by(T) {
                // SAFETY: AVX-512F was detected; rows r0..r0+16 and columns c0..c0+16 lie
                // inside `src` (asserted above) and their transpose inside `dst`.
                unsafe {
                    transpose_16x16(
                        src,
                        r0 * src_stride + c0,
                        src_stride,
                        dst,
                        c0 * rows + r0,
                        rows,
                    )
                };
            }
        }
    } else {
        transpose_scalar(src, 0..full_r, 0..full_c, src_stride, dst, rows);
    }
    #[cfg(not(target_arch = "x86_64"))]
    transpose_scalar(src, 0..full_r, 0..full_c, src_stride, dst, rows);
    // The right and bottom edges.
    transpose_scalar(src, 0..rows, full_c..cols, src_stride, dst, rows);
    transpose_scalar(src, full_r..rows, 0..full_c, src_stride, dst, rows);
}

fn transpose_scalar(
    src: &[f32],
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    src_stride: usize,
    dst: &mut [f32],
    dst_stride: usize,
) {
    const B: usize = 8;
    for r0 in rows.clone().step_by(B) {
        for c0 in cols.clone().step_by(B) {
            for r in r0..(r0 + B).min(rows.end) {
                for c in c0..(c0 + B).min(cols.end) {
                    dst[c * dst_stride + r] = src[r * src_stride + c];
                }
            }
        }
    }
}

/// One 16x16 block: 16 source rows of 16 floats from `src[at..]` (rows `src_stride` apart)
/// to 16 destination rows at `dst[to..]` (`dst_stride` apart). Pairs of rows are
/// interleaved, then pairs of pairs (64-bit), which leaves each 128-bit lane holding four
/// rows of one column; the 4x4 arrangement of lanes is then transposed with lane shuffles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(
    src: &[f32],
    at: usize,
    src_stride: usize,
    dst: &mut [f32],
    to: usize,
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    assert!(at + 15 * src_stride + 16 <= src.len() && to + 15 * dst_stride + 16 <= dst.len());
    let r: [__m512; 16] =
        std::array::from_fn(|i| _mm512_loadu_ps(src.as_ptr().add(at + i * src_stride)));
    // t[2p] = rows 2p, 2p+1 interleaved from the low halves of each lane, t[2p+1] from the high.
    let mut t = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    // u[4g + j], lane L: rows 4g..4g+4 at column 4L + j.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (lo0, hi0, lo1, hi1) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        let pd = |v: __m512| _mm512_castps_pd(v);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(lo0), pd(lo1)));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(lo0), pd(lo1)));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(hi0), pd(hi1)));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(hi0), pd(hi1)));
    }
    // Output row 4L + j is lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        let ab_lo = _mm512_shuffle_f32x4::<0x44>(a, b); // a0 a1 b0 b1
        let ab_hi = _mm512_shuffle_f32x4::<0xEE>(a, b); // a2 a3 b2 b3
        let cd_lo = _mm512_shuffle_f32x4::<0x44>(c, d);
        let cd_hi = _mm512_shuffle_f32x4::<0xEE>(c, d);
        let rows_out = [
            _mm512_shuffle_f32x4::<0x88>(ab_lo, cd_lo), // a0 b0 c0 d0
            _mm512_shuffle_f32x4::<0xDD>(ab_lo, cd_lo), // a1 b1 c1 d1
            _mm512_shuffle_f32x4::<0x88>(ab_hi, cd_hi),
            _mm512_shuffle_f32x4::<0xDD>(ab_hi, cd_hi),
        ];
        for (l, v) in rows_out.into_iter().enumerate() {
            _mm512_storeu_ps(dst.as_mut_ptr().add(to + (4 * l + j) * dst_stride), v);
        }
    }
}

/// Naive triple loop with `f64` accumulation: the reference for [`matmul`].
pub fn matmul_naive(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    for i in 0..a.rows {
        for j in 0..b.cols {
            let mut acc = 0f64;
            for p in 0..a.cols {
                acc += a.at(i, p) as f64 * b.at(p, j) as f64;
            }
            let d = &mut dst[i * b.cols + j];
            *d = if accumulate {
                *d + acc as f32
            } else {
                acc as f32
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    #[test]
    fn transpose_matches_the_definition_on_every_edge() {
        let mut rng = Rng::new(2);
        for (rows, cols, stride) in [
            (16, 16, 16),
            (32, 48, 48),
            (17, 33, 40),
            (5, 70, 70),
            (70, 5, 9),
            (1, 1, 1),
        ] {
            let src: Vec<f32> = (0..rows * stride).map(|_| rng.normal()).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_strided(&src, rows, cols, stride, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * stride + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn column_major_b_is_transposed_first_with_the_same_result() {
        // Big enough to take the transposed path (m >= 4, k*n >= 1024), with edges.
        let mut rng = Rng::new(3);
        for (m, k, n) in [(4, 64, 16), (37, 130, 29), (64, 256, 33)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let bt: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = {
                let mut b = vec![0.0; k * n];
                transpose(&bt, n, k, &mut b);
                b
            };
            let (av, view) = (
                MatRef::row_major(&a, m, k),
                MatRef::row_major(&bt, n, k).t(),
            );
            let mut via_view = vec![0.25; m * n];
            let mut row_major = via_view.clone();
            matmul(&mut via_view, av, view, true, Par::Rayon);
            matmul(
                &mut row_major,
                av,
                MatRef::row_major(&b, k, n),
                true,
                Par::Rayon,
            );
            assert_eq!(
                via_view, row_major,
                "{m}x{k}x{n}: the same product of the same layout"
            );
            let mut slow = vec![0.25; m * n];
            matmul_naive(&mut slow, av, view, true);
            for (x, y) in via_view.iter().zip(&slow) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    #[test]
    fn matches_naive_with_transposes() {
        let mut rng = Rng::new(1);
        let (m, k, n) = (37, 53, 29);
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let bt: Vec<f32> = (0..n * k).map(|_| rng.normal()).collect();
        let mut fast = vec![0.5; m * n];
        let mut slow = fast.clone();
        let av = MatRef::row_major(&a, m, k);
        let bv = MatRef::row_major(&bt, n, k).t();
        matmul(&mut fast, av, bv, true, Par::Rayon);
        matmul_naive(&mut slow, av, bv, true);
        for (x, y) in fast.iter().zip(&slow) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
