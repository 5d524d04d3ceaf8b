//! Training and evaluation loops shared by the CLI and library users: optimizer and schedule
//! from a [`TrainConfig`], one epoch of training with per-batch progress, evaluation with
//! per-class accuracy and a confusion matrix, and the training state saved beside a
//! checkpoint so that a resumed run produces the same weights as one never interrupted.
//!
//! The step has one point between backward and the optimizer where gradients could be
//! reduced across processes (`GradStore`), for data-parallel training later.

use crate::checkpoint::{load_tensors, save_tensors};
use crate::data::DataLoader;
use crate::device::Device;
use crate::error::{invalid, Error, Result};
use crate::nn::{Mode, Model};
use crate::optim::{
    Adam, AdamConfig, ConstantLr, CosineAnnealingLr, LrSchedule, MultiStepLr, OneCycleLr,
    Optimizer, Sgd, SgdConfig,
};
use crate::tensor::{Reduction, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Which optimizer to train with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// `torch.optim.SGD`.
    Sgd,
    /// `torch.optim.Adam`.
    Adam,
    /// `torch.optim.AdamW`.
    AdamW,
}

/// How the learning rate moves over the run (updated every optimizer step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// The same rate throughout.
    Constant,
    /// x0.1 at 50% and 75% of the run (MultiStepLR).
    Step,
    /// Cosine annealing to 0 over the run.
    Cosine,
    /// One-cycle: warm up to `lr` over 30% of the run, then anneal; cycles SGD momentum.
    OneCycle,
}

/// Hyperparameters of a training run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    /// Total epochs.
    pub epochs: usize,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// (Peak) learning rate.
    pub lr: f64,
    /// SGD momentum (ignored by Adam).
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
    /// Weight decay (L2 for SGD/Adam, decoupled for AdamW).
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: ScheduleKind,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f32,
    /// Where the model is trained; batches are copied there.
    pub device: Device,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            optimizer: OptimizerKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            schedule: ScheduleKind::Constant,
            label_smoothing: 0.0,
            device: Device::Cpu,
        }
    }
}

/// Running figures during an epoch, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct BatchProgress {
    /// Epoch, 1-based.
    pub epoch: usize,
    /// Batches done in this epoch.
    pub batch: usize,
    /// Batches in this epoch.
    pub batches: usize,
    /// Mean loss so far this epoch.
    pub loss: f64,
    /// Accuracy so far this epoch.
    pub accuracy: f64,
    /// Training throughput so far this epoch.
    pub images_per_sec: f64,
}

/// Result of one training epoch.
#[derive(Clone, Copy, Debug)]
pub struct EpochTrain {
    /// Mean training loss.
    pub loss: f64,
    /// Training accuracy (on augmented images, in train mode).
    pub accuracy: f64,
    /// Images per second, data loading included.
    pub images_per_sec: f64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch.
    pub seconds: f64,
}

/// Result of an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly.
    pub accuracy: f64,
    /// Accuracy per true class (NaN-free: 0 for classes with no examples).
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<u64>>,
}

fn make_optimizer(cfg: &TrainConfig, params: Vec<(String, Tensor)>) -> Result<Box<dyn Optimizer>> {
    Ok(match cfg.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::new(
            params,
            SgdConfig {
                lr: cfg.lr,
                momentum: cfg.momentum,
                nesterov: cfg.nesterov,
                weight_decay: cfg.weight_decay,
                dampening: 0.0,
            },
        )?),
        OptimizerKind::Adam => Box::new(Adam::new(
            params,
            AdamConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?),
        OptimizerKind::AdamW => Box::new(Adam::new(
            params,
            AdamConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamConfig::adamw()
            },
        )?),
    })
}

fn make_schedule(cfg: &TrainConfig, steps_per_epoch: usize) -> Result<Box<dyn LrSchedule>> {
    let total = (cfg.epochs * steps_per_epoch).max(2);
    Ok(match cfg.schedule {
        ScheduleKind::Constant => Box::new(ConstantLr(cfg.lr)),
        ScheduleKind::Step => Box::new(MultiStepLr::new(
            cfg.lr,
            vec![
                cfg.epochs / 2 * steps_per_epoch,
                cfg.epochs * 3 / 4 * steps_per_epoch,
            ],
            0.1,
        )),
        ScheduleKind::Cosine => Box::new(CosineAnnealingLr::new(cfg.lr, total, 0.0)?),
        ScheduleKind::OneCycle => {
            let m = if cfg.optimizer == OptimizerKind::Sgd {
                (0.85, 0.95)
            } else {
                (0.85, 0.9)
            };
            Box::new(OneCycleLr::with(cfg.lr, total, 0.3, 25.0, 1e4, m)?)
        }
    })
}

/// Number of correct argmax predictions in `logits [N, C]`.
fn count_correct(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    Ok(logits
        .argmax_last()?
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count())
}

/// How often (in optimizer steps) training on a GPU brings its running loss and accuracy
/// back to the host for progress reports and the divergence check: the rest of the time
/// the host only queues work and never waits for the device.
pub const GPU_READBACK_STEPS: usize = 16;

/// An epoch's running loss sum (`loss * batch size`) and count of correct predictions:
/// on the host, or kept on the GPU that holds the model.
struct EpochSums {
    loss_sum: f64,
    correct: usize,
    #[cfg(feature = "cuda")]
    device: Option<(usize, crate::backend::cuda::DeviceBuffer)>,
}

impl EpochSums {
    fn new(device: Device) -> Result<EpochSums> {
        #[cfg(feature = "cuda")]
        let device = match device {
            Device::Cuda(n) => Some((n, crate::backend::cuda::runtime::with(n, |rt| rt.zeros(4))?)),
            Device::Cpu => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(EpochSums {
            loss_sum: 0.0,
            correct: 0,
            #[cfg(feature = "cuda")]
            device,
        })
    }

    /// Whether the figures live on a GPU (and are read back only now and then).
    fn on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.device.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Adds one batch; returns the batch's loss when it is known on the host now.
    fn add(&mut self, loss: &Tensor, logits: &Tensor, labels: &[usize]) -> Result<Option<f32>> {
        #[cfg(feature = "cuda")]
        if let Some((gpu, acc)) = &self.device {
            crate::backend::cuda::ops::accumulate_metrics(*gpu, acc, loss, logits, labels)?;
            return Ok(None);
        }
        let value = loss.item()?;
        self.loss_sum += value as f64 * labels.len() as f64;
        self.correct += count_correct(logits, labels)?;
        Ok(Some(value))
    }

    /// The sums so far (a copy from the device for a GPU, which waits for it).
    fn read(&mut self) -> Result<(f64, usize)> {
        #[cfg(feature = "cuda")]
        if let Some((_, acc)) = &self.device {
            let words = acc.to_host(0, 4)?;
            let f64_at = |i: usize| {
                f64::from_bits(words[i].to_bits() as u64 | (words[i + 1].to_bits() as u64) << 32)
            };
            self.loss_sum = f64_at(0);
            self.correct = f64_at(2) as usize;
        }
        Ok((self.loss_sum, self.correct))
    }
}

/// A model with its optimizer and schedule, and the position in the run.
pub struct Trainer {
    model: Model,
    optimizer: Box<dyn Optimizer>,
    schedule: Box<dyn LrSchedule>,
    cfg: TrainConfig,
    epoch: usize,
    step: usize,
}

impl Trainer {
    /// Prepares training of `model` with `steps_per_epoch` optimizer steps per epoch.
    pub fn new(model: Model, cfg: TrainConfig, steps_per_epoch: usize) -> Result<Trainer> {
        if cfg.epochs == 0 || steps_per_epoch == 0 {
            return Err(invalid(
                "Trainer",
                "epochs and steps per epoch must be positive",
            ));
        }
        model.to_device(cfg.device)?;
        let optimizer = make_optimizer(&cfg, model.named_parameters())?;
        let schedule = make_schedule(&cfg, steps_per_epoch)?;
        Ok(Trainer {
            model,
            optimizer,
            schedule,
            cfg,
            epoch: 0,
            step: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Completed epochs.
    pub fn epoch(&self) -> usize {
        self.epoch
    }

    /// Completed optimizer steps.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The run's settings.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Trains one epoch over `loader`, calling `progress` after every batch. A non-finite
    /// loss stops with [`Error::Diverged`] before the optimizer touches the weights.
    ///
    /// On a GPU the loss and accuracy stay on the device and come back every
    /// [`GPU_READBACK_STEPS`] steps and at the end of the epoch: `progress` is called then,
    /// and a non-finite loss is caught then, after the optimizer has taken those steps (the
    /// last good checkpoint is what a run keeps).
    pub fn train_epoch(
        &mut self,
        loader: &DataLoader,
        progress: &mut dyn FnMut(&BatchProgress),
    ) -> Result<EpochTrain> {
        let epoch = self.epoch + 1;
        let batches = loader.num_batches();
        let start = Instant::now();
        let mut sums = EpochSums::new(self.cfg.device)?;
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        for (i, batch) in loader.epoch(self.epoch).enumerate() {
            let batch = batch?;
            let images = batch.images.to_device(self.cfg.device)?;
            let logits = self.model.forward(&images, Mode::Train)?;
            let loss =
                logits.cross_entropy(&batch.labels, Reduction::Mean, self.cfg.label_smoothing)?;
            if let Some(value) = sums.add(&loss, &logits, &batch.labels)? {
                if !value.is_finite() {
                    return Err(Error::Diverged {
                        epoch,
                        step: self.step,
                        loss: value,
                    });
                }
            }
            let grads = loss.backward()?;
            self.schedule.apply(self.optimizer.as_mut(), self.step);
            self.optimizer.step(&grads)?;
            self.step += 1;
            seen += batch.labels.len();
            let report = !sums.on_device() || (i + 1) % GPU_READBACK_STEPS == 0 || i + 1 == batches;
            if !report {
                continue;
            }
            (loss_sum, correct) = sums.read()?;
            if !loss_sum.is_finite() {
                return Err(Error::Diverged {
                    epoch,
                    step: self.step,
                    loss: loss_sum as f32,
                });
            }
            progress(&BatchProgress {
                epoch,
                batch: i + 1,
                batches,
                loss: loss_sum / seen as f64,
                accuracy: correct as f64 / seen as f64,
                images_per_sec: seen as f64 / start.elapsed().as_secs_f64().max(1e-9),
            });
        }
        self.epoch = epoch;
        let seconds = start.elapsed().as_secs_f64();
        Ok(EpochTrain {
            loss: loss_sum / seen.max(1) as f64,
            accuracy: correct as f64 / seen.max(1) as f64,
            images_per_sec: seen as f64 / seconds.max(1e-9),
            lr: self.optimizer.lr(),
            seconds,
        })
    }

    /// Saves the optimizer state, position and random state (the model goes in the
    /// checkpoint beside it).
    /// `extra` metadata (e.g. the command line of the run) is stored alongside.
    pub fn save_state(&self, path: &Path, extra: &HashMap<String, String>) -> Result<()> {
        let rng = crate::rng::global_rng_state();
        let mut meta = extra.clone();
        meta.extend([
            ("format".to_string(), "convnet-train-state".to_string()),
            ("epoch".to_string(), self.epoch.to_string()),
            ("step".to_string(), self.step.to_string()),
            (
                "rng".to_string(),
                rng.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            ),
        ]);
        save_tensors(path, &self.optimizer.state_dict(), meta)
    }

    /// Restores what [`Trainer::save_state`] wrote (the model weights must already be
    /// loaded) and returns the stored metadata.
    pub fn load_state(&mut self, path: &Path) -> Result<HashMap<String, String>> {
        let (tensors, meta) = load_tensors(path)?;
        let bad = |what: &str| Error::Format {
            path: path.to_path_buf(),
            msg: format!("training state: missing or invalid {what}"),
        };
        if meta.get("format").map(String::as_str) != Some("convnet-train-state") {
            return Err(bad("format tag (not a convnet training state file)"));
        }
        self.epoch = meta
            .get("epoch")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("epoch"))?;
        self.step = meta
            .get("step")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("step"))?;
        let rng: Vec<u64> = meta
            .get("rng")
            .ok_or_else(|| bad("rng"))?
            .split(',')
            .map(|v| v.parse().map_err(|_| bad("rng")))
            .collect::<Result<_>>()?;
        let rng: [u64; 4] = rng.try_into().map_err(|_| bad("rng"))?;
        self.optimizer.load_state_dict(&tensors)?;
        crate::rng::set_global_rng_state(rng);
        Ok(meta)
    }
}

/// Evaluates `model` in eval mode without recording a graph.
pub fn evaluate(model: &Model, loader: &DataLoader) -> Result<EvalReport> {
    let classes = loader.dataset().classes().len();
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0f64;
    let mut seen = 0usize;
    let device = model.device();
    crate::autograd::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0) {
            let batch = batch?;
            let images = batch.images.to_device(device)?;
            let logits = model.forward(&images, Mode::Eval)?;
            if logits.dims().get(1) != Some(&classes) {
                return Err(invalid(
                    "evaluate",
                    format!(
                        "model gives {} outputs but the data has {classes} classes",
                        logits.dims().get(1).copied().unwrap_or(0)
                    ),
                ));
            }
            loss_sum += logits
                .cross_entropy(&batch.labels, Reduction::Sum, 0.0)?
                .item()? as f64;
            for (p, &l) in logits.argmax_last()?.into_iter().zip(&batch.labels) {
                confusion[l][p] += 1;
            }
            seen += batch.labels.len();
        }
        Ok(())
    })?;
    let correct: u64 = (0..classes).map(|c| confusion[c][c]).sum();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                row[c] as f64 / total as f64
            }
        })
        .collect();
    Ok(EvalReport {
        loss: loss_sum / seen.max(1) as f64,
        accuracy: correct as f64 / seen.max(1) as f64,
        per_class_accuracy,
        confusion,
    })
}
