//! Micro-benchmarks of the convolution kernels (forward, input gradient, weight gradient) at
//! the layer shapes of seed-cnn and resnet20 (batch 64): the dispatched kernel (direct
//! AVX-512 where it applies), the im2col + GEMM path, and the naive reference.
//!
//! Run: `cargo bench -p convnet --bench conv` (never part of the test run).

use convnet::backend::cpu::conv::{
    conv2d_backward_input, conv2d_backward_input_col2im, conv2d_backward_weight,
    conv2d_backward_weight_gemm, conv2d_forward, conv2d_forward_im2col, conv2d_naive, ConvGeom,
};
use convnet::backend::cpu::winograd;
use convnet::shape::conv_out_size;
use convnet::Rng;
// The allocator the CLI trains with: freed buffers are reused without new page faults.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn geom(name: &str, n: usize, c: usize, hw: usize, k: usize, stride: usize) -> (String, ConvGeom) {
    let o = conv_out_size(hw, 3, stride, 1, 1).expect("valid");
    (
        name.to_string(),
        ConvGeom {
            n,
            c,
            h: hw,
            w: hw,
            k,
            kh: 3,
            kw: 3,
            oh: o,
            ow: o,
            stride: (stride, stride),
            padding: (1, 1),
            dilation: (1, 1),
            groups: 1,
        },
    )
}

fn shapes() -> Vec<(String, ConvGeom)> {
    vec![
        geom("seed-cnn conv1 3->32 @32", 64, 3, 32, 32, 1),
        geom("seed-cnn conv2 32->64 @16", 64, 32, 16, 64, 1),
        geom("resnet20 16->16 @32", 64, 16, 32, 16, 1),
        geom("resnet20 16->32 s2 @32", 64, 16, 32, 32, 2),
        geom("resnet20 32->64 s2 @16", 64, 32, 16, 64, 2),
        geom("resnet20 32->32 @16", 64, 32, 16, 32, 1),
        geom("resnet20 64->64 @8", 64, 64, 8, 64, 1),
    ]
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    for (name, g) in shapes() {
        let x: Vec<f32> = (0..g.n * g.c * g.h * g.w).map(|_| rng.normal()).collect();
        let w: Vec<f32> = (0..g.k * g.c * 9).map(|_| rng.normal()).collect();
        let dy: Vec<f32> = (0..g.n * g.k * g.oh * g.ow).map(|_| rng.normal()).collect();
        let mut group = c.benchmark_group(name.clone());
        group.throughput(Throughput::Elements(2 * g.macs() as u64)); // FLOPs: read as GFLOP/s
        group.sample_size(20);
        // "dispatched" is what training runs: the direct kernel where it applies.
        let mut y = vec![0f32; dy.len()];
        group.bench_function(BenchmarkId::new("forward", "dispatched"), |b| {
            b.iter(|| conv2d_forward(&x, &w, None, &g, &mut y))
        });
        group.bench_function(BenchmarkId::new("forward", "im2col+gemm"), |b| {
            b.iter(|| conv2d_forward_im2col(&x, &w, None, &g, &mut y))
        });
        let mut dx = vec![0f32; x.len()];
        group.bench_function(BenchmarkId::new("input_grad", "dispatched"), |b| {
            b.iter(|| conv2d_backward_input(&dy, &w, &g, &mut dx))
        });
        group.bench_function(BenchmarkId::new("input_grad", "im2col+gemm"), |b| {
            b.iter(|| conv2d_backward_input_col2im(&dy, &w, &g, &mut dx))
        });
        // Winograd's two forms, where they apply (candidates of `--kernels measured`).
        if winograd::nchw_possible(&g) {
            group.bench_function(BenchmarkId::new("forward", "winograd"), |b| {
                b.iter(|| winograd::forward_nchw(&x, &w, None, &g, &mut y))
            });
        }
        #[cfg(target_arch = "x86_64")]
        if convnet::backend::cpu::winograd_lanes::applies(&g) {
            use convnet::backend::cpu::winograd_lanes;
            group.bench_function(BenchmarkId::new("forward", "winograd-lanes"), |b| {
                b.iter(|| winograd_lanes::forward(&x, &w, None, &g, &mut y))
            });
            let mut dw = vec![0f32; w.len()];
            group.bench_function(BenchmarkId::new("weight_grad", "winograd-lanes"), |b| {
                b.iter(|| winograd_lanes::backward_weight(&x, &dy, &g, &mut dw))
            });
        }
        let mut dw = vec![0f32; w.len()];
        if winograd::nchw_weight_grad_possible(&g) {
            group.bench_function(BenchmarkId::new("weight_grad", "winograd"), |b| {
                b.iter(|| winograd::backward_weight_nchw(&x, &dy, &g, &mut dw))
            });
        }
        group.bench_function(BenchmarkId::new("weight_grad", "dispatched"), |b| {
            b.iter(|| conv2d_backward_weight(&x, &dy, &g, &mut dw))
        });
        group.bench_function(BenchmarkId::new("weight_grad", "im2col+gemm"), |b| {
            b.iter(|| conv2d_backward_weight_gemm(&x, &dy, &g, &mut dw))
        });
        // The naive reference computes all three at once; one image keeps it short.
        let one = ConvGeom { n: 1, ..g };
        let per = g.c * g.h * g.w;
        group.throughput(Throughput::Elements(3 * 2 * one.macs() as u64));
        group.bench_function(BenchmarkId::new("all_three", "naive, batch 1"), |b| {
            b.iter(|| conv2d_naive(&x[..per], &w, None, &dy[..g.k * g.oh * g.ow], &one))
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
