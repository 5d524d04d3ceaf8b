//! The sequence layers (Conv1d, 1-D pooling, BatchNorm1d, Embedding) and pooling windows
//! that reach past the padded input (both dimensions), forward and backward, against
//! PyTorch (`tools/fixtures/seq.py`); a PyTorch state_dict of a 1-D CNN loads by name and
//! gives PyTorch's outputs. Tolerance: rtol 1e-5, atol 1e-6 unless stated.

mod common;

use common::{assert_tensor_close, Fixture, ATOL, RTOL};
use convnet::model_file::ModelFile;
use convnet::nn::{Embedding, Mode};
use convnet::{
    AvgPool1dParams, AvgPool2dParams, Conv1dParams, Device, MaxPool1dParams, MaxPool2dParams,
    Tensor,
};
use serde_json::Value;

on_each_device!(
    pool2d_windows_past_the_padded_input,
    conv1d_forward_and_backward,
    max_pool1d_forward_and_backward,
    avg_pool1d_forward_and_backward,
    adaptive_avg_pool1d_forward_and_backward,
    batch_norm1d_train_and_eval,
);

fn load() -> Fixture {
    Fixture::load("seq.safetensors")
}

fn pair(v: &Value) -> (usize, usize) {
    let a = v.as_array().unwrap();
    (
        a[0].as_u64().unwrap() as usize,
        a[1].as_u64().unwrap() as usize,
    )
}

fn num(s: &Value, key: &str) -> usize {
    s[key].as_u64().unwrap() as usize
}

/// Checks `y` and the gradients of `sum(y * gy)` for `(input, fixture name)` pairs.
fn check(fx: &Fixture, case: &str, y: &Tensor, inputs: &[(&Tensor, &str)], atol: f32) {
    assert_tensor_close(&format!("{case}/y"), y, &fx.tensor(case, "y"), RTOL, atol);
    let grads = y.backward_with(&fx.tensor(case, "gy")).unwrap();
    for (t, name) in inputs {
        let g = grads
            .get(t)
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        let want = fx.tensor(case, name);
        assert_tensor_close(&format!("{case}/{name}"), g, &want, RTOL, atol);
    }
}

fn cases(fx: &Fixture, prefix: &str, at_least: usize) -> Vec<String> {
    let v: Vec<String> = fx
        .cases()
        .into_iter()
        .filter(|c| c.starts_with(prefix))
        .collect();
    assert!(v.len() >= at_least, "{prefix}: {} cases", v.len());
    v
}

fn pool2d_windows_past_the_padded_input(dev: Device) {
    let fx = load();
    for case in cases(&fx, "maxpool2d_", 3) {
        let s = fx.settings(&case);
        let p = MaxPool2dParams {
            kernel: pair(&s["kernel"]),
            stride: pair(&s["stride"]),
            padding: pair(&s["padding"]),
            dilation: pair(&s["dilation"]),
            ceil_mode: true,
        };
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let y = x.max_pool2d(p).unwrap();
        assert_eq!(y.dims(), fx.tensor(&case, "y").dims(), "{case}");
        check(&fx, &case, &y, &[(&x, "gx")], ATOL);
    }
    for case in cases(&fx, "avgpool2d_", 4) {
        let s = fx.settings(&case);
        let p = AvgPool2dParams {
            kernel: pair(&s["kernel"]),
            stride: pair(&s["stride"]),
            padding: pair(&s["padding"]),
            ceil_mode: true,
            count_include_pad: s["count_include_pad"].as_bool().unwrap(),
        };
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let y = x.avg_pool2d(p).unwrap();
        check(&fx, &case, &y, &[(&x, "gx")], ATOL);
    }
    // The case PyTorch accepts and convnet used to refuse: 8x2 input, kernel (2, 3).
    let x = Tensor::zeros([1, 1, 8, 2]).to_device(dev).unwrap();
    let p = MaxPool2dParams {
        kernel: (2, 3),
        stride: (1, 3),
        padding: (1, 0),
        dilation: (1, 1),
        ceil_mode: true,
    };
    assert_eq!(x.max_pool2d(p).unwrap().dims(), &[1, 1, 9, 1]);
    let err = x
        .max_pool2d(MaxPool2dParams {
            ceil_mode: false,
            ..p
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("larger than the padded input"), "{err}");
}

fn conv1d_forward_and_backward(dev: Device) {
    let fx = load();
    for case in cases(&fx, "conv1d_", 5) {
        let s = fx.settings(&case);
        let p = Conv1dParams {
            stride: num(&s, "stride"),
            padding: num(&s, "padding"),
            dilation: num(&s, "dilation"),
            groups: num(&s, "groups"),
        };
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let w = fx.tensor_on(dev, &case, "w").requires_grad();
        let b = fx
            .try_tensor(&case, "b")
            .map(|b| b.to_device(dev).unwrap().requires_grad());
        let y = x.conv1d(&w, b.as_ref(), p).unwrap();
        let mut inputs = vec![(&x, "gx"), (&w, "gw")];
        if let Some(b) = &b {
            inputs.push((b, "gb"));
        }
        // Weight gradients sum N*OL products: atol 1e-5 as for conv2d.
        check(&fx, &case, &y, &inputs, 1e-5);
    }
}

fn max_pool1d_forward_and_backward(dev: Device) {
    let fx = load();
    for case in cases(&fx, "maxpool1d_", 5) {
        let s = fx.settings(&case);
        let p = MaxPool1dParams::new(num(&s, "kernel"))
            .stride(num(&s, "stride"))
            .padding(num(&s, "padding"))
            .dilation(num(&s, "dilation"))
            .ceil_mode(s["ceil_mode"].as_bool().unwrap());
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let y = x.max_pool1d(p).unwrap();
        assert_eq!(y.to_vec(), fx.tensor(&case, "y").to_vec(), "{case}/y");
        check(&fx, &case, &y, &[(&x, "gx")], ATOL);
    }
}

fn avg_pool1d_forward_and_backward(dev: Device) {
    let fx = load();
    for case in cases(&fx, "avgpool1d_", 7) {
        let s = fx.settings(&case);
        let p = AvgPool1dParams::new(num(&s, "kernel"))
            .stride(num(&s, "stride"))
            .padding(num(&s, "padding"))
            .ceil_mode(s["ceil_mode"].as_bool().unwrap())
            .count_include_pad(s["count_include_pad"].as_bool().unwrap());
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let y = x.avg_pool1d(p).unwrap();
        check(&fx, &case, &y, &[(&x, "gx")], ATOL);
    }
}

fn adaptive_avg_pool1d_forward_and_backward(dev: Device) {
    let fx = load();
    for case in cases(&fx, "adaptive_avg1d_", 2) {
        let out = num(&fx.settings(&case), "out");
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        if dev != Device::Cpu && !x.dims()[2].is_multiple_of(out) {
            // Uneven windows have no GPU kernel (as in 2-D): a clear error.
            assert!(x.adaptive_avg_pool1d(out).is_err());
            continue;
        }
        let y = x.adaptive_avg_pool1d(out).unwrap();
        check(&fx, &case, &y, &[(&x, "gx")], ATOL);
    }
}

#[test]
fn adaptive_max_pool1d_forward_and_backward() {
    let fx = load();
    for case in cases(&fx, "adaptive_max1d_", 3) {
        let out = num(&fx.settings(&case), "out");
        let x = fx.tensor(&case, "x").requires_grad();
        let y = x.adaptive_max_pool1d(out).unwrap();
        assert_eq!(y.to_vec(), fx.tensor(&case, "y").to_vec(), "{case}/y");
        check(&fx, &case, &y, &[(&x, "gx")], ATOL);
    }
}

fn batch_norm1d_train_and_eval(dev: Device) {
    let fx = load();
    for case in cases(&fx, "bn1d_", 4) {
        let s = fx.settings(&case);
        let training = s["training"].as_bool().unwrap();
        let momentum = s["momentum"].as_f64().unwrap() as f32;
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let w = fx.tensor_on(dev, &case, "w").requires_grad();
        let b = fx.tensor_on(dev, &case, "b").requires_grad();
        let rm = fx.tensor_on(dev, &case, "rm");
        let rv = fx.tensor_on(dev, &case, "rv");
        let y = x
            .batch_norm1d(&rm, &rv, Some(&w), Some(&b), training, momentum, 1e-5)
            .unwrap();
        assert_eq!(y.dims(), x.dims());
        // Normalisation divides by a batch standard deviation: atol 1e-5 as for 2-D.
        check(&fx, &case, &y, &[(&x, "gx"), (&w, "gw"), (&b, "gb")], 1e-5);
        for (t, name) in [(&rm, "rm_after"), (&rv, "rv_after")] {
            let want = fx.tensor(&case, name);
            assert_tensor_close(&format!("{case}/{name}"), t, &want, RTOL, ATOL);
        }
    }
}

#[test]
fn embedding_forward_and_dense_backward() {
    let fx = load();
    for case in cases(&fx, "embedding", 2) {
        let pad = fx.settings(&case)["padding_idx"]
            .as_u64()
            .map(|p| p as usize);
        let ids = fx.tensor(&case, "ids");
        let w = fx.tensor(&case, "w").requires_grad();
        let y = ids.embedding(&w, pad).unwrap();
        assert_eq!(y.dims(), &[3, 5, 4]);
        check(&fx, &case, &y, &[(&w, "gw")], ATOL);
    }
}

#[test]
fn bad_sequence_inputs_are_clear_errors() {
    let x = Tensor::zeros([2, 3, 4]);
    let msg = |r: convnet::Result<Tensor>| r.unwrap_err().to_string();
    let e =
        msg(Tensor::zeros([2, 3]).conv1d(&Tensor::zeros([4, 3, 3]), None, Conv1dParams::default()));
    assert!(e.contains("conv1d") && e.contains("[N, C, L]"), "{e}");
    let e = msg(x.conv1d(&Tensor::zeros([4, 3, 9]), None, Conv1dParams::default()));
    assert!(e.contains("larger than the padded input 4"), "{e}");
    let e = msg(x.max_pool1d(MaxPool1dParams::new(5)));
    assert!(
        e.contains("max_pool1d") && e.contains("larger than the padded input"),
        "{e}"
    );
    // With ceil_mode a window of 5 over 4 values is still refused (none starts inside).
    let e = msg(x.max_pool1d(MaxPool1dParams::new(5).stride(1).ceil_mode(true)));
    assert!(e.contains("output would be empty"), "{e}");
    let e = msg(x.avg_pool1d(AvgPool1dParams::new(2).padding(2)));
    assert!(e.contains("at most half"), "{e}");
    let e = msg(Tensor::zeros([2, 3, 4, 5]).max_pool1d(MaxPool1dParams::new(2)));
    assert!(e.contains("[N, C, L]"), "{e}");
    let e = msg(x.adaptive_max_pool1d(0));
    assert!(e.contains("must be positive"), "{e}");
    let (m, v) = (Tensor::zeros([3]), Tensor::ones([3]));
    let e = msg(Tensor::zeros([1, 3]).batch_norm1d(&m, &v, None, None, true, 0.1, 1e-5));
    assert!(
        e.contains("batch_norm1d") && e.contains("more than 1 value") && e.contains("[1, 3]"),
        "{e}"
    );
    let e = msg(Tensor::zeros([2, 3, 4, 5]).batch_norm1d(&m, &v, None, None, false, 0.1, 1e-5));
    assert!(e.contains("[N, C] or [N, C, L]"), "{e}");
    // Ids: out of range, negative, fractional, NaN; a huge table is never allocated.
    let w = Tensor::zeros([10, 4]);
    for bad in [10.0, -1.0, 2.5, f32::NAN, 1e30] {
        let e = msg(Tensor::from_vec(vec![1.0, bad], [2])
            .unwrap()
            .embedding(&w, None));
        assert!(
            e.contains("is not an index into 10 embeddings"),
            "{bad}: {e}"
        );
    }
    assert!(Embedding::new(10, 4, Some(10)).is_err());
    assert!(Embedding::new(1 << 40, 1 << 20, None).is_err());
}

#[test]
fn torch_state_dict_of_a_1d_cnn_loads_and_matches() {
    let file = ModelFile::from_toml(SEQNET, "seqnet.toml").unwrap();
    let model = file.build_for(&[4, 20], 5).unwrap();
    let path = common::fixture_dir().join("seqnet_state_dict.safetensors");
    let (tensors, _) = convnet::checkpoint::load_tensors(&path).unwrap();
    model.load_state_dict(&tensors, true).unwrap();
    let fx = load();
    let y = model
        .forward(&fx.tensor("seqnet_probe", "x"), Mode::Eval)
        .unwrap();
    assert_tensor_close(
        "seqnet_probe/y",
        &y,
        &fx.tensor("seqnet_probe", "y"),
        RTOL,
        1e-5,
    );
    // The ONNX export of the loaded model; with SEQNET_ONNX=<file> it is also written out,
    // for ONNX Runtime to run on the probe (`x` of case `seqnet_probe`, expecting `y`).
    let onnx = convnet::onnx::export(&model, "seqnet").unwrap();
    assert!(onnx.len() > 4 * model.num_parameters());
    if let Some(out) = std::env::var_os("SEQNET_ONNX") {
        std::fs::write(out, &onnx).unwrap();
    }
    // The summary names every 1-D layer with its output shape.
    let summary = model.summary();
    for row in [
        "Conv1d",
        "BatchNorm1d",
        "MaxPool1d",
        "AvgPool1d",
        "AdaptiveMaxPool1d",
        "[1, 8, 10]",
    ] {
        assert!(summary.contains(row), "{row} missing from\n{summary}");
    }
}

/// The PyTorch `SeqNet` of `tools/fixtures/seq.py` as a model file.
pub const SEQNET: &str = r#"
name = "seqnet"
input = [4, 20]

[[layer]]
type = "conv1d"
name = "conv1"
out_channels = 8
kernel_size = 3
padding = 1

[[layer]]
type = "batchnorm1d"
name = "bn1"

[[layer]]
type = "relu"

[[layer]]
type = "maxpool1d"
name = "pool"
kernel_size = 2

[[layer]]
type = "conv1d"
name = "conv2"
out_channels = 6
kernel_size = 3
padding = 2
dilation = 2
groups = 2

[[layer]]
type = "avgpool1d"
name = "avg"
kernel_size = 3
stride = 2
padding = 1
count_include_pad = false

[[layer]]
type = "adaptive_maxpool1d"
name = "gmax"

[[layer]]
type = "flatten"

[[layer]]
type = "linear"
name = "fc"
out_features = "classes"

[[layer]]
type = "batchnorm1d"
name = "bn2"
"#;

#[test]
fn text_cnn_matches_torch_logits_loss_and_gradients() {
    // tools/fixtures/seq.py's TextCNN (vocabulary 50, 4 classes) and convnet's zoo model
    // share their state_dict names; ids include padding (id 0) at the end and inside.
    let model = convnet::models::build_for("text-cnn", &[12], Some(50), 4).unwrap();
    let path = common::fixture_dir().join("textcnn_state_dict.safetensors");
    let (tensors, _) = convnet::checkpoint::load_tensors(&path).unwrap();
    model.load_state_dict(&tensors, true).unwrap();
    let fx = load();
    let case = "textcnn_probe";
    let labels: Vec<usize> = fx
        .tensor(case, "target")
        .to_vec()
        .iter()
        .map(|&t| t as usize)
        .collect();
    // Eval mode: dropout is the identity, as in the reference.
    let y = model.forward(&fx.tensor(case, "ids"), Mode::Eval).unwrap();
    assert_tensor_close("textcnn/y", &y, &fx.tensor(case, "y"), RTOL, ATOL);
    let loss = y
        .cross_entropy(&labels, convnet::Reduction::Mean, 0.0)
        .unwrap();
    assert_tensor_close(
        "textcnn/loss",
        &loss.reshape([1]).unwrap(),
        &fx.tensor(case, "loss"),
        RTOL,
        ATOL,
    );
    let grads = loss.backward().unwrap();
    for (name, p) in model.named_parameters() {
        let g = grads
            .get(&p)
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_tensor_close(
            &format!("textcnn/grad {name}"),
            g,
            &fx.tensor(case, &format!("g/{name}")),
            RTOL,
            ATOL,
        );
    }
    // The padding row gets no gradient.
    let g = grads.get(&model.named_parameters()[0].1).unwrap().to_vec();
    assert!(g[..128].iter().all(|&v| v == 0.0));
    // The graph (ONNX export, capture) describes the bank as convolutions joined by a
    // Concat, and runs to the same logits.
    let graph = model.graph().unwrap();
    let kinds: Vec<&str> = graph.nodes().iter().map(|n| n.op.kind()).collect();
    assert!(
        kinds.contains(&"Permute") && kinds.contains(&"Concat"),
        "{kinds:?}"
    );
    let yg = convnet::graph::eval::run(&graph, &fx.tensor(case, "ids"), &mut |_, _| {
        Ok(convnet::graph::eval::Visit::Keep)
    })
    .unwrap();
    assert_tensor_close("textcnn/graph y", &yg, &fx.tensor(case, "y"), RTOL, ATOL);
    let onnx = convnet::onnx::export(&model, "text-cnn").unwrap();
    assert!(onnx.len() > 4 * model.num_parameters());
    if let Some(out) = std::env::var_os("TEXTCNN_ONNX") {
        std::fs::write(out, &onnx).unwrap();
    }
}
