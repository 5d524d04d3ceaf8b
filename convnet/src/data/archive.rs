//! Reading `.gz` files and `.tar.gz` archives into memory.

use super::{format_err, io_err};
use crate::error::Result;
use std::io::Read;
use std::path::Path;

/// The bytes of a file, gunzipped when it starts with the gzip magic `1f 8b`.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| io_err(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| format_err(path, format!("corrupt gzip data ({e}); the download is probably truncated: fetch the file again")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// The paths of a `.tar.gz`'s regular files, in archive order (their contents are skipped,
/// not held).
pub(crate) fn entry_names(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let bad = |e: std::io::Error| {
        format_err(
            path,
            format!(
                "cannot read the archive ({e}); it is truncated or not a .tar.gz: fetch it again"
            ),
        )
    };
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut names = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        if entry.header().entry_type().is_file() {
            names.push(entry.path().map_err(bad)?.to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Regular files of a `.tar.gz`, as `(path inside the archive, bytes)` in archive order.
pub(crate) fn read_tar_gz(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    read_tar_gz_from(std::io::BufReader::new(file), path)
}

/// Like [`read_tar_gz`] for an archive already in memory or any reader; `path` names it in errors.
pub(crate) fn read_tar_gz_from(reader: impl Read, path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let bad = |e: std::io::Error| {
        format_err(
            path,
            format!(
                "cannot read the archive ({e}); it is truncated or not a .tar.gz: fetch it again"
            ),
        )
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let mut out = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(bad)?;
        out.push((name, data));
    }
    Ok(out)
}
