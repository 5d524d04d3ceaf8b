//! `convnet visualize`: pictures of what a model has learned, one sub-command per kind of
//! picture: `filters` (a layer's kernels) and `activations` (a layer's feature maps for an
//! image).

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
    /// Draw a layer's feature maps for one image on a grid (PNG).
    ///
    /// One grey tile per channel (the first --max-maps), each min-max normalised on its own
    /// and scaled up by nearest neighbour, captioned with its channel index. Any layer name of
    /// `convnet summary` works; a container (layer3, layer3.2) means its output.
    Activations(ActivationsArgs),
}

/// Arguments of `convnet visualize activations`.
#[derive(Args, Debug)]
pub struct ActivationsArgs {
    /// The image (any size: resized to the model's input).
    image: PathBuf,
    /// The layer, by its name in `convnet summary` (e.g. conv1, relu1, layer1.0, features.3).
    #[arg(long)]
    layer: String,
    #[command(flatten)]
    model: ModelArgs,
    /// At most this many channels are drawn (the first ones).
    #[arg(long, default_value_t = 64)]
    max_maps: usize,
    /// The PNG to write.
    #[arg(long, default_value = "activations.png")]
    out: PathBuf,
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
        VisualizeCommand::Activations(a) => activations(a),
    }
}

fn activations(a: ActivationsArgs) -> Result<()> {
    if a.max_maps == 0 {
        anyhow::bail!("--max-maps must be positive");
    }
    let loaded = load_model(&a.model.source(None)?)?;
    let model = loaded.float("visualize activations")?;
    let m = &loaded.meta;
    let t = convnet::data::Transform {
        normalize: m.normalize.clone(),
        augment: None,
    };
    let [c, h, w] = m.input_shape;
    let x = convnet::Tensor::from_vec(
        crate::eval::load_image(&a.image, m.input_shape, &t)?,
        [1, c, h, w],
    )?;
    let (maps, [channels, mh, mw]) = convnet::explain::feature_maps(model, &x, &a.layer)?;
    let shown = channels.min(a.max_maps);
    let tiles = (0..shown)
        .map(|k| convnet::viz::Tile::gray(mw, mh, maps[k * mh * mw..(k + 1) * mh * mw].to_vec()))
        .collect::<convnet::Result<Vec<_>>>()?;
    let captions: Vec<String> = (0..shown).map(|k| k.to_string()).collect();
    let picture = convnet::viz::grid_image(&tiles, 0, Some(&captions))?;
    convnet::explain::picture::write_png(&a.out, &picture)?;
    println!(
        "wrote {}: {shown} of {channels} feature maps of {} ({mh}x{mw}) for {}, {}x{} pixels",
        a.out.display(),
        a.layer,
        a.image.display(),
        picture.width(),
        picture.height()
    );
    Ok(())
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
