//! Compute kernels, one module per device. Kernels take contiguous row-major slices and
//! trust their callers (the tensor ops) to have validated shapes.

pub mod cpu;

#[cfg(feature = "cuda")]
pub mod cuda;
