//! Pretrained checkpoints built into the binary (`--pretrained NAME`), trained by convnet on
//! CIFAR-10. `pretrained/manifest.json` records how each was made and what it scores.

use anyhow::{bail, Context, Result};
use convnet::checkpoint::{checkpoint_from_bytes, CheckpointMeta, NamedTensors};
use std::path::Path;

const MANIFEST: &str = include_str!("../../pretrained/manifest.json");

/// The checkpoint files, by manifest name.
const FILES: [(&str, &[u8]); 2] = [
    (
        "seed-cnn-cifar10",
        include_bytes!("../../pretrained/seed-cnn-cifar10.safetensors"),
    ),
    (
        "resnet20-cifar10",
        include_bytes!("../../pretrained/resnet20-cifar10.safetensors"),
    ),
];

/// One manifest entry.
#[derive(serde::Deserialize, Debug)]
pub struct Entry {
    pub name: String,
    pub architecture: String,
    pub cifar10_test_accuracy: f64,
    pub sample_test_accuracy: f64,
    pub command: String,
}

/// The manifest's entries.
pub fn entries() -> Result<Vec<Entry>> {
    serde_json::from_str(MANIFEST).context("pretrained/manifest.json is malformed")
}

/// The tensors and metadata of pretrained checkpoint `name`.
pub fn load(name: &str) -> Result<(NamedTensors, CheckpointMeta)> {
    let Some((_, bytes)) = FILES.iter().find(|(n, _)| *n == name) else {
        let known: Vec<&str> = FILES.iter().map(|(n, _)| *n).collect();
        bail!(
            "no pretrained model {name:?}; available: {}",
            known.join(", ")
        );
    };
    let origin = format!("pretrained/{name}.safetensors");
    Ok(checkpoint_from_bytes(Path::new(&origin), bytes)?)
}
