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
}

impl Storage {
    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    /// Element type of the storage.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(_) => DType::F32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Storage::Cpu(v) => v.len(),
        }
    }

    /// True when the storage holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Host slice of the data.
    pub(crate) fn as_slice(&self) -> &[f32] {
        match self {
            Storage::Cpu(v) => v,
        }
    }

    /// Mutable host slice of the data.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        match self {
            Storage::Cpu(v) => v,
        }
    }
}

impl Drop for Storage {
    /// Large host buffers go back to the pool of recycled buffers for the next step's
    /// tensors of the same size (see `backend::cpu::recycle`).
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => crate::backend::cpu::recycle::give_back(std::mem::take(v)),
        }
    }
}
