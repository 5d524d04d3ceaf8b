//! `convnet explain` as a user runs it: every method on pretrained resnet20 and seed-cnn
//! with real test images of two sizes; the PNGs decode, have the image's size and are not
//! constant; the `.npy` holds the raw map at the layer's (or input's) resolution; `--json`
//! names every file; bad layers, targets and images give clear errors.

mod common;
use common::{convnet, fails_with, last_json, temp};
use std::path::{Path, PathBuf};

/// Two test images: a 32x32 JPEG from the bundled sample and the same image enlarged to
/// 48x40 as PNG (the pictures must follow the image's size, not the model's).
fn images(dir: &Path) -> [PathBuf; 2] {
    std::fs::create_dir_all(dir).unwrap();
    let tar = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/cifar10-sample/test.tar.gz");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&tar).unwrap(),
    ));
    let small = dir.join("cat.jpg");
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        if e.path().unwrap().to_string_lossy().contains("/cat/") {
            e.unpack(&small).unwrap();
            break;
        }
    }
    let big = dir.join("cat-big.png");
    image::open(&small)
        .unwrap()
        .resize_exact(48, 40, image::imageops::FilterType::Triangle)
        .save(&big)
        .unwrap();
    [small, big]
}

/// Reads a `.npy` written by convnet: (shape, values).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (shape, values)
}

#[test]
fn every_method_writes_pictures_of_the_image_size_and_the_raw_map() {
    let dir = temp("explain");
    let [small, big] = images(&dir);
    let out = dir.join("out");
    for (model, method, raw) in [
        ("resnet20-cifar10", "gradcam", [8, 8]),
        ("resnet20-cifar10", "gradcam++", [8, 8]),
        ("seed-cnn-cifar10", "gradcam", [16, 16]),
        ("resnet20-cifar10", "saliency", [32, 32]),
        ("resnet20-cifar10", "integrated-gradients", [32, 32]),
        ("seed-cnn-cifar10", "occlusion", [32, 32]),
    ] {
        let args = [
            "explain",
            "--pretrained",
            model,
            small.to_str().unwrap(),
            big.to_str().unwrap(),
            "--method",
            method,
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        let v = last_json(&convnet(&args));
        let list = v["explanations"].as_array().unwrap();
        assert_eq!(list.len(), 2, "{method}");
        for (e, (w, h)) in list.iter().zip([(32, 32), (48, 40)]) {
            assert_eq!(e["method"], method);
            assert!(e["probability"].as_f64().unwrap() > 0.0);
            for key in ["map", "overlay"] {
                let p = e[key].as_str().unwrap();
                let img = image::open(p)
                    .unwrap_or_else(|err| panic!("{p}: {err}"))
                    .to_rgb8();
                assert_eq!(img.dimensions(), (w, h), "{p}");
                let first = img.get_pixel(0, 0);
                assert!(img.pixels().any(|px| px != first), "{p} is one colour");
            }
            let (shape, values) = read_npy(Path::new(e["raw"].as_str().unwrap()));
            assert_eq!(shape, raw, "{method}");
            assert!(values.iter().all(|v| v.is_finite()));
            assert!(
                values.iter().any(|&v| v != values[0]),
                "{method}: constant map"
            );
            if method.starts_with("gradcam") {
                assert!(values.iter().all(|&v| v >= 0.0), "{method}: ReLU'd map");
                assert!(e["layer"].as_str().is_some());
            }
            if method == "integrated-gradients" {
                assert!(e["completeness_gap"].as_f64().is_some());
            }
        }
    }
}

#[test]
fn targets_by_label_and_index_agree() {
    let dir = temp("explain-target");
    let [small, _] = images(&dir);
    let run = |target: &str| {
        last_json(&convnet(&[
            "explain",
            "--pretrained",
            "resnet20-cifar10",
            small.to_str().unwrap(),
            "--target",
            target,
            "--out",
            dir.join(target).to_str().unwrap(),
            "--json",
        ]))
    };
    let (a, b) = (run("horse"), run("7"));
    assert_eq!(a["explanations"][0]["target"], 7);
    assert_eq!(a["explanations"][0]["label"], "horse");
    assert_eq!(
        a["explanations"][0]["probability"],
        b["explanations"][0]["probability"]
    );
}

#[test]
fn bad_input_names_the_problem() {
    let dir = temp("explain-bad");
    let [small, _] = images(&dir);
    let img = small.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let base = ["explain", "--pretrained", "resnet20-cifar10", "--out", out];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let check = |extra: &[&str], needle: &str| {
        let args = with(extra);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        fails_with(&args, needle);
    };
    check(&[img, "--layer", "layer9"], "no layer named 'layer9'");
    check(&[img, "--layer", "layer9"], "layer3.2.relu");
    check(&[img, "--target", "12"], "--target 12 is out of range");
    check(
        &[img, "--target", "unicorn"],
        "--target unicorn is not a class",
    );
    check(
        &[img, "--method", "saliency", "--layer", "layer3"],
        "reads no layer",
    );
    check(
        &[img, "--method", "occlusion", "--window", "64"],
        "window of 1 to 32",
    );
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"not an image").unwrap();
    check(&[bad.to_str().unwrap()], "broken.jpg: not a readable image");
}

/// `visualize activations`: one tile per channel of the layer (16 for ResNet-20's `layer1`,
/// capped by --max-maps), a picture that decodes and is not one colour; a wrong layer lists
/// the valid ones.
#[test]
fn activation_grids_draw_a_layers_feature_maps() {
    let dir = temp("activations");
    let [small, _] = images(&dir);
    let out = dir.join("act.png");
    let run = |max: &str| {
        let o = convnet(&[
            "visualize",
            "activations",
            small.to_str().unwrap(),
            "--layer",
            "layer1",
            "--pretrained",
            "resnet20-cifar10",
            "--max-maps",
            max,
            "--out",
            out.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let img = image::open(&out).unwrap().to_rgb8();
        let first = *img.get_pixel(0, 0);
        assert!(img.pixels().any(|p| *p != first));
        (stdout, img.dimensions())
    };
    let (all, all_size) = run("64");
    assert!(
        all.contains("16 of 16 feature maps of layer1 (32x32)"),
        "{all}"
    );
    let (four, four_size) = run("4");
    assert!(four.contains("4 of 16 feature maps"), "{four}");
    assert!(four_size.0 * four_size.1 < all_size.0 * all_size.1);
    fails_with(
        &[
            "visualize",
            "activations",
            small.to_str().unwrap(),
            "--layer",
            "layer7",
            "--pretrained",
            "resnet20-cifar10",
        ],
        "no layer named 'layer7'",
    );
}
