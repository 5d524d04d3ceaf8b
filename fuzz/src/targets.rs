//! The targets: one per reader, each laying its input out as the files a user would give
//! convnet and calling the public entry point the CLI uses.
//!
//! Allocation bounds, from the input's size `n` (bytes): readers of uncompressed formats
//! may hold the file a few times over (`16 MiB + 8 n`); compressed ones may hold what it
//! decompresses to (`16 MiB + 1100 n`: deflate expands at most about 1032:1); images may
//! also hold their decoded pixels, at most 192 MiB (64 megapixels of RGB), a few times over
//! while they are converted to planes (`+ 10 bytes x 2^26`); model descriptions are built with a limit of 2^22
//! parameters (`+ 64 MiB`; the guard under test is the one that refuses a layer past the
//! limit before allocating it).

use crate::Workdir;
use convnet::checkpoint;
use convnet::data::{self, FolderOptions};
use convnet::model_file::ModelFile;
use std::io::Write;
use std::path::Path;

/// One reader under test.
pub struct Target {
    pub name: &'static str,
    pub what: &'static str,
    /// Folder of its seeds under the corpus folder.
    pub corpus: &'static str,
    pub run: fn(&[u8], &Workdir) -> Result<(), String>,
    /// Bytes it may allocate for an input of this many bytes.
    pub bound: fn(usize) -> usize,
}

const MIB: usize = 1 << 20;

/// Parameters a fuzzed model description may build (more is refused before allocating,
/// which is what the size guard must do; the real limit is `nn::MAX_PARAMETERS`).
const SMALL_MODEL: usize = 1 << 22;

fn plain(n: usize) -> usize {
    16 * MIB + 8 * n
}

fn compressed(n: usize) -> usize {
    16 * MIB + 1100 * n
}

fn images(n: usize) -> usize {
    compressed(n) + 10 * (1 << 26)
}

fn model(n: usize) -> usize {
    plain(n) + 64 * MIB
}

pub const ALL: &[Target] = &[
    Target {
        name: "cifar10",
        what: "CIFAR-10 binary release folder (the input is every batch file)",
        corpus: "cifar10",
        run: cifar10,
        bound: plain,
    },
    Target {
        name: "cifar100",
        what: "CIFAR-100 binary release folder (train.bin and test.bin)",
        corpus: "cifar100",
        run: cifar100,
        bound: plain,
    },
    Target {
        name: "idx",
        what: "MNIST IDX images + labels (parts of the input), raw",
        corpus: "idx",
        run: idx_raw,
        bound: plain,
    },
    Target {
        name: "idx-gz",
        what: "MNIST IDX images + labels, gzip-compressed after mutation",
        corpus: "idx",
        run: idx_gz,
        bound: compressed,
    },
    Target {
        name: "gzip",
        what: "an IDX pair of .gz files whose compressed bytes are mutated",
        corpus: "gzip",
        run: gzip_raw,
        bound: compressed,
    },
    Target {
        name: "folder-tar",
        what: "image folder archive: a tar (mutated) then gzip-compressed, read as .tar.gz",
        corpus: "tar",
        run: folder_tar,
        bound: images,
    },
    Target {
        name: "tar-gz",
        what: "a .tar.gz data set whose compressed bytes are mutated (CIFAR or image folder)",
        corpus: "tar-gz",
        run: tar_gz_raw,
        bound: images,
    },
    Target {
        name: "image",
        what: "one JPEG/PNG image in each class folder of an image folder",
        corpus: "image",
        run: image,
        bound: images,
    },
    Target {
        name: "safetensors",
        what: "safetensors file of tensors (state dict)",
        corpus: "safetensors",
        run: safetensors,
        bound: plain,
    },
    Target {
        name: "checkpoint",
        what: "convnet checkpoint: metadata, model rebuilt from it, weights loaded",
        corpus: "checkpoint",
        run: checkpoint_file,
        bound: model,
    },
    Target {
        name: "quantized",
        what: "int8 checkpoint: metadata, model rebuilt and fused, int8 tensors and scales checked, plan compiled",
        corpus: "quantized",
        run: quantized_file,
        bound: model,
    },
    Target {
        name: "pt",
        what: "PyTorch .pt/.pth zip (the zip bytes are mutated)",
        corpus: "pt",
        run: pt,
        bound: plain,
    },
    Target {
        name: "pt-pickle",
        what: "PyTorch .pt/.pth whose data.pkl is mutated, zipped with the seed's storages",
        corpus: "pt-pickle",
        run: pt_pickle,
        bound: plain,
    },
    Target {
        name: "model-toml",
        what: "TOML model file: parsed, planned, built when small",
        corpus: "model-toml",
        run: model_toml,
        bound: model,
    },
    Target {
        name: "model-json",
        what: "JSON model file: parsed, planned, built when small",
        corpus: "model-json",
        run: model_json,
        bound: model,
    },
    Target {
        name: "train-state",
        what: "training state (optimizer state, position, random state) resumed into seed-cnn",
        corpus: "train-state",
        run: train_state,
        bound: model,
    },
];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

const NO_CACHE: FolderOptions = FolderOptions {
    skip_bad_images: false,
    cache: false,
    resize: None,
};

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::write(path, bytes).map_err(err)
}

/// Splits an input into `k` parts: each but the last prefixed by its length (u32 little
/// endian, clamped to what is left), so that mutations can move the boundaries.
pub fn parts(input: &[u8], k: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(k);
    let mut rest = input;
    for _ in 0..k.saturating_sub(1) {
        let len = rest
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        rest = rest.get(4..).unwrap_or(&[]);
        let len = len.min(rest.len());
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    out.push(rest);
    out
}

/// Joins parts as [`parts`] splits them.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(bytes);
    e.finish().unwrap_or_default()
}

fn open(path: &Path) -> Result<(), String> {
    data::open(path, &NO_CACHE).map(drop).map_err(err)
}

fn cifar10(input: &[u8], work: &Workdir) -> Result<(), String> {
    let dir = work.fresh();
    for name in [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ] {
        write(&dir.join(name), input)?;
    }
    write(
        &dir.join("batches.meta.txt"),
        b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n",
    )?;
    open(&dir)
}

fn cifar100(input: &[u8], work: &Workdir) -> Result<(), String> {
    let dir = work.fresh();
    let [train, test] = <[&[u8]; 2]>::try_from(parts(input, 2)).map_err(|_| "parts")?;
    write(&dir.join("train.bin"), train)?;
    write(&dir.join("test.bin"), test)?;
    open(&dir)
}

fn idx_files(input: &[u8], work: &Workdir, compress: bool) -> Result<(), String> {
    let dir = work.fresh();
    let p = parts(input, 4);
    let names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    for (name, bytes) in names.iter().zip(&p) {
        if bytes.is_empty() && name.starts_with("t10k") {
            continue;
        }
        if compress {
            write(&dir.join(format!("{name}.gz")), &gzip(bytes))?;
        } else {
            write(&dir.join(name), bytes)?;
        }
    }
    open(&dir)?;
    // A single file given directly (its partner found beside it).
    open(&dir.join(if compress {
        "train-images-idx3-ubyte.gz"
    } else {
        "train-images-idx3-ubyte"
    }))
}

fn idx_raw(input: &[u8], work: &Workdir) -> Result<(), String> {
    idx_files(input, work, false)
}

fn idx_gz(input: &[u8], work: &Workdir) -> Result<(), String> {
    idx_files(input, work, true)
}

fn gzip_raw(input: &[u8], work: &Workdir) -> Result<(), String> {
    let dir = work.fresh();
    let p = parts(input, 2);
    write(&dir.join("train-images-idx3-ubyte.gz"), p[0])?;
    write(&dir.join("train-labels-idx1-ubyte.gz"), p[1])?;
    open(&dir)
}

fn folder_tar(input: &[u8], _work: &Workdir) -> Result<(), String> {
    data::image_folder_from_tar_gz_bytes("fuzz.tar.gz", &gzip(input), &NO_CACHE)
        .map(drop)
        .map_err(err)
}

fn tar_gz_raw(input: &[u8], work: &Workdir) -> Result<(), String> {
    let dir = work.fresh();
    let path = dir.join("data.tar.gz");
    write(&path, input)?;
    open(&path)
}

fn image(input: &[u8], work: &Workdir) -> Result<(), String> {
    let dir = work.fresh();
    write(&dir.join("a").join("x.png"), input)?;
    write(&dir.join("b").join("y.jpg"), input)?;
    open(&dir)
}

fn safetensors(input: &[u8], _work: &Workdir) -> Result<(), String> {
    checkpoint::tensors_from_bytes(Path::new("fuzz.safetensors"), input)
        .map(drop)
        .map_err(err)
}

fn checkpoint_file(input: &[u8], _work: &Workdir) -> Result<(), String> {
    let (tensors, meta) =
        checkpoint::checkpoint_from_bytes(Path::new("fuzz.safetensors"), input).map_err(err)?;
    let spec =
        convnet::models::ModelSpec::from_checkpoint(&meta.architecture, meta.model_spec.as_deref())
            .map_err(err)?;
    let model = spec
        .build_with_limit(meta.input_shape, meta.classes.len(), SMALL_MODEL)
        .map_err(err)?;
    model.load_state_dict(&tensors, true).map_err(err)
}

fn quantized_file(input: &[u8], _work: &Workdir) -> Result<(), String> {
    convnet::quant::QuantizedModel::from_bytes_with_limit(
        Path::new("fuzz-int8.safetensors"),
        input,
        SMALL_MODEL,
    )
    .map(drop)
    .map_err(err)
}

fn pt(input: &[u8], _work: &Workdir) -> Result<(), String> {
    checkpoint::tensors_from_bytes(Path::new("fuzz.pt"), input)
        .map(drop)
        .map_err(err)
}

/// Storages a `pt-pickle` input carries (lenet5's state dict has ten tensors).
pub const PT_STORAGES: usize = 11;

/// The input is `[pickle, storage 0, storage 1, ...]` parts; zipped as torch.save does.
fn pt_pickle(input: &[u8], _work: &Workdir) -> Result<(), String> {
    let p = parts(input, PT_STORAGES + 1);
    let zip = pt_zip(p[0], &p[1..]).map_err(err)?;
    checkpoint::tensors_from_bytes(Path::new("fuzz.pt"), &zip)
        .map(drop)
        .map_err(err)
}

/// A zip laid out as `torch.save` writes one: `archive/data.pkl` and `archive/data/N`.
pub fn pt_zip(pickle: &[u8], storages: &[&[u8]]) -> zip::result::ZipResult<Vec<u8>> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts)?;
    w.write_all(pickle)?;
    for (i, s) in storages.iter().enumerate() {
        w.start_file(format!("archive/data/{i}"), opts)?;
        w.write_all(s)?;
    }
    w.start_file("archive/version", opts)?;
    w.write_all(b"3\n")?;
    Ok(w.finish()?.into_inner())
}

fn model_text(spec: Result<ModelFile, convnet::Error>) -> Result<(), String> {
    let spec = convnet::models::ModelSpec::File(spec.map_err(err)?);
    for (input, classes) in [([3, 32, 32], 10), ([1, 28, 28], 3)] {
        spec.build_with_limit(input, classes, SMALL_MODEL)
            .map_err(err)?;
    }
    Ok(())
}

fn model_toml(input: &[u8], _work: &Workdir) -> Result<(), String> {
    let text = std::str::from_utf8(input).map_err(err)?;
    model_text(ModelFile::from_toml(text, "fuzz.toml"))
}

fn model_json(input: &[u8], _work: &Workdir) -> Result<(), String> {
    let text = std::str::from_utf8(input).map_err(err)?;
    model_text(ModelFile::from_json(text, "fuzz.json"))
}

fn train_state(input: &[u8], _work: &Workdir) -> Result<(), String> {
    use convnet::train::{OptimizerKind, TrainConfig, Trainer};
    for optimizer in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
        let model = convnet::models::build("lenet5", [1, 28, 28], 10).map_err(err)?;
        let cfg = TrainConfig {
            optimizer,
            ..Default::default()
        };
        let mut trainer = Trainer::new(model, cfg, 10).map_err(err)?;
        trainer
            .load_state_from_bytes(Path::new("fuzz.safetensors"), input)
            .map_err(err)?;
    }
    Ok(())
}
