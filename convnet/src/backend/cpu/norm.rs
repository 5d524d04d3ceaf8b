//! 2-D batch normalisation, mirroring `torch.nn.functional.batch_norm` on `[N, C, H, W]`.
//!
//! Legend: per channel c, M = N*H*W values. Training uses the batch mean and the biased
//! variance to normalise (`xhat = (x - mean) * invstd`, `invstd = 1/sqrt(var + eps)`); eval
//! uses the running statistics. Statistics are accumulated in `f64`. Channels run in
//! parallel.

use super::activation::Activation;
use super::recycle;
use super::simd::vectorized_fn;
use rayon::prelude::*;

/// The per-channel affine form of normalisation, `y = x * scale + shift`.
#[inline(always)]
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

/// Dispatches `$call` with the function that turns the upstream gradient `g` at input `x`
/// into the one batch norm sees: `g` itself, or, with a fused ReLU (`Some((scale, shift))`),
/// `g` where the normalised output `x * scale + shift` (recomputed with the forward pass's
/// exact operations) was positive and 0 elsewhere. The choice is made once, outside the
/// loops, and each arm is compiled with its own function inlined.
macro_rules! with_relu_mask {
    ($relu:expr, $call:ident($($arg:expr),*)) => {
        match $relu {
            None => $call($($arg,)* |g: f32, _x: f32| g),
            Some((scale, shift)) => {
                $call($($arg,)* move |g: f32, x: f32| keep_if(x * scale + shift > 0.0, g))
            }
        }
    };
}

/// `g` when `keep`, else `+0.0`, without a branch (a bit mask), so that loops vectorise.
#[inline(always)]
fn keep_if(keep: bool, g: f32) -> f32 {
    f32::from_bits(g.to_bits() & (keep as u32).wrapping_neg())
}

#[inline(always)]
fn lane_sums2_by(gs: &[f32], xs: &[f32], m: f32, through: impl Fn(f32, f32) -> f32) -> (f64, f64) {
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    let (gc, xc) = (gs.chunks_exact(16), xs.chunks_exact(16));
    let (gt, xt) = (gc.remainder(), xc.remainder());
    for (g, x) in gc.zip(xc) {
        for i in 0..16 {
            let g = through(g[i], x[i]);
            a[i] += g;
            b[i] += g * (x[i] - m);
        }
    }
    let mut sa: f64 = a.iter().map(|&v| v as f64).sum();
    let mut sb: f64 = b.iter().map(|&v| v as f64).sum();
    tail_sums(gt, xt, m, &mut sa, &mut sb, through);
    (sa, sb)
}

/// `(sum(g'), sum(g' * (x - m)))` in one pass over 16 float32 lanes, combined in float64,
/// where `g'` is `g` through the fused ReLU if any.
fn lane_sums2(gs: &[f32], xs: &[f32], m: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx512() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { lane_sums2_avx512(gs, xs, m, relu) };
    }
    with_relu_mask!(relu, lane_sums2_by(gs, xs, m))
}

/// [`lane_sums2`] with one 512-bit register per accumulator array: the same operations on
/// the same lanes in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn lane_sums2_avx512(
    gs: &[f32],
    xs: &[f32],
    m: f32,
    relu: Option<(f32, f32)>,
) -> (f64, f64) {
    use std::arch::x86_64::*;
    let len = gs.len().min(xs.len());
    let body = len / 16 * 16;
    let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mv = _mm512_set1_ps(m);
    let (gp, xp) = (gs.as_ptr(), xs.as_ptr());
    match relu {
        None => {
            for i in (0..body).step_by(16) {
                // SAFETY: i + 16 <= len.
                let (g, x) = (_mm512_loadu_ps(gp.add(i)), _mm512_loadu_ps(xp.add(i)));
                a = _mm512_add_ps(a, g);
                b = _mm512_add_ps(b, _mm512_mul_ps(g, _mm512_sub_ps(x, mv)));
            }
        }
        Some((scale, shift)) => {
            let (sc, sh) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
            for i in (0..body).step_by(16) {
                // SAFETY: i + 16 <= len.
                let (g, x) = (_mm512_loadu_ps(gp.add(i)), _mm512_loadu_ps(xp.add(i)));
                let t = _mm512_add_ps(_mm512_mul_ps(x, sc), sh);
                let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, _mm512_setzero_ps());
                let g = _mm512_maskz_mov_ps(keep, g);
                a = _mm512_add_ps(a, g);
                b = _mm512_add_ps(b, _mm512_mul_ps(g, _mm512_sub_ps(x, mv)));
            }
        }
    }
    let (mut la, mut lb) = ([0f32; 16], [0f32; 16]);
    _mm512_storeu_ps(la.as_mut_ptr(), a);
    _mm512_storeu_ps(lb.as_mut_ptr(), b);
    let mut sa: f64 = la.iter().map(|&v| v as f64).sum();
    let mut sb: f64 = lb.iter().map(|&v| v as f64).sum();
    with_relu_mask!(
        relu,
        tail_sums(&gs[body..len], &xs[body..len], m, &mut sa, &mut sb)
    );
    (sa, sb)
}

/// Adds the elements past the last full 16-lane chunk to the sums, one at a time.
#[inline(always)]
fn tail_sums(
    gs: &[f32],
    xs: &[f32],
    m: f32,
    sa: &mut f64,
    sb: &mut f64,
    through: impl Fn(f32, f32) -> f32,
) {
    for (&g, &x) in gs.iter().zip(xs) {
        let g = through(g, x);
        *sa += g as f64;
        *sb += (g * (x - m)) as f64;
    }
}

vectorized_fn! {
/// `sum(x)` in float64 over 16 independent lanes, so the
/// additions vectorise instead of waiting on one another.
fn lane_sum(xs: &[f32]) -> f64 {
    let mut acc = [0f64; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i] as f64;
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>()
}
}

vectorized_fn! {
/// `sum((x - mean)^2)` in float64 over 16 independent lanes.
fn lane_sum_sq_dev(xs: &[f32], mean: f64) -> f64 {
    let mut acc = [0f64; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            let d = c[i] as f64 - mean;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>()
}
}

/// Per-channel batch statistics: `(mean, biased variance)` over N, H and W, accumulated in
/// float64 (two passes: the mean, then squared deviations from it).
pub fn batch_stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |b: usize| &x[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let m = (n * hw) as f64;
            let mean = (0..n).map(|b| lane_sum(plane(b))).sum::<f64>() / m;
            let ss: f64 = (0..n).map(|b| lane_sum_sq_dev(plane(b), mean)).sum();
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
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let (scale, shift) = affine(plane % c, mean, invstd, weight, bias);
            match epilogue {
                Epilogue::None => normalize_plane(xp, scale, shift, yp),
                Epilogue::Relu => normalize_relu_plane(xp, scale, shift, yp),
                Epilogue::AddRelu(residual) => {
                    let rp = &residual[plane * hw..(plane + 1) * hw];
                    normalize_add_relu_plane(xp, rp, scale, shift, yp)
                }
            }
        });
}

/// `relu(t)`, NaN passing through as in `torch.relu`.
#[inline(always)]
fn relu(t: f32) -> f32 {
    Activation::Relu.apply(t)
}

vectorized_fn! {
fn normalize_plane(xp: &[f32], scale: f32, shift: f32, yp: &mut [f32]) {
    for (o, &v) in yp.iter_mut().zip(xp) {
        *o = v * scale + shift;
    }
}
}

vectorized_fn! {
fn normalize_relu_plane(xp: &[f32], scale: f32, shift: f32, yp: &mut [f32]) {
    for (o, &v) in yp.iter_mut().zip(xp) {
        *o = relu(v * scale + shift);
    }
}
}

vectorized_fn! {
fn normalize_add_relu_plane(xp: &[f32], rp: &[f32], scale: f32, shift: f32, yp: &mut [f32]) {
    for ((o, &v), &r) in yp.iter_mut().zip(xp).zip(rp) {
        *o = relu((v * scale + shift) + r);
    }
}
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

/// Batch statistics taken over several processes (synchronised batch norm): the number of
/// values per channel in the whole batch, and how to sum the per-channel gradient sums of
/// all processes.
pub struct SyncedSums<'a> {
    /// Values per channel over all processes' batches (`M` of the legend).
    pub count: f64,
    /// Whether this process's values are part of that batch; when not (stand-ins that only
    /// let it take part in the collectives), its input gradient is zero.
    pub contributes: bool,
    /// Replaces `[sum(dy) for each channel..., sum(dy * xhat) for each channel...]` by its
    /// sum over the processes.
    pub reduce: &'a dyn Fn(&mut [f64]) -> crate::error::Result<()>,
}

/// Gradients of batch norm: `dx` is computed only when `need_dx`. In training mode the batch
/// statistics depend on `x`, adding the two mean terms. A fused ReLU first masks `dy` where
/// the forward output was not positive, recomputed from `x` (and the residual) with the
/// forward pass's exact operations.
///
/// With `synced` (statistics over several processes' batches), the input gradient uses the
/// sums of all processes and their total count; the weight and bias gradients stay this
/// process's own (data-parallel training sums them with the other gradients).
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
    synced: Option<SyncedSums<'_>>,
) -> crate::error::Result<Grads> {
    let relu_mask = |ch: usize| {
        matches!(epilogue, Epilogue::Relu).then(|| affine(ch, mean, invstd, weight, bias))
    };
    // With a residual, the masked gradient is needed twice (it is the residual's gradient),
    // so it is written out as the sums are taken.
    let mut dres = match epilogue {
        Epilogue::AddRelu(_) => recycle::take_overwritten(dy.len()),
        _ => Vec::new(),
    };
    let mut dx = if need_dx {
        recycle::take_overwritten(x.len())
    } else {
        Vec::new()
    };
    let (dres_planes, dx_planes) = (
        PlaneWriter::new(&mut dres, hw),
        PlaneWriter::new(&mut dx, hw),
    );
    let range = |plane: usize| plane * hw..(plane + 1) * hw;
    // Pass 1, for plane `b*c + ch`: sum(dy') and sum(dy' * (x - mean)), dy' being dy
    // through the epilogue.
    let pass1 = |plane: usize| -> (f64, f64) {
        let ch = plane % c;
        let r = range(plane);
        match epilogue {
            Epilogue::AddRelu(residual) => {
                let (scale, shift) = affine(ch, mean, invstd, weight, bias);
                let (g, xs, res) = (&dy[r.clone()], &x[r.clone()], &residual[r]);
                // SAFETY: plane `plane` belongs to this task alone.
                let out = unsafe { dres_planes.plane(plane) };
                mask_add_relu(g, xs, res, scale, shift, out);
                lane_sums2(out, xs, mean[ch], None)
            }
            _ => lane_sums2(&dy[r.clone()], &x[r], mean[ch], relu_mask(ch)),
        }
    };
    // Pass 2, for plane `b*c + ch`: the input gradient from the channel's sums over `count`
    // values, from the masked gradient when it was written.
    let pass2 = |plane: usize, sums: (f64, f64), count: f64| {
        let ch = plane % c;
        let r = range(plane);
        let relu = relu_mask(ch);
        let (m, is) = (mean[ch] as f64, invstd[ch] as f64);
        let w = weight.map_or(1.0, |w| w[ch] as f64);
        // dx = k * (count*g - sdy - xhat*sdyx) with xhat = (x - m)*is, folded into
        // dx = a*g + b*x + c0 (three float32 operations per element); eval: g * a.
        let k = w * is / count;
        let (a, b) = ((k * count) as f32, (-k * sums.1 * is) as f32);
        let c0 = (-k * sums.0 + k * sums.1 * is * m) as f32;
        let (g_in, relu) = match epilogue {
            // SAFETY: as above; pass 1 finished writing this plane.
            Epilogue::AddRelu(_) => (unsafe { &*dres_planes.plane(plane) }, None),
            _ => (&dy[r.clone()], relu),
        };
        // SAFETY: plane `plane` belongs to this task alone.
        let out = unsafe { dx_planes.plane(plane) };
        if training {
            dx_train_plane(g_in, &x[r], a, b, c0, relu, out);
        } else {
            dx_eval_plane(g_in, &x[r], (w * is) as f32, relu, out);
        }
    };
    // Both passes go image by image, through memory in order (a channel's planes are one
    // image apart, and walking them one channel at a time left the prefetchers behind);
    // each channel's sums add its planes' sums in image order, as a channel-by-channel walk
    // would, so the results do not depend on the threads.
    let images = |task: &(dyn Fn(usize) + Sync)| {
        (0..n)
            .into_par_iter()
            .for_each(|b| (0..c).for_each(|ch| task(b * c + ch)));
    };
    let mut per_plane = vec![(0f64, 0f64); n * c];
    per_plane
        .par_chunks_mut(c)
        .enumerate()
        .for_each(|(b, sums)| {
            for (ch, s) in sums.iter_mut().enumerate() {
                *s = pass1(b * c + ch);
            }
        });
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
    match synced {
        None => {
            if need_dx {
                images(&|plane| pass2(plane, sums[plane % c], (n * hw) as f64));
            }
        }
        // The input gradient needs every process's sums.
        Some(synced) => {
            if need_dx {
                let mut all: Vec<f64> = sums.iter().map(|s| s.0).collect();
                all.extend(sums.iter().map(|s| s.1));
                (synced.reduce)(&mut all)?;
                if synced.contributes {
                    images(&|plane| {
                        let ch = plane % c;
                        pass2(plane, (all[ch], all[c + ch]), synced.count)
                    });
                } else {
                    dx.fill(0.0);
                }
            }
        }
    }
    Ok(Grads {
        dx: need_dx.then_some(dx),
        dweight: sums.iter().map(|s| s.1 as f32).collect(),
        dbias: sums.iter().map(|s| s.0 as f32).collect(),
        dresidual: (!dres.is_empty()).then_some(dres),
    })
}

/// A buffer of `hw`-float planes that parallel tasks write, each plane by exactly one task
/// (here: the planes of one image), which slices cannot express without copying.
struct PlaneWriter<'a> {
    ptr: *mut f32,
    len: usize,
    hw: usize,
    _buffer: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the writer only hands out planes through `plane`, whose callers guarantee that no
// two tasks touch the same plane.
unsafe impl Sync for PlaneWriter<'_> {}

impl<'a> PlaneWriter<'a> {
    fn new(buffer: &'a mut [f32], hw: usize) -> Self {
        PlaneWriter {
            ptr: buffer.as_mut_ptr(),
            len: buffer.len(),
            hw,
            _buffer: std::marker::PhantomData,
        }
    }

    /// Plane `p` of the buffer.
    ///
    /// # Safety
    /// No other reference to plane `p` may be alive while the returned one is.
    #[allow(clippy::mut_from_ref)]
    unsafe fn plane(&self, p: usize) -> &mut [f32] {
        assert!((p + 1) * self.hw <= self.len, "plane {p} out of range");
        // SAFETY: in bounds (asserted); exclusive by the caller's guarantee.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(p * self.hw), self.hw) }
    }
}

vectorized_fn! {
/// `out = g` where `relu(x * scale + shift + res)` was positive, else 0.
fn mask_add_relu(g: &[f32], xs: &[f32], res: &[f32], scale: f32, shift: f32, out: &mut [f32]) {
    for (((o, &g), &v), &r) in out.iter_mut().zip(g).zip(xs).zip(res) {
        let s = (v * scale + shift) + r;
        *o = keep_if(s > 0.0, g);
    }
}
}

#[inline(always)]
fn dx_train_by(
    g: &[f32],
    xs: &[f32],
    abc: (f32, f32, f32),
    out: &mut [f32],
    through: impl Fn(f32, f32) -> f32,
) {
    let (a, b, c0) = abc;
    for ((o, &g), &v) in out.iter_mut().zip(g).zip(xs) {
        *o = a * through(g, v) + b * v + c0;
    }
}

vectorized_fn! {
/// Training-mode input gradient of one plane: `a * g' + b * x + c0`.
fn dx_train_plane(g: &[f32], xs: &[f32], a: f32, b: f32, c0: f32, relu: Option<(f32, f32)>, out: &mut [f32]) {
    with_relu_mask!(relu, dx_train_by(g, xs, (a, b, c0), out))
}
}

#[inline(always)]
fn dx_eval_by(g: &[f32], xs: &[f32], a: f32, out: &mut [f32], through: impl Fn(f32, f32) -> f32) {
    for ((o, &g), &v) in out.iter_mut().zip(g).zip(xs) {
        *o = through(g, v) * a;
    }
}

vectorized_fn! {
/// Eval-mode input gradient of one plane: `g' * a`.
fn dx_eval_plane(g: &[f32], xs: &[f32], a: f32, relu: Option<(f32, f32)>, out: &mut [f32]) {
    with_relu_mask!(relu, dx_eval_by(g, xs, a, out))
}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 sums (taken on CPUs that have it) equal the plain loop bit for bit,
    /// with and without the ReLU mask, and with a tail shorter than a register.
    #[test]
    fn lane_sums_match_the_plain_loop() {
        let mut rng = crate::Rng::new(11);
        for len in [0, 5, 16, 37, 1024] {
            let g: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
            let x: Vec<f32> = (0..len).map(|_| rng.normal()).collect();
            for relu in [None, Some((0.9f32, -0.2f32))] {
                let plain = with_relu_mask!(relu, lane_sums2_by(&g, &x, 0.3));
                let got = lane_sums2(&g, &x, 0.3, relu);
                assert_eq!(got.0.to_bits(), plain.0.to_bits(), "len {len} {relu:?}");
                assert_eq!(got.1.to_bits(), plain.1.to_bits(), "len {len} {relu:?}");
            }
        }
    }
}
