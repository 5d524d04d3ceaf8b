//! Fake quantization: values rounded to the grid of a quantization and mapped back to
//! float, with the straight-through gradient (passed where the value was inside the
//! quantized range, zero where it was clamped). The arithmetic is PyTorch's
//! `fake_quantize_per_tensor_affine` / `fake_quantize_per_channel_affine`: multiply by the
//! float32 inverse of the scale, round half to even, clamp, subtract the zero point,
//! multiply by the scale.

use super::observer::{QParams, QRange};
use crate::autograd::Op;
use crate::error::{invalid, Result};
use crate::tensor::{record, Tensor};

/// The quantized value of `x` before clamping (a float, so it can lie outside the range).
#[inline]
fn unclamped(x: f32, inv_scale: f32, zero_point: i32) -> f32 {
    zero_point as f32 + (x * inv_scale).round_ties_even()
}

/// `(q, inside)`: `x` quantized to `range` and whether it was inside (NaN maps to the
/// range's minimum, as in PyTorch).
#[inline]
pub(crate) fn quantize_one(x: f32, inv_scale: f32, zero_point: i32, range: QRange) -> (i32, bool) {
    let q = unclamped(x, inv_scale, zero_point);
    if q.is_nan() {
        return (range.min, false);
    }
    let inside = q >= range.min as f32 && q <= range.max as f32;
    (q.clamp(range.min as f32, range.max as f32) as i32, inside)
}

/// Quantizes `x` to integers of `range` (`torch.quantize_per_tensor(...).int_repr()`).
///
/// ```
/// use convnet::quant::observer::{QParams, QRange};
/// let q = convnet::quant::fake::quantize(&[-1.0, 0.0, 0.5, 100.0], QParams { scale: 0.25, zero_point: 10 }, QRange::U8);
/// assert_eq!(q, vec![6, 10, 12, 255]);
/// ```
pub fn quantize(x: &[f32], q: QParams, range: QRange) -> Vec<i32> {
    let inv = 1.0 / q.scale;
    x.iter()
        .map(|&v| quantize_one(v, inv, q.zero_point, range).0)
        .collect()
}

fn check(what: &'static str, qs: &[QParams], range: QRange) -> Result<()> {
    for q in qs {
        if !(q.scale.is_finite() && q.scale > 0.0) {
            return Err(invalid(
                what,
                format!("scale must be positive and finite, got {}", q.scale),
            ));
        }
        if q.zero_point < range.min || q.zero_point > range.max {
            return Err(invalid(
                what,
                format!(
                    "zero point {} is outside [{}, {}]",
                    q.zero_point, range.min, range.max
                ),
            ));
        }
    }
    Ok(())
}

impl Tensor {
    /// Fake-quantizes with one scale and zero point (`torch.fake_quantize_per_tensor_affine`).
    ///
    /// ```
    /// use convnet::quant::observer::{QParams, QRange};
    /// let x = convnet::Tensor::from_vec(vec![0.26, -5.0, 1.0], [3])?.requires_grad();
    /// let y = x.fake_quantize(QParams { scale: 0.5, zero_point: 2 }, QRange { min: 0, max: 4 })?;
    /// assert_eq!(y.to_vec(), vec![0.5, -1.0, 1.0]);
    /// let g = y.sum(&[0], false)?.backward()?;
    /// assert_eq!(g.get(&x).unwrap().to_vec(), vec![1.0, 0.0, 1.0]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn fake_quantize(&self, q: QParams, range: QRange) -> Result<Tensor> {
        check("fake_quantize", &[q], range)?;
        self.fake_quantize_impl(&[q], range, 1)
    }

    /// Fake-quantizes each slice along dimension 0 with its own scale and zero point
    /// (`torch.fake_quantize_per_channel_affine` with axis 0: weights `[out, ...]`).
    pub fn fake_quantize_per_channel(&self, qs: &[QParams], range: QRange) -> Result<Tensor> {
        check("fake_quantize_per_channel", qs, range)?;
        if self.rank() == 0 || self.dims()[0] != qs.len() {
            return Err(invalid(
                "fake_quantize_per_channel",
                format!("{} parameters for a tensor {}", qs.len(), self.shape()),
            ));
        }
        self.fake_quantize_impl(qs, range, qs.len())
    }

    fn fake_quantize_impl(&self, qs: &[QParams], range: QRange, channels: usize) -> Result<Tensor> {
        if self.device() != crate::Device::Cpu {
            return Err(invalid("fake_quantize", "runs on the CPU only"));
        }
        let x = self.try_to_vec()?;
        let per = x.len() / channels.max(1);
        let mut y = Vec::with_capacity(x.len());
        let mut mask = Vec::with_capacity(x.len());
        for (c, chunk) in x.chunks(per.max(1)).enumerate() {
            let q = qs[if channels == 1 { 0 } else { c }];
            let inv = 1.0 / q.scale;
            for &v in chunk {
                let (qv, inside) = quantize_one(v, inv, q.zero_point, range);
                y.push((qv - q.zero_point) as f32 * q.scale);
                mask.push(if inside { 1.0 } else { 0.0 });
            }
        }
        let op = record(&[self], || Op::Masked {
            input: self.clone(),
            mask,
            name: "fake_quantize",
        });
        Ok(Tensor::from_parts(y, self.shape().clone(), op))
    }
}
