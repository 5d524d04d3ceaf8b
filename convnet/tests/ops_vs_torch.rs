//! Every differentiable op, forward and backward, against PyTorch (float64 references from
//! float32 inputs, `tools/fixtures/gen.py`). Tolerance: rtol 1e-5, atol 1e-6 unless stated.

mod common;

use common::{assert_tensor_close, Fixture, ATOL, RTOL};
use convnet::{AvgPool2dParams, Conv2dParams, Device, MaxPool2dParams, Reduction, Rng, Tensor};

// One body per device (see `common::on_each_device`): each runs on the CPU and, built with
// the `cuda` feature on a machine with a GPU, on the GPU with the same fixtures and
// tolerances unless a body states wider ones.
on_each_device!(
    conv2d_forward_and_backward,
    max_pool2d_forward_and_backward,
    avg_pool2d_forward_and_backward,
    adaptive_avg_pool2d_forward_and_backward,
    linear_forward_and_backward,
    activations,
    cross_entropy_forward_and_backward,
    batch_norm2d_train_and_eval,
    batch_norm2d_relu_is_batch_norm_then_relu,
    batch_norm2d_add_relu_is_batch_norm_add_relu,
    relu_max_pool2d_is_relu_then_max_pool2d,
    matmul_forward_and_backward,
    broadcasting_arithmetic,
    softmax_and_log_softmax,
    nll_and_mse,
    shape_ops_and_reductions,
    reshape_of_a_permuted_view_gathers_and_backpropagates,
    dropout_masks_scales_and_backpropagates_through_the_mask,
);
use serde_json::Value;

fn pair(v: &Value) -> (usize, usize) {
    match v {
        Value::Array(a) => (
            a[0].as_u64().unwrap() as usize,
            a[1].as_u64().unwrap() as usize,
        ),
        n => {
            let k = n.as_u64().unwrap() as usize;
            (k, k)
        }
    }
}

fn targets(t: &Tensor) -> Vec<usize> {
    t.to_vec().iter().map(|&v| v as usize).collect()
}

/// Checks `y` and the gradients of `sum(y * gy)` (or of `y` itself when scalar) for the
/// given `(input, fixture name)` pairs.
fn check(fx: &Fixture, case: &str, y: &Tensor, inputs: &[(&Tensor, &str)], rtol: f32, atol: f32) {
    assert_tensor_close(&format!("{case}/y"), y, &fx.tensor(case, "y"), rtol, atol);
    let grads = match fx.try_tensor(case, "gy") {
        Some(gy) => y.backward_with(&gy).unwrap(),
        None => y.backward().unwrap(),
    };
    for (t, name) in inputs {
        let g = grads
            .get(t)
            .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
        assert_tensor_close(
            &format!("{case}/{name}"),
            g,
            &fx.tensor(case, name),
            rtol,
            atol,
        );
    }
}

fn conv2d_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let cases: Vec<String> = fx
        .cases()
        .into_iter()
        .filter(|c| c.starts_with("conv_"))
        .collect();
    assert!(cases.len() >= 8);
    for case in cases {
        let s = fx.settings(&case);
        let p = Conv2dParams {
            stride: pair(&s["stride"]),
            padding: pair(&s["padding"]),
            dilation: pair(&s["dilation"]),
            groups: s["groups"].as_u64().unwrap() as usize,
        };
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let w = fx.tensor_on(dev, &case, "w").requires_grad();
        let b = fx
            .try_tensor(&case, "b")
            .map(|b| b.to_device(dev).unwrap().requires_grad());
        let y = x.conv2d(&w, b.as_ref(), p).unwrap();
        let mut inputs = vec![(&x, "gx"), (&w, "gw")];
        if let Some(b) = &b {
            inputs.push((b, "gb"));
        }
        // Weight gradients sum N*OH*OW products (up to 256 here): rtol 1e-5 with atol 1e-5.
        check(&fx, &case, &y, &inputs, RTOL, 1e-5);
    }
}

/// A max-pool fixture case's parameters.
fn max_pool_params(s: &Value) -> MaxPool2dParams {
    MaxPool2dParams::new(s["kernel"].as_u64().unwrap() as usize)
        .stride(s["stride"].as_u64().unwrap() as usize)
        .padding(s["padding"].as_u64().unwrap() as usize)
        .dilation(s["dilation"].as_u64().unwrap() as usize)
        .ceil_mode(s["ceil_mode"].as_bool().unwrap())
}

fn max_pool2d_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in fx.cases().into_iter().filter(|c| c.starts_with("maxpool_")) {
        let p = max_pool_params(&fx.settings(&case));
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let y = x.max_pool2d(p).unwrap();
        // The forward is a selection: exact. Overlapping windows add gradients: default tolerance.
        assert_eq!(y.to_vec(), fx.tensor(&case, "y").to_vec(), "{case}/y");
        check(&fx, &case, &y, &[(&x, "gx")], RTOL, ATOL);
    }
}

fn avg_pool2d_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in fx.cases().into_iter().filter(|c| c.starts_with("avgpool_")) {
        let s = fx.settings(&case);
        let p = AvgPool2dParams::new(s["kernel"].as_u64().unwrap() as usize)
            .stride(s["stride"].as_u64().unwrap() as usize)
            .padding(s["padding"].as_u64().unwrap() as usize)
            .ceil_mode(s["ceil_mode"].as_bool().unwrap())
            .count_include_pad(s["count_include_pad"].as_bool().unwrap());
        let x = fx.tensor_on(dev, &case, "x").requires_grad();
        let y = x.avg_pool2d(p).unwrap();
        check(&fx, &case, &y, &[(&x, "gx")], RTOL, ATOL);
    }
}

fn adaptive_avg_pool2d_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in ["adaptive_3x4", "adaptive_1x1"] {
        let out = pair(&fx.settings(case)["out"]);
        let x = fx.tensor_on(dev, case, "x").requires_grad();
        let (h, w) = (x.dims()[2], x.dims()[3]);
        if dev != Device::Cpu && (h % out.0 != 0 || w % out.1 != 0) {
            // Uneven windows have no GPU kernel yet: a clear error, not a wrong answer.
            let err = x.adaptive_avg_pool2d(out).unwrap_err().to_string();
            assert!(err.contains("no CUDA kernel"), "{err}");
            continue;
        }
        let y = x.adaptive_avg_pool2d(out).unwrap();
        check(&fx, case, &y, &[(&x, "gx")], RTOL, ATOL);
    }
}

fn linear_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let x = fx.tensor_on(dev, "linear", "x").requires_grad();
    let w = fx.tensor_on(dev, "linear", "w").requires_grad();
    let b = fx.tensor_on(dev, "linear", "b").requires_grad();
    check(
        &fx,
        "linear",
        &x.linear(&w, Some(&b)).unwrap(),
        &[(&x, "gx"), (&w, "gw"), (&b, "gb")],
        RTOL,
        ATOL,
    );
    let x = fx
        .tensor_on(dev, "linear_nobias_batch1", "x")
        .requires_grad();
    let w = fx
        .tensor_on(dev, "linear_nobias_batch1", "w")
        .requires_grad();
    check(
        &fx,
        "linear_nobias_batch1",
        &x.linear(&w, None).unwrap(),
        &[(&x, "gx"), (&w, "gw")],
        RTOL,
        ATOL,
    );
}

fn matmul_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let a = fx.tensor_on(dev, "matmul", "a").requires_grad();
    let b = fx.tensor_on(dev, "matmul", "b").requires_grad();
    check(
        &fx,
        "matmul",
        &a.matmul(&b).unwrap(),
        &[(&a, "ga"), (&b, "gb")],
        RTOL,
        ATOL,
    );
}

fn broadcasting_arithmetic(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in [
        "add_same",
        "add_channel",
        "mul_channel",
        "sub_rows",
        "div_general",
        "mul_both_broadcast",
    ] {
        let a = fx.tensor_on(dev, case, "a").requires_grad();
        let b = fx.tensor_on(dev, case, "b").requires_grad();
        let y = match fx.settings(case)["kind"].as_str().unwrap() {
            "add" => a.add(&b),
            "sub" => a.sub(&b),
            "mul" => a.mul(&b),
            "div" => a.div(&b),
            k => panic!("unknown kind {k}"),
        }
        .unwrap();
        check(&fx, case, &y, &[(&a, "ga"), (&b, "gb")], RTOL, ATOL);
    }
}

fn activations(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for (case, f) in [
        (
            "act_relu",
            Tensor::relu as fn(&Tensor) -> convnet::Result<Tensor>,
        ),
        ("act_relu6", Tensor::relu6),
        ("act_sigmoid", Tensor::sigmoid),
        ("act_tanh", Tensor::tanh),
        ("act_gelu", Tensor::gelu),
    ] {
        let x = fx.tensor_on(dev, case, "x").requires_grad();
        check(&fx, case, &f(&x).unwrap(), &[(&x, "gx")], RTOL, ATOL);
    }
    let x = fx.tensor_on(dev, "act_leaky_relu", "x").requires_grad();
    check(
        &fx,
        "act_leaky_relu",
        &x.leaky_relu(0.1).unwrap(),
        &[(&x, "gx")],
        RTOL,
        ATOL,
    );
    let x = fx.tensor_on(dev, "act_gelu_tanh", "x").requires_grad();
    let y = x.activation(convnet::Activation::GeluTanh).unwrap();
    check(&fx, "act_gelu_tanh", &y, &[(&x, "gx")], RTOL, ATOL);
}

fn softmax_and_log_softmax(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let x = fx.tensor_on(dev, "softmax_dim1", "x").requires_grad();
    check(
        &fx,
        "softmax_dim1",
        &x.softmax(1).unwrap(),
        &[(&x, "gx")],
        RTOL,
        ATOL,
    );
    let x = fx.tensor_on(dev, "log_softmax_last", "x").requires_grad();
    check(
        &fx,
        "log_softmax_last",
        &x.log_softmax(-1).unwrap(),
        &[(&x, "gx")],
        RTOL,
        ATOL,
    );
}

fn cross_entropy_forward_and_backward(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in ["ce_mean", "ce_sum", "ce_smooth", "ce_none"] {
        let s = fx.settings(case);
        let red = match s["reduction"].as_str().unwrap() {
            "mean" => Reduction::Mean,
            "sum" => Reduction::Sum,
            _ => Reduction::None,
        };
        let x = fx.tensor_on(dev, case, "x").requires_grad();
        let t = targets(&fx.tensor(case, "t"));
        let y = x
            .cross_entropy(&t, red, s["label_smoothing"].as_f64().unwrap() as f32)
            .unwrap();
        check(&fx, case, &y, &[(&x, "gx")], RTOL, ATOL);
    }
}

fn nll_and_mse(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let x = fx.tensor_on(dev, "nll_mean", "x").requires_grad();
    let t = targets(&fx.tensor("nll_mean", "t"));
    check(
        &fx,
        "nll_mean",
        &x.nll_loss(&t, Reduction::Mean).unwrap(),
        &[(&x, "gx")],
        RTOL,
        ATOL,
    );
    for (case, red) in [("mse_mean", Reduction::Mean), ("mse_sum", Reduction::Sum)] {
        let a = fx.tensor_on(dev, case, "a").requires_grad();
        let b = fx.tensor_on(dev, case, "b").requires_grad();
        check(
            &fx,
            case,
            &a.mse_loss(&b, red).unwrap(),
            &[(&a, "ga"), (&b, "gb")],
            RTOL,
            ATOL,
        );
    }
}

/// The inputs of one batch-norm fixture case, plus a random residual of the input's shape.
struct BnCase {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    rm: Tensor,
    rv: Tensor,
    res: Tensor,
    training: bool,
}

/// Output, gradients (input, scale, shift, residual when it gets one) and running statistics
/// after `op` on a fresh copy of fixture case `case` and a backward pass with its `gy`.
type BnRun = (Vec<f32>, Vec<Option<Vec<f32>>>, Vec<f32>, Vec<f32>);

fn run_bn_case(
    dev: Device,
    fx: &Fixture,
    case: &str,
    op: impl Fn(&BnCase) -> convnet::Result<Tensor>,
) -> BnRun {
    let x = fx.tensor_on(dev, case, "x").requires_grad();
    let res = Tensor::randn(x.dims().to_vec(), &mut convnet::Rng::new(7));
    let c = BnCase {
        res: res.to_device(dev).unwrap().requires_grad(),
        x,
        w: fx.tensor_on(dev, case, "w").requires_grad(),
        b: fx.tensor_on(dev, case, "b").requires_grad(),
        rm: fx.tensor_on(dev, case, "rm"),
        rv: fx.tensor_on(dev, case, "rv"),
        training: fx.settings(case)["training"].as_bool().unwrap(),
    };
    let y = op(&c).unwrap();
    let grads = y.backward_with(&fx.tensor(case, "gy")).unwrap();
    let g = [&c.x, &c.w, &c.b, &c.res].map(|t| grads.get(t).map(|g| g.to_vec()));
    (y.to_vec(), g.to_vec(), c.rm.to_vec(), c.rv.to_vec())
}

/// Bit-for-bit on the CPU; on a GPU the fused and separate kernels may order their
/// reductions differently, so within float32 rounding.
fn assert_same_bn_run(dev: Device, case: &str, fused: &BnRun, apart: &BnRun) {
    if dev == Device::Cpu {
        assert_eq!(fused, apart, "{case}");
        return;
    }
    common::assert_close(&format!("{case}/y"), &fused.0, &apart.0, RTOL, ATOL);
    for (i, (f, a)) in fused.1.iter().zip(&apart.1).enumerate() {
        assert_eq!(f.is_some(), a.is_some(), "{case}: gradient {i}");
        if let (Some(f), Some(a)) = (f, a) {
            common::assert_close(&format!("{case}/grad{i}"), f, a, RTOL, ATOL);
        }
    }
    common::assert_close(&format!("{case}/rm"), &fused.2, &apart.2, RTOL, ATOL);
    common::assert_close(&format!("{case}/rv"), &fused.3, &apart.3, RTOL, ATOL);
}

/// The fused op gives the outputs and gradients of batch_norm2d then relu (bit-for-bit on
/// the CPU; both checked against PyTorch above and below).
fn batch_norm2d_relu_is_batch_norm_then_relu(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in ["bn_train", "bn_eval"] {
        let fused = run_bn_case(dev, &fx, case, |c| {
            c.x.batch_norm2d_relu(&c.rm, &c.rv, Some(&c.w), Some(&c.b), c.training, 0.1, 1e-5)
        });
        let apart = run_bn_case(dev, &fx, case, |c| {
            c.x.batch_norm2d(&c.rm, &c.rv, Some(&c.w), Some(&c.b), c.training, 0.1, 1e-5)?
                .relu()
        });
        assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v > 0.0));
        assert_same_bn_run(dev, case, &fused, &apart);
    }
}

/// The fused ReLU + max pooling that `Sequential` runs for `ReLU, MaxPool2d` gives the
/// values and input gradients of relu then max_pool2d, bit for bit, on every max-pool case
/// of the fixtures (padding, dilation, ceil mode, overlapping windows) with a random
/// upstream gradient, and on planes built to hit the edges: ties between positive values,
/// windows of negatives only, NaN, -0.0, -inf, and dilated windows with no input tap.
fn relu_max_pool2d_is_relu_then_max_pool2d(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let run = |x: &Tensor, p: MaxPool2dParams, fused: bool| {
        let x = x.detach().requires_grad();
        let y = if fused {
            x.relu_max_pool2d(p).unwrap()
        } else {
            x.relu().unwrap().max_pool2d(p).unwrap()
        };
        let g = Tensor::randn(y.dims().to_vec(), &mut Rng::new(7))
            .to_device(dev)
            .unwrap();
        let gx = y.backward_with(&g).unwrap().get(&x).unwrap().to_vec();
        (y.to_vec(), gx)
    };
    let same = |a: &[f32], b: &[f32], what: &str| {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(a), bits(b), "{what}");
    };
    let mut cases = Vec::new();
    for case in fx.cases().into_iter().filter(|c| c.starts_with("maxpool_")) {
        let p = max_pool_params(&fx.settings(&case));
        cases.push((case.clone(), fx.tensor_on(dev, &case, "x"), p));
    }
    // 2x2 windows over a 4x6 plane: [3 3 | -1 -2 | nan 1] / [1 2 | -3 -4 | 5 nan] rows, then
    // [-0 -0 | -inf -inf | 0 -1] / [-1 -0 | -inf -5 | -2 0].
    let edges = vec![
        3.,
        3.,
        -1.,
        -2.,
        f32::NAN,
        1.,
        1.,
        2.,
        -3.,
        -4.,
        5.,
        f32::NAN, //
        -0.,
        -0.,
        f32::NEG_INFINITY,
        f32::NEG_INFINITY,
        0.,
        -1.,
        -1.,
        -0.,
        f32::NEG_INFINITY,
        -5.,
        -2.,
        0.,
    ];
    let edges = Tensor::from_vec(edges, [1, 1, 4, 6])
        .unwrap()
        .to_device(dev)
        .unwrap();
    cases.push(("edges 2x2".into(), edges.clone(), MaxPool2dParams::new(2)));
    cases.push((
        "edges 3x3 s1 p1".into(),
        edges.clone(),
        MaxPool2dParams::new(3).stride(1).padding(1),
    ));
    cases.push((
        "edges 2x2 ceil".into(),
        edges,
        MaxPool2dParams::new(4).ceil_mode(true),
    ));
    // Padding 1 and dilation 3 on a 2x2 plane: the one window's taps (-1 and 2 in each
    // direction) all miss the input, so its output is -inf, and must stay so.
    let no_tap = MaxPool2dParams::new(2).stride(1).padding(1).dilation(3);
    let tiny = Tensor::from_vec(vec![-1., 2., -3., 4.], [1, 1, 2, 2]).unwrap();
    let tiny = tiny.to_device(dev).unwrap();
    assert_eq!(
        tiny.relu_max_pool2d(no_tap).unwrap().to_vec(),
        vec![f32::NEG_INFINITY]
    );
    cases.push(("no tap".into(), tiny, no_tap));
    for (name, x, p) in cases {
        let (y, gx) = run(&x, p, true);
        let (y_ref, gx_ref) = run(&x, p, false);
        same(&y, &y_ref, &format!("{name}/y"));
        same(&gx, &gx_ref, &format!("{name}/gx"));
    }
}

/// The fused end of a residual block gives the outputs and gradients (input, scale, shift
/// and residual) of batch_norm2d, add, relu (bit-for-bit on the CPU).
fn batch_norm2d_add_relu_is_batch_norm_add_relu(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in ["bn_train", "bn_eval"] {
        let fused = run_bn_case(dev, &fx, case, |c| {
            let (w, b) = (Some(&c.w), Some(&c.b));
            c.x.batch_norm2d_add_relu(&c.res, &c.rm, &c.rv, w, b, c.training, 0.1, 1e-5)
        });
        let apart = run_bn_case(dev, &fx, case, |c| {
            c.x.batch_norm2d(&c.rm, &c.rv, Some(&c.w), Some(&c.b), c.training, 0.1, 1e-5)?
                .add(&c.res)?
                .relu()
        });
        assert!(fused.0.contains(&0.0) && fused.0.iter().any(|&v| v > 0.0));
        let dres = fused.1[3].as_ref().expect("the residual gets a gradient");
        assert!(dres.contains(&0.0) && dres.iter().any(|&v| v != 0.0));
        assert_same_bn_run(dev, case, &fused, &apart);
    }
}

#[test]
fn batch_norm2d_add_relu_rejects_a_residual_of_another_shape() {
    let x = Tensor::zeros([2, 3, 4, 4]);
    let (m, v) = (Tensor::zeros([3]), Tensor::ones([3]));
    let err = x
        .batch_norm2d_add_relu(
            &Tensor::zeros([2, 3, 4, 5]),
            &m,
            &v,
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[2, 3, 4, 5]") && err.contains("[2, 3, 4, 4]"),
        "{err}"
    );
}

fn batch_norm2d_train_and_eval(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    for case in ["bn_train", "bn_eval"] {
        let s = fx.settings(case);
        let training = s["training"].as_bool().unwrap();
        let x = fx.tensor_on(dev, case, "x").requires_grad();
        let w = fx.tensor_on(dev, case, "w").requires_grad();
        let b = fx.tensor_on(dev, case, "b").requires_grad();
        let rm = fx.tensor_on(dev, case, "rm");
        let rv = fx.tensor_on(dev, case, "rv");
        let y = x
            .batch_norm2d(&rm, &rv, Some(&w), Some(&b), training, 0.1, 1e-5)
            .unwrap();
        check(
            &fx,
            case,
            &y,
            &[(&x, "gx"), (&w, "gw"), (&b, "gb")],
            RTOL,
            ATOL,
        );
        assert_tensor_close(
            &format!("{case}/rm_after"),
            &rm,
            &fx.tensor(case, "rm_after"),
            RTOL,
            ATOL,
        );
        assert_tensor_close(
            &format!("{case}/rv_after"),
            &rv,
            &fx.tensor(case, "rv_after"),
            RTOL,
            ATOL,
        );
    }
}

fn shape_ops_and_reductions(dev: Device) {
    let fx = Fixture::load("ops.safetensors");
    let x = fx.tensor_on(dev, "permute", "x").requires_grad();
    let y = x.permute(&[0, 2, 3, 1]).unwrap();
    assert!(y.shares_storage(&x), "permute is a view");
    check(&fx, "permute", &y, &[(&x, "gx")], 0.0, 0.0);

    let a = fx.tensor_on(dev, "concat_dim1", "a").requires_grad();
    let b = fx.tensor_on(dev, "concat_dim1", "b").requires_grad();
    check(
        &fx,
        "concat_dim1",
        &Tensor::concat(&[a.clone(), b.clone()], 1).unwrap(),
        &[(&a, "ga"), (&b, "gb")],
        0.0,
        0.0,
    );

    let x = fx.tensor_on(dev, "sum_dims_keepdim", "x").requires_grad();
    check(
        &fx,
        "sum_dims_keepdim",
        &x.sum(&[1, 3], true).unwrap(),
        &[(&x, "gx")],
        RTOL,
        ATOL,
    );
    let x = fx.tensor_on(dev, "mean_dim0", "x").requires_grad();
    check(
        &fx,
        "mean_dim0",
        &x.mean(&[0], false).unwrap(),
        &[(&x, "gx")],
        RTOL,
        ATOL,
    );
    let x = fx.tensor_on(dev, "reshape", "x").requires_grad();
    let y = x.reshape([6, 20]).unwrap();
    assert!(y.shares_storage(&x), "reshape of contiguous data is a view");
    check(&fx, "reshape", &y, &[(&x, "gx")], 0.0, 0.0);
    let x = fx
        .tensor_on(dev, "subsample_pad_channels", "x")
        .requires_grad();
    check(
        &fx,
        "subsample_pad_channels",
        &x.subsample_pad_channels(2, 2, 8).unwrap(),
        &[(&x, "gx")],
        0.0,
        0.0,
    );
}

fn reshape_of_a_permuted_view_gathers_and_backpropagates(dev: Device) {
    // permute -> reshape (non-contiguous) -> weighted sum; gradient must undo both.
    let x = Tensor::from_vec((0..24).map(|v| v as f32).collect(), [2, 3, 4])
        .unwrap()
        .to_device(dev)
        .unwrap()
        .requires_grad();
    let y = x.permute(&[2, 0, 1]).unwrap().reshape([4, 6]).unwrap();
    assert_eq!(&y.to_vec()[..6], &[0., 4., 8., 12., 16., 20.]);
    let w = Tensor::from_vec((0..24).map(|v| v as f32).collect(), [4, 6])
        .unwrap()
        .to_device(dev)
        .unwrap();
    let grads = y.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(&x).unwrap().to_vec();
    // x[i, j, k] lands at y[k, i*3 + j], weighted by w at that position.
    for i in 0..2 {
        for j in 0..3 {
            for k in 0..4 {
                assert_eq!(g[(i * 3 + j) * 4 + k], (k * 6 + i * 3 + j) as f32);
            }
        }
    }
}

fn dropout_masks_scales_and_backpropagates_through_the_mask(dev: Device) {
    let mut rng = convnet::Rng::new(5);
    let x = Tensor::ones([100_000])
        .to_device(dev)
        .unwrap()
        .requires_grad();
    let y = x.dropout(0.3, true, &mut rng).unwrap();
    let v = y.to_vec();
    let zeros = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
    assert!((zeros - 0.3).abs() < 0.01, "dropped fraction {zeros}");
    assert!(v.iter().all(|&e| e == 0.0 || (e - 1.0 / 0.7).abs() < 1e-6));
    let g = y
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
        .get(&x)
        .unwrap()
        .to_vec();
    assert_eq!(g, v, "gradient of sum(dropout(ones)) is the mask itself");
    assert_eq!(
        x.dropout(0.3, false, &mut rng).unwrap().to_vec(),
        x.to_vec(),
        "identity in eval"
    );
}
