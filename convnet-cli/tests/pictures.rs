//! The picture commands end to end: `plot` draws learning curves as PNG and SVG and names
//! what is wrong with its input, `eval --plots` writes the confusion matrix and the most
//! confident mistakes, `visualize filters` draws a convolution layer's kernels.

mod common;

use common::{convnet, fails_with, last_json, temp};
use std::path::Path;
use std::process::Command;

/// Decodes a PNG and checks that it is not one flat colour.
fn decode_varied(path: &Path) -> image::RgbImage {
    let img = image::open(path)
        .unwrap_or_else(|e| panic!("{} is not a readable picture: {e}", path.display()))
        .to_rgb8();
    let first = *img.get_pixel(0, 0);
    assert!(
        img.pixels().any(|p| *p != first),
        "{} is a single colour",
        path.display()
    );
    img
}

/// Writes a run folder `dir/name` holding `metrics` as its metrics.jsonl.
fn run_folder(dir: &Path, name: &str, metrics: &str) -> String {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
    run.to_str().unwrap().to_string()
}

/// Metrics as `convnet train` writes them, for `epochs` epochs.
fn metrics(epochs: usize, lr: f64, with_test: bool) -> String {
    (1..=epochs)
        .map(|e| {
            let t = e as f64;
            let test = if with_test {
                format!(
                    r#","test_loss":{},"test_accuracy":{}"#,
                    1.9 - 0.1 * t,
                    0.3 + 0.04 * t - 0.003 * t * t
                )
            } else {
                String::new()
            };
            format!(
                r#"{{"epoch":{e},"train_loss":{},"train_accuracy":{},"lr":{lr},"seconds":2.5,"train_images_per_sec":1800.0{test}}}"#,
                2.0 - 0.15 * t,
                0.25 + 0.05 * t
            ) + "\n"
        })
        .collect()
}

#[test]
fn plot_draws_two_runs_as_png_and_svg() {
    let dir = temp("plot");
    let a = run_folder(&dir, "run-alpha", &metrics(6, 0.01, true));
    // A run without a test set, whose metrics say so with nulls.
    let b = run_folder(
        &dir,
        "run-beta",
        &metrics(4, 0.05, false).replace('}', r#","test_loss":null,"test_accuracy":null}"#),
    );
    let png = dir.join("curves.png");
    let out = convnet(&["plot", &a, &b, "--out", png.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = decode_varied(&png);
    assert_eq!(img.dimensions(), convnet::viz::CURVES_SIZE);

    let svg_path = dir.join("curves.SVG");
    let out = convnet(&["plot", &a, &b, "--out", svg_path.to_str().unwrap()]);
    assert!(out.status.success());
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    assert!(svg.contains("run-alpha") && svg.contains("run-beta"));
    assert!(svg.contains("best test accuracy"));
}

#[test]
fn plot_writes_curves_png_in_the_current_folder_by_default() {
    let dir = temp("plot-default");
    let run = run_folder(&dir, "only", &metrics(1, 0.1, true));
    let out = Command::new(env!("CARGO_BIN_EXE_convnet"))
        .args(["plot", &run])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    decode_varied(&dir.join("curves.png"));
}

#[test]
fn plot_names_what_is_wrong() {
    let dir = temp("plot-errors");
    let good = run_folder(&dir, "good", &metrics(2, 0.1, true));
    let out = dir.join("c.png");
    let out = out.to_str().unwrap();

    let empty = dir.join("no-metrics");
    std::fs::create_dir_all(&empty).unwrap();
    fails_with(
        &["plot", &good, empty.to_str().unwrap(), "--out", out],
        &format!("{}: holds no metrics.jsonl", empty.display()),
    );
    fails_with(
        &["plot", dir.join("absent").to_str().unwrap(), "--out", out],
        "is not a folder",
    );

    let bad = run_folder(
        &dir,
        "bad",
        &(metrics(2, 0.1, true) + "{\"epoch\": 3, \"train_loss\": oops}\n"),
    );
    fails_with(
        &["plot", &bad, "--out", out],
        &format!(
            "{}: line 3: not a JSON object",
            Path::new(&bad).join("metrics.jsonl").display()
        ),
    );
    let wrong_type = run_folder(&dir, "wrong-type", "{\"epoch\": 1, \"lr\": \"high\"}\n");
    fails_with(
        &["plot", &wrong_type, "--out", out],
        "line 1: \"lr\" is \"high\", not a number",
    );

    let jpg = dir.join("curves.jpg");
    fails_with(
        &["plot", &good, "--out", jpg.to_str().unwrap()],
        "curves.jpg: cannot write .jpg pictures: name a .png or .svg file",
    );
    assert!(!jpg.exists());
    fails_with(&["plot"], "RUN_DIR");
}

#[test]
fn eval_plots_write_the_confusion_matrix_and_the_worst_mistakes() {
    let dir = temp("eval-plots");
    let plots = dir.join("plots");
    let r = last_json(&convnet(&[
        "eval",
        "--pretrained",
        "seed-cnn-cifar10",
        "--plots",
        plots.to_str().unwrap(),
        "--json",
    ]));
    assert!(r["accuracy"].as_f64().unwrap() > 0.5);
    let confusion = decode_varied(&plots.join("confusion.png"));
    let classes: Vec<String> = convnet::data::CIFAR10_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        confusion.dimensions(),
        convnet::viz::confusion_size(&classes)
    );
    let mistakes = decode_varied(&plots.join("misclassified.png"));
    // 16 images of 96 px, 4 per row with captions under them.
    assert!(mistakes.width() >= 4 * 96 && mistakes.height() >= 4 * 96);
}

#[test]
fn visualize_filters_draws_a_grid_of_kernels() {
    let dir = temp("filters");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("conv1.png");
    let out = convnet(&[
        "visualize",
        "filters",
        "--layer",
        "conv1",
        "--pretrained",
        "seed-cnn-cifar10",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 32 kernels: 6 columns and 6 rows of 24 px with 2 px gaps around and between.
    let img = decode_varied(&png);
    assert_eq!(img.dimensions(), (6 * 24 + 7 * 2, 6 * 24 + 7 * 2));
    // Colour kernels (3 input channels): some pixel is not grey.
    assert!(img.pixels().any(|p| p[0] != p[1] || p[1] != p[2]));

    let png2 = dir.join("conv2.png");
    let out = convnet(&[
        "visualize",
        "filters",
        "--layer",
        "conv2",
        "--pretrained",
        "seed-cnn-cifar10",
        "--out",
        png2.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    // 64 kernels (grey means over 32 input channels): 8 x 8.
    let img = decode_varied(&png2);
    assert_eq!(img.dimensions(), (8 * 24 + 9 * 2, 8 * 24 + 9 * 2));
    assert!(img.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));

    fails_with(
        &[
            "visualize",
            "filters",
            "--layer",
            "nope",
            "--pretrained",
            "seed-cnn-cifar10",
        ],
        "no layer \"nope\" (no tensor nope.weight); convolution layers: conv1, conv2",
    );
    fails_with(
        &[
            "visualize",
            "filters",
            "--layer",
            "fc1",
            "--pretrained",
            "seed-cnn-cifar10",
        ],
        "fc1.weight is 2-D",
    );
    fails_with(
        &[
            "visualize",
            "filters",
            "--layer",
            "conv1",
            "--pretrained",
            "seed-cnn-cifar10",
            "--out",
            dir.join("k.svg").to_str().unwrap(),
        ],
        "k.svg: kernel pictures are bitmaps: name a .png file",
    );
    fails_with(
        &["visualize", "filters", "--layer", "conv1"],
        "name a model",
    );
}

/// `train` leaves its learning curves next to its metrics.
#[test]
fn train_writes_its_learning_curves() {
    let out = temp("train-curves");
    let v = last_json(&convnet(&[
        "train",
        "--epochs",
        "1",
        "--no-tensorboard",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["epochs"], 1);
    let img = decode_varied(&out.join("curves.png"));
    assert!(img.width() > 200 && img.height() > 200);
}
