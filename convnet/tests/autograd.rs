//! Graph mechanics: only needed gradients are computed and kept, gradients of tensors used
//! more than once are summed, and no_grad records nothing.

use convnet::{no_grad, Conv2dParams, Rng, Tensor};

/// The profiler is process-wide: the tests that read it take turns.
static PROFILER: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn only_the_leaves_that_need_a_gradient_get_one() {
    let x = Tensor::randn([2, 3, 5, 5], &mut Rng::new(0)); // data: no gradient
    let w = Tensor::randn([4, 3, 3, 3], &mut Rng::new(1)).requires_grad();
    let frozen_bias = Tensor::randn([4], &mut Rng::new(2)); // frozen parameter
    let loss = x
        .conv2d(&w, Some(&frozen_bias), Conv2dParams::default())
        .unwrap()
        .relu()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(
        grads.len(),
        1,
        "only w: no input, no frozen bias, no intermediate gradients are kept"
    );
    assert!(grads.get(&w).is_some());
    assert!(grads.get(&x).is_none() && grads.get(&frozen_bias).is_none());
}

#[test]
fn a_tensor_used_twice_sums_its_gradients() {
    // y = x*x + x  =>  dy/dx = 2x + 1 (the residual-connection pattern).
    let x = Tensor::from_vec(vec![-1.5, 0.0, 2.0], [3])
        .unwrap()
        .requires_grad();
    let y = x.mul(&x).unwrap().add(&x).unwrap().sum_all().unwrap();
    let g = y.backward().unwrap().get(&x).unwrap().to_vec();
    assert_eq!(g, vec![-2.0, 1.0, 5.0]);
}

#[test]
fn no_grad_records_no_graph() {
    let w = Tensor::ones([3]).requires_grad();
    let y = no_grad(|| w.scale(2.0)).unwrap();
    assert!(!y.tracks_grad() && y.is_leaf());
    assert!(
        convnet::is_grad_enabled(),
        "the flag is restored afterwards"
    );
    assert!(y.sum_all().unwrap().backward().is_err());
}

/// Large activations and gradients reuse the buffers of earlier tensors without zeroing
/// them first; that is only correct if every kernel given such a buffer writes all of it.
/// Before each run of a block (conv with a 3-channel input, conv, BN + residual + ReLU, conv
/// with stride 2; forward and backward), NaN-filled tensors of the block's sizes are freed so
/// that the run's buffers come from them: an element a kernel leaves unwritten stays NaN.
/// Both runs must be finite and equal.
#[test]
fn recycled_buffers_never_leak_earlier_values() {
    let params = Conv2dParams::default().padding(1);
    let mut rng = Rng::new(9);
    let w0 = Tensor::randn([16, 3, 3, 3], &mut rng).requires_grad();
    let w1 = Tensor::randn([16, 16, 3, 3], &mut rng).requires_grad();
    let w2 = Tensor::randn([32, 16, 3, 3], &mut rng).requires_grad();
    let (gamma, beta) = (
        Tensor::ones([16]).requires_grad(),
        Tensor::zeros([16]).requires_grad(),
    );
    let poison = || {
        // 8 images: every activation and gradient is above the size that is recycled.
        let many: Vec<Tensor> = (0..40)
            .flat_map(|_| {
                [
                    Tensor::full(f32::NAN, [8, 16, 32, 32]),
                    Tensor::full(f32::NAN, [8, 32, 16, 16]),
                ]
            })
            .collect();
        drop(many);
    };
    let run = |x: &Tensor| {
        poison();
        let h = x.conv2d(&w0, None, params).unwrap();
        let c = h.conv2d(&w1, None, params).unwrap();
        let (m, v) = (Tensor::zeros([16]), Tensor::ones([16]));
        let y = c
            .batch_norm2d_add_relu(&h, &m, &v, Some(&gamma), Some(&beta), true, 0.1, 1e-5)
            .unwrap();
        let z = y.conv2d(&w2, None, params.stride(2)).unwrap();
        let grads = z.sum_all().unwrap().backward().unwrap();
        let g = |t: &Tensor| grads.get(t).unwrap().to_vec();
        (z.to_vec(), g(&w0), g(&w1), g(&w2), g(&gamma), g(&beta))
    };
    let x = Tensor::randn([8, 3, 32, 32], &mut Rng::new(1));
    let (first, again) = (run(&x), run(&x));
    for (i, part) in [&first.0, &first.1, &first.2, &first.3, &first.4, &first.5]
        .iter()
        .enumerate()
    {
        assert!(
            part.iter().all(|v| v.is_finite()),
            "part {i} has a non-finite value"
        );
    }
    assert_eq!(first, again);
}

#[test]
fn sequential_runs_relu_then_max_pool_as_one_op_with_the_same_gradients() {
    use convnet::nn::{Conv2d, MaxPool2d, Mode, Module, ReLU, Sequential};
    let net = Sequential::new()
        .add("conv", Conv2d::new(3, 4, 3).padding(1).build().unwrap())
        .add("relu", ReLU)
        .add("pool", MaxPool2d::new(2));
    let x = Tensor::randn([2, 3, 6, 6], &mut Rng::new(3));
    let params: Vec<Tensor> = convnet::nn::named_parameters(&net)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let weight = params[0].clone();
    let grad_of_weight = |y: Tensor| {
        let g = Tensor::randn(y.dims().to_vec(), &mut Rng::new(4));
        (
            y.to_vec(),
            y.backward_with(&g).unwrap().get(&weight).unwrap().to_vec(),
        )
    };
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    convnet::profile::enable(true);
    let fused = grad_of_weight(net.forward(&x, Mode::Train).unwrap());
    let keys: Vec<String> = convnet::profile::rows()
        .into_iter()
        .map(|r| r.key)
        .collect();
    convnet::profile::enable(false);
    assert!(
        keys.iter()
            .any(|k| k.starts_with("relu_max_pool2d [2, 4, 6, 6]")),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("relu ") && k.contains("[2, 4, 6, 6]")),
        "no separate ReLU: {keys:?}"
    );
    let apart = x
        .conv2d(&weight, params.get(1), Conv2dParams::default().padding(1))
        .unwrap()
        .relu()
        .unwrap()
        .max_pool2d(convnet::MaxPool2dParams::new(2))
        .unwrap();
    assert_eq!(fused, grad_of_weight(apart));
}

/// `conv2d_relu_max_pool2d` (one op, the convolution's output never stored) against the
/// three ops apart, bit for bit: values and the gradients of the input, weight and bias, on
/// 16-wide rows with the 2x2 pooling, 8-wide row pairs, and a 3x3 / stride-2 / padded
/// pooling; a 5x5 kernel (no fused kernel) runs the three ops.
#[test]
fn conv_relu_max_pool_in_one_op_matches_the_three_ops() {
    use convnet::MaxPool2dParams;
    let overlapping = MaxPool2dParams {
        kernel: (3, 3),
        stride: (2, 2),
        padding: (1, 1),
        dilation: (1, 1),
        ceil_mode: false,
    };
    for (i, &(c, k, side, kernel, pool)) in [
        (3, 8, 32, 3, MaxPool2dParams::new(2)),
        (8, 12, 16, 3, overlapping),
        (4, 8, 8, 3, MaxPool2dParams::new(2)),
        (3, 4, 16, 5, MaxPool2dParams::new(2)),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::new(20 + i as u64);
        let x = Tensor::randn([2, c, side, side], &mut rng).requires_grad();
        let w = Tensor::randn([k, c, kernel, kernel], &mut rng).requires_grad();
        let b = Tensor::randn([k], &mut rng).requires_grad();
        let conv = Conv2dParams::default().padding(kernel / 2);
        let run = |y: Tensor| {
            let g = Tensor::randn(y.dims().to_vec(), &mut Rng::new(7));
            let grads = y.backward_with(&g).unwrap();
            let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            [
                bits(&y),
                bits(grads.get(&x).unwrap()),
                bits(grads.get(&w).unwrap()),
                bits(grads.get(&b).unwrap()),
            ]
        };
        let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
        convnet::profile::enable(true);
        let fused = run(x.conv2d_relu_max_pool2d(&w, Some(&b), conv, pool).unwrap());
        let keys: Vec<String> = convnet::profile::rows()
            .into_iter()
            .map(|r| r.key)
            .collect();
        convnet::profile::enable(false);
        let apart = x
            .conv2d(&w, Some(&b), conv)
            .unwrap()
            .relu()
            .unwrap()
            .max_pool2d(pool)
            .unwrap();
        assert_eq!(fused, run(apart), "case {i}");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // Only this case's ops: tests running alongside may record theirs.
            let weight = format!("w[{k}, {c}, {kernel}, {kernel}]");
            let one_op = keys
                .iter()
                .any(|key| key.contains(&weight) && key.ends_with("+relu+max_pool"));
            assert_eq!(one_op, kernel == 3, "case {i}: {keys:?}");
        }
    }
}

/// A `Sequential` of a convolution, a ReLU and max pooling (seed-cnn's stages) runs them as
/// one op.
#[test]
fn sequential_runs_conv_relu_max_pool_as_one_op() {
    use convnet::nn::{Conv2d, MaxPool2d, Mode, Module, ReLU, Sequential};
    let net = Sequential::new()
        .add("conv", Conv2d::new(3, 8, 3).padding(1).build().unwrap())
        .add("relu", ReLU)
        .add("pool", MaxPool2d::new(2));
    let x = Tensor::randn([2, 3, 32, 32], &mut Rng::new(3));
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    convnet::profile::enable(true);
    let y = net.forward(&x, Mode::Train).unwrap();
    let keys: Vec<String> = convnet::profile::rows()
        .into_iter()
        .map(|r| r.key)
        .collect();
    convnet::profile::enable(false);
    assert_eq!(y.dims(), &[2, 8, 16, 16]);
    // Only this network's ops (its input and the convolution's output shape): tests running
    // alongside may record theirs while the profiler is on.
    let mine: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains("[2, 3, 32, 32]") || k.contains("[2, 8, 32, 32]"))
        .collect();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(
            mine.len() == 1 && mine[0].ends_with("+relu+max_pool"),
            "{keys:?}"
        );
    }
}
