//! Post-training quantization of whole models: every zoo architecture and example model
//! file quantizes and runs on the int8 plan; the int8 plan agrees with the model's own
//! fake-quantized float form (same predictions on at least 99% of a batch, every logit
//! within 3 steps of the output's quantization); quantized checkpoints round-trip exactly
//! and refuse files that do not fit.

mod common;

use common::scratch::Scratch;

use convnet::data::{DataLoader, ImageDataset, Normalize};
use convnet::graph::Op;
use convnet::model_file::ModelFile;
use convnet::nn::Model;
use convnet::quant::{quantize, ObserverKind, QuantConfig, QuantizedModel};
use convnet::{Rng, Tensor};
use std::path::Path;
use std::sync::Arc;

/// Images with some structure (smooth gradients plus noise), so activations have the
/// skewed ranges of real data.
fn images(n: usize, shape: [usize; 3], seed: u64) -> ImageDataset {
    let mut rng = Rng::new(seed);
    let [c, h, w] = shape;
    let mut pixels = Vec::with_capacity(n * c * h * w);
    for i in 0..n {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let base = ((x * 255 / w.max(1)) as f32 * (0.3 + 0.2 * ch as f32)
                        + (y * 97 / h.max(1)) as f32
                        + (i * 13) as f32)
                        % 200.0;
                    pixels.push((base + rng.uniform(0.0, 55.0)) as u8);
                }
            }
        }
    }
    ImageDataset::new(
        pixels,
        (0..n).map(|i| (i % 10) as u32).collect(),
        shape,
        (0..10).map(|i| i.to_string()).collect(),
        "synthetic",
    )
    .unwrap()
}

fn loader(n: usize, shape: [usize; 3], seed: u64) -> DataLoader {
    DataLoader::for_evaluation(
        Arc::new(images(n, shape, seed)),
        Normalize::default_for(shape[0]),
    )
    .unwrap()
}

fn batch(n: usize, shape: [usize; 3], seed: u64) -> Tensor {
    let l = loader(n, shape, seed);
    l.epoch(0).next().unwrap().unwrap().images
}

/// Builds a model from the process-wide generator seeded with `seed`, holding it while it
/// does: the tests of this file run in parallel, and a model must not depend on how their
/// draws interleave (a near tie among random logits could flip otherwise).
fn seeded(seed: u64, build: impl FnOnce() -> convnet::Result<Model>) -> Model {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    convnet::manual_seed(seed);
    build().unwrap()
}

/// Checks the int8 plan against the fake-quantized float model on a batch.
fn check_against_fake_quant(q: &QuantizedModel, x: &Tensor, what: &str) {
    let int8 = q.run(x).unwrap();
    let fake = q.fake_quant(x).unwrap();
    assert_eq!(int8.dims(), fake.dims(), "{what}");
    let classes = int8.dims()[1];
    let (a, b) = (int8.to_vec(), fake.to_vec());
    // The logits' natural step: the quantization of the last int8 value feeding the
    // classifier bounds how far one rounding difference moves a logit; 3 steps of the
    // largest stored scale is generous for a tie rounded the other way.
    let step = q
        .nodes()
        .iter()
        .filter_map(|n| n.output.map(|p| p.scale))
        .fold(0f32, f32::max);
    let span = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    let mut agree = 0;
    for (ra, rb) in a.chunks(classes).zip(b.chunks(classes)) {
        let arg = |r: &[f32]| {
            r.iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .unwrap()
                .0
        };
        agree += (arg(ra) == arg(rb)) as usize;
        for (u, v) in ra.iter().zip(rb) {
            assert!(
                (u - v).abs() <= 3.0 * step.max(1e-3 * span) + 1e-4 * span,
                "{what}: logit {u} vs fake-quant {v} (step {step})"
            );
        }
    }
    let rows = a.len() / classes;
    let worst = a
        .iter()
        .zip(&b)
        .map(|(u, v)| (u - v).abs())
        .fold(0f32, f32::max);
    eprintln!("{what}: worst logit difference {worst:.2e}, step {step:.2e}, span {span:.2e}, agree {agree}/{rows}");
    assert!(
        agree * 100 >= rows * 99,
        "{what}: only {agree} of {rows} predictions agree"
    );
}

#[test]
fn every_zoo_architecture_quantizes_and_matches_its_fake_quant_form() {
    for arch in convnet::models::ARCHITECTURES
        .iter()
        .filter(|a| a.input == convnet::models::InputKind::Image)
    {
        let input = if arch.imagenet {
            [3, 64, 64]
        } else {
            <[usize; 3]>::try_from(arch.default_input).unwrap()
        };
        let model = seeded(1, || convnet::models::build(arch.name, input, 10));
        let cfg = QuantConfig {
            calibration_images: 32,
            ..Default::default()
        };
        let q = quantize(&model, &loader(32, input, 2), &cfg)
            .unwrap_or_else(|e| panic!("{}: {e}", arch.name));
        let convs = q
            .graph()
            .nodes()
            .iter()
            .filter(|n| matches!(n.op, Op::Conv2d { .. } | Op::Linear { .. }))
            .count();
        assert_eq!(
            q.int8_layers(),
            convs,
            "{}: every convolution and linear layer runs in int8",
            arch.name
        );
        assert!(q.notes().is_empty(), "{}: {:?}", arch.name, q.notes());
        check_against_fake_quant(&q, &batch(16, input, 3), arch.name);
    }
}

#[test]
fn model_files_quantize_with_float_layers_where_int8_has_no_form() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    for file in ["tutorial-cnn.toml", "small-resnet.toml", "mobile-cnn.json"] {
        let spec = ModelFile::from_path(&dir.join(file)).unwrap();
        let input = spec.input.unwrap_or([3, 32, 32]);
        let model = seeded(4, || spec.build(input, 10));
        let q = quantize(
            &model,
            &loader(32, input, 5),
            &QuantConfig {
                calibration_images: 32,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(q.int8_layers() > 0, "{file}");
        check_against_fake_quant(&q, &batch(16, input, 6), file);
    }
    // Sigmoid, GELU, an unfolded BatchNorm, softmax: float islands between int8 layers.
    let text = r#"
name = "mixed"
input = [3, 16, 16]
[[layer]]
type = "batchnorm2d"
[[layer]]
type = "conv2d"
name = "c1"
out_channels = 16
kernel_size = 3
padding = 1
[[layer]]
type = "sigmoid"
[[layer]]
type = "conv2d"
name = "c2"
out_channels = 32
kernel_size = 3
stride = 2
padding = 1
[[layer]]
type = "gelu"
[[layer]]
type = "maxpool2d"
kernel_size = 2
[[layer]]
type = "conv2d"
name = "c3"
out_channels = 16
kernel_size = 1
[[layer]]
type = "relu"
[[layer]]
type = "avgpool2d"
kernel_size = 2
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
name = "fc1"
out_features = 24
[[layer]]
type = "tanh"
[[layer]]
type = "linear"
name = "fc2"
out_features = "classes"
[[layer]]
type = "softmax"
dim = 1
"#;
    let spec = ModelFile::from_toml(text, "mixed.toml").unwrap();
    let model = seeded(8, || spec.build([3, 16, 16], 10));
    let q = quantize(
        &model,
        &loader(32, [3, 16, 16], 9),
        &QuantConfig {
            calibration_images: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let notes = q.notes().join("\n");
    for layer in [
        "0 (BatchNorm2d)",
        "(Sigmoid)",
        "(GELU)",
        "(Tanh)",
        "(Softmax)",
    ] {
        assert!(
            notes.contains(layer),
            "expected a note on {layer}:\n{notes}"
        );
    }
    // Every convolution and linear layer runs in int8; the activations between are float.
    assert_eq!(q.int8_layers(), 5, "{notes}");
    check_against_fake_quant(&q, &batch(16, [3, 16, 16], 10), "mixed");
}

#[test]
fn observers_give_usable_models() {
    let model = seeded(2, || convnet::models::build("resnet20", [3, 32, 32], 10));
    let x = batch(16, [3, 32, 32], 12);
    for observer in [
        ObserverKind::MinMax,
        ObserverKind::Histogram,
        ObserverKind::Percentile(0.999),
    ] {
        let q = quantize(
            &model,
            &loader(32, [3, 32, 32], 11),
            &QuantConfig {
                observer,
                calibration_images: 32,
            },
        )
        .unwrap();
        check_against_fake_quant(&q, &x, &observer.name());
    }
    assert!(quantize(
        &model,
        &loader(8, [3, 32, 32], 11),
        &QuantConfig {
            observer: ObserverKind::Percentile(1.5),
            calibration_images: 8
        }
    )
    .is_err());
    assert!(quantize(
        &model,
        &loader(8, [3, 32, 32], 11),
        &QuantConfig {
            calibration_images: 0,
            ..Default::default()
        }
    )
    .is_err());
}

fn quantized_resnet() -> (Model, QuantizedModel, convnet::checkpoint::CheckpointMeta) {
    let model = seeded(3, || convnet::models::build("resnet20", [3, 32, 32], 10));
    let q = quantize(
        &model,
        &loader(32, [3, 32, 32], 13),
        &QuantConfig {
            calibration_images: 32,
            ..Default::default()
        },
    )
    .unwrap();
    let meta = convnet::checkpoint::CheckpointMeta {
        architecture: "resnet20".into(),
        input_shape: [3, 32, 32],
        classes: (0..10).map(|i| i.to_string()).collect(),
        normalize: Normalize::default_for(3),
        epoch: 1,
        step: 1,
        model_spec: None,
        sequence: None,
    };
    (model, q, meta)
}

#[test]
fn quantized_checkpoints_round_trip_and_are_a_quarter_of_the_float_size() {
    let (model, q, meta) = quantized_resnet();
    let dir = Scratch::folder("quantized-round-trip");
    let path = dir.join("resnet20-int8.safetensors");
    q.save(&path, &meta).unwrap();
    let (back, meta2) = QuantizedModel::load(&path).unwrap();
    assert_eq!(meta2, meta);
    assert_eq!(back.nodes(), q.nodes());
    let x = batch(8, [3, 32, 32], 14);
    assert_eq!(back.run(&x).unwrap().to_vec(), q.run(&x).unwrap().to_vec());
    let float = dir.join("resnet20.safetensors");
    convnet::checkpoint::save_checkpoint(&float, &model.state_dict(), &meta).unwrap();
    let (a, b) = (
        std::fs::metadata(&path).unwrap().len(),
        std::fs::metadata(&float).unwrap().len(),
    );
    assert!(a * 3 < b, "int8 {a} bytes vs float {b}");
    // A float checkpoint reader names what it was given.
    let err = convnet::checkpoint::load_checkpoint(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantized checkpoint"), "{err}");
}

/// An edit of one tensor's bytes and header entry.
type Edit = Box<dyn Fn(&mut Vec<u8>, &mut serde_json::Value)>;

/// Rewrites one tensor of a safetensors file.
fn tamper(
    path: &Path,
    out: &Path,
    name: &str,
    edit: impl Fn(&mut Vec<u8>, &mut serde_json::Value),
) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut body = bytes[8 + n..].to_vec();
    let (a, b) = {
        let o = &header[name]["data_offsets"];
        (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        )
    };
    let mut data = body[a..b].to_vec();
    edit(&mut data, &mut header[name]);
    assert_eq!(data.len(), b - a, "edits keep the size");
    body[a..b].copy_from_slice(&data);
    let h = header.to_string().into_bytes();
    let mut outb = (h.len() as u64).to_le_bytes().to_vec();
    outb.extend(h);
    outb.extend(body);
    std::fs::write(out, outb).unwrap();
}

#[test]
fn quantized_checkpoints_that_do_not_fit_are_refused_with_the_reason() {
    let (_, q, meta) = quantized_resnet();
    let dir = Scratch::folder("quantized-refused");
    let path = dir.join("good.safetensors");
    q.save(&path, &meta).unwrap();
    let bad = dir.join("bad.safetensors");
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "conv1.weight_scale",
            Box::new(|d, _| d[..4].copy_from_slice(&(-1.0f32).to_le_bytes())),
            "scales must be positive",
        ),
        (
            "conv1.weight_scale",
            Box::new(|d, _| d[..4].copy_from_slice(&f32::NAN.to_le_bytes())),
            "scales must be positive",
        ),
        (
            "conv1.output_scale",
            Box::new(|d, _| d[..4].copy_from_slice(&0.0f32.to_le_bytes())),
            "invalid output quantization",
        ),
        (
            "conv1.output_zero_point",
            Box::new(|d, _| d[..4].copy_from_slice(&300i32.to_le_bytes())),
            "invalid output quantization",
        ),
        (
            "conv1.weight",
            Box::new(|_, h| h["shape"] = serde_json::json!([16, 3, 9, 1])),
            "expected shape",
        ),
    ];
    for (name, edit, want) in cases {
        tamper(&path, &bad, name, edit);
        let err = QuantizedModel::load(&bad).unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("bad.safetensors"),
            "{name}: {err}"
        );
    }
    // A missing tensor, and an extra one.
    let bytes = std::fs::read(&path).unwrap();
    let (tensors, map) = convnet::checkpoint::tensors_from_bytes(&path, &bytes).unwrap();
    let drop_one: Vec<(String, convnet::checkpoint::RawTensor)> = tensors
        .iter()
        .filter(|(n, _)| n != "fc.bias")
        .map(|(n, t)| {
            (
                n.clone(),
                convnet::checkpoint::RawTensor::f32(t.dims(), &t.to_vec()),
            )
        })
        .collect();
    convnet::checkpoint::save_raw(&bad, &drop_one, map.clone()).unwrap();
    let err = QuantizedModel::load(&bad).unwrap_err().to_string();
    assert!(err.contains("missing tensor fc.bias"), "{err}");
    let mut extra = drop_one;
    extra.push((
        "fc.bias".into(),
        convnet::checkpoint::RawTensor::f32(&[10], &[0.0; 10]),
    ));
    extra.push((
        "stowaway.weight".into(),
        convnet::checkpoint::RawTensor::f32(&[1], &[0.0]),
    ));
    convnet::checkpoint::save_raw(&bad, &extra, map).unwrap();
    let err = QuantizedModel::load(&bad).unwrap_err().to_string();
    assert!(err.contains("unexpected tensor stowaway.weight"), "{err}");
}
