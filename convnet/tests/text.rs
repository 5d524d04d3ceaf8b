//! The committed sample of Debian package descriptions (`data/debian-sample`, made by
//! `tools/data/debian_packages.py`) reads as a text data set, and a tokenizer fitted on its
//! training split encodes the test split.

use convnet::data::text::{Level, TextDataset, Tokenizer, PAD, UNK};
use std::path::PathBuf;

fn sample(split: &str) -> TextDataset {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data/debian-sample")
        .join(format!("{split}.tsv"));
    TextDataset::open(&path).unwrap()
}

#[test]
fn the_debian_sample_reads_and_tokenizes() {
    let (train, test) = (sample("train"), sample("test"));
    let sections = ["fonts", "games", "graphics", "math", "science", "sound"];
    assert_eq!(train.classes(), sections);
    assert_eq!(test.classes(), sections);
    assert_eq!((train.len(), test.len()), (480, 120));
    for c in 0..6 {
        assert_eq!(train.labels().iter().filter(|&&l| l == c).count(), 80);
    }
    let tok = Tokenizer::fit(train.texts(), Level::Word, 2, 64).unwrap();
    assert!(tok.vocab().len() > 1000, "{}", tok.vocab().len());
    let ids = tok.encode_all(test.texts());
    assert_eq!(ids.len(), 120 * 64);
    // Known words dominate; unknown ones and padding occur.
    let count = |id: u32| ids.iter().filter(|&&v| v == id as f32).count();
    let (pad, unk) = (count(PAD), count(UNK));
    assert!(
        pad > 0 && unk > 0 && pad + unk < ids.len() / 2,
        "pad {pad} unk {unk}"
    );
    assert!(ids.iter().all(|&v| (v as usize) < tok.vocab().len()));
}
