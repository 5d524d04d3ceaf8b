//! Tensor shapes and the output-size formulas of convolution and pooling.
//!
//! This file is the only home of those formulas: layers, ops and shape inference all call
//! [`conv_out_size`] and [`pool_out_size`].

use crate::error::{invalid, Result};
use std::fmt;

/// The dimensions of a tensor, outermost first (NCHW for images).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// Creates a shape from its dimensions.
    ///
    /// ```
    /// let s = convnet::Shape::new([2, 3, 4]);
    /// assert_eq!(s.numel(), 24);
    /// assert_eq!(s.to_string(), "[2, 3, 4]");
    /// ```
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The dimensions as a slice.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Number of elements, or `None` when it does not fit in a `usize` (sizes read from
    /// files and model descriptions are checked with this before anything is allocated).
    ///
    /// ```
    /// assert_eq!(convnet::Shape::new([2, 3]).checked_numel(), Some(6));
    /// assert_eq!(convnet::Shape::new([1 << 40, 1 << 40]).checked_numel(), None);
    /// ```
    pub fn checked_numel(&self) -> Option<usize> {
        checked_numel(&self.0)
    }

    /// Row-major (C-contiguous) strides of this shape.
    pub fn contiguous_strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.0[i + 1];
        }
        strides
    }

    /// Size of dimension `d`; negative `d` counts from the end like Python.
    pub fn dim(&self, d: isize) -> Option<usize> {
        let idx = normalize_dim(d, self.rank()).ok()?;
        Some(self.0[idx])
    }
}

/// The product of `dims`, or `None` when it does not fit in a `usize`.
pub fn checked_numel(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// Turns a possibly negative dimension index into `0..rank`.
pub(crate) fn normalize_dim(d: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let idx = if d < 0 { d + r } else { d };
    if idx < 0 || idx >= r.max(1) {
        return Err(invalid(
            "dim",
            format!("dimension {d} is out of range for a tensor of rank {rank}"),
        ));
    }
    Ok(idx as usize)
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

/// Output length of a convolution along one spatial axis, as `torch.nn.Conv2d` computes it:
/// `floor((input + 2*padding - dilation*(kernel-1) - 1) / stride) + 1`.
///
/// Returns `None` when the (dilated) kernel does not fit into the padded input (or the
/// sizes are too large to compute with).
///
/// ```
/// assert_eq!(convnet::shape::conv_out_size(32, 3, 1, 1, 1), Some(32));
/// assert_eq!(convnet::shape::conv_out_size(32, 3, 2, 1, 1), Some(16));
/// assert_eq!(convnet::shape::conv_out_size(2, 5, 1, 0, 1), None);
/// ```
pub fn conv_out_size(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Option<usize> {
    let (span, padded) = span_and_padded(input, kernel, padding, dilation)?;
    if stride == 0 || span > padded {
        return None;
    }
    Some((padded - span) / stride + 1)
}

/// The dilated kernel's extent and the padded input's length, `None` for a zero kernel or
/// sizes that overflow.
fn span_and_padded(
    input: usize,
    kernel: usize,
    padding: usize,
    dilation: usize,
) -> Option<(usize, usize)> {
    let span = dilation
        .checked_mul(kernel.checked_sub(1)?)?
        .checked_add(1)?;
    let padded = padding.checked_mul(2)?.checked_add(input)?;
    Some((span, padded))
}

/// Output length of max/avg pooling along one axis, exactly as PyTorch computes it
/// (`pooling_output_shape`): `floor((input + 2*padding - dilation*(kernel-1) - 1) / stride) + 1`,
/// rounding up instead with `ceil_mode`, and with `ceil_mode` dropping the last window when
/// it would start in the right padding.
///
/// With `ceil_mode` the last window may reach past the padded input (PyTorch accepts a
/// window larger than the padded input as long as one window starts inside it); the pooling
/// kernels clip such windows. Returns `None` when the output would be empty (PyTorch's
/// "output size is too small"), for a zero kernel, stride or dilation, or for sizes too large
/// to compute with. The other PyTorch check, `padding <= kernel / 2`, belongs to the caller.
///
/// ```
/// use convnet::shape::pool_out_size;
/// assert_eq!(pool_out_size(32, 2, 2, 0, 1, false), Some(16));
/// assert_eq!(pool_out_size(7, 2, 2, 0, 1, false), Some(3));
/// assert_eq!(pool_out_size(7, 2, 2, 0, 1, true), Some(4));
/// assert_eq!(pool_out_size(32, 3, 2, 1, 1, false), Some(16));
/// // A window of 3 over 2 columns: too large without ceil_mode, one window with it.
/// assert_eq!(pool_out_size(2, 3, 3, 0, 1, false), None);
/// assert_eq!(pool_out_size(2, 3, 3, 0, 1, true), Some(1));
/// // PyTorch refuses this one too: no window starts inside the input.
/// assert_eq!(pool_out_size(3, 5, 1, 0, 1, true), None);
/// ```
pub fn pool_out_size(
    input: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    ceil_mode: bool,
) -> Option<usize> {
    if kernel == 0 || stride == 0 || dilation == 0 {
        return None;
    }
    // i128 holds every product of two usize values, so nothing here can overflow.
    let (input, kernel, stride, padding, dilation) = (
        input as i128,
        kernel as i128,
        stride as i128,
        padding as i128,
        dilation as i128,
    );
    let mut numer = input + 2 * padding - dilation * (kernel - 1) - 1;
    if ceil_mode {
        numer += stride - 1;
    }
    let mut out = numer.div_euclid(stride) + 1;
    if ceil_mode && (out - 1) * stride >= input + padding {
        out -= 1;
    }
    if out < 1 {
        return None;
    }
    usize::try_from(out).ok()
}
