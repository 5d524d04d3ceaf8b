//! Averages of the weights along a training run, as `torch.optim.swa_utils`: stochastic
//! weight averaging (SWA, Izmailov et al. 2018: the plain mean of the weights at chosen
//! points, usually each epoch's end, then BatchNorm statistics recomputed for the mean
//! weights) and an exponential moving average (EMA) of the weights and BatchNorm buffers,
//! updated after every step.
//!
//! The average lives on the host beside the model, in `state_dict` order, and is saved in
//! the training state so that a resumed run goes on averaging where it stopped.

use crate::error::{invalid, Result};
use crate::nn::{self, Mode, Model};
use crate::tensor::Tensor;

/// How the weights are averaged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Averaging {
    /// The plain mean of every averaged point (`AveragedModel(model)`): parameters only;
    /// BatchNorm statistics are recomputed afterwards ([`update_batch_norm`]).
    Swa,
    /// `average = decay * average + (1 - decay) * weights` over the parameters and the
    /// BatchNorm running statistics (`AveragedModel(model, multi_avg_fn=
    /// get_ema_multi_avg_fn(decay), use_buffers=True)`); `num_batches_tracked` is the model's.
    Ema {
        /// Weight of the average so far, in [0, 1).
        decay: f64,
    },
}

impl Averaging {
    /// Whether BatchNorm statistics must be recomputed for the averaged weights (SWA).
    pub fn needs_batch_norm_update(self) -> bool {
        self == Averaging::Swa
    }

    fn check(self) -> Result<()> {
        match self {
            Averaging::Ema { decay } if !(0.0..1.0).contains(&decay) => Err(invalid(
                "WeightAverage",
                format!("the EMA decay must be in [0, 1), not {decay}"),
            )),
            _ => Ok(()),
        }
    }
}

/// A running average of a model's weights.
///
/// ```
/// use convnet::optim::{Averaging, WeightAverage};
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let mut swa = WeightAverage::new(Averaging::Swa)?;
/// swa.update(&model)?;
/// let bias = model.state_dict().into_iter().find(|(n, _)| n == "fc2.bias").unwrap().1;
/// bias.update_data(|b| b.iter_mut().for_each(|v| *v += 1.0))?;
/// swa.update(&model)?;
/// let averaged = swa.state_dict().into_iter().find(|(n, _)| n == "fc2.bias").unwrap().1;
/// let (now, mean) = (bias.to_vec(), averaged.to_vec());
/// assert!((mean[0] - (now[0] - 0.5)).abs() < 1e-6);
/// assert_eq!(swa.count(), 2);
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct WeightAverage {
    kind: Averaging,
    /// Points averaged so far (PyTorch's `n_averaged`).
    count: u64,
    /// The averaged tensors on the host, named as in the model's `state_dict`.
    tensors: Vec<(String, Tensor)>,
}

/// Prefix of the average's tensors in a training state file.
pub(crate) const STATE_AVERAGE_PREFIX: &str = "average/";

impl WeightAverage {
    /// An empty average; the first [`WeightAverage::update`] copies the model's weights.
    pub fn new(kind: Averaging) -> Result<WeightAverage> {
        kind.check()?;
        Ok(WeightAverage {
            kind,
            count: 0,
            tensors: Vec::new(),
        })
    }

    /// How the weights are averaged.
    pub fn kind(&self) -> Averaging {
        self.kind
    }

    /// Points averaged so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds the model's current weights to the average (`update_parameters`).
    pub fn update(&mut self, model: &Model) -> Result<()> {
        let averaged = self.averaged_tensors(model);
        if self.count == 0 {
            self.tensors = host_copies(averaged)?;
        } else {
            if averaged.len() != self.tensors.len()
                || averaged
                    .iter()
                    .zip(&self.tensors)
                    .any(|((a, x), (b, y))| a != b || x.dims() != y.dims())
            {
                return Err(invalid(
                    "WeightAverage::update",
                    "the model's tensors are not those of the average",
                ));
            }
            // PyTorch's weight of the new point: 1 / (n + 1) as a float32 tensor, or
            // 1 - decay as a float32 scalar.
            let weight = match self.kind {
                Averaging::Swa => 1.0 / (self.count as f32 + 1.0),
                Averaging::Ema { decay } => (1.0 - decay) as f32,
            };
            for ((_, now), (_, avg)) in averaged.iter().zip(&self.tensors) {
                if now.device() == crate::Device::Cpu {
                    now.with_data(|now| avg.update_data(|a| lerp(a, now, weight)))?;
                } else {
                    let now = now.try_to_vec()?;
                    avg.update_data(|a| lerp(a, &now, weight))?;
                }
            }
        }
        self.count += 1;
        Ok(())
    }

    /// The averaged tensors, named as in the model's `state_dict`: the parameters, and for
    /// EMA the BatchNorm running statistics. Empty before the first update.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.tensors.clone()
    }

    /// The tensors of `model` this average covers, in `state_dict` order.
    fn averaged_tensors(&self, model: &Model) -> Vec<(String, Tensor)> {
        match self.kind {
            Averaging::Swa => model.named_parameters(),
            Averaging::Ema { .. } => model
                .state_dict()
                .into_iter()
                .filter(|(name, _)| !nn::is_batch_counter(name))
                .collect(),
        }
    }

    /// The average as entries of a training state file, with its count.
    pub(crate) fn state_entries(&self) -> (Vec<(String, Tensor)>, u64) {
        let entries = self
            .tensors
            .iter()
            .map(|(name, t)| (format!("{STATE_AVERAGE_PREFIX}{name}"), t.clone()))
            .collect();
        (entries, self.count)
    }

    /// Restores what [`WeightAverage::state_entries`] gave (prefix already removed, in any
    /// order), checked against the model's tensors.
    pub(crate) fn restore(
        &mut self,
        model: &Model,
        entries: Vec<(String, Tensor)>,
        count: u64,
    ) -> Result<()> {
        let mismatch = || {
            invalid(
                "WeightAverage::restore",
                "the saved average does not match the model's tensors",
            )
        };
        if count == 0 || entries.is_empty() {
            if count != 0 || !entries.is_empty() {
                return Err(mismatch());
            }
            (self.tensors, self.count) = (Vec::new(), 0);
            return Ok(());
        }
        let mut saved: std::collections::HashMap<String, Tensor> = entries.into_iter().collect();
        let expected = self.averaged_tensors(model);
        if saved.len() != expected.len() {
            return Err(mismatch());
        }
        self.tensors = expected
            .into_iter()
            .map(|(name, t)| match saved.remove(&name) {
                Some(s) if s.dims() == t.dims() => Ok((name, s)),
                _ => Err(mismatch()),
            })
            .collect::<Result<_>>()?;
        self.count = count;
        Ok(())
    }
}

/// Copies of named tensors on the host, sharing no storage with them.
pub(crate) fn host_copies(tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    tensors
        .into_iter()
        .map(|(name, t)| Ok((name, Tensor::from_vec(t.try_to_vec()?, t.dims())?)))
        .collect()
}

/// `avg += weight * (now - avg)` element by element, as `torch.lerp` computes it in float32
/// (from the other end when the weight is at least one half).
fn lerp(avg: &mut [f32], now: &[f32], weight: f32) {
    if weight.abs() < 0.5 {
        for (a, &n) in avg.iter_mut().zip(now) {
            *a = weight.mul_add(n - *a, *a);
        }
    } else {
        for (a, &n) in avg.iter_mut().zip(now) {
            *a = (-(n - *a)).mul_add(1.0 - weight, n);
        }
    }
}

/// Recomputes the BatchNorm running statistics of `model` from `batches` of inputs, as
/// `torch.optim.swa_utils.update_bn`: every BatchNorm layer's statistics are reset, the
/// batches run forward in training mode without recording a graph, and each layer's
/// statistics become the plain mean over the batches (`momentum=None`). Layers frozen in
/// eval mode ([`nn::BatchNormState::keep_eval`], a fine-tuned model's backbone) keep theirs.
/// Returns the number of batches run: none when no layer has statistics to recompute.
///
/// ```
/// use convnet::nn::{BatchNorm2d, Mode, Module, Sequential};
/// let model = Sequential::new().add("bn", BatchNorm2d::new(1)?).build(&[1, 1, 1])?;
/// let batches = [1.0, 3.0, 8.0].map(|v| Ok(convnet::Tensor::full(v, [2, 1, 1, 1])));
/// assert_eq!(convnet::optim::update_batch_norm(&model, batches)?, 3);
/// let mean = model.state_dict().into_iter().find(|(n, _)| n == "bn.running_mean").unwrap().1;
/// assert!((mean.to_vec()[0] - 4.0).abs() < 1e-6);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn update_batch_norm(
    model: &Model,
    batches: impl IntoIterator<Item = Result<Tensor>>,
) -> Result<usize> {
    let reset = average_cumulatively(model, true);
    let run = || -> Result<usize> {
        if reset.is_empty() {
            return Ok(0);
        }
        for (t, value) in &reset {
            t.update_data(|v| v.fill(*value))?;
        }
        let mut count = 0;
        for batch in batches {
            let images = batch?.to_device(model.device())?;
            crate::no_grad(|| model.forward(&images, Mode::Train))?;
            count += 1;
        }
        Ok(count)
    };
    let result = run();
    average_cumulatively(model, false);
    result
}

/// Switches the BatchNorm layers of `model` that train their statistics to or from
/// plain-mean running statistics ([`nn::BatchNormState::average_cumulatively`]); returns
/// their statistics with the values that reset them (running mean 0, variance 1, no
/// batches counted).
fn average_cumulatively(model: &Model, on: bool) -> Vec<(Tensor, f32)> {
    let mut reset = Vec::new();
    let mut stats = |mean: &Tensor, var: &Tensor, batches: &Tensor| {
        reset.extend([
            (mean.clone(), 0.0),
            (var.clone(), 1.0),
            (batches.clone(), 0.0),
        ]);
    };
    model.net().visit_modules("", &mut |_, layer| {
        if let Some(bn) = nn::batch_norm_state(layer).filter(|bn| !bn.keeps_eval()) {
            bn.average_cumulatively(on);
            stats(&bn.running_mean, &bn.running_var, &bn.num_batches_tracked);
        }
    });
    reset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lerp_takes_both_of_torchs_branches() {
        let mut avg = [1.0f32, -2.0];
        lerp(&mut avg, &[3.0, 2.0], 0.25);
        assert_eq!(avg, [1.5, -1.0]);
        lerp(&mut avg, &[3.5, 1.0], 0.75);
        assert_eq!(avg, [3.0, 0.5]);
    }

    #[test]
    fn after_recomputing_batch_norm_layers_average_exponentially_again() {
        use crate::nn::{BatchNorm1d, BatchNorm2d, Sequential};
        let model = Sequential::new()
            .add("bn", BatchNorm2d::new(1).unwrap())
            .add("flatten", crate::nn::Flatten::new())
            .add("bn1d", BatchNorm1d::new(1).unwrap())
            .build(&[1, 1, 1])
            .unwrap();
        let batch = |v: f32| Tensor::from_vec(vec![v, v + 2.0], [2, 1, 1, 1]);
        let batches = [1.0, 3.0, 8.0].map(batch);
        assert_eq!(update_batch_norm(&model, batches).unwrap(), 3);
        let state = |name: &str| {
            let state = model.state_dict();
            state
                .into_iter()
                .find(|(n, _)| n == name)
                .unwrap()
                .1
                .to_vec()[0]
        };
        // Plain means: batch means 2, 4, 9; unbiased batch variances 2.
        assert!((state("bn.running_mean") - 5.0).abs() < 1e-6);
        assert!((state("bn.running_var") - 2.0).abs() < 1e-6);
        assert_eq!(state("bn.num_batches_tracked"), 3.0);
        assert_eq!(state("bn1d.num_batches_tracked"), 3.0);
        crate::no_grad(|| model.forward(&batch(20.0).unwrap(), Mode::Train)).unwrap();
        assert!((state("bn.running_mean") - (0.9 * 5.0 + 0.1 * 21.0)).abs() < 1e-5);

        // A layer frozen in eval mode keeps its statistics.
        let before: Vec<f32> = model
            .state_dict()
            .iter()
            .flat_map(|(_, t)| t.to_vec())
            .collect();
        model
            .freeze(&["bn".to_string(), "bn1d".to_string()])
            .unwrap();
        assert_eq!(update_batch_norm(&model, [batch(7.0)]).unwrap(), 0);
        let after: Vec<f32> = model
            .state_dict()
            .iter()
            .flat_map(|(_, t)| t.to_vec())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_decay_outside_0_1_is_refused() {
        for decay in [1.0, -0.1, f64::NAN] {
            let err = WeightAverage::new(Averaging::Ema { decay })
                .err()
                .expect("refused");
            assert!(err.to_string().contains("decay"), "{err}");
        }
        assert!(WeightAverage::new(Averaging::Ema { decay: 0.999 }).is_ok());
    }
}
