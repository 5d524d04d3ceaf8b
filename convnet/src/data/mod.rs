//! Data sets, readers, transforms and the loader.
//!
//! Every reader produces an [`ImageDataset`]: decoded 8-bit images `[N, C, H, W]` in memory
//! with class indices and names. [`open`] recognises what a path holds:
//!
//! - CIFAR-10 binary (`data_batch_1.bin`..`data_batch_5.bin`, `test_batch.bin`,
//!   `batches.meta.txt`) or CIFAR-100 binary (`train.bin`, `test.bin`), as a folder or the
//!   official `.tar.gz`;
//! - MNIST / Fashion-MNIST IDX files (`*-images-idx3-ubyte`, `*-labels-idx1-ubyte`, raw or
//!   `.gz`);
//! - image folders `<root>/<class>/*.{jpg,jpeg,png}` (classes from sorted folder names, as
//!   torchvision's `ImageFolder`), as a directory or a `.tar.gz` of one;
//! - a folder holding `train` and `test` (folders or `.tar.gz` archives): a train/test pair.
//!
//! Readers check magic numbers, sizes and counts, and their errors name the file and say how
//! to fix it.

mod archive;
pub mod audio;
mod cache;
mod cifar;
mod features;
mod folder;
mod geometry;
mod idx;
mod loader;
pub mod store;
pub mod text;
mod transform;

pub use cache::cache_dir;
pub use cifar::CIFAR10_CLASSES;
pub use features::FeatureDataset;
pub use folder::image_to_planes;
pub use folder::FolderOptions;
pub use geometry::{RandomResizedCrop, ResizeCrop};
pub use loader::{Batch, DataLoader, EpochIter, LoaderConfig};
pub use transform::{Augment, Normalize, Transform};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use store::PixelStore;

/// Decoded 8-bit images with labels, all of one size. The pixels live in memory, or, for
/// data sets larger than [`store::memory_limit`], in a file read image by image (see
/// `store`); subsets ([`ImageDataset::select`]) share them.
#[derive(Clone)]
pub struct ImageDataset {
    store: Arc<PixelStore>,
    /// Positions in `store` of this set's images, in order (`None`: all of them).
    index: Option<Arc<Vec<usize>>>,
    labels: Vec<u32>,
    shape: [usize; 3],
    classes: Vec<String>,
    /// Where the data came from (for messages).
    pub source: String,
    /// Unreadable files skipped while reading (image folders with `skip_bad_images`).
    pub skipped: usize,
}

impl std::fmt::Debug for ImageDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageDataset({} images of {:?}, {} classes, from {}{})",
            self.len(),
            self.shape,
            self.classes.len(),
            self.source,
            if self.store.in_file() {
                ", pixels in a file"
            } else {
                ""
            }
        )
    }
}

impl PartialEq for ImageDataset {
    /// Same images (compared pixel by pixel), labels, shape, classes and source.
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape
            && self.labels == other.labels
            && self.classes == other.classes
            && self.source == other.source
            && self.skipped == other.skipped
            && (0..self.len()).all(|i| match (self.image(i), other.image(i)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            })
    }
}

impl ImageDataset {
    /// Builds a data set, checking that the sizes agree and every label names a class.
    ///
    /// ```
    /// use convnet::data::ImageDataset;
    /// let ds = ImageDataset::new(vec![0; 2 * 3 * 4 * 4], vec![0, 1], [3, 4, 4], vec!["a".into(), "b".into()], "memory")?;
    /// assert_eq!(ds.len(), 2);
    /// assert!(ImageDataset::new(vec![0; 48], vec![2], [3, 4, 4], vec!["a".into()], "memory").is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn new(
        pixels: Vec<u8>,
        labels: Vec<u32>,
        shape: [usize; 3],
        classes: Vec<String>,
        source: impl Into<String>,
    ) -> Result<Self> {
        ImageDataset::from_store(PixelStore::Memory(pixels), labels, shape, classes, source)
    }

    /// A data set over pixels in `store` (in order), with the same checks as
    /// [`ImageDataset::new`].
    pub(crate) fn from_store(
        store: PixelStore,
        labels: Vec<u32>,
        shape: [usize; 3],
        classes: Vec<String>,
        source: impl Into<String>,
    ) -> Result<Self> {
        let source = source.into();
        let per = crate::shape::checked_numel(&shape).unwrap_or(0) as u64;
        if per == 0 || Some(store.len()) != (labels.len() as u64).checked_mul(per) {
            return Err(Error::Format {
                path: PathBuf::from(&source),
                msg: format!(
                    "{} pixel bytes do not hold {} images of {:?}",
                    store.len(),
                    labels.len(),
                    shape
                ),
            });
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l as usize >= classes.len())
        {
            return Err(Error::Format {
                path: PathBuf::from(&source),
                msg: format!(
                    "label {l} of example {i} is out of range for {} classes",
                    classes.len()
                ),
            });
        }
        Ok(ImageDataset {
            store: Arc::new(store),
            index: None,
            labels,
            shape,
            classes,
            source,
            skipped: 0,
        })
    }

    /// This set with its images in another order: image `i` is the store's `order[i]`
    /// (for readers that decode in another order than the set's), labels given in the new
    /// order.
    pub(crate) fn reordered(mut self, order: Vec<usize>, labels: Vec<u32>) -> Self {
        debug_assert_eq!(order.len(), labels.len());
        self.index = Some(Arc::new(order));
        self.labels = labels;
        self
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image shape `[C, H, W]`.
    pub fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Whether the pixels are read from a file as needed rather than held in memory.
    pub fn pixels_in_file(&self) -> bool {
        self.store.in_file()
    }

    /// Pixels of example `i`, `[C, H, W]` bytes (read from the file for a data set whose
    /// pixels are in one).
    ///
    /// ```
    /// use convnet::data::ImageDataset;
    /// let ds = ImageDataset::new((0..8).collect(), vec![0, 1], [1, 2, 2], vec!["a".into(), "b".into()], "memory")?;
    /// assert_eq!(&*ds.image(1)?, &[4, 5, 6, 7]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn image(&self, i: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
        let per = self.shape.iter().product::<usize>();
        let at = match &self.index {
            Some(ix) => ix[i],
            None => i,
        };
        self.store.read(at as u64 * per as u64, per)
    }

    /// Label of example `i`.
    pub fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The examples at `indices`, in that order (sharing this set's pixels).
    pub fn select(&self, indices: &[usize]) -> ImageDataset {
        let order: Vec<usize> = indices
            .iter()
            .map(|&i| match &self.index {
                Some(ix) => ix[i],
                None => i,
            })
            .collect();
        ImageDataset {
            store: self.store.clone(),
            index: Some(Arc::new(order)),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            shape: self.shape,
            classes: self.classes.clone(),
            source: self.source.clone(),
            skipped: self.skipped,
        }
    }

    /// The examples of the classes `names` only, relabelled `0..names.len()` in that order;
    /// an unknown name is an error listing the classes there are.
    ///
    /// ```
    /// use convnet::data::ImageDataset;
    /// let classes = vec!["cat".into(), "dog".into(), "ship".into()];
    /// let ds = ImageDataset::new(vec![0; 4], vec![0, 2, 1, 2], [1, 1, 1], classes, "memory")?;
    /// let vehicles = ds.with_classes(&["ship".into(), "cat".into()])?;
    /// assert_eq!((vehicles.labels(), vehicles.classes()), (&[1u32, 0, 0][..], &["ship".to_string(), "cat".into()][..]));
    /// assert!(ds.with_classes(&["car".into()]).unwrap_err().to_string().contains("cat, dog, ship"));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn with_classes(&self, names: &[String]) -> Result<ImageDataset> {
        let new_label = class_map(&self.source, &self.classes, names)?;
        let keep: Vec<usize> = (0..self.len())
            .filter(|&i| new_label[self.labels[i] as usize].is_some())
            .collect();
        let mut subset = self.select(&keep);
        subset.labels = keep
            .iter()
            .filter_map(|&i| new_label[self.labels[i] as usize])
            .collect();
        subset.classes = names.to_vec();
        Ok(subset)
    }

    /// The first `n` examples (all if fewer).
    pub fn take(&self, n: usize) -> ImageDataset {
        let idx: Vec<usize> = (0..n.min(self.len())).collect();
        self.select(&idx)
    }

    /// `n` examples spread evenly over the set (all if fewer): a subset that keeps the class
    /// balance of class-sorted data, unlike [`ImageDataset::take`].
    ///
    /// ```
    /// use convnet::data::ImageDataset;
    /// let ds = ImageDataset::new(vec![0; 6], vec![0, 0, 0, 1, 1, 1], [1, 1, 1], vec!["a".into(), "b".into()], "memory")?;
    /// assert_eq!(ds.spread(2).labels(), &[0, 1]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn spread(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        let idx: Vec<usize> = (0..n).map(|i| i * self.len() / n).collect();
        self.select(&idx)
    }

    /// This set with every image resized and centre-cropped ([`ResizeCrop`]): new pixels,
    /// in memory while they fit (see [`store::memory_limit`]), else in a temporary file.
    ///
    /// ```
    /// use convnet::data::{ImageDataset, ResizeCrop};
    /// let ds = ImageDataset::new(vec![9; 2 * 3 * 32 * 32], vec![0, 1], [3, 32, 32], vec!["a".into(), "b".into()], "memory")?;
    /// let big = ds.resized(ResizeCrop::new(40, 36)?)?;
    /// assert_eq!((big.image_shape(), big.labels()), ([3, 36, 36], ds.labels()));
    /// assert!(big.image(1)?.iter().all(|&v| v == 9));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn resized(&self, geometry: ResizeCrop) -> Result<ImageDataset> {
        use rayon::prelude::*;
        let shape = geometry.output_shape(self.shape[0]);
        let mut sink = store::PixelSink::new(None, &cache::scratch_dir());
        let per = shape.iter().product::<usize>() as u64;
        sink.expect(per.saturating_mul(self.len() as u64))?;
        for start in (0..self.len()).step_by(256) {
            let end = (start + 256).min(self.len());
            let images: Vec<Vec<u8>> = (start..end)
                .into_par_iter()
                .map(|i| Ok(geometry.apply(&self.image(i)?, self.shape)))
                .collect::<Result<_>>()?;
            for img in images {
                sink.push(&img)?;
            }
        }
        let mut ds = ImageDataset::from_store(
            sink.finish(&[])?,
            self.labels.clone(),
            shape,
            self.classes.clone(),
            self.source.clone(),
        )?;
        ds.skipped = self.skipped;
        Ok(ds)
    }

    /// Splits off the last `n` examples: `(first len-n, last n)`.
    pub fn split_tail(&self, n: usize) -> (ImageDataset, ImageDataset) {
        let cut = self.len().saturating_sub(n);
        let head: Vec<usize> = (0..cut).collect();
        let tail: Vec<usize> = (cut..self.len()).collect();
        (self.select(&head), self.select(&tail))
    }

    /// Splits off the last `fraction` of every class (for class-sorted image folders).
    pub fn split_per_class(&self, fraction: f64) -> (ImageDataset, ImageDataset) {
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        for c in 0..self.classes.len() {
            let members: Vec<usize> = (0..self.len())
                .filter(|&i| self.labels[i] as usize == c)
                .collect();
            let cut = members.len()
                - ((members.len() as f64 * fraction).round() as usize).min(members.len());
            head.extend_from_slice(&members[..cut]);
            tail.extend_from_slice(&members[cut..]);
        }
        (self.select(&head), self.select(&tail))
    }
}

/// For `--classes`: each of `classes`' new label when the set is restricted to `names` (in
/// that order), `None` for the classes left out; an unknown or repeated name is an error.
pub(crate) fn class_map(
    source: &str,
    classes: &[String],
    names: &[String],
) -> Result<Vec<Option<u32>>> {
    let mut new_label = vec![None; classes.len()];
    for (i, name) in names.iter().enumerate() {
        let Some(old) = classes.iter().position(|c| c == name) else {
            return Err(crate::error::invalid(
                "data",
                format!(
                    "{source}: no class {name:?}; its classes: {}",
                    classes.join(", ")
                ),
            ));
        };
        if new_label[old].is_some() {
            return Err(crate::error::invalid(
                "data",
                format!("class {name:?} is named twice"),
            ));
        }
        new_label[old] = Some(i as u32);
    }
    Ok(new_label)
}

/// What a data path holds: a train/test pair, or one set to be split by the caller.
#[derive(Debug)]
pub enum DataSplit {
    /// Separate training and test sets.
    Pair {
        /// Training examples.
        train: ImageDataset,
        /// Test examples.
        test: ImageDataset,
    },
    /// One set (e.g. only MNIST's `t10k` files); `sorted_by_class` says how to hold out data.
    Single {
        /// The examples.
        data: ImageDataset,
        /// True for image folders, whose order is class by class.
        sorted_by_class: bool,
    },
}

impl DataSplit {
    /// Train and test sets; a single set is split, holding out `holdout` of it (the tail for
    /// IDX data, the tail of each class for image folders).
    pub fn into_train_test(self, holdout: f64) -> (ImageDataset, ImageDataset) {
        match self {
            DataSplit::Pair { train, test } => (train, test),
            DataSplit::Single {
                data,
                sorted_by_class: true,
            } => data.split_per_class(holdout),
            DataSplit::Single {
                data,
                sorted_by_class: false,
            } => {
                let n = (data.len() as f64 * holdout).round() as usize;
                data.split_tail(n)
            }
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads an image folder packed as a `.tar.gz` held in memory (e.g. a sample embedded in a
/// binary); `name` identifies it in messages.
pub fn image_folder_from_tar_gz_bytes(
    name: &str,
    bytes: &[u8],
    opts: &FolderOptions,
) -> Result<ImageDataset> {
    let path = Path::new(name);
    folder::from_archive_reader(path, bytes, opts, None)
}

/// Opens a data path of any supported layout (see the module docs), with every image
/// resized and cropped when `opts.resize` says so (image folders as they are decoded, other
/// layouts after reading).
pub fn open(path: &Path, opts: &FolderOptions) -> Result<DataSplit> {
    let (split, decoded_to_size) = open_as_stored(path, opts)?;
    let geometry = match opts.resize {
        Some(g) if !decoded_to_size => g,
        _ => return Ok(split),
    };
    let fit = |ds: ImageDataset| ds.resized(geometry);
    Ok(match split {
        DataSplit::Pair { train, test } => DataSplit::Pair {
            train: fit(train)?,
            test: fit(test)?,
        },
        DataSplit::Single {
            data,
            sorted_by_class,
        } => DataSplit::Single {
            data: fit(data)?,
            sorted_by_class,
        },
    })
}

/// What `path` holds as its readers store it, and whether it came from image folders
/// (decoded with `opts.resize` already applied).
fn open_as_stored(path: &Path, opts: &FolderOptions) -> Result<(DataSplit, bool)> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.is_file() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.contains("idx") {
            return Ok((idx::open_single(path)?, false));
        }
        if !(name.ends_with(".tar.gz") || name.ends_with(".tgz")) {
            return Err(format_err(
                path,
                "not a data set: expected a folder, a .tar.gz archive, or an IDX file",
            ));
        }
        // A CIFAR release is read whole (it is small); an image folder is streamed.
        if cifar::is_release(&archive::entry_names(path)?) {
            if let Some(split) = cifar::from_archive(path, &archive::read_tar_gz(path)?)? {
                return Ok((split, false));
            }
        }
        let data = folder::open(path, opts)?;
        return Ok((
            DataSplit::Single {
                data,
                sorted_by_class: true,
            },
            true,
        ));
    }
    if let Some(split) = cifar::from_dir(path)? {
        return Ok((split, false));
    }
    if let Some(split) = idx::from_dir(path)? {
        return Ok((split, false));
    }
    let part = |name: &str| -> Option<PathBuf> {
        [
            path.join(name),
            path.join(format!("{name}.tar.gz")),
            path.join(format!("{name}.tgz")),
        ]
        .into_iter()
        .find(|p| p.exists())
    };
    if let (Some(train), Some(test)) = (part("train"), part("test")) {
        let train = folder::open(&train, opts)?;
        let test = folder::open(&test, opts)?;
        if train.image_shape() != test.image_shape() || train.classes() != test.classes() {
            return Err(format_err(path, format!(
                "train and test differ: train has {} classes of {:?} images, test has {} classes of {:?} images",
                train.classes().len(), train.image_shape(), test.classes().len(), test.image_shape()
            )));
        }
        return Ok((DataSplit::Pair { train, test }, true));
    }
    let data = folder::open(path, opts)?;
    Ok((
        DataSplit::Single {
            data,
            sorted_by_class: true,
        },
        true,
    ))
}
