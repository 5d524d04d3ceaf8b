//! What the commands share: opening data (or the bundled sample), loading models from
//! checkpoints or plain state dicts, thread and device set-up.

use anyhow::{bail, Context, Result};
use convnet::checkpoint::{load_checkpoint, load_tensors, CheckpointMeta};
use convnet::data::{self, FolderOptions, ImageDataset};
use convnet::infer::{Compiled, Predictor};
use convnet::model_file::ModelFile;
use convnet::models::ModelSpec;
use convnet::nn::Model;
use convnet::quant::model::is_quantized_file;
use convnet::quant::QuantizedModel;
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
    d.ensure_supported()
        .with_context(|| format!("--device {spec}"))?;
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

/// Parses an input shape of any rank from 1 to 3: `CxHxW` (images), `CxL` (sequences) or
/// `L` (ids).
pub fn parse_dims(s: &str) -> Result<Vec<usize>> {
    let v: Vec<usize> = s
        .split(['x', 'X'])
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("input shape {s:?} is not CxHxW, CxL or L, e.g. 3x32x32"))?;
    if !(1..=3).contains(&v.len()) || v.contains(&0) {
        bail!("input shape {s:?} is not CxHxW, CxL or L with positive sizes, e.g. 3x32x32");
    }
    Ok(v)
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

/// A float model, or a quantized one (from a quantized checkpoint).
pub enum Net {
    Float(Model),
    Quantized(Box<QuantizedModel>),
}

/// A model ready for inference with what is needed to feed it.
pub struct Loaded {
    pub net: Net,
    pub meta: CheckpointMeta,
    pub source: PathBuf,
}

/// A loaded model prepared to run: the float model's inference plan, or the int8 plan.
pub enum Prepared<'a> {
    Float(Compiled<'a>),
    Quantized(&'a QuantizedModel),
}

impl Predictor for Prepared<'_> {
    fn predict(&self, x: &convnet::Tensor) -> convnet::Result<convnet::Tensor> {
        match self {
            Prepared::Float(c) => c.predict(x),
            Prepared::Quantized(q) => q.predict(x),
        }
    }

    fn device(&self) -> Device {
        match self {
            Prepared::Float(c) => c.device(),
            Prepared::Quantized(_) => Device::Cpu,
        }
    }
}

impl Loaded {
    /// The fastest way to run the model.
    pub fn prepare(&self) -> Prepared<'_> {
        match &self.net {
            Net::Float(m) => Prepared::Float(Compiled::new(m)),
            Net::Quantized(q) => Prepared::Quantized(q),
        }
    }

    /// The float model, for commands that need weights (`what` says which).
    pub fn float(&self, what: &str) -> Result<&Model> {
        match &self.net {
            Net::Float(m) => Ok(m),
            Net::Quantized(_) => bail!(
                "{} is a quantized checkpoint; {what} needs the float model it was made from",
                self.source.display()
            ),
        }
    }
}

/// How the user named the model: a convnet checkpoint, or an architecture (built-in or a
/// model file) and plain weights.
pub struct ModelSource<'a> {
    pub checkpoint: Option<&'a Path>,
    pub pretrained: Option<&'a str>,
    pub model: Option<&'a str>,
    pub model_file: Option<&'a Path>,
    pub weights: Option<&'a Path>,
    pub input: Option<[usize; 3]>,
    pub classes: Option<Vec<String>>,
    /// Build `model`/`model_file` with fresh initial weights when no weights are given.
    pub random_init: bool,
}

/// Rebuilds a checkpoint's model (zoo architecture or stored model file) and loads it.
fn from_checkpoint(
    tensors: &[(String, convnet::Tensor)],
    meta: CheckpointMeta,
    source: PathBuf,
) -> Result<Loaded> {
    let spec = ModelSpec::from_checkpoint(&meta.architecture, meta.model_spec.as_deref())?;
    let model = match &meta.sequence {
        Some(seq) => spec.build_for(
            &seq.input,
            crate::sequence::vocabulary(seq)?,
            meta.classes.len(),
        )?,
        None => spec.build(meta.input_shape, meta.classes.len())?,
    };
    model
        .load_state_dict(tensors, true)
        .with_context(|| format!("{} does not fit {}", source.display(), meta.architecture))?;
    Ok(Loaded {
        net: Net::Float(model),
        meta,
        source,
    })
}

/// What an architecture given without a checkpoint is fed: the input shape asked for or
/// its default, normalisation, and no training history.
fn fresh_meta(spec: &ModelSpec, input: [usize; 3], classes: Vec<String>) -> CheckpointMeta {
    CheckpointMeta {
        architecture: spec.name().to_string(),
        input_shape: input,
        classes,
        normalize: spec.default_normalize(input[0]),
        epoch: 0,
        step: 0,
        model_spec: spec.model_spec(),
        sequence: None,
    }
}

/// Loads a model from a checkpoint or from `--model NAME --weights FILE`, refusing
/// weights that are not finite.
pub fn load_model(src: &ModelSource) -> Result<Loaded> {
    let loaded = load_any_model(src)?;
    if let Net::Float(model) = &loaded.net {
        model
            .check_finite()
            .with_context(|| format!("{} cannot be used", loaded.source.display()))?;
    }
    Ok(loaded)
}

fn load_any_model(src: &ModelSource) -> Result<Loaded> {
    if let Some(name) = src.pretrained {
        let (tensors, meta) = crate::pretrained::load(name)?;
        return from_checkpoint(&tensors, meta, PathBuf::from(format!("pretrained {name}")));
    }
    let spec = match (src.model, src.model_file) {
        (Some(_), Some(_)) => bail!("give --model or --model-file, not both"),
        (Some(name), None) => Some(ModelSpec::zoo(name)?),
        (None, Some(path)) => Some(ModelSpec::File(ModelFile::from_path(path)?)),
        (None, None) => None,
    };
    let input_of = |spec: &ModelSpec| {
        src.input
            .or(spec.default_input())
            .context("the model file gives no input size: pass --input CxHxW")
    };
    match (src.checkpoint, spec, src.weights) {
        (Some(ckpt), None, None) if is_quantized_file(ckpt) => {
            let (q, meta) = QuantizedModel::load(ckpt)?;
            Ok(Loaded {
                net: Net::Quantized(Box::new(q)),
                meta,
                source: ckpt.to_path_buf(),
            })
        }
        (Some(ckpt), None, None) => {
            let (tensors, meta) = load_checkpoint(ckpt)?;
            from_checkpoint(&tensors, meta, ckpt.to_path_buf())
        }
        (None, Some(spec), Some(weights)) => {
            let input = input_of(&spec)?;
            let (tensors, _) = load_tensors(weights)?;
            let classes = match &src.classes {
                Some(c) => c.clone(),
                None => {
                    let n = tensors
                        .iter()
                        .rev()
                        .find(|(k, t)| k.ends_with(".weight") && t.rank() == 2)
                        .map(|(_, t)| t.dims()[0])
                        .or(spec.default_classes())
                        .unwrap_or(10);
                    default_classes(input[0], n)
                }
            };
            let model = spec.build(input, classes.len())?;
            model.load_state_dict(&tensors, true).with_context(|| {
                format!(
                    "{} is not a state_dict of {} for input {:?} with {} classes",
                    weights.display(),
                    spec.name(),
                    input,
                    classes.len()
                )
            })?;
            Ok(Loaded {
                net: Net::Float(model),
                meta: fresh_meta(&spec, input, classes),
                source: weights.to_path_buf(),
            })
        }
        (None, Some(spec), None) if src.random_init => {
            let input = input_of(&spec)?;
            let n = spec.default_classes().unwrap_or(10);
            let classes = src
                .classes
                .clone()
                .unwrap_or_else(|| default_classes(input[0], n));
            Ok(Loaded {
                net: Net::Float(spec.build(input, classes.len())?),
                meta: fresh_meta(&spec, input, classes),
                source: PathBuf::from("(random initialisation)"),
            })
        }
        (None, None, None) => {
            bail!("name a model: --checkpoint FILE, or --model NAME (or --model-file FILE) with --weights FILE")
        }
        (Some(_), _, _) => {
            bail!("--checkpoint cannot be combined with --model/--model-file/--weights")
        }
        _ => bail!("--model (or --model-file) and --weights go together"),
    }
}
