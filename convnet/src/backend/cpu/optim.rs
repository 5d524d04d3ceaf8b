//! Fused, in-place optimizer updates over one parameter's slice, mirroring the single-tensor
//! `torch.optim.SGD` and `Adam`/`AdamW` formulas (one pass over memory per parameter).

/// SGD with momentum, dampening, Nesterov and L2 weight decay. `buf` is `None` when momentum
/// is 0; `first` marks the step that initialises the buffer to the gradient.
#[allow(clippy::too_many_arguments)]
pub fn sgd_step(
    p: &mut [f32],
    g: &[f32],
    buf: Option<&mut [f32]>,
    lr: f32,
    momentum: f32,
    dampening: f32,
    nesterov: bool,
    weight_decay: f32,
    first: bool,
) {
    match buf {
        None => {
            for (pi, &gi) in p.iter_mut().zip(g) {
                let d = gi + weight_decay * *pi;
                *pi -= lr * d;
            }
        }
        Some(buf) => {
            for ((pi, &gi), bi) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
                let d = if weight_decay != 0.0 {
                    gi + weight_decay * *pi
                } else {
                    gi
                };
                *bi = if first {
                    d
                } else {
                    momentum * *bi + (1.0 - dampening) * d
                };
                let step = if nesterov { d + momentum * *bi } else { *bi };
                *pi -= lr * step;
            }
        }
    }
}

/// Hyperparameters of one Adam/AdamW step, with the bias corrections for step `t` folded in.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator term.
    pub eps: f32,
    /// Weight decay (L2 for Adam, decoupled for AdamW).
    pub weight_decay: f32,
    /// True for AdamW's decoupled decay.
    pub decoupled: bool,
    /// `1 - beta1^t`.
    pub bias_correction1: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
}

/// One Adam/AdamW update; `max_v` is `Some` with AMSGrad.
pub fn adam_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    mut max_v: Option<&mut [f32]>,
    s: &AdamStep,
) {
    let step_size = s.lr / s.bias_correction1;
    for i in 0..p.len() {
        let mut gi = g[i];
        if s.weight_decay != 0.0 {
            if s.decoupled {
                p[i] *= 1.0 - s.lr * s.weight_decay;
            } else {
                gi += s.weight_decay * p[i];
            }
        }
        // torch: exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
        m[i] += (1.0 - s.beta1) * (gi - m[i]);
        v[i] = v[i] * s.beta2 + (1.0 - s.beta2) * gi * gi;
        let second = match max_v.as_deref_mut() {
            Some(mv) => {
                mv[i] = mv[i].max(v[i]);
                mv[i]
            }
            None => v[i],
        };
        let denom = second.sqrt() / s.bias_correction2_sqrt + s.eps;
        p[i] -= step_size * m[i] / denom;
    }
}
