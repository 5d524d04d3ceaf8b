//! Texts and audio in the CLI: recognising such data, and turning it into model inputs with
//! the tokenizer or audio features a checkpoint stores, for `train`, `eval`, `predict` and
//! `export`.
//!
//! Text data is a `label<TAB>text` file (`.tsv`), a folder holding `train.tsv` and
//! `test.tsv`, a folder of classes of `.txt` files, or a folder holding `train/` and `test/`
//! folders of those. Audio data is a folder of classes of `.wav` files, or one holding
//! `train/` and `test/` folders of those. A single set is split per class (`--holdout`).
//! Audio features are standardised by the training clips' mean and standard deviation, kept
//! in the checkpoint's normalisation.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::checkpoint::SequenceMeta;
use convnet::data::audio::{AudioFeatures, AudioOptions};
use convnet::data::text::{Level, TextDataset, Tokenizer};
use convnet::data::{FeatureDataset, Normalize};
use convnet::Tensor;
use std::path::{Path, PathBuf};

/// What kind of examples a data path holds, when they are not images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Labelled texts.
    Text,
    /// Labelled sound clips.
    Audio,
}

/// The kind of a data path that holds texts or sound clips; `None` for anything else
/// (images, CIFAR, MNIST).
pub fn kind_of(path: &Path) -> Option<Kind> {
    let is_text = |p: &Path| p.extension().is_some_and(|e| e == "tsv" || e == "txt");
    let is_audio = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"));
    if path.is_file() {
        return is_text(path).then_some(Kind::Text);
    }
    if path.join("train.tsv").is_file() {
        return Some(Kind::Text);
    }
    // The first file under the folder (class folders, or train/<class>/...).
    let first = first_file(path, 3)?;
    if is_text(&first) {
        Some(Kind::Text)
    } else if is_audio(&first) {
        Some(Kind::Audio)
    } else {
        None
    }
}

/// The first regular file (in sorted order) at most `depth` folders below `dir`.
fn first_file(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in &entries {
        if e.is_file() && !e.file_name()?.to_string_lossy().starts_with('.') {
            return Some(e.clone());
        }
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|e| e.is_dir())
        .find_map(|e| first_file(e, depth - 1))
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TokensArg {
    Word,
    Char,
}

/// How `train` turns texts into token ids (saved in the checkpoint for `eval`/`predict`).
#[derive(Args, Debug, Clone)]
pub struct TextArgs {
    /// Tokens of text data: words (lower-cased runs of letters and digits) or characters.
    #[arg(long, value_enum, default_value_t = TokensArg::Word)]
    pub tokens: TokensArg,
    /// Text data: keep tokens seen at least this often in the training texts; the others
    /// read as unknown.
    #[arg(long, default_value_t = 2)]
    pub min_freq: usize,
    /// Text data: tokens per text; longer texts are cut, shorter ones padded.
    #[arg(long, default_value_t = 200)]
    pub max_len: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum FeaturesArg {
    Waveform,
    LogMel,
}

/// How `train` turns sound clips into inputs (saved in the checkpoint for `eval`/`predict`).
#[derive(Args, Debug, Clone)]
pub struct AudioArgs {
    /// Audio data: the sample rate every clip must have (Hz); nothing is resampled.
    #[arg(long, default_value_t = 8000)]
    pub sample_rate: u32,
    /// Audio data: samples per clip; shorter clips are padded with silence, longer ones cut.
    #[arg(long, default_value_t = 8000)]
    pub clip_samples: usize,
    /// Audio data: the samples themselves ([1, clip-samples], for m5) or a log-mel
    /// spectrogram ([1, n-mels, frames], for the 2-D models). Default: waveform for m5,
    /// log-mel otherwise.
    #[arg(long, value_enum)]
    pub features: Option<FeaturesArg>,
    /// Log-mel features: FFT size (and window length).
    #[arg(long, default_value_t = 256)]
    pub n_fft: usize,
    /// Log-mel features: samples between frames.
    #[arg(long, default_value_t = 80)]
    pub hop_length: usize,
    /// Log-mel features: mel bands.
    #[arg(long, default_value_t = 40)]
    pub n_mels: usize,
}

impl AudioArgs {
    /// The options for a run of `model` (waveforms for signal models such as m5).
    pub fn options(&self, model: &str) -> AudioOptions {
        let signal = convnet::models::architecture(model)
            .is_ok_and(|a| a.input == convnet::models::InputKind::Signal);
        let features = match self.features {
            Some(FeaturesArg::Waveform) => AudioFeatures::Waveform,
            Some(FeaturesArg::LogMel) => AudioFeatures::LogMel {
                n_fft: self.n_fft,
                hop_length: self.hop_length,
                n_mels: self.n_mels,
            },
            None if signal => AudioFeatures::Waveform,
            None => AudioFeatures::LogMel {
                n_fft: self.n_fft,
                hop_length: self.hop_length,
                n_mels: self.n_mels,
            },
        };
        AudioOptions {
            sample_rate: self.sample_rate,
            clip_samples: self.clip_samples,
            features,
        }
    }
}

/// A run's training and test examples, and what the model needs to know of them.
pub struct SequenceData {
    pub train: FeatureDataset,
    pub test: FeatureDataset,
    pub meta: SequenceMeta,
    /// A text model's vocabulary size.
    pub vocabulary: Option<usize>,
    /// How inputs are standardised (audio: by the training clips; texts: not at all).
    pub normalize: Normalize,
}

/// No standardisation.
fn identity() -> Normalize {
    Normalize {
        mean: vec![0.0],
        std: vec![1.0],
    }
}

/// The mean and standard deviation of all values of `data`.
fn statistics(data: &FeatureDataset) -> Normalize {
    let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
    for i in 0..data.len() {
        for &v in data.example(i) {
            sum += v as f64;
            sq += (v as f64) * (v as f64);
            n += 1.0;
        }
    }
    let mean = sum / n.max(1.0);
    let std = (sq / n.max(1.0) - mean * mean).max(0.0).sqrt();
    Normalize {
        mean: vec![mean as f32],
        std: vec![if std > 0.0 { std as f32 } else { 1.0 }],
    }
}

/// `data` with every value standardised by `n` (one mean and deviation for all).
fn standardised(data: &FeatureDataset, n: &Normalize) -> Result<FeatureDataset> {
    let (mean, std) = (n.mean[0], n.std[0]);
    let mut values = Vec::with_capacity(data.len() * data.dims().iter().product::<usize>());
    for i in 0..data.len() {
        values.extend(data.example(i).iter().map(|v| (v - mean) / std));
    }
    Ok(FeatureDataset::new(
        values,
        data.dims().to_vec(),
        data.labels().to_vec(),
        data.classes().to_vec(),
        data.source.clone(),
    )?)
}

/// The train and test clips of `path` (split per class by `holdout` when it holds one set).
fn audio_splits(
    path: &Path,
    opts: &AudioOptions,
    holdout: f64,
) -> Result<(FeatureDataset, FeatureDataset)> {
    let read = |p: &Path| {
        convnet::data::audio::read_folder(p, opts)
            .with_context(|| format!("cannot read the clips at {}", p.display()))
    };
    let (train, test) = (path.join("train"), path.join("test"));
    if train.is_dir() {
        if !test.is_dir() {
            bail!("{} has train/ but no test/", path.display());
        }
        let (train, test) = (read(&train)?, read(&test)?);
        let test = relabel(test, train.classes())?;
        return Ok((train, test));
    }
    if !(0.0..1.0).contains(&holdout) || holdout == 0.0 {
        bail!(
            "{} holds one set of clips: --holdout (in (0, 1)) sets the share tested, got {holdout}",
            path.display()
        );
    }
    let all = read(path)?;
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    for c in 0..all.classes().len() as u32 {
        let members: Vec<usize> = (0..all.len()).filter(|&i| all.labels()[i] == c).collect();
        let n = ((members.len() as f64 * holdout).round() as usize).min(members.len());
        head.extend_from_slice(&members[..members.len() - n]);
        tail.extend_from_slice(&members[members.len() - n..]);
    }
    Ok((all.select(&head), all.select(&tail)))
}

/// `data` labelled by the positions of its class names in `classes` (a test set whose class
/// folders are a subset of the training set's, in the same or another order).
fn relabel(data: FeatureDataset, classes: &[String]) -> Result<FeatureDataset> {
    if data.classes() == classes {
        return Ok(data);
    }
    let map: Vec<u32> = data
        .classes()
        .iter()
        .map(|c| {
            classes
                .iter()
                .position(|k| k == c)
                .map(|p| p as u32)
                .with_context(|| {
                    format!(
                        "class {c:?} of {} is not one of the model's classes ({})",
                        data.source,
                        classes.join(", ")
                    )
                })
        })
        .collect::<Result<_>>()?;
    let per: usize = data.dims().iter().product();
    let mut values = Vec::with_capacity(data.len() * per);
    for i in 0..data.len() {
        values.extend_from_slice(data.example(i));
    }
    Ok(FeatureDataset::new(
        values,
        data.dims().to_vec(),
        data.labels().iter().map(|&l| map[l as usize]).collect(),
        classes.to_vec(),
        data.source.clone(),
    )?)
}

/// The train and test texts of `path` (split per class by `holdout` when it holds one set).
fn text_splits(path: &Path, holdout: f64) -> Result<(TextDataset, TextDataset)> {
    let read = |p: &Path| {
        TextDataset::open(p).with_context(|| format!("cannot read the texts at {}", p.display()))
    };
    for (train, test) in [("train.tsv", "test.tsv"), ("train", "test")] {
        let (train, test) = (path.join(train), path.join(test));
        if path.is_dir() && train.exists() {
            if !test.exists() {
                bail!(
                    "{} has {} but no {}",
                    path.display(),
                    train.display(),
                    test.display()
                );
            }
            return Ok((read(&train)?, read(&test)?));
        }
    }
    if !(0.0..1.0).contains(&holdout) || holdout == 0.0 {
        bail!(
            "{} holds one set of texts: --holdout (in (0, 1)) sets the share tested, got {holdout}",
            path.display()
        );
    }
    Ok(read(path)?.split_per_class(holdout))
}

/// Opens texts for training: fits the tokenizer on the training split and encodes both.
pub fn open_training(
    path: &Path,
    kind: Kind,
    text: &TextArgs,
    audio: &AudioOptions,
    holdout: f64,
) -> Result<SequenceData> {
    match kind {
        Kind::Audio => {
            audio.validate().context("the audio settings")?;
            let (train, test) = audio_splits(path, audio, holdout)?;
            let normalize = statistics(&train);
            Ok(SequenceData {
                train: standardised(&train, &normalize)?,
                test: standardised(&test, &normalize)?,
                meta: SequenceMeta {
                    input: audio.dims()?,
                    tokenizer: None,
                    audio: Some(audio.to_json()),
                },
                vocabulary: None,
                normalize,
            })
        }
        Kind::Text => {
            let (train, test) = text_splits(path, holdout)?;
            let level = match text.tokens {
                TokensArg::Word => Level::Word,
                TokensArg::Char => Level::Char,
            };
            if text.max_len == 0 || text.max_len > 1 << 20 {
                bail!("--max-len must be from 1 to 1048576, got {}", text.max_len);
            }
            let tokenizer = Tokenizer::fit(train.texts(), level, text.min_freq, text.max_len)?;
            let classes = train.classes().to_vec();
            let source = path.display().to_string();
            let mut train = train.encode(&tokenizer, &classes)?;
            let mut test = test
                .encode(&tokenizer, &classes)
                .context("the test texts have a class the training texts lack")?;
            train.source = format!("{source} (training texts)");
            test.source = format!("{source} (test texts)");
            Ok(SequenceData {
                meta: SequenceMeta {
                    input: vec![tokenizer.max_len()],
                    tokenizer: Some(tokenizer.to_json()),
                    audio: None,
                },
                vocabulary: Some(tokenizer.vocab().len()),
                normalize: identity(),
                train,
                test,
            })
        }
    }
}

/// The tokenizer a text model's metadata holds.
fn tokenizer_of(meta: &SequenceMeta) -> Result<Tokenizer> {
    let json = meta
        .tokenizer
        .as_deref()
        .context("the checkpoint is a sequence model without a tokenizer")?;
    Tokenizer::from_json(json).context("the checkpoint's tokenizer")
}

/// The vocabulary size of a text model's tokenizer (`None` for other sequence models).
pub fn vocabulary(meta: &SequenceMeta) -> Result<Option<usize>> {
    match &meta.tokenizer {
        Some(_) => Ok(Some(tokenizer_of(meta)?.vocab().len())),
        None => Ok(None),
    }
}

/// The test split of `path`, made into a model's inputs as its checkpoint says, labelled by
/// the model's `classes`.
pub fn open_test(
    path: &Path,
    meta: &SequenceMeta,
    normalize: &Normalize,
    classes: &[String],
    holdout: f64,
) -> Result<FeatureDataset> {
    if let Some(opts) = audio_of(meta)? {
        if kind_of(path) != Some(Kind::Audio) {
            bail!(
                "{} holds no .wav clips (folders of classes, or train/ and test/ folders of them); the model reads audio",
                path.display()
            );
        }
        let (_, test) = audio_splits(path, &opts, holdout)?;
        return standardised(&relabel(test, classes)?, normalize);
    }
    if kind_of(path) != Some(Kind::Text) {
        bail!(
            "{} holds no texts (a .tsv file, a folder with train.tsv/test.tsv, or folders of .txt files); the model reads texts",
            path.display()
        );
    }
    let tokenizer = tokenizer_of(meta)?;
    let (_, test) = text_splits(path, holdout)?;
    let mut test = test.encode(&tokenizer, classes)?;
    test.source = format!("{} (test texts)", path.display());
    Ok(test)
}

/// The audio options a model's metadata holds (`None` for text models).
fn audio_of(meta: &SequenceMeta) -> Result<Option<AudioOptions>> {
    meta.audio
        .as_deref()
        .map(|json| AudioOptions::from_json(json).context("the checkpoint's audio settings"))
        .transpose()
}

/// `predict`'s arguments as a batch of inputs: for a text model each names a text file
/// (read whole) or is the text itself; for an audio model each is a `.wav` file.
pub fn inputs(meta: &SequenceMeta, normalize: &Normalize, items: &[String]) -> Result<Tensor> {
    if let Some(opts) = audio_of(meta)? {
        let mut values = Vec::new();
        for item in items {
            let f = opts
                .file_features(Path::new(item))
                .with_context(|| format!("cannot read the clip {item}"))?;
            values.extend(f.iter().map(|v| (v - normalize.mean[0]) / normalize.std[0]));
        }
        let dims: Vec<usize> = std::iter::once(items.len())
            .chain(meta.input.iter().copied())
            .collect();
        return Ok(Tensor::from_vec(values, dims.as_slice())?);
    }
    let tokenizer = tokenizer_of(meta)?;
    let mut texts = Vec::with_capacity(items.len());
    for item in items {
        let path = Path::new(item);
        let text = if path.is_file() {
            let bytes =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            String::from_utf8(bytes)
                .with_context(|| format!("{} is not UTF-8 text", path.display()))?
        } else {
            item.clone()
        };
        texts.push(text);
    }
    Ok(Tensor::from_vec(
        tokenizer.encode_all(&texts),
        [items.len(), tokenizer.max_len()],
    )?)
}
