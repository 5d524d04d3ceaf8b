//! # convnet
//!
//! Convolutional neural networks in Rust: tensors with reverse-mode autograd, the CNN layer
//! set of `torch.nn` with PyTorch's default initialisation and `state_dict` names, and
//! `torch.optim`'s optimizers and schedules — checked number by number against PyTorch.
//!
//! ```
//! use convnet::nn::{self, Module, Mode};
//! use convnet::optim::{Optimizer, Sgd, SgdConfig};
//! use convnet::{Reduction, Tensor};
//!
//! convnet::manual_seed(0);
//! let model = nn::Sequential::new()
//!     .add("conv1", nn::Conv2d::new(3, 8, 3).padding(1).build()?)
//!     .add("relu1", nn::ReLU)
//!     .add("pool1", nn::MaxPool2d::new(2))
//!     .add("flatten", nn::Flatten::new())
//!     .add("fc1", nn::Linear::new(8 * 4 * 4, 10)?)
//!     .build(&[3, 8, 8])?;
//! let mut opt = Sgd::new(model.named_parameters(), SgdConfig { lr: 0.1, ..Default::default() })?;
//! let x = Tensor::randn([4, 3, 8, 8], &mut convnet::Rng::new(1));
//! let loss = model.forward(&x, Mode::Train)?.cross_entropy(&[0, 1, 2, 3], Reduction::Mean, 0.0)?;
//! let grads = loss.backward()?;
//! opt.step(&grads)?;
//! # Ok::<(), convnet::Error>(())
//! ```

#![deny(missing_docs)]

/// Runs `$body` (which may name `crate::backend::cuda`) with `$g` bound to the GPU ordinal;
/// in builds without the `cuda` feature no tensor can be on a GPU, so this is never reached
/// and says so with [`crate::Error::CudaNotBuilt`].
macro_rules! on_gpu {
    ($gpu:expr, |$g:ident| $body:expr) => {{
        #[cfg(feature = "cuda")]
        {
            let $g: usize = $gpu;
            $body
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = $gpu;
            Err(crate::error::Error::CudaNotBuilt)
        }
    }};
}

pub mod autocast;
pub mod autograd;
pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod explain;
pub mod graph;
pub mod infer;
pub mod model_file;
pub mod models;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod profile;
pub mod quant;
pub mod rng;
mod scoped;
pub mod shape;
pub mod storage;
pub mod tensor;
pub mod tensorboard;
pub mod train;
pub mod viz;

pub use autograd::{is_grad_enabled, no_grad, GradStore};
pub use backend::cpu::activation::Activation;
pub use device::Device;
pub use error::{Error, Result};
pub use rng::{global_rng_state, manual_seed, set_global_rng_state, with_global_rng, Rng};
pub use shape::Shape;
pub use storage::{DType, Storage};
pub use tensor::{
    AvgPool1dParams, AvgPool2dParams, Conv1dParams, Conv2dParams, MaxPool1dParams, MaxPool2dParams,
    Reduction, Tensor, TensorId,
};
