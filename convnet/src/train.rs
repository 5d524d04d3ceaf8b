//! Training and evaluation loops shared by the CLI and library users: optimizer and schedule
//! from a [`TrainConfig`], one epoch of training with per-batch progress, evaluation with
//! per-class accuracy and a confusion matrix, and the training state saved beside a
//! checkpoint so that a resumed run produces the same weights as one never interrupted.
//!
//! Data-parallel training ([`Trainer::distribute`]) changes the step at one point: the
//! backward pass goes through [`DataParallel`], which averages the gradients over the ranks
//! while it runs; the loader gives each rank its slice of every global batch, and the
//! epoch's figures and the evaluation's counts are summed over the ranks.

use crate::autocast::autocast;
use crate::checkpoint::save_tensors;
use crate::data::DataLoader;
use crate::device::Device;
use crate::dist::{Channel, Communicator, DataParallel, DataParallelOptions, SingleProcess};
use crate::error::{invalid, Error, Result};
use crate::nn::{Mode, Model};
use crate::optim::{
    Adam, AdamConfig, Averaging, ConstantLr, CosineAnnealingLr, LrSchedule, MultiStepLr,
    OneCycleLr, Optimizer, ParamGroup, Sgd, SgdConfig, WeightAverage, STATE_AVERAGE_PREFIX,
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
    /// Fine-tuning: the (peak) learning rate of the trained parameters other than the
    /// classifier (the last Linear layer, which keeps `lr`); the schedule scales both
    /// alike. `None`: `lr` for every parameter.
    pub backbone_lr: Option<f64>,
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
    /// On a GPU: capture the training step in a CUDA graph after one eager step and replay
    /// it for every batch of that size (SGD, Adam, AdamW; a model whose step cannot be
    /// captured, e.g. with dropout, trains eagerly and [`Trainer::graph_refused`] says why).
    pub cuda_graph: bool,
    /// On a GPU: let convolutions use TF32 tensor cores, as PyTorch does by default
    /// (otherwise float32 arithmetic, within rounding of the CPU's results).
    pub tf32: bool,
    /// Arithmetic of convolutions and linear layers: bf16 runs on GPUs and on CPUs with
    /// AVX512-BF16 or AMX-BF16 ([`crate::autocast`]); evaluation stays float32.
    pub precision: Precision,
    /// On the CPU: how the training step's float32 convolutions choose their kernels
    /// ([`crate::backend::cpu::tuning`]): by the measured shape rules (the default, with
    /// Winograd's F(2x2, 3x3) where it pays), by timing each shape's candidates on this
    /// machine, or always the direct kernel.
    pub kernels: KernelChoice,
    /// Average the weights along the run (SWA or EMA, [`crate::optim::WeightAverage`]).
    pub average: Option<AverageConfig>,
}

/// Which weights a run averages ([`TrainConfig::average`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AverageConfig {
    /// SWA adds the weights at the end of each epoch; EMA after each optimizer step.
    pub kind: Averaging,
    /// The first epoch (1-based) whose weights are averaged.
    pub start_epoch: usize,
}

pub use crate::autocast::Precision;
use crate::backend::cpu::tuning::{self, KernelChoice};

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            optimizer: OptimizerKind::Sgd,
            lr: 0.01,
            backbone_lr: None,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            schedule: ScheduleKind::Constant,
            label_smoothing: 0.0,
            device: Device::Cpu,
            cuda_graph: false,
            tf32: false,
            precision: Precision::F32,
            kernels: KernelChoice::Rules,
            average: None,
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

/// The parameter groups of `model`'s trainable parameters (frozen ones are left out):
/// one, or with [`TrainConfig::backbone_lr`] the backbone at its rate and the classifier at
/// `lr`.
fn parameter_groups(cfg: &TrainConfig, model: &Model) -> Result<Vec<ParamGroup>> {
    let params = model.trainable_parameters();
    if params.is_empty() {
        return Err(invalid(
            "Trainer",
            "every parameter of the model is frozen: nothing to train",
        ));
    }
    let Some(backbone_lr) = cfg.backbone_lr else {
        return Ok(vec![ParamGroup::new(params)]);
    };
    if !(backbone_lr.is_finite() && backbone_lr >= 0.0) {
        return Err(invalid(
            "Trainer",
            format!(
                "the backbone's learning rate must be finite and non-negative, got {backbone_lr}"
            ),
        ));
    }
    let scale = if backbone_lr == 0.0 {
        0.0
    } else if cfg.lr > 0.0 {
        backbone_lr / cfg.lr
    } else {
        return Err(invalid(
            "Trainer",
            "a backbone learning rate needs a positive learning rate for the classifier",
        ));
    };
    let fc = model.classifier()?.ok_or_else(|| {
        invalid(
            "Trainer",
            "a backbone learning rate needs a classifier (a Linear layer) to tell the backbone from",
        )
    })?;
    let prefix = format!("{fc}.");
    let (head, backbone): (Vec<_>, Vec<_>) = params
        .into_iter()
        .partition(|(name, _)| name.starts_with(&prefix));
    Ok(vec![
        ParamGroup::new(backbone).lr_scale(scale),
        ParamGroup::new(head),
    ])
}

fn make_optimizer(cfg: &TrainConfig, params: Vec<ParamGroup>) -> Result<Box<dyn Optimizer>> {
    Ok(match cfg.optimizer {
        OptimizerKind::Sgd => Box::new(Sgd::with_groups(
            params,
            SgdConfig {
                lr: cfg.lr,
                momentum: cfg.momentum,
                nesterov: cfg.nesterov,
                weight_decay: cfg.weight_decay,
                dampening: 0.0,
            },
        )?),
        OptimizerKind::Adam => Box::new(Adam::with_groups(
            params,
            AdamConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?),
        OptimizerKind::AdamW => Box::new(Adam::with_groups(
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

/// Prefix of the model's tensors in a training state file.
const STATE_MODEL_PREFIX: &str = "model/";

/// Whether a training state file (as [`Trainer::save_state`] writes it) holds the model's
/// weights (states of older versions hold only the optimizer's).
pub fn state_has_weights(tensors: &[(String, Tensor)]) -> bool {
    tensors
        .iter()
        .any(|(n, _)| n.starts_with(STATE_MODEL_PREFIX))
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

/// The device accumulator kept between epochs (a captured step writes to its address).
#[cfg(feature = "cuda")]
type KeptAccumulator = Option<crate::backend::cuda::DeviceBuffer>;
#[cfg(not(feature = "cuda"))]
type KeptAccumulator = ();

impl EpochSums {
    /// Zeroed sums for `device`, reusing the accumulator of the previous epoch if any.
    fn new(device: Device, kept: KeptAccumulator) -> Result<EpochSums> {
        #[cfg(feature = "cuda")]
        let device = match device {
            Device::Cuda(n) => Some((
                n,
                match kept {
                    Some(mut acc) if acc.ordinal() == n => {
                        acc.fill_zero()?;
                        acc
                    }
                    _ => crate::backend::cuda::runtime::with(n, |rt| rt.zeros(4))?,
                },
            )),
            Device::Cpu => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = (device, kept);
        Ok(EpochSums {
            loss_sum: 0.0,
            correct: 0,
            #[cfg(feature = "cuda")]
            device,
        })
    }

    /// The accumulator to keep for the next epoch.
    fn into_kept(self) -> KeptAccumulator {
        #[cfg(feature = "cuda")]
        return self.device.map(|(_, acc)| acc);
    }

    /// The device accumulator, on a GPU.
    #[cfg(feature = "cuda")]
    fn device_acc(&self) -> Option<&crate::backend::cuda::DeviceBuffer> {
        self.device.as_ref().map(|(_, acc)| acc)
    }

    /// Whether the figures live on a GPU (and are read back only now and then).
    fn on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.device.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Adds one batch whose loss is the sum of its per-image losses divided by `divisor`
    /// (its size for a mean); returns the batch's loss when it is known on the host now.
    fn add(
        &mut self,
        loss: &Tensor,
        logits: &Tensor,
        labels: &[usize],
        divisor: f32,
    ) -> Result<Option<f32>> {
        #[cfg(feature = "cuda")]
        if let Some((gpu, acc)) = &self.device {
            crate::backend::cuda::ops::accumulate_metrics(*gpu, acc, loss, logits, labels)?;
            return Ok(None);
        }
        let value = loss.item()?;
        self.loss_sum += value as f64 * divisor as f64;
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
    /// The GPU metric accumulator, kept from epoch to epoch.
    kept: KeptAccumulator,
    /// With `cuda_graph`: the staging buffers and captured graph of the full-batch step.
    #[cfg(feature = "cuda")]
    graphed: Option<crate::backend::cuda::step_graph::GraphedStep>,
    /// Why steps are not captured, when they were meant to be.
    graph_refused: Option<String>,
    /// Data-parallel training over several ranks.
    dist: Option<DataParallel>,
    /// Whether to keep the gradients of each epoch's last step ([`Trainer::keep_gradients`]).
    keep_grads: bool,
    /// The parameters' gradients of the last epoch's last step, when kept.
    last_grads: Option<Vec<(String, Tensor)>>,
    /// The average of the weights, with `cfg.average`.
    average: Option<WeightAverage>,
}

impl Trainer {
    /// Prepares training of `model` with `steps_per_epoch` optimizer steps per epoch. The
    /// optimizer takes the model's trainable parameters: those frozen beforehand
    /// ([`Model::freeze`]) get no gradient and no optimizer state, and frozen BatchNorm
    /// layers keep their running statistics.
    pub fn new(model: Model, cfg: TrainConfig, steps_per_epoch: usize) -> Result<Trainer> {
        if cfg.epochs == 0 || steps_per_epoch == 0 {
            return Err(invalid(
                "Trainer",
                "epochs and steps per epoch must be positive",
            ));
        }
        model.to_device(cfg.device)?;
        if cfg.device == Device::Cpu {
            cfg.precision.check_supported()?;
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(n) = cfg.device {
            crate::backend::cuda::allow_tf32(n, cfg.tf32)?;
            crate::backend::cuda::use_bf16(n, cfg.precision == Precision::Bf16)?;
        }
        let optimizer = make_optimizer(&cfg, parameter_groups(&cfg, &model)?)?;
        let schedule = make_schedule(&cfg, steps_per_epoch)?;
        let average = match cfg.average {
            Some(a) if a.start_epoch == 0 || a.start_epoch > cfg.epochs => {
                return Err(invalid(
                    "Trainer",
                    format!(
                        "weights can be averaged from an epoch in 1..={}, not {}",
                        cfg.epochs, a.start_epoch
                    ),
                ))
            }
            Some(a) => Some(WeightAverage::new(a.kind)?),
            None => None,
        };
        Ok(Trainer {
            model,
            optimizer,
            schedule,
            cfg,
            epoch: 0,
            step: 0,
            kept: Default::default(),
            #[cfg(feature = "cuda")]
            graphed: None,
            graph_refused: None,
            dist: None,
            keep_grads: false,
            last_grads: None,
            average,
        })
    }

    /// Trains data-parallel from now on: every rank calls this with its communicator (it
    /// is collective), rank 0's weights are copied to all, and each epoch's loader must give
    /// this rank its slice of every global batch (`LoaderConfig { rank, world_size, .. }`
    /// from the communicator). Gradients are averaged over the ranks between backward and the
    /// optimizer, so every rank takes the same steps; see [`crate::dist`].
    ///
    /// ```
    /// use convnet::dist::{DataParallelOptions, SingleProcess};
    /// use convnet::train::{TrainConfig, Trainer};
    /// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
    /// let mut trainer = Trainer::new(model, TrainConfig::default(), 10)?;
    /// trainer.distribute(std::sync::Arc::new(SingleProcess), DataParallelOptions::default())?;
    /// assert_eq!(trainer.data_parallel().map(|d| d.communicator().size()), Some(1));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn distribute(
        &mut self,
        comm: std::sync::Arc<dyn Communicator>,
        opts: DataParallelOptions,
    ) -> Result<()> {
        if self.cfg.cuda_graph && comm.size() > 1 {
            self.graph_refused = Some("data-parallel steps are not captured in CUDA graphs".into());
        }
        self.dist = Some(DataParallel::new(comm, &self.model, opts)?);
        Ok(())
    }

    /// The data-parallel state, when training on several ranks.
    pub fn data_parallel(&self) -> Option<&DataParallel> {
        self.dist.as_ref()
    }

    /// The data-parallel state, to change how gradients travel (e.g.
    /// [`DataParallel::use_nccl`] with the `nccl` feature).
    pub fn data_parallel_mut(&mut self) -> Option<&mut DataParallel> {
        self.dist.as_mut()
    }

    /// The communicator of the ranks (a single process when not distributed).
    pub fn communicator(&self) -> std::sync::Arc<dyn Communicator> {
        match &self.dist {
            Some(d) => d.communicator().clone(),
            None => std::sync::Arc::new(SingleProcess),
        }
    }

    /// Why training steps are not replayed from a CUDA graph although
    /// [`TrainConfig::cuda_graph`] asked for it (`None` while they are, or when not asked).
    pub fn graph_refused(&self) -> Option<&str> {
        self.graph_refused.as_deref()
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

    /// Keeps (or stops keeping) the parameters' gradients of every epoch's last optimizer
    /// step, for [`Trainer::last_gradients`] (e.g. gradient histograms). They hold as much
    /// memory as the parameters.
    pub fn keep_gradients(&mut self, keep: bool) {
        self.keep_grads = keep;
        if !keep {
            self.last_grads = None;
        }
    }

    /// With [`Trainer::keep_gradients`]: the gradients, by parameter name, that the last
    /// optimizer step of the last epoch applied (averaged over the ranks when
    /// data-parallel). `None` before the first epoch, when not kept, and when that step
    /// ran through a CUDA graph ([`TrainConfig::cuda_graph`]), whose gradients live in the
    /// graph's own buffers.
    ///
    /// ```
    /// use convnet::data::{DataLoader, ImageDataset, LoaderConfig, Normalize, Transform};
    /// use convnet::train::{TrainConfig, Trainer};
    /// let data = ImageDataset::new(vec![0; 4 * 3 * 8 * 8], vec![0, 1, 0, 1], [3, 8, 8], vec!["a".into(), "b".into()], "memory")?;
    /// let transform = Transform { normalize: Normalize::default_for(3), augment: None };
    /// let loader = DataLoader::new(std::sync::Arc::new(data), transform, LoaderConfig { batch_size: 2, ..Default::default() })?;
    /// let model = convnet::models::build("seed-cnn", [3, 8, 8], 2)?;
    /// let mut trainer = Trainer::new(model, TrainConfig { epochs: 1, ..Default::default() }, loader.num_batches())?;
    /// trainer.keep_gradients(true);
    /// trainer.train_epoch(&loader, &mut |_| {})?;
    /// let grads = trainer.last_gradients().expect("kept");
    /// assert_eq!(grads.len(), trainer.model().named_parameters().len());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn last_gradients(&self) -> Option<&[(String, Tensor)]> {
        self.last_grads.as_deref()
    }

    /// Keeps the parameters' gradients in `grads` when asked to and `last` is the epoch's
    /// last step.
    fn keep_last_gradients(&mut self, grads: &crate::GradStore, last: bool) {
        if self.keep_grads && last {
            let kept = self.model.named_parameters().into_iter();
            self.last_grads = Some(
                kept.filter_map(|(name, p)| grads.get(&p).map(|g| (name, g.clone())))
                    .collect(),
            );
        }
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
        let ranks = self.dist.as_ref().map_or(1, |d| d.communicator().size());
        let (rank, world) = (loader.config().rank, loader.config().world_size);
        if world != ranks || (ranks > 1 && rank != self.communicator().rank()) {
            return Err(invalid(
                "Trainer::train_epoch",
                format!("the loader gives rank {rank} of {world} its slices, but training runs on rank {} of {ranks}", self.communicator().rank()),
            ));
        }
        let start = Instant::now();
        // Distributed figures are summed over the ranks on the host.
        let metrics_device = if ranks > 1 {
            Device::Cpu
        } else {
            self.cfg.device
        };
        let mut sums = EpochSums::new(metrics_device, std::mem::take(&mut self.kept))?;
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        self.last_grads = None;
        for (i, batch) in loader.epoch(self.epoch).enumerate() {
            let batch = batch?;
            self.schedule.apply(self.optimizer.as_mut(), self.step);
            if batch.labels.is_empty() {
                // This rank's slice of a short last batch is empty.
                let dist = self.dist.as_mut().ok_or_else(|| {
                    invalid(
                        "Trainer::train_epoch",
                        "an empty batch outside data-parallel training",
                    )
                })?;
                let loss = dist.idle_loss(&self.model)?;
                let grads = dist.backward(&loss)?;
                self.optimizer.step(&grads)?;
                self.keep_last_gradients(&grads, i + 1 == batches);
            } else if !self.graphed_step(&batch.images, &batch.labels, &sums)? {
                let images = batch.images.to_device(self.cfg.device)?;
                // On the CPU the precision is an autocast scope; GPUs set it once (`new`).
                let precision = match self.cfg.device {
                    Device::Cpu => self.cfg.precision,
                    _ => Precision::F32,
                };
                let kernels = match self.cfg.device {
                    Device::Cpu => self.cfg.kernels,
                    _ => KernelChoice::Direct,
                };
                let logits = tuning::with_kernels(kernels, || {
                    autocast(precision, || match &mut self.dist {
                        Some(dist) => dist.forward(&self.model, &images, Mode::Train),
                        None => self.model.forward(&images, Mode::Train),
                    })
                })??;
                // Each rank's share of the global batch's mean (its own mean for equal slices).
                let divisor = batch.global_size as f32 / ranks as f32;
                let loss = logits.cross_entropy(
                    &batch.labels,
                    Reduction::Divided(divisor),
                    self.cfg.label_smoothing,
                )?;
                if let Some(value) = sums.add(&loss, &logits, &batch.labels, divisor)? {
                    if !value.is_finite() {
                        return Err(Error::Diverged {
                            epoch,
                            step: self.step,
                            loss: value,
                        });
                    }
                }
                let grads = match &mut self.dist {
                    Some(dist) => dist.backward(&loss)?,
                    None => loss.backward()?,
                };
                self.optimizer.step(&grads)?;
                self.keep_last_gradients(&grads, i + 1 == batches);
            }
            self.average_weights(epoch, false)?;
            self.step += 1;
            seen += batch.global_size;
            let report = !sums.on_device() || (i + 1) % GPU_READBACK_STEPS == 0 || i + 1 == batches;
            if !report {
                continue;
            }
            (loss_sum, correct) = sums.read()?;
            if ranks > 1 {
                let mut totals = [loss_sum, correct as f64];
                self.communicator()
                    .all_reduce_sum(Channel::Main, &mut totals)?;
                (loss_sum, correct) = (totals[0], totals[1] as usize);
            }
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
        self.kept = sums.into_kept();
        // Steps taken after the last loss was checked can still have broken the weights
        // (an infinite learning rate, an overflowing update): never hand them on.
        self.model.check_finite().map_err(|e| {
            Error::State(format!(
                "training diverged in epoch {epoch}: the weights are no longer finite ({e}); lower the learning rate (the last good checkpoint is kept)"
            ))
        })?;
        if let Some(dist) = &mut self.dist {
            // Every rank evaluates and checkpoints with rank 0's BatchNorm statistics.
            dist.broadcast_buffers()?;
        }
        self.average_weights(epoch, true)?;
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

    /// Adds the weights to the average when it is their turn: SWA's at the end of an epoch
    /// (`epoch_end`), EMA's after each step, from the configured epoch on.
    fn average_weights(&mut self, epoch: usize, epoch_end: bool) -> Result<()> {
        let (Some(avg), Some(cfg)) = (self.average.as_mut(), self.cfg.average) else {
            return Ok(());
        };
        let per_epoch = matches!(cfg.kind, Averaging::Swa);
        if epoch >= cfg.start_epoch && per_epoch == epoch_end {
            avg.update(&self.model)?;
        }
        Ok(())
    }

    /// The average of the weights so far, when the run averages them.
    pub fn weight_average(&self) -> Option<&WeightAverage> {
        self.average.as_ref()
    }

    /// Runs `f` on the model with the averaged weights in place of the trained ones, then
    /// puts the trained weights back; `None` when nothing has been averaged yet. For SWA
    /// the BatchNorm statistics are recomputed first over one pass of `loader` (the training
    /// data, this rank's slices under data-parallel training), as `update_bn`.
    pub fn with_averaged_weights<T>(
        &mut self,
        loader: &DataLoader,
        f: impl FnOnce(&Model) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(avg) = self.average.as_ref().filter(|a| a.count() > 0) else {
            return Ok(None);
        };
        let trained = crate::optim::host_copies(self.model.state_dict())?;
        let swapped = (|| {
            self.model.load_state_dict(&avg.state_dict(), false)?;
            if avg.kind().needs_batch_norm_update() {
                let images = loader.epoch(self.epoch).filter_map(|b| match b {
                    Ok(b) if b.labels.is_empty() => None,
                    b => Some(b.map(|b| b.images)),
                });
                crate::optim::update_batch_norm(&self.model, images)?;
            }
            f(&self.model)
        })();
        self.model.load_state_dict(&trained, true)?;
        swapped.map(Some)
    }

    /// With `cuda_graph` on a GPU: runs this batch's step from the staging buffers, eagerly
    /// the first time, then captured and replayed. False when the step should run the
    /// ordinary way (not asked, not a GPU, another batch size, capture refused).
    #[cfg(feature = "cuda")]
    fn graphed_step(
        &mut self,
        images: &Tensor,
        labels: &[usize],
        sums: &EpochSums,
    ) -> Result<bool> {
        use crate::backend::cuda::step_graph::GraphedStep;
        let Device::Cuda(gpu) = self.cfg.device else {
            return Ok(false);
        };
        if !self.cfg.cuda_graph || self.graph_refused.is_some() {
            return Ok(false);
        }
        if !self.optimizer.supports_step_graphs() {
            self.graph_refused = Some("this optimizer's steps cannot be captured".into());
            return Ok(false);
        }
        let Some(acc) = sums.device_acc() else {
            return Ok(false);
        };
        match &self.graphed {
            Some(g) if g.batch() != labels.len() => return Ok(false),
            Some(_) => {}
            None => self.graphed = Some(GraphedStep::new(gpu, images.dims())?),
        }
        let smoothing = self.cfg.label_smoothing;
        let Trainer {
            model,
            optimizer,
            graphed,
            graph_refused,
            ..
        } = self;
        let step = graphed.as_mut().expect("made above");
        step.stage(images, labels)?;
        if let Some(id) = step.graph_for(acc) {
            optimizer.advance_for_replay()?;
            step.launch(id)?;
            add_to_batch_counters(model, 1.0)?;
            return Ok(true);
        }
        let (staged, targets) = (step.images().clone(), step.targets());
        let body = |optimizer: &mut dyn Optimizer| {
            staged_step(
                model,
                optimizer,
                &staged,
                targets.clone(),
                acc,
                smoothing,
                gpu,
            )
        };
        if !step.warmed() {
            body(optimizer.as_mut())?;
            step.set_warmed();
            return Ok(true);
        }
        match step.capture(acc, || body(optimizer.as_mut())) {
            Ok(()) => {
                let id = step.graph_for(acc).expect("just captured");
                optimizer.stage_hyperparameters()?;
                step.launch(id)?;
            }
            Err(e) => {
                // Nothing ran on the device; undo the forward pass's host-side counting and
                // train this batch (and the rest of the run) eagerly.
                add_to_batch_counters(model, -1.0)?;
                *graph_refused = Some(e.to_string());
                body(optimizer.as_mut())?;
            }
        }
        Ok(true)
    }

    #[cfg(not(feature = "cuda"))]
    fn graphed_step(&mut self, _: &Tensor, _: &[usize], _: &EpochSums) -> Result<bool> {
        Ok(false)
    }

    /// Saves everything a run needs to continue, in one file written atomically: the
    /// model's parameters and buffers (under `model/`), the optimizer state, the position
    /// and the random state. `extra` metadata (e.g. the run's settings and metrics) is
    /// stored alongside. Because the file is self-sufficient, a process killed at any
    /// instant leaves either the previous state or the new one, never a mix.
    pub fn save_state(&self, path: &Path, extra: &HashMap<String, String>) -> Result<()> {
        let mut tensors = self.optimizer.state_dict();
        tensors.extend(
            self.model
                .state_dict()
                .into_iter()
                .map(|(name, t)| (format!("{STATE_MODEL_PREFIX}{name}"), t)),
        );
        let rng = crate::rng::global_rng_state();
        let mut meta = extra.clone();
        if let Some(avg) = &self.average {
            let (entries, count) = avg.state_entries();
            tensors.extend(entries);
            meta.insert("averaged".to_string(), count.to_string());
        }
        meta.extend([
            ("format".to_string(), "convnet-train-state".to_string()),
            ("epoch".to_string(), self.epoch.to_string()),
            ("step".to_string(), self.step.to_string()),
            (
                "rng".to_string(),
                rng.iter().map(u64::to_string).collect::<Vec<_>>().join(","),
            ),
        ]);
        save_tensors(path, &tensors, meta)
    }

    /// Restores what [`Trainer::save_state`] wrote — the model's weights too, when the
    /// state holds them (states of older versions do not: load the checkpoint first) — and
    /// returns the stored metadata.
    pub fn load_state(&mut self, path: &Path) -> Result<HashMap<String, String>> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        self.load_state_from_bytes(path, &bytes)
    }

    /// [`Trainer::load_state`] for a file already in memory (e.g. received from rank 0);
    /// `path` names it in errors.
    pub fn load_state_from_bytes(
        &mut self,
        path: &Path,
        bytes: &[u8],
    ) -> Result<HashMap<String, String>> {
        let (tensors, meta) = crate::checkpoint::tensors_from_bytes(path, bytes)?;
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
        let (average, tensors): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|(name, _)| name.starts_with(STATE_AVERAGE_PREFIX));
        let (model, optimizer): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|(name, _)| name.starts_with(STATE_MODEL_PREFIX));
        if !model.is_empty() {
            let weights: Vec<(String, Tensor)> = model
                .into_iter()
                .map(|(name, t)| (name[STATE_MODEL_PREFIX.len()..].to_string(), t))
                .collect();
            self.model.load_state_dict(&weights, true)?;
        }
        self.optimizer.load_state_dict(&optimizer)?;
        match &mut self.average {
            Some(avg) => {
                let count = match meta.get("averaged") {
                    Some(v) => v.parse().map_err(|_| bad("averaged"))?,
                    None => 0,
                };
                let entries = average
                    .into_iter()
                    .map(|(name, t)| (name[STATE_AVERAGE_PREFIX.len()..].to_string(), t))
                    .collect();
                avg.restore(&self.model, entries, count)
                    .map_err(|e| bad(&format!("weight average ({e})")))?;
            }
            None if !average.is_empty() => {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: "this run averages its weights: resume it with the same averaging".into(),
                })
            }
            None => {}
        }
        crate::rng::set_global_rng_state(rng);
        Ok(meta)
    }
}

/// One training step on a GPU from staged inputs (the body a CUDA graph captures).
#[cfg(feature = "cuda")]
fn staged_step(
    model: &Model,
    optimizer: &mut dyn Optimizer,
    images: &Tensor,
    targets: std::sync::Arc<crate::backend::cuda::DeviceBuffer>,
    acc: &crate::backend::cuda::DeviceBuffer,
    smoothing: f32,
    gpu: usize,
) -> Result<()> {
    use crate::backend::cuda::ops;
    let logits = model.forward(images, Mode::Train)?;
    let n = logits.dims()[0];
    let loss = ops::cross_entropy_on_device(gpu, &logits, targets, smoothing, Some(n as f32))?;
    // The loss kept the targets for backward; the metrics read them from there.
    ops::accumulate_metrics(gpu, acc, &loss, &logits, &[])?;
    let grads = loss.backward()?;
    optimizer.step(&grads)
}

/// Adds `delta` to every BatchNorm `num_batches_tracked` of `model` (a replayed step does
/// not run the forward pass on the host, which counts batches).
#[cfg(feature = "cuda")]
fn add_to_batch_counters(model: &Model, delta: f32) -> Result<()> {
    for (name, t) in model.state_dict() {
        if crate::nn::is_batch_counter(&name) {
            t.update_data(|v| v.iter_mut().for_each(|x| *x += delta))?;
        }
    }
    Ok(())
}

/// Evaluates `model` in eval mode without recording a graph.
pub fn evaluate(model: &dyn crate::infer::Predictor, loader: &DataLoader) -> Result<EvalReport> {
    evaluate_distributed(model, loader, &SingleProcess)
}

/// Evaluates `model` on every rank of `comm`, each on its slice of every batch (`loader` made
/// with this rank and the number of ranks), and sums the counts over the ranks: every image
/// counted exactly once, the same report on every rank.
pub fn evaluate_distributed(
    model: &dyn crate::infer::Predictor,
    loader: &DataLoader,
    comm: &dyn Communicator,
) -> Result<EvalReport> {
    evaluate_observed(model, loader, comm, &mut |_, _| Ok(()))
}

/// [`evaluate_distributed`], handing each of this rank's batches and the model's logits for
/// it to `observe` (e.g. a [`crate::viz::MistakeLog`] keeping the most confident mistakes).
///
/// ```
/// use convnet::data::{DataLoader, ImageDataset, Normalize};
/// use convnet::dist::SingleProcess;
/// use convnet::viz::MistakeLog;
/// use std::sync::Arc;
/// let classes: Vec<String> = (0..10).map(|c| c.to_string()).collect();
/// let pixels: Vec<u8> = (0..4 * 3 * 32 * 32).map(|v| (v % 251) as u8).collect();
/// let data = ImageDataset::new(pixels, vec![0, 1, 2, 3], [3, 32, 32], classes, "memory")?;
/// let loader = DataLoader::for_evaluation(Arc::new(data), Normalize::cifar10())?;
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let mut log = MistakeLog::new(16);
/// let report = convnet::train::evaluate_observed(&model, &loader, &SingleProcess, &mut |b, logits| {
///     log.observe(&b.indices, &b.labels, logits)
/// })?;
/// let wrong: u64 = (0..10).map(|c| report.confusion[c].iter().sum::<u64>() - report.confusion[c][c]).sum();
/// assert_eq!(log.mistakes().len() as u64, wrong);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn evaluate_observed(
    model: &dyn crate::infer::Predictor,
    loader: &DataLoader,
    comm: &dyn Communicator,
    observe: &mut dyn FnMut(&crate::data::Batch, &Tensor) -> Result<()>,
) -> Result<EvalReport> {
    let cfg = loader.config();
    if cfg.world_size != comm.size() || cfg.rank != comm.rank() {
        return Err(invalid(
            "evaluate",
            format!(
                "the loader gives rank {} of {} its slices, but this is rank {} of {}",
                cfg.rank,
                cfg.world_size,
                comm.rank(),
                comm.size()
            ),
        ));
    }
    let classes = loader.classes().len();
    let mut confusion = vec![vec![0u64; classes]; classes];
    let mut loss_sum = 0f64;
    let mut seen = 0usize;
    let device = model.device();
    crate::autograd::no_grad(|| -> Result<()> {
        for batch in loader.epoch(0) {
            let batch = batch?;
            if batch.labels.is_empty() {
                continue;
            }
            let images = batch.images.to_device(device)?;
            let logits = model.predict(&images)?;
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
            observe(&batch, &logits)?;
        }
        Ok(())
    })?;
    if comm.size() > 1 {
        // Counts below 2^53 are exact in float64.
        let mut totals: Vec<f64> = confusion.iter().flatten().map(|&v| v as f64).collect();
        totals.extend([loss_sum, seen as f64]);
        comm.all_reduce_sum(Channel::Main, &mut totals)?;
        for (v, t) in confusion.iter_mut().flatten().zip(&totals) {
            *v = *t as u64;
        }
        (loss_sum, seen) = (
            totals[classes * classes],
            totals[classes * classes + 1] as usize,
        );
    }
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
