//! Where decoded images live: in memory while a data set is small, in a file once it is
//! large (the decoded-image cache entry, or an unnamed temporary file), read image by image
//! as batches need them. Training on a folder larger than memory therefore holds a few
//! batches of pixels, not the data set (the operating system's page cache keeps what it
//! can of the file).
//!
//! Decoders push images one by one into a `PixelSink`, which starts in memory and moves
//! to a file when the data set passes the memory limit ([`memory_limit`]: a quarter of the
//! available memory, at most 1 GiB of pixels, or `CONVNET_DATA_MEMORY_BYTES`).

use super::{format_err, io_err};
use crate::error::Result;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Pixels a data set may keep in memory: `CONVNET_DATA_MEMORY_BYTES` when set, else a
/// quarter of the memory available to this process (what the system and its cgroup
/// allow), at most 1 GiB.
pub fn memory_limit() -> u64 {
    if let Some(v) = std::env::var("CONVNET_DATA_MEMORY_BYTES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        return v;
    }
    (available_memory() / 4).min(1 << 30)
}

/// Bytes of memory this process can still use: the system's available memory, and what
/// its cgroup (v2 or v1) allows beyond its current use, whichever is less.
fn available_memory() -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let number = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let system = read("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024);
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ]
    .iter()
    .find_map(|(limit, usage)| {
        let limit = number(read(limit))?;
        Some(limit.saturating_sub(number(read(usage)).unwrap_or(0)))
    })
    .unwrap_or(u64::MAX);
    system.min(cgroup)
}

/// The decoded images of a data set, all of one size, one after the other.
#[derive(Debug)]
pub(crate) enum PixelStore {
    Memory(Vec<u8>),
    /// `len` bytes of `file` from `offset`.
    File {
        file: File,
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl PixelStore {
    /// Bytes of pixels held.
    pub(crate) fn len(&self) -> u64 {
        match self {
            PixelStore::Memory(v) => v.len() as u64,
            PixelStore::File { len, .. } => *len,
        }
    }

    /// Whether the pixels are in a file rather than in memory.
    pub(crate) fn in_file(&self) -> bool {
        matches!(self, PixelStore::File { .. })
    }

    /// The `n` bytes from `start`: borrowed from memory, or read from the file.
    pub(crate) fn read(&self, start: u64, n: usize) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            PixelStore::Memory(v) => Ok(std::borrow::Cow::Borrowed(
                &v[start as usize..start as usize + n],
            )),
            PixelStore::File {
                file, path, offset, ..
            } => {
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, offset + start)
                    .map_err(|e| io_err(path, e))?;
                Ok(std::borrow::Cow::Owned(buf))
            }
        }
    }
}

/// Where a decoder's images go: memory until they pass [`memory_limit`], then a file —
/// the cache entry at `destination` when one is given (written beside it and renamed when
/// finished), else an unnamed temporary file.
pub(crate) struct PixelSink {
    memory: Vec<u8>,
    file: Option<(BufWriter<File>, PathBuf, u64)>,
    destination: Option<PathBuf>,
    scratch: PathBuf,
    written: u64,
    limit: u64,
}

impl PixelSink {
    /// An empty sink; a file, when needed, is `destination` or an unnamed one in `scratch`.
    pub(crate) fn new(destination: Option<PathBuf>, scratch: &Path) -> PixelSink {
        PixelSink {
            memory: Vec::new(),
            file: None,
            destination,
            scratch: scratch.to_path_buf(),
            written: 0,
            limit: memory_limit(),
        }
    }

    /// A sink that writes to its file from the first byte (for cache entries).
    pub(crate) fn to_file(destination: PathBuf, scratch: &Path) -> Result<PixelSink> {
        let mut sink = PixelSink::new(Some(destination), scratch);
        sink.limit = 0;
        sink.spill()?;
        Ok(sink)
    }

    /// Moves what is in memory to a new file and writes there from now on.
    fn spill(&mut self) -> Result<()> {
        let (path, named) = match &self.destination {
            Some(d) => (tmp_beside(d), true),
            None => (
                self.scratch.join(format!(
                    ".convnet-pixels-{}-{}",
                    std::process::id(),
                    unique()
                )),
                false,
            ),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        if !named {
            // Unnamed: the file lives as long as the handle.
            let _ = std::fs::remove_file(&path);
        }
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let magic = super::cache::MAGIC;
        w.write_all(magic)
            .and_then(|()| w.write_all(&self.memory))
            .map_err(|e| io_err(&path, e))?;
        self.memory = Vec::new();
        self.file = Some((w, path, magic.len() as u64));
        Ok(())
    }

    /// Says that about `bytes` more will come: kept in memory, they are allocated once
    /// (growing a buffer by doubling would need up to three times the data at a moment);
    /// beyond the memory limit, the sink moves to its file now.
    pub(crate) fn expect(&mut self, bytes: u64) -> Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        match self.written.checked_add(bytes) {
            Some(total) if total <= self.limit => {
                self.memory.reserve_exact((total - self.written) as usize);
                Ok(())
            }
            _ => self.spill(),
        }
    }

    /// Appends one image.
    pub(crate) fn push(&mut self, pixels: &[u8]) -> Result<()> {
        self.written += pixels.len() as u64;
        if self.file.is_none() && self.written > self.limit {
            self.spill()?;
        }
        match &mut self.file {
            None => {
                self.memory.extend_from_slice(pixels);
                Ok(())
            }
            Some((w, path, _)) => w.write_all(pixels).map_err(|e| io_err(path, e)),
        }
    }

    /// Finishes the pixels; `trailer` (labels and description, for a cache entry) is
    /// appended to a file. Returns the store.
    pub(crate) fn finish(mut self, trailer: &[u8]) -> Result<PixelStore> {
        match self.file.take() {
            None => Ok(PixelStore::Memory(std::mem::take(&mut self.memory))),
            Some((mut w, path, offset)) => {
                let destination = self.destination.take();
                let abandon = |e: crate::Error| {
                    if destination.is_some() {
                        let _ = std::fs::remove_file(&path);
                    }
                    e
                };
                w.write_all(trailer)
                    .map_err(|e| abandon(io_err(&path, e)))?;
                let file = w.into_inner().map_err(|e| {
                    abandon(format_err(&path, format!("cannot write: {}", e.error())))
                })?;
                let path = match destination {
                    Some(dest) => {
                        let renamed = file.sync_all().and_then(|()| std::fs::rename(&path, &dest));
                        if let Err(e) = renamed {
                            let _ = std::fs::remove_file(&path);
                            return Err(io_err(&dest, e));
                        }
                        dest
                    }
                    None => path,
                };
                Ok(PixelStore::File {
                    file,
                    path,
                    offset,
                    len: self.written,
                })
            }
        }
    }

    /// Whether the pixels go to a file that becomes the cache entry.
    pub(crate) fn is_cache_entry(&self) -> bool {
        self.file.is_some() && self.destination.is_some()
    }
}

impl Drop for PixelSink {
    fn drop(&mut self) {
        // A named file abandoned half-written (an error, a panic) is removed.
        if let (Some((_, path, _)), Some(_)) = (&self.file, &self.destination) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn tmp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp-{}-{}", std::process::id(), unique()))
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
