//! `convnet bench`: images/s and GFLOP/s of the real training step (forward, loss,
//! backward, optimizer) or of inference, on synthetic data of the model's input shape.
//! Under `mpirun` the batch is the global one: each rank trains its slice and gradients are
//! averaged over the ranks as in `convnet train`; the report gives the global images/s and
//! the part of the step spent waiting for communication.

use crate::common::{parse_shape, set_threads};
use crate::dist::{threads_per_rank, DistArgs, Ranks};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use convnet::autocast::autocast;
use convnet::backend::cpu::tuning::{self, KernelChoice};
use convnet::dist::DataParallel;
use convnet::nn::{Mode, Model};
use convnet::optim::{Optimizer, Sgd, SgdConfig};
use convnet::{Reduction, Rng, Tensor};
use std::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum BenchMode {
    Train,
    Infer,
}

/// Arguments of `convnet bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Architecture (see `convnet models`).
    #[arg(long, default_value = "seed-cnn")]
    model: String,
    /// A model described in a TOML or JSON file instead (random weights; its own input
    /// size unless --input is given).
    #[arg(long, conflicts_with = "checkpoint")]
    model_file: Option<std::path::PathBuf>,
    /// Time a checkpoint instead (float or quantized; its input shape): a quantized one in
    /// infer mode only.
    #[arg(long)]
    checkpoint: Option<std::path::PathBuf>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Compute threads per process (0 = all cores, shared out among the ranks of a machine
    /// under mpirun).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// What to time.
    #[arg(long, value_enum, default_value_t = BenchMode::Train)]
    mode: BenchMode,
    /// Input shape CxHxW (default 3x32x32, or a model file's own).
    #[arg(long)]
    input: Option<String>,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// In infer mode, run the model layer by layer instead of its compiled inference plan
    /// (to compare the two).
    #[arg(long)]
    no_plan: bool,
    /// Print a per-op breakdown of forward and backward time and GFLOP/s.
    #[arg(long)]
    profile: bool,
    /// Print one JSON object with the results as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Describe this machine instead of timing a model: its vector extensions, the float32
    /// multiply-add peak measured on one thread and on --threads threads, the machine class
    /// (full-width or half-rate AVX-512, AVX2, portable), the kernels convnet runs on it,
    /// and the kernel each convolution of --model's training step at --batch-size takes
    /// when measured (`--kernels measured`) against the rules.
    #[arg(long)]
    machine: bool,
    /// Arithmetic of convolutions and linear layers in --mode train: f32, or bf16 (bfloat16
    /// operands, float32 accumulation; CPUs with AVX512-BF16 or AMX-BF16).
    #[arg(long, value_enum, default_value = "f32")]
    precision: crate::train::PrecisionArg,
    /// In --mode train, how float32 convolutions choose their kernels (as `train
    /// --kernels`); with `measured` the choices are printed after the timing.
    #[arg(long, value_enum, default_value = "rules")]
    kernels: crate::train::KernelsArg,
    #[command(flatten)]
    dist: DistArgs,
}

/// `convnet bench --machine`: prints the measured description of this CPU and returns it as
/// JSON.
fn machine() -> serde_json::Value {
    use convnet::backend::cpu::machine::Machine;
    let threads = rayon::current_num_threads();
    let m = Machine::measure(threads, std::time::Duration::from_millis(100));
    println!("{m}");
    let peaks = |v: &[(usize, f64)]| {
        v.iter()
            .map(|&(t, g)| serde_json::json!({"threads": t, "gflops": (g * 10.0).round() / 10.0}))
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "cpu": m.cpu,
        "extensions": m.features,
        "peak_avx512": peaks(&m.avx512),
        "peak_avx2": peaks(&m.avx2),
        "class": m.class.name(),
        "float_kernels": m.float_kernels(),
        "int8_kernels": m.int8_kernels(),
        "bf16_kernels": m.bf16_kernels(),
    })
}

/// The kernels of [`tuning::measurements`], as a table.
fn print_kernel_choices() {
    use tuning::ConvKernel;
    let measured = tuning::measurements();
    if measured.is_empty() {
        println!(
            "\nkernels measured: none (no convolution of this step has more than one kernel on this CPU)"
        );
        return;
    }
    println!(
        "\nkernels measured (best of 3 runs, ms; chosen unless the rule's kernel is within {:.0}%):",
        100.0 * tuning::MARGIN
    );
    println!(
        "{:<66} {:<12} {:>8} {:>8} {:>8} {:>8} {:>14}  {:<14} {:<14}",
        "convolution",
        "pass",
        "direct",
        "GEMM",
        "col2im",
        "Winograd",
        "Winograd-lanes",
        "chosen",
        "rule"
    );
    for m in measured {
        let time = |k: ConvKernel| {
            m.seconds
                .iter()
                .find(|(c, _)| *c == k)
                .map_or("-".to_string(), |(_, s)| format!("{:.3}", s * 1e3))
        };
        let [direct, gemm, col2im, winograd, lanes] = ConvKernel::ALL.map(time);
        println!(
            "{:<66} {:<12} {direct:>8} {gemm:>8} {col2im:>8} {winograd:>8} {lanes:>14}  {:<14} {:<14}",
            m.geom.describe(),
            m.pass.name(),
            m.chosen.name(),
            m.rule.name()
        );
    }
}

/// The same as JSON.
fn kernel_choices_json() -> serde_json::Value {
    tuning::measurements()
        .iter()
        .map(|m| {
            serde_json::json!({
                "convolution": m.geom.describe(),
                "pass": m.pass.name(),
                "threads": m.threads,
                "ms": m.seconds.iter().map(|(k, s)| (k.name().to_string(), serde_json::json!(s * 1e3))).collect::<serde_json::Map<_, _>>(),
                "chosen": m.chosen.name(),
                "rule": m.rule.name(),
            })
        })
        .collect()
}

fn print_profile(steps: usize, step_secs: f64) {
    let rows = convnet::profile::rows();
    let per = |secs: f64| 1e3 * secs / steps as f64;
    let gf = |flops: f64, secs: f64| {
        if flops > 0.0 && secs > 0.0 {
            format!("{:8.1}", flops / secs / 1e9)
        } else {
            format!("{:>8}", "-")
        }
    };
    println!(
        "\n{:<72} {:>9} {:>9} {:>8} {:>8} {:>6}",
        "op (shape)", "fwd ms", "bwd ms", "fwd GF/s", "bwd GF/s", "share"
    );
    let mut total = 0.0;
    for r in &rows {
        let t = per(r.forward_secs) + per(r.backward_secs);
        total += t;
        println!(
            "{:<72} {:>9.3} {:>9.3} {} {} {:>5.1}%",
            r.key,
            per(r.forward_secs),
            per(r.backward_secs),
            gf(r.forward_flops, r.forward_secs),
            gf(r.backward_flops, r.backward_secs),
            100.0 * t / (1e3 * step_secs)
        );
    }
    println!(
        "{:<72} {:>19.3} ms/step in ops; {:.3} ms/step elsewhere (optimizer, graph, allocation)",
        "total",
        total,
        1e3 * step_secs - total
    );
}

/// Forward multiply-accumulates per image of every Conv2d and Linear layer, from the
/// summary's output shapes; and those of the first layer (whose input gradient is not needed).
pub fn forward_macs(model: &Model) -> (f64, f64) {
    let params = model.named_parameters();
    let mut total = 0f64;
    let mut first = None;
    for row in model.summary_rows() {
        let Some((_, w)) = params
            .iter()
            .find(|(n, _)| *n == format!("{}.weight", row.name))
        else {
            continue;
        };
        let macs = match row.kind {
            "Conv2d" => {
                w.numel() as f64 * row.output_shape.dims()[2..].iter().product::<usize>() as f64
            }
            "Linear" => w.numel() as f64,
            _ => continue,
        };
        first.get_or_insert(macs);
        total += macs;
    }
    (total, first.unwrap_or(0.0))
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn run(mut a: BenchArgs, ranks: &Ranks) -> Result<()> {
    set_threads(threads_per_rank(a.threads, ranks))?;
    // --machine: the description, then one measured training step for the kernel choices.
    let machine = a.machine.then(machine);
    if machine.is_some() {
        (a.mode, a.kernels, a.warmup, a.steps, a.profile) = (
            BenchMode::Train,
            crate::train::KernelsArg::Measured,
            0,
            1,
            false,
        );
    }
    if a.batch_size == 0 || a.steps == 0 {
        bail!("--batch-size and --steps must be positive");
    }
    let precision = convnet::train::Precision::from(a.precision);
    if precision != convnet::train::Precision::F32 && a.mode == BenchMode::Infer {
        bail!("--precision {precision} times training (--mode train); inference runs in float32");
    }
    precision.check_supported()?;
    let n = ranks.size();
    a.dist.check(a.batch_size, ranks)?;
    convnet::manual_seed(0);
    let loaded = match &a.checkpoint {
        Some(path) => Some(crate::common::load_model(&crate::common::ModelSource {
            checkpoint: Some(path),
            pretrained: None,
            model: None,
            model_file: None,
            weights: None,
            input: None,
            classes: None,
            random_init: false,
        })?),
        None => None,
    };
    let (model, shape, label) = match &loaded {
        Some(l) => {
            let m = &l.meta;
            let spec = convnet::models::ModelSpec::from_checkpoint(
                &m.architecture,
                m.model_spec.as_deref(),
            )?;
            let model = match &l.net {
                crate::common::Net::Float(_) => None,
                crate::common::Net::Quantized(_) if a.mode == BenchMode::Train => {
                    bail!(
                        "{} is quantized: it runs in --mode infer only",
                        l.source.display()
                    )
                }
                // The float architecture, for the FLOP count.
                crate::common::Net::Quantized(_) => {
                    Some(spec.build(m.input_shape, m.classes.len())?)
                }
            };
            let model = match (model, &l.net) {
                (Some(m), _) => m,
                (None, crate::common::Net::Float(_)) => {
                    // The checkpoint's own weights (train mode updates them).
                    let (tensors, meta) = convnet::checkpoint::load_checkpoint(
                        a.checkpoint.as_deref().expect("a checkpoint"),
                    )?;
                    let model = spec.build(meta.input_shape, meta.classes.len())?;
                    model.load_state_dict(&tensors, true)?;
                    model
                }
                (None, crate::common::Net::Quantized(_)) => unreachable!(),
            };
            let label = match &l.net {
                crate::common::Net::Quantized(_) => format!(
                    "{} (int8, {})",
                    m.architecture,
                    convnet::backend::cpu::int8::Int8Kernel::detect().name()
                ),
                _ => m.architecture.clone(),
            };
            (model, m.input_shape, label)
        }
        None => {
            let spec = match &a.model_file {
                Some(path) => convnet::models::ModelSpec::File(
                    convnet::model_file::ModelFile::from_path(path)?,
                ),
                None => convnet::models::ModelSpec::zoo(&a.model)?,
            };
            let shape = match &a.input {
                Some(s) => parse_shape(s)?,
                None => spec.default_input().unwrap_or([3, 32, 32]),
            };
            let label = spec.name().to_string();
            (spec.build(shape, 10)?, shape, label)
        }
    };
    let classes = model.output_shape().dims().get(1).copied().unwrap_or(10);
    let mut rng = Rng::new(1);
    let x = Tensor::randn([a.batch_size, shape[0], shape[1], shape[2]], &mut rng);
    let y: Vec<usize> = (0..a.batch_size)
        .map(|_| rng.below(classes as u64) as usize)
        .collect();
    // This rank's slice of the global batch.
    let local = a.batch_size / n;
    let per = shape.iter().product::<usize>();
    let (x, y) = if n > 1 {
        let data =
            x.to_vec()[ranks.rank() * local * per..(ranks.rank() + 1) * local * per].to_vec();
        (
            Tensor::from_vec(data, [local, shape[0], shape[1], shape[2]])?,
            y[ranks.rank() * local..(ranks.rank() + 1) * local].to_vec(),
        )
    } else {
        (x, y)
    };
    let mut dist = if n > 1 && a.mode == BenchMode::Train {
        Some(DataParallel::new(ranks.clone(), &model, a.dist.options())?)
    } else {
        None
    };
    let mut opt = Sgd::new(
        model.named_parameters(),
        SgdConfig {
            lr: 0.01,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    use convnet::infer::Predictor;
    let quantized = loaded.as_ref().and_then(|l| match &l.net {
        crate::common::Net::Quantized(q) => Some(q.as_ref()),
        _ => None,
    });
    let plan = (a.mode == BenchMode::Infer && !a.no_plan && quantized.is_none())
        .then(|| convnet::infer::Plan::new(&model))
        .transpose()?;
    let mut times = Vec::with_capacity(a.steps);
    let mut exposed = Vec::with_capacity(a.steps);
    for i in 0..a.warmup + a.steps {
        if a.profile && i == a.warmup {
            convnet::profile::enable(true);
        }
        let before = dist.as_ref().map(DataParallel::stats).unwrap_or_default();
        let t0 = Instant::now();
        match (a.mode, &mut dist) {
            (BenchMode::Train, Some(dist)) => {
                let logits = tuning::with_kernels(a.kernels.into(), || {
                    autocast(precision, || dist.forward(&model, &x, Mode::Train))
                })??;
                let loss = logits.cross_entropy(&y, Reduction::Mean, 0.0)?;
                let grads = dist.backward(&loss)?;
                opt.step(&grads)?;
            }
            (BenchMode::Train, None) => {
                let logits = tuning::with_kernels(a.kernels.into(), || {
                    autocast(precision, || model.forward(&x, Mode::Train))
                })??;
                let loss = logits.cross_entropy(&y, Reduction::Mean, 0.0)?;
                let grads = loss.backward()?;
                opt.step(&grads)?;
            }
            (BenchMode::Infer, _) => match (quantized, &plan) {
                (Some(q), _) => {
                    q.predict(&x)?;
                }
                (None, Some(plan)) => {
                    plan.run(&x)?;
                }
                (None, None) => {
                    convnet::no_grad(|| model.forward(&x, Mode::Eval))?;
                }
            },
        }
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
            let after = dist.as_ref().map(DataParallel::stats).unwrap_or_default();
            exposed.push(after.exposed_seconds() - before.exposed_seconds());
        }
    }
    convnet::profile::enable(false);
    let mean_step = times.iter().sum::<f64>() / times.len() as f64;
    let median_of = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // The slowest rank sets the pace of the job.
    let mut figures = [median_of(&mut times), median_of(&mut exposed)];
    ranks.all_reduce_max(&mut figures)?;
    let [median, comm] = figures;
    let ips = a.batch_size as f64 / median;
    let (macs, first) = forward_macs(&model);
    let flops_per_image = match a.mode {
        BenchMode::Train => 2.0 * (3.0 * macs - first),
        BenchMode::Infer => 2.0 * macs,
    };
    let gflops = ips * flops_per_image / 1e9;
    let rss = peak_rss_mib();
    let threads = rayon::current_num_threads();
    if ranks.rank() != 0 {
        return Ok(());
    }
    if let Some(mut machine) = machine {
        print_kernel_choices();
        if a.json {
            machine["kernel_choices"] = kernel_choices_json();
            println!("{machine}");
        }
        return Ok(());
    }
    if a.profile {
        print_profile(a.steps, mean_step);
    }
    let measured = a.kernels == crate::train::KernelsArg::Measured && a.mode == BenchMode::Train;
    let stats = dist.as_ref().map(DataParallel::stats).unwrap_or_default();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "framework": "convnet", "model": label, "precision": precision.name(), "mode": format!("{:?}", a.mode).to_lowercase(),
                "batch_size": a.batch_size, "threads": threads, "step_ms": median * 1e3,
                "images_per_sec": ips, "gflops": gflops, "peak_rss_mib": rss,
                "mflop_per_image": flops_per_image / 1e6, "ranks": n,
                "comm_exposed_ms": comm * 1e3, "comm_share": comm / median,
                "gradient_buckets": stats.buckets, "gradient_mib": stats.bytes_per_step as f64 / (1 << 20) as f64,
                "kernels": KernelChoice::from(a.kernels).name(),
                "kernel_choices": if measured { kernel_choices_json() } else { serde_json::json!([]) },
            })
        );
    } else {
        let on = if n > 1 {
            format!("{n} ranks x {threads} threads")
        } else {
            format!("{threads} threads")
        };
        println!(
            "{} {:?} {precision} batch {} on {on}: {:.2} ms/step (median of {}), {:.0} images/s, {:.1} GFLOP/s ({:.1} MFLOP/image), peak RSS {:.0} MiB",
            label, a.mode, a.batch_size, median * 1e3, a.steps, ips, gflops, flops_per_image / 1e6, rss
        );
        if n > 1 && a.mode == BenchMode::Train {
            println!(
                "communication over {}: {:.3} ms/step not overlapped with computation ({:.1}% of the step); {} bucket(s), {:.2} MiB of gradients per step",
                ranks.description(),
                comm * 1e3,
                100.0 * comm / median,
                stats.buckets,
                stats.bytes_per_step as f64 / (1 << 20) as f64
            );
        }
        if measured {
            print_kernel_choices();
        }
    }
    Ok(())
}
