//! `convnet explain`: where a model looked — Grad-CAM, Grad-CAM++, saliency, integrated
//! gradients or occlusion for each image, written as a heat map, an overlay on the image
//! and the raw map (`.npy`).

use crate::common::{load_model, Net};
use crate::eval::{image_input, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use convnet::data::Transform;
use convnet::explain::picture::{pictures, write_npy, write_png};
use convnet::explain::{Explainer, Method};
use convnet::Tensor;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MethodArg {
    /// Grad-CAM: gradient-weighted sum of a layer's feature maps.
    Gradcam,
    /// Grad-CAM++: the closed-form refinement of Grad-CAM's weights.
    #[value(name = "gradcam++")]
    GradcamPlusPlus,
    /// Saliency: largest |d logit / d pixel| over channels.
    Saliency,
    /// Integrated gradients from a zero (mean-colour) image, --steps points.
    IntegratedGradients,
    /// Occlusion: drop of the target's probability under a grey --window patch.
    Occlusion,
}

/// Arguments of `convnet explain`.
#[derive(Args, Debug)]
#[command(after_help = "\
The score explained is the target's logit (before softmax); the target is the top-1 class unless \
--target is given. Default --layer for the CAM methods: the last stage of a ResNet (layer4 for \
resnet18/34/50, layer3 for the CIFAR ResNets), the last block of a `features` stack (VGG: its last \
ReLU, mobilenet_v2: features.18), else the last convolution (seed-cnn, lenet5: conv2). Layer names \
are those of `convnet summary` and the state_dict; a container (layer4, layer4.1) means its output.

For each IMAGE, in --out: NAME.METHOD.png (the map upsampled to the image, min-max normalised, jet \
colours), NAME.METHOD.overlay.png (blended 50/50 on the image) and NAME.METHOD.npy (the raw float32 \
map: at the layer's resolution for the CAM methods, at the input's otherwise, not normalised).")]
pub struct ExplainArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Images to explain (any size: resized to the model's input; pictures keep the image's size).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Attribution method.
    #[arg(long, value_enum, default_value = "gradcam")]
    method: MethodArg,
    /// Class to explain: an index or a label (default: the top-1 class of each image).
    #[arg(long)]
    target: Option<String>,
    /// Layer the CAM methods read (default: see below).
    #[arg(long)]
    layer: Option<String>,
    /// Points on the path for integrated gradients.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Occlusion patch side in pixels of the model's input (default: a quarter of the side).
    #[arg(long)]
    window: Option<usize>,
    /// Occlusion step in pixels (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
    /// Folder for the pictures and maps.
    #[arg(long, default_value = "explanations")]
    out: PathBuf,
    /// Print one JSON object with every explanation as the last line of stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: ExplainArgs) -> Result<()> {
    let loaded = load_model(&a.model.source(None)?)?;
    let m = &loaded.meta;
    let Net::Float(model) = &loaded.net else {
        bail!(
            "{}: explain needs the float model (this is an int8 one); use the checkpoint it was quantized from",
            loaded.source.display()
        );
    };
    let [_, h, w] = m.input_shape;
    let method = match a.method {
        MethodArg::Gradcam => Method::GradCam,
        MethodArg::GradcamPlusPlus => Method::GradCamPlusPlus,
        MethodArg::Saliency => Method::Saliency,
        MethodArg::IntegratedGradients => Method::IntegratedGradients { steps: a.steps },
        MethodArg::Occlusion => {
            let window = a.window.unwrap_or((h.min(w) / 4).max(1));
            Method::Occlusion {
                window,
                stride: a.stride.unwrap_or((window / 2).max(1)),
            }
        }
    };
    let target = a
        .target
        .as_deref()
        .map(|t| match t.parse::<usize>() {
            Ok(i) if i < m.classes.len() => Ok(i),
            Ok(i) => bail!(
                "--target {i} is out of range: the model has {} classes (0 to {})",
                m.classes.len(),
                m.classes.len() - 1
            ),
            Err(_) => m.classes.iter().position(|c| c == t).with_context(|| {
                format!(
                    "--target {t} is not a class of the model; its classes: {}",
                    m.classes.join(", ")
                )
            }),
        })
        .transpose()?;
    let explainer = Explainer::new(model, method, a.layer.as_deref())?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let t = Transform {
        normalize: m.normalize.clone(),
        augment: None,
    };
    let mut results = Vec::new();
    for path in &a.images {
        let decoded = crate::eval::open_image(path)?;
        let original = decoded.to_rgb8();
        let x = Tensor::from_vec(
            image_input(decoded, m.input_shape, &t),
            [1, m.input_shape[0], h, w],
        )?;
        let e = explainer
            .explain(&x, target)
            .with_context(|| format!("cannot explain {}", path.display()))?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let name = method.name();
        let files = [
            a.out.join(format!("{stem}.{name}.png")),
            a.out.join(format!("{stem}.{name}.overlay.png")),
            a.out.join(format!("{stem}.{name}.npy")),
        ];
        // Saliency and integrated gradients are pictured by magnitude.
        let shown: Vec<f32> = match method {
            Method::Saliency | Method::IntegratedGradients { .. } => {
                e.map.iter().map(|v| v.abs()).collect()
            }
            _ => e.map.clone(),
        };
        let (heat, blended) = pictures(&shown, (e.height, e.width), &original);
        write_png(&files[0], &heat)?;
        write_png(&files[1], &blended)?;
        write_npy(&files[2], &e.map, &[e.height, e.width])?;
        let label = &m.classes[e.target];
        if !a.json {
            print!(
                "{}: {label} ({}) p={:.4} logit={:.4}",
                path.display(),
                e.target,
                e.probability,
                e.logit
            );
            if let Some(l) = &e.layer {
                print!(", {name} at {l} ({}x{})", e.height, e.width);
            }
            if let Some(gap) = e.completeness_gap {
                print!(", completeness gap {:.3}%", 100.0 * gap);
            }
            println!(" -> {}", files[1].display());
        }
        results.push(serde_json::json!({
            "image": path.display().to_string(),
            "method": name,
            "layer": e.layer,
            "target": e.target,
            "label": label,
            "probability": e.probability,
            "logit": e.logit,
            "completeness_gap": e.completeness_gap,
            "map": files[0].display().to_string(),
            "overlay": files[1].display().to_string(),
            "raw": files[2].display().to_string(),
        }));
    }
    if a.json {
        println!("{}", serde_json::json!({ "explanations": results }));
    }
    Ok(())
}
