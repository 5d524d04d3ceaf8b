//! [`MpiCommunicator`]: the collectives of data-parallel training on an MPI library (Open MPI,
//! MPICH, ...), through the `mpi` crate. Processes are started by the library's launcher
//! (`mpirun -np 4 convnet train ...`, `mpirun --hostfile hosts ...`, `srun`), on one machine
//! (shared memory) or many (TCP, InfiniBand: whatever the library is configured to use).
//!
//! Each [`Channel`] is its own duplicate of `MPI_COMM_WORLD`, so a gradient bucket in flight
//! never has to be matched against a batch-norm reduction or a metric. Gradient buckets use
//! the non-blocking `MPI_Iallreduce`; [`PendingReduce::test`] calls `MPI_Test`, which is
//! where the library makes progress while the backward pass computes.
//!
//! MPI is initialised with at least `MPI_THREAD_SERIALIZED`: convnet calls MPI from one
//! thread at a time (the training loop's), never concurrently. Errors in MPI calls end the
//! job (MPI's default `MPI_ERRORS_ARE_FATAL`), so a failure can never leave ranks waiting.

use super::{Channel, Communicator, PendingReduce};
use crate::error::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::ffi;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{AsRaw, Communicator as _, CommunicatorCollectives, Root};
use std::sync::Arc;

/// Largest element count passed to one MPI call (counts are C `int`s).
const MAX_COUNT: usize = 1 << 30;

/// The ranks of an MPI job.
pub struct MpiCommunicator {
    main: SimpleCommunicator,
    gradients: SimpleCommunicator,
    batch_stats: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    library: String,
    /// Finalises MPI when dropped; declared last so the communicators above are freed first.
    _universe: mpi::environment::Universe,
}

// SAFETY: MPI is initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), which
// allows calls from any thread as long as no two are concurrent; every method takes `&self`
// and convnet makes its collective calls from the one thread that runs the training loop.
unsafe impl Send for MpiCommunicator {}
// SAFETY: as above.
unsafe impl Sync for MpiCommunicator {}

fn mpi_error(msg: impl Into<String>) -> Error {
    Error::Unsupported(format!("MPI: {}", msg.into()))
}

impl MpiCommunicator {
    /// Initialises MPI (once per process) and returns the job's communicator.
    pub fn init() -> Result<Arc<MpiCommunicator>> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| mpi_error("the MPI library was already initialised in this process"))?;
        if threading < mpi::Threading::Serialized {
            return Err(mpi_error(format!(
                "the MPI library offers only {threading:?} thread support; convnet needs MPI_THREAD_SERIALIZED (its compute threads run beside the thread that calls MPI)"
            )));
        }
        let world = universe.world();
        let local = world.split_shared(world.rank());
        let library = mpi::environment::library_version()
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Arc::new(MpiCommunicator {
            main: world.duplicate(),
            gradients: world.duplicate(),
            batch_stats: world.duplicate(),
            rank: world.rank() as usize,
            size: world.size() as usize,
            local_rank: local.rank() as usize,
            local_size: local.size() as usize,
            library,
            _universe: universe,
        }))
    }

    fn channel(&self, channel: Channel) -> &SimpleCommunicator {
        match channel {
            Channel::Main => &self.main,
            Channel::Gradients => &self.gradients,
            Channel::BatchStats => &self.batch_stats,
        }
    }

    fn root(&self, root: usize) -> Result<mpi::topology::Process<'_>> {
        if root >= self.size {
            return Err(mpi_error(format!(
                "root rank {root} of {} ranks",
                self.size
            )));
        }
        Ok(self.main.process_at_rank(root as i32))
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn description(&self) -> String {
        format!("MPI ({})", self.library)
    }
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<()> {
        let root = self.root(root)?;
        for chunk in data.chunks_mut(MAX_COUNT) {
            root.broadcast_into(chunk);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, data: &mut Vec<u8>, root: usize) -> Result<()> {
        let process = self.root(root)?;
        let mut len = data.len() as u64;
        process.broadcast_into(&mut len);
        let len = usize::try_from(len).map_err(|_| mpi_error("broadcast too large"))?;
        data.resize(len, 0);
        for chunk in data.chunks_mut(MAX_COUNT) {
            process.broadcast_into(chunk);
        }
        Ok(())
    }
    fn all_reduce_sum(&self, channel: Channel, data: &mut [f64]) -> Result<()> {
        let comm = self.channel(channel);
        for chunk in data.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            comm.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }
    fn all_reduce_max(&self, data: &mut [f64]) -> Result<()> {
        for chunk in data.chunks_mut(MAX_COUNT) {
            let send = chunk.to_vec();
            self.main
                .all_reduce_into(&send[..], chunk, SystemOperation::max());
        }
        Ok(())
    }
    fn all_gather(&self, channel: Channel, local: &[f64]) -> Result<Vec<f64>> {
        if local.len() > MAX_COUNT / self.size.max(1) {
            return Err(mpi_error("all-gather too large"));
        }
        let mut all = vec![0f64; local.len() * self.size];
        self.channel(channel).all_gather_into(local, &mut all[..]);
        Ok(all)
    }
    fn start_all_reduce(
        &self,
        send: Vec<f32>,
        mut recv: Vec<f32>,
    ) -> Result<Box<dyn PendingReduce>> {
        if send.len() != recv.len() || send.len() > MAX_COUNT {
            return Err(mpi_error(format!(
                "all-reduce of {} into {} elements",
                send.len(),
                recv.len()
            )));
        }
        // SAFETY: MPI_Request is a plain handle; MPI_Iallreduce sets it.
        let mut request: ffi::MPI_Request = unsafe { std::mem::zeroed() };
        // SAFETY: both buffers hold `send.len()` floats and live in `MpiPending`, whose heap
        // storage does not move and is not touched or freed until MPI_Test or MPI_Wait report
        // completion (its Drop waits); the communicator outlives the request.
        let rc = unsafe {
            ffi::MPI_Iallreduce(
                send.as_ptr().cast(),
                recv.as_mut_ptr().cast(),
                send.len() as i32,
                ffi::RSMPI_FLOAT,
                ffi::RSMPI_SUM,
                self.gradients.as_raw(),
                &mut request,
            )
        };
        if rc != 0 {
            return Err(mpi_error(format!("MPI_Iallreduce failed with code {rc}")));
        }
        Ok(Box::new(MpiPending {
            request,
            send,
            recv,
            done: false,
        }))
    }
    fn abort(&self, message: &str, code: i32) -> ! {
        eprintln!("{message}");
        self.main.abort(code)
    }
}

/// An `MPI_Iallreduce` in flight, owning its buffers.
struct MpiPending {
    request: ffi::MPI_Request,
    send: Vec<f32>,
    recv: Vec<f32>,
    done: bool,
}

// SAFETY: the request handle and buffers are only used by the thread that owns this value;
// MPI allows completing a request from another thread than the one that started it.
unsafe impl Send for MpiPending {}

impl PendingReduce for MpiPending {
    fn test(&mut self) -> Result<bool> {
        if !self.done {
            let mut flag = 0;
            // SAFETY: the request is active (not yet completed); MPI_Test completes and frees
            // it when it returns a true flag.
            let rc =
                unsafe { ffi::MPI_Test(&mut self.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            if rc != 0 {
                return Err(mpi_error(format!("MPI_Test failed with code {rc}")));
            }
            self.done = flag != 0;
        }
        Ok(self.done)
    }

    fn wait(mut self: Box<Self>) -> Result<(Vec<f32>, Vec<f32>)> {
        self.complete()?;
        Ok((
            std::mem::take(&mut self.send),
            std::mem::take(&mut self.recv),
        ))
    }
}

impl MpiPending {
    fn complete(&mut self) -> Result<()> {
        if !self.done {
            // SAFETY: the request is active; MPI_Wait completes and frees it.
            let rc = unsafe { ffi::MPI_Wait(&mut self.request, ffi::RSMPI_STATUS_IGNORE) };
            self.done = true;
            if rc != 0 {
                return Err(mpi_error(format!("MPI_Wait failed with code {rc}")));
            }
        }
        Ok(())
    }
}

impl Drop for MpiPending {
    fn drop(&mut self) {
        // The buffers must outlive the operation.
        let _ = self.complete();
    }
}
