//! The parameter-free "option A" shortcut of CIFAR ResNets: `x[:, :, ::s, ::s]` placed among
//! zero channels. Planes run in parallel.
//!
//! Legend: input `[N, C, H, W]`, output `[N, OC, OH, OW]` with `OH = ceil(H/s)`,
//! `OW = ceil(W/s)`, input channel `ch` landing on output channel `before + ch`.

use rayon::prelude::*;

/// The sizes of one shortcut.
#[derive(Clone, Copy, Debug)]
pub struct Subsample {
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// The step in both spatial dimensions.
    pub stride: usize,
    /// Zero channels in front of the input's.
    pub before: usize,
    /// Channels of the output.
    pub out_channels: usize,
}

impl Subsample {
    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.h.div_ceil(self.stride), self.w.div_ceil(self.stride))
    }
}

/// Fills `out [N, OC, OH, OW]` (zeroed by the caller) from `x [N, C, H, W]`.
pub fn forward(x: &[f32], s: &Subsample, out: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    let in_plane = s.h * s.w;
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, o)| {
            let (b, oc) = (plane / s.out_channels, plane % s.out_channels);
            if oc < s.before || oc >= s.before + s.c {
                return;
            }
            let xp = &x[(b * s.c + oc - s.before) * in_plane..][..in_plane];
            for (i, row) in o.chunks_exact_mut(ow).enumerate() {
                let xr = &xp[i * s.stride * s.w..][..s.w];
                for (v, &src) in row.iter_mut().zip(xr.iter().step_by(s.stride)) {
                    *v = src;
                }
            }
        });
}

/// The input gradient: `g [N, OC, OH, OW]` scattered back into `dx [N, C, H, W]` (zeroed by
/// the caller); the skipped positions and the zero channels get nothing.
pub fn backward(g: &[f32], s: &Subsample, dx: &mut [f32]) {
    let (oh, ow) = s.out_hw();
    dx.par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(plane, d)| {
            let (b, ch) = (plane / s.c, plane % s.c);
            let gp = &g[(b * s.out_channels + ch + s.before) * oh * ow..][..oh * ow];
            for (i, grow) in gp.chunks_exact(ow).enumerate() {
                let drow = &mut d[i * s.stride * s.w..][..s.w];
                for (v, &src) in drow.iter_mut().step_by(s.stride).zip(grow) {
                    *v = src;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_index_formula_on_odd_sizes_and_strides() {
        for (h, w, stride) in [(5, 7, 2), (4, 9, 3), (6, 6, 1)] {
            let (n, c, before, out_channels) = (2, 3, 2, 8);
            let s = Subsample {
                c,
                h,
                w,
                stride,
                before,
                out_channels,
            };
            let (oh, ow) = s.out_hw();
            let x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32 + 1.0).collect();
            let mut out = vec![0f32; n * out_channels * oh * ow];
            forward(&x, &s, &mut out);
            let mut dx = vec![0f32; x.len()];
            backward(&out, &s, &mut dx);
            for b in 0..n {
                for oc in 0..out_channels {
                    for i in 0..oh {
                        for j in 0..ow {
                            let got = out[((b * out_channels + oc) * oh + i) * ow + j];
                            let want = if (before..before + c).contains(&oc) {
                                x[((b * c + oc - before) * h + i * stride) * w + j * stride]
                            } else {
                                0.0
                            };
                            assert_eq!(got, want, "{h}x{w}/{stride} out {b} {oc} {i} {j}");
                        }
                    }
                }
            }
            // Backward of forward keeps exactly the sampled positions.
            for (k, (&d, &v)) in dx.iter().zip(&x).enumerate() {
                let (i, j) = ((k / w) % h, k % w);
                let kept = i % stride == 0 && j % stride == 0;
                assert_eq!(d, if kept { v } else { 0.0 }, "{h}x{w}/{stride} dx {k}");
            }
        }
    }
}
