//! Micro-benchmarks of batch normalisation's passes at resnet20's first-stage shape
//! (`[64, 16, 32, 32]`): statistics, the normalising pass with each epilogue, and backward.
//!
//! Run: `cargo bench -p convnet --bench norm` (never part of the test run).

use convnet::backend::cpu::norm::{backward, batch_stats, normalize, Epilogue};
use convnet::Rng;
// The allocator the CLI trains with: freed buffers are reused without new page faults.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let (n, ch, hw) = (64, 16, 32 * 32);
    let mut rng = Rng::new(0);
    let mut data = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
    let (x, dy, res) = (data(n * ch * hw), data(n * ch * hw), data(n * ch * hw));
    let (mean, invstd) = (vec![0.1f32; ch], vec![0.9f32; ch]);
    let (w, b) = (data(ch), data(ch));
    let mut y = vec![0f32; x.len()];
    let mut group = c.benchmark_group("batch_norm2d [64, 16, 32, 32]");
    group.throughput(Throughput::Elements(x.len() as u64));
    group.sample_size(30);
    group.bench_function("batch_stats", |bch| bch.iter(|| batch_stats(&x, n, ch, hw)));
    for (name, epi) in [
        ("normalize", Epilogue::None),
        ("normalize+relu", Epilogue::Relu),
        ("normalize+add+relu", Epilogue::AddRelu(&res)),
    ] {
        group.bench_function(name, |bch| {
            bch.iter(|| normalize(&x, &mean, &invstd, Some(&w), Some(&b), ch, hw, epi, &mut y))
        });
    }
    for (name, epi) in [
        ("backward", Epilogue::None),
        ("backward+relu", Epilogue::Relu),
        ("backward+add+relu", Epilogue::AddRelu(&res)),
    ] {
        group.bench_function(name, |bch| {
            bch.iter(|| {
                backward(
                    &x,
                    &dy,
                    &mean,
                    &invstd,
                    Some(&w),
                    Some(&b),
                    n,
                    ch,
                    hw,
                    true,
                    epi,
                    true,
                    None,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
