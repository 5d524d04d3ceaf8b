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

#[test]
fn model_files_describe_text_cnns_with_the_tokenizers_vocabulary() {
    let file = convnet::model_file::ModelFile::from_toml(
        r#"
name = "kim"
input = [30]

[[layer]]
type = "embedding"
name = "embedding"
num_embeddings = "vocab"
embedding_dim = 16
padding_idx = 0

[[layer]]
type = "permute"
dims = [0, 2, 1]

[[layer]]
type = "conv_bank1d"
name = "convs"
out_channels = 10
kernel_sizes = [2, 3, 4]

[[layer]]
type = "linear"
name = "fc"
out_features = "classes"
"#,
        "kim.toml",
    )
    .unwrap();
    let model = file.build_with_vocabulary(&[30], Some(77), 5).unwrap();
    let names: Vec<(String, Vec<usize>)> = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    assert_eq!(names[0], ("embedding.weight".to_string(), vec![77, 16]));
    assert_eq!(names[1], ("convs.0.weight".to_string(), vec![10, 16, 2]));
    assert_eq!(names[6], ("convs.2.bias".to_string(), vec![10]));
    assert_eq!(names[7], ("fc.weight".to_string(), vec![5, 30]));
    let ids =
        convnet::Tensor::from_vec((0..60).map(|i| (i % 77) as f32).collect(), [2, 30]).unwrap();
    let y = model.forward(&ids, convnet::nn::Mode::Eval).unwrap();
    assert_eq!(y.dims(), &[2, 5]);
    let e = file.build_for(&[30], 5).unwrap_err().to_string();
    assert!(e.contains("needs a vocabulary size"), "{e}");
    let bad = |text: &str, needle: &str| {
        let f = convnet::model_file::ModelFile::from_toml(text, "bad.toml").unwrap();
        let e = f
            .build_with_vocabulary(&[30], Some(10), 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{e}");
    };
    bad(
        "name = 'x'\n[[layer]]\ntype = 'embedding'\nnum_embeddings = 10\nembedding_dim = 4\n[[layer]]\ntype = 'permute'\ndims = [1, 0, 2]\n",
        "moves the batch dimension",
    );
    bad(
        "name = 'x'\n[[layer]]\ntype = 'embedding'\nnum_embeddings = 10\nembedding_dim = 4\n[[layer]]\ntype = 'permute'\ndims = [0, 2, 1]\n[[layer]]\ntype = 'conv_bank1d'\nout_channels = 3\nkernel_sizes = 'wide'\n",
        "`kernel_sizes` must be a list of whole numbers",
    );
    bad(
        "name = 'x'\n[[layer]]\ntype = 'embedding'\nnum_embeddings = 10\nembedding_dim = 4\n[[layer]]\ntype = 'permute'\ndims = [0, 2, 1]\n[[layer]]\ntype = 'conv_bank1d'\nout_channels = 3\nkernel_sizes = [40]\n",
        "conv",
    );
}
