//! The device a tensor lives on, chosen at run time.

#[cfg(not(feature = "cuda"))]
use crate::error::Error;
use crate::error::Result;
use std::fmt;

/// Where tensors are stored and kernels run.
///
/// The `Cuda` variant always exists so that device choice is a run-time value; without the
/// `cuda` feature, asking for it is an error rather than a compile failure.
///
/// ```
/// use convnet::Device;
/// assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
/// // Without the `cuda` feature, or without a GPU, asking for one is an error that says why.
/// match Device::cuda(0) {
///     Ok(gpu) => println!("using {gpu}"),
///     Err(e) => println!("staying on the CPU: {e}"),
/// }
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
    /// The CUDA device with the given ordinal, if this build and machine can provide it:
    /// [`crate::Error::CudaNotBuilt`] without the `cuda` feature, [`crate::Error::CudaUnavailable`] with
    /// the reason when the driver or the device is missing.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            // Test builds: the host emulator of the CUDA kernels stands at its own ordinal.
            #[cfg(feature = "cuda-emulator")]
            if ordinal == crate::backend::cuda::emulator::ORDINAL {
                return Ok(Device::Cuda(ordinal));
            }
            crate::backend::cuda::probe(ordinal)?;
            Ok(Device::Cuda(ordinal))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::CudaNotBuilt)
        }
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

    /// Fails unless tensors can live and kernels can run on this device in this build.
    pub fn ensure_supported(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            // Sets the device up on first use (kernels compiled, library handles made).
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => crate::backend::cuda::runtime::with(n, |_| Ok(())),
            #[cfg(not(feature = "cuda"))]
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
