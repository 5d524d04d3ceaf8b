//! The ResNet blocks of He et al. (2016) in torchvision's layout and names: `BasicBlock`
//! (`conv1, bn1, relu, conv2, bn2`) and `Bottleneck` (`conv1` 1x1, `conv2` 3x3, `conv3` 1x1
//! with `bn1..bn3`), plus a `downsample` shortcut when the shape changes.

use super::{join, BatchNorm2d, Conv2d, Mode, Module, ReLU, Sequential, SummaryRow, TensorRole};
use crate::error::{Error, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// How a residual block matches its shortcut to a changed shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// 1x1 convolution + BatchNorm (`downsample.0`, `downsample.1`), torchvision's option B.
    Projection,
    /// Strided subsampling and zero channels, no parameters: CIFAR ResNets' option A.
    PadChannels,
}

/// The identity path of a residual block, adapted to the residual branch's output shape.
enum ShortcutPath {
    Identity,
    Projection(Sequential),
    /// Subsample by `stride`, put `before` zero channels in front, `planes` channels in all.
    Pad {
        stride: usize,
        before: usize,
        planes: usize,
    },
}

impl ShortcutPath {
    fn new(in_planes: usize, planes: usize, stride: usize, kind: Shortcut) -> Result<Self> {
        if stride == 1 && in_planes == planes {
            return Ok(ShortcutPath::Identity);
        }
        match kind {
            Shortcut::Projection => Ok(ShortcutPath::Projection(
                Sequential::new()
                    .push(
                        Conv2d::new(in_planes, planes, 1)
                            .stride(stride)
                            .bias(false)
                            .build()?,
                    )
                    .push(BatchNorm2d::new(planes)?),
            )),
            Shortcut::PadChannels => {
                if planes < in_planes {
                    return Err(crate::error::invalid(
                        "BasicBlock",
                        format!("option-A shortcut cannot shrink {in_planes} channels to {planes}"),
                    ));
                }
                Ok(ShortcutPath::Pad {
                    stride,
                    before: (planes - in_planes) / 2,
                    planes,
                })
            }
        }
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match self {
            ShortcutPath::Identity => Ok(x.clone()),
            ShortcutPath::Projection(ds) => ds.forward(x, mode),
            ShortcutPath::Pad {
                stride,
                before,
                planes,
            } => x.subsample_pad_channels(*stride, *before, *planes),
        }
    }

    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        if let ShortcutPath::Projection(ds) = self {
            ds.visit_tensors(&join(prefix, "downsample"), f);
        }
    }

    fn visit_modules(&self, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
        if let ShortcutPath::Projection(ds) = self {
            let path = join(prefix, "downsample");
            f(&path, ds);
            ds.visit_modules(&path, f);
        }
    }

    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        match self {
            ShortcutPath::Identity => Ok(input),
            ShortcutPath::Projection(ds) => ds.describe(&join(path, "downsample"), input, g),
            ShortcutPath::Pad {
                stride,
                before,
                planes,
            } => {
                let d = g.shape(input).dims().to_vec();
                let shape = Shape::new([
                    d[0],
                    *planes,
                    d[2].div_ceil(*stride),
                    d[3].div_ceil(*stride),
                ]);
                g.push(
                    &join(path, "shortcut"),
                    Op::PadChannels {
                        stride: *stride,
                        before: *before,
                        planes: *planes,
                    },
                    &[input],
                    shape,
                )
            }
        }
    }

    /// Checks that the shortcut of `input` has the branch's output shape `branch`.
    fn infer(
        &self,
        path: &str,
        kind: &'static str,
        input: &[usize],
        branch: &Shape,
        rows: &mut Vec<SummaryRow>,
    ) -> Result<()> {
        let short = match self {
            ShortcutPath::Identity => Shape::from(input),
            ShortcutPath::Projection(ds) => ds.infer(&join(path, "downsample"), input, rows)?,
            ShortcutPath::Pad { stride, planes, .. } => Shape::new([
                input[0],
                *planes,
                input[2].div_ceil(*stride),
                input[3].div_ceil(*stride),
            ]),
        };
        if &short != branch {
            return Err(Error::Layer {
                layer: path.to_string(),
                kind,
                msg: format!("residual branch gives {branch} but the shortcut gives {short}"),
            });
        }
        Ok(())
    }
}

/// Runs the conv+BN pairs in order, with a ReLU after each except the last, then adds
/// the shortcut and applies a final ReLU: the forward pass shared by both block kinds.
fn residual_forward(
    convs: &[(&Conv2d, &BatchNorm2d)],
    shortcut: &ShortcutPath,
    x: &Tensor,
    mode: Mode,
) -> Result<Tensor> {
    let mut h = x.clone();
    for (i, (conv, bn)) in convs.iter().enumerate() {
        let c = conv.forward(&h, mode)?;
        h = if i + 1 < convs.len() {
            bn.forward_relu(&c, mode)?
        } else {
            // The last BN, the shortcut's addition and the final ReLU are one pass.
            bn.forward_add_relu(&c, &shortcut.forward(x, mode)?, mode)?
        };
    }
    Ok(h)
}

fn residual_describe(
    convs: &[(&Conv2d, &BatchNorm2d)],
    shortcut: &ShortcutPath,
    path: &str,
    input: ValueId,
    g: &mut Graph,
) -> Result<ValueId> {
    let mut h = input;
    for (i, (conv, bn)) in convs.iter().enumerate() {
        h = conv.describe(&join(path, &format!("conv{}", i + 1)), h, g)?;
        h = bn.describe(&join(path, &format!("bn{}", i + 1)), h, g)?;
        if i + 1 < convs.len() {
            h = ReLU.describe(&join(path, &format!("relu{}", i + 1)), h, g)?;
        }
    }
    let short = shortcut.describe(path, input, g)?;
    let shape = g.shape(h).clone();
    let sum = g.push(&join(path, "add"), Op::Add, &[h, short], shape)?;
    ReLU.describe(&join(path, "relu"), sum, g)
}

fn residual_visit(
    convs: &[(&Conv2d, &BatchNorm2d)],
    shortcut: &ShortcutPath,
    prefix: &str,
    f: &mut dyn FnMut(String, &Tensor, TensorRole),
) {
    for (i, (conv, bn)) in convs.iter().enumerate() {
        conv.visit_tensors(&join(prefix, &format!("conv{}", i + 1)), f);
        bn.visit_tensors(&join(prefix, &format!("bn{}", i + 1)), f);
    }
    shortcut.visit_tensors(prefix, f);
}

fn residual_visit_modules(
    convs: &[(&Conv2d, &BatchNorm2d)],
    shortcut: &ShortcutPath,
    prefix: &str,
    f: &mut dyn FnMut(&str, &dyn Module),
) {
    for (i, (conv, bn)) in convs.iter().enumerate() {
        f(&join(prefix, &format!("conv{}", i + 1)), *conv);
        f(&join(prefix, &format!("bn{}", i + 1)), *bn);
    }
    shortcut.visit_modules(prefix, f);
}

fn residual_infer(
    convs: &[(&Conv2d, &BatchNorm2d)],
    shortcut: &ShortcutPath,
    kind: &'static str,
    path: &str,
    input: &[usize],
    rows: &mut Vec<SummaryRow>,
) -> Result<Shape> {
    let mut s = Shape::from(input);
    for (i, (conv, bn)) in convs.iter().enumerate() {
        s = conv.infer(&join(path, &format!("conv{}", i + 1)), s.dims(), rows)?;
        s = bn.infer(&join(path, &format!("bn{}", i + 1)), s.dims(), rows)?;
    }
    shortcut.infer(path, kind, input, &s, rows)?;
    Ok(s)
}

/// `Module` for a residual block type with a `convs()` list of conv+BN pairs and a
/// `shortcut`: both block kinds share every method through the `residual_*` functions.
macro_rules! residual_module {
    ($block:ident) => {
        impl Module for $block {
            fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
                residual_forward(&self.convs(), &self.shortcut, x, mode)
            }

            fn kind(&self) -> &'static str {
                stringify!($block)
            }

            fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
                residual_describe(&self.convs(), &self.shortcut, path, input, g)
            }

            fn output_shape(&self, input: &[usize]) -> Result<Shape> {
                self.infer("", input, &mut Vec::new())
            }

            fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
                residual_visit(&self.convs(), &self.shortcut, prefix, f)
            }

            fn visit_modules(&self, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
                residual_visit_modules(&self.convs(), &self.shortcut, prefix, f)
            }

            fn infer(
                &self,
                path: &str,
                input: &[usize],
                rows: &mut Vec<SummaryRow>,
            ) -> Result<Shape> {
                residual_infer(
                    &self.convs(),
                    &self.shortcut,
                    self.kind(),
                    path,
                    input,
                    rows,
                )
            }
        }
    };
}

/// `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: ShortcutPath,
}

impl BasicBlock {
    /// A block `in_planes -> planes` whose first convolution has `stride`.
    ///
    /// ```
    /// use convnet::nn::{BasicBlock, Module, Shortcut};
    /// let b = BasicBlock::new(16, 32, 2, Shortcut::Projection)?;
    /// assert_eq!(b.output_shape(&[1, 16, 8, 8])?.dims(), &[1, 32, 4, 4]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn new(
        in_planes: usize,
        planes: usize,
        stride: usize,
        shortcut: Shortcut,
    ) -> Result<BasicBlock> {
        let conv1 = Conv2d::new(in_planes, planes, 3)
            .stride(stride)
            .padding(1)
            .bias(false)
            .build()?;
        let bn1 = BatchNorm2d::new(planes)?;
        let conv2 = Conv2d::new(planes, planes, 3)
            .padding(1)
            .bias(false)
            .build()?;
        let bn2 = BatchNorm2d::new(planes)?;
        Ok(BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            shortcut: ShortcutPath::new(in_planes, planes, stride, shortcut)?,
        })
    }

    fn convs(&self) -> [(&Conv2d, &BatchNorm2d); 2] {
        [(&self.conv1, &self.bn1), (&self.conv2, &self.bn2)]
    }
}

residual_module!(BasicBlock);

/// torchvision's `Bottleneck` (ResNet-50 and deeper):
/// `relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))` with a 1x1
/// reduction to `planes`, a 3x3 convolution carrying the stride, and a 1x1 expansion to
/// `4 * planes` channels.
pub struct Bottleneck {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    shortcut: ShortcutPath,
}

impl Bottleneck {
    /// Output channels per `planes`.
    pub const EXPANSION: usize = 4;

    /// A block `in_planes -> 4 * planes` whose 3x3 convolution has `stride`; the shortcut is
    /// a projection when the shape changes.
    ///
    /// ```
    /// use convnet::nn::{Bottleneck, Module};
    /// let b = Bottleneck::new(64, 64, 1)?;
    /// assert_eq!(b.output_shape(&[1, 64, 8, 8])?.dims(), &[1, 256, 8, 8]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn new(in_planes: usize, planes: usize, stride: usize) -> Result<Bottleneck> {
        let out = planes.checked_mul(Self::EXPANSION).ok_or_else(|| {
            crate::error::invalid("Bottleneck", format!("{planes} planes is too many"))
        })?;
        Ok(Bottleneck {
            conv1: Conv2d::new(in_planes, planes, 1).bias(false).build()?,
            bn1: BatchNorm2d::new(planes)?,
            conv2: Conv2d::new(planes, planes, 3)
                .stride(stride)
                .padding(1)
                .bias(false)
                .build()?,
            bn2: BatchNorm2d::new(planes)?,
            conv3: Conv2d::new(planes, out, 1).bias(false).build()?,
            bn3: BatchNorm2d::new(out)?,
            shortcut: ShortcutPath::new(in_planes, out, stride, Shortcut::Projection)?,
        })
    }

    fn convs(&self) -> [(&Conv2d, &BatchNorm2d); 3] {
        [
            (&self.conv1, &self.bn1),
            (&self.conv2, &self.bn2),
            (&self.conv3, &self.bn3),
        ]
    }
}

residual_module!(Bottleneck);
