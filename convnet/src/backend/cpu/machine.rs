//! What this CPU can do, measured: its instruction sets, the float32 multiply-add peak of its
//! vector units (one thread and several), the machine class that follows, and the kernels
//! convnet runs on it.
//!
//! Instruction-set flags alone do not tell machines apart: a CPU with AVX-512 may execute
//! 512-bit multiply-adds at full width (two per cycle per core) or at half rate (the same
//! floats per cycle as AVX2), and the two classes need different expectations of every
//! kernel. A short loop of independent multiply-adds settles it: on a full-width machine the
//! 512-bit loop runs about twice as many floats per second as the 256-bit one; on a
//! half-rate one about as many.
//!
//! ```
//! use convnet::backend::cpu::machine::{Machine, VectorClass};
//! let m = Machine::measure(1, std::time::Duration::from_millis(20));
//! assert!(m.peak_gflops(1) > 0.0);
//! if m.class == VectorClass::FullWidthAvx512 || m.class == VectorClass::HalfRateAvx512 {
//!     assert!(m.has("avx512f"));
//! }
//! println!("{m}");
//! ```

use std::fmt;
use std::time::{Duration, Instant};

/// The machine classes whose kernels and figures differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorClass {
    /// AVX-512 at full width: 512-bit multiply-adds at about twice AVX2's float rate.
    FullWidthAvx512,
    /// AVX-512 at half rate: 512-bit instructions, about AVX2's float rate.
    HalfRateAvx512,
    /// AVX2 and FMA, no AVX-512.
    Avx2,
    /// Neither: the portable loops.
    Portable,
}

impl VectorClass {
    /// A short name (`full-width AVX-512`, `half-rate AVX-512`, `AVX2`, `portable`).
    pub fn name(self) -> &'static str {
        match self {
            VectorClass::FullWidthAvx512 => "full-width AVX-512",
            VectorClass::HalfRateAvx512 => "half-rate AVX-512",
            VectorClass::Avx2 => "AVX2",
            VectorClass::Portable => "portable",
        }
    }
}

/// A measured description of this CPU (see the module documentation).
#[derive(Clone, Debug)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo` on Linux; empty where unknown).
    pub cpu: String,
    /// The instruction-set extensions convnet uses that this CPU has.
    pub features: Vec<&'static str>,
    /// Multiply-add peaks in GFLOP/s of the 512-bit loop, per thread count measured
    /// (`(threads, gflops)`), when the CPU has AVX-512.
    pub avx512: Vec<(usize, f64)>,
    /// The same for the 256-bit (AVX2 + FMA) loop, when the CPU has it.
    pub avx2: Vec<(usize, f64)>,
    /// The class that follows from the two.
    pub class: VectorClass,
}

/// The extensions reported, in the order printed.
const FEATURES: [&str; 9] = [
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vnni",
    "avx512bf16",
    "amx-tile",
    "amx-int8",
    "amx-bf16",
];

/// Independent accumulators of the peak loops: enough to hide the multiply-add latency on
/// two ports.
const CHAINS: usize = 16;

impl Machine {
    /// Detects the extensions and measures the peaks on one thread and on `threads` threads
    /// (each loop runs for about `each`, three times, alternating).
    pub fn measure(threads: usize, each: Duration) -> Machine {
        let flags = cpu_flags();
        let features: Vec<&'static str> = FEATURES.into_iter().filter(|f| has(f, &flags)).collect();
        let has = |name: &str| features.contains(&name);
        let counts: Vec<usize> = if threads > 1 {
            vec![1, threads]
        } else {
            vec![1]
        };
        let mut kinds = Vec::new();
        if has("avx512f") {
            kinds.push(Loop::Avx512);
        }
        if has("avx2") && has("fma") {
            kinds.push(Loop::Avx2);
        }
        // Rounds alternating the loops, the best of each kept: a busy machine slows a loop
        // now and then, never speeds it up.
        let mut best = vec![vec![0f64; counts.len()]; kinds.len()];
        for _ in 0..ROUNDS {
            for (k, &kind) in kinds.iter().enumerate() {
                for (i, &t) in counts.iter().enumerate() {
                    best[k][i] = best[k][i].max(peak(kind, t, each));
                }
            }
        }
        let of = |kind: Loop| -> Vec<(usize, f64)> {
            kinds
                .iter()
                .position(|&k| k == kind)
                .map(|k| {
                    counts
                        .iter()
                        .copied()
                        .zip(best[k].iter().copied())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (avx512, avx2) = (of(Loop::Avx512), of(Loop::Avx2));
        let class = match (avx512.first(), avx2.first()) {
            (Some(&(_, wide)), Some(&(_, narrow))) if wide >= 1.5 * narrow => {
                VectorClass::FullWidthAvx512
            }
            (Some(_), _) => VectorClass::HalfRateAvx512,
            (None, Some(_)) => VectorClass::Avx2,
            (None, None) => VectorClass::Portable,
        };
        Machine {
            cpu: cpu_model(),
            features,
            avx512,
            avx2,
            class,
        }
    }

    /// Whether the CPU has extension `name` (as listed in [`Machine::features`]).
    pub fn has(&self, name: &str) -> bool {
        self.features.contains(&name)
    }

    /// The best measured float32 multiply-add peak on `threads` threads (GFLOP/s; 0 when
    /// that count was not measured).
    pub fn peak_gflops(&self, threads: usize) -> f64 {
        self.avx512
            .iter()
            .chain(&self.avx2)
            .filter(|(t, _)| *t == threads)
            .map(|&(_, g)| g)
            .fold(0.0, f64::max)
    }

    /// The float convolution kernels convnet runs here.
    pub fn float_kernels(&self) -> &'static str {
        if super::nhwc::use_avx512() {
            "AVX-512: direct 3x3 kernels and register tiles (16 output channels per vector); \
             Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions: in inference with a multiple \
             of 16 input channels, in training by the rules from 16 input channels (on the \
             NCHW planes with 16, rows a multiple of 32 wide), where measured faster with \
             --kernels measured, never with --kernels direct"
        } else {
            "portable register tiles"
        }
    }

    /// The int8 kernels convnet runs here.
    pub fn int8_kernels(&self) -> &'static str {
        super::int8::Int8Kernel::detect().name()
    }

    /// The kernels of bf16 mixed-precision training here (`none` without AVX512-BF16).
    pub fn bf16_kernels(&self) -> &'static str {
        super::bf16::Bf16Kernel::best().map_or("none (no AVX512-BF16 or AMX-BF16)", |k| k.name())
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peaks = |v: &[(usize, f64)]| {
            v.iter()
                .map(|(t, g)| {
                    format!(
                        "{g:.0} GFLOP/s on {t} thread{}",
                        if *t == 1 { "" } else { "s" }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            f,
            "cpu: {}",
            if self.cpu.is_empty() {
                "unknown"
            } else {
                &self.cpu
            }
        )?;
        writeln!(f, "extensions: {}", self.features.join(" "))?;
        if !self.avx512.is_empty() {
            writeln!(
                f,
                "float32 multiply-add peak, 512-bit: {}",
                peaks(&self.avx512)
            )?;
        }
        if !self.avx2.is_empty() {
            writeln!(
                f,
                "float32 multiply-add peak, 256-bit: {}",
                peaks(&self.avx2)
            )?;
        }
        writeln!(f, "class: {}", self.class.name())?;
        writeln!(f, "float convolutions: {}", self.float_kernels())?;
        writeln!(f, "int8 convolutions: {}", self.int8_kernels())?;
        write!(
            f,
            "bf16 training (--precision bf16): {}",
            self.bf16_kernels()
        )
    }
}

/// Measurements of each loop (the best is kept).
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Loop {
    Avx512,
    Avx2,
}

/// Whether this CPU has extension `name` (`flags`: the kernel's list, for AMX).
fn has(name: &str, flags: &[String]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match name {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
            // AMX is reported by the kernel (and usable only once it grants the tile state).
            "amx-tile" | "amx-int8" | "amx-bf16" => flags.contains(&name.replace('-', "_")),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (name, flags);
        false
    }
}

/// The `flags` line of `/proc/cpuinfo` (empty elsewhere).
fn cpu_flags() -> Vec<String> {
    cpuinfo_field("flags")
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    cpuinfo_field("model name").unwrap_or_default()
}

fn cpuinfo_field(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// GFLOP/s of the `kind` loop on `threads` threads running together for about `each`.
fn peak(kind: Loop, threads: usize, each: Duration) -> f64 {
    // Calibrate the iterations on one thread, then time all threads together.
    let mut iters = 1 << 14;
    loop {
        let t = Instant::now();
        run_loop(kind, iters);
        let dt = t.elapsed();
        if dt >= each / 8 || iters >= 1 << 34 {
            let per = dt.as_secs_f64() / iters as f64;
            iters = ((each.as_secs_f64() / per.max(1e-12)) as u64).max(1);
            break;
        }
        iters *= 4;
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| run_loop(kind, iters));
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let lanes = match kind {
        Loop::Avx512 => 16.0,
        Loop::Avx2 => 8.0,
    };
    threads as f64 * iters as f64 * CHAINS as f64 * lanes * 2.0 / secs / 1e9
}

fn run_loop(kind: Loop, iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: each loop runs only when its extensions are present (checked by the caller
    // in `Machine::measure`).
    unsafe {
        std::hint::black_box(match kind {
            Loop::Avx512 => fma_loop_avx512(iters),
            Loop::Avx2 => fma_loop_avx2(iters),
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, iters);
        0.0
    }
}

/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
    let b = _mm512_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for v in acc {
        sum = _mm512_add_ps(sum, v);
    }
    _mm512_reduce_add_ps(sum)
}

/// # Safety
/// AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
    let b = _mm256_set1_ps(std::hint::black_box(1e-7));
    let mut acc = [_mm256_setzero_ps(); CHAINS];
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for v in acc {
        sum = _mm256_add_ps(sum, v);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), sum);
    out.iter().sum()
}
