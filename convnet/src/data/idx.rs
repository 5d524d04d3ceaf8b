//! MNIST / Fashion-MNIST IDX files, raw or gzip-compressed.
//!
//! Images: magic 2051 (`00 00 08 03`), then big-endian u32 count, rows, columns, then
//! unsigned bytes. Labels: magic 2049 (`00 00 08 01`), count, bytes. A folder holding
//! `train-*` and `t10k-*` files is a train/test pair; one set alone is a single set.

use super::archive::read_maybe_gz;
use super::{format_err, io_err, DataSplit, ImageDataset};
use crate::error::Result;
use std::path::{Path, PathBuf};

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX buffer with the expected magic; returns its dimensions and payload.
fn parse(path: &Path, bytes: &[u8], magic: u32, ndims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let what = if ndims == 3 {
        "images (idx3-ubyte)"
    } else {
        "labels (idx1-ubyte)"
    };
    if bytes.len() < 4 {
        return Err(format_err(
            path,
            format!("{} bytes is too short for an IDX {what} file", bytes.len()),
        ));
    }
    let got = be_u32(bytes, 0);
    if got != magic {
        return Err(format_err(path, format!("wrong magic number {got} (bytes {:02x} {:02x} {:02x} {:02x}); IDX {what} files start with {magic}: is this the right file?", bytes[0], bytes[1], bytes[2], bytes[3])));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(format_err(
            path,
            format!(
                "truncated header: {} bytes, expected at least {header}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| be_u32(bytes, 4 + 4 * i) as usize)
        .collect();
    if dims.iter().skip(1).any(|&d| d == 0) {
        return Err(format_err(path, format!("invalid dimensions {dims:?}")));
    }
    let payload = &bytes[header..];
    let want = crate::shape::checked_numel(&dims);
    if want != Some(payload.len()) {
        let want = want.map_or("more than 2^64".to_string(), |w| w.to_string());
        return Err(format_err(path, format!("header says {dims:?} ({want} bytes of data) but the file holds {}: it is truncated or corrupt; download it again", payload.len())));
    }
    Ok((dims, payload.to_vec()))
}

/// Reads an images file and a labels file into a data set (10 digit classes).
pub fn read_pair(images: &Path, labels: &Path) -> Result<ImageDataset> {
    let (idims, pixels) = parse(images, &read_maybe_gz(images)?, 2051, 3)?;
    let (ldims, labs) = parse(labels, &read_maybe_gz(labels)?, 2049, 1)?;
    if idims[0] != ldims[0] {
        return Err(format_err(
            labels,
            format!(
                "{} labels for {} images in {}",
                ldims[0],
                idims[0],
                images.display()
            ),
        ));
    }
    if let Some((i, &l)) = labs.iter().enumerate().find(|(_, &l)| l > 9) {
        return Err(format_err(
            labels,
            format!("label {l} of example {i} is out of range 0..9"),
        ));
    }
    let classes = (0..10).map(|d| d.to_string()).collect();
    ImageDataset::new(
        pixels,
        labs.into_iter().map(u32::from).collect(),
        [1, idims[1], idims[2]],
        classes,
        images.display().to_string(),
    )
}

fn find(dir: &Path, prefix: &str, kind: &str) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    let mut hits: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.contains(kind))
        })
        .collect();
    hits.sort();
    Ok(hits.into_iter().next())
}

/// IDX files in a folder: `train-*`/`t10k-*` images and labels.
pub(crate) fn from_dir(dir: &Path) -> Result<Option<DataSplit>> {
    let set = |prefix: &str| -> Result<Option<ImageDataset>> {
        match (
            find(dir, prefix, "images-idx3")?,
            find(dir, prefix, "labels-idx1")?,
        ) {
            (Some(i), Some(l)) => read_pair(&i, &l).map(Some),
            (Some(i), None) => Err(format_err(
                &i,
                format!("no matching {prefix}-labels-idx1-ubyte file beside it"),
            )),
            (None, Some(l)) => Err(format_err(
                &l,
                format!("no matching {prefix}-images-idx3-ubyte file beside it"),
            )),
            (None, None) => Ok(None),
        }
    };
    Ok(match (set("train")?, set("t10k")?) {
        (Some(train), Some(test)) => Some(DataSplit::Pair { train, test }),
        (Some(data), None) | (None, Some(data)) => Some(DataSplit::Single {
            data,
            sorted_by_class: false,
        }),
        (None, None) => None,
    })
}

/// A single IDX file path given directly: finds its partner by swapping images/labels.
pub(crate) fn open_single(path: &Path) -> Result<DataSplit> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (images, labels) = if name.contains("images-idx3") {
        (
            path.to_path_buf(),
            path.with_file_name(name.replace("images-idx3", "labels-idx1")),
        )
    } else {
        (
            path.with_file_name(name.replace("labels-idx1", "images-idx3")),
            path.to_path_buf(),
        )
    };
    Ok(DataSplit::Single {
        data: read_pair(&images, &labels)?,
        sorted_by_class: false,
    })
}
