//! Which kernel each float32 convolution of a training step takes, chosen by rule or by
//! measurement on this machine.
//!
//! A convolution pass (forward, input gradient, weight gradient) can often be computed by
//! several kernels: the direct 3x3 kernel, im2col (or col2im) + GEMM, and Winograd's
//! F(2x2, 3x3). Which is fastest depends on the shape and on the machine: a full-width
//! AVX-512 core runs the direct kernel near its multiply-add peak, a half-rate one has half
//! that peak for the same memory traffic, so arithmetic-saving kernels pay off on smaller
//! layers there. The choices:
//!
//! - [`KernelChoice::Direct`]: the direct kernel where it applies, GEMM elsewhere. What a
//!   tensor's `conv2d` does outside [`with_kernels`]: sums that are PyTorch's up to the
//!   order of the additions.
//! - [`KernelChoice::Rules`]: the shape rules measured on full-width AVX-512 (Winograd for
//!   3x3 stride-1 layers from 16 input channels). The training loop's default.
//! - [`KernelChoice::Measured`]: the first time a pass of a shape runs (at a given thread
//!   count), each candidate kernel is timed on the pass's own operands, three times,
//!   alternating, the best time of each kept; the fastest is used from then on in this
//!   process. The rule's kernel is kept unless another is at least [`MARGIN`] faster, so
//!   that near-ties do not flip from one run to the next. The choices and their timings are
//!   listed by [`measurements`] (`convnet bench --kernels measured` and `convnet bench
//!   --machine` print them).
//!
//! Every candidate computes the same convolution to float32 rounding (each is tested
//! against the naive reference), but their roundings differ: a process that measures may
//! choose differently from the next one on a busy machine, so runs that must repeat bit for
//! bit across processes use `Rules` or `Direct`.
//!
//! ```
//! use convnet::backend::cpu::tuning::{self, KernelChoice};
//! use convnet::{Conv2dParams, Rng, Tensor};
//! let mut rng = Rng::new(0);
//! let x = Tensor::randn([2, 16, 8, 8], &mut rng);
//! let w = Tensor::randn([16, 16, 3, 3], &mut rng);
//! let p = Conv2dParams { padding: (1, 1), ..Default::default() };
//! let direct = x.conv2d(&w, None, p)?;
//! let measured = tuning::with_kernels(KernelChoice::Measured, || x.conv2d(&w, None, p))?;
//! for (a, b) in direct.to_vec().iter().zip(measured.to_vec()) {
//!     assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()));
//! }
//! assert_eq!(tuning::kernels(), KernelChoice::Direct);
//! # Ok::<(), convnet::Error>(())
//! ```

use super::conv::ConvGeom;
use std::cell::Cell;
use std::sync::Mutex;
use std::time::Instant;

/// How the float32 convolutions started in [`with_kernels`] choose their kernels (see the
/// module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelChoice {
    /// The direct kernel where it applies, im2col + GEMM elsewhere.
    Direct,
    /// The measured shape rules: also Winograd's F(2x2, 3x3) for 3x3 stride-1 convolutions
    /// with 16 or more input channels, in all three passes.
    Rules,
    /// Each shape's candidates timed the first time it runs; the fastest kept.
    Measured,
}

impl KernelChoice {
    /// Its name on the command line (`direct`, `rules`, `measured`).
    pub fn name(self) -> &'static str {
        match self {
            KernelChoice::Direct => "direct",
            KernelChoice::Rules => "rules",
            KernelChoice::Measured => "measured",
        }
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel that computes a convolution pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvKernel {
    /// The direct kernels of `conv_direct` (the stride-1 input gradient through the
    /// flipped kernel).
    Direct,
    /// im2col + GEMM (the stride-1 input gradient through the flipped kernel).
    Gemm,
    /// The input gradient as `W^T dY` products and col2im (any geometry).
    Col2im,
    /// Winograd's F(2x2, 3x3) through channels-last copies of the images (the input
    /// gradient through the flipped kernel).
    Winograd,
    /// Winograd's F(2x2, 3x3) on the NCHW planes, 16 tiles per vector (rows a multiple of
    /// 32 wide).
    WinogradLanes,
}

impl ConvKernel {
    /// A short name (`direct`, `GEMM`, `col2im`, `Winograd`, `Winograd-lanes`).
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Direct => "direct",
            ConvKernel::Gemm => "GEMM",
            ConvKernel::Col2im => "col2im",
            ConvKernel::Winograd => "Winograd",
            ConvKernel::WinogradLanes => "Winograd-lanes",
        }
    }

    /// Every kernel, in the order tables list them.
    pub const ALL: [ConvKernel; 5] = [
        ConvKernel::Direct,
        ConvKernel::Gemm,
        ConvKernel::Col2im,
        ConvKernel::Winograd,
        ConvKernel::WinogradLanes,
    ];
}

/// The three passes of a convolution in training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvPass {
    /// `y = conv2d(x, w) + b`.
    Forward,
    /// `dx` from `dy` and `w`.
    InputGrad,
    /// `dw` from `x` and `dy`.
    WeightGrad,
}

impl ConvPass {
    /// A short name (`forward`, `input grad`, `weight grad`).
    pub fn name(self) -> &'static str {
        match self {
            ConvPass::Forward => "forward",
            ConvPass::InputGrad => "input grad",
            ConvPass::WeightGrad => "weight grad",
        }
    }
}

/// One measured choice: a pass of a convolution shape at a thread count, the best time of
/// each candidate, the rule's kernel and the kernel chosen.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// The pass.
    pub pass: ConvPass,
    /// The convolution (the forward pass's geometry, also for its gradients).
    pub geom: ConvGeom,
    /// Threads of the pool it ran on.
    pub threads: usize,
    /// The kernel [`KernelChoice::Rules`] takes.
    pub rule: ConvKernel,
    /// Each candidate and its best time in seconds, in the order timed.
    pub seconds: Vec<(ConvKernel, f64)>,
    /// The kernel used from then on.
    pub chosen: ConvKernel,
}

/// How much faster than the rule's kernel another must be to be chosen (5%).
pub const MARGIN: f64 = 0.05;

/// Timing rounds per candidate (the best kept: a busy machine slows a run, never speeds it).
const ROUNDS: usize = 3;

thread_local! {
    /// The choice of the convolutions started on this thread ([`with_kernels`]).
    static CHOICE: Cell<KernelChoice> = const { Cell::new(KernelChoice::Direct) };
}

/// Every choice measured in this process, in the order measured.
static MEASURED: Mutex<Vec<Measurement>> = Mutex::new(Vec::new());

/// How the float32 convolutions started on this thread now choose their kernels
/// ([`KernelChoice::Direct`] outside [`with_kernels`]).
pub fn kernels() -> KernelChoice {
    CHOICE.with(Cell::get)
}

/// Runs `f` with the float32 convolutions it starts on this thread choosing their kernels
/// by `choice`, in the forward pass and in the backward pass (each op keeps the choice),
/// then restores the previous setting. The training loop and `convnet bench` run their
/// forward passes inside it; everything else (a tensor's `conv2d`, evaluation, captures and
/// explanations) takes the direct kernel.
///
/// ```
/// use convnet::backend::cpu::tuning::{self, KernelChoice};
/// assert_eq!(tuning::kernels(), KernelChoice::Direct);
/// assert_eq!(tuning::with_kernels(KernelChoice::Rules, tuning::kernels), KernelChoice::Rules);
/// assert_eq!(tuning::kernels(), KernelChoice::Direct);
/// ```
pub fn with_kernels<R>(choice: KernelChoice, f: impl FnOnce() -> R) -> R {
    crate::scoped::with(&CHOICE, choice, f)
}

/// The choices measured so far in this process (see [`KernelChoice::Measured`]).
pub fn measurements() -> Vec<Measurement> {
    MEASURED.lock().map(|m| m.clone()).unwrap_or_default()
}

/// The kernel for `pass` of `geom` under `choice`: `direct` (the direct kernel where it
/// applies, GEMM elsewhere) for [`KernelChoice::Direct`], `rule` for [`KernelChoice::Rules`],
/// the measured one for [`KernelChoice::Measured`]. The first time a pass of a shape is
/// measured, `run(kernel)` runs each kernel of `offered` that applies (`(kernel, applies)`;
/// `direct` and `rule` among them) [`ROUNDS`] times,
/// alternating; `run` must overwrite the pass's output, which the caller then computes with
/// the kernel returned.
pub(super) fn choose<const N: usize>(
    choice: KernelChoice,
    pass: ConvPass,
    geom: &ConvGeom,
    (direct, rule): (ConvKernel, ConvKernel),
    offered: [(ConvKernel, bool); N],
    mut run: impl FnMut(ConvKernel),
) -> ConvKernel {
    match choice {
        KernelChoice::Direct => return direct,
        KernelChoice::Rules => return rule,
        KernelChoice::Measured => {}
    }
    let candidates: Vec<ConvKernel> = offered
        .into_iter()
        .filter_map(|(kernel, applies)| applies.then_some(kernel))
        .collect();
    debug_assert!(candidates.contains(&rule) && candidates.contains(&direct));
    if candidates.len() < 2 {
        return rule;
    }
    let threads = rayon::current_num_threads();
    let known = |m: &[Measurement]| {
        m.iter()
            .find(|m| m.pass == pass && m.geom == *geom && m.threads == threads)
            .map(|m| m.chosen)
    };
    if let Some(chosen) = MEASURED.lock().ok().and_then(|m| known(&m)) {
        return chosen;
    }
    // Timed without the lock held: a kernel may itself run convolutions on other threads.
    let mut best = vec![f64::INFINITY; candidates.len()];
    for _ in 0..ROUNDS {
        for (b, &kernel) in best.iter_mut().zip(&candidates) {
            let t0 = Instant::now();
            run(kernel);
            *b = b.min(t0.elapsed().as_secs_f64());
        }
    }
    let seconds: Vec<(ConvKernel, f64)> = candidates.iter().copied().zip(best).collect();
    let chosen = pick(rule, &seconds);
    let Ok(mut measured) = MEASURED.lock() else {
        return chosen;
    };
    // Another thread may have measured the same pass meanwhile: its choice stands.
    if let Some(earlier) = known(&measured) {
        return earlier;
    }
    measured.push(Measurement {
        pass,
        geom: *geom,
        threads,
        rule,
        seconds,
        chosen,
    });
    chosen
}

/// The fastest of `seconds`, unless the rule's kernel is within [`MARGIN`] of it.
fn pick(rule: ConvKernel, seconds: &[(ConvKernel, f64)]) -> ConvKernel {
    let time_of = |k: ConvKernel| {
        seconds
            .iter()
            .find(|(c, _)| *c == k)
            .map_or(f64::INFINITY, |&(_, s)| s)
    };
    let fastest = seconds
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(rule, |&(k, _)| k);
    if time_of(fastest) * (1.0 + MARGIN) < time_of(rule) {
        fastest
    } else {
        rule
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_holds_unless_another_kernel_is_clearly_faster() {
        use ConvKernel::*;
        assert_eq!(pick(Direct, &[(Direct, 1.0), (Winograd, 0.97)]), Direct);
        assert_eq!(pick(Direct, &[(Direct, 1.0), (Winograd, 0.9)]), Winograd);
        assert_eq!(
            pick(Winograd, &[(Direct, 0.5), (Gemm, 0.6), (Winograd, 1.0)]),
            Direct
        );
        assert_eq!(pick(Gemm, &[(Direct, 1.0), (Gemm, 1.2)]), Direct);
    }
}
