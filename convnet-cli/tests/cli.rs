//! The `convnet` binary end to end: training on the bundled sample beats chance by a wide
//! margin, an interrupted run resumes to bit-identical weights, eval/predict report in JSON,
//! and user mistakes end with a message and a non-zero status, never a panic.

mod common;

use common::{convnet, fails_with, last_json, temp, tensors, Scratch};
use std::path::Path;
use std::process::Command;

#[test]
fn one_epoch_on_the_bundled_sample_beats_chance_and_the_checkpoint_evaluates() {
    let out_dir = temp("train");
    let out = convnet(&[
        "train",
        "--epochs",
        "1",
        "--threads",
        "2",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let r = last_json(&out);
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.25,
        "10 classes: chance is 0.10, one epoch should reach well above: {acc}"
    );
    assert_eq!(r["epochs"], 1);
    assert!(r["train_images_per_sec"].as_f64().unwrap() > 0.0);
    let ckpt = r["checkpoint"].as_str().unwrap().to_string();
    assert!(out_dir.join("metrics.jsonl").exists());

    let e = last_json(&convnet(&["eval", "--checkpoint", &ckpt, "--json"]));
    assert!(
        (e["accuracy"].as_f64().unwrap() - acc).abs() < 1e-9,
        "eval reproduces the training run's test accuracy"
    );
    assert_eq!(e["confusion_matrix"].as_array().unwrap().len(), 10);
    assert_eq!(e["per_class_accuracy"].as_array().unwrap().len(), 10);
    let total: u64 = e["confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 1000);

    // predict on a PNG of another size: resized to the model input.
    let img_path = out_dir.join("probe.png");
    image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 90]))
        .save(&img_path)
        .unwrap();
    let p = last_json(&convnet(&[
        "predict",
        "--checkpoint",
        &ckpt,
        img_path.to_str().unwrap(),
        "--top-k",
        "3",
        "--json",
    ]));
    let top = p["predictions"][0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    let probs: Vec<f64> = top
        .iter()
        .map(|t| t["probability"].as_f64().unwrap())
        .collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]) && probs[0] <= 1.0);
    assert!(top[0]["label"].is_string());

    // A second train into the same folder must not overwrite the run silently.
    fails_with(
        &[
            "train",
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        "--resume",
    );
}

/// `convnet train` with `common` then `extra` arguments; its JSON result.
fn train_json(common: &[&str], extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["train"];
    args.extend_from_slice(common);
    args.extend_from_slice(extra);
    last_json(&convnet(&args))
}

#[test]
fn resumed_run_matches_an_uninterrupted_one_bit_for_bit() {
    let (full, part) = (temp("full"), temp("part"));
    let common = [
        "--limit-train",
        "640",
        "--limit-test",
        "128",
        "--threads",
        "2",
        "--augment",
        "--seed",
        "5",
        "--schedule",
        "cosine",
        "--epochs",
        "2",
        "--json",
    ];
    let run = |extra: &[&str]| train_json(&common, extra);
    run(&["--out", full.to_str().unwrap()]);
    // The same run, interrupted after epoch 1 of 2, then continued.
    let r = run(&["--out", part.to_str().unwrap(), "--stop-after", "1"]);
    assert_eq!(r["epochs"], 1);
    let r = last_json(&convnet(&[
        "train",
        "--resume",
        part.to_str().unwrap(),
        "--epochs",
        "2",
        "--json",
    ]));
    assert_eq!(r["epochs"], 2);
    let (a, b) = (
        tensors(&part.join("model.safetensors")),
        tensors(&full.join("model.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let differing: Vec<&str> = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| x.0.as_str())
        .collect();
    assert!(
        differing.is_empty(),
        "tensors that differ after resume: {differing:?}"
    );
}

#[test]
fn averaged_weights_resume_exactly_and_their_checkpoint_evaluates() {
    for (flag, value, file) in [
        ("--swa-start", "2", "model-swa.safetensors"),
        ("--ema-decay", "0.9", "model-ema.safetensors"),
    ] {
        let (full, part) = (temp("avg-full"), temp("avg-part"));
        let common = [
            "--model",
            "resnet20",
            "--limit-train",
            "320",
            "--limit-test",
            "128",
            "--batch-size",
            "64",
            "--lr",
            "0.05",
            "--threads",
            "2",
            "--augment",
            "--epochs",
            "3",
            flag,
            value,
            "--json",
        ];
        let run = |extra: &[&str]| train_json(&common, extra);
        let r = run(&["--out", full.to_str().unwrap()]);
        let averaged = r["averaged_test_accuracy"]
            .as_f64()
            .expect("averaged accuracy");
        assert_eq!(
            r["averaged_checkpoint"].as_str().unwrap(),
            full.join(file).to_str().unwrap()
        );
        // Interrupted after epoch 2 (SWA has averaged one epoch), then continued.
        run(&["--out", part.to_str().unwrap(), "--stop-after", "2"]);
        last_json(&convnet(&[
            "train",
            "--resume",
            part.to_str().unwrap(),
            "--json",
        ]));
        for name in ["model.safetensors", file] {
            assert!(
                tensors(&part.join(name)) == tensors(&full.join(name)),
                "{flag}: {name} differs after resume"
            );
        }
        let e = last_json(&convnet(&[
            "eval",
            "--checkpoint",
            full.join(file).to_str().unwrap(),
            "--limit-test",
            "128",
            "--json",
        ]));
        assert!(
            (e["accuracy"].as_f64().unwrap() - averaged).abs() < 1e-9,
            "{flag}: eval reproduces the averaged model's test accuracy"
        );
    }
    fails_with(
        &["train", "--epochs", "2", "--swa-start", "3"],
        "--swa-start must be an epoch of the run",
    );
    fails_with(
        &["train", "--ema-decay", "1"],
        "--ema-decay must be in [0, 1)",
    );
}

/// The scalars of a run's TensorBoard event files: (tag, step, value) of every one.
fn event_scalars(path: &Path) -> Vec<(String, i64, f32)> {
    use convnet::tensorboard::proto::{Kind, What};
    let events = convnet::tensorboard::read_events(path).unwrap();
    let mut out = Vec::new();
    for e in events {
        if let Some(What::Summary(s)) = e.what {
            for v in s.value {
                if let Some(Kind::SimpleValue(x)) = v.value {
                    out.push((v.tag, e.step, x));
                }
            }
        }
    }
    out
}

fn event_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("tfevents")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn tensorboard_events_follow_the_metrics_and_a_resumed_run_adds_a_file() {
    let dir = temp("tensorboard");
    let common = [
        "--limit-train",
        "256",
        "--limit-test",
        "64",
        "--batch-size",
        "32",
        "--threads",
        "2",
        "--epochs",
        "2",
        "--tensorboard-every",
        "3",
        "--json",
    ];
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--stop-after", "1"];
    args.extend_from_slice(&common);
    last_json(&convnet(&args));
    let first = event_files(&dir);
    assert_eq!(first.len(), 1, "one event file: {first:?}");
    let before = std::fs::read(&first[0]).unwrap();
    last_json(&convnet(&[
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--tensorboard-every",
        "3",
        "--json",
    ]));
    let files = event_files(&dir);
    assert_eq!(files.len(), 2, "the resumed run adds a file: {files:?}");
    assert_eq!(
        std::fs::read(&first[0]).unwrap(),
        before,
        "the first file is left as it was"
    );
    let scalars: Vec<_> = files.iter().flat_map(|f| event_scalars(f)).collect();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), 2);
    for (key, tag) in [
        ("train_loss", "train/loss"),
        ("train_accuracy", "train/accuracy"),
        ("test_loss", "test/loss"),
        ("test_accuracy", "test/accuracy"),
        ("lr", "lr"),
        ("train_images_per_sec", "train/images_per_sec"),
    ] {
        let points: Vec<(i64, f32)> = scalars
            .iter()
            .filter(|s| s.0 == tag)
            .map(|s| (s.1, s.2))
            .collect();
        let want: Vec<(i64, f32)> = metrics
            .iter()
            .map(|m| {
                (
                    m["epoch"].as_i64().unwrap(),
                    m[key].as_f64().unwrap() as f32,
                )
            })
            .collect();
        assert_eq!(points, want, "{tag}");
    }
    // 8 steps per epoch: points at steps 3, 6 (epoch 1), 9, 12, 15 (epoch 2).
    let steps: Vec<i64> = scalars
        .iter()
        .filter(|s| s.0 == "train/loss_step")
        .map(|s| s.1)
        .collect();
    assert_eq!(steps, [3, 6, 9, 12, 15]);

    let quiet = temp("no-tensorboard");
    let mut args = vec![
        "train",
        "--out",
        quiet.to_str().unwrap(),
        "--no-tensorboard",
    ];
    args.extend_from_slice(&common);
    last_json(&convnet(&args));
    assert!(event_files(&quiet).is_empty());
    fails_with(
        &["train", "--tensorboard-every", "0"],
        "--tensorboard-every",
    );
}

#[test]
fn mistakes_end_with_a_message_and_a_non_zero_status() {
    fails_with(
        &["train", "--data", "/definitely/not/here"],
        "/definitely/not/here",
    );
    fails_with(
        &["train", "--model", "vgg99", "--epochs", "1"],
        "unknown model",
    );
    #[cfg(not(feature = "cuda"))]
    fails_with(
        &["train", "--device", "cuda", "--epochs", "1"],
        "built without CUDA",
    );
    fails_with(&["train", "--epochs", "0"], "must be positive");
    fails_with(&["eval"], "--checkpoint");
    fails_with(
        &["eval", "--checkpoint", "/no/such.safetensors"],
        "/no/such.safetensors",
    );
    fails_with(
        &["summary", "--model", "seed-cnn", "--input", "3x32"],
        "seed-cnn takes images [C, H, W], not an input of shape [3, 32]",
    );
    fails_with(
        &["summary", "--model", "lenet5", "--input", "3x8x8"],
        "lenet5 cannot take 8x8 images",
    );
    fails_with(&["train", "--resume", "/no/run/dir"], "no training state");
    let diverge = temp("diverge");
    fails_with(
        &[
            "train",
            "--lr",
            "1e12",
            "--epochs",
            "1",
            "--limit-train",
            "512",
            "--limit-test",
            "64",
            "--out",
            diverge.to_str().unwrap(),
        ],
        "training diverged",
    );
    let dir = temp("notimg");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("a.jpg");
    std::fs::write(&f, b"not an image").unwrap();
    fails_with(
        &[
            "predict",
            "--model",
            "seed-cnn",
            "--weights",
            "/no/w.safetensors",
            f.to_str().unwrap(),
        ],
        "/no/w.safetensors",
    );
    let predict = |path: &Path| {
        let args = ["predict", "--pretrained", "resnet20-cifar10"];
        let out = convnet(&[&args[..], &[path.to_str().unwrap()]].concat());
        assert!(!out.status.success(), "{path:?} should not be classified");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(predict(&dir).contains("is a folder: give its image files"));
    // A truncated JPEG: the decoder's message appears once, not again as its own cause.
    let jpeg = b"\xff\xd8\xff\xdb\x00\x43\x00\x08\x06";
    std::fs::write(&f, jpeg).unwrap();
    let stderr = predict(&f);
    assert!(stderr.contains("a.jpg: not a readable image"), "{stderr}");
    let causes: Vec<&str> = stderr.lines().filter(|l| l.contains("caused by")).collect();
    assert_eq!(causes.len(), 1, "{stderr}");
}

#[test]
fn summary_and_models_describe_the_zoo() {
    let out = convnet(&["models"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for name in ["seed-cnn", "lenet5", "resnet20", "545098", "269722"] {
        assert!(s.contains(name), "{name} in {s}");
    }
    let out = convnet(&["summary", "--model", "seed-cnn", "--input", "1x28x28"]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("fc1 (Linear)") && s.contains("[1, 3136]"), "{s}");
}

#[test]
fn a_state_dict_exported_from_pytorch_predicts_like_pytorch() {
    // tools/fixtures/gen.py saved a PyTorch LeNet-5 state_dict and its logits on a probe image.
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../convnet/tests/fixtures");
    let weights = fixtures.join("torch_lenet5_state_dict.safetensors");
    let probe = std::fs::read(fixtures.join("torch_lenet5_probe.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&probe).unwrap();
    let expected: Vec<f32> = st
        .tensor("lenet5_probe/probs")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let dir = temp("torch-weights");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("probe.png");
    image::RgbImage::from_fn(32, 32, |x, y| {
        let px = |c: u32| ((7 * (c * 1024 + y * 32 + x)) % 256) as u8;
        image::Rgb([px(0), px(1), px(2)])
    })
    .save(&img)
    .unwrap();
    let p = last_json(&convnet(&[
        "predict",
        "--model",
        "lenet5",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        "3x32x32",
        img.to_str().unwrap(),
        "--top-k",
        "10",
        "--json",
    ]));
    for t in p["predictions"][0]["top"].as_array().unwrap() {
        let (i, prob) = (
            t["index"].as_u64().unwrap() as usize,
            t["probability"].as_f64().unwrap() as f32,
        );
        assert!(
            (prob - expected[i]).abs() < 1e-5,
            "class {i}: convnet {prob}, PyTorch {}",
            expected[i]
        );
    }
    // The same weights evaluate on the bundled sample (10 classes, 3x32x32).
    let e = last_json(&convnet(&[
        "eval",
        "--model",
        "lenet5",
        "--weights",
        weights.to_str().unwrap(),
        "--limit-test",
        "200",
        "--json",
    ]));
    assert!(e["accuracy"].as_f64().unwrap() >= 0.0);
    // Weights for another architecture are refused with the reason.
    fails_with(
        &[
            "eval",
            "--model",
            "seed-cnn",
            "--weights",
            weights.to_str().unwrap(),
        ],
        "is not a state_dict of seed-cnn",
    );
}

#[test]
fn a_model_file_trains_and_its_checkpoint_works_without_the_file() {
    let dir = temp("model-file");
    std::fs::create_dir_all(&dir).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let file = dir.join("net.toml");
    std::fs::copy(examples.join("tutorial-cnn.toml"), &file).unwrap();
    let run = dir.join("run");
    let t = last_json(&convnet(&[
        "train",
        "--model-file",
        file.to_str().unwrap(),
        "--epochs",
        "1",
        "--limit-train",
        "300",
        "--limit-test",
        "100",
        "--out",
        run.to_str().unwrap(),
        "--json",
    ]));
    std::fs::remove_file(&file).unwrap();
    let ckpt = run.join("model.safetensors");
    let e = last_json(&convnet(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--limit-test",
        "100",
        "--json",
    ]));
    assert_eq!(e["accuracy"], t["test_accuracy"]);
    let onnx = run.join("model.onnx");
    let out = convnet(&[
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--onnx",
        onnx.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::metadata(&onnx).unwrap().len() > 4 * 545_098);
    let out = convnet(&[
        "summary",
        "--model-file",
        examples.join("small-resnet.toml").to_str().unwrap(),
    ]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("block2.downsample.0 (Conv2d)"), "{s}");
    fails_with(
        &["summary", "--model-file", "no/such/net.toml"],
        "no/such/net.toml",
    );
    fails_with(
        &["export", "--model", "seed-cnn", "--random-init"],
        "--onnx FILE and/or --state-dict FILE",
    );
}

#[test]
fn pytorch_pt_files_load_through_the_cli_and_code_in_them_never_runs() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../convnet/tests/fixtures/pt");
    let dir = temp("pt");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([((x * 9 + y * 5) % 256) as u8]))
        .save(&img)
        .unwrap();
    for file in ["lenet5_state_dict.pt", "lenet5_checkpoint.pth"] {
        let p = last_json(&convnet(&[
            "predict",
            "--model",
            "lenet5",
            "--weights",
            fixtures.join(file).to_str().unwrap(),
            img.to_str().unwrap(),
            "--top-k",
            "10",
            "--json",
        ]));
        let top = p["predictions"][0]["top"].as_array().unwrap();
        let total: f64 = top.iter().map(|t| t["probability"].as_f64().unwrap()).sum();
        assert_eq!(top.len(), 10);
        assert!(
            (total - 1.0).abs() < 1e-5,
            "{file}: probabilities sum to {total}"
        );
    }
    fails_with(
        &[
            "predict",
            "--model",
            "lenet5",
            "--weights",
            fixtures.join("runs_code.pt").to_str().unwrap(),
            img.to_str().unwrap(),
        ],
        "refusing to load",
    );
}

/// Accuracy a shipped checkpoint may differ from its recorded score on the bundled sample:
/// two of its 1,000 test images (the run is deterministic; this allows a near-tie to flip
/// under another CPU's rounding).
const PRETRAINED_MARGIN: f64 = 0.002;

#[test]
fn shipped_pretrained_models_reproduce_their_recorded_accuracy_offline() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../pretrained/manifest.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let entries = manifest.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let dir = temp("pretrained");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("plane.png");
    image::RgbImage::from_fn(48, 40, |x, y| {
        image::Rgb([120, 160 + (y % 40) as u8, 220 - (x % 60) as u8])
    })
    .save(&img)
    .unwrap();
    for e in entries {
        let name = e["name"].as_str().unwrap();
        let want = e["sample_test_accuracy"].as_f64().unwrap();
        let got = last_json(&convnet(&["eval", "--pretrained", name, "--json"]));
        let acc = got["accuracy"].as_f64().unwrap();
        assert!(
            (acc - want).abs() <= PRETRAINED_MARGIN,
            "{name}: {acc} on the bundled sample, recorded {want}"
        );
        assert!(
            e["cifar10_test_accuracy"].as_f64().unwrap() > 0.6,
            "{name}: recorded CIFAR-10 accuracy"
        );
        let p = last_json(&convnet(&[
            "predict",
            "--pretrained",
            name,
            img.to_str().unwrap(),
            "--json",
        ]));
        assert_eq!(p["predictions"][0]["top"].as_array().unwrap().len(), 3);
    }
    fails_with(
        &["eval", "--pretrained", "resnet99-imagenet"],
        "no pretrained model \"resnet99-imagenet\"; available: seed-cnn-cifar10, resnet20-cifar10",
    );
}

/// With the `cuda` feature on a machine without the NVIDIA driver, asking for a GPU is a
/// readable error (cudarc's loader would panic; convnet probes first). On a machine with a
/// GPU the driver is found on the loader's path and the run trains on it.
#[cfg(feature = "cuda")]
#[test]
fn cuda_build_without_a_driver_says_why_instead_of_panicking() {
    let out = Command::new(env!("CARGO_BIN_EXE_convnet"))
        .args(["train", "--device", "cuda:0", "--epochs", "1"])
        .env("CONVNET_CUDA_LIB_DIR", "/nonexistent-cuda-libs")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if stderr.contains("CUDA unavailable") {
        assert!(!out.status.success());
        assert!(
            stderr.contains("cannot load the NVIDIA driver library libcuda.so.1")
                && stderr.contains("CONVNET_CUDA_LIB_DIR"),
            "{stderr}"
        );
    } else {
        assert!(out.status.success(), "{stderr}");
    }
    fails_with(
        &["train", "--device", "cuda:7", "--epochs", "1"],
        "CUDA unavailable",
    );
}

/// `convnet train ARGS --out <fresh folder named TAG> --json`: the final JSON line, the
/// per-epoch metrics lines and what the run printed on stderr.
/// A finished training run: its last JSON line, the epochs of `metrics.jsonl`, its stderr,
/// and its folder (removed when this is dropped). The epochs and stderr are read by the
/// emulated-GPU tests.
#[cfg_attr(not(feature = "cuda-emulator"), allow(dead_code))]
struct Trained {
    result: serde_json::Value,
    epochs: Vec<serde_json::Value>,
    stderr: String,
    _folder: Scratch,
}

fn train_run(tag: &str, args: &[&str]) -> Trained {
    let out_dir = temp(tag);
    let mut all = vec!["train"];
    all.extend_from_slice(args);
    all.extend(["--out", out_dir.to_str().unwrap(), "--json"]);
    let out = convnet(&all);
    let r = last_json(&out);
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let epochs = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    Trained {
        result: r,
        epochs,
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        _folder: out_dir,
    }
}

/// The whole training command on the GPU code path (the CUDA kernels run by the host
/// emulator): model and batches moved to the device, training, evaluation, checkpoint. It
/// follows the CPU run of the same seed: nearly the same test loss and accuracy.
#[cfg(feature = "cuda-emulator")]
#[test]
fn training_on_the_emulated_gpu_follows_the_cpu_run() {
    let run = |device: &str| {
        let args = [
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--limit-test",
            "200",
            "--device",
            device,
        ];
        train_run(&format!("train-{}", device.replace(':', "-")), &args)
    };
    let (cpu_run, gpu_run) = (run("cpu"), run("cuda:1000"));
    let (cpu, cpu_epochs) = (&cpu_run.result, &cpu_run.epochs);
    let (gpu, gpu_epochs) = (&gpu_run.result, &gpu_run.epochs);
    let (cl, gl) = (
        cpu["test_loss"].as_f64().unwrap(),
        gpu["test_loss"].as_f64().unwrap(),
    );
    assert!(
        (cl - gl).abs() < 1e-4 * cl.abs(),
        "test loss: cpu {cl}, emulated gpu {gl}"
    );
    let (ca, ga) = (
        cpu["test_accuracy"].as_f64().unwrap(),
        gpu["test_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (ca - ga).abs() <= 0.01,
        "test accuracy: cpu {ca}, emulated gpu {ga}"
    );
    // The epoch's running training figures, kept on the device and read back every few
    // steps, agree with the host's.
    let (cm, gm) = (
        &cpu_epochs[cpu_epochs.len() - 1],
        &gpu_epochs[gpu_epochs.len() - 1],
    );
    let (ct, gt) = (
        cm["train_loss"].as_f64().unwrap(),
        gm["train_loss"].as_f64().unwrap(),
    );
    assert!(
        (ct - gt).abs() < 1e-4 * ct.abs(),
        "train loss: cpu {ct}, emulated gpu {gt}"
    );
    let (ca, ga) = (
        cm["train_accuracy"].as_f64().unwrap(),
        gm["train_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (ca - ga).abs() <= 0.01,
        "train accuracy: cpu {ca}, emulated gpu {ga}"
    );
    // The checkpoint written from device tensors evaluates (on the CPU, whole test set) like
    // the one written by the CPU run.
    let eval = |r: &serde_json::Value| {
        let ckpt = r["checkpoint"].as_str().unwrap();
        last_json(&convnet(&["eval", "--checkpoint", ckpt, "--json"]))["accuracy"]
            .as_f64()
            .unwrap()
    };
    let (ce, ge) = (eval(cpu), eval(gpu));
    assert!(
        (ce - ge).abs() <= 0.01,
        "eval accuracy: cpu {ce}, emulated gpu {ge}"
    );
}

/// `--cuda-graph` on the emulated GPU: the step captured once and replayed gives the very
/// numbers of eager steps (same kernels, same order), and a model whose step cannot be
/// captured (dropout draws its mask on the host) says so and trains eagerly.
#[cfg(feature = "cuda-emulator")]
#[test]
fn a_captured_training_step_on_the_emulated_gpu_replays_eager_steps_exactly() {
    let run = |extra: &[&str], tag: &str| {
        let mut args = vec![
            "--epochs",
            "2",
            "--limit-train",
            "200",
            "--limit-test",
            "100",
            "--batch-size",
            "32",
            "--device",
            "cuda:1000",
        ];
        args.extend_from_slice(extra);
        train_run(&format!("graph-{tag}"), &args)
    };
    let (eager_run, graph_run) = (run(&[], "eager"), run(&["--cuda-graph"], "graph"));
    let (eager, eager_epochs) = (&eager_run.result, &eager_run.epochs);
    let (graph, graph_epochs, stderr) = (&graph_run.result, &graph_run.epochs, &graph_run.stderr);
    assert!(!stderr.contains("without a CUDA graph"), "{stderr}");
    for (e, g) in eager_epochs.iter().zip(graph_epochs) {
        for key in ["train_loss", "train_accuracy", "test_loss", "test_accuracy"] {
            assert_eq!(
                e[key], g[key],
                "{key}: eager {} vs graph {}",
                e[key], g[key]
            );
        }
    }
    assert_eq!(
        tensors(Path::new(eager["checkpoint"].as_str().unwrap())),
        tensors(Path::new(graph["checkpoint"].as_str().unwrap())),
        "bit-identical weights and BatchNorm state"
    );
    // AdamW with a cosine schedule: the replays advance Adam's step counts and follow the
    // learning rate, so again the same numbers as eager steps.
    let adam = [
        "--optimizer",
        "adamw",
        "--lr",
        "0.001",
        "--schedule",
        "cosine",
    ];
    let eager_run = run(&adam, "adam-eager");
    let mut with_graph = adam.to_vec();
    with_graph.push("--cuda-graph");
    let graph_run = run(&with_graph, "adam-graph");
    let (eager, eager_epochs) = (&eager_run.result, &eager_run.epochs);
    let (graph, graph_epochs, stderr) = (&graph_run.result, &graph_run.epochs, &graph_run.stderr);
    assert!(!stderr.contains("without a CUDA graph"), "{stderr}");
    for (e, g) in eager_epochs.iter().zip(graph_epochs) {
        assert_eq!(e["train_loss"], g["train_loss"], "adam train loss");
        assert_eq!(e["test_loss"], g["test_loss"], "adam test loss");
    }
    let state = |r: &serde_json::Value| {
        let dir = Path::new(r["checkpoint"].as_str().unwrap())
            .parent()
            .unwrap()
            .to_path_buf();
        tensors(&dir.join("train_state.safetensors"))
    };
    assert_eq!(state(eager), state(graph), "Adam moments and step counts");

    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/small-resnet.toml");
    let out_dir = temp("graph-dropout");
    let out = convnet(&[
        "train",
        "--model-file",
        file.to_str().unwrap(),
        "--epochs",
        "1",
        "--limit-train",
        "64",
        "--limit-test",
        "32",
        "--batch-size",
        "16",
        "--device",
        "cuda:1000",
        "--cuda-graph",
        "--out",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    last_json(&out);
    assert!(
        stderr.contains("without a CUDA graph") && stderr.contains("cannot be captured"),
        "{stderr}"
    );
}

/// `--precision bf16` on the emulated GPU trains close to float32 (bfloat16 operands of
/// convolutions and linear layers, float32 accumulation and weights), its steps capture
/// and replay exactly, and on the CPU it is refused with a reason.
#[cfg(feature = "cuda-emulator")]
#[test]
fn bfloat16_training_on_the_emulated_gpu_tracks_float32() {
    let run = |extra: &[&str], tag: &str| {
        let mut args = vec![
            "--epochs",
            "1",
            "--limit-train",
            "256",
            "--limit-test",
            "200",
            "--batch-size",
            "32",
            "--device",
            "cuda:1000",
        ];
        args.extend_from_slice(extra);
        train_run(&format!("bf16-{tag}"), &args)
    };
    let (f32_trained, bf16_trained) = (run(&[], "f32"), run(&["--precision", "bf16"], "bf16"));
    let (f32_run, bf16) = (&f32_trained.result, &bf16_trained.result);
    let bf16_graph_run = run(&["--precision", "bf16", "--cuda-graph"], "bf16-graph");
    let bf16_graph = &bf16_graph_run.result;
    let loss = |r: &serde_json::Value| r["test_loss"].as_f64().unwrap();
    assert_ne!(
        loss(f32_run),
        loss(bf16),
        "bfloat16 arithmetic is not float32's"
    );
    assert!(
        (loss(f32_run) - loss(bf16)).abs() < 0.05 * loss(f32_run),
        "test loss: float32 {}, bfloat16 {}",
        loss(f32_run),
        loss(bf16)
    );
    assert_eq!(
        loss(bf16),
        loss(bf16_graph),
        "captured bfloat16 steps replay exactly"
    );
}

/// One epoch of 512 sample images in batches of 32, tested on 300: training runs that
/// compare two settings.
const SHORT_RUN: [&str; 8] = [
    "--epochs",
    "1",
    "--limit-train",
    "512",
    "--limit-test",
    "300",
    "--batch-size",
    "32",
];

/// `--kernels`: the rules (Winograd where it pays), the measured choices and the direct
/// kernel train to nearly the same loss, their sums differing only in rounding (over a few
/// steps often below the weights' own rounding); a name that is not a choice is refused
/// with the choices.
#[test]
fn kernel_choices_train_alike() {
    let run = |kernels: &str| {
        let mut args = SHORT_RUN.to_vec();
        args.extend(["--kernels", kernels]);
        train_run(&format!("kernels-{kernels}"), &args).result["test_loss"]
            .as_f64()
            .unwrap()
    };
    let (rules, measured, direct) = (run("rules"), run("measured"), run("direct"));
    for other in [measured, direct] {
        assert!(
            (other - rules).abs() < 0.02 * rules,
            "test loss: rules {rules}, measured {measured}, direct {direct}"
        );
    }
    fails_with(&["train", "--kernels", "fastest"], "rules");
}

/// `--precision bf16` on the CPU (AVX512-BF16 or AMX-BF16) trains close to float32 and its
/// checkpoint evaluates as usual; `bench` times it; where the CPU lacks the
/// instructions it is refused with the reason.
#[test]
fn bfloat16_training_on_the_cpu_tracks_float32() {
    let run = |extra: &[&str], tag: &str| {
        let mut args = SHORT_RUN.to_vec();
        args.extend_from_slice(extra);
        train_run(&format!("cpu-bf16-{tag}"), &args)
    };
    let out = Command::new(env!("CARGO_BIN_EXE_convnet"))
        .args([
            "bench",
            "--precision",
            "bf16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(stderr.contains("AVX512-BF16"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        return;
    }
    assert_eq!(last_json(&out)["precision"], "bf16");
    fails_with(
        &["bench", "--precision", "bf16", "--mode", "infer"],
        "inference runs in float32",
    );
    let (f32_trained, bf16_trained) = (run(&[], "f32"), run(&["--precision", "bf16"], "bf16"));
    let (f32_run, bf16) = (&f32_trained.result, &bf16_trained.result);
    let loss = |r: &serde_json::Value| r["test_loss"].as_f64().unwrap();
    assert_ne!(
        loss(f32_run),
        loss(bf16),
        "bf16 arithmetic is not float32's"
    );
    assert!(
        (loss(f32_run) - loss(bf16)).abs() < 0.05 * loss(f32_run),
        "test loss: float32 {}, bf16 {}",
        loss(f32_run),
        loss(bf16)
    );
    let e = last_json(&convnet(&[
        "eval",
        "--checkpoint",
        bf16["checkpoint"].as_str().unwrap(),
        "--json",
    ]));
    // Float32 weights: the checkpoint evaluates like any other (on the whole test set).
    assert!(
        e["accuracy"].as_f64().unwrap() > 0.15,
        "chance is 0.10: {e}"
    );
}

/// A binary built without MPI support that finds itself started by an MPI launcher (Open
/// MPI's `OMPI_COMM_WORLD_SIZE`, Hydra's and Slurm's `PMI_SIZE`) refuses to train N copies
/// and says how to build one that can; a launcher of one process changes nothing.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_mpi_support_a_launched_process_says_how_to_build_one() {
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        let out = Command::new(env!("CARGO_BIN_EXE_convnet"))
            .args(["train", "--epochs", "1"])
            .env(var, "4")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}: {stderr}");
        assert!(
            stderr.contains("one of 4") && stderr.contains("--features mpi"),
            "{var}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_convnet"))
        .arg("models")
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn bench_machine_describes_the_cpu() {
    let out = convnet(&[
        "bench",
        "--machine",
        "--threads",
        "2",
        "--model",
        "resnet20",
        "--batch-size",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let m = last_json(&out);
    let class = m["class"].as_str().unwrap();
    let ext: Vec<&str> = m["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let peaks = |key: &str| -> Vec<(u64, f64)> {
        m[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["threads"].as_u64().unwrap(),
                    p["gflops"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    // The class follows the extensions and the measured peaks.
    match class {
        "full-width AVX-512" | "half-rate AVX-512" => {
            assert!(ext.contains(&"avx512f"));
            let (wide, narrow) = (peaks("peak_avx512"), peaks("peak_avx2"));
            assert_eq!(wide.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2]);
            assert!(wide.iter().chain(&narrow).all(|p| p.1 > 0.0), "{m}");
            assert_eq!(
                class == "full-width AVX-512",
                wide[0].1 >= 1.5 * narrow[0].1,
                "{m}"
            );
        }
        "AVX2" => assert!(ext.contains(&"avx2") && !ext.contains(&"avx512f")),
        other => assert_eq!(other, "portable"),
    }
    assert!(
        m["float_kernels"].as_str().unwrap().contains("tiles"),
        "{m}"
    );
    // bf16 training follows the extensions.
    let bf16 = m["bf16_kernels"].as_str().unwrap();
    match (ext.contains(&"amx-bf16"), ext.contains(&"avx512bf16")) {
        (_, false) => assert!(bf16.starts_with("none"), "{m}"),
        (true, true) => assert!(bf16.contains("AMX") || bf16.contains("vdpbf16ps"), "{m}"),
        (false, true) => assert!(bf16.contains("vdpbf16ps"), "{m}"),
    }
    // One measured training step: each pass of resnet20's convolutions with more than one
    // kernel for it lists their times, the rule's kernel and the one chosen among them.
    let choices = m["kernel_choices"].as_array().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for c in choices {
        let ms = c["ms"].as_object().unwrap();
        assert!(ms.len() >= 2, "{c}");
        assert!(ms.values().all(|t| t.as_f64().unwrap() > 0.0), "{c}");
        for key in ["chosen", "rule"] {
            assert!(ms.contains_key(c[key].as_str().unwrap()), "{c}");
        }
        assert!(text.contains(c["convolution"].as_str().unwrap()), "{text}");
    }
    if ext.contains(&"avx512f") {
        // The first convolution's forward and weight gradient (no input gradient), and the
        // 32-channel layer's three passes, Winograd a candidate of each.
        let of = |conv: &str| -> Vec<&serde_json::Value> {
            choices
                .iter()
                .filter(|c| c["convolution"].as_str().unwrap().starts_with(conv))
                .collect()
        };
        let passes = |conv: &str| -> Vec<&str> {
            let mut p: Vec<&str> = of(conv)
                .iter()
                .map(|c| c["pass"].as_str().unwrap())
                .collect();
            p.sort();
            p
        };
        assert_eq!(
            passes("conv2d [4, 3, 32, 32]"),
            ["forward", "weight grad"],
            "{m}"
        );
        let stage2 = "conv2d [4, 32, 16, 16] w[32, 32, 3, 3]";
        assert_eq!(
            passes(stage2),
            ["forward", "input grad", "weight grad"],
            "{m}"
        );
        let winograd = of(stage2)
            .iter()
            .filter(|c| c["ms"].get("Winograd").is_some())
            .count();
        assert_eq!(winograd, 3, "{m}");
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    // `convnet models | head -1`: the reader goes away after the first line. The command
    // must stop without a panic message (a `println!` into a closed pipe panics unless
    // SIGPIPE has its default disposition).
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_convnet"))
        .arg("models")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The pipe's read end is closed here; the child may or may not have written it all.
    assert!(first.contains("name"), "{first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}
