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
    // One step at a negligible rate keeps the pretrained model (90.4% on the sample; only
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

/// Reads the tensors of a checkpoint as (name, raw bytes), for bit-exact comparisons.
fn tensor_map(path: &std::path::Path) -> std::collections::HashMap<String, Vec<u8>> {
    common::tensors(path).into_iter().collect()
}

/// `--freeze` keeps the named layers bit-identical — weights and BatchNorm running
/// statistics — while the rest trains (the backbone at `--lr-backbone`); the classifier of
/// another class count is replaced as before.
#[test]
fn frozen_layers_keep_their_weights_and_statistics() {
    let out = temp("freeze");
    let pretrained = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pretrained/resnet20-cifar10.safetensors"
    );
    let run = convnet(&[
        "train",
        "--pretrained",
        "resnet20-cifar10",
        "--classes",
        "cat,dog",
        "--limit-train",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--freeze",
        "conv1,bn1,layer1",
        "--lr-backbone",
        "0.001",
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
    assert!(stdout.contains("frozen: 21 parameter tensors"), "{stdout}");
    let before = tensor_map(std::path::Path::new(pretrained));
    let after = tensor_map(&out.join("model.safetensors"));
    for name in [
        "conv1.weight",
        "bn1.weight",
        "bn1.running_mean",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.2.bn2.running_var",
        "layer1.2.bn2.num_batches_tracked",
    ] {
        assert_eq!(after[name], before[name], "frozen {name} changed");
    }
    for name in [
        "layer2.0.conv1.weight",
        "layer2.0.bn1.running_mean",
        "layer3.2.bn2.weight",
    ] {
        assert_ne!(after[name], before[name], "trained {name} did not change");
    }
    // Two classes: the classifier was replaced.
    assert_ne!(after["fc.weight"].len(), before["fc.weight"].len());
    // The training state holds no optimizer state for the frozen layers.
    let state = tensor_map(&out.join("train_state.safetensors"));
    assert!(state.contains_key("layer2.0.conv1.weight.momentum_buffer"));
    assert!(!state
        .keys()
        .any(|k| k.starts_with("layer1.") || k.starts_with("conv1.")));

    // --freeze-backbone: only the classifier (seed-cnn's fc2) trains.
    let out = temp("freeze-backbone");
    let pretrained = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../pretrained/seed-cnn-cifar10.safetensors"
    );
    let v = last_json(&convnet(&[
        "train",
        "--weights",
        pretrained,
        "--classes",
        "cat,dog",
        "--limit-train",
        "64",
        "--epochs",
        "1",
        "--freeze-backbone",
        "--no-tensorboard",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(v["test_accuracy"].as_f64().unwrap() > 0.0, "{v}");
    let before = tensor_map(std::path::Path::new(pretrained));
    let after = tensor_map(&out.join("model.safetensors"));
    for name in ["conv1.weight", "conv2.bias", "fc1.weight", "fc1.bias"] {
        assert_eq!(after[name], before[name], "frozen {name} changed");
    }
    assert_eq!(after["fc2.weight"].len(), 2 * 128 * 4);
}

/// `--resize N --crop M` on eval, predict and train, and `predict --classes`.
#[test]
fn resize_crop_and_predict_classes() {
    // Evaluating the pretrained model on images scaled up by 36/32 and centre-cropped.
    let v = last_json(&convnet(&[
        "eval",
        "--pretrained",
        "resnet20-cifar10",
        "--resize",
        "36",
        "--crop",
        "32",
        "--limit-test",
        "200",
        "--json",
    ]));
    assert!(v["accuracy"].as_f64().unwrap() > 0.6, "{v}");
    // Training on random resized crops of 28 from the 36x36 centres: a 28x28 model.
    let out = temp("resize-train");
    let v = last_json(&convnet(&[
        "train",
        "--resize",
        "36",
        "--crop",
        "28",
        "--augment",
        "--limit-train",
        "64",
        "--limit-test",
        "64",
        "--epochs",
        "1",
        "--no-tensorboard",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(v["epochs"], 1, "{v}");
    let summary = convnet(&[
        "summary",
        "--checkpoint",
        out.join("model.safetensors").to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&summary.stdout);
    assert!(text.contains("Input shape: [3, 28, 28]"), "{text}");

    // predict on a photo of another size and shape.
    let dir = temp("predict-resize");
    std::fs::create_dir_all(&dir).unwrap();
    let photo = dir.join("photo.png");
    image::RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
    })
    .save(&photo)
    .unwrap();
    let photo = photo.to_str().unwrap();
    let v = last_json(&convnet(&[
        "predict",
        "--pretrained",
        "resnet20-cifar10",
        photo,
        "--resize",
        "36",
        "--crop",
        "32",
        "--classes",
        "dog,cat",
        "--top-k",
        "5",
        "--json",
    ]));
    let top = v["predictions"][0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 2, "{v}");
    let total: f64 = top.iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!((total - 1.0).abs() < 1e-4, "{v}");
    for t in top {
        let (i, label) = (t["index"].as_u64().unwrap(), t["label"].as_str().unwrap());
        assert_eq!(["dog", "cat"][i as usize], label, "{v}");
    }
    fails_with(
        &[
            "predict",
            "--pretrained",
            "resnet20-cifar10",
            photo,
            "--classes",
            "cat,unicorn",
        ],
        "no class \"unicorn\"; its classes: airplane, automobile",
    );
    fails_with(
        &[
            "predict",
            "--pretrained",
            "resnet20-cifar10",
            photo,
            "--resize",
            "32",
            "--crop",
            "24",
        ],
        "--crop 24 gives 24x24 images but the model takes 32x32",
    );
}

/// Bad fine-tuning flags are errors that say what is wrong, never panics.
#[test]
fn bad_freeze_and_resize_flags_are_errors() {
    let out = temp("freeze-bad");
    let out = out.to_str().unwrap();
    fails_with(
        &["train", "--freeze", "conv1,layer9", "--out", out],
        "\"layer9\" names no parameter of the model; its top-level names: conv1, conv2, fc1, fc2",
    );
    let dir = temp("no-linear");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("all-conv.toml");
    std::fs::write(
        &file,
        "name = \"all-conv\"\n[[layer]]\ntype = \"conv2d\"\nout_channels = 10\nkernel_size = 3\n\
         [[layer]]\ntype = \"adaptive_avgpool2d\"\n[[layer]]\ntype = \"flatten\"\n",
    )
    .unwrap();
    fails_with(
        &[
            "train",
            "--model-file",
            file.to_str().unwrap(),
            "--freeze-backbone",
            "--out",
            out,
        ],
        "no Linear layer",
    );
    fails_with(
        &["train", "--resize", "24", "--crop", "32", "--out", out],
        "the crop 32 is larger than the resized shorter side 24",
    );
    fails_with(
        &["eval", "--resize", "0", "--pretrained", "seed-cnn-cifar10"],
        "sizes must be positive",
    );
    fails_with(&["train", "--crop", "32", "--out", out], "--resize");
    fails_with(
        &[
            "train",
            "--freeze-backbone",
            "--lr-backbone",
            "0.001",
            "--out",
            out,
        ],
        "the backbone is frozen",
    );
    fails_with(
        &["train", "--freeze", "conv1", "--qat", "--out", out],
        "do not combine with --qat",
    );
    fails_with(
        &["train", "--lr-backbone=-1", "--out", out],
        "--lr-backbone must be a non-negative number",
    );
}
