//! What the CLI test files share: running the binary, fresh folders, reading its JSON
//! and its checkpoints.
#![allow(dead_code)]

#[path = "../../../convnet/tests/common/scratch.rs"]
mod scratch;

pub use scratch::Scratch;
use std::path::Path;
use std::process::{Command, Output};

pub fn convnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_convnet"))
        .args(args)
        .env(
            "CONVNET_CACHE_DIR",
            std::env::temp_dir().join(format!("convnet-cli-cache-{}", std::process::id())),
        )
        .output()
        .expect("run convnet")
}

/// A fresh scratch path for a test's output folder (not created; removed when the test
/// passes).
pub fn temp(name: &str) -> Scratch {
    Scratch::path(&format!("cli-{name}"))
}

pub fn last_json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "convnet failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("output")).expect("last line is JSON")
}

pub fn fails_with(args: &[&str], needle: &str) {
    let out = convnet(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
}

pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}
