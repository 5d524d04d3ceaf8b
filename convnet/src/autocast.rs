//! Mixed precision, as `torch.autocast("cpu", dtype=torch.bfloat16)`: inside [`autocast`]
//! with [`Precision::Bf16`], convolutions and linear layers multiply bf16 operands with
//! float32 accumulation (the kernels of [`crate::backend::cpu::bf16`]); weights, their
//! gradients, the optimizer and every other op stay float32. Each convolution and linear
//! layer records the precision of its forward pass, and its backward pass runs in the
//! same one.
//!
//! The difference from PyTorch: results of the bf16 products are kept in float32 (PyTorch
//! rounds them to bf16 before the next op), so only the operands lose precision.
//!
//! ```
//! use convnet::autocast::{autocast, Precision};
//! use convnet::Tensor;
//! let x = Tensor::from_vec(vec![1.0 + 1.0 / 256.0, 1.0], [1, 2])?;
//! let w = Tensor::ones([1, 2]);
//! match autocast(Precision::Bf16, || x.linear(&w, None)) {
//!     // 1 + 2^-8 rounds to 1 in bf16.
//!     Ok(y) => assert_eq!(y?.to_vec(), vec![2.0]),
//!     Err(e) => println!("{e}"), // a CPU without AVX512-BF16
//! }
//! assert_eq!(x.linear(&w, None)?.to_vec(), vec![2.0 + 1.0 / 256.0]);
//! # Ok::<(), convnet::Error>(())
//! ```

use crate::error::{Error, Result};
use std::cell::Cell;
use std::fmt;
use std::str::FromStr;

/// The precision of the products in convolutions and linear layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Float32 throughout.
    #[default]
    F32,
    /// bf16 operands, float32 accumulation and results.
    Bf16,
}

impl Precision {
    /// The name the CLI takes and prints: `fp32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }

    /// `Ok` where this machine runs the precision, otherwise an error that says why.
    pub fn check_supported(self) -> Result<()> {
        match self {
            Precision::F32 => Ok(()),
            Precision::Bf16 => match crate::backend::cpu::bf16::unsupported_reason() {
                None => Ok(()),
                Some(reason) => Err(Error::Unsupported(reason)),
            },
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(Error::InvalidArgument {
                op: "precision",
                msg: format!("unknown precision {s:?}: expected fp32 or bf16"),
            }),
        }
    }
}

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// The precision that convolutions and linear layers started on this thread use now.
pub fn precision() -> Precision {
    CURRENT.with(Cell::get)
}

/// Runs `f` with `precision` for the convolutions and linear layers it starts on this
/// thread, then restores the previous one (also when `f` panics). Errors, without running
/// `f`, when this machine cannot run the precision.
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> Result<R> {
    precision.check_supported()?;
    Ok(crate::scoped::with(&CURRENT, precision, f))
}
