//! A host stand-in for a GPU, for tests on machines without one (unit tests, and the
//! `cuda-emulator` feature for integration tests): the CUDA C kernels
//! of `kernels.cu` compiled by the system C++ compiler behind a small prelude (thread and
//! block indices as globals, shared memory as a static array), launched with the
//! configuration the GPU code asks for, one thread at a time; convolutions and matrix
//! products, which cuDNN and cuBLAS do on a GPU, fall back to the CPU kernels.
//!
//! Tensors on `Device::Cuda(ORDINAL)` live in host memory and go through the very code a
//! GPU runs (`ops`, `backward`, `optim`, the launch argument lists), so the kernels' math
//! and the argument order of every launch are tested on any machine with a C++ compiler.
//! Kernels that reduce across a block (they ask for shared memory) run with one thread
//! per block, which their reduction loops reduce to a plain sum; all others run with every
//! thread of their real launch shape, so grid-stride coverage is exercised too. What this
//! cannot show: races, the real libraries' algorithms, performance.

use super::conv::ConvDirection;
use super::runtime::Arg;
use crate::backend::cpu::conv::{self, ConvGeom};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;

/// The device ordinal that selects the emulator: `Device::Cuda(ORDINAL)`.
pub const ORDINAL: usize = 1000;

/// Declarations that let CUDA C compile as host C++.
const PRELUDE: &str = r#"
#include <algorithm>
#include <cmath>
#include <cstring>
using std::max;
using std::min;
struct emu_dim3 { unsigned x, y, z; };
extern "C" {
emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
double shared[4096];
void emu_set_dims(unsigned bx, unsigned by, unsigned thread, unsigned gx, unsigned gy,
                  unsigned threads) {
    blockIdx.x = bx; blockIdx.y = by; threadIdx.x = thread;
    gridDim.x = gx; gridDim.y = gy; blockDim.x = threads;
    blockIdx.z = threadIdx.y = threadIdx.z = 0;
    gridDim.z = blockDim.y = blockDim.z = 1;
}
}
#define __global__
#define __device__ static inline
#define __shared__
static inline void __syncthreads() {}
static inline float atomicAdd(float* a, float v) { float old = *a; *a = old + v; return old; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
"#;

/// A kernel's parameters as `(C type, name)` pairs, from its definition in `source`.
fn signatures(source: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("__global__ void ") {
        let after = &rest[at + "__global__ void ".len()..];
        let open = after.find('(').expect("a parameter list");
        let close = after.find(')').expect("a closed parameter list");
        let name = after[..open].trim().to_string();
        let types = after[open + 1..close]
            .split(',')
            .map(|p| {
                let p = p.trim();
                let cut = p
                    .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .map_or(0, |i| i + 1);
                p[..cut].trim().to_string()
            })
            .collect();
        out.push((name, types));
        rest = &after[close..];
    }
    out
}

/// `extern "C" void emu_<name>(void** args)`: calls the kernel with `*(T*)args[i]`, the way
/// `cuLaunchKernel` passes parameters.
fn wrappers(source: &str) -> String {
    let mut code = String::from("extern \"C\" {\n");
    for (name, types) in signatures(source) {
        let args: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("*({t}*)a[{i}]"))
            .collect();
        code += &format!(
            "void emu_{name}(void** a) {{ {name}({}); }}\n",
            args.join(", ")
        );
    }
    code + "}\n"
}

type Wrapper = unsafe extern "C" fn(*mut *mut c_void);
type SetDims = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32);

/// The compiled kernels.
/// The kernels compiled for the host.
pub struct Emulator {
    _lib: libloading::Library,
    kernels: HashMap<String, (Wrapper, usize)>,
    set_dims: SetDims,
}

fn failed(what: impl Into<String>) -> Error {
    Error::CudaUnavailable(format!("kernel emulator: {}", what.into()))
}

impl Emulator {
    /// Compiles `kernels.cu` for the host (once per process) and loads it.
    pub(crate) fn new() -> Result<Emulator> {
        let source = super::kernels::SOURCE;
        let dir =
            std::env::temp_dir().join(format!("convnet-kernel-emulator-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let cpp = dir.join("kernels.cpp");
        let lib = dir.join("libkernels.so");
        std::fs::write(&cpp, format!("{PRELUDE}\n{source}\n{}", wrappers(source)))
            .map_err(|e| failed(format!("{}: {e}", cpp.display())))?;
        let compiler = std::env::var_os("CXX").map_or_else(|| PathBuf::from("c++"), PathBuf::from);
        // No contraction into fused multiply-adds, as NVRTC is told (--fmad=false).
        let out = std::process::Command::new(&compiler)
            .args([
                "-std=c++17",
                "-O1",
                "-ffp-contract=off",
                "-fPIC",
                "-shared",
                "-o",
            ])
            .arg(&lib)
            .arg(&cpp)
            .output()
            .map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                failed(format!(
                    "cannot run the C++ compiler {}: {e}",
                    compiler.display()
                ))
            })?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(failed(format!(
                "the kernels do not compile as C++:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        // SAFETY: the library was just built from our sources; its initialisers are empty.
        let loaded = unsafe { libloading::Library::new(&lib) };
        // Once loaded (or not), the files are not needed again: a mapped library stays
        // usable after its file is removed.
        let _ = std::fs::remove_dir_all(&dir);
        let loaded = loaded.map_err(|e| failed(e.to_string()))?;
        let mut kernels = HashMap::new();
        for (name, types) in signatures(source) {
            let symbol = format!("emu_{name}");
            // SAFETY: generated above with exactly this signature.
            let f: Wrapper = *unsafe { loaded.get::<Wrapper>(symbol.as_bytes()) }
                .map_err(|e| failed(e.to_string()))?;
            kernels.insert(name, (f, types.len()));
        }
        // SAFETY: defined in the prelude with this signature.
        let set_dims: SetDims = *unsafe { loaded.get::<SetDims>(b"emu_set_dims") }
            .map_err(|e| failed(e.to_string()))?;
        Ok(Emulator {
            _lib: loaded,
            kernels,
            set_dims,
        })
    }

    /// Runs kernel `name` over its launch shape, one thread at a time.
    pub(crate) fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let (f, arity) = self
            .kernels
            .get(name)
            .ok_or_else(|| failed(format!("no kernel {name}")))?;
        if *arity != args.len() {
            return Err(failed(format!(
                "{name} takes {arity} arguments, the launch passed {}",
                args.len()
            )));
        }
        let mut values = args.to_vec();
        let mut pointers: Vec<*mut c_void> = values
            .iter_mut()
            .map(|a| match a {
                Arg::Ptr(v) => v as *mut u64 as *mut c_void,
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::I64(v) => v as *mut i64 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
                Arg::F64(v) => v as *mut f64 as *mut c_void,
            })
            .collect();
        let (gx, gy) = (cfg.grid_dim.0, cfg.grid_dim.1.max(1));
        // Block-wide reductions (the kernels that use shared memory) run one thread per
        // block; see the module comment.
        let threads = if cfg.shared_mem_bytes > 0 {
            1
        } else {
            cfg.block_dim.0
        };
        for by in 0..gy {
            for bx in 0..gx {
                for t in 0..threads {
                    // SAFETY: the wrapper reads each argument as the kernel's declared type;
                    // the test code passes host addresses of live buffers as device addresses.
                    unsafe {
                        (self.set_dims)(bx, by, t, gx, gy, threads);
                        f(pointers.as_mut_ptr());
                    }
                }
            }
        }
        Ok(())
    }
}

static CAPTURING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the start or end of a step capture on the emulator.
pub(crate) fn set_capturing(on: bool) {
    CAPTURING.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Fails, as CUDA does, when host and device memory would be exchanged during a capture
/// (the copy would be recorded once and replayed with the capture-time data).
pub(crate) fn forbid_while_capturing(what: &str) -> Result<()> {
    if CAPTURING.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::Unsupported(format!(
            "{what} cannot be captured in a CUDA graph"
        )));
    }
    Ok(())
}

/// One piece of work recorded during a capture, replayed by each launch of the graph.
pub(crate) enum Recorded {
    Launch {
        name: &'static str,
        cfg: LaunchConfig,
        args: Vec<Arg>,
    },
    /// A convolution: which one, its geometry, bfloat16 data or not, the three addresses.
    Conv(ConvDirection, ConvGeom, bool, [u64; 3]),
    Sgemm(super::blas::Sgemm),
    /// Zeroing memory allocated with `zeros` during the capture.
    Zero {
        addr: u64,
        len: usize,
    },
}

impl Emulator {
    /// Runs recorded work, as a graph launch does.
    pub(crate) fn replay(&self, work: &[Recorded]) -> Result<()> {
        for w in work {
            match w {
                Recorded::Launch { name, cfg, args } => self.launch(name, *cfg, args)?,
                Recorded::Conv(dir, g, bf16, addrs) => convolve(*dir, g, *bf16, *addrs),
                Recorded::Sgemm(call) => sgemm(call),
                Recorded::Zero { addr, len } => {
                    // SAFETY: graph-owned memory of that size.
                    unsafe { slice(*addr, *len) }.fill(0.0)
                }
            }
        }
        Ok(())
    }
}

/// A host slice at an emulated device address.
///
/// # Safety
/// `addr` must address `len` live floats that nothing else accesses meanwhile.
unsafe fn slice<'a>(addr: u64, len: usize) -> &'a mut [f32] {
    // SAFETY: the caller's guarantee.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut f32, len) }
}

/// The float32 value of a bfloat16 (its upper half).
pub(crate) fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// A float32 rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as `to_bf16`.
pub(crate) fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if u & 0x7fff_ffff > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// `len` values at `addr`: float32, or bfloat16 widened to float32.
///
/// # Safety
/// `addr` must address that many live values of the kind given.
unsafe fn read_values(addr: u64, len: usize, bf16: bool) -> Vec<f32> {
    if bf16 {
        // SAFETY: the caller's guarantee.
        let h = unsafe { std::slice::from_raw_parts(addr as *const u16, len) };
        h.iter().map(|&v| bf16_to_f32(v)).collect()
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { slice(addr, len) }.to_vec()
    }
}

/// Stores float32 results at `addr`, rounded to bfloat16 with `bf16`.
///
/// # Safety
/// `addr` must address `values.len()` live values of the kind given.
unsafe fn write_values(addr: u64, values: &[f32], bf16: bool) {
    if bf16 {
        // SAFETY: the caller's guarantee.
        let h = unsafe { std::slice::from_raw_parts_mut(addr as *mut u16, values.len()) };
        for (o, &v) in h.iter_mut().zip(values) {
            *o = f32_to_bf16(v);
        }
    } else {
        // SAFETY: the caller's guarantee.
        unsafe { slice(addr, values.len()) }.copy_from_slice(values);
    }
}

/// cuDNN's convolution `dir` on addresses `[a, b, out]`, by the CPU kernels (bfloat16
/// data: widened, accumulated in float32, the result rounded to bfloat16, as cuDNN's
/// bfloat16 configuration).
pub(crate) fn convolve(dir: ConvDirection, g: &ConvGeom, bf16: bool, [a, b, out]: [u64; 3]) {
    let (x_len, w_len) = (g.n * g.c * g.h * g.w, g.k * (g.c / g.groups) * g.kh * g.kw);
    let y_len = g.n * g.k * g.oh * g.ow;
    let (a_len, b_len, out_len) = match dir {
        ConvDirection::Forward => (x_len, w_len, y_len),
        ConvDirection::BackwardData => (y_len, w_len, x_len),
        ConvDirection::BackwardFilter => (x_len, y_len, w_len),
    };
    // SAFETY: the buffers hold the geometry's sizes (the GPU code's own contract).
    let (a, b) = unsafe { (read_values(a, a_len, bf16), read_values(b, b_len, bf16)) };
    let mut result = vec![0f32; out_len];
    match dir {
        ConvDirection::Forward => conv::conv2d_forward(&a, &b, None, g, &mut result),
        ConvDirection::BackwardData => conv::conv2d_backward_input(&a, &b, g, &mut result),
        ConvDirection::BackwardFilter => conv::conv2d_backward_weight(&a, &b, g, &mut result),
    }
    // SAFETY: as above.
    unsafe { write_values(out, &result, bf16) };
}

/// cuBLAS's `sgemm` as its documentation defines it, column-major with leading dimensions
/// (`C = op(A) @ op(B)`, alpha 1, beta 0), so the emulator checks the argument mapping the
/// GPU code passes to cuBLAS, not just the product it means.
pub(crate) fn sgemm(call: &super::blas::Sgemm) {
    let (m, n, k) = call.mnk;
    let (ta, tb) = call.trans;
    let ((a, lda), (b, ldb), (c, ldc)) = (call.a, call.b, call.c);
    // Column-major element (row, col) of a matrix with leading dimension ld.
    let bf16 = call.bf16;
    let at = |addr: u64, ld: usize, row: usize, col: usize| -> f32 {
        // SAFETY: inside the operand the call describes (bfloat16 inputs with `bf16`).
        unsafe {
            if bf16 {
                bf16_to_f32(*(addr as *const u16).add(col * ld + row))
            } else {
                *(addr as *const f32).add(col * ld + row)
            }
        }
    };
    for j in 0..n {
        for i in 0..m {
            let mut sum = 0f64;
            for p in 0..k {
                let av = if ta {
                    at(a, lda, p, i)
                } else {
                    at(a, lda, i, p)
                };
                let bv = if tb {
                    at(b, ldb, j, p)
                } else {
                    at(b, ldb, p, j)
                };
                sum += av as f64 * bv as f64;
            }
            // SAFETY: inside C.
            unsafe { *(c as *mut f32).add(j * ldc + i) = sum as f32 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ORDINAL;
    use crate::backend::cuda::runtime::launch;
    use crate::nn::{Mode, Model};
    use crate::optim::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig};
    use crate::{Activation, Conv2dParams, Device, MaxPool2dParams, Reduction, Rng, Tensor};

    const EMU: Device = Device::Cuda(ORDINAL);

    /// The tests share one emulated device; a capture in one must not record another's work.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn random(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape.to_vec(), &mut Rng::new(seed))
    }

    fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= atol + rtol * w.abs(),
                "{what}[{i}]: emulated GPU {g}, CPU {w}"
            );
        }
    }

    /// Runs `f` on leaf copies of `inputs` on the CPU and on the emulated GPU, backpropagates
    /// `sum(y * gy)`, and compares outputs and input gradients within float32 rounding of
    /// differently ordered sums.
    fn compare(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> crate::Result<Tensor>) {
        let run = |dev: Device| {
            let xs: Vec<Tensor> = inputs
                .iter()
                .map(|t| t.to_device(dev).unwrap().requires_grad())
                .collect();
            let y = f(&xs).unwrap();
            assert_eq!(y.device(), dev, "{what}: output device");
            let gy = random(y.dims(), 99).to_device(dev).unwrap();
            let grads = y.backward_with(&gy).unwrap();
            let g: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| grads.get(x).expect("a gradient").to_vec())
                .collect();
            (y.to_vec(), g)
        };
        let (cpu_y, cpu_g) = run(Device::Cpu);
        let (emu_y, emu_g) = run(EMU);
        assert_close(&format!("{what}/y"), &emu_y, &cpu_y, 1e-5, 1e-6);
        for (i, (e, c)) in emu_g.iter().zip(&cpu_g).enumerate() {
            assert_close(&format!("{what}/grad{i}"), e, c, 1e-5, 1e-5);
        }
    }

    /// A capture refuses what a CUDA graph cannot replay faithfully (copies of host data,
    /// reading device data on the host), records the rest without running it, and its
    /// replay runs the recorded work on the graph's own memory.
    #[test]
    fn emulated_cuda_capture_records_and_refuses_host_copies() {
        let _serial = serial();
        use crate::backend::cuda::runtime::{finish_capture, with};
        let x = Tensor::from_vec(vec![-1.0, 2.0, -3.0, 4.0], [4])
            .unwrap()
            .to_device(EMU)
            .unwrap();
        with(ORDINAL, |rt| rt.begin_capture()).unwrap();
        let err = Tensor::ones([2]).to_device(EMU).unwrap_err().to_string();
        assert!(err.contains("cannot be captured"), "{err}");
        let y = x.relu().unwrap();
        let err = y.try_to_vec().unwrap_err().to_string();
        assert!(err.contains("cannot be captured"), "{err}");
        let id = finish_capture(ORDINAL, Ok(())).unwrap();
        // Nothing ran during the capture: y's graph-owned memory still holds NaN.
        // Each launch runs the recorded relu into the graph's memory.
        with(ORDINAL, |rt| rt.launch_graph(id)).unwrap();
        assert_eq!(y.to_vec(), vec![0.0, 2.0, 0.0, 4.0]);
        x.update_data(|v| v[0] = 5.0).unwrap();
        with(ORDINAL, |rt| rt.launch_graph(id)).unwrap();
        assert_eq!(
            y.to_vec(),
            vec![5.0, 2.0, 0.0, 4.0],
            "replay reads the current input"
        );
        with(ORDINAL, |rt| {
            rt.drop_graph(id);
            Ok(())
        })
        .unwrap();
        // A failed capture is discarded and the device keeps working eagerly.
        with(ORDINAL, |rt| rt.begin_capture()).unwrap();
        let failed = finish_capture(ORDINAL, Err(crate::Error::Unsupported("test".into())));
        assert!(failed.is_err());
        assert_eq!(x.relu().unwrap().to_vec(), vec![5.0, 2.0, 0.0, 4.0]);
    }

    /// Runs `f` with mixed precision switched on for the emulated device.
    fn with_bf16<R>(f: impl FnOnce() -> R) -> R {
        crate::backend::cuda::use_bf16(ORDINAL, true).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        crate::backend::cuda::use_bf16(ORDINAL, false).unwrap();
        r.unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    #[test]
    fn emulated_cuda_bfloat16_conversion_rounds_to_nearest_even() {
        let _serial = serial();
        use super::{bf16_to_f32, f32_to_bf16};
        // The host reference first: ties go to the even neighbour, NaN stays NaN.
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f80_8000)),
            0x3f80,
            "tie to even (down)"
        );
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f81_8000)),
            0x3f82,
            "tie to even (up)"
        );
        assert_eq!(
            f32_to_bf16(f32::from_bits(0x3f80_8001)),
            0x3f81,
            "above the tie"
        );
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(bf16_to_f32(f32_to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        // The kernels agree with it on every kind of value.
        let values: Vec<f32> = [
            0.0,
            -0.0,
            1.0,
            -2.5,
            std::f32::consts::PI,
            1e-40,
            -1e38,
            65504.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
        ]
        .into_iter()
        .chain((0..200).map(|i| (i as f32 * 0.731).sin() * 10f32.powi(i % 7 - 3)))
        .collect();
        let n = values.len();
        crate::backend::cuda::runtime::with(ORDINAL, |rt| {
            let x = rt.upload(&values)?;
            let h = rt.uninit(n.div_ceil(2))?;
            launch!(
                rt,
                "to_bf16",
                rt.elementwise(n),
                x.ptr(0),
                h.ptr(0),
                n as i64
            )?;
            let back = rt.uninit(n)?;
            launch!(
                rt,
                "from_bf16",
                rt.elementwise(n),
                h.ptr(0),
                back.ptr(0),
                n as i64
            )?;
            let words = h.to_host(0, n.div_ceil(2))?;
            let halves: Vec<u16> = words
                .iter()
                .flat_map(|w| {
                    let b = w.to_bits();
                    [(b & 0xffff) as u16, (b >> 16) as u16]
                })
                .collect();
            let widened = back.to_host(0, n)?;
            for (i, &v) in values.iter().enumerate() {
                let want = f32_to_bf16(v);
                assert_eq!(halves[i], want, "to_bf16({v:e})");
                let w = bf16_to_f32(want);
                assert!(
                    widened[i] == w || (w.is_nan() && widened[i].is_nan()),
                    "from_bf16"
                );
            }
            Ok(())
        })
        .unwrap();
    }

    /// With mixed precision, convolutions and linear layers compute on bfloat16 operands:
    /// close to float32 (bfloat16 keeps 8 bits of mantissa) but not equal, forward and
    /// backward, while the rest of the network stays float32.
    #[test]
    fn emulated_cuda_bfloat16_convolution_and_linear_track_float32() {
        let _serial = serial();
        type Case = (
            &'static str,
            Vec<Tensor>,
            Box<dyn Fn(&[Tensor]) -> crate::Result<Tensor>>,
        );
        let cases: [Case; 2] = [
            (
                "conv",
                vec![
                    random(&[2, 4, 9, 9], 1),
                    random(&[6, 4, 3, 3], 2).scale(0.2).unwrap(),
                    random(&[6], 3),
                ],
                Box::new(|t: &[Tensor]| {
                    t[0].conv2d(&t[1], Some(&t[2]), Conv2dParams::default().padding(1))
                }),
            ),
            (
                "linear",
                vec![
                    random(&[5, 64], 4),
                    random(&[7, 64], 5).scale(0.125).unwrap(),
                    random(&[7], 6),
                ],
                Box::new(|t: &[Tensor]| t[0].linear(&t[1], Some(&t[2]))),
            ),
        ];
        for (what, inputs, f) in cases {
            let run = |dev: Device| {
                let xs: Vec<Tensor> = inputs
                    .iter()
                    .map(|t| t.to_device(dev).unwrap().requires_grad())
                    .collect();
                let y = f(&xs).unwrap();
                let gy = random(y.dims(), 9).to_device(dev).unwrap();
                let grads = y.backward_with(&gy).unwrap();
                let mut out = vec![y.to_vec()];
                out.extend(xs.iter().map(|x| grads.get(x).unwrap().to_vec()));
                out
            };
            let exact = run(Device::Cpu);
            let mixed = with_bf16(|| run(EMU));
            for (i, (m, e)) in mixed.iter().zip(&exact).enumerate() {
                let scale = e.iter().fold(0f32, |a, v| a.max(v.abs()));
                // bfloat16 rounding (2^-9 relative) of operands summed over dozens of terms.
                assert_close(&format!("{what} bf16 #{i}"), m, e, 0.0, 3e-2 * scale);
                // The output and the input and weight gradients go through bfloat16; the
                // bias gradient is a float32 sum of the float32 upstream gradient.
                if i < 3 {
                    let differs = m.iter().zip(e).any(|(a, b)| a != b);
                    assert!(
                        differs,
                        "{what} #{i}: bfloat16 should not give float32's bits"
                    );
                }
            }
        }
    }

    #[test]
    fn emulated_cuda_kernels_compile_as_host_code() {
        let _serial = serial();
        super::Emulator::new().expect("kernels.cu compiles as C++");
        let sigs = super::signatures(super::super::kernels::SOURCE);
        assert_eq!(sigs.len(), super::super::kernels::NAMES.len());
        let (name, types) = &sigs[0];
        assert_eq!(name, "activation_forward");
        assert_eq!(
            types,
            &["const float*", "float*", "long long", "int", "float"]
        );
    }

    #[test]
    fn emulated_cuda_convolution_and_bias() {
        let _serial = serial();
        for (what, x, w, p) in [
            (
                "3x3",
                [2, 3, 9, 8],
                [4, 3, 3, 3],
                Conv2dParams::default().padding(1),
            ),
            (
                "3x3 s2",
                [2, 4, 9, 9],
                [6, 4, 3, 3],
                Conv2dParams::default().padding(1).stride(2),
            ),
            (
                "depthwise",
                [2, 6, 7, 7],
                [6, 1, 3, 3],
                Conv2dParams::default().padding(1).groups(6),
            ),
        ] {
            let inputs = [random(&x, 1), random(&w, 2), random(&[w[0]], 3)];
            compare(what, &inputs, |t| t[0].conv2d(&t[1], Some(&t[2]), p));
        }
    }

    #[test]
    fn emulated_cuda_pooling_shortcut_and_dropout() {
        let _serial = serial();
        compare(
            "max_pool 3x3/2 pad 1 ceil",
            &[random(&[2, 3, 9, 10], 4)],
            |t| t[0].max_pool2d(MaxPool2dParams::new(3).stride(2).padding(1).ceil_mode(true)),
        );
        compare("max_pool 2", &[random(&[2, 3, 8, 8], 5)], |t| {
            t[0].max_pool2d(MaxPool2dParams::new(2))
        });
        compare("avg_pool 3/2 pad 1", &[random(&[2, 3, 9, 9], 6)], |t| {
            t[0].avg_pool2d(crate::AvgPool2dParams::new(3).stride(2).padding(1))
        });
        compare("avg_pool no pad count", &[random(&[2, 3, 9, 9], 6)], |t| {
            t[0].avg_pool2d(
                crate::AvgPool2dParams::new(3)
                    .stride(2)
                    .padding(1)
                    .count_include_pad(false),
            )
        });
        compare("global average", &[random(&[3, 5, 4, 6], 7)], |t| {
            t[0].adaptive_avg_pool2d((1, 1))
        });
        compare("adaptive 2x3", &[random(&[3, 5, 4, 6], 7)], |t| {
            t[0].adaptive_avg_pool2d((2, 3))
        });
        compare("option-A shortcut", &[random(&[2, 4, 7, 6], 8)], |t| {
            t[0].subsample_pad_channels(2, 2, 8)
        });
        compare("dropout", &[random(&[3, 50], 9)], |t| {
            t[0].dropout(0.3, true, &mut Rng::new(4))
        });
        compare("add", &[random(&[3, 5], 10), random(&[3, 5], 11)], |t| {
            t[0].add(&t[1])
        });
    }

    #[test]
    fn emulated_cuda_activations_linear_and_loss() {
        let _serial = serial();
        for act in [
            Activation::Relu,
            Activation::LeakyRelu(0.1),
            Activation::Relu6,
            Activation::Sigmoid,
            Activation::Tanh,
            Activation::Gelu,
            Activation::GeluTanh,
        ] {
            let x = random(&[4, 30], 12).scale(4.0).unwrap();
            compare(act.name(), &[x], |t| t[0].activation(act));
        }
        let inputs = [random(&[5, 7], 13), random(&[3, 7], 14), random(&[3], 15)];
        compare("linear", &inputs, |t| t[0].linear(&t[1], Some(&t[2])));
        compare("linear no bias", &inputs[..2], |t| t[0].linear(&t[1], None));
        let labels = [0, 3, 1, 2, 3, 0];
        for (red, smoothing) in [
            (Reduction::Mean, 0.0),
            (Reduction::Sum, 0.0),
            (Reduction::Mean, 0.2),
            (Reduction::None, 0.1),
        ] {
            compare(
                &format!("cross_entropy {red:?} {smoothing}"),
                &[random(&[6, 4], 16)],
                |t| t[0].cross_entropy(&labels, red, smoothing),
            );
        }
    }

    #[test]
    fn emulated_cuda_batch_norm_with_each_epilogue() {
        let _serial = serial();
        let shape = [3, 4, 5, 6];
        for training in [true, false] {
            for fused in 0..3 {
                let stats = |dev: Device| {
                    let m = random(&[4], 20).scale(0.1).unwrap();
                    let v = random(&[4], 21).affine(0.1, 1.0).unwrap();
                    (m.to_device(dev).unwrap(), v.to_device(dev).unwrap())
                };
                let run = |dev: Device| {
                    let (m, v) = stats(dev);
                    let inputs = [
                        random(&shape, 22),
                        random(&[4], 23),
                        random(&[4], 24),
                        random(&shape, 25),
                    ];
                    let xs: Vec<Tensor> = inputs
                        .iter()
                        .map(|t| t.to_device(dev).unwrap().requires_grad())
                        .collect();
                    let (w, b) = (Some(&xs[1]), Some(&xs[2]));
                    let y = match fused {
                        0 => xs[0].batch_norm2d(&m, &v, w, b, training, 0.1, 1e-5),
                        1 => xs[0].batch_norm2d_relu(&m, &v, w, b, training, 0.1, 1e-5),
                        _ => xs[0].batch_norm2d_add_relu(&xs[3], &m, &v, w, b, training, 0.1, 1e-5),
                    }
                    .unwrap();
                    let gy = random(&shape, 26).to_device(dev).unwrap();
                    let grads = y.backward_with(&gy).unwrap();
                    let mut out = vec![y.to_vec(), m.to_vec(), v.to_vec()];
                    out.extend(
                        xs.iter()
                            .map(|x| grads.get(x).map_or_else(Vec::new, Tensor::to_vec)),
                    );
                    out
                };
                let (cpu, emu) = (run(Device::Cpu), run(EMU));
                for (i, (e, c)) in emu.iter().zip(&cpu).enumerate() {
                    assert_close(
                        &format!("bn training={training} fused={fused} #{i}"),
                        e,
                        c,
                        1e-5,
                        1e-5,
                    );
                }
            }
        }
    }

    fn optimizer_steps(make: impl Fn(Vec<(String, Tensor)>) -> Box<dyn Optimizer>) {
        let run = |dev: Device| {
            let p = random(&[7, 3], 30).to_device(dev).unwrap().requires_grad();
            let mut opt = make(vec![("w".into(), p.clone())]);
            for step in 0..4 {
                let g = random(&[7, 3], 40 + step).to_device(dev).unwrap();
                let mut store = crate::GradStore::default();
                store.insert(&p, g).unwrap();
                opt.step(&store).unwrap();
            }
            let state: Vec<Vec<f32>> = opt.state_dict().iter().map(|(_, t)| t.to_vec()).collect();
            (p.to_vec(), state)
        };
        let (cpu, emu) = (run(Device::Cpu), run(EMU));
        assert_close("parameter", &emu.0, &cpu.0, 1e-6, 1e-7);
        for (e, c) in emu.1.iter().zip(&cpu.1) {
            assert_close("optimizer state", e, c, 1e-6, 1e-7);
        }
    }

    #[test]
    fn emulated_cuda_optimizer_steps() {
        let _serial = serial();
        for (momentum, nesterov, weight_decay) in
            [(0.0, false, 0.0), (0.9, false, 1e-2), (0.9, true, 5e-4)]
        {
            optimizer_steps(|p| {
                Box::new(
                    Sgd::new(
                        p,
                        SgdConfig {
                            lr: 0.1,
                            momentum,
                            nesterov,
                            weight_decay,
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                )
            });
        }
        for cfg in [
            AdamConfig::default(),
            AdamConfig::adamw(),
            AdamConfig {
                amsgrad: true,
                weight_decay: 0.1,
                ..Default::default()
            },
        ] {
            optimizer_steps(|p| Box::new(Adam::new(p, cfg).unwrap()));
        }
    }

    /// Zoo model `name` with one set of weights on the CPU and on the emulated GPU: a few SGD
    /// steps in `mode` give the same losses and weights, and eval-mode logits agree.
    /// (Models with dropout train in eval mode here: their masks come from the process-wide
    /// generator, which other tests may draw from meanwhile; dropout itself is compared above
    /// with its own generator.)
    fn train_on_both(name: &str, input: [usize; 3], batch: usize, steps: u64, mode: Mode) {
        crate::manual_seed(11);
        let cpu = crate::models::build(name, input, 10).unwrap();
        let emu = crate::models::build(name, input, 10).unwrap();
        emu.load_state_dict(&cpu.state_dict(), true).unwrap();
        emu.to_device(EMU).unwrap();
        assert_eq!(emu.device(), EMU);
        let cfg = SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            ..Default::default()
        };
        let mut opts = [
            Sgd::new(cpu.named_parameters(), cfg).unwrap(),
            Sgd::new(emu.named_parameters(), cfg).unwrap(),
        ];
        let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
        let mut dims = vec![batch];
        dims.extend(input);
        for step in 0..steps {
            let x = random(&dims, 50 + step);
            let mut losses = [0f32; 2];
            for (k, (model, dev)) in [(&cpu, Device::Cpu), (&emu, EMU)].into_iter().enumerate() {
                let logits = model.forward(&x.to_device(dev).unwrap(), mode).unwrap();
                assert_eq!(logits.device(), dev);
                let loss = logits.cross_entropy(&labels, Reduction::Mean, 0.0).unwrap();
                losses[k] = loss.item().unwrap();
                let grads = loss.backward().unwrap();
                opts[k].step(&grads).unwrap();
            }
            assert_close(
                &format!("{name} loss, step {step}"),
                &losses[1..],
                &losses[..1],
                1e-5,
                1e-6,
            );
        }
        // Gradients summed in another order (double on the device, float lanes on the CPU)
        // differ in the last bits and deep networks amplify that through the steps: weights
        // agree to 1e-4 absolute (they are of order 0.1).
        for ((n, c), (_, e)) in cpu.state_dict().into_iter().zip(emu.state_dict()) {
            assert_close(&format!("{name}/{n}"), &e.to_vec(), &c.to_vec(), 1e-4, 1e-4);
        }
        let x = random(&dims, 7);
        let eval = |m: &Model, dev: Device| {
            crate::no_grad(|| m.forward(&x.to_device(dev).unwrap(), Mode::Eval))
                .unwrap()
                .to_vec()
        };
        assert_close(
            &format!("{name} eval"),
            &eval(&emu, EMU),
            &eval(&cpu, Device::Cpu),
            1e-4,
            1e-5,
        );
    }

    #[test]
    fn emulated_cuda_trains_the_tutorial_cnn_and_lenet() {
        let _serial = serial();
        train_on_both("seed-cnn", [3, 32, 32], 4, 3, Mode::Train);
        train_on_both("lenet5", [1, 28, 28], 4, 2, Mode::Train);
    }

    #[test]
    fn emulated_cuda_trains_resnet20() {
        let _serial = serial();
        train_on_both("resnet20", [3, 16, 16], 4, 2, Mode::Train);
    }

    #[test]
    fn emulated_cuda_trains_mobilenet_v2_and_a_bottleneck_resnet() {
        let _serial = serial();
        train_on_both("mobilenet_v2", [3, 32, 32], 2, 2, Mode::Eval);
        train_on_both("resnet50-cifar", [3, 16, 16], 4, 1, Mode::Train);
    }
}
