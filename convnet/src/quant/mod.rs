//! Int8 quantization: observers that choose scales and zero points, fake quantization for
//! training, post-training quantization of a model from calibration data, and quantized
//! models that run on int8 kernels.

pub mod fake;
pub mod model;
pub mod observer;
pub mod qat;

pub use model::{quantize, ObserverKind, QuantConfig, QuantizedModel};
pub use observer::{QParams, QRange, Scheme};
