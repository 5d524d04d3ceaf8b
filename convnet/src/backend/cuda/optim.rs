//! Optimizer steps on the GPU, in place over one parameter, mirroring
//! `backend::cpu::optim` (`torch.optim.SGD` and `Adam`/`AdamW` single-tensor formulas).

use super::runtime::{launch, with};
use crate::backend::cpu::optim::AdamStep;
use crate::error::Result;
use crate::tensor::Tensor;

/// One SGD step over many parameters of one GPU in a single launch (a training step of a
/// ResNet updates dozens of tensors: one launch instead of one each). Each entry is
/// `(p, g, buf)`; `buf` is `None` without momentum; `first` marks the step that initialises the buffers to the gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgd_step_multi(
    gpu: usize,
    entries: &[(&Tensor, &Tensor, Option<&Tensor>)],
    lr: f32,
    momentum: f32,
    dampening: f32,
    nesterov: bool,
    weight_decay: f32,
    first: bool,
) -> Result<()> {
    const OP: &str = "SGD step";
    let mut table: Vec<i64> = Vec::with_capacity(4 * entries.len());
    let mut total = 0usize;
    for (p, g, buf) in entries {
        if p.numel() == 0 {
            continue;
        }
        table.push(p.cuda_ptr(OP)? as i64);
        table.push(g.cuda_ptr(OP)? as i64);
        table.push(buf.map_or(Ok(0), |b| b.cuda_ptr(OP))? as i64);
        table.push(total as i64);
        total += p.numel();
    }
    if total == 0 {
        return Ok(());
    }
    let tensors = (table.len() / 4) as i32;
    let momentum = if entries.iter().all(|e| e.2.is_some()) {
        momentum
    } else {
        0.0
    };
    with(gpu, |rt| {
        let table = rt.upload_i64(&table)?;
        launch!(
            rt,
            "sgd_step_multi",
            rt.elementwise(total),
            table.ptr(0),
            tensors,
            total as i64,
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
