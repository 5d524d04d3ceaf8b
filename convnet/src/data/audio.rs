//! Speech and other sounds: WAV files, log-mel features, and folders of labelled clips.
//!
//! - [`read_wav`] decodes PCM 8/16/24/32-bit integer and 32-bit float WAV files to mono
//!   `f32` samples as torchaudio loads them (integers divided by 2^(bits-1), so 16-bit
//!   samples by 32768; several channels averaged), with the sample rate. Sizes in the
//!   header are checked against [`MAX_WAV_SECONDS`], [`MAX_WAV_SAMPLES`] and the file's
//!   length before anything is allocated; errors name the file.
//! - [`MelSpectrogram`] is `torchaudio.transforms.MelSpectrogram(sample_rate, n_fft,
//!   hop_length=.., n_mels=..)` with its other defaults (window = n_fft, periodic Hann,
//!   centred frames with reflect padding, power 2, HTK mel scale without normalisation,
//!   0 Hz to sample_rate // 2), computed in `f64`; [`power_to_db`] is
//!   `AmplitudeToDB(stype="power", top_db=None)`.
//! - [`read_folder`] reads `<root>/<class>/*.wav` (classes from sorted folder names, as the
//!   image and text folder readers) into a [`FeatureDataset`] of raw waveforms `[1, L]` or
//!   log-mel spectrograms `[1, n_mels, frames]`, as [`AudioOptions`] say: the sample rate
//!   every file must have (no resampling), the clip length (shorter clips zero-padded at the
//!   end, longer ones cut) and the features. The options are saved as JSON with a model so
//!   that a new clip is read as the training clips were ([`AudioOptions::file_features`]).
//!
//! ```
//! use convnet::data::audio::{AudioFeatures, AudioOptions};
//! let opts = AudioOptions {
//!     sample_rate: 8000,
//!     clip_samples: 8000,
//!     features: AudioFeatures::LogMel { n_fft: 400, hop_length: 160, n_mels: 64 },
//! };
//! assert_eq!(opts.dims()?, vec![1, 64, 51]);
//! let tone: Vec<f32> = (0..6000).map(|i| (i as f32 * 0.3).sin()).collect();
//! let feats = opts.features(&tone)?;
//! assert_eq!(feats.len(), 64 * 51);
//! assert_eq!(AudioOptions::from_json(&opts.to_json())?, opts);
//! # Ok::<(), convnet::Error>(())
//! ```

use super::{format_err, io_err, FeatureDataset};
use crate::error::{invalid, Result};
use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest recording read from one WAV file, in seconds: a header announcing more is an
/// error rather than an allocation of whatever it claims.
pub const MAX_WAV_SECONDS: u64 = 600;

/// Most samples (all channels together) read from one WAV file, whatever its sample rate.
pub const MAX_WAV_SAMPLES: u64 = 1 << 28;

/// Largest FFT size [`MelSpectrogram`] accepts.
pub const MAX_N_FFT: usize = 1 << 16;

/// A decoded WAV file: mono samples and their rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Wav {
    /// Samples in [-1, 1] for integer files (float files as stored), the mean of the
    /// channels.
    pub samples: Vec<f32>,
    /// Samples per second.
    pub sample_rate: u32,
    /// Channels in the file (averaged into `samples`).
    pub channels: u16,
}

/// Reads a WAV file (see the module documentation for the formats and checks).
///
/// ```
/// let path = std::env::temp_dir().join(format!("convnet-doc-{}.wav", std::process::id()));
/// let spec = hound::WavSpec { channels: 1, sample_rate: 8000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
/// let mut w = hound::WavWriter::create(&path, spec).unwrap();
/// for s in [0i16, 16384, -32768] { w.write_sample(s).unwrap(); }
/// w.finalize().unwrap();
/// let wav = convnet::data::audio::read_wav(&path)?;
/// assert_eq!((wav.samples, wav.sample_rate), (vec![0.0, 0.5, -1.0], 8000));
/// std::fs::remove_file(&path).unwrap();
/// assert!(convnet::data::audio::read_wav(&path).is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn read_wav(path: &Path) -> Result<Wav> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let len = file.metadata().map_err(|e| io_err(path, e))?.len();
    decode_wav(path, std::io::BufReader::new(file), len)
}

/// Decodes a WAV file held in memory; `name` identifies it in messages.
///
/// ```
/// let err = convnet::data::audio::wav_from_bytes("clip.wav", b"not a wav").unwrap_err();
/// assert!(err.to_string().starts_with("clip.wav: not a WAV file"), "{err}");
/// ```
pub fn wav_from_bytes(name: &str, bytes: &[u8]) -> Result<Wav> {
    decode_wav(Path::new(name), bytes, bytes.len() as u64)
}

/// Decodes a WAV stream of `file_len` bytes in all.
fn decode_wav<R: Read>(path: &Path, reader: R, file_len: u64) -> Result<Wav> {
    let mut reader = hound::WavReader::new(reader).map_err(|e| header_err(path, e, file_len))?;
    let spec = reader.spec();
    let (rate, channels, bits) = (spec.sample_rate, spec.channels, spec.bits_per_sample);
    let kind = match spec.sample_format {
        hound::SampleFormat::Int => "integer",
        hound::SampleFormat::Float => "float",
    };
    let supported = match spec.sample_format {
        hound::SampleFormat::Int => (1..=32).contains(&bits),
        hound::SampleFormat::Float => bits == 32,
    };
    if !supported {
        return Err(format_err(
            path,
            format!("{bits}-bit {kind} samples are not supported: convert the file to 8/16/24/32-bit integer or 32-bit float PCM"),
        ));
    }
    if rate == 0 {
        return Err(format_err(path, "the header gives a sample rate of 0 Hz"));
    }
    let frames = u64::from(reader.duration());
    let total = u64::from(reader.len());
    if frames > MAX_WAV_SECONDS * u64::from(rate) || total > MAX_WAV_SAMPLES {
        return Err(format_err(
            path,
            format!(
                "the header announces {frames} samples per channel ({:.1} s at {rate} Hz, {channels} channel(s)): more than the {MAX_WAV_SECONDS} s or {MAX_WAV_SAMPLES} samples a clip may hold; cut the recording into clips",
                frames as f64 / f64::from(rate)
            ),
        ));
    }
    let least_bytes = total * u64::from(bits).div_ceil(8);
    if least_bytes > file_len {
        return Err(format_err(
            path,
            format!("truncated: the header announces {total} samples ({least_bytes} bytes or more) but the file is {file_len} bytes long"),
        ));
    }
    let mut samples = Vec::with_capacity(frames as usize);
    let per = usize::from(channels);
    let mut frame = Vec::with_capacity(per);
    let mut read = 0u64;
    let mut push = |v: f64, frame: &mut Vec<f64>| {
        frame.push(v);
        if frame.len() == per {
            samples.push((frame.iter().sum::<f64>() / per as f64) as f32);
            frame.clear();
        }
    };
    let truncated = |read: u64, e: hound::Error| {
        format_err(
            path,
            format!("truncated or corrupt sample data: the header announces {total} samples, reading sample {read} failed: {e}"),
        )
    };
    match spec.sample_format {
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f64;
            for s in reader.samples::<i32>() {
                let s = s.map_err(|e| truncated(read, e))?;
                push(f64::from(s) * scale, &mut frame);
                read += 1;
            }
        }
        hound::SampleFormat::Float => {
            for s in reader.samples::<f32>() {
                let s = s.map_err(|e| truncated(read, e))?;
                if !s.is_finite() {
                    return Err(format_err(
                        path,
                        format!("sample {read} is {s}: the file holds non-finite values"),
                    ));
                }
                push(f64::from(s), &mut frame);
                read += 1;
            }
        }
    }
    Ok(Wav {
        samples,
        sample_rate: rate,
        channels,
    })
}

/// A readable message for a WAV header hound refused.
fn header_err(path: &Path, e: hound::Error, file_len: u64) -> crate::Error {
    let msg = match e {
        // hound reports running out of bytes as an `Other` error with this message.
        hound::Error::IoError(e)
            if e.kind() == std::io::ErrorKind::UnexpectedEof
                || e.to_string().contains("read enough bytes") =>
        {
            format!("not a WAV file: it ends inside the header, before the sample data ({file_len} bytes)")
        }
        hound::Error::IoError(e) => return io_err(path, e),
        hound::Error::FormatError(m) => format!("not a WAV file ({m})"),
        hound::Error::Unsupported => "unsupported WAV encoding (compressed or unusual sample layout): convert the file to 8/16/24/32-bit integer or 32-bit float PCM".to_string(),
        e => format!("not a readable WAV file ({e})"),
    };
    format_err(path, msg)
}

// ----- Mel spectrogram ------------------------------------------------------------------------

/// `torchaudio.transforms.MelSpectrogram` with torchaudio's defaults besides `sample_rate`,
/// `n_fft`, `hop_length` and `n_mels` (see the module documentation). Output `[n_mels,
/// frames]`, frames = `1 + (len + 2 * (n_fft / 2) - n_fft) / hop_length`.
///
/// ```
/// use convnet::data::audio::MelSpectrogram;
/// let mel = MelSpectrogram::new(8000, 256, 80, 40)?;
/// let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.5).sin()).collect();
/// let p = mel.power(&x)?;
/// assert_eq!((p.len(), mel.frames(1000)), (40 * 13, 13));
/// assert!(p.iter().all(|&v| v >= 0.0));
/// assert!(mel.power(&x[..100]).is_err()); // shorter than the reflect padding
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone)]
pub struct MelSpectrogram {
    sample_rate: u32,
    n_fft: usize,
    hop_length: usize,
    n_mels: usize,
    /// Periodic Hann window, `[n_fft]`.
    window: Vec<f64>,
    /// Triangular filters, `[n_freqs, n_mels]` (torchaudio's `melscale_fbanks` layout).
    fb: Vec<f64>,
    fft: Arc<dyn Fft<f64>>,
}

impl std::fmt::Debug for MelSpectrogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MelSpectrogram(sample_rate={}, n_fft={}, hop_length={}, n_mels={})",
            self.sample_rate, self.n_fft, self.hop_length, self.n_mels
        )
    }
}

impl MelSpectrogram {
    /// Plans the transform; every size must be positive, `n_fft` at least 2 and at most
    /// [`MAX_N_FFT`], `n_mels` at most `n_fft`.
    pub fn new(
        sample_rate: u32,
        n_fft: usize,
        hop_length: usize,
        n_mels: usize,
    ) -> Result<MelSpectrogram> {
        let op = "MelSpectrogram";
        if sample_rate == 0 || hop_length == 0 || n_mels == 0 {
            return Err(invalid(
                op,
                format!("sample_rate {sample_rate}, hop_length {hop_length} and n_mels {n_mels} must be positive"),
            ));
        }
        if !(2..=MAX_N_FFT).contains(&n_fft) {
            return Err(invalid(
                op,
                format!("n_fft {n_fft} must be from 2 to {MAX_N_FFT}"),
            ));
        }
        if n_mels > n_fft {
            return Err(invalid(
                op,
                format!("n_mels {n_mels} is more than n_fft {n_fft}"),
            ));
        }
        let window = (0..n_fft)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n_fft as f64).cos())
            .collect();
        let fb = mel_filter_bank(n_fft / 2 + 1, n_mels, sample_rate);
        let fft = FftPlanner::new().plan_fft_forward(n_fft);
        Ok(MelSpectrogram {
            sample_rate,
            n_fft,
            hop_length,
            n_mels,
            window,
            fb,
            fft,
        })
    }

    /// Mel bands (rows of the output).
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Frames (columns of the output) for `len` samples.
    pub fn frames(&self, len: usize) -> usize {
        1 + (len + 2 * (self.n_fft / 2)).saturating_sub(self.n_fft) / self.hop_length
    }

    /// Fewest samples the transform takes: the reflect padding of `n_fft / 2` samples needs
    /// more than that many.
    pub fn min_len(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// The filter bank `[n_fft / 2 + 1, n_mels]`, as `torchaudio.functional.melscale_fbanks`
    /// returns it.
    pub fn filter_bank(&self) -> Vec<f32> {
        self.fb.iter().map(|&v| v as f32).collect()
    }

    /// The mel power spectrogram of `x`, `[n_mels, frames]`.
    pub fn power(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(self.power_f64(x)?.into_iter().map(|v| v as f32).collect())
    }

    /// The log-mel spectrogram of `x` in dB, `[n_mels, frames]`: [`power_to_db`] of
    /// [`MelSpectrogram::power`].
    pub fn log_mel(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(self
            .power_f64(x)?
            .into_iter()
            .map(|v| power_to_db64(v) as f32)
            .collect())
    }

    fn power_f64(&self, x: &[f32]) -> Result<Vec<f64>> {
        let (n_fft, pad) = (self.n_fft, self.n_fft / 2);
        if x.len() < self.min_len() {
            return Err(invalid(
                "MelSpectrogram",
                format!(
                    "{} samples are too few for n_fft {n_fft}: the reflect padding needs at least {}",
                    x.len(),
                    self.min_len()
                ),
            ));
        }
        // Centred frames: reflect `pad` samples at both ends (the edge sample not repeated).
        let n = x.len();
        let mut padded = Vec::with_capacity(n + 2 * pad);
        padded.extend((1..=pad).rev().map(|j| f64::from(x[j])));
        padded.extend(x.iter().map(|&v| f64::from(v)));
        padded.extend((1..=pad).map(|j| f64::from(x[n - 1 - j])));
        let frames = self.frames(n);
        let n_freqs = n_fft / 2 + 1;
        let mut out = vec![0.0f64; self.n_mels * frames];
        let mut buf = vec![Complex::new(0.0, 0.0); n_fft];
        let mut scratch = vec![Complex::new(0.0, 0.0); self.fft.get_inplace_scratch_len()];
        let mut spectrum = vec![0.0f64; n_freqs];
        for t in 0..frames {
            let start = t * self.hop_length;
            for (b, (&s, &w)) in buf
                .iter_mut()
                .zip(padded[start..start + n_fft].iter().zip(&self.window))
            {
                *b = Complex::new(s * w, 0.0);
            }
            self.fft.process_with_scratch(&mut buf, &mut scratch);
            for (p, c) in spectrum.iter_mut().zip(&buf) {
                *p = c.norm_sqr();
            }
            for (f, &p) in spectrum.iter().enumerate() {
                let row = &self.fb[f * self.n_mels..(f + 1) * self.n_mels];
                for (m, &w) in row.iter().enumerate() {
                    out[m * frames + t] += p * w;
                }
            }
        }
        Ok(out)
    }
}

/// `torchaudio.functional.melscale_fbanks(n_freqs, 0, sample_rate // 2, n_mels,
/// sample_rate)` (HTK scale, no normalisation) in `f64`: `[n_freqs, n_mels]`.
fn mel_filter_bank(n_freqs: usize, n_mels: usize, sample_rate: u32) -> Vec<f64> {
    let hz_to_mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let mel_to_hz = |m: f64| 700.0 * (10f64.powf(m / 2595.0) - 1.0);
    // torch.linspace(start, end, steps).
    let linspace = |start: f64, end: f64, steps: usize| -> Vec<f64> {
        if steps == 1 {
            return vec![start];
        }
        let step = (end - start) / (steps - 1) as f64;
        (0..steps)
            .map(|i| {
                if i < steps / 2 {
                    start + step * i as f64
                } else {
                    end - step * (steps - 1 - i) as f64
                }
            })
            .collect()
    };
    // Both torchaudio's bin frequencies and its default f_max use sample_rate // 2.
    let nyquist = f64::from(sample_rate / 2);
    let all_freqs = linspace(0.0, nyquist, n_freqs);
    let m_pts = linspace(hz_to_mel(0.0), hz_to_mel(nyquist), n_mels + 2);
    let f_pts: Vec<f64> = m_pts.into_iter().map(mel_to_hz).collect();
    let mut fb = vec![0.0; n_freqs * n_mels];
    for (f, &freq) in all_freqs.iter().enumerate() {
        for m in 0..n_mels {
            let down = (freq - f_pts[m]) / (f_pts[m + 1] - f_pts[m]);
            let up = (f_pts[m + 2] - freq) / (f_pts[m + 2] - f_pts[m + 1]);
            fb[f * n_mels + m] = down.min(up).max(0.0);
        }
    }
    fb
}

/// `torchaudio.transforms.AmplitudeToDB(stype="power", top_db=None)` of one value:
/// `10 * log10(max(x, 1e-10))`.
///
/// ```
/// use convnet::data::audio::power_to_db;
/// assert_eq!((power_to_db(100.0), power_to_db(0.0)), (20.0, -100.0));
/// ```
pub fn power_to_db(x: f32) -> f32 {
    power_to_db64(f64::from(x)) as f32
}

fn power_to_db64(x: f64) -> f64 {
    10.0 * x.max(1e-10).log10()
}

// ----- Options and folders ----------------------------------------------------------------------

/// What a clip becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AudioFeatures {
    /// The samples themselves, `[1, clip_samples]`.
    Waveform,
    /// The log-mel spectrogram in dB ([`MelSpectrogram::log_mel`]), `[1, n_mels, frames]`.
    LogMel {
        /// FFT size and window length.
        n_fft: usize,
        /// Samples between frames.
        hop_length: usize,
        /// Mel bands.
        n_mels: usize,
    },
}

/// How clips are read: the sample rate every file must have, the clip length and the
/// features (see the module documentation). Saved with a model as JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioOptions {
    /// Required sample rate in Hz; a file at another rate is an error (no resampling).
    pub sample_rate: u32,
    /// Samples per clip: shorter clips are zero-padded at the end, longer ones cut.
    pub clip_samples: usize,
    /// The features computed from each clip.
    pub features: AudioFeatures,
}

impl AudioOptions {
    /// Checks the settings: positive rate and clip length (at most [`MAX_WAV_SAMPLES`]), a
    /// valid [`MelSpectrogram`] whose padding fits in the clip.
    ///
    /// ```
    /// use convnet::data::audio::{AudioFeatures, AudioOptions};
    /// let short = AudioOptions { sample_rate: 8000, clip_samples: 100, features: AudioFeatures::LogMel { n_fft: 400, hop_length: 160, n_mels: 40 } };
    /// assert!(short.validate().unwrap_err().to_string().contains("too few"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.prepare().map(|_| ())
    }

    /// The shape of one example: `[1, clip_samples]` or `[1, n_mels, frames]`.
    pub fn dims(&self) -> Result<Vec<usize>> {
        Ok(self.prepare()?.dims())
    }

    /// The features of one clip of samples at [`AudioOptions::sample_rate`] (padded or cut
    /// to the clip length first), laid out as [`AudioOptions::dims`].
    pub fn features(&self, samples: &[f32]) -> Result<Vec<f32>> {
        self.prepare()?.apply(samples)
    }

    /// The features of a WAV file, as [`read_folder`] computes them for each clip: for
    /// predicting on new recordings.
    pub fn file_features(&self, path: &Path) -> Result<Vec<f32>> {
        self.prepare()?.file(path)
    }

    /// The options as JSON, e.g. `{"sample_rate":8000,"clip_samples":8000,"features":
    /// {"kind":"log_mel","n_fft":400,"hop_length":160,"n_mels":64}}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Options from [`AudioOptions::to_json`]'s output, checked as
    /// [`AudioOptions::validate`] does.
    ///
    /// ```
    /// use convnet::data::audio::{AudioFeatures, AudioOptions};
    /// let o = AudioOptions::from_json(r#"{"sample_rate":8000,"clip_samples":8000,"features":{"kind":"waveform"}}"#)?;
    /// assert_eq!((o.features, o.dims()?), (AudioFeatures::Waveform, vec![1, 8000]));
    /// assert!(AudioOptions::from_json(r#"{"sample_rate":0,"clip_samples":8000,"features":{"kind":"waveform"}}"#).is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn from_json(text: &str) -> Result<AudioOptions> {
        let opts: AudioOptions = serde_json::from_str(text)
            .map_err(|e| invalid("AudioOptions::from_json", format!("not audio options: {e}")))?;
        opts.validate()?;
        Ok(opts)
    }

    fn prepare(&self) -> Result<Prepared> {
        let op = "AudioOptions";
        if self.sample_rate == 0 {
            return Err(invalid(op, "sample_rate must be positive"));
        }
        if self.clip_samples == 0 || self.clip_samples as u64 > MAX_WAV_SAMPLES {
            return Err(invalid(
                op,
                format!(
                    "clip_samples {} must be from 1 to {MAX_WAV_SAMPLES}",
                    self.clip_samples
                ),
            ));
        }
        let mel = match self.features {
            AudioFeatures::Waveform => None,
            AudioFeatures::LogMel {
                n_fft,
                hop_length,
                n_mels,
            } => {
                let mel = MelSpectrogram::new(self.sample_rate, n_fft, hop_length, n_mels)?;
                if self.clip_samples < mel.min_len() {
                    return Err(invalid(
                        op,
                        format!(
                            "clip_samples {} are too few for n_fft {n_fft}: at least {} are needed",
                            self.clip_samples,
                            mel.min_len()
                        ),
                    ));
                }
                Some(mel)
            }
        };
        Ok(Prepared { opts: *self, mel })
    }
}

/// Options with the mel transform planned once, shared by the threads reading a folder.
struct Prepared {
    opts: AudioOptions,
    mel: Option<MelSpectrogram>,
}

impl Prepared {
    fn dims(&self) -> Vec<usize> {
        match &self.mel {
            None => vec![1, self.opts.clip_samples],
            Some(mel) => vec![1, mel.n_mels(), mel.frames(self.opts.clip_samples)],
        }
    }

    fn apply(&self, samples: &[f32]) -> Result<Vec<f32>> {
        let mut clip = samples[..samples.len().min(self.opts.clip_samples)].to_vec();
        clip.resize(self.opts.clip_samples, 0.0);
        match &self.mel {
            None => Ok(clip),
            Some(mel) => mel.log_mel(&clip),
        }
    }

    fn file(&self, path: &Path) -> Result<Vec<f32>> {
        let wav = read_wav(path)?;
        if wav.sample_rate != self.opts.sample_rate {
            return Err(format_err(
                path,
                format!(
                    "sample rate {} Hz, expected {} Hz: resample the file (convnet does not resample)",
                    wav.sample_rate, self.opts.sample_rate
                ),
            ));
        }
        self.apply(&wav.samples)
    }
}

/// Reads `<root>/<class>/*.wav` (classes in sorted folder order, files in sorted order
/// within each class) into examples of [`AudioOptions::dims`], decoding files in
/// parallel. A class folder without `.wav` files, a file that cannot be decoded and a file
/// at another sample rate are errors naming the folder or file.
///
/// ```
/// use convnet::data::audio::{read_folder, AudioFeatures, AudioOptions};
/// let root = std::env::temp_dir().join(format!("convnet-doc-audio-{}", std::process::id()));
/// let spec = hound::WavSpec { channels: 1, sample_rate: 8000, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
/// for (class, n) in [("no", 300), ("yes", 500)] {
///     std::fs::create_dir_all(root.join(class)).unwrap();
///     let mut w = hound::WavWriter::create(root.join(class).join("a.wav"), spec).unwrap();
///     for i in 0..n { w.write_sample((i * 50) as i16).unwrap(); }
///     w.finalize().unwrap();
/// }
/// let opts = AudioOptions { sample_rate: 8000, clip_samples: 400, features: AudioFeatures::Waveform };
/// let ds = read_folder(&root, &opts)?;
/// assert_eq!((ds.classes(), ds.labels(), ds.dims()), (&["no".to_string(), "yes".into()][..], &[0u32, 1][..], &[1, 400][..]));
/// assert_eq!(ds.example(0)[399], 0.0); // 300 samples, zero-padded
/// std::fs::remove_dir_all(&root).unwrap();
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn read_folder(root: &Path, opts: &AudioOptions) -> Result<FeatureDataset> {
    let prepared = opts.prepare()?;
    let mut class_dirs: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| io_err(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    class_dirs.sort();
    if class_dirs.is_empty() {
        return Err(format_err(
            root,
            "no class folders: expected <root>/<class>/*.wav files",
        ));
    }
    let mut items: Vec<(PathBuf, u32)> = Vec::new();
    for (label, (_, dir)) in class_dirs.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("wav")))
            .collect();
        if files.is_empty() {
            return Err(format_err(
                dir,
                "empty class folder: it holds no .wav files; remove it or add clips",
            ));
        }
        files.sort();
        items.extend(files.into_iter().map(|f| (f, label as u32)));
    }
    let dims = prepared.dims();
    let per: usize = dims.iter().product();
    per.checked_mul(items.len())
        .filter(|&n| n as u64 <= MAX_WAV_SAMPLES * 4)
        .ok_or_else(|| {
            format_err(
                root,
                format!(
                    "{} clips of {dims:?} values are more than the features of a folder may hold",
                    items.len()
                ),
            )
        })?;
    let features: Vec<Result<Vec<f32>>> = items
        .par_iter()
        .map(|(path, _)| prepared.file(path))
        .collect();
    let mut values = Vec::with_capacity(per * items.len());
    for f in features {
        values.extend_from_slice(&f?);
    }
    let labels = items.iter().map(|(_, l)| *l).collect();
    let classes = class_dirs.into_iter().map(|(n, _)| n).collect();
    FeatureDataset::new(values, dims, labels, classes, root.display().to_string())
}
