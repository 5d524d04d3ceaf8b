//! Tensor storage per device. This is the only place that dispatches on the device.
//!
//! Storage carries a dtype tag so that later element types (int8 for quantized kernels,
//! bf16) slot in beside `f32` without touching the tensor handle.

use crate::device::Device;

/// Element type of a storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float, the training type.
    F32,
}

/// The memory behind one or more tensors.
#[derive(Debug)]
pub enum Storage {
    /// A host buffer.
    Cpu(Vec<f32>),
    /// A buffer on a CUDA device (feature `cuda`).
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::DeviceBuffer),
}

impl Storage {
    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }

    /// Element type of the storage.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(_) => DType::F32,
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => DType::F32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(v) => v.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.len(),
        }
    }

    /// True when the storage holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Host slice of the data; `None` for device storage (see [`Storage::read_range`]).
    pub(crate) fn host(&self) -> Option<&[f32]> {
        match self {
            Storage::Cpu(v) => Some(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// Mutable host slice of the data; `None` for device storage.
    pub(crate) fn host_mut(&mut self) -> Option<&mut [f32]> {
        match self {
            Storage::Cpu(v) => Some(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// Elements `offset..offset + len` as a host vector (a copy from the device for device
    /// storage, which waits for the device's queued work).
    pub(crate) fn read_range(&self, offset: usize, len: usize) -> crate::error::Result<Vec<f32>> {
        match self {
            Storage::Cpu(v) => Ok(v[offset..offset + len].to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.to_host(offset, len),
        }
    }

    /// Overwrites elements `offset..offset + data.len()`.
    pub(crate) fn write_range(&mut self, offset: usize, data: &[f32]) -> crate::error::Result<()> {
        match self {
            Storage::Cpu(v) => {
                v[offset..offset + data.len()].copy_from_slice(data);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.write_host(offset, data),
        }
    }
}

impl Drop for Storage {
    /// Large host buffers go back to the pool of recycled buffers for the next step's
    /// tensors of the same size (see `backend::cpu::recycle`).
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => crate::backend::cpu::recycle::give_back(std::mem::take(v)),
            // Device memory goes back to the device's memory pool (stream-ordered free).
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {}
        }
    }
}
