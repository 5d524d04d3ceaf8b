//! Gradients of GPU ranks averaged by NCCL between the GPUs (feature `nccl`), as PyTorch's
//! DDP does with its NCCL backend: rank 0 makes the NCCL id and sends it to the others over
//! the ranks' [`Communicator`] (MPI), each rank joins with its own GPU, and every gradient
//! bucket is averaged in place on the GPUs, queued on each GPU's stream.
//!
//! NCCL refuses two ranks on one GPU; [`NcclGradients::new`] says so first, naming the
//! ranks, the GPU and the machine.

use super::{Channel, Communicator};
use crate::backend::cuda::nccl::{available, unique_id, NcclComm};
use crate::error::{invalid, Result};

/// The NCCL communicator of data-parallel GPU ranks.
pub struct NcclGradients {
    comm: NcclComm,
}

/// A stable 52-bit number for a machine name (ranks compare them to find ranks that share a
/// machine).
fn host_key(name: &str) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    (hash & ((1 << 52) - 1)) as f64
}

/// The first two ranks that use the same GPU of the same machine, from every rank's
/// `[machine key, GPU]`.
fn shared_gpu(all: &[f64]) -> Option<(usize, usize)> {
    let pairs: Vec<&[f64]> = all.chunks_exact(2).collect();
    for (a, pa) in pairs.iter().enumerate() {
        if let Some(b) = pairs[a + 1..].iter().position(|pb| pb == pa) {
            return Some((a, a + 1 + b));
        }
    }
    None
}

/// This machine's name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "this machine".into())
}

impl NcclGradients {
    /// Joins the NCCL communicator of all ranks of `ranks`, this one on GPU `gpu`.
    /// Collective: every rank must call it.
    pub fn new(ranks: &dyn Communicator, gpu: usize) -> Result<NcclGradients> {
        let all = ranks.all_gather(Channel::Main, &[host_key(&host_name()), gpu as f64])?;
        if let Some((a, b)) = shared_gpu(&all) {
            return Err(invalid(
                "NCCL",
                format!(
                    "ranks {a} and {b} both use GPU cuda:{} of one machine, and NCCL cannot run two ranks on one GPU: start one rank per GPU (e.g. mpirun -np <GPUs per machine> with --device cuda, which gives each rank the GPU of its place on its machine), or reduce through the host with --dist-backend mpi",
                    all[2 * a + 1] as usize
                ),
            ));
        }
        // Every rank loads NCCL (and rank 0 names the communicator) before any joins: a
        // rank that cannot must not leave the others waiting in ncclCommInitRank.
        let made = available().and_then(|()| match ranks.rank() {
            0 => unique_id(),
            _ => Ok(Vec::new()),
        });
        let mut failed = [f64::from(u8::from(made.is_err()))];
        ranks.all_reduce_sum(Channel::Main, &mut failed)?;
        let mut id = match made {
            Err(e) => return Err(e),
            Ok(_) if failed[0] > 0.0 => {
                return Err(invalid(
                    "NCCL",
                    format!("{} rank(s) cannot use NCCL (they say why)", failed[0]),
                ))
            }
            Ok(id) => id,
        };
        ranks.broadcast_bytes(&mut id, 0)?;
        Ok(NcclGradients {
            comm: NcclComm::join(gpu, ranks.rank(), ranks.size(), &id)?,
        })
    }

    /// Averages the buffers `(device address, floats)` over the ranks in place.
    pub(crate) fn average(&self, buffers: &[(u64, usize)]) -> Result<()> {
        self.comm.average_in_place(buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sharing_a_gpu_are_found() {
        let (m1, m2) = (host_key("node-a"), host_key("node-b"));
        assert_ne!(m1, m2);
        // One rank per GPU on two machines.
        assert_eq!(shared_gpu(&[m1, 0.0, m1, 1.0, m2, 0.0, m2, 1.0]), None);
        // Ranks 1 and 3 both on GPU 1 of node-a.
        assert_eq!(
            shared_gpu(&[m1, 0.0, m1, 1.0, m2, 0.0, m1, 1.0]),
            Some((1, 3))
        );
        assert_eq!(shared_gpu(&[]), None);
    }
}
