//! Data-parallel training over several processes, as PyTorch's `DistributedDataParallel`.
//!
//! Every process (*rank*) holds the whole model and takes a slice of every global batch (the
//! loader's [`crate::data::LoaderConfig::world_size`]). Between backward and the optimizer,
//! gradients are summed over the ranks and divided by their number, so every rank takes the
//! same optimizer step. The pieces:
//!
//! - [`Communicator`]: the collective operations training needs, implemented by
//!   [`SingleProcess`] (one rank, no communication) and, with the `mpi` feature, by
//!   [`mpi::MpiCommunicator`] on an existing MPI library (Open MPI, MPICH): processes on one
//!   machine or many, launched by `mpirun`. Nothing here speaks its own network protocol.
//!   [`ThreadRanks`] runs ranks as threads of one process, for tests.
//! - [`DataParallel`]: broadcasts rank 0's weights, reduces gradients in buckets that start
//!   as soon as their gradients are complete during backward (so communication overlaps the
//!   rest of the backward pass), keeps BatchNorm buffers equal across ranks, and runs
//!   synchronised batch norm ([`DataParallelOptions::sync_batch_norm`]) when asked.
//! - [`launcher_world_size`]: whether this process was started by an MPI launcher, so that a
//!   build without MPI support can refuse instead of training N unrelated copies.
//!
//! The trainer ([`crate::train::Trainer::distribute`]) calls this module at one point of its
//! step; evaluation sums its counts over the ranks ([`crate::train::evaluate_distributed`]).

mod data_parallel;
mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub(crate) mod sync_bn;

pub use data_parallel::{CommStats, DataParallel, DataParallelOptions, DEFAULT_BUCKET_BYTES};
pub use local::ThreadRanks;

use crate::error::Result;

/// Independent streams of collective operations. Each is ordered on its own, so gradient
/// buckets in flight never have to be matched against batch-norm statistics or metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Weights, buffers, settings, metrics and evaluation totals.
    Main,
    /// Gradient buckets (non-blocking).
    Gradients,
    /// Synchronised batch-norm statistics and their gradient sums.
    BatchStats,
}

/// A non-blocking sum of a float32 buffer over all ranks (see
/// [`Communicator::start_all_reduce`]).
pub trait PendingReduce: Send {
    /// Lets the operation progress; true once it is complete.
    fn test(&mut self) -> Result<bool>;
    /// Waits for completion and returns the buffers `(send, sum)`.
    fn wait(self: Box<Self>) -> Result<(Vec<f32>, Vec<f32>)>;
}

/// The collective operations of data-parallel training. Every rank must call the same
/// operations on a [`Channel`] in the same order (as MPI requires); a rank that cannot go on
/// calls [`Communicator::abort`], which ends every rank.
pub trait Communicator: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// This process's rank among the ranks on its machine (which GPU it takes).
    fn local_rank(&self) -> usize;
    /// Number of ranks on this machine.
    fn local_size(&self) -> usize;
    /// What carries the messages, for reports (e.g. "MPI (Open MPI v4.1.4)").
    fn description(&self) -> String;
    /// Copies `data` of rank `root` into `data` of every rank.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()>;
    /// Copies the bytes of rank `root` into `data` of every rank (resized).
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()>;
    /// Replaces `data` by its element-wise sum over the ranks.
    fn all_reduce_sum(&self, channel: Channel, data: &mut [f64]) -> Result<()>;
    /// Replaces `data` by its element-wise maximum over the ranks.
    fn all_reduce_max(&self, data: &mut [f64]) -> Result<()>;
    /// Every rank's `local` (all of the same length), concatenated in rank order.
    fn all_gather(&self, channel: Channel, local: &[f64]) -> Result<Vec<f64>>;
    /// Starts summing `send` over the ranks into `recv` (same length) on
    /// [`Channel::Gradients`]; the buffers come back from [`PendingReduce::wait`].
    fn start_all_reduce(&self, send: Vec<f32>, recv: Vec<f32>) -> Result<Box<dyn PendingReduce>>;
    /// Ends every rank of the job with `code`, after `message` is printed by this rank.
    fn abort(&self, message: &str, code: i32) -> !;
}

/// One process, no communication: every collective is the identity.
///
/// ```
/// use convnet::dist::{Channel, Communicator, SingleProcess};
/// let comm = SingleProcess;
/// let mut v = [1.0, 2.0];
/// comm.all_reduce_sum(Channel::Main, &mut v)?;
/// assert_eq!((comm.rank(), comm.size(), v), (0, 1, [1.0, 2.0]));
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

struct Done(Vec<f32>, Vec<f32>);

impl PendingReduce for Done {
    fn test(&mut self) -> Result<bool> {
        Ok(true)
    }
    fn wait(self: Box<Self>) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((self.0, self.1))
    }
}

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn description(&self) -> String {
        "one process".into()
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _: Channel, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, _: Channel, local: &[f64]) -> Result<Vec<f64>> {
        Ok(local.to_vec())
    }
    fn start_all_reduce(
        &self,
        send: Vec<f32>,
        mut recv: Vec<f32>,
    ) -> Result<Box<dyn PendingReduce>> {
        recv.copy_from_slice(&send);
        Ok(Box::new(Done(send, recv)))
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("{message}");
        std::process::exit(code)
    }
}

/// The number of processes an MPI launcher started this one among, read from the variables
/// launchers set (`OMPI_COMM_WORLD_SIZE` of Open MPI's `mpirun`, `PMI_SIZE` of MPICH's and
/// Intel MPI's Hydra and of Slurm's PMI, `MV2_COMM_WORLD_SIZE` of MVAPICH); `None` when not
/// started by one.
///
/// ```
/// // Under `cargo test` no launcher is involved.
/// assert_eq!(convnet::dist::launcher_world_size(), None);
/// ```
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}
