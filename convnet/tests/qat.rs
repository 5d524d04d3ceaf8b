//! Quantization-aware training end to end: a QAT network trains (the loss falls), keeps
//! the float model's parameter names, stops its observers and BatchNorm statistics when
//! frozen, and converts to an int8 model that computes what the QAT network computes in
//! eval mode (same predictions on at least 99% of a batch).

use convnet::data::{DataLoader, ImageDataset, LoaderConfig, Normalize, Transform};
use convnet::nn::Mode;
use convnet::quant::qat::QatNet;
use convnet::train::{TrainConfig, Trainer};
use convnet::Rng;
use std::sync::Arc;

fn data(n: usize, seed: u64) -> Arc<ImageDataset> {
    let mut rng = Rng::new(seed);
    // Ten classes told apart by which quadrant is bright, plus noise.
    let mut pixels = Vec::new();
    let labels: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
    for &l in &labels {
        for c in 0..3 {
            for y in 0..16 {
                for x in 0..16 {
                    let on = ((y / 8) * 2 + x / 8) as u32 == l % 4 && (c as u32) <= l / 4;
                    pixels.push(if on { 200 } else { 40 } + rng.below(40) as u8);
                }
            }
        }
    }
    Arc::new(
        ImageDataset::new(
            pixels,
            labels,
            [3, 16, 16],
            (0..10).map(|i| i.to_string()).collect(),
            "quadrants",
        )
        .unwrap(),
    )
}

fn loader(n: usize, seed: u64) -> DataLoader {
    DataLoader::new(
        data(n, seed),
        Transform {
            normalize: Normalize::default_for(3),
            augment: None,
        },
        LoaderConfig {
            batch_size: 32,
            shuffle: true,
            seed,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn qat_trains_freezes_and_converts_to_what_it_computes() {
    convnet::manual_seed(0);
    let text = r#"
name = "small"
[[layer]]
type = "conv2d"
out_channels = 16
kernel_size = 3
padding = 1
bias = false
[[layer]]
type = "batchnorm2d"
[[layer]]
type = "relu6"
[[layer]]
type = "basic_block"
out_channels = 32
stride = 2
[[layer]]
type = "adaptive_avgpool2d"
output_size = 1
[[layer]]
type = "flatten"
[[layer]]
type = "dropout"
p = 0.1
[[layer]]
type = "linear"
out_features = "classes"
"#;
    let spec = convnet::model_file::ModelFile::from_toml(text, "small.toml").unwrap();
    let float = spec.build([3, 16, 16], 10).unwrap();
    let names: Vec<String> = float.state_dict().into_iter().map(|(n, _)| n).collect();
    let model = QatNet::new(float).unwrap().into_model().unwrap();
    assert_eq!(
        model
            .state_dict()
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>(),
        names,
        "QAT keeps the state_dict names"
    );
    let train = loader(320, 1);
    let cfg = TrainConfig {
        lr: 0.05,
        epochs: 4,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, cfg, train.num_batches()).unwrap();
    let first = trainer.train_epoch(&train, &mut |_| {}).unwrap().loss;
    trainer.train_epoch(&train, &mut |_| {}).unwrap();
    let qat = QatNet::of(trainer.model()).expect("a QAT network");
    let ranges = qat.ranges();
    assert!(
        ranges
            .iter()
            .all(|(lo, hi)| lo.is_finite() && hi.is_finite() && lo <= hi),
        "{ranges:?}"
    );
    // Frozen: observers and BatchNorm statistics stay as they are while the weights train.
    qat.freeze(true);
    let stats = |m: &convnet::nn::Model| -> Vec<f32> {
        m.state_dict()
            .into_iter()
            .filter(|(n, _)| n.contains("running"))
            .flat_map(|(_, t)| t.to_vec())
            .collect()
    };
    let before = stats(trainer.model());
    let last = trainer.train_epoch(&train, &mut |_| {}).unwrap().loss;
    assert!(last < first, "QAT trains: loss {first} -> {last}");
    let qat = QatNet::of(trainer.model()).unwrap();
    assert_eq!(qat.ranges(), ranges, "frozen observers do not move");
    assert_eq!(
        stats(trainer.model()),
        before,
        "frozen BatchNorm statistics do not move"
    );
    // The int8 model computes what the QAT network computes in eval mode.
    let q = qat.convert().unwrap();
    assert_eq!(q.int8_layers(), 5, "{:?}", q.notes());
    let test = DataLoader::for_evaluation(data(64, 9), Normalize::default_for(3)).unwrap();
    let x = test.epoch(0).next().unwrap().unwrap().images;
    let fake = convnet::no_grad(|| trainer.model().forward(&x, Mode::Eval))
        .unwrap()
        .to_vec();
    let int8 = q.run(&x).unwrap().to_vec();
    let arg = |r: &[f32]| {
        r.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    let agree = fake
        .chunks(10)
        .zip(int8.chunks(10))
        .filter(|(a, b)| arg(a) == arg(b))
        .count();
    assert!(agree * 100 >= 32 * 99, "{agree} of 32 predictions agree");
    let span = fake.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = fake
        .iter()
        .zip(&int8)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("worst logit difference {worst} (span {span})");
    assert!(
        worst <= 0.02 * span,
        "worst logit difference {worst} (span {span})"
    );
}
