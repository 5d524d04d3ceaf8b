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
    memory: Memory,
}

enum Memory {
    Cuda(CudaSlice<f32>),
    /// Host memory standing in for device memory when the kernels run on the host emulator
    /// (unit tests only, see `emulator`).
    #[cfg(any(test, feature = "cuda-emulator"))]
    Emulated(HostMemory),
}

/// An owned host allocation addressed through a raw pointer, as device memory is: the
/// emulated kernels write through the address, never through a Rust reference.
#[cfg(any(test, feature = "cuda-emulator"))]
pub(crate) struct HostMemory {
    data: std::ptr::NonNull<[f32]>,
    /// False for a handle on memory that a captured step graph owns (see `runtime`).
    owned: bool,
}

#[cfg(any(test, feature = "cuda-emulator"))]
impl HostMemory {
    pub(crate) fn new(data: Vec<f32>) -> HostMemory {
        HostMemory {
            data: std::ptr::NonNull::from(Box::leak(data.into_boxed_slice())),
            owned: true,
        }
    }

    /// A handle on the same memory that does not free it.
    pub(crate) fn borrowed(&self) -> HostMemory {
        HostMemory {
            data: self.data,
            owned: false,
        }
    }

    /// The address of the first float.
    pub(crate) fn addr(&self) -> u64 {
        self.data.as_ptr() as *mut f32 as u64
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: alive (owned, or owned by a graph that outlives its buffers); the emulator
        // runs kernels synchronously, so no write is in progress while the host reads.
        unsafe { self.data.as_ref() }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { self.data.as_mut() }
    }
}

#[cfg(any(test, feature = "cuda-emulator"))]
impl Drop for HostMemory {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: made by `Box::leak` in `new`, freed once here by its owner.
            drop(unsafe { Box::from_raw(self.data.as_ptr()) });
        }
    }
}

// SAFETY: plain owned memory; access is serialised as for device memory.
#[cfg(any(test, feature = "cuda-emulator"))]
unsafe impl Send for HostMemory {}
#[cfg(any(test, feature = "cuda-emulator"))]
unsafe impl Sync for HostMemory {}

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

/// 64-bit integers as the float32 words device memory holds them (two per integer, little
/// endian): class targets and the kernels' shape tables.
pub(crate) fn i64_words(host: &[i64]) -> Vec<f32> {
    host.iter()
        .flat_map(|v| {
            let b = v.to_le_bytes();
            [
                f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                f32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            ]
        })
        .collect()
}

/// Where new buffers come from: a device's stream, or the host emulator.
#[derive(Clone)]
pub(crate) enum Allocator {
    Cuda(Arc<CudaStream>),
    #[cfg(any(test, feature = "cuda-emulator"))]
    Emulated,
}

impl Allocator {
    /// `len` floats whose contents are unspecified: for kernels that write every element.
    pub(crate) fn uninit(&self, len: usize) -> Result<DeviceBuffer> {
        let memory = match self {
            Allocator::Cuda(stream) => {
                // SAFETY: the callers' kernels overwrite every element before any read.
                let data = unsafe { stream.alloc::<f32>(len.max(1)) }
                    .map_err(|e| memory_error("allocating device memory", e))?;
                Memory::Cuda(data)
            }
            // NaN, so that a kernel that fails to write an element is caught by the tests.
            #[cfg(any(test, feature = "cuda-emulator"))]
            Allocator::Emulated => Memory::Emulated(HostMemory::new(vec![f32::NAN; len.max(1)])),
        };
        Ok(DeviceBuffer { memory })
    }

    /// `len` zeros.
    pub(crate) fn zeros(&self, len: usize) -> Result<DeviceBuffer> {
        let memory = match self {
            Allocator::Cuda(stream) => Memory::Cuda(
                stream
                    .alloc_zeros::<f32>(len.max(1))
                    .map_err(|e| memory_error("allocating device memory", e))?,
            ),
            #[cfg(any(test, feature = "cuda-emulator"))]
            Allocator::Emulated => Memory::Emulated(HostMemory::new(vec![0.0; len.max(1)])),
        };
        Ok(DeviceBuffer { memory })
    }

    /// A copy of host data.
    pub(crate) fn upload(&self, host: &[f32]) -> Result<DeviceBuffer> {
        if host.is_empty() {
            return self.zeros(0);
        }
        let memory = match self {
            Allocator::Cuda(stream) => Memory::Cuda(
                stream
                    .clone_htod(host)
                    .map_err(|e| memory_error("copying to the device", e))?,
            ),
            #[cfg(any(test, feature = "cuda-emulator"))]
            Allocator::Emulated => Memory::Emulated(HostMemory::new(host.to_vec())),
        };
        Ok(DeviceBuffer { memory })
    }

    /// A copy of 64-bit integers (class targets), two floats' room each.
    pub(crate) fn upload_i64(&self, host: &[i64]) -> Result<DeviceBuffer> {
        let words = i64_words(host);
        self.upload(&words)
    }
}

impl DeviceBuffer {
    /// Elements `offset..offset + len` copied to the host (waits for the device).
    pub(crate) fn to_host(&self, offset: usize, len: usize) -> Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        match &self.memory {
            Memory::Cuda(data) => {
                let stream = data.stream();
                let view = data.slice(offset..offset + len);
                let host = stream
                    .clone_dtoh(&view)
                    .map_err(|e| memory_error("copying from the device", e))?;
                stream
                    .synchronize()
                    .map_err(|e| memory_error("waiting for the device", e))?;
                Ok(host)
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(data) => {
                super::emulator::forbid_while_capturing("copying device data to the host")?;
                Ok(data.as_slice()[offset..offset + len].to_vec())
            }
        }
    }

    /// Overwrites elements `offset..offset + host.len()` with host data.
    pub(crate) fn write_host(&mut self, offset: usize, host: &[f32]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        match &mut self.memory {
            Memory::Cuda(data) => {
                let stream = data.stream().clone();
                let mut view = data.slice_mut(offset..offset + host.len());
                stream
                    .memcpy_htod(host, &mut view)
                    .map_err(|e| memory_error("copying to the device", e))?;
                stream
                    .synchronize()
                    .map_err(|e| memory_error("waiting for the device", e))
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(data) => {
                super::emulator::forbid_while_capturing("copying host data to the device")?;
                data.as_mut_slice()[offset..offset + host.len()].copy_from_slice(host);
                Ok(())
            }
        }
    }

    /// Overwrites elements `offset..offset + host.len()` without waiting: the copy is queued
    /// on the device's stream after the work already there (the driver stages pageable host
    /// memory, so `host` may be reused at once). Staging a captured step's inputs.
    pub(crate) fn write_host_async(&mut self, offset: usize, host: &[f32]) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        match &mut self.memory {
            Memory::Cuda(data) => {
                let stream = data.stream().clone();
                let dst = data.device_ptr(&stream).0 + (offset * std::mem::size_of::<f32>()) as u64;
                // SAFETY: the destination range lies inside this live buffer.
                unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, stream.cu_stream()) }
                    .map_err(|e| memory_error("copying to the device", e))
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(_) => self.write_host(offset, host),
        }
    }

    /// Sets every element to zero (queued on the device's stream).
    pub(crate) fn fill_zero(&mut self) -> Result<()> {
        match &mut self.memory {
            Memory::Cuda(data) => {
                let stream = data.stream().clone();
                stream
                    .memset_zeros(data)
                    .map_err(|e| memory_error("clearing device memory", e))
            }
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(data) => {
                data.as_mut_slice().fill(0.0);
                Ok(())
            }
        }
    }

    /// A buffer over emulated memory that a captured graph owns.
    #[cfg(any(test, feature = "cuda-emulator"))]
    pub(crate) fn emulated(memory: HostMemory) -> DeviceBuffer {
        DeviceBuffer {
            memory: Memory::Emulated(memory),
        }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        match &self.memory {
            Memory::Cuda(data) => data.ordinal(),
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(_) => super::emulator::ORDINAL,
        }
    }

    /// Number of floats (at least 1: empty tensors hold one unused element).
    pub fn len(&self) -> usize {
        match &self.memory {
            Memory::Cuda(data) => data.len(),
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(data) => data.data.len(),
        }
    }

    /// True when the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw device address of element `offset`, for kernel arguments and library calls.
    /// Valid while `self` is alive; work queued on the device's one stream before the buffer
    /// is dropped may use it (freeing is stream-ordered).
    pub(crate) fn ptr(&self, offset: usize) -> u64 {
        let base = match &self.memory {
            Memory::Cuda(data) => data.device_ptr(data.stream()).0,
            #[cfg(any(test, feature = "cuda-emulator"))]
            Memory::Emulated(data) => data.addr(),
        };
        base + (offset * std::mem::size_of::<f32>()) as u64
    }
}
