//! `nn.Sequential` with named children (`conv1`, `fc1`, or `0`, `1`, ... by default).

use super::{join, Conv2d, MaxPool2d, Mode, Module, SummaryRow, TensorRole};
use crate::error::{Error, Result};
use crate::graph::{Graph, ValueId};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// Runs its children in order. Children are named like the attributes of a PyTorch module,
/// so parameter names match `state_dict` keys.
#[derive(Default)]
pub struct Sequential {
    children: Vec<(String, Box<dyn Module>)>,
}

impl Sequential {
    /// An empty container.
    pub fn new() -> Self {
        Sequential::default()
    }

    /// Appends a child under `name`.
    pub fn add(mut self, name: impl Into<String>, layer: impl Module + 'static) -> Self {
        self.children.push((name.into(), Box::new(layer)));
        self
    }

    /// Appends an already boxed child under `name`.
    pub fn add_boxed(mut self, name: impl Into<String>, layer: Box<dyn Module>) -> Self {
        self.children.push((name.into(), layer));
        self
    }

    /// Appends a child named by its index, like `nn.Sequential(a, b, c)`.
    pub fn push(mut self, layer: impl Module + 'static) -> Self {
        let name = self.children.len().to_string();
        self.children.push((name, Box::new(layer)));
        self
    }

    /// Number of children.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// True when there are no children.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Runs shape inference for inputs of shape `input_chw` (no batch dimension) and wraps
    /// the container in a [`super::Model`].
    pub fn build(self, input_chw: &[usize]) -> Result<super::Model> {
        super::Model::new(Box::new(self), input_chw)
    }
}

impl Module for Sequential {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        let layers = &self.children;
        let mut i = 0;
        while i < layers.len() {
            // A convolution, a ReLU and max pooling run as one op.
            if let Some((conv, pool)) = conv_relu_pool(&layers[i..]) {
                h = conv.forward_relu_max_pool(&h, pool)?;
                i += 3;
                continue;
            }
            let child = &layers[i].1;
            // A ReLU followed by a layer with a fused form (max pooling) runs as one op.
            if child.kind() == "ReLU" {
                if let Some((_, next)) = layers.get(i + 1) {
                    if let Some(y) = next.forward_after_relu(&h, mode) {
                        h = y?;
                        i += 2;
                        continue;
                    }
                }
            }
            h = child.forward(&h, mode)?;
            i += 1;
        }
        Ok(h)
    }

    fn kind(&self) -> &'static str {
        "Sequential"
    }

    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        let mut value = input;
        for (name, child) in &self.children {
            value = child.describe(&join(path, name), value, g)?;
        }
        Ok(value)
    }

    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        self.infer("", input, &mut Vec::new())
    }

    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        for (name, child) in &self.children {
            child.visit_tensors(&join(prefix, name), f);
        }
    }

    fn visit_modules(&self, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
        for (name, child) in &self.children {
            let path = join(prefix, name);
            f(&path, child.as_ref());
            child.visit_modules(&path, f);
        }
    }

    fn infer(&self, path: &str, input: &[usize], rows: &mut Vec<SummaryRow>) -> Result<Shape> {
        let mut shape = Shape::from(input);
        let mut origin: Option<(String, Shape)> = None;
        for (name, child) in &self.children {
            let child_path = join(path, name);
            match child.infer(&child_path, shape.dims(), rows) {
                Ok(out) => {
                    origin = Some((child_path, shape.clone()));
                    shape = out;
                }
                Err(Error::Layer { layer, kind, msg }) if layer == child_path => {
                    let context = match &origin {
                        Some((prev, prev_in)) => format!(" (its input {shape} is the output of {prev}, whose input was {prev_in})"),
                        None => format!(" (its input is the model input {shape})"),
                    };
                    return Err(Error::Layer {
                        layer,
                        kind,
                        msg: msg + &context,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(shape)
    }
}

/// The convolution and the pooling when `layers` starts with `Conv2d, ReLU, MaxPool2d`.
fn conv_relu_pool(layers: &[(String, Box<dyn Module>)]) -> Option<(&Conv2d, &MaxPool2d)> {
    let [(_, conv), (_, relu), (_, pool), ..] = layers else {
        return None;
    };
    if relu.kind() != "ReLU" {
        return None;
    }
    Some((
        conv.as_any()?.downcast_ref()?,
        pool.as_any()?.downcast_ref()?,
    ))
}
