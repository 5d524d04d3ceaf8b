//! The model zoo: built-in architectures by name, sized from the data.
//!
//! Every architecture takes its input size `[C, H, W]` and class count as parameters; a
//! size an architecture cannot take is an error naming the layer that fails. `state_dict`
//! names follow the PyTorch reference implementations, so weights move both ways:
//!
//! - `seed-cnn`: the PyTorch tutorial's CNN (two conv 3x3 + ReLU + max-pool 2 stages, 32
//!   and 64 channels, then fc1 -> 128 -> classes). fc1's input size follows the image size:
//!   64*8*8 for 32x32 CIFAR images, 64*7*7 for 28x28 MNIST digits.
//! - `lenet5`: LeCun's LeNet-5 with ReLU and max pooling (6 and 16 channels of 5x5, then
//!   120-84-classes); 28x28 inputs get padding 2 on the first convolution.
//! - `resnet20`, `resnet32`, `resnet56`: the CIFAR ResNets of He et al. (2016): 3 stages of
//!   3/5/9 basic blocks with 16/32/64 channels, BatchNorm, parameter-free option-A
//!   shortcuts, global average pooling.
//! - `vgg11-bn`, `vgg16-bn`: torchvision's VGG feature stacks (configurations A and D with
//!   BatchNorm, names `features.N`) with a CIFAR-sized classifier: one `classifier` Linear
//!   from the last feature map (512 x H/32 x W/32).
//! - `resnet18`, `resnet34`, `resnet50`: torchvision's ResNets (ImageNet stem: 7x7/2
//!   convolution and 3x3/2 max-pool; basic blocks or bottlenecks with projection
//!   shortcuts), 1000 classes and 224x224 by default; `-cifar` variants replace the stem by
//!   a 3x3/1 convolution without max-pool, for 32x32 images.
//! - `mobilenet_v2`: torchvision's MobileNetV2 (width 1.0): inverted residual blocks with
//!   depthwise convolutions and ReLU6, dropout 0.2 before the classifier.
//!
//! The torchvision architectures start from torchvision's initialisation (Kaiming-normal
//! convolutions in fan-out mode, zero biases; VGG and MobileNet classifiers from N(0, 0.01)).

mod m5;

use crate::data::Normalize;
use crate::error::{invalid, Error, Result};
use crate::nn::{
    conv_bn_relu6, AdaptiveAvgPool2d, BasicBlock, BatchNorm2d, Bottleneck, Conv2d, ConvBank1d,
    Dropout, Embedding, Flatten, InvertedResidual, Linear, MaxPool2d, Model, Module, Permute, ReLU,
    Sequential, Shortcut,
};
use crate::rng::with_global_rng;
use crate::tensor::MaxPool2dParams;

/// What an architecture reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Images `[C, H, W]`.
    Image,
    /// Token ids `[L]` of a vocabulary whose size the model needs (see [`build_for`]).
    Tokens,
    /// Signals `[C, L]` (audio samples).
    Signal,
}

/// A built-in architecture and its defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Architecture {
    /// Name used by `--model`.
    pub name: &'static str,
    /// One-line description.
    pub description: &'static str,
    /// What it reads.
    pub input: InputKind,
    /// Input it is designed for (`[C, H, W]`, `[L]` or `[C, L]`, batch excluded).
    pub default_input: &'static [usize],
    /// Class count of its usual data set.
    pub default_classes: usize,
    /// True for the ImageNet-stem torchvision models, which expect ImageNet normalisation.
    pub imagenet: bool,
}

impl Architecture {
    /// The input normalisation the architecture's weights expect for `channels` channels:
    /// ImageNet's for ImageNet models, else the data set default (CIFAR-10 or MNIST).
    pub fn default_normalize(&self, channels: usize) -> Normalize {
        if self.imagenet && channels == 3 {
            Normalize::imagenet()
        } else {
            Normalize::default_for(channels)
        }
    }
}

const fn arch(
    name: &'static str,
    description: &'static str,
    default_input: &'static [usize; 3],
    default_classes: usize,
    imagenet: bool,
) -> Architecture {
    Architecture {
        name,
        description,
        input: InputKind::Image,
        default_input,
        default_classes,
        imagenet,
    }
}

const CIFAR: &[usize; 3] = &[3, 32, 32];
const IMAGENET: &[usize; 3] = &[3, 224, 224];

/// The vocabulary size `convnet models` and `summary` count a text model's parameters at
/// when no data says otherwise.
pub const DEFAULT_VOCABULARY: usize = 20_000;

/// The built-in architectures, in the order `convnet models` lists them.
pub const ARCHITECTURES: &[Architecture] = &[
    arch("seed-cnn", "the PyTorch CNN tutorial's model: 2x (conv3x3 + ReLU + maxpool2), fc 128, fc classes", CIFAR, 10, false),
    arch("lenet5", "LeNet-5: conv5x5 6 + pool, conv5x5 16 + pool, fc 120, fc 84, fc classes", &[1, 28, 28], 10, false),
    arch("resnet20", "CIFAR ResNet-20 (He et al. 2016): 3x3 basic-block stages of 16/32/64 channels, option-A shortcuts", CIFAR, 10, false),
    arch("resnet32", "CIFAR ResNet-32: 3x5 basic blocks of 16/32/64 channels, option-A shortcuts", CIFAR, 10, false),
    arch("resnet56", "CIFAR ResNet-56: 3x9 basic blocks of 16/32/64 channels, option-A shortcuts", CIFAR, 10, false),
    arch("vgg11-bn", "VGG-11 with BatchNorm (torchvision features, config A), CIFAR classifier", CIFAR, 10, false),
    arch("vgg16-bn", "VGG-16 with BatchNorm (torchvision features, config D), CIFAR classifier", CIFAR, 10, false),
    arch("resnet18", "torchvision ResNet-18: ImageNet stem, basic blocks [2, 2, 2, 2]", IMAGENET, 1000, true),
    arch("resnet34", "torchvision ResNet-34: ImageNet stem, basic blocks [3, 4, 6, 3]", IMAGENET, 1000, true),
    arch("resnet50", "torchvision ResNet-50: ImageNet stem, bottlenecks [3, 4, 6, 3]", IMAGENET, 1000, true),
    arch("resnet18-cifar", "ResNet-18 with a CIFAR stem (3x3/1 conv, no max-pool)", CIFAR, 10, false),
    arch("resnet34-cifar", "ResNet-34 with a CIFAR stem (3x3/1 conv, no max-pool)", CIFAR, 10, false),
    arch("resnet50-cifar", "ResNet-50 with a CIFAR stem (3x3/1 conv, no max-pool)", CIFAR, 10, false),
    arch("mobilenet_v2", "torchvision MobileNetV2 (width 1.0): inverted residuals, depthwise convs, ReLU6", IMAGENET, 1000, true),
    Architecture {
        name: "text-cnn",
        description: "Kim (2014) CNN for text: embedding 128, Conv1d widths 3/4/5 x 100 maps, ReLU, max over time, dropout 0.5, fc classes",
        input: InputKind::Tokens,
        default_input: &[200],
        default_classes: 2,
        imagenet: false,
    },
    Architecture {
        name: "m5",
        description: "M5 (Dai et al. 2017) for raw audio: Conv1d 80/4 then 3-tap stages of 128/128/256/512 maps with BatchNorm and max-pool 4, global average pool, fc classes",
        input: InputKind::Signal,
        default_input: &[1, 8000],
        default_classes: 10,
        imagenet: false,
    },
];

/// Looks up a built-in architecture by name.
///
/// ```
/// let a = convnet::models::architecture("resnet18")?;
/// assert_eq!((a.default_input, a.default_classes), (&[3, 224, 224][..], 1000));
/// assert!(convnet::models::architecture("vgg99").is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn architecture(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| {
            invalid(
                "models",
                format!(
                    "unknown model {name:?}; available: {}",
                    ARCHITECTURES
                        .iter()
                        .map(|a| a.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
}

/// Flattened feature count of `features` for input `[C, H, W]`.
fn features_out(name: &str, features: &Sequential, input: [usize; 3]) -> Result<usize> {
    let s = with_size_hint(
        name,
        input,
        features.output_shape(&[1, input[0], input[1], input[2]]),
    )?;
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

/// VGG configurations: output channels of each 3x3 convolution, 0 for a 2x2 max-pool.
const VGG11: &[usize] = &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];
const VGG16: &[usize] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];

fn vgg_bn(name: &str, cfg: &[usize], input: [usize; 3], classes: usize) -> Result<Model> {
    let features = || -> Result<Sequential> {
        let mut f = Sequential::new();
        let mut c = input[0];
        for &v in cfg {
            if v == 0 {
                f = f.push(MaxPool2d::new(2));
            } else {
                f = f
                    .push(Conv2d::new(c, v, 3).padding(1).build()?)
                    .push(BatchNorm2d::new(v)?)
                    .push(ReLU);
                c = v;
            }
        }
        Ok(f)
    };
    let flat = features_out(name, &Sequential::new().add("features", features()?), input)?;
    let model = Sequential::new()
        .add("features", features()?)
        .add("flatten", Flatten::new())
        .add("classifier", Linear::new(flat, classes)?)
        .build(&input)?;
    torchvision_init(&model, true)?;
    Ok(model)
}

/// A torchvision ResNet: `blocks` per stage of basic blocks or (with `bottleneck`)
/// bottlenecks; `imagenet_stem` picks the 7x7/2 convolution + max-pool stem, else a 3x3/1
/// convolution.
fn resnet_torchvision(
    name: &str,
    input: [usize; 3],
    classes: usize,
    blocks: [usize; 4],
    bottleneck: bool,
    imagenet_stem: bool,
) -> Result<Model> {
    let mut net = Sequential::new();
    net = if imagenet_stem {
        net.add(
            "conv1",
            Conv2d::new(input[0], 64, 7)
                .stride(2)
                .padding(3)
                .bias(false)
                .build()?,
        )
    } else {
        net.add(
            "conv1",
            Conv2d::new(input[0], 64, 3)
                .padding(1)
                .bias(false)
                .build()?,
        )
    };
    net = net.add("bn1", BatchNorm2d::new(64)?).add("relu", ReLU);
    if imagenet_stem {
        net = net.add(
            "maxpool",
            MaxPool2d::with(MaxPool2dParams::new(3).stride(2).padding(1)),
        );
    }
    let expansion = if bottleneck { Bottleneck::EXPANSION } else { 1 };
    let mut in_planes = 64;
    for (stage, (planes, n)) in [64, 128, 256, 512].into_iter().zip(blocks).enumerate() {
        let mut layer = Sequential::new();
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            layer = if bottleneck {
                layer.push(Bottleneck::new(in_planes, planes, stride)?)
            } else {
                layer.push(BasicBlock::new(
                    in_planes,
                    planes,
                    stride,
                    Shortcut::Projection,
                )?)
            };
            in_planes = planes * expansion;
        }
        net = net.add(format!("layer{}", stage + 1), layer);
    }
    let net = net
        .add("avgpool", AdaptiveAvgPool2d::new(1, 1))
        .add("flatten", Flatten::new())
        .add("fc", Linear::new(512 * expansion, classes)?);
    let model = with_size_hint(name, input, net.build(&input))?;
    torchvision_init(&model, false)?;
    Ok(model)
}

fn mobilenet_v2(input: [usize; 3], classes: usize) -> Result<Model> {
    // (expansion t, output channels c, repeats n, first stride s) from the paper's Table 2.
    const SETTINGS: [(usize, usize, usize, usize); 7] = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let mut features = Sequential::new().push(conv_bn_relu6(input[0], 32, 3, 2, 1)?);
    let mut c = 32;
    for (t, out, n, s) in SETTINGS {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            features = features.push(InvertedResidual::new(c, out, stride, t)?);
            c = out;
        }
    }
    features = features.push(conv_bn_relu6(c, 1280, 1, 1, 1)?);
    let net = Sequential::new()
        .add("features", features)
        .add("avgpool", AdaptiveAvgPool2d::new(1, 1))
        .add("flatten", Flatten::new())
        .add(
            "classifier",
            Sequential::new()
                .push(Dropout::new(0.2)?)
                .push(Linear::new(1280, classes)?),
        );
    let model = with_size_hint("mobilenet_v2", input, net.build(&input))?;
    torchvision_init(&model, true)?;
    Ok(model)
}

/// Adds "`name` cannot take HxW images" to a layer's shape error.
fn with_size_hint<T>(name: &str, input: [usize; 3], built: Result<T>) -> Result<T> {
    built.map_err(|e| match e {
        Error::Layer { layer, kind, msg } => Error::Layer {
            layer,
            kind,
            msg: format!("{msg}; {name} cannot take {}x{} images", input[1], input[2]),
        },
        other => other,
    })
}

/// torchvision's initialisation: convolution weights from N(0, 2 / fan_out) with
/// `fan_out = out_channels * kh * kw`, convolution biases zero; with `normal_linear`,
/// Linear weights from N(0, 0.01^2) and zero biases (VGG, MobileNet), else PyTorch's
/// default Linear initialisation is kept (ResNet). BatchNorm keeps weight 1, bias 0.
fn torchvision_init(model: &Model, normal_linear: bool) -> Result<()> {
    let state = model.named_parameters();
    for (name, t) in &state {
        let Some(owner) = name.strip_suffix(".weight") else {
            continue;
        };
        let dims = t.dims().to_vec();
        let std = match dims.len() {
            4 => (2.0 / (dims[0] * dims[2] * dims[3]) as f32).sqrt(),
            2 if normal_linear => 0.01,
            _ => continue,
        };
        t.update_data(|w| with_global_rng(|r| w.iter_mut().for_each(|v| *v = r.normal() * std)))?;
        if let Some((_, b)) = state.iter().find(|(n, _)| *n == format!("{owner}.bias")) {
            b.update_data(|v| v.fill(0.0))?;
        }
    }
    Ok(())
}

/// Builds architecture `name` for inputs `[C, H, W]` and `num_classes` outputs, initialised
/// from the global generator.
///
/// ```
/// let m = convnet::models::build("seed-cnn", [1, 28, 28], 10)?;
/// assert_eq!(m.named_parameters()[4].1.dims(), &[128, 64 * 7 * 7]); // fc1.weight
/// assert!(convnet::models::build("vgg99", [3, 32, 32], 10).is_err());
/// let err = convnet::models::build("vgg11-bn", [3, 16, 16], 10).unwrap_err();
/// assert!(err.to_string().contains("vgg11-bn cannot take 16x16 images"));
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn build(name: &str, input: [usize; 3], num_classes: usize) -> Result<Model> {
    build_for(name, &input, None, num_classes)
}

/// Builds architecture `name` for inputs of shape `input` (batch excluded: `[C, H, W]` for
/// image models, `[L]` token ids for text models, `[C, L]` for signal models) and
/// `num_classes` outputs; text models need the size of their vocabulary.
///
/// ```
/// use convnet::models::build_for;
/// let m = build_for("text-cnn", &[60], Some(500), 4)?;
/// assert_eq!(m.named_parameters()[0].1.dims(), &[500, 128]); // embedding.weight
/// assert_eq!(m.output_shape().dims(), &[1, 4]);
/// assert!(build_for("text-cnn", &[60], None, 4).unwrap_err().to_string().contains("vocabulary"));
/// assert!(build_for("text-cnn", &[3, 32, 32], Some(500), 4).is_err());
/// assert!(build_for("resnet20", &[60], None, 4).is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn build_for(
    name: &str,
    input: &[usize],
    vocabulary: Option<usize>,
    num_classes: usize,
) -> Result<Model> {
    if num_classes == 0 {
        return Err(invalid("models::build", "num_classes must be positive"));
    }
    let arch = architecture(name)?;
    let wanted = match arch.input {
        InputKind::Image => "images [C, H, W]",
        InputKind::Tokens => "token ids [L]",
        InputKind::Signal => "signals [C, L]",
    };
    let rank = match arch.input {
        InputKind::Image => 3,
        InputKind::Tokens => 1,
        InputKind::Signal => 2,
    };
    if input.len() != rank || input.contains(&0) {
        return Err(invalid(
            "models::build",
            format!(
                "{name} takes {wanted}, not an input of shape {}",
                crate::shape::Shape::from(input)
            ),
        ));
    }
    crate::nn::with_parameter_limit(crate::nn::MAX_PARAMETERS, || match arch.input {
        InputKind::Image => build_arch(arch, name, [input[0], input[1], input[2]], num_classes),
        InputKind::Tokens => {
            let vocabulary = vocabulary.ok_or_else(|| {
                invalid(
                    "models::build",
                    format!("{name} needs the size of its vocabulary (the tokenizer's)"),
                )
            })?;
            match arch.name {
                "text-cnn" => text_cnn(input[0], vocabulary, num_classes),
                other => Err(invalid(
                    "models::build",
                    format!("{other} is listed but has no builder"),
                )),
            }
        }
        InputKind::Signal => match arch.name {
            "m5" => m5::m5([input[0], input[1]], num_classes),
            other => Err(invalid(
                "models::build",
                format!("{other} is listed but has no builder"),
            )),
        },
    })
}

/// Kim's (2014) text CNN: `embedding` (vocabulary x 128, padding id 0), the embeddings
/// turned into channels, `convs` (widths 3, 4, 5 with 100 maps each, ReLU, max over time,
/// concatenated), `dropout` 0.5, `fc`. The `state_dict` is that of the usual PyTorch
/// module with attributes `embedding`, `convs` (an `nn.ModuleList`), `dropout` and `fc`.
fn text_cnn(len: usize, vocabulary: usize, classes: usize) -> Result<Model> {
    const DIM: usize = 128;
    const MAPS: usize = 100;
    const WIDTHS: [usize; 3] = [3, 4, 5];
    if len < WIDTHS[2] {
        return Err(invalid(
            "models::build",
            format!(
                "text-cnn reads at least {} tokens (its widest filter), not {len}",
                WIDTHS[2]
            ),
        ));
    }
    Sequential::new()
        .add("embedding", Embedding::new(vocabulary, DIM, Some(0))?)
        .add("permute", Permute::new(vec![0, 2, 1])?)
        .add("convs", ConvBank1d::new(DIM, MAPS, &WIDTHS)?)
        .add("dropout", Dropout::new(0.5)?)
        .add("fc", Linear::new(MAPS * WIDTHS.len(), classes)?)
        .build(&[len])
}

fn build_arch(
    arch: &Architecture,
    name: &str,
    input: [usize; 3],
    num_classes: usize,
) -> Result<Model> {
    match arch.name {
        "seed-cnn" => seed_cnn(input, num_classes),
        "lenet5" => lenet5(input, num_classes),
        "resnet20" => with_size_hint(name, input, resnet_cifar(input, num_classes, 3)),
        "resnet32" => with_size_hint(name, input, resnet_cifar(input, num_classes, 5)),
        "resnet56" => with_size_hint(name, input, resnet_cifar(input, num_classes, 9)),
        "vgg11-bn" => vgg_bn(name, VGG11, input, num_classes),
        "vgg16-bn" => vgg_bn(name, VGG16, input, num_classes),
        "resnet18" => resnet_torchvision(name, input, num_classes, [2, 2, 2, 2], false, true),
        "resnet34" => resnet_torchvision(name, input, num_classes, [3, 4, 6, 3], false, true),
        "resnet50" => resnet_torchvision(name, input, num_classes, [3, 4, 6, 3], true, true),
        "resnet18-cifar" => {
            resnet_torchvision(name, input, num_classes, [2, 2, 2, 2], false, false)
        }
        "resnet34-cifar" => {
            resnet_torchvision(name, input, num_classes, [3, 4, 6, 3], false, false)
        }
        "resnet50-cifar" => resnet_torchvision(name, input, num_classes, [3, 4, 6, 3], true, false),
        "mobilenet_v2" => mobilenet_v2(input, num_classes),
        other => Err(invalid(
            "models::build",
            format!("{other} is listed but has no builder"),
        )),
    }
}

/// The architecture a command builds: a built-in one or a model file.
#[derive(Clone, Debug)]
pub enum ModelSpec {
    /// A model-zoo architecture.
    Zoo(&'static Architecture),
    /// A network described in a TOML/JSON file.
    File(crate::model_file::ModelFile),
}

impl ModelSpec {
    /// A built-in architecture by name.
    pub fn zoo(name: &str) -> Result<ModelSpec> {
        Ok(ModelSpec::Zoo(architecture(name)?))
    }

    /// What a checkpoint was built from: `model_spec` metadata (a model file's contents) if
    /// present, else the zoo architecture `architecture`.
    ///
    /// ```
    /// let spec = convnet::models::ModelSpec::from_checkpoint("resnet20", None)?;
    /// assert_eq!(spec.name(), "resnet20");
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn from_checkpoint(architecture: &str, model_spec: Option<&str>) -> Result<ModelSpec> {
        match model_spec {
            Some(json) => Ok(ModelSpec::File(crate::model_file::ModelFile::from_json(
                json,
                &format!("the model_spec of {architecture}"),
            )?)),
            None => ModelSpec::zoo(architecture),
        }
    }

    /// The architecture's name (a model file's `name`).
    pub fn name(&self) -> &str {
        match self {
            ModelSpec::Zoo(a) => a.name,
            ModelSpec::File(f) => &f.name,
        }
    }

    /// The model file's contents as JSON, to store in checkpoints; `None` for zoo models.
    pub fn model_spec(&self) -> Option<String> {
        match self {
            ModelSpec::Zoo(_) => None,
            ModelSpec::File(f) => Some(f.to_json()),
        }
    }

    /// The input `[C, H, W]` the architecture is meant for, if it says.
    pub fn default_input(&self) -> Option<[usize; 3]> {
        match self {
            ModelSpec::Zoo(a) => <[usize; 3]>::try_from(a.default_input).ok(),
            ModelSpec::File(f) => f.input,
        }
    }

    /// The input the architecture is meant for, of any rank (`[C, H, W]`, `[C, L]`, `[L]`),
    /// if it says.
    pub fn default_input_dims(&self) -> Option<Vec<usize>> {
        match self {
            ModelSpec::Zoo(a) => Some(a.default_input.to_vec()),
            ModelSpec::File(f) => f.input_dims.clone(),
        }
    }

    /// The class count the architecture is meant for, if it says.
    pub fn default_classes(&self) -> Option<usize> {
        match self {
            ModelSpec::Zoo(a) => Some(a.default_classes),
            ModelSpec::File(f) => f.num_classes,
        }
    }

    /// The input normalisation its weights expect for `channels` channels.
    pub fn default_normalize(&self, channels: usize) -> Normalize {
        match self {
            ModelSpec::Zoo(a) => a.default_normalize(channels),
            ModelSpec::File(_) => Normalize::default_for(channels),
        }
    }

    /// Builds the network for inputs `[C, H, W]` and `num_classes` outputs (at most
    /// [`crate::nn::MAX_PARAMETERS`] parameters).
    pub fn build(&self, input: [usize; 3], num_classes: usize) -> Result<Model> {
        match self {
            ModelSpec::Zoo(a) => build(a.name, input, num_classes),
            ModelSpec::File(f) => f.build(input, num_classes),
        }
    }

    /// Builds the network for inputs of any rank (batch excluded) and, for text models, a
    /// vocabulary of `vocabulary` tokens (see [`build_for`]; a model file's embedding takes
    /// it with `num_embeddings = "vocab"`).
    pub fn build_for(
        &self,
        input: &[usize],
        vocabulary: Option<usize>,
        num_classes: usize,
    ) -> Result<Model> {
        match self {
            ModelSpec::File(f) => f.build_with_vocabulary(input, vocabulary, num_classes),
            ModelSpec::Zoo(a) => build_for(a.name, input, vocabulary, num_classes),
        }
    }

    /// [`ModelSpec::build`] allowing at most `max_parameters` parameters and buffers: a
    /// description that asks for more fails before allocating them.
    ///
    /// ```
    /// use convnet::models::ModelSpec;
    /// let spec = ModelSpec::zoo("resnet20")?;
    /// assert!(spec.build_with_limit([3, 32, 32], 10, 1000).is_err());
    /// assert!(spec.build_with_limit([3, 32, 32], 10, 1 << 20).is_ok());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn build_with_limit(
        &self,
        input: [usize; 3],
        num_classes: usize,
        max_parameters: usize,
    ) -> Result<Model> {
        crate::nn::with_parameter_limit(max_parameters, || self.build(input, num_classes))
    }
}
