//! bf16 mixed precision (`convnet::autocast`) on whole models: a ResNet's logits and every
//! parameter gradient under `Precision::Bf16` stay within bf16's rounding of the float32
//! ones (and differ from them, so the bf16 kernels did run), the backward pass follows the
//! forward pass's precision, and training in bf16 learns as float32 does. On CPUs without
//! AVX512-BF16 the tests check the refusal instead.

use convnet::autocast::{autocast, precision, Precision};
use convnet::nn::Mode;
use convnet::tensor::Reduction;
use convnet::{models, Rng, Tensor};

/// The tests seed the global generator and build models from it: one at a time.
static GLOBAL_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Logits and gradients of one step of `name` on a fixed batch, in `p`.
fn step(name: &str, p: Precision) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    convnet::manual_seed(3);
    let model = models::build(name, [3, 32, 32], 10).unwrap();
    let mut rng = Rng::new(9);
    let x = Tensor::randn([8, 3, 32, 32], &mut rng);
    let labels: Vec<usize> = (0..8).map(|i| i % 10).collect();
    let logits = autocast(p, || model.forward(&x, Mode::Train))
        .unwrap()
        .unwrap();
    // The backward pass runs outside the scope: each op recorded its precision.
    assert_eq!(precision(), Precision::F32);
    let loss = logits.cross_entropy(&labels, Reduction::Mean, 0.0).unwrap();
    let grads = loss.backward().unwrap();
    let named = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, grads.get(&t).expect("a gradient").to_vec()))
        .collect();
    (logits.to_vec(), named)
}

#[test]
fn bf16_gradients_stay_within_rounding_of_float32() {
    let _one_at_a_time = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = Precision::Bf16.check_supported() {
        let message = e.to_string();
        assert!(message.contains("AVX512-BF16"), "{message}");
        assert!(autocast(Precision::Bf16, || ()).is_err());
        eprintln!("{message}: checked the refusal only");
        return;
    }
    for name in ["resnet20", "seed-cnn"] {
        let (logits32, grads32) = step(name, Precision::F32);
        let (logits16, grads16) = step(name, Precision::Bf16);
        let e = relative_error(&logits16, &logits32);
        // bf16 keeps 8 significant bits (relative rounding 2^-9 per operand).
        assert!(e > 1e-5 && e < 2e-2, "{name} logits: relative error {e}");
        for ((n, g16), (_, g32)) in grads16.iter().zip(&grads32) {
            let e = relative_error(g16, g32);
            // Rounding errors grow layer by layer towards the input, where the gradients of a
            // freshly initialised ResNet on 8 images largely cancel: PyTorch's CPU autocast
            // measures 0.31 on resnet20's conv1 and up to 0.42 elsewhere on this test's batch
            // (convnet: 0.26 and 0.37; it keeps the products' results in float32).
            assert!(e < 0.5, "{name} {n}: relative error {e}");
            if n.ends_with("weight") && g32.len() > 64 {
                assert!(e > 1e-6, "{name} {n}: identical to float32 ({e})");
            }
        }
    }
}

#[test]
fn training_in_bf16_learns_like_float32() {
    let _one_at_a_time = GLOBAL_RNG.lock().unwrap_or_else(|e| e.into_inner());
    if Precision::Bf16.check_supported().is_err() {
        return;
    }
    // A linearly separable task: the class is the sign pattern of two input channels.
    let train = |p: Precision| -> f32 {
        convnet::manual_seed(1);
        let model = models::build("seed-cnn", [3, 32, 32], 4).unwrap();
        let mut opt = convnet::optim::Sgd::new(
            model.named_parameters(),
            convnet::optim::SgdConfig {
                lr: 0.02,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        let mut rng = Rng::new(2);
        let mut last = 0.0;
        for _ in 0..30 {
            let mut x = Tensor::randn([16, 3, 32, 32], &mut rng).to_vec();
            let labels: Vec<usize> = (0..16).map(|i| i % 4).collect();
            for (i, &l) in labels.iter().enumerate() {
                for c in 0..2 {
                    let sign = if (l >> c) & 1 == 1 { 1.0 } else { -1.0 };
                    let plane = &mut x[(i * 3 + c) * 1024..(i * 3 + c + 1) * 1024];
                    plane.iter_mut().for_each(|v| *v = *v * 0.5 + sign);
                }
            }
            let x = Tensor::from_vec(x, [16, 3, 32, 32]).unwrap();
            let logits = autocast(p, || model.forward(&x, Mode::Train))
                .unwrap()
                .unwrap();
            let loss = logits.cross_entropy(&labels, Reduction::Mean, 0.0).unwrap();
            last = loss.to_vec()[0];
            let grads = loss.backward().unwrap();
            use convnet::optim::Optimizer;
            opt.step(&grads).unwrap();
        }
        last
    };
    let (l32, l16) = (train(Precision::F32), train(Precision::Bf16));
    assert!(l32 < 0.2, "float32 did not learn: {l32}");
    assert!(l16 < 0.2, "bf16 did not learn: {l16} (float32 {l32})");
}
