//! The seed corpus: small valid files of every format, written by convnet's own writers
//! (checkpoints, training states, model files) or built byte by byte from the formats'
//! definitions (CIFAR, IDX, tar, safetensors of every dtype), plus the PyTorch files of the
//! test fixtures. `convnet-fuzz seed` writes them under `fuzz/corpus/<target>/`, where
//! they are committed.

use crate::targets::{gzip, join, pt_zip, PT_STORAGES};
use convnet::checkpoint::{save_checkpoint, CheckpointMeta};
use convnet::data::{DataLoader, ImageDataset, LoaderConfig, Normalize, Transform};
use convnet::model_file::ModelFile;
use convnet::train::{OptimizerKind, TrainConfig, Trainer};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Seeds = Vec<(&'static str, String, Vec<u8>)>;

/// Every seed file in `dir` (sorted by name, for reproducible runs).
pub fn load(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.iter().map(std::fs::read).collect()
}

/// Writes the corpus under `dir`, and the hand-made inputs of past findings under
/// `regressions` (replayed before every run); returns the number of files.
pub fn write_all(dir: &Path, regressions: &Path) -> Result<usize, String> {
    let mut seeds: Seeds = Vec::new();
    data_seeds(&mut seeds);
    image_seeds(&mut seeds)?;
    tensor_seeds(&mut seeds)?;
    model_seeds(&mut seeds)?;
    let mut found: Seeds = Vec::new();
    regression_inputs(&mut found)?;
    for (base, set) in [(dir, &seeds), (regressions, &found)] {
        for (target, name, bytes) in set {
            let d = base.join(target);
            std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            std::fs::write(d.join(name), bytes).map_err(|e| e.to_string())?;
        }
    }
    Ok(seeds.len() + found.len())
}

/// A pickle string (BINUNICODE).
fn pickle_str(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend_from_slice(&(s.len() as u32).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// A pickle int (BININT, 4 bytes).
fn pickle_int(i: i32) -> Vec<u8> {
    let mut v = vec![b'J'];
    v.extend_from_slice(&i.to_le_bytes());
    v
}

/// `{'w': <float tensor of size (a, b), stride (b, 1) on storage '0' of `numel` floats>}`
/// as `torch.save` pickles it.
fn tensor_pickle(a: i32, b: i32, numel: i32) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    p.extend(pickle_str("w"));
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(pickle_str("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(pickle_str("0"));
    p.extend(pickle_str("cpu"));
    p.extend(pickle_int(numel));
    p.extend_from_slice(b"tQK\x00(");
    p.extend(pickle_int(a));
    p.extend(pickle_int(b));
    p.extend_from_slice(b"t(");
    p.extend(pickle_int(b));
    p.extend_from_slice(b"K\x01t\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

/// Inputs of findings, made by hand so that they stay meaningful as the code changes.
fn regression_inputs(found: &mut Seeds) -> Result<(), String> {
    // IDX dimensions whose product overflows 64 bits.
    let huge = idx(2051, &[u32::MAX, u32::MAX, u32::MAX], &[0; 16]);
    found.push((
        "idx",
        "dims-product-overflows".into(),
        join(&[&huge, &idx(2049, &[3], &[0, 1, 2]), &[], &[]]),
    ));
    // Model files whose padding overflows the size arithmetic (conv output, flatten).
    let tutorial = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/tutorial-cnn.toml"),
    )
    .map_err(|e| e.to_string())?;
    for (name, padding) in [
        ("padding-u64-max", "18446744073709551615"),
        ("padding-4e9", "4000000000"),
    ] {
        let text = tutorial.replacen("padding = 1", &format!("padding = {padding}"), 2);
        found.push(("model-toml", name.into(), text.into_bytes()));
    }
    // One conv2d asking for 4e9 output channels (about 10^11 parameters).
    found.push((
        "model-toml",
        "conv-4e9-channels".into(),
        b"name = \"bomb\"\n[[layer]]\ntype = \"conv2d\"\nout_channels = 4000000000\nkernel_size = 3\n[[layer]]\ntype = \"flatten\"\n[[layer]]\ntype = \"linear\"\nout_features = \"classes\"\n".to_vec(),
    ));
    // An inverted residual whose expansion overflows the channel count.
    let mobile = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models/mobile-cnn.json"),
    )
    .map_err(|e| e.to_string())?;
    let text = mobile.replacen(
        "\"out_channels\": 16, \"expand_ratio\": 1}",
        "\"out_channels\": 16, \"expand_ratio\": 18446744073709551615}",
        1,
    );
    if text == mobile {
        return Err("mobile-cnn.json no longer has the layer the regression edits".into());
    }
    found.push((
        "model-json",
        "expand-ratio-overflows".into(),
        text.into_bytes(),
    ));
    // A pickle that doubles a memoised value 24 times (16 million values from 100 bytes).
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..24 {
        bomb.extend_from_slice(b"h\x00h\x00\x86q\x00");
    }
    bomb.push(b'.');
    found.push(("pt-pickle", "memo-bomb".into(), pt_input(&bomb, &[])));
    // A tensor view of 10^12 elements on a storage of 4 floats.
    let view = tensor_pickle(1_000_000, 1_000_000, 4);
    found.push((
        "pt-pickle",
        "view-past-storage".into(),
        pt_input(&view, &[&[0u8; 16]]),
    ));
    Ok(())
}

/// Pixel `i` of a synthetic image: a pattern with edges, so decoders do real work.
fn pixel(i: usize) -> u8 {
    ((i * 37) ^ (i >> 3)) as u8
}

fn cifar_records(n: usize, label_bytes: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for r in 0..n {
        for k in 0..label_bytes {
            v.push(((r + k) % 10) as u8);
        }
        v.extend((0..3072).map(|i| pixel(i + r)));
    }
    v
}

fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn data_seeds(seeds: &mut Seeds) {
    seeds.push(("cifar10", "three-records".into(), cifar_records(3, 1)));
    seeds.push(("cifar10", "one-record".into(), cifar_records(1, 1)));
    let (train, test) = (cifar_records(3, 2), cifar_records(2, 2));
    seeds.push(("cifar100", "train-test".into(), join(&[&train, &test])));
    let images = |n: u32| {
        idx(
            2051,
            &[n, 5, 4],
            &(0..n as usize * 20).map(pixel).collect::<Vec<_>>(),
        )
    };
    let labels = |n: u32| {
        idx(
            2049,
            &[n],
            &(0..n as u8).map(|l| l % 10).collect::<Vec<_>>(),
        )
    };
    let pair = [images(3), labels(3), images(2), labels(2)];
    let refs: Vec<&[u8]> = pair.iter().map(Vec::as_slice).collect();
    seeds.push(("idx", "train-and-test".into(), join(&refs)));
    seeds.push((
        "idx",
        "train-only".into(),
        join(&[refs[0], refs[1], &[], &[]]),
    ));
    seeds.push((
        "gzip",
        "train".into(),
        join(&[&gzip(&pair[0]), &gzip(&pair[1])]),
    ));
}

/// A PNG (RGB, grey, RGBA or 16-bit) or JPEG of `w x h` pixels.
fn encode(kind: &str, w: u32, h: u32) -> Result<Vec<u8>, String> {
    use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, Rgba};
    let n = (w * h) as usize;
    let img = match kind {
        "grey" => DynamicImage::ImageLuma8(
            ImageBuffer::<Luma<u8>, _>::from_raw(w, h, (0..n).map(pixel).collect())
                .ok_or("size")?,
        ),
        "rgba" => DynamicImage::ImageRgba8(
            ImageBuffer::<Rgba<u8>, _>::from_raw(w, h, (0..4 * n).map(pixel).collect())
                .ok_or("size")?,
        ),
        "grey16" => DynamicImage::ImageLuma16(
            ImageBuffer::<Luma<u16>, _>::from_raw(
                w,
                h,
                (0..n).map(|i| pixel(i) as u16 * 257).collect(),
            )
            .ok_or("size")?,
        ),
        _ => DynamicImage::ImageRgb8(
            ImageBuffer::<Rgb<u8>, _>::from_raw(w, h, (0..3 * n).map(pixel).collect())
                .ok_or("size")?,
        ),
    };
    let format = if kind == "jpeg" {
        ImageFormat::Jpeg
    } else {
        ImageFormat::Png
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// A tar of `entries` (path, bytes).
fn tar(entries: &[(String, Vec<u8>)]) -> Result<Vec<u8>, String> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, bytes.as_slice())
            .map_err(|e| e.to_string())?;
    }
    b.into_inner().map_err(|e| e.to_string())
}

/// `png` with its IHDR claiming `w x h` pixels (the chunk's CRC recomputed, so that the
/// decoder believes it).
fn claim_size(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    // Signature (8), IHDR length (4), "IHDR" (4), width, height, ... , CRC over type+data.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

fn image_seeds(seeds: &mut Seeds) -> Result<(), String> {
    for kind in ["rgb", "grey", "rgba", "grey16", "jpeg"] {
        seeds.push(("image", format!("{kind}-6x5"), encode(kind, 6, 5)?));
    }
    // Headers that claim far more pixels than the file holds.
    let png = encode("rgb", 6, 5)?;
    seeds.push((
        "image",
        "claims-100000x100000".into(),
        claim_size(png.clone(), 100_000, 100_000),
    ));
    seeds.push((
        "image",
        "claims-16000x16000".into(),
        claim_size(png, 16_000, 16_000),
    ));
    let folder = tar(&[
        ("root/cat/0001.png".into(), encode("rgb", 4, 4)?),
        ("root/cat/0002.jpg".into(), encode("jpeg", 4, 4)?),
        ("root/dog/0001.png".into(), encode("rgb", 4, 4)?),
    ])?;
    seeds.push(("tar", "image-folder".into(), folder.clone()));
    seeds.push(("tar-gz", "image-folder".into(), gzip(&folder)));
    let mut release: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|i| {
            (
                format!("cifar-10-batches-bin/data_batch_{i}.bin"),
                cifar_records(1, 1),
            )
        })
        .collect();
    release.push((
        "cifar-10-batches-bin/test_batch.bin".into(),
        cifar_records(1, 1),
    ));
    seeds.push(("tar-gz", "cifar10-release".into(), gzip(&tar(&release)?)));
    Ok(())
}

/// A safetensors file written byte by byte: one tensor of each dtype convnet converts.
fn safetensors_all_dtypes() -> Vec<u8> {
    let tensors: [(&str, &str, usize); 6] = [
        ("f32", "F32", 4),
        ("f64", "F64", 8),
        ("f16", "F16", 2),
        ("bf16", "BF16", 2),
        ("i64", "I64", 8),
        ("u8", "U8", 1),
    ];
    let (mut header, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, dtype, size) in tensors {
        let start = data.len();
        data.extend((0..6 * size).map(pixel));
        header.insert(
            name.into(),
            serde_json::json!({"dtype": dtype, "shape": [2, 3], "data_offsets": [start, data.len()]}),
        );
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let text = serde_json::Value::Object(header).to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn read_temp(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(path);
    Ok(bytes)
}

/// The PyTorch files of the test fixtures.
fn fixture_pt() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../convnet/tests/fixtures/pt");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pt" || e == "pth"))
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            Some((name, std::fs::read(&p).ok()?))
        })
        .collect();
    out.sort();
    out
}

/// A `pt-pickle` input: the pickle and its storages as parts.
fn pt_input(pickle: &[u8], storages: &[&[u8]]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = vec![pickle];
    parts.extend_from_slice(storages);
    while parts.len() < PT_STORAGES + 1 {
        parts.push(&[]);
    }
    join(&parts)
}

/// The entries of a `.pt` zip as `[pickle, storage 0, ...]` parts (at most [`PT_STORAGES`]).
fn pt_parts(zip_bytes: &[u8]) -> Option<Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes)).ok()?;
    let mut pickle = Vec::new();
    let mut storages: Vec<(usize, Vec<u8>)> = Vec::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).ok()?;
        let name = f.name().to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok()?;
        if name.ends_with("data.pkl") {
            pickle = bytes;
        } else if let Some(k) = name.rsplit_once("/data/").and_then(|(_, k)| k.parse().ok()) {
            storages.push((k, bytes));
        }
    }
    storages.sort();
    storages.truncate(PT_STORAGES);
    if pickle.is_empty() || storages.iter().enumerate().any(|(i, (k, _))| i != *k) {
        return None;
    }
    let storages: Vec<&[u8]> = storages.iter().map(|(_, b)| b.as_slice()).collect();
    Some(pt_input(&pickle, &storages))
}

fn tensor_seeds(seeds: &mut Seeds) -> Result<(), String> {
    let tmp = std::env::temp_dir().join(format!("convnet-fuzz-seed-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    seeds.push(("safetensors", "all-dtypes".into(), safetensors_all_dtypes()));
    // A checkpoint of a tiny model file, and of the zoo's lenet5.
    let tiny = ModelFile::from_toml(
        "name = \"tiny\"\n[[layer]]\ntype = \"conv2d\"\nout_channels = 2\nkernel_size = 3\n[[layer]]\ntype = \"batchnorm2d\"\n[[layer]]\ntype = \"relu\"\n[[layer]]\ntype = \"flatten\"\n[[layer]]\ntype = \"linear\"\nout_features = \"classes\"\n",
        "tiny.toml",
    )
    .map_err(|e| e.to_string())?;
    for (name, spec, input) in [
        (
            "tiny-model-file",
            convnet::models::ModelSpec::File(tiny),
            [1, 6, 5],
        ),
        (
            "lenet5",
            convnet::models::ModelSpec::zoo("lenet5").map_err(|e| e.to_string())?,
            [1, 28, 28],
        ),
    ] {
        convnet::manual_seed(0);
        let model = spec.build(input, 3).map_err(|e| e.to_string())?;
        let meta = CheckpointMeta {
            architecture: spec.name().to_string(),
            input_shape: input,
            classes: vec!["a".into(), "b".into(), "c".into()],
            normalize: Normalize::default_for(1),
            epoch: 1,
            step: 7,
            model_spec: spec.model_spec(),
            sequence: None,
        };
        let path = tmp.join(format!("{name}.safetensors"));
        save_checkpoint(&path, &model.state_dict(), &meta).map_err(|e| e.to_string())?;
        let bytes = read_temp(&path)?;
        seeds.push(("checkpoint", name.into(), bytes.clone()));
        seeds.push(("safetensors", name.into(), bytes));
        // Its int8 version, calibrated on a few synthetic images.
        let n = 8;
        let pixels: Vec<u8> = (0..n * input.iter().product::<usize>())
            .map(pixel)
            .collect();
        let labels = (0..n as u32).map(|i| i % 3).collect();
        let images = ImageDataset::new(pixels, labels, input, meta.classes.clone(), "calibration")
            .map_err(|e| e.to_string())?;
        let loader = DataLoader::for_evaluation(Arc::new(images), meta.normalize.clone())
            .map_err(|e| e.to_string())?;
        let q = convnet::quant::quantize(&model, &loader, &convnet::quant::QuantConfig::default())
            .map_err(|e| e.to_string())?;
        let path = tmp.join(format!("{name}-int8.safetensors"));
        q.save(&path, &meta).map_err(|e| e.to_string())?;
        seeds.push(("quantized", name.into(), read_temp(&path)?));
    }
    for (name, bytes) in fixture_pt() {
        if let Some(parts) = pt_parts(&bytes) {
            seeds.push(("pt-pickle", name.clone(), parts));
        }
        seeds.push(("pt", name, bytes));
    }
    // The same pickle framing around a storage the seed did not have.
    let zip = pt_zip(b"\x80\x02}q\x00.", &[]).map_err(|e| e.to_string())?;
    seeds.push(("pt", "empty-dict".into(), zip));
    // Training states of lenet5 after a step with SGD momentum and with AdamW.
    let data = Arc::new(
        ImageDataset::new(
            (0..8 * 784).map(pixel).collect(),
            (0..8).map(|i| i % 10).collect(),
            [1, 28, 28],
            (0..10).map(|i| i.to_string()).collect(),
            "seed",
        )
        .map_err(|e| e.to_string())?,
    );
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        convnet::manual_seed(0);
        let model = convnet::models::build("lenet5", [1, 28, 28], 10).map_err(|e| e.to_string())?;
        let cfg = TrainConfig {
            optimizer,
            epochs: 1,
            ..Default::default()
        };
        let loader = DataLoader::new(
            data.clone(),
            Transform {
                normalize: Normalize::default_for(1),
                augment: None,
            },
            LoaderConfig {
                batch_size: 8,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let mut trainer = Trainer::new(model, cfg, 1).map_err(|e| e.to_string())?;
        trainer
            .train_epoch(&loader, &mut |_| {})
            .map_err(|e| e.to_string())?;
        let path = tmp.join("state.safetensors");
        trainer
            .save_state(&path, &HashMap::from([("run".into(), "{}".into())]))
            .map_err(|e| e.to_string())?;
        seeds.push((
            "train-state",
            format!("{optimizer:?}").to_lowercase(),
            read_temp(&path)?,
        ));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn model_seeds(seeds: &mut Seeds) -> Result<(), String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        let file = ModelFile::from_path(&path).map_err(|e| e.to_string())?;
        if name.ends_with(".toml") {
            seeds.push(("model-toml", name.clone(), text.into_bytes()));
        } else {
            seeds.push(("model-json", name.clone(), text.into_bytes()));
        }
        seeds.push((
            "model-json",
            format!("{name}.json"),
            file.to_json().into_bytes(),
        ));
    }
    Ok(())
}
