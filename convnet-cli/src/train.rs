//! `convnet train`: train a model, test it after every epoch, write checkpoints and metrics.

use crate::common::{check_device, open_data, set_threads};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::checkpoint::{load_checkpoint, save_checkpoint, CheckpointMeta};
use convnet::data::{Augment, DataLoader, FolderOptions, LoaderConfig, Normalize, Transform};
use convnet::model_file::ModelFile;
use convnet::models::ModelSpec;
use convnet::train::{evaluate, OptimizerKind, ScheduleKind, TrainConfig, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::Write;
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
    /// Augment training images: random crop with 4-pixel padding and horizontal flip.
    #[arg(long)]
    augment: bool,
    /// Cutout square size when augmenting (0 = off).
    #[arg(long, default_value_t = 0)]
    cutout: usize,
    /// Label smoothing of the cross-entropy loss.
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f32,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads (0 = all cores).
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
    /// Arithmetic of convolutions and linear layers: f32, or bf16 (GPU only: bfloat16
    /// operands, float32 accumulation, float32 weights and everything else).
    #[arg(long, value_enum, default_value = "f32")]
    precision: PrecisionArg,
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
        precision: match a.precision {
            PrecisionArg::F32 => convnet::train::Precision::F32,
            PrecisionArg::Bf16 => convnet::train::Precision::Bf16,
        },
    }
}

fn default_out(model: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{model}-{secs}"))
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

pub fn run(mut a: TrainArgs) -> Result<()> {
    // The device of this invocation (a resumed run may continue on another one).
    let device = check_device(&a.device)?;
    set_threads(a.threads)?;
    if a.epochs == 0 || a.batch_size == 0 {
        bail!("--epochs and --batch-size must be positive");
    }
    // A resumed run takes its settings from the run it continues; --epochs may extend it.
    let mut resume_meta = None;
    let mut saved_spec = None;
    if let Some(dir) = a.resume.clone() {
        let state_path = dir.join("train_state.safetensors");
        let (_, meta) = convnet::checkpoint::load_tensors(&state_path).with_context(|| {
            format!("--resume {}: no training state to continue", dir.display())
        })?;
        let saved: serde_json::Value = serde_json::from_str(
            meta.get("run")
                .context("training state has no run settings")?,
        )?;
        let (epochs, json, out) = (a.epochs, a.json, a.out.clone());
        let saved = serde_json::from_value::<SavedRun>(saved)
            .context("training state has unreadable run settings")?;
        saved_spec = Some(ModelSpec::from_checkpoint(
            &saved.model,
            saved.model_spec.as_deref(),
        )?);
        // How this invocation computes (device, graphs, precision) is its own choice.
        let (cuda_graph, tf32, precision) = (a.cuda_graph, a.tf32, a.precision);
        a = saved.into_args(epochs, json);
        (a.cuda_graph, a.tf32, a.precision) = (cuda_graph, tf32, precision);
        a.out = Some(out.unwrap_or(dir.clone()));
        a.resume = Some(dir);
        resume_meta = Some(meta);
    }
    let spec = match (saved_spec, &a.model_file) {
        (Some(s), _) => s,
        (None, Some(path)) => ModelSpec::File(ModelFile::from_path(path)?),
        (None, None) => ModelSpec::zoo(&a.model)?,
    };
    a.model = spec.name().to_string();
    let cfg = config(&a, device);
    convnet::manual_seed(a.seed);
    let opts = FolderOptions {
        skip_bad_images: a.skip_bad_images,
        cache: !a.no_cache,
    };
    let (mut train_set, mut test_set) = open_data(a.data.as_deref(), &opts, a.holdout)?;
    if let Some(n) = a.limit_train {
        train_set = train_set.spread(n);
    }
    if let Some(n) = a.limit_test {
        test_set = test_set.spread(n);
    }
    for (name, ds) in [("training", &train_set), ("test", &test_set)] {
        if ds.skipped > 0 {
            eprintln!(
                "skipped {} unreadable image(s) in the {name} data ({})",
                ds.skipped, ds.source
            );
        }
    }
    if train_set.is_empty() || test_set.is_empty() {
        bail!("the training or test set is empty");
    }
    let shape = train_set.image_shape();
    let classes = train_set.classes().to_vec();
    let normalize = Normalize::default_for(shape[0]);
    let model = spec.build(shape, classes.len())?;
    let augment = a.augment.then_some(Augment {
        cutout: a.cutout,
        ..Augment::cifar()
    });
    let train_loader = DataLoader::new(
        Arc::new(train_set),
        Transform {
            normalize: normalize.clone(),
            augment,
        },
        LoaderConfig {
            batch_size: a.batch_size,
            shuffle: true,
            seed: a.seed,
            ..Default::default()
        },
    )?;
    let test_loader = DataLoader::for_evaluation(Arc::new(test_set), normalize.clone())?;
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.model));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let ckpt_path = out.join("model.safetensors");
    let state_path = out.join("train_state.safetensors");
    let metrics_path = out.join("metrics.jsonl");

    let mut trainer = Trainer::new(model, cfg, train_loader.num_batches())?;
    if let (Some(dir), Some(_)) = (&a.resume, &resume_meta) {
        let (tensors, meta) = load_checkpoint(&dir.join("model.safetensors"))?;
        if meta.architecture != a.model || meta.input_shape != shape {
            bail!(
                "{}: checkpoint is {} for {:?} but the run is {} for {:?}",
                dir.display(),
                meta.architecture,
                meta.input_shape,
                a.model,
                shape
            );
        }
        trainer.model().load_state_dict(&tensors, true)?;
        trainer.load_state(&dir.join("train_state.safetensors"))?;
        if meta.epoch != trainer.epoch() {
            bail!("{}: the checkpoint (epoch {}) and the training state (epoch {}) disagree; the run was interrupted while saving", dir.display(), meta.epoch, trainer.epoch());
        }
        eprintln!(
            "resuming {} at epoch {} of {}",
            dir.display(),
            trainer.epoch(),
            a.epochs
        );
    } else if ckpt_path.exists() {
        bail!(
            "{} already holds a checkpoint; continue it with --resume {} or choose another --out",
            out.display(),
            out.display()
        );
    }
    if !a.json {
        println!(
            "training {} ({} parameters) on {} images of {:?}, testing on {}; writing to {}",
            a.model,
            trainer.model().num_parameters(),
            train_loader.dataset().len(),
            shape,
            test_loader.dataset().len(),
            out.display()
        );
    }
    let run_json = serde_json::to_string(&SavedRun::from_args(&a, &spec))?;
    let mut last = None;
    let mut train_ips = Vec::new();
    let stop_at = a.stop_after.map_or(a.epochs, |s| s.min(a.epochs));
    let mut graph_noted = false;
    while trainer.epoch() < stop_at {
        let epoch = trainer.epoch() + 1;
        let bar = ProgressBar::new(train_loader.num_batches() as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{}", a.epochs));
        let stats = trainer.train_epoch(&train_loader, &mut |p| {
            bar.set_position(p.batch as u64);
            bar.set_message(format!(
                "loss {:.4} acc {:.2}% {:.0} img/s",
                p.loss,
                100.0 * p.accuracy,
                p.images_per_sec
            ));
        });
        bar.finish_and_clear();
        let stats = stats.with_context(|| {
            format!(
                "training stopped; the last good checkpoint is {}",
                ckpt_path.display()
            )
        })?;
        if let (true, Some(why)) = (a.cuda_graph && !graph_noted, trainer.graph_refused()) {
            eprintln!("note: training steps run without a CUDA graph: {why}");
            graph_noted = true;
        }
        let test = evaluate(trainer.model(), &test_loader)?;
        train_ips.push(stats.images_per_sec);
        let meta = CheckpointMeta {
            architecture: a.model.clone(),
            input_shape: shape,
            classes: classes.clone(),
            normalize: normalize.clone(),
            epoch,
            step: trainer.step(),
            model_spec: spec.model_spec(),
        };
        trainer.save_state(
            &state_path,
            &HashMap::from([("run".to_string(), run_json.clone())]),
        )?;
        save_checkpoint(&ckpt_path, &trainer.model().state_dict(), &meta)?;
        let line = serde_json::json!({
            "epoch": epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
            "test_loss": test.loss, "test_accuracy": test.accuracy, "lr": stats.lr,
            "seconds": stats.seconds, "train_images_per_sec": stats.images_per_sec,
        });
        append_line(&metrics_path, &line.to_string())?;
        println!(
            "epoch {epoch:>3}/{}  train loss {:.4} acc {:6.2}%  test loss {:.4} acc {:6.2}%  lr {:.5}  {:.1}s ({:.0} img/s)",
            a.epochs, stats.loss, 100.0 * stats.accuracy, test.loss, 100.0 * test.accuracy, stats.lr, stats.seconds, stats.images_per_sec
        );
        last = Some(test);
    }
    let test = match last {
        Some(t) => t,
        None => evaluate(trainer.model(), &test_loader)?,
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
                "train_images_per_sec": ips, "checkpoint": ckpt_path.display().to_string(),
            })
        );
    } else {
        println!(
            "test accuracy {:.2}% (loss {:.4}) after {} epochs; checkpoint {}",
            100.0 * test.accuracy,
            test.loss,
            trainer.epoch(),
            ckpt_path.display()
        );
    }
    Ok(())
}

/// The settings of a run, stored in its training state so `--resume` continues it as it was.
#[derive(serde::Serialize, serde::Deserialize)]
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
        }
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
            device: "cpu".into(),
            cuda_graph: false,
            tf32: false,
            precision: PrecisionArg::F32,
            out: None,
            resume: None,
            stop_after: None,
            limit_train: self.limit_train,
            limit_test: self.limit_test,
            holdout: self.holdout,
            skip_bad_images: self.skip_bad_images,
            no_cache: false,
            json,
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
