//! A convolution layer's kernels as a picture: found by `state_dict` name (`NAME.weight`, a
//! 4-D tensor), each kernel min-max normalised and scaled up on a grid.

use super::grid::{grid_image_with, GridLayout, GridOptions, Tile};
use super::render::{save_png, PlotFormat};
use crate::error::{invalid, Error, Result};
use crate::Tensor;
use image::RgbImage;
use std::path::Path;

/// Side in pixels of each kernel in a filter picture (nearest-neighbour scaled).
pub const FILTER_CELL: u32 = 24;

/// Pixels between kernels in a filter picture.
pub const FILTER_GAP: u32 = 2;

/// The convolution layers of a `state_dict`: the names `NAME` whose `NAME.weight` is 4-D,
/// in `state_dict` order.
///
/// ```
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// assert_eq!(convnet::viz::conv_layers(&model.state_dict()), ["conv1", "conv2"]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn conv_layers(state: &[(String, Tensor)]) -> Vec<String> {
    state
        .iter()
        .filter(|(_, t)| t.rank() == 4)
        .filter_map(|(k, _)| k.strip_suffix(".weight").map(str::to_string))
        .collect()
}

/// One tile per kernel of a convolution weight `[out, in, kh, kw]`: kernels with three
/// input channels (a first layer reading RGB images) in colour, the others in grey as the
/// mean over their input channels; each kernel min-max normalised on its own.
///
/// ```
/// use convnet::Tensor;
/// let w = Tensor::from_vec((0..2 * 4 * 3 * 3).map(|v| v as f32).collect(), [2, 4, 3, 3])?;
/// let tiles = convnet::viz::filter_tiles(&w)?;
/// assert_eq!(tiles.len(), 2);
/// assert_eq!((tiles[0].width(), tiles[0].height()), (3, 3));
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn filter_tiles(weight: &Tensor) -> Result<Vec<Tile>> {
    let &[out, inp, kh, kw] = weight.dims() else {
        return Err(invalid(
            "filters",
            format!(
                "a convolution weight is 4-D [out, in, kh, kw], got {:?}",
                weight.dims()
            ),
        ));
    };
    let values = weight.to_vec();
    let per_out = inp * kh * kw;
    let plane = kh * kw;
    (0..out)
        .map(|o| {
            let k = &values[o * per_out..(o + 1) * per_out];
            if inp == 3 {
                Tile::rgb(kw, kh, k.to_vec())
            } else {
                let mean: Vec<f32> = (0..plane)
                    .map(|p| (0..inp).map(|c| k[c * plane + p]).sum::<f32>() / inp.max(1) as f32)
                    .collect();
                Tile::gray(kw, kh, mean)
            }
        })
        .collect()
}

/// The weight of convolution layer `layer` in `state`, or an error listing the layers
/// there are.
fn conv_weight<'a>(state: &'a [(String, Tensor)], layer: &str) -> Result<&'a Tensor> {
    let key = format!("{layer}.weight");
    let listed = || {
        let names = conv_layers(state);
        if names.is_empty() {
            "the model has no convolution layers".to_string()
        } else {
            format!("convolution layers: {}", names.join(", "))
        }
    };
    match state.iter().find(|(k, _)| *k == key) {
        Some((_, t)) if t.rank() == 4 => Ok(t),
        Some((_, t)) => Err(Error::State(format!(
            "layer {layer:?}: {key} is {}-D {:?}, not a convolution kernel [out, in, kh, kw]; {}",
            t.rank(),
            t.dims(),
            listed()
        ))),
        None => Err(Error::State(format!(
            "no layer {layer:?} (no tensor {key}); {}",
            listed()
        ))),
    }
}

/// The kernels of convolution layer `layer` (its `state_dict` name, e.g. `conv1` or
/// `layer1.0.conv1`) on a grid: [`FILTER_CELL`] pixels per kernel, [`FILTER_GAP`] apart,
/// about square (see [`filter_tiles`] for colour and grey).
///
/// ```
/// use convnet::viz::{filters_image, FILTER_CELL, FILTER_GAP};
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let img = filters_image(&model.state_dict(), "conv1")?; // 32 kernels: 6 columns, 6 rows
/// assert_eq!(img.width(), 6 * FILTER_CELL + 7 * FILTER_GAP);
/// let err = filters_image(&model.state_dict(), "fc1").unwrap_err().to_string();
/// assert!(err.contains("convolution layers: conv1, conv2"), "{err}");
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn filters_image(state: &[(String, Tensor)], layer: &str) -> Result<RgbImage> {
    let tiles = filter_tiles(conv_weight(state, layer)?)?;
    grid_image_with(
        &tiles,
        &GridOptions {
            columns: 0,
            cell: Some((FILTER_CELL, FILTER_CELL)),
            gap: FILTER_GAP,
            ..GridOptions::default()
        },
    )
}

/// What [`plot_filters`] drew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FiltersPicture {
    /// The layer's weight shape `[out, in, kh, kw]`: `out` kernels were drawn.
    pub shape: [usize; 4],
    /// Whether the kernels are in colour (three input channels) rather than grey means.
    pub colour: bool,
    /// Where the kernels lie.
    pub layout: GridLayout,
}

/// Writes [`filters_image`] of `layer` to `out` (a `.png`) and says what it drew.
///
/// ```no_run
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let drawn = convnet::viz::plot_filters(&model.state_dict(), "conv1", "filters.png")?;
/// assert_eq!(drawn.shape, [32, 3, 3, 3]);
/// assert_eq!(drawn.layout.size(), (158, 158));
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn plot_filters(
    state: &[(String, Tensor)],
    layer: &str,
    out: impl AsRef<Path>,
) -> Result<FiltersPicture> {
    let out = out.as_ref();
    if PlotFormat::from_path(out)? != PlotFormat::Png {
        return Err(Error::Format {
            path: out.to_path_buf(),
            msg: "kernel pictures are bitmaps: name a .png file".into(),
        });
    }
    let weight = conv_weight(state, layer)?;
    let shape: [usize; 4] = match weight.dims() {
        &[o, i, h, w] => [o, i, h, w],
        d => {
            return Err(invalid(
                "filters",
                format!("{layer}.weight is {d:?}, not 4-D"),
            ))
        }
    };
    let img = filters_image(state, layer)?;
    save_png(&img, out)?;
    Ok(FiltersPicture {
        shape,
        colour: shape[1] == 3,
        layout: GridLayout::new(shape[0], 0, (FILTER_CELL, FILTER_CELL), 0, FILTER_GAP),
    })
}
