//! Cache of decoded image folders, so that a second run does not decode the JPEGs again.
//!
//! Entries live in `$CONVNET_CACHE_DIR`, else `$XDG_CACHE_HOME/convnet`, else
//! `~/.cache/convnet`, one file per source, named by a hash of the source's path, file sizes
//! and modification times and the read options: a changed source gets a new entry. The
//! cache is best-effort: unreadable or stale entries are ignored and rebuilt, and writes are
//! atomic (temporary file, then rename).
//!
//! An entry is `MAGIC | pixels | labels (u32 LE each) | description (JSON) | its length
//! (u32 LE) | END`: pixels first, so that a decoder can stream them into the entry, which
//! then serves large data sets image by image ([`super::store`]). The cache holds at most
//! [`size_limit`] bytes (`CONVNET_CACHE_MAX_BYTES`, default 16 GiB): storing an entry evicts
//! the least recently used ones beyond it.

use super::store::{memory_limit, PixelSink, PixelStore};
use super::{FolderOptions, ImageDataset};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Start of an entry (and of a pixel file).
pub(crate) const MAGIC: &[u8; 8] = b"CNVPIX02";
/// End of an entry.
const END: &[u8; 8] = b"CNVPIXEN";

/// The directory holding cached decoded data sets, if one can be determined.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("CONVNET_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("convnet"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("convnet"))
}

/// Bytes the cache may hold: `CONVNET_CACHE_MAX_BYTES`, else 16 GiB.
pub fn size_limit() -> u64 {
    std::env::var("CONVNET_CACHE_MAX_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(16 << 30)
}

/// FNV-1a, 64 bit: a stable hash for cache file names.
fn fnv(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn stamp_bytes(path: &Path, len: u64, modified: Option<SystemTime>) -> Vec<u8> {
    let secs = modified
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}|{len}|{secs};", path.display()).into_bytes()
}

/// What of the options changes the decoded pixels.
fn options_bytes(opts: &FolderOptions) -> Vec<u8> {
    let mut bytes = vec![opts.skip_bad_images as u8];
    if let Some(r) = opts.resize {
        // Absent without a resize, so the keys of existing entries stay what they were.
        bytes.extend(format!("resize {} crop {}", r.resize, r.crop).into_bytes());
    }
    bytes
}

fn key(seed: Vec<u8>, opts: &FolderOptions) -> String {
    let abs = fnv(seed, 0xcbf2_9ce4_8422_2325);
    format!(
        "{:016x}-{}",
        fnv(options_bytes(opts), abs),
        env!("CARGO_PKG_VERSION")
    )
}

/// Key for a single archive file.
pub(crate) fn key_for_file(path: &Path, meta: &std::fs::Metadata, opts: &FolderOptions) -> String {
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    key(stamp_bytes(&abs, meta.len(), meta.modified().ok()), opts)
}

/// Key for a directory listing of `(file, size, mtime)`.
pub(crate) fn key_for_listing(
    root: &Path,
    files: &[(PathBuf, u64, Option<SystemTime>)],
    opts: &FolderOptions,
) -> String {
    let abs = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let mut seed = format!("{}#", abs.display()).into_bytes();
    for (f, len, m) in files {
        seed.extend(stamp_bytes(f, *len, *m));
    }
    key(seed, opts)
}

/// The file of entry `key`.
pub(crate) fn entry_path(key: &str) -> Option<PathBuf> {
    Some(cache_dir()?.join(format!("{key}.bin")))
}

/// Where unnamed temporary pixel files go: the cache folder (on disk, unlike a tmpfs
/// `/tmp`), else the system's temporary folder.
pub(crate) fn scratch_dir() -> PathBuf {
    cache_dir().unwrap_or_else(std::env::temp_dir)
}

/// What the end of an entry describes.
pub(crate) struct Entry<'a> {
    /// Labels of the data set's images, in its order.
    pub labels: &'a [u32],
    /// Where each of them is among the stored images, when that is not the same order.
    pub order: Option<&'a [usize]>,
    /// Images stored (at least as many as the data set has).
    pub stored: usize,
    pub shape: [usize; 3],
    pub classes: &'a [String],
    pub skipped: usize,
    pub source: &'a str,
}

/// The end of an entry: the labels, the order and the description of the images before
/// them.
pub(crate) fn trailer(e: &Entry<'_>) -> Vec<u8> {
    let header = serde_json::json!({
        "shape": e.shape, "classes": e.classes, "n": e.labels.len(), "stored": e.stored,
        "skipped": e.skipped, "source": e.source, "ordered": e.order.is_some(),
    })
    .to_string();
    let mut out = Vec::with_capacity(e.labels.len() * 12 + header.len() + 12);
    for l in e.labels {
        out.extend_from_slice(&l.to_le_bytes());
    }
    for &i in e.order.unwrap_or(&[]) {
        out.extend_from_slice(&(i as u64).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(END);
    out
}

/// The cached data set for `key`, if present and intact: in memory when it fits under
/// [`memory_limit`], else read from the entry as needed. Using an entry marks it recent.
pub(crate) fn load(key: &str) -> Option<ImageDataset> {
    let path = entry_path(key)?;
    let mut file = std::fs::File::open(&path).ok()?;
    let total = file.metadata().ok()?.len();
    let mut tail = [0u8; 12];
    file.read_exact_at(&mut tail, total.checked_sub(12)?).ok()?;
    if &tail[4..] != END {
        return None;
    }
    let hlen = u32::from_le_bytes(tail[..4].try_into().ok()?) as u64;
    let header_at = total.checked_sub(12 + hlen)?;
    let mut header = vec![0u8; hlen as usize];
    file.read_exact_at(&mut header, header_at).ok()?;
    let header: serde_json::Value = serde_json::from_slice(&header).ok()?;
    let shape: Vec<usize> = serde_json::from_value(header["shape"].clone()).ok()?;
    let classes: Vec<String> = serde_json::from_value(header["classes"].clone()).ok()?;
    let n = header["n"].as_u64()?;
    let stored = header["stored"].as_u64()?;
    let per = crate::shape::checked_numel(&shape)? as u64;
    let pixels = per.checked_mul(stored)?;
    let labels_at = (MAGIC.len() as u64).checked_add(pixels)?;
    let ordered = header["ordered"].as_bool()?;
    let order_at = labels_at.checked_add(n.checked_mul(4)?)?;
    let order_bytes = if ordered { n.checked_mul(8)? } else { 0 };
    if shape.len() != 3 || order_at.checked_add(order_bytes)? != header_at {
        return None;
    }
    let mut magic = [0u8; 8];
    file.read_exact_at(&mut magic, 0).ok()?;
    if &magic != MAGIC {
        return None;
    }
    let mut raw = vec![0u8; (n * 4) as usize];
    file.read_exact_at(&mut raw, labels_at).ok()?;
    let labels: Vec<u32> = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let order = if ordered {
        let mut raw = vec![0u8; order_bytes as usize];
        file.read_exact_at(&mut raw, order_at).ok()?;
        let order: Vec<usize> = raw
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .collect();
        order
            .iter()
            .all(|&i| (i as u64) < stored)
            .then_some(order)?
            .into()
    } else {
        None
    };
    let _ = file.set_modified(SystemTime::now());
    let store = if pixels <= memory_limit() {
        let mut v = vec![0u8; pixels as usize];
        file.seek(SeekFrom::Start(MAGIC.len() as u64)).ok()?;
        file.read_exact(&mut v).ok()?;
        PixelStore::Memory(v)
    } else {
        PixelStore::File {
            file,
            path,
            offset: MAGIC.len() as u64,
            len: pixels,
        }
    };
    if order.is_none() && stored != n {
        return None;
    }
    let mut ds = ImageDataset::from_store(
        store,
        if order.is_some() {
            vec![0; stored as usize]
        } else {
            labels.clone()
        },
        [shape[0], shape[1], shape[2]],
        classes,
        header["source"].as_str()?.to_string(),
    )
    .ok()?;
    ds.skipped = header["skipped"].as_u64()? as usize;
    Some(match order {
        Some(order) => ds.reordered(order, labels),
        None => ds,
    })
}

/// Stores a data set decoded into memory under `key`, in its own order (errors are
/// ignored: the cache is an optimisation), then keeps the cache under its size limit.
pub(crate) fn store(key: &str, ds: &ImageDataset) {
    let Some(path) = entry_path(key) else { return };
    let bytes = ds.image_shape().iter().product::<usize>() as u64 * ds.len() as u64;
    if bytes > size_limit() || ds.pixels_in_file() {
        return;
    }
    let _ = (|| -> crate::Result<()> {
        let mut sink = PixelSink::to_file(path.clone(), &scratch_dir())?;
        for i in 0..ds.len() {
            sink.push(&ds.image(i)?)?;
        }
        sink.finish(&trailer(&Entry {
            labels: ds.labels(),
            order: None,
            stored: ds.len(),
            shape: ds.image_shape(),
            classes: ds.classes(),
            skipped: ds.skipped,
            source: &ds.source,
        }))?;
        Ok(())
    })();
    evict(&path);
}

/// Removes the least recently used entries (not `keep`) while the cache is over its
/// limit.
pub(crate) fn evict(keep: &Path) {
    let Some(dir) = cache_dir() else { return };
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let name = path.file_name()?.to_str()?;
            if !name.ends_with(".bin") {
                return None;
            }
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), path))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    entries.sort();
    for (_, len, path) in entries {
        if total <= size_limit() {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
}
