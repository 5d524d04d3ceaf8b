//! 2-D batch normalisation, mirroring `torch.nn.functional.batch_norm` on `[N, C, H, W]`.
//!
//! Legend: per channel c, M = N*H*W values. Training uses the batch mean and the biased
//! variance to normalise (`xhat = (x - mean) * invstd`, `invstd = 1/sqrt(var + eps)`); eval
//! uses the running statistics. Statistics are accumulated in `f64`. Channels run in
//! parallel.

use rayon::prelude::*;

/// The per-channel affine form of normalisation, `y = x * scale + shift`.
#[inline]
fn affine(
    ch: usize,
    mean: &[f32],
    invstd: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
) -> (f32, f32) {
    let scale = invstd[ch] * w.map_or(1.0, |w| w[ch]);
    (scale, b.map_or(0.0, |b| b[ch]) - mean[ch] * scale)
}

/// The upstream gradient `g` seen through a fused ReLU: kept where the normalised output
/// `x * scale + shift` (recomputed with the forward pass's exact operations) was positive.
#[inline]
fn through_relu(g: f32, x: f32, relu: Option<(f32, f32)>) -> f32 {
    match relu {
        Some((scale, shift)) if x * scale + shift <= 0.0 || (x * scale + shift).is_nan() => 0.0,
        _ => g,
    }
}

/// `(sum(g'), sum(g' * (x - m)))` in one pass over 16 float32 lanes, combined in float64,
/// where `g'` is `g` through the fused ReLU if any.
#[inline]
fn lane_sums2(gs: &[f32], xs: &[f32], m: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    let (gc, xc) = (gs.chunks_exact(16), xs.chunks_exact(16));
    let (gt, xt) = (gc.remainder(), xc.remainder());
    for (g, x) in gc.zip(xc) {
        for i in 0..16 {
            let g = through_relu(g[i], x[i], relu);
            a[i] += g;
            b[i] += g * (x[i] - m);
        }
    }
    let mut sa: f64 = a.iter().map(|&v| v as f64).sum();
    let mut sb: f64 = b.iter().map(|&v| v as f64).sum();
    for (&g, &x) in gt.iter().zip(xt) {
        let g = through_relu(g, x, relu);
        sa += g as f64;
        sb += (g * (x - m)) as f64;
    }
    (sa, sb)
}

/// `sum(f(x))` in float64 over 16 independent lanes, so the additions vectorise instead of
/// waiting on one another.
#[inline]
fn lane_sum_f64(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += f(c[i] as f64);
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| f(v as f64)).sum::<f64>()
}

/// Per-channel batch statistics: `(mean, biased variance)` over N, H and W, accumulated in
/// float64 (two passes: the mean, then squared deviations from it).
pub fn batch_stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |b: usize| &x[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let m = (n * hw) as f64;
            let mean = (0..n).map(|b| lane_sum_f64(plane(b), |v| v)).sum::<f64>() / m;
            let ss: f64 = (0..n)
                .map(|b| lane_sum_f64(plane(b), |v| (v - mean) * (v - mean)))
                .sum();
            (mean, ss / m)
        })
        .unzip()
}

/// What the normalisation's pass also applies to its output, so that the common sequences
/// after batch norm cost no extra pass over the activation.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// Plain batch norm.
    None,
    /// `relu(y)`.
    Relu,
    /// `relu(y + residual)`, `residual` laid out like the input: the end of a residual block.
    AddRelu(&'a [f32]),
}

/// `y = (x - mean) * invstd * weight + bias`, per channel, followed by the epilogue (one pass
/// instead of up to three).
#[allow(clippy::too_many_arguments)]
pub fn normalize(
    x: &[f32],
    mean: &[f32],
    invstd: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    c: usize,
    hw: usize,
    epilogue: Epilogue<'_>,
    y: &mut [f32],
) {
    let relu = |t: f32| if t > 0.0 || t.is_nan() { t } else { 0.0 };
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let (scale, shift) = affine(plane % c, mean, invstd, weight, bias);
            match epilogue {
                Epilogue::None => {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        *o = v * scale + shift;
                    }
                }
                Epilogue::Relu => {
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        *o = relu(v * scale + shift);
                    }
                }
                Epilogue::AddRelu(residual) => {
                    let rp = &residual[plane * hw..(plane + 1) * hw];
                    for ((o, &v), &r) in yp.iter_mut().zip(xp).zip(rp) {
                        *o = relu((v * scale + shift) + r);
                    }
                }
            }
        });
}

/// The gradients of batch norm with its epilogue.
pub struct Grads {
    /// Of the input, when asked for.
    pub dx: Option<Vec<f32>>,
    /// Of the scale.
    pub dweight: Vec<f32>,
    /// Of the shift.
    pub dbias: Vec<f32>,
    /// Of the residual of [`Epilogue::AddRelu`]: the upstream gradient through the ReLU.
    pub dresidual: Option<Vec<f32>>,
}

/// Gradients of batch norm: `dx` is computed only when `need_dx`. In training mode the batch
/// statistics depend on `x`, adding the two mean terms. A fused ReLU first masks `dy` where
/// the forward output was not positive, recomputed from `x` (and the residual) with the
/// forward pass's exact operations.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    mean: &[f32],
    invstd: &[f32],
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    n: usize,
    c: usize,
    hw: usize,
    training: bool,
    epilogue: Epilogue<'_>,
    need_dx: bool,
) -> Grads {
    let relu_mask = |ch: usize| {
        matches!(epilogue, Epilogue::Relu).then(|| affine(ch, mean, invstd, weight, bias))
    };
    // With a residual, the masked gradient is needed twice (it is the residual's gradient),
    // so it is written out as the sums are taken.
    let mut dres = match epilogue {
        Epilogue::AddRelu(_) => vec![0f32; dy.len()],
        _ => Vec::new(),
    };
    // Per plane: sum(dy') and sum(dy' * (x - mean)), dy' being dy through the epilogue.
    let plane_sums = |plane: usize, dres_plane: &mut [f32]| -> (f64, f64) {
        let ch = plane % c;
        let r = plane * hw..(plane + 1) * hw;
        match epilogue {
            Epilogue::AddRelu(residual) => {
                let (scale, shift) = affine(ch, mean, invstd, weight, bias);
                for (((o, &g), &v), &res) in dres_plane
                    .iter_mut()
                    .zip(&dy[r.clone()])
                    .zip(&x[r.clone()])
                    .zip(&residual[r.clone()])
                {
                    let s = (v * scale + shift) + res;
                    *o = if s <= 0.0 || s.is_nan() { 0.0 } else { g };
                }
                lane_sums2(dres_plane, &x[r], mean[ch], None)
            }
            _ => lane_sums2(&dy[r.clone()], &x[r], mean[ch], relu_mask(ch)),
        }
    };
    let per_plane: Vec<(f64, f64)> = if dres.is_empty() {
        (0..n * c)
            .into_par_iter()
            .map(|plane| plane_sums(plane, &mut []))
            .collect()
    } else {
        dres.par_chunks_mut(hw)
            .enumerate()
            .map(|(plane, d)| plane_sums(plane, d))
            .collect()
    };
    let sums: Vec<(f64, f64)> = (0..c)
        .map(|ch| {
            let (mut sdy, mut sdyx) = (0f64, 0f64);
            for b in 0..n {
                let (a, s) = per_plane[b * c + ch];
                sdy += a;
                sdyx += s;
            }
            (sdy, sdyx * invstd[ch] as f64)
        })
        .collect();
    let dbias: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dweight: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    // The gradient the dx pass starts from: the masked one when it was written out.
    let masked = !dres.is_empty();
    let g_in: &[f32] = if masked { &dres } else { dy };
    let dx = need_dx.then(|| {
        let mut dx = vec![0f32; x.len()];
        let count = (n * hw) as f64;
        dx.par_chunks_mut(hw).enumerate().for_each(|(plane, dxp)| {
            let ch = plane % c;
            let (m, is) = (mean[ch] as f64, invstd[ch] as f64);
            let w = weight.map_or(1.0, |w| w[ch] as f64);
            let r = plane * hw..(plane + 1) * hw;
            let relu = if masked { None } else { relu_mask(ch) };
            if training {
                // dx = k * (count*g - sdy - xhat*sdyx) with xhat = (x - m)*is, folded into
                // dx = a*g + b*x + c0 so the loop is three float32 operations per element.
                let (sdy, sdyx) = sums[ch];
                let k = w * is / count;
                let (a, b) = ((k * count) as f32, (-k * sdyx * is) as f32);
                let c0 = (-k * sdy + k * sdyx * is * m) as f32;
                for ((o, &g), &v) in dxp.iter_mut().zip(&g_in[r.clone()]).zip(&x[r]) {
                    *o = a * through_relu(g, v, relu) + b * v + c0;
                }
            } else {
                let a = (w * is) as f32;
                for ((o, &g), &v) in dxp.iter_mut().zip(&g_in[r.clone()]).zip(&x[r]) {
                    *o = through_relu(g, v, relu) * a;
                }
            }
        });
        dx
    });
    Grads {
        dx,
        dweight,
        dbias,
        dresidual: (!dres.is_empty()).then_some(dres),
    }
}
