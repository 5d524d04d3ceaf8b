//! The int8 convolution kernels (AVX512-VNNI, AVX2 without saturation, portable) are exact
//! against a naive integer convolution with the same epilogue — including inputs of 255
//! against weights of -128 everywhere, which saturate a `vpmaddubsw` path — and reproduce
//! PyTorch's quantized `conv2d` and `linear` (fbgemm) bit for bit
//! (`tools/fixtures/quant.py`).

mod common;

use common::Fixture;
use convnet::backend::cpu::activation::Activation;
use convnet::backend::cpu::int8::{
    self, ConvQuant, Int8Conv, Int8Kernel, Int8Out, PackedInt8, ReferenceOut,
};
use convnet::backend::cpu::nhwc::{self, Plane};
use convnet::{Conv2dParams, Rng};

const PATHS: [Int8Kernel; 4] = [
    Int8Kernel::Amx,
    Int8Kernel::Vnni512,
    Int8Kernel::Avx2,
    Int8Kernel::Portable,
];

/// What one case runs.
struct Case<'a> {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    kernel: (usize, usize),
    params: Conv2dParams,
    x: &'a [u8],
    weights: &'a [i8],
    q: ConvQuant<'a>,
    output: Output<'a>,
}

enum Output<'a> {
    Bytes {
        zero_point: i32,
        clamp: (i32, i32),
        residual: Option<(&'a [u8], f32, i32)>,
    },
    Floats(Option<Activation>),
}

/// Runs `case` on `path` (split into two row ranges) and returns bytes or floats in NCHW.
fn run(case: &Case, path: Int8Kernel) -> (Vec<u8>, Vec<f32>) {
    let (kh, kw) = case.kernel;
    let p = case.params;
    let oh = (case.h + 2 * p.padding.0 - p.dilation.0 * (kh - 1) - 1) / p.stride.0 + 1;
    let ow = (case.w + 2 * p.padding.1 - p.dilation.1 * (kw - 1) - 1) / p.stride.1 + 1;
    // The inference plan's channel stride (a multiple of 16) is the one the AMX tiles need;
    // the other paths take the narrowest they allow.
    let cs_in = if path == Int8Kernel::Amx {
        case.c.div_ceil(16) * 16
    } else {
        case.c.div_ceil(4) * 4
    };
    let halo = p.padding.0.max(p.padding.1);
    let ip = Plane {
        h: case.h,
        w: case.w,
        c: case.c,
        cs: cs_in,
        halo,
    };
    let mut input = vec![case.q.input.1 as u8; ip.len()];
    nhwc::from_nchw(case.x, (&mut input, ip));
    // Garbage in the padding channels must not matter (their weights are zero).
    for px in input.chunks_mut(cs_in) {
        for v in &mut px[case.c..] {
            *v = 0xA5;
        }
    }
    let cs_out = case.k.div_ceil(16) * 16;
    let op = Plane {
        h: oh,
        w: ow,
        c: case.k,
        cs: cs_out,
        halo: 0,
    };
    let conv = Int8Conv {
        input: ip,
        output: op,
        stride: p.stride,
        padding: p.padding,
        dilation: p.dilation,
    };
    let packed = PackedInt8::new(case.weights, case.k, case.c, case.kernel, &case.q, path);
    let mid = oh / 2;
    match &case.output {
        Output::Bytes {
            zero_point,
            clamp,
            residual,
        } => {
            let res_plane = residual.map(|(r, ratio, zr)| {
                let mut buf = vec![0u8; op.len()];
                nhwc::from_nchw(r, (&mut buf, op));
                (buf, ratio, zr)
            });
            let mut out = vec![0u8; op.len()];
            let split = op.at(mid as isize, 0);
            let (top, bottom) = out.split_at_mut(split);
            for (data, offset, rows) in [(top, 0, 0..mid), (bottom, split, mid..oh)] {
                let residual = res_plane
                    .as_ref()
                    .map(|(b, ratio, zr)| (b.as_slice(), op, *ratio, *zr));
                int8::conv_rows(
                    &conv,
                    &packed,
                    &input,
                    Int8Out::Bytes {
                        data,
                        offset,
                        zero_point: *zero_point,
                        clamp: *clamp,
                        residual,
                    },
                    rows,
                );
            }
            let mut nchw = vec![0u8; case.k * oh * ow];
            nhwc::to_nchw((&out, op), &mut nchw);
            (nchw, Vec::new())
        }
        Output::Floats(act) => {
            let mut out = vec![0f32; op.len()];
            int8::conv_rows(
                &conv,
                &packed,
                &input,
                Int8Out::Floats {
                    data: &mut out,
                    offset: 0,
                    act: *act,
                },
                0..oh,
            );
            let mut nchw = vec![0f32; case.k * oh * ow];
            nhwc::to_nchw((&out, op), &mut nchw);
            (Vec::new(), nchw)
        }
    }
}

fn reference(case: &Case) -> (Vec<u8>, Vec<f32>) {
    let out = match &case.output {
        Output::Bytes {
            zero_point,
            clamp,
            residual,
        } => ReferenceOut::Bytes {
            zero_point: *zero_point,
            clamp: *clamp,
            residual: *residual,
        },
        Output::Floats(act) => ReferenceOut::Floats { act: *act },
    };
    int8::conv_reference(
        case.x,
        (case.c, case.h, case.w),
        case.weights,
        (case.k, case.kernel.0, case.kernel.1),
        case.params,
        &case.q,
        out,
    )
}

fn check_all_paths(case: &Case, what: &str) {
    let want = reference(case);
    let mut ran = 0;
    for path in PATHS {
        if !path.available() {
            continue;
        }
        ran += 1;
        let got = run(case, path);
        assert_eq!(got.0, want.0, "{what}: {path:?} bytes");
        // Floats: the same operations in the same order, so equal bits.
        assert_eq!(got.1, want.1, "{what}: {path:?} floats");
    }
    assert!(ran >= 1);
}

fn params(stride: usize, padding: usize, dilation: usize) -> Conv2dParams {
    Conv2dParams {
        stride: (stride, stride),
        padding: (padding, padding),
        dilation: (dilation, dilation),
        groups: 1,
    }
}

#[test]
fn every_path_is_exact_against_the_integer_reference() {
    let mut rng = Rng::new(3);
    let shapes = [
        ((3, 32, 32), 16, (3, 3), params(1, 1, 1)),
        ((16, 16, 16), 32, (3, 3), params(2, 1, 1)),
        ((32, 8, 8), 64, (3, 3), params(1, 1, 1)),
        ((64, 8, 8), 64, (3, 3), params(1, 1, 1)),
        (
            (5, 9, 13),
            40,
            (3, 5),
            Conv2dParams {
                stride: (1, 2),
                padding: (1, 2),
                dilation: (1, 1),
                groups: 1,
            },
        ),
        ((7, 11, 10), 10, (1, 1), params(1, 0, 1)),
        ((9, 12, 12), 24, (3, 3), params(1, 2, 2)),
        ((4096, 1, 3), 128, (1, 1), params(1, 0, 1)),
    ];
    for &((c, h, w), k, kernel, p) in &shapes {
        let x: Vec<u8> = (0..c * h * w).map(|_| rng.below(256) as u8).collect();
        let weights: Vec<i8> = (0..k * c * kernel.0 * kernel.1)
            .map(|_| (rng.below(256) as i32 - 128) as i8)
            .collect();
        let scales: Vec<f32> = (0..k).map(|_| rng.uniform(0.001, 0.02)).collect();
        let bias: Vec<f32> = (0..k).map(|_| rng.uniform(-2.0, 2.0)).collect();
        let oh = (h + 2 * p.padding.0 - p.dilation.0 * (kernel.0 - 1) - 1) / p.stride.0 + 1;
        let ow = (w + 2 * p.padding.1 - p.dilation.1 * (kernel.1 - 1) - 1) / p.stride.1 + 1;
        let res: Vec<u8> = (0..k * oh * ow).map(|_| rng.below(256) as u8).collect();
        let q = ConvQuant {
            input: (0.02, 7),
            weight_scales: &scales,
            bias: Some(&bias),
            output_scale: 0.15,
        };
        let outputs = [
            Output::Bytes {
                zero_point: 100,
                clamp: (0, 255),
                residual: None,
            },
            Output::Bytes {
                zero_point: 3,
                clamp: (3, 255),
                residual: None,
            },
            Output::Bytes {
                zero_point: 20,
                clamp: (20, 60),
                residual: Some((&res, 0.7, 128)),
            },
            Output::Floats(None),
            Output::Floats(Some(Activation::Relu)),
        ];
        for (i, output) in outputs.into_iter().enumerate() {
            let case = Case {
                c,
                h,
                w,
                k,
                kernel,
                params: p,
                x: &x,
                weights: &weights,
                q: q.clone(),
                output,
            };
            check_all_paths(
                &case,
                &format!("{c}x{h}x{w} -> {k} {kernel:?} {p:?} output {i}"),
            );
        }
    }
}

#[test]
fn extreme_values_do_not_saturate() {
    // 255 x -128 over 64 channels x 9 taps: sums of -18.8 million, far past 16 bits; and
    // 255 x 127. A `vpmaddubsw` path would clamp each pair at -32768 / 32767.
    let (c, h, w, k) = (64, 6, 6, 32);
    let x = vec![255u8; c * h * w];
    for wv in [-128i8, 127] {
        let weights = vec![wv; k * c * 9];
        let scales = vec![1e-4f32; k];
        let q = ConvQuant {
            input: (0.01, 0),
            weight_scales: &scales,
            bias: None,
            output_scale: 1.0,
        };
        let case = Case {
            c,
            h,
            w,
            k,
            kernel: (3, 3),
            params: params(1, 1, 1),
            x: &x,
            weights: &weights,
            q,
            output: Output::Floats(None),
        };
        let want = reference(&case).1;
        // Interior outputs see all 576 taps.
        let interior = want[w + 1];
        assert_eq!(
            interior,
            (255 * wv as i32 * 576) as f32 * (0.01f32 * 1e-4f32)
        );
        // What `vpmaddubsw` (pairs of u8 x s8 summed into saturating 16-bit lanes) would
        // give instead: this case tells the two apart.
        let pair = (2 * 255 * wv as i32).clamp(i16::MIN as i32, i16::MAX as i32);
        assert_ne!(pair * 288, 255 * wv as i32 * 576);
        check_all_paths(&case, &format!("all 255 x {wv}"));
    }
}

/// PyTorch's quantized conv2d / linear on the fbgemm engine.
#[test]
fn quantized_conv_and_linear_match_pytorch_bit_for_bit() {
    let fx = Fixture::load("quant.safetensors");
    for case_name in [
        "quantized_conv_ref",
        "quantized_conv_relu_ref",
        "quantized_conv_ties",
        "quantized_linear_ref",
        "quantized_linear_relu_ref",
    ] {
        let s = fx.settings(case_name);
        let x_q: Vec<u8> = fx
            .tensor(case_name, "x_q")
            .to_vec()
            .iter()
            .map(|&v| v as u8)
            .collect();
        let wt = fx.tensor(case_name, "w_q");
        let weights: Vec<i8> = wt.to_vec().iter().map(|&v| v as i8).collect();
        let scales = fx.tensor(case_name, "w_scales").to_vec();
        let bias = fx.tensor(case_name, "bias").to_vec();
        let want: Vec<u8> = fx
            .tensor(case_name, "y_q")
            .to_vec()
            .iter()
            .map(|&v| v as u8)
            .collect();
        let (xs, xz) = (
            s["x_scale"].as_f64().unwrap() as f32,
            s["x_zero_point"].as_i64().unwrap() as i32,
        );
        let (ys, yz) = (
            s["y_scale"].as_f64().unwrap() as f32,
            s["y_zero_point"].as_i64().unwrap() as i32,
        );
        let relu = case_name.contains("relu");
        let q = ConvQuant {
            input: (xs, xz),
            weight_scales: &scales,
            bias: Some(&bias),
            output_scale: ys,
        };
        let xd = fx.tensor(case_name, "x_q");
        let (c, h, w, k, kernel, p) = if wt.rank() == 4 {
            let d = wt.dims();
            (
                d[1],
                xd.dims()[2],
                xd.dims()[3],
                d[0],
                (d[2], d[3]),
                params(1, s["padding"].as_u64().unwrap() as usize, 1),
            )
        } else {
            // Linear [N, F] -> [N, out]: a 1x1 convolution over an image of N pixels whose
            // channels are the features.
            (
                wt.dims()[1],
                1,
                xd.dims()[0],
                wt.dims()[0],
                (1, 1),
                params(1, 0, 1),
            )
        };
        let x: Vec<u8> = if wt.rank() == 4 {
            x_q
        } else {
            // [N, F] row-major is already [F, 1, N] transposed: gather to NCHW [F, 1, N].
            let n = w;
            (0..c)
                .flat_map(|f| (0..n).map(move |i| (f, i)))
                .map(|(f, i)| x_q[i * c + f])
                .collect()
        };
        let clamp = (if relu { yz } else { 0 }, 255);
        let case = Case {
            c,
            h,
            w,
            k,
            kernel,
            params: p,
            x: &x,
            weights: &weights,
            q,
            output: Output::Bytes {
                zero_point: yz,
                clamp,
                residual: None,
            },
        };
        let mut got = reference(&case).0;
        if wt.rank() == 2 {
            // Back from [out, 1, N] to [N, out].
            let n = w;
            got = (0..n)
                .flat_map(|i| (0..k).map(move |o| (i, o)))
                .map(|(i, o)| got[o * n + i])
                .collect();
        }
        assert_eq!(got, want, "{case_name}: the reference against PyTorch");
        check_all_paths(&case, case_name);
    }
}
