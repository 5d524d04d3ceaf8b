//! Image folders `<root>/<class>/*.{jpg,jpeg,png}`, as a directory or a `.tar.gz` of one.
//!
//! Class indices come from the sorted folder names (torchvision's `ImageFolder`); files in
//! a class are taken in sorted order. Images are decoded in parallel (rayon) and the decoded
//! pixels are cached (see `cache`) so that a second run does not decode again. All images
//! must have one size; grey images give one channel, anything else RGB.

use super::cache;
use super::store::PixelSink;
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
    /// Resize and centre-crop every image as it is read (torchvision's `Resize` +
    /// `CenterCrop`): photos of many sizes become one. [`super::open`] applies it to every
    /// kind of data, not only image folders.
    pub resize: Option<super::ResizeCrop>,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions {
            skip_bad_images: false,
            cache: true,
            resize: None,
        }
    }
}

fn is_image(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".jpg") || lower.ends_with(".jpeg") || lower.ends_with(".png")
}

/// Planar pixels and their `[C, H, W]`.
type Decoded = (Vec<u8>, [usize; 3]);

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
            let (planes, shape) = if grey {
                (img.to_luma8().into_raw(), [1, h, w])
            } else {
                (
                    image_to_planes(&img.to_rgb8().into_raw(), 3, h * w),
                    [3, h, w],
                )
            };
            Ok(Some(match opts.resize {
                Some(r) => (r.apply(&planes, shape), r.output_shape(shape[0])),
                None => (planes, shape),
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

/// Images decoded at a time (in parallel) before their pixels go to the sink, at most; and
/// the decoded bytes a chunk may hold (large photos are decoded a few at a time).
const CHUNK: usize = 256;
const CHUNK_BYTES: usize = 64 << 20;

/// Decodes images chunk by chunk into a [`PixelSink`] (memory while small, a file once
/// large), in the order they are given, remembering which ones it kept.
struct Decoder<'a> {
    source: &'a Path,
    opts: &'a FolderOptions,
    sink: PixelSink,
    /// The first image's `[C, H, W]` and file: every other image must match.
    first: Option<([usize; 3], PathBuf)>,
    /// The caller's numbers of the images kept, in the order they were stored.
    kept: Vec<usize>,
    skipped: usize,
}

impl<'a> Decoder<'a> {
    /// A decoder; when the pixels outgrow memory they become the cache entry `key` (if
    /// caching) or an unnamed temporary file.
    fn new(source: &'a Path, opts: &'a FolderOptions, key: Option<&str>) -> Decoder<'a> {
        let destination = key.filter(|_| opts.cache).and_then(cache::entry_path);
        Decoder {
            source,
            opts,
            sink: PixelSink::new(destination, &cache::scratch_dir()),
            first: None,
            kept: Vec::new(),
            skipped: 0,
        }
    }

    /// Decodes `chunk` (number, file, bytes if already read) in parallel and stores the
    /// images in that order.
    /// Images to decode in the next chunk: a few until the size of the images is known,
    /// then as many as fit in [`CHUNK_BYTES`] (at most [`CHUNK`]).
    fn chunk_len(&self) -> usize {
        match &self.first {
            None => 8,
            Some((shape, _)) => {
                (CHUNK_BYTES / shape.iter().product::<usize>().max(1)).clamp(1, CHUNK)
            }
        }
    }

    fn push(&mut self, chunk: Vec<(usize, PathBuf, Option<Vec<u8>>)>) -> Result<()> {
        let opts = self.opts;
        let decoded: Vec<(usize, PathBuf, Result<Option<Decoded>>)> = chunk
            .into_par_iter()
            .map(|(id, path, bytes)| {
                let d = decode(&path, bytes, opts);
                (id, path, d)
            })
            .collect();
        for (id, path, d) in decoded {
            let Some((planes, shape)) = d? else {
                self.skipped += 1;
                continue;
            };
            match &self.first {
                None => self.first = Some((shape, path.clone())),
                Some((s, p)) if *s != shape => {
                    return Err(format_err(&path, format!(
                        "image is {}x{} with {} channel(s) but {} is {}x{} with {}: all images must have one size (resize them first)",
                        shape[2], shape[1], shape[0], p.display(), s[2], s[1], s[0]
                    )));
                }
                Some(_) => {}
            }
            self.sink.push(&planes)?;
            self.kept.push(id);
        }
        Ok(())
    }

    /// The data set of the kept images in the order `order` gives (positions in
    /// `kept`), with `label_of` each image's class: the images stay where they were stored
    /// and the set reads them through an index when the orders differ. A sink that became
    /// the cache entry is finished as one (with the set's order); a set kept in memory is
    /// cached afterwards under `key`.
    fn finish(
        self,
        classes: Vec<String>,
        order: Vec<usize>,
        label_of: impl Fn(usize) -> u32,
        key: Option<&str>,
    ) -> Result<ImageDataset> {
        let Some((shape, _)) = self.first else {
            return Err(format_err(self.source, "no readable images"));
        };
        let labels: Vec<u32> = order.iter().map(|&k| label_of(self.kept[k])).collect();
        let in_order =
            order.iter().enumerate().all(|(i, &k)| i == k) && order.len() == self.kept.len();
        let source = self.source.display().to_string();
        let entry = self.sink.is_cache_entry();
        let trailer = cache::trailer(&cache::Entry {
            labels: &labels,
            order: (!in_order).then_some(order.as_slice()),
            stored: self.kept.len(),
            shape,
            classes: &classes,
            skipped: self.skipped,
            source: &source,
        });
        let store = self.sink.finish(if entry { &trailer } else { &[] })?;
        let stored_labels: Vec<u32> = self.kept.iter().map(|&id| label_of(id)).collect();
        let mut ds = ImageDataset::from_store(store, stored_labels, shape, classes, source)?;
        ds.skipped = self.skipped;
        let ds = if in_order {
            ds
        } else {
            ds.reordered(order, labels)
        };
        if let (Some(key), false) = (key.filter(|_| self.opts.cache), entry) {
            cache::store(key, &ds);
        }
        if entry {
            if let Some(path) = key.and_then(cache::entry_path) {
                cache::evict(&path);
            }
        }
        Ok(ds)
    }
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
        let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        return from_archive_reader(path, std::io::BufReader::new(file), opts, Some(&key));
    }
    let mut class_dirs: Vec<(String, PathBuf)> = std::fs::read_dir(path)
        .map_err(|e| io_err(path, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    class_dirs.sort();
    let mut items: Vec<(PathBuf, usize)> = Vec::new();
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
            items.push((f, class));
        }
    }
    let classes: Vec<String> = class_dirs.into_iter().map(|(n, _)| n).collect();
    check_classes(path, &classes, &counts)?;
    let key = cache::key_for_listing(path, &stamp, opts);
    if let Some(ds) = opts.cache.then(|| cache::load(&key)).flatten() {
        return Ok(ds);
    }
    let mut decoder = Decoder::new(path, opts, Some(&key));
    let mut next = 0;
    while next < items.len() {
        let end = (next + decoder.chunk_len()).min(items.len());
        let first_chunk = decoder.first.is_none();
        decoder.push(
            (next..end)
                .map(|id| (id, items[id].0.clone(), None))
                .collect(),
        )?;
        if let (true, Some((shape, _))) = (first_chunk, &decoder.first) {
            // The folder's size is known now: the rest of its images.
            let per = shape.iter().product::<usize>() as u64;
            decoder
                .sink
                .expect(per.saturating_mul((items.len() - end) as u64))?;
        }
        next = end;
    }
    let order = (0..decoder.kept.len()).collect();
    decoder.finish(classes, order, |id| items[id].1 as u32, Some(&key))
}

/// The components of an archive entry's path without empty and "." parts.
fn components(name: &str) -> Vec<String> {
    name.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_string)
        .collect()
}

/// An image folder packed in a `.tar.gz`, read from `reader` entry by entry: images are
/// decoded as they come (a chunk at a time), never all held at once, and put in folder
/// order (sorted classes, sorted files) at the end. Cached under `key` when given.
pub(crate) fn from_archive_reader(
    path: &Path,
    reader: impl std::io::Read,
    opts: &FolderOptions,
    key: Option<&str>,
) -> Result<ImageDataset> {
    let mut decoder = Decoder::new(path, opts, key);
    // Path components of every image entry, by number.
    let mut names: Vec<Vec<String>> = Vec::new();
    let mut chunk = Vec::new();
    for_each_entry(reader, path, &mut |name, read| {
        let parts = components(name);
        if !parts.last().is_some_and(|n| is_image(n)) {
            return Ok(());
        }
        chunk.push((names.len(), path.join(name), Some(read()?)));
        names.push(parts);
        if chunk.len() >= decoder.chunk_len() {
            decoder.push(std::mem::take(&mut chunk))?;
        }
        Ok(())
    })?;
    decoder.push(chunk)?;
    // Drop one top-level folder that every entry shares; classes are the folders above
    // the files.
    let common = names.first().map(|c| c[0].clone());
    let strip = usize::from(
        names
            .iter()
            .all(|c| c.len() >= 3 && Some(&c[0]) == common.as_ref()),
    );
    let class_of = |c: &[String]| (c.len() == 2 + strip).then(|| c[strip].clone());
    let mut classes: Vec<String> = names.iter().filter_map(|c| class_of(c)).collect();
    classes.sort();
    classes.dedup();
    let mut counts = vec![0usize; classes.len()];
    // (class, file name, position among the stored images) of every stored image.
    let mut placed: Vec<(usize, &str, usize)> = decoder
        .kept
        .iter()
        .enumerate()
        .filter_map(|(at, &id)| {
            let class = classes.binary_search(&class_of(&names[id])?).ok()?;
            Some((class, names[id][1 + strip].as_str(), at))
        })
        .collect();
    placed.sort();
    placed.iter().for_each(|(c, _, _)| counts[*c] += 1);
    // Images in classless places (too deep or too shallow) do not count as skipped.
    let all_counts: Vec<usize> = (0..classes.len())
        .map(|c| {
            names
                .iter()
                .filter(|n| class_of(n).as_deref() == Some(classes[c].as_str()))
                .count()
        })
        .collect();
    check_classes(path, &classes, &all_counts)?;
    let label: Vec<u32> = {
        let mut l = vec![0u32; decoder.kept.len()];
        for &(c, _, at) in &placed {
            l[at] = c as u32;
        }
        l
    };
    let order: Vec<usize> = placed.iter().map(|&(_, _, at)| at).collect();
    let kept = decoder.kept.clone();
    let position: std::collections::HashMap<usize, usize> =
        kept.iter().enumerate().map(|(at, &id)| (id, at)).collect();
    decoder.finish(classes, order, |id| label[position[&id]], key)
}

/// Reads the bytes of the archive entry at hand (called only for entries that are wanted).
type ReadEntry<'a> = dyn FnMut() -> Result<Vec<u8>> + 'a;

/// Calls `f` with each regular file's name and a way to read its bytes, in archive order.
fn for_each_entry(
    reader: impl std::io::Read,
    path: &Path,
    f: &mut dyn FnMut(&str, &mut ReadEntry<'_>) -> Result<()>,
) -> Result<()> {
    let bad = |e: std::io::Error| {
        format_err(
            path,
            format!(
                "cannot read the archive ({e}); it is truncated or not a .tar.gz: fetch it again"
            ),
        )
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let mut read = || -> Result<Vec<u8>> {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).map_err(bad)?;
            Ok(data)
        };
        f(&name, &mut read)?;
    }
    Ok(())
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
