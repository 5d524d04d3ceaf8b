//! The sequence layers of `torch.nn` with their constructor arguments, default
//! initialisation and `state_dict` names: Conv1d, MaxPool1d, AvgPool1d, AdaptiveMaxPool1d,
//! AdaptiveAvgPool1d and Embedding (BatchNorm1d lives with BatchNorm2d in `batch_norm`).
//! Inputs are `[N, C, L]`; Embedding takes integer ids carried as floats, any shape.

use super::{init, Mode, Module, TensorRole};
use crate::error::{invalid, shape_mismatch, Result};
use crate::graph::{Graph, Op, ValueId};
use crate::rng::with_global_rng;
use crate::shape::Shape;
use crate::tensor::{AvgPool1dParams, Conv1dParams, MaxPool1dParams, Tensor};

// ----- Conv1d ---------------------------------------------------------------------------------

/// `nn.Conv1d`: weight `[out, in/groups, k]`, optional bias `[out]`.
pub struct Conv1d {
    /// Kernel weights (`weight` in `state_dict`).
    pub weight: Tensor,
    /// Bias (`bias`), if enabled.
    pub bias: Option<Tensor>,
    /// Stride, padding, dilation and groups.
    pub params: Conv1dParams,
}

/// Builder for [`Conv1d`] with PyTorch's defaults (stride 1, padding 0, dilation 1, groups
/// 1, bias on).
pub struct Conv1dBuilder {
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    params: Conv1dParams,
    bias: bool,
}

impl Conv1d {
    /// Starts a convolution `in_channels -> out_channels` with kernel length `kernel_size`.
    ///
    /// ```
    /// let conv = convnet::nn::Conv1d::new(4, 8, 3).padding(1).build()?;
    /// assert_eq!(conv.weight.dims(), &[8, 4, 3]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    #[allow(clippy::new_ret_no_self)]
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Conv1dBuilder {
        Conv1dBuilder {
            in_channels,
            out_channels,
            kernel: kernel_size,
            params: Conv1dParams::default(),
            bias: true,
        }
    }
}

impl Conv1dBuilder {
    /// Stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.params.stride = s;
        self
    }
    /// Zero padding at both ends.
    pub fn padding(mut self, p: usize) -> Self {
        self.params.padding = p;
        self
    }
    /// Dilation.
    pub fn dilation(mut self, d: usize) -> Self {
        self.params.dilation = d;
        self
    }
    /// Channel groups (`groups == in_channels` for depthwise).
    pub fn groups(mut self, g: usize) -> Self {
        self.params.groups = g;
        self
    }
    /// Whether to learn a bias (default true).
    pub fn bias(mut self, on: bool) -> Self {
        self.bias = on;
        self
    }
    /// Validates the settings and initialises the weights from the global generator
    /// (`kaiming_uniform(a=sqrt(5))` and the bias bound `1/sqrt(fan_in)`, as PyTorch).
    pub fn build(self) -> Result<Conv1d> {
        let p = self.params;
        if self.in_channels == 0 || self.out_channels == 0 || self.kernel == 0 {
            return Err(invalid(
                "Conv1d",
                "channels and kernel size must be positive",
            ));
        }
        if p.stride == 0 || p.dilation == 0 || p.groups == 0 {
            return Err(invalid(
                "Conv1d",
                format!(
                    "stride {}, dilation {} and groups {} must be positive",
                    p.stride, p.dilation, p.groups
                ),
            ));
        }
        if !self.in_channels.is_multiple_of(p.groups) || !self.out_channels.is_multiple_of(p.groups)
        {
            return Err(invalid(
                "Conv1d",
                format!(
                    "in_channels {} and out_channels {} must be divisible by groups {}",
                    self.in_channels, self.out_channels, p.groups
                ),
            ));
        }
        let dims = [self.out_channels, self.in_channels / p.groups, self.kernel];
        init::claim("Conv1d", &dims)?;
        if self.bias {
            init::claim("Conv1d", &[self.out_channels])?;
        }
        let fan_in = self.in_channels / p.groups * self.kernel;
        let weight = init::kaiming_uniform(dims, fan_in);
        let bias = self
            .bias
            .then(|| init::uniform_bias(self.out_channels, fan_in));
        Ok(Conv1d {
            weight,
            bias,
            params: p,
        })
    }
}

impl Module for Conv1d {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.conv1d(&self.weight, self.bias.as_ref(), self.params)
    }
    fn kind(&self) -> &'static str {
        "Conv1d"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(
            self,
            path,
            Op::Conv1d {
                weight: self.weight.clone(),
                bias: self.bias.clone(),
                params: self.params,
            },
            input,
            g,
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        self.params.output_shape(input, self.weight.dims())
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        f(
            super::join(prefix, "weight"),
            &self.weight,
            TensorRole::Parameter,
        );
        if let Some(b) = &self.bias {
            f(super::join(prefix, "bias"), b, TensorRole::Parameter);
        }
    }
}

// ----- Pooling --------------------------------------------------------------------------------

pool_layer!(
    /// `nn.MaxPool1d`.
    ///
    /// ```
    /// use convnet::nn::{MaxPool1d, Module};
    /// let pool = MaxPool1d::with(convnet::MaxPool1dParams::new(3).stride(2).ceil_mode(true));
    /// assert_eq!(pool.output_shape(&[1, 4, 10])?.dims(), &[1, 4, 5]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    MaxPool1d(MaxPool1dParams), max_pool1d, MaxPool1d
);

pool_layer!(
    /// `nn.AvgPool1d`.
    ///
    /// ```
    /// use convnet::nn::{AvgPool1d, Module};
    /// assert_eq!(AvgPool1d::new(2).output_shape(&[1, 4, 10])?.dims(), &[1, 4, 5]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    AvgPool1d(AvgPool1dParams), avg_pool1d, AvgPool1d
);

/// `nn.AdaptiveAvgPool1d(output_size)`.
///
/// ```
/// use convnet::nn::{AdaptiveAvgPool1d, Module};
/// assert_eq!(AdaptiveAvgPool1d(1).output_shape(&[2, 4, 10])?.dims(), &[2, 4, 1]);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct AdaptiveAvgPool1d(pub usize);

impl Module for AdaptiveAvgPool1d {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.adaptive_avg_pool1d(self.0)
    }
    fn kind(&self) -> &'static str {
        "AdaptiveAvgPool1d"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(self, path, Op::AdaptiveAvgPool1d(self.0), input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        crate::tensor::adaptive_pool1d_output_shape(input, self.0)
    }
}

/// `nn.AdaptiveMaxPool1d(output_size)`.
///
/// ```
/// use convnet::nn::{AdaptiveMaxPool1d, Module};
/// assert_eq!(AdaptiveMaxPool1d(3).output_shape(&[2, 4, 10])?.dims(), &[2, 4, 3]);
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct AdaptiveMaxPool1d(pub usize);

impl Module for AdaptiveMaxPool1d {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.adaptive_max_pool1d(self.0)
    }
    fn kind(&self) -> &'static str {
        "AdaptiveMaxPool1d"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(self, path, Op::AdaptiveMaxPool1d(self.0), input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        crate::tensor::adaptive_pool1d_output_shape(input, self.0)
    }
}

// ----- Embedding ------------------------------------------------------------------------------

/// `nn.Embedding(num_embeddings, embedding_dim, padding_idx)`: weight
/// `[num_embeddings, embedding_dim]` drawn from N(0, 1), the `padding_idx` row zeroed and
/// never updated (it gets no gradient). Input: integer ids as floats, any shape `[*]`;
/// output `[*, embedding_dim]`. An id that is not a whole number in `0..num_embeddings` is
/// an error naming it.
///
/// ```
/// use convnet::nn::{Embedding, Mode, Module};
/// let emb = Embedding::new(10, 4, Some(0))?;
/// let ids = convnet::Tensor::from_vec(vec![0., 3., 9.], [1, 3])?;
/// let y = emb.forward(&ids, Mode::Eval)?;
/// assert_eq!(y.dims(), &[1, 3, 4]);
/// assert_eq!(&y.to_vec()[..4], &[0.0; 4]); // the padding row
/// let bad = convnet::Tensor::from_vec(vec![10.], [1, 1])?;
/// assert!(emb.forward(&bad, Mode::Eval).is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct Embedding {
    /// The table `[num_embeddings, embedding_dim]`.
    pub weight: Tensor,
    /// The row that reads as padding: zero at start, no gradient.
    pub padding_idx: Option<usize>,
}

impl Embedding {
    /// A table of `num` rows of `dim` values, initialised like PyTorch from the global
    /// generator.
    pub fn new(num: usize, dim: usize, padding_idx: Option<usize>) -> Result<Embedding> {
        if num == 0 || dim == 0 {
            return Err(invalid(
                "Embedding",
                format!("num_embeddings and embedding_dim must be positive, got {num} x {dim}"),
            ));
        }
        if let Some(p) = padding_idx.filter(|&p| p >= num) {
            return Err(invalid(
                "Embedding",
                format!("padding_idx {p} is out of range for {num} embeddings"),
            ));
        }
        init::claim("Embedding", &[num, dim])?;
        let mut w = with_global_rng(|r| Tensor::randn([num, dim], r)).to_vec();
        if let Some(p) = padding_idx {
            w[p * dim..(p + 1) * dim].fill(0.0);
        }
        Ok(Embedding {
            weight: Tensor::from_vec(w, [num, dim])?.requires_grad(),
            padding_idx,
        })
    }
}

impl Module for Embedding {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.embedding(&self.weight, self.padding_idx)
    }
    fn kind(&self) -> &'static str {
        "Embedding"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(
            self,
            path,
            Op::Embedding {
                weight: self.weight.clone(),
                padding_idx: self.padding_idx,
            },
            input,
            g,
        )
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let mut out = input.to_vec();
        out.push(self.weight.dims()[1]);
        Ok(Shape::new(out))
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        f(
            super::join(prefix, "weight"),
            &self.weight,
            TensorRole::Parameter,
        );
    }
}

// ----- Reordering and filter banks ------------------------------------------------------------

/// `x.permute(dims)` as a layer, batch dimension included: `Permute(vec![0, 2, 1])` turns an
/// embedding's `[N, L, D]` into the `[N, D, L]` a `Conv1d` reads (PyTorch models write
/// `x.permute(0, 2, 1)` or `x.transpose(1, 2)` in `forward`).
///
/// ```
/// use convnet::nn::{Module, Permute};
/// assert_eq!(Permute::new(vec![0, 2, 1])?.output_shape(&[8, 50, 16])?.dims(), &[8, 16, 50]);
/// assert!(Permute::new(vec![0, 1, 1]).is_err());
/// # Ok::<(), convnet::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Permute(Vec<usize>);

impl Permute {
    /// A permutation of `0..dims.len()` that keeps the batch dimension first.
    pub fn new(dims: Vec<usize>) -> Result<Permute> {
        let mut seen = vec![false; dims.len()];
        for &d in &dims {
            if d >= dims.len() || std::mem::replace(&mut seen[d], true) {
                return Err(invalid(
                    "Permute",
                    format!("{dims:?} is not a permutation of 0..{}", dims.len()),
                ));
            }
        }
        if dims.first() != Some(&0) {
            return Err(invalid(
                "Permute",
                format!("{dims:?} moves the batch dimension; it must stay first"),
            ));
        }
        Ok(Permute(dims))
    }

    /// The permutation.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
}

impl Module for Permute {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        x.permute(&self.0)
    }
    fn kind(&self) -> &'static str {
        "Permute"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        super::push_leaf(self, path, Op::Permute(self.0.clone()), input, g)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        if input.len() != self.0.len() {
            return Err(shape_mismatch(
                "Permute",
                format!("an input of rank {}", self.0.len()),
                Shape::from(input).to_string(),
            ));
        }
        Ok(Shape::from(
            self.0
                .iter()
                .map(|&d| input[d])
                .collect::<Vec<_>>()
                .as_slice(),
        ))
    }
}

/// Kim's (2014) filter bank for text: `Conv1d`s of several widths over the same `[N, C, L]`
/// input, each followed by ReLU and max-over-time pooling, their `[N, K_i]` outputs
/// concatenated to `[N, sum K_i]`. The convolutions are children `0`, `1`, ...: a bank
/// added to a model as `convs` has the `state_dict` of a PyTorch module holding them in an
/// `nn.ModuleList` called `convs` and computing
/// `torch.cat([F.relu(conv(x)).amax(2) for conv in self.convs], 1)`. On the CPU each
/// filter width runs as one op, [`Tensor::conv1d_relu_max`].
///
/// ```
/// use convnet::nn::{ConvBank1d, Mode, Module};
/// let bank = ConvBank1d::new(16, 100, &[3, 4, 5])?;
/// assert_eq!(bank.output_shape(&[2, 16, 40])?.dims(), &[2, 300]);
/// let x = convnet::Tensor::randn([2, 16, 40], &mut convnet::Rng::new(0));
/// assert_eq!(bank.forward(&x, Mode::Eval)?.dims(), &[2, 300]);
/// assert!(bank.output_shape(&[2, 16, 4]).is_err()); // shorter than the widest filter
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct ConvBank1d {
    convs: Vec<Conv1d>,
}

impl ConvBank1d {
    /// `out_channels` filters of each width in `kernel_sizes` over `in_channels` channels,
    /// with biases, initialised as `nn.Conv1d`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_sizes: &[usize],
    ) -> Result<ConvBank1d> {
        if kernel_sizes.is_empty() {
            return Err(invalid("ConvBank1d", "needs at least one kernel size"));
        }
        let convs = kernel_sizes
            .iter()
            .map(|&k| Conv1d::new(in_channels, out_channels, k).build())
            .collect::<Result<Vec<_>>>()?;
        Ok(ConvBank1d { convs })
    }

    fn name(i: usize) -> String {
        i.to_string()
    }
}

impl Module for ConvBank1d {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        // Each filter bank as one op (convolution, ReLU and maximum over time): the same
        // values, without the [N, K, OL] activations, and a backward through the maxima
        // only. The input is made contiguous once for all the banks.
        let fused = x.device() == crate::Device::Cpu
            && self
                .convs
                .iter()
                .all(|c| c.params == Conv1dParams::default());
        let x = if fused { x.contiguous()? } else { x.clone() };
        let outs = self
            .convs
            .iter()
            .map(|c| {
                if fused {
                    x.conv1d_relu_max(&c.weight, c.bias.as_ref())
                } else {
                    let y = c.forward(&x, mode)?.relu()?.adaptive_max_pool1d(1)?;
                    y.flatten(1)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::concat(&outs, 1)
    }
    fn kind(&self) -> &'static str {
        "ConvBank1d"
    }
    fn describe(&self, path: &str, input: ValueId, g: &mut Graph) -> Result<ValueId> {
        let mut outs = Vec::with_capacity(self.convs.len());
        for (i, c) in self.convs.iter().enumerate() {
            let name = super::join(path, &Self::name(i));
            let y = c.describe(&name, input, g)?;
            let dims = g.shape(y).dims().to_vec();
            let y = g.push(
                &format!("{name}.relu"),
                Op::Activation(crate::backend::cpu::activation::Activation::Relu),
                &[y],
                Shape::from(dims.as_slice()),
            )?;
            let y = g.push(
                &format!("{name}.pool"),
                Op::AdaptiveMaxPool1d(1),
                &[y],
                Shape::from(&[dims[0], dims[1], 1][..]),
            )?;
            outs.push(g.push(
                &format!("{name}.flatten"),
                Op::Flatten { start_dim: 1 },
                &[y],
                Shape::from(&[dims[0], dims[1]][..]),
            )?);
        }
        let shape = self.output_shape(g.shape(input).dims())?;
        g.push(path, Op::Concat(1), &outs, shape)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Shape> {
        let mut channels = 0;
        let mut n = 0;
        for c in &self.convs {
            let s = c.output_shape(input)?;
            n = s.dims()[0];
            channels += s.dims()[1];
        }
        Ok(Shape::from(&[n, channels][..]))
    }
    fn visit_tensors(&self, prefix: &str, f: &mut dyn FnMut(String, &Tensor, TensorRole)) {
        for (i, c) in self.convs.iter().enumerate() {
            c.visit_tensors(&super::join(prefix, &Self::name(i)), f);
        }
    }
    fn visit_modules(&self, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
        for (i, c) in self.convs.iter().enumerate() {
            let name = super::join(prefix, &Self::name(i));
            f(&name, c);
        }
    }
    fn infer(
        &self,
        path: &str,
        input: &[usize],
        rows: &mut Vec<super::SummaryRow>,
    ) -> Result<Shape> {
        let mut channels = 0;
        let mut n = 0;
        for (i, c) in self.convs.iter().enumerate() {
            let s = c.infer(&super::join(path, &Self::name(i)), input, rows)?;
            n = s.dims()[0];
            channels += s.dims()[1];
        }
        let out = Shape::from(&[n, channels][..]);
        rows.push(super::SummaryRow {
            name: path.to_string(),
            kind: self.kind(),
            output_shape: out.clone(),
            params: 0,
        });
        Ok(out)
    }
}
