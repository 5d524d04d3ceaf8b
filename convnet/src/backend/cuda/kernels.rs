//! The CUDA C kernels for everything that is not a convolution or a matrix product
//! (`kernels.cu`: activations, element-wise ops, bias and reductions, batch norm with its
//! fused epilogues, pooling with argmax, the option-A shortcut, softmax cross-entropy, the
//! SGD and Adam steps), embedded in the binary and compiled by NVRTC on
//! first use. Compiling needs NVRTC but no GPU, so the sources are checked on any machine
//! that has the library (`embedded_kernels_compile_with_nvrtc`).

use super::{contained, load_nvrtc, unavailable};
use crate::error::Result;

/// The CUDA C source of every kernel.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The entry points `SOURCE` defines, by name.
pub const NAMES: &[&str] = &[
    "activation_forward",
    "activation_backward",
    "add_forward",
    "add_assign",
    "mul_mask",
    "bn_stats",
    "bn_normalize",
    "bn_backward_reduce",
    "bn_backward_dx",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
    "sgd_step_multi",
    "add_channel_bias",
    "channel_sum",
    "channel_sum_finish",
    "sum_scaled",
    "scale_copy",
    "bn_finalize",
    "bn_backward_finalize",
    "avg_pool2d_backward",
    "subsample_pad_forward",
    "subsample_pad_backward",
    "adam_step_multi",
    "accumulate_metrics",
    "to_bf16",
    "from_bf16",
    "strided_map",
    "reduce_broadcast",
    "affine_forward",
    "softmax_forward",
    "softmax_backward",
    "nll_forward",
    "nll_backward",
    "mse_forward",
    "mse_backward",
];

/// Compiles [`SOURCE`] to PTX for the given virtual architecture (e.g. `compute_90` for
/// Hopper), without fused multiply-add contraction so that float32 results follow the CPU
/// kernels' separate multiply and add. Fails with [`crate::Error::CudaUnavailable`] when
/// NVRTC cannot be loaded, and with the compiler's log when the source does not compile.
pub fn compile_ptx(arch: &'static str) -> Result<cudarc::nvrtc::Ptx> {
    load_nvrtc()?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        name: Some("convnet_kernels.cu".into()),
        ..Default::default()
    };
    contained("compiling the CUDA kernels", || {
        cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)
    })?
    .map_err(|e| unavailable(format!("NVRTC rejected the embedded kernels: {e}")))
}

/// The compiler options both outputs share: no fused multiply-add contraction (float32
/// results follow the CPU kernels' separate multiply and add), IEEE division and square root.
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
    ]
}

/// Compiles [`SOURCE`] to a CUBIN for a real architecture (e.g. `sm_90`): machine code the
/// driver loads without a PTX JIT, so a driver older than this NVRTC (same CUDA major
/// version) still loads it. Errors as [`compile_ptx`].
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result as rtc, sys};
    load_nvrtc()?;
    let src = std::ffi::CString::new(SOURCE).expect("the kernel source has no NUL byte");
    let name = c"convnet_kernels.cu";
    contained("compiling the CUDA kernels", || -> Result<Vec<u8>> {
        let prog = rtc::create_program(&src, Some(name))
            .map_err(|e| unavailable(format!("NVRTC cannot create a program: {e:?}")))?;
        // SAFETY: `prog` was just created and is destroyed once, below.
        let out = unsafe {
            match rtc::compile_program(prog, &options(arch)) {
                Err(e) => {
                    let log = rtc::get_program_log(prog).unwrap_or_default();
                    let log = std::ffi::CStr::from_ptr(log.as_ptr())
                        .to_string_lossy()
                        .into_owned();
                    Err(unavailable(format!(
                        "NVRTC rejected the embedded kernels ({e:?}): {log}"
                    )))
                }
                Ok(()) => {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .and_then(|_| {
                            let mut cubin = vec![0u8; size];
                            sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                                .result()
                                .map(|_| cubin)
                        })
                        .map_err(|e| unavailable(format!("NVRTC gave no CUBIN for {arch}: {e:?}")))
                }
            }
        };
        // SAFETY: created above, not used after this.
        let _ = unsafe { rtc::destroy_program(prog) };
        out
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs NVRTC (`CONVNET_CUDA_LIB_DIR` pointing at `libnvrtc.so.13`), not a GPU; run with
    /// `cargo test -p convnet --features cuda -- --ignored nvrtc`.
    #[test]
    #[ignore = "needs NVRTC: set CONVNET_CUDA_LIB_DIR and run with --ignored"]
    fn embedded_kernels_compile_with_nvrtc() {
        let ptx = compile_ptx("compute_90").expect("the kernels compile");
        let text = ptx.to_src();
        for name in NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "no entry point {name} in the PTX"
            );
        }
    }

    /// Needs NVRTC, not a GPU: machine code for Hopper, an ELF image.
    #[test]
    #[ignore = "needs NVRTC: set CONVNET_CUDA_LIB_DIR and run with --ignored"]
    fn embedded_kernels_compile_to_cubin_with_nvrtc() {
        let cubin = compile_cubin("sm_90").expect("the kernels compile");
        assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
        for name in NAMES {
            let found = cubin.windows(name.len()).any(|w| w == name.as_bytes());
            assert!(found, "no symbol {name} in the CUBIN");
        }
    }

    /// Where NVRTC is absent (CI), compiling is an error that says what to install or set,
    /// not a panic from cudarc's loader.
    #[test]
    fn without_nvrtc_the_error_names_the_library_and_the_variable() {
        match compile_ptx("compute_90") {
            Ok(_) => eprintln!("NVRTC is present here; the error path runs where it is absent"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("libnvrtc.so.13") && msg.contains("CONVNET_CUDA_LIB_DIR"),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn every_listed_kernel_is_in_the_source() {
        for name in NAMES {
            assert!(
                SOURCE.contains(&format!("__global__ void {name}(")),
                "{name} is listed but not defined"
            );
        }
        assert_eq!(SOURCE.matches("__global__ void ").count(), NAMES.len());
    }
}
