//! The GPU against the CPU on inputs larger than the PyTorch fixtures: single ops at the
//! sizes of real networks, and whole training steps of every kind of zoo architecture.
//!
//! Needs the `cuda` feature and a GPU; the tests are ignored otherwise (run them with
//! `cargo test -p convnet --features cuda --test cuda_vs_cpu -- --ignored`). With
//! `cuda-emulator` they run on the kernel emulator instead.
//!
//! Tolerance: rtol 1e-4, atol 1e-5. cuDNN and cuBLAS sum products in another order than the
//! CPU kernels (both in float32, no TF32), so single ops differ by a few float32 roundings
//! of sums over up to ~10^4 products, and training steps compound that through the weights.
#![cfg(feature = "cuda")]

mod common;

use common::assert_close;
use convnet::nn::{Mode, Model};
use convnet::optim::{Optimizer, Sgd, SgdConfig};
use convnet::{Conv2dParams, Device, MaxPool2dParams, Reduction, Rng, Tensor};

/// GPU 0, or the kernel emulator in `cuda-emulator` builds (which run these tests in CI at
/// the same sizes, so that the tests themselves are known to work before a GPU runs them).
#[cfg(not(feature = "cuda-emulator"))]
const GPU: Device = Device::Cuda(0);
#[cfg(feature = "cuda-emulator")]
const GPU: Device = Device::Cuda(convnet::backend::cuda::emulator::ORDINAL);
const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

fn random(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape.to_vec(), &mut Rng::new(seed))
}

/// Runs `f` on leaf copies of `inputs` on each device, backpropagates `sum(y * gy)` with a
/// random `gy`, and compares the outputs and every input's gradient.
fn compare(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> convnet::Result<Tensor>) {
    compare_within(what, inputs, ATOL, f)
}

/// [`compare`] with an absolute tolerance for outputs that are sums of many products.
fn compare_within(
    what: &str,
    inputs: &[Tensor],
    atol: f32,
    f: impl Fn(&[Tensor]) -> convnet::Result<Tensor>,
) {
    let run = |dev: Device| {
        let xs: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.to_device(dev).unwrap().requires_grad())
            .collect();
        let y = f(&xs).unwrap();
        let gy = random(y.dims(), 99).to_device(dev).unwrap();
        let grads = y.backward_with(&gy).unwrap();
        let g: Vec<Vec<f32>> = xs.iter().map(|x| grads.get(x).unwrap().to_vec()).collect();
        assert_eq!(y.device(), dev, "{what}: output device");
        (y.to_vec(), g)
    };
    let (cpu_y, cpu_g) = run(Device::Cpu);
    let (gpu_y, gpu_g) = run(GPU);
    assert_close(&format!("{what}/y"), &gpu_y, &cpu_y, RTOL, atol);
    for (i, (g, c)) in gpu_g.iter().zip(&cpu_g).enumerate() {
        assert_close(&format!("{what}/grad{i}"), g, c, RTOL, atol);
    }
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn convolutions_at_network_sizes() {
    for (what, x, w, p) in [
        (
            "3x3 s1",
            [16, 32, 32, 32],
            [64, 32, 3, 3],
            Conv2dParams::default().padding(1),
        ),
        (
            "3x3 s2",
            [16, 32, 32, 32],
            [64, 32, 3, 3],
            Conv2dParams::default().padding(1).stride(2),
        ),
        (
            "7x7 s2 stem",
            [4, 3, 64, 64],
            [16, 3, 7, 7],
            Conv2dParams::default().padding(3).stride(2),
        ),
        (
            "1x1",
            [16, 64, 16, 16],
            [128, 64, 1, 1],
            Conv2dParams::default(),
        ),
        (
            "depthwise",
            [8, 32, 16, 16],
            [32, 1, 3, 3],
            Conv2dParams::default().padding(1).groups(32),
        ),
        (
            "dilated",
            [4, 8, 20, 20],
            [8, 8, 3, 3],
            Conv2dParams::default().padding(2).dilation(2),
        ),
    ] {
        let inputs = [random(&x, 1), random(&w, 2), random(&[w[0]], 3)];
        compare(what, &inputs, |t| t[0].conv2d(&t[1], Some(&t[2]), p));
    }
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn pooling_linear_and_loss_at_network_sizes() {
    compare(
        "max_pool 3x3/2 pad 1",
        &[random(&[8, 16, 33, 33], 4)],
        |t| t[0].max_pool2d(MaxPool2dParams::new(3).stride(2).padding(1)),
    );
    compare("global average", &[random(&[32, 64, 8, 8], 5)], |t| {
        t[0].adaptive_avg_pool2d((1, 1))
    });
    // Weights of a real layer's scale (1/sqrt(fan_in)): outputs and input gradients of order
    // 1; the weight gradient sums 256 products of order 1, hence the wider absolute bound.
    let inputs = [
        random(&[256, 1024], 6),
        random(&[512, 1024], 7).scale(1.0 / 32.0).unwrap(),
        random(&[512], 8),
    ];
    compare_within("linear", &inputs, 1e-4, |t| t[0].linear(&t[1], Some(&t[2])));
    let labels: Vec<usize> = (0..256).map(|i| (i * 7) % 100).collect();
    compare("cross_entropy", &[random(&[256, 100], 9)], |t| {
        t[0].cross_entropy(&labels, Reduction::Mean, 0.1)
    });
    for act in [
        convnet::Activation::Relu,
        convnet::Activation::Relu6,
        convnet::Activation::Sigmoid,
        convnet::Activation::Tanh,
        convnet::Activation::Gelu,
    ] {
        compare(act.name(), &[random(&[64, 1000], 10)], |t| {
            t[0].activation(act)
        });
    }
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn batch_norm_epilogues_at_network_sizes() {
    let shape = [32, 64, 16, 16];
    for training in [true, false] {
        let stats = || (random(&[64], 11).scale(0.1).unwrap(), Tensor::ones([64]));
        let run = |dev: Device, fused: u8| {
            let (m, v) = stats();
            let (m, v) = (m.to_device(dev).unwrap(), v.to_device(dev).unwrap());
            let xs: Vec<Tensor> = [
                random(&shape, 12),
                random(&[64], 13),
                random(&[64], 14),
                random(&shape, 15),
            ]
            .iter()
            .map(|t| t.to_device(dev).unwrap().requires_grad())
            .collect();
            let (w, b) = (Some(&xs[1]), Some(&xs[2]));
            let y = match fused {
                0 => xs[0].batch_norm2d(&m, &v, w, b, training, 0.1, 1e-5),
                1 => xs[0].batch_norm2d_relu(&m, &v, w, b, training, 0.1, 1e-5),
                _ => xs[0].batch_norm2d_add_relu(&xs[3], &m, &v, w, b, training, 0.1, 1e-5),
            }
            .unwrap();
            let gy = random(&shape, 16).to_device(dev).unwrap();
            let grads = y.backward_with(&gy).unwrap();
            let mut out = vec![y.to_vec(), m.to_vec(), v.to_vec()];
            out.extend(xs.iter().filter_map(|x| grads.get(x).map(Tensor::to_vec)));
            out
        };
        for fused in 0..3 {
            let (c, g) = (run(Device::Cpu, fused), run(GPU, fused));
            assert_eq!(c.len(), g.len());
            for (i, (a, b)) in g.iter().zip(&c).enumerate() {
                assert_close(
                    &format!("bn fused {fused} training {training} #{i}"),
                    a,
                    b,
                    RTOL,
                    ATOL,
                );
            }
        }
    }
}

/// Builds zoo model `name` twice from one seed, moves one copy to the GPU, runs `steps` SGD
/// steps with momentum and weight decay on both (dropout draws the same masks: the global
/// generator is reseeded before each forward), and compares losses and final weights.
fn train_on_both(name: &str, input: [usize; 3], batch: usize, steps: usize) {
    // The process-wide generator is reseeded below: one model at a time.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let build = || {
        convnet::manual_seed(3);
        convnet::models::build(name, input, 10).unwrap()
    };
    let (cpu, gpu): (Model, Model) = (build(), build());
    gpu.to_device(GPU).unwrap();
    assert_eq!(gpu.device(), GPU);
    let cfg = SgdConfig {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
        ..Default::default()
    };
    let mut opts = [
        Sgd::new(cpu.named_parameters(), cfg).unwrap(),
        Sgd::new(gpu.named_parameters(), cfg).unwrap(),
    ];
    let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    let mut dims = vec![batch];
    dims.extend(input);
    for step in 0..steps {
        let x = random(&dims, 20 + step as u64);
        let mut losses = [0f32; 2];
        for (k, (model, dev)) in [(&cpu, Device::Cpu), (&gpu, GPU)].into_iter().enumerate() {
            convnet::manual_seed(100 + step as u64);
            let logits = model
                .forward(&x.to_device(dev).unwrap(), Mode::Train)
                .unwrap();
            let loss = logits.cross_entropy(&labels, Reduction::Mean, 0.0).unwrap();
            losses[k] = loss.item().unwrap();
            let grads = loss.backward().unwrap();
            opts[k].step(&grads).unwrap();
        }
        assert_close(
            &format!("{name} loss at step {step}"),
            &losses[1..],
            &losses[..1],
            RTOL,
            ATOL,
        );
    }
    for ((n, c), (_, g)) in cpu.state_dict().into_iter().zip(gpu.state_dict()) {
        assert_close(&format!("{name}/{n}"), &g.to_vec(), &c.to_vec(), 1e-3, 1e-4);
    }
    let x = random(&dims, 7);
    let eval = |m: &Model, dev: Device| {
        convnet::no_grad(|| m.forward(&x.to_device(dev).unwrap(), Mode::Eval))
            .unwrap()
            .to_vec()
    };
    assert_close(
        &format!("{name} eval logits"),
        &eval(&gpu, GPU),
        &eval(&cpu, Device::Cpu),
        1e-3,
        1e-4,
    );
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn seed_cnn_and_lenet_train_like_the_cpu() {
    train_on_both("seed-cnn", [3, 32, 32], 16, 3);
    train_on_both("lenet5", [1, 28, 28], 16, 3);
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn cifar_resnet_and_vgg_train_like_the_cpu() {
    train_on_both("resnet20", [3, 32, 32], 16, 3);
    train_on_both("vgg11-bn", [3, 32, 32], 8, 2);
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn torchvision_architectures_train_like_the_cpu() {
    train_on_both("resnet18", [3, 64, 64], 4, 2);
    // One step: with BatchNorm over four images, fifty layers are chaotic (a 1e-6 nudge of
    // one weight moves the loss 5% by the second step, CPU against CPU).
    train_on_both("resnet50-cifar", [3, 32, 32], 4, 1);
    // MobileNetV2 likewise: two CPU runs whose matrix products differ only in rounding (the
    // same products, summed in another order) end one step 1.1e-7 apart in the first
    // layer's weights and two steps 2.4e-4 apart.
    train_on_both("mobilenet_v2", [3, 64, 64], 4, 1);
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn mixed_devices_and_uneven_adaptive_pooling_are_clear_errors() {
    let x = random(&[4, 6], 1).to_device(GPU).unwrap();
    let err = x.add(&random(&[4, 6], 2)).unwrap_err().to_string();
    assert!(err.contains("different devices"), "{err}");
    let x = random(&[1, 2, 7, 7], 3).to_device(GPU).unwrap();
    let err = x.adaptive_avg_pool2d((3, 3)).unwrap_err().to_string();
    assert!(err.contains("no CUDA kernel"), "{err}");
}

#[test]
#[cfg_attr(not(feature = "cuda-emulator"), ignore = "needs a CUDA GPU")]
fn general_ops_at_larger_sizes() {
    compare(
        "broadcast mul",
        &[random(&[32, 64, 8, 8], 1), random(&[64, 1, 1], 2)],
        |t| t[0].mul(&t[1]),
    );
    compare(
        "broadcast div",
        &[
            random(&[16, 32], 3),
            random(&[1, 32], 4).affine(0.1, 2.0).unwrap(),
        ],
        |t| t[0].div(&t[1]),
    );
    compare("softmax", &[random(&[64, 1000], 5)], |t| t[0].softmax(-1));
    compare("log_softmax dim 1", &[random(&[8, 20, 6, 6], 6)], |t| {
        t[0].log_softmax(1)
    });
    compare("sum dims", &[random(&[16, 8, 12, 12], 7)], |t| {
        t[0].sum(&[0, 2], true)
    });
    compare(
        "matmul",
        &[random(&[128, 256], 8), random(&[256, 64], 9)],
        |t| t[0].matmul(&t[1]),
    );
    compare("permute then reshape", &[random(&[4, 6, 8, 10], 10)], |t| {
        t[0].permute(&[0, 2, 3, 1])?.reshape([4 * 8 * 10, 6])
    });
}
