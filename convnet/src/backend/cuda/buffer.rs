//! Device memory behind a tensor: a float32 buffer on one GPU.
//!
//! Buffers are allocated with the driver's stream-ordered allocator (`cuMemAllocAsync`) on
//! the device's one stream, from a memory pool that keeps freed memory instead of returning
//! it to the driver (see `runtime`), so once a training step has run, the next step's
//! tensors reuse the same memory without a `cudaMalloc`. Freeing is stream-ordered too, so a
//! buffer dropped on the host while a kernel still reads it stays valid for that kernel.

use super::unavailable;
use crate::error::Result;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::Arc;

/// A float32 buffer on a CUDA device.
pub struct DeviceBuffer {
    data: CudaSlice<f32>,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer(cuda:{}, {} floats)",
            self.ordinal(),
            self.len()
        )
    }
}

/// Maps a driver error of a memory operation to a readable error.
pub(crate) fn memory_error(what: &str, e: cudarc::driver::DriverError) -> crate::Error {
    unavailable(format!("{what}: {e:?}"))
}

impl DeviceBuffer {
    /// `len` floats whose contents are unspecified: for kernels that write every element.
    pub(crate) fn uninit(stream: &Arc<CudaStream>, len: usize) -> Result<DeviceBuffer> {
        // SAFETY: the callers' kernels overwrite every element before anything reads it.
        let data = unsafe { stream.alloc::<f32>(len.max(1)) }
            .map_err(|e| memory_error("allocating device memory", e))?;
        Ok(DeviceBuffer { data })
    }

    /// `len` zeros.
    pub(crate) fn zeros(stream: &Arc<CudaStream>, len: usize) -> Result<DeviceBuffer> {
        let data = stream
            .alloc_zeros::<f32>(len.max(1))
            .map_err(|e| memory_error("allocating device memory", e))?;
        Ok(DeviceBuffer { data })
    }

    /// A copy of host data.
    pub(crate) fn from_host(stream: &Arc<CudaStream>, host: &[f32]) -> Result<DeviceBuffer> {
        if host.is_empty() {
            return DeviceBuffer::zeros(stream, 0);
        }
        let data = stream
            .clone_htod(host)
            .map_err(|e| memory_error("copying to the device", e))?;
        Ok(DeviceBuffer { data })
    }

    /// Elements `offset..offset + len` copied to the host (waits for the device).
    pub(crate) fn to_host(&self, offset: usize, len: usize) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let stream = self.data.stream();
        let view = self.data.slice(offset..offset + len);
        let host = stream
            .clone_dtoh(&view)
            .map_err(|e| memory_error("copying from the device", e))?;
        stream
            .synchronize()
            .map_err(|e| memory_error("waiting for the device", e))?;
        Ok(host)
    }

    /// Overwrites elements `offset..offset + host.len()` with host data.
    pub(crate) fn write_host(&mut self, offset: usize, host: &[f32]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let stream = self.data.stream().clone();
        let mut view = self.data.slice_mut(offset..offset + host.len());
        stream
            .memcpy_htod(host, &mut view)
            .map_err(|e| memory_error("copying to the device", e))?;
        stream
            .synchronize()
            .map_err(|e| memory_error("waiting for the device", e))
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.data.ordinal()
    }

    /// Number of floats (at least 1: empty tensors hold one unused element).
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// The raw device address of element `offset`, for kernel arguments and library calls.
    /// Valid while `self` is alive; work queued on the device's one stream before the buffer
    /// is dropped may use it (freeing is stream-ordered).
    pub(crate) fn ptr(&self, offset: usize) -> u64 {
        let (base, _sync) = self.data.device_ptr(self.data.stream());
        base + (offset * std::mem::size_of::<f32>()) as u64
    }
}
