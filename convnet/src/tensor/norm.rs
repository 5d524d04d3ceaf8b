//! `batch_norm2d`: batch statistics and running-stat update in training, running statistics
//! in evaluation.

use super::{gpu_of, record, Tensor};
use crate::autograd::{BnEpilogue, Op};
use crate::backend::cpu::{norm, recycle};
use crate::error::{invalid, shape_mismatch, Error, Result};

impl Tensor {
    /// Batch normalisation of `[N, C, H, W]` over N, H and W, like `F.batch_norm`.
    ///
    /// In training, normalises with the batch mean and biased variance and updates
    /// `running_mean`/`running_var` in place with `momentum` (using the unbiased variance);
    /// otherwise normalises with the running statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm2d(
        &self,
        running_mean: &Tensor,
        running_var: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<Tensor> {
        self.batch_norm2d_impl(
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            BnEpilogue::None,
        )
    }

    /// `batch_norm2d(..).relu()` in one op: the ReLU is applied as the normalised values are
    /// written, and its mask is folded into batch norm's backward pass, saving two passes
    /// over the activation. Same results as the two ops.
    ///
    /// ```
    /// use convnet::Tensor;
    /// let x = Tensor::randn([2, 3, 4, 4], &mut convnet::Rng::new(0));
    /// let (m, v) = (Tensor::zeros([3]), Tensor::ones([3]));
    /// let fused = x.batch_norm2d_relu(&m, &v, None, None, true, 0.1, 1e-5)?;
    /// let (m, v) = (Tensor::zeros([3]), Tensor::ones([3]));
    /// let apart = x.batch_norm2d(&m, &v, None, None, true, 0.1, 1e-5)?.relu()?;
    /// assert_eq!(fused.to_vec(), apart.to_vec());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm2d_relu(
        &self,
        running_mean: &Tensor,
        running_var: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<Tensor> {
        self.batch_norm2d_impl(
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            BnEpilogue::Relu,
        )
    }

    /// `batch_norm2d(..).add(residual).relu()` in one op, the end of a residual block: one
    /// pass forward, and backward the ReLU mask is folded into batch norm's first pass, which
    /// also yields the residual's gradient. Same results as the three ops.
    ///
    /// ```
    /// use convnet::Tensor;
    /// let mut rng = convnet::Rng::new(0);
    /// let x = Tensor::randn([2, 3, 4, 4], &mut rng);
    /// let shortcut = Tensor::randn([2, 3, 4, 4], &mut rng);
    /// let (m, v) = (Tensor::zeros([3]), Tensor::ones([3]));
    /// let fused = x.batch_norm2d_add_relu(&shortcut, &m, &v, None, None, true, 0.1, 1e-5)?;
    /// let (m, v) = (Tensor::zeros([3]), Tensor::ones([3]));
    /// let apart = x.batch_norm2d(&m, &v, None, None, true, 0.1, 1e-5)?.add(&shortcut)?.relu()?;
    /// assert_eq!(fused.to_vec(), apart.to_vec());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn batch_norm2d_add_relu(
        &self,
        residual: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f32,
        eps: f32,
    ) -> Result<Tensor> {
        if residual.shape() != self.shape() {
            return Err(shape_mismatch(
                "batch_norm2d_add_relu",
                format!("residual {}", self.shape()),
                format!("residual {}", residual.shape()),
            ));
        }
        self.batch_norm2d_impl(
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            BnEpilogue::AddRelu(residual.clone()),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_norm2d_impl(
        &self,
        running_mean: &Tensor,
        running_var: &Tensor,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f32,
        eps: f32,
        epilogue: BnEpilogue,
    ) -> Result<Tensor> {
        let label = epilogue.label();
        crate::profile::timed(
            false,
            || format!("{label} {}", self.shape()),
            || 0.0,
            || -> Result<Tensor> {
                let op_name = "batch_norm2d";
                self.expect_rank(op_name, 4, "[N, C, H, W]")?;
                let d = self.dims();
                let (n, c, hw) = (d[0], d[1], d[2] * d[3]);
                for (what, t) in [
                    ("running_mean", Some(running_mean)),
                    ("running_var", Some(running_var)),
                    ("weight", weight),
                    ("bias", bias),
                ] {
                    if let Some(t) = t {
                        if t.dims() != [c] {
                            return Err(shape_mismatch(
                                op_name,
                                format!("{what} [{c}]"),
                                format!("{what} {}", t.shape()),
                            ));
                        }
                    }
                }
                if eps <= 0.0 || !(0.0..=1.0).contains(&momentum) {
                    return Err(invalid(op_name, format!("eps must be positive and momentum in [0, 1], got eps={eps}, momentum={momentum}")));
                }
                let count = n * hw;
                // Statistics over the global batch of data-parallel ranks (SyncBatchNorm).
                let sync = training.then(crate::dist::sync_bn::active).flatten();
                if training && count <= 1 && sync.is_none() {
                    return Err(invalid(
                        op_name,
                        format!(
                            "expected more than 1 value per channel when training, got input {}",
                            self.shape()
                        ),
                    ));
                }
                // The differentiable inputs (the op takes the epilogue and its residual by value
                // below); the running statistics must be on the same device too.
                let residual = epilogue.residual().cloned();
                let mut inputs = vec![self];
                inputs.extend(weight);
                inputs.extend(bias);
                inputs.extend(residual.as_ref());
                let all = [inputs.as_slice(), &[running_mean, running_var]].concat();
                if let Some(gpu) = gpu_of(op_name, &all)? {
                    if sync.is_some() {
                        return Err(Error::Unsupported(
                            "synchronised batch norm runs on the CPU only: train on the GPU without --sync-bn".into(),
                        ));
                    }
                    return on_gpu!(gpu, |g| crate::backend::cuda::ops::batch_norm2d(
                        g,
                        self,
                        running_mean,
                        running_var,
                        weight,
                        bias,
                        training,
                        momentum,
                        eps,
                        epilogue
                    ));
                }
                let mut synced = None;
                let (mean, invstd): (Vec<f32>, Vec<f32>) = if training {
                    let (mut bm, mut bv) = self.with_data(|x| norm::batch_stats(x, n, c, hw));
                    let mut count = count as f64;
                    if let Some(group) = sync {
                        (count, bm, bv) = group.combine(n * hw, &bm, &bv)?;
                        if count <= 1.0 {
                            return Err(invalid(
                                op_name,
                                format!("expected more than 1 value per channel when training, got {count} over all ranks"),
                            ));
                        }
                        let contributes = group.contributes();
                        synced = Some(crate::dist::sync_bn::Synced {
                            group,
                            count,
                            contributes,
                        });
                    }
                    let unbias = count / (count - 1.0);
                    let m = momentum as f64;
                    running_mean.update_data(|r| {
                        r.iter_mut()
                            .zip(&bm)
                            .for_each(|(r, b)| *r = ((1.0 - m) * *r as f64 + m * b) as f32)
                    })?;
                    running_var.update_data(|r| {
                        r.iter_mut()
                            .zip(&bv)
                            .for_each(|(r, b)| *r = ((1.0 - m) * *r as f64 + m * b * unbias) as f32)
                    })?;
                    let invstd = bv
                        .iter()
                        .map(|v| (1.0 / (v + eps as f64).sqrt()) as f32)
                        .collect();
                    (bm.iter().map(|&v| v as f32).collect::<Vec<f32>>(), invstd)
                } else {
                    let invstd = running_var.with_data(|v| {
                        v.iter()
                            .map(|&v| (1.0 / (v as f64 + eps as f64).sqrt()) as f32)
                            .collect()
                    });
                    (running_mean.to_vec(), invstd)
                };
                // normalize writes every output.
                let mut y = recycle::take_overwritten(self.numel());
                let w = weight.map(Tensor::to_vec);
                let b = bias.map(Tensor::to_vec);
                self.with_data(|x| {
                    epilogue.with_kernel_form(|fused| {
                        norm::normalize(
                            x,
                            &mean,
                            &invstd,
                            w.as_deref(),
                            b.as_deref(),
                            c,
                            hw,
                            fused,
                            &mut y,
                        )
                    })
                });
                let op = record(&inputs, || Op::BatchNorm2d {
                    input: self.clone(),
                    weight: weight.cloned(),
                    bias: bias.cloned(),
                    mean,
                    invstd,
                    training,
                    epilogue,
                    synced,
                });
                Ok(Tensor::from_parts(y, self.shape().clone(), op))
            },
        )
    }
}
