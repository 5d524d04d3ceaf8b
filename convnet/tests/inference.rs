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
    self, DirectConv, Epilogue, OutRows, PackedConv, PackedDepthwise, PackedLinear, Plane,
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
    for arch in convnet::models::ARCHITECTURES
        .iter()
        .filter(|a| a.input == convnet::models::InputKind::Image)
    {
        // ImageNet models at 64x64 keep the test fast; every layer kind still runs.
        let input = if arch.imagenet {
            [3, 64, 64]
        } else {
            <[usize; 3]>::try_from(arch.default_input).unwrap()
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

/// The batched linear kernel against a naive float64 product: output counts that fill one
/// part, several, and a ragged last part; one row (one thread) and batches split between
/// threads; with and without bias and activation.
#[test]
fn the_batched_linear_kernel_matches_the_naive_product() {
    let mut rng = Rng::new(5);
    for &(inputs, outputs, n) in &[
        (4096, 128, 64),
        (4096, 128, 1),
        (37, 70, 5),
        (128, 10, 3),
        (9, 200, 13),
        (1, 1, 2),
    ] {
        let w: Vec<f32> = (0..inputs * outputs).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..outputs).map(|_| rng.normal()).collect();
        let x: Vec<f32> = (0..n * inputs).map(|_| rng.normal()).collect();
        for (bias, act) in [(true, Some(Activation::Relu)), (false, None)] {
            let packed = PackedLinear::new(&w, bias.then_some(&b[..]), outputs);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| packed.forward(&x, n, act));
                let scale = (inputs as f64).sqrt();
                for r in 0..n {
                    for o in 0..outputs {
                        let mut want: f64 = if bias { b[o] as f64 } else { 0.0 };
                        for i in 0..inputs {
                            want += x[r * inputs + i] as f64 * w[o * inputs + i] as f64;
                        }
                        if act.is_some() {
                            want = want.max(0.0);
                        }
                        let v = got[r * outputs + o] as f64;
                        assert!(
                            (v - want).abs() <= 1e-5 * want.abs().max(scale),
                            "linear {inputs}->{outputs} n {n} threads {threads}: row {r} output {o}: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

/// Max pooling of float and byte planes (the vector paths and the portable one) against
/// a naive NCHW loop: padding, dilation, ceil-mode windows clipped at the edge, channel
/// counts that are not a multiple of the vector width, NaN winning as in PyTorch.
#[test]
fn max_pooling_of_planes_matches_the_naive_loop() {
    use convnet::backend::cpu::int8;
    use convnet::tensor::MaxPool2dParams;
    let mut rng = Rng::new(11);
    let cases = [
        (20, 9, 7, (2, 2), (2, 2), (0, 0), (1, 1), false),
        (70, 8, 8, (3, 3), (2, 2), (1, 1), (1, 1), true),
        (33, 10, 9, (3, 2), (1, 2), (1, 1), (2, 1), false),
    ];
    for (c, h, w, kernel, stride, padding, dilation, ceil_mode) in cases {
        let p = MaxPool2dParams {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        };
        let out_size = |n: usize, k: usize, s: usize, pad: usize, d: usize| {
            let span = n + 2 * pad - d * (k - 1) - 1;
            let mut o = if ceil_mode {
                span.div_ceil(s)
            } else {
                span / s
            } + 1;
            if ceil_mode && (o - 1) * s >= n + pad {
                o -= 1;
            }
            o
        };
        let oh = out_size(h, kernel.0, stride.0, padding.0, dilation.0);
        let ow = out_size(w, kernel.1, stride.1, padding.1, dilation.1);
        let mut x: Vec<f32> = (0..c * h * w).map(|_| rng.uniform(-3.0, 3.0)).collect();
        x[5] = f32::NAN;
        x[c * h * w / 2] = f32::NAN;
        let bytes: Vec<u8> = (0..c * h * w)
            .map(|_| (rng.uniform(0.0, 256.0) as u32).min(255) as u8)
            .collect();
        // Naive: every channel, every output, the taps inside the image.
        let naive = |get: &dyn Fn(usize) -> f32, init: f32| {
            let mut want = vec![init; c * oh * ow];
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut m = init;
                        for i in 0..kernel.0 {
                            for j in 0..kernel.1 {
                                let iy =
                                    (oy * stride.0 + i * dilation.0) as isize - padding.0 as isize;
                                let ix =
                                    (ox * stride.1 + j * dilation.1) as isize - padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let v = get((ch * h + iy as usize) * w + ix as usize);
                                if v > m || v.is_nan() {
                                    m = v;
                                }
                            }
                        }
                        want[(ch * oh + oy) * ow + ox] = m;
                    }
                }
            }
            want
        };
        let cs = c.div_ceil(16) * 16;
        let ip = Plane {
            h,
            w,
            c,
            cs,
            halo: 1,
        };
        let op = Plane {
            h: oh,
            w: ow,
            c,
            cs,
            halo: 0,
        };
        let want = naive(&|i| x[i], f32::NEG_INFINITY);
        for portable in [false, true] {
            let before = nhwc::force_portable(portable);
            let (xp, _) = plane_of(&x, c, h, w, cs, 1);
            let mut out = vec![0f32; op.len()];
            nhwc::max_pool_plane((&xp, ip), p, (&mut out, op));
            nhwc::force_portable(before);
            let got = unplane(&out, op);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan()),
                    "c {c} {kernel:?} portable {portable}: element {i}: {g} vs {e}"
                );
            }
        }
        let want = naive(&|i| bytes[i] as f32, 0.0);
        let mut bp = vec![0u8; ip.len()];
        nhwc::from_nchw(&bytes, (&mut bp, ip));
        let mut out = vec![0u8; op.len()];
        int8::max_pool_plane((&bp, ip), p, (&mut out, op));
        let mut got = vec![0u8; c * oh * ow];
        nhwc::to_nchw((&out, op), &mut got);
        let got: Vec<f32> = got.iter().map(|&v| v as f32).collect();
        assert_eq!(got, want, "bytes c {c} {kernel:?}");
    }
}
