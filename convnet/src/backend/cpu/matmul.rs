//! Matrix products on the `gemm` crate: `dst (M x N) [+]= A (M x K) @ B (K x N)`, with A and
//! B given as strided views so that transposes are free. Mirrors `torch.mm`/`addmm`.

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
    // Bounds of the strided views, checked once so the unsafe call below stays in range.
    let span = |v: &MatRef| (v.rows - 1) * v.row_stride + (v.cols - 1) * v.col_stride;
    assert!(span(&a) < a.data.len() && span(&b) < b.data.len());
    let parallelism = match par {
        Par::Seq => gemm::Parallelism::None,
        Par::Rayon if m * n * k >= 64 * 64 * 64 => {
            gemm::Parallelism::Rayon(rayon::current_num_threads())
        }
        Par::Rayon => gemm::Parallelism::None,
    };
    // SAFETY: all three views were bounds-checked above; dst is uniquely borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
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
