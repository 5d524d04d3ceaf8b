//! The data loader: batches of transformed images with seeded shuffling, `drop_last`, and
//! background prefetch on worker threads.
//!
//! Determinism: the order of epoch `e` is a permutation drawn from `(seed, e)`, and every
//! image's augmentation from `(seed, e, index)`, so a run — or a resumed run — sees the same
//! batches whatever the number of workers. Worker `k` builds batches `k, k + W, ...` and the
//! iterator takes them round-robin; the bounded channels keep `prefetch` batches ready per
//! worker so the training step does not wait.
//!
//! Data-parallel training: `batch_size` is the *global* batch. With `world_size` ranks, each
//! rank takes its contiguous slice of every global batch (sizes differ by at most one, as
//! `torch.tensor_split`), so the images of a step — and their augmentation — are those one
//! process would take, whatever the number of ranks; evaluation is sharded the same way,
//! every image exactly once. A rank whose slice of a short last batch is empty gets a batch
//! without images (see [`Batch::global_size`]).

use super::{FeatureDataset, ImageDataset, Transform};
use crate::error::{invalid, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Settings of a [`DataLoader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Reshuffle every epoch.
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    /// Seed of shuffling and augmentation.
    pub seed: u64,
    /// Background threads building batches (at least 1).
    pub workers: usize,
    /// Batches each worker keeps ready.
    pub prefetch: usize,
    /// This process's index among `world_size` data-parallel processes.
    pub rank: usize,
    /// Number of data-parallel processes, each taking a slice of every batch.
    pub world_size: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 64,
            shuffle: true,
            drop_last: false,
            seed: 0,
            workers: 1,
            prefetch: 2,
            rank: 0,
            world_size: 1,
        }
    }
}

impl LoaderConfig {
    /// Evaluation by rank `rank` of `world_size` data-parallel ranks: global batches of
    /// `256 * world_size` in data-set order, of which each rank takes its slice.
    fn evaluation(rank: usize, world_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size: 256 * world_size.max(1),
            shuffle: false,
            rank,
            world_size,
            ..Default::default()
        }
    }
}

/// One batch: images `[B, C, H, W]`, their labels, and their indices in the data set.
#[derive(Debug)]
pub struct Batch {
    /// Normalised (and augmented) images.
    pub images: Tensor,
    /// Class indices.
    pub labels: Vec<usize>,
    /// Positions in the data set.
    pub indices: Vec<usize>,
    /// Images in the global batch this one is a slice of (its own size in one process).
    /// In data-parallel training a rank may get an empty slice of a short last batch.
    pub global_size: usize,
}

/// Batches over an [`ImageDataset`] (decoded, normalised and augmented by a [`Transform`])
/// or a [`FeatureDataset`] (taken as they are).
#[derive(Clone)]
pub struct DataLoader {
    source: Source,
    cfg: LoaderConfig,
}

/// What a [`DataLoader`] reads.
#[derive(Clone)]
enum Source {
    Images {
        data: Arc<ImageDataset>,
        transform: Arc<Transform>,
    },
    Features(Arc<FeatureDataset>),
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .rotate_left(29)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

impl DataLoader {
    /// Creates a loader; fails on a zero batch size, no workers or an invalid shard.
    pub fn new(data: Arc<ImageDataset>, transform: Transform, cfg: LoaderConfig) -> Result<Self> {
        let source = data.source.clone();
        DataLoader::checked(
            Source::Images {
                data,
                transform: Arc::new(transform),
            },
            &source,
            cfg,
        )
    }

    /// A loader over examples that are already numbers (token ids, audio features): every
    /// batch is `[B, dims...]` of the stored values.
    ///
    /// ```
    /// use convnet::data::{DataLoader, FeatureDataset, LoaderConfig};
    /// use std::sync::Arc;
    /// let ds = FeatureDataset::new((0..6).map(|v| v as f32).collect(), vec![2], vec![0, 1, 1], vec!["a".into(), "b".into()], "memory")?;
    /// let cfg = LoaderConfig { batch_size: 2, shuffle: false, ..Default::default() };
    /// let loader = DataLoader::for_features(Arc::new(ds), cfg)?;
    /// let b = loader.make_batch(0, &[2, 0], 2)?;
    /// assert_eq!((b.images.dims(), b.images.to_vec(), b.labels), (&[2, 2][..], vec![4., 5., 0., 1.], vec![1, 0]));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn for_features(data: Arc<FeatureDataset>, cfg: LoaderConfig) -> Result<Self> {
        let source = data.source.clone();
        DataLoader::checked(Source::Features(data), &source, cfg)
    }

    /// [`DataLoader::for_features`] for evaluation by rank `rank` of `world_size`
    /// data-parallel ranks (0 of 1 in one process): global batches of `256 * world_size` in
    /// data-set order, of which this rank takes its slice.
    pub fn for_evaluation_features(
        data: Arc<FeatureDataset>,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        DataLoader::for_features(data, LoaderConfig::evaluation(rank, world_size))
    }

    fn checked(source: Source, origin: &str, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.workers == 0 || cfg.prefetch == 0 {
            return Err(invalid(
                "DataLoader",
                format!("batch_size, workers and prefetch must be positive, got {cfg:?}"),
            ));
        }
        if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
            return Err(invalid(
                "DataLoader",
                format!(
                    "rank {} must be below world_size {}",
                    cfg.rank, cfg.world_size
                ),
            ));
        }
        let loader = DataLoader { source, cfg };
        if loader.is_empty() {
            return Err(invalid("DataLoader", format!("data set {origin} is empty")));
        }
        Ok(loader)
    }

    /// A loader for evaluation: batches of 256 in data-set order, no augmentation.
    pub fn for_evaluation(data: Arc<ImageDataset>, normalize: super::Normalize) -> Result<Self> {
        DataLoader::for_evaluation_sharded(data, normalize, 0, 1)
    }

    /// [`DataLoader::for_evaluation`] for rank `rank` of `world_size` data-parallel ranks:
    /// global batches of `256 * world_size`, of which this rank takes its slice (about 256),
    /// so that the ranks together see every image exactly once.
    pub fn for_evaluation_sharded(
        data: Arc<ImageDataset>,
        normalize: super::Normalize,
        rank: usize,
        world_size: usize,
    ) -> Result<Self> {
        DataLoader::new(
            data,
            Transform {
                normalize,
                augment: None,
            },
            LoaderConfig::evaluation(rank, world_size),
        )
    }

    /// The image set, for a loader of images.
    pub fn images(&self) -> Option<&ImageDataset> {
        match &self.source {
            Source::Images { data, .. } => Some(data),
            Source::Features(_) => None,
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        match &self.source {
            Source::Images { data, .. } => data.len(),
            Source::Features(data) => data.len(),
        }
    }

    /// True when there are no examples (never for a loader that was built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        match &self.source {
            Source::Images { data, .. } => data.classes(),
            Source::Features(data) => data.classes(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Example indices of every batch of `epoch` for this rank (its slices of the global
    /// batches; some may be empty, see [`Batch::global_size`]).
    ///
    /// ```
    /// use convnet::data::{DataLoader, ImageDataset, LoaderConfig, Normalize, Transform};
    /// use std::sync::Arc;
    /// let data = Arc::new(ImageDataset::new(vec![0; 7], (0..7).map(|i| i % 2).collect(), [1, 1, 1], vec!["a".into(), "b".into()], "memory")?);
    /// let loader = |rank| {
    ///     let cfg = LoaderConfig { batch_size: 4, shuffle: false, rank, world_size: 2, ..Default::default() };
    ///     let transform = Transform { normalize: Normalize::default_for(1), augment: None };
    ///     DataLoader::new(data.clone(), transform, cfg)
    /// };
    /// assert_eq!(loader(0)?.batches(0), vec![vec![0, 1], vec![4, 5]]);
    /// assert_eq!(loader(1)?.batches(0), vec![vec![2, 3], vec![6]]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        self.slices(epoch).into_iter().map(|(b, _)| b).collect()
    }

    /// This rank's slice of every global batch of `epoch`, with the global batch's size.
    fn slices(&self, epoch: usize) -> Vec<(Vec<usize>, usize)> {
        self.global_batches(epoch)
            .into_iter()
            .map(|b| (b[self.slice_of(b.len())].to_vec(), b.len()))
            .collect()
    }

    /// The positions of this rank's slice within a global batch of `len` images.
    fn slice_of(&self, len: usize) -> std::ops::Range<usize> {
        let (n, r) = (self.cfg.world_size, self.cfg.rank);
        let (base, extra) = (len / n, len % n);
        let start = r * base + r.min(extra);
        start..start + base + usize::from(r < extra)
    }

    /// Example indices of every global batch of `epoch` (all ranks' slices together).
    pub fn global_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if self.cfg.shuffle {
            Rng::new(mix(self.cfg.seed, epoch as u64 + 1)).shuffle(&mut order);
        }
        let mut batches: Vec<Vec<usize>> = order
            .chunks(self.cfg.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.cfg.drop_last
            && batches
                .last()
                .is_some_and(|b| b.len() < self.cfg.batch_size)
        {
            batches.pop();
        }
        batches
    }

    /// Number of batches (steps) per epoch; the same on every rank.
    pub fn num_batches(&self) -> usize {
        let (len, b) = (self.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            len / b
        } else {
            len.div_ceil(b)
        }
    }

    /// Builds one batch (on the calling thread) of a global batch of `global_size` images.
    pub fn make_batch(&self, epoch: usize, indices: &[usize], global_size: usize) -> Result<Batch> {
        let (images, labels) = match &self.source {
            Source::Images { data, transform } => {
                let shape = data.image_shape();
                let out = transform.output_shape(shape);
                let per = out.iter().product::<usize>();
                let mut buf = vec![0f32; indices.len() * per];
                for (k, &i) in indices.iter().enumerate() {
                    let mut rng = Rng::new(mix(mix(self.cfg.seed, epoch as u64 + 1), i as u64 + 1));
                    transform.apply(
                        &data.image(i)?,
                        shape,
                        &mut rng,
                        &mut buf[k * per..(k + 1) * per],
                    );
                }
                let images = Tensor::from_vec(buf, [indices.len(), out[0], out[1], out[2]])?;
                (images, indices.iter().map(|&i| data.label(i)).collect())
            }
            Source::Features(data) => {
                let per: usize = data.dims().iter().product();
                let mut buf = Vec::with_capacity(indices.len() * per);
                for &i in indices {
                    buf.extend_from_slice(data.example(i));
                }
                let dims: Vec<usize> = std::iter::once(indices.len())
                    .chain(data.dims().iter().copied())
                    .collect();
                let values = Tensor::from_vec(buf, dims.as_slice())?;
                (values, indices.iter().map(|&i| data.label(i)).collect())
            }
        };
        Ok(Batch {
            images,
            labels,
            indices: indices.to_vec(),
            global_size,
        })
    }

    /// Iterates over the batches of `epoch`, built ahead on worker threads.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// Like [`DataLoader::epoch`], starting at batch `start` (to resume mid-epoch).
    pub fn epoch_from(&self, epoch: usize, start: usize) -> EpochIter {
        let batches: Arc<Vec<(Vec<usize>, usize)>> = Arc::new(
            self.global_batches(epoch)
                .into_iter()
                .skip(start)
                .map(|b| (b[self.slice_of(b.len())].to_vec(), b.len()))
                .collect(),
        );
        let workers = self.cfg.workers.min(batches.len().max(1));
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.cfg.prefetch);
            let loader = self.clone();
            let batches = batches.clone();
            handles.push(std::thread::spawn(move || {
                for (b, global) in batches.iter().skip(w).step_by(workers) {
                    if tx.send(loader.make_batch(epoch, b, *global)).is_err() {
                        return;
                    }
                }
            }));
            receivers.push(rx);
        }
        EpochIter {
            receivers,
            handles,
            next: 0,
            remaining: batches.len(),
        }
    }
}

/// The batches of one epoch (see [`DataLoader::epoch`]).
pub struct EpochIter {
    receivers: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    remaining: usize,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(rx.recv().unwrap_or_else(|_| {
            Err(invalid(
                "DataLoader",
                "a worker thread stopped unexpectedly",
            ))
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
