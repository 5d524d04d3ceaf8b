//! The device a tensor lives on, chosen at run time.

use crate::error::{Error, Result};
use std::fmt;

/// Where tensors are stored and kernels run.
///
/// The `Cuda` variant always exists so that device choice is a run-time value; without the
/// `cuda` feature, asking for it is an error rather than a compile failure.
///
/// ```
/// use convnet::Device;
/// assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
/// assert!(Device::cuda(0).is_err()); // built without the `cuda` feature
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, CPU kernels (rayon + gemm).
    #[default]
    Cpu,
    /// An NVIDIA GPU, by ordinal.
    Cuda(usize),
}

impl Device {
    /// The CUDA device with the given ordinal, if this build and machine can provide it.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        let _ = ordinal;
        Err(Error::CudaNotBuilt)
    }

    /// Parses `cpu`, `cuda` or `cuda:N`, checking that the device is usable.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(crate::error::invalid(
                    "device",
                    format!("unknown device {s:?}; expected cpu, cuda or cuda:N"),
                )),
            },
        }
    }

    /// Fails unless this device can run kernels in this build.
    pub(crate) fn ensure_supported(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) => Err(Error::CudaNotBuilt),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
