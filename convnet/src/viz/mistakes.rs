//! The most confident mistakes of an evaluation: [`MistakeLog`] keeps the wrong predictions
//! with the highest probability as batches go by, and [`misclassified_image`] shows them
//! on a captioned grid; [`write_eval_plots`] writes both evaluation pictures of
//! `convnet eval --plots`.

use super::confusion::plot_confusion;
use super::grid::{grid_image_with, GridOptions, Tile};
use super::render::{draw_labels, save_png, Label};
use crate::data::ImageDataset;
use crate::error::{invalid, Error, Result};
use crate::train::EvalReport;
use crate::Tensor;
use image::{Rgb, RgbImage};
use plotters::style::RGBColor;
use std::path::{Path, PathBuf};

/// How many mistakes `convnet eval --plots` shows.
pub const EVAL_PLOT_MISTAKES: usize = 16;

/// One wrong prediction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mistake {
    /// Position of the image in the evaluated data set.
    pub index: usize,
    /// The true class.
    pub truth: usize,
    /// The predicted class (the model's most probable).
    pub predicted: usize,
    /// The softmax probability of the predicted class.
    pub probability: f32,
}

/// The `keep` most confident wrong predictions seen so far (highest probability first;
/// on equal probability, the lower image index first).
///
/// ```
/// use convnet::viz::MistakeLog;
/// use convnet::Tensor;
/// let mut log = MistakeLog::new(2);
/// // Three images, true classes 0, 1, 1: the first is right, the others wrong.
/// let logits = Tensor::from_vec(vec![3.0, 0.0, 2.0, 0.0, 5.0, 0.0], [3, 2])?;
/// log.observe(&[10, 11, 12], &[0, 1, 1], &logits)?;
/// let m = log.mistakes();
/// assert_eq!(m.iter().map(|m| m.index).collect::<Vec<_>>(), [12, 11]);
/// assert!(m[0].probability > 0.99 && m[0].predicted == 0 && m[0].truth == 1);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct MistakeLog {
    keep: usize,
    worst: Vec<Mistake>,
}

impl MistakeLog {
    /// A log that keeps at most `keep` mistakes.
    pub fn new(keep: usize) -> MistakeLog {
        MistakeLog {
            keep,
            worst: Vec::with_capacity(keep + 1),
        }
    }

    /// Records the wrong predictions of a batch: `indices` (positions in the data set) and
    /// `labels` of its images, and the model's `logits` `[N, classes]` for them.
    pub fn observe(&mut self, indices: &[usize], labels: &[usize], logits: &Tensor) -> Result<()> {
        let n = labels.len();
        let classes = match logits.dims() {
            &[rows, c] if rows == n && indices.len() == n && c > 0 => c,
            d => {
                return Err(invalid(
                    "mistakes",
                    format!(
                        "logits {d:?} do not fit {n} labels and {} indices",
                        indices.len()
                    ),
                ))
            }
        };
        let values = logits.to_vec();
        for ((row, &truth), &index) in values.chunks(classes).zip(labels).zip(indices) {
            let (predicted, &top) =
                row.iter()
                    .enumerate()
                    .fold((0, &f32::NEG_INFINITY), |best, (i, v)| {
                        if *v > *best.1 {
                            (i, v)
                        } else {
                            best
                        }
                    });
            if predicted == truth || !top.is_finite() {
                continue;
            }
            // Softmax probability of the top class: 1 / sum(exp(x - top)).
            let denom: f64 = row.iter().map(|&v| ((v - top) as f64).exp()).sum();
            self.record(Mistake {
                index,
                truth,
                predicted,
                probability: (1.0 / denom) as f32,
            });
        }
        Ok(())
    }

    /// Records one mistake (kept if it is among the `keep` most confident).
    pub fn record(&mut self, m: Mistake) {
        if self.keep == 0 {
            return;
        }
        let pos = self.worst.partition_point(|w| {
            (w.probability, std::cmp::Reverse(w.index))
                >= (m.probability, std::cmp::Reverse(m.index))
        });
        if pos < self.keep {
            self.worst.insert(pos, m);
            self.worst.truncate(self.keep);
        }
    }

    /// The mistakes kept, most confident first.
    pub fn mistakes(&self) -> &[Mistake] {
        &self.worst
    }
}

/// The caption of a mistake: `true → predicted (p=0.97)`.
fn caption(m: &Mistake, classes: &[String]) -> String {
    let name = |c: usize| classes.get(c).cloned().unwrap_or_else(|| c.to_string());
    format!(
        "{} → {} (p={:.2})",
        name(m.truth),
        name(m.predicted),
        m.probability
    )
}

/// The images of `mistakes` from `dataset` (as stored, before normalisation), each scaled
/// up to 96 pixels and captioned `true → predicted (p=0.97)`, four to a row. With no
/// mistakes, a small picture that says so.
///
/// ```
/// use convnet::data::ImageDataset;
/// use convnet::viz::{misclassified_image, Mistake};
/// let ds = ImageDataset::new(vec![0; 2 * 3 * 8 * 8], vec![0, 1], [3, 8, 8], vec!["cat".into(), "dog".into()], "memory")?;
/// let m = Mistake { index: 1, truth: 1, predicted: 0, probability: 0.9 };
/// let img = misclassified_image(&ds, &[m])?;
/// assert!(img.width() >= 96 && img.height() > 96);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn misclassified_image(dataset: &ImageDataset, mistakes: &[Mistake]) -> Result<RgbImage> {
    if mistakes.is_empty() {
        let mut img = RgbImage::from_pixel(320, 40, Rgb([255, 255, 255]));
        draw_labels(
            &mut img,
            &[Label {
                text: "no misclassified images".into(),
                at: (12, 12),
                size: 15,
                color: RGBColor(20, 20, 20),
            }],
        )?;
        return Ok(img);
    }
    let shape = dataset.image_shape();
    let mut tiles = Vec::with_capacity(mistakes.len());
    for m in mistakes {
        if m.index >= dataset.len() {
            return Err(invalid(
                "misclassified",
                format!(
                    "image {} is not in the data set of {} images",
                    m.index,
                    dataset.len()
                ),
            ));
        }
        tiles.push(Tile::from_planes_u8(shape, &dataset.image(m.index)?)?);
    }
    let captions: Vec<String> = mistakes
        .iter()
        .map(|m| caption(m, dataset.classes()))
        .collect();
    grid_image_with(
        &tiles,
        &GridOptions {
            columns: 4,
            cell: Some((96, 96)),
            gap: 8,
            captions: Some(&captions),
            caption_size: 13,
            ..GridOptions::default()
        },
    )
}

/// Writes [`misclassified_image`] to `out` as PNG.
pub fn plot_misclassified(
    dataset: &ImageDataset,
    mistakes: &[Mistake],
    out: impl AsRef<Path>,
) -> Result<()> {
    save_png(&misclassified_image(dataset, mistakes)?, out)
}

/// Writes the pictures of an evaluation into folder `dir` (created if needed):
/// `confusion.png` ([`plot_confusion`] of `report`) and `misclassified.png`
/// ([`misclassified_image`] of `mistakes`, images from the evaluated `dataset`). Returns
/// their paths.
///
/// ```no_run
/// # fn f(report: &convnet::train::EvalReport, test: &convnet::data::ImageDataset, log: &convnet::viz::MistakeLog) -> convnet::Result<()> {
/// let written = convnet::viz::write_eval_plots("plots", report, test, log.mistakes())?;
/// # Ok(()) }
/// ```
pub fn write_eval_plots(
    dir: impl AsRef<Path>,
    report: &EvalReport,
    dataset: &ImageDataset,
    mistakes: &[Mistake],
) -> Result<[PathBuf; 2]> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let confusion = dir.join("confusion.png");
    plot_confusion(&report.confusion, dataset.classes(), &confusion)?;
    let misclassified = dir.join("misclassified.png");
    plot_misclassified(dataset, mistakes, &misclassified)?;
    Ok([confusion, misclassified])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(index: usize, probability: f32) -> Mistake {
        Mistake {
            index,
            truth: 0,
            predicted: 1,
            probability,
        }
    }

    #[test]
    fn keeps_the_most_confident() {
        let mut log = MistakeLog::new(3);
        for (i, p) in [0.5, 0.9, 0.2, 0.9, 0.7, 0.95].into_iter().enumerate() {
            log.record(m(i, p));
        }
        let kept: Vec<usize> = log.mistakes().iter().map(|m| m.index).collect();
        assert_eq!(kept, [5, 1, 3]);
        let mut none = MistakeLog::new(0);
        none.record(m(0, 1.0));
        assert!(none.mistakes().is_empty());
    }

    #[test]
    fn captions() {
        let classes = vec!["cat".to_string(), "dog".to_string()];
        assert_eq!(caption(&m(0, 0.974), &classes), "cat → dog (p=0.97)");
    }

    #[test]
    fn logits_must_fit_the_labels() {
        let mut log = MistakeLog::new(1);
        let logits = Tensor::zeros([2, 3]);
        assert!(log.observe(&[0], &[0], &logits).is_err());
    }
}
