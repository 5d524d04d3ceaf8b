//! Observers, quantization and fake quantization against PyTorch
//! (`tools/fixtures/quant.py`): scales and zero points exactly equal, histograms and their
//! searched ranges exactly equal, fake-quantized values and their straight-through
//! gradients exactly equal.

mod common;

use common::Fixture;
use convnet::quant::fake;
use convnet::quant::observer::{
    calculate_qparams, Histogram, MinMax, MovingAverage, MovingAveragePerChannel, PerChannelMinMax,
    QParams, QRange, Scheme,
};
use convnet::Tensor;

fn range_scheme(s: &serde_json::Value) -> (QRange, Scheme) {
    let range = QRange {
        min: s["quant_min"].as_i64().unwrap() as i32,
        max: s["quant_max"].as_i64().unwrap() as i32,
    };
    let scheme = if s["qscheme"].as_str().unwrap().contains("symmetric") {
        Scheme::Symmetric
    } else {
        Scheme::Affine
    };
    (range, scheme)
}

fn batches(fx: &Fixture, case: &str) -> Vec<Vec<f32>> {
    (0..)
        .map_while(|i| fx.try_tensor(case, &format!("x{i}")).map(|t| t.to_vec()))
        .collect()
}

fn scalar(fx: &Fixture, case: &str, name: &str) -> f32 {
    fx.tensor(case, name).to_vec()[0]
}

fn assert_qparams(got: &[QParams], fx: &Fixture, case: &str) {
    let scale = fx.tensor(case, "scale").to_vec();
    let zp = fx.tensor(case, "zero_point").to_vec();
    assert_eq!(got.len(), scale.len(), "{case}");
    for (i, q) in got.iter().enumerate() {
        assert_eq!(
            q.scale.to_bits(),
            scale[i].to_bits(),
            "{case}: scale {i}: {} vs {}",
            q.scale,
            scale[i]
        );
        assert_eq!(q.zero_point, zp[i] as i32, "{case}: zero point {i}");
    }
}

#[test]
fn min_max_observers_choose_pytorchs_parameters() {
    let fx = Fixture::load("quant.safetensors");
    for case in fx.cases().into_iter().filter(|c| c.starts_with("minmax_")) {
        let s = fx.settings(&case);
        let (range, scheme) = range_scheme(&s);
        let mut o = MinMax::default();
        let (mins, maxs) = (
            fx.tensor(&case, "min_val_steps").to_vec(),
            fx.tensor(&case, "max_val_steps").to_vec(),
        );
        for (i, x) in batches(&fx, &case).iter().enumerate() {
            o.observe(x);
            assert_eq!((o.min, o.max), (mins[i], maxs[i]), "{case}: step {i}");
        }
        assert_qparams(&[o.qparams(range, scheme)], &fx, &case);
    }
}

#[test]
fn per_channel_and_moving_average_observers_choose_pytorchs_parameters() {
    let fx = Fixture::load("quant.safetensors");
    for case in [
        "perchannel_symmetric_i8_conv",
        "perchannel_symmetric_i8_linear",
    ] {
        let (range, scheme) = range_scheme(&fx.settings(case));
        let mut o = PerChannelMinMax::default();
        let mins = fx.tensor(case, "min_val_steps");
        let channels = mins.dims()[1];
        for (i, x) in batches(&fx, case).iter().enumerate() {
            o.observe(x, channels);
            assert_eq!(
                o.min,
                mins.to_vec()[i * channels..(i + 1) * channels].to_vec(),
                "{case}: step {i}"
            );
        }
        assert_qparams(&o.qparams(range, scheme), &fx, case);
    }
    let case = "moving_average_u8";
    let s = fx.settings(case);
    let (range, scheme) = range_scheme(&s);
    let mut o = MovingAverage::new(s["averaging_constant"].as_f64().unwrap() as f32);
    let (mins, maxs) = (
        fx.tensor(case, "min_val_steps").to_vec(),
        fx.tensor(case, "max_val_steps").to_vec(),
    );
    for (i, x) in batches(&fx, case).iter().enumerate() {
        o.observe(x);
        assert_eq!(
            (o.min.to_bits(), o.max.to_bits()),
            (mins[i].to_bits(), maxs[i].to_bits()),
            "{case}: step {i}"
        );
    }
    assert_qparams(&[o.qparams(range, scheme)], &fx, case);
    let case = "moving_average_perchannel_i8";
    let s = fx.settings(case);
    let (range, scheme) = range_scheme(&s);
    let mut o = MovingAveragePerChannel::new(s["averaging_constant"].as_f64().unwrap() as f32);
    let mins = fx.tensor(case, "min_val_steps");
    let channels = mins.dims()[1];
    for (i, x) in batches(&fx, case).iter().enumerate() {
        o.observe(x, channels);
        let want = &mins.to_vec()[i * channels..(i + 1) * channels];
        assert_eq!(
            o.min.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{case}: step {i}"
        );
    }
    assert_qparams(&o.qparams(range, scheme), &fx, case);
}

#[test]
fn the_histogram_observer_matches_pytorch_bin_for_bin() {
    let fx = Fixture::load("quant.safetensors");
    for case in fx
        .cases()
        .into_iter()
        .filter(|c| c.starts_with("histogram_"))
    {
        let s = fx.settings(&case);
        let (range, scheme) = range_scheme(&s);
        let mut o = Histogram::new(s["bins"].as_u64().unwrap() as usize);
        let xs = batches(&fx, &case);
        if xs.is_empty() {
            // A stored state: only the search is checked.
            o.histogram = fx.tensor(&case, "histogram").to_vec();
            o.min = scalar(&fx, &case, "min_val");
            o.max = scalar(&fx, &case, "max_val");
        }
        for (i, x) in xs.iter().enumerate() {
            o.observe(x);
            if let Some(steps) = fx.try_tensor(&case, "histogram_steps") {
                let bins = o.histogram.len();
                let want = &steps.to_vec()[i * bins..(i + 1) * bins];
                let diff = o.histogram.iter().zip(want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    diff, 0,
                    "{case}: histogram after batch {i}: {diff} bins differ"
                );
            }
        }
        assert_eq!(
            o.histogram,
            fx.tensor(&case, "histogram").to_vec(),
            "{case}: histogram"
        );
        assert_eq!(
            (o.min, o.max),
            (scalar(&fx, &case, "min_val"), scalar(&fx, &case, "max_val")),
            "{case}"
        );
        let (lo, hi) = o.search_range(256);
        assert_eq!(
            (lo.to_bits(), hi.to_bits()),
            (
                scalar(&fx, &case, "search_min").to_bits(),
                scalar(&fx, &case, "search_max").to_bits()
            ),
            "{case}: searched range {lo} {hi} vs {:?}",
            fx.tensor(&case, "search_bins").to_vec()
        );
        assert_qparams(&[o.qparams(range, scheme)], &fx, &case);
    }
}

#[test]
fn percentile_ranges_clip_the_stated_fraction() {
    // 100,000 evenly spread values: the 99.9% range drops 50 values at each end, to
    // within one of the 2048 bins.
    let x: Vec<f32> = (0..100_000).map(|i| i as f32 / 1000.0).collect();
    let mut o = Histogram::default();
    o.observe(&x);
    let (lo, hi) = o.percentile_range(0.999);
    let bin = 100.0 / 2048.0;
    assert!(
        (lo - 0.05).abs() <= bin && (hi - 99.95).abs() <= bin,
        "{lo} {hi}"
    );
    assert_eq!(o.percentile_range(1.0), (0.0, o.max));
}

#[test]
fn quantize_matches_pytorch() {
    let fx = Fixture::load("quant.safetensors");
    for case in ["quantize_per_tensor", "quantize_per_tensor_zp200"] {
        let s = fx.settings(case);
        let q = QParams {
            scale: s["scale"].as_f64().unwrap() as f32,
            zero_point: s["zero_point"].as_i64().unwrap() as i32,
        };
        let got = fake::quantize(&fx.tensor(case, "x").to_vec(), q, QRange::U8);
        let want: Vec<i32> = fx
            .tensor(case, "q")
            .to_vec()
            .iter()
            .map(|&v| v as i32)
            .collect();
        assert_eq!(got, want, "{case}");
    }
    let case = "quantize_per_channel";
    let w = fx.tensor(case, "w");
    let (scales, zps) = (
        fx.tensor(case, "scales").to_vec(),
        fx.tensor(case, "zero_points").to_vec(),
    );
    let per = w.numel() / scales.len();
    let want: Vec<i32> = fx
        .tensor(case, "q")
        .to_vec()
        .iter()
        .map(|&v| v as i32)
        .collect();
    for (c, chunk) in w.to_vec().chunks(per).enumerate() {
        let q = QParams {
            scale: scales[c],
            zero_point: zps[c] as i32,
        };
        assert_eq!(
            fake::quantize(chunk, q, QRange::I8),
            want[c * per..(c + 1) * per].to_vec(),
            "{case}: channel {c}"
        );
    }
}

#[test]
fn fake_quantization_and_its_gradient_match_pytorch() {
    let fx = Fixture::load("quant.safetensors");
    for case in [
        "fake_quant_per_tensor_u8",
        "fake_quant_per_tensor_i8",
        "fake_quant_per_tensor_u8_pow2",
    ] {
        let s = fx.settings(case);
        let q = QParams {
            scale: s["scale"].as_f64().unwrap() as f32,
            zero_point: s["zero_point"].as_i64().unwrap() as i32,
        };
        let range = QRange {
            min: s["quant_min"].as_i64().unwrap() as i32,
            max: s["quant_max"].as_i64().unwrap() as i32,
        };
        let x = fx.tensor(case, "x").requires_grad();
        let y = x.fake_quantize(q, range).unwrap();
        let bits = |t: &Tensor| t.to_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y), bits(&fx.tensor(case, "y")), "{case}: forward");
        let g = y.backward_with(&fx.tensor(case, "gy")).unwrap();
        assert_eq!(
            bits(g.get(&x).unwrap()),
            bits(&fx.tensor(case, "gx")),
            "{case}: gradient"
        );
    }
    let case = "fake_quant_per_channel";
    let (scales, zps) = (
        fx.tensor(case, "scales").to_vec(),
        fx.tensor(case, "zero_points").to_vec(),
    );
    let qs: Vec<QParams> = scales
        .iter()
        .zip(&zps)
        .map(|(&scale, &z)| QParams {
            scale,
            zero_point: z as i32,
        })
        .collect();
    let w = fx.tensor(case, "w").requires_grad();
    let y = w.fake_quantize_per_channel(&qs, QRange::I8).unwrap();
    assert_eq!(y.to_vec(), fx.tensor(case, "y").to_vec(), "{case}: forward");
    let g = y.backward_with(&fx.tensor(case, "gy")).unwrap();
    assert_eq!(
        g.get(&w).unwrap().to_vec(),
        fx.tensor(case, "gw").to_vec(),
        "{case}: gradient"
    );
}

#[test]
fn qparams_edge_cases() {
    // Never observed: PyTorch's defaults.
    let q = calculate_qparams(f32::INFINITY, f32::NEG_INFINITY, QRange::U8, Scheme::Affine);
    assert_eq!((q.scale, q.zero_point), (1.0, 0));
    // A zero range gets the smallest scale, not zero.
    let q = calculate_qparams(0.0, 0.0, QRange::I8, Scheme::Symmetric);
    assert_eq!((q.scale, q.zero_point), (f32::EPSILON, 0));
}

/// PyTorch's `ConvBn2d` / `ConvBnReLU2d` QAT forward and backward (BatchNorm folded into
/// fake-quantized weights, training-mode BatchNorm, then frozen statistics), given PyTorch's
/// weight quantization: outputs within 2e-6, gradients within 1e-5 (PyTorch's float32
/// convolution sums in another order), running statistics within 1e-6.
#[test]
fn qat_conv_bn_matches_pytorch() {
    use convnet::graph::{Graph, Node, Op};
    use convnet::shape::Shape;
    let fx = Fixture::load("quant.safetensors");
    for case in ["qat_convbn", "qat_convbnrelu"] {
        let s = fx.settings(case);
        let relu = case.ends_with("relu");
        for step in ["step0", "step1", "step2"] {
            let t = |n: &str| fx.tensor(case, &format!("{step}.{n}"));
            let weight = t("weight").requires_grad();
            let (gamma, beta) = (t("bn_weight").requires_grad(), t("bn_bias").requires_grad());
            let before = |n: &str| {
                fx.try_tensor(case, &format!("{step}.{n}_before"))
                    .unwrap_or_else(|| t(n))
            };
            let (mean, var) = (before("running_mean"), before("running_var"));
            let p = s["padding"].as_u64().unwrap() as usize;
            let params = convnet::Conv2dParams {
                padding: (p, p),
                ..Default::default()
            };
            let mut g = Graph::new(&[3, 6, 6]);
            let conv = Node {
                name: "conv".into(),
                op: Op::Conv2d {
                    weight: weight.clone(),
                    bias: None,
                    params,
                    act: None,
                },
                inputs: vec![g.input()],
                shape: Shape::new([1, 4, 6, 6]),
            };
            let bn = Node {
                name: "bn".into(),
                op: Op::BatchNorm2d {
                    weight: gamma.clone(),
                    bias: beta.clone(),
                    mean: mean.clone(),
                    var: var.clone(),
                    eps: s["bn_eps"].as_f64().unwrap() as f32,
                    momentum: s["bn_momentum"].as_f64().unwrap() as f32,
                    batches: Tensor::scalar(0.0),
                },
                inputs: vec![],
                shape: Shape::new([1, 4, 6, 6]),
            };
            let _ = &mut g;
            let scales = t("w_scale").to_vec();
            let zps = t("w_zero_point").to_vec();
            let qs: Vec<QParams> = scales
                .iter()
                .zip(&zps)
                .map(|(&scale, &z)| QParams {
                    scale,
                    zero_point: z as i32,
                })
                .collect();
            let train = step != "step2";
            let x = t("x").requires_grad();
            let mut y =
                convnet::quant::qat::conv_bn_forward(&x, &conv, &bn, train, &|_| Ok(qs.clone()))
                    .unwrap();
            if relu {
                y = y.relu().unwrap();
            }
            let close = |what: &str, got: &Tensor, want: &Tensor, tol: f32| {
                for (i, (a, b)) in got.to_vec().iter().zip(want.to_vec()).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * (1.0 + b.abs()),
                        "{case} {step} {what}[{i}]: {a} vs {b}"
                    );
                }
            };
            close("y", &y, &t("y"), 2e-6);
            if !train {
                continue;
            }
            let grads = y.backward_with(&t("gy")).unwrap();
            close("gx", grads.get(&x).unwrap(), &t("gx"), 1e-5);
            close("gw", grads.get(&weight).unwrap(), &t("gw"), 1e-5);
            close(
                "g_bn_weight",
                grads.get(&gamma).unwrap(),
                &t("g_bn_weight"),
                1e-5,
            );
            close(
                "g_bn_bias",
                grads.get(&beta).unwrap(),
                &t("g_bn_bias"),
                1e-5,
            );
            close("running_mean", &mean, &t("running_mean"), 1e-6);
            close("running_var", &var, &t("running_var"), 1e-6);
        }
    }
}
