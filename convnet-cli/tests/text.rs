//! Text classification from the command line: `train` on a folder of `label<TAB>text` files
//! picks text-cnn and fits a tokenizer that the checkpoint keeps; `eval` and `predict` read
//! new text through it; `--resume` continues; image-only flags and image data are refused
//! with clear errors.

mod common;
use common::{convnet, fails_with, last_json, temp};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/debian-sample");

fn train(out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train",
        "--data",
        SAMPLE,
        "--epochs",
        "2",
        "--optimizer",
        "adam",
        "--lr",
        "0.002",
        "--batch-size",
        "32",
        "--max-len",
        "60",
        "--no-tensorboard",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    last_json(&convnet(&args))
}

#[test]
fn text_cnn_trains_evaluates_and_predicts_through_its_tokenizer() {
    let out = temp("text-train");
    let run = train(&out, &[]);
    let acc = run["test_accuracy"].as_f64().unwrap();
    // Six balanced classes: chance is 1/6; two epochs on 480 texts learn far more.
    assert!(acc > 0.5, "test accuracy {acc}");
    let ckpt = out.join("model.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    // The checkpoint says what it is and how it reads text.
    let summary = convnet(&["summary", "--checkpoint", ckpt]);
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(
        text.contains("ConvBank1d") && text.contains("Input shape: [60]"),
        "{text}"
    );
    // eval gives the accuracy training reported on the same test split.
    let eval = last_json(&convnet(&[
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        SAMPLE,
        "--json",
    ]));
    assert_eq!(eval["accuracy"].as_f64().unwrap(), acc);
    assert_eq!(eval["classes"].as_array().unwrap().len(), 6);
    // predict reads text given on the command line and text files.
    let file = out.join("font.txt");
    std::fs::write(
        &file,
        "a TrueType font family with many glyphs for the console",
    )
    .unwrap();
    let pred = last_json(&convnet(&[
        "predict",
        "--checkpoint",
        ckpt,
        "a game where you race cars",
        file.to_str().unwrap(),
        "--top-k",
        "6",
        "--json",
    ]));
    let preds = pred["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    assert_eq!(preds[0]["text"], "a game where you race cars");
    let total: f64 = preds[1]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["probability"].as_f64().unwrap())
        .sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    // Image data is not text.
    fails_with(
        &["eval", "--checkpoint", ckpt],
        "--data names the texts or clips to evaluate the model on",
    );
}

#[test]
fn a_text_run_resumes_and_refuses_image_settings() {
    let out = temp("text-resume");
    let first = train(&out, &["--stop-after", "1"]);
    assert_eq!(first["epochs"], 1);
    let resumed = last_json(&convnet(&[
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(resumed["epochs"], 2);
    // The same run in one go ends with the same accuracy (same tokenizer, same batches).
    let whole = train(&temp("text-whole"), &[]);
    assert_eq!(resumed["test_accuracy"], whole["test_accuracy"]);
    for (flag, value) in [
        ("--augment", None),
        ("--resize", Some("64")),
        ("--qat", None),
    ] {
        let mut args = vec!["train", "--data", SAMPLE, "--epochs", "1", flag];
        args.extend(value);
        fails_with(&args, &format!("{flag} applies to images"));
    }
    fails_with(
        &[
            "train", "--data", SAMPLE, "--model", "resnet20", "--epochs", "1",
        ],
        "resnet20 takes images [C, H, W], not an input of shape [200]",
    );
    fails_with(
        &["train", "--data", SAMPLE, "--max-len", "0", "--epochs", "1"],
        "--max-len must be from 1",
    );
    fails_with(
        &[
            "train",
            "--data",
            SAMPLE,
            "--classes",
            "games,nope",
            "--epochs",
            "1",
        ],
        "no class \"nope\"",
    );
    // Two texts, one per class: --holdout 0.2 leaves nothing to test on.
    let tiny = temp("text-tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    let file = tiny.join("two.tsv");
    std::fs::write(&file, "games\tfun game\nsound\tloud noise\n").unwrap();
    fails_with(
        &["train", "--data", file.to_str().unwrap(), "--epochs", "1"],
        "leaves no texts to test on",
    );
}
