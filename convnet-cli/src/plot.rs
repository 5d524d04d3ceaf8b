//! `convnet plot`: learning curves of one or more training runs from their `metrics.jsonl`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `convnet plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folders written by `convnet train --out` (each holds a metrics.jsonl); several
    /// are overlaid, named by their folder names.
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// The picture to write: .png or .svg (the format follows the extension).
    #[arg(long, default_value = "curves.png")]
    out: PathBuf,
}

/// Draws the runs' loss, accuracy and learning rate against epoch.
pub fn run(a: PlotArgs) -> Result<()> {
    convnet::viz::plot_run_folders(&a.runs, &a.out)?;
    println!(
        "wrote {} ({} run{})",
        a.out.display(),
        a.runs.len(),
        if a.runs.len() == 1 { "" } else { "s" }
    );
    Ok(())
}
