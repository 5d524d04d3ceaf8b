//! The inference plan (BatchNorm folded, epilogues fused, channels-last kernels) gives the
//! logits of the layer-by-layer eval-mode model, for every zoo architecture and the
//! example model files, at batch 1 (rows split over threads) and batch 3 (images split);
//! and its kernels match a naive float64 convolution, on the AVX-512 and portable paths
//! (within 1e-5 of the larger of the value and the output's natural scale).
//!
//! Tolerance: every output within `1e-5 * max |reference|` of the model's own output (both
//! float32, summing in different orders, the plan with folded weights).

use convnet::backend::cpu::activation::Activation;
use convnet::backend::cpu::nhwc::{
    self, DirectConv, Epilogue, OutRows, PackedConv, PackedDepthwise, Plane,
};
use convnet::graph::{eval, fold};
use convnet::infer::Plan;
use convnet::model_file::ModelFile;
use convnet::nn::{Mode, Model};
use convnet::{Conv2dParams, Rng, Tensor};
use std::path::Path;

/// Gives every BatchNorm non-trivial statistics, so that folding is exercised.
fn perturb_batch_norms(model: &Model, rng: &mut Rng) {
    for (name, t) in model.state_dict() {
        let n = t.numel();
        let values: Option<Vec<f32>> = if name.ends_with("running_var") {
            Some((0..n).map(|_| rng.uniform(0.5, 2.0)).collect())
        } else if name.ends_with("running_mean")
            || name.ends_with("bn1.bias")
            || name.ends_with("bn2.bias")
        {
            Some((0..n).map(|_| rng.uniform(-0.3, 0.3)).collect())
        } else if name.contains("bn") && name.ends_with("weight") {
            Some((0..n).map(|_| rng.uniform(0.5, 1.5)).collect())
        } else {
            None
        };
        if let Some(v) = values {
            t.update_data(|d| d.copy_from_slice(&v)).unwrap();
        }
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * scale,
            "{what}: output {i}: {a} vs {b} (scale {scale})"
        );
    }
}

fn check_model(model: &Model, what: &str) {
    let mut rng = Rng::new(7);
    perturb_batch_norms(model, &mut rng);
    let plan = Plan::new(model).unwrap_or_else(|e| panic!("{what}: {e}"));
    let fused = fold::fuse(&model.graph().unwrap()).unwrap();
    for batch in [1, 3] {
        let mut dims = vec![batch];
        dims.extend_from_slice(model.input_shape());
        let x = Tensor::randn(dims, &mut rng);
        let want = convnet::no_grad(|| model.forward(&x, Mode::Eval)).unwrap();
        let got = plan.run(&x).unwrap();
        assert_eq!(got.dims(), want.dims(), "{what}");
        assert_close(
            &got.to_vec(),
            &want.to_vec(),
            &format!("{what}, plan, batch {batch}"),
        );
        // The fused graph itself, run with tensor ops.
        let graph_out =
            convnet::no_grad(|| eval::run(&fused, &x, &mut |_, _| Ok(eval::Visit::Keep))).unwrap();
        assert_close(
            &graph_out.to_vec(),
            &want.to_vec(),
            &format!("{what}, fused graph, batch {batch}"),
        );
        // A second run reuses the buffers: stale values must not leak in.
        let again = plan.run(&x).unwrap();
        assert_eq!(again.to_vec(), got.to_vec(), "{what}: second run");
    }
}

#[test]
fn the_plan_gives_the_model_logits_for_every_zoo_architecture() {
    for arch in convnet::models::ARCHITECTURES {
        // ImageNet models at 64x64 keep the test fast; every layer kind still runs.
        let input = if arch.imagenet {
            [3, 64, 64]
        } else {
            arch.default_input
        };
        convnet::manual_seed(3);
        let model = convnet::models::build(arch.name, input, 10).unwrap();
        check_model(&model, arch.name);
    }
    // MNIST-sized inputs (one channel; lenet5 pads its first convolution).
    for name in ["seed-cnn", "lenet5"] {
        let model = convnet::models::build(name, [1, 28, 28], 10).unwrap();
        check_model(&model, &format!("{name} 1x28x28"));
    }
}

#[test]
fn the_plan_gives_the_model_logits_for_the_example_model_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    for file in ["tutorial-cnn.toml", "small-resnet.toml", "mobile-cnn.json"] {
        let spec = ModelFile::from_path(&dir.join(file)).unwrap();
        convnet::manual_seed(5);
        let model = spec.build(spec.input.unwrap_or([3, 32, 32]), 10).unwrap();
        check_model(&model, file);
    }
}

#[test]
fn the_plan_covers_every_layer_kind_of_model_files() {
    // Average pooling with padding (counted and not), ceil-mode max pooling, dilation, a
    // 5x5 kernel with stride 2, an unfolded BatchNorm, GELU, leaky ReLU, sigmoid, and
    // softmax and tanh after flatten.
    let text = r#"
name = "kinds"
input = [3, 19, 23]
[[layer]]
type = "batchnorm2d"
[[layer]]
type = "conv2d"
out_channels = 20
kernel_size = 5
stride = 2
padding = 2
[[layer]]
type = "gelu"
[[layer]]
type = "maxpool2d"
kernel_size = 3
stride = 2
ceil_mode = true
[[layer]]
type = "conv2d"
out_channels = 33
kernel_size = 3
padding = 2
dilation = 2
[[layer]]
type = "leaky_relu"
negative_slope = 0.2
[[layer]]
type = "avgpool2d"
kernel_size = 3
stride = 1
padding = 1
count_include_pad = false
[[layer]]
type = "conv2d"
out_channels = 7
kernel_size = 1
[[layer]]
type = "sigmoid"
[[layer]]
type = "avgpool2d"
kernel_size = 2
padding = 1
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
out_features = 17
[[layer]]
type = "tanh"
[[layer]]
type = "linear"
out_features = "classes"
[[layer]]
type = "softmax"
dim = 1
"#;
    let spec = ModelFile::from_toml(text, "kinds.toml").unwrap();
    convnet::manual_seed(9);
    let model = spec.build([3, 19, 23], 5).unwrap();
    check_model(&model, "kinds");
}

#[test]
fn a_grouped_convolution_is_named_as_not_covered() {
    let text = r#"
name = "grouped"
[[layer]]
type = "conv2d"
out_channels = 8
kernel_size = 3
groups = 1
[[layer]]
type = "conv2d"
name = "grouped"
out_channels = 8
kernel_size = 3
groups = 2
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
out_features = "classes"
"#;
    let model = ModelFile::from_toml(text, "g.toml")
        .unwrap()
        .build([3, 8, 8], 2)
        .unwrap();
    let err = Plan::new(&model).unwrap_err().to_string();
    assert!(
        err.contains("grouped (Conv2d)") && err.contains("depthwise"),
        "{err}"
    );
}

/// A random NCHW image in a plane with a halo.
fn plane_of(x: &[f32], c: usize, h: usize, w: usize, cs: usize, halo: usize) -> (Vec<f32>, Plane) {
    let p = Plane { h, w, c, cs, halo };
    let mut buf = vec![0f32; p.len()];
    nhwc::from_nchw(x, (&mut buf, p));
    (buf, p)
}

fn unplane(buf: &[f32], p: Plane) -> Vec<f32> {
    let mut out = vec![0f32; p.c * p.h * p.w];
    nhwc::to_nchw((buf, p), &mut out);
    out
}

#[allow(clippy::too_many_arguments)]
fn check_conv(
    rng: &mut Rng,
    (c, h, w): (usize, usize, usize),
    k: usize,
    (kh, kw): (usize, usize),
    params: Conv2dParams,
    residual: bool,
    act: Option<Activation>,
    depthwise: bool,
) {
    let groups = if depthwise { c } else { 1 };
    let params = Conv2dParams { groups, ..params };
    let cg = c / groups;
    let x: Vec<f32> = (0..c * h * w).map(|_| rng.normal()).collect();
    let wt: Vec<f32> = (0..k * cg * kh * kw).map(|_| rng.normal()).collect();
    let bias: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
    let oh = (h + 2 * params.padding.0 - params.dilation.0 * (kh - 1) - 1) / params.stride.0 + 1;
    let ow = (w + 2 * params.padding.1 - params.dilation.1 * (kw - 1) - 1) / params.stride.1 + 1;
    let res: Vec<f32> = (0..k * oh * ow).map(|_| rng.normal()).collect();
    let want = nhwc::conv_reference(
        &x,
        (c, h, w),
        &wt,
        Some(&bias),
        (k, kh, kw),
        params,
        residual.then_some(res.as_slice()),
        act,
    );
    let cs_out = k.div_ceil(16) * 16;
    let cs_in = if depthwise { cs_out } else { c };
    let halo = params.padding.0.max(params.padding.1) + 1;
    let (input, ip) = plane_of(&x, c, h, w, cs_in, halo);
    let (rbuf, rp) = plane_of(&res, k, oh, ow, cs_out, 0);
    let op = Plane {
        h: oh,
        w: ow,
        c: k,
        cs: cs_out,
        halo: 1,
    };
    let geometry = DirectConv {
        input: ip,
        output: op,
        kernel: (kh, kw),
        stride: params.stride,
        padding: params.padding,
        dilation: params.dilation,
    };
    let epilogue = Epilogue {
        residual: residual.then_some((rbuf.as_slice(), rp)),
        act,
    };
    for portable in [false, true] {
        let before = nhwc::force_portable(portable);
        let mut out = vec![f32::NAN; op.len()];
        // Two calls over two row ranges, as the plan splits an image over threads.
        let mid = oh / 2;
        let (top, bottom) = OutRows::split(&mut out, op, mid);
        if depthwise {
            let packed = PackedDepthwise::new(&wt, Some(&bias), c, (kh, kw), cs_out);
            nhwc::depthwise_rows(&geometry, &packed, &input, epilogue, top, 0..mid);
            nhwc::depthwise_rows(&geometry, &packed, &input, epilogue, bottom, mid..oh);
        } else {
            let packed = PackedConv::new(&wt, Some(&bias), k, c, (kh, kw));
            nhwc::conv_rows(&geometry, &packed, &input, epilogue, top, 0..mid);
            nhwc::conv_rows(&geometry, &packed, &input, epilogue, bottom, mid..oh);
        }
        nhwc::force_portable(before);
        let got = unplane(&out, op);
        let what = format!(
            "conv {c}x{h}x{w} -> {k} k{kh}x{kw} {params:?} residual {residual} {act:?} depthwise {depthwise} portable {portable}"
        );
        // Relative to the output's natural scale: a sum of `terms` products of N(0, 1)
        // values has a standard deviation of sqrt(terms).
        let scale = ((cg * kh * kw) as f32).sqrt();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(scale),
                "{what}: output {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn direct_and_depthwise_kernels_match_the_naive_convolution() {
    let mut rng = Rng::new(11);
    let p = |s: usize, pad: (usize, usize), d: usize| Conv2dParams {
        stride: (s, s),
        padding: pad,
        dilation: (d, d),
        groups: 1,
    };
    // (input, out channels, kernel, params): every register tile (1 to 4 channel blocks,
    // pixel tails), strides, paddings, dilations, non-square kernels, odd channel counts.
    let cases = [
        ((3, 32, 32), 32, (3, 3), p(1, (1, 1), 1)),
        ((16, 32, 32), 16, (3, 3), p(1, (1, 1), 1)),
        ((16, 32, 32), 32, (3, 3), p(2, (1, 1), 1)),
        ((32, 16, 16), 64, (3, 3), p(2, (1, 1), 1)),
        ((64, 8, 8), 64, (3, 3), p(1, (1, 1), 1)),
        ((5, 13, 29), 40, (3, 5), p(1, (1, 2), 1)),
        ((7, 11, 9), 80, (1, 1), p(1, (0, 0), 1)),
        ((33, 9, 31), 10, (3, 3), p(1, (2, 2), 2)),
        ((4, 23, 17), 70, (7, 7), p(2, (3, 3), 1)),
        ((2, 6, 5), 3, (2, 3), p(3, (0, 1), 1)),
    ];
    for &(input, k, kernel, params) in &cases {
        for (residual, act) in [
            (false, None),
            (false, Some(Activation::Relu)),
            (true, Some(Activation::Relu)),
            (true, Some(Activation::Relu6)),
            (false, Some(Activation::Gelu)),
        ] {
            check_conv(&mut rng, input, k, kernel, params, residual, act, false);
        }
    }
    for &(c, kernel, params) in &[
        (32, (3, 3), p(1, (1, 1), 1)),
        (96, (3, 3), p(2, (1, 1), 1)),
        (20, (5, 5), p(1, (2, 2), 2)),
    ] {
        for (residual, act) in [(false, Some(Activation::Relu6)), (true, None)] {
            check_conv(
                &mut rng,
                (c, 14, 13),
                c,
                kernel,
                params,
                residual,
                act,
                true,
            );
        }
    }
}
