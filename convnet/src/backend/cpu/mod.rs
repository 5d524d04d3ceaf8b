//! CPU kernels: rayon for parallelism, the `gemm` crate (AVX-512 kernels) for products.
//!
//! Each kernel file opens with what it computes and the PyTorch function it mirrors, and
//! keeps a naive reference implementation beside the fast one for tests.

pub mod activation;
pub mod bf16;
pub mod conv;
#[cfg(target_arch = "x86_64")]
pub mod conv_direct;
pub mod conv_max;
pub mod elementwise;
pub mod embedding;
pub mod int8;
pub mod loss;
pub mod machine;
pub mod matmul;
pub mod nhwc;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod recycle;
pub mod shortcut;
pub mod simd;
pub mod tuning;
pub mod winograd;
#[cfg(target_arch = "x86_64")]
pub mod winograd_lanes;

/// Number of worker threads kernels may use (rayon's pool size).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Below this many elements, elementwise kernels run on one thread.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 15;
