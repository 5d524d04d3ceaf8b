//! NCCL (feature `nccl`): averaging float32 buffers that live on the GPUs of several
//! processes, on each GPU's stream, through NVIDIA's collective library (loaded at run
//! time like the other CUDA libraries). Used by data-parallel training
//! ([`crate::dist::nccl`]) to reduce gradients without copying them to the host.

use super::{preload, runtime, unavailable};
use crate::error::Result;
use cudarc::nccl::{result as nccl, sys};
use std::sync::OnceLock;

/// Loads NCCL 2, or says why it cannot be.
pub(crate) fn available() -> Result<()> {
    load_nccl()
}

/// NCCL 2.
fn load_nccl() -> Result<()> {
    static NCCL: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    preload(
        &NCCL,
        "NCCL",
        "install NCCL 2 (libnccl2), or ",
        &["libnccl.so.2", "libnccl.so"],
    )
}

/// The 128 bytes that name a new NCCL communicator (made by one rank, sent to the others).
pub(crate) fn unique_id() -> Result<Vec<u8>> {
    load_nccl()?;
    let id = nccl::get_uniqueid().map_err(|e| unavailable(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank's handle on an NCCL communicator, bound to one GPU.
pub(crate) struct NcclComm {
    comm: sys::ncclComm_t,
    gpu: usize,
}

// SAFETY: the communicator is used by one thread at a time (the training loop's), which is
// what NCCL requires of a communicator.
unsafe impl Send for NcclComm {}
// SAFETY: as above; every method takes `&self` but is called from that one thread.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the communicator named by `id` as `rank` of `size`, on GPU `gpu`. Collective:
    /// every rank must call it.
    pub(crate) fn join(gpu: usize, rank: usize, size: usize, id: &[u8]) -> Result<NcclComm> {
        load_nccl()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            return Err(unavailable(format!(
                "an NCCL id has 128 bytes, got {}",
                id.len()
            )));
        }
        for (d, &s) in internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        let (rank, size) = (super::int(rank, "rank")?, super::int(size, "ranks")?);
        // With the GPU's context current on this thread (what `with` does).
        runtime::with(gpu, |_| {
            let mut comm = std::ptr::null_mut();
            // SAFETY: `comm` is written by NCCL; the id came from ncclGetUniqueId on rank 0.
            unsafe { nccl::comm_init_rank(&mut comm, size, sys::ncclUniqueId { internal }, rank) }
                .map_err(|e| unavailable(format!("ncclCommInitRank on cuda:{gpu}: {e:?}")))?;
            Ok(NcclComm { comm, gpu })
        })
    }

    /// Replaces each buffer `(device address, floats)` by its average over the ranks, in
    /// place, queued on the GPU's stream after the work already there (one NCCL group).
    pub(crate) fn average_in_place(&self, buffers: &[(u64, usize)]) -> Result<()> {
        runtime::with(self.gpu, |rt| {
            let stream = rt
                .cu_stream()
                .ok_or_else(|| unavailable("NCCL needs a real GPU, not the kernel emulator"))?;
            nccl::group_start().map_err(|e| unavailable(format!("ncclGroupStart: {e:?}")))?;
            let mut failed = None;
            for &(ptr, len) in buffers {
                // SAFETY: `ptr` addresses `len` floats of device memory on this GPU that stay
                // allocated until the stream has run past this call (the gradients live
                // until the optimizer step, which is queued after it on the same stream).
                let r = unsafe {
                    nccl::all_reduce(
                        ptr as *const std::ffi::c_void,
                        ptr as *mut std::ffi::c_void,
                        len,
                        sys::ncclDataType_t::ncclFloat32,
                        sys::ncclRedOp_t::ncclAvg,
                        self.comm,
                        stream as sys::cudaStream_t,
                    )
                };
                if let Err(e) = r {
                    failed.get_or_insert(format!("ncclAllReduce: {e:?}"));
                }
            }
            let ended = nccl::group_end();
            match (failed, ended) {
                (Some(msg), _) => Err(unavailable(msg)),
                (None, Err(e)) => Err(unavailable(format!("ncclGroupEnd: {e:?}"))),
                (None, Ok(_)) => Ok(()),
            }
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: made by ncclCommInitRank and used by nothing else any more.
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}
