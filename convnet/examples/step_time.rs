//! Times the tutorial CNN's training step (forward, cross-entropy, backward, SGD momentum)
//! on random data: median over 30 steps after 5 warm-up steps. Compare with
//! `tools/bench/step_time.py`, run right after on the same machine.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo run --release --example step_time -- 64`

use convnet::nn::{Conv2d, Flatten, Linear, MaxPool2d, Mode, ReLU, Sequential};
use convnet::optim::{Optimizer, Sgd, SgdConfig};
use convnet::{Reduction, Rng, Tensor};
use std::time::Instant;

fn main() -> convnet::Result<()> {
    let batch: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let model = Sequential::new()
        .add("conv1", Conv2d::new(3, 32, 3).padding(1).build()?)
        .add("relu1", ReLU)
        .add("pool1", MaxPool2d::new(2))
        .add("conv2", Conv2d::new(32, 64, 3).padding(1).build()?)
        .add("relu2", ReLU)
        .add("pool2", MaxPool2d::new(2))
        .add("flatten", Flatten::new())
        .add("fc1", Linear::new(64 * 8 * 8, 128)?)
        .add("relu3", ReLU)
        .add("fc2", Linear::new(128, 10)?)
        .build(&[3, 32, 32])?;
    let mut opt = Sgd::new(
        model.named_parameters(),
        SgdConfig {
            lr: 0.01,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(0);
    let x = Tensor::randn([batch, 3, 32, 32], &mut rng);
    let y: Vec<usize> = (0..batch).map(|_| rng.below(10) as usize).collect();
    let mut times = Vec::new();
    for i in 0..35 {
        let t0 = Instant::now();
        let loss = model
            .forward(&x, Mode::Train)?
            .cross_entropy(&y, Reduction::Mean, 0.0)?;
        let grads = loss.backward()?;
        opt.step(&grads)?;
        if i >= 5 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{{\"framework\": \"convnet\", \"model\": \"seed-cnn\", \"batch\": {batch}, \"threads\": {}, \"step_ms\": {:.3}, \"images_per_sec\": {:.1}}}",
        rayon::current_num_threads(),
        median * 1e3,
        batch as f64 / median
    );
    Ok(())
}
