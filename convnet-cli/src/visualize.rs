//! `convnet visualize`: pictures of what a model has learned, one sub-command per kind of
//! picture (`filters` for now).

use crate::common::load_model;
use crate::eval::ModelArgs;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// The pictures `convnet visualize` draws.
#[derive(Subcommand, Debug)]
pub enum VisualizeCommand {
    /// Draw a convolution layer's kernels on a grid (PNG).
    ///
    /// 24x24 pixels per kernel, 2 pixels apart, each kernel min-max normalised on its own.
    /// Kernels with 3 input channels (the first layer of an RGB model) are shown in colour;
    /// those of other layers in grey, one tile per output channel: the mean of the kernel
    /// over its input channels.
    Filters(FiltersArgs),
}

/// Arguments of `convnet visualize filters`.
#[derive(Args, Debug)]
pub struct FiltersArgs {
    /// The convolution layer, by its state_dict name (its `NAME.weight` must be 4-D), e.g.
    /// conv1 or layer1.0.conv1; a wrong name lists the layers there are.
    #[arg(long)]
    layer: String,
    #[command(flatten)]
    model: ModelArgs,
    /// The PNG to write.
    #[arg(long, default_value = "filters.png")]
    out: PathBuf,
}

/// Runs a `convnet visualize` sub-command.
pub fn run(command: VisualizeCommand) -> Result<()> {
    match command {
        VisualizeCommand::Filters(a) => filters(a),
    }
}

fn filters(a: FiltersArgs) -> Result<()> {
    let loaded = load_model(&a.model.source(None)?)?;
    let model = loaded.float("visualize filters")?;
    let drawn = convnet::viz::plot_filters(&model.state_dict(), &a.layer, &a.out)?;
    let [o, i, kh, kw] = drawn.shape;
    let (w, h) = drawn.layout.size();
    println!(
        "wrote {}: {o} kernels of {} ({i}x{kh}x{kw}, {}), {w}x{h} pixels",
        a.out.display(),
        a.layer,
        if drawn.colour {
            "in colour"
        } else {
            "mean over input channels in grey"
        }
    );
    Ok(())
}
