//! M5, the raw-waveform CNN of Dai et al. 2017 ("Very deep convolutional neural networks for
//! raw waveforms"): four stages of Conv1d + BatchNorm1d + ReLU + MaxPool1d(4) over the
//! samples, a first convolution of 80 taps with stride 4 (a learned filter bank), then
//! global average pooling over time and one Linear layer.
//!
//! | layer        | output for `[1, 8000]` (1 s at 8 kHz) |
//! |--------------|---------------------------------------|
//! | conv1 k80 s4 | `[128, 1981]`                         |
//! | pool1        | `[128, 495]`                          |
//! | conv2 k3     | `[128, 493]`, pool2 `[128, 123]`      |
//! | conv3 k3     | `[256, 121]`, pool3 `[256, 30]`       |
//! | conv4 k3     | `[512, 28]`, pool4 `[512, 7]`         |
//! | avgpool      | `[512, 1]`, flatten, fc1 `[classes]`  |
//!
//! `state_dict` names are those of a PyTorch module with attributes `conv1`, `bn1`, `pool1`,
//! ..., `conv4`, `bn4`, `pool4`, `fc1` (ReLU, pooling and flattening hold no tensors).

use crate::error::Result;
use crate::nn::{
    AdaptiveAvgPool1d, BatchNorm1d, Conv1d, Flatten, Linear, MaxPool1d, Model, ReLU, Sequential,
};

/// M5 for input `[C, L]` (channels, samples; normally `[1, 8000]`) and `classes` outputs.
/// An input too short for the four stages is an error naming the first layer that cannot
/// take it.
pub(crate) fn m5(input: [usize; 2], classes: usize) -> Result<Model> {
    let mut net = Sequential::new();
    let stages = [
        (input[0], 128, 80, 4),
        (128, 128, 3, 1),
        (128, 256, 3, 1),
        (256, 512, 3, 1),
    ];
    for (i, (c_in, c_out, k, stride)) in stages.into_iter().enumerate() {
        let n = i + 1;
        net = net
            .add(
                format!("conv{n}"),
                Conv1d::new(c_in, c_out, k).stride(stride).build()?,
            )
            .add(format!("bn{n}"), BatchNorm1d::new(c_out)?)
            .add(format!("relu{n}"), ReLU)
            .add(format!("pool{n}"), MaxPool1d::new(4));
    }
    net.add("avgpool", AdaptiveAvgPool1d(1))
        .add("flatten", Flatten::new())
        .add("fc1", Linear::new(512, classes)?)
        .build(&input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Mode;
    use crate::Tensor;
    use safetensors::SafeTensors;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// Tensor `name` of a float32 safetensors fixture file.
    fn fixture_tensor(file: &str, name: &str) -> Tensor {
        let path = fixture_dir().join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read fixture {}: {e}\nregenerate with: python tools/fixtures/audio.py",
                path.display()
            )
        });
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(name).unwrap();
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Tensor::from_vec(data, view.shape().to_vec()).unwrap()
    }

    #[test]
    fn torch_m5_state_dict_loads_and_matches() {
        let model = m5([1, 8000], 10).unwrap();
        let path = fixture_dir().join("m5_state_dict.safetensors");
        let (tensors, _) = crate::checkpoint::load_tensors(&path).unwrap();
        let names: HashMap<_, _> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.dims().to_vec()))
            .collect();
        assert_eq!(names["conv1.weight"], vec![128, 1, 80]);
        assert_eq!(names["fc1.weight"], vec![10, 512]);
        model.load_state_dict(&tensors, true).unwrap();
        let x = fixture_tensor("audio.safetensors", "m5_probe/x");
        let want = fixture_tensor("audio.safetensors", "m5_probe/y").to_vec();
        let got = model.forward(&x, Mode::Eval).unwrap();
        assert_eq!(got.dims(), &[2, 10]);
        // Tolerance: |got - want| <= 1e-5 + 1e-5 |want| (float32 against a float64 reference
        // through ~550k weights).
        let got = got.to_vec();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() - 1e-5 * b.abs())
            .fold(f32::MIN, f32::max);
        let max_abs = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("m5_probe: max abs err {max_abs:e}");
        assert!(
            worst <= 1e-5,
            "M5 output differs from PyTorch (max abs err {max_abs:e}): {got:?} vs {want:?}"
        );
    }

    #[test]
    fn summary_names_and_short_inputs() {
        let model = m5([1, 8000], 35).unwrap();
        let summary = model.summary();
        for row in ["conv1", "bn4", "pool4", "fc1", "[1, 512, 7]", "[1, 35]"] {
            assert!(summary.contains(row), "{row} missing from\n{summary}");
        }
        // 1000 samples: conv1 231, pool1 57, conv2 55, pool2 13, conv3 11, pool3 2: conv4's
        // three taps do not fit.
        let err = m5([1, 1000], 10).err().unwrap().to_string();
        assert!(err.starts_with("conv4 (Conv1d)"), "{err}");
        let err = m5([1, 50], 10).err().unwrap().to_string();
        assert!(err.starts_with("conv1 (Conv1d)"), "{err}");
        assert!(m5([2, 16000], 5).is_ok());
    }
}
