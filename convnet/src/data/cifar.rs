//! CIFAR-10 and CIFAR-100 binary releases.
//!
//! CIFAR-10: `data_batch_1.bin`..`data_batch_5.bin` and `test_batch.bin`, each 10,000 records
//! of 3073 bytes (1 label byte, then 1024 red, 1024 green and 1024 blue bytes, rows top to
//! bottom), class names in `batches.meta.txt`. CIFAR-100: `train.bin` and `test.bin` with
//! 3074-byte records (coarse label, fine label, pixels); fine labels are used, names from
//! `fine_label_names.txt`. Both are read from a folder or straight from the official
//! `.tar.gz`.

use super::{format_err, io_err, DataSplit, ImageDataset};
use crate::error::Result;
use std::path::{Path, PathBuf};

const PIXELS: usize = 3 * 32 * 32;
/// CIFAR-10's class names in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cifar10,
    Cifar100,
}

impl Kind {
    fn record(self) -> usize {
        match self {
            Kind::Cifar10 => 1 + PIXELS,
            Kind::Cifar100 => 2 + PIXELS,
        }
    }
    fn classes(self) -> usize {
        match self {
            Kind::Cifar10 => 10,
            Kind::Cifar100 => 100,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Cifar10 => "CIFAR-10",
            Kind::Cifar100 => "CIFAR-100",
        }
    }
}

/// Parses the records of one batch file into `pixels` and `labels`.
fn parse_batch(
    kind: Kind,
    path: &Path,
    bytes: &[u8],
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let rec = kind.record();
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(format_err(path, format!(
            "{} bytes is not a whole number of {}-byte {} records ({} full records and {} bytes left over): the file is truncated or not a {} binary batch; download the binary version again",
            bytes.len(), rec, kind.name(), bytes.len() / rec, bytes.len() % rec, kind.name()
        )));
    }
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = match kind {
            Kind::Cifar10 => r[0],
            Kind::Cifar100 => r[1],
        };
        if label as usize >= kind.classes() {
            return Err(format_err(
                path,
                format!(
                    "record {i} has label {label}, but {} has {} classes: the file is corrupt",
                    kind.name(),
                    kind.classes()
                ),
            ));
        }
        labels.push(label as u32);
        pixels.extend_from_slice(&r[rec - PIXELS..]);
    }
    Ok(())
}

fn class_names(kind: Kind, text: Option<String>) -> Vec<String> {
    let parsed: Vec<String> = text
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if parsed.len() == kind.classes() {
        return parsed;
    }
    match kind {
        Kind::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        Kind::Cifar100 => (0..100).map(|i| format!("class_{i}")).collect(),
    }
}

/// Files of a release, each looked up by base name.
trait Files {
    fn get(&self, name: &str) -> Result<Option<(PathBuf, Vec<u8>)>>;
}

struct DirFiles(PathBuf);

impl Files for DirFiles {
    fn get(&self, name: &str) -> Result<Option<(PathBuf, Vec<u8>)>> {
        let p = self.0.join(name);
        if !p.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&p).map_err(|e| io_err(&p, e))?;
        Ok(Some((p, bytes)))
    }
}

struct ArchiveFiles<'a>(&'a Path, &'a [(String, Vec<u8>)]);

impl Files for ArchiveFiles<'_> {
    fn get(&self, name: &str) -> Result<Option<(PathBuf, Vec<u8>)>> {
        Ok(self
            .1
            .iter()
            .find(|(n, _)| n == name || n.ends_with(&format!("/{name}")))
            .map(|(n, b)| (self.0.join(n), b.clone())))
    }
}

fn build(
    kind: Kind,
    files: &dyn Files,
    train_names: &[&str],
    test_name: &str,
    meta_name: &str,
    source: &str,
) -> Result<DataSplit> {
    let load = |names: &[&str]| -> Result<ImageDataset> {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        for name in names {
            let (path, bytes) = files.get(name)?.ok_or_else(|| {
                format_err(
                    Path::new(source),
                    format!(
                        "{} release is missing {name}: the download is incomplete",
                        kind.name()
                    ),
                )
            })?;
            parse_batch(kind, &path, &bytes, &mut pixels, &mut labels)?;
        }
        let names = class_names(
            kind,
            files
                .get(meta_name)?
                .map(|(_, b)| String::from_utf8_lossy(&b).into_owned()),
        );
        ImageDataset::new(pixels, labels, [3, 32, 32], names, source)
    };
    Ok(DataSplit::Pair {
        train: load(train_names)?,
        test: load(&[test_name])?,
    })
}

const C10_TRAIN: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

/// Whether archive entry names (paths) are those of a CIFAR-10/100 binary release.
pub(crate) fn is_release(names: &[String]) -> bool {
    let has = |name: &str| {
        names
            .iter()
            .any(|n| n == name || n.ends_with(&format!("/{name}")))
    };
    has("data_batch_1.bin") || has("test_batch.bin") || (has("train.bin") && has("test.bin"))
}

/// Which release `has` describes, read through `files`; `None` if it is neither.
fn detect(
    has: impl Fn(&str) -> bool,
    files: &dyn Files,
    source: &str,
) -> Result<Option<DataSplit>> {
    if has("data_batch_1.bin") || has("test_batch.bin") {
        return build(
            Kind::Cifar10,
            files,
            &C10_TRAIN,
            "test_batch.bin",
            "batches.meta.txt",
            source,
        )
        .map(Some);
    }
    if has("train.bin") && has("test.bin") {
        return build(
            Kind::Cifar100,
            files,
            &["train.bin"],
            "test.bin",
            "fine_label_names.txt",
            source,
        )
        .map(Some);
    }
    Ok(None)
}

/// CIFAR-10/100 in a folder (or its `cifar-10-batches-bin` / `cifar-100-binary` subfolder).
pub(crate) fn from_dir(path: &Path) -> Result<Option<DataSplit>> {
    for dir in [
        path.to_path_buf(),
        path.join("cifar-10-batches-bin"),
        path.join("cifar-100-binary"),
    ] {
        let source = dir.display().to_string();
        if let Some(split) = detect(
            |name| dir.join(name).exists(),
            &DirFiles(dir.clone()),
            &source,
        )? {
            return Ok(Some(split));
        }
    }
    Ok(None)
}

/// CIFAR-10/100 from the entries of an official `.tar.gz`, if it is one.
pub(crate) fn from_archive(
    path: &Path,
    entries: &[(String, Vec<u8>)],
) -> Result<Option<DataSplit>> {
    let has = |name: &str| {
        entries
            .iter()
            .any(|(n, _)| n == name || n.ends_with(&format!("/{name}")))
    };
    detect(
        has,
        &ArchiveFiles(path, entries),
        &path.display().to_string(),
    )
}
