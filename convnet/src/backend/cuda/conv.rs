//! 2-D convolution on the GPU through cuDNN: forward, backward-data and backward-filter,
//! mirroring `backend::cpu::conv` (same `ConvGeom`, NCHW float32, groups and dilation).
//!
//! Each distinct geometry gets a plan, made once and cached: the tensor, filter and
//! convolution descriptors and the algorithm of each direction, chosen by timing the
//! candidates (`cudnnFind*`, what `torch.backends.cudnn.benchmark = True` does) among those
//! that use plain float32 arithmetic (`CUDNN_FMA_MATH`: no TF32, so results stay within
//! float32 rounding of the CPU's), or any when TF32 was allowed (`allow_tf32`). The
//! workspace is one device buffer shared by all plans.

use super::runtime::{Gpu, Kind, Runtime};
use super::{int, unavailable};
use crate::backend::cpu::conv::ConvGeom;
use crate::error::Result;
use cudarc::cudnn::{result as dnn, sys};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};

fn cudnn_error(what: &str, e: impl std::fmt::Debug) -> crate::Error {
    unavailable(format!("cuDNN {what}: {e:?}"))
}

/// Descriptors and chosen algorithms of one convolution geometry.
pub(crate) struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    fwd: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
    bwd_data: Option<(sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    bwd_filter: Option<(sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the descriptors were created by `Plan::new` and are used by nothing else.
        unsafe {
            let _ = dnn::destroy_tensor_descriptor(self.x);
            let _ = dnn::destroy_tensor_descriptor(self.y);
            let _ = dnn::destroy_filter_descriptor(self.w);
            let _ = dnn::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// Plans by geometry.
#[derive(Default)]
pub(crate) struct PlanCache {
    /// By geometry and whether the data is bfloat16.
    plans: HashMap<(ConvGeom, bool), Plan>,
}

impl PlanCache {
    /// Drops every plan (before the cuDNN handle goes).
    pub(crate) fn clear(&mut self) {
        self.plans.clear();
    }
}

/// Choosing an algorithm runs the candidates, which a capture cannot record.
fn new_shape_in_capture(g: &ConvGeom) -> crate::Error {
    crate::Error::Unsupported(format!(
        "a convolution of a shape not run before ({g:?}) cannot be captured in a CUDA graph"
    ))
}

/// The cuDNN element type: bfloat16 for mixed precision, else float32.
fn data_type(bf16: bool) -> sys::cudnnDataType_t {
    if bf16 {
        sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16
    } else {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT
    }
}

fn tensor4d(dims: [usize; 4], bf16: bool) -> Result<sys::cudnnTensorDescriptor_t> {
    let d = dnn::create_tensor_descriptor().map_err(|e| cudnn_error("tensor descriptor", e))?;
    let dims = [
        int(dims[0], "size")?,
        int(dims[1], "size")?,
        int(dims[2], "size")?,
        int(dims[3], "size")?,
    ];
    // SAFETY: `d` was just created.
    unsafe {
        dnn::set_tensor4d_descriptor(
            d,
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            data_type(bf16),
            dims,
        )
    }
    .map_err(|e| cudnn_error("tensor descriptor", e))?;
    Ok(d)
}

impl Plan {
    /// Descriptors for `g`: float32 data (TF32 products allowed with `tf32`), or bfloat16
    /// data with float32 accumulation (`bf16`, tensor cores allowed).
    fn new(g: &ConvGeom, tf32: bool, bf16: bool) -> Result<Plan> {
        let x = tensor4d([g.n, g.c, g.h, g.w], bf16)?;
        let y = tensor4d([g.n, g.k, g.oh, g.ow], bf16)?;
        let w = dnn::create_filter_descriptor().map_err(|e| cudnn_error("filter descriptor", e))?;
        let conv = dnn::create_convolution_descriptor()
            .map_err(|e| cudnn_error("convolution descriptor", e))?;
        let plan = Plan {
            x,
            y,
            w,
            conv,
            fwd: None,
            bwd_data: None,
            bwd_filter: None,
        };
        // SAFETY: the descriptors were just created and are owned by `plan`.
        unsafe {
            dnn::set_filter4d_descriptor(
                w,
                data_type(bf16),
                sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                [
                    int(g.k, "size")?,
                    int(g.c / g.groups, "size")?,
                    int(g.kh, "size")?,
                    int(g.kw, "size")?,
                ],
            )
            .map_err(|e| cudnn_error("filter descriptor", e))?;
            dnn::set_convolution2d_descriptor(
                conv,
                int(g.padding.0, "size")?,
                int(g.padding.1, "size")?,
                int(g.stride.0, "size")?,
                int(g.stride.1, "size")?,
                int(g.dilation.0, "size")?,
                int(g.dilation.1, "size")?,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(|e| cudnn_error("convolution descriptor", e))?;
            dnn::set_convolution_group_count(conv, int(g.groups, "size")?)
                .map_err(|e| cudnn_error("group count", e))?;
            // FMA only (float32 arithmetic) unless TF32 tensor cores were allowed, as PyTorch's
            // torch.backends.cudnn.allow_tf32 selects between the same two modes.
            let math = if tf32 || bf16 {
                sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            };
            dnn::set_convolution_math_type(conv, math).map_err(|e| cudnn_error("math type", e))?;
        }
        Ok(plan)
    }
}

/// Picks the fastest successful candidate that does plain float32 arithmetic (any, with
/// TF32 allowed).
macro_rules! fastest {
    ($results:expr, $count:expr, $tf32:expr) => {
        $results[..$count as usize]
            .iter()
            .filter(|r| r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
            .filter(|r| {
                $tf32
                    || !matches!(
                        r.mathType,
                        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
                            | sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
                    )
            })
            .min_by(|a, b| a.time.total_cmp(&b.time))
            .map(|r| (r.algo, r.memory))
    };
}

/// The plan's cached algorithm for one direction, or, on first use, the fastest candidate
/// found by timing them (`$find`, a `cudnnFind*` function over the listed descriptors).
macro_rules! algorithm {
    ($plan:ident . $slot:ident, $g:expr, ($handle:expr, $capturing:expr, $tf32:expr),
     $find:ident, $perf:ty, $count:expr, [$($desc:ident),*], $what:literal) => {
        match $plan.$slot {
            Some(a) => a,
            None if $capturing => return Err(new_shape_in_capture($g)),
            None => {
                const N: usize = $count as usize;
                let mut count: c_int = 0;
                // SAFETY: zeroed perf structs are valid (plain data); cuDNN writes `count`.
                let mut results: [$perf; N] = unsafe { std::mem::zeroed() };
                // SAFETY: live handle and descriptors; the call allocates its own memory.
                unsafe {
                    sys::$find(
                        $handle,
                        $($plan.$desc,)*
                        N as c_int,
                        &mut count,
                        results.as_mut_ptr(),
                    )
                    .result()
                }
                .map_err(|e| cudnn_error(concat!("choosing a ", $what, " algorithm"), e))?;
                let chosen = fastest!(results, count, $tf32).ok_or_else(|| {
                    unavailable(format!(
                        concat!("cuDNN has no usable ", $what, " algorithm for {:?}"),
                        $g
                    ))
                })?;
                $plan.$slot = Some(chosen);
                chosen
            }
        }
    };
}

/// Which of the three convolutions, by its operands and result: forward `(x, w) -> y`,
/// backward-data `(dy, w) -> dx`, backward-filter `(x, dy) -> dw`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ConvDirection {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// How a convolution runs: on bfloat16 data or not, and whether a capture is in progress
/// (which forbids choosing an algorithm or growing the workspace).
#[derive(Clone, Copy)]
pub(crate) struct ConvMode {
    bf16: bool,
    capturing: bool,
}

impl Runtime {
    fn conv_mode(&self) -> ConvMode {
        ConvMode {
            bf16: self.bf16,
            capturing: self.is_capturing(),
        }
    }

    /// Runs convolution `dir` of `g` on device addresses `[a, b, out]` (the operands and the
    /// result as [`ConvDirection`] lists them): cuDNN on a GPU, the CPU kernels on the
    /// emulator (recorded instead while a step is captured).
    fn convolve(&mut self, dir: ConvDirection, g: &ConvGeom, [a, b, out]: [u64; 3]) -> Result<()> {
        let mode = self.conv_mode();
        match &mut self.kind {
            Kind::Gpu(gpu) => match dir {
                ConvDirection::Forward => gpu.conv2d_forward(g, a, b, out, mode),
                ConvDirection::BackwardData => gpu.conv2d_backward_input(g, a, b, out, mode),
                ConvDirection::BackwardFilter => gpu.conv2d_backward_weight(g, a, b, out, mode),
            },
            #[cfg(any(test, feature = "cuda-emulator"))]
            Kind::Emulated(_) => {
                let bf16 = self.bf16;
                let work = super::emulator::Recorded::Conv(dir, *g, bf16, [a, b, out]);
                if self.record(work).is_some() {
                    super::emulator::convolve(dir, g, bf16, [a, b, out]);
                }
                Ok(())
            }
        }
    }

    /// `y [N, K, OH, OW] = conv(x [N, C, H, W], w [K, C/G, KH, KW])` (no bias), at device
    /// addresses.
    pub(crate) fn conv2d_forward(&mut self, g: &ConvGeom, x: u64, w: u64, y: u64) -> Result<()> {
        self.convolve(ConvDirection::Forward, g, [x, w, y])
    }

    /// `dx [N, C, H, W]` from `dy [N, K, OH, OW]` and `w`, at device addresses.
    pub(crate) fn conv2d_backward_input(
        &mut self,
        g: &ConvGeom,
        dy: u64,
        w: u64,
        dx: u64,
    ) -> Result<()> {
        self.convolve(ConvDirection::BackwardData, g, [dy, w, dx])
    }

    /// `dw [K, C/G, KH, KW]` from `x` and `dy`, at device addresses (overwritten).
    pub(crate) fn conv2d_backward_weight(
        &mut self,
        g: &ConvGeom,
        x: u64,
        dy: u64,
        dw: u64,
    ) -> Result<()> {
        self.convolve(ConvDirection::BackwardFilter, g, [x, dy, dw])
    }
}

impl Gpu {
    /// The plan of `g`, made on first use.
    fn plan(&mut self, g: &ConvGeom, bf16: bool) -> Result<&mut Plan> {
        let key = (*g, bf16);
        if !self.convs.plans.contains_key(&key) {
            let plan = Plan::new(g, self.tf32, bf16)?;
            self.convs.plans.insert(key, plan);
        }
        Ok(self.convs.plans.get_mut(&key).expect("inserted above"))
    }

    fn conv2d_forward(
        &mut self,
        g: &ConvGeom,
        x: u64,
        w: u64,
        y: u64,
        mode: ConvMode,
    ) -> Result<()> {
        let (handle, capturing, tf32) = (self.cudnn, mode.capturing, self.tf32 || mode.bf16);
        let plan = self.plan(g, mode.bf16)?;
        let (algo, bytes) = algorithm!(
            plan.fwd,
            g,
            (handle, capturing, tf32),
            cudnnFindConvolutionForwardAlgorithm,
            sys::cudnnConvolutionFwdAlgoPerf_t,
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT,
            [x, w, conv, y],
            "forward"
        );
        let (xd, wd, cd, yd) = (plan.x, plan.w, plan.conv, plan.y);
        let ws = self.workspace(bytes, mode.capturing)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: addresses of live buffers of the plan's sizes; the workspace holds `bytes`.
        unsafe {
            dnn::convolution_forward(
                handle,
                (&alpha as *const f32).cast(),
                xd,
                x as *const c_void,
                wd,
                w as *const c_void,
                cd,
                algo,
                ws as *mut c_void,
                bytes,
                (&beta as *const f32).cast(),
                yd,
                y as *mut c_void,
            )
        }
        .map_err(|e| cudnn_error("convolution forward", e))
    }

    fn conv2d_backward_input(
        &mut self,
        g: &ConvGeom,
        dy: u64,
        w: u64,
        dx: u64,
        mode: ConvMode,
    ) -> Result<()> {
        let (handle, capturing, tf32) = (self.cudnn, mode.capturing, self.tf32 || mode.bf16);
        let plan = self.plan(g, mode.bf16)?;
        let (algo, bytes) = algorithm!(
            plan.bwd_data,
            g,
            (handle, capturing, tf32),
            cudnnFindConvolutionBackwardDataAlgorithm,
            sys::cudnnConvolutionBwdDataAlgoPerf_t,
            sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT,
            [w, y, conv, x],
            "backward-data"
        );
        let (xd, wd, cd, yd) = (plan.x, plan.w, plan.conv, plan.y);
        let ws = self.workspace(bytes, mode.capturing)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: as in the forward pass.
        unsafe {
            dnn::convolution_backward_data(
                handle,
                (&alpha as *const f32).cast(),
                wd,
                w as *const c_void,
                yd,
                dy as *const c_void,
                cd,
                algo,
                ws as *mut c_void,
                bytes,
                (&beta as *const f32).cast(),
                xd,
                dx as *mut c_void,
            )
        }
        .map_err(|e| cudnn_error("convolution backward-data", e))
    }

    fn conv2d_backward_weight(
        &mut self,
        g: &ConvGeom,
        x: u64,
        dy: u64,
        dw: u64,
        mode: ConvMode,
    ) -> Result<()> {
        let (handle, capturing, tf32) = (self.cudnn, mode.capturing, self.tf32 || mode.bf16);
        let plan = self.plan(g, mode.bf16)?;
        let (algo, bytes) = algorithm!(
            plan.bwd_filter,
            g,
            (handle, capturing, tf32),
            cudnnFindConvolutionBackwardFilterAlgorithm,
            sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT,
            [x, y, conv, w],
            "backward-filter"
        );
        let (xd, wd, cd, yd) = (plan.x, plan.w, plan.conv, plan.y);
        let ws = self.workspace(bytes, mode.capturing)?;
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: as in the forward pass.
        unsafe {
            dnn::convolution_backward_filter(
                handle,
                (&alpha as *const f32).cast(),
                xd,
                x as *const c_void,
                yd,
                dy as *const c_void,
                cd,
                algo,
                ws as *mut c_void,
                bytes,
                (&beta as *const f32).cast(),
                wd,
                dw as *mut c_void,
            )
        }
        .map_err(|e| cudnn_error("convolution backward-filter", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Conv2dParams;

    /// Needs the cuDNN library, not a GPU (descriptors need no handle): for each geometry,
    /// the output size cuDNN derives from the plan's descriptors is the one convnet's shape
    /// rules give, which checks the order of every size, padding, stride and dilation
    /// argument. Run with `LD_LIBRARY_PATH=<cuDNN lib dir> cargo test -p convnet --features
    /// cuda -- --ignored cudnn`.
    #[test]
    #[ignore = "needs the cuDNN library: set LD_LIBRARY_PATH and run with --ignored"]
    fn cudnn_descriptors_agree_with_convnet_shapes() {
        super::super::load_cudnn().expect("cuDNN loads");
        let cases = [
            (
                [2, 3, 32, 32],
                [16, 3, 3, 3],
                Conv2dParams::default().padding(1),
            ),
            (
                [2, 16, 33, 31],
                [32, 16, 3, 3],
                Conv2dParams::default().padding(1).stride(2),
            ),
            (
                [1, 3, 64, 48],
                [8, 3, 7, 5],
                Conv2dParams {
                    padding: (3, 2),
                    stride: (2, 1),
                    ..Default::default()
                },
            ),
            (
                [2, 8, 20, 24],
                [8, 8, 3, 3],
                Conv2dParams {
                    padding: (2, 1),
                    dilation: (2, 3),
                    ..Default::default()
                },
            ),
            (
                [2, 32, 16, 16],
                [32, 1, 3, 3],
                Conv2dParams::default().padding(1).groups(32),
            ),
            (
                [4, 12, 9, 9],
                [6, 4, 1, 1],
                Conv2dParams::default().groups(3),
            ),
        ];
        for (x, w, p) in cases {
            let g = p.geometry(&x, &w).unwrap();
            let plan = Plan::new(&g, false, false).unwrap();
            let (mut n, mut k, mut oh, mut ow) = (0, 0, 0, 0);
            // SAFETY: the plan's descriptors are alive; the outputs are plain integers.
            unsafe {
                sys::cudnnGetConvolution2dForwardOutputDim(
                    plan.conv, plan.x, plan.w, &mut n, &mut k, &mut oh, &mut ow,
                )
                .result()
                .unwrap();
            }
            let got = [n, k, oh, ow].map(|v| v as usize);
            assert_eq!(got, [g.n, g.k, g.oh, g.ow], "{x:?} * {w:?} with {p:?}");
        }
    }
}
