//! Models without code: the shipped example files build and train, the tutorial file is the
//! built-in seed-cnn layer for layer (it loads PyTorch's weights and gives PyTorch's
//! logits), and mistakes in a file are errors that name the line or the layer.

use convnet::checkpoint::load_tensors;
use convnet::model_file::ModelFile;
use convnet::nn::Mode;
use std::path::PathBuf;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models")
        .join(name)
}

fn toml_err(text: &str) -> String {
    match ModelFile::from_toml(text, "net.toml").and_then(|f| f.build([3, 32, 32], 10)) {
        Ok(_) => panic!("built a broken model file:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_example_builds_for_cifar_and_trains_a_step() {
    for name in ["tutorial-cnn.toml", "small-resnet.toml", "mobile-cnn.json"] {
        let file = ModelFile::from_path(&example(name)).unwrap();
        assert_eq!(file.input, Some([3, 32, 32]), "{name}");
        let model = file.build([3, 32, 32], 10).unwrap();
        assert_eq!(model.output_shape().dims(), &[1, 10], "{name}");
        let x = convnet::Tensor::ones([2, 3, 32, 32]);
        let loss = model
            .forward(&x, Mode::Train)
            .unwrap()
            .cross_entropy(&[1, 2], convnet::Reduction::Mean, 0.0)
            .unwrap();
        let grads = loss.backward().unwrap();
        for (pname, p) in model.named_parameters() {
            assert!(grads.get(&p).is_some(), "{name}: no gradient for {pname}");
        }
    }
}

#[test]
fn the_tutorial_file_is_seed_cnn_and_reproduces_pytorch() {
    let file = ModelFile::from_path(&example("tutorial-cnn.toml")).unwrap();
    let from_file = file.build([3, 32, 32], 10).unwrap();
    let zoo = convnet::models::build("seed-cnn", [3, 32, 32], 10).unwrap();
    let shapes = |m: &convnet::nn::Model| {
        m.state_dict()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(&from_file), shapes(&zoo));
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zoo");
    let (weights, _) = load_tensors(&dir.join("seed-cnn.weights.safetensors")).unwrap();
    from_file.load_state_dict(&weights, true).unwrap();
    let (probe, _) = load_tensors(&dir.join("seed-cnn.probe.safetensors")).unwrap();
    let get = |k: &str| probe.iter().find(|(n, _)| n == k).unwrap().1.clone();
    let got = from_file
        .forward(&get("input"), Mode::Eval)
        .unwrap()
        .to_vec();
    for (g, w) in got.iter().zip(get("logits").to_vec()) {
        assert!((g - w).abs() <= 1e-5 + 1e-5 * w.abs(), "{g} vs {w}");
    }
}

#[test]
fn json_round_trip_rebuilds_the_same_network() {
    let file = ModelFile::from_path(&example("small-resnet.toml")).unwrap();
    let again = ModelFile::from_json(&file.to_json(), "stored spec").unwrap();
    assert_eq!(file, again);
    let spec =
        convnet::models::ModelSpec::from_checkpoint("small-resnet", Some(&file.to_json())).unwrap();
    assert_eq!(spec.name(), "small-resnet");
    assert_eq!(
        spec.build([3, 32, 32], 10).unwrap().num_parameters(),
        file.build([3, 32, 32], 10).unwrap().num_parameters()
    );
}

const HEAD: &str = "name = 'net'\n";

#[test]
fn a_misspelt_key_is_named_with_the_keys_the_layer_takes() {
    let e = toml_err(&format!(
        "{HEAD}[[layer]]\ntype = 'conv2d'\nname = 'conv1'\nout_channels = 8\nkernal_size = 3\n"
    ));
    assert!(
        e.starts_with("layer 1 \"conv1\" (conv2d): unknown key `kernal_size` (a conv2d layer takes out_channels, kernel_size,"),
        "{e}"
    );
}

#[test]
fn an_unknown_layer_type_lists_the_known_ones() {
    let e = toml_err(&format!("{HEAD}[[layer]]\ntype = 'conv3d'\n"));
    assert!(
        e.contains("layer 1 \"0\" (unknown type): unknown layer type \"conv3d\"; known: conv2d,"),
        "{e}"
    );
}

#[test]
fn syntax_errors_give_the_line() {
    let e = toml_err(&format!("{HEAD}[[layer]]\ntype = 'relu'\n[[layer]\n"));
    assert!(e.starts_with("net.toml: not valid TOML"), "{e}");
    assert!(e.contains("line 4"), "{e}");
    let e = ModelFile::from_json("{\"name\": \"x\", \"layers\": [}", "net.json")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("net.json: not valid JSON") && e.contains("line 1"),
        "{e}"
    );
}

#[test]
fn missing_values_are_named() {
    let e = toml_err("[[layer]]\ntype = 'relu'\n");
    assert_eq!(e, "net.toml: missing `name = \"...\"`");
    let e = toml_err(&format!("{HEAD}[[layer]]\nname = 'a'\n"));
    assert!(e.contains("missing `type = \"...\"`"), "{e}");
    let e = toml_err(&format!(
        "{HEAD}[[layer]]\ntype = 'flatten'\n[[layer]]\ntype = 'linear'\n"
    ));
    assert!(
        e.starts_with("layer 2 \"1\" (linear): missing `out_features`"),
        "{e}"
    );
    let e = toml_err(HEAD);
    assert!(e.contains("no layers"), "{e}");
}

#[test]
fn a_layer_that_cannot_take_its_input_is_named_with_the_shapes() {
    let e = toml_err(&format!(
        "{HEAD}[[layer]]\ntype = 'maxpool2d'\nname = 'pool'\nkernel_size = 64\n[[layer]]\ntype = 'flatten'\n[[layer]]\ntype = 'linear'\nout_features = 'classes'\n"
    ));
    assert_eq!(
        e,
        "layer 1 \"pool\" (maxpool2d): kernel 64x64 is larger than the padded input 32x32 (input 32x32)"
    );
    let e = toml_err(&format!(
        "{HEAD}[[layer]]\ntype = 'flatten'\n[[layer]]\ntype = 'batchnorm2d'\n"
    ));
    assert!(
        e.starts_with(
            "layer 2 \"1\" (batchnorm2d): needs an image input [N, C, H, W], got [1, 3072]"
        ),
        "{e}"
    );
}

#[test]
fn the_output_must_be_one_score_per_class() {
    let e = toml_err(&format!(
        "{HEAD}[[layer]]\ntype = 'flatten'\n[[layer]]\ntype = 'linear'\nout_features = 7\n"
    ));
    assert!(
        e.contains("the network's output is [1, 7] but 10 classes need [1, 10]"),
        "{e}"
    );
}

#[test]
fn duplicate_names_are_refused() {
    let e = toml_err(&format!(
        "{HEAD}[[layer]]\ntype = 'relu'\nname = 'a'\n[[layer]]\ntype = 'relu'\nname = 'a'\n"
    ));
    assert!(e.contains("the name \"a\" is used twice"), "{e}");
}
