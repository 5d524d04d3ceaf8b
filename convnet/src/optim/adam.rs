//! Adam and AdamW, `torch.optim.Adam` / `torch.optim.AdamW` (single-tensor formulas).

use super::{flatten_groups, lookup, non_negative, Optimizer, ParamGroup};
use crate::autograd::GradStore;
use crate::backend::cpu::optim::{adam_step, AdamStep};
use crate::error::{invalid, Error, Result};
use crate::tensor::{gpu_of, Tensor};

/// Hyperparameters of [`Adam`]. `decoupled_weight_decay` selects AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Moment decay rates (default 0.9, 0.999).
    pub betas: (f64, f64),
    /// Denominator term (default 1e-8).
    pub eps: f64,
    /// Weight decay (default 0 for Adam; AdamW's default is 0.01, see [`AdamConfig::adamw`]).
    pub weight_decay: f64,
    /// Keep the maximum of the second moment (AMSGrad).
    pub amsgrad: bool,
    /// AdamW: decay the weights directly instead of adding to the gradient.
    pub decoupled_weight_decay: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decoupled_weight_decay: false,
        }
    }
}

impl AdamConfig {
    /// AdamW's defaults (`weight_decay = 0.01`, decoupled).
    pub fn adamw() -> Self {
        AdamConfig {
            weight_decay: 0.01,
            decoupled_weight_decay: true,
            ..Default::default()
        }
    }
}

struct Slot {
    name: String,
    param: Tensor,
    /// The parameter's group (index into `Adam::lr_scales`).
    group: usize,
    step: u64,
    /// The moments, on the parameter's device; made at the first step (or when loaded).
    moments: Option<Moments>,
}

struct Moments {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
}

impl Moments {
    /// Moments from host values (zeros for a fresh start) on `param`'s device.
    fn on_device_of(
        param: &Tensor,
        values: [Vec<f32>; 2],
        max: Option<Vec<f32>>,
    ) -> Result<Moments> {
        let shape = param.shape().clone();
        let place = |v: Vec<f32>| Tensor::from_vec(v, shape.clone())?.to_device(param.device());
        let [m, v] = values;
        Ok(Moments {
            exp_avg: place(m)?,
            exp_avg_sq: place(v)?,
            max_exp_avg_sq: max.map(place).transpose()?,
        })
    }
}

/// Adam / AdamW with optional AMSGrad.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    /// Each parameter group's learning rate as a multiple of `cfg.lr`.
    lr_scales: Vec<f64>,
    /// The slots that took the last step.
    last_stepped: Vec<usize>,
    /// The hyperparameters of each (parameter group, GPU that holds its parameters).
    #[cfg(feature = "cuda")]
    hyper: Vec<(usize, crate::backend::cuda::optim::AdamHyper)>,
}

/// The per-step values of step `t` (1-based), bias corrections included, for a parameter
/// group at `lr_scale` times the rate.
fn step_values(c: &AdamConfig, lr_scale: f64, t: u64) -> AdamStep {
    let t = t as i32;
    AdamStep {
        lr: (c.lr * lr_scale) as f32,
        beta1: c.betas.0 as f32,
        beta2: c.betas.1 as f32,
        eps: c.eps as f32,
        weight_decay: c.weight_decay as f32,
        decoupled: c.decoupled_weight_decay,
        bias_correction1: (1.0 - c.betas.0.powi(t)) as f32,
        bias_correction2_sqrt: (1.0 - c.betas.1.powi(t)).sqrt() as f32,
    }
}

impl Adam {
    /// Creates the optimizer over named parameters, all at the rate `cfg.lr`.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamConfig) -> Result<Adam> {
        Adam::with_groups(vec![ParamGroup::new(params)], cfg)
    }

    /// Creates the optimizer over parameter groups, each at its multiple of `cfg.lr`.
    pub fn with_groups(groups: Vec<ParamGroup>, cfg: AdamConfig) -> Result<Adam> {
        let (b1, b2) = cfg.betas;
        if !non_negative(cfg.lr)
            || !non_negative(cfg.eps)
            || !non_negative(cfg.weight_decay)
            || !(0.0..1.0).contains(&b1)
            || !(0.0..1.0).contains(&b2)
        {
            return Err(invalid(
                "Adam",
                format!(
                    "invalid hyperparameters: lr {}, betas {:?}, eps {}, weight_decay {}",
                    cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay
                ),
            ));
        }
        let (lr_scales, params) = flatten_groups("Adam", groups)?;
        let slots = params
            .into_iter()
            .map(|(name, param, group)| Slot {
                name,
                param,
                group,
                step: 0,
                moments: None,
            })
            .collect();
        Ok(Adam {
            cfg,
            slots,
            lr_scales,
            last_stepped: Vec::new(),
            #[cfg(feature = "cuda")]
            hyper: Vec::new(),
        })
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.cfg;
        // Parameters on a GPU are updated together, one launch per (device, step count,
        // parameter group).
        let mut on_gpu: Vec<((usize, u64, usize), Vec<usize>)> = Vec::new();
        self.last_stepped.clear();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(g) = grads.get(&slot.param) else {
                continue;
            };
            slot.step += 1;
            self.last_stepped.push(i);
            let s = step_values(&c, self.lr_scales[slot.group], slot.step);
            if slot.moments.is_none() {
                let n = slot.param.numel();
                let max = c.amsgrad.then(|| vec![0.0; n]);
                slot.moments = Some(Moments::on_device_of(
                    &slot.param,
                    [vec![0.0; n], vec![0.0; n]],
                    max,
                )?);
            }
            let m = slot.moments.as_ref().expect("made above");
            let mut inputs = vec![&slot.param, g, &m.exp_avg, &m.exp_avg_sq];
            inputs.extend(m.max_exp_avg_sq.as_ref());
            if let Some(gpu) = gpu_of("Adam", &inputs)? {
                let key = (gpu, slot.step, slot.group);
                match on_gpu.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(i),
                    None => on_gpu.push((key, vec![i])),
                }
                continue;
            }
            g.with_data(|gd| {
                m.exp_avg.update_data(|ea| {
                    m.exp_avg_sq.update_data(|eas| match &m.max_exp_avg_sq {
                        Some(mx) => mx.update_data(|mv| {
                            slot.param
                                .update_data(|p| adam_step(p, gd, ea, eas, Some(mv), &s))
                        })?,
                        None => slot
                            .param
                            .update_data(|p| adam_step(p, gd, ea, eas, None, &s)),
                    })?
                })?
            })?;
        }
        #[cfg(feature = "cuda")]
        {
            use crate::backend::cuda::{optim, runtime};
            for ((gpu, t, group), members) in &on_gpu {
                let at = match self
                    .hyper
                    .iter()
                    .position(|(g, h)| g == group && h.gpu() == *gpu)
                {
                    Some(at) => at,
                    None => {
                        self.hyper.push((*group, optim::AdamHyper::new(*gpu)?));
                        self.hyper.len() - 1
                    }
                };
                // A captured step reads what the trainer stages before each launch, one set
                // of values per group: parameters at different step counts cannot share it.
                if runtime::with(*gpu, |rt| Ok(rt.is_capturing()))? {
                    if on_gpu.iter().any(|((_, other, _), _)| other != t) {
                        return Err(Error::Unsupported(
                            "an Adam step over parameters at different step counts cannot be captured in a CUDA graph".into(),
                        ));
                    }
                } else {
                    let s = step_values(&c, self.lr_scales[*group], *t);
                    self.hyper[at].1.stage(optim::adam_hyper(&s))?;
                }
                let entries: Vec<optim::AdamEntry<'_>> = members
                    .iter()
                    .map(|&i| {
                        let s = &self.slots[i];
                        let g = grads.get(&s.param).expect("collected above");
                        let m = s.moments.as_ref().expect("made above");
                        (
                            &s.param,
                            g,
                            &m.exp_avg,
                            &m.exp_avg_sq,
                            m.max_exp_avg_sq.as_ref(),
                        )
                    })
                    .collect();
                optim::adam_step_multi(&self.hyper[at].1, &entries)?;
            }
        }
        #[cfg(not(feature = "cuda"))]
        if let Some(((gpu, _, _), _)) = on_gpu.first() {
            let _ = gpu;
            return Err(Error::CudaNotBuilt);
        }
        Ok(())
    }
    fn supports_step_graphs(&self) -> bool {
        cfg!(feature = "cuda")
    }
    fn stage_hyperparameters(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            let Some(&first) = self.last_stepped.first() else {
                return Ok(());
            };
            let t = self.slots[first].step;
            for (group, h) in &mut self.hyper {
                let s = step_values(&self.cfg, self.lr_scales[*group], t);
                h.stage(crate::backend::cuda::optim::adam_hyper(&s))?;
            }
        }
        Ok(())
    }
    fn advance_for_replay(&mut self) -> Result<()> {
        // The replayed step is the captured one: the same parameters take a step.
        for &i in &self.last_stepped {
            self.slots[i].step += 1;
        }
        self.stage_hyperparameters()
    }
    fn lr(&self) -> f64 {
        self.cfg.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn set_momentum(&mut self, momentum: f64) {
        self.cfg.betas.0 = momentum;
    }
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for s in &self.slots {
            let shape = s.param.shape().clone();
            // Host copies; zeros before the first step.
            let t = |v: Option<&Tensor>| {
                let data = v.map_or_else(|| vec![0.0; shape.numel()], Tensor::to_vec);
                Tensor::from_parts(data, shape.clone(), None)
            };
            let m = s.moments.as_ref();
            out.push((format!("{}.step", s.name), Tensor::scalar(s.step as f32)));
            out.push((format!("{}.exp_avg", s.name), t(m.map(|m| &m.exp_avg))));
            out.push((
                format!("{}.exp_avg_sq", s.name),
                t(m.map(|m| &m.exp_avg_sq)),
            ));
            if self.cfg.amsgrad {
                out.push((
                    format!("{}.max_exp_avg_sq", s.name),
                    t(m.and_then(|m| m.max_exp_avg_sq.as_ref())),
                ));
            }
        }
        out
    }
    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let amsgrad = self.cfg.amsgrad;
        for s in &mut self.slots {
            let get = |slot: &str| -> Result<Vec<f32>> {
                let key = format!("{}.{slot}", s.name);
                match lookup(state, &key) {
                    Some(t) if t.numel() == s.param.numel() => t.try_to_vec(),
                    Some(t) => Err(Error::State(format!(
                        "{key}: expected {}, got {}",
                        s.param.shape(),
                        t.shape()
                    ))),
                    None => Err(Error::State(format!("missing optimizer state {key}"))),
                }
            };
            let values = [get("exp_avg")?, get("exp_avg_sq")?];
            let max = if amsgrad {
                Some(get("max_exp_avg_sq")?)
            } else {
                None
            };
            s.moments = Some(Moments::on_device_of(&s.param, values, max)?);
            s.step = lookup(state, &format!("{}.step", s.name))
                .ok_or_else(|| Error::State(format!("missing optimizer state {}.step", s.name)))?
                .item()? as u64;
        }
        Ok(())
    }
}
