use super::*;
use crate::backend::cpu::conv::conv2d_naive;
use crate::Rng;

fn kernels() -> Vec<Bf16Kernel> {
    let k: Vec<_> = [Bf16Kernel::Amx, Bf16Kernel::Avx512]
        .into_iter()
        .filter(|k| k.available())
        .collect();
    if k.is_empty() {
        eprintln!("no bf16 kernel on this CPU: nothing to compare");
    }
    k
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// The bound of float32 accumulation of `terms` products whose magnitudes sum to `abs`.
fn accumulation_bound(terms: usize, abs: f64) -> f64 {
    2.0 * (terms as f64 + 2.0) * f32::EPSILON as f64 / 2.0 * abs + 1e-30
}

#[test]
fn rounding_is_to_nearest_even() {
    // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa.
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(to_bf16(-1.0 - 1.0 / 256.0), 0xbf80);
    assert_eq!(
        to_bf16(f32::MAX),
        0x7f80,
        "rounds up to infinity, as PyTorch does"
    );
    assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    assert_eq!(to_bf16(f32::NEG_INFINITY), 0xff80);
    assert!(from_bf16(to_bf16(f32::from_bits(0x7fff_ffff))).is_nan());
    assert!(from_bf16(to_bf16(f32::from_bits(0xff80_0001))).is_nan());
    // Every bf16 value survives the round trip.
    for h in (0..=u16::MAX).filter(|h| h & 0x7f80 != 0x7f80) {
        assert_eq!(to_bf16(from_bf16(h)), h);
    }
}

#[test]
fn products_match_the_reference_on_every_kernel() {
    let mut rng = Rng::new(7);
    // (m, k, n, a transposed, b transposed): edges of 16 / 32 in every dimension.
    let shapes = [
        (1, 1, 1, false, false),
        (16, 32, 16, false, false),
        (37, 53, 29, false, true),
        (64, 200, 100, true, false),
        (5, 3, 70, true, true),
        (48, 144, 1024, false, false),
        (100, 64, 33, false, true),
    ];
    for kernel in kernels() {
        for &(m, k, n, at, bt) in &shapes {
            let a = randn(&mut rng, m * k);
            let b = randn(&mut rng, k * n);
            let av = if at {
                MatRef::row_major(&a, k, m).t()
            } else {
                MatRef::row_major(&a, m, k)
            };
            let bv = if bt {
                MatRef::row_major(&b, n, k).t()
            } else {
                MatRef::row_major(&b, k, n)
            };
            for (accumulate, par) in [(false, Par::Seq), (true, Par::Rayon)] {
                let start = randn(&mut rng, m * n);
                let mut got = start.clone();
                let mut want = start.clone();
                matmul_bf16_with(&mut got, av, bv, accumulate, par, kernel);
                matmul_bf16_reference(&mut want, av, bv, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let abs: f64 = (0..k)
                            .map(|p| (av.at(i, p) as f64 * bv.at(p, j) as f64).abs())
                            .sum::<f64>()
                            + if accumulate {
                                start[i * n + j].abs() as f64
                            } else {
                                0.0
                            };
                        let (g, w) = (got[i * n + j], want[i * n + j]);
                        assert!(
                            ((g - w) as f64).abs() <= accumulation_bound(k + 1, abs),
                            "{kernel:?} {m}x{k}x{n} at={at} bt={bt} acc={accumulate} \
                             [{i},{j}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn rounding_shows_against_float32() {
    // The products differ from float32 by the operands' rounding (not by accumulation):
    // a kernel that skipped the rounding would match float32 and fail here.
    let mut rng = Rng::new(3);
    let (m, k, n) = (16, 64, 16);
    let a = randn(&mut rng, m * k);
    let b = randn(&mut rng, k * n);
    let (av, bv) = (MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n));
    for kernel in kernels() {
        let mut got = vec![0f32; m * n];
        let mut f32_result = vec![0f32; m * n];
        matmul_bf16_with(&mut got, av, bv, false, Par::Seq, kernel);
        super::super::matmul::matmul_naive(&mut f32_result, av, bv, false);
        let worst = got
            .iter()
            .zip(&f32_result)
            .map(|(g, f)| (g - f).abs())
            .fold(0f32, f32::max);
        assert!(worst > 1e-3 && worst < 0.5, "{kernel:?}: {worst}");
    }
}

/// A convolution's three products in bf16 against the naive reference on rounded operands.
#[test]
fn convolutions_match_the_reference_on_rounded_operands() {
    for kernel in kernels() {
        convolutions_on(kernel);
    }
}

fn convolutions_on(kernel: Bf16Kernel) {
    let mut rng = Rng::new(11);
    // (n, c, h, w, k, kernel, stride, padding, groups)
    let cases = [
        (2, 3, 9, 9, 16, 3, 1, 1, 1),
        (3, 16, 8, 8, 32, 3, 2, 1, 1),
        (2, 8, 6, 7, 8, 1, 1, 0, 1),
        (2, 8, 7, 7, 12, 1, 2, 0, 1),
        (2, 4, 10, 10, 6, 5, 1, 2, 2),
        (5, 16, 16, 16, 16, 3, 1, 1, 1),
        (3, 40, 5, 6, 70, 3, 1, 1, 1),
        (2, 33, 8, 8, 20, 3, 1, 0, 1),
        (2, 5, 7, 9, 3, 2, 1, 1, 1),
        // The direct 3x3 kernels: 32- and 16-wide rows, paired 8-wide rows, stride 2, an
        // odd channel count (a half-empty pair), and input gradients through them.
        (2, 5, 32, 32, 8, 3, 1, 1, 1),
        (2, 12, 32, 16, 4, 3, 1, 1, 1),
        (3, 7, 8, 8, 12, 3, 1, 1, 1),
        (2, 8, 8, 8, 8, 3, 1, 1, 1),
        (2, 5, 32, 32, 8, 3, 2, 1, 1),
        (2, 6, 16, 16, 8, 3, 2, 1, 1),
        (2, 4, 32, 32, 16, 3, 2, 1, 1),
        (2, 4, 32, 32, 12, 3, 2, 1, 1),
    ];
    for &(n, c, h, w, k, ks, s, p, groups) in &cases {
        let oh = (h + 2 * p - ks) / s + 1;
        let ow = (w + 2 * p - ks) / s + 1;
        let g = ConvGeom {
            n,
            c,
            h,
            w,
            k,
            kh: ks,
            kw: ks,
            oh,
            ow,
            stride: (s, s),
            padding: (p, p),
            dilation: (1, 1),
            groups,
        };
        let x = randn(&mut rng, n * c * h * w);
        let wt = randn(&mut rng, k * (c / groups) * ks * ks);
        let bias = randn(&mut rng, k);
        let dy = randn(&mut rng, n * k * oh * ow);
        let r = |v: &[f32]| v.iter().map(|&v| round_bf16(v)).collect::<Vec<_>>();
        let (y_ref, dx_ref, dw_ref) = conv2d_naive(&r(&x), &r(&wt), Some(&bias), &r(&dy), &g);
        let mut y = vec![f32::NAN; y_ref.len()];
        let mut dx = vec![f32::NAN; dx_ref.len()];
        let mut dw = vec![f32::NAN; dw_ref.len()];
        conv2d_forward_with(kernel, &x, &wt, Some(&bias), &g, &mut y);
        conv2d_backward_input_with(kernel, &dy, &wt, &g, &mut dx);
        conv2d_backward_weight_with(kernel, &x, &dy, &g, &mut dw);
        // Each output is a sum of `terms` products; the bound is float32 accumulation of
        // that many terms whose magnitudes sum to the same sum over |operands| (so a kernel
        // that skipped the rounding to bf16, off by ~2^-9 of that sum, fails).
        let a = |v: &[f32]| v.iter().map(|&v| round_bf16(v).abs()).collect::<Vec<_>>();
        let bias_abs: Vec<f32> = bias.iter().map(|b| b.abs()).collect();
        let (y_abs, dx_abs, dw_abs) = conv2d_naive(&a(&x), &a(&wt), Some(&bias_abs), &a(&dy), &g);
        let check = |name: &str, got: &[f32], want: &[f32], abs: &[f32], terms: usize| {
            for (i, ((g, w), a)) in got.iter().zip(want).zip(abs).enumerate() {
                assert!(
                    ((g - w) as f64).abs() <= accumulation_bound(terms, *a as f64),
                    "{kernel:?} {name} {:?} [{i}]: {g} vs {w}",
                    (n, c, h, k, ks, s, p, groups)
                );
            }
        };
        check("y", &y, &y_ref, &y_abs, g.col_rows() + 1);
        check("dx", &dx, &dx_ref, &dx_abs, k * ks * ks);
        check("dw", &dw, &dw_ref, &dw_abs, n * oh * ow);
    }
}
