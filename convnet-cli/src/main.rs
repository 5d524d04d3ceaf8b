//! The `convnet` command: train, evaluate, predict and inspect CNNs.
//!
//! Errors print their chain and exit with status 1; nothing a user types makes it panic.

mod bench;
mod common;
mod dist;
mod eval;
mod explain;
mod export;
mod plot;
mod pretrained;
mod quantize;
mod run_folder;
mod sequence;
mod train;
mod visualize;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

// Training allocates and frees large activation buffers every step; mimalloc keeps them
// mapped instead of returning them to the kernel, avoiding a page fault per touched page.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Train, evaluate and inspect convolutional neural networks, offline, on the CPU.
#[derive(Parser)]
#[command(name = "convnet", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (default: the tutorial CNN on the bundled CIFAR-10 sample) and test it.
    Train(Box<train::TrainArgs>),
    /// Evaluate a model on a data set's test split: loss, accuracy, per-class accuracy, confusion matrix.
    Eval(eval::EvalArgs),
    /// Classify images with a trained model and print the top classes.
    Predict(eval::PredictArgs),
    /// Show where a model looked: Grad-CAM, Grad-CAM++, saliency, integrated gradients, occlusion.
    Explain(Box<explain::ExplainArgs>),
    /// Print a model's layer table (output shapes and parameter counts).
    Summary(eval::SummaryArgs),
    /// Quantize a trained model to int8 (post-training, calibrated on training images).
    Quantize(Box<quantize::QuantizeArgs>),
    /// Write a model as ONNX (for ONNX Runtime, TensorRT, ...) or as a plain PyTorch state_dict.
    Export(export::ExportArgs),
    /// List the built-in architectures.
    Models,
    /// Time the training step (or inference) on synthetic data: images/s, GFLOP/s, peak RSS.
    Bench(bench::BenchArgs),
    /// Draw learning curves (loss, accuracy, learning rate) of training runs into a PNG or SVG.
    Plot(plot::PlotArgs),
    /// Draw pictures of a model (`visualize filters`: a convolution layer's kernels).
    #[command(subcommand)]
    Visualize(visualize::VisualizeCommand),
}

/// mimalloc's `purge_delay` option (index 15 of `mi_option_t`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Never hand freed memory back to the kernel: a training step frees and reallocates the
    // same activation sizes every step, and re-faulting fresh zeroed pages cost a fifth of
    // the step time.
    // SAFETY: setting a documented allocator option before any concurrency starts.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // Output piped into a reader that stops early (`convnet models | head -3`): end quietly
    // as Unix tools do, instead of failing on a write to a closed pipe. Rust sets SIGPIPE to
    // be ignored before `main`; this restores the default.
    // SAFETY: changing a signal disposition before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The arguments given on the command line (a resumed run keeps its others).
    let explicit: Vec<String> = matches
        .subcommand()
        .map(|(_, m)| {
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.to_string())
                .collect()
        })
        .unwrap_or_default();
    // Under an MPI launcher: this process is one rank of the job (see dist.rs).
    let ranks = match dist::init() {
        Ok(r) => r,
        Err(e) => {
            let alone: dist::Ranks = std::sync::Arc::new(convnet::dist::SingleProcess);
            return dist::fail(&alone, &e);
        }
    };
    let result = match cli.command {
        Command::Train(a) => train::run(*a, &explicit, &ranks),
        Command::Eval(a) => eval::run_eval(a, &ranks),
        Command::Bench(a) => bench::run(a, &ranks),
        _ if ranks.size() > 1 => Err(anyhow::anyhow!(
            "only train, eval and bench run on several processes; run this command without mpirun"
        )),
        Command::Predict(a) => eval::run_predict(a),
        Command::Explain(a) => explain::run(*a),
        Command::Summary(a) => eval::run_summary(a),
        Command::Export(a) => export::run(a),
        Command::Quantize(a) => quantize::run(*a),
        Command::Models => eval::run_models(),
        Command::Plot(a) => plot::run(a),
        Command::Visualize(c) => visualize::run(c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => dist::fail(&ranks, &e),
    }
}
