//! Reading PyTorch `torch.save` files (`.pt`/`.pth`) without running their pickles.
//! Fixtures: `python tools/fixtures/zoo.py --pt`.

mod common;

use common::scratch::Scratch;

use convnet::checkpoint::{load_tensors, NamedTensors};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pt")
        .join(name)
}

fn load(name: &str) -> NamedTensors {
    load_tensors(&fixture(name))
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

fn assert_same(got: &NamedTensors, want: &NamedTensors) {
    assert_eq!(
        got.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        want.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((name, g), (_, w)) in got.iter().zip(want) {
        assert_eq!(g.dims(), w.dims(), "{name}");
        assert_eq!(g.to_vec(), w.to_vec(), "{name}");
    }
}

#[test]
fn a_state_dict_reads_exactly_and_loads_into_the_model() {
    let got = load("lenet5_state_dict.pt");
    assert_same(&got, &load("lenet5_state_dict.expected.safetensors"));
    let model = convnet::models::build("lenet5", [1, 28, 28], 10).unwrap();
    model.load_state_dict(&got, true).unwrap();
}

#[test]
fn a_training_checkpoint_dict_is_unwrapped_to_its_model_state_dict() {
    assert_same(
        &load("lenet5_checkpoint.pth"),
        &load("lenet5_state_dict.expected.safetensors"),
    );
}

#[test]
fn strided_and_half_precision_tensors_read_as_their_values() {
    assert_same(&load("views.pt"), &load("views.expected.safetensors"));
}

#[test]
fn a_pickle_that_would_run_code_is_refused_by_name() {
    let err = load_tensors(&fixture("runs_code.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing to load"), "{err}");
    assert!(err.contains("system"), "{err}");
    assert!(err.contains("no code is run"), "{err}");
}

#[test]
fn the_legacy_format_is_a_clear_error() {
    let err = load_tensors(&fixture("legacy.pt")).unwrap_err().to_string();
    assert!(err.contains("legacy (pre-1.6) format"), "{err}");
}

#[test]
fn truncated_files_are_errors_not_panics() {
    let bytes = std::fs::read(fixture("lenet5_state_dict.pt")).unwrap();
    let dir = Scratch::folder("pt-truncated");
    for cut in [10, bytes.len() / 3, bytes.len() - 30] {
        let path = dir.join(format!("cut{cut}.pt"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_tensors(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("cut{cut}.pt")), "{err}");
    }
}
