//! `nn.Sequential` with named children (`conv1`, `fc1`, or `0`, `1`, ... by default).

use super::{join, Mode, Module, SummaryRow, TensorRole};
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
        let mut children = self.children.iter().peekable();
        while let Some((_, child)) = children.next() {
            // A ReLU followed by a layer with a fused form (max pooling) runs as one op.
            if child.kind() == "ReLU" {
                if let Some((_, next)) = children.peek() {
                    if let Some(y) = next.forward_after_relu(&h, mode) {
                        h = y?;
                        children.next();
                        continue;
                    }
                }
            }
            h = child.forward(&h, mode)?;
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
