//! The model zoo: built-in architectures by name, sized from the data.
//!
//! - `seed-cnn`: the PyTorch tutorial's CNN (two conv 3x3 + ReLU + max-pool 2 stages, 32
//!   and 64 channels, then fc1 -> 128 -> classes). fc1's input size follows the image size:
//!   64*8*8 for 32x32 CIFAR images, 64*7*7 for 28x28 MNIST digits.
//! - `lenet5`: LeCun's LeNet-5 with ReLU and max pooling (6 and 16 channels of 5x5, then
//!   120-84-classes); 28x28 inputs get padding 2 on the first convolution.
//! - `resnet20`: the CIFAR ResNet-20 of He et al. (2016): 3 stages of 3 basic blocks with
//!   16/32/64 channels, BatchNorm, parameter-free option-A shortcuts, global average pooling.

use crate::error::{invalid, Error, Result};
use crate::nn::{
    AdaptiveAvgPool2d, BasicBlock, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, Model, Module,
    ReLU, Sequential, Shortcut,
};

/// Names and one-line descriptions of the built-in architectures.
pub const ARCHITECTURES: [(&str, &str); 3] = [
    ("seed-cnn", "the PyTorch CNN tutorial's model: 2x (conv3x3 + ReLU + maxpool2), fc 128, fc classes"),
    ("lenet5", "LeNet-5: conv5x5 6 + pool, conv5x5 16 + pool, fc 120, fc 84, fc classes"),
    ("resnet20", "CIFAR ResNet-20 (He et al. 2016): 3x3 basic-block stages of 16/32/64 channels, BatchNorm, option-A shortcuts"),
];

/// Flattened feature count of `features` for input `[C, H, W]`.
fn features_out(name: &str, features: &Sequential, input: [usize; 3]) -> Result<usize> {
    let s = features
        .output_shape(&[1, input[0], input[1], input[2]])
        .map_err(|e| match e {
            Error::Layer { layer, kind, msg } => Error::Layer {
                layer,
                kind,
                msg: format!("{msg}; {name} cannot take {}x{} images", input[1], input[2]),
            },
            other => other,
        })?;
    Ok(s.dims()[1..].iter().product())
}

fn seed_cnn(input: [usize; 3], classes: usize) -> Result<Model> {
    let conv = || -> Result<Sequential> {
        Ok(Sequential::new()
            .add("conv1", Conv2d::new(input[0], 32, 3).padding(1).build()?)
            .add("relu1", ReLU)
            .add("pool1", MaxPool2d::new(2))
            .add("conv2", Conv2d::new(32, 64, 3).padding(1).build()?)
            .add("relu2", ReLU)
            .add("pool2", MaxPool2d::new(2)))
    };
    let flat = features_out("seed-cnn", &conv()?, input)?;
    conv()?
        .add("flatten", Flatten::new())
        .add("fc1", Linear::new(flat, 128)?)
        .add("relu3", ReLU)
        .add("fc2", Linear::new(128, classes)?)
        .build(&input)
}

fn lenet5(input: [usize; 3], classes: usize) -> Result<Model> {
    let pad = if input[1] == 28 && input[2] == 28 {
        2
    } else {
        0
    };
    let conv = || -> Result<Sequential> {
        Ok(Sequential::new()
            .add("conv1", Conv2d::new(input[0], 6, 5).padding(pad).build()?)
            .add("relu1", ReLU)
            .add("pool1", MaxPool2d::new(2))
            .add("conv2", Conv2d::new(6, 16, 5).build()?)
            .add("relu2", ReLU)
            .add("pool2", MaxPool2d::new(2)))
    };
    let flat = features_out("lenet5", &conv()?, input)?;
    conv()?
        .add("flatten", Flatten::new())
        .add("fc1", Linear::new(flat, 120)?)
        .add("relu3", ReLU)
        .add("fc2", Linear::new(120, 84)?)
        .add("relu4", ReLU)
        .add("fc3", Linear::new(84, classes)?)
        .build(&input)
}

fn resnet_cifar(input: [usize; 3], classes: usize, blocks: usize) -> Result<Model> {
    let mut net = Sequential::new()
        .add(
            "conv1",
            Conv2d::new(input[0], 16, 3)
                .padding(1)
                .bias(false)
                .build()?,
        )
        .add("bn1", BatchNorm2d::new(16)?)
        .add("relu", ReLU);
    let mut in_planes = 16;
    for (stage, planes) in [16, 32, 64].into_iter().enumerate() {
        let mut layer = Sequential::new();
        for b in 0..blocks {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            layer = layer.push(BasicBlock::new(
                in_planes,
                planes,
                stride,
                Shortcut::PadChannels,
            )?);
            in_planes = planes;
        }
        net = net.add(format!("layer{}", stage + 1), layer);
    }
    net.add("avgpool", AdaptiveAvgPool2d::new(1, 1))
        .add("flatten", Flatten::new())
        .add("fc", Linear::new(64, classes)?)
        .build(&input)
}

/// Builds architecture `name` for inputs `[C, H, W]` and `num_classes` outputs, initialised
/// from the global generator.
///
/// ```
/// let m = convnet::models::build("seed-cnn", [1, 28, 28], 10)?;
/// assert_eq!(m.named_parameters()[4].1.dims(), &[128, 64 * 7 * 7]); // fc1.weight
/// assert!(convnet::models::build("vgg99", [3, 32, 32], 10).is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn build(name: &str, input: [usize; 3], num_classes: usize) -> Result<Model> {
    if num_classes == 0 {
        return Err(invalid("models::build", "num_classes must be positive"));
    }
    match name {
        "seed-cnn" => seed_cnn(input, num_classes),
        "lenet5" => lenet5(input, num_classes),
        "resnet20" => resnet_cifar(input, num_classes, 3),
        _ => Err(invalid(
            "models::build",
            format!(
                "unknown model {name:?}; available: {}",
                ARCHITECTURES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
