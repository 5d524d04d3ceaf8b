//! Texts (and audio) in the CLI: recognising such data, and turning it into model inputs with
//! the tokenizer a checkpoint stores, for `train`, `eval`, `predict` and `export`.
//!
//! Text data is a `label<TAB>text` file (`.tsv`), a folder holding `train.tsv` and
//! `test.tsv`, a folder of classes of `.txt` files, or a folder holding `train/` and `test/`
//! folders of those. A single set is split per class (`--holdout`).

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::checkpoint::SequenceMeta;
use convnet::data::text::{Level, TextDataset, Tokenizer};
use convnet::data::FeatureDataset;
use convnet::Tensor;
use std::path::{Path, PathBuf};

/// What kind of examples a data path holds, when they are not images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Labelled texts.
    Text,
}

/// The kind of a data path that holds texts; `None` for anything else (images, CIFAR, MNIST).
pub fn kind_of(path: &Path) -> Option<Kind> {
    let is_text = |p: &Path| p.extension().is_some_and(|e| e == "tsv" || e == "txt");
    if path.is_file() {
        return is_text(path).then_some(Kind::Text);
    }
    if path.join("train.tsv").is_file() {
        return Some(Kind::Text);
    }
    // The first file under the folder (class folders, or train/<class>/...).
    first_file(path, 3)
        .filter(|f| is_text(f))
        .map(|_| Kind::Text)
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

/// A run's training and test examples, and what the model needs to know of them.
pub struct SequenceData {
    pub train: FeatureDataset,
    pub test: FeatureDataset,
    pub meta: SequenceMeta,
    /// A text model's vocabulary size.
    pub vocabulary: Option<usize>,
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
    holdout: f64,
) -> Result<SequenceData> {
    match kind {
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
    classes: &[String],
    holdout: f64,
) -> Result<FeatureDataset> {
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

/// `predict`'s arguments as a batch of inputs: each names a text file (read whole) or is
/// the text itself.
pub fn inputs(meta: &SequenceMeta, items: &[String]) -> Result<Tensor> {
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
