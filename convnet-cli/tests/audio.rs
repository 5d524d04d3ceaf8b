//! Sound from the command line: `train` on folders of `.wav` clips picks m5 on the waveform
//! (or log-mel spectrograms for the 2-D models), keeps the feature settings and the
//! standardisation in the checkpoint, and `eval`, `predict` and `export` read new clips
//! through them; wrong settings and wrong data are clear errors.

mod common;
use common::{convnet, fails_with, last_json, temp};

const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/spoken-digits-sample");

fn train(out: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train",
        "--data",
        SAMPLE,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-tensorboard",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    last_json(&convnet(&args))
}

#[test]
fn m5_trains_on_clips_and_reads_new_ones_as_it_was_trained() {
    let out = temp("audio-m5");
    let run = train(&out, &[]);
    let ckpt = out.join("model.safetensors");
    let ckpt = ckpt.to_str().unwrap();
    let summary =
        String::from_utf8_lossy(&convnet(&["summary", "--checkpoint", ckpt]).stdout).into_owned();
    assert!(
        summary.contains("conv1 (Conv1d)") && summary.contains("Input shape: [1, 8000]"),
        "{summary}"
    );
    // eval reads the test clips with the stored settings and standardisation: the same
    // accuracy as training reported.
    let eval = last_json(&convnet(&[
        "eval",
        "--checkpoint",
        ckpt,
        "--data",
        SAMPLE,
        "--json",
    ]));
    assert_eq!(eval["accuracy"], run["test_accuracy"]);
    // predict on a clip.
    let clip = format!("{SAMPLE}/test/seven");
    let clip = std::fs::read_dir(&clip)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pred = last_json(&convnet(&[
        "predict",
        "--checkpoint",
        ckpt,
        clip.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(pred["predictions"][0]["clip"], clip.to_str().unwrap());
    // ONNX export with a reference batch.
    let io = out.join("io.safetensors");
    let onnx = out.join("m5.onnx");
    let exported = convnet(&[
        "export",
        "--checkpoint",
        ckpt,
        "--onnx",
        onnx.to_str().unwrap(),
        "--reference-io",
        io.to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{exported:?}");
    assert!(std::fs::metadata(&onnx).unwrap().len() > 4 * 500_000);
    // A text is not a clip; texts are not clips.
    fails_with(
        &["predict", "--checkpoint", ckpt, "hello there"],
        "cannot read the clip hello there",
    );
    let texts = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/debian-sample");
    fails_with(
        &["eval", "--checkpoint", ckpt, "--data", texts],
        "holds no .wav clips",
    );
}

#[test]
fn two_d_models_train_on_log_mel_spectrograms() {
    let out = temp("audio-logmel");
    train(&out, &["--model", "seed-cnn"]);
    let ckpt = out.join("model.safetensors");
    let summary = convnet(&["summary", "--checkpoint", ckpt.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&summary.stdout);
    // 40 mel bands x (1 + 8000 / 80) frames.
    assert!(text.contains("Input shape: [1, 40, 101]"), "{text}");
    // Settings that cannot work are refused before training.
    fails_with(
        &[
            "train",
            "--data",
            SAMPLE,
            "--sample-rate",
            "16000",
            "--epochs",
            "1",
        ],
        "16000",
    );
    fails_with(
        &[
            "train", "--data", SAMPLE, "--model", "seed-cnn", "--n-fft", "0", "--epochs", "1",
        ],
        "n_fft",
    );
    fails_with(
        &["train", "--data", SAMPLE, "--augment", "--epochs", "1"],
        "--augment applies to images",
    );
    fails_with(
        &[
            "train", "--data", SAMPLE, "--model", "text-cnn", "--epochs", "1",
        ],
        "text-cnn takes token ids [L], not an input of shape [1, 40, 101]",
    );
}
