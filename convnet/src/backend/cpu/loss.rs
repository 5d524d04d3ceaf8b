//! Softmax, log-softmax and losses, mirroring `torch.softmax`, `log_softmax`,
//! `F.cross_entropy` (class-index targets, label smoothing), `F.nll_loss` and `F.mse_loss`.
//!
//! Legend: softmax runs over the middle axis of a `[O, D, I]` view (O outer, D the softmax
//! dimension, I inner). Losses take logits or log-probabilities `[N, C]` and targets `[N]`.
//! Sums run in `f64` so that the mean over a batch keeps full `f32` precision.

/// `y = softmax(x)` (or `log_softmax` when `log`) over the middle axis of `[outer, d, inner]`.
pub fn softmax_forward(x: &[f32], outer: usize, d: usize, inner: usize, log: bool, y: &mut [f32]) {
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * d + k) * inner + i;
            let max = (0..d).map(|k| x[at(k)]).fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = (0..d).map(|k| ((x[at(k)] - max) as f64).exp()).sum();
            if log {
                let lse = sum.ln() as f32;
                for k in 0..d {
                    y[at(k)] = x[at(k)] - max - lse;
                }
            } else {
                for k in 0..d {
                    y[at(k)] = (((x[at(k)] - max) as f64).exp() / sum) as f32;
                }
            }
        }
    }
}

/// Gradient of softmax (`log == false`, `y` = softmax output) or log-softmax (`y` = its
/// output): `dx = y * (dy - sum(dy*y))` or `dx = dy - exp(y) * sum(dy)`.
pub fn softmax_backward(
    y: &[f32],
    dy: &[f32],
    outer: usize,
    d: usize,
    inner: usize,
    log: bool,
    dx: &mut [f32],
) {
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * d + k) * inner + i;
            if log {
                let s: f64 = (0..d).map(|k| dy[at(k)] as f64).sum();
                for k in 0..d {
                    dx[at(k)] = dy[at(k)] - (y[at(k)].exp() as f64 * s) as f32;
                }
            } else {
                let s: f64 = (0..d).map(|k| dy[at(k)] as f64 * y[at(k)] as f64).sum();
                for k in 0..d {
                    dx[at(k)] = (y[at(k)] as f64 * (dy[at(k)] as f64 - s)) as f32;
                }
            }
        }
    }
}

/// Fused log-softmax + negative log-likelihood with label smoothing `eps`.
///
/// Per row: `loss = (1-eps) * -logp[y] + eps/C * sum_c -logp[c]`. Returns the sum over rows
/// and writes the row softmax probabilities into `probs` for the backward pass.
pub fn cross_entropy_forward(
    logits: &[f32],
    targets: &[usize],
    c: usize,
    eps: f32,
    probs: &mut [f32],
) -> f64 {
    let mut total = 0f64;
    for (row, (&t, p)) in logits
        .chunks(c)
        .zip(targets.iter().zip(probs.chunks_mut(c)))
    {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let lse = max as f64 + sum.ln();
        let nll = lse - row[t] as f64;
        let loss = if eps > 0.0 {
            let mean_nll = lse - row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            (1.0 - eps as f64) * nll + eps as f64 * mean_nll
        } else {
            nll
        };
        total += loss;
        for (pi, &v) in p.iter_mut().zip(row) {
            *pi = ((v as f64 - lse).exp()) as f32;
        }
    }
    total
}

/// `dlogits = scale * (probs - ((1-eps)*onehot(y) + eps/C))`, `scale` = upstream / divisor.
pub fn cross_entropy_backward(
    probs: &[f32],
    targets: &[usize],
    c: usize,
    eps: f32,
    scale: &[f32],
    dx: &mut [f32],
) {
    let smooth = eps / c as f32;
    for (n, (d, p)) in dx.chunks_mut(c).zip(probs.chunks(c)).enumerate() {
        let s = scale[if scale.len() == 1 { 0 } else { n }];
        for (k, (di, &pi)) in d.iter_mut().zip(p).enumerate() {
            let target = if k == targets[n] { 1.0 - eps } else { 0.0 } + smooth;
            *di = s * (pi - target);
        }
    }
}
