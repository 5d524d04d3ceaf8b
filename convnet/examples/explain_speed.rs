//! Times one 224x224 image on torchvision's ResNet-18 layout: a plain prediction (the
//! compiled inference plan), Grad-CAM at `layer4`, and integrated gradients with 50 points;
//! prints medians and the ratios to the prediction (docs/explain.md).
//!
//!     cargo run --release --example explain_speed [-- ROUNDS]

use convnet::explain::{Explainer, Method};
use convnet::infer::{Compiled, Predictor};
use std::time::Instant;

// The allocator the `convnet` command uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> convnet::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let model = convnet::models::build("resnet18", [3, 224, 224], 1000)?;
    let x = convnet::Tensor::randn([1, 3, 224, 224], &mut convnet::Rng::new(1));
    let plan = Compiled::new(&model);
    let gradcam = Explainer::new(&model, Method::GradCam, None)?;
    let ig = Explainer::new(&model, Method::IntegratedGradients { steps: 50 }, None)?;
    // Warm-up.
    plan.predict(&x)?;
    gradcam.explain(&x, None)?;
    let (mut p, mut g, mut i) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        // Alternate the three so that machine noise hits them alike.
        for _ in 0..5 {
            let t = Instant::now();
            plan.predict(&x)?;
            p.push(t.elapsed().as_secs_f64());
        }
        for _ in 0..5 {
            let t = Instant::now();
            gradcam.explain(&x, None)?;
            g.push(t.elapsed().as_secs_f64());
        }
        if r < 3 {
            let t = Instant::now();
            ig.explain(&x, None)?;
            i.push(t.elapsed().as_secs_f64());
        }
    }
    let (p, g, i) = (median(p), median(g), median(i));
    println!(
        "resnet18 224x224, {} threads: predict {:.1} ms, Grad-CAM {:.1} ms ({:.2}x), integrated gradients (50) {:.0} ms ({:.1}x)",
        rayon::current_num_threads(),
        p * 1e3,
        g * 1e3,
        g / p,
        i * 1e3,
        i / p
    );
    Ok(())
}
