//! Observers: running statistics of a tensor that choose its quantization parameters, with
//! the arithmetic of `torch.ao.quantization.observer` (float32 operations in PyTorch's
//! order, so scales and zero points agree to the last bit).
//!
//! - [`MinMax`]: the running minimum and maximum (`MinMaxObserver`); per channel with
//!   [`PerChannelMinMax`] (`PerChannelMinMaxObserver`).
//! - [`MovingAverage`]: minimum and maximum averaged over batches with a constant
//!   (`MovingAverageMinMaxObserver`, QAT's activation observer), per channel with
//!   [`MovingAveragePerChannel`].
//! - [`Histogram`]: a 2048-bin histogram whose range grows as batches arrive, and the range
//!   that minimises the L2 quantization error (`HistogramObserver`).
//! - [`Histogram::percentile_range`]: the range holding all but a fraction of the values.

/// An affine quantization `x ≈ (q - zero_point) * scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    /// Step between neighbouring quantized values.
    pub scale: f32,
    /// The quantized value of 0.0.
    pub zero_point: i32,
}

/// The integer range of quantized values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QRange {
    /// Smallest value.
    pub min: i32,
    /// Largest value.
    pub max: i32,
}

impl QRange {
    /// `quint8`: 0..=255, activations.
    pub const U8: QRange = QRange { min: 0, max: 255 };
    /// `qint8`: -128..=127, weights.
    pub const I8: QRange = QRange {
        min: -128,
        max: 127,
    };
}

/// How a range maps to integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Any `[min, max]` containing 0 maps onto the whole range (activations).
    Affine,
    /// `[-m, m]` with zero point at the middle of the range (weights).
    Symmetric,
}

/// float32's machine epsilon, PyTorch's smallest scale.
pub const EPS: f32 = f32::EPSILON;

/// PyTorch's `_calculate_qparams` for a minimum and maximum: the range is widened to
/// contain 0; a never-observed range (`min = +inf`, `max = -inf`) gives scale 1, zero
/// point 0.
///
/// ```
/// use convnet::quant::observer::{calculate_qparams, QRange, Scheme};
/// let q = calculate_qparams(-1.0, 3.0, QRange::U8, Scheme::Affine);
/// assert_eq!((q.scale, q.zero_point), (4.0 / 255.0, 64));
/// let w = calculate_qparams(-0.5, 0.25, QRange::I8, Scheme::Symmetric);
/// assert_eq!((w.scale, w.zero_point), (0.5 / 127.5, 0));
/// ```
pub fn calculate_qparams(min: f32, max: f32, range: QRange, scheme: Scheme) -> QParams {
    if min == f32::INFINITY && max == f32::NEG_INFINITY {
        return QParams {
            scale: 1.0,
            zero_point: 0,
        };
    }
    let min_neg = min.min(0.0);
    let max_pos = max.max(0.0);
    let span = (range.max - range.min) as f32;
    match scheme {
        Scheme::Symmetric => {
            let m = (-min_neg).max(max_pos);
            let scale = (m / (span / 2.0)).max(EPS);
            let zero_point = if range == QRange::U8 {
                128
            } else if range.min >= 0 {
                (range.min + range.max) / 2
            } else {
                0
            };
            QParams { scale, zero_point }
        }
        Scheme::Affine => {
            let scale = ((max_pos - min_neg) / span).max(EPS);
            let zero_point = (range.min as i64 - (min_neg / scale).round_ties_even() as i64)
                .clamp(range.min as i64, range.max as i64) as i32;
            QParams { scale, zero_point }
        }
    }
}

/// The minimum and maximum of `x`, NaN ignored; `(+inf, -inf)` for no values.
fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// The running minimum and maximum of everything observed (`MinMaxObserver`).
#[derive(Clone, Debug, PartialEq)]
pub struct MinMax {
    /// Smallest value seen (`+inf` before any).
    pub min: f32,
    /// Largest value seen (`-inf` before any).
    pub max: f32,
}

impl Default for MinMax {
    fn default() -> Self {
        MinMax {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }
}

impl MinMax {
    /// Takes in a batch.
    pub fn observe(&mut self, x: &[f32]) {
        let (lo, hi) = min_max(x);
        self.min = self.min.min(lo);
        self.max = self.max.max(hi);
    }

    /// The parameters for the range seen.
    pub fn qparams(&self, range: QRange, scheme: Scheme) -> QParams {
        calculate_qparams(self.min, self.max, range, scheme)
    }
}

/// Minimum and maximum as moving averages: the first batch's, then
/// `v + c * (batch - v)` (`MovingAverageMinMaxObserver`, constant 0.01 by default).
#[derive(Clone, Debug, PartialEq)]
pub struct MovingAverage {
    /// Averaged minimum (`+inf` before any batch).
    pub min: f32,
    /// Averaged maximum (`-inf` before any batch).
    pub max: f32,
    /// Weight of a new batch.
    pub averaging_constant: f32,
}

impl MovingAverage {
    /// An observer with the given averaging constant (PyTorch's default is 0.01).
    pub fn new(averaging_constant: f32) -> MovingAverage {
        MovingAverage {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            averaging_constant,
        }
    }

    /// Takes in a batch.
    pub fn observe(&mut self, x: &[f32]) {
        let (lo, hi) = min_max(x);
        if self.min == f32::INFINITY && self.max == f32::NEG_INFINITY {
            (self.min, self.max) = (lo, hi);
        } else {
            let c = self.averaging_constant;
            self.min += c * (lo - self.min);
            self.max += c * (hi - self.max);
        }
    }

    /// The parameters for the averaged range.
    pub fn qparams(&self, range: QRange, scheme: Scheme) -> QParams {
        calculate_qparams(self.min, self.max, range, scheme)
    }
}

/// Per-channel minimum and maximum over `[channels, rest...]` (channel axis 0), running
/// over batches (`PerChannelMinMaxObserver`).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PerChannelMinMax {
    /// Per-channel minima.
    pub min: Vec<f32>,
    /// Per-channel maxima.
    pub max: Vec<f32>,
}

/// Per-channel minima and maxima of `x` laid out `[channels, per]`.
fn channel_min_max(x: &[f32], channels: usize) -> (Vec<f32>, Vec<f32>) {
    let per = x.len() / channels.max(1);
    (0..channels)
        .map(|c| min_max(&x[c * per..(c + 1) * per]))
        .unzip()
}

impl PerChannelMinMax {
    /// Takes in a tensor `[channels, ...]` given as its values.
    pub fn observe(&mut self, x: &[f32], channels: usize) {
        let (lo, hi) = channel_min_max(x, channels);
        if self.min.len() != channels {
            (self.min, self.max) = (lo, hi);
            return;
        }
        for c in 0..channels {
            self.min[c] = self.min[c].min(lo[c]);
            self.max[c] = self.max[c].max(hi[c]);
        }
    }

    /// Per-channel parameters.
    pub fn qparams(&self, range: QRange, scheme: Scheme) -> Vec<QParams> {
        self.min
            .iter()
            .zip(&self.max)
            .map(|(&lo, &hi)| calculate_qparams(lo, hi, range, scheme))
            .collect()
    }
}

/// Per-channel moving averages of minimum and maximum
/// (`MovingAveragePerChannelMinMaxObserver`, QAT's weight observer).
#[derive(Clone, Debug, PartialEq)]
pub struct MovingAveragePerChannel {
    /// Per-channel averaged minima (empty before any batch).
    pub min: Vec<f32>,
    /// Per-channel averaged maxima.
    pub max: Vec<f32>,
    /// Weight of a new batch.
    pub averaging_constant: f32,
}

impl MovingAveragePerChannel {
    /// An observer with the given averaging constant.
    pub fn new(averaging_constant: f32) -> Self {
        MovingAveragePerChannel {
            min: Vec::new(),
            max: Vec::new(),
            averaging_constant,
        }
    }

    /// Takes in a tensor `[channels, ...]` given as its values.
    pub fn observe(&mut self, x: &[f32], channels: usize) {
        let (lo, hi) = channel_min_max(x, channels);
        if self.min.len() != channels {
            (self.min, self.max) = (lo, hi);
            return;
        }
        let c = self.averaging_constant;
        for k in 0..channels {
            self.min[k] += c * (lo[k] - self.min[k]);
            self.max[k] += c * (hi[k] - self.max[k]);
        }
    }

    /// Per-channel parameters.
    pub fn qparams(&self, range: QRange, scheme: Scheme) -> Vec<QParams> {
        self.min
            .iter()
            .zip(&self.max)
            .map(|(&lo, &hi)| calculate_qparams(lo, hi, range, scheme))
            .collect()
    }
}

/// A histogram of everything observed over a range that grows to contain it
/// (`HistogramObserver`): the range that minimises the quantization error, or a
/// percentile range.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Counts per bin (float, as PyTorch keeps them; fractional after the range grows).
    pub histogram: Vec<f32>,
    /// Lower end of the range (`+inf` before any batch).
    pub min: f32,
    /// Upper end of the range (`-inf` before any batch).
    pub max: f32,
}

/// Bins of PyTorch's `HistogramObserver`.
pub const HISTOGRAM_BINS: usize = 2048;
/// Sub-bins per bin when a histogram is moved to a wider range.
const UPSAMPLE: usize = 16;

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(HISTOGRAM_BINS)
    }
}

/// `torch.histc(x, bins, lo, hi)` in float32, added onto `out`.
fn histc_into(x: &[f32], lo: f32, hi: f32, out: &mut [f32]) {
    let bins = out.len();
    let (lo, hi) = if lo == hi {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    };
    for &v in x {
        if !(v >= lo && v <= hi) {
            continue;
        }
        let b = (((v - lo) * bins as f32) / (hi - lo)) as usize;
        out[b.min(bins - 1)] += 1.0;
    }
}

/// `torch.linspace(a, b, n)` in float32 (fused multiply-adds from both ends).
fn linspace(a: f32, b: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, a)
            } else {
                (-step).mul_add((n - 1 - i) as f32, b)
            }
        })
        .collect()
}

/// Python's (and PyTorch's `rounding_mode="floor"`) floor division of floats.
fn div_floor(a: f32, b: f32) -> f32 {
    if b == 0.0 {
        return a / b;
    }
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && (b < 0.0) != (m < 0.0) {
        div -= 1.0;
    }
    if div != 0.0 {
        let mut f = div.floor();
        if div - f > 0.5 {
            f += 1.0;
        }
        f
    } else {
        0f32.copysign(a / b)
    }
}

impl Histogram {
    /// An empty histogram of `bins` bins.
    pub fn new(bins: usize) -> Histogram {
        Histogram {
            histogram: vec![0.0; bins.max(1)],
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
        }
    }

    /// Takes in a batch (infinite values are dropped, as PyTorch does).
    pub fn observe(&mut self, x: &[f32]) {
        let finite: Vec<f32>;
        let mut x = x;
        let (mut lo, mut hi) = min_max(x);
        if lo == f32::NEG_INFINITY || hi == f32::INFINITY {
            finite = x
                .iter()
                .copied()
                .filter(|v| v.abs() != f32::INFINITY)
                .collect();
            x = &finite;
            (lo, hi) = min_max(x);
        }
        if x.is_empty() || lo > hi {
            return;
        }
        let bins = self.histogram.len();
        if self.min == f32::INFINITY || self.max == f32::NEG_INFINITY {
            self.histogram.fill(0.0);
            histc_into(x, lo, hi, &mut self.histogram);
            (self.min, self.max) = (lo, hi);
            return;
        }
        let (new_min, new_max) = (self.min.min(lo), self.max.max(hi));
        let mut update = vec![0f32; bins];
        histc_into(x, new_min, new_max, &mut update);
        if new_min == self.min && new_max == self.max {
            for (h, u) in self.histogram.iter_mut().zip(&update) {
                *h += u;
            }
            return;
        }
        let moved = if self.min == self.max {
            let total: f32 = self.histogram.iter().sum();
            let mut one = vec![0f32; bins];
            histc_into(&[self.min], new_min, new_max, &mut one);
            one.iter().map(|v| v * total).collect()
        } else {
            self.upscale(new_min, new_max)
        };
        for ((h, u), m) in self.histogram.iter_mut().zip(&update).zip(&moved) {
            *h = u + m;
        }
        (self.min, self.max) = (new_min, new_max);
    }

    /// The histogram moved to the wider range `[new_min, new_max]`: every bin split into 16
    /// sub-bins whose midpoints are re-binned (`_upscale_histogram`).
    fn upscale(&self, new_min: f32, new_max: f32) -> Vec<f32> {
        let bins = self.histogram.len();
        let n = bins * UPSAMPLE;
        let bin_size = (self.max - self.min) / n as f32;
        let half = 0.5f32 * bin_size;
        let mids = linspace(self.min, self.max, n + 1);
        let edges = linspace(new_min, new_max, bins + 1);
        let mut out = vec![0f32; bins];
        for (i, &m) in mids[..n].iter().enumerate() {
            let mid = m + half;
            // bucketize(right=True) - 1: the last edge <= mid.
            let b = edges.partition_point(|&e| e <= mid) as isize - 1;
            let b = b.clamp(0, bins as isize - 1) as usize;
            out[b] += self.histogram[i / UPSAMPLE] / UPSAMPLE as f32;
        }
        out
    }

    /// PyTorch's `_compute_quantization_error` for bins `start..=end` quantized to
    /// `dst_bins` levels.
    fn quantization_error(&self, start: usize, end: usize, dst_bins: usize) -> f64 {
        let bins = self.histogram.len();
        let bw = (self.max as f64 - self.min as f64) / bins as f64;
        let dbw = bw * (end - start + 1) as f64 / dst_bins as f64;
        if dbw == 0.0 {
            return 0.0;
        }
        let (bw32, dbw32) = (bw as f32, dbw as f32);
        let half = (dbw / 2.0) as f32;
        let neg_half = (-dbw / 2.0) as f32;
        let top = (dst_bins - 1) as f32;
        let norm = |lo: f32, hi: f32, density: f32| density * ((hi * hi * hi - lo * lo * lo) / 3.0);
        let mut sum = 0f32;
        for (src, &h) in self.histogram.iter().enumerate() {
            let begin = (src as i64 - start as i64) as f32 * bw32;
            let end_ = begin + bw32;
            let db = div_floor(begin, dbw32).clamp(0.0, top);
            let de = div_floor(end_, dbw32).clamp(0.0, top);
            let density = h / bw32;
            let mut e = norm(begin - (db + 0.5) * dbw32, 1.0 * half, density);
            e += (de - db - 1.0) * norm(neg_half, half, density);
            let end_center = de * dbw32 + half;
            e += norm(neg_half, end_ - end_center, density);
            sum += e;
        }
        sum as f64
    }

    /// The range that minimises the L2 error of quantizing to `dst_bins` levels
    /// (`_non_linear_param_search`): bins are dropped from whichever end holds less mass
    /// while the error falls.
    pub fn search_range(&self, dst_bins: usize) -> (f32, f32) {
        let bins = self.histogram.len();
        let bin_width = (self.max - self.min) / bins as f32;
        let total = self.histogram.iter().sum::<f32>() as f64;
        let mut csum = Vec::with_capacity(bins);
        let mut acc = 0f32;
        for &h in &self.histogram {
            acc += h;
            csum.push(acc);
        }
        let (mut alpha, mut beta) = (0f64, 1f64);
        let (mut start, mut end) = (0usize, bins - 1);
        let mut norm_min = f64::INFINITY;
        while alpha < beta {
            let next_alpha = alpha + 1e-5;
            let next_beta = beta - 1e-5;
            let (lo_limit, hi_limit) = ((next_alpha * total) as f32, (next_beta * total) as f32);
            let (mut l, mut r) = (start, end);
            while l < end && csum[l] < lo_limit {
                l += 1;
            }
            while r > start && csum[r] > hi_limit {
                r -= 1;
            }
            let (mut next_start, mut next_end) = (start, end);
            if l - start > end - r {
                next_start = l;
                alpha = next_alpha;
            } else {
                next_end = r;
                beta = next_beta;
            }
            if next_start == start && next_end == end {
                continue;
            }
            let norm = self.quantization_error(next_start, next_end, dst_bins);
            if norm > norm_min {
                break;
            }
            norm_min = norm;
            start = next_start;
            end = next_end;
        }
        (
            self.min + bin_width * start as f32,
            self.min + bin_width * (end + 1) as f32,
        )
    }

    /// PyTorch's `HistogramObserver.calculate_qparams`: the searched range (256 levels for
    /// 8-bit types), then [`calculate_qparams`].
    pub fn qparams(&self, range: QRange, scheme: Scheme) -> QParams {
        if self.min == f32::INFINITY && self.max == f32::NEG_INFINITY {
            return calculate_qparams(self.min, self.max, range, scheme);
        }
        let (lo, hi) = self.search_range(256);
        calculate_qparams(lo, hi, range, scheme)
    }

    /// The range between the `(1 - p) / 2` and `(1 + p) / 2` quantiles of the histogram
    /// (each end to the edge of the bin where the cumulative count crosses it): clips
    /// outliers by a fixed fraction, like ONNX Runtime's percentile calibration.
    pub fn percentile_range(&self, p: f64) -> (f32, f32) {
        let bins = self.histogram.len();
        let total: f64 = self.histogram.iter().map(|&h| h as f64).sum();
        if total == 0.0 || self.min > self.max {
            return (self.min, self.max);
        }
        let bw = (self.max as f64 - self.min as f64) / bins as f64;
        let tail = (1.0 - p.clamp(0.0, 1.0)) / 2.0 * total;
        let mut acc = 0f64;
        let mut lo_bin = 0;
        for (b, &h) in self.histogram.iter().enumerate() {
            acc += h as f64;
            if acc > tail {
                lo_bin = b;
                break;
            }
        }
        acc = 0.0;
        let mut hi_bin = bins - 1;
        for (b, &h) in self.histogram.iter().enumerate().rev() {
            acc += h as f64;
            if acc > tail {
                hi_bin = b;
                break;
            }
        }
        (
            (self.min as f64 + bw * lo_bin as f64) as f32,
            (self.min as f64 + bw * (hi_bin + 1) as f64) as f32,
        )
    }
}
