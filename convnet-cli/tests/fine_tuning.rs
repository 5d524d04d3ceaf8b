//! Starting from trained weights on another set of classes: `train --classes` restricts and
//! relabels the data, `--weights` of a model with another class count replaces the
//! classifier (and says so), other mismatches stay errors; `eval --classes` evaluates the
//! result on the same classes.

mod common;
use common::{convnet, fails_with, last_json, temp};

#[test]
fn fine_tuning_to_four_classes_replaces_the_classifier() {
    let out = temp("fine-tune");
    let pretrained = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pretrained/seed-cnn-cifar10.safetensors"
    );
    let run = convnet(&[
        "train",
        "--classes",
        "airplane,automobile,ship,truck",
        "--limit-train",
        "200",
        "--epochs",
        "1",
        "--weights",
        pretrained,
        "--no-tensorboard",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("classifier fc2 replaced: 10 -> 4 outputs, freshly initialised"),
        "{stdout}"
    );
    assert!(stdout.contains("on 200 images"), "{stdout}");
    // The sample has 100 test images per class: 400 for the four.
    let v = last_json(&convnet(&[
        "eval",
        "--checkpoint",
        out.join("model.safetensors").to_str().unwrap(),
        "--classes",
        "airplane,automobile,ship,truck",
        "--json",
    ]));
    let total: u64 = v["confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 400, "{v}");
    // Starting from the pretrained vehicles' features beats chance (25%) clearly after one
    // epoch on 200 images.
    assert!(v["accuracy"].as_f64().unwrap() > 0.4, "{v}");
}

#[test]
fn other_mismatches_and_unknown_classes_are_errors() {
    let out = temp("fine-tune-bad");
    let pretrained = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pretrained/resnet20-cifar10.safetensors"
    );
    // resnet20 weights do not fit seed-cnn: not a classifier swap.
    fails_with(
        &[
            "train",
            "--epochs",
            "1",
            "--weights",
            pretrained,
            "--out",
            out.to_str().unwrap(),
        ],
        "do not fit seed-cnn",
    );
    fails_with(
        &[
            "train",
            "--classes",
            "airplane,unicorn",
            "--out",
            out.to_str().unwrap(),
        ],
        "no class \"unicorn\"; its classes: airplane, automobile",
    );
    fails_with(
        &[
            "train",
            "--classes",
            "cat,cat",
            "--out",
            out.to_str().unwrap(),
        ],
        "class \"cat\" is named twice",
    );
}

/// `--pretrained NAME` brings its architecture and weights (a run that barely moves them
/// keeps the pretrained accuracy); a conflicting `--model` and an unknown name are errors.
#[test]
fn train_starts_from_a_built_in_pretrained_model() {
    let out = temp("fine-tune-pretrained");
    let v = last_json(&convnet(&[
        "train",
        "--pretrained",
        "resnet20-cifar10",
        "--limit-train",
        "64",
        "--epochs",
        "1",
        "--lr",
        "1e-9",
        "--no-tensorboard",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]));
    // One step at a negligible rate keeps the pretrained model (89.2% on the sample; only
    // BatchNorm's running statistics move): far from the 10% of a fresh one.
    assert!(v["test_accuracy"].as_f64().unwrap() > 0.8, "{v}");
    let summary = convnet(&[
        "summary",
        "--checkpoint",
        out.join("model.safetensors").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(
        text.contains("layer3.2.conv2") && text.contains("[1, 10]"),
        "{text}"
    );
    fails_with(
        &[
            "train",
            "--pretrained",
            "resnet20-cifar10",
            "--model",
            "seed-cnn",
            "--out",
            out.to_str().unwrap(),
        ],
        "is a resnet20, not a seed-cnn",
    );
    fails_with(
        &[
            "train",
            "--pretrained",
            "alexnet",
            "--out",
            out.to_str().unwrap(),
        ],
        "no pretrained model \"alexnet\"",
    );
}
