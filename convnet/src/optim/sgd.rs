//! Stochastic gradient descent, `torch.optim.SGD`.

use super::{flatten_groups, lookup, non_negative, Optimizer, ParamGroup};
use crate::autograd::GradStore;
use crate::backend::cpu::optim::sgd_step;
use crate::error::{invalid, Error, Result};
use crate::tensor::{gpu_of, Tensor};

/// Hyperparameters of [`Sgd`], with PyTorch's defaults except `lr` (required there; 0.01 here).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor.
    pub momentum: f64,
    /// Dampening for momentum.
    pub dampening: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.01,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

struct Slot {
    name: String,
    param: Tensor,
    /// The parameter's group (index into `Sgd::lr_scales`).
    group: usize,
    /// On the parameter's device.
    momentum_buffer: Option<Tensor>,
}

/// SGD with momentum, dampening, Nesterov and weight decay:
/// `g += wd*p; buf = m*buf + (1-d)*g (buf = g on the first step); g = nesterov ? g + m*buf : buf; p -= lr*g`.
pub struct Sgd {
    cfg: SgdConfig,
    slots: Vec<Slot>,
    /// Each parameter group's learning rate as a multiple of `cfg.lr`.
    lr_scales: Vec<f64>,
    /// The hyperparameters of each (parameter group, GPU that holds its parameters).
    #[cfg(feature = "cuda")]
    hyper: Vec<(usize, crate::backend::cuda::optim::SgdHyper)>,
}

impl Sgd {
    /// Creates the optimizer over named parameters, all at the rate `cfg.lr`.
    pub fn new(params: Vec<(String, Tensor)>, cfg: SgdConfig) -> Result<Sgd> {
        Sgd::with_groups(vec![ParamGroup::new(params)], cfg)
    }

    /// Creates the optimizer over parameter groups, each at its multiple of `cfg.lr`.
    pub fn with_groups(groups: Vec<ParamGroup>, cfg: SgdConfig) -> Result<Sgd> {
        if !non_negative(cfg.lr) || !non_negative(cfg.momentum) || !non_negative(cfg.weight_decay) {
            return Err(invalid(
                "SGD",
                format!(
                    "lr {}, momentum {} and weight_decay {} must be finite and non-negative",
                    cfg.lr, cfg.momentum, cfg.weight_decay
                ),
            ));
        }
        if cfg.nesterov && (cfg.momentum <= 0.0 || cfg.dampening != 0.0) {
            return Err(invalid(
                "SGD",
                "Nesterov momentum requires a momentum and zero dampening",
            ));
        }
        let (lr_scales, params) = flatten_groups("SGD", groups)?;
        let slots = params
            .into_iter()
            .map(|(name, param, group)| Slot {
                name,
                param,
                group,
                momentum_buffer: None,
            })
            .collect();
        Ok(Sgd {
            cfg,
            slots,
            lr_scales,
            #[cfg(feature = "cuda")]
            hyper: Vec::new(),
        })
    }

    /// The hyperparameters in force.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.cfg;
        let (momentum, dampening) = (c.momentum as f32, c.dampening as f32);
        let weight_decay = c.weight_decay as f32;
        let lr_of = |group: usize| (c.lr * self.lr_scales[group]) as f32;
        // Parameters on a GPU are updated together, one launch per (device, first step,
        // parameter group).
        let mut on_gpu: Vec<((usize, bool, usize), Vec<usize>)> = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(g) = grads.get(&slot.param) else {
                continue;
            };
            let lr = lr_of(slot.group);
            let first = slot.momentum_buffer.is_none();
            if c.momentum != 0.0 && first {
                let zeros = Tensor::zeros(slot.param.shape().clone());
                slot.momentum_buffer = Some(zeros.to_device(slot.param.device())?);
            }
            let buf = slot.momentum_buffer.as_ref().filter(|_| c.momentum != 0.0);
            let mut inputs = vec![&slot.param, g];
            inputs.extend(buf);
            if let Some(gpu) = gpu_of("SGD", &inputs)? {
                let key = (gpu, first, slot.group);
                match on_gpu.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(i),
                    None => on_gpu.push((key, vec![i])),
                }
                continue;
            }
            let step = |p: &mut [f32], gd: &[f32], b: Option<&mut [f32]>| {
                sgd_step(
                    p,
                    gd,
                    b,
                    lr,
                    momentum,
                    dampening,
                    c.nesterov,
                    weight_decay,
                    first,
                )
            };
            g.with_data(|gd| match buf {
                Some(b) => b.update_data(|bd| slot.param.update_data(|p| step(p, gd, Some(bd))))?,
                None => slot.param.update_data(|p| step(p, gd, None)),
            })?;
        }
        for ((gpu, first, group), members) in on_gpu {
            #[cfg(not(feature = "cuda"))]
            let _ = (first, group, &members);
            on_gpu!(gpu, |d| {
                use crate::backend::cuda::{optim, runtime};
                let at = match self
                    .hyper
                    .iter()
                    .position(|(g, h)| *g == group && h.gpu() == d)
                {
                    Some(at) => at,
                    None => {
                        self.hyper.push((group, optim::SgdHyper::new(d)?));
                        self.hyper.len() - 1
                    }
                };
                // A captured step reads what the trainer stages before each launch.
                if !runtime::with(d, |rt| Ok(rt.is_capturing()))? {
                    self.hyper[at].1.stage(optim::sgd_hyper(
                        lr_of(group),
                        momentum,
                        dampening,
                        weight_decay,
                    ))?;
                }
                let entries: Vec<(&Tensor, &Tensor, Option<&Tensor>)> = members
                    .iter()
                    .map(|&i| {
                        let s = &self.slots[i];
                        let g = grads.get(&s.param).expect("collected above");
                        let buf = s.momentum_buffer.as_ref().filter(|_| c.momentum != 0.0);
                        (&s.param, g, buf)
                    })
                    .collect();
                optim::sgd_step_multi(&self.hyper[at].1, &entries, c.nesterov, first)
            })?;
        }
        Ok(())
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn supports_step_graphs(&self) -> bool {
        cfg!(feature = "cuda")
    }
    fn stage_hyperparameters(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            let c = self.cfg;
            for (group, h) in &mut self.hyper {
                h.stage(crate::backend::cuda::optim::sgd_hyper(
                    (c.lr * self.lr_scales[*group]) as f32,
                    c.momentum as f32,
                    c.dampening as f32,
                    c.weight_decay as f32,
                ))?;
            }
        }
        Ok(())
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn set_momentum(&mut self, momentum: f64) {
        self.cfg.momentum = momentum;
    }
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .filter_map(|s| {
                let buf = s.momentum_buffer.as_ref()?;
                Some((
                    format!("{}.momentum_buffer", s.name),
                    Tensor::from_parts(buf.to_vec(), s.param.shape().clone(), None),
                ))
            })
            .collect()
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        for s in &mut self.slots {
            s.momentum_buffer = match lookup(state, &format!("{}.momentum_buffer", s.name)) {
                Some(t) if t.numel() == s.param.numel() => {
                    let copy = Tensor::from_vec(t.try_to_vec()?, s.param.shape().clone())?;
                    Some(copy.to_device(s.param.device())?)
                }
                Some(t) => {
                    return Err(Error::State(format!(
                        "{}.momentum_buffer: expected {}, got {}",
                        s.name,
                        s.param.shape(),
                        t.shape()
                    )))
                }
                None => None,
            };
        }
        Ok(())
    }
}
