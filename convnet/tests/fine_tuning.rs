//! Fine-tuning in the library: frozen parameters get no gradient and no optimizer state and
//! stay bit-identical through an epoch, frozen BatchNorm layers keep their running
//! statistics (eval mode inside a training pass); parameter groups take exactly the steps
//! separate optimizers at their rates would; resize and random resized crops give the
//! shapes the model needs.

use convnet::data::{
    Augment, DataLoader, ImageDataset, LoaderConfig, Normalize, RandomResizedCrop, ResizeCrop,
    Transform,
};
use convnet::optim::{Adam, AdamConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
use convnet::train::{OptimizerKind, TrainConfig, Trainer};
use convnet::{Rng, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// 64 random 3x16x16 images of 4 classes.
fn loader(augment: Option<Augment>) -> DataLoader {
    let mut rng = Rng::new(5);
    let pixels: Vec<u8> = (0..64 * 3 * 16 * 16)
        .map(|_| rng.below(256) as u8)
        .collect();
    let labels: Vec<u32> = (0..64).map(|i| i % 4).collect();
    let classes = (0..4).map(|c| c.to_string()).collect();
    let data = ImageDataset::new(pixels, labels, [3, 16, 16], classes, "memory").unwrap();
    DataLoader::new(
        Arc::new(data),
        Transform {
            normalize: Normalize::cifar10(),
            augment,
        },
        LoaderConfig {
            batch_size: 16,
            ..Default::default()
        },
    )
    .unwrap()
}

fn snapshot(trainer: &Trainer) -> HashMap<String, Vec<u32>> {
    trainer
        .model()
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n, t.to_vec().iter().map(|v| v.to_bits()).collect()))
        .collect()
}

#[test]
fn frozen_layers_and_their_batch_norms_stay_bit_identical_through_an_epoch() {
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        convnet::manual_seed(0);
        let model = convnet::models::build("resnet20", [3, 16, 16], 4).unwrap();
        let frozen = model
            .freeze(&["conv1".into(), "bn1".into(), "layer1".into()])
            .unwrap();
        assert_eq!(frozen.len(), 3 + 3 * 6, "{frozen:?}");
        let cfg = TrainConfig {
            optimizer,
            epochs: 1,
            lr: 0.05,
            weight_decay: 5e-4,
            nesterov: optimizer == OptimizerKind::Sgd,
            ..Default::default()
        };
        let train = loader(None);
        let mut trainer = Trainer::new(model, cfg, train.num_batches()).unwrap();
        trainer.keep_gradients(true);
        let before = snapshot(&trainer);
        trainer.train_epoch(&train, &mut |_| {}).unwrap();
        let after = snapshot(&trainer);
        let is_frozen = |name: &str| {
            ["conv1.", "bn1.", "layer1."]
                .iter()
                .any(|p| name.starts_with(p))
        };
        for (name, values) in &after {
            if is_frozen(name) {
                // Weights, biases, running statistics and the batch counter alike.
                assert_eq!(
                    values, &before[name],
                    "{optimizer:?}: frozen {name} changed"
                );
            } else if !name.ends_with("num_batches_tracked") {
                assert_ne!(
                    values, &before[name],
                    "{optimizer:?}: trained {name} did not change"
                );
            }
        }
        assert_eq!(
            after["layer2.0.bn1.num_batches_tracked"],
            vec![4f32.to_bits()]
        );
        // No gradient and no optimizer state for a frozen parameter.
        let grads = trainer.last_gradients().expect("kept");
        assert!(!grads.is_empty());
        assert!(grads.iter().all(|(n, _)| !is_frozen(n)), "{optimizer:?}");
        let state = std::env::temp_dir().join(format!(
            "convnet-fine-tuning-{}-{optimizer:?}.safetensors",
            std::process::id()
        ));
        trainer.save_state(&state, &HashMap::new()).unwrap();
        let (saved, _) = convnet::checkpoint::load_tensors(&state).unwrap();
        let _ = std::fs::remove_file(&state);
        let optimizer_state: Vec<&String> = saved
            .iter()
            .map(|(n, _)| n)
            .filter(|n| !n.starts_with("model/"))
            .collect();
        assert!(!optimizer_state.is_empty());
        assert!(
            optimizer_state.iter().all(|n| !is_frozen(n)),
            "{optimizer:?}: {optimizer_state:?}"
        );
    }
}

#[test]
fn a_frozen_batch_norm_normalises_with_its_running_statistics() {
    convnet::manual_seed(1);
    let model = convnet::models::build("resnet20", [3, 8, 8], 4).unwrap();
    let (_, mean) = model
        .state_dict()
        .into_iter()
        .find(|(n, _)| n == "bn1.running_mean")
        .unwrap();
    mean.copy_from_slice(&[0.5; 16]).unwrap();
    let x = Tensor::randn([2, 3, 8, 8], &mut Rng::new(2));
    let eval = model.forward(&x, convnet::nn::Mode::Eval).unwrap().to_vec();
    model.freeze_backbone().unwrap();
    // Everything before the classifier is frozen: a training pass computes what eval does.
    let train = model
        .forward(&x, convnet::nn::Mode::Train)
        .unwrap()
        .to_vec();
    assert_eq!(train, eval);
}

#[test]
fn a_frozen_batch_norm1d_keeps_eval_mode_too() {
    let text = r#"
name = "seq"
input = [4, 12]
[[layer]]
type = "conv1d"
name = "conv"
out_channels = 6
kernel_size = 3
[[layer]]
type = "batchnorm1d"
name = "bn"
[[layer]]
type = "relu"
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
name = "fc"
out_features = "classes"
"#;
    let spec = convnet::model_file::ModelFile::from_toml(text, "seq.toml").unwrap();
    convnet::manual_seed(3);
    let model = spec.build_for(&[4, 12], 3).unwrap();
    let x = Tensor::randn([5, 4, 12], &mut Rng::new(4));
    let eval = model.forward(&x, convnet::nn::Mode::Eval).unwrap().to_vec();
    model.freeze_backbone().unwrap();
    let train = model
        .forward(&x, convnet::nn::Mode::Train)
        .unwrap()
        .to_vec();
    assert_eq!(train, eval);
    let (_, mean) = model
        .state_dict()
        .into_iter()
        .find(|(n, _)| n == "bn.running_mean")
        .unwrap();
    assert_eq!(mean.to_vec(), vec![0.0; 6], "running statistics left alone");
}

#[test]
fn unknown_prefixes_and_models_without_a_classifier_are_errors() {
    let model = convnet::models::build("seed-cnn", [3, 32, 32], 10).unwrap();
    let err = model.freeze(&["conv".into()]).unwrap_err().to_string();
    assert!(
        err.contains("\"conv\" names no parameter") && err.contains("conv1, conv2, fc1, fc2"),
        "{err}"
    );
    // A buffer is not a parameter.
    let resnet = convnet::models::build("resnet20", [3, 32, 32], 10).unwrap();
    assert!(resnet.freeze(&["bn1.running_mean".into()]).is_err());
    let no_linear = convnet::nn::Sequential::new()
        .add("conv", convnet::nn::Conv2d::new(3, 4, 3).build().unwrap())
        .build(&[3, 8, 8])
        .unwrap();
    let err = no_linear.freeze_backbone().unwrap_err().to_string();
    assert!(err.contains("no Linear layer"), "{err}");
    // Everything frozen: nothing to train.
    resnet
        .freeze(&[
            "conv1".into(),
            "bn1".into(),
            "layer1".into(),
            "layer2".into(),
            "layer3".into(),
            "fc".into(),
        ])
        .unwrap();
    let err = Trainer::new(resnet, TrainConfig::default(), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("every parameter of the model is frozen"),
        "{err}"
    );
}

/// Parameters and gradients for the group checks: two of each shape.
fn params(seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut rng = Rng::new(seed);
    let p: Vec<Tensor> = (0..4)
        .map(|i| Tensor::randn([3 + i, 5], &mut rng).requires_grad())
        .collect();
    let g: Vec<Tensor> = p
        .iter()
        .map(|t| Tensor::randn(t.shape().clone(), &mut rng))
        .collect();
    (p, g)
}

/// Runs `steps` steps of `opt` with gradients `g` (the same each step) on `p`.
fn run(opt: &mut dyn Optimizer, p: &[Tensor], g: &[Tensor], steps: usize) {
    for step in 0..steps {
        // A schedule moves the rate: every group follows.
        opt.set_lr(0.1 / (1.0 + step as f64));
        let mut grads = convnet::GradStore::default();
        for (p, g) in p.iter().zip(g) {
            grads.insert(p, g.clone()).unwrap();
        }
        opt.step(&grads).unwrap();
    }
}

fn bits(ts: &[Tensor]) -> Vec<Vec<u32>> {
    ts.iter()
        .map(|t| t.to_vec().iter().map(|v| v.to_bits()).collect())
        .collect()
}

#[test]
fn parameter_groups_step_exactly_as_optimizers_at_their_own_rates() {
    let scale = 0.25;
    type Make = fn(Vec<ParamGroup>, f64) -> Box<dyn Optimizer>;
    let makers: [(&str, Make); 3] = [
        ("sgd nesterov", |g, lr| {
            let cfg = SgdConfig {
                lr,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
                dampening: 0.0,
            };
            Box::new(Sgd::with_groups(g, cfg).unwrap())
        }),
        ("adam", |g, lr| {
            let cfg = AdamConfig {
                lr,
                weight_decay: 1e-2,
                ..Default::default()
            };
            Box::new(Adam::with_groups(g, cfg).unwrap())
        }),
        ("adamw", |g, lr| {
            let cfg = AdamConfig {
                lr,
                ..AdamConfig::adamw()
            };
            Box::new(Adam::with_groups(g, cfg).unwrap())
        }),
    ];
    for (name, make) in makers {
        let named = |ts: &[Tensor], from: usize| -> Vec<(String, Tensor)> {
            ts.iter()
                .enumerate()
                .map(|(i, t)| (format!("p{}", from + i), t.clone()))
                .collect()
        };
        // Grouped: the first two at `scale` times the rate.
        let (p, g) = params(3);
        let mut grouped = make(
            vec![
                ParamGroup::new(named(&p[..2], 0)).lr_scale(scale),
                ParamGroup::new(named(&p[2..], 2)),
            ],
            0.1,
        );
        run(grouped.as_mut(), &p, &g, 5);
        // Separate optimizers, the first at the scaled rates throughout.
        let (q, h) = params(3);
        let mut slow = make(vec![ParamGroup::new(named(&q[..2], 0))], 0.1);
        let mut fast = make(vec![ParamGroup::new(named(&q[2..], 2))], 0.1);
        for step in 0..5 {
            let lr = 0.1 / (1.0 + step as f64);
            slow.set_lr(lr * scale);
            fast.set_lr(lr);
            for (opt, range) in [(&mut slow, 0..2), (&mut fast, 2..4)] {
                let mut grads = convnet::GradStore::default();
                for i in range {
                    grads.insert(&q[i], h[i].clone()).unwrap();
                }
                opt.step(&grads).unwrap();
            }
        }
        assert_eq!(bits(&p), bits(&q), "{name}");
        // The state is named per parameter, as without groups.
        let names: Vec<String> = grouped.state_dict().into_iter().map(|(n, _)| n).collect();
        assert!(
            names.iter().any(|n| n.starts_with("p0.")),
            "{name}: {names:?}"
        );
    }
    let bad = Sgd::with_groups(
        vec![ParamGroup::new(Vec::new()).lr_scale(f64::NAN)],
        SgdConfig::default(),
    );
    assert!(bad.is_err());
}

#[test]
fn backbone_rate_applies_to_everything_but_the_classifier() {
    // lr 0 for the backbone: only the classifier moves.
    convnet::manual_seed(0);
    let model = convnet::models::build("seed-cnn", [3, 16, 16], 4).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        lr: 0.05,
        backbone_lr: Some(0.0),
        ..Default::default()
    };
    let train = loader(None);
    let mut trainer = Trainer::new(model, cfg, train.num_batches()).unwrap();
    let before = snapshot(&trainer);
    trainer.train_epoch(&train, &mut |_| {}).unwrap();
    let after = snapshot(&trainer);
    for (name, values) in &after {
        if name.starts_with("fc2.") {
            assert_ne!(values, &before[name], "{name}");
        } else {
            assert_eq!(values, &before[name], "{name}");
        }
    }
    let model = convnet::models::build("seed-cnn", [3, 16, 16], 4).unwrap();
    let cfg = TrainConfig {
        lr: 0.0,
        backbone_lr: Some(0.01),
        ..Default::default()
    };
    assert!(Trainer::new(model, cfg, 1).is_err());
}

#[test]
fn random_resized_crops_give_the_model_its_size() {
    let train = loader(Some(Augment::resized_crop(12)));
    let batch = train.make_batch(0, &[0, 1, 2], 3).unwrap();
    assert_eq!(batch.images.dims(), &[3, 3, 12, 12]);
    // Deterministic under the seed, different from image to image.
    let again = train.make_batch(0, &[0, 1, 2], 3).unwrap();
    assert_eq!(batch.images.to_vec(), again.images.to_vec());
    // The windows torchvision's rule allows: within the image, 8-100% of its area (up to
    // rounding), aspect 3/4-4/3 (or the whole image when ten tries fail).
    let rrc = RandomResizedCrop::new(12);
    let mut rng = Rng::new(11);
    let mut areas = Vec::new();
    for _ in 0..500 {
        let (top, left, h, w) = rrc.window(40, 60, &mut rng);
        assert!(top + h <= 40 && left + w <= 60);
        let aspect = w as f64 / h as f64;
        assert!((0.70..=1.45).contains(&aspect), "{aspect}");
        areas.push((h * w) as f64 / 2400.0);
    }
    let small = areas.iter().filter(|&&a| a < 0.3).count();
    assert!(
        small > 100,
        "areas spread from 8% up: {small} of 500 below 30%"
    );
    // Resize + centre crop of a stored set.
    let data = loader(None).images().unwrap().clone();
    let resized = data.resized(ResizeCrop::new(20, 18).unwrap()).unwrap();
    assert_eq!(resized.image_shape(), [3, 18, 18]);
    assert_eq!(resized.labels(), data.labels());
}
