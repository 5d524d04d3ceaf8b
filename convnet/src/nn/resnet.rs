//! The ResNet basic block (He et al. 2016), torchvision's `BasicBlock` layout and names:
//! `conv1, bn1, relu, conv2, bn2`, plus a `downsample` shortcut when the shape changes.

use super::{join, BatchNorm2d, Conv2d, Mode, Module, Sequential, SummaryRow, TensorRole};
use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// How a [`BasicBlock`] matches its shortcut to a changed shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortcut {
    /// 1x1 convolution + BatchNorm (`downsample.0`, `downsample.1`), torchvision's option B.
    Projection,
    /// Strided subsampling and zero channels, no parameters: CIFAR ResNets' option A.
    PadChannels,
}

/// `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`.
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    downsample: Option<Sequential>,
    pad: Option<(usize, usize, usize)>,
}

impl BasicBlock {
    /// A block `in_planes -> planes` whose first convolution has `stride`.
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
        let reshape = stride != 1 || in_planes != planes;
        let (downsample, pad) = match (reshape, shortcut) {
            (false, _) => (None, None),
            (true, Shortcut::Projection) => (
                Some(
                    Sequential::new()
                        .push(
                            Conv2d::new(in_planes, planes, 1)
                                .stride(stride)
                                .bias(false)
                                .build()?,
                        )
                        .push(BatchNorm2d::new(planes)?),
                ),
                None,
            ),
            (true, Shortcut::PadChannels) => {
                if planes < in_planes {
                    return Err(crate::error::invalid(
                        "BasicBlock",
                        format!("option-A shortcut cannot shrink {in_planes} channels to {planes}"),
                    ));
                }
                let extra = planes - in_planes;
                (None, Some((stride, extra / 2, planes)))
            }
        };
        Ok(BasicBlock {
            conv1,
            bn1,
            conv2,
            bn2,
            downsample,
            pad,
        })
    }

    fn shortcut(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match (&self.downsample, self.pad) {
            (Some(ds), _) => ds.forward(x, mode),
            (None, Some((stride, before, planes))) => {
                x.subsample_pad_channels(stride, before, planes)
            }
            (None, None) => Ok(x.clone()),
        }
    }
}

impl Module for BasicBlock {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self
            .bn1
            .forward(&self.conv1.forward(x, mode)?, mode)?
            .relu()?;
        let h = self.bn2.forward(&self.conv2.forward(&h, mode)?, mode)?;
        h.add(&self.shortcut(x, mode)?)?.relu()
    }

    fn kind(&self) -> &'static str {
        "BasicBlock"
    }

    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        self.infer("", input, &mut Vec::new())
    }

    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        self.conv1.visit_tensors(&join(prefix, "conv1"), f);
        self.bn1.visit_tensors(&join(prefix, "bn1"), f);
        self.conv2.visit_tensors(&join(prefix, "conv2"), f);
        self.bn2.visit_tensors(&join(prefix, "bn2"), f);
        if let Some(ds) = &self.downsample {
            ds.visit_tensors(&join(prefix, "downsample"), f);
        }
    }

    fn infer(&self, path: &str, input: &[usize], rows: &mut Vec<SummaryRow>) -> Result<Shape> {
        let s = self.conv1.infer(&join(path, "conv1"), input, rows)?;
        let s = self.bn1.infer(&join(path, "bn1"), s.dims(), rows)?;
        let s = self.conv2.infer(&join(path, "conv2"), s.dims(), rows)?;
        let s = self.bn2.infer(&join(path, "bn2"), s.dims(), rows)?;
        let short = match (&self.downsample, self.pad) {
            (Some(ds), _) => ds.infer(&join(path, "downsample"), input, rows)?,
            (None, Some((stride, _, planes))) => Shape::new([
                input[0],
                planes,
                input[2].div_ceil(stride),
                input[3].div_ceil(stride),
            ]),
            (None, None) => Shape::from(input),
        };
        if short != s {
            return Err(Error::Layer {
                layer: path.to_string(),
                kind: "BasicBlock",
                msg: format!("residual branch gives {s} but the shortcut gives {short}"),
            });
        }
        Ok(s)
    }
}
