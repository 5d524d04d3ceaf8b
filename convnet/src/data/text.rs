//! Labelled texts and their tokenizer: the data side of CNNs over text.
//!
//! A [`TextDataset`] reads `label<TAB>text` lines (a `.tsv` file) or a folder of classes
//! `<root>/<class>/*.txt` (one text per file, classes from sorted folder names as with image
//! folders). A [`Tokenizer`] is fitted on the training split: character-level, or word-level
//! on lower-cased runs of letters and digits; tokens seen fewer than `min_freq` times map to
//! the unknown token; every text becomes `max_len` ids, cut or padded. Id 0 is padding
//! (`<pad>`, an embedding's `padding_idx`), id 1 is unknown (`<unk>`). The tokenizer is saved
//! as JSON (in a checkpoint's metadata) so that a trained model reads new text as it was
//! trained.
//!
//! ```
//! use convnet::data::text::{Level, TextDataset, Tokenizer};
//! let data = TextDataset::from_lines(
//!     "tsv",
//!     "games\tA puzzle game\nnet\tA web browser\ngames\tA racing game\n",
//! )?;
//! assert_eq!(data.classes(), &["games", "net"]);
//! assert_eq!(data.labels(), &[0, 1, 0]);
//! let tok = Tokenizer::fit(data.texts(), Level::Word, 2, 4)?;
//! // "a" and "game" appear twice; everything else is unknown.
//! assert_eq!(tok.vocab(), &["<pad>", "<unk>", "a", "game"]);
//! assert_eq!(tok.encode("A new Game!"), vec![2, 1, 3, 0]);
//! let again = Tokenizer::from_json(&tok.to_json())?;
//! assert_eq!(again.encode("a game"), tok.encode("a game"));
//! # Ok::<(), convnet::Error>(())
//! ```

use super::{format_err, io_err};
use crate::error::{invalid, Result};
use std::collections::HashMap;
use std::path::Path;

/// Largest text file read (a `.tsv` or one `.txt`): beyond it, an error rather than an
/// allocation of whatever size the file claims.
pub const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Labelled texts with class names (see the module documentation).
#[derive(Clone, Debug)]
pub struct TextDataset {
    texts: Vec<String>,
    labels: Vec<u32>,
    classes: Vec<String>,
}

impl TextDataset {
    /// Reads `path`: a folder of classes of `.txt` files, or a file of `label<TAB>text`
    /// lines.
    pub fn open(path: &Path) -> Result<TextDataset> {
        if path.is_dir() {
            return TextDataset::read_folder(path);
        }
        let text = read_text(path)?;
        TextDataset::from_lines(&path.display().to_string(), &text)
    }

    /// Parses `label<TAB>text` lines (`origin` names them in errors); blank lines are
    /// skipped, classes are the sorted distinct labels.
    pub fn from_lines(origin: &str, text: &str) -> Result<TextDataset> {
        let path = Path::new(origin);
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let (label, body) = line.split_once('\t').ok_or_else(|| {
                format_err(
                    path,
                    format!(
                        "line {}: expected `label<TAB>text`, found no tab in {:?}",
                        i + 1,
                        truncate(line, 60)
                    ),
                )
            })?;
            let label = label.trim();
            if label.is_empty() {
                return Err(format_err(path, format!("line {}: empty label", i + 1)));
            }
            pairs.push((label.to_string(), body.to_string()));
        }
        if pairs.is_empty() {
            return Err(format_err(path, "no `label<TAB>text` lines"));
        }
        Ok(TextDataset::from_pairs(pairs))
    }

    /// Reads `<root>/<class>/*.txt`, one text per file, classes in sorted folder order.
    pub fn read_folder(root: &Path) -> Result<TextDataset> {
        let mut classes: Vec<_> = std::fs::read_dir(root)
            .map_err(|e| io_err(root, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        let mut pairs = Vec::new();
        for class in &classes {
            let dir = root.join(class);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .map_err(|e| io_err(&dir, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("txt")))
                .collect();
            files.sort();
            for f in files {
                pairs.push((class.clone(), read_text(&f)?));
            }
        }
        if pairs.is_empty() {
            return Err(format_err(
                root,
                "no texts: expected <root>/<class>/*.txt (one text per file)",
            ));
        }
        Ok(TextDataset::from_pairs(pairs))
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> TextDataset {
        let mut classes: Vec<String> = pairs.iter().map(|(l, _)| l.clone()).collect();
        classes.sort();
        classes.dedup();
        let index: HashMap<&str, u32> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let labels = pairs.iter().map(|(l, _)| index[l.as_str()]).collect();
        let texts = pairs.into_iter().map(|(_, t)| t).collect();
        TextDataset {
            texts,
            labels,
            classes,
        }
    }

    /// The texts, in file order.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }

    /// Class indices, one per text.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Class names, sorted.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of texts.
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    /// True without texts (a read data set always has some).
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// One character (as written: not lower-cased).
    Char,
    /// A lower-cased run of letters and digits.
    Word,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Char => "char",
            Level::Word => "word",
        }
    }
}

/// Text to fixed-length id sequences (see the module documentation).
#[derive(Clone, Debug)]
pub struct Tokenizer {
    level: Level,
    max_len: usize,
    vocab: Vec<String>,
    index: HashMap<String, u32>,
}

/// The padding id.
pub const PAD: u32 = 0;
/// The unknown-token id.
pub const UNK: u32 = 1;

impl Tokenizer {
    /// Builds the vocabulary of `texts` (the training split): `<pad>`, `<unk>`, then every
    /// token seen at least `min_freq` times, most frequent first (ties in sorted order).
    pub fn fit(
        texts: &[String],
        level: Level,
        min_freq: usize,
        max_len: usize,
    ) -> Result<Tokenizer> {
        if max_len == 0 {
            return Err(invalid("Tokenizer::fit", "max_len must be positive"));
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for t in texts {
            for tok in tokens(t, level) {
                *counts.entry(tok).or_insert(0) += 1;
            }
        }
        let mut kept: Vec<(String, usize)> = counts
            .into_iter()
            .filter(|(_, n)| *n >= min_freq.max(1))
            .collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let vocab: Vec<String> = ["<pad>", "<unk>"]
            .into_iter()
            .map(String::from)
            .chain(kept.into_iter().map(|(t, _)| t))
            .collect();
        Ok(Tokenizer::with_vocab(level, max_len, vocab))
    }

    fn with_vocab(level: Level, max_len: usize, vocab: Vec<String>) -> Tokenizer {
        let index = vocab
            .iter()
            .enumerate()
            .skip(2)
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Tokenizer {
            level,
            max_len,
            vocab,
            index,
        }
    }

    /// The vocabulary, by id.
    pub fn vocab(&self) -> &[String] {
        &self.vocab
    }

    /// Ids per text.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The token level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// `text` as exactly [`Tokenizer::max_len`] ids: cut after that many tokens, padded
    /// with [`PAD`]; tokens outside the vocabulary are [`UNK`].
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = tokens(text, self.level)
            .take(self.max_len)
            .map(|t| self.index.get(&t).copied().unwrap_or(UNK))
            .collect();
        ids.resize(self.max_len, PAD);
        ids
    }

    /// Every text of `texts` encoded, as floats `[N * max_len]` (the form an embedding
    /// layer reads).
    pub fn encode_all(&self, texts: &[String]) -> Vec<f32> {
        texts
            .iter()
            .flat_map(|t| self.encode(t))
            .map(|id| id as f32)
            .collect()
    }

    /// The tokenizer as JSON: `{"level", "max_len", "vocab"}`.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "level": self.level.name(),
            "max_len": self.max_len,
            "vocab": self.vocab,
        })
        .to_string()
    }

    /// A tokenizer from [`Tokenizer::to_json`]'s output.
    pub fn from_json(text: &str) -> Result<Tokenizer> {
        let bad = |msg: &str| invalid("Tokenizer::from_json", msg.to_string());
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let level = match v["level"].as_str() {
            Some("char") => Level::Char,
            Some("word") => Level::Word,
            _ => return Err(bad("`level` must be \"char\" or \"word\"")),
        };
        let max_len = v["max_len"]
            .as_u64()
            .filter(|&n| n > 0 && n <= 1 << 20)
            .ok_or_else(|| bad("`max_len` must be a whole number from 1 to 1048576"))?
            as usize;
        let vocab: Vec<String> = v["vocab"]
            .as_array()
            .ok_or_else(|| bad("`vocab` must be a list of tokens"))?
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`vocab` must hold strings"))?;
        if vocab.len() < 2 || vocab[0] != "<pad>" || vocab[1] != "<unk>" {
            return Err(bad("`vocab` must start with \"<pad>\", \"<unk>\""));
        }
        Ok(Tokenizer::with_vocab(level, max_len, vocab))
    }
}

impl TextDataset {
    /// Splits off the last `fraction` of every class's texts (in file order) as a test set:
    /// `(train, test)`, both with this set's classes.
    ///
    /// ```
    /// use convnet::data::text::TextDataset;
    /// let ds = TextDataset::from_lines("t", "a\t1\na\t2\nb\t3\na\t4\nb\t5\n")?;
    /// let (train, test) = ds.split_per_class(0.34);
    /// assert_eq!((train.texts(), test.texts()), (&["1".to_string(), "2".into(), "3".into()][..], &["4".to_string(), "5".into()][..]));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn split_per_class(&self, fraction: f64) -> (TextDataset, TextDataset) {
        let mut test = vec![false; self.len()];
        for c in 0..self.classes.len() as u32 {
            let members: Vec<usize> = (0..self.len()).filter(|&i| self.labels[i] == c).collect();
            let n = ((members.len() as f64 * fraction).round() as usize).min(members.len());
            for &i in &members[members.len() - n..] {
                test[i] = true;
            }
        }
        let part = |want: bool| TextDataset {
            texts: (0..self.len())
                .filter(|&i| test[i] == want)
                .map(|i| self.texts[i].clone())
                .collect(),
            labels: (0..self.len())
                .filter(|&i| test[i] == want)
                .map(|i| self.labels[i])
                .collect(),
            classes: self.classes.clone(),
        };
        (part(false), part(true))
    }

    /// The texts as token ids `[max_len]` ([`Tokenizer::encode`]) with labels numbered by
    /// their position in `classes` (the training set's classes, for a test set); a label
    /// that is not in `classes` is an error naming it.
    ///
    /// ```
    /// use convnet::data::text::{Level, TextDataset, Tokenizer};
    /// let train = TextDataset::from_lines("train", "a\tred fox\nb\tblue sky\n")?;
    /// let test = TextDataset::from_lines("test", "b\tred sky\n")?;
    /// let tok = Tokenizer::fit(train.texts(), Level::Word, 1, 3)?;
    /// let ds = test.encode(&tok, train.classes())?;
    /// // Vocabulary: <pad>, <unk>, then blue, fox, red, sky (equal counts: sorted).
    /// assert_eq!((ds.dims(), ds.labels(), ds.example(0)), (&[3][..], &[1u32][..], &[4., 5., 0.][..]));
    /// assert!(TextDataset::from_lines("t", "c\tx\n")?.encode(&tok, train.classes()).is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        classes: &[String],
    ) -> Result<super::FeatureDataset> {
        let position: HashMap<&str, u32> = classes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_str(), i as u32))
            .collect();
        let labels = self
            .labels
            .iter()
            .map(|&l| {
                let name = &self.classes[l as usize];
                position.get(name.as_str()).copied().ok_or_else(|| {
                    invalid(
                        "text",
                        format!(
                            "class {name:?} is not one of the model's classes ({})",
                            classes.join(", ")
                        ),
                    )
                })
            })
            .collect::<Result<Vec<u32>>>()?;
        super::FeatureDataset::new(
            tokenizer.encode_all(&self.texts),
            vec![tokenizer.max_len()],
            labels,
            classes.to_vec(),
            "texts",
        )
    }
}

/// The tokens of `text` at `level`.
fn tokens(text: &str, level: Level) -> Box<dyn Iterator<Item = String> + '_> {
    match level {
        Level::Char => Box::new(text.chars().map(String::from)),
        Level::Word => Box::new(
            text.split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(|w| w.to_lowercase()),
        ),
    }
}

fn read_text(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.len() > MAX_TEXT_BYTES {
        return Err(format_err(
            path,
            format!(
                "{} bytes is more than the {} a text file may hold",
                meta.len(),
                MAX_TEXT_BYTES
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        format_err(
            path,
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

fn truncate(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_level_keeps_case_and_pads() {
        let texts = vec!["abA".to_string(), "aa".to_string()];
        let tok = Tokenizer::fit(&texts, Level::Char, 1, 5).unwrap();
        assert_eq!(tok.vocab(), &["<pad>", "<unk>", "a", "A", "b"]);
        assert_eq!(tok.encode("Abz"), vec![3, 4, 1, 0, 0]);
        assert_eq!(tok.encode("aaaaaaa"), vec![2; 5]);
    }

    #[test]
    fn folders_of_txt_files_and_tsv_files_read_alike() {
        let root = std::env::temp_dir().join(format!("convnet-text-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (class, name, body) in [
            ("b", "1.txt", "second class"),
            ("a", "2.txt", "first"),
            ("a", "1.txt", "first too"),
        ] {
            std::fs::create_dir_all(root.join(class)).unwrap();
            std::fs::write(root.join(class).join(name), body).unwrap();
        }
        std::fs::write(root.join("a").join("notes.md"), "not a text").unwrap();
        let d = TextDataset::open(&root).unwrap();
        assert_eq!(d.classes(), &["a", "b"]);
        assert_eq!(d.texts(), &["first too", "first", "second class"]);
        assert_eq!(d.labels(), &[0, 0, 1]);
        let tsv = root.join("all.tsv");
        std::fs::write(&tsv, "a\tfirst too\r\na\tfirst\n\nb\tsecond class\n").unwrap();
        let t = TextDataset::open(&tsv).unwrap();
        assert_eq!(
            (t.texts(), t.labels(), t.classes()),
            (d.texts(), d.labels(), d.classes())
        );
        std::fs::write(root.join("bad.tsv"), [b'a', b'\t', 0xff, 0xfe]).unwrap();
        let e = TextDataset::open(&root.join("bad.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.tsv") && e.contains("not UTF-8"), "{e}");
        let e = TextDataset::open(&root.join("missing.tsv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.tsv"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_lines_and_json_are_errors() {
        let e = TextDataset::from_lines("f.tsv", "ok\tfine\nno tab here\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f.tsv") && e.contains("line 2") && e.contains("no tab"),
            "{e}"
        );
        let e = TextDataset::from_lines("f.tsv", "\n\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `label<TAB>text` lines"), "{e}");
        let e = TextDataset::from_lines("f.tsv", "\tempty label\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1: empty label"), "{e}");
        for bad in [
            "[]",
            r#"{"level":"byte","max_len":3,"vocab":["<pad>","<unk>"]}"#,
            r#"{"level":"word","max_len":0,"vocab":["<pad>","<unk>"]}"#,
            r#"{"level":"word","max_len":3,"vocab":["x","<unk>"]}"#,
        ] {
            assert!(Tokenizer::from_json(bad).is_err(), "{bad}");
        }
        assert!(Tokenizer::fit(&[], Level::Word, 1, 0).is_err());
    }
}
