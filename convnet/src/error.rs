//! The one error type of the library, and its `Result` alias.
//!
//! Every fallible public function returns [`Result`]. Variants are structured so that a
//! message names the operation or layer at fault and the shapes involved.

use std::path::PathBuf;

/// Errors returned by convnet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operand shapes do not fit the operation.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation that rejected its inputs, e.g. `conv2d`.
        op: &'static str,
        /// What the operation needs.
        expected: String,
        /// What it was given.
        got: String,
    },
    /// A hyperparameter or argument is outside its valid range.
    #[error("{op}: invalid argument: {msg}")]
    InvalidArgument {
        /// The operation or constructor that rejected the argument.
        op: &'static str,
        /// What is wrong and what is allowed.
        msg: String,
    },
    /// A class index in a target tensor is outside `0..num_classes`.
    #[error("{op}: target class index {index} is out of range for {num_classes} classes")]
    ClassIndexOutOfRange {
        /// The loss that saw the target.
        op: &'static str,
        /// The offending class index.
        index: i64,
        /// Number of classes the logits have.
        num_classes: usize,
    },
    /// A layer of a model cannot take the shape its predecessor produces.
    #[error("{layer} ({kind}): {msg}")]
    Layer {
        /// Path of the layer in the model, as in `state_dict` keys (`fc1`, `layer1.0.conv1`).
        layer: String,
        /// Layer type, e.g. `Linear`.
        kind: &'static str,
        /// What does not fit.
        msg: String,
    },
    /// `backward` was called on something that cannot be differentiated.
    #[error("backward: {0}")]
    Backward(String),
    /// The library was compiled without the `cuda` feature.
    #[error("CUDA device requested but convnet was built without CUDA support (rebuild with `--features cuda`)")]
    CudaNotBuilt,
    /// CUDA support is compiled in but no usable GPU or driver was found.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// Tensors live on different devices.
    #[error("{op}: tensors are on different devices ({a} and {b})")]
    DeviceMismatch {
        /// The operation.
        op: &'static str,
        /// Device of the first operand.
        a: String,
        /// Device of the second operand.
        b: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file exists but its contents are not what was expected.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// The training loss became NaN or infinite.
    #[error("training diverged: the loss is {loss} at epoch {epoch}, step {step}; lower the learning rate (the last good checkpoint is kept)")]
    Diverged {
        /// Epoch (1-based) in which it happened.
        epoch: usize,
        /// Optimizer step at which it happened.
        step: usize,
        /// The non-finite loss.
        loss: f32,
    },
    /// A model or setting that an exporter or backend cannot express.
    #[error("{0}")]
    Unsupported(String),
    /// A named tensor or parameter is missing or has the wrong shape.
    #[error("state: {0}")]
    State(String),
}

/// `Result` with the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Builds an [`Error::InvalidArgument`].
pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Error {
    Error::InvalidArgument {
        op,
        msg: msg.into(),
    }
}

/// Builds an [`Error::ShapeMismatch`].
pub(crate) fn shape_mismatch(
    op: &'static str,
    expected: impl Into<String>,
    got: impl Into<String>,
) -> Error {
    Error::ShapeMismatch {
        op,
        expected: expected.into(),
        got: got.into(),
    }
}
