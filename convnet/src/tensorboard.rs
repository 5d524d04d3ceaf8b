//! TensorBoard event files: scalars, histograms and images of a training run, written in
//! the format TensorFlow's summary writers use, so that `tensorboard --logdir` shows them
//! without TensorFlow or PyTorch installed.
//!
//! An event file (`events.out.tfevents.{unix seconds}.{hostname}`) is a sequence of
//! TFRecords, each holding one serialised `Event` protocol buffer. A record is the data's
//! length as a little-endian `u64`, the masked CRC-32C of those eight bytes, the data, and
//! the masked CRC-32C of the data. The first event of a file names the format
//! (`brain.Event:2`); the others carry a `Summary` of tagged values at a step.
//!
//! ```
//! use convnet::tensorboard::{read_events, EventWriter};
//! let dir = std::env::temp_dir().join(format!("convnet-tb-doc-{}", std::process::id()));
//! let mut w = EventWriter::create(&dir)?;
//! w.add_scalar("train/loss", 0.5, 1)?;
//! w.flush()?;
//! let events = read_events(w.path())?;
//! assert_eq!(events.len(), 2); // the file version, then the scalar
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), convnet::Error>(())
//! ```

use crate::error::{invalid, Error, Result};
use prost::Message;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The protocol buffers of TensorBoard's event files, with the field numbers of
/// `tensorboard/compat/proto/{event,summary,histogram}.proto` (only the fields convnet
/// writes; readers skip the others).
pub mod proto {
    /// An event: a summary (or the file's version) at a step.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        /// Seconds since the Unix epoch.
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        /// The global step.
        #[prost(int64, tag = "2")]
        pub step: i64,
        /// What happened.
        #[prost(oneof = "What", tags = "3, 5")]
        pub what: Option<What>,
    }

    /// The content of an [`Event`] (`oneof what`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        /// The format of the file, in its first event: `brain.Event:2`.
        #[prost(string, tag = "3")]
        FileVersion(String),
        /// Tagged values.
        #[prost(message, tag = "5")]
        Summary(Summary),
    }

    /// A set of tagged values.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        /// The values.
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    /// One tagged value (`Summary.Value`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        /// The series it belongs to, e.g. `train/loss` (slashes group series).
        #[prost(string, tag = "1")]
        pub tag: String,
        /// The value.
        #[prost(oneof = "Kind", tags = "2, 4, 5")]
        pub value: Option<Kind>,
    }

    /// The value of a [`Value`] (`oneof value`).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        /// A scalar.
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        /// An encoded image.
        #[prost(message, tag = "4")]
        Image(Image),
        /// A histogram.
        #[prost(message, tag = "5")]
        Histo(HistogramProto),
    }

    /// An encoded image (`Summary.Image`).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Image {
        /// Height in pixels.
        #[prost(int32, tag = "1")]
        pub height: i32,
        /// Width in pixels.
        #[prost(int32, tag = "2")]
        pub width: i32,
        /// 1 grayscale, 2 grayscale and alpha, 3 RGB, 4 RGBA.
        #[prost(int32, tag = "3")]
        pub colorspace: i32,
        /// The image file (PNG).
        #[prost(bytes = "vec", tag = "4")]
        pub encoded_image_string: Vec<u8>,
    }

    /// A histogram (`HistogramProto`): bucket `i` counts the values in
    /// `[bucket_limit[i - 1], bucket_limit[i])`, the first from `min`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HistogramProto {
        /// Smallest value.
        #[prost(double, tag = "1")]
        pub min: f64,
        /// Largest value.
        #[prost(double, tag = "2")]
        pub max: f64,
        /// Number of values.
        #[prost(double, tag = "3")]
        pub num: f64,
        /// Sum of the values.
        #[prost(double, tag = "4")]
        pub sum: f64,
        /// Sum of the squares of the values.
        #[prost(double, tag = "5")]
        pub sum_squares: f64,
        /// Right edges of the buckets.
        #[prost(double, repeated, packed = "true", tag = "6")]
        pub bucket_limit: Vec<f64>,
        /// Counts of the buckets.
        #[prost(double, repeated, packed = "true", tag = "7")]
        pub bucket: Vec<f64>,
    }
}

use proto::{Event, HistogramProto, Kind, Summary, Value, What};

/// The version string of the first event of every file.
pub const FILE_VERSION: &str = "brain.Event:2";

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The CRC-32C (Castagnoli) of `data`, masked as TFRecord stores it:
/// `((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping).
///
/// ```
/// use convnet::tensorboard::masked_crc32c;
/// // CRC-32C("123456789") is 0xE3069283.
/// assert_eq!(masked_crc32c(b"123456789"), 0xE3069283u32.rotate_right(15).wrapping_add(0xa282ead8));
/// ```
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = CRC32C.checksum(data);
    // (crc >> 15) | (crc << 17)
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `data` framed as one TFRecord: length (`u64` LE), masked CRC-32C of the length bytes,
/// the data, masked CRC-32C of the data.
///
/// ```
/// let record = convnet::tensorboard::tfrecord(b"abc");
/// assert_eq!(record.len(), 8 + 4 + 3 + 4);
/// assert_eq!(&record[..8], &3u64.to_le_bytes());
/// ```
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Reads every event of an event file, checking each record's checksums. A record cut
/// short at the end of the file (by a writer that was killed mid-write) ends the list
/// rather than failing, as TensorBoard treats it; a damaged record is an
/// [`Error::Format`].
///
/// ```
/// use convnet::tensorboard::{read_events, EventWriter, FILE_VERSION};
/// use convnet::tensorboard::proto::What;
/// let dir = std::env::temp_dir().join(format!("convnet-tb-read-{}", std::process::id()));
/// let w = EventWriter::create(&dir)?;
/// let path = w.path().to_path_buf();
/// drop(w);
/// let events = read_events(&path)?;
/// assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + 12) else {
            break;
        };
        let (len_bytes, len_crc) = header.split_at(8);
        if masked_crc32c(len_bytes).to_le_bytes() != len_crc {
            return Err(bad(format!(
                "record at byte {at}: the length's checksum does not match"
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(len_bytes);
        let len = u64::from_le_bytes(len);
        let start = at + 12;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .and_then(|e| e.checked_add(4));
        let Some(record) = end.and_then(|e| bytes.get(start..e)) else {
            break;
        };
        let (data, crc) = record.split_at(record.len() - 4);
        if masked_crc32c(data).to_le_bytes() != crc {
            return Err(bad(format!(
                "record at byte {at}: the data's checksum does not match"
            )));
        }
        events.push(
            Event::decode(data)
                .map_err(|e| bad(format!("record at byte {at} is not an event: {e}")))?,
        );
        at = start + record.len();
    }
    Ok(events)
}

/// Writes one TensorBoard event file in a folder. Each writer starts a file of its own and
/// never touches existing ones (a resumed run adds a file beside those of its earlier
/// invocations); TensorBoard reads all the files of a folder as one run.
///
/// Events go through a buffer: [`EventWriter::flush`] hands them to the operating system
/// (dropping the writer flushes too, ignoring errors).
///
/// ```
/// use convnet::tensorboard::EventWriter;
/// let dir = std::env::temp_dir().join(format!("convnet-tb-writer-{}", std::process::id()));
/// let mut w = EventWriter::create(&dir)?;
/// w.add_scalar("lr", 0.01, 1)?;
/// w.add_histogram("weights/fc.weight", &[0.1, -0.2, 0.3], 1)?;
/// w.add_image("sample", &[255, 0, 0, 0, 255, 0], 2, 1, 3, 1)?; // a 2x1 RGB image
/// w.flush()?;
/// assert!(w.path().file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Starts a new event file in `dir` (made if needed), named
    /// `events.out.tfevents.{unix seconds}.{hostname}` (with `.001`, `.002`, ... added
    /// when a file of that name exists already), and writes its first event, the file
    /// version.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!("events.out.tfevents.{secs:010}.{}", hostname());
        let mut n = 0u32;
        let (path, file) = loop {
            let name = match n {
                0 => base.clone(),
                n => format!("{base}.{n:03}"),
            };
            let path = dir.join(name);
            match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 999 => n += 1,
                Err(source) => return Err(Error::Io { path, source }),
            }
        };
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(What::FileVersion(FILE_VERSION.into())),
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes an event as one record.
    pub fn write_event(&mut self, event: &Event) -> Result<()> {
        let record = tfrecord(&event.encode_to_vec());
        self.out.write_all(&record).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Writes `values` (tagged summary values) as one event at `step`, stamped now.
    pub fn add_values(&mut self, values: Vec<Value>, step: i64) -> Result<()> {
        self.write_event(&Event {
            wall_time: wall_time(),
            step,
            what: Some(What::Summary(Summary { value: values })),
        })
    }

    /// Adds a scalar to the series `tag`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        self.add_values(vec![value_of(tag, Kind::SimpleValue(value))], step)
    }

    /// Adds a histogram of `values` to the series `tag`, bucketed as TensorFlow's
    /// summaries are (see [`histogram`]). NaN and infinite values are left out.
    pub fn add_histogram(&mut self, tag: &str, values: &[f32], step: i64) -> Result<()> {
        self.add_values(vec![value_of(tag, Kind::Histo(histogram(values)))], step)
    }

    /// Adds an image, given as `height` rows of `width` pixels of `channels` interleaved
    /// bytes (1 grayscale, 2 grayscale and alpha, 3 RGB, 4 RGBA), encoded as PNG.
    pub fn add_image(
        &mut self,
        tag: &str,
        pixels: &[u8],
        width: u32,
        height: u32,
        channels: u8,
        step: i64,
    ) -> Result<()> {
        let png = encode_png(pixels, width, height, channels)?;
        self.add_values(
            vec![value_of(tag, image_kind(png, width, height, channels))],
            step,
        )
    }

    /// Adds an image that is a PNG file already (its size and colour type are read from
    /// its header).
    pub fn add_png(&mut self, tag: &str, png: &[u8], step: i64) -> Result<()> {
        use image::ImageDecoder;
        let decoder = image::codecs::png::PngDecoder::new(std::io::Cursor::new(png))
            .map_err(|e| invalid("EventWriter::add_png", format!("not a PNG image: {e}")))?;
        let (width, height) = decoder.dimensions();
        let channels = decoder.color_type().channel_count();
        self.add_values(
            vec![value_of(
                tag,
                image_kind(png.to_vec(), width, height, channels),
            )],
            step,
        )
    }

    /// Hands the buffered events to the operating system.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }
}

fn value_of(tag: &str, kind: Kind) -> Value {
    Value {
        tag: tag.into(),
        value: Some(kind),
    }
}

fn image_kind(png: Vec<u8>, width: u32, height: u32, channels: u8) -> Kind {
    Kind::Image(proto::Image {
        height: i32::try_from(height).unwrap_or(i32::MAX),
        width: i32::try_from(width).unwrap_or(i32::MAX),
        colorspace: i32::from(channels),
        encoded_image_string: png,
    })
}

fn encode_png(pixels: &[u8], width: u32, height: u32, channels: u8) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let op = "EventWriter::add_image";
    let color = match channels {
        1 => image::ExtendedColorType::L8,
        2 => image::ExtendedColorType::La8,
        3 => image::ExtendedColorType::Rgb8,
        4 => image::ExtendedColorType::Rgba8,
        c => return Err(invalid(op, format!("{c} channels (1 to 4 are supported)"))),
    };
    let expected = (width as u64) * (height as u64) * u64::from(channels);
    if width == 0 || height == 0 || pixels.len() as u64 != expected {
        return Err(invalid(
            op,
            format!(
                "{} bytes for a {width}x{height} image of {channels} channels (needs {expected}, and a size of at least 1x1)",
                pixels.len()
            ),
        ));
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(pixels, width, height, color)
        .map_err(|e| invalid(op, format!("cannot encode PNG: {e}")))?;
    Ok(png)
}

/// TensorFlow's default bucket limits: 0, and ±1e-12 growing by 10% per bucket up to
/// ±1e20, closed by ±`f64::MAX` (1,551 limits in all).
pub fn default_bucket_limits() -> &'static [f64] {
    static LIMITS: OnceLock<Vec<f64>> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let mut positive = Vec::new();
        let mut v = 1e-12;
        while v < 1e20 {
            positive.push(v);
            v *= 1.1;
        }
        positive.push(f64::MAX);
        let mut limits: Vec<f64> = positive.iter().rev().map(|v| -v).collect();
        limits.push(0.0);
        limits.extend(positive);
        limits
    })
}

/// The histogram of `values` over [`default_bucket_limits`], as TensorFlow encodes it:
/// a value `v` falls in the first bucket whose limit is above it; empty buckets before
/// the first and after the last non-empty one are left out and runs of empty buckets in
/// between are merged. NaN and infinite values are left out (of the counts, `num`, the
/// sums and `min`/`max`); no value at all gives `num` 0 and one empty bucket.
///
/// ```
/// let h = convnet::tensorboard::histogram(&[1.0, 2.0, f32::NAN]);
/// assert_eq!((h.num, h.min, h.max, h.sum, h.sum_squares), (2.0, 1.0, 2.0, 3.0, 5.0));
/// assert_eq!(h.bucket.iter().sum::<f64>(), 2.0);
/// ```
pub fn histogram(values: &[f32]) -> HistogramProto {
    let limits = default_bucket_limits();
    let mut counts = vec![0f64; limits.len()];
    let (mut min, mut max, mut num, mut sum, mut sum_squares) =
        (f64::INFINITY, f64::NEG_INFINITY, 0f64, 0f64, 0f64);
    for &v in values {
        if !v.is_finite() {
            continue;
        }
        let v = f64::from(v);
        // The first limit above v (always found: the last limit is f64::MAX).
        let b = limits.partition_point(|&l| l <= v).min(limits.len() - 1);
        counts[b] += 1.0;
        min = min.min(v);
        max = max.max(v);
        num += 1.0;
        sum += v;
        sum_squares += v * v;
    }
    let (mut bucket_limit, mut bucket) = (Vec::new(), Vec::new());
    if let (Some(first), Some(last)) = (
        counts.iter().position(|&c| c > 0.0),
        counts.iter().rposition(|&c| c > 0.0),
    ) {
        let mut i = first;
        while i <= last {
            let (mut end, count) = (limits[i], counts[i]);
            i += 1;
            if count == 0.0 {
                while i <= last && counts[i] == 0.0 {
                    end = limits[i];
                    i += 1;
                }
            }
            bucket_limit.push(end);
            bucket.push(count);
        }
    }
    if bucket.is_empty() {
        (min, max) = (0.0, 0.0);
        bucket_limit.push(f64::MAX);
        bucket.push(0.0);
    }
    HistogramProto {
        min,
        max,
        num,
        sum,
        sum_squares,
        bucket_limit,
        bucket,
    }
}

/// Seconds since the Unix epoch, as events record them.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name for event file names (characters other than letters, digits, `.`,
/// `-` and `_` replaced by `_`; `localhost` when it cannot be found).
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    name.chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') => c,
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of TFRecord framing written independently of the writer's code: the
    /// records' data, each checked against both checksums.
    fn read_records(bytes: &[u8]) -> Vec<Vec<u8>> {
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        let masked = |d: &[u8]| {
            let c = crc.checksum(d);
            c.rotate_right(15).wrapping_add(0xa282ead8)
        };
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            assert_eq!(
                u32::from_le_bytes(rest[8..12].try_into().unwrap()),
                masked(&rest[..8])
            );
            let data = &rest[12..12 + len];
            assert_eq!(
                u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap()),
                masked(data)
            );
            out.push(data.to_vec());
            rest = &rest[16 + len..];
        }
        out
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "convnet-tensorboard-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn crc32c_of_known_vectors() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(CRC32C.checksum(b""), 0);
        // RFC 3720, B.4: 32 bytes of zeros, and of 0xff.
        assert_eq!(CRC32C.checksum(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(CRC32C.checksum(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn masked_crc32c_of_known_vectors() {
        // (0xE3069283 >> 15) | (0xE3069283 << 17), worked out by hand: 0x0001C60D | 0x25060000.
        assert_eq!(0xE306_9283u32 >> 15, 0x0001_C60D);
        assert_eq!(0xE306_9283u32 << 17, 0x2506_0000);
        assert_eq!(
            masked_crc32c(b"123456789"),
            0x2507_C60Du32.wrapping_add(0xa282_ead8)
        );
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        // The empty string's CRC is 0, so its mask is the constant alone.
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    #[test]
    fn record_framing_round_trips() {
        let payloads: [&[u8]; 3] = [b"", b"x", &[7u8; 1000]];
        let mut file = Vec::new();
        for p in payloads {
            file.extend(tfrecord(p));
        }
        let records = read_records(&file);
        assert_eq!(records.len(), 3);
        for (r, p) in records.iter().zip(payloads) {
            assert_eq!(r.as_slice(), p);
        }
        // The layout of one record, byte by byte.
        let r = tfrecord(b"123456789");
        assert_eq!(&r[..8], &9u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&9u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..21], b"123456789");
        assert_eq!(&r[21..], &0xC78A_B0E5u32.to_le_bytes());
    }

    #[test]
    fn writer_output_reads_back() -> Result<()> {
        let dir = temp_dir("writer");
        let mut w = EventWriter::create(&dir)?;
        w.add_scalar("train/loss", 1.25, 3)?;
        w.add_histogram("weights/w", &[-1.0, 0.0, 0.5, 2.0], 3)?;
        w.add_image("img", &[1, 2, 3, 4], 2, 2, 1, 3)?;
        w.flush()?;
        let bytes = std::fs::read(w.path()).map_err(|source| Error::Io {
            path: w.path().into(),
            source,
        })?;
        let events: Vec<Event> = read_records(&bytes)
            .iter()
            .map(|d| Event::decode(d.as_slice()).unwrap())
            .collect();
        assert_eq!(events, read_events(w.path())?);
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].what, Some(What::FileVersion(FILE_VERSION.into())));
        let value = |e: &Event| match &e.what {
            Some(What::Summary(s)) => s.value[0].clone(),
            other => panic!("not a summary: {other:?}"),
        };
        let v = value(&events[1]);
        assert_eq!((v.tag.as_str(), events[1].step), ("train/loss", 3));
        assert_eq!(v.value, Some(Kind::SimpleValue(1.25)));
        let Some(Kind::Histo(h)) = value(&events[2]).value else {
            panic!("not a histogram")
        };
        assert_eq!((h.num, h.min, h.max, h.sum), (4.0, -1.0, 2.0, 1.5));
        let Some(Kind::Image(img)) = value(&events[3]).value else {
            panic!("not an image")
        };
        assert_eq!((img.width, img.height, img.colorspace), (2, 2, 1));
        let decoded = image::load_from_memory(&img.encoded_image_string).unwrap();
        assert_eq!(decoded.to_luma8().into_raw(), vec![1, 2, 3, 4]);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn a_second_writer_starts_its_own_file() -> Result<()> {
        let dir = temp_dir("second");
        let mut a = EventWriter::create(&dir)?;
        a.add_scalar("x", 1.0, 1)?;
        a.flush()?;
        let mut b = EventWriter::create(&dir)?;
        b.add_scalar("x", 2.0, 2)?;
        b.flush()?;
        assert_ne!(a.path(), b.path());
        // Names sort in the order the files were started (TensorBoard reads them so).
        assert!(a.path() < b.path());
        assert_eq!(read_events(a.path())?.len(), 2);
        assert_eq!(read_events(b.path())?.len(), 2);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn truncated_last_record_ends_the_list_and_damage_is_an_error() -> Result<()> {
        let dir = temp_dir("damage");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.out.tfevents.0.test");
        let mut bytes = tfrecord(
            &Event {
                wall_time: 1.0,
                step: 0,
                what: Some(What::FileVersion(FILE_VERSION.into())),
            }
            .encode_to_vec(),
        );
        let whole = bytes.len();
        bytes.extend(tfrecord(b"\x10\x05")); // step 5
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_events(&path)?.len(), 1);
        bytes[whole - 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_events(&path), Err(Error::Format { .. })));
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }

    #[test]
    fn histogram_buckets_follow_tensorflow() {
        let limits = default_bucket_limits();
        assert_eq!(limits.len(), 1551);
        assert_eq!(limits[775], 0.0);
        assert!(limits.windows(2).all(|w| w[0] < w[1]));
        let h = histogram(&[0.0, 0.0, 1.0, -1.0, 1e30]);
        assert_eq!(h.num, 5.0);
        assert_eq!(h.bucket.iter().sum::<f64>(), 5.0);
        assert_eq!(h.bucket_limit.len(), h.bucket.len());
        // Each value lies below its bucket's limit and at or above the previous one.
        let mut left = h.min;
        for (&limit, &count) in h.bucket_limit.iter().zip(&h.bucket) {
            assert!(left < limit || count == 0.0);
            left = limit;
        }
        // Zeros fall in the bucket whose limit is the first positive one.
        let z = histogram(&[0.0]);
        assert_eq!(
            (z.bucket_limit.as_slice(), z.bucket.as_slice()),
            (&[1e-12][..], &[1.0][..])
        );
        // The largest finite value falls in the last bucket.
        let m = histogram(&[f32::MAX]);
        assert_eq!(m.bucket, vec![1.0]);
        // Runs of empty buckets between non-empty ones are merged.
        let gap = histogram(&[-1.0, 1.0]);
        assert_eq!(gap.bucket, vec![1.0, 0.0, 1.0]);
    }

    #[test]
    fn empty_and_non_finite_histograms_are_safe() {
        for values in [&[][..], &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY][..]] {
            let h = histogram(values);
            assert_eq!((h.num, h.min, h.max, h.sum), (0.0, 0.0, 0.0, 0.0));
            assert_eq!((h.bucket_limit, h.bucket), (vec![f64::MAX], vec![0.0]));
        }
    }

    #[test]
    fn bad_images_are_errors() -> Result<()> {
        let dir = temp_dir("images");
        let mut w = EventWriter::create(&dir)?;
        assert!(w.add_image("a", &[0; 5], 2, 1, 3, 0).is_err());
        assert!(w.add_image("a", &[0; 6], 2, 1, 5, 0).is_err());
        assert!(w.add_image("a", &[], 0, 0, 3, 0).is_err());
        assert!(w.add_png("a", b"not a png", 0).is_err());
        let png = encode_png(&[9; 12], 2, 2, 3)?;
        w.add_png("b", &png, 0)?;
        w.flush()?;
        let events = read_events(w.path())?;
        assert_eq!(events.len(), 2);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
