//! `convnet train`: train a model, test it after every epoch, write checkpoints and metrics.
//! Under `mpirun` every rank trains its slice of each global batch (see dist.rs): rank 0
//! prints and writes, all ranks evaluate their share of the test set.

mod board;

use crate::common::{check_device, open_data, set_threads};
use crate::dist::{
    check_same_everywhere, device_spec, read_on_rank0, threads_per_rank, DistArgs, DistBackend,
    Ranks,
};
use crate::run_folder::{RunFolder, QAT_RANGES_KEY, RUN_KEY};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::checkpoint::{checkpoint_from_bytes, CheckpointMeta, SequenceMeta};
use convnet::data::{
    Augment, DataLoader, FeatureDataset, FolderOptions, ImageDataset, LoaderConfig, Normalize,
    ResizeCrop, Transform,
};
use convnet::model_file::ModelFile;
use convnet::models::ModelSpec;
use convnet::optim::Averaging;
use convnet::quant::qat::QatNet;
use convnet::train::{
    evaluate_distributed, state_has_weights, AverageConfig, OptimizerKind, ScheduleKind,
    TrainConfig, Trainer,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum OptArg {
    Sgd,
    Adam,
    Adamw,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

impl From<PrecisionArg> for convnet::train::Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => convnet::train::Precision::F32,
            PrecisionArg::Bf16 => convnet::train::Precision::Bf16,
        }
    }
}

/// `--kernels`: how float32 convolutions choose their kernels on the CPU.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum KernelsArg {
    Rules,
    Measured,
    Direct,
}

impl From<KernelsArg> for convnet::backend::cpu::tuning::KernelChoice {
    fn from(k: KernelsArg) -> Self {
        use convnet::backend::cpu::tuning::KernelChoice;
        match k {
            KernelsArg::Rules => KernelChoice::Rules,
            KernelsArg::Measured => KernelChoice::Measured,
            KernelsArg::Direct => KernelChoice::Direct,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum SchedArg {
    Constant,
    Step,
    Cosine,
    Onecycle,
}

/// Arguments of `convnet train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Architecture (see `convnet models`).
    #[arg(long, default_value = "seed-cnn", conflicts_with = "model_file")]
    model: String,
    /// A model described in a TOML or JSON file (see examples/models), instead of --model.
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// Data set: CIFAR-10/100 binary, MNIST IDX, an image folder, or a folder with train/ and test/
    /// (folders or .tar.gz). Default: the CIFAR-10 sample bundled with convnet.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Epochs to train (in total, when resuming).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptArg::Sgd)]
    optimizer: OptArg,
    /// (Peak) learning rate.
    #[arg(long, default_value_t = 0.01)]
    lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Learning-rate schedule, stepped every batch.
    #[arg(long, value_enum, default_value_t = SchedArg::Constant)]
    schedule: SchedArg,
    /// Augment training images: random crop with 4-pixel padding and horizontal flip (with
    /// --resize/--crop: a random resized crop to --crop, 8-100% of the image at an aspect
    /// ratio of 3/4-4/3, and horizontal flip, as torchvision's RandomResizedCrop).
    #[arg(long)]
    augment: bool,
    /// Resize every image's shorter side to N pixels (bilinear) as it is read, then cut the
    /// centre --crop x --crop (torchvision's Resize + CenterCrop): photos of any size. With
    /// --augment the training images keep the centre N x N and take random resized crops.
    #[arg(long, value_name = "N")]
    resize: Option<usize>,
    /// Side of the centre crop after --resize (default: N).
    #[arg(long, value_name = "M", requires = "resize")]
    crop: Option<usize>,
    /// Cutout square size when augmenting (0 = off).
    #[arg(long, default_value_t = 0)]
    cutout: usize,
    /// Label smoothing of the cross-entropy loss.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads per process (0 = all cores, shared out among the ranks of a machine
    /// under mpirun).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On a GPU, capture the training step in a CUDA graph and replay it (falls back to
    /// eager steps with a note when the model's step cannot be captured).
    #[arg(long)]
    cuda_graph: bool,
    /// On a GPU, let convolutions use TF32 tensor cores (PyTorch's default for cuDNN);
    /// without it they use float32 arithmetic.
    #[arg(long)]
    tf32: bool,
    /// Arithmetic of convolutions and linear layers: f32, or bf16 (bfloat16 operands,
    /// float32 accumulation, float32 weights, optimizer and everything else; on GPUs and on
    /// CPUs with AVX512-BF16 or AMX-BF16). Evaluation runs in float32.
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
    /// On the CPU, how float32 convolutions choose their kernels: `rules` (measured shape
    /// rules: Winograd's F(2x2, 3x3) for 3x3 stride-1 layers from 16 input channels, which
    /// rounds differently, within a few 1e-6 of the outputs' scale), `measured` (each
    /// shape's candidate kernels timed on this machine at its first step, the fastest kept;
    /// a rerun may choose differently on a busy machine), or `direct` (the direct kernel
    /// everywhere, PyTorch's sums up to their order).
    #[arg(long, value_enum, default_value = "rules")]
    kernels: KernelsArg,
    /// Start from these weights instead of a fresh initialisation: a convnet checkpoint or
    /// a plain state_dict (`.safetensors`, `.pt`/`.pth`) of the same architecture. When the
    /// data has another number of classes, the classifier (the last Linear layer) is replaced
    /// by a freshly initialised one (fine-tuning); any other mismatch is an error.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Start from a pretrained model built into convnet (see `convnet models`), e.g.
    /// resnet20-cifar10: its architecture and weights (the classifier replaced when the data
    /// has another number of classes).
    #[arg(long, conflicts_with_all = ["weights", "model_file"])]
    pretrained: Option<String>,
    /// Train and test on these classes of the data only, relabelled in this order
    /// (e.g. airplane,automobile,ship,truck).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Freeze the parameters under these state_dict names (e.g. conv1,bn1,layer1,layer2;
    /// `convnet summary` lists the layers): they get no gradient and no optimizer state, and
    /// BatchNorm layers frozen whole stay in eval mode (running statistics unchanged).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "PREFIX,...",
        conflicts_with = "freeze_backbone"
    )]
    freeze: Option<Vec<String>>,
    /// Freeze everything but the classifier (the last Linear layer), as --freeze does.
    #[arg(long)]
    freeze_backbone: bool,
    /// (Peak) learning rate of the trained parameters other than the classifier, which
    /// keeps --lr (e.g. --lr 0.01 --lr-backbone 0.001); the schedule scales both alike.
    #[arg(long, value_name = "RATE")]
    lr_backbone: Option<f64>,
    /// Quantization-aware training: train through int8 rounding (fake quantization, BatchNorm
    /// folded as PyTorch's QAT does) and write the int8 model (`model-int8.safetensors`)
    /// beside the float checkpoint. Usually with --weights of a trained float model.
    #[arg(long)]
    qat: bool,
    /// With --qat: from this epoch on, activation ranges and BatchNorm statistics are frozen
    /// (default: the last epoch).
    #[arg(long, requires = "qat")]
    qat_freeze_epoch: Option<usize>,
    /// Stochastic weight averaging: the weights at the end of every epoch from this one on
    /// are averaged (torch.optim.swa_utils), the average's BatchNorm statistics recomputed
    /// over the training data, and the averaged model tested and written to
    /// `model-swa.safetensors`. The learning rate follows --schedule (SWA usually trains
    /// these epochs at a constant rate: --schedule constant, or a run of its own from --weights)
    #[arg(long, value_name = "EPOCH", conflicts_with = "ema_decay")]
    swa_start: Option<usize>,
    /// Exponential moving average of the weights and BatchNorm statistics, updated after
    /// every step with this decay (e.g. 0.999; torch.optim.swa_utils with use_buffers); the
    /// averaged model is tested and written to `model-ema.safetensors`
    #[arg(long, value_name = "DECAY")]
    ema_decay: Option<f64>,
    /// Output folder for checkpoints and metrics (default runs/<model>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder (its model.safetensors and train_state.safetensors).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop once this many epochs are complete, leaving the run to be continued with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Use only N training images, spread evenly over the set (keeps the class balance).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Use only N test images, spread evenly over the set.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Fraction held out for testing when the data has no test split.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Skip unreadable images in image folders (and report how many).
    #[arg(long)]
    skip_bad_images: bool,
    /// Do not use or fill the decoded-image cache.
    #[arg(long)]
    no_cache: bool,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Write TensorBoard event files into the run folder (the default): the figures of
    /// metrics.jsonl, weight and gradient histograms per epoch, a few test images with
    /// their predictions. View them with `tensorboard --logdir runs`.
    #[arg(long, overrides_with = "no_tensorboard")]
    tensorboard: bool,
    /// Do not write TensorBoard event files.
    #[arg(long, overrides_with = "tensorboard")]
    no_tensorboard: bool,
    /// Optimizer steps between two points of the TensorBoard series `train/loss_step`.
    #[arg(long, default_value_t = 50)]
    tensorboard_every: usize,
    #[command(flatten)]
    text: crate::sequence::TextArgs,
    #[command(flatten)]
    audio: crate::sequence::AudioArgs,
    #[command(flatten)]
    dist: DistArgs,
}

fn config(a: &TrainArgs, device: convnet::Device) -> TrainConfig {
    TrainConfig {
        epochs: a.epochs,
        optimizer: match a.optimizer {
            OptArg::Sgd => OptimizerKind::Sgd,
            OptArg::Adam => OptimizerKind::Adam,
            OptArg::Adamw => OptimizerKind::AdamW,
        },
        lr: a.lr,
        backbone_lr: a.lr_backbone,
        momentum: a.momentum,
        nesterov: a.nesterov,
        weight_decay: a.weight_decay,
        schedule: match a.schedule {
            SchedArg::Constant => ScheduleKind::Constant,
            SchedArg::Step => ScheduleKind::Step,
            SchedArg::Cosine => ScheduleKind::Cosine,
            SchedArg::Onecycle => ScheduleKind::OneCycle,
        },
        label_smoothing: a.label_smoothing,
        device,
        cuda_graph: a.cuda_graph,
        tf32: a.tf32,
        precision: a.precision.into(),
        kernels: a.kernels.into(),
        average: match (a.swa_start, a.ema_decay) {
            (Some(start_epoch), _) => Some(AverageConfig {
                kind: Averaging::Swa,
                start_epoch,
            }),
            (None, Some(decay)) => Some(AverageConfig {
                kind: Averaging::Ema { decay },
                start_epoch: 1,
            }),
            (None, None) => None,
        },
    }
}

fn default_out(model: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{model}-{secs}"))
}

/// The run being continued with `--resume DIR`: its settings and training state as rank 0
/// read them (every rank gets the same bytes), and the checkpoint for states of older
/// versions, which do not hold the weights.
struct Resumed {
    dir: PathBuf,
    saved: SavedRun,
    state: Vec<u8>,
    /// Epochs the state has completed.
    epoch: usize,
    meta: HashMap<String, String>,
    checkpoint: Option<Vec<u8>>,
}

/// Settings that say how an invocation computes or reports, not what it computes: a
/// resumed run takes them from the command line.
const INVOCATION_SETTINGS: [&str; 18] = [
    "device",
    "threads",
    "cuda_graph",
    "tf32",
    "precision",
    "bucket_mb",
    "no_overlap",
    "dist_backend",
    "stop_after",
    "no_cache",
    "json",
    "out",
    "resume",
    "epochs",
    "model",
    "tensorboard",
    "no_tensorboard",
    "tensorboard_every",
];

impl Resumed {
    fn read(dir: &Path, ranks: &Ranks) -> Result<Resumed> {
        let state_path = dir.join("train_state.safetensors");
        let state = read_on_rank0(ranks, &state_path).with_context(|| {
            format!("--resume {}: no training state to continue", dir.display())
        })?;
        let (tensors, meta) = convnet::checkpoint::tensors_from_bytes(&state_path, &state)?;
        let saved: serde_json::Value = serde_json::from_str(
            meta.get(RUN_KEY)
                .context("training state has no run settings")?,
        )?;
        let saved = serde_json::from_value::<SavedRun>(saved)
            .context("training state has unreadable run settings")?;
        let epoch = meta
            .get("epoch")
            .and_then(|e| e.parse().ok())
            .context("training state has no epoch")?;
        let checkpoint = match state_has_weights(&tensors) {
            true => None,
            false => Some(read_on_rank0(ranks, &dir.join("model.safetensors"))?),
        };
        Ok(Resumed {
            dir: dir.to_path_buf(),
            saved,
            state,
            epoch,
            meta,
            checkpoint,
        })
    }

    /// The arguments of the resumed run: its saved settings, with how this invocation
    /// computes and reports (device, threads, ...) taken from `now`. A run-defining flag
    /// given on the command line (`explicit`) must agree with the saved run, except
    /// `--epochs`, which may extend a run with a constant learning rate. Returns the
    /// arguments and what the command line changed.
    fn args(&self, now: TrainArgs, explicit: &[String]) -> Result<(TrainArgs, Vec<String>)> {
        let saved_epochs = self.saved.epochs.unwrap_or(now.epochs);
        let mut a = self.saved.clone().into_args(saved_epochs, now.json);
        // The run's device and threads unless this invocation names others.
        let given = |id: &str| explicit.iter().any(|e| e == id);
        if given("device") {
            a.device = now.device.clone();
        }
        if given("threads") {
            a.threads = now.threads;
        }
        (a.cuda_graph, a.tf32, a.precision) = (now.cuda_graph, now.tf32, now.precision);
        (a.dist.bucket_mb, a.dist.no_overlap, a.dist.dist_backend) = (
            now.dist.bucket_mb,
            now.dist.no_overlap,
            now.dist.dist_backend,
        );
        (a.stop_after, a.no_cache) = (now.stop_after, now.no_cache);
        (a.tensorboard, a.no_tensorboard, a.tensorboard_every) =
            (now.tensorboard, now.no_tensorboard, now.tensorboard_every);
        a.out = Some(now.out.clone().unwrap_or(self.dir.clone()));
        a.resume = Some(self.dir.clone());
        let flag = |id: &str| format!("--{}", id.replace('_', "-"));
        let mut changes = Vec::new();
        let given = SavedRun::from_args(
            &now,
            &ModelSpec::from_checkpoint(&self.saved.model, self.saved.model_spec.as_deref())?,
        );
        for id in explicit {
            match id.as_str() {
                "epochs" if now.epochs != a.epochs => {
                    if now.epochs <= self.epoch {
                        bail!(
                            "{} --epochs {}: the run has already completed {} epochs",
                            flag("resume"),
                            now.epochs,
                            self.epoch
                        );
                    }
                    if a.schedule != SchedArg::Constant {
                        bail!(
                            "--epochs {} would change the run's {} learning-rate schedule, planned over {} epochs, after {} of them were trained with it; a resumed run continues as it was started (start a new run to train longer)",
                            now.epochs, self.saved.schedule, a.epochs, self.epoch
                        );
                    }
                    changes.push(format!("--epochs {} -> {}", a.epochs, now.epochs));
                    a.epochs = now.epochs;
                }
                "model" | "model_file"
                    if now.model != self.saved.model || now.model_file.is_some() =>
                {
                    bail!(
                        "{}: the model of a resumed run is the run's own ({}); leave out {}",
                        self.dir.display(),
                        self.saved.model,
                        flag(id)
                    );
                }
                id if INVOCATION_SETTINGS.contains(&id) => {}
                id => {
                    let (mine, theirs) = (given.setting(id), self.saved.setting(id));
                    if mine.is_some() && mine != theirs {
                        bail!(
                            "{} {} differs from the run's {}: a resumed run continues as it was started (leave the flag out, or start a new run with another --out)",
                            flag(id),
                            mine.map_or("?".into(), |v| v.to_string()),
                            theirs.map_or("none".into(), |v| v.to_string())
                        );
                    }
                }
            }
        }
        Ok((a, changes))
    }

    /// Loads the training state (and, for states of older versions, the checkpoint's
    /// weights) into `trainer`.
    fn restore(&self, trainer: &mut Trainer, a: &TrainArgs, shape: [usize; 3]) -> Result<()> {
        if let Some(bytes) = &self.checkpoint {
            let ckpt_path = self.dir.join("model.safetensors");
            let (tensors, meta) = checkpoint_from_bytes(&ckpt_path, bytes)?;
            if meta.architecture != a.model || meta.input_shape != shape {
                bail!(
                    "{}: checkpoint is {} for {:?} but the run is {} for {:?}",
                    self.dir.display(),
                    meta.architecture,
                    meta.input_shape,
                    a.model,
                    shape
                );
            }
            if meta.epoch != self.epoch {
                bail!("{}: the checkpoint (epoch {}) and the training state (epoch {}) disagree; the run was interrupted while saving", self.dir.display(), meta.epoch, self.epoch);
            }
            trainer.model().load_state_dict(&tensors, true)?;
        }
        trainer.load_state_from_bytes(&self.dir.join("train_state.safetensors"), &self.state)?;
        Ok(())
    }
}

/// The examples of a run: images, or texts (and audio) already made into numbers.
enum Examples {
    Images(ImageDataset),
    Features(FeatureDataset),
}

impl Examples {
    fn len(&self) -> usize {
        match self {
            Examples::Images(d) => d.len(),
            Examples::Features(d) => d.len(),
        }
    }
}

/// The run's training and test sets with what the model needs to know of them.
struct RunData {
    train: Examples,
    test: Examples,
    /// The image shape (`[0, 0, 0]` for sequences).
    shape: [usize; 3],
    /// One example's shape, batch excluded.
    input: Vec<usize>,
    classes: Vec<String>,
    normalize: Normalize,
    /// For texts: the input and tokenizer that go into the checkpoint.
    sequence: Option<SequenceMeta>,
    vocabulary: Option<usize>,
}

impl RunData {
    fn open(a: &TrainArgs, lead: bool) -> Result<RunData> {
        if let Some((path, kind)) = a
            .data
            .as_deref()
            .and_then(|p| crate::sequence::kind_of(p).map(|k| (p, k)))
        {
            return RunData::open_sequences(a, path, kind);
        }
        let geometry = resize_crop(a.resize, a.crop)?;
        // Augmented training takes its random crops from the centre squares; the test
        // images are cut to the crop after.
        let stored = match (geometry, a.augment) {
            (Some(g), true) => Some(ResizeCrop::new(g.resize, g.resize)?),
            (g, _) => g,
        };
        let opts = FolderOptions {
            skip_bad_images: a.skip_bad_images,
            cache: !a.no_cache,
            resize: stored,
        };
        let (mut train, mut test) = open_data(a.data.as_deref(), &opts, a.holdout)?;
        if let (Some(g), true) = (geometry, a.augment) {
            test = test.resized(g)?;
        }
        if let Some(names) = &a.classes {
            train = train.with_classes(names)?;
            test = test.with_classes(names)?;
        }
        if let Some(n) = a.limit_train {
            train = train.spread(n);
        }
        if let Some(n) = a.limit_test {
            test = test.spread(n);
        }
        for (name, ds) in [("training", &train), ("test", &test)] {
            if ds.skipped > 0 && lead {
                eprintln!(
                    "skipped {} unreadable image(s) in the {name} data ({})",
                    ds.skipped, ds.source
                );
            }
        }
        if train.is_empty() || test.is_empty() {
            bail!("the training or test set is empty");
        }
        let shape = test.image_shape();
        Ok(RunData {
            shape,
            input: shape.to_vec(),
            classes: train.classes().to_vec(),
            normalize: Normalize::default_for(shape[0]),
            train: Examples::Images(train),
            test: Examples::Images(test),
            sequence: None,
            vocabulary: None,
        })
    }

    /// Texts: the tokenizer is fitted on the training split; image-only settings are refused.
    fn open_sequences(a: &TrainArgs, path: &Path, kind: crate::sequence::Kind) -> Result<RunData> {
        let image_only = [
            ("--augment", a.augment),
            ("--resize", a.resize.is_some()),
            ("--cutout", a.cutout > 0),
            ("--qat", a.qat),
        ];
        let what = match kind {
            crate::sequence::Kind::Text => "texts",
            crate::sequence::Kind::Audio => "sound clips",
        };
        if let Some((flag, _)) = image_only.iter().find(|(_, on)| *on) {
            bail!("{flag} applies to images; {} holds {what}", path.display());
        }
        let audio = a.audio.options(&a.model);
        let data = crate::sequence::open_training(path, kind, &a.text, &audio, a.holdout)?;
        let (mut train, mut test) = (data.train, data.test);
        if let Some(names) = &a.classes {
            train = train.with_classes(names)?;
            test = test.with_classes(names)?;
        }
        if let Some(n) = a.limit_train {
            train = train.spread(n);
        }
        if let Some(n) = a.limit_test {
            test = test.spread(n);
        }
        if train.is_empty() {
            bail!("{} leaves no {what} to train on", path.display());
        }
        if test.is_empty() {
            bail!(
                "{} leaves no {what} to test on: a set without a test split is split per class by --holdout ({}), which rounds to none for classes this small; raise --holdout or give train and test splits",
                path.display(),
                a.holdout
            );
        }
        Ok(RunData {
            shape: [0; 3],
            input: data.meta.input.clone(),
            classes: train.classes().to_vec(),
            normalize: data.normalize,
            train: Examples::Features(train),
            test: Examples::Features(test),
            sequence: Some(data.meta),
            vocabulary: data.vocabulary,
        })
    }

    /// What every rank's data must agree on.
    fn facts(&self) -> serde_json::Value {
        serde_json::json!({
            "training images": self.train.len(), "test images": self.test.len(),
            "input": self.input, "classes": self.classes, "vocabulary": self.vocabulary,
        })
    }
}

/// Checks the arguments that need no data.
fn check_args(a: &TrainArgs, ranks: &Ranks) -> Result<()> {
    if a.epochs == 0 || a.batch_size == 0 {
        bail!("--epochs and --batch-size must be positive");
    }
    if !(0.0..=1.0).contains(&a.label_smoothing) {
        bail!(
            "--label-smoothing must be in [0, 1], got {}",
            a.label_smoothing
        );
    }
    if a.qat && ranks.size() > 1 {
        bail!("--qat runs on one process: each rank would learn its own activation ranges");
    }
    if a.qat_freeze_epoch == Some(0) {
        bail!("--qat-freeze-epoch counts from 1");
    }
    if let Some(start) = a.swa_start {
        if start == 0 || start > a.epochs {
            bail!(
                "--swa-start must be an epoch of the run, 1 to {}, got {start}",
                a.epochs
            );
        }
    }
    if let Some(decay) = a.ema_decay {
        if !(0.0..1.0).contains(&decay) {
            bail!("--ema-decay must be in [0, 1), e.g. 0.999, got {decay}");
        }
    }
    if a.qat && (a.swa_start.is_some() || a.ema_decay.is_some()) {
        bail!("--swa-start and --ema-decay do not combine with --qat (its int8 model is converted from the trained weights)");
    }
    if a.tensorboard_every == 0 {
        bail!("--tensorboard-every must be positive");
    }
    let freezing = a.freeze.is_some() || a.freeze_backbone;
    if freezing && a.qat {
        bail!("--freeze and --freeze-backbone do not combine with --qat (quantization-aware training folds BatchNorm layers its own way)");
    }
    if a.lr_backbone.is_some() && a.freeze_backbone {
        bail!("--lr-backbone with --freeze-backbone: the backbone is frozen, nothing trains at that rate");
    }
    if let Some(rate) = a.lr_backbone {
        if !(rate.is_finite() && rate >= 0.0) {
            bail!("--lr-backbone must be a non-negative number, got {rate}");
        }
    }
    if a.freeze
        .as_ref()
        .is_some_and(|p| p.iter().any(|p| p.is_empty()))
    {
        bail!("--freeze takes state_dict name prefixes separated by commas, e.g. conv1,bn1,layer1");
    }
    resize_crop(a.resize, a.crop)?;
    a.dist.check(a.batch_size, ranks)
}

/// `--resize N [--crop M]` as a checked geometry (the crop defaults to N).
pub(crate) fn resize_crop(
    resize: Option<usize>,
    crop: Option<usize>,
) -> Result<Option<ResizeCrop>> {
    match (resize, crop) {
        (Some(n), m) => Ok(Some(
            ResizeCrop::new(n, m.unwrap_or(n)).context("--resize/--crop")?,
        )),
        (None, Some(_)) => bail!("--crop needs --resize"),
        (None, None) => Ok(None),
    }
}

/// The side of the images a `--resize N [--crop M]` run trains on.
fn shape_of_crop(resize: Option<usize>, crop: Option<usize>) -> usize {
    crop.or(resize).unwrap_or(0)
}

/// Fine-tuning to another number of classes: when `tensors` (weights to start from) hold a
/// classifier — the model's last Linear layer — of another output count than `model`'s,
/// they get `model`'s freshly initialised one instead; returns what was done. Any other
/// difference is left for `load_state_dict` to report.
fn replace_classifier(
    model: &convnet::nn::Model,
    tensors: &mut convnet::checkpoint::NamedTensors,
) -> Result<Option<String>> {
    let Some(fc) = model.classifier()? else {
        return Ok(None);
    };
    let own = model.state_dict();
    let weight = format!("{fc}.weight");
    let (Some(theirs), Some(mine)) = (
        tensors
            .iter()
            .find(|(n, _)| *n == weight)
            .map(|(_, t)| t.dims().to_vec()),
        own.iter()
            .find(|(n, _)| *n == weight)
            .map(|(_, t)| t.dims().to_vec()),
    ) else {
        return Ok(None);
    };
    if theirs == mine || theirs.len() != 2 || theirs[1] != mine[1] {
        return Ok(None);
    }
    let prefix = format!("{fc}.");
    tensors.retain(|(n, _)| !n.starts_with(&prefix));
    tensors.extend(own.into_iter().filter(|(n, _)| n.starts_with(&prefix)));
    Ok(Some(format!(
        "classifier {fc} replaced: {} -> {} outputs, freshly initialised",
        theirs[0], mine[0]
    )))
}

/// A progress bar for an epoch on rank 0, nothing elsewhere.
fn epoch_bar(lead: bool, epoch: usize, epochs: usize, batches: usize) -> ProgressBar {
    if !lead {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(batches as u64);
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// Trains as `a` says; `explicit` names the arguments given on the command line (a
/// resumed run takes the others from the run it continues).
pub fn run(a: TrainArgs, explicit: &[String], ranks: &Ranks) -> Result<()> {
    // Only rank 0 prints, draws progress and writes files.
    let lead = ranks.rank() == 0;
    let resumed = match &a.resume {
        Some(dir) => Some(Resumed::read(dir, ranks)?),
        None => None,
    };
    let (mut a, changes) = match &resumed {
        Some(r) => r.args(a, explicit)?,
        None => (a, Vec::new()),
    };
    check_args(&a, ranks)?;
    // The device and threads of this invocation (a resumed run may continue on others).
    let device = check_device(&device_spec(&a.device, ranks))?;
    set_threads(threads_per_rank(a.threads, ranks))?;
    if let (Some(name), None) = (&a.pretrained, &resumed) {
        let entries = crate::pretrained::entries()?;
        let Some(entry) = entries.iter().find(|e| &e.name == name) else {
            let known: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
            bail!(
                "no pretrained model {name:?}; available: {}",
                known.join(", ")
            );
        };
        if explicit.iter().any(|e| e == "model") && a.model != entry.architecture {
            bail!(
                "--pretrained {name} is a {}, not a {}: leave out --model",
                entry.architecture,
                a.model
            );
        }
        a.model = entry.architecture.clone();
    }
    // Texts train text-cnn, sound clips m5, unless a model is named.
    let named = explicit.iter().any(|e| e == "model") || a.model_file.is_some();
    if resumed.is_none() && !named && a.pretrained.is_none() {
        match a.data.as_deref().and_then(crate::sequence::kind_of) {
            Some(crate::sequence::Kind::Text) => a.model = "text-cnn".into(),
            Some(crate::sequence::Kind::Audio) => a.model = "m5".into(),
            None => {}
        }
    }
    let spec = match (&resumed, &a.model_file) {
        (Some(r), _) => ModelSpec::from_checkpoint(&r.saved.model, r.saved.model_spec.as_deref())?,
        (None, Some(path)) => ModelSpec::File(ModelFile::from_path(path)?),
        (None, None) => ModelSpec::zoo(&a.model)?,
    };
    a.model = spec.name().to_string();
    let cfg = config(&a, device);
    convnet::manual_seed(a.seed);
    let data = RunData::open(&a, lead)?;
    let saved_run = SavedRun::from_args(&a, &spec);
    let mut facts = data.facts();
    if let (Some(facts), serde_json::Value::Object(run)) =
        (facts.as_object_mut(), serde_json::to_value(&saved_run)?)
    {
        facts.extend(
            run.into_iter()
                .filter(|(k, _)| k != "data" && k != "threads"),
        );
        facts.insert("epochs".into(), a.epochs.into());
        facts.insert("stop_after".into(), a.stop_after.into());
        // Ranks must cut their gradients into the same buckets.
        facts.insert("bucket_mb".into(), a.dist.bucket_mb.into());
        facts.insert(
            "dist_backend".into(),
            format!("{:?}", a.dist.dist_backend).into(),
        );
    }
    check_same_everywhere(ranks, &facts)?;
    let run_json = serde_json::to_string(&saved_run)?;
    let mut model = spec.build_for(&data.input, data.vocabulary, data.classes.len())?;
    // The weights a new run starts from (a resumed run has its own).
    let start = match (&a.weights, &a.pretrained) {
        _ if resumed.is_some() => None,
        (Some(path), _) => Some((path.clone(), convnet::checkpoint::load_tensors(path)?.0)),
        (None, Some(name)) => Some((
            PathBuf::from(format!("pretrained {name}")),
            crate::pretrained::load(name)?.0,
        )),
        (None, None) => None,
    };
    if let Some((path, mut tensors)) = start {
        if let Some(note) = replace_classifier(&model, &mut tensors)? {
            if lead && !a.json {
                println!("{}: {note}", path.display());
            }
        }
        model.load_state_dict(&tensors, true).with_context(|| {
            format!(
                "the weights of {} do not fit {} for inputs {:?} and {} classes",
                path.display(),
                a.model,
                data.input,
                data.classes.len()
            )
        })?;
        model
            .check_finite()
            .with_context(|| format!("--weights {}", path.display()))?;
    }
    if a.qat {
        if device != convnet::Device::Cpu {
            bail!("--qat trains on the CPU");
        }
        model = QatNet::new(model)?.into_model()?;
    }
    let frozen = match (&a.freeze, a.freeze_backbone) {
        (Some(prefixes), _) => Some(model.freeze(prefixes).context("--freeze")?),
        (None, true) => Some(model.freeze_backbone().context("--freeze-backbone")?),
        (None, false) => None,
    };
    if let (Some(names), true) = (&frozen, lead && !a.json) {
        let values: usize = model
            .named_parameters()
            .iter()
            .filter(|(_, t)| !t.tracks_grad())
            .map(|(_, t)| t.numel())
            .sum();
        println!(
            "frozen: {} parameter tensors ({values} of {} parameters); {} trained",
            names.len(),
            model.num_parameters(),
            model.num_parameters() - values
        );
    }
    let freeze_epoch = a.qat_freeze_epoch.unwrap_or(a.epochs);
    let augment = a.augment.then_some(match a.resize {
        Some(_) => Augment {
            cutout: a.cutout,
            ..Augment::resized_crop(shape_of_crop(a.resize, a.crop))
        },
        None => Augment {
            cutout: a.cutout,
            ..Augment::cifar()
        },
    });
    let (shape, classes, normalize) = (data.shape, data.classes.clone(), data.normalize.clone());
    let (input, sequence) = (data.input.clone(), data.sequence.clone());
    let loader_cfg = LoaderConfig {
        batch_size: a.batch_size,
        shuffle: true,
        seed: a.seed,
        rank: ranks.rank(),
        world_size: ranks.size(),
        ..Default::default()
    };
    let train_loader = match data.train {
        Examples::Images(train) => DataLoader::new(
            Arc::new(train),
            Transform {
                normalize: normalize.clone(),
                augment,
            },
            loader_cfg,
        )?,
        Examples::Features(train) => DataLoader::for_features(Arc::new(train), loader_cfg)?,
    };
    let test_loader = match data.test {
        Examples::Images(test) => DataLoader::for_evaluation_sharded(
            Arc::new(test),
            normalize.clone(),
            ranks.rank(),
            ranks.size(),
        )?,
        Examples::Features(test) => {
            DataLoader::for_evaluation_features(Arc::new(test), ranks.rank(), ranks.size())?
        }
    };
    let mut trainer = Trainer::new(model, cfg, train_loader.num_batches())?;
    if lead
        && a.precision == PrecisionArg::Bf16
        && trainer.config().device == convnet::Device::Cpu
        && convnet::backend::cpu::bf16::Bf16Kernel::best()
            == Some(convnet::backend::cpu::bf16::Bf16Kernel::Avx512)
    {
        eprintln!(
            "note: this CPU has AVX512-BF16 but not AMX: bf16 runs direct kernels for 3x3 \
             convolutions with padding 1 and im2col for the other layers, so models made \
             mostly of other layers can train slower than in float32 (compare \
             `convnet bench --precision bf16` with `--precision f32`)"
        );
    }
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.model));
    let folder = RunFolder::open(&out, resumed.is_some(), lead)?;
    let mut board = board::Board::open(
        &out,
        lead && !a.no_tensorboard,
        a.tensorboard_every,
        &mut trainer,
        &train_loader,
    )?;
    let mut history = Vec::new();
    if let Some(r) = &resumed {
        r.restore(&mut trainer, &a, shape)?;
        if let Some(qat) = QatNet::of(trainer.model()) {
            let ranges: Vec<(f32, f32)> = r
                .meta
                .get(QAT_RANGES_KEY)
                .and_then(|s| serde_json::from_str(s).ok())
                .context("the training state of a --qat run has no activation ranges")?;
            qat.set_ranges(&ranges)?;
        }
        history = folder.history(&r.meta, r.epoch);
        if lead {
            eprintln!(
                "resuming {} at epoch {} of {}{}",
                r.dir.display(),
                trainer.epoch(),
                a.epochs,
                if changes.is_empty() {
                    String::new()
                } else {
                    format!(" (changed: {})", changes.join(", "))
                }
            );
        }
    }
    let meta = |trainer: &Trainer| CheckpointMeta {
        architecture: a.model.clone(),
        input_shape: shape,
        classes: classes.clone(),
        normalize: normalize.clone(),
        epoch: trainer.epoch(),
        step: trainer.step(),
        model_spec: spec.model_spec(),
        sequence: sequence.clone(),
    };
    if lead {
        // A new run is resumable from its first instant; a resumed one gets its checkpoint
        // and metrics file rewritten from its state (a kill may have left them behind it).
        folder.save(&trainer, &meta(&trainer), &run_json, &history)?;
    }
    if ranks.size() > 1 {
        trainer.distribute(ranks.clone(), a.dist.options())?;
        if let Some(dp) = trainer.data_parallel_mut() {
            a.dist.set_up_gpu_reduction(dp, device, lead)?;
        }
    }
    if lead && !a.json {
        println!(
            "training {} ({} parameters) on {} {} of {:?}, testing on {}; writing to {}",
            a.model,
            trainer.model().num_parameters(),
            train_loader.len(),
            match &sequence {
                Some(s) if s.tokenizer.is_some() => "texts",
                Some(_) => "clips",
                None => "images",
            },
            input,
            test_loader.len(),
            out.display()
        );
        if ranks.size() > 1 {
            println!(
                "data-parallel on {} ranks over {}, {} compute threads each; global batch {} ({} per rank){}",
                ranks.size(),
                ranks.description(),
                rayon::current_num_threads(),
                a.batch_size,
                a.batch_size / ranks.size(),
                if a.dist.sync_bn { ", synchronised batch norm" } else { "" }
            );
        }
    }
    let mut last = None;
    let mut train_ips = Vec::new();
    let stop_at = a.stop_after.map_or(a.epochs, |s| s.min(a.epochs));
    let mut graph_noted = false;
    while trainer.epoch() < stop_at {
        let epoch = trainer.epoch() + 1;
        if let Some(qat) = QatNet::of(trainer.model()) {
            qat.freeze(epoch >= freeze_epoch);
        }
        let bar = epoch_bar(lead, epoch, a.epochs, train_loader.num_batches());
        let stats = trainer.train_epoch(&train_loader, &mut |p| {
            bar.set_position(p.batch as u64);
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% {:.0} img/s",
                p.loss,
                100.0 * p.accuracy,
                p.images_per_sec
            ));
            board.batch(p);
        });
        bar.finish_and_clear();
        let stats = stats.with_context(|| {
            format!(
                "training stopped; the last good checkpoint is {}",
                folder.checkpoint.display()
            )
        })?;
        if let (true, true, Some(why)) =
            (lead, a.cuda_graph && !graph_noted, trainer.graph_refused())
        {
            eprintln!("note: training steps run without a CUDA graph: {why}");
            graph_noted = true;
        }
        let test = evaluate_distributed(trainer.model(), &test_loader, ranks.as_ref())?;
        train_ips.push(stats.images_per_sec);
        if lead {
            history.push(serde_json::json!({
                "epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                "test_loss": test.loss, "test_accuracy": test.accuracy, "lr": stats.lr,
                "seconds": stats.seconds, "train_images_per_sec": stats.images_per_sec,
            }));
            folder.save(&trainer, &meta(&trainer), &run_json, &history)?;
            println!(
                "epoch {epoch:>3}/{}  train loss {:.4} acc {:6.2}%  test loss {:.4} acc {:6.2}%  lr {:.5}  {:.1}s ({:.0} img/s)",
                a.epochs, stats.loss, 100.0 * stats.accuracy, test.loss, 100.0 * test.accuracy, stats.lr, stats.seconds, stats.images_per_sec
            );
            let images = test_loader
                .images()
                .filter(|_| epoch == a.epochs)
                .map(|d| (d, &normalize));
            board.epoch(epoch, history.last(), &trainer, images);
        }
        last = Some(test);
    }
    let test = match last {
        Some(t) => t,
        None => evaluate_distributed(trainer.model(), &test_loader, ranks.as_ref())?,
    };
    let averaged_meta = lead.then(|| meta(&trainer));
    let averaged = averaged_model(
        &mut trainer,
        &train_loader,
        &test_loader,
        ranks.as_ref(),
        &folder,
        averaged_meta,
    )?;
    if !lead {
        return Ok(());
    }
    // The learning curves of the run so far; a picture that cannot be drawn costs the run
    // nothing but a note.
    let curves = out.join("curves.png");
    if let Err(e) = convnet::viz::plot_run_folders(&[&out], &curves) {
        eprintln!("note: {} not written: {e}", curves.display());
    }
    let int8 = match QatNet::of(trainer.model()) {
        Some(qat) => {
            let q = qat.convert()?;
            let r = evaluate_distributed(&q, &test_loader, ranks.as_ref())?;
            if !a.json {
                println!(
                    "int8 model {} ({} int8 layers): test accuracy {:.2}%",
                    folder.int8.display(),
                    q.int8_layers(),
                    100.0 * r.accuracy
                );
            }
            Some(r.accuracy)
        }
        None => None,
    };
    let ips = if train_ips.is_empty() {
        0.0
    } else {
        train_ips.iter().sum::<f64>() / train_ips.len() as f64
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "test_accuracy": test.accuracy, "test_loss": test.loss, "epochs": trainer.epoch(),
                "train_images_per_sec": ips, "checkpoint": folder.checkpoint.display().to_string(),
                "ranks": ranks.size(), "int8_test_accuracy": int8,
                "int8_checkpoint": int8.map(|_| folder.int8.display().to_string()),
                "averaged_test_accuracy": averaged.as_ref().map(|a| a.test.accuracy),
                "averaged_checkpoint": averaged.as_ref().map(|a| a.checkpoint.display().to_string()),
            })
        );
    } else {
        println!(
            "test accuracy {:.2}% (loss {:.4}) after {} epochs; checkpoint {}",
            100.0 * test.accuracy,
            test.loss,
            trainer.epoch(),
            folder.checkpoint.display()
        );
        if let Some(avg) = &averaged {
            println!(
                "averaged weights ({}): test accuracy {:.2}% (loss {:.4}); checkpoint {}",
                avg.what,
                100.0 * avg.test.accuracy,
                avg.test.loss,
                avg.checkpoint.display()
            );
        }
    }
    Ok(())
}

/// The model with the run's averaged weights, tested.
struct Averaged {
    /// How the weights were averaged, in words.
    what: String,
    test: convnet::train::EvalReport,
    checkpoint: PathBuf,
}

/// Tests the averaged weights of a run that averages them (every rank takes part) and,
/// given the checkpoint's `meta` (rank 0), writes them into `folder`; `None` when nothing
/// is averaged yet.
fn averaged_model(
    trainer: &mut Trainer,
    train_loader: &DataLoader,
    test_loader: &DataLoader,
    comm: &dyn convnet::dist::Communicator,
    folder: &RunFolder,
    meta: Option<CheckpointMeta>,
) -> Result<Option<Averaged>> {
    let Some(avg) = trainer.weight_average() else {
        return Ok(None);
    };
    let (kind, count) = (avg.kind(), avg.count());
    let checkpoint = folder.averaged(kind);
    let what = match kind {
        Averaging::Swa => format!(
            "SWA over {count} epoch ends, BatchNorm statistics recomputed on the training data"
        ),
        Averaging::Ema { decay } => format!("EMA over {count} steps, decay {decay}"),
    };
    let test = trainer.with_averaged_weights(train_loader, |model| {
        let test = evaluate_distributed(model, test_loader, comm)?;
        if let Some(meta) = &meta {
            convnet::checkpoint::save_checkpoint(&checkpoint, &model.state_dict(), meta)?;
        }
        Ok(test)
    })?;
    Ok(test.map(|test| Averaged {
        what,
        test,
        checkpoint,
    }))
}

/// The settings of a run, stored in its training state so `--resume` continues it as it was.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct SavedRun {
    model: String,
    #[serde(default)]
    model_spec: Option<String>,
    data: Option<PathBuf>,
    batch_size: usize,
    optimizer: String,
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    schedule: String,
    augment: bool,
    cutout: usize,
    label_smoothing: f32,
    seed: u64,
    threads: usize,
    limit_train: Option<usize>,
    limit_test: Option<usize>,
    holdout: f64,
    skip_bad_images: bool,
    #[serde(default)]
    sync_bn: bool,
    /// Total epochs of the run (absent in states of older versions).
    #[serde(default)]
    epochs: Option<usize>,
    /// The device it was started on (absent in states of older versions: the CPU).
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    weights: Option<PathBuf>,
    #[serde(default)]
    qat: bool,
    #[serde(default)]
    qat_freeze_epoch: Option<usize>,
    #[serde(default)]
    swa_start: Option<usize>,
    #[serde(default)]
    ema_decay: Option<f64>,
    #[serde(default)]
    classes: Option<Vec<String>>,
    #[serde(default)]
    pretrained: Option<String>,
    #[serde(default)]
    freeze: Option<Vec<String>>,
    #[serde(default)]
    freeze_backbone: bool,
    #[serde(default)]
    lr_backbone: Option<f64>,
    #[serde(default)]
    resize: Option<usize>,
    #[serde(default)]
    crop: Option<usize>,
    /// Text runs: how texts become tokens (absent in states of older versions).
    #[serde(default)]
    tokens: Option<String>,
    #[serde(default)]
    min_freq: Option<usize>,
    #[serde(default)]
    max_len: Option<usize>,
    /// Audio runs: how clips become inputs (absent in states of older versions).
    #[serde(default)]
    sample_rate: Option<u32>,
    #[serde(default)]
    clip_samples: Option<usize>,
    #[serde(default)]
    features: Option<String>,
    #[serde(default)]
    n_fft: Option<usize>,
    #[serde(default)]
    hop_length: Option<usize>,
    #[serde(default)]
    n_mels: Option<usize>,
}

impl SavedRun {
    fn from_args(a: &TrainArgs, spec: &ModelSpec) -> Self {
        let name = |v: &dyn ValueEnumName| v.name();
        SavedRun {
            model: a.model.clone(),
            model_spec: spec.model_spec(),
            data: a
                .data
                .as_ref()
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())),
            batch_size: a.batch_size,
            optimizer: name(&a.optimizer),
            lr: a.lr,
            momentum: a.momentum,
            nesterov: a.nesterov,
            weight_decay: a.weight_decay,
            schedule: name(&a.schedule),
            augment: a.augment,
            cutout: a.cutout,
            label_smoothing: a.label_smoothing,
            seed: a.seed,
            threads: a.threads,
            limit_train: a.limit_train,
            limit_test: a.limit_test,
            holdout: a.holdout,
            skip_bad_images: a.skip_bad_images,
            sync_bn: a.dist.sync_bn,
            epochs: Some(a.epochs),
            device: Some(a.device.clone()),
            weights: a
                .weights
                .as_ref()
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())),
            qat: a.qat,
            qat_freeze_epoch: a.qat_freeze_epoch,
            swa_start: a.swa_start,
            ema_decay: a.ema_decay,
            classes: a.classes.clone(),
            pretrained: a.pretrained.clone(),
            freeze: a.freeze.clone(),
            freeze_backbone: a.freeze_backbone,
            lr_backbone: a.lr_backbone,
            resize: a.resize,
            crop: a.crop,
            tokens: Some(name(&a.text.tokens)),
            min_freq: Some(a.text.min_freq),
            max_len: Some(a.text.max_len),
            sample_rate: Some(a.audio.sample_rate),
            clip_samples: Some(a.audio.clip_samples),
            features: a.audio.features.map(|f| name(&f)),
            n_fft: Some(a.audio.n_fft),
            hop_length: Some(a.audio.hop_length),
            n_mels: Some(a.audio.n_mels),
        }
    }

    /// The value of one setting, by its argument name (`batch_size`), as JSON.
    fn setting(&self, name: &str) -> Option<serde_json::Value> {
        serde_json::to_value(self).ok()?.get(name).cloned()
    }

    fn into_args(self, epochs: usize, json: bool) -> TrainArgs {
        TrainArgs {
            model: self.model,
            model_file: None,
            data: self.data,
            epochs,
            batch_size: self.batch_size,
            optimizer: OptArg::from_str(&self.optimizer, true).unwrap_or(OptArg::Sgd),
            lr: self.lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            schedule: SchedArg::from_str(&self.schedule, true).unwrap_or(SchedArg::Constant),
            augment: self.augment,
            cutout: self.cutout,
            label_smoothing: self.label_smoothing,
            seed: self.seed,
            threads: self.threads,
            device: self.device.unwrap_or_else(|| "cpu".into()),
            cuda_graph: false,
            tf32: false,
            precision: PrecisionArg::F32,
            kernels: KernelsArg::Rules,
            weights: self.weights,
            qat: self.qat,
            qat_freeze_epoch: self.qat_freeze_epoch,
            swa_start: self.swa_start,
            ema_decay: self.ema_decay,
            classes: self.classes,
            pretrained: self.pretrained,
            freeze: self.freeze,
            freeze_backbone: self.freeze_backbone,
            lr_backbone: self.lr_backbone,
            resize: self.resize,
            crop: self.crop,
            text: crate::sequence::TextArgs {
                tokens: self
                    .tokens
                    .and_then(|t| crate::sequence::TokensArg::from_str(&t, true).ok())
                    .unwrap_or(crate::sequence::TokensArg::Word),
                min_freq: self.min_freq.unwrap_or(2),
                max_len: self.max_len.unwrap_or(200),
            },
            audio: crate::sequence::AudioArgs {
                sample_rate: self.sample_rate.unwrap_or(8000),
                clip_samples: self.clip_samples.unwrap_or(8000),
                features: self
                    .features
                    .and_then(|f| crate::sequence::FeaturesArg::from_str(&f, true).ok()),
                n_fft: self.n_fft.unwrap_or(256),
                hop_length: self.hop_length.unwrap_or(80),
                n_mels: self.n_mels.unwrap_or(40),
            },
            out: None,
            resume: None,
            stop_after: None,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            holdout: self.holdout,
            skip_bad_images: self.skip_bad_images,
            no_cache: false,
            json,
            tensorboard: false,
            no_tensorboard: false,
            tensorboard_every: 50,
            dist: DistArgs {
                sync_bn: self.sync_bn,
                bucket_mb: 25.0,
                no_overlap: false,
                dist_backend: DistBackend::Auto,
            },
        }
    }
}

trait ValueEnumName {
    fn name(&self) -> String;
}

impl<T: ValueEnum> ValueEnumName for T {
    fn name(&self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}
