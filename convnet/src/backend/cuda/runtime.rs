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
    /// Mixed precision: convolutions and linear layers compute on bfloat16 copies of their
    /// inputs with float32 accumulation; everything else stays float32.
    pub(crate) bf16: bool,
    /// Values per block at least in split per-channel reductions (small on the emulator,
    /// so that its tests exercise the split path).
    split_granularity: usize,
    /// The capture in progress, if any.
    capture: Option<Capture>,
    /// Captured step graphs by id (`None` once dropped).
    graphs: Vec<Option<StepGraph>>,
}

/// What a capture collects besides the recorded work: memory the graph must keep.
#[derive(Default)]
struct Capture {
    /// Page-locked host copies read by the graph's copy nodes (constant inputs).
    pinned: Vec<PinnedHost>,
    /// Emulator: memory allocated during the capture (a graph owns its allocations) and the
    /// work recorded, in order (allocations take `&self`, hence the cell).
    #[cfg(any(test, feature = "cuda-emulator"))]
    emulated: std::cell::RefCell<EmulatedCapture>,
}

#[cfg(any(test, feature = "cuda-emulator"))]
#[derive(Default)]
struct EmulatedCapture {
    arena: Vec<super::buffer::HostMemory>,
    work: Vec<super::emulator::Recorded>,
}

/// Page-locked host memory, freed on drop.
struct PinnedHost(*mut std::ffi::c_void);

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_host` in `upload_constant_i64`, freed once.
        unsafe {
            let _ = cudarc::driver::result::free_host(self.0);
        }
    }
}

/// A captured training step, replayed by [`Runtime::launch_graph`].
struct StepGraph {
    exec: GraphExec,
    _pinned: Vec<PinnedHost>,
    #[cfg(any(test, feature = "cuda-emulator"))]
    _arena: Vec<super::buffer::HostMemory>,
}

enum GraphExec {
    Gpu(cudarc::driver::CudaGraph),
    #[cfg(any(test, feature = "cuda-emulator"))]
    Emulated(Vec<super::emulator::Recorded>),
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
    /// Convolutions may use TF32 tensor cores.
    pub(crate) tf32: bool,
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

/// Ends the capture in progress on device `ordinal`: `Ok(graph id)` when `ran` is `Ok` and
/// the capture is sound, else the capture is discarded and the error returned. Unlike
/// [`with`], this does not first fail on errors the driver stored while buffers were freed
/// during the capture (dropping values cannot report them); those are collected here and
/// make the capture fail instead, leaving the device usable for eager steps.
pub(crate) fn finish_capture(ordinal: usize, ran: Result<()>) -> Result<usize> {
    let mut all = RUNTIMES.lock().unwrap_or_else(|e| e.into_inner());
    let rt = all
        .iter_mut()
        .find(|(o, _)| *o == ordinal)
        .map(|(_, rt)| rt)
        .ok_or_else(|| unavailable(format!("cuda:{ordinal} has no runtime")))?;
    let stored = match &rt.kind {
        Kind::Gpu(gpu) => {
            let ctx = gpu.stream.context();
            // (Read the stored errors first: binding the context would consume them.)
            let stored = ctx
                .check_err()
                .map_err(|e| unavailable(format!("the driver reported during the capture: {e:?}")));
            let _ = ctx.bind_to_thread();
            stored
        }
        #[cfg(any(test, feature = "cuda-emulator"))]
        Kind::Emulated(_) => Ok(()),
    };
    match ran.and(stored) {
        Ok(()) => rt.end_capture(),
        Err(e) => {
            rt.abort_capture();
            #[allow(irrefutable_let_patterns)]
            if let Kind::Gpu(gpu) = &rt.kind {
                let _ = gpu.stream.context().check_err();
            }
            Err(e)
        }
    }
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
                bf16: false,
                split_granularity: 16,
                capture: None,
                graphs: Vec::new(),
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
                tf32: false,
            }),
            max_blocks: sms * 16,
            bf16: false,
            split_granularity: REDUCE_THREADS as usize * 8,
            capture: None,
            graphs: Vec::new(),
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
            Kind::Emulated(emu) => {
                let work = super::emulator::Recorded::Launch {
                    name,
                    cfg,
                    args: args.to_vec(),
                };
                match self.record(work) {
                    None => Ok(()),
                    Some(_) => emu.launch(name, cfg, args),
                }
            }
        }
    }

    /// Emulator: keeps `work` for the graph instead of running it while a step is being
    /// captured; hands it back when there is no capture.
    #[cfg(any(test, feature = "cuda-emulator"))]
    pub(crate) fn record(
        &self,
        work: super::emulator::Recorded,
    ) -> Option<super::emulator::Recorded> {
        match &self.capture {
            None => Some(work),
            Some(c) => {
                c.emulated.borrow_mut().work.push(work);
                None
            }
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

    /// Launch shape for a per-channel reduction over `count` values per channel, split over
    /// several blocks per channel (grid `(c, splits)`) so that few channels still fill the
    /// GPU; returns the shape and `splits`. Each block reduces at least a few thousand values.
    pub(crate) fn split_per_channel(&self, c: usize, count: usize) -> (LaunchConfig, usize) {
        let per_block = self.split_granularity;
        // About four blocks per multiprocessor in all (max_blocks is 16 per multiprocessor).
        let wanted = (self.max_blocks as usize / 4).div_ceil(c.max(1));
        let splits = count.div_ceil(per_block).clamp(1, wanted.clamp(1, 256));
        let cfg = LaunchConfig {
            grid_dim: (c.max(1) as u32, splits as u32, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: REDUCE_THREADS * std::mem::size_of::<f64>() as u32,
        };
        (cfg, splits)
    }

    /// Launch shape for a kernel with one thread per channel.
    pub(crate) fn per_channel(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Emulator during a capture: graph-owned memory, kept until the graph is dropped.
    #[cfg(any(test, feature = "cuda-emulator"))]
    fn arena_alloc(&self, data: Vec<f32>) -> Option<DeviceBuffer> {
        match (&self.kind, &self.capture) {
            (Kind::Emulated(_), Some(c)) => {
                let memory = super::buffer::HostMemory::new(data);
                let buffer = DeviceBuffer::emulated(memory.borrowed());
                c.emulated.borrow_mut().arena.push(memory);
                Some(buffer)
            }
            _ => None,
        }
    }

    /// `len` floats of uninitialised device memory (for kernels that write every element).
    pub(crate) fn uninit(&self, len: usize) -> Result<DeviceBuffer> {
        #[cfg(any(test, feature = "cuda-emulator"))]
        if let Some(b) = self.arena_alloc(vec![f32::NAN; len.max(1)]) {
            return Ok(b);
        }
        self.alloc.uninit(len)
    }

    /// `len` zeros (zeroed again by every launch of a graph captured around this call).
    pub(crate) fn zeros(&self, len: usize) -> Result<DeviceBuffer> {
        #[cfg(any(test, feature = "cuda-emulator"))]
        if let Some(b) = self.arena_alloc(vec![0.0; len.max(1)]) {
            // Zeroed again at every launch, where the graph's memset node would be.
            let zero = super::emulator::Recorded::Zero {
                addr: b.ptr(0),
                len: len.max(1),
            };
            let _ = self.record(zero);
            return Ok(b);
        }
        self.alloc.zeros(len)
    }

    fn forbid_upload(&self, what: &str) -> Result<()> {
        if self.capture.is_some() {
            return Err(crate::Error::Unsupported(format!(
                "{what} cannot be captured in a CUDA graph (the copy would replay the capture-time data)"
            )));
        }
        Ok(())
    }

    /// A device copy of host data.
    pub(crate) fn upload(&self, host: &[f32]) -> Result<DeviceBuffer> {
        self.forbid_upload("copying host data to the device")?;
        self.alloc.upload(host)
    }

    /// A device copy of integers (class targets), stored as 64-bit.
    pub(crate) fn upload_i64(&self, host: &[i64]) -> Result<DeviceBuffer> {
        self.forbid_upload("copying host data to the device")?;
        self.alloc.upload_i64(host)
    }

    /// A device copy of integers that are the same at every launch of a graph captured
    /// around this call (shape descriptions, the addresses of a step's own buffers): during
    /// a capture the copy reads a page-locked host copy kept with the graph.
    pub(crate) fn upload_constant_i64(&mut self, host: &[i64]) -> Result<DeviceBuffer> {
        let words = super::buffer::i64_words(host);
        self.upload_constant(words)
    }

    /// [`Runtime::upload_constant_i64`] for floats (e.g. the seed gradient 1 of a loss).
    pub(crate) fn upload_constant(&mut self, words: Vec<f32>) -> Result<DeviceBuffer> {
        if self.capture.is_none() {
            return self.alloc.upload(&words);
        }
        #[cfg(any(test, feature = "cuda-emulator"))]
        if let Some(b) = self.arena_alloc(words.clone()) {
            return Ok(b);
        }
        #[allow(irrefutable_let_patterns)]
        let Kind::Gpu(gpu) = &self.kind
        else {
            unreachable!("the emulator case returned above")
        };
        let bytes = std::mem::size_of_val(words.as_slice()).max(4);
        // SAFETY: a fresh page-locked allocation of `bytes`, filled below and freed with the
        // graph; the captured copy node reads it at every launch.
        let pinned = unsafe { cudarc::driver::result::malloc_host(bytes, 0) }
            .map_err(|e| unavailable(format!("cannot allocate page-locked memory: {e:?}")))?;
        let pinned = PinnedHost(pinned);
        // SAFETY: the allocation holds `bytes` >= the words' size.
        let staged = unsafe {
            std::ptr::copy_nonoverlapping(words.as_ptr(), pinned.0.cast::<f32>(), words.len());
            std::slice::from_raw_parts(pinned.0.cast::<f32>(), words.len().max(1))
        };
        let buffer = self.alloc.uninit(words.len())?;
        // SAFETY: destination inside the new buffer, source the page-locked copy.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(buffer.ptr(0), staged, gpu.stream.cu_stream())
        }
        .map_err(|e| unavailable(format!("cannot capture a copy to the device: {e:?}")))?;
        self.capture
            .as_mut()
            .expect("checked above")
            .pinned
            .push(pinned);
        Ok(buffer)
    }

    /// The raw handle of the GPU's one stream, for libraries that queue work on it (NCCL);
    /// `None` on the emulator.
    #[cfg(feature = "nccl")]
    pub(crate) fn cu_stream(&self) -> Option<*mut std::ffi::c_void> {
        match &self.kind {
            Kind::Gpu(gpu) => Some(gpu.stream.cu_stream() as *mut std::ffi::c_void),
            #[cfg(any(test, feature = "cuda-emulator"))]
            Kind::Emulated(_) => None,
        }
    }

    /// Lets convolutions use TF32 tensor cores (10-bit mantissa products, float32 sums) or
    /// not; plans made under the other setting are dropped. No effect on the emulator.
    pub(crate) fn set_tf32(&mut self, on: bool) {
        #[allow(irrefutable_let_patterns)]
        if let Kind::Gpu(gpu) = &mut self.kind {
            if gpu.tf32 != on {
                gpu.tf32 = on;
                gpu.convs.clear();
            }
        }
    }

    /// Switches mixed precision (bfloat16 convolutions and linear layers) on or off.
    pub(crate) fn set_bf16(&mut self, on: bool) {
        self.bf16 = on;
    }

    /// Whether a step is being captured.
    pub(crate) fn is_capturing(&self) -> bool {
        self.capture.is_some()
    }

    /// Starts capturing the work queued from now on into a graph instead of running it.
    pub(crate) fn begin_capture(&mut self) -> Result<()> {
        if self.capture.is_some() {
            return Err(crate::Error::Unsupported(
                "a capture is already in progress".into(),
            ));
        }
        match &mut self.kind {
            Kind::Gpu(gpu) => {
                // Relaxed: page-locked host copies of constants are allocated during the
                // capture; that host call is not stream work and must not abort it.
                gpu.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                    .map_err(|e| {
                        unavailable(format!("cannot start a CUDA graph capture: {e:?}"))
                    })?;
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Kind::Emulated(_) => super::emulator::set_capturing(true),
        }
        self.capture = Some(Capture::default());
        Ok(())
    }

    /// Ends the capture: the graph's id for [`Runtime::launch_graph`], or the error that
    /// made the capture unusable (the work was not run either way).
    pub(crate) fn end_capture(&mut self) -> Result<usize> {
        let mut capture = self
            .capture
            .take()
            .ok_or_else(|| crate::Error::Unsupported("no capture in progress".into()))?;
        let exec = match &mut self.kind {
            Kind::Gpu(gpu) => {
                let flags =
                    sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
                let graph = gpu
                    .stream
                    .end_capture(flags)
                    .map_err(|e| unavailable(format!("the CUDA graph capture failed: {e:?}")))?
                    .ok_or_else(|| unavailable("the CUDA graph capture recorded nothing"))?;
                GraphExec::Gpu(graph)
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Kind::Emulated(_) => {
                super::emulator::set_capturing(false);
                GraphExec::Emulated(std::mem::take(&mut capture.emulated.get_mut().work))
            }
        };
        self.graphs.push(Some(StepGraph {
            exec,
            _pinned: std::mem::take(&mut capture.pinned),
            #[cfg(any(test, feature = "cuda-emulator"))]
            _arena: std::mem::take(&mut capture.emulated.get_mut().arena),
        }));
        Ok(self.graphs.len() - 1)
    }

    /// Ends a capture that failed part-way, discarding what was recorded.
    pub(crate) fn abort_capture(&mut self) {
        if self.capture.is_some() {
            let _ = self.end_capture().map(|id| self.drop_graph(id));
        }
    }

    /// Runs captured step `id` once.
    pub(crate) fn launch_graph(&self, id: usize) -> Result<()> {
        let graph = self
            .graphs
            .get(id)
            .and_then(Option::as_ref)
            .ok_or_else(|| crate::Error::Unsupported(format!("no step graph {id}")))?;
        match (&graph.exec, &self.kind) {
            (GraphExec::Gpu(g), _) => g
                .launch()
                .map_err(|e| unavailable(format!("launching the step graph failed: {e:?}"))),
            #[cfg(any(test, feature = "cuda-emulator"))]
            (GraphExec::Emulated(work), Kind::Emulated(emu)) => emu.replay(work),
            #[cfg(any(test, feature = "cuda-emulator"))]
            _ => Err(crate::Error::Unsupported("graph of another device".into())),
        }
    }

    /// Frees captured step `id`.
    pub(crate) fn drop_graph(&mut self, id: usize) {
        if let Some(g) = self.graphs.get_mut(id) {
            *g = None;
        }
    }
}

impl Gpu {
    /// The shared workspace of at least `bytes` bytes (grown, never shrunk); its address.
    pub(crate) fn workspace(&mut self, bytes: usize, capturing: bool) -> Result<u64> {
        let floats = bytes.div_ceil(4).max(1);
        if self.workspace.as_ref().is_none_or(|w| w.len() < floats) {
            if capturing {
                // Memory allocated in a capture belongs to the graph, not to later steps.
                return Err(crate::Error::Unsupported(
                    "a larger convolution workspace cannot be allocated during a CUDA graph capture".into(),
                ));
            }
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
