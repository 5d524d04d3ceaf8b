//! TensorBoard event files of `convnet train` (on unless `--no-tensorboard`), written by
//! rank 0 into the run folder, so that `tensorboard --logdir runs` shows every run:
//!
//! - per epoch (step = epoch): the figures of `metrics.jsonl` (`train/loss`,
//!   `train/accuracy`, `test/loss`, `test/accuracy`, `lr`, `train/images_per_sec`,
//!   `train/epoch_seconds`), and histograms of every parameter (`weights/<name>`) and of
//!   the gradients of the epoch's last optimizer step (`grads/<name>`);
//! - every `--tensorboard-every` optimizer steps (step = optimizer step): `train/loss_step`,
//!   the mean training loss over the steps since the previous point;
//! - after the run's last epoch: a few test images with their true and predicted classes
//!   (`test_images/<i> true=<class> predicted=<class>`).
//!
//! Each invocation starts an event file of its own (a resumed run adds one beside the
//! earlier ones and never rewrites them). A file that cannot be started stops the run
//! before it trains; a write that fails later stops the logging with a note, not the
//! training.

use anyhow::{Context, Result};
use convnet::data::{DataLoader, ImageDataset, Normalize};
use convnet::infer::Predictor;
use convnet::tensorboard::EventWriter;
use convnet::train::{BatchProgress, Trainer};
use std::path::Path;
use std::sync::Arc;

/// `metrics.jsonl` keys and the series they are written to.
const EPOCH_SCALARS: [(&str, &str); 7] = [
    ("train_loss", "train/loss"),
    ("train_accuracy", "train/accuracy"),
    ("test_loss", "test/loss"),
    ("test_accuracy", "test/accuracy"),
    ("lr", "lr"),
    ("train_images_per_sec", "train/images_per_sec"),
    ("seconds", "train/epoch_seconds"),
];

/// Test images shown with their predictions.
const IMAGES: usize = 8;

/// The run's event file, or nothing (not rank 0, `--no-tensorboard`, or after a failed
/// write).
pub struct Board {
    writer: Option<EventWriter>,
    /// Optimizer steps between two `train/loss_step` points.
    every: usize,
    /// Images in a (global) batch and in the training set, to turn the running mean loss
    /// of the progress reports into sums.
    batch_size: usize,
    train_images: usize,
    /// Where the next `train/loss_step` window starts: (epoch, batches done in it, loss
    /// sum of those batches).
    since: (usize, usize, f64),
    grads_noted: bool,
}

impl Board {
    /// Starts the event file in `dir` when `on` (and makes the trainer keep the gradients
    /// of each epoch's last step for the gradient histograms).
    pub fn open(
        dir: &Path,
        on: bool,
        every: usize,
        trainer: &mut Trainer,
        loader: &DataLoader,
    ) -> Result<Board> {
        let writer = match on {
            true => Some(EventWriter::create(dir).with_context(|| {
                "cannot start a TensorBoard event file (train without one with --no-tensorboard)"
            })?),
            false => None,
        };
        trainer.keep_gradients(on);
        Ok(Board {
            writer,
            every: every.max(1),
            batch_size: loader.config().batch_size,
            train_images: loader.len(),
            since: (0, 0, 0.0),
            grads_noted: false,
        })
    }

    /// After a batch's progress report: a `train/loss_step` point once the optimizer
    /// step passes another multiple of `every`, with the mean loss since the previous
    /// point (or since the epoch began: the reports' running means restart every epoch).
    pub fn batch(&mut self, p: &BatchProgress) {
        if self.writer.is_none() {
            return;
        }
        if self.since.0 != p.epoch {
            self.since = (p.epoch, 0, 0.0);
        }
        let (_, since_batch, since_sum) = self.since;
        let first = (p.epoch - 1) * p.batches;
        let step = first + p.batch;
        if step / self.every == (first + since_batch) / self.every {
            return;
        }
        let seen = |batches: usize| (batches * self.batch_size).min(self.train_images) as f64;
        let sum = p.loss * seen(p.batch);
        let images = seen(p.batch) - seen(since_batch);
        self.since = (p.epoch, p.batch, sum);
        if images <= 0.0 {
            return;
        }
        let loss = ((sum - since_sum) / images) as f32;
        let r = self.write(|w| {
            w.add_scalar("train/loss_step", loss, step as i64)?;
            Ok(w.flush()?)
        });
        self.keep(r);
    }

    /// After epoch `epoch` (its line of `metrics.jsonl` is `metrics`): its scalars,
    /// histograms of the weights and of the last step's gradients, and, with `test`, a few
    /// of its images with the model's predictions.
    pub fn epoch(
        &mut self,
        epoch: usize,
        metrics: Option<&serde_json::Value>,
        trainer: &Trainer,
        test: Option<(&ImageDataset, &Normalize)>,
    ) {
        if self.writer.is_none() {
            return;
        }
        let step = epoch as i64;
        let r = self.write(|w| {
            for (key, tag) in EPOCH_SCALARS {
                if let Some(v) = metrics.and_then(|m| m[key].as_f64()) {
                    w.add_scalar(tag, v as f32, step)?;
                }
            }
            for (name, t) in trainer.model().named_parameters() {
                w.add_histogram(&format!("weights/{name}"), &t.try_to_vec()?, step)?;
            }
            for (name, g) in trainer.last_gradients().unwrap_or_default() {
                w.add_histogram(&format!("grads/{name}"), &g.try_to_vec()?, step)?;
            }
            Ok(())
        });
        self.keep(r);
        if trainer.last_gradients().is_none() && !self.grads_noted {
            eprintln!(
                "note: no gradient histograms for epochs whose last step ran through a CUDA graph (its gradients stay in the graph's buffers)"
            );
            self.grads_noted = true;
        }
        if let Some((data, normalize)) = test {
            let r = self.write(|w| write_predictions(w, trainer.model(), data, normalize, step));
            self.keep(r);
        }
        let r = self.write(|w| Ok(w.flush()?));
        self.keep(r);
    }

    fn write(
        &mut self,
        f: impl FnOnce(&mut EventWriter) -> anyhow::Result<()>,
    ) -> Option<(String, anyhow::Error)> {
        let w = self.writer.as_mut()?;
        f(w).err().map(|e| (w.path().display().to_string(), e))
    }

    /// Turns a failed write into a note, and stops writing.
    fn keep(&mut self, failed: Option<(String, anyhow::Error)>) {
        if let Some((path, e)) = failed {
            eprintln!("note: TensorBoard logging stopped, training goes on: {path}: {e:#}");
            self.writer = None;
        }
    }
}

/// `IMAGES` test images spread over `data`, each tagged with its true and predicted class.
fn write_predictions(
    w: &mut EventWriter,
    model: &convnet::nn::Model,
    data: &ImageDataset,
    normalize: &Normalize,
    step: i64,
) -> anyhow::Result<()> {
    let [c, h, wd] = data.image_shape();
    if c != 1 && c != 3 {
        return Ok(());
    }
    let sample = data.spread(IMAGES);
    let loader = DataLoader::for_evaluation(Arc::new(sample.clone()), normalize.clone())?;
    let indices: Vec<usize> = (0..sample.len()).collect();
    let batch = loader.make_batch(0, &indices, indices.len())?;
    let logits = model.predict(&batch.images.to_device(Predictor::device(model))?)?;
    let predicted = logits.argmax_last()?;
    let classes = sample.classes();
    let name = |k: usize| {
        classes
            .get(k)
            .map_or_else(|| k.to_string(), |s| s.replace('/', "_"))
    };
    for (k, (&truth, &guess)) in batch.labels.iter().zip(&predicted).enumerate() {
        let planes = sample.image(k)?;
        // [C, H, W] planes to interleaved rows.
        let pixels: Vec<u8> = (0..h * wd)
            .flat_map(|p| (0..c).map(move |ch| (ch, p)))
            .map(|(ch, p)| planes[ch * h * wd + p])
            .collect();
        let (t, g) = (name(truth), name(guess));
        w.add_image(
            &format!("test_images/{k} true={t} predicted={g}"),
            &pixels,
            wd as u32,
            h as u32,
            c as u8,
            step,
        )?;
    }
    Ok(())
}
