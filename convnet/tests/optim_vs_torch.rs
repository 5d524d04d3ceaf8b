//! Optimizers over six steps and LR schedules over twelve, against `torch.optim`
//! (float64 references). Tolerance: rtol 1e-5, atol 1e-6.

mod common;

use common::{assert_close, Fixture, ATOL, RTOL};
use convnet::optim::{
    Adam, AdamConfig, CosineAnnealingLr, LinearWarmup, LrSchedule, MultiStepLr, OneCycleLr,
    Optimizer, Sgd, SgdConfig, StepLr,
};
use convnet::{Device, GradStore, Tensor};

on_each_device!(
    optimizers_follow_torch_over_six_steps,
    optimizer_state_round_trips_by_name
);

fn f(v: &serde_json::Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(|x| x.as_f64()).unwrap_or(default)
}

/// A gradient for `param`, on its device.
fn grad_store(param: &Tensor, g: Vec<f32>) -> GradStore {
    let mut store = GradStore::default();
    let g = Tensor::from_vec(g, param.shape().clone()).unwrap();
    store
        .insert(param, g.to_device(param.device()).unwrap())
        .unwrap();
    store
}

fn optimizers_follow_torch_over_six_steps(dev: Device) {
    let fx = Fixture::load("optim.safetensors");
    let cases: Vec<String> = fx
        .cases()
        .into_iter()
        .filter(|c| c.starts_with("sgd") || c.starts_with("adam"))
        .collect();
    assert_eq!(cases.len(), 8);
    for case in cases {
        let s = fx.settings(&case);
        let p = fx.tensor_on(dev, &case, "p0").requires_grad();
        let named = vec![("w".to_string(), p.clone())];
        let mut opt: Box<dyn Optimizer> = match s["kind"].as_str().unwrap() {
            "SGD" => Box::new(
                Sgd::new(
                    named,
                    SgdConfig {
                        lr: f(&s, "lr", 0.0),
                        momentum: f(&s, "momentum", 0.0),
                        dampening: f(&s, "dampening", 0.0),
                        weight_decay: f(&s, "weight_decay", 0.0),
                        nesterov: s.get("nesterov").and_then(|v| v.as_bool()).unwrap_or(false),
                    },
                )
                .unwrap(),
            ),
            kind @ ("Adam" | "AdamW") => {
                let base = if kind == "AdamW" {
                    AdamConfig::adamw()
                } else {
                    AdamConfig::default()
                };
                let betas = s
                    .get("betas")
                    .and_then(|b| b.as_array())
                    .map_or(base.betas, |b| {
                        (b[0].as_f64().unwrap(), b[1].as_f64().unwrap())
                    });
                Box::new(
                    Adam::new(
                        named,
                        AdamConfig {
                            lr: f(&s, "lr", base.lr),
                            betas,
                            eps: f(&s, "eps", base.eps),
                            weight_decay: f(&s, "weight_decay", base.weight_decay),
                            amsgrad: s.get("amsgrad").and_then(|v| v.as_bool()).unwrap_or(false),
                            ..base
                        },
                    )
                    .unwrap(),
                )
            }
            k => panic!("unknown optimizer {k}"),
        };
        let grads = fx.tensor(&case, "grads").to_vec();
        let traj = fx.tensor(&case, "params").to_vec();
        let n = p.numel();
        for step in 0..6 {
            opt.step(&grad_store(&p, grads[step * n..(step + 1) * n].to_vec()))
                .unwrap();
            assert_close(
                &format!("{case} step {}", step + 1),
                &p.to_vec(),
                &traj[step * n..(step + 1) * n],
                RTOL,
                ATOL,
            );
        }
    }
}

fn optimizer_state_round_trips_by_name(dev: Device) {
    let start = Tensor::from_vec(vec![1.0, 2.0, 3.0], [3]).unwrap();
    let p = start.to_device(dev).unwrap().requires_grad();
    let q = start.to_device(dev).unwrap().requires_grad();
    let cfg = AdamConfig {
        amsgrad: true,
        ..AdamConfig::adamw()
    };
    let mut a = Adam::new(vec![("fc.weight".into(), p.clone())], cfg).unwrap();
    let mut b = Adam::new(vec![("fc.weight".into(), q.clone())], cfg).unwrap();
    a.step(&grad_store(&p, vec![0.5, -1.0, 2.0])).unwrap();
    let state = a.state_dict();
    let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc.weight.step",
            "fc.weight.exp_avg",
            "fc.weight.exp_avg_sq",
            "fc.weight.max_exp_avg_sq"
        ]
    );
    b.load_state_dict(&state).unwrap();
    q.copy_from_slice(&p.to_vec()).unwrap();
    a.step(&grad_store(&p, vec![0.1, 0.2, -0.3])).unwrap();
    b.step(&grad_store(&q, vec![0.1, 0.2, -0.3])).unwrap();
    assert_eq!(
        p.to_vec(),
        q.to_vec(),
        "restored state continues identically"
    );

    let mut s = Sgd::new(
        vec![("w".into(), p.clone())],
        SgdConfig {
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    s.step(&grad_store(&p, vec![1.0, 1.0, 1.0])).unwrap();
    assert_eq!(s.state_dict()[0].0, "w.momentum_buffer");
}

#[test]
fn schedules_follow_torch_for_twelve_steps() {
    let fx = Fixture::load("optim.safetensors");
    let base = 0.1;
    let scheds: Vec<(&str, Box<dyn LrSchedule>)> = vec![
        ("step_lr", Box::new(StepLr::new(base, 3, 0.5).unwrap())),
        (
            "multistep_lr",
            Box::new(MultiStepLr::new(base, vec![2, 5, 9], 0.1)),
        ),
        (
            "cosine_lr",
            Box::new(CosineAnnealingLr::new(base, 10, 0.001).unwrap()),
        ),
        ("onecycle_lr", Box::new(OneCycleLr::new(0.1, 12).unwrap())),
        (
            "linear_warmup",
            Box::new(LinearWarmup::new(base, 0.25, 4).unwrap()),
        ),
    ];
    for (case, sched) in scheds {
        let lrs: Vec<f32> = (0..12).map(|k| sched.lr_at(k) as f32).collect();
        assert_close(
            &format!("{case}/lr"),
            &lrs,
            &fx.tensor(case, "lr").to_vec(),
            RTOL,
            1e-9,
        );
        let expected_m = fx.tensor(case, "momentum").to_vec();
        let moms: Vec<f32> = (0..12)
            .map(|k| sched.momentum_at(k).unwrap_or(0.9) as f32)
            .collect();
        assert_close(&format!("{case}/momentum"), &moms, &expected_m, RTOL, ATOL);
    }
    // A schedule drives an optimizer through `apply`.
    let p = Tensor::zeros([1]).requires_grad();
    let mut opt = Sgd::new(
        vec![("p".into(), p)],
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    let one = OneCycleLr::new(0.1, 12).unwrap();
    one.apply(&mut opt, 3);
    assert_eq!(opt.lr(), one.lr_at(3));
    assert_eq!(opt.config().momentum, one.momentum_at(3).unwrap());
}

#[test]
fn invalid_hyperparameters_are_rejected() {
    let p = vec![("w".to_string(), Tensor::zeros([2]).requires_grad())];
    assert!(Sgd::new(
        p.clone(),
        SgdConfig {
            lr: -1.0,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Sgd::new(
        p.clone(),
        SgdConfig {
            nesterov: true,
            ..Default::default()
        }
    )
    .is_err());
    assert!(Adam::new(
        p.clone(),
        AdamConfig {
            betas: (1.0, 0.999),
            ..Default::default()
        }
    )
    .is_err());
    assert!(StepLr::new(0.1, 0, 0.5).is_err());
    assert!(OneCycleLr::new(0.1, 1).is_err());
}
