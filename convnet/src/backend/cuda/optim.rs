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

/// Adam's hyperparameters on a GPU (`[lr, beta1, beta2, eps, weight_decay, decoupled,
/// bias_correction1, bias_correction2_sqrt]`), read by the step kernel from device memory.
pub(crate) struct AdamHyper {
    gpu: usize,
    values: DeviceBuffer,
}

impl AdamHyper {
    /// Device memory for the hyperparameters of GPU `gpu`.
    pub(crate) fn new(gpu: usize) -> Result<AdamHyper> {
        let values = with(gpu, |rt| rt.zeros(8))?;
        Ok(AdamHyper { gpu, values })
    }

    /// The device it lives on.
    pub(crate) fn gpu(&self) -> usize {
        self.gpu
    }

    /// Queues the copy of one step's values (not waiting for the device).
    pub(crate) fn stage(&mut self, s: &AdamStep) -> Result<()> {
        let values = [
            s.lr,
            s.beta1,
            s.beta2,
            s.eps,
            s.weight_decay,
            f32::from(u8::from(s.decoupled)),
            s.bias_correction1,
            s.bias_correction2_sqrt,
        ];
        self.values.write_host_async(0, &values)
    }
}

/// One Adam/AdamW step over many parameters of one GPU in a single launch. Each entry is
/// `(p, g, m, v, max_v)`; `max_v` is `Some` with AMSGrad.
pub(crate) type AdamEntry<'a> = (
    &'a Tensor,
    &'a Tensor,
    &'a Tensor,
    &'a Tensor,
    Option<&'a Tensor>,
);

/// See [`AdamEntry`]; the values are those `hyper` holds.
pub(crate) fn adam_step_multi(hyper: &AdamHyper, entries: &[AdamEntry<'_>]) -> Result<()> {
    const OP: &str = "Adam step";
    let mut table: Vec<i64> = Vec::with_capacity(6 * entries.len());
    let mut total = 0usize;
    for (p, g, m, v, max_v) in entries {
        if p.numel() == 0 {
            continue;
        }
        for t in [p, g, m, v] {
            table.push(t.cuda_ptr(OP)? as i64);
        }
        table.push(max_v.map_or(Ok(0), |t| t.cuda_ptr(OP))? as i64);
        table.push(total as i64);
        total += p.numel();
    }
    if total == 0 {
        return Ok(());
    }
    let tensors = (table.len() / 6) as i32;
    with(hyper.gpu, |rt| {
        // The addresses are the step's own buffers: constants of a captured step.
        let table = rt.upload_constant_i64(&table)?;
        launch!(
            rt,
            "adam_step_multi",
            rt.elementwise(total),
            table.ptr(0),
            tensors,
            total as i64,
            hyper.values.ptr(0)
        )
    })
}
