//! PyTorch interoperability of the model zoo: each architecture loads a PyTorch `state_dict`
//! (torchvision's for resnet18/34/50 and mobilenet_v2) with strict name and shape checks and
//! reproduces PyTorch's eval-mode logits on a fixed batch.
//!
//! Fixtures: `python tools/fixtures/zoo.py` (committed: resnet18 and smaller) and
//! `python tools/fixtures/zoo.py --large` (vgg16-bn, resnet34/50 and the -cifar ResNets,
//! written to the git-ignored `zoo-large/`; their tests skip when it is absent).
//!
//! Tolerance: every logit within `1e-4 * |ref| + 1e-4 * max |ref|` of PyTorch's float64
//! result from the same (bfloat16-representable) weights: float32 accumulation error through
//! up to 50 layers.

use convnet::checkpoint::load_tensors;
use convnet::nn::Mode;
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixtures(dir: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
}

/// Loads the PyTorch weights of `name` into convnet's architecture and compares logits.
fn check(dir: &Path, name: &str) {
    let weights = dir.join(format!("{name}.weights.safetensors"));
    let (state, _) = load_tensors(&weights)
        .unwrap_or_else(|e| panic!("{e}\nregenerate with: python tools/fixtures/zoo.py"));
    let (probe, _) = load_tensors(&dir.join(format!("{name}.probe.safetensors"))).unwrap();
    let get = |k: &str| probe.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let (x, want) = (get("input"), get("logits"));
    let input = [x.dims()[1], x.dims()[2], x.dims()[3]];
    let model = convnet::models::build(name, input, want.dims()[1]).unwrap();
    model
        .load_state_dict(&state, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let got = model.forward(&x, Mode::Eval).unwrap();
    assert_eq!(got.dims(), want.dims(), "{name}");
    let (got, want) = (got.to_vec(), want.to_vec());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * w.abs() + TOL * scale,
            "{name}: logit {i}: convnet {g}, PyTorch {w} (max |logit| {scale})"
        );
    }
}

macro_rules! committed {
    ($($test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        fn $test() {
            check(&fixtures("zoo"), $name);
        }
    )*};
}

committed! {
    seed_cnn => "seed-cnn",
    lenet5_mnist => "lenet5",
    resnet20 => "resnet20",
    resnet32 => "resnet32",
    resnet56 => "resnet56",
    vgg11_bn => "vgg11-bn",
    resnet18_torchvision => "resnet18",
    mobilenet_v2_torchvision => "mobilenet_v2",
}

#[test]
fn large_architectures_when_generated() {
    let dir = fixtures("zoo-large");
    if !dir.exists() {
        eprintln!(
            "skipped: {} is absent; `python tools/fixtures/zoo.py --large` writes it",
            dir.display()
        );
        return;
    }
    for name in [
        "vgg16-bn",
        "resnet34",
        "resnet50",
        "resnet18-cifar",
        "resnet34-cifar",
        "resnet50-cifar",
    ] {
        check(&dir, name);
    }
}

#[test]
fn a_state_dict_of_another_architecture_is_refused_by_name() {
    let (state, _) = load_tensors(&fixtures("zoo").join("resnet20.weights.safetensors")).unwrap();
    let model = convnet::models::build("resnet32", [3, 32, 32], 10).unwrap();
    let err = model.load_state_dict(&state, true).unwrap_err().to_string();
    assert!(err.contains("missing key layer1.3"), "{err}");
}
