//! `convnet eval`, `predict`, `summary` and `models`.

use crate::common::{load_model, open_data, parse_shape, set_threads, ModelSource};
use crate::dist::{threads_per_rank, Ranks};
use crate::train::resize_crop;
use anyhow::{bail, Context, Result};
use clap::Args;
use convnet::data::{DataLoader, FolderOptions, ResizeCrop, Transform};
use convnet::infer::Predictor;
use convnet::model_file::ModelFile;
use convnet::models::ModelSpec;
use convnet::train::{evaluate_distributed, evaluate_observed};
use convnet::viz::{write_eval_plots, MistakeLog, EVAL_PLOT_MISTAKES};
use convnet::Tensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a command names its model.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// A checkpoint written by `convnet train`.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A pretrained model built into convnet (see `convnet models`), e.g. resnet20-cifar10.
    #[arg(long, conflicts_with_all = ["checkpoint", "model", "model_file", "weights"])]
    pretrained: Option<String>,
    /// Architecture of a plain state_dict given with --weights (e.g. exported from PyTorch).
    #[arg(long)]
    model: Option<String>,
    /// A model described in a TOML or JSON file, for --weights.
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// Plain weights for --model/--model-file: a `state_dict` as `.safetensors`, or a
    /// PyTorch `.pt`/`.pth` file (tensors only; nothing in it is run).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Input shape CxHxW for --model/--weights (default: the architecture's, e.g. 3x32x32
    /// for CIFAR models, 3x224x224 for ImageNet ones).
    #[arg(long)]
    input: Option<String>,
}

impl ModelArgs {
    pub fn source(&self, classes: Option<Vec<String>>) -> Result<ModelSource<'_>> {
        Ok(ModelSource {
            checkpoint: self.checkpoint.as_deref(),
            pretrained: self.pretrained.as_deref(),
            model: self.model.as_deref(),
            model_file: self.model_file.as_deref(),
            weights: self.weights.as_deref(),
            input: self.input.as_deref().map(parse_shape).transpose()?,
            classes,
            random_init: false,
        })
    }
}

/// Arguments of `convnet eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data set whose test split is evaluated (default: the bundled CIFAR-10 sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Fraction held out for testing when the data has no test split.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Use only N test images, spread evenly over the set.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Evaluate on these classes of the data only, relabelled in this order (as the model was
    /// trained with `train --classes`).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Resize every image's shorter side to N pixels (bilinear), then cut the centre
    /// --crop x --crop (torchvision's Resize + CenterCrop), e.g. --resize 256 --crop 224.
    #[arg(long, value_name = "N")]
    resize: Option<usize>,
    /// Side of the centre crop after --resize (default: N).
    #[arg(long, value_name = "M", requires = "resize")]
    crop: Option<usize>,
    /// Compute threads per process (0 = all cores, shared out among the ranks of a machine
    /// under mpirun).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Also write pictures into this folder: confusion.png (the confusion matrix as a heat
    /// map) and misclassified.png (the 16 most confidently misclassified test images; under
    /// mpirun, of rank 0's share of the images).
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
}

/// Evaluates on the test split; under `mpirun` every rank evaluates its share of the images
/// and rank 0 prints the totals.
pub fn run_eval(a: EvalArgs, ranks: &Ranks) -> Result<()> {
    set_threads(threads_per_rank(a.threads, ranks))?;
    if let Some(ckpt) = &a.model.checkpoint {
        if convnet::checkpoint::read_metadata_entry(ckpt, "sequence").is_some() {
            return eval_sequences(a, ranks);
        }
    }
    let opts = FolderOptions {
        resize: resize_crop(a.resize, a.crop)?,
        ..FolderOptions::default()
    };
    let (_, mut test) = open_data(a.data.as_deref(), &opts, a.holdout)?;
    if let Some(names) = &a.classes {
        test = test.with_classes(names)?;
    }
    if let Some(n) = a.limit_test {
        test = test.spread(n);
    }
    let mut source = a.model.source(Some(test.classes().to_vec()))?;
    source.input = source.input.or(Some(test.image_shape()));
    let loaded = load_model(&source)?;
    let (m, shape) = (&loaded.meta, test.image_shape());
    if m.input_shape != shape {
        bail!(
            "the model takes {:?} images but the data has {:?}",
            m.input_shape,
            shape
        );
    }
    if m.classes.len() != test.classes().len() {
        bail!(
            "the model has {} classes but the data has {}",
            m.classes.len(),
            test.classes().len()
        );
    }
    let names = test.classes().to_vec();
    let loader = DataLoader::for_evaluation_sharded(
        Arc::new(test),
        m.normalize.clone(),
        ranks.rank(),
        ranks.size(),
    )?;
    report_eval(&a, ranks, &loaded, loader, names)
}

/// `eval` of a text model: the test split of `--data` through the checkpoint's tokenizer.
fn eval_sequences(a: EvalArgs, ranks: &Ranks) -> Result<()> {
    let loaded = load_model(&a.model.source(None)?)?;
    let m = &loaded.meta;
    let seq = m.sequence.as_ref().context("not a sequence model")?;
    let data = a
        .data
        .as_deref()
        .context("--data names the texts or clips to evaluate the model on")?;
    if a.resize.is_some() {
        bail!("--resize applies to images; the model reads texts or audio");
    }
    let mut test = crate::sequence::open_test(data, seq, &m.normalize, &m.classes, a.holdout)?;
    if let Some(names) = &a.classes {
        test = test.with_classes(names)?;
    }
    if let Some(n) = a.limit_test {
        test = test.spread(n);
    }
    let names = test.classes().to_vec();
    if names.len() != m.classes.len() {
        bail!(
            "the model has {} classes but --classes keeps {}",
            m.classes.len(),
            names.len()
        );
    }
    let loader = DataLoader::for_evaluation_features(Arc::new(test), ranks.rank(), ranks.size())?;
    report_eval(&a, ranks, &loaded, loader, names)
}

/// Evaluates `loaded` on `loader` and prints the report (rank 0).
fn report_eval(
    a: &EvalArgs,
    ranks: &Ranks,
    loaded: &crate::common::Loaded,
    loader: DataLoader,
    names: Vec<String>,
) -> Result<()> {
    let m = &loaded.meta;
    let mut mistakes = MistakeLog::new(EVAL_PLOT_MISTAKES);
    let r = match &a.plots {
        None => evaluate_distributed(&loaded.prepare(), &loader, ranks.as_ref())?,
        Some(_) => evaluate_observed(&loaded.prepare(), &loader, ranks.as_ref(), &mut |b, l| {
            mistakes.observe(&b.indices, &b.labels, l)
        })?,
    };
    if ranks.rank() != 0 {
        return Ok(());
    }
    if let Some(dir) = &a.plots {
        let images = loader.images().context("--plots draws image data sets")?;
        let written = write_eval_plots(dir, &r, images, mistakes.mistakes())
            .with_context(|| format!("--plots {}", dir.display()))?;
        for path in written {
            eprintln!("wrote {}", path.display());
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "accuracy": r.accuracy, "loss": r.loss, "per_class_accuracy": r.per_class_accuracy, "confusion_matrix": r.confusion, "classes": names })
        );
        return Ok(());
    }
    println!(
        "model {} ({}) on {} test {}",
        m.architecture,
        loaded.source.display(),
        loader.len(),
        if m.sequence.is_some() {
            "examples"
        } else {
            "images"
        }
    );
    println!("loss {:.4}  accuracy {:.2}%\n", r.loss, 100.0 * r.accuracy);
    let w = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i} {n}").len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<w$}  accuracy", "class");
    for (n, acc) in names.iter().zip(&r.per_class_accuracy) {
        println!("{n:<w$}  {:6.2}%", 100.0 * acc);
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted)");
    print!("{:<w$}", "");
    for i in 0..names.len() {
        print!(" {i:>5}");
    }
    println!();
    for (i, row) in r.confusion.iter().enumerate() {
        print!("{:<w$}", format!("{i} {}", names[i]));
        for v in row {
            print!(" {v:>5}");
        }
        println!();
    }
    Ok(())
}

/// Arguments of `convnet predict`.
#[derive(Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images to classify (any size: resized to the model's input, or as --resize and
    /// --crop say); for a text model, texts or .txt files.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Number of classes to show per image.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// Choose among these of the model's classes only: probabilities over them, indices in
    /// this order (e.g. cat,dog).
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Resize the image's shorter side to N pixels (bilinear), then cut the centre --crop x
    /// --crop, which must be the model's input size (torchvision's Resize + CenterCrop);
    /// without it images are stretched to the model's input.
    #[arg(long, value_name = "N")]
    resize: Option<usize>,
    /// Side of the centre crop after --resize (default: N).
    #[arg(long, value_name = "M", requires = "resize")]
    crop: Option<usize>,
    /// Print one JSON object with the predictions as the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// Decodes the image file `path`, with an error that names it (and says so when it is a
/// folder).
pub(crate) fn open_image(path: &Path) -> Result<image::DynamicImage> {
    if path.is_dir() {
        bail!(
            "{} is a folder: give its image files (e.g. {}/*.jpg)",
            path.display(),
            path.display()
        );
    }
    image::open(path).with_context(|| format!("{}: not a readable image", path.display()))
}

/// Decodes `path` and turns it into a normalised `[C, H, W]` input for the model.
pub(crate) fn load_image(path: &Path, shape: [usize; 3], t: &Transform) -> Result<Vec<f32>> {
    Ok(image_input(open_image(path)?, shape, t))
}

/// Decodes `path`, resizes and centre-crops it as `geometry` says (to the model's input
/// size `shape`) and normalises it.
fn load_resized_image(
    path: &Path,
    shape: [usize; 3],
    geometry: ResizeCrop,
    t: &Transform,
) -> Result<Vec<f32>> {
    let img = open_image(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let planes = if shape[0] == 1 {
        img.to_luma8().into_raw()
    } else {
        convnet::data::image_to_planes(&img.to_rgb8().into_raw(), 3, h * w)
    };
    let cropped = geometry.apply(&planes, [shape[0], h, w]);
    let mut out = vec![0f32; cropped.len()];
    t.apply(&cropped, shape, &mut convnet::Rng::new(0), &mut out);
    Ok(out)
}

/// The positions in `all` (the model's classes) of `chosen`, in that order; an unknown or
/// repeated name is an error listing the model's classes.
fn class_positions(all: &[String], chosen: &[String]) -> Result<Vec<usize>> {
    let mut at = Vec::with_capacity(chosen.len());
    for name in chosen {
        let Some(i) = all.iter().position(|c| c == name) else {
            bail!(
                "--classes: the model has no class {name:?}; its classes: {}",
                all.join(", ")
            );
        };
        if at.contains(&i) {
            bail!("--classes: class {name:?} is named twice");
        }
        at.push(i);
    }
    Ok(at)
}

/// A decoded image as a normalised `[C, H, W]` input for the model.
pub(crate) fn image_input(img: image::DynamicImage, shape: [usize; 3], t: &Transform) -> Vec<f32> {
    let [c, h, w] = shape;
    let img = if img.width() as usize != w || img.height() as usize != h {
        img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let planes: Vec<u8> = if c == 1 {
        img.to_luma8().into_raw()
    } else {
        convnet::data::image_to_planes(&img.to_rgb8().into_raw(), 3, h * w)
    };
    let mut out = vec![0f32; c * h * w];
    t.apply(&planes, shape, &mut convnet::Rng::new(0), &mut out);
    out
}

pub fn run_predict(a: PredictArgs) -> Result<()> {
    if a.top_k == 0 {
        bail!("--top-k must be positive");
    }
    let loaded = load_model(&a.model.source(None)?)?;
    let m = &loaded.meta;
    let geometry = resize_crop(a.resize, a.crop)?;
    if let (Some(_), Some(_)) = (&m.sequence, geometry) {
        bail!("--resize applies to images; the model reads texts or audio");
    }
    if let Some(g) = geometry {
        if g.output_shape(m.input_shape[0]) != m.input_shape {
            bail!(
                "--crop {} gives {}x{} images but the model takes {}x{}",
                g.crop,
                g.crop,
                g.crop,
                m.input_shape[1],
                m.input_shape[2]
            );
        }
    }
    // The classes to choose among: all of the model's, or those named, in that order.
    let (names, keep): (Vec<String>, Option<Vec<usize>>) = match &a.classes {
        Some(chosen) => (chosen.clone(), Some(class_positions(&m.classes, chosen)?)),
        None => (m.classes.clone(), None),
    };
    let t = Transform {
        normalize: m.normalize.clone(),
        augment: None,
    };
    let net = loaded.prepare();
    let mut results = Vec::new();
    for path in &a.images {
        let x = match &m.sequence {
            Some(seq) => {
                crate::sequence::inputs(seq, &m.normalize, &[path.to_string_lossy().into_owned()])?
            }
            None => {
                let input = match geometry {
                    Some(g) => load_resized_image(path, m.input_shape, g, &t)?,
                    None => load_image(path, m.input_shape, &t)?,
                };
                Tensor::from_vec(
                    input,
                    [1, m.input_shape[0], m.input_shape[1], m.input_shape[2]],
                )?
            }
        };
        let logits = net.predict(&x)?;
        let logits = match &keep {
            Some(at) => {
                let all = logits.try_to_vec()?;
                Tensor::from_vec(at.iter().map(|&i| all[i]).collect(), [1, at.len()])?
            }
            None => logits,
        };
        let probs = logits.softmax(-1)?.to_vec();
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&i, &j| probs[j].total_cmp(&probs[i]));
        let top: Vec<(usize, f32)> = order
            .into_iter()
            .take(a.top_k)
            .map(|i| (i, probs[i]))
            .collect();
        if !a.json {
            println!("{}", path.display());
            for (i, p) in &top {
                println!("  {:>6.2}%  {} ({i})", 100.0 * p, names[*i]);
            }
        }
        let key = match &m.sequence {
            Some(s) if s.tokenizer.is_some() => "text",
            Some(_) => "clip",
            None => "image",
        };
        results.push(serde_json::json!({
            key: path.display().to_string(),
            "top": top.iter().map(|(i, p)| serde_json::json!({"index": i, "label": names[*i], "probability": p})).collect::<Vec<_>>(),
        }));
    }
    if a.json {
        println!("{}", serde_json::json!({ "predictions": results }));
    }
    Ok(())
}

/// Arguments of `convnet summary`.
#[derive(Args, Debug)]
pub struct SummaryArgs {
    /// Architecture (see `convnet models`).
    #[arg(
        long,
        required_unless_present_any = ["model_file", "checkpoint"],
        conflicts_with_all = ["model_file", "checkpoint"]
    )]
    model: Option<String>,
    /// A checkpoint (float or quantized): its model as trained, or its int8 layers with their
    /// quantization.
    #[arg(long, conflicts_with_all = ["model_file", "input", "num_classes", "vocab"])]
    checkpoint: Option<PathBuf>,
    /// A model described in a TOML or JSON file.
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// Input shape CxHxW, or CxL for a sequence model, L for ids (default: the
    /// architecture's).
    #[arg(long)]
    input: Option<String>,
    /// Number of classes (default: the architecture's).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Vocabulary size of a text model (default 20000).
    #[arg(long)]
    vocab: Option<usize>,
}

pub fn run_summary(a: SummaryArgs) -> Result<()> {
    if let Some(path) = &a.checkpoint {
        let loaded = load_model(&ModelSource {
            checkpoint: Some(path),
            pretrained: None,
            model: None,
            model_file: None,
            weights: None,
            input: None,
            classes: None,
            random_init: false,
        })?;
        match &loaded.net {
            crate::common::Net::Float(m) => println!("{}", m.summary()),
            crate::common::Net::Quantized(q) => println!("{}", quantized_summary(q)),
        }
        return Ok(());
    }
    let spec = match (&a.model, &a.model_file) {
        (Some(name), _) => ModelSpec::zoo(name)?,
        (None, Some(path)) => ModelSpec::File(ModelFile::from_path(path)?),
        (None, None) => bail!("name a model: --model NAME or --model-file FILE"),
    };
    let input = match &a.input {
        Some(s) => crate::common::parse_dims(s)?,
        None => spec
            .default_input_dims()
            .context("the model file gives no input size: pass --input CxHxW (or CxL)")?,
    };
    let classes = a.num_classes.or(spec.default_classes()).unwrap_or(10);
    let vocabulary = a.vocab.unwrap_or(convnet::models::DEFAULT_VOCABULARY);
    let model = spec.build_for(&input, Some(vocabulary), classes)?;
    println!("{}", model.summary());
    Ok(())
}

/// The layer table of a quantized model: each layer of the fused graph, where it runs and
/// how its output is stored.
fn quantized_summary(q: &convnet::quant::QuantizedModel) -> String {
    use std::fmt::Write as _;
    let g = q.graph();
    let rows: Vec<(String, String, String, String)> = g
        .nodes()
        .iter()
        .zip(q.nodes())
        .map(|(n, nq)| {
            let label = format!("{} ({})", n.name, n.op.kind());
            let shape = n.shape.to_string();
            let runs = match (&nq.weights, nq.int8) {
                (Some(w), _) => format!("int8 ({} weights)", w.weight.len()),
                (None, true) => "int8".to_string(),
                (None, false) => "float".to_string(),
            };
            let out = match (nq.int8, nq.output) {
                (true, Some(p)) => format!("u8 scale {:.4e} zp {}", p.scale, p.zero_point),
                (false, Some(p)) => format!(
                    "f32 (u8 scale {:.4e} zp {} for int8 readers)",
                    p.scale, p.zero_point
                ),
                _ => "f32".to_string(),
            };
            (label, shape, runs, out)
        })
        .collect();
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(12);
    let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(12);
    let w2 = rows.iter().map(|r| r.2.len()).max().unwrap_or(0).max(4);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w0$}  {:<w1$}  {:<w2$}  output",
        "Layer (type)", "Output shape", "Runs"
    );
    let _ = writeln!(s, "{}", "-".repeat(w0 + w1 + w2 + 40));
    for (a, b, c, d) in &rows {
        let _ = writeln!(s, "{a:<w0$}  {b:<w1$}  {c:<w2$}  {d}");
    }
    let _ = writeln!(s, "{}", "-".repeat(w0 + w1 + w2 + 40));
    let (observer, images) = q.calibration();
    let int8_weights: usize = q
        .nodes()
        .iter()
        .filter_map(|n| n.weights.as_ref().map(|w| w.weight.len()))
        .sum();
    let _ = writeln!(
        s,
        "Int8 layers: {} ({} int8 weights)",
        q.int8_layers(),
        int8_weights
    );
    let _ = write!(s, "Calibration: {images} images, {observer} observer");
    for note in q.notes() {
        let _ = write!(s, "\n{note}");
    }
    s
}

pub fn run_models() -> Result<()> {
    println!(
        "{:<15} {:>11}  {:<10} {:>7}  description",
        "name", "params", "input", "classes"
    );
    for arch in convnet::models::ARCHITECTURES {
        let model = convnet::models::build_for(
            arch.name,
            arch.default_input,
            Some(convnet::models::DEFAULT_VOCABULARY),
            arch.default_classes,
        )?;
        let input: Vec<String> = arch.default_input.iter().map(|d| d.to_string()).collect();
        println!(
            "{:<15} {:>11}  {:<10} {:>7}  {}",
            arch.name,
            model.num_parameters(),
            input.join("x"),
            arch.default_classes,
            arch.description
        );
    }
    println!("\npretrained (--pretrained NAME): accuracy on the CIFAR-10 test set and on the bundled sample; how it was made");
    for e in crate::pretrained::entries()? {
        println!(
            "  {:<17} {:<9} {:6.2}% {:6.2}%  {}",
            e.name,
            e.architecture,
            100.0 * e.cifar10_test_accuracy,
            100.0 * e.sample_test_accuracy,
            e.command
        );
    }
    println!("\nInput size and class count follow the data when training; `convnet summary --model NAME --input CxHxW --num-classes N` shows any other size. Text models are counted at a vocabulary of {} tokens (`--vocab N`; in training, the tokenizer's).", convnet::models::DEFAULT_VOCABULARY);
    Ok(())
}
