//! Shape ops: `reshape`/`flatten` (views when contiguous), `permute` (a strided view),
//! `contiguous`, `concat`, and the channel-padding shortcut of CIFAR ResNets.

use super::{gpu_of, record, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::shortcut;
use crate::error::{invalid, shape_mismatch, Result};
use crate::shape::{normalize_dim, Shape};

impl Tensor {
    /// The same elements with another shape of equal size; a view when contiguous.
    ///
    /// ```
    /// let x = convnet::Tensor::zeros([2, 3, 4]);
    /// assert_eq!(x.reshape([6, 4])?.dims(), &[6, 4]);
    /// assert!(x.reshape([5, 5]).is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(shape_mismatch(
                "reshape",
                format!(
                    "a shape with {} elements (from {})",
                    self.numel(),
                    self.shape()
                ),
                shape.to_string(),
            ));
        }
        let op = record(&[self], || Op::Reshape {
            input: self.clone(),
        });
        if self.is_contiguous() {
            let strides = shape.contiguous_strides();
            Ok(self.view_with(shape, strides, self.0.offset, op))
        } else {
            if let Some(gpu) = gpu_of("reshape", &[self])? {
                return on_gpu!(gpu, |g| crate::backend::cuda::general::reshape_copy(
                    g, self, shape, op
                ));
            }
            Ok(Tensor::from_parts(self.to_vec(), shape, op))
        }
    }

    /// Flattens dimensions `start_dim..` into one, like `torch.flatten(x, start_dim)`.
    pub fn flatten(&self, start_dim: usize) -> Result<Tensor> {
        if start_dim >= self.rank().max(1) {
            return Err(invalid(
                "flatten",
                format!(
                    "start_dim {start_dim} is out of range for shape {}",
                    self.shape()
                ),
            ));
        }
        let mut dims = self.dims()[..start_dim].to_vec();
        dims.push(self.dims()[start_dim..].iter().product());
        self.reshape(dims)
    }

    /// Reorders dimensions (a strided view, no copy), like `torch.permute`.
    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if dims.len() != r
            || dims
                .iter()
                .any(|&d| d >= r || std::mem::replace(&mut seen[d], true))
        {
            return Err(invalid(
                "permute",
                format!(
                    "{dims:?} is not a permutation of the {r} dimensions of {}",
                    self.shape()
                ),
            ));
        }
        let shape = Shape::new(dims.iter().map(|&d| self.dims()[d]).collect::<Vec<_>>());
        let strides = dims.iter().map(|&d| self.0.strides[d]).collect();
        let op = record(&[self], || Op::Permute {
            input: self.clone(),
            dims: dims.to_vec(),
        });
        Ok(self.view_with(shape, strides, self.0.offset, op))
    }

    /// A contiguous tensor with the same values (the same tensor when already contiguous).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        self.reshape(self.shape().clone())
    }

    /// Concatenates tensors along `dim`, like `torch.cat`.
    pub fn concat(tensors: &[Tensor], dim: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| invalid("concat", "no tensors given"))?;
        let d = normalize_dim(dim, first.rank())?;
        let mut out_dims = first.dims().to_vec();
        out_dims[d] = 0;
        for t in tensors {
            let same_rest = t.rank() == first.rank()
                && (0..first.rank()).all(|i| i == d || t.dims()[i] == first.dims()[i]);
            if !same_rest {
                return Err(shape_mismatch(
                    "concat",
                    format!("shapes equal to {} except in dimension {d}", first.shape()),
                    t.shape().to_string(),
                ));
            }
            out_dims[d] += t.dims()[d];
        }
        if let Some(gpu) = gpu_of("concat", &tensors.iter().collect::<Vec<_>>())? {
            return on_gpu!(gpu, |g| crate::backend::cuda::general::concat(
                g, tensors, d, out_dims
            ));
        }
        let outer: usize = out_dims[..d].iter().product();
        let inner: usize = out_dims[d + 1..].iter().product();
        let mut out = Vec::with_capacity(out_dims.iter().product());
        let datas: Vec<Vec<f32>> = tensors.iter().map(Tensor::to_vec).collect();
        for o in 0..outer {
            for (t, data) in tensors.iter().zip(&datas) {
                let len = t.dims()[d] * inner;
                out.extend_from_slice(&data[o * len..(o + 1) * len]);
            }
        }
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let op = record(&refs, || Op::Concat {
            inputs: tensors.to_vec(),
            dim: d,
        });
        Ok(Tensor::from_parts(out, Shape::new(out_dims), op))
    }

    /// The parameter-free "option A" shortcut of CIFAR ResNets (He et al. 2016):
    /// `x[:, :, ::stride, ::stride]` zero-padded with `before` channels in front and as many
    /// behind as needed to reach `out_channels`.
    pub fn subsample_pad_channels(
        &self,
        stride: usize,
        before: usize,
        out_channels: usize,
    ) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("subsample_pad_channels {}", self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                self.expect_rank("subsample_pad_channels", 4, "[N, C, H, W]")?;
                let d = self.dims();
                let (n, c, h, w) = (d[0], d[1], d[2], d[3]);
                if stride == 0 || before + c > out_channels {
                    return Err(invalid("subsample_pad_channels", format!("stride {stride} must be positive and {before} + {c} channels must fit in {out_channels}")));
                }
                let geom = shortcut::Subsample {
                    c,
                    h,
                    w,
                    stride,
                    before,
                    out_channels,
                };
                if let Some(gpu) = gpu_of("subsample_pad_channels", &[self])? {
                    return on_gpu!(gpu, |g| crate::backend::cuda::ops::subsample_pad_channels(
                        g, self, geom
                    ));
                }
                let (oh, ow) = geom.out_hw();
                let mut out = vec![0f32; n * out_channels * oh * ow];
                self.with_data(|x| shortcut::forward(x, &geom, &mut out));
                let op = record(&[self], || Op::SubsamplePadChannels {
                    input: self.clone(),
                    geom,
                });
                Ok(Tensor::from_parts(
                    out,
                    Shape::new([n, out_channels, oh, ow]),
                    op,
                ))
            },
        )
    }
}
