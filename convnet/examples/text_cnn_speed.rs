//! Times the `text-cnn` zoo model (Kim 2014: embedding 128, Conv1d widths 3/4/5 x 100 maps,
//! ReLU, max over time, dropout 0.5, linear) on random token ids, and prints one JSON line
//! per measurement (examples/s, the median over the timed steps).
//!
//! Training runs through the library's training loop: a `FeatureDataset` of random ids, a
//! `DataLoader::for_features` and `Trainer::train_epoch` (forward, cross-entropy, backward,
//! optimizer step; SGD with momentum 0.9 or Adam); a step is the time between two progress
//! calls. Inference runs the model's compiled plan in eval mode.
//!
//!     cargo run --release --example text_cnn_speed -- [--mode train|infer] [--optimizer sgd|adam]
//!         [--batch 64] [--len 200] [--vocab 20000] [--classes 6] [--threads 2]
//!         [--warmup 5] [--steps 30] [--profile]
//!
//! `tools/bench/text_cnn_peers.py` runs this next to the same model in PyTorch eager,
//! alternating the two, and prints the table of docs/text-cnn-speed.md.

use convnet::data::{DataLoader, FeatureDataset, LoaderConfig};
use convnet::infer::{Compiled, Predictor};
use convnet::train::{OptimizerKind, TrainConfig, Trainer};
use convnet::{Rng, Tensor};
use std::sync::Arc;
use std::time::Instant;

// The allocator the `convnet` command uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    mode: String,
    optimizer: String,
    batch: usize,
    len: usize,
    vocab: usize,
    classes: usize,
    threads: usize,
    warmup: usize,
    steps: usize,
    profile: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        mode: "train".into(),
        optimizer: "sgd".into(),
        batch: 64,
        len: 200,
        vocab: 20_000,
        classes: 6,
        threads: 2,
        warmup: 5,
        steps: 30,
        profile: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--profile" {
            a.profile = true;
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = || value.parse::<usize>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--mode" => a.mode = value.clone(),
            "--optimizer" => a.optimizer = value.clone(),
            "--batch" => a.batch = num()?,
            "--len" => a.len = num()?,
            "--vocab" => a.vocab = num()?,
            "--classes" => a.classes = num()?,
            "--threads" => a.threads = num()?,
            "--warmup" => a.warmup = num()?,
            "--steps" => a.steps = num()?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if a.batch == 0 || a.steps == 0 || a.len < 5 || a.vocab < 2 || a.classes == 0 {
        return Err("batch, steps and classes must be positive, len at least 5".into());
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `count` examples of `len` random ids in `1..vocab` (0 is padding) with random labels.
fn random_tokens(a: &Args, count: usize, rng: &mut Rng) -> convnet::Result<FeatureDataset> {
    let ids = (0..count * a.len)
        .map(|_| (1 + rng.below(a.vocab as u64 - 1)) as f32)
        .collect();
    let labels = (0..count)
        .map(|_| rng.below(a.classes as u64) as u32)
        .collect();
    let names = (0..a.classes).map(|c| format!("c{c}")).collect();
    FeatureDataset::new(ids, vec![a.len], labels, names, "random token ids")
}

/// Per-step seconds of training: one epoch of `warmup + steps` batches, the gaps between
/// progress calls after the warm-up.
fn train(a: &Args, model: convnet::nn::Model, rng: &mut Rng) -> convnet::Result<Vec<f64>> {
    let batches = a.warmup + a.steps;
    let data = random_tokens(a, batches * a.batch, rng)?;
    let loader = DataLoader::for_features(
        Arc::new(data),
        LoaderConfig {
            batch_size: a.batch,
            shuffle: false,
            drop_last: true,
            ..Default::default()
        },
    )?;
    let (optimizer, lr) = match a.optimizer.as_str() {
        "adam" => (OptimizerKind::Adam, 1e-3),
        _ => (OptimizerKind::Sgd, 0.01),
    };
    let cfg = TrainConfig {
        epochs: 1,
        optimizer,
        lr,
        momentum: 0.9,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, cfg, loader.num_batches())?;
    let mut times = Vec::with_capacity(a.steps);
    let mut last = Instant::now();
    let profile = a.profile;
    let warmup = a.warmup;
    trainer.train_epoch(&loader, &mut |p| {
        let now = Instant::now();
        if p.batch > warmup {
            times.push((now - last).as_secs_f64());
        }
        if profile && p.batch == warmup {
            convnet::profile::enable(true);
        }
        last = now;
    })?;
    Ok(times)
}

/// Per-call seconds of inference on one batch, through the compiled plan.
fn infer(a: &Args, model: &convnet::nn::Model, rng: &mut Rng) -> convnet::Result<Vec<f64>> {
    let data = random_tokens(a, a.batch, rng)?;
    let x = Tensor::from_vec(
        (0..a.batch)
            .flat_map(|i| data.example(i).to_vec())
            .collect(),
        [a.batch, a.len],
    )?;
    let plan = Compiled::new(model);
    let mut times = Vec::with_capacity(a.steps);
    for i in 0..a.warmup + a.steps {
        if a.profile && i == a.warmup {
            convnet::profile::enable(true);
        }
        let t = Instant::now();
        plan.predict(&x)?;
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()?;
    convnet::manual_seed(0);
    let model = convnet::models::build_for("text-cnn", &[a.len], Some(a.vocab), a.classes)?;
    let mut rng = Rng::new(1);
    let times = match a.mode.as_str() {
        "train" => train(&a, model, &mut rng)?,
        "infer" => infer(&a, &model, &mut rng)?,
        m => return Err(format!("unknown mode {m} (train or infer)").into()),
    };
    let steps = times.len();
    let step = median(times);
    if a.profile {
        for r in convnet::profile::rows() {
            eprintln!(
                "{:<72} fwd {:8.3} ms  bwd {:8.3} ms",
                r.key,
                1e3 * r.forward_secs / steps as f64,
                1e3 * r.backward_secs / steps as f64
            );
        }
    }
    let optimizer = if a.mode == "train" {
        a.optimizer.as_str()
    } else {
        "-"
    };
    println!(
        "{{\"framework\":\"convnet\",\"mode\":\"{}\",\"optimizer\":\"{}\",\"batch\":{},\"len\":{},\"vocab\":{},\"threads\":{},\"step_ms\":{:.3},\"examples_per_sec\":{:.1}}}",
        a.mode,
        optimizer,
        a.batch,
        a.len,
        a.vocab,
        a.threads,
        step * 1e3,
        a.batch as f64 / step
    );
    Ok(())
}
