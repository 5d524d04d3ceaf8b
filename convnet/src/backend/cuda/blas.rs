//! Matrix products on the GPU through cuBLAS (float32 `sgemm`, default math mode: no TF32),
//! for `linear`'s forward and backward. cuBLAS is column-major; a row-major `[R, C]` matrix
//! is a column-major `[C, R]` one, so each product below is written on the transposes.
//!
//! Legend: `x [M, I]` input rows, `w [O, I]` weight, `y [M, O]` output, all row-major.

use super::runtime::{Gpu, Kind, Runtime};
use super::{int, unavailable};
use crate::error::Result;
use cudarc::cublas::{result as blas, sys};

/// One `sgemm` call in cuBLAS's column-major terms: `C = op(A) @ op(B)`, overwriting `C`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sgemm {
    pub(crate) what: &'static str,
    /// Whether A and B are transposed.
    pub(crate) trans: (bool, bool),
    /// `op(A)` is m x k, `op(B)` k x n, `C` m x n.
    pub(crate) mnk: (usize, usize, usize),
    /// Device addresses and leading dimensions.
    pub(crate) a: (u64, usize),
    pub(crate) b: (u64, usize),
    pub(crate) c: (u64, usize),
    /// A and B are bfloat16 (C float32, float32 accumulation: `cublasGemmEx`).
    pub(crate) bf16: bool,
}

impl Sgemm {
    /// `y [M, O] = x [M, I] @ w [O, I]^T`, as column-major `y^T = w @ x^T`.
    fn linear_forward(m: usize, i: usize, o: usize, x: u64, w: u64, y: u64) -> Sgemm {
        Sgemm {
            what: "linear forward",
            trans: (true, false),
            mnk: (o, m, i),
            a: (w, i),
            b: (x, i),
            c: (y, o),
            bf16: false,
        }
    }

    /// `dx [M, I] = g [M, O] @ w [O, I]`, as column-major `dx^T = w^T @ g^T`.
    fn linear_backward_input(m: usize, i: usize, o: usize, g: u64, w: u64, dx: u64) -> Sgemm {
        Sgemm {
            what: "linear input gradient",
            trans: (false, false),
            mnk: (i, m, o),
            a: (w, i),
            b: (g, o),
            c: (dx, i),
            bf16: false,
        }
    }

    /// `dw [O, I] = g [M, O]^T @ x [M, I]`, as column-major `dw^T = x^T @ g`.
    fn linear_backward_weight(m: usize, i: usize, o: usize, g: u64, x: u64, dw: u64) -> Sgemm {
        Sgemm {
            what: "linear weight gradient",
            trans: (false, true),
            mnk: (i, o, m),
            a: (x, i),
            b: (g, o),
            c: (dw, i),
            bf16: false,
        }
    }

    fn run(self, gpu: &Gpu) -> Result<()> {
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (m, n, k) = self.mnk;
        let (alpha, beta) = (1f32, 0f32);
        if self.bf16 {
            use sys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
            // SAFETY: as below, with bfloat16 A and B.
            return unsafe {
                blas::gemm_ex(
                    *gpu.blas.handle(),
                    op(self.trans.0),
                    op(self.trans.1),
                    int(m, "size")?,
                    int(n, "size")?,
                    int(k, "size")?,
                    (&alpha as *const f32).cast(),
                    self.a.0 as *const std::ffi::c_void,
                    CUDA_R_16BF,
                    int(self.a.1, "size")?,
                    self.b.0 as *const std::ffi::c_void,
                    CUDA_R_16BF,
                    int(self.b.1, "size")?,
                    (&beta as *const f32).cast(),
                    self.c.0 as *mut std::ffi::c_void,
                    CUDA_R_32F,
                    int(self.c.1, "size")?,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| {
                unavailable(format!(
                    "cuBLAS gemm ({}, bfloat16) failed: {e:?}",
                    self.what
                ))
            });
        }
        // SAFETY: the addresses are live device buffers holding the matrices the sizes
        // describe; alpha and beta are host scalars (cuBLAS's default pointer mode).
        unsafe {
            blas::sgemm(
                *gpu.blas.handle(),
                op(self.trans.0),
                op(self.trans.1),
                int(m, "size")?,
                int(n, "size")?,
                int(k, "size")?,
                &alpha,
                self.a.0 as *const f32,
                int(self.a.1, "size")?,
                self.b.0 as *const f32,
                int(self.b.1, "size")?,
                &beta,
                self.c.0 as *mut f32,
                int(self.c.1, "size")?,
            )
        }
        .map_err(|e| unavailable(format!("cuBLAS sgemm ({}) failed: {e:?}", self.what)))
    }
}

impl Runtime {
    /// Runs one `sgemm` call (on the host reference under the emulator).
    pub(crate) fn sgemm(&self, call: Sgemm) -> Result<()> {
        match &self.kind {
            Kind::Gpu(gpu) => call.run(gpu),
            #[cfg(any(test, feature = "cuda-emulator"))]
            Kind::Emulated(_) => {
                if self
                    .record(super::emulator::Recorded::Sgemm(call))
                    .is_some()
                {
                    super::emulator::sgemm(&call);
                }
                Ok(())
            }
        }
    }

    /// `y [M, O] = x [M, I] @ w [O, I]^T` (with mixed precision, x and w are bfloat16).
    pub(crate) fn linear_forward(
        &self,
        m: usize,
        i: usize,
        o: usize,
        x: u64,
        w: u64,
        y: u64,
    ) -> Result<()> {
        self.sgemm(Sgemm {
            bf16: self.bf16,
            ..Sgemm::linear_forward(m, i, o, x, w, y)
        })
    }

    /// `dx [M, I] = g [M, O] @ w [O, I]`.
    pub(crate) fn linear_backward_input(
        &self,
        m: usize,
        i: usize,
        o: usize,
        g: u64,
        w: u64,
        dx: u64,
    ) -> Result<()> {
        self.sgemm(Sgemm {
            bf16: self.bf16,
            ..Sgemm::linear_backward_input(m, i, o, g, w, dx)
        })
    }

    /// `dw [O, I] = g [M, O]^T @ x [M, I]`.
    pub(crate) fn linear_backward_weight(
        &self,
        m: usize,
        i: usize,
        o: usize,
        g: u64,
        x: u64,
        dw: u64,
    ) -> Result<()> {
        self.sgemm(Sgemm {
            bf16: self.bf16,
            ..Sgemm::linear_backward_weight(m, i, o, g, x, dw)
        })
    }
}
