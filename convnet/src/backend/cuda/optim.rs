//! Optimizer steps on the GPU, in place over one parameter, mirroring
//! `backend::cpu::optim` (`torch.optim.SGD` and `Adam`/`AdamW` single-tensor formulas).

use super::buffer::DeviceBuffer;
use super::runtime::{launch, with};
use crate::backend::cpu::optim::AdamStep;
use crate::error::Result;
use crate::tensor::Tensor;

/// The table of a multi-tensor step: per tensor, the addresses of its operands (0 for a
/// missing one; the first is the parameter, whose size counts) and its first index in the
/// concatenation of all of them. Returns the table, the tensor count and the total size;
/// empty parameters are left out.
fn pointer_table<'a, const K: usize>(
    rows: impl Iterator<Item = [Option<&'a Tensor>; K]>,
) -> Result<(Vec<i64>, i32, usize)> {
    const OP: &str = "optimizer step";
    let mut table = Vec::new();
    let (mut tensors, mut total) = (0i32, 0usize);
    for row in rows {
        let n = row[0].map_or(0, Tensor::numel);
        if n == 0 {
            continue;
        }
        for t in row {
            table.push(t.map_or(Ok(0), |t| t.cuda_ptr(OP))? as i64);
        }
        table.push(total as i64);
        total += n;
        tensors += 1;
    }
    Ok((table, tensors, total))
}

/// An optimizer's `N` hyperparameters on a GPU, read by its step kernel from device memory
/// so that a captured step follows the values staged before each launch.
pub(crate) struct Hyper<const N: usize> {
    gpu: usize,
    values: DeviceBuffer,
}

impl<const N: usize> Hyper<N> {
    /// Device memory for the hyperparameters of GPU `gpu`.
    pub(crate) fn new(gpu: usize) -> Result<Hyper<N>> {
        let values = with(gpu, |rt| rt.zeros(N))?;
        Ok(Hyper { gpu, values })
    }

    /// The device it lives on.
    pub(crate) fn gpu(&self) -> usize {
        self.gpu
    }

    /// Queues the copy of the next step's values (not waiting for the device).
    pub(crate) fn stage(&mut self, values: [f32; N]) -> Result<()> {
        self.values.write_host_async(0, &values)
    }
}

/// SGD's: `[lr, momentum, dampening, weight_decay]` (see [`sgd_hyper`]).
pub(crate) type SgdHyper = Hyper<4>;

/// SGD's hyperparameters in the order `sgd_step_multi` reads them.
pub(crate) fn sgd_hyper(lr: f32, momentum: f32, dampening: f32, weight_decay: f32) -> [f32; 4] {
    [lr, momentum, dampening, weight_decay]
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
    let (table, tensors, total) =
        pointer_table(entries.iter().map(|&(p, g, buf)| [Some(p), Some(g), buf]))?;
    if total == 0 {
        return Ok(());
    }
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

/// Adam's: `[lr, beta1, beta2, eps, weight_decay, decoupled, bias_correction1,
/// bias_correction2_sqrt]` (see [`adam_hyper`]).
pub(crate) type AdamHyper = Hyper<8>;

/// One Adam step's values in the order `adam_step_multi` reads them.
pub(crate) fn adam_hyper(s: &AdamStep) -> [f32; 8] {
    [
        s.lr,
        s.beta1,
        s.beta2,
        s.eps,
        s.weight_decay,
        f32::from(u8::from(s.decoupled)),
        s.bias_correction1,
        s.bias_correction2_sqrt,
    ]
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
    let rows = entries
        .iter()
        .map(|&(p, g, m, v, max_v)| [Some(p), Some(g), Some(m), Some(v), max_v]);
    let (table, tensors, total) = pointer_table(rows)?;
    if total == 0 {
        return Ok(());
    }
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
