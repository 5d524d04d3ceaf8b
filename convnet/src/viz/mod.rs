//! Pictures of training runs and models: learning curves from a run's `metrics.jsonl`, the
//! confusion matrix and the most confident mistakes of an evaluation, a convolution layer's
//! kernels, and the image grid they are laid out on.
//!
//! Charts are drawn with `plotters` into an RGB buffer that the `image` crate encodes as PNG,
//! or as SVG text; the format follows the output file's extension ([`PlotFormat`]). Text is
//! set in DejaVu Sans, embedded in the library (`viz/font/`, with its licence), so nothing
//! depends on the fonts or font libraries of the machine.
//!
//! ```no_run
//! // The learning curves of two runs of `convnet train`, overlaid:
//! convnet::viz::plot_run_folders(&["runs/a", "runs/b"], "curves.png")?;
//! # Ok::<(), convnet::Error>(())
//! ```

mod confusion;
mod curves;
mod filters;
mod grid;
mod metrics;
mod mistakes;
mod render;

pub use confusion::{confusion_size, plot_confusion};
pub use curves::{plot_curves, plot_run_folders, CURVES_SIZE};
pub use filters::{
    conv_layers, filter_tiles, filters_image, plot_filters, FiltersPicture, FILTER_CELL, FILTER_GAP,
};
pub use grid::{grid_image, grid_image_with, GridLayout, GridOptions, Tile, MIN_CELL};
pub use metrics::{EpochMetrics, RunCurves, METRICS_FILE};
pub use mistakes::{
    misclassified_image, plot_misclassified, write_eval_plots, Mistake, MistakeLog,
    EVAL_PLOT_MISTAKES,
};
pub use render::{save_png, PlotFormat, FONT_FAMILY};
