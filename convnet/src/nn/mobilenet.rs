//! MobileNetV2's building blocks (Sandler et al. 2018) in torchvision's layout and names:
//! `Conv2dNormActivation` (`0` conv, `1` BatchNorm, `2` ReLU6) and `InvertedResidual`
//! (`conv.0..`: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, BatchNorm).

use super::{join, BatchNorm2d, Conv2d, Mode, Module, ReLU6, Sequential, SummaryRow, TensorRole};
use crate::error::{invalid, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// torchvision's `Conv2dNormActivation` with ReLU6: a bias-free convolution with "same"
/// padding `(kernel - 1) / 2`, BatchNorm and ReLU6, as a [`Sequential`] named `0`, `1`, `2`.
///
/// ```
/// use convnet::nn::{conv_bn_relu6, Module};
/// let stem = conv_bn_relu6(3, 32, 3, 2, 1)?;
/// assert_eq!(stem.output_shape(&[1, 3, 32, 32])?.dims(), &[1, 32, 16, 16]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn conv_bn_relu6(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
) -> Result<Sequential> {
    Ok(Sequential::new()
        .push(
            Conv2d::new(in_channels, out_channels, kernel)
                .stride(stride)
                .padding((kernel - 1) / 2)
                .groups(groups)
                .bias(false)
                .build()?,
        )
        .push(BatchNorm2d::new(out_channels)?)
        .push(ReLU6))
}

/// MobileNetV2's inverted residual block: expand by `expand_ratio` with a 1x1 convolution,
/// filter with a depthwise 3x3 convolution carrying the stride, project linearly back to
/// `out_channels`; the input is added when stride is 1 and the channel count is kept.
pub struct InvertedResidual {
    conv: Sequential,
    use_residual: bool,
}

impl InvertedResidual {
    /// A block `in_channels -> out_channels` with the given stride (1 or 2) and expansion.
    ///
    /// ```
    /// use convnet::nn::{InvertedResidual, Module};
    /// let b = InvertedResidual::new(16, 24, 2, 6)?;
    /// assert_eq!(b.output_shape(&[1, 16, 16, 16])?.dims(), &[1, 24, 8, 8]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        expand_ratio: usize,
    ) -> Result<InvertedResidual> {
        if stride != 1 && stride != 2 {
            return Err(invalid(
                "InvertedResidual",
                format!("stride must be 1 or 2, got {stride}"),
            ));
        }
        if expand_ratio == 0 {
            return Err(invalid("InvertedResidual", "expand_ratio must be positive"));
        }
        let hidden = in_channels.checked_mul(expand_ratio).ok_or_else(|| {
            invalid(
                "InvertedResidual",
                format!("{in_channels} channels x expand_ratio {expand_ratio} is too many"),
            )
        })?;
        let mut conv = Sequential::new();
        if expand_ratio != 1 {
            conv = conv.push(conv_bn_relu6(in_channels, hidden, 1, 1, 1)?);
        }
        conv = conv
            .push(conv_bn_relu6(hidden, hidden, 3, stride, hidden)?)
            .push(Conv2d::new(hidden, out_channels, 1).bias(false).build()?)
            .push(BatchNorm2d::new(out_channels)?);
        Ok(InvertedResidual {
            conv,
            use_residual: stride == 1 && in_channels == out_channels,
        })
    }
}

impl Module for InvertedResidual {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.conv.forward(x, mode)?;
        if self.use_residual {
            h.add(x)
        } else {
            Ok(h)
        }
    }

    fn kind(&self) -> &'static str {
        "InvertedResidual"
    }

    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        let h = self.conv.describe(&join(path, "conv"), input, g)?;
        if self.use_residual {
            let shape = g.shape(h).clone();
            g.push(&join(path, "add"), Op::Add, &[h, input], shape)
        } else {
            Ok(h)
        }
    }

    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        self.conv.output_shape(input)
    }

    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        self.conv.visit_tensors(&join(prefix, "conv"), f);
    }

    fn visit_modules(&self, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
        let path = join(prefix, "conv");
        f(&path, &self.conv);
        self.conv.visit_modules(&path, f);
    }

    fn infer(&self, path: &str, input: &[usize], rows: &mut Vec<SummaryRow>) -> Result<Shape> {
        self.conv.infer(&join(path, "conv"), input, rows)
    }
}
