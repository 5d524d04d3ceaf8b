//! The top of the ladder: the tutorial CNN and a small ResNet (BasicBlocks with BatchNorm,
//! projection and option-A shortcuts) loaded from PyTorch-exported weights and trained five
//! SGD-momentum steps. Every step's loss, every final parameter and buffer, and the eval-mode
//! logits afterwards must match PyTorch (float64 reference).
//!
//! Tolerance: the suite default, rtol 1e-5 and atol 1e-6, even though each step's float32
//! error feeds the next through the weights.
//!
//! The small ResNet also trains six steps while its weights are averaged as
//! `torch.optim.swa_utils` does (SWA with `update_bn`, and an EMA of the weights and
//! BatchNorm statistics): the averaged tensors and the averaged models' logits must match.

mod common;

use common::{assert_close, assert_tensor_close, Fixture, ATOL, RTOL};
use convnet::nn::{
    self, AdaptiveAvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, Mode, Model, ReLU,
    Sequential, Shortcut,
};
use convnet::optim::{Optimizer, Sgd, SgdConfig};
use convnet::{Device, Reduction};

on_each_device!(
    tutorial_cnn_trains_like_pytorch,
    small_resnet_with_batchnorm_trains_like_pytorch,
    weight_averages_match_pytorchs_swa_utils
);

/// The tutorial CNN is the zoo's `seed-cnn` (same layers, same names).
fn tutorial_cnn() -> Model {
    convnet::models::build("seed-cnn", [3, 32, 32], 10).unwrap()
}

fn small_resnet() -> Model {
    Sequential::new()
        .add(
            "conv1",
            Conv2d::new(3, 8, 3).padding(1).bias(false).build().unwrap(),
        )
        .add("bn1", BatchNorm2d::new(8).unwrap())
        .add("relu", ReLU)
        .add(
            "layer1",
            Sequential::new().push(BasicBlock::new(8, 8, 1, Shortcut::Projection).unwrap()),
        )
        .add(
            "layer2",
            Sequential::new().push(BasicBlock::new(8, 16, 2, Shortcut::Projection).unwrap()),
        )
        .add(
            "layer3",
            Sequential::new().push(BasicBlock::new(16, 32, 2, Shortcut::PadChannels).unwrap()),
        )
        .add("avgpool", AdaptiveAvgPool2d::new(1, 1))
        .add("flatten", Flatten::new())
        .add("fc", Linear::new(32, 10).unwrap())
        .build(&[3, 12, 12])
        .unwrap()
}

/// Loads a case's initial weights (`init.*`) into `model`, moves it to `dev`, and returns
/// the SGD optimizer of the case's settings over its parameters.
fn start_from_fixture(fx: &Fixture, case: &str, model: &Model, dev: Device) -> Sgd {
    model
        .load_state_dict(&fx.state_with_prefix(case, "init."), false)
        .unwrap();
    model.to_device(dev).unwrap();
    let s = fx.settings(case);
    let cfg = SgdConfig {
        lr: s["lr"].as_f64().unwrap(),
        momentum: s["momentum"].as_f64().unwrap(),
        weight_decay: s["weight_decay"].as_f64().unwrap(),
        nesterov: s["nesterov"].as_bool().unwrap(),
        ..Default::default()
    };
    Sgd::new(model.named_parameters(), cfg).unwrap()
}

fn run(dev: Device, case: &str, model: Model) {
    let fx = Fixture::load("training.safetensors");
    let s = fx.settings(case);
    let torch_keys: Vec<String> = s["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let our_keys: Vec<String> = model.state_dict().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        our_keys, torch_keys,
        "{case}: state_dict names and order match PyTorch"
    );

    let mut opt = start_from_fixture(&fx, case, &model, dev);
    let x = fx.tensor_on(dev, case, "x");
    let t: Vec<usize> = fx
        .tensor(case, "t")
        .to_vec()
        .iter()
        .map(|&v| v as usize)
        .collect();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let loss = model
            .forward(&x, Mode::Train)
            .unwrap()
            .cross_entropy(&t, Reduction::Mean, 0.0)
            .unwrap();
        losses.push(loss.item().unwrap());
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
    }
    assert_close(
        &format!("{case}/losses"),
        &losses,
        &fx.tensor(case, "losses").to_vec(),
        RTOL,
        ATOL,
    );
    for (name, t) in model.state_dict() {
        match fx.try_tensor(case, &format!("final.{name}")) {
            Some(expected) => {
                assert_tensor_close(&format!("{case}/{name}"), &t, &expected, RTOL, ATOL)
            }
            None => {
                assert!(
                    name.ends_with("num_batches_tracked"),
                    "{case}: no reference for {name}"
                );
                assert_eq!(t.item().unwrap(), 5.0, "{name}");
            }
        }
    }
    let logits =
        convnet::no_grad(|| model.forward(&fx.tensor_on(dev, case, "x_test"), Mode::Eval)).unwrap();
    assert_tensor_close(
        &format!("{case}/test_logits"),
        &logits,
        &fx.tensor(case, "test_logits"),
        RTOL,
        ATOL,
    );
}

fn tutorial_cnn_trains_like_pytorch(dev: Device) {
    run(dev, "tutorial_cnn", tutorial_cnn());
}

fn small_resnet_with_batchnorm_trains_like_pytorch(dev: Device) {
    run(dev, "small_resnet", small_resnet());
}

fn weight_averages_match_pytorchs_swa_utils(dev: Device) {
    use convnet::optim::{update_batch_norm, Averaging, WeightAverage};
    let (fx, case) = (Fixture::load("average.safetensors"), "small_resnet");
    let s = fx.settings(case);
    let model = small_resnet();
    let mut opt = start_from_fixture(&fx, case, &model, dev);
    let mut swa = WeightAverage::new(Averaging::Swa).unwrap();
    let decay = s["ema_decay"].as_f64().unwrap();
    let mut ema = WeightAverage::new(Averaging::Ema { decay }).unwrap();
    let swa_from = s["swa_from"].as_u64().unwrap() as usize;
    for step in 1..=s["steps"].as_u64().unwrap() as usize {
        let x = fx.tensor_on(dev, case, &format!("x{}", step - 1));
        let t: Vec<usize> = fx
            .tensor(case, &format!("t{}", step - 1))
            .to_vec()
            .iter()
            .map(|&v| v as usize)
            .collect();
        let loss = model
            .forward(&x, Mode::Train)
            .unwrap()
            .cross_entropy(&t, Reduction::Mean, 0.0)
            .unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        ema.update(&model).unwrap();
        if step >= swa_from {
            swa.update(&model).unwrap();
        }
    }
    let x_test = fx.tensor_on(dev, case, "x_test");
    for (name, avg) in [("swa", &swa), ("ema", &ema)] {
        model.load_state_dict(&avg.state_dict(), false).unwrap();
        if name == "swa" {
            let batches = (0..s["bn_batches"].as_u64().unwrap())
                .map(|i| Ok(fx.tensor_on(dev, case, &format!("bn{i}"))));
            assert_eq!(update_batch_norm(&model, batches).unwrap(), 3);
        }
        for (key, t) in model.state_dict() {
            let what = format!("{name}.{key}");
            match fx.try_tensor(case, &what) {
                Some(expected) => assert_tensor_close(&what, &t, &expected, RTOL, ATOL),
                None if name == "swa" => assert_eq!(
                    t.item().unwrap(),
                    fx.tensor(case, "swa_batches").to_vec()[0],
                    "{what}: update_bn counts its batches"
                ),
                None => assert!(
                    key.ends_with("num_batches_tracked"),
                    "no reference for {what}"
                ),
            }
        }
        let logits = convnet::no_grad(|| model.forward(&x_test, Mode::Eval)).unwrap();
        let what = format!("{name}_logits");
        assert_tensor_close(&what, &logits, &fx.tensor(case, &what), RTOL, ATOL);
    }
}

#[test]
fn summary_lists_every_layer_with_shapes_and_parameter_counts() {
    let model = tutorial_cnn();
    assert_eq!(model.num_parameters(), 545_098);
    let s = model.summary();
    assert!(s.contains("fc1 (Linear)"), "{s}");
    assert!(s.contains("[1, 64, 8, 8]"), "{s}");
    assert!(s.contains("Trainable params: 545098"), "{s}");
    let rows = model.summary_rows();
    assert_eq!(rows.iter().map(|r| r.params).sum::<usize>(), 545_098);
    let resnet = small_resnet();
    let names: Vec<&str> = resnet
        .summary_rows()
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(names.contains(&"layer2.0.downsample.0"), "{names:?}");
    let _ = nn::named_parameters(resnet.net());
}
