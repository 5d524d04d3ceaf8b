//! Optimizer steps on the GPU, in place over one parameter, mirroring
//! `backend::cpu::optim` (`torch.optim.SGD` and `Adam`/`AdamW` single-tensor formulas).

use super::runtime::{launch, with};
use crate::backend::cpu::optim::AdamStep;
use crate::error::Result;
use crate::tensor::Tensor;

/// One SGD step: `p` updated from `g`, `buf` the momentum buffer (`None` without momentum);
/// `first` marks the step that initialises the buffer to the gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_step(
    gpu: usize,
    p: &Tensor,
    g: &Tensor,
    buf: Option<&Tensor>,
    lr: f32,
    momentum: f32,
    dampening: f32,
    nesterov: bool,
    weight_decay: f32,
    first: bool,
) -> Result<()> {
    const OP: &str = "SGD step";
    let n = p.numel();
    let (pp, gp) = (p.cuda_ptr(OP)?, g.cuda_ptr(OP)?);
    let bp = buf.map_or(Ok(0), |b| b.cuda_ptr(OP))?;
    // Without a buffer the kernel's momentum branch is off.
    let momentum = if buf.is_some() { momentum } else { 0.0 };
    with(gpu, |rt| {
        launch!(
            rt,
            "sgd_step",
            rt.elementwise(n),
            pp,
            gp,
            bp,
            n as i64,
            lr,
            momentum,
            dampening,
            weight_decay,
            i32::from(nesterov),
            i32::from(first)
        )
    })
}

/// One Adam/AdamW step over `p` with moments `m`, `v` (and `max_v` with AMSGrad).
pub(crate) fn adam_step(
    gpu: usize,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    max_v: Option<&Tensor>,
    s: &AdamStep,
) -> Result<()> {
    const OP: &str = "Adam step";
    let n = p.numel();
    let (pp, gp) = (p.cuda_ptr(OP)?, g.cuda_ptr(OP)?);
    let (mp, vp) = (m.cuda_ptr(OP)?, v.cuda_ptr(OP)?);
    let xp = max_v.map_or(Ok(0), |t| t.cuda_ptr(OP))?;
    with(gpu, |rt| {
        launch!(
            rt,
            "adam_step",
            rt.elementwise(n),
            pp,
            gp,
            mp,
            vp,
            xp,
            n as i64,
            s.lr,
            s.beta1,
            s.beta2,
            s.eps,
            s.weight_decay,
            i32::from(s.decoupled),
            s.bias_correction1,
            s.bias_correction2_sqrt
        )
    })
}
