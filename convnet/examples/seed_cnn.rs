//! The PyTorch CNN tutorial's program, in Rust: define `CNNModel`, train it 10 iterations
//! with cross-entropy and SGD(lr=0.01) on a random batch of 64 images, then evaluate on a
//! random test batch of 16, printing the losses.
//!
//! Run: `cargo run --release --example seed_cnn`

use convnet::nn::{Conv2d, Flatten, Linear, MaxPool2d, Mode, Model, ReLU, Sequential};
use convnet::optim::{Optimizer, Sgd, SgdConfig};
use convnet::{no_grad, Reduction, Rng, Tensor};

/// The tutorial's `CNNModel`: conv1 3->32 k3 p1, pool1, conv2 32->64 k3 p1, pool2, fc1, fc2
/// 128->10, ReLU after each conv and fc1. `flatten_features` is what fc1 expects.
fn cnn_model(flatten_features: usize, image_hw: usize) -> convnet::Result<Model> {
    Sequential::new()
        .add("conv1", Conv2d::new(3, 32, 3).padding(1).build()?)
        .add("relu1", ReLU)
        .add("pool1", MaxPool2d::new(2))
        .add("conv2", Conv2d::new(32, 64, 3).padding(1).build()?)
        .add("relu2", ReLU)
        .add("pool2", MaxPool2d::new(2))
        .add("flatten", Flatten::new())
        .add("fc1", Linear::new(flatten_features, 128)?)
        .add("relu3", ReLU)
        .add("fc2", Linear::new(128, 10)?)
        .build(&[3, image_hw, image_hw])
}

fn main() -> convnet::Result<()> {
    convnet::manual_seed(0);
    let mut rng = Rng::new(0);

    // The tutorial sizes fc1 for 28x28 images (64*7*7); with 32x32 images that is caught
    // when the model is built.
    match cnn_model(64 * 7 * 7, 32) {
        Err(e) => println!("The tutorial's flatten size is rejected for 32x32 input:\n  {e}\n"),
        Ok(_) => unreachable!("64*7*7 cannot fit 32x32 images"),
    }

    let model = cnn_model(64 * 8 * 8, 32)?;
    println!("{}\n", model.summary());

    let mut optimizer = Sgd::new(
        model.named_parameters(),
        SgdConfig {
            lr: 0.01,
            ..Default::default()
        },
    )?;
    let inputs = Tensor::randn([64, 3, 32, 32], &mut rng);
    let labels: Vec<usize> = (0..64).map(|_| rng.below(10) as usize).collect();

    for epoch in 0..10 {
        let outputs = model.forward(&inputs, Mode::Train)?;
        let loss = outputs.cross_entropy(&labels, Reduction::Mean, 0.0)?;
        let grads = loss.backward()?;
        optimizer.step(&grads)?;
        println!("Epoch {}, Loss: {}", epoch + 1, loss.item()?);
    }

    let test_inputs = Tensor::randn([16, 3, 32, 32], &mut rng);
    let test_labels: Vec<usize> = (0..16).map(|_| rng.below(10) as usize).collect();
    let test_loss = no_grad(|| {
        model
            .forward(&test_inputs, Mode::Eval)?
            .cross_entropy(&test_labels, Reduction::Mean, 0.0)
    })?;
    println!("Test Loss: {}", test_loss.item()?);
    Ok(())
}
