//! Default initialisation against PyTorch: the same bounds and the same spread. Values
//! differ (different random streams), so distributions are compared, with tolerances from
//! the sampling error of a standard deviation (4 sigma).

mod common;

use common::Fixture;
use convnet::nn::{BatchNorm2d, Conv2d, Linear};
use convnet::Tensor;
use std::sync::{Mutex, MutexGuard};

/// The tests of this file reseed and draw from the process-wide generator; the test harness
/// runs them on parallel threads, so each holds this lock to keep its draws uninterleaved.
fn global_rng() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn std(t: &Tensor) -> f64 {
    let v = t.to_vec();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

fn max_abs(t: &Tensor) -> f32 {
    t.to_vec().iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn conv_and_linear_match_torch_default_init() {
    let _rng = global_rng();
    let fx = Fixture::load("init.safetensors");
    convnet::manual_seed(11);
    let layers: Vec<(&str, Tensor, Tensor)> = vec![
        ("conv_3_32_k3", Conv2d::new(3, 32, 3).build().unwrap()).map2(),
        ("conv_64_128_k3", Conv2d::new(64, 128, 3).build().unwrap()).map2(),
        (
            "conv_depthwise_32",
            Conv2d::new(32, 32, 3).groups(32).build().unwrap(),
        )
            .map2(),
        ("linear_1024_64", Linear::new(1024, 64).unwrap()).map2(),
        ("linear_128_10", Linear::new(128, 10).unwrap()).map2(),
    ];
    for (case, w, b) in layers {
        let fan_in = fx.settings(case)["fan_in"].as_u64().unwrap() as f64;
        let bound = (1.0 / fan_in.sqrt()) as f32;
        let tw = fx.tensor(case, "weight");
        let tb = fx.tensor(case, "bias");
        assert_eq!(w.dims(), tw.dims(), "{case} weight shape");
        assert_eq!(b.dims(), tb.dims(), "{case} bias shape");
        for (what, ours, theirs) in [("weight", &w, &tw), ("bias", &b, &tb)] {
            assert!(
                max_abs(ours) <= bound,
                "{case} {what}: |x| <= 1/sqrt(fan_in) = {bound}"
            );
            assert!(
                max_abs(theirs) <= bound * 1.000001,
                "{case} {what}: torch's own bound agrees"
            );
        }
        // U(-b, b) has std b/sqrt(3); std of n samples has relative error ~ 1/sqrt(2n).
        let expected = bound as f64 / 3f64.sqrt();
        let tol = 4.0 / (2.0 * w.numel() as f64).sqrt();
        for (who, s) in [("convnet", std(&w)), ("torch", std(&tw))] {
            assert!(
                (s / expected - 1.0).abs() < tol,
                "{case}: {who} weight std {s} vs {expected} (tol {tol})"
            );
        }
    }
}

trait Parts {
    fn map2(self) -> (&'static str, Tensor, Tensor);
}

impl Parts for (&'static str, Conv2d) {
    fn map2(self) -> (&'static str, Tensor, Tensor) {
        (self.0, self.1.weight, self.1.bias.unwrap())
    }
}

impl Parts for (&'static str, Linear) {
    fn map2(self) -> (&'static str, Tensor, Tensor) {
        (self.0, self.1.weight, self.1.bias.unwrap())
    }
}

#[test]
fn batchnorm_starts_at_weight_one_bias_zero_mean_zero_var_one() {
    let fx = Fixture::load("init.safetensors");
    let bn = BatchNorm2d::new(7).unwrap();
    for (name, ours) in [
        ("weight", &bn.weight),
        ("bias", &bn.bias),
        ("running_mean", &bn.running_mean),
        ("running_var", &bn.running_var),
    ] {
        assert_eq!(
            ours.to_vec(),
            fx.tensor("batchnorm_7", name).to_vec(),
            "{name}"
        );
    }
    assert!(bn.weight.tracks_grad() && bn.bias.tracks_grad());
    assert!(!bn.running_mean.tracks_grad());
}

#[test]
fn seeding_makes_initialisation_reproducible() {
    let _rng = global_rng();
    convnet::manual_seed(5);
    let a = Conv2d::new(3, 4, 3).build().unwrap().weight.to_vec();
    convnet::manual_seed(5);
    let b = Conv2d::new(3, 4, 3).build().unwrap().weight.to_vec();
    assert_eq!(a, b);
    let c = Conv2d::new(3, 4, 3).build().unwrap().weight.to_vec();
    assert_ne!(a, c);
}
