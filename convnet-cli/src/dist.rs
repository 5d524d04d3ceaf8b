//! The processes of a run: the ranks of an MPI job when `mpirun` (or another MPI launcher)
//! started this one and the binary has the `mpi` feature, a single process otherwise.
//! Also what every distributed command shares: checking that all ranks were given the same
//! settings and data, choosing threads and GPUs per rank, and ending every rank on an error.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::dist::{
    launcher_world_size, Communicator, DataParallel, DataParallelOptions, SingleProcess,
};
use convnet::Device;
use std::sync::Arc;

/// The communicator of this process.
pub type Ranks = Arc<dyn Communicator>;

/// How to get a binary that can run under an MPI launcher.
#[cfg(not(feature = "mpi"))]
const BUILD_WITH_MPI: &str = "rebuild it with MPI support: install an MPI library (Debian/Ubuntu: \
`apt install libopenmpi-dev openmpi-bin libclang-dev`) and run \
`cargo build --release -p convnet-cli --features mpi`";

/// Joins the MPI job that launched this process, or stands alone.
pub fn init() -> Result<Ranks> {
    match launcher_world_size() {
        Some(n) if n > 1 => join_mpi(n),
        _ => Ok(Arc::new(SingleProcess)),
    }
}

#[cfg(feature = "mpi")]
fn join_mpi(_: usize) -> Result<Ranks> {
    let comm = convnet::dist::mpi::MpiCommunicator::init()
        .context("cannot join the MPI job that started this process")?;
    Ok(comm)
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(n: usize) -> Result<Ranks> {
    bail!(
        "this process was started by an MPI launcher as one of {n}, but this convnet was built without MPI support, so each process would train its own copy of the model; {BUILD_WITH_MPI}"
    )
}

/// What carries the gradients of GPU ranks.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DistBackend {
    /// NCCL between the GPUs when this convnet has it and NCCL loads, else host MPI.
    Auto,
    /// Through host memory and MPI.
    Mpi,
    /// NCCL between the GPUs (build with `--features nccl`).
    Nccl,
}

/// How ranks share the work of a training step (train and bench).
#[derive(Args, Debug, Clone, Copy)]
pub struct DistArgs {
    /// Under mpirun: batch statistics of BatchNorm over the global batch of all ranks
    /// (SyncBatchNorm) instead of each rank's slice.
    #[arg(long)]
    pub sync_bn: bool,
    /// Under mpirun: largest bucket of gradients reduced together, in MiB (the first one
    /// is at most 1 MiB, as in PyTorch's DDP).
    #[arg(long, default_value_t = 25.0)]
    pub bucket_mb: f64,
    /// Under mpirun: reduce gradients only after the whole backward pass instead of
    /// overlapping it (to measure what the overlap buys).
    #[arg(long)]
    pub no_overlap: bool,
    /// Under mpirun with --device cuda: how gradients travel between the GPUs.
    #[arg(long, value_enum, default_value = "auto")]
    pub dist_backend: DistBackend,
}

impl DistArgs {
    /// Checks the settings and that the global `batch_size` splits evenly over the ranks.
    pub fn check(&self, batch_size: usize, ranks: &Ranks) -> Result<()> {
        let n = ranks.size();
        if !batch_size.is_multiple_of(n) {
            bail!(
                "--batch-size {batch_size} is the global batch, split over the {n} ranks, so it must divide by {n} (e.g. {} or {})",
                (batch_size / n * n).max(n),
                (batch_size / n + 1) * n
            );
        }
        if !(self.bucket_mb > 0.0 && self.bucket_mb.is_finite()) {
            bail!("--bucket-mb must be positive, got {}", self.bucket_mb);
        }
        Ok(())
    }

    /// The data-parallel settings these arguments ask for.
    pub fn options(&self) -> DataParallelOptions {
        let bucket_bytes = ((self.bucket_mb * (1 << 20) as f64) as usize).max(1);
        DataParallelOptions {
            bucket_bytes,
            first_bucket_bytes: bucket_bytes.min(DataParallelOptions::default().first_bucket_bytes),
            overlap: !self.no_overlap,
            sync_batch_norm: self.sync_bn,
            ..Default::default()
        }
    }
}

impl DistArgs {
    /// Sets up how `dp` reduces the gradients of a model on `device`: NCCL between GPUs
    /// when asked (or, with `auto`, when available), otherwise host buffers and MPI. Every
    /// rank calls it (setting NCCL up is collective).
    pub fn set_up_gpu_reduction(
        &self,
        dp: &mut DataParallel,
        device: Device,
        lead: bool,
    ) -> Result<()> {
        let gpu = match (device, self.dist_backend) {
            (Device::Cpu, DistBackend::Nccl) => {
                bail!(
                    "--dist-backend nccl reduces gradients between GPUs: train with --device cuda"
                )
            }
            (Device::Cpu, _) | (Device::Cuda(_), DistBackend::Mpi) => return Ok(()),
            (Device::Cuda(n), _) => n,
        };
        #[cfg(feature = "nccl")]
        {
            let emulated = cfg!(feature = "cuda-emulator") && gpu == 1000;
            match (dp.use_nccl(gpu), self.dist_backend) {
                (Ok(()), _) => Ok(()),
                (Err(e), DistBackend::Nccl) => {
                    Err(e).context("--dist-backend nccl: cannot set NCCL up")
                }
                (Err(e), _) => {
                    if lead && !emulated {
                        eprintln!("note: gradients go through host memory and MPI: {e}");
                    }
                    Ok(())
                }
            }
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = (dp, gpu, lead);
            if self.dist_backend == DistBackend::Nccl {
                bail!("--dist-backend nccl: this convnet was built without NCCL; rebuild with `cargo build --release -p convnet-cli --features nccl`");
            }
            Ok(())
        }
    }
}

/// Compute threads for `--threads N`: N, or with 0 the machine's cores shared out among the
/// ranks on this machine.
pub fn threads_per_rank(requested: usize, ranks: &Ranks) -> usize {
    if requested > 0 || ranks.local_size() <= 1 {
        return requested;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / ranks.local_size()).max(1)
}

/// The device of `--device SPEC` for this rank: with several ranks on a machine, plain
/// `cuda` means the GPU numbered by the rank's place on its machine (`cuda:N` is taken as
/// given).
pub fn device_spec(spec: &str, ranks: &Ranks) -> String {
    if spec == "cuda" && ranks.size() > 1 {
        format!("cuda:{}", ranks.local_rank())
    } else {
        spec.to_string()
    }
}

/// Fails on every rank whose `facts` (settings and what its data holds, as JSON) differ
/// from rank 0's, naming the differing entries: ranks must train the same way on the same
/// data (paths may differ, e.g. node-local copies).
pub fn check_same_everywhere(ranks: &Ranks, facts: &serde_json::Value) -> Result<()> {
    if ranks.size() == 1 {
        return Ok(());
    }
    let mut bytes = serde_json::to_vec(facts)?;
    ranks.broadcast_bytes(&mut bytes, 0)?;
    let root: serde_json::Value =
        serde_json::from_slice(&bytes).context("rank 0's settings are unreadable")?;
    if &root == facts {
        return Ok(());
    }
    let differing: Vec<String> = match (facts.as_object(), root.as_object()) {
        (Some(mine), Some(theirs)) => mine
            .iter()
            .filter(|(k, v)| theirs.get(*k) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k} {v} (rank 0: {})",
                    theirs.get(k).map_or("none".into(), |t| t.to_string())
                )
            })
            .collect(),
        _ => vec![facts.to_string()],
    };
    bail!(
        "rank {} was started differently from rank 0: {}; every rank must get the same arguments and data",
        ranks.rank(),
        differing.join(", ")
    )
}

/// The file `path` as rank 0 reads it, on every rank (a resumed run's checkpoint need only
/// be on rank 0's machine).
pub fn read_on_rank0(ranks: &Ranks, path: &std::path::Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if ranks.rank() == 0 {
        bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    }
    ranks.broadcast_bytes(&mut bytes, 0)?;
    Ok(bytes)
}

/// Ends the job with `err`: in a run of several ranks this rank prints it (naming itself)
/// and every rank is stopped (MPI_Abort), so no rank is left waiting for this one.
pub fn fail(ranks: &Ranks, err: &anyhow::Error) -> std::process::ExitCode {
    let mut msg = if ranks.size() > 1 {
        format!("error on rank {} of {}: {err}", ranks.rank(), ranks.size())
    } else {
        format!("error: {err}")
    };
    // A decoder's error often repeats its source's message: print each text once.
    let mut last = err.to_string();
    for cause in err.chain().skip(1).map(|c| c.to_string()) {
        let cause = cause.trim();
        if !cause.is_empty() && !last.contains(cause) {
            msg.push_str(&format!("\n  caused by: {cause}"));
        }
        last = cause.to_string();
    }
    if ranks.size() > 1 {
        ranks.abort(&msg, 1);
    }
    eprintln!("{msg}");
    std::process::ExitCode::FAILURE
}
