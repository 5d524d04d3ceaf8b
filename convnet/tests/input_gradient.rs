//! Input gradients of the compiled plan (`infer::gradient`) against the recorded autograd
//! path (`graph::capture`, itself checked against PyTorch in explain_vs_torch.rs): zoo
//! models and every layer kind of model files the plan covers.

use convnet::graph::capture::LayerCapture;
use convnet::infer::gradient::InputGradient;
use convnet::model_file::ModelFile;
use convnet::nn::Model;
use convnet::{Rng, Tensor};

/// Both paths on `n` random images with targets `0, 1, ...`: outputs within 1e-5 and
/// gradients within 1e-4 of the largest gradient (float32 summation order differs).
fn check(model: &Model, n: usize, what: &str) {
    let mut dims = vec![n];
    dims.extend_from_slice(model.input_shape());
    let x = Tensor::randn(dims, &mut Rng::new(7));
    let fast = InputGradient::new(model).unwrap_or_else(|e| panic!("{what}: {e}"));
    let classes = *model.output_shape().dims().last().unwrap();
    let targets: Vec<usize> = (0..n).map(|i| i % classes).collect();
    let (out, grad) = fast.run(&x, &targets).unwrap();
    let run = LayerCapture::new(model, "input")
        .unwrap()
        .forward(&x)
        .unwrap();
    let want_out = run.output.to_vec();
    let want = run.gradient(&targets).unwrap().to_vec();
    for (a, b) in out.to_vec().iter().zip(&want_out) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}: output {a} vs {b}"
        );
    }
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: a zero gradient tests nothing");
    let got = grad.to_vec();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "{what}: worst gradient difference {worst:e} (largest gradient {scale:e})"
    );
}

#[test]
fn zoo_models_match_the_recorded_backward() {
    for (name, shape) in [
        ("seed-cnn", [3, 32, 32]),
        ("lenet5", [1, 28, 28]),
        ("resnet20", [3, 32, 32]),
        ("vgg11-bn", [3, 32, 32]),
        ("resnet18", [3, 64, 64]),
    ] {
        convnet::manual_seed(3);
        let model = convnet::models::build(name, shape, 10).unwrap();
        check(&model, 3, name);
    }
}

#[test]
fn every_covered_layer_kind_of_model_files_matches() {
    // Unfolded BatchNorm, 5x5 stride-2 and dilated convolutions, ceil-mode max pooling,
    // padded average pooling (counted and not), ReLU6, leaky ReLU, sigmoid, a 1x1 stride-2
    // convolution, and tanh after flatten.
    let text = r#"
name = "kinds"
input = [3, 19, 23]
[[layer]]
type = "batchnorm2d"
[[layer]]
type = "conv2d"
out_channels = 20
kernel_size = 5
stride = 2
padding = 2
[[layer]]
type = "relu6"
[[layer]]
type = "maxpool2d"
kernel_size = 3
stride = 2
ceil_mode = true
[[layer]]
type = "conv2d"
out_channels = 33
kernel_size = 3
padding = 2
dilation = 2
[[layer]]
type = "leaky_relu"
negative_slope = 0.2
[[layer]]
type = "avgpool2d"
kernel_size = 3
stride = 1
padding = 1
count_include_pad = false
[[layer]]
type = "conv2d"
out_channels = 7
kernel_size = 1
stride = 2
[[layer]]
type = "sigmoid"
[[layer]]
type = "avgpool2d"
kernel_size = 2
padding = 1
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
out_features = 17
[[layer]]
type = "tanh"
[[layer]]
type = "linear"
out_features = "classes"
"#;
    let spec = ModelFile::from_toml(text, "kinds.toml").unwrap();
    convnet::manual_seed(9);
    let model = spec.build([3, 19, 23], 5).unwrap();
    // Running statistics that are not the identity, so the folded BatchNorm matters.
    let mut rng = Rng::new(4);
    for (name, t) in model.state_dict() {
        if name.ends_with("running_var") || name.ends_with("running_mean") {
            let v = Tensor::rand_uniform([t.numel()], 0.5, 1.5, &mut rng).to_vec();
            t.copy_from_slice(&v).unwrap();
        }
    }
    check(&model, 4, "kinds");
}

#[test]
fn layers_without_a_covered_gradient_are_named() {
    let text = r#"
name = "gelu"
[[layer]]
type = "conv2d"
out_channels = 4
kernel_size = 3
[[layer]]
type = "gelu"
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
out_features = "classes"
"#;
    let model = ModelFile::from_toml(text, "g.toml")
        .unwrap()
        .build([3, 8, 8], 2)
        .unwrap();
    let err = InputGradient::new(&model).unwrap_err().to_string();
    assert!(err.contains("Gelu"), "{err}");
    let mobile = convnet::models::build("mobilenet_v2", [3, 32, 32], 10).unwrap();
    let err = InputGradient::new(&mobile).unwrap_err().to_string();
    assert!(err.contains("depthwise"), "{err}");
}

#[test]
fn bad_targets_and_shapes_are_errors() {
    let model = convnet::models::build("seed-cnn", [3, 32, 32], 10).unwrap();
    let g = InputGradient::new(&model).unwrap();
    let x = Tensor::randn([2, 3, 32, 32], &mut Rng::new(1));
    let err = g.run(&x, &[0, 10]).unwrap_err().to_string();
    assert!(err.contains("target 10 is out of range"), "{err}");
    let err = g.run(&x, &[0]).unwrap_err().to_string();
    assert!(err.contains("1 targets for 2 images"), "{err}");
    let y = Tensor::randn([1, 3, 30, 32], &mut Rng::new(1));
    assert!(g.run(&y, &[0]).is_err());
}
