//! Matrix products on the GPU through cuBLAS (float32 `sgemm`, default math mode: no TF32),
//! for `linear`'s forward and backward. cuBLAS is column-major; a row-major `[R, C]` matrix
//! is a column-major `[C, R]` one, so each product below is written on the transposes.
//!
//! Legend: `x [M, I]` input rows, `w [O, I]` weight, `y [M, O]` output, all row-major.

use super::runtime::Runtime;
use super::unavailable;
use crate::error::Result;
use cudarc::cublas::{result as blas, sys};
use std::ffi::c_int;

fn int(v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| unavailable(format!("size {v} is too large for cuBLAS")))
}

/// `C = op(A) @ op(B)` in cuBLAS's column-major terms, overwriting `C`.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    rt: &Runtime,
    what: &str,
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (a, lda): (u64, usize),
    (b, ldb): (u64, usize),
    (c, ldc): (u64, usize),
) -> Result<()> {
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: the addresses are live device buffers holding the matrices the sizes describe;
    // alpha and beta are host scalars (cuBLAS's default pointer mode).
    unsafe {
        blas::sgemm(
            *rt.blas.handle(),
            op(ta),
            op(tb),
            int(m)?,
            int(n)?,
            int(k)?,
            &alpha,
            a as *const f32,
            int(lda)?,
            b as *const f32,
            int(ldb)?,
            &beta,
            c as *mut f32,
            int(ldc)?,
        )
    }
    .map_err(|e| unavailable(format!("cuBLAS sgemm ({what}) failed: {e:?}")))
}

impl Runtime {
    /// `y [M, O] = x [M, I] @ w [O, I]^T` (column-major: `y^T = w @ x^T`).
    pub(crate) fn linear_forward(
        &self,
        m: usize,
        i: usize,
        o: usize,
        x: u64,
        w: u64,
        y: u64,
    ) -> Result<()> {
        sgemm(
            self,
            "linear forward",
            (true, false),
            (o, m, i),
            (w, i),
            (x, i),
            (y, o),
        )
    }

    /// `dx [M, I] = g [M, O] @ w [O, I]` (column-major: `dx^T = w^T @ g^T`).
    pub(crate) fn linear_backward_input(
        &self,
        m: usize,
        i: usize,
        o: usize,
        g: u64,
        w: u64,
        dx: u64,
    ) -> Result<()> {
        sgemm(
            self,
            "linear input gradient",
            (false, false),
            (i, m, o),
            (w, i),
            (g, o),
            (dx, i),
        )
    }

    /// `dw [O, I] = g [M, O]^T @ x [M, I]` (column-major: `dw^T = x^T @ g`).
    pub(crate) fn linear_backward_weight(
        &self,
        m: usize,
        i: usize,
        o: usize,
        g: u64,
        x: u64,
        dw: u64,
    ) -> Result<()> {
        sgemm(
            self,
            "linear weight gradient",
            (false, true),
            (i, o, m),
            (x, i),
            (g, o),
            (dw, i),
        )
    }
}
