//! Where a classifier looked: Grad-CAM, Grad-CAM++, saliency, integrated gradients and
//! occlusion for one image, built on the layer capture of [`crate::graph::capture`]; and
//! the pictures of them ([`picture`]: colour maps, overlays, `.npy` files).
//!
//! The score explained is the target class's **logit** (before softmax), as in the
//! Grad-CAM paper, pytorch-grad-cam and Captum; the target is the top-1 class unless
//! given. Definitions (`A`: the captured layer's output `[K, h, w]`, `g = d logit / d A`,
//! `x`: the normalised input):
//!
//! - Grad-CAM: `w_k = mean_ij g_kij`, map `= ReLU(sum_k w_k A_k)` at the layer's resolution.
//! - Grad-CAM++ (closed form for piecewise-linear nets, as pytorch-grad-cam computes it):
//!   `alpha = g^2 / (2 g^2 + (sum_ij A_kij) g^3 + 1e-6)` (0 where `g = 0`),
//!   `w_k = sum_ij alpha ReLU(g)`, map `= ReLU(sum_k w_k A_k)`.
//! - Saliency: `max_c |d logit / d x_c|` per pixel (Captum's `Saliency` on the normalised
//!   tensor, reduced over channels).
//! - Integrated gradients: zero baseline in normalised space, Gauss-Legendre points and
//!   weights on [0, 1] (Captum's default method), attributions
//!   `(x - 0) * sum_i w_i d logit(a_i x) / d x`, summed over channels for the map; the
//!   completeness gap `|sum(attributions) - (f(x) - f(0))| / |f(x) - f(0)|` is reported.
//! - Occlusion: a window of zeros (the data set's mean colour after normalisation: grey)
//!   slid over the image; each pixel gets the mean drop of the target's probability over the
//!   windows that cover it (a last window flush with the edge covers every pixel).

pub mod picture;

use crate::error::{invalid, Result};
use crate::graph::capture::{layer_names, LayerCapture};
use crate::graph::{Graph, Op};
use crate::infer::gradient::InputGradient;
use crate::infer::{Compiled, Predictor};
use crate::nn::Model;
use crate::tensor::Tensor;

/// An attribution method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    /// Grad-CAM (Selvaraju et al. 2017).
    GradCam,
    /// Grad-CAM++ (Chattopadhyay et al. 2018).
    GradCamPlusPlus,
    /// Input-gradient saliency (Simonyan et al. 2014).
    Saliency,
    /// Integrated gradients (Sundararajan et al. 2017) with `steps` points.
    IntegratedGradients {
        /// Points on the path from the baseline to the image.
        steps: usize,
    },
    /// Occlusion (Zeiler and Fergus 2014) with a square window.
    Occlusion {
        /// Window side in pixels.
        window: usize,
        /// Step between windows in pixels.
        stride: usize,
    },
}

impl Method {
    /// The method's name on the command line (`gradcam`, `gradcam++`, `saliency`,
    /// `integrated-gradients`, `occlusion`).
    pub fn name(&self) -> &'static str {
        match self {
            Method::GradCam => "gradcam",
            Method::GradCamPlusPlus => "gradcam++",
            Method::Saliency => "saliency",
            Method::IntegratedGradients { .. } => "integrated-gradients",
            Method::Occlusion { .. } => "occlusion",
        }
    }

    /// Whether the method reads a layer (the CAM methods) rather than the input.
    pub fn uses_layer(&self) -> bool {
        matches!(self, Method::GradCam | Method::GradCamPlusPlus)
    }
}

/// One image's explanation.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The method.
    pub method: Method,
    /// The layer read (CAM methods), else `None`.
    pub layer: Option<String>,
    /// The class explained.
    pub target: usize,
    /// Its logit.
    pub logit: f32,
    /// Its probability (softmax of the logits).
    pub probability: f32,
    /// The raw map, row-major `[height, width]`: at the layer's resolution for the CAM
    /// methods, at the input's for the others; not normalised.
    pub map: Vec<f32>,
    /// Map height.
    pub height: usize,
    /// Map width.
    pub width: usize,
    /// Integrated gradients' completeness gap (relative), else `None`.
    pub completeness_gap: Option<f32>,
}

/// The layer Grad-CAM reads when none is named: the last stage of a ResNet (`layer4`, or
/// `layer3` for the CIFAR ResNets), the last activation of a `features` stack (VGG,
/// MobileNetV2), else the last convolution (`conv2` of seed-cnn and LeNet-5).
pub fn default_layer(graph: &Graph) -> Option<String> {
    let names = layer_names(graph);
    let stages: Vec<&String> = names
        .iter()
        .filter(|n| {
            n.strip_prefix("layer")
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
        })
        .collect();
    if let Some(last) = stages.last() {
        return Some(last.to_string());
    }
    let spatial = |i: usize| graph.nodes()[i].shape.rank() == 4;
    let nodes = graph.nodes();
    if let Some(i) = (0..nodes.len()).rev().find(|&i| {
        nodes[i].name.starts_with("features.")
            && matches!(nodes[i].op, Op::Activation(_))
            && spatial(i)
    }) {
        // The top-level block holding it (`features.18` for `features.18.2`).
        let parts: Vec<&str> = nodes[i].name.split('.').collect();
        return Some(parts[..2].join("."));
    }
    (0..nodes.len())
        .rev()
        .find(|&i| matches!(nodes[i].op, Op::Conv2d { .. }) && spatial(i))
        .map(|i| nodes[i].name.clone())
}

/// Explains images with one method on one model.
///
/// ```
/// use convnet::explain::{Explainer, Method};
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let explainer = Explainer::new(&model, Method::GradCam, None)?;
/// assert_eq!(explainer.layer(), Some("conv2"));
/// let x = convnet::Tensor::randn([1, 3, 32, 32], &mut convnet::Rng::new(0));
/// let e = explainer.explain(&x, Some(4))?;
/// assert_eq!((e.target, e.height, e.width), (4, 16, 16));
/// assert!(e.map.iter().all(|&v| v >= 0.0));
/// # Ok::<(), convnet::Error>(())
/// ```
pub struct Explainer<'a> {
    model: &'a Model,
    method: Method,
    capture: Option<LayerCapture>,
    plan: Option<Compiled<'a>>,
    /// Input gradients on the compiled plan, for saliency and integrated gradients on the
    /// CPU when the plan covers the model (the capture's recorded path otherwise).
    gradient: Option<InputGradient>,
}

/// Integrated-gradient points run per batch (bounds the memory of the recorded passes).
const PATH_BATCH: usize = 16;

impl<'a> Explainer<'a> {
    /// Prepares `method` on `model`; `layer` is the layer the CAM methods read (default:
    /// [`default_layer`]) and must be `None` for the other methods.
    pub fn new(model: &'a Model, method: Method, layer: Option<&str>) -> Result<Explainer<'a>> {
        let graph = model.graph()?;
        let capture = match (method.uses_layer(), layer) {
            (true, name) => {
                let name = match name {
                    Some(n) => n.to_string(),
                    None => default_layer(&graph).ok_or_else(|| {
                        invalid(
                            "explain",
                            "the model has no convolution for Grad-CAM to read",
                        )
                    })?,
                };
                let c = LayerCapture::of_graph(&graph, &name)?;
                if c.shape().len() != 4 {
                    return Err(invalid(
                        "explain",
                        format!(
                            "{} reads a layer with a spatial output [N, C, H, W]; {name} gives {:?}",
                            method.name(),
                            c.shape()
                        ),
                    ));
                }
                Some(c)
            }
            (false, Some(name)) => {
                return Err(invalid(
                    "explain",
                    format!(
                        "{} attributes to the input pixels and reads no layer (got --layer {name})",
                        method.name()
                    ),
                ))
            }
            (false, None) => match method {
                Method::Occlusion { .. } => None,
                _ => Some(LayerCapture::of_graph(&graph, "input")?),
            },
        };
        match method {
            Method::IntegratedGradients { steps: 0 } => {
                return Err(invalid(
                    "explain",
                    "integrated gradients need at least 1 step",
                ))
            }
            Method::Occlusion { window, stride } => {
                let [_, h, w] = [0, 1, 2].map(|i| model.input_shape().get(i).copied().unwrap_or(0));
                if window == 0 || stride == 0 || window > h.min(w) {
                    return Err(invalid(
                        "explain",
                        format!(
                            "occlusion needs a window of 1 to {} pixels and a positive stride (got window {window}, stride {stride})",
                            h.min(w)
                        ),
                    ));
                }
            }
            _ => {}
        }
        let plan = matches!(method, Method::Occlusion { .. }).then(|| Compiled::new(model));
        let gradient = match method {
            Method::Saliency | Method::IntegratedGradients { .. } => InputGradient::new(model).ok(),
            _ => None,
        };
        Ok(Explainer {
            model,
            method,
            capture,
            plan,
            gradient,
        })
    }

    /// The layer read, for the CAM methods.
    pub fn layer(&self) -> Option<&str> {
        self.capture
            .as_ref()
            .map(|c| c.name())
            .filter(|_| self.method.uses_layer())
    }

    /// Explains one image `x` (`[1, C, H, W]`, normalised as for the model) for class
    /// `target` (default: the top-1 class).
    pub fn explain(&self, x: &Tensor, target: Option<usize>) -> Result<Explanation> {
        let want = self.model.input_shape();
        if x.rank() != 4 || x.dims()[0] != 1 || x.dims()[1..] != want[..] {
            return Err(invalid(
                "explain",
                format!(
                    "one image [1, {}] at a time, got {}",
                    want.iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    x.shape()
                ),
            ));
        }
        match self.method {
            Method::GradCam | Method::GradCamPlusPlus => self.cam(x, target),
            Method::Saliency => self.saliency(x, target),
            Method::IntegratedGradients { steps } => self.integrated_gradients(x, target, steps),
            Method::Occlusion { window, stride } => self.occlusion(x, target, window, stride),
        }
    }

    fn capture(&self) -> &LayerCapture {
        self.capture.as_ref().expect("methods with a capture")
    }

    /// The target (given or top-1), its logit and its probability from one row of logits.
    fn choose(&self, logits: &[f32], target: Option<usize>) -> Result<(usize, f32, f32)> {
        let classes = logits.len();
        let t = match target {
            Some(t) if t >= classes => {
                return Err(invalid(
                    "explain",
                    format!(
                    "target class {t} is out of range: the model has {classes} classes (0 to {})",
                    classes.saturating_sub(1)
                ),
                ))
            }
            Some(t) => t,
            None => argmax(logits),
        };
        Ok((t, logits[t], softmax(logits)[t]))
    }

    fn cam(&self, x: &Tensor, target: Option<usize>) -> Result<Explanation> {
        let run = self.capture().forward(x)?;
        let (t, logit, probability) = self.choose(&run.output.to_vec(), target)?;
        let g = run.gradient(&[t])?.to_vec();
        let a = run.activation.to_vec();
        let d = run.activation.dims();
        let (k, h, w) = (d[1], d[2], d[3]);
        let hw = h * w;
        let mut weights = vec![0f64; k];
        for (c, wt) in weights.iter_mut().enumerate() {
            let gc = &g[c * hw..(c + 1) * hw];
            *wt = if self.method == Method::GradCam {
                gc.iter().map(|&v| v as f64).sum::<f64>() / hw as f64
            } else {
                let sum_a: f64 = a[c * hw..(c + 1) * hw].iter().map(|&v| v as f64).sum();
                gc.iter()
                    .map(|&gv| {
                        let gv = gv as f64;
                        if gv == 0.0 {
                            return 0.0;
                        }
                        let g2 = gv * gv;
                        let alpha = g2 / (2.0 * g2 + sum_a * g2 * gv + 1e-6);
                        alpha * gv.max(0.0)
                    })
                    .sum()
            };
        }
        let mut map = vec![0f32; hw];
        for (p, m) in map.iter_mut().enumerate() {
            let s: f64 = (0..k).map(|c| weights[c] * a[c * hw + p] as f64).sum();
            *m = s.max(0.0) as f32;
        }
        Ok(Explanation {
            method: self.method,
            layer: Some(self.capture().name().to_string()),
            target: t,
            logit,
            probability,
            map,
            height: h,
            width: w,
            completeness_gap: None,
        })
    }

    /// The compiled input gradient, when it covers the model and `x` is on the CPU.
    fn fast_gradient(&self, x: &Tensor) -> Option<&InputGradient> {
        self.gradient
            .as_ref()
            .filter(|_| x.device() == crate::Device::Cpu)
    }

    fn saliency(&self, x: &Tensor, target: Option<usize>) -> Result<Explanation> {
        let (t, logit, probability, g) = match self.fast_gradient(x) {
            Some(fast) => {
                let (t, logit, probability) = self.choose(&fast.forward(x)?.to_vec(), target)?;
                (t, logit, probability, fast.run(x, &[t])?.1.to_vec())
            }
            None => {
                let run = self.capture().forward(x)?;
                let (t, logit, probability) = self.choose(&run.output.to_vec(), target)?;
                (t, logit, probability, run.gradient(&[t])?.to_vec())
            }
        };
        let d = x.dims();
        let (c, h, w) = (d[1], d[2], d[3]);
        let map = (0..h * w)
            .map(|p| {
                (0..c)
                    .map(|ch| g[ch * h * w + p].abs())
                    .fold(0f32, f32::max)
            })
            .collect();
        Ok(self.input_map(t, logit, probability, map, h, w, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn input_map(
        &self,
        target: usize,
        logit: f32,
        probability: f32,
        map: Vec<f32>,
        height: usize,
        width: usize,
        completeness_gap: Option<f32>,
    ) -> Explanation {
        Explanation {
            method: self.method,
            layer: None,
            target,
            logit,
            probability,
            map,
            height,
            width,
            completeness_gap,
        }
    }

    fn integrated_gradients(
        &self,
        x: &Tensor,
        target: Option<usize>,
        steps: usize,
    ) -> Result<Explanation> {
        let xs = x.to_vec();
        let n = xs.len();
        // f(x) and f(0) in one no-grad batch.
        let mut both = xs.clone();
        both.resize(2 * n, 0.0);
        let mut dims = x.dims().to_vec();
        dims[0] = 2;
        let both = Tensor::from_vec(both, dims.clone())?;
        let fast = self.fast_gradient(x);
        let out = match fast {
            Some(fast) => fast.forward(&both)?,
            None => crate::no_grad(|| self.model.forward(&both, crate::nn::Mode::Eval))?,
        }
        .to_vec();
        let classes = out.len() / 2;
        let (t, logit, probability) = self.choose(&out[..classes], target)?;
        let (fx, f0) = (out[t], out[classes + t]);
        let (alphas, weights) = gauss_legendre_unit(steps);
        let mut total = vec![0f64; n];
        // The compiled path keeps one image per thread in memory, so all points go at once.
        let per_batch = if fast.is_some() { steps } else { PATH_BATCH };
        for (chunk_a, chunk_w) in alphas.chunks(per_batch).zip(weights.chunks(per_batch)) {
            let m = chunk_a.len();
            let mut batch = Vec::with_capacity(m * n);
            for &a in chunk_a {
                batch.extend(xs.iter().map(|&v| (a * v as f64) as f32));
            }
            dims[0] = m;
            let batch = Tensor::from_vec(batch, dims.clone())?;
            let g = match fast {
                Some(fast) => fast.run(&batch, &vec![t; m])?.1.to_vec(),
                None => {
                    let run = self.capture().forward(&batch)?;
                    run.gradient(&vec![t; m])?.to_vec()
                }
            };
            for (i, &wt) in chunk_w.iter().enumerate() {
                for (acc, &gv) in total.iter_mut().zip(&g[i * n..(i + 1) * n]) {
                    *acc += wt * gv as f64;
                }
            }
        }
        let attributions: Vec<f64> = total.iter().zip(&xs).map(|(g, &v)| g * v as f64).collect();
        let sum: f64 = attributions.iter().sum();
        let delta = (fx - f0) as f64;
        let gap = ((sum - delta).abs() / delta.abs().max(f64::MIN_POSITIVE)) as f32;
        let d = x.dims();
        let (c, h, w) = (d[1], d[2], d[3]);
        let map = (0..h * w)
            .map(|p| (0..c).map(|ch| attributions[ch * h * w + p]).sum::<f64>() as f32)
            .collect();
        Ok(self.input_map(t, logit, probability, map, h, w, Some(gap)))
    }

    fn occlusion(
        &self,
        x: &Tensor,
        target: Option<usize>,
        window: usize,
        stride: usize,
    ) -> Result<Explanation> {
        let plan = self.plan.as_ref().expect("occlusion compiles the model");
        let xs = x.to_vec();
        let d = x.dims().to_vec();
        let (c, h, w) = (d[1], d[2], d[3]);
        let logits = plan.predict(x)?.to_vec();
        let (t, logit, probability) = self.choose(&logits, target)?;
        let ys = window_starts(h, window, stride);
        let xs_ = window_starts(w, window, stride);
        let windows: Vec<(usize, usize)> = ys
            .iter()
            .flat_map(|&y| xs_.iter().map(move |&x0| (y, x0)))
            .collect();
        let mut drop_sum = vec![0f64; h * w];
        let mut count = vec![0u32; h * w];
        let per = c * h * w;
        for chunk in windows.chunks(64) {
            let mut batch = Vec::with_capacity(chunk.len() * per);
            for &(y0, x0) in chunk {
                let start = batch.len();
                batch.extend_from_slice(&xs);
                let img = &mut batch[start..];
                for ch in 0..c {
                    for y in y0..y0 + window {
                        let row = ch * h * w + y * w;
                        img[row + x0..row + x0 + window].fill(0.0);
                    }
                }
            }
            let out = plan
                .predict(&Tensor::from_vec(batch, [chunk.len(), c, h, w])?)?
                .to_vec();
            let classes = out.len() / chunk.len();
            for (i, &(y0, x0)) in chunk.iter().enumerate() {
                let p = softmax(&out[i * classes..(i + 1) * classes])[t];
                let drop = (probability - p) as f64;
                for y in y0..y0 + window {
                    for xx in x0..x0 + window {
                        drop_sum[y * w + xx] += drop;
                        count[y * w + xx] += 1;
                    }
                }
            }
        }
        let map = drop_sum
            .iter()
            .zip(&count)
            .map(|(&s, &n)| (s / n.max(1) as f64) as f32)
            .collect();
        Ok(self.input_map(t, logit, probability, map, h, w, None))
    }
}

/// A layer's feature maps for one image `x` (`[1, C, H, W]`): the values `[C, h, w]` and
/// that shape (a layer with a flat output `[1, F]` gives `F` maps of 1x1).
///
/// ```
/// let model = convnet::models::build("seed-cnn", [3, 32, 32], 10)?;
/// let x = convnet::Tensor::randn([1, 3, 32, 32], &mut convnet::Rng::new(0));
/// let (maps, shape) = convnet::explain::feature_maps(&model, &x, "pool1")?;
/// assert_eq!((shape, maps.len()), ([32, 16, 16], 32 * 16 * 16));
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn feature_maps(model: &Model, x: &Tensor, layer: &str) -> Result<(Vec<f32>, [usize; 3])> {
    let graph = model.graph()?;
    let target = crate::graph::capture::resolve(&graph, layer)?.0;
    if x.rank() != 4 || x.dims()[0] != 1 {
        return Err(invalid(
            "explain",
            format!("one image [1, C, H, W] at a time, got {}", x.shape()),
        ));
    }
    let mut found = None;
    let mut index = 0;
    crate::no_grad(|| {
        crate::graph::eval::run(&graph, x, &mut |_, y| {
            if index == target {
                found = Some(y.clone());
            }
            index += 1;
            Ok(crate::graph::eval::Visit::Keep)
        })
    })?;
    let y = found.ok_or_else(|| invalid("explain", "the layer never ran"))?;
    let d = y.dims().to_vec();
    let shape = match d.len() {
        4 => [d[1], d[2], d[3]],
        2 => [d[1], 1, 1],
        _ => {
            return Err(invalid(
                "explain",
                format!("{layer} gives {}, not feature maps", y.shape()),
            ))
        }
    };
    Ok((y.to_vec(), shape))
}

/// Window starts along a side of `len` pixels: every `stride`, plus one flush with the far
/// edge when the stride does not land there.
pub fn window_starts(len: usize, window: usize, stride: usize) -> Vec<usize> {
    let mut starts: Vec<usize> = (0..=len - window).step_by(stride).collect();
    if starts.last() != Some(&(len - window)) {
        starts.push(len - window);
    }
    starts
}

/// Gauss-Legendre points and weights for `n` points, mapped from [-1, 1] to [0, 1]
/// (points ascending), as `numpy.polynomial.legendre.leggauss` gives them before Captum's
/// mapping `a = (1 + x) / 2`, `w / 2`.
///
/// ```
/// let (a, w) = convnet::explain::gauss_legendre_unit(3);
/// // Exact for polynomials up to degree 5: the integral of t^4 over [0, 1] is 1/5.
/// let integral: f64 = a.iter().zip(&w).map(|(t, w)| w * t.powi(4)).sum();
/// assert!((integral - 0.2).abs() < 1e-14);
/// ```
pub fn gauss_legendre_unit(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut points = vec![0f64; n];
    let mut weights = vec![0f64; n];
    for i in 0..n {
        // Newton's method from the Chebyshev-like guess of the i-th root (descending).
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        for _ in 0..100 {
            let (p, dp) = legendre(n, x);
            let dx = p / dp;
            x -= dx;
            if dx.abs() < 1e-16 {
                break;
            }
        }
        // The derivative at the converged root gives the weight.
        let (_, dp) = legendre(n, x);
        points[n - 1 - i] = 0.5 * (1.0 + x);
        weights[n - 1 - i] = 0.5 * 2.0 / ((1.0 - x * x) * dp * dp);
    }
    (points, weights)
}

/// The Legendre polynomial `P_n(x)` and its derivative (for `|x| < 1`), by the three-term
/// recurrence.
fn legendre(n: usize, x: f64) -> (f64, f64) {
    let (mut p0, mut p1) = (1.0, x);
    for k in 2..=n {
        let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
        p0 = p1;
        p1 = p2;
    }
    (p1, n as f64 * (x * p1 - p0) / (x * x - 1.0))
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn softmax(v: &[f32]) -> Vec<f32> {
    let mut p = vec![0f32; v.len()];
    crate::backend::cpu::loss::softmax_forward(v, 1, v.len(), 1, false, &mut p);
    p
}
