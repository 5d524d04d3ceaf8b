//! Cache of decoded image folders, so that a second run does not decode the JPEGs again.
//!
//! Entries live in `$CONVNET_CACHE_DIR`, else `$XDG_CACHE_HOME/convnet`, else
//! `~/.cache/convnet`, one file per source, named by a hash of the source's path, file sizes
//! and modification times and the read options: a changed source gets a new entry. The
//! cache is best-effort: unreadable or stale entries are ignored and rebuilt, and writes are
//! atomic (temporary file, then rename).

use super::{FolderOptions, ImageDataset};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

const MAGIC: &[u8; 8] = b"CNVPIX01";

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

fn key(seed: Vec<u8>, opts: &FolderOptions) -> String {
    let abs = fnv(seed, 0xcbf2_9ce4_8422_2325);
    format!(
        "{:016x}-{}",
        fnv([opts.skip_bad_images as u8], abs),
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

/// The cached data set for `key`, if present and intact.
pub(crate) fn load(key: &str) -> Option<ImageDataset> {
    let bytes = std::fs::read(cache_dir()?.join(format!("{key}.bin"))).ok()?;
    let rest = bytes.strip_prefix(MAGIC)?;
    let hlen = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(rest.get(4..4 + hlen)?).ok()?;
    let shape: Vec<usize> = serde_json::from_value(header["shape"].clone()).ok()?;
    let classes: Vec<String> = serde_json::from_value(header["classes"].clone()).ok()?;
    let n = header["n"].as_u64()? as usize;
    let body = &rest[4 + hlen..];
    let per = crate::shape::checked_numel(&shape)?;
    if shape.len() != 3 || Some(body.len()) != per.checked_add(4)?.checked_mul(n) {
        return None;
    }
    let labels = body[..n * 4]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let mut ds = ImageDataset::new(
        body[n * 4..].to_vec(),
        labels,
        [shape[0], shape[1], shape[2]],
        classes,
        header["source"].as_str()?.to_string(),
    )
    .ok()?;
    ds.skipped = header["skipped"].as_u64()? as usize;
    Some(ds)
}

/// Stores a decoded data set under `key` (errors are ignored: the cache is an optimisation).
pub(crate) fn store(key: &str, ds: &ImageDataset) {
    let Some(dir) = cache_dir() else { return };
    let _ = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let header = serde_json::json!({
            "shape": ds.image_shape(), "classes": ds.classes(), "n": ds.len(),
            "skipped": ds.skipped, "source": ds.source,
        })
        .to_string();
        let final_path = dir.join(format!("{key}.bin"));
        let tmp = dir.join(format!("{key}.bin.tmp-{}", std::process::id()));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(MAGIC)?;
        f.write_all(&(header.len() as u32).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        for l in ds.labels() {
            f.write_all(&l.to_le_bytes())?;
        }
        f.write_all(&ds.pixels)?;
        f.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, &final_path)
    })();
}
