//! The weight gradient of a 3x3, padding-1 convolution (stride 1 or 2) with AVX512-BF16
//! (`vdpbf16ps`), without im2col: `dW[k, c, kh, kw] = sum over n and outputs (r, col) of
//! dy[n, k, r, col] * x[n, c, s*r + kh - 1, s*col + kw - 1]`, the operands rounded to bf16,
//! the products summed in float32 and the threads' sums in float64. Mirrors the weight
//! gradient of `torch.nn.functional.conv2d(x, w, stride=s, padding=1)` under CPU autocast to
//! bf16.
//!
//! `vdpbf16ps` adds two bf16 products to each float32 lane, so a pair must run along the
//! sum. Here it runs along the batch: images `2m` and `2m + 1` are rounded into one plane of
//! 32-bit words, each holding the same pixel of both, and the float32 direct kernels of
//! [`super::super::conv_direct`] (which only move 32-bit words) run on those planes with
//! `vdpbf16ps` in place of their multiply-adds: every instruction then sums 32 products,
//! twice the float32 kernel's 16, with the same loads. An odd batch pairs its last image
//! with zeros.

use super::super::conv::ConvGeom;
use super::super::conv_direct;
use super::pack_pairs;
use rayon::prelude::*;

/// Lanes of a lane sum.
const LANES: usize = 16;

/// True when [`backward_weight`] computes the weight gradient of `g` on this CPU.
pub fn applies(g: &ConvGeom) -> bool {
    conv_direct::weight_grad_applies(g)
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// The weight gradient `dw [K, C, 3, 3]` of `x [N, C, H, W]` and `dy [N, K, OH, OW]`
/// (overwritten) for geometries where [`applies`] holds.
pub fn backward_weight(x: &[f32], dy: &[f32], g: &ConvGeom, dw: &mut [f32]) {
    assert!(
        applies(g),
        "bf16 weight_grad::backward_weight called for {g:?}"
    );
    let (in_image, out_image) = (g.c * g.h * g.w, g.k * g.oh * g.ow);
    assert!(x.len() == g.n * in_image && dy.len() == g.n * out_image);
    assert!(dw.len() == g.k * g.c * 9);
    // Stride 2 reads zero-bordered copies of the inputs.
    let padded = if g.stride == (1, 1) {
        0
    } else {
        g.c * (g.h + 2) * (g.w + 2)
    };
    let pairs = g.n.div_ceil(2);
    // Image pairs per call of the kernel: as many as keep their words within about 256 KiB
    // (L2), so each (channel pair, input channel) pass reads from cache.
    let group = (256 * 1024 / (4 * (in_image + padded + out_image))).clamp(1, pairs.max(1));
    let chunk = pairs.div_ceil(rayon::current_num_threads()).max(1);
    let partials: Vec<Vec<f32>> = (0..pairs.div_ceil(chunk))
        .into_par_iter()
        .map(|part| {
            let mine = part * chunk..((part + 1) * chunk).min(pairs);
            let mut lanes = vec![0f32; g.k * g.c * 9 * LANES];
            let mut xs = vec![0u32; group * in_image];
            let mut dys = vec![0u32; group * out_image];
            let mut xp = vec![0f32; group * padded];
            for first in mine.clone().step_by(group) {
                let count = group.min(mine.end - first);
                // Pair `m`'s words: images `2m` and `2m + 1` (zeros past the batch).
                for (src, image, out) in [(x, in_image, &mut xs), (dy, out_image, &mut dys)] {
                    for (j, words) in out[..count * image].chunks_exact_mut(image).enumerate() {
                        let lo = 2 * (first + j) * image;
                        let hi =
                            (2 * (first + j) + 1 < g.n).then(|| &src[lo + image..lo + 2 * image]);
                        pack_pairs(&src[lo..lo + image], hi, words);
                    }
                }
                // SAFETY: `applies` checked AVX-512F/DQ and AVX512-BF16; the sizes are
                // asserted inside.
                unsafe {
                    conv_direct::weight_grad_bf16_image_pairs(
                        &xs[..count * in_image],
                        &dys[..count * out_image],
                        count,
                        g,
                        &mut xp,
                        &mut lanes,
                    )
                };
            }
            lanes
        })
        .collect();
    conv_direct::sum_lanes(&partials, dw);
}
