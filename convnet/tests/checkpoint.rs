//! Checkpoint round trips, PyTorch-compatible dtypes, atomic writes and clear errors for
//! corrupt, truncated or mismatched files.

mod common;

use common::scratch::Scratch;

use convnet::checkpoint::{load_checkpoint, load_tensors, save_checkpoint, CheckpointMeta};
use convnet::data::Normalize;
use convnet::models;

fn temp(name: &str) -> Scratch {
    Scratch::folder(&format!("ckpt-{name}"))
}

fn meta() -> CheckpointMeta {
    CheckpointMeta {
        architecture: "resnet20".into(),
        input_shape: [3, 32, 32],
        classes: (0..10).map(|i| format!("c{i}")).collect(),
        normalize: Normalize::cifar10(),
        epoch: 3,
        step: 1200,
        model_spec: None,
        sequence: None,
    }
}

#[test]
fn round_trip_restores_every_parameter_and_buffer() {
    let dir = temp("roundtrip");
    convnet::manual_seed(1);
    let model = models::build("resnet20", [3, 32, 32], 10).unwrap();
    model.state_dict()[2]
        .1
        .update_data(|d| d[0] = 42.0)
        .unwrap(); // a BN buffer
    let path = dir.join("model.safetensors");
    save_checkpoint(&path, &model.state_dict(), &meta()).unwrap();
    let (tensors, m) = load_checkpoint(&path).unwrap();
    assert_eq!(m, meta());
    convnet::manual_seed(2);
    let other = models::build("resnet20", [3, 32, 32], 10).unwrap();
    other.load_state_dict(&tensors, true).unwrap();
    for ((n1, a), (n2, b)) in model.state_dict().iter().zip(other.state_dict().iter()) {
        assert_eq!(n1, n2);
        assert_eq!(a.to_vec(), b.to_vec(), "{n1}");
    }
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        ["model.safetensors"],
        "no temporary files are left behind"
    );
}

#[test]
fn num_batches_tracked_is_int64_like_pytorch() {
    let dir = temp("dtype");
    let model = models::build("resnet20", [3, 32, 32], 10).unwrap();
    let path = dir.join("m.safetensors");
    save_checkpoint(&path, &model.state_dict(), &meta()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("bn1.num_batches_tracked").unwrap().dtype(),
        safetensors::Dtype::I64
    );
    assert_eq!(
        st.tensor("bn1.running_var").unwrap().dtype(),
        safetensors::Dtype::F32
    );
}

#[test]
fn corrupt_truncated_and_mismatched_files_give_clear_errors() {
    let dir = temp("bad");
    let model = models::build("seed-cnn", [3, 32, 32], 10).unwrap();
    let path = dir.join("m.safetensors");
    save_checkpoint(&path, &model.state_dict(), &meta()).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_checkpoint(&cut).unwrap_err().to_string();
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );

    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a checkpoint at all").unwrap();
    assert!(load_checkpoint(&junk)
        .unwrap_err()
        .to_string()
        .contains("junk.safetensors"));

    assert!(load_checkpoint(&dir.join("missing.safetensors"))
        .unwrap_err()
        .to_string()
        .contains("missing.safetensors"));

    // Weights of seed-cnn do not fit resnet20.
    let (tensors, _) = load_tensors(&path).unwrap();
    let e = models::build("resnet20", [3, 32, 32], 10)
        .unwrap()
        .load_state_dict(&tensors, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected key") || e.contains("missing key"),
        "{e}"
    );
    // Same names, wrong shape.
    let e = models::build("seed-cnn", [3, 32, 32], 7)
        .unwrap()
        .load_state_dict(&tensors, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc2.") && e.contains("expected shape [7"), "{e}");

    // A plain state_dict (no convnet metadata) is refused as a checkpoint with a hint.
    convnet::checkpoint::save_tensors(
        &dir.join("plain.safetensors"),
        &model.state_dict(),
        Default::default(),
    )
    .unwrap();
    let e = load_checkpoint(&dir.join("plain.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--weights"), "{e}");
}
