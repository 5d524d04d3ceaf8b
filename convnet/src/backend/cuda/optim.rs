//! Optimizer steps on the GPU, in place over one parameter, mirroring
//! `backend::cpu::optim` (`torch.optim.SGD` and `Adam`/`AdamW` single-tensor formulas).

use super::buffer::DeviceBuffer;
use super::runtime::{launch, with};
use crate::backend::cpu::optim::AdamStep;
use crate::error::Result;
use crate::tensor::Tensor;

/// SGD's hyperparameters on a GPU (`[lr, momentum, dampening, weight_decay]`), read by
/// the step kernel from device memory so that a captured step follows the schedule.
pub(crate) struct SgdHyper {
    gpu: usize,
    values: DeviceBuffer,
}

impl SgdHyper {
    /// Device memory for the hyperparameters of GPU `gpu`.
    pub(crate) fn new(gpu: usize) -> Result<SgdHyper> {
        let values = with(gpu, |rt| rt.zeros(4))?;
        Ok(SgdHyper { gpu, values })
    }

    /// The device it lives on.
    pub(crate) fn gpu(&self) -> usize {
        self.gpu
    }

    /// Queues the copy of the next step's values (not waiting for the device).
    pub(crate) fn stage(
        &mut self,
        lr: f32,
        momentum: f32,
        dampening: f32,
        weight_decay: f32,
    ) -> Result<()> {
        self.values
            .write_host_async(0, &[lr, momentum, dampening, weight_decay])
    }
}

/// One SGD step over many parameters of one GPU in a single launch (a training step of a
/// ResNet updates dozens of tensors: one launch instead of one each). Each entry is
/// `(p, g, buf)`; `buf` is `None` without momentum (then the staged momentum must be 0);
/// `first` marks the step that initialises the buffers to the gradients.
pub(crate) fn sgd_step_multi(
    hyper: &SgdHyper,
    entries: &[(&Tensor, &Tensor, Option<&Tensor>)],
    nesterov: bool,
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
    with(hyper.gpu, |rt| {
        // The addresses are the step's own buffers: constants of a captured step.
        let table = rt.upload_constant_i64(&table)?;
        launch!(
            rt,
            "sgd_step_multi",
            rt.elementwise(total),
            table.ptr(0),
            tensors,
            total as i64,
            hyper.values.ptr(0),
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
