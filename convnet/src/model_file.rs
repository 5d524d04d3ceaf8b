//! Models without code: a network described in a TOML or JSON file as a list of layers in
//! the `nn.Sequential` style, built with shape inference.
//!
//! ```toml
//! name = "small-cnn"
//! input = [3, 32, 32]      # optional: the data decides when training
//!
//! [[layer]]
//! type = "conv2d"          # in_channels is inferred
//! name = "conv1"           # optional; layers are named 0, 1, ... otherwise
//! out_channels = 16
//! kernel_size = 3
//! padding = 1
//!
//! [[layer]]
//! type = "relu"
//!
//! [[layer]]
//! type = "flatten"
//!
//! [[layer]]
//! type = "linear"          # in_features is inferred
//! out_features = "classes" # the data set's class count
//! ```
//!
//! Layer types and their keys (defaults as in `torch.nn`):
//! `conv2d` (out_channels, kernel_size, stride, padding, dilation, groups, bias),
//! `maxpool2d` (kernel_size, stride = kernel_size, padding, dilation, ceil_mode),
//! `avgpool2d` (kernel_size, stride = kernel_size, padding, ceil_mode, count_include_pad),
//! `adaptive_avgpool2d` (output_size), `batchnorm2d`, `relu`, `relu6`, `leaky_relu`
//! (negative_slope), `sigmoid`, `tanh`, `gelu` (approximate = "none" | "tanh"), `softmax`
//! (dim), `dropout` (p), `flatten`, `linear` (out_features, bias), and residual blocks:
//! `basic_block` (out_channels, stride, shortcut = "projection" | "pad"), `bottleneck`
//! (planes, stride; output 4 x planes), `inverted_residual` (out_channels, stride,
//! expand_ratio). Sizes are a number or `[height, width]`.
//!
//! Sequence layers take `[N, C, L]` (`input = [C, L]`): `conv1d` (out_channels,
//! kernel_size, stride, padding, dilation, groups, bias), `maxpool1d` (kernel_size, stride =
//! kernel_size, padding, dilation, ceil_mode), `avgpool1d` (kernel_size, stride =
//! kernel_size, padding, ceil_mode, count_include_pad), `adaptive_avgpool1d` and
//! `adaptive_maxpool1d` (output_size), `batchnorm1d` (eps, momentum; on `[N, C]` or
//! `[N, C, L]`), and `embedding` (num_embeddings — a number, or `"vocab"` for the size of
//! the tokenizer's vocabulary —, embedding_dim, padding_idx) reading integer
//! ids given as numbers (`input = [L]`, output `[N, L, embedding_dim]`); `permute` (dims,
//! batch first: `[0, 2, 1]` turns embeddings into channels) and `conv_bank1d` (out_channels,
//! kernel_sizes: Kim's parallel convolutions with ReLU and max over time, concatenated to
//! `[N, out_channels * widths]`). Sizes of 1-D layers are numbers.
//!
//! Unknown keys and types, missing values and layers that do not fit their input are errors
//! naming the layer.
//!
//! ```
//! let f = convnet::model_file::ModelFile::from_toml(
//!     "name = 'seq'\ninput = [4, 20]\n\
//!      [[layer]]\ntype = 'conv1d'\nname = 'conv'\nout_channels = 8\nkernel_size = 3\npadding = 1\n\
//!      [[layer]]\ntype = 'batchnorm1d'\n[[layer]]\ntype = 'maxpool1d'\nkernel_size = 2\n\
//!      [[layer]]\ntype = 'adaptive_avgpool1d'\n[[layer]]\ntype = 'flatten'\n\
//!      [[layer]]\ntype = 'linear'\nout_features = 'classes'\n",
//!     "seq.toml",
//! )?;
//! let model = f.build_for(&[4, 20], 3)?;
//! assert_eq!(model.state_dict()[0].0, "conv.weight");
//! assert_eq!(model.state_dict()[0].1.dims(), &[8, 4, 3]);
//! assert_eq!(model.output_shape().dims(), &[1, 3]);
//! # Ok::<(), convnet::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::nn::{
    AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveMaxPool1d, AvgPool1d, AvgPool2d, BasicBlock,
    BatchNorm1d, BatchNorm2d, Bottleneck, Conv1d, Conv2d, ConvBank1d, Dropout, Embedding, Flatten,
    GELUTanh, InvertedResidual, LeakyReLU, Linear, MaxPool1d, MaxPool2d, Model, Module, Permute,
    ReLU, ReLU6, Sequential, Shortcut, Sigmoid, Softmax, Tanh, GELU,
};
use crate::shape::Shape;
use crate::tensor::{AvgPool1dParams, AvgPool2dParams, MaxPool1dParams, MaxPool2dParams};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::path::Path;

/// A parsed model file.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// The model's name (`name = "..."`), used as its architecture name in checkpoints.
    pub name: String,
    /// The input `[C, H, W]` it is meant for, if the file says so with three sizes.
    pub input: Option<[usize; 3]>,
    /// The input it is meant for as the file gives it, of any rank (`[C, L]` for sequences,
    /// `[L]` for ids), if it says.
    pub input_dims: Option<Vec<usize>>,
    /// The class count, if the file fixes it.
    pub num_classes: Option<usize>,
    spec: Value,
}

fn format_error(path: &str, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.into(),
        msg: msg.into(),
    }
}

impl ModelFile {
    /// Reads a `.toml` or `.json` model file.
    pub fn from_path(path: &Path) -> Result<ModelFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let origin = path.display().to_string();
        match path.extension().and_then(|e| e.to_str()) {
            Some("json") => Self::from_json(&text, &origin),
            Some("toml") => Self::from_toml(&text, &origin),
            _ => Err(format_error(
                &origin,
                "a model file must end in .toml or .json",
            )),
        }
    }

    /// Parses TOML text; `origin` names the source in errors.
    ///
    /// ```
    /// let f = convnet::model_file::ModelFile::from_toml(
    ///     "name = 'tiny'\n[[layer]]\ntype = 'flatten'\n[[layer]]\ntype = 'linear'\nout_features = 'classes'\n",
    ///     "tiny.toml",
    /// )?;
    /// let model = f.build([1, 4, 4], 3)?;
    /// assert_eq!(model.output_shape().dims(), &[1, 3]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn from_toml(text: &str, origin: &str) -> Result<ModelFile> {
        let spec: Value = toml::from_str(text)
            .map_err(|e| format_error(origin, format!("not valid TOML: {e}")))?;
        Self::from_value(spec, origin)
    }

    /// Parses JSON text (the same keys; `layers` is an array of objects).
    pub fn from_json(text: &str, origin: &str) -> Result<ModelFile> {
        let spec: Value = serde_json::from_str(text)
            .map_err(|e| format_error(origin, format!("not valid JSON: {e}")))?;
        Self::from_value(spec, origin)
    }

    fn from_value(spec: Value, origin: &str) -> Result<ModelFile> {
        let top = spec
            .as_object()
            .ok_or_else(|| format_error(origin, "the file must be a table of keys"))?;
        for key in top.keys() {
            if ![
                "name",
                "description",
                "input",
                "num_classes",
                "layer",
                "layers",
            ]
            .contains(&key.as_str())
            {
                return Err(format_error(
                    origin,
                    format!("unknown top-level key `{key}` (expected name, description, input, num_classes, layer)"),
                ));
            }
        }
        let name = top
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format_error(origin, "missing `name = \"...\"`"))?
            .to_string();
        let input_dims = match top.get("input") {
            None => None,
            Some(v) => {
                let dims: Option<Vec<usize>> = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|d| d.as_u64().filter(|&d| d > 0).map(|d| d as usize))
                        .collect()
                });
                match dims {
                    Some(d) if (1..=3).contains(&d.len()) => Some(d),
                    _ => {
                        return Err(format_error(
                            origin,
                            "`input` must be [channels, height, width], [channels, length] or [length] with positive sizes",
                        ))
                    }
                }
            }
        };
        let input = match input_dims.as_deref() {
            Some(&[c, h, w]) => Some([c, h, w]),
            _ => None,
        };
        let num_classes =
            match top.get("num_classes") {
                None => None,
                Some(v) => Some(v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    format_error(origin, "`num_classes` must be a positive number")
                })? as usize),
            };
        let file = ModelFile {
            name,
            input,
            input_dims,
            num_classes,
            spec,
        };
        if file.layers().is_empty() {
            return Err(format_error(
                origin,
                "no layers: add [[layer]] tables (TOML) or a `layers` array (JSON)",
            ));
        }
        Ok(file)
    }

    fn layers(&self) -> Vec<Value> {
        let top = self.spec.as_object().expect("checked when parsed");
        top.get("layer")
            .or_else(|| top.get("layers"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// The file's contents as one line of JSON (stored in checkpoints so that they rebuild
    /// without the file).
    pub fn to_json(&self) -> String {
        self.spec.to_string()
    }

    /// Builds the network for inputs `[C, H, W]` and `num_classes` outputs; a layer that
    /// would take the model past [`crate::nn::MAX_PARAMETERS`] parameters fails, named,
    /// before it is allocated.
    pub fn build(&self, input: [usize; 3], num_classes: usize) -> Result<Model> {
        self.build_for(&input, num_classes)
    }

    /// Builds the network for inputs of any rank (batch excluded): `[C, H, W]` images,
    /// `[C, L]` sequences, `[L]` ids; otherwise as [`ModelFile::build`].
    pub fn build_for(&self, input: &[usize], num_classes: usize) -> Result<Model> {
        self.build_with_vocabulary(input, None, num_classes)
    }

    /// [`ModelFile::build_for`] for a text model: an `embedding` whose `num_embeddings` is
    /// `"vocab"` gets `vocabulary` rows (the tokenizer's vocabulary size).
    pub fn build_with_vocabulary(
        &self,
        input: &[usize],
        vocabulary: Option<usize>,
        num_classes: usize,
    ) -> Result<Model> {
        crate::nn::with_parameter_limit(crate::nn::MAX_PARAMETERS, || {
            self.build_layers(input, vocabulary, num_classes)
        })
    }

    fn build_layers(
        &self,
        input: &[usize],
        vocabulary: Option<usize>,
        num_classes: usize,
    ) -> Result<Model> {
        if let Some(n) = self.num_classes.filter(|&n| n != num_classes) {
            return Err(Error::Layer {
                layer: self.name.clone(),
                kind: "model file",
                msg: format!(
                    "the file fixes num_classes = {n} but {num_classes} classes were asked for"
                ),
            });
        }
        let mut net = Sequential::new();
        let mut shape = Shape::new([&[1], input].concat());
        let mut names = HashSet::new();
        for (i, def) in self.layers().iter().enumerate() {
            let table = def.as_object().ok_or_else(|| Error::Layer {
                layer: format!("layer {}", i + 1),
                kind: "model file",
                msg: "must be a table of keys".into(),
            })?;
            let mut p = Params::new(i, table)?;
            let name = p.name.clone();
            if !names.insert(name.clone()) {
                return Err(p.error(format!("the name {name:?} is used twice")));
            }
            let layer = build_layer(&mut p, shape.dims(), vocabulary, num_classes)?;
            let mut rows = Vec::new();
            shape = layer.infer(&name, shape.dims(), &mut rows).map_err(|e| {
                p.error(match e {
                    Error::Layer { msg, .. } => msg,
                    other => other.to_string(),
                })
            })?;
            net = net.add_boxed(name, layer);
        }
        if shape.dims() != [1, num_classes] {
            return Err(Error::Layer {
                layer: self.name.clone(),
                kind: "model file",
                msg: format!(
                    "the network's output is {shape} but {num_classes} classes need [1, {num_classes}]; end with a linear layer whose out_features = \"classes\""
                ),
            });
        }
        net.build(input)
    }
}

/// One layer table.
struct Params<'a> {
    index: usize,
    kind: String,
    name: String,
    table: &'a Map<String, Value>,
}

impl<'a> Params<'a> {
    fn new(index: usize, table: &'a Map<String, Value>) -> Result<Self> {
        let kind = table
            .get("type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Layer {
                layer: format!("layer {}", index + 1),
                kind: "model file",
                msg: "missing `type = \"...\"` (conv2d, linear, relu, ...)".into(),
            })?
            .to_string();
        let name = match table.get("name") {
            Some(Value::String(s)) if !s.is_empty() && !s.contains('.') => s.clone(),
            Some(_) => {
                return Err(Error::Layer {
                    layer: format!("layer {}", index + 1),
                    kind: "model file",
                    msg: "`name` must be a non-empty string without dots".into(),
                })
            }
            None => index.to_string(),
        };
        let p = Params {
            index,
            kind,
            name,
            table,
        };
        p.check_keys()?;
        Ok(p)
    }

    fn error(&self, msg: impl Into<String>) -> Error {
        Error::Layer {
            layer: format!("layer {} {:?}", self.index + 1, self.name),
            kind: LAYER_TYPES
                .iter()
                .find(|(t, _)| *t == self.kind)
                .map_or("unknown type", |(t, _)| t),
            msg: msg.into(),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        debug_assert!(
            LAYER_TYPES
                .iter()
                .any(|(t, keys)| *t == self.kind && keys.contains(&key)),
            "{key} is not listed for {}",
            self.kind
        );
        self.table.get(key)
    }

    fn usize_or(&mut self, key: &'static str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            None => default.ok_or_else(|| self.error(format!("missing `{key}`"))),
            Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| {
                self.error(format!(
                    "`{key}` must be a non-negative whole number, got {v}"
                ))
            }),
        }
    }

    fn pair_or(
        &mut self,
        key: &'static str,
        default: Option<(usize, usize)>,
    ) -> Result<(usize, usize)> {
        match self.get(key) {
            None => default.ok_or_else(|| self.error(format!("missing `{key}`"))),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|v| (v as usize, v as usize))
                .ok_or_else(|| self.error(format!("`{key}` must be a whole number or [h, w]"))),
            Some(Value::Array(a)) => match a.as_slice() {
                [h, w] => match (h.as_u64(), w.as_u64()) {
                    (Some(h), Some(w)) => Ok((h as usize, w as usize)),
                    _ => Err(self.error(format!("`{key}` must be [h, w] whole numbers"))),
                },
                _ => Err(self.error(format!("`{key}` must be a number or [h, w]"))),
            },
            Some(v) => Err(self.error(format!("`{key}` must be a number or [h, w], got {v}"))),
        }
    }

    /// A list of whole numbers (`[3, 4, 5]`).
    fn usize_list(&mut self, key: &'static str) -> Result<Vec<usize>> {
        let bad = |p: &Self| p.error(format!("`{key}` must be a list of whole numbers"));
        match self.get(key) {
            None => Err(self.error(format!("missing `{key}`"))),
            Some(Value::Array(a)) if a.len() <= 64 => a
                .iter()
                .map(|v| v.as_u64().map(|v| v as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(self)),
            Some(_) => Err(bad(self)),
        }
    }

    fn bool_or(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("`{key}` must be true or false"))),
        }
    }

    fn f32_or(&mut self, key: &'static str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| self.error(format!("`{key}` must be a number"))),
        }
    }

    fn str_or(&mut self, key: &'static str, default: &'static str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.error(format!("`{key}` must be a string"))),
        }
    }

    /// Rejects keys that the layer type does not take (typos, keys of other types).
    fn check_keys(&self) -> Result<()> {
        let Some((_, keys)) = LAYER_TYPES.iter().find(|(t, _)| *t == self.kind) else {
            return Ok(()); // reported as an unknown type when built
        };
        let mut names: Vec<&String> = self.table.keys().collect();
        names.sort();
        for k in names {
            if k != "type" && k != "name" && !keys.contains(&k.as_str()) {
                return Err(self.error(format!(
                    "unknown key `{k}` (a {} layer takes {})",
                    self.kind,
                    if keys.is_empty() {
                        "no keys besides type and name".to_string()
                    } else {
                        keys.join(", ")
                    }
                )));
            }
        }
        Ok(())
    }
}

/// The `type` values a layer table may have, each with the keys it takes besides `type`
/// and `name`.
const LAYER_TYPES: [(&str, &[&str]); 27] = [
    (
        "conv2d",
        &[
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
        ],
    ),
    (
        "maxpool2d",
        &["kernel_size", "stride", "padding", "dilation", "ceil_mode"],
    ),
    (
        "avgpool2d",
        &[
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
        ],
    ),
    ("adaptive_avgpool2d", &["output_size"]),
    ("batchnorm2d", &["eps", "momentum"]),
    (
        "conv1d",
        &[
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
        ],
    ),
    (
        "maxpool1d",
        &["kernel_size", "stride", "padding", "dilation", "ceil_mode"],
    ),
    (
        "avgpool1d",
        &[
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
        ],
    ),
    ("adaptive_avgpool1d", &["output_size"]),
    ("adaptive_maxpool1d", &["output_size"]),
    ("batchnorm1d", &["eps", "momentum"]),
    (
        "embedding",
        &["num_embeddings", "embedding_dim", "padding_idx"],
    ),
    ("permute", &["dims"]),
    ("conv_bank1d", &["out_channels", "kernel_sizes"]),
    ("relu", &[]),
    ("relu6", &[]),
    ("leaky_relu", &["negative_slope"]),
    ("sigmoid", &[]),
    ("tanh", &[]),
    ("gelu", &["approximate"]),
    ("softmax", &["dim"]),
    ("dropout", &["p"]),
    ("flatten", &[]),
    ("linear", &["out_features", "bias"]),
    ("basic_block", &["out_channels", "stride", "shortcut"]),
    ("bottleneck", &["planes", "stride"]),
    (
        "inverted_residual",
        &["out_channels", "stride", "expand_ratio"],
    ),
];

fn channels(p: &Params, shape: &[usize]) -> Result<usize> {
    if shape.len() != 4 {
        return Err(p.error(format!(
            "needs an image input [N, C, H, W], got {}",
            Shape::from(shape)
        )));
    }
    Ok(shape[1])
}

/// The channel count of a sequence input `[N, C, L]` (or `[N, C]` where `flat` allows).
fn seq_channels(p: &Params, shape: &[usize], flat: bool) -> Result<usize> {
    match shape.len() {
        3 => Ok(shape[1]),
        2 if flat => Ok(shape[1]),
        _ => Err(p.error(format!(
            "needs a sequence input [N, C, L]{}, got {}",
            if flat { " or [N, C]" } else { "" },
            Shape::from(shape)
        ))),
    }
}

fn build_layer(
    p: &mut Params,
    shape: &[usize],
    vocabulary: Option<usize>,
    classes: usize,
) -> Result<Box<dyn Module>> {
    let kind = p.kind.clone();
    let layer: Box<dyn Module> = match kind.as_str() {
        "conv2d" => {
            let c = channels(p, shape)?;
            let out = p.usize_or("out_channels", None)?;
            let (kh, kw) = p.pair_or("kernel_size", None)?;
            let stride = p.pair_or("stride", Some((1, 1)))?;
            let padding = p.pair_or("padding", Some((0, 0)))?;
            let dilation = p.pair_or("dilation", Some((1, 1)))?;
            let groups = p.usize_or("groups", Some(1))?;
            let bias = p.bool_or("bias", true)?;
            let mut b = Conv2d::new(c, out, kh)
                .kernel_size(kh, kw)
                .padding_hw(padding.0, padding.1)
                .groups(groups)
                .bias(bias);
            if stride.0 != stride.1 || dilation.0 != dilation.1 {
                return Err(p.error("stride and dilation must be the same on both axes"));
            }
            b = b.stride(stride.0).dilation(dilation.0);
            Box::new(b.build().map_err(|e| p.error(e.to_string()))?)
        }
        "maxpool2d" => {
            let kernel = p.pair_or("kernel_size", None)?;
            let params = MaxPool2dParams {
                kernel,
                stride: p.pair_or("stride", Some(kernel))?,
                padding: p.pair_or("padding", Some((0, 0)))?,
                dilation: p.pair_or("dilation", Some((1, 1)))?,
                ceil_mode: p.bool_or("ceil_mode", false)?,
            };
            Box::new(MaxPool2d::with(params))
        }
        "avgpool2d" => {
            let kernel = p.pair_or("kernel_size", None)?;
            let params = AvgPool2dParams {
                kernel,
                stride: p.pair_or("stride", Some(kernel))?,
                padding: p.pair_or("padding", Some((0, 0)))?,
                ceil_mode: p.bool_or("ceil_mode", false)?,
                count_include_pad: p.bool_or("count_include_pad", true)?,
            };
            Box::new(AvgPool2d::with(params))
        }
        "adaptive_avgpool2d" => {
            let (h, w) = p.pair_or("output_size", Some((1, 1)))?;
            Box::new(AdaptiveAvgPool2d::new(h, w))
        }
        "batchnorm2d" => {
            let c = channels(p, shape)?;
            let mut bn = BatchNorm2d::new(c).map_err(|e| p.error(e.to_string()))?;
            bn.eps = p.f32_or("eps", 1e-5)?;
            bn.momentum = p.f32_or("momentum", 0.1)?;
            Box::new(bn)
        }
        "conv1d" => {
            let c = seq_channels(p, shape, false)?;
            let out = p.usize_or("out_channels", None)?;
            let k = p.usize_or("kernel_size", None)?;
            let b = Conv1d::new(c, out, k)
                .stride(p.usize_or("stride", Some(1))?)
                .padding(p.usize_or("padding", Some(0))?)
                .dilation(p.usize_or("dilation", Some(1))?)
                .groups(p.usize_or("groups", Some(1))?)
                .bias(p.bool_or("bias", true)?);
            Box::new(b.build().map_err(|e| p.error(e.to_string()))?)
        }
        "maxpool1d" => {
            let kernel = p.usize_or("kernel_size", None)?;
            Box::new(MaxPool1d::with(MaxPool1dParams {
                kernel,
                stride: p.usize_or("stride", Some(kernel))?,
                padding: p.usize_or("padding", Some(0))?,
                dilation: p.usize_or("dilation", Some(1))?,
                ceil_mode: p.bool_or("ceil_mode", false)?,
            }))
        }
        "avgpool1d" => {
            let kernel = p.usize_or("kernel_size", None)?;
            Box::new(AvgPool1d::with(AvgPool1dParams {
                kernel,
                stride: p.usize_or("stride", Some(kernel))?,
                padding: p.usize_or("padding", Some(0))?,
                ceil_mode: p.bool_or("ceil_mode", false)?,
                count_include_pad: p.bool_or("count_include_pad", true)?,
            }))
        }
        "adaptive_avgpool1d" => Box::new(AdaptiveAvgPool1d(p.usize_or("output_size", Some(1))?)),
        "adaptive_maxpool1d" => Box::new(AdaptiveMaxPool1d(p.usize_or("output_size", Some(1))?)),
        "batchnorm1d" => {
            let c = seq_channels(p, shape, true)?;
            let mut bn = BatchNorm1d::new(c).map_err(|e| p.error(e.to_string()))?;
            bn.eps = p.f32_or("eps", 1e-5)?;
            bn.momentum = p.f32_or("momentum", 0.1)?;
            Box::new(bn)
        }
        "embedding" => {
            let num = match p.get("num_embeddings") {
                Some(Value::String(s)) if s == "vocab" => vocabulary.ok_or_else(|| {
                    p.error("num_embeddings = \"vocab\" needs a vocabulary size: train on texts, or give `--vocab N`")
                })?,
                _ => p.usize_or("num_embeddings", None)?,
            };
            let dim = p.usize_or("embedding_dim", None)?;
            let pad = match p.get("padding_idx") {
                None => None,
                Some(_) => Some(p.usize_or("padding_idx", None)?),
            };
            Box::new(Embedding::new(num, dim, pad).map_err(|e| p.error(e.to_string()))?)
        }
        "permute" => {
            let dims = p.usize_list("dims")?;
            Box::new(Permute::new(dims).map_err(|e| p.error(e.to_string()))?)
        }
        "conv_bank1d" => {
            let c = seq_channels(p, shape, false)?;
            let out = p.usize_or("out_channels", None)?;
            let widths = p.usize_list("kernel_sizes")?;
            Box::new(ConvBank1d::new(c, out, &widths).map_err(|e| p.error(e.to_string()))?)
        }
        "relu" => Box::new(ReLU),
        "relu6" => Box::new(ReLU6),
        "leaky_relu" => Box::new(LeakyReLU(p.f32_or("negative_slope", 0.01)?)),
        "sigmoid" => Box::new(Sigmoid),
        "tanh" => Box::new(Tanh),
        "gelu" => match p.str_or("approximate", "none")? {
            "none" => Box::new(GELU),
            "tanh" => Box::new(GELUTanh),
            other => {
                return Err(p.error(format!(
                    "`approximate` is \"none\" or \"tanh\", got {other:?}"
                )))
            }
        },
        "softmax" => {
            let dim = match p.get("dim") {
                None => -1,
                Some(v) => v
                    .as_i64()
                    .ok_or_else(|| p.error("`dim` must be a whole number"))?,
            };
            Box::new(Softmax(dim as isize))
        }
        "dropout" => {
            let prob = p.f32_or("p", 0.5)?;
            Box::new(Dropout::new(prob).map_err(|e| p.error(e.to_string()))?)
        }
        "flatten" => Box::new(Flatten::new()),
        "linear" => {
            let in_features = *shape
                .last()
                .ok_or_else(|| p.error("needs an input with features"))?;
            let out = match p.get("out_features") {
                Some(Value::String(s)) if s == "classes" => classes,
                Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                    p.error(format!(
                        "`out_features` must be a positive number or \"classes\", got {v}"
                    ))
                })? as usize,
                None => return Err(p.error("missing `out_features` (a number, or \"classes\")")),
            };
            let bias = p.bool_or("bias", true)?;
            Box::new(Linear::with_bias(in_features, out, bias).map_err(|e| p.error(e.to_string()))?)
        }
        "basic_block" => {
            let c = channels(p, shape)?;
            let out = p.usize_or("out_channels", Some(c))?;
            let stride = p.usize_or("stride", Some(1))?;
            let shortcut = match p.str_or("shortcut", "projection")? {
                "projection" => Shortcut::Projection,
                "pad" => Shortcut::PadChannels,
                other => {
                    return Err(p.error(format!(
                        "`shortcut` is \"projection\" or \"pad\", got {other:?}"
                    )))
                }
            };
            Box::new(BasicBlock::new(c, out, stride, shortcut).map_err(|e| p.error(e.to_string()))?)
        }
        "bottleneck" => {
            let c = channels(p, shape)?;
            let planes = p.usize_or("planes", None)?;
            let stride = p.usize_or("stride", Some(1))?;
            Box::new(Bottleneck::new(c, planes, stride).map_err(|e| p.error(e.to_string()))?)
        }
        "inverted_residual" => {
            let c = channels(p, shape)?;
            let out = p.usize_or("out_channels", Some(c))?;
            let stride = p.usize_or("stride", Some(1))?;
            let t = p.usize_or("expand_ratio", Some(6))?;
            Box::new(InvertedResidual::new(c, out, stride, t).map_err(|e| p.error(e.to_string()))?)
        }
        other => {
            return Err(p.error(format!(
                "unknown layer type {other:?}; known: {}",
                LAYER_TYPES.map(|(t, _)| t).join(", ")
            )))
        }
    };
    Ok(layer)
}
