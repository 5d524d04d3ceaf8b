//! `convnet quantize`: post-training int8 quantization of a float model, calibrated on
//! images of a data set's training split, written as a quantized checkpoint; by default it
//! also evaluates the float and the int8 model on the test split.

use crate::common::{load_model, open_data, set_threads};
use crate::eval::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::data::{DataLoader, FolderOptions};
use convnet::infer::Compiled;
use convnet::quant::{quantize, ObserverKind, QuantConfig};
use convnet::train::evaluate;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Observer {
    /// PyTorch's HistogramObserver: the range that minimises the L2 quantization error.
    Histogram,
    /// The minimum and maximum seen.
    Minmax,
    /// The range holding --percentile of the values.
    Percentile,
}

/// Arguments of `convnet quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Data set whose training split calibrates (and whose test split evaluates) the model
    /// (default: the bundled CIFAR-10 sample).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Fraction held out for testing when the data has no test split.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Calibration images, spread evenly over the training split's classes.
    #[arg(long, default_value_t = 512)]
    calibration_images: usize,
    /// How activation ranges are chosen.
    #[arg(long, value_enum, default_value_t = Observer::Histogram)]
    observer: Observer,
    /// The fraction of values --observer percentile keeps.
    #[arg(long, default_value_t = 0.9999)]
    percentile: f64,
    /// Where to write the quantized checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Do not evaluate the float and int8 models on the test split.
    #[arg(long)]
    no_eval: bool,
    /// Use only N test images for the evaluation, spread evenly over the set.
    #[arg(long)]
    limit_test: Option<usize>,
    /// Compute threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: QuantizeArgs) -> Result<()> {
    set_threads(a.threads)?;
    if a.calibration_images == 0 {
        bail!("--calibration-images must be positive");
    }
    if !(a.percentile > 0.0 && a.percentile <= 1.0) {
        bail!("--percentile must be in (0, 1], got {}", a.percentile);
    }
    let (train, mut test) = open_data(a.data.as_deref(), &FolderOptions::default(), a.holdout)?;
    let mut source = a.model.source(Some(train.classes().to_vec()))?;
    source.input = source.input.or(Some(train.image_shape()));
    let loaded = load_model(&source)?;
    let model = loaded.float("quantize")?;
    let meta = &loaded.meta;
    if meta.input_shape != train.image_shape() {
        bail!(
            "the model takes {:?} images but the data has {:?}",
            meta.input_shape,
            train.image_shape()
        );
    }
    if meta.classes.len() != train.classes().len() {
        bail!(
            "the model has {} classes but the data has {}",
            meta.classes.len(),
            train.classes().len()
        );
    }
    let calibration = train.spread(a.calibration_images.min(train.len()));
    let n_cal = calibration.len();
    let loader = DataLoader::for_evaluation(Arc::new(calibration), meta.normalize.clone())?;
    let config = QuantConfig {
        observer: match a.observer {
            Observer::Histogram => ObserverKind::Histogram,
            Observer::Minmax => ObserverKind::MinMax,
            Observer::Percentile => ObserverKind::Percentile(a.percentile),
        },
        calibration_images: n_cal,
    };
    let start = Instant::now();
    let q = quantize(model, &loader, &config).context("cannot quantize the model")?;
    let took = start.elapsed().as_secs_f64();
    q.save(&a.out, meta)?;
    let size = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    let float_size = 4 * model
        .state_dict()
        .iter()
        .map(|(_, t)| t.numel())
        .sum::<usize>();
    if !a.json {
        println!(
            "quantized {} ({}) with {} calibration images ({}) in {took:.1} s: {} int8 layers",
            meta.architecture,
            loaded.source.display(),
            n_cal,
            config.observer.name(),
            q.int8_layers()
        );
        for note in q.notes() {
            println!("  {note}");
        }
        println!(
            "wrote {} ({} bytes, {:.2}x smaller than the float weights)",
            a.out.display(),
            size,
            float_size as f64 / size.max(1) as f64
        );
    }
    let mut report = serde_json::json!({
        "out": a.out.display().to_string(),
        "int8_layers": q.int8_layers(),
        "float_layers": q.notes(),
        "calibration_images": n_cal,
        "observer": config.observer.name(),
        "bytes": size,
    });
    if !a.no_eval {
        if let Some(n) = a.limit_test {
            test = test.spread(n);
        }
        let test_loader = DataLoader::for_evaluation(Arc::new(test), meta.normalize.clone())?;
        let float = evaluate(&Compiled::new(model), &test_loader)?;
        let int8 = evaluate(&q, &test_loader)?;
        if !a.json {
            println!(
                "test accuracy on {} images: float {:.2}%, int8 {:.2}% ({:+.2} points)",
                test_loader.len(),
                100.0 * float.accuracy,
                100.0 * int8.accuracy,
                100.0 * (int8.accuracy - float.accuracy)
            );
        }
        report["float_accuracy"] = float.accuracy.into();
        report["int8_accuracy"] = int8.accuracy.into();
        report["test_images"] = test_loader.len().into();
    }
    if a.json {
        println!("{report}");
    }
    Ok(())
}
