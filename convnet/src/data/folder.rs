//! Image folders `<root>/<class>/*.{jpg,jpeg,png}`, as a directory or a `.tar.gz` of one.
//!
//! Class indices come from the sorted folder names (torchvision's `ImageFolder`); files in
//! a class are taken in sorted order. Images are decoded in parallel (rayon) and the decoded
//! pixels are cached (see `cache`) so that a second run does not decode again. All images
//! must have one size; grey images give one channel, anything else RGB.

use super::archive::read_tar_gz;
use super::cache;
use super::{format_err, io_err, ImageDataset};
use crate::error::Result;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// How image folders are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderOptions {
    /// Skip files that cannot be decoded (and report how many) instead of failing.
    pub skip_bad_images: bool,
    /// Use the decoded-pixel cache.
    pub cache: bool,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions {
            skip_bad_images: false,
            cache: true,
        }
    }
}

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".jpg") || lower.ends_with(".jpeg") || lower.ends_with(".png")
}

/// Planar pixels and their `[C, H, W]`.
type Decoded = (Vec<u8>, [usize; 3]);

/// One file to decode: where it is (for messages), its class, and how to get its bytes.
struct Item {
    path: PathBuf,
    class: usize,
    bytes: Option<Vec<u8>>,
}

/// Decodes one file: planar pixels and `[C, H, W]`, `None` if unreadable and skipping.
fn decode(
    path: &Path,
    bytes: Option<Vec<u8>>,
    opts: &FolderOptions,
) -> Result<Option<(Vec<u8>, [usize; 3])>> {
    let bytes = match bytes {
        Some(b) => b,
        None => std::fs::read(path).map_err(|e| io_err(path, e))?,
    };
    match decode_limited(&bytes) {
        Ok(img) => {
            let (w, h) = (img.width() as usize, img.height() as usize);
            let grey = matches!(
                img.color(),
                image::ColorType::L8
                    | image::ColorType::L16
                    | image::ColorType::La8
                    | image::ColorType::La16
            );
            Ok(Some(if grey {
                (img.to_luma8().into_raw(), [1, h, w])
            } else {
                (
                    image_to_planes(&img.to_rgb8().into_raw(), 3, h * w),
                    [3, h, w],
                )
            }))
        }
        Err(_) if opts.skip_bad_images => Ok(None),
        Err(e) => Err(format_err(
            path,
            format!("not a readable image ({e}); remove it or pass --skip-bad-images"),
        )),
    }
}

/// The largest image decoded: 64 megapixels of 8-bit RGB (192 MiB; the decoder refuses
/// anything that would need more), whatever size the file claims.
const MAX_IMAGE_BYTES: u64 = 3 << 26;

/// Decodes an image within [`MAX_IMAGE_BYTES`] and 16384 pixels a side.
fn decode_limited(bytes: &[u8]) -> image::ImageResult<image::DynamicImage> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16384);
    limits.max_image_height = Some(16384);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    reader.limits(limits);
    reader.decode()
}

/// Decodes a class-sorted list of files in parallel into a data set.
fn decode_all(
    items: Vec<Item>,
    classes: Vec<String>,
    source: &Path,
    opts: &FolderOptions,
) -> Result<ImageDataset> {
    let decoded: Vec<(PathBuf, usize, Result<Option<Decoded>>)> = items
        .into_par_iter()
        .map(|item| {
            let d = decode(&item.path, item.bytes, opts);
            (item.path, item.class, d)
        })
        .collect();
    let (mut pixels, mut labels, mut skipped) = (Vec::new(), Vec::new(), 0usize);
    let mut first: Option<([usize; 3], PathBuf)> = None;
    for (path, class, d) in decoded {
        let Some((planes, shape)) = d? else {
            skipped += 1;
            continue;
        };
        match &first {
            None => first = Some((shape, path.clone())),
            Some((s, p)) if *s != shape => {
                return Err(format_err(&path, format!(
                    "image is {}x{} with {} channel(s) but {} is {}x{} with {}: all images must have one size (resize them first)",
                    shape[2], shape[1], shape[0], p.display(), s[2], s[1], s[0]
                )));
            }
            Some(_) => {}
        }
        pixels.extend_from_slice(&planes);
        labels.push(class as u32);
    }
    let Some((shape, _)) = first else {
        return Err(format_err(source, "no readable images"));
    };
    let mut ds = ImageDataset::new(pixels, labels, shape, classes, source.display().to_string())?;
    ds.skipped = skipped;
    Ok(ds)
}

fn check_classes(source: &Path, classes: &[String], counts: &[usize]) -> Result<()> {
    if classes.is_empty() {
        return Err(format_err(
            source,
            "no class folders with .jpg/.jpeg/.png images: expected <root>/<class>/<image> files",
        ));
    }
    if let Some(i) = counts.iter().position(|&n| n == 0) {
        return Err(format_err(
            &source.join(&classes[i]),
            "empty class folder: it holds no .jpg/.jpeg/.png images; remove it or add images",
        ));
    }
    Ok(())
}

/// An image folder (directory or `.tar.gz`).
pub(crate) fn open(path: &Path, opts: &FolderOptions) -> Result<ImageDataset> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.is_file() {
        let key = cache::key_for_file(path, &meta, opts);
        if let Some(ds) = opts.cache.then(|| cache::load(&key)).flatten() {
            return Ok(ds);
        }
        let ds = build_from_archive(path, read_tar_gz(path)?, opts)?;
        if opts.cache {
            cache::store(&key, &ds);
        }
        return Ok(ds);
    }
    let mut class_dirs: Vec<(String, PathBuf)> = std::fs::read_dir(path)
        .map_err(|e| io_err(path, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    class_dirs.sort();
    let mut items = Vec::new();
    let mut counts = Vec::new();
    let mut stamp = Vec::new();
    for (class, (_, dir)) in class_dirs.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(is_image))
            .collect();
        files.sort();
        counts.push(files.len());
        for f in files {
            if let Ok(m) = std::fs::metadata(&f) {
                stamp.push((f.clone(), m.len(), m.modified().ok()));
            }
            items.push(Item {
                path: f,
                class,
                bytes: None,
            });
        }
    }
    let classes: Vec<String> = class_dirs.into_iter().map(|(n, _)| n).collect();
    check_classes(path, &classes, &counts)?;
    let key = cache::key_for_listing(path, &stamp, opts);
    if let Some(ds) = opts.cache.then(|| cache::load(&key)).flatten() {
        return Ok(ds);
    }
    let ds = decode_all(items, classes, path, opts)?;
    if opts.cache {
        cache::store(&key, &ds);
    }
    Ok(ds)
}

/// An image folder packed in a `.tar.gz` whose entries were already read (no cache).
pub(crate) fn from_archive(
    path: &Path,
    entries: Vec<(String, Vec<u8>)>,
    opts: &FolderOptions,
) -> Result<ImageDataset> {
    build_from_archive(path, entries, opts)
}

fn build_from_archive(
    path: &Path,
    entries: Vec<(String, Vec<u8>)>,
    opts: &FolderOptions,
) -> Result<ImageDataset> {
    // Components of each entry without "." parts; drop one common top-level folder.
    let mut split: Vec<(Vec<String>, Vec<u8>)> = entries
        .into_iter()
        .map(|(n, b)| {
            (
                n.split('/')
                    .filter(|c| !c.is_empty() && *c != ".")
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
                b,
            )
        })
        .filter(|(c, _)| c.last().is_some_and(|n| is_image(n)))
        .collect();
    let common = split.first().map(|(c, _)| c[0].clone());
    if split
        .iter()
        .all(|(c, _)| c.len() >= 3 && Some(&c[0]) == common.as_ref())
    {
        split.iter_mut().for_each(|(c, _)| {
            c.remove(0);
        });
    }
    let mut classes: Vec<String> = split
        .iter()
        .filter(|(c, _)| c.len() == 2)
        .map(|(c, _)| c[0].clone())
        .collect();
    classes.sort();
    classes.dedup();
    let mut items: Vec<(usize, String, Item)> = split
        .into_iter()
        .filter(|(c, _)| c.len() == 2)
        .map(|(c, b)| {
            let class = classes.binary_search(&c[0]).expect("class collected above");
            (
                class,
                c[1].clone(),
                Item {
                    path: path.join(c.join("/")),
                    class,
                    bytes: Some(b),
                },
            )
        })
        .collect();
    items.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut counts = vec![0usize; classes.len()];
    items.iter().for_each(|(c, _, _)| counts[*c] += 1);
    check_classes(path, &classes, &counts)?;
    decode_all(
        items.into_iter().map(|(_, _, i)| i).collect(),
        classes,
        path,
        opts,
    )
}

/// Interleaved `[H*W*C]` bytes (as image decoders give them) to planar `[C, H, W]`.
///
/// ```
/// assert_eq!(convnet::data::image_to_planes(&[1, 2, 3, 4, 5, 6], 3, 2), vec![1, 4, 2, 5, 3, 6]);
/// ```
pub fn image_to_planes(hwc: &[u8], c: usize, hw: usize) -> Vec<u8> {
    let mut out = vec![0u8; c * hw];
    for (p, px) in hwc.chunks_exact(c).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            out[ch * hw + p] = v;
        }
    }
    out
}
