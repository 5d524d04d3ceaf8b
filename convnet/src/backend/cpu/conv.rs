//! 2-D convolution (cross-correlation) forward and backward, mirroring
//! `torch.nn.functional.conv2d` and its autograd formula.
//!
//! Legend: N batch, C input channels, H/W input height/width, K output channels,
//! KH/KW kernel size, OH/OW output size, G groups, CG = C/G and KG = K/G channels per group.
//! Layouts: input `[N, C, H, W]`, weight `[K, CG, KH, KW]`, bias `[K]`, output `[N, K, OH, OW]`.
//!
//! Method: 3x3 stride-1 padding-1 convolutions with a width that is a multiple of 16 go to
//! the direct AVX-512 kernel of `conv_direct` where the CPU has it. Otherwise, per image and
//! group, im2col the input into `col [CG*KH*KW, OH*OW]` and multiply
//! `W_g [KG, CG*KH*KW] @ col`. A 1x1 kernel with stride 1 and no padding uses the input as
//! `col` directly. The bias is written first and the product accumulated onto it (a fused
//! epilogue). Images are spread over rayon threads; products inside run single-threaded
//! unless the batch is smaller than the thread count.

use super::matmul::{matmul, MatRef, Par};
use super::tuning::{choose, ConvKernel, ConvPass, KernelChoice};
use rayon::prelude::*;

/// Geometry of one convolution, validated by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvGeom {
    /// Batch size N.
    pub n: usize,
    /// Input channels C.
    pub c: usize,
    /// Input height H.
    pub h: usize,
    /// Input width W.
    pub w: usize,
    /// Output channels K.
    pub k: usize,
    /// Kernel height KH.
    pub kh: usize,
    /// Kernel width KW.
    pub kw: usize,
    /// Output height OH.
    pub oh: usize,
    /// Output width OW.
    pub ow: usize,
    /// Stride (vertical, horizontal).
    pub stride: (usize, usize),
    /// Zero padding (vertical, horizontal).
    pub padding: (usize, usize),
    /// Dilation (vertical, horizontal).
    pub dilation: (usize, usize),
    /// Groups G.
    pub groups: usize,
}

impl ConvGeom {
    pub(super) fn cg(&self) -> usize {
        self.c / self.groups
    }
    pub(super) fn kg(&self) -> usize {
        self.k / self.groups
    }
    /// Rows of the im2col matrix of one group: CG*KH*KW.
    pub(super) fn col_rows(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    pub(super) fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
    pub(super) fn in_image(&self) -> usize {
        self.c * self.h * self.w
    }
    pub(super) fn out_image(&self) -> usize {
        self.k * self.out_plane()
    }
    /// True when im2col would be the identity (1x1, stride 1, no padding).
    pub(super) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == (1, 1) && self.padding == (0, 0)
    }
    /// Range of output columns `ow` whose input column `ow*sw - pw + kw*dw` is inside `0..W`.
    fn valid_ow(&self, kw: usize) -> (usize, usize) {
        valid_range(
            self.w,
            self.ow,
            self.stride.1,
            self.padding.1,
            kw * self.dilation.1,
        )
    }
    fn valid_oh(&self, kh: usize) -> (usize, usize) {
        valid_range(
            self.h,
            self.oh,
            self.stride.0,
            self.padding.0,
            kh * self.dilation.0,
        )
    }
    /// A short description for profiles: `conv2d [N, C, H, W] w[K, CG, KH, KW] s.. p.. d.. g..`.
    pub fn describe(&self) -> String {
        format!(
            "conv2d [{}, {}, {}, {}] w[{}, {}, {}, {}] s{:?} p{:?} d{:?} g{}",
            self.n,
            self.c,
            self.h,
            self.w,
            self.k,
            self.cg(),
            self.kh,
            self.kw,
            self.stride,
            self.padding,
            self.dilation,
            self.groups
        )
    }

    /// Multiply-accumulates of the forward pass (for FLOP counts).
    pub fn macs(&self) -> usize {
        self.n * self.k * self.out_plane() * self.col_rows()
    }
}

/// Output positions `o` in `lo..hi` with `0 <= o*stride - pad + shift < len`.
fn valid_range(len: usize, out: usize, stride: usize, pad: usize, shift: usize) -> (usize, usize) {
    // o*stride + shift >= pad  <=>  o >= ceil((pad - shift) / stride)
    let lo = if shift >= pad {
        0
    } else {
        (pad - shift).div_ceil(stride)
    };
    // o*stride + shift - pad <= len - 1  <=>  o <= (len - 1 + pad - shift) / stride
    let hi = if len + pad > shift {
        ((len - 1 + pad - shift) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Fills `col [CG*KH*KW, OH*OW]` from one image's group `x [CG, H, W]`.
pub fn im2col(x: &[f32], g: &ConvGeom, col: &mut [f32]) {
    let ohw = g.out_plane();
    for (row, dst) in col[..g.col_rows() * ohw].chunks_mut(ohw).enumerate() {
        im2col_row(x, g, row, dst);
    }
}

/// Fills row `row` (`(c * KH + ki) * KW + kj`) of im2col's matrix, `dst [OH*OW]`.
pub fn im2col_row(x: &[f32], g: &ConvGeom, row: usize, dst: &mut [f32]) {
    let ((sh, sw), (ph, pw), (dh, dw)) = (g.stride, g.padding, g.dilation);
    let (c, ki, kj) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
    let plane = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
    let dst = &mut dst[..g.out_plane()];
    let (oh_lo, oh_hi) = g.valid_oh(ki);
    let (ow_lo, ow_hi) = g.valid_ow(kj);
    dst[..oh_lo * g.ow].fill(0.0);
    dst[oh_hi * g.ow..].fill(0.0);
    for oh in oh_lo..oh_hi {
        let ih = oh * sh + ki * dh - ph;
        let out_row = &mut dst[oh * g.ow..(oh + 1) * g.ow];
        out_row[..ow_lo].fill(0.0);
        out_row[ow_hi..].fill(0.0);
        if ow_lo >= ow_hi {
            continue;
        }
        let iw0 = ow_lo * sw + kj * dw - pw;
        let src = &plane[ih * g.w..(ih + 1) * g.w];
        if sw == 1 {
            out_row[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
        } else {
            for (i, o) in out_row[ow_lo..ow_hi].iter_mut().enumerate() {
                *o = src[iw0 + i * sw];
            }
        }
    }
}

/// Adds `col [CG*KH*KW, OH*OW]` back into one image's group `dx [CG, H, W]` (im2col's adjoint).
pub fn col2im_add(col: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    let (ohw, (sh, sw), (ph, pw), (dh, dw)) = (g.out_plane(), g.stride, g.padding, g.dilation);
    for c in 0..g.cg() {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for ki in 0..g.kh {
            let (oh_lo, oh_hi) = g.valid_oh(ki);
            for kj in 0..g.kw {
                let row = (c * g.kh + ki) * g.kw + kj;
                let src = &col[row * ohw..(row + 1) * ohw];
                let (ow_lo, ow_hi) = g.valid_ow(kj);
                if ow_lo >= ow_hi {
                    continue;
                }
                for oh in oh_lo..oh_hi {
                    let ih = oh * sh + ki * dh - ph;
                    let iw0 = ow_lo * sw + kj * dw - pw;
                    let in_row = &src[oh * g.ow + ow_lo..oh * g.ow + ow_hi];
                    let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
                    if sw == 1 {
                        for (d, s) in dst[iw0..iw0 + in_row.len()].iter_mut().zip(in_row) {
                            *d += s;
                        }
                    } else {
                        for (i, s) in in_row.iter().enumerate() {
                            dst[iw0 + i * sw] += s;
                        }
                    }
                }
            }
        }
    }
}

/// Parallelism inside one image's products: threads go to the batch when it is large enough.
fn inner_par(g: &ConvGeom) -> Par {
    if g.n >= rayon::current_num_threads() {
        Par::Seq
    } else {
        Par::Rayon
    }
}

/// `y = conv2d(x, w) + bias`. `y` must have `N*K*OH*OW` elements. 3x3 convolutions take the
/// direct kernel where it applies, the rest im2col + GEMM.
pub fn conv2d_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::conv_direct::applies(g) {
        return super::conv_direct::forward(x, w, bias, g, y);
    }
    conv2d_forward_im2col(x, w, bias, g, y)
}

/// [`conv2d_forward`], or another kernel where `kernels` chooses one (see
/// [`super::tuning`]): Winograd's F(2x2, 3x3) ([`super::winograd::forward_nchw`]) or
/// im2col + GEMM.
pub fn conv2d_forward_with(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
    kernels: KernelChoice,
) {
    let direct = if direct_forward_applies(g) {
        ConvKernel::Direct
    } else {
        ConvKernel::Gemm
    };
    let rule = winograd_rule(g, true).unwrap_or(direct);
    let offered = [
        (ConvKernel::Gemm, true),
        (ConvKernel::Direct, direct == ConvKernel::Direct),
        (ConvKernel::Winograd, super::winograd::nchw_possible(g)),
        (ConvKernel::WinogradLanes, lanes_apply(g)),
    ];
    let pass = ConvPass::Forward;
    let kernel = choose(kernels, pass, g, (direct, rule), offered, |k| {
        forward_by(k, x, w, bias, g, y)
    });
    forward_by(kernel, x, w, bias, g, y)
}

/// The Winograd form the shape rules take for the 3x3 stride-1 convolution `g` (its forward
/// pass, or its input gradient's flipped form, or with `channels_last` false where the
/// channels-last form does not apply, its weight gradient), if any: the channels-last copies
/// from 32 input channels ([`super::winograd::nchw_applies`]), the tiles-in-lanes form from
/// 16 on rows a multiple of 32 wide (a ResNet's first stage, where the copies cost more
/// than Winograd saves). Measured with `cargo bench -p convnet --bench conv` at batch 64,
/// 2 threads, on AMD Zen 5, 16->16 at 32x32: forward direct 0.60 ms, channels-last 0.78,
/// lanes 0.53; weight gradient direct 0.66, channels-last 0.60, lanes 0.58.
fn winograd_rule(g: &ConvGeom, channels_last: bool) -> Option<ConvKernel> {
    if channels_last && super::winograd::nchw_applies(g) {
        Some(ConvKernel::Winograd)
    } else if g.c >= LANES_RULE_MIN_CHANNELS && lanes_apply(g) {
        Some(ConvKernel::WinogradLanes)
    } else {
        None
    }
}

/// Input channels from which the rules take [`super::winograd_lanes`] (see [`winograd_rule`]).
const LANES_RULE_MIN_CHANNELS: usize = 16;

/// Whether [`super::winograd_lanes`] computes `g` on this CPU.
fn lanes_apply(g: &ConvGeom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::winograd_lanes::applies(g)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// Whether the direct kernel computes the forward pass of `g` on this CPU.
fn direct_forward_applies(g: &ConvGeom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::conv_direct::applies(g)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// The forward pass by `kernel` (which applies to `g`).
fn forward_by(
    kernel: ConvKernel,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    match kernel {
        ConvKernel::Winograd => super::winograd::forward_nchw(x, w, bias, g, y),
        #[cfg(target_arch = "x86_64")]
        ConvKernel::WinogradLanes => super::winograd_lanes::forward(x, w, bias, g, y),
        ConvKernel::Gemm => conv2d_forward_im2col(x, w, bias, g, y),
        _ => conv2d_forward(x, w, bias, g, y),
    }
}

/// True when [`conv2d_relu_max_pool_forward`] runs for `g` on this CPU (otherwise the
/// caller runs the convolution and [`super::pool::max_pool2d_relu_forward`] one after the
/// other).
pub fn relu_max_pool_fusable(g: &ConvGeom) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::conv_direct::relu_max_pool_applies(g)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = g;
        false
    }
}

/// `y = max_pool2d(relu(conv2d(x, w) + bias))` and the pooling's argmax in one pass, where
/// [`relu_max_pool_fusable`] holds: the same values, bit for bit, as [`conv2d_forward`]
/// followed by [`super::pool::max_pool2d_relu_forward`], without the convolution's
/// full-size output (Winograd's, in [`conv2d_forward_with`], round differently).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_relu_max_pool_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    pool: &super::pool::PoolGeom,
    y: &mut [f32],
    argmax: &mut [u32],
) {
    assert!(relu_max_pool_fusable(g), "no fused kernel for {g:?}");
    #[cfg(target_arch = "x86_64")]
    super::conv_direct::forward_relu_max_pool(x, w, bias, g, pool, y, argmax);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, w, bias, pool, y, argmax);
}

/// [`conv2d_forward`] through im2col + GEMM, for any geometry.
pub fn conv2d_forward_im2col(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    y: &mut [f32],
) {
    let (cg, kg, rows, ohw) = (g.cg(), g.kg(), g.col_rows(), g.out_plane());
    let par = inner_par(g);
    let pointwise = g.is_pointwise();
    let col_len = if pointwise { 0 } else { rows * ohw };
    y.par_chunks_mut(g.out_image())
        .zip(x.par_chunks(g.in_image()))
        .for_each_init(
            || vec![0f32; col_len],
            |col, (y_img, x_img)| {
                for grp in 0..g.groups {
                    let x_grp = &x_img[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
                    let y_grp = &mut y_img[grp * kg * ohw..(grp + 1) * kg * ohw];
                    fill_bias(y_grp, bias.map(|b| &b[grp * kg..(grp + 1) * kg]), ohw);
                    let col_ref: &[f32] = if pointwise {
                        x_grp
                    } else {
                        im2col(x_grp, g, col);
                        col
                    };
                    let w_grp =
                        MatRef::row_major(&w[grp * kg * rows..(grp + 1) * kg * rows], kg, rows);
                    matmul(
                        y_grp,
                        w_grp,
                        MatRef::row_major(col_ref, rows, ohw),
                        true,
                        par,
                    );
                }
            },
        );
}

/// Starts each output plane (`ohw` values) of `y` at its channel's bias (zero without one),
/// for the products to accumulate onto.
pub(super) fn fill_bias(y: &mut [f32], bias: Option<&[f32]>, ohw: usize) {
    match bias {
        Some(b) => y
            .chunks_mut(ohw)
            .zip(b)
            .for_each(|(plane, &b)| plane.fill(b)),
        None => y.fill(0.0),
    }
}

/// `dx = conv2d_input_grad(dy, w)`: the gradient with respect to the input.
///
/// With stride 1 this is itself a convolution: `dy` correlated with the kernel flipped in
/// space and transposed in channels, padded by `dilation*(KH-1) - padding`. That form runs
/// through the forward kernel, whose products are as large as the forward pass's, instead of
/// `W^T @ dY` products with an inner dimension of only KG (16 in a ResNet's first stage).
/// A ResNet's 3x3 stride-2 downsampling convolutions take the direct polyphase kernel
/// ([`super::conv_direct::backward_input_s2`]); everything else takes im2col's adjoint.
pub fn conv2d_backward_input(dy: &[f32], w: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    conv2d_backward_input_with(dy, w, g, dx, KernelChoice::Direct)
}

/// [`conv2d_backward_input`] with its kernel chosen by `kernels` (see [`super::tuning`]):
/// the direct kernels, Winograd's F(2x2, 3x3) through the flipped kernel, or col2im.
pub fn conv2d_backward_input_with(
    dy: &[f32],
    w: &[f32],
    g: &ConvGeom,
    dx: &mut [f32],
    kernels: KernelChoice,
) {
    let flipped = g.flipped_input_grad().map(|tg| (flip_transpose(w, g), tg));
    #[cfg(target_arch = "x86_64")]
    let s2 = super::conv_direct::input_grad_s2_applies(g);
    #[cfg(not(target_arch = "x86_64"))]
    let s2 = false;
    // Without Winograd: the flipped kernel through the forward pass's kernel (direct or
    // im2col + GEMM), the direct stride-2 kernel, or col2im.
    let direct = match &flipped {
        Some((_, tg)) if direct_forward_applies(tg) => ConvKernel::Direct,
        Some(_) => ConvKernel::Gemm,
        None if s2 => ConvKernel::Direct,
        None => ConvKernel::Col2im,
    };
    let rule = flipped
        .as_ref()
        .and_then(|(_, tg)| winograd_rule(tg, true))
        .unwrap_or(direct);
    let run = |kernel: ConvKernel, dx: &mut [f32]| match (kernel, &flipped) {
        (ConvKernel::Winograd, Some((fw, tg))) => {
            super::winograd::forward_nchw(dy, fw, None, tg, dx)
        }
        #[cfg(target_arch = "x86_64")]
        (ConvKernel::WinogradLanes, Some((fw, tg))) => {
            super::winograd_lanes::forward(dy, fw, None, tg, dx)
        }
        (ConvKernel::Direct, Some((fw, tg))) => conv2d_forward(dy, fw, None, tg, dx),
        (ConvKernel::Gemm, Some((fw, tg))) => conv2d_forward_im2col(dy, fw, None, tg, dx),
        #[cfg(target_arch = "x86_64")]
        (ConvKernel::Direct, None) => super::conv_direct::backward_input_s2(dy, w, g, dx),
        _ => conv2d_backward_input_col2im(dy, w, g, dx),
    };
    let on_flipped =
        |applies: fn(&ConvGeom) -> bool| flipped.as_ref().is_some_and(|(_, tg)| applies(tg));
    let offered = [
        (ConvKernel::Col2im, true),
        (ConvKernel::Gemm, flipped.is_some()),
        (ConvKernel::Direct, direct == ConvKernel::Direct),
        (
            ConvKernel::Winograd,
            on_flipped(super::winograd::nchw_possible),
        ),
        (ConvKernel::WinogradLanes, on_flipped(lanes_apply)),
    ];
    let pass = ConvPass::InputGrad;
    let kernel = choose(kernels, pass, g, (direct, rule), offered, |k| run(k, dx));
    run(kernel, dx)
}

impl ConvGeom {
    /// The geometry of the input gradient as a forward convolution of `dy` with the
    /// flipped, transposed kernel ([`flip_transpose`]), where that form applies: stride 1,
    /// padding at most the dilated kernel's span, not pointwise.
    pub(super) fn flipped_input_grad(&self) -> Option<ConvGeom> {
        let span = |k: usize, d: usize| d * (k - 1);
        let g = self;
        let applies = g.stride == (1, 1)
            && g.padding.0 <= span(g.kh, g.dilation.0)
            && g.padding.1 <= span(g.kw, g.dilation.1)
            && !g.is_pointwise();
        applies.then(|| ConvGeom {
            n: g.n,
            c: g.k,
            h: g.oh,
            w: g.ow,
            k: g.c,
            kh: g.kh,
            kw: g.kw,
            oh: g.h,
            ow: g.w,
            stride: (1, 1),
            padding: (
                span(g.kh, g.dilation.0) - g.padding.0,
                span(g.kw, g.dilation.1) - g.padding.1,
            ),
            dilation: g.dilation,
            groups: g.groups,
        })
    }
}

/// `w [K, CG, KH, KW]` -> `w' [C, KG, KH, KW]` with `w'[g*CG + c, k, i, j] = w[g*KG + k, c, KH-1-i, KW-1-j]`.
pub(super) fn flip_transpose(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    let (cg, kg, kk) = (g.cg(), g.kg(), g.kh * g.kw);
    let mut out = vec![0f32; w.len()];
    for grp in 0..g.groups {
        for k in 0..kg {
            for c in 0..cg {
                let src = &w[((grp * kg + k) * cg + c) * kk..((grp * kg + k) * cg + c + 1) * kk];
                let dst =
                    &mut out[((grp * cg + c) * kg + k) * kk..((grp * cg + c) * kg + k + 1) * kk];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        }
    }
    out
}

/// The general input gradient: `dcol = W^T @ dY` per image and group, then col2im.
pub fn conv2d_backward_input_col2im(dy: &[f32], w: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    let (cg, kg, rows, ohw) = (g.cg(), g.kg(), g.col_rows(), g.out_plane());
    let par = inner_par(g);
    let pointwise = g.is_pointwise();
    let col_len = if pointwise { 0 } else { rows * ohw };
    dx.par_chunks_mut(g.in_image())
        .zip(dy.par_chunks(g.out_image()))
        .for_each_init(
            || vec![0f32; col_len],
            |col, (dx_img, dy_img)| {
                for grp in 0..g.groups {
                    let dx_grp = &mut dx_img[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
                    let dy_grp =
                        MatRef::row_major(&dy_img[grp * kg * ohw..(grp + 1) * kg * ohw], kg, ohw);
                    let w_t =
                        MatRef::row_major(&w[grp * kg * rows..(grp + 1) * kg * rows], kg, rows).t();
                    if pointwise {
                        matmul(dx_grp, w_t, dy_grp, false, par);
                    } else {
                        matmul(col, w_t, dy_grp, false, par);
                        dx_grp.fill(0.0);
                        col2im_add(col, g, dx_grp);
                    }
                }
            },
        );
}

/// `dw = conv2d_weight_grad(x, dy)`: the gradient with respect to the weight, summed over the
/// batch. Each rayon split accumulates its own partial sum; the partials are then added.
///
/// The products are formed transposed, `dW_g^T [CG*KH*KW, KG] += col @ dY_g^T`, into a
/// row-major buffer: measured with the `gemm` crate at ResNet shapes (KG = 16, OH*OW = 1024)
/// this orientation runs about 6x faster than `dY_g @ col^T`. The result is transposed once.
pub fn conv2d_backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::conv_direct::weight_grad_applies(g) {
        return super::conv_direct::backward_weight(x, dy, g, dw);
    }
    conv2d_backward_weight_gemm(x, dy, g, dw)
}

/// [`conv2d_backward_weight`] with its kernel chosen by `kernels` (see [`super::tuning`]):
/// the direct kernel, im2col + GEMM, or Winograd's F(2x2, 3x3)
/// ([`super::winograd::backward_weight_nchw`], a candidate when measured).
pub fn conv2d_backward_weight_with(
    x: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    dw: &mut [f32],
    kernels: KernelChoice,
) {
    #[cfg(target_arch = "x86_64")]
    let direct = super::conv_direct::weight_grad_applies(g);
    #[cfg(not(target_arch = "x86_64"))]
    let direct = false;
    let direct = if direct {
        ConvKernel::Direct
    } else {
        ConvKernel::Gemm
    };
    let winograd = super::winograd::nchw_weight_grad_possible(g);
    let rule = winograd_rule(g, winograd).unwrap_or(direct);
    let run = |kernel: ConvKernel, dw: &mut [f32]| match kernel {
        ConvKernel::Winograd => super::winograd::backward_weight_nchw(x, dy, g, dw),
        #[cfg(target_arch = "x86_64")]
        ConvKernel::WinogradLanes => super::winograd_lanes::backward_weight(x, dy, g, dw),
        #[cfg(target_arch = "x86_64")]
        ConvKernel::Direct => super::conv_direct::backward_weight(x, dy, g, dw),
        _ => conv2d_backward_weight_gemm(x, dy, g, dw),
    };
    let offered = [
        (ConvKernel::Gemm, true),
        (ConvKernel::Direct, direct == ConvKernel::Direct),
        (ConvKernel::Winograd, winograd),
        (ConvKernel::WinogradLanes, lanes_apply(g)),
    ];
    let pass = ConvPass::WeightGrad;
    let kernel = choose(kernels, pass, g, (direct, rule), offered, |k| run(k, dw));
    run(kernel, dw)
}

/// [`conv2d_backward_weight`] through im2col + GEMM, for any geometry.
pub fn conv2d_backward_weight_gemm(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    let (cg, kg, rows, ohw) = (g.cg(), g.kg(), g.col_rows(), g.out_plane());
    let w_len = g.k * rows;
    let pointwise = g.is_pointwise();
    let col_len = if pointwise { 0 } else { rows * ohw };
    // acc holds, per group, dW_g^T as a row-major [rows, kg] block.
    let per_image = |acc: &mut [f32], col: &mut Vec<f32>, n: usize, par: Par| {
        let x_img = &x[n * g.in_image()..(n + 1) * g.in_image()];
        let dy_img = &dy[n * g.out_image()..(n + 1) * g.out_image()];
        for grp in 0..g.groups {
            let x_grp = &x_img[grp * cg * g.h * g.w..(grp + 1) * cg * g.h * g.w];
            let col_ref: &[f32] = if pointwise {
                x_grp
            } else {
                im2col(x_grp, g, col);
                col
            };
            let dy_t =
                MatRef::row_major(&dy_img[grp * kg * ohw..(grp + 1) * kg * ohw], kg, ohw).t();
            matmul(
                &mut acc[grp * kg * rows..(grp + 1) * kg * rows],
                MatRef::row_major(col_ref, rows, ohw),
                dy_t,
                true,
                par,
            );
        }
    };
    let threads = rayon::current_num_threads();
    let mut acc = if g.n < threads * 2 {
        let mut acc = vec![0f32; w_len];
        let mut col = vec![0f32; col_len];
        for n in 0..g.n {
            per_image(&mut acc, &mut col, n, Par::Rayon);
        }
        acc
    } else {
        let chunk = g.n.div_ceil(threads);
        let partials: Vec<Vec<f32>> = (0..g.n)
            .into_par_iter()
            .chunks(chunk)
            .map(|images| {
                let mut acc = vec![0f32; w_len];
                let mut col = vec![0f32; col_len];
                for n in images {
                    per_image(&mut acc, &mut col, n, Par::Seq);
                }
                acc
            })
            .collect();
        let mut it = partials.into_iter();
        let mut first = it.next().unwrap_or_else(|| vec![0f32; w_len]);
        for p in it {
            first.iter_mut().zip(&p).for_each(|(d, s)| *d += s);
        }
        first
    };
    // [rows, kg] -> [kg, rows] per group.
    for grp in 0..g.groups {
        let block = &mut acc[grp * kg * rows..(grp + 1) * kg * rows];
        let out = &mut dw[grp * kg * rows..(grp + 1) * kg * rows];
        for r in 0..rows {
            for k in 0..kg {
                out[k * rows + r] = block[r * kg + k];
            }
        }
    }
}

/// `db[k] = sum over n, oh, ow of dy[n, k, oh, ow]` (channels in parallel; 16 float32
/// lanes per plane, planes added in float64).
pub fn conv2d_backward_bias(dy: &[f32], g: &ConvGeom, db: &mut [f32]) {
    let ohw = g.out_plane();
    db.par_iter_mut().enumerate().for_each(|(k, d)| {
        let acc: f64 = (0..g.n)
            .map(|n| lane_sum(&dy[(n * g.k + k) * ohw..(n * g.k + k + 1) * ohw]))
            .sum();
        *d = acc as f32;
    });
}

/// Sum of a slice in 16 float32 lanes, combined in float64.
fn lane_sum(xs: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + tail
}

/// Direct seven-loop convolution with `f64` accumulation: the reference for the kernels above.
/// Returns `(y, dx, dw)` for upstream gradient `dy` so that all three can be compared.
pub fn conv2d_naive(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    dy: &[f32],
    g: &ConvGeom,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (cg, kg) = (g.cg(), g.kg());
    let mut y = vec![0f64; g.n * g.out_image()];
    let mut dx = vec![0f64; x.len()];
    let mut dw = vec![0f64; w.len()];
    for n in 0..g.n {
        for k in 0..g.k {
            let grp = k / kg;
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    let yi = ((n * g.k + k) * g.oh + oh) * g.ow + ow;
                    let mut acc = bias.map_or(0.0, |b| b[k] as f64);
                    for c in 0..cg {
                        let ci = grp * cg + c;
                        for ki in 0..g.kh {
                            for kj in 0..g.kw {
                                let ih = (oh * g.stride.0 + ki * g.dilation.0) as isize
                                    - g.padding.0 as isize;
                                let iw = (ow * g.stride.1 + kj * g.dilation.1) as isize
                                    - g.padding.1 as isize;
                                if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                    continue;
                                }
                                let xi = ((n * g.c + ci) * g.h + ih as usize) * g.w + iw as usize;
                                let wi = ((k * cg + c) * g.kh + ki) * g.kw + kj;
                                acc += x[xi] as f64 * w[wi] as f64;
                                dx[xi] += dy[yi] as f64 * w[wi] as f64;
                                dw[wi] += dy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
    (f(y), f(dx), f(dw))
}

/// Asserts that `got` is within `bound` times (|reference| + the reference's root mean
/// square) of `want` everywhere: the measure of Winograd's rounding in the tests.
#[cfg(test)]
pub(super) fn assert_within_scale(got: &[f32], want: &[f32], bound: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
    for (i, (a, e)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - e).abs() <= bound * (e.abs() + rms),
            "{what}[{i}]: {a} vs {e}"
        );
    }
}

/// The 3x3, stride-1, padding-1 convolution of `n` images of `c x h x w` into `k` channels
/// (the Winograd kernels' geometry, for tests).
#[cfg(test)]
pub(super) fn same_3x3(n: usize, c: usize, h: usize, w: usize, k: usize) -> ConvGeom {
    ConvGeom {
        n,
        c,
        h,
        w,
        k,
        kh: 3,
        kw: 3,
        oh: h,
        ow: w,
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
    }
}

/// Normal random `(x, w, b, dy)` for `g`, drawn from `rng` in that order (for tests).
#[cfg(test)]
pub(super) fn random_operands(
    g: &ConvGeom,
    rng: &mut crate::Rng,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut r = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
    (
        r(g.n * g.in_image()),
        r(g.k * g.col_rows()),
        r(g.k),
        r(g.n * g.out_image()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape::conv_out_size;
    use crate::Rng;

    #[allow(clippy::too_many_arguments)]
    fn geom(
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        k: usize,
        kh: usize,
        kw: usize,
        s: (usize, usize),
        p: (usize, usize),
        d: (usize, usize),
        groups: usize,
    ) -> ConvGeom {
        ConvGeom {
            n,
            c,
            h,
            w,
            k,
            kh,
            kw,
            oh: conv_out_size(h, kh, s.0, p.0, d.0).unwrap(),
            ow: conv_out_size(w, kw, s.1, p.1, d.1).unwrap(),
            stride: s,
            padding: p,
            dilation: d,
            groups,
        }
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 + 1e-5 * y.abs(),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Under [`KernelChoice::Measured`] each pass computes the convolution whichever kernel
    /// wins, measures a shape once, and its first (measuring) call returns what the chosen
    /// kernel computes afterwards, bit for bit.
    #[test]
    fn measured_kernels_compute_the_convolution_and_keep_their_choice() {
        use super::super::tuning::{measurements, ConvPass};
        let cases = [
            geom(3, 16, 8, 16, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1),
            geom(2, 32, 8, 8, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1),
            geom(2, 16, 4, 64, 16, 3, 3, (1, 1), (1, 1), (1, 1), 1),
            geom(3, 16, 16, 16, 32, 3, 3, (2, 2), (1, 1), (1, 1), 1),
            geom(3, 4, 9, 7, 6, 5, 5, (1, 1), (2, 2), (1, 1), 1),
            geom(3, 8, 6, 6, 4, 1, 1, (1, 1), (0, 0), (1, 1), 1),
        ];
        let mut rng = Rng::new(21);
        for g in cases {
            let (x, w, b, dy) = random_operands(&g, &mut rng);
            let (y_ref, dx_ref, dw_ref) = conv2d_naive(&x, &w, Some(&b), &dy, &g);
            // Winograd's rounding: a few 1e-6 of the outputs' scale.
            let check = |got: &[f32], want: &[f32], what: &str| {
                assert_within_scale(got, want, 5e-6, &format!("{g:?} {what}"))
            };
            let m = KernelChoice::Measured;
            let passes = |fill: f32| {
                let mut y = vec![fill; y_ref.len()];
                conv2d_forward_with(&x, &w, Some(&b), &g, &mut y, m);
                let mut dx = vec![fill; dx_ref.len()];
                conv2d_backward_input_with(&dy, &w, &g, &mut dx, m);
                let mut dw = vec![fill; dw_ref.len()];
                conv2d_backward_weight_with(&x, &dy, &g, &mut dw, m);
                (y, dx, dw)
            };
            let first = passes(f32::NAN);
            check(&first.0, &y_ref, "y");
            check(&first.1, &dx_ref, "dx");
            check(&first.2, &dw_ref, "dw");
            let again = passes(7.0);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&first.0), bits(&again.0), "{g:?} y");
            assert_eq!(bits(&first.1), bits(&again.1), "{g:?} dx");
            assert_eq!(bits(&first.2), bits(&again.2), "{g:?} dw");
            let found = measurements();
            for pass in [ConvPass::Forward, ConvPass::InputGrad, ConvPass::WeightGrad] {
                let of: Vec<_> = found
                    .iter()
                    .filter(|r| r.geom == g && r.pass == pass)
                    .collect();
                assert!(of.len() <= 1, "{g:?} {pass:?} measured twice");
                for r in of {
                    assert!(r.seconds.len() >= 2, "{r:?}");
                    assert!(r.seconds.iter().any(|(k, _)| *k == r.chosen), "{r:?}");
                    assert!(r.seconds.iter().any(|(k, _)| *k == r.rule), "{r:?}");
                }
            }
            // Every shape has im2col + GEMM and something else for its forward pass on
            // AVX-512; the 5x5 and 1x1 layers only GEMM.
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                let forward = found
                    .iter()
                    .any(|r| r.geom == g && r.pass == ConvPass::Forward);
                assert_eq!(forward, g.kh == 3, "{g:?}");
            }
        }
    }

    #[test]
    fn fast_kernels_match_naive_reference() {
        let cases = [
            geom(3, 4, 7, 9, 6, 3, 3, (1, 1), (1, 1), (1, 1), 1),
            geom(2, 6, 9, 8, 4, 2, 3, (2, 1), (1, 2), (1, 1), 2),
            geom(1, 5, 11, 10, 5, 3, 3, (2, 2), (2, 2), (2, 2), 5),
            geom(5, 4, 6, 5, 7, 1, 1, (1, 1), (0, 0), (1, 1), 1),
            geom(4, 3, 6, 7, 2, 1, 1, (2, 2), (1, 0), (1, 1), 1),
            geom(1, 2, 4, 4, 3, 5, 5, (3, 3), (2, 2), (1, 1), 1),
            geom(3, 6, 7, 8, 4, 3, 2, (1, 1), (1, 0), (2, 1), 2),
            geom(2, 4, 9, 9, 4, 3, 3, (1, 1), (1, 1), (1, 1), 4),
            geom(2, 3, 6, 5, 2, 3, 3, (1, 1), (0, 2), (1, 1), 1),
        ];
        let mut rng = Rng::new(3);
        for g in cases {
            let (x, w, b, dy) = random_operands(&g, &mut rng);
            let (y_ref, dx_ref, dw_ref) = conv2d_naive(&x, &w, Some(&b), &dy, &g);
            let mut y = vec![0.0; y_ref.len()];
            conv2d_forward(&x, &w, Some(&b), &g, &mut y);
            close(&y, &y_ref, &format!("{g:?} y"));
            let mut dx = vec![7.0; x.len()];
            conv2d_backward_input(&dy, &w, &g, &mut dx);
            close(&dx, &dx_ref, &format!("{g:?} dx"));
            let mut dx = vec![7.0; x.len()];
            conv2d_backward_input_col2im(&dy, &w, &g, &mut dx);
            close(&dx, &dx_ref, &format!("{g:?} dx (col2im)"));
            let mut dw = vec![7.0; w.len()];
            conv2d_backward_weight(&x, &dy, &g, &mut dw);
            close(&dw, &dw_ref, &format!("{g:?} dw"));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod direct_tests {
    use super::*;
    use crate::Rng;

    /// The direct kernel against the naive reference at ResNet shapes and a few others,
    /// forward, input gradient (through the flipped-kernel form) and weight gradient.
    #[test]
    fn direct_3x3_matches_naive_reference() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F on this CPU");
            return;
        }
        let mut rng = Rng::new(5);
        for (n, c, h, w, k, bias, s) in [
            (2, 16, 32, 32, 16, true, 1),
            (2, 32, 16, 16, 32, false, 1),
            (1, 3, 16, 32, 8, true, 1),
            (3, 5, 7, 16, 4, true, 1),
            (1, 8, 5, 48, 12, false, 1),
            (2, 64, 8, 8, 64, false, 1),
            (3, 6, 4, 8, 8, true, 1),
            // Images of 1, 2 and 3 rows, and a remainder of single rows under full blocks.
            (2, 4, 1, 16, 4, true, 1),
            (1, 3, 2, 32, 8, false, 1),
            (2, 5, 3, 16, 4, true, 1),
            (1, 4, 11, 32, 4, false, 1),
            // 8-wide images of 2 and 10 rows: a single pair; a block of pairs and one more.
            (2, 4, 2, 8, 4, true, 1),
            (1, 6, 10, 8, 8, false, 1),
            // Enough images that each thread's weight gradient runs over several groups.
            (9, 16, 32, 32, 16, false, 1),
            // Stride 2: ResNet's downsampling shapes (16-wide and paired 8-wide outputs),
            // a non-square one, and several weight-gradient groups.
            (2, 16, 32, 32, 32, true, 2),
            (2, 32, 16, 16, 64, false, 2),
            (1, 4, 20, 32, 8, true, 2),
            (3, 5, 8, 16, 4, false, 2),
            (9, 16, 32, 32, 16, false, 2),
            // Stride 2 with two 16-wide tiles per output row and an odd number of rows.
            (2, 6, 6, 64, 4, true, 2),
        ] {
            let (oh, ow) = ((h - 1) / s + 1, (w - 1) / s + 1);
            let g = ConvGeom {
                n,
                c,
                h,
                w,
                k,
                kh: 3,
                kw: 3,
                oh,
                ow,
                stride: (s, s),
                padding: (1, 1),
                dilation: (1, 1),
                groups: 1,
            };
            assert!(super::super::conv_direct::applies(&g), "{g:?}");
            let mut r = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
            let x = r(n * c * h * w);
            let wt = r(k * c * 9);
            let b = r(k);
            let dy = r(n * k * oh * ow);
            let b = bias.then_some(b);
            let (y_ref, dx_ref, dw_ref) = conv2d_naive(&x, &wt, b.as_deref(), &dy, &g);
            // A sum of C*9 products of unit-variance values: float32 rounding grows with
            // the size of the terms, not of the (cancelling) result, so the bound is relative
            // to the outputs' RMS.
            let check = |got: &[f32], want: &[f32], what: &str| {
                let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
                for (i, (a, e)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (e.abs() + rms),
                        "{g:?} {what}[{i}]: {a} vs {e}"
                    );
                }
            };
            let mut y = vec![7.0; y_ref.len()];
            conv2d_forward(&x, &wt, b.as_deref(), &g, &mut y);
            check(&y, &y_ref, "y");
            // The dispatch takes Winograd for some of these; the direct kernel on all.
            let mut y = vec![7.0; y_ref.len()];
            super::super::conv_direct::forward(&x, &wt, b.as_deref(), &g, &mut y);
            check(&y, &y_ref, "y (direct)");
            let mut dx = vec![7.0; x.len()];
            conv2d_backward_input(&dy, &wt, &g, &mut dx);
            check(&dx, &dx_ref, "dx");
            let mut dw = vec![7.0; wt.len()];
            conv2d_backward_weight(&x, &dy, &g, &mut dw);
            check(&dw, &dw_ref, "dw");
            {
                let mut dw = vec![7.0; wt.len()];
                super::super::conv_direct::backward_weight(&x, &dy, &g, &mut dw);
                check(&dw, &dw_ref, "dw (direct)");
            }
            if s == 2 && c % 2 == 0 {
                assert!(
                    super::super::conv_direct::input_grad_s2_applies(&g),
                    "{g:?}"
                );
                let mut dx = vec![7.0; x.len()];
                super::super::conv_direct::backward_input_s2(&dy, &wt, &g, &mut dx);
                check(&dx, &dx_ref, "dx (direct stride 2)");
            }
        }
    }
}
