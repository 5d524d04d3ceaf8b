//! Reductions: `sum` and `mean` over dimensions or over everything.

use super::{gpu_of, record, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::elementwise as ew;
use crate::error::{invalid, Result};
use crate::shape::{normalize_dim, Shape};

impl Tensor {
    fn reduce(&self, dims: &[isize], keepdim: bool, mean: bool) -> Result<Tensor> {
        let mut ds: Vec<usize> = dims
            .iter()
            .map(|&d| normalize_dim(d, self.rank()))
            .collect::<Result<_>>()?;
        ds.sort_unstable();
        ds.dedup();
        if self.rank() == 0 {
            ds.clear();
        }
        let count: usize = ds.iter().map(|&d| self.dims()[d]).product();
        if mean && count == 0 {
            return Err(invalid("mean", "mean over an empty dimension"));
        }
        let scale = if mean { 1.0 / count as f32 } else { 1.0 };
        if let Some(gpu) = gpu_of(if mean { "mean" } else { "sum" }, &[self])? {
            return on_gpu!(gpu, |g| crate::backend::cuda::general::sum(
                g,
                self,
                &ds,
                scale,
                self.reduced_dims(&ds, keepdim)
            ));
        }
        let mut out = self.with_data(|x| ew::sum_dims(x, self.dims(), &ds));
        if mean {
            out.iter_mut().for_each(|v| *v *= scale);
        }
        let shape = self.reduced_dims(&ds, keepdim);
        let op = record(&[self], || Op::Sum {
            input: self.clone(),
            dims: ds.clone(),
            scale,
        });
        Ok(Tensor::from_parts(out, Shape::new(shape), op))
    }

    /// The dimensions left after summing over `ds` (kept as 1 with `keepdim`).
    fn reduced_dims(&self, ds: &[usize], keepdim: bool) -> Vec<usize> {
        self.dims()
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| {
                if ds.contains(&i) {
                    keepdim.then_some(1)
                } else {
                    Some(d)
                }
            })
            .collect()
    }

    /// Sum over `dims` (negative counts from the end), like `torch.sum(x, dims, keepdim)`.
    pub fn sum(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.reduce(dims, keepdim, false)
    }

    /// Mean over `dims`, like `torch.mean(x, dims, keepdim)`.
    pub fn mean(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.reduce(dims, keepdim, true)
    }

    /// Sum of all elements, as a scalar tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let all: Vec<isize> = (0..self.rank() as isize).collect();
        self.reduce(&all, false, false)
    }

    /// Mean of all elements, as a scalar tensor.
    pub fn mean_all(&self) -> Result<Tensor> {
        let all: Vec<isize> = (0..self.rank() as isize).collect();
        self.reduce(&all, false, true)
    }

    /// Index of the largest value along the last dimension, per row (for accuracy).
    pub fn argmax_last(&self) -> Result<Vec<usize>> {
        let c = *self
            .dims()
            .last()
            .ok_or_else(|| invalid("argmax", "scalar has no last dimension"))?;
        if c == 0 {
            return Err(invalid("argmax", "last dimension is empty"));
        }
        Ok(self.with_data(|x| {
            x.chunks(c)
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .fold(0, |best, (i, &v)| if v > row[best] { i } else { best })
                })
                .collect()
        }))
    }
}
