//! Adam and AdamW, `torch.optim.Adam` / `torch.optim.AdamW` (single-tensor formulas).

use super::non_negative;
use super::{lookup, Optimizer};
use crate::autograd::GradStore;
use crate::backend::cpu::optim::{adam_step, AdamStep};
use crate::error::{invalid, Error, Result};
use crate::tensor::Tensor;

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
    step: u64,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    max_exp_avg_sq: Vec<f32>,
}

/// Adam / AdamW with optional AMSGrad.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
}

impl Adam {
    /// Creates the optimizer over named parameters.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamConfig) -> Result<Adam> {
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
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let n = param.numel();
                Slot {
                    name,
                    param,
                    step: 0,
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: vec![0.0; n],
                    max_exp_avg_sq: if cfg.amsgrad {
                        vec![0.0; n]
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        Ok(Adam { cfg, slots })
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let c = self.cfg;
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.param) else {
                continue;
            };
            slot.step += 1;
            let t = slot.step as i32;
            let s = AdamStep {
                lr: c.lr as f32,
                beta1: c.betas.0 as f32,
                beta2: c.betas.1 as f32,
                eps: c.eps as f32,
                weight_decay: c.weight_decay as f32,
                decoupled: c.decoupled_weight_decay,
                bias_correction1: (1.0 - c.betas.0.powi(t)) as f32,
                bias_correction2_sqrt: (1.0 - c.betas.1.powi(t)).sqrt() as f32,
            };
            let max_v = if c.amsgrad {
                Some(slot.max_exp_avg_sq.as_mut_slice())
            } else {
                None
            };
            g.with_data(|gd| {
                slot.param.update_data(|p| {
                    adam_step(p, gd, &mut slot.exp_avg, &mut slot.exp_avg_sq, max_v, &s)
                })
            })?;
        }
        Ok(())
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
            let t = |v: &Vec<f32>| Tensor::from_parts(v.clone(), shape.clone(), None);
            out.push((format!("{}.step", s.name), Tensor::scalar(s.step as f32)));
            out.push((format!("{}.exp_avg", s.name), t(&s.exp_avg)));
            out.push((format!("{}.exp_avg_sq", s.name), t(&s.exp_avg_sq)));
            if self.cfg.amsgrad {
                out.push((format!("{}.max_exp_avg_sq", s.name), t(&s.max_exp_avg_sq)));
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
                    Some(t) if t.numel() == s.param.numel() => Ok(t.to_vec()),
                    Some(t) => Err(Error::State(format!(
                        "{key}: expected {}, got {}",
                        s.param.shape(),
                        t.shape()
                    ))),
                    None => Err(Error::State(format!("missing optimizer state {key}"))),
                }
            };
            s.exp_avg = get("exp_avg")?;
            s.exp_avg_sq = get("exp_avg_sq")?;
            if amsgrad {
                s.max_exp_avg_sq = get("max_exp_avg_sq")?;
            }
            s.step = lookup(state, &format!("{}.step", s.name))
                .ok_or_else(|| Error::State(format!("missing optimizer state {}.step", s.name)))?
                .item()? as u64;
        }
        Ok(())
    }
}
