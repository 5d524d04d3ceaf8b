//! [`DataParallel`]: PyTorch's `DistributedDataParallel` for a [`Model`] — rank 0's weights
//! broadcast at the start, gradients averaged over the ranks in buckets that are reduced
//! while the backward pass still runs, BatchNorm buffers kept equal, optional synchronised
//! batch norm.
//!
//! Buckets: parameters are grouped, in reverse registration order at first (roughly the
//! order backward completes them) and in the order the first backward pass actually
//! completed them from the second step on, into buckets of at most
//! [`DataParallelOptions::bucket_bytes`] (the first one smaller, so communication starts
//! early). When every gradient of a bucket is complete, it is divided by the number of ranks
//! into the bucket's buffer and a non-blocking all-reduce starts; buckets start in order on
//! every rank, as MPI requires. After each op of the backward pass the reductions in flight
//! are given a chance to progress; after the last op the step waits for what is left and
//! writes the averages back into the gradients.

use super::sync_bn::{self, SyncGroup};
use super::{Channel, Communicator, PendingReduce};
use crate::autograd::{BackwardHooks, GradStore};
use crate::device::Device;
use crate::error::{invalid, Error, Result};
use crate::nn::{Mode, Model};
use crate::tensor::{Reduction, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Settings of [`DataParallel`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DataParallelOptions {
    /// Largest gradient bucket in bytes (PyTorch's `bucket_cap_mb`, 25 MiB by default).
    pub bucket_bytes: usize,
    /// Largest first bucket in bytes (1 MiB, as PyTorch's DDP), so that the first
    /// reduction starts early in the backward pass.
    pub first_bucket_bytes: usize,
    /// Start each bucket's reduction as soon as its gradients are complete (true), or all
    /// of them after the backward pass (false; for measuring what the overlap buys).
    pub overlap: bool,
    /// Batch statistics over the global batch (PyTorch's `SyncBatchNorm`) instead of each
    /// rank's slice.
    pub sync_batch_norm: bool,
    /// Copy rank 0's buffers (BatchNorm running statistics) to every rank before each
    /// training forward pass, as DDP's `broadcast_buffers` (without synchronised batch norm
    /// the ranks' running statistics would otherwise drift apart).
    pub broadcast_buffers: bool,
}

/// PyTorch's defaults: 25 MiB buckets, a 1 MiB first bucket.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

impl Default for DataParallelOptions {
    fn default() -> Self {
        DataParallelOptions {
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            first_bucket_bytes: 1 << 20,
            overlap: true,
            sync_batch_norm: false,
            broadcast_buffers: true,
        }
    }
}

/// Where the time of data-parallel steps went, summed over steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommStats {
    /// Steps reduced.
    pub steps: usize,
    /// Waiting for gradient reductions after the backward pass.
    pub wait_seconds: f64,
    /// Copying gradients into buckets and starting reductions during the backward pass.
    pub bucket_seconds: f64,
    /// Broadcasting buffers before forward passes.
    pub buffer_seconds: f64,
    /// Gradient bytes reduced per step.
    pub bytes_per_step: usize,
    /// Buckets per step.
    pub buckets: usize,
}

impl CommStats {
    /// Seconds spent on communication that computation did not hide (waiting, copying
    /// gradients into buckets, broadcasting buffers).
    pub fn exposed_seconds(&self) -> f64 {
        self.wait_seconds + self.bucket_seconds + self.buffer_seconds
    }
}

/// One group of gradients reduced together.
struct Bucket {
    /// Indices into `DataParallel::params`.
    members: Vec<usize>,
    /// Start of each member in the buffers.
    offsets: Vec<usize>,
    send: Vec<f32>,
    recv: Vec<f32>,
    /// Members whose gradient is in `send` this step.
    ready: usize,
    pending: Option<Box<dyn PendingReduce>>,
    /// With NCCL: the members' gradients on the GPU, averaged in place there.
    #[cfg(feature = "nccl")]
    on_gpu: Vec<Option<Tensor>>,
}

/// Data-parallel training of one model over the ranks of a [`Communicator`].
///
/// ```
/// use convnet::dist::{DataParallel, DataParallelOptions, SingleProcess};
/// use convnet::nn::Mode;
/// use convnet::{models, Reduction, Tensor};
/// use std::sync::Arc;
/// let model = models::build("seed-cnn", [3, 32, 32], 10)?;
/// let mut ddp = DataParallel::new(Arc::new(SingleProcess), &model, DataParallelOptions::default())?;
/// let x = Tensor::zeros([2, 3, 32, 32]);
/// let loss = ddp.forward(&model, &x, Mode::Train)?.cross_entropy(&[1, 2], Reduction::Mean, 0.0)?;
/// let grads = ddp.backward(&loss)?; // averaged over the ranks (here: one)
/// assert_eq!(grads.len(), model.named_parameters().len());
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct DataParallel {
    comm: Arc<dyn Communicator>,
    opts: DataParallelOptions,
    /// Trained parameters (those that require a gradient) with their names.
    params: Vec<(String, Tensor)>,
    /// Everything else of the state dict (BatchNorm statistics).
    buffers: Vec<(String, Tensor)>,
    /// Parameter -> (bucket, member position).
    slot: HashMap<TensorId, (usize, usize)>,
    buckets: Vec<Bucket>,
    /// Whether the buckets follow the order the first backward pass completed the
    /// parameters in.
    rebuilt: bool,
    sync: Option<Arc<SyncGroup>>,
    stats: CommStats,
    /// GPU gradients averaged by NCCL instead of through host buffers.
    #[cfg(feature = "nccl")]
    nccl: Option<super::nccl::NcclGradients>,
}

impl DataParallel {
    /// Prepares data-parallel training of `model`: checks that every rank has the same
    /// model, copies rank 0's parameters and buffers to every rank, and sets up the
    /// buckets. Every rank must call it (it is collective).
    pub fn new(
        comm: Arc<dyn Communicator>,
        model: &Model,
        opts: DataParallelOptions,
    ) -> Result<DataParallel> {
        if opts.bucket_bytes == 0 || opts.first_bucket_bytes == 0 {
            return Err(invalid("DataParallel", "bucket sizes must be positive"));
        }
        let state = model.state_dict();
        check_same_model(comm.as_ref(), &state)?;
        if comm.size() > 1 {
            for (name, t) in &state {
                broadcast_tensor(comm.as_ref(), t)
                    .map_err(|e| Error::State(format!("{name}: broadcast from rank 0: {e}")))?;
            }
        }
        let params: Vec<(String, Tensor)> = model
            .named_parameters()
            .into_iter()
            .filter(|(_, t)| t.tracks_grad())
            .collect();
        let buffers = state
            .into_iter()
            .filter(|(_, t)| !params.iter().any(|(_, p)| p.id() == t.id()))
            .collect();
        let sync = opts
            .sync_batch_norm
            .then(|| Arc::new(SyncGroup::new(comm.clone())));
        let mut dp = DataParallel {
            comm,
            opts,
            params,
            buffers,
            slot: HashMap::new(),
            buckets: Vec::new(),
            rebuilt: false,
            sync,
            stats: CommStats::default(),
            #[cfg(feature = "nccl")]
            nccl: None,
        };
        let reverse: Vec<usize> = (0..dp.params.len()).rev().collect();
        dp.make_buckets(&reverse);
        Ok(dp)
    }

    /// The communicator.
    pub fn communicator(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// The settings.
    pub fn options(&self) -> &DataParallelOptions {
        &self.opts
    }

    /// Communication figures so far.
    pub fn stats(&self) -> CommStats {
        self.stats
    }

    /// Clears the communication figures.
    pub fn reset_stats(&mut self) {
        self.stats = CommStats {
            bytes_per_step: self.stats.bytes_per_step,
            buckets: self.stats.buckets,
            ..CommStats::default()
        };
    }

    /// The parameters of each bucket, by name, in the order they are reduced.
    pub fn bucket_names(&self) -> Vec<Vec<String>> {
        self.buckets
            .iter()
            .map(|b| {
                b.members
                    .iter()
                    .map(|&p| self.params[p].0.clone())
                    .collect()
            })
            .collect()
    }

    /// Groups the parameters, in `order`, into buckets.
    fn make_buckets(&mut self, order: &[usize]) {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let (mut current, mut bytes) = (Vec::new(), 0usize);
        for &p in order {
            current.push(p);
            bytes += 4 * self.params[p].1.numel();
            let cap = if groups.is_empty() {
                self.opts.first_bucket_bytes.min(self.opts.bucket_bytes)
            } else {
                self.opts.bucket_bytes
            };
            if bytes >= cap {
                groups.push(std::mem::take(&mut current));
                bytes = 0;
            }
        }
        if !current.is_empty() {
            groups.push(current);
        }
        self.slot.clear();
        self.buckets = groups
            .into_iter()
            .enumerate()
            .map(|(b, members)| {
                let mut offsets = Vec::with_capacity(members.len());
                let mut len = 0;
                for (i, &p) in members.iter().enumerate() {
                    self.slot.insert(self.params[p].1.id(), (b, i));
                    offsets.push(len);
                    len += self.params[p].1.numel();
                }
                Bucket {
                    #[cfg(feature = "nccl")]
                    on_gpu: vec![None; members.len()],
                    members,
                    offsets,
                    send: vec![0.0; len],
                    recv: vec![0.0; len],
                    ready: 0,
                    pending: None,
                }
            })
            .collect();
        self.stats.bytes_per_step = 4 * self.params.iter().map(|(_, t)| t.numel()).sum::<usize>();
        self.stats.buckets = self.buckets.len();
    }

    /// Averages the gradients of a model on GPU `gpu` with NCCL between the ranks' GPUs,
    /// in place on the device, instead of copying them through host buffers and MPI.
    /// Collective: every rank must call it (see [`super::nccl::NcclGradients::new`]).
    #[cfg(feature = "nccl")]
    pub fn use_nccl(&mut self, gpu: usize) -> Result<()> {
        self.nccl = Some(super::nccl::NcclGradients::new(self.comm.as_ref(), gpu)?);
        Ok(())
    }

    /// Copies rank 0's buffers (BatchNorm running statistics and counters) to every rank.
    pub fn broadcast_buffers(&mut self) -> Result<()> {
        if self.comm.size() == 1 {
            return Ok(());
        }
        let start = Instant::now();
        for (name, t) in &self.buffers {
            broadcast_tensor(self.comm.as_ref(), t)
                .map_err(|e| Error::State(format!("{name}: broadcast from rank 0: {e}")))?;
        }
        self.stats.buffer_seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    /// Runs `model` on this rank's slice of the batch. In training mode the buffers are
    /// first made rank 0's ([`DataParallelOptions::broadcast_buffers`]), and batch norm is
    /// synchronised over the ranks with [`DataParallelOptions::sync_batch_norm`].
    pub fn forward(&mut self, model: &Model, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if !mode.is_train() {
            return model.forward(x, mode);
        }
        match &self.sync {
            Some(group) => {
                group.set_idle(false);
                sync_bn::with_group(group, || model.forward(x, mode))
            }
            None => {
                if self.opts.broadcast_buffers {
                    self.broadcast_buffers()?;
                }
                model.forward(x, mode)
            }
        }
    }

    /// For a rank whose slice of a short last batch is empty: a training forward pass on
    /// two blank stand-in images that takes part in every collective of the step while
    /// contributing nothing — the returned loss is zero and so are its gradients, and
    /// synchronised batch norm counts no values from this rank. Pass the loss to
    /// [`DataParallel::backward`] like any other.
    pub fn idle_loss(&mut self, model: &Model) -> Result<Tensor> {
        let mut dims = vec![2];
        dims.extend_from_slice(model.input_shape());
        let x = Tensor::zeros(dims).to_device(model.device())?;
        let logits = match &self.sync {
            Some(group) => {
                group.set_idle(true);
                let out = sync_bn::with_group(group, || model.forward(&x, Mode::Train));
                group.set_idle(false);
                out?
            }
            None => self.forward(model, &x, Mode::Train)?,
        };
        logits
            .cross_entropy(&[0, 0], Reduction::Mean, 0.0)?
            .scale(0.0)
    }

    /// Backpropagates `loss` (this rank's share: its slice's mean, or
    /// [`Reduction::Divided`] by `global batch / ranks` for slices of unequal size) and
    /// returns every parameter's gradient averaged over the ranks (summed, divided by
    /// their number), the same on every rank. Every rank must call it once per step.
    pub fn backward(&mut self, loss: &Tensor) -> Result<GradStore> {
        if self.comm.size() == 1 {
            return loss.backward();
        }
        for b in &mut self.buckets {
            b.ready = 0;
        }
        let mut step = Step {
            dp: self,
            launched: 0,
            order: Vec::new(),
            seconds: 0.0,
        };
        let mut grads = loss.backward_with_hooks(&mut step)?;
        let Step {
            launched,
            order,
            seconds,
            ..
        } = step;
        self.stats.bucket_seconds += seconds;
        if let Some((name, _)) = self.params.iter().find(|(_, p)| grads.get(p).is_none()) {
            return Err(Error::Backward(format!(
                "parameter {name} received no gradient: data-parallel training needs every trained parameter in every step's graph"
            )));
        }
        let start = Instant::now();
        let mut next = launched;
        while next < self.buckets.len() {
            self.launch(next)?;
            next += 1;
        }
        for b in 0..self.buckets.len() {
            self.finish(b, &mut grads)?;
        }
        self.stats.wait_seconds += start.elapsed().as_secs_f64();
        self.stats.steps += 1;
        if !self.rebuilt && order.len() == self.params.len() {
            // Later steps group the parameters in the order backward completes them.
            self.make_buckets(&order);
            self.rebuilt = true;
        }
        Ok(grads)
    }

    /// Starts bucket `b`'s reduction.
    fn launch(&mut self, b: usize) -> Result<()> {
        #[cfg(feature = "nccl")]
        if let Some(nccl) = &self.nccl {
            let held = &self.buckets[b].on_gpu;
            if held.iter().all(Option::is_some) {
                let buffers = held
                    .iter()
                    .flatten()
                    .map(|t| Ok((t.cuda_ptr("NCCL all-reduce")?, t.numel())))
                    .collect::<Result<Vec<_>>>()?;
                return nccl.average(&buffers);
            }
        }
        let bucket = &mut self.buckets[b];
        let (send, recv) = (
            std::mem::take(&mut bucket.send),
            std::mem::take(&mut bucket.recv),
        );
        bucket.pending = Some(self.comm.start_all_reduce(send, recv)?);
        Ok(())
    }

    /// Waits for bucket `b` and writes its averages into `grads`.
    fn finish(&mut self, b: usize, grads: &mut GradStore) -> Result<()> {
        let bucket = &mut self.buckets[b];
        #[cfg(feature = "nccl")]
        if bucket.on_gpu.iter().any(Option::is_some) {
            // Averaged in place on the GPUs, in stream order before the optimizer's kernels.
            bucket.on_gpu.iter_mut().for_each(|t| *t = None);
            return Ok(());
        }
        let pending = bucket
            .pending
            .take()
            .ok_or_else(|| Error::Backward(format!("gradient bucket {b} was never started")))?;
        let (send, recv) = pending.wait()?;
        for (&p, &off) in bucket.members.iter().zip(&bucket.offsets) {
            let param = &self.params[p].1;
            let avg = &recv[off..off + param.numel()];
            let grad = grads.get(param).ok_or_else(|| {
                Error::Backward(format!("{}: gradient vanished", self.params[p].0))
            })?;
            grad.copy_from_slice(avg)?;
        }
        bucket.send = send;
        bucket.recv = recv;
        Ok(())
    }
}

/// The backward pass of one step, filling buckets as gradients complete.
struct Step<'a> {
    dp: &'a mut DataParallel,
    /// Buckets started so far (they start in order).
    launched: usize,
    /// Parameters in the order their gradients completed.
    order: Vec<usize>,
    /// Time spent here.
    seconds: f64,
}

impl BackwardHooks for Step<'_> {
    fn leaf_ready(&mut self, leaf: &Tensor, grad: &Tensor) -> Result<()> {
        let Some(&(b, i)) = self.dp.slot.get(&leaf.id()) else {
            return Ok(());
        };
        let start = Instant::now();
        let ranks = self.dp.comm.size() as f32;
        let bucket = &mut self.dp.buckets[b];
        #[cfg(feature = "nccl")]
        let on_gpu = self.dp.nccl.is_some() && grad.device() != Device::Cpu;
        #[cfg(not(feature = "nccl"))]
        let on_gpu = false;
        if on_gpu {
            #[cfg(feature = "nccl")]
            {
                bucket.on_gpu[i] = Some(grad.clone());
            }
        } else {
            Self::stage(bucket, i, grad, ranks)?;
        }
        bucket.ready += 1;

        self.order.push(bucket.members[i]);
        if self.dp.opts.overlap {
            while self.launched < self.dp.buckets.len()
                && self.dp.buckets[self.launched].ready
                    == self.dp.buckets[self.launched].members.len()
            {
                self.dp.launch(self.launched)?;
                self.launched += 1;
            }
        }
        self.seconds += start.elapsed().as_secs_f64();
        Ok(())
    }

    fn after_op(&mut self) -> Result<()> {
        for b in &mut self.dp.buckets[..self.launched] {
            if let Some(p) = b.pending.as_mut() {
                p.test()?;
            }
        }
        Ok(())
    }
}

impl Step<'_> {
    /// Writes member `i`'s gradient, divided by the number of ranks, into the bucket's
    /// host buffer (from a GPU through a copy).
    fn stage(bucket: &mut Bucket, i: usize, grad: &Tensor, ranks: f32) -> Result<()> {
        let off = bucket.offsets[i];
        let dst = &mut bucket.send[off..off + grad.numel()];
        let mut divide = |g: &[f32]| {
            for (d, &v) in dst.iter_mut().zip(g) {
                *d = v / ranks;
            }
        };
        match grad.device() {
            Device::Cpu => grad.with_data(divide),
            Device::Cuda(_) => divide(&grad.try_to_vec()?),
        }
        Ok(())
    }
}

/// Copies rank 0's value of `t` to every rank.
fn broadcast_tensor(comm: &dyn Communicator, t: &Tensor) -> Result<()> {
    let mut data = t.try_to_vec()?;
    comm.broadcast(&mut data, 0)?;
    t.copy_from_slice(&data)
}

/// Fails on every rank whose parameter and buffer names and sizes differ from rank 0's.
fn check_same_model(comm: &dyn Communicator, state: &[(String, Tensor)]) -> Result<()> {
    // FNV-1a over names and sizes, folded to 52 bits so it survives a float64.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, t) in state {
        for byte in name.bytes().chain(t.numel().to_le_bytes()) {
            hash = (hash ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    let mine = [state.len() as f64, (hash & ((1 << 52) - 1)) as f64];
    let all = comm.all_gather(Channel::Main, &mine)?;
    if let Some(rank) = all
        .chunks_exact(2)
        .position(|r| r != all.get(..2).unwrap_or(&[]))
    {
        return Err(invalid(
            "DataParallel",
            format!("rank {rank}'s model has other tensors than rank 0's: every rank must build the same model"),
        ));
    }
    Ok(())
}
