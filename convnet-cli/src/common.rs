//! What the commands share: opening data (or the bundled sample), loading models from
//! checkpoints or plain state dicts, thread and device set-up.

use anyhow::{bail, Context, Result};
use convnet::checkpoint::{load_checkpoint, load_tensors, CheckpointMeta};
use convnet::data::{self, FolderOptions, ImageDataset};
use convnet::nn::Model;
use convnet::Device;
use std::path::{Path, PathBuf};

/// The CIFAR-10 sample shipped with convnet (5,000 training and 1,000 test images).
const SAMPLE_TRAIN: &[u8] = include_bytes!("../../data/cifar10-sample/train.tar.gz");
const SAMPLE_TEST: &[u8] = include_bytes!("../../data/cifar10-sample/test.tar.gz");

/// Sets the number of compute threads (0 = all cores).
pub fn set_threads(threads: usize) -> Result<()> {
    if threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .context("cannot set the number of threads")?;
    }
    Ok(())
}

/// Checks the requested device.
pub fn check_device(spec: &str) -> Result<Device> {
    let d = Device::parse(spec).with_context(|| format!("--device {spec}"))?;
    if d != Device::Cpu {
        bail!("device {d} is not supported by this build");
    }
    Ok(d)
}

/// Train and test sets of `path`, or of the bundled sample when `path` is `None`.
pub fn open_data(
    path: Option<&Path>,
    opts: &FolderOptions,
    holdout: f64,
) -> Result<(ImageDataset, ImageDataset)> {
    match path {
        None => {
            let train = data::image_folder_from_tar_gz_bytes(
                "bundled-sample/train.tar.gz",
                SAMPLE_TRAIN,
                opts,
            )?;
            let test = data::image_folder_from_tar_gz_bytes(
                "bundled-sample/test.tar.gz",
                SAMPLE_TEST,
                opts,
            )?;
            Ok((train, test))
        }
        Some(p) => {
            if !(0.0..1.0).contains(&holdout) {
                bail!("--holdout must be in [0, 1), got {holdout}");
            }
            let split = data::open(p, opts)
                .with_context(|| format!("cannot read the data set at {}", p.display()))?;
            Ok(split.into_train_test(holdout))
        }
    }
}

/// Parses `CxHxW`.
pub fn parse_shape(s: &str) -> Result<[usize; 3]> {
    let v: Vec<usize> = s
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("input shape {s:?} is not CxHxW, e.g. 3x32x32"))?;
    match v.as_slice() {
        [c, h, w] if *c > 0 && *h > 0 && *w > 0 => Ok([*c, *h, *w]),
        _ => bail!("input shape {s:?} is not CxHxW with positive sizes, e.g. 3x32x32"),
    }
}

/// Default class names for a model given without a checkpoint.
pub fn default_classes(channels: usize, n: usize) -> Vec<String> {
    if channels == 3 && n == 10 {
        data::CIFAR10_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        (0..n).map(|i| i.to_string()).collect()
    }
}

/// A model ready for inference with what is needed to feed it.
pub struct Loaded {
    pub model: Model,
    pub meta: CheckpointMeta,
    pub source: PathBuf,
}

/// How the user named the model: a convnet checkpoint, or an architecture and plain weights.
pub struct ModelSource<'a> {
    pub checkpoint: Option<&'a Path>,
    pub model: Option<&'a str>,
    pub weights: Option<&'a Path>,
    pub input: Option<[usize; 3]>,
    pub classes: Option<Vec<String>>,
}

/// Loads a model from a checkpoint or from `--model NAME --weights FILE`.
pub fn load_model(src: &ModelSource) -> Result<Loaded> {
    match (src.checkpoint, src.model, src.weights) {
        (Some(ckpt), None, None) => {
            let (tensors, meta) = load_checkpoint(ckpt)?;
            let model =
                convnet::models::build(&meta.architecture, meta.input_shape, meta.classes.len())?;
            model.load_state_dict(&tensors, true).with_context(|| {
                format!("{} does not fit {}", ckpt.display(), meta.architecture)
            })?;
            Ok(Loaded {
                model,
                meta,
                source: ckpt.to_path_buf(),
            })
        }
        (None, Some(name), Some(weights)) => {
            let arch = convnet::models::architecture(name)?;
            let input = src.input.unwrap_or(arch.default_input);
            let (tensors, _) = load_tensors(weights)?;
            let classes = match &src.classes {
                Some(c) => c.clone(),
                None => {
                    let n = tensors
                        .iter()
                        .rev()
                        .find(|(k, t)| k.ends_with(".weight") && t.rank() == 2)
                        .map_or(arch.default_classes, |(_, t)| t.dims()[0]);
                    default_classes(input[0], n)
                }
            };
            let model = convnet::models::build(name, input, classes.len())?;
            model.load_state_dict(&tensors, true).with_context(|| {
                format!(
                    "{} is not a state_dict of {name} for input {:?} with {} classes",
                    weights.display(),
                    input,
                    classes.len()
                )
            })?;
            let meta = CheckpointMeta {
                architecture: name.to_string(),
                input_shape: input,
                classes,
                normalize: arch.default_normalize(input[0]),
                epoch: 0,
                step: 0,
            };
            Ok(Loaded {
                model,
                meta,
                source: weights.to_path_buf(),
            })
        }
        (None, None, None) => {
            bail!("name a model: --checkpoint FILE, or --model NAME --weights FILE")
        }
        (Some(_), _, _) => bail!("--checkpoint cannot be combined with --model/--weights"),
        _ => bail!("--model and --weights go together"),
    }
}
