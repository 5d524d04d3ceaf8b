//! `convnet export`: a model as an ONNX graph and/or a plain PyTorch `state_dict`.

use crate::common::{load_model, Net};
use crate::eval::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use convnet::checkpoint::{save_tensors, write_atomic};
use convnet::infer::Predictor;
use std::collections::HashMap;
use std::path::PathBuf;

/// Arguments of `convnet export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write an ONNX model (opset 17) here.
    #[arg(long)]
    onnx: Option<PathBuf>,
    /// Write the parameters and buffers as a plain `state_dict` safetensors file, loadable
    /// with `model.load_state_dict(safetensors.torch.load_file(FILE))`.
    #[arg(long)]
    state_dict: Option<PathBuf>,
    /// Export --model/--model-file with freshly initialised weights (seeded by --seed)
    /// instead of trained ones, e.g. to test a deployment pipeline.
    #[arg(long, conflicts_with_all = ["weights", "checkpoint"])]
    random_init: bool,
    /// Seed for --random-init and --reference-io.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write a reference batch: `input` (2 images from N(0, 1), or test images with
    /// --reference-data) and convnet's eval-mode `logits` for it, to check the exported
    /// model against.
    #[arg(long)]
    reference_io: Option<PathBuf>,
    /// Take the reference batch from this data set's test split (`sample`: the bundled
    /// CIFAR-10 sample), normalised as the model expects.
    #[arg(long, requires = "reference_io")]
    reference_data: Option<String>,
    /// Images in the reference batch taken from --reference-data.
    #[arg(long, default_value_t = 64, requires = "reference_data")]
    reference_images: usize,
}

pub fn run(a: ExportArgs) -> Result<()> {
    if a.onnx.is_none() && a.state_dict.is_none() {
        bail!("say what to write: --onnx FILE and/or --state-dict FILE");
    }
    convnet::manual_seed(a.seed);
    let mut source = a.model.source(None)?;
    source.random_init = a.random_init;
    let loaded = load_model(&source)?;
    let name = loaded.meta.architecture.clone();
    if let Some(path) = &a.onnx {
        let bytes = match &loaded.net {
            Net::Float(model) => convnet::onnx::export(model, &name),
            Net::Quantized(q) => convnet::onnx::export_quantized(q, &name),
        }
        .with_context(|| format!("cannot export {name} to ONNX"))?;
        write_atomic(path, &bytes)?;
        println!(
            "wrote {} ({name}, input [N, {}], {} bytes)",
            path.display(),
            match &loaded.meta.sequence {
                Some(seq) => seq.input.clone(),
                None => loaded.meta.input_shape.to_vec(),
            }
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
            bytes.len()
        );
    }
    if let Some(path) = &a.reference_io {
        let input = match &loaded.meta.sequence {
            Some(seq) => sequence_reference(seq, a.reference_data.is_some())?,
            None => image_reference(&a, &loaded)?,
        };
        let logits = loaded.prepare().predict(&input)?;
        save_tensors(
            path,
            &[("input".into(), input), ("logits".into(), logits)],
            HashMap::new(),
        )?;
        println!("wrote {} (reference input and logits)", path.display());
    }
    if let Some(path) = &a.state_dict {
        save_tensors(
            path,
            &loaded.float("--state-dict")?.state_dict(),
            HashMap::new(),
        )?;
        println!("wrote {} ({name} state_dict)", path.display());
    }
    Ok(())
}

/// Two random inputs of a text or audio model: token ids of its vocabulary, or standardised
/// audio features.
fn sequence_reference(
    seq: &convnet::checkpoint::SequenceMeta,
    reference_data: bool,
) -> Result<convnet::Tensor> {
    if reference_data {
        bail!("--reference-data reads images; the model reads texts or audio (leave it out: two random inputs are used)");
    }
    let len: usize = seq.input.iter().product();
    let values: Vec<f32> = match crate::sequence::vocabulary(seq)? {
        Some(v) => convnet::with_global_rng(|r| {
            (0..2 * len)
                .map(|_| r.uniform(0.0, v as f32).floor().min(v as f32 - 1.0))
                .collect()
        }),
        None => convnet::with_global_rng(|r| (0..2 * len).map(|_| r.normal()).collect()),
    };
    let dims: Vec<usize> = std::iter::once(2)
        .chain(seq.input.iter().copied())
        .collect();
    Ok(convnet::Tensor::from_vec(values, dims.as_slice())?)
}

/// The reference batch of an image model: two random images, or `--reference-images` of
/// `--reference-data` as evaluation normalises them.
fn image_reference(a: &ExportArgs, loaded: &crate::common::Loaded) -> Result<convnet::Tensor> {
    let [c, h, w] = loaded.meta.input_shape;
    let Some(d) = &a.reference_data else {
        return Ok(convnet::with_global_rng(|r| {
            convnet::Tensor::randn([2, c, h, w], r)
        }));
    };
    if a.reference_images == 0 {
        bail!("--reference-images must be positive");
    }
    let dir = (d != "sample").then(|| std::path::Path::new(d));
    let (_, test) = crate::common::open_data(dir, &convnet::data::FolderOptions::default(), 0.2)?;
    if test.image_shape() != loaded.meta.input_shape {
        bail!(
            "--reference-data has {:?} images but the model takes {:?}",
            test.image_shape(),
            loaded.meta.input_shape
        );
    }
    let test = test.spread(a.reference_images.min(test.len()));
    let loader = convnet::data::DataLoader::for_evaluation(
        std::sync::Arc::new(test),
        loaded.meta.normalize.clone(),
    )?;
    let mut batches = Vec::new();
    for b in loader.epoch(0) {
        batches.extend(b?.images.to_vec());
    }
    let n = batches.len() / (c * h * w);
    Ok(convnet::Tensor::from_vec(batches, [n, c, h, w])?)
}
