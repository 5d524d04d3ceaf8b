//! [`Model`]: a module whose shapes were checked for a given input size, with its summary
//! table and `state_dict`-style access to parameters and buffers.

use super::{Mode, Module, TensorRole};
use crate::error::{shape_mismatch, Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;
use std::fmt::Write as _;

/// One line of a model summary.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    /// Layer path (`conv1`, `layer1.0.bn1`).
    pub name: String,
    /// Layer type.
    pub kind: &'static str,
    /// Output shape for a batch of one.
    pub output_shape: Shape,
    /// Trainable parameters in this layer (not in its children).
    pub params: usize,
}

/// A network built for a fixed input shape. Building runs shape inference once, so a layer
/// that cannot take its input (a wrong flatten size, too few channels) is reported by name
/// before any data flows.
///
/// ```
/// use convnet::nn::{Flatten, Linear, Sequential};
/// let err = Sequential::new()
///     .add("flatten", Flatten::new())
///     .add("fc1", Linear::new(64 * 7 * 7, 10)?)
///     .build(&[64, 8, 8])
///     .err()
///     .unwrap();
/// assert!(err.to_string().starts_with("fc1 (Linear): expected 3136 input features, got 4096"));
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct Model {
    net: Box<dyn Module>,
    input_shape: Vec<usize>,
    output_shape: Shape,
    rows: Vec<SummaryRow>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Model(input {}, output {}, {} parameters)",
            Shape::from(self.input_shape.as_slice()),
            self.output_shape,
            self.num_parameters()
        )
    }
}

impl Model {
    /// Checks `net` for inputs of shape `input_shape` (without the batch dimension).
    pub fn new(net: Box<dyn Module>, input_shape: &[usize]) -> Result<Model> {
        let mut batched = vec![1];
        batched.extend_from_slice(input_shape);
        let mut rows = Vec::new();
        let output_shape = net.infer("", &batched, &mut rows)?;
        Ok(Model {
            net,
            input_shape: input_shape.to_vec(),
            output_shape,
            rows,
        })
    }

    /// Input shape without the batch dimension, e.g. `[3, 32, 32]`.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Output shape for a batch of one.
    pub fn output_shape(&self) -> &Shape {
        &self.output_shape
    }

    /// The wrapped network.
    pub fn net(&self) -> &dyn Module {
        self.net.as_ref()
    }

    /// Runs the network on a batch `[N, ...input_shape]`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if x.rank() != self.input_shape.len() + 1 || x.dims()[1..] != self.input_shape[..] {
            return Err(shape_mismatch(
                "Model::forward",
                format!(
                    "input [N, {}]",
                    self.input_shape
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                x.shape().to_string(),
            ));
        }
        self.net.forward(x, mode)
    }

    /// The model as a graph of layer values, reading the model's own tensors (see
    /// [`crate::graph`]).
    pub fn graph(&self) -> Result<crate::graph::Graph> {
        crate::graph::Graph::of(self.net.as_ref(), &self.input_shape)
    }

    /// The wrapped network, taken out of the model.
    pub fn into_net(self) -> Box<dyn Module> {
        self.net
    }

    /// Trainable parameters with their `state_dict` names.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        super::named_parameters(self.net.as_ref())
    }

    /// Parameters and buffers with their `state_dict` names.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        super::state_dict(self.net.as_ref())
    }

    /// The device of the parameters (the CPU for a model without any).
    pub fn device(&self) -> crate::Device {
        self.named_parameters()
            .first()
            .map_or(crate::Device::Cpu, |(_, t)| t.device())
    }

    /// Moves every parameter and buffer to `device` in place (the layers, and optimizers
    /// made afterwards, see the moved tensors). Inputs must then be on the same device.
    /// BatchNorm's `num_batches_tracked` stays on the host: it is a counter that no kernel
    /// reads, and keeping it there spares a device round trip per layer and step.
    ///
    /// ```
    /// use convnet::{models, Device};
    /// let model = models::build("seed-cnn", [3, 32, 32], 10)?;
    /// model.to_device(Device::Cpu)?;
    /// assert_eq!(model.device(), Device::Cpu);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn to_device(&self, device: crate::Device) -> Result<()> {
        // Fail before moving anything when the device cannot be used at all.
        device.ensure_supported()?;
        for (name, t) in self.state_dict() {
            if super::is_batch_counter(&name) {
                continue;
            }
            t.move_to_device(device).map_err(|e| match e {
                Error::InvalidArgument { msg, .. } => Error::State(format!("{name}: {msg}")),
                other => other,
            })?;
        }
        Ok(())
    }

    /// Fails, naming the first tensor and how many of its values are NaN or infinite, when
    /// a parameter or buffer is not finite (weights saved from a diverged run would turn
    /// every prediction into NaN).
    ///
    /// ```
    /// let model = convnet::models::build("lenet5", [1, 28, 28], 10)?;
    /// assert!(model.check_finite().is_ok());
    /// model.named_parameters()[0].1.update_data(|w| w[3] = f32::NAN)?;
    /// let err = model.check_finite().unwrap_err().to_string();
    /// assert!(err.contains("conv1.weight") && err.contains("1 of 150"), "{err}");
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn check_finite(&self) -> Result<()> {
        for (name, t) in self.state_dict() {
            let values = t.try_to_vec()?;
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(Error::State(format!(
                    "{name}: {bad} of {} values are NaN or infinite (weights saved from a run that diverged?)",
                    values.len()
                )));
            }
        }
        Ok(())
    }

    /// The classifier: the path of the model's last Linear layer (`fc2` of seed-cnn, `fc`
    /// of the ResNets, `classifier` of VGG), `None` for a model without one.
    ///
    /// ```
    /// let model = convnet::models::build("resnet20", [3, 32, 32], 10)?;
    /// assert_eq!(model.classifier()?.as_deref(), Some("fc"));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn classifier(&self) -> Result<Option<String>> {
        let graph = self.graph()?;
        Ok(graph
            .nodes()
            .iter()
            .rev()
            .find(|n| matches!(n.op, crate::graph::Op::Linear { .. }))
            .map(|n| n.name.clone()))
    }

    /// Freezes the parameters under the `state_dict` paths `prefixes` (whole path
    /// components: `layer1` covers `layer1.0.conv1.weight` but not `layer10.weight`): they
    /// stop requiring gradients ([`Tensor::set_requires_grad`]), so backward computes none
    /// for them and an optimizer made from [`Model::trainable_parameters`] leaves them out;
    /// every BatchNorm layer whose weight and bias are both frozen stays in eval mode during
    /// training ([`super::BatchNormState::keep_eval`]). Returns the names of the parameters
    /// frozen. A prefix that covers no parameter is an error listing the model's top-level
    /// names.
    ///
    /// ```
    /// let model = convnet::models::build("resnet20", [3, 32, 32], 10)?;
    /// let frozen = model.freeze(&["conv1".into(), "bn1".into(), "layer1".into()])?;
    /// assert_eq!(frozen.len(), 3 + 3 * 2 * 3); // conv1, bn1; three blocks of 2 convs + 2 BNs
    /// assert!(model.trainable_parameters().iter().all(|(n, _)| !n.starts_with("layer1.")));
    /// let err = model.freeze(&["layer9".into()]).unwrap_err().to_string();
    /// assert!(err.contains("conv1, bn1, layer1, layer2, layer3, fc"), "{err}");
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn freeze(&self, prefixes: &[String]) -> Result<Vec<String>> {
        let params = self.named_parameters();
        let covers = |prefix: &str, name: &str| {
            name == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        for prefix in prefixes {
            if !params.iter().any(|(n, _)| covers(prefix, n)) {
                let mut top: Vec<&str> = Vec::new();
                for (n, _) in &params {
                    let first = n.split('.').next().unwrap_or(n);
                    if !top.contains(&first) {
                        top.push(first);
                    }
                }
                return Err(crate::error::invalid(
                    "freeze",
                    format!(
                        "{prefix:?} names no parameter of the model; its top-level names: {}",
                        top.join(", ")
                    ),
                ));
            }
        }
        self.freeze_where(|name| prefixes.iter().any(|p| covers(p, name)))
    }

    /// Freezes everything but the classifier (the last Linear layer, see
    /// [`Model::classifier`]), as [`Model::freeze`] does; an error for a model without a
    /// Linear layer. Returns the names of the parameters frozen.
    ///
    /// ```
    /// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
    /// model.freeze_backbone()?;
    /// let names: Vec<String> = model.trainable_parameters().into_iter().map(|(n, _)| n).collect();
    /// assert_eq!(names, ["fc2.weight", "fc2.bias"]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn freeze_backbone(&self) -> Result<Vec<String>> {
        let Some(fc) = self.classifier()? else {
            return Err(crate::error::invalid(
                "freeze",
                "the model has no Linear layer, so no classifier to keep training: name the layers to freeze instead",
            ));
        };
        let prefix = format!("{fc}.");
        self.freeze_where(|name| !name.starts_with(&prefix))
    }

    fn freeze_where(&self, frozen: impl Fn(&str) -> bool) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for (name, t) in self.named_parameters() {
            if frozen(&name) {
                t.set_requires_grad(false)?;
                names.push(name);
            }
        }
        self.net.visit_modules("", &mut |_, layer| {
            if let Some(bn) = super::batch_norm_state(layer).filter(|bn| bn.is_frozen()) {
                bn.keep_eval(true);
            }
        });
        Ok(names)
    }

    /// The parameters that are trained: those that require a gradient (all of them unless
    /// some were frozen with [`Model::freeze`]), with their `state_dict` names.
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters()
            .into_iter()
            .filter(|(_, t)| t.tracks_grad())
            .collect()
    }

    /// Number of trainable parameters.
    pub fn num_parameters(&self) -> usize {
        self.named_parameters().iter().map(|(_, t)| t.numel()).sum()
    }

    /// Copies values into the parameters and buffers from `(name, tensor)` pairs. With
    /// `strict`, every entry of the state dict must be given and every given name must exist.
    ///
    /// ```
    /// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
    /// // The model's own tensors (as when only a classifier is swapped for fine-tuning)
    /// // load as a no-op.
    /// let before = model.state_dict()[0].1.to_vec();
    /// model.load_state_dict(&model.state_dict(), true)?;
    /// assert_eq!(model.state_dict()[0].1.to_vec(), before);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn load_state_dict(&self, entries: &[(String, Tensor)], strict: bool) -> Result<()> {
        let own = self.state_dict();
        for (name, value) in entries {
            match own.iter().find(|(n, _)| n == name) {
                Some((_, t)) => {
                    if t.dims() != value.dims() {
                        return Err(Error::State(format!(
                            "{name}: expected shape {}, got {}",
                            t.shape(),
                            value.shape()
                        )));
                    }
                    // Loading a parameter into itself is a no-op (and copying under its
                    // own read lock would wait forever).
                    if t.id() != value.id() {
                        value.with_data(|d| t.copy_from_slice(d))?;
                    }
                }
                None if strict => return Err(Error::State(format!("unexpected key {name}"))),
                None => {}
            }
        }
        if strict {
            if let Some((missing, _)) = own
                .iter()
                .find(|(n, _)| !entries.iter().any(|(e, _)| e == n))
            {
                return Err(Error::State(format!("missing key {missing}")));
            }
        }
        Ok(())
    }

    /// The summary rows (one per leaf layer).
    pub fn summary_rows(&self) -> &[SummaryRow] {
        &self.rows
    }

    /// A printable table: layer, output shape, parameters, and totals.
    pub fn summary(&self) -> String {
        let name_w = self
            .rows
            .iter()
            .map(|r| r.name.len() + r.kind.len() + 3)
            .max()
            .unwrap_or(0)
            .max(18);
        let shape_w = self
            .rows
            .iter()
            .map(|r| r.output_shape.to_string().len())
            .max()
            .unwrap_or(0)
            .max(14);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<name_w$}  {:<shape_w$}  {:>10}",
            "Layer (type)", "Output shape", "Params"
        );
        let _ = writeln!(s, "{}", "-".repeat(name_w + shape_w + 14));
        for r in &self.rows {
            let label = format!("{} ({})", r.name, r.kind);
            let _ = writeln!(
                s,
                "{label:<name_w$}  {:<shape_w$}  {:>10}",
                r.output_shape.to_string(),
                r.params
            );
        }
        let _ = writeln!(s, "{}", "-".repeat(name_w + shape_w + 14));
        let buffers: usize = {
            let mut n = 0;
            self.net.visit_tensors("", &mut |_, t, role| {
                if role == TensorRole::Buffer {
                    n += t.numel();
                }
            });
            n
        };
        let _ = writeln!(
            s,
            "Input shape: {}",
            Shape::from(self.input_shape.as_slice())
        );
        let _ = writeln!(s, "Trainable params: {}", self.num_parameters());
        let _ = write!(s, "Buffers: {buffers}");
        s
    }
}
