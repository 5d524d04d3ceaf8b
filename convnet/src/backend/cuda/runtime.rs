//! One GPU's run-time state: its context and single stream, the NVRTC-compiled kernels, the
//! cuBLAS and cuDNN handles, the cache of convolution plans and the shared workspace; in
//! unit tests, alternatively the host emulator of the same kernels.
//!
//! Created on first use of a device and kept for the life of the process. Access goes
//! through [`with`], which holds a lock for the duration of the call: library handles are
//! used by one host thread at a time, and every launch goes to the one stream in program
//! order, so no other synchronisation is needed.

use super::buffer::{Allocator, DeviceBuffer};
use super::conv::PlanCache;
use super::{kernels, load_cublas, load_cudnn, load_driver, unavailable};
use crate::error::Result;
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaStream, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Threads per block of the element-wise kernels.
pub(crate) const THREADS: u32 = 256;
/// Threads per block of the per-channel reduction kernels (a power of two).
pub(crate) const REDUCE_THREADS: u32 = 512;

/// The state of one device.
pub(crate) struct Runtime {
    /// Where buffers come from.
    pub(crate) alloc: Allocator,
    pub(crate) kind: Kind,
    max_blocks: u32,
}

/// What executes the work.
pub(crate) enum Kind {
    Gpu(Gpu),
    /// The CUDA C kernels compiled for the host and run one thread at a time (unit tests).
    #[cfg(any(test, feature = "cuda-emulator"))]
    Emulated(super::emulator::Emulator),
}

/// A real GPU: its single stream, kernels, library handles and convolution plans.
pub(crate) struct Gpu {
    pub(crate) stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pub(crate) blas: cudarc::cublas::CudaBlas,
    pub(crate) cudnn: cudarc::cudnn::sys::cudnnHandle_t,
    pub(crate) convs: PlanCache,
    workspace: Option<DeviceBuffer>,
}

// SAFETY: the runtime is only reached through the `RUNTIMES` mutex, so the cuDNN and cuBLAS
// handles inside are used by one thread at a time, which is what both libraries require.
unsafe impl Send for Runtime {}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.convs.clear();
        // SAFETY: the handle was created by `Runtime::new` and nothing uses it any more.
        unsafe {
            let _ = cudarc::cudnn::result::destroy_handle(self.cudnn);
        }
    }
}

static RUNTIMES: Mutex<Vec<(usize, Box<Runtime>)>> = Mutex::new(Vec::new());

/// Runs `f` with the runtime of device `ordinal`, creating it on first use (this compiles
/// the kernels with NVRTC, about a second). `f` must not call `with` again.
pub(crate) fn with<R>(ordinal: usize, f: impl FnOnce(&mut Runtime) -> Result<R>) -> Result<R> {
    let mut all = RUNTIMES.lock().unwrap_or_else(|e| e.into_inner());
    let at = match all.iter().position(|(o, _)| *o == ordinal) {
        Some(at) => at,
        None => {
            let rt = Runtime::new(ordinal)?;
            all.push((ordinal, Box::new(rt)));
            all.len() - 1
        }
    };
    let rt = &mut all[at].1;
    // (Irrefutable outside unit tests, where the emulator is the other kind.)
    #[allow(irrefutable_let_patterns)]
    if let Kind::Gpu(gpu) = &rt.kind {
        // Library calls act on the calling thread's current context.
        gpu.stream.context().bind_to_thread().map_err(|e| {
            unavailable(format!("cannot use cuda:{ordinal} from this thread: {e:?}"))
        })?;
    }
    f(rt)
}

/// The virtual architecture NVRTC compiles for, from the device's compute capability.
fn arch_for(major: i32, minor: i32) -> Result<&'static str> {
    Ok(match (major, minor) {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (m, _) if m >= 9 => "compute_90",
        (m, n) if m >= 8 => {
            let _ = n;
            "compute_80"
        }
        (m, n) => {
            return Err(unavailable(format!(
                "compute capability {m}.{n} is older than 7.5, the oldest this build supports"
            )))
        }
    })
}

/// One kernel argument: a device address, a size or a scalar, as the kernel declares it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::Ptr(v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::I32(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::I64(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Arg {
        Arg::F32(v)
    }
}
impl From<f64> for Arg {
    fn from(v: f64) -> Arg {
        Arg::F64(v)
    }
}

impl Runtime {
    fn new(ordinal: usize) -> Result<Runtime> {
        #[cfg(any(test, feature = "cuda-emulator"))]
        if ordinal == super::emulator::ORDINAL {
            return Ok(Runtime {
                alloc: Allocator::Emulated,
                kind: Kind::Emulated(super::emulator::Emulator::new()?),
                max_blocks: 64,
            });
        }
        super::probe(ordinal)?;
        load_driver()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("cannot open cuda:{ordinal}: {e:?}")))?;
        // One stream, used in program order: the per-buffer events cudarc records for
        // cross-stream safety are not needed and cost two driver calls per launch.
        // SAFETY: every buffer and launch of this device goes to `stream` below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| unavailable(format!("cannot create a stream on cuda:{ordinal}: {e:?}")))?;
        keep_freed_memory(&ctx)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| unavailable(format!("cannot query cuda:{ordinal}: {e:?}")))?;
        // Machine code for this GPU first (no PTX JIT, so no dependence on the driver
        // accepting this NVRTC's PTX version), PTX for the architecture family otherwise.
        let module = match kernels::compile_cubin(&format!("sm_{major}{minor}")) {
            Ok(cubin) => ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)),
            Err(_) => {
                let ptx = kernels::compile_ptx(arch_for(major, minor)?)?;
                ctx.load_module(ptx)
            }
        }
        .map_err(|e| unavailable(format!("cannot load the compiled kernels: {e:?}")))?;
        let mut functions = HashMap::new();
        for &name in kernels::NAMES {
            let f = module.load_function(name).map_err(|e| {
                unavailable(format!("kernel {name} is missing from the module: {e:?}"))
            })?;
            functions.insert(name, f);
        }
        load_cublas()?;
        let blas = super::contained("creating a cuBLAS handle", || {
            cudarc::cublas::CudaBlas::new(stream.clone())
        })?
        .map_err(|e| unavailable(format!("cannot create a cuBLAS handle: {e:?}")))?;
        load_cudnn()?;
        let cudnn = super::contained("creating a cuDNN handle", || {
            cudarc::cudnn::result::create_handle()
        })?
        .map_err(|e| unavailable(format!("cannot create a cuDNN handle: {e:?}")))?;
        // SAFETY: both handles are alive; the stream outlives the runtime (held by it).
        unsafe { cudarc::cudnn::result::set_stream(cudnn, stream.cu_stream() as _) }
            .map_err(|e| unavailable(format!("cannot set the cuDNN stream: {e:?}")))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .unwrap_or(32)
            .max(1) as u32;
        Ok(Runtime {
            alloc: Allocator::Cuda(stream.clone()),
            kind: Kind::Gpu(Gpu {
                stream,
                functions,
                blas,
                cudnn,
                convs: PlanCache::default(),
                workspace: None,
            }),
            max_blocks: sms * 16,
        })
    }

    /// Launches kernel `name` with `cfg` and `args` (in the order of the kernel's
    /// parameters in kernels.cu), naming the kernel in the error.
    pub(crate) fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        match &self.kind {
            Kind::Gpu(gpu) => {
                use cudarc::driver::PushKernelArg;
                let f = gpu
                    .functions
                    .get(name)
                    .ok_or_else(|| unavailable(format!("kernel {name} was not compiled")))?;
                let mut builder = gpu.stream.launch_builder(f);
                for arg in args {
                    match arg {
                        Arg::Ptr(v) => builder.arg(v),
                        Arg::I32(v) => builder.arg(v),
                        Arg::I64(v) => builder.arg(v),
                        Arg::F32(v) => builder.arg(v),
                        Arg::F64(v) => builder.arg(v),
                    };
                }
                // SAFETY: the arguments follow the kernel's signature in kernels.cu, and
                // every address points into a live buffer large enough for the launch.
                unsafe { builder.launch(cfg) }
                    .map(|_| ())
                    .map_err(|e| unavailable(format!("kernel {name} failed to launch: {e:?}")))
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Kind::Emulated(emu) => emu.launch(name, cfg, args),
        }
    }

    /// Launch shape for an element-wise kernel over `n` elements (grid-stride loops cover
    /// any remainder).
    pub(crate) fn elementwise(&self, n: usize) -> LaunchConfig {
        let blocks = n
            .div_ceil(THREADS as usize)
            .clamp(1, self.max_blocks as usize) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Launch shape for a kernel with one block per row (channel or sample) that reduces in
    /// double-precision shared memory.
    pub(crate) fn per_row(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: REDUCE_THREADS * std::mem::size_of::<f64>() as u32,
        }
    }

    /// Launch shape for a kernel with one thread per channel.
    pub(crate) fn per_channel(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// `len` floats of uninitialised device memory (for kernels that write every element).
    pub(crate) fn uninit(&self, len: usize) -> Result<DeviceBuffer> {
        self.alloc.uninit(len)
    }

    /// `len` zeros.
    pub(crate) fn zeros(&self, len: usize) -> Result<DeviceBuffer> {
        self.alloc.zeros(len)
    }

    /// A device copy of host data.
    pub(crate) fn upload(&self, host: &[f32]) -> Result<DeviceBuffer> {
        self.alloc.upload(host)
    }

    /// A device copy of integers (class targets), stored as 64-bit.
    pub(crate) fn upload_i64(&self, host: &[i64]) -> Result<DeviceBuffer> {
        self.alloc.upload_i64(host)
    }
}

impl Gpu {
    /// The shared workspace of at least `bytes` bytes (grown, never shrunk); its address.
    pub(crate) fn workspace(&mut self, bytes: usize) -> Result<u64> {
        let floats = bytes.div_ceil(4).max(1);
        if self.workspace.as_ref().is_none_or(|w| w.len() < floats) {
            self.workspace = Some(Allocator::Cuda(self.stream.clone()).uninit(floats)?);
        }
        Ok(self.workspace.as_ref().map_or(0, |w| w.ptr(0)))
    }
}

/// Makes the device's default memory pool keep freed memory for reuse instead of releasing
/// it at every synchronisation, so the stream-ordered allocator serves steady-state training
/// from the pool: a caching allocator kept by the driver.
fn keep_freed_memory(ctx: &Arc<CudaContext>) -> Result<()> {
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: plain driver queries on a live context; the pool handle is written by the call.
    unsafe {
        let r = sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), ctx.cu_device());
        if r != sys::CUresult::CUDA_SUCCESS {
            // Devices without memory pools fall back to synchronous allocation in cudarc.
            return Ok(());
        }
        let mut threshold: u64 = u64::MAX;
        let r = sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        );
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(unavailable(format!(
                "cannot configure the device memory pool: {r:?}"
            )));
        }
    }
    Ok(())
}

/// Launches kernel `$name` on `$rt` with `$cfg` and the given arguments (device addresses
/// as `u64`, sizes as `i32`/`i64`, scalars as `f32`/`f64`, in the kernel's parameter order).
macro_rules! launch {
    ($rt:expr, $name:literal, $cfg:expr, $($arg:expr),* $(,)?) => {{
        use $crate::backend::cuda::runtime::Arg;
        let rt: &$crate::backend::cuda::runtime::Runtime = $rt;
        let cfg = $cfg;
        rt.launch($name, cfg, &[$(Arg::from($arg)),*])
    }};
}
pub(crate) use launch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_compute_capability_gets_an_architecture() {
        assert_eq!(arch_for(9, 0).unwrap(), "compute_90");
        assert_eq!(arch_for(8, 6).unwrap(), "compute_86");
        assert_eq!(arch_for(10, 0).unwrap(), "compute_100");
        // Newer minor versions fall back to the family's base.
        assert_eq!(arch_for(9, 5).unwrap(), "compute_90");
        assert_eq!(arch_for(8, 8).unwrap(), "compute_80");
        let err = arch_for(6, 1).unwrap_err().to_string();
        assert!(err.contains("6.1") && err.contains("7.5"), "{err}");
    }
}
