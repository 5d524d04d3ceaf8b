//! Softmax and losses: `softmax`, `log_softmax`, fused `cross_entropy`, `nll_loss`,
//! `mse_loss`.

use super::{gpu_of, record, Tensor};
use crate::autograd::Op;
use crate::backend::cpu::loss;
use crate::error::{invalid, shape_mismatch, Error, Result};
use crate::shape::{normalize_dim, Shape};

/// How per-sample losses are combined, as PyTorch's `reduction=` argument.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Reduction {
    /// Average over the batch (the default).
    #[default]
    Mean,
    /// Sum over the batch.
    Sum,
    /// One loss per sample.
    None,
    /// Sum over the batch divided by this positive number: the share of a larger batch's
    /// mean when the batch is one slice of it. Data-parallel ranks divide by
    /// `global batch / ranks`, so that averaging their gradients gives the gradient of the
    /// global batch's mean even when the slices differ in size; for equal slices this is
    /// exactly `Mean`.
    ///
    /// ```
    /// use convnet::{Reduction, Tensor};
    /// let logits = Tensor::zeros([2, 4]);
    /// let mean = logits.cross_entropy(&[0, 3], Reduction::Mean, 0.0)?.item()?;
    /// let share = logits.cross_entropy(&[0, 3], Reduction::Divided(4.0), 0.0)?.item()?;
    /// assert!((share - mean / 2.0).abs() < 1e-6);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    Divided(f32),
}

impl Reduction {
    /// What the sum of `n` per-sample losses is divided by (`None` for [`Reduction::None`]),
    /// or an error for a divisor that is not a positive finite number.
    fn divisor(self, op: &'static str, n: usize) -> Result<Option<f32>> {
        match self {
            Reduction::Mean => Ok(Some(n as f32)),
            Reduction::Sum => Ok(Some(1.0)),
            Reduction::None => Ok(None),
            Reduction::Divided(d) if d.is_finite() && d > 0.0 => Ok(Some(d)),
            Reduction::Divided(d) => Err(invalid(
                op,
                format!("the divisor of Reduction::Divided must be positive and finite, got {d}"),
            )),
        }
    }
}

fn check_targets(op: &'static str, logits: &Tensor, targets: &[usize]) -> Result<(usize, usize)> {
    logits.expect_rank(op, 2, "[N, C]")?;
    let (n, c) = (logits.dims()[0], logits.dims()[1]);
    if targets.len() != n {
        return Err(shape_mismatch(
            op,
            format!("{n} targets (input is {})", logits.shape()),
            format!("{} targets", targets.len()),
        ));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= c) {
        return Err(Error::ClassIndexOutOfRange {
            op,
            index: bad as i64,
            num_classes: c,
        });
    }
    Ok((n, c))
}

fn reduce_rows(
    per_row_total: f64,
    per_row: Vec<f32>,
    n: usize,
    divisor: Option<f32>,
) -> (Vec<f32>, Shape, f32) {
    match divisor {
        Some(1.0) => (vec![per_row_total as f32], Shape::new(Vec::new()), 1.0),
        Some(d) => (
            vec![(per_row_total / d as f64) as f32],
            Shape::new(Vec::new()),
            d,
        ),
        None => (per_row, Shape::new([n]), 1.0),
    }
}

impl Tensor {
    fn softmax_impl(&self, dim: isize, log: bool) -> Result<Tensor> {
        let d = normalize_dim(dim, self.rank())?;
        let dims = self.dims();
        let outer: usize = dims[..d].iter().product();
        let len = dims.get(d).copied().unwrap_or(1);
        let inner: usize = dims.get(d + 1..).map_or(1, |s| s.iter().product());
        if let Some(gpu) = gpu_of(if log { "log_softmax" } else { "softmax" }, &[self])? {
            return on_gpu!(gpu, |g| crate::backend::cuda::general::softmax(
                g,
                self,
                (outer, len, inner),
                log
            ));
        }
        let mut out = vec![0f32; self.numel()];
        self.with_data(|x| loss::softmax_forward(x, outer, len, inner, log, &mut out));
        let op = record(&[self], || Op::Softmax {
            input: self.clone(),
            outer,
            d: len,
            inner,
            log,
        });
        Ok(Tensor::from_parts(out, self.shape().clone(), op))
    }

    /// Softmax along `dim`.
    ///
    /// ```
    /// let p = convnet::Tensor::from_vec(vec![0.0, 0.0], [1, 2])?.softmax(-1)?;
    /// assert_eq!(p.to_vec(), vec![0.5, 0.5]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl(dim, false)
    }

    /// Log-softmax along `dim`.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl(dim, true)
    }

    /// Cross-entropy of logits `[N, C]` against class indices, with label smoothing in
    /// `[0, 1]`, like `F.cross_entropy(x, y, reduction=..., label_smoothing=...)`.
    /// Log-softmax is fused in.
    ///
    /// ```
    /// use convnet::{Reduction, Tensor};
    /// let logits = Tensor::zeros([2, 4]);
    /// let loss = logits.cross_entropy(&[0, 3], Reduction::Mean, 0.0)?;
    /// assert!((loss.item()? - 4f32.ln()).abs() < 1e-6);
    /// assert!(logits.cross_entropy(&[0, 4], Reduction::Mean, 0.0).is_err()); // class 4 of 4
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn cross_entropy(
        &self,
        targets: &[usize],
        reduction: Reduction,
        label_smoothing: f32,
    ) -> Result<Tensor> {
        crate::profile::timed(
            false,
            || format!("cross_entropy {}", self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                let (n, c) = check_targets("cross_entropy", self, targets)?;
                if !(0.0..=1.0).contains(&label_smoothing) {
                    return Err(invalid(
                        "cross_entropy",
                        format!("label_smoothing must be in [0, 1], got {label_smoothing}"),
                    ));
                }
                if n == 0 {
                    return Err(invalid("cross_entropy", "empty batch"));
                }
                let divisor = reduction.divisor("cross_entropy", n)?;
                if let Some(gpu) = gpu_of("cross_entropy", &[self])? {
                    return on_gpu!(gpu, |g| {
                        crate::backend::cuda::ops::cross_entropy(
                            g,
                            self,
                            targets,
                            label_smoothing,
                            divisor,
                        )
                    });
                }
                let mut probs = vec![0f32; n * c];
                let mut per_row = vec![0f32; if reduction == Reduction::None { n } else { 0 }];
                let total = self.with_data(|x| {
                    if reduction == Reduction::None {
                        let mut t = 0.0;
                        for (i, row_loss) in per_row.iter_mut().enumerate() {
                            let l = loss::cross_entropy_forward(
                                &x[i * c..(i + 1) * c],
                                &targets[i..=i],
                                c,
                                label_smoothing,
                                &mut probs[i * c..(i + 1) * c],
                            );
                            *row_loss = l as f32;
                            t += l;
                        }
                        t
                    } else {
                        loss::cross_entropy_forward(x, targets, c, label_smoothing, &mut probs)
                    }
                });
                let (data, shape, divisor) = reduce_rows(total, per_row, n, divisor);
                let op = record(&[self], || Op::CrossEntropy {
                    logits: self.clone(),
                    targets: targets.to_vec(),
                    probs,
                    smoothing: label_smoothing,
                    divisor,
                });
                Ok(Tensor::from_parts(data, shape, op))
            },
        )
    }

    /// Negative log-likelihood of log-probabilities `[N, C]`, like `F.nll_loss`.
    pub fn nll_loss(&self, targets: &[usize], reduction: Reduction) -> Result<Tensor> {
        let (n, c) = check_targets("nll_loss", self, targets)?;
        if n == 0 {
            return Err(invalid("nll_loss", "empty batch"));
        }
        let divisor = reduction.divisor("nll_loss", n)?;
        if let Some(gpu) = gpu_of("nll_loss", &[self])? {
            return on_gpu!(gpu, |g| {
                crate::backend::cuda::general::nll_loss(g, self, targets, divisor)
            });
        }
        let per_row: Vec<f32> = self.with_data(|x| {
            targets
                .iter()
                .enumerate()
                .map(|(i, &t)| -x[i * c + t])
                .collect()
        });
        let total: f64 = per_row.iter().map(|&v| v as f64).sum();
        let (data, shape, divisor) = reduce_rows(total, per_row, n, divisor);
        let op = record(&[self], || Op::NllLoss {
            input: self.clone(),
            targets: targets.to_vec(),
            divisor,
        });
        Ok(Tensor::from_parts(data, shape, op))
    }

    /// Mean (or summed) squared error between same-shaped tensors, like `F.mse_loss`.
    pub fn mse_loss(&self, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
        if self.shape() != target.shape() {
            return Err(shape_mismatch(
                "mse_loss",
                format!("target {}", self.shape()),
                format!("target {}", target.shape()),
            ));
        }
        if reduction == Reduction::None {
            return Err(invalid(
                "mse_loss",
                "reduction None is not supported; use Mean or Sum",
            ));
        }
        let n = self.numel().max(1);
        let divisor = reduction.divisor("mse_loss", n)?.unwrap_or(1.0);
        if let Some(gpu) = gpu_of("mse_loss", &[self, target])? {
            return on_gpu!(gpu, |g| {
                crate::backend::cuda::general::mse_loss(g, self, target, divisor)
            });
        }
        let total: f64 = self.with_data(|a| {
            target.with_data(|b| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum())
        });
        let value = if divisor == 1.0 {
            total as f32
        } else {
            (total / divisor as f64) as f32
        };
        let op = record(&[self, target], || Op::MseLoss {
            input: self.clone(),
            target: target.clone(),
            divisor,
        });
        Ok(Tensor::from_parts(vec![value], Shape::new(Vec::new()), op))
    }
}
