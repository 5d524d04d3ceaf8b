//! The CUDA backend (cargo feature `cuda`), on `cudarc` with run-time library loading: a
//! build needs no CUDA installation, and a machine without a GPU gets an error, never a
//! panic.
//!
//! - `runtime`: one GPU's context, its single stream, the kernels compiled by NVRTC from
//!   [`kernels`] on first use, the cuBLAS and cuDNN handles, the convolution plan cache.
//! - `buffer`: device memory behind a tensor, from the driver's stream-ordered allocator
//!   with a pool that keeps freed memory (steady-state training allocates nothing new).
//! - `conv` (cuDNN), `blas` (cuBLAS): convolutions and matrix products.
//! - `ops` and `backward`: the forward and backward of each tensor op on the GPU, called
//!   by the tensor ops and by autograd when their operands live on a GPU.
//!
//! Numerics follow the CPU kernels: float32 data, reductions in double, no fused
//! multiply-add in the CUDA C kernels, no TF32 in cuDNN or cuBLAS.
//!
//! Library discovery: `CONVNET_CUDA_LIB_DIR` (a folder holding `libcuda.so.1`, cuDNN,
//! cuBLAS and NVRTC), then the dynamic loader's usual search (`LD_LIBRARY_PATH`, the system
//! library folders).

use crate::error::{Error, Result};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Environment variable naming a folder with the CUDA libraries.
pub const LIB_DIR_VAR: &str = "CONVNET_CUDA_LIB_DIR";

/// File names under which the driver library is looked up, most specific first.
const DRIVER_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
/// File names under which NVRTC is looked up (CUDA 13 first).
const NVRTC_NAMES: [&str; 2] = ["libnvrtc.so.13", "libnvrtc.so"];

pub(crate) mod backward;
mod blas;
mod buffer;
mod conv;
#[cfg(any(test, feature = "cuda-emulator"))]
pub mod emulator;
pub(crate) mod general;
pub mod kernels;
#[cfg(feature = "nccl")]
pub(crate) mod nccl;
pub(crate) mod ops;
pub(crate) mod optim;
pub(crate) mod runtime;
pub(crate) mod step_graph;

pub use buffer::DeviceBuffer;

/// What a successful probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The ordinal asked for.
    pub ordinal: usize,
    /// The device's name as the driver reports it.
    pub name: String,
    /// How many CUDA devices the machine has.
    pub count: usize,
}

/// A size as the 32-bit integer the kernels and libraries take, or an error naming it.
pub(crate) fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Unsupported(format!(
            "{what} {v} is too large for the CUDA kernels and libraries"
        ))
    })
}

pub(crate) fn unavailable(reason: impl Into<String>) -> Error {
    Error::CudaUnavailable(reason.into())
}

/// Loads a CUDA library once and keeps it loaded, so that cudarc's own loader (which panics
/// when it finds nothing) later finds it by its usual name. Tries `CONVNET_CUDA_LIB_DIR`
/// first, then the dynamic loader's search path.
fn preload(
    cell: &'static OnceLock<std::result::Result<(), String>>,
    what: &str,
    hint: &str,
    names: &[&str],
) -> Result<()> {
    cell.get_or_init(|| {
        let dir = std::env::var_os(LIB_DIR_VAR).map(PathBuf::from);
        let mut tried = Vec::new();
        for name in names {
            let candidates = match &dir {
                Some(d) => vec![d.join(name), PathBuf::from(name)],
                None => vec![PathBuf::from(name)],
            };
            for path in candidates {
                // SAFETY: loading a CUDA library runs its initialisers, which is what every
                // CUDA program does; nothing else is called here.
                match unsafe { libloading::Library::new(&path) } {
                    Ok(lib) => {
                        // Keep the library loaded for the life of the process.
                        std::mem::forget(lib);
                        return Ok(());
                    }
                    Err(e) => {
                        let why = std::error::Error::source(&e)
                            .map_or_else(|| e.to_string(), |s| s.to_string());
                        tried.push(format!("{}: {why}", path.display()))
                    }
                }
            }
        }
        Err(format!(
            "cannot load {what} {} ({}); {hint}set {LIB_DIR_VAR} or LD_LIBRARY_PATH to the folder that holds it",
            names[0],
            tried.first().map(String::as_str).unwrap_or("not found")
        ))
    })
    .clone()
    .map_err(unavailable)
}

/// The NVIDIA driver library (`libcuda`), needed for any device.
fn load_driver() -> Result<()> {
    static DRIVER: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload(
        &DRIVER,
        "the NVIDIA driver library",
        "install the NVIDIA driver, or ",
        &DRIVER_NAMES,
    )
}

/// cuBLAS (and the cuBLASLt it depends on).
fn load_cublas() -> Result<()> {
    static CUBLAS: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload(
        &CUBLAS,
        "cuBLAS",
        "install cuBLAS (CUDA 13), or ",
        &["libcublas.so.13", "libcublas.so"],
    )
}

/// cuDNN 9.
fn load_cudnn() -> Result<()> {
    static CUDNN: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload(
        &CUDNN,
        "cuDNN",
        "install cuDNN 9, or ",
        &["libcudnn.so.9", "libcudnn.so"],
    )
}

/// NVRTC, the run-time CUDA C compiler (no GPU needed).
fn load_nvrtc() -> Result<()> {
    static NVRTC: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload(
        &NVRTC,
        "the CUDA run-time compiler",
        "install NVRTC (CUDA 13), or ",
        &NVRTC_NAMES,
    )
}

/// Runs a cudarc call, turning a panic inside it into an error.
fn contained<T>(what: &str, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f);
    std::panic::set_hook(previous);
    out.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".into());
        unavailable(format!("{what}: {msg}"))
    })
}

/// Lets the convolutions of GPU `ordinal` use TF32 tensor cores (`on`), as PyTorch does by
/// default (`torch.backends.cudnn.allow_tf32 = True`), or keeps them to float32 arithmetic
/// (the default here: results within float32 rounding of the CPU's). Matrix products stay
/// float32 either way, as in PyTorch.
pub fn allow_tf32(ordinal: usize, on: bool) -> Result<()> {
    runtime::with(ordinal, |rt| {
        rt.set_tf32(on);
        Ok(())
    })
}

/// Mixed precision on GPU `ordinal` (`on`): convolutions and linear layers compute on
/// bfloat16 copies of their operands with float32 accumulation (cuDNN's bfloat16
/// configuration, `cublasGemmEx`), their results widened back to float32; parameters,
/// gradients, optimizer state and every other op stay float32 (like `torch.autocast` with
/// bfloat16). Off by default.
pub fn use_bf16(ordinal: usize, on: bool) -> Result<()> {
    runtime::with(ordinal, |rt| {
        rt.set_bf16(on);
        Ok(())
    })
}

/// Finds CUDA device `ordinal`: the driver library, the device count, a context and the
/// device name. Every failure is [`Error::CudaUnavailable`] with the reason.
pub fn probe(ordinal: usize) -> Result<DeviceInfo> {
    load_driver()?;
    let count = contained(
        "counting CUDA devices",
        cudarc::driver::CudaContext::device_count,
    )?
    .map_err(|e| unavailable(format!("the CUDA driver cannot count devices: {e:?}")))?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(unavailable(format!(
            "cuda:{ordinal} does not exist: this machine has {count} CUDA device(s)"
        )));
    }
    let ctx = contained("opening a CUDA context", || {
        cudarc::driver::CudaContext::new(ordinal)
    })?
    .map_err(|e| unavailable(format!("cannot open cuda:{ordinal}: {e:?}")))?;
    let name = ctx
        .name()
        .map_err(|e| unavailable(format!("cannot query cuda:{ordinal}: {e:?}")))?;
    Ok(DeviceInfo {
        ordinal,
        name,
        count,
    })
}
