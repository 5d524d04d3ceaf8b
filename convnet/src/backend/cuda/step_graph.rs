//! A training step captured once in a CUDA graph and replayed for every later batch of the
//! same size: the whole forward pass, backward pass, metric accumulation and optimizer step
//! become one graph launch instead of hundreds of kernel launches, which is where small
//! networks spend their time.
//!
//! What makes a step replayable: its inputs live in buffers that stay put (the batch's
//! images and class indices are copied into them before each launch); everything it
//! allocates is allocated and freed inside the graph; nothing copies between host and
//! device inside it (the runtime refuses such copies during a capture, except constants);
//! the optimizer reads its hyperparameters from device memory staged before each launch;
//! convolution algorithms and workspaces were chosen by an eager step of the same shapes
//! before the capture. Host-side effects of the forward pass (BatchNorm's
//! `num_batches_tracked`) are repeated by the trainer for each replay.

use super::buffer::DeviceBuffer;
use super::runtime::with;
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::tensor::Tensor;
use std::sync::Arc;

/// The staging buffers of one batch shape and, once captured, its graph.
pub(crate) struct GraphedStep {
    gpu: usize,
    /// `[B, C, H, W]` on the device: the batch is copied in before each step.
    images: Tensor,
    /// `B` int64 class indices on the device.
    targets: Arc<DeviceBuffer>,
    /// The captured graph, and the address of the metric accumulator it writes.
    graph: Option<(usize, u64)>,
    /// Whether an eager step has run with these buffers (algorithms chosen, optimizer
    /// state and workspaces allocated).
    warmed: bool,
}

impl GraphedStep {
    /// Staging buffers for batches of images `dims = [B, C, H, W]` on GPU `gpu`.
    pub(crate) fn new(gpu: usize, dims: &[usize]) -> Result<GraphedStep> {
        let images = Tensor::zeros(dims.to_vec()).to_device(crate::Device::Cuda(gpu))?;
        let targets = Arc::new(with(gpu, |rt| rt.zeros(2 * dims[0]))?);
        Ok(GraphedStep {
            gpu,
            images,
            targets,
            graph: None,
            warmed: false,
        })
    }

    /// The batch size it stages.
    pub(crate) fn batch(&self) -> usize {
        self.images.dims()[0]
    }

    /// Copies a batch (host images of the staged shape, and its labels) into the staging
    /// buffers, queued on the device's stream after the previous step.
    pub(crate) fn stage(&mut self, images: &Tensor, labels: &[usize]) -> Result<()> {
        let labels: Vec<i64> = labels.iter().map(|&t| t as i64).collect();
        let words = super::buffer::i64_words(&labels);
        let targets = Arc::get_mut(&mut self.targets).ok_or_else(|| {
            Error::Unsupported("the staged targets are still held by a previous step".into())
        })?;
        targets.write_host_async(0, &words)?;
        let host = images.try_to_vec()?;
        self.images.stage_from_host(&host)
    }

    /// The staged images.
    pub(crate) fn images(&self) -> &Tensor {
        &self.images
    }

    /// The staged class indices.
    pub(crate) fn targets(&self) -> Arc<DeviceBuffer> {
        self.targets.clone()
    }

    /// Whether the eager warm-up step has run.
    pub(crate) fn warmed(&self) -> bool {
        self.warmed
    }

    /// Records that the eager warm-up step has run.
    pub(crate) fn set_warmed(&mut self) {
        self.warmed = true;
    }

    /// The captured graph, if it writes metrics to `acc`.
    pub(crate) fn graph_for(&self, acc: &DeviceBuffer) -> Option<usize> {
        self.graph
            .filter(|(_, a)| *a == acc.ptr(0))
            .map(|(id, _)| id)
    }

    /// Runs `body` (one training step reading the staging buffers and accumulating into
    /// `acc`) under a capture; on success keeps the graph (the step has not run yet: launch
    /// it). On failure the capture is discarded and the error says why.
    pub(crate) fn capture(
        &mut self,
        acc: &DeviceBuffer,
        body: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.drop_graph();
        with(self.gpu, |rt| rt.begin_capture())?;
        let ran = body();
        let id = super::runtime::finish_capture(self.gpu, ran)?;
        self.graph = Some((id, acc.ptr(0)));
        Ok(())
    }

    /// Launches the captured step.
    pub(crate) fn launch(&self, id: usize) -> Result<()> {
        with(self.gpu, |rt| rt.launch_graph(id))
    }

    /// Frees the graph (a new one is captured when needed).
    pub(crate) fn drop_graph(&mut self) {
        if let Some((id, _)) = self.graph.take() {
            let _ = with(self.gpu, |rt| {
                rt.drop_graph(id);
                Ok(())
            });
        }
    }
}

impl Drop for GraphedStep {
    fn drop(&mut self) {
        self.drop_graph();
    }
}

impl Tensor {
    /// Copies host data into this device tensor's elements without waiting (see
    /// `DeviceBuffer::write_host_async`). The tensor must be contiguous.
    pub(crate) fn stage_from_host(&self, data: &[f32]) -> Result<()> {
        if !self.is_contiguous() || data.len() != self.numel() {
            return Err(crate::error::invalid(
                "stage_from_host",
                "needs a contiguous device tensor and as many values as it holds",
            ));
        }
        self.with_storage_mut(|storage, offset| match storage {
            Storage::Cuda(b) => b.write_host_async(offset, data),
            _ => Err(crate::error::invalid(
                "stage_from_host",
                "the tensor is not on a GPU",
            )),
        })
    }
}
