//! Shared test helpers: fixture loading and `assert_close`.
#![allow(dead_code)]

use convnet::Tensor;

pub mod scratch;

/// Turns `fn $name(device: Device)` into the tests `$name::cpu` and, with the `cuda`
/// feature, `$name::cuda` on GPU 0: one test body per device. The CUDA variant is ignored
/// unless asked for (`cargo test --features cuda -- --ignored`), so a machine without a GPU
/// shows it as ignored, never as passed. With `cuda-emulator`, `$name::cuda_emulated` runs
/// the GPU code path with the kernels executed on the host.
#[macro_export]
macro_rules! on_each_device {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                super::$name(convnet::Device::Cpu)
            }
            #[cfg(feature = "cuda")]
            #[test]
            #[ignore = "needs a CUDA GPU: cargo test --features cuda -- --ignored"]
            fn cuda() {
                super::$name(convnet::Device::Cuda(0))
            }
            // The GPU code path with the CUDA C kernels run on the host (no GPU needed).
            #[cfg(feature = "cuda-emulator")]
            #[test]
            fn cuda_emulated() {
                super::$name(convnet::Device::Cuda(
                    convnet::backend::cuda::emulator::ORDINAL,
                ))
            }
        }
    )*};
}
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

/// The fixture folder: `CONVNET_FIXTURE_DIR` when set, else the source tree's, else
/// `convnet/tests/fixtures` under the working directory (for test binaries built on one
/// machine and run from a checkout on another, as the GPU check does).
pub fn fixture_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONVNET_FIXTURE_DIR") {
        return PathBuf::from(dir);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    if built.is_dir() {
        return built;
    }
    PathBuf::from("convnet/tests/fixtures")
}

/// A fixture file written by `tools/fixtures/gen.py`.
pub struct Fixture {
    name: String,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    meta: HashMap<String, String>,
}

impl Fixture {
    /// Loads `convnet/tests/fixtures/<file>`; a missing file fails with the command that makes it.
    pub fn load(file: &str) -> Fixture {
        let path = fixture_dir().join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!("cannot read fixture {}: {e}\nregenerate with: python tools/fixtures/gen.py (torch pinned in tools/fixtures/requirements.txt)", path.display())
        });
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).expect("fixture body");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            assert_eq!(
                view.dtype(),
                safetensors::Dtype::F32,
                "{name}: fixtures are float32"
            );
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(name.to_string(), (view.shape().to_vec(), data));
        }
        Fixture {
            name: file.to_string(),
            tensors,
            meta,
        }
    }

    /// Tensor `case/name`.
    pub fn tensor(&self, case: &str, name: &str) -> Tensor {
        self.try_tensor(case, name)
            .unwrap_or_else(|| panic!("{}: no tensor {case}/{name}", self.name))
    }

    /// Tensor `case/name` placed on `device`.
    pub fn tensor_on(&self, device: convnet::Device, case: &str, name: &str) -> Tensor {
        self.tensor(case, name).to_device(device).unwrap()
    }

    /// Tensor `case/name` if present.
    pub fn try_tensor(&self, case: &str, name: &str) -> Option<Tensor> {
        let (shape, data) = self.tensors.get(&format!("{case}/{name}"))?;
        Some(Tensor::from_vec(data.clone(), shape.clone()).unwrap())
    }

    /// Settings of a case, from the file metadata.
    pub fn settings(&self, case: &str) -> serde_json::Value {
        let raw = self
            .meta
            .get(case)
            .unwrap_or_else(|| panic!("{}: no case {case}", self.name));
        serde_json::from_str(raw).unwrap()
    }

    /// Case names in sorted order.
    pub fn cases(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.keys().cloned().collect();
        v.sort();
        v
    }

    /// The tensors of a case named `<prefix><name>`, as `(name, tensor)` in name order: a
    /// state_dict stored under a prefix such as `init.`.
    pub fn state_with_prefix(&self, case: &str, prefix: &str) -> Vec<(String, Tensor)> {
        self.names_with_prefix(case, prefix)
            .into_iter()
            .map(|n| (n[prefix.len()..].to_string(), self.tensor(case, &n)))
            .collect()
    }

    /// All tensor names of a case with the given prefix after `case/`.
    pub fn names_with_prefix(&self, case: &str, prefix: &str) -> Vec<String> {
        let full = format!("{case}/{prefix}");
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| {
                k.strip_prefix(&format!("{case}/"))
                    .filter(|_| k.starts_with(&full))
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }
}

/// Asserts `|actual - expected| <= atol + rtol * |expected|` element-wise, reporting the worst
/// element (index, actual, expected), the max absolute and relative errors and the case.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], rtol: f32, atol: f32) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} vs expected {}",
        actual.len(),
        expected.len()
    );
    let mut worst = (0usize, 0f32);
    let (mut max_abs, mut max_rel) = (0f32, 0f32);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        if err.is_nan() || a.is_nan() != e.is_nan() {
            panic!("{what}: NaN at {i}: actual {a}, expected {e}");
        }
        let excess = err - (atol + rtol * e.abs());
        if excess > worst.1 || i == 0 {
            worst = (i, excess);
        }
        max_abs = max_abs.max(err);
        max_rel = max_rel.max(err / e.abs().max(1e-12));
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: not close (rtol {rtol}, atol {atol}): worst at [{i}]: actual {}, expected {}; max abs err {max_abs:e}, max rel err {max_rel:e}",
            actual[i], expected[i]
        );
    }
}

/// `assert_close` on tensors, also checking the shape.
pub fn assert_tensor_close(what: &str, actual: &Tensor, expected: &Tensor, rtol: f32, atol: f32) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    assert_close(what, &actual.to_vec(), &expected.to_vec(), rtol, atol);
}

/// The default float32 tolerance of the suite.
pub const RTOL: f32 = 1e-5;
/// The absolute floor.
pub const ATOL: f32 = 1e-6;

/// `mpirun -np N` (the launcher from `CONVNET_MPIRUN`, default Open MPI's
/// `mpirun --oversubscribe`), allowed to run as root as CI does.
pub fn mpirun(ranks: usize) -> std::process::Command {
    let launcher =
        std::env::var("CONVNET_MPIRUN").unwrap_or_else(|_| "mpirun --oversubscribe".into());
    let mut words = launcher.split_whitespace();
    let mut cmd = std::process::Command::new(words.next().unwrap_or("mpirun"));
    cmd.args(words)
        .args(["-np", &ranks.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}
