// convnet's CUDA kernels: everything that is not a convolution (cuDNN) or a matrix product
// (cuBLAS). Compiled at run time by NVRTC (see kernels.rs), so a build needs no CUDA toolkit.
//
// Conventions: float32 data, [N, C, H, W] layouts as on the CPU, one thread per element
// with grid-stride loops unless a kernel says otherwise. Reductions accumulate in double,
// as the CPU kernels do, so that the two devices agree to float32 rounding. Compiled with
// --fmad=false: a*b+c stays a multiply then an add, the CPU's operations.

extern "C" {

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// ---- element-wise ------------------------------------------------------------------------

// Activation kinds, as backend::cpu::activation::Activation: 0 relu, 1 leaky relu (param =
// slope), 2 relu6, 3 sigmoid, 4 tanh, 5 gelu (erf), 6 gelu (tanh approximation).
__device__ float act_apply(int kind, float x, float param) {
    switch (kind) {
    case 0: return (x > 0.0f || x != x) ? x : 0.0f;
    case 1: return x > 0.0f ? x : x * param;
    case 2: return x != x ? x : fminf(fmaxf(x, 0.0f), 6.0f);
    case 3: return 1.0f / (1.0f + expf(-x));
    case 4: return tanhf(x);
    case 5: return 0.5f * x * (1.0f + erff(x * 0.70710678f));
    default: {
        float inner = 0.7978846f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(inner));
    }
    }
}

// f'(x) through the input x and the output y (sigmoid and tanh use y).
__device__ float act_derivative(int kind, float x, float y, float param) {
    switch (kind) {
    case 0: return y > 0.0f ? 1.0f : 0.0f;
    case 1: return x > 0.0f ? 1.0f : param;
    case 2: return (x > 0.0f && x < 6.0f) ? 1.0f : 0.0f;
    case 3: return y * (1.0f - y);
    case 4: return 1.0f - y * y;
    case 5: {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678f));
        float pdf = 0.3989423f * expf(-0.5f * x * x);
        return cdf + x * pdf;
    }
    default: {
        float x2 = x * x;
        float inner = 0.7978846f * (x + 0.044715f * x2 * x);
        float t = tanhf(inner);
        float d_inner = 0.7978846f * (1.0f + 3.0f * 0.044715f * x2);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * d_inner;
    }
    }
}

// y = f(x).
__global__ void activation_forward(const float* x, float* y, long long n, int kind,
                                   float param) {
    GRID_STRIDE(i, n) { y[i] = act_apply(kind, x[i], param); }
}

// dx = g * f'(x).
__global__ void activation_backward(const float* g, const float* x, const float* y, float* dx,
                                    long long n, int kind, float param) {
    GRID_STRIDE(i, n) { dx[i] = g[i] * act_derivative(kind, x[i], y[i], param); }
}

// y = a + b (same shapes).
__global__ void add_forward(const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE(i, n) { y[i] = a[i] + b[i]; }
}

// acc += g: gradient accumulation.
__global__ void add_assign(float* acc, const float* g, long long n) {
    GRID_STRIDE(i, n) { acc[i] += g[i]; }
}

// y = x * mask, mask holding 0 or 1/(1-p) (dropout; the mask is drawn on the host's
// generator so that CPU and GPU runs with one seed drop the same units).
__global__ void mul_mask(const float* x, const float* mask, float* y, long long n) {
    GRID_STRIDE(i, n) { y[i] = x[i] * mask[i]; }
}

// ---- batch normalisation ([N, C, H, W], statistics over N, H, W) --------------------------

// Sums a double across the block (blockDim.x a power of two, at most 1024).
__device__ double block_sum(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    double total = shared[0];
    __syncthreads();
    return total;
}

// The slice [lo, hi) of a channel's N*HW values that block (channel, blockIdx.y) reduces
// when the channel is split over gridDim.y blocks.
__device__ void split_range(long long count, long long* lo, long long* hi) {
    long long chunk = (count + gridDim.y - 1) / gridDim.y;
    *lo = (long long)blockIdx.y * chunk;
    long long end = *lo + chunk;
    *hi = end < count ? end : count;
}

// Element j (of N*HW) of channel ch in [N, C, HW].
__device__ long long channel_index(long long j, int c, int ch, int hw) {
    return ((j / hw) * c + ch) * (long long)hw + j % hw;
}

// Partial batch statistics, grid (C, splits): block (ch, s) writes for its slice of channel
// ch the count, the sum and the sum of squared deviations from the slice's own mean, in
// double; bn_finalize combines the slices (Chan et al.'s pairwise update; with one slice,
// exactly the CPU's two passes). Launch with blockDim.x * sizeof(double) shared bytes.
__global__ void bn_stats(const float* x, double* partial, int n, int c, int hw) {
    extern __shared__ double shared[];
    int ch = blockIdx.x;
    long long lo, hi;
    split_range((long long)n * hw, &lo, &hi);
    double s = 0.0;
    for (long long j = lo + threadIdx.x; j < hi; j += blockDim.x)
        s += (double)x[channel_index(j, c, ch, hw)];
    double sum = block_sum(s, shared);
    double cnt = hi > lo ? (double)(hi - lo) : 0.0;
    double m = cnt > 0.0 ? sum / cnt : 0.0;
    double ss = 0.0;
    for (long long j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        double d = (double)x[channel_index(j, c, ch, hw)] - m;
        ss += d * d;
    }
    double m2 = block_sum(ss, shared);
    if (threadIdx.x == 0) {
        double* p = partial + 3 * ((long long)ch * gridDim.y + blockIdx.y);
        p[0] = cnt;
        p[1] = sum;
        p[2] = m2;
    }
}

// y = x * scale[ch] + shift[ch], then the epilogue: 0 none, 1 relu, 2 relu(y + residual).
// scale = invstd * weight and shift = bias - mean * scale are formed on the host in float32,
// exactly as the CPU kernel forms them.
__global__ void bn_normalize(const float* x, const float* scale, const float* shift,
                             const float* residual, float* y, int c, int hw, long long n,
                             int epilogue) {
    GRID_STRIDE(i, n) {
        int ch = (int)((i / hw) % c);
        float t = x[i] * scale[ch] + shift[ch];
        if (epilogue == 2) t = t + residual[i];
        if (epilogue >= 1) t = (t > 0.0f || t != t) ? t : 0.0f;
        y[i] = t;
    }
}

// The gradient batch norm sees: dy through the epilogue's ReLU (recomputed from x, and the
// residual for epilogue 2), written to gm when gm is not null (it is the residual's
// gradient for epilogue 2).
__device__ float bn_masked_grad(const float* dy, const float* x, const float* residual,
                                float scale, float shift, int epilogue, long long i) {
    if (epilogue == 0) return dy[i];
    float t = x[i] * scale + shift;
    if (epilogue == 2) t = t + residual[i];
    return t > 0.0f ? dy[i] : 0.0f;
}

// Partial sums, grid (C, splits): block (ch, s) writes sum(dy') and sum(dy' * (x - mean))
// over its slice of channel ch to partial[2 * (ch * splits + s) + {0, 1}], in double
// (bn_backward_finalize adds the slices in order). Launch with blockDim.x * sizeof(double)
// bytes of shared memory.
__global__ void bn_backward_reduce(const float* dy, const float* x, const float* residual,
                                   const float* mean, const float* scale, const float* shift,
                                   float* gm, double* partial, int n, int c, int hw,
                                   int epilogue) {
    extern __shared__ double shared[];
    int ch = blockIdx.x;
    long long lo, hi;
    split_range((long long)n * hw, &lo, &hi);
    double a = 0.0, b = 0.0;
    for (long long j = lo + threadIdx.x; j < hi; j += blockDim.x) {
        long long i = channel_index(j, c, ch, hw);
        float g = bn_masked_grad(dy, x, residual, scale[ch], shift[ch], epilogue, i);
        if (gm) gm[i] = g;
        a += (double)g;
        b += (double)(g * (x[i] - mean[ch]));
    }
    double sa = block_sum(a, shared);
    double sb = block_sum(b, shared);
    if (threadIdx.x == 0) {
        double* p = partial + 2 * ((long long)ch * gridDim.y + blockIdx.y);
        p[0] = sa;
        p[1] = sb;
    }
}

// dx = a[ch] * g' + b[ch] * x + c0[ch] (training; the host folds the batch-statistics terms
// into a, b, c0 as the CPU does) or g' * a[ch] (eval: b = c0 = 0). g' is gm when the masked
// gradient was written out, else dy through the ReLU epilogue (1) or dy itself (0).
__global__ void bn_backward_dx(const float* dy, const float* gm, const float* x,
                               const float* scale, const float* shift, const float* a,
                               const float* b, const float* c0, float* dx, int c, int hw,
                               long long n, int epilogue, int training) {
    GRID_STRIDE(i, n) {
        int ch = (int)((i / hw) % c);
        float g = gm ? gm[i] : bn_masked_grad(dy, x, 0, scale[ch], shift[ch], epilogue, i);
        dx[i] = training ? a[ch] * g + b[ch] * x[i] + c0[ch] : g * a[ch];
    }
}

// ---- pooling ([planes, H, W]) ------------------------------------------------------------

// Max pooling with the argmax (flat index in the input plane) kept for backward. NaN wins
// (PyTorch propagates it); among equal values the first in row-major window order wins.
__global__ void max_pool2d_forward(const float* x, float* y, int* argmax, int h, int w,
                                   int oh, int ow, int kh, int kw, int sh, int sw, int ph,
                                   int pw, int dh, int dw, long long n_out) {
    GRID_STRIDE(i, n_out) {
        long long plane = i / ((long long)oh * ow);
        int o = (int)(i % ((long long)oh * ow));
        int oy = o / ow, ox = o % ow;
        const float* xp = x + plane * h * w;
        float best = -__int_as_float(0x7f800000);
        int best_at = -1;
        for (int ky = 0; ky < kh; ++ky) {
            int iy = oy * sh - ph + ky * dh;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < kw; ++kx) {
                int ix = ox * sw - pw + kx * dw;
                if (ix < 0 || ix >= w) continue;
                float v = xp[iy * w + ix];
                if (best_at < 0 || v > best || (v != v && best == best)) {
                    best = v;
                    best_at = iy * w + ix;
                }
            }
        }
        y[i] = best;
        argmax[i] = best_at;
    }
}

// dx[argmax] += g; windows may overlap, hence the atomic add. dx must start at zero.
__global__ void max_pool2d_backward(const float* g, const int* argmax, float* dx, int h,
                                    int w, int oh, int ow, long long n_out) {
    GRID_STRIDE(i, n_out) {
        long long plane = i / ((long long)oh * ow);
        int at = argmax[i];
        if (at >= 0) atomicAdd(&dx[plane * h * w + at], g[i]);
    }
}

// Average pooling over the window (count_include_pad selects PyTorch's divisor rule);
// adaptive pooling to 1x1 is the window covering the whole plane.
__global__ void avg_pool2d_forward(const float* x, float* y, int h, int w, int oh, int ow,
                                   int kh, int kw, int sh, int sw, int ph, int pw,
                                   int count_include_pad, long long n_out) {
    GRID_STRIDE(i, n_out) {
        long long plane = i / ((long long)oh * ow);
        int o = (int)(i % ((long long)oh * ow));
        int oy = o / ow, ox = o % ow;
        const float* xp = x + plane * h * w;
        int y0 = oy * sh - ph, x0 = ox * sw - pw;
        int y1 = min(y0 + kh, h + ph), x1 = min(x0 + kw, w + pw);
        int pool = (y1 - y0) * (x1 - x0);
        y0 = max(y0, 0);
        x0 = max(x0, 0);
        y1 = min(y1, h);
        x1 = min(x1, w);
        double s = 0.0;
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) s += (double)xp[iy * w + ix];
        int divisor = count_include_pad ? pool : (y1 - y0) * (x1 - x0);
        y[i] = (float)(s / (double)divisor);
    }
}

// ---- loss ----------------------------------------------------------------------------------

// Softmax cross-entropy with label smoothing, one block per row (blockDim.x a power of two):
// probs = softmax(logits) (kept for backward), loss[row] = -sum(q * log_softmax) where q is
// (1 - smoothing) on the target plus smoothing / C everywhere. Rows whose target is
// ignore_index get loss 0 and zero probabilities. Launch with
// blockDim.x * sizeof(double) bytes of shared memory.
__global__ void softmax_cross_entropy_forward(const float* logits, const long long* targets,
                                              float* probs, float* loss, int c,
                                              float smoothing, long long ignore_index) {
    extern __shared__ double shared[];
    int row = blockIdx.x;
    const float* z = logits + (long long)row * c;
    float* p = probs + (long long)row * c;
    long long t = targets[row];
    // Row maximum, for a stable exponent.
    double m = -__longlong_as_double(0x7ff0000000000000LL);
    for (int j = threadIdx.x; j < c; j += blockDim.x) m = fmax(m, (double)z[j]);
    shared[threadIdx.x] = m;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = fmax(shared[threadIdx.x], shared[threadIdx.x + s]);
        __syncthreads();
    }
    m = shared[0];
    __syncthreads();
    double e = 0.0, zsum = 0.0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        e += exp((double)z[j] - m);
        zsum += (double)z[j];
    }
    double total = block_sum(e, shared);
    double all = block_sum(zsum, shared);
    double lse = m + log(total);
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        p[j] = t == ignore_index ? 0.0f : (float)(exp((double)z[j] - m) / total);
    if (threadIdx.x == 0) {
        if (t == ignore_index) {
            loss[row] = 0.0f;
        } else {
            double target_term = lse - (double)z[t];
            double uniform_term = lse - all / (double)c;
            loss[row] = (float)((1.0 - smoothing) * target_term + smoothing * uniform_term);
        }
    }
}

// dx = (probs - q) * (g[row or 0] / divisor): g is the upstream gradient (one value, or one
// per row for reduction "none", with divisor 1), divisor the reduction's.
__global__ void softmax_cross_entropy_backward(const float* probs, const long long* targets,
                                               const float* g, int per_row, float divisor,
                                               float* dx, int c, float smoothing,
                                               long long ignore_index, long long n) {
    GRID_STRIDE(i, n) {
        long long row = i / c;
        int j = (int)(i % c);
        long long t = targets[row];
        if (t == ignore_index) {
            dx[i] = 0.0f;
        } else {
            float q = smoothing / (float)c + (j == t ? 1.0f - smoothing : 0.0f);
            dx[i] = (probs[i] - q) * (g[per_row ? row : 0] / divisor);
        }
    }
}

// ---- optimizer -----------------------------------------------------------------------------

// ---- bias, reductions and copies ------------------------------------------------------------

// y[n, ch, p] += bias[ch] over [N, C, HW] (convolution bias; HW = 1 for a linear layer's
// rows, with C its output features).
__global__ void add_channel_bias(float* y, const float* bias, int c, int hw, long long n) {
    GRID_STRIDE(i, n) { y[i] = y[i] + bias[(i / hw) % c]; }
}

// Partial per-channel sums over N and HW of g [N, C, HW] (a bias gradient), grid
// (C, splits): partial[ch * splits + s], in double; channel_sum_finish adds them in order.
// Launch with blockDim.x * sizeof(double) bytes of shared memory.
__global__ void channel_sum(const float* g, double* partial, int n, int c, int hw) {
    extern __shared__ double shared[];
    int ch = blockIdx.x;
    long long lo, hi;
    split_range((long long)n * hw, &lo, &hi);
    double s = 0.0;
    for (long long j = lo + threadIdx.x; j < hi; j += blockDim.x)
        s += (double)g[channel_index(j, c, ch, hw)];
    double total = block_sum(s, shared);
    if (threadIdx.x == 0) partial[(long long)ch * gridDim.y + blockIdx.y] = total;
}

// out[ch] = the sum of channel ch's partial sums, one thread per channel.
__global__ void channel_sum_finish(const double* partial, float* out, int c, int splits) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0;
    for (int k = 0; k < splits; ++k) s += partial[(long long)ch * splits + k];
    out[ch] = (float)s;
}

// out[0] = sum(x) / divisor in double (a mean or sum reduction of per-row losses); one
// block, launched with blockDim.x * sizeof(double) bytes of shared memory.
__global__ void sum_scaled(const float* x, float* out, long long n, double divisor) {
    extern __shared__ double shared[];
    double s = 0.0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) s += (double)x[j];
    double total = block_sum(s, shared);
    if (threadIdx.x == 0) out[0] = (float)(total / divisor);
}

// y = x * factor (an upstream gradient's scale; factor 1 is a copy).
__global__ void scale_copy(const float* x, float* y, long long n, float factor) {
    GRID_STRIDE(i, n) { y[i] = x[i] * factor; }
}

// ---- batch normalisation on the device (per-channel constants) -----------------------------

// One thread per channel, after bn_stats (training) or from the running statistics (eval):
// mean/invstd/scale/shift in float32 exactly as the CPU forms them, and in training the
// running statistics updated in double with the unbiased variance (PyTorch's rule).
// weight/bias may be null (no affine).
__global__ void bn_finalize(const double* partial, int splits, float* running_mean,
                            float* running_var, const float* weight, const float* bias,
                            float* mean, float* invstd, float* scale, float* shift, int c,
                            float eps, float momentum, double unbias, int training) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float m, is;
    if (training) {
        // Combine the slices: count, mean and sum of squared deviations.
        double na = 0.0, bm = 0.0, m2 = 0.0;
        for (int s = 0; s < splits; ++s) {
            const double* p = partial + 3 * ((long long)ch * splits + s);
            double nb = p[0];
            if (nb == 0.0) continue;
            double mb = p[1] / nb;
            if (na == 0.0) {
                na = nb;
                bm = mb;
                m2 = p[2];
            } else {
                double total = na + nb, delta = mb - bm;
                bm = bm + delta * (nb / total);
                m2 = m2 + p[2] + delta * delta * (na * nb / total);
                na = total;
            }
        }
        double bv = m2 / na, mo = (double)momentum;
        running_mean[ch] = (float)((1.0 - mo) * (double)running_mean[ch] + mo * bm);
        running_var[ch] = (float)((1.0 - mo) * (double)running_var[ch] + mo * bv * unbias);
        m = (float)bm;
        is = (float)(1.0 / sqrt(bv + (double)eps));
    } else {
        m = running_mean[ch];
        is = (float)(1.0 / sqrt((double)running_var[ch] + (double)eps));
    }
    mean[ch] = m;
    invstd[ch] = is;
    float sc = is * (weight ? weight[ch] : 1.0f);
    scale[ch] = sc;
    shift[ch] = (bias ? bias[ch] : 0.0f) - m * sc;
}

// One thread per channel, after bn_backward_reduce: the weight and bias gradients and the
// coefficients of dx = a * g' + b * x + c0 (training) or dx = g' * a (eval), folded in double
// as the CPU kernel folds them.
__global__ void bn_backward_finalize(const double* partial, int splits, const float* mean,
                                     const float* invstd, const float* weight, float* dweight,
                                     float* dbias, float* a, float* b, float* c0, int c,
                                     double count, int training) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double sdy = 0.0, sx = 0.0;
    for (int s = 0; s < splits; ++s) {
        const double* p = partial + 2 * ((long long)ch * splits + s);
        sdy += p[0];
        sx += p[1];
    }
    double is = (double)invstd[ch], m = (double)mean[ch];
    double sdyx = sx * is;
    dweight[ch] = (float)sdyx;
    dbias[ch] = (float)sdy;
    double w = weight ? (double)weight[ch] : 1.0;
    if (training) {
        double k = w * is / count;
        a[ch] = (float)(k * count);
        b[ch] = (float)(-k * sdyx * is);
        c0[ch] = (float)(-k * sdy + k * sdyx * is * m);
    } else {
        a[ch] = (float)(w * is);
        b[ch] = 0.0f;
        c0[ch] = 0.0f;
    }
}

// ---- average-pool backward and the option-A shortcut ----------------------------------------

// dx[window] += g / divisor for each output (windows may overlap: atomic). dx starts at 0.
__global__ void avg_pool2d_backward(const float* g, float* dx, int h, int w, int oh, int ow,
                                    int kh, int kw, int sh, int sw, int ph, int pw,
                                    int count_include_pad, long long n_out) {
    GRID_STRIDE(i, n_out) {
        long long plane = i / ((long long)oh * ow);
        int o = (int)(i % ((long long)oh * ow));
        int oy = o / ow, ox = o % ow;
        float* dp = dx + plane * h * w;
        int y0 = oy * sh - ph, x0 = ox * sw - pw;
        int y1 = min(y0 + kh, h + ph), x1 = min(x0 + kw, w + pw);
        int pool = (y1 - y0) * (x1 - x0);
        y0 = max(y0, 0);
        x0 = max(x0, 0);
        y1 = min(y1, h);
        x1 = min(x1, w);
        int divisor = count_include_pad ? pool : (y1 - y0) * (x1 - x0);
        float v = g[i] / (float)divisor;
        for (int iy = y0; iy < y1; ++iy)
            for (int ix = x0; ix < x1; ++ix) atomicAdd(&dp[iy * w + ix], v);
    }
}

// out[b, oc, y, x] = x[b, oc - before, y*s, x*s] for input channels, else 0.
__global__ void subsample_pad_forward(const float* x, float* out, int c, int h, int w,
                                      int stride, int before, int oc_total, int oh, int ow,
                                      long long n_out) {
    GRID_STRIDE(i, n_out) {
        long long plane = i / ((long long)oh * ow);
        int o = (int)(i % ((long long)oh * ow));
        int b = (int)(plane / oc_total), oc = (int)(plane % oc_total);
        int ch = oc - before;
        float v = 0.0f;
        if (ch >= 0 && ch < c) {
            int y = o / ow, xx = o % ow;
            v = x[((long long)b * c + ch) * h * w + (long long)y * stride * w + xx * stride];
        }
        out[i] = v;
    }
}

// dx[b, ch, y, x] = g[b, ch + before, y/s, x/s] where y and x are multiples of s, else 0.
__global__ void subsample_pad_backward(const float* g, float* dx, int c, int h, int w,
                                       int stride, int before, int oc_total, int oh, int ow,
                                       long long n_in) {
    GRID_STRIDE(i, n_in) {
        long long plane = i / ((long long)h * w);
        int p = (int)(i % ((long long)h * w));
        int b = (int)(plane / c), ch = (int)(plane % c);
        int y = p / w, xx = p % w;
        float v = 0.0f;
        if (y % stride == 0 && xx % stride == 0) {
            long long oplane = (long long)b * oc_total + ch + before;
            v = g[oplane * oh * ow + (long long)(y / stride) * ow + xx / stride];
        }
        dx[i] = v;
    }
}

// ---- strided maps, broadcasting and reductions (any rank up to MAX_RANK) ---------------------

#define MAX_RANK 8

// For i in [0, n): decompose i over dims (row-major) into offsets ia, ib, iy with the
// strides in meta = [dims, a_strides, b_strides, y_strides] (rank entries each; stride 0
// broadcasts), then y[iy] = a[ia] op b[ib] (kind 0 add, 1 sub, 2 mul, 3 div) or, kind 4,
// y[iy] = a[ia] * scale (copies, gathers, scatters and expansions; b unused).
__global__ void strided_map(const float* a, const float* b, float* y, const long long* meta,
                            int rank, long long n, int kind, float scale) {
    GRID_STRIDE(i, n) {
        long long rem = i, ia = 0, ib = 0, iy = 0;
        for (int d = rank - 1; d >= 0; --d) {
            long long dim = meta[d];
            long long k = rem % dim;
            rem /= dim;
            ia += k * meta[rank + d];
            ib += k * meta[2 * rank + d];
            iy += k * meta[3 * rank + d];
        }
        float v;
        switch (kind) {
        case 0: v = a[ia] + b[ib]; break;
        case 1: v = a[ia] - b[ib]; break;
        case 2: v = a[ia] * b[ib]; break;
        case 3: v = a[ia] / b[ib]; break;
        default: v = a[ia] * scale; break;
        }
        y[iy] = v;
    }
}

// The gradient of a broadcast, and sums over dimensions: for each element s of the small
// shape (one thread each), the sum in double over the reduced positions r of the term
// below at the full-shape position p(s, r). meta = [small_dims, reduced_dims, s_strides,
// r_strides, o1_strides, o2_strides]: small_dims has 1 where a dimension is reduced,
// reduced_dims has the reduced extent there and 1 elsewhere; s_strides and r_strides give
// p's offset in g (contiguous, full shape) of the two indices; o1/o2 strides give the other
// operands' offsets from the full index. Terms by mode: 0 g, 1 -g, 2 g*o1, 3 g/o1,
// 4 g*(-(o2/o1)) (the divisor's gradient, o2 being the quotient).
__global__ void reduce_broadcast(const float* g, const float* o1, const float* o2, float* out,
                                 const long long* meta, int rank, long long n_small,
                                 long long n_reduced, int mode) {
    GRID_STRIDE(s, n_small) {
        long long base = 0, base1 = 0, base2 = 0, rem = s;
        for (int d = rank - 1; d >= 0; --d) {
            long long dim = meta[d];
            long long k = rem % dim;
            rem /= dim;
            base += k * meta[2 * rank + d];
            base1 += k * meta[4 * rank + d];
            base2 += k * meta[5 * rank + d];
        }
        double acc = 0.0;
        for (long long r = 0; r < n_reduced; ++r) {
            long long p = base, p1 = base1, p2 = base2, rr = r;
            for (int d = rank - 1; d >= 0; --d) {
                long long dim = meta[rank + d];
                long long k = rr % dim;
                rr /= dim;
                p += k * meta[3 * rank + d];
                p1 += k * meta[4 * rank + d];
                p2 += k * meta[5 * rank + d];
            }
            float t;
            switch (mode) {
            case 0: t = g[p]; break;
            case 1: t = -g[p]; break;
            case 2: t = g[p] * o1[p1]; break;
            case 3: t = g[p] / o1[p1]; break;
            default: t = g[p] * (-(o2[p2] / o1[p1])); break;
            }
            acc += (double)t;
        }
        out[s] = (float)acc;
    }
}

// y = x * factor + offset.
__global__ void affine_forward(const float* x, float* y, long long n, float factor,
                               float offset) {
    GRID_STRIDE(i, n) { y[i] = x[i] * factor + offset; }
}

// ---- softmax, NLL and MSE --------------------------------------------------------------------

// (Log-)softmax over the middle axis of [outer, d, inner], one thread per (outer, inner)
// line, the sum of exponentials in double, as the CPU kernel.
__global__ void softmax_forward(const float* x, float* y, int d, long long inner,
                                long long lines, int log_softmax) {
    GRID_STRIDE(line, lines) {
        long long o = line / inner, in = line % inner;
        const float* xp = x + o * d * inner + in;
        float* yp = y + o * d * inner + in;
        float m = -__int_as_float(0x7f800000);
        for (int k = 0; k < d; ++k) m = fmaxf(m, xp[k * inner]);
        double sum = 0.0;
        for (int k = 0; k < d; ++k) sum += exp((double)(xp[k * inner] - m));
        if (log_softmax) {
            float lse = (float)log(sum);
            for (int k = 0; k < d; ++k) yp[k * inner] = xp[k * inner] - m - lse;
        } else {
            for (int k = 0; k < d; ++k)
                yp[k * inner] = (float)(exp((double)(xp[k * inner] - m)) / sum);
        }
    }
}

// Its gradient from the output y: dx = y * (dy - sum(dy * y)) or, for log-softmax,
// dx = dy - exp(y) * sum(dy), the sums in double.
__global__ void softmax_backward(const float* y, const float* dy, float* dx, int d,
                                 long long inner, long long lines, int log_softmax) {
    GRID_STRIDE(line, lines) {
        long long o = line / inner, in = line % inner;
        long long at = o * d * inner + in;
        double s = 0.0;
        if (log_softmax) {
            for (int k = 0; k < d; ++k) s += (double)dy[at + k * inner];
            for (int k = 0; k < d; ++k) {
                long long j = at + k * inner;
                dx[j] = dy[j] - (float)((double)expf(y[j]) * s);
            }
        } else {
            for (int k = 0; k < d; ++k) s += (double)dy[at + k * inner] * (double)y[at + k * inner];
            for (int k = 0; k < d; ++k) {
                long long j = at + k * inner;
                dx[j] = (float)((double)y[j] * ((double)dy[j] - s));
            }
        }
    }
}

// loss[row] = -x[row, target[row]].
__global__ void nll_forward(const float* x, const long long* targets, float* loss, int c,
                            long long n) {
    GRID_STRIDE(row, n) { loss[row] = -x[row * c + targets[row]]; }
}

// dx = 0 except dx[row, target] = -(g[row or 0] / divisor).
__global__ void nll_backward(const float* g, const long long* targets, float* dx, int c,
                             int per_row, float divisor, long long n) {
    GRID_STRIDE(i, n) {
        long long row = i / c;
        dx[i] = (i % c == targets[row]) ? -(g[per_row ? row : 0] / divisor) : 0.0f;
    }
}

// out[0] = sum((a - b)^2) / divisor, the squares and the sum in double; one block, launched
// with blockDim.x * sizeof(double) bytes of shared memory.
__global__ void mse_forward(const float* a, const float* b, float* out, long long n,
                            double divisor) {
    extern __shared__ double shared[];
    double s = 0.0;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        double d = (double)(a[j] - b[j]);
        s += d * d;
    }
    double total = block_sum(s, shared);
    if (threadIdx.x == 0) out[0] = (float)(total / divisor);
}

// da = s * (a - b) and db = -da with s = g * 2 / divisor; either output may be null.
__global__ void mse_backward(const float* g, const float* a, const float* b, float* da,
                             float* db, long long n, float divisor) {
    float s = g[0] * 2.0f / divisor;
    GRID_STRIDE(i, n) {
        float v = s * (a[i] - b[i]);
        if (da) da[i] = v;
        if (db) db[i] = -v;
    }
}

// ---- bfloat16 (mixed precision) -------------------------------------------------------------

// y = x rounded to bfloat16 (to nearest, ties to even; NaN stays a quiet NaN), 16 bits each.
__global__ void to_bf16(const float* x, unsigned short* y, long long n) {
    GRID_STRIDE(i, n) {
        unsigned int u = __float_as_uint(x[i]);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            y[i] = (unsigned short)((u >> 16) | 0x40u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            y[i] = (unsigned short)(u >> 16);
        }
    }
}

// y = the float32 value of bfloat16 x (exact).
__global__ void from_bf16(const unsigned short* x, float* y, long long n) {
    GRID_STRIDE(i, n) { y[i] = __uint_as_float(((unsigned int)x[i]) << 16); }
}

// ---- training metrics -----------------------------------------------------------------------

// Running sums of one epoch kept on the device: acc[0] += loss * n, acc[1] += the number of
// rows of logits [n, c] whose first maximum is at the target (the host's argmax rule). One
// block; launch with blockDim.x * sizeof(double) bytes of shared memory.
__global__ void accumulate_metrics(const float* loss, const float* logits,
                                   const long long* targets, double* acc, int n, int c) {
    extern __shared__ double shared[];
    double correct = 0.0;
    for (int row = threadIdx.x; row < n; row += blockDim.x) {
        const float* z = logits + (long long)row * c;
        int best = 0;
        for (int j = 1; j < c; ++j)
            if (z[j] > z[best]) best = j;
        if ((long long)best == targets[row]) correct += 1.0;
    }
    double total = block_sum(correct, shared);
    if (threadIdx.x == 0) {
        acc[0] += (double)loss[0] * (double)n;
        acc[1] += total;
    }
}

// The row of a multi-tensor table (`width` int64 per tensor, the last its first index in
// the concatenation of all tensors, ascending) that holds element i: a binary search.
__device__ int table_row(const long long* table, int tensors, int width, long long i) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (table[width * mid + width - 1] <= i) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// One SGD step over many parameters in one launch, as torch.optim.SGD: d = g + wd * p; with
// momentum the buffer becomes d (first step) or momentum * buf + (1 - dampening) * d, and
// the update is buf or, with Nesterov, d + momentum * buf; p -= lr * update. table holds
// four int64 per tensor: the addresses of p, g and buf (0 without momentum) and the tensor's
// first index in the concatenation of all of them (ascending); total is the sum of sizes;
// momentum 0 means no buffers.
__global__ void sgd_step_multi(const long long* table, int tensors, long long total,
                               const float* hyper, int nesterov, int first_step) {
    // hyper = [lr, momentum, dampening, weight_decay], read from device memory so that a
    // captured step follows the schedule the host stages before each launch.
    float lr = hyper[0], momentum = hyper[1], dampening = hyper[2], weight_decay = hyper[3];
    GRID_STRIDE(i, total) {
        int lo = table_row(table, tensors, 4, i);
        long long j = i - table[4 * lo + 3];
        float* p = (float*)table[4 * lo];
        const float* g = (const float*)table[4 * lo + 1];
        float* buf = (float*)table[4 * lo + 2];
        float d = g[j];
        if (weight_decay != 0.0f) d = d + weight_decay * p[j];
        if (momentum != 0.0f) {
            float b = first_step ? d : momentum * buf[j] + (1.0f - dampening) * d;
            buf[j] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[j] = p[j] - lr * d;
    }
}

// One Adam/AdamW step over many parameters in one launch, as backend::cpu::optim::adam_step.
// table holds six int64 per tensor: the addresses of p, g, m, v and max_v (0 without AMSGrad)
// and the tensor's first index in the concatenation of all of them (ascending). hyper =
// [lr, beta1, beta2, eps, weight_decay, decoupled (0 or 1), bias_correction1,
// bias_correction2_sqrt], read from device memory so that a captured step follows the
// host's schedule and step count.
__global__ void adam_step_multi(const long long* table, int tensors, long long total,
                                const float* hyper) {
    float lr = hyper[0], beta1 = hyper[1], beta2 = hyper[2], eps = hyper[3];
    float weight_decay = hyper[4];
    int decoupled = hyper[5] != 0.0f;
    float bias_correction1 = hyper[6], bias_correction2_sqrt = hyper[7];
    float step_size = lr / bias_correction1;
    GRID_STRIDE(i, total) {
        int lo = table_row(table, tensors, 6, i);
        long long j = i - table[6 * lo + 5];
        float* p = (float*)table[6 * lo];
        const float* g = (const float*)table[6 * lo + 1];
        float* m = (float*)table[6 * lo + 2];
        float* v = (float*)table[6 * lo + 3];
        float* max_v = (float*)table[6 * lo + 4];
        float gi = g[j];
        float pi = p[j];
        if (weight_decay != 0.0f) {
            if (decoupled) pi = pi * (1.0f - lr * weight_decay);
            else gi = gi + weight_decay * pi;
        }
        float mi = m[j] + (1.0f - beta1) * (gi - m[j]);
        float vi = v[j] * beta2 + (1.0f - beta2) * gi * gi;
        m[j] = mi;
        v[j] = vi;
        float second = vi;
        if (max_v) {
            second = fmaxf(max_v[j], vi);
            max_v[j] = second;
        }
        float denom = sqrtf(second) / bias_correction2_sqrt + eps;
        p[j] = pi - step_size * mi / denom;
    }
}


}  // extern "C"
