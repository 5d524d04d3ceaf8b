//! Readers on files generated in the exact official layouts, bad-input errors, the decode
//! cache, transforms and loader determinism.

mod common;

use common::scratch::Scratch;

use convnet::data::{
    self, Augment, DataLoader, DataSplit, FolderOptions, ImageDataset, LoaderConfig, Normalize,
    Transform,
};
use convnet::Error;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// A fresh empty folder under the system temp dir.
fn temp_dir(name: &str) -> Scratch {
    Scratch::folder(&format!("test-{name}"))
}

fn no_cache() -> FolderOptions {
    FolderOptions {
        skip_bad_images: false,
        cache: false,
        resize: None,
    }
}

/// CIFAR-10 records: label then 1024 R, 1024 G, 1024 B bytes; pixel values encode (record, plane).
fn cifar_records(labels: &[u8], extra_label_byte: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if extra_label_byte {
            out.push(l / 5); // coarse label
        }
        out.push(l);
        for plane in 0..3u8 {
            out.extend(std::iter::repeat_n(
                (i as u8).wrapping_mul(3).wrapping_add(plane),
                1024,
            ));
        }
    }
    out
}

fn write_cifar10(dir: &Path) {
    for b in 1..=5 {
        std::fs::write(
            dir.join(format!("data_batch_{b}.bin")),
            cifar_records(&[b as u8, 9, 0], false),
        )
        .unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_records(&[3, 4], false)).unwrap();
    std::fs::write(
        dir.join("batches.meta.txt"),
        "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
    )
    .unwrap();
}

fn tar_gz(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append_data(&mut h, name, &data[..]).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap();
}

fn pair(split: DataSplit) -> (ImageDataset, ImageDataset) {
    match split {
        DataSplit::Pair { train, test } => (train, test),
        other => panic!("expected a train/test pair, got {other:?}"),
    }
}

#[test]
fn cifar10_binary_folder_and_archive() {
    let dir = temp_dir("cifar10");
    write_cifar10(&dir);
    let (train, test) = pair(data::open(&dir, &no_cache()).unwrap());
    assert_eq!((train.len(), test.len()), (15, 2));
    assert_eq!(train.image_shape(), [3, 32, 32]);
    assert_eq!(train.classes()[9], "truck");
    assert_eq!(&train.labels()[..3], &[1, 9, 0]);
    assert_eq!(test.labels(), &[3, 4]);
    // Record 1 of a batch: R plane = 3, G = 4, B = 5 (planes kept in order).
    let img = train.image(1).unwrap();
    assert_eq!((img[0], img[1024], img[2048], img[3071]), (3, 4, 5, 5));

    let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            (
                format!(
                    "cifar-10-batches-bin/{}",
                    p.file_name().unwrap().to_str().unwrap()
                ),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    let archive = dir.join("cifar-10-binary.tar.gz");
    tar_gz(&archive, &files);
    let (train2, test2) = pair(data::open(&archive, &no_cache()).unwrap());
    assert_eq!(train2.labels(), train.labels());
    assert_eq!(train2.image(7).unwrap(), train.image(7).unwrap());
    assert_eq!(test2.image(1).unwrap(), test.image(1).unwrap());
}

#[test]
fn cifar100_uses_fine_labels() {
    let dir = temp_dir("cifar100");
    std::fs::write(dir.join("train.bin"), cifar_records(&[99, 42, 7], true)).unwrap();
    std::fs::write(dir.join("test.bin"), cifar_records(&[13], true)).unwrap();
    let (train, test) = pair(data::open(&dir, &no_cache()).unwrap());
    assert_eq!(train.labels(), &[99, 42, 7]);
    assert_eq!(train.classes().len(), 100);
    assert_eq!(test.labels(), &[13]);
}

#[test]
fn cifar_bad_files_name_the_file_and_the_problem() {
    let dir = temp_dir("cifar-bad");
    write_cifar10(&dir);
    let batch = dir.join("data_batch_3.bin");
    let mut bytes = std::fs::read(&batch).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&batch, &bytes).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("data_batch_3.bin") && e.contains("3073"), "{e}");

    write_cifar10(&dir);
    let mut bytes = cifar_records(&[1, 2], false);
    bytes[3073] = 12; // second record's label
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(
        e.contains("test_batch.bin") && e.contains("record 1") && e.contains("label 12"),
        "{e}"
    );

    write_cifar10(&dir);
    std::fs::remove_file(dir.join("data_batch_5.bin")).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("data_batch_5.bin"), "{e}");
}

fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn mnist_idx_raw_and_gz() {
    let dir = temp_dir("mnist");
    let pixels: Vec<u8> = (0..3 * 28 * 28).map(|i| (i % 251) as u8).collect();
    std::fs::write(
        dir.join("t10k-images-idx3-ubyte.gz"),
        gz(&idx(2051, &[3, 28, 28], &pixels)),
    )
    .unwrap();
    std::fs::write(
        dir.join("t10k-labels-idx1-ubyte.gz"),
        gz(&idx(2049, &[3], &[7, 0, 9])),
    )
    .unwrap();
    match data::open(&dir, &no_cache()).unwrap() {
        DataSplit::Single {
            data,
            sorted_by_class,
        } => {
            assert!(!sorted_by_class);
            assert_eq!(data.image_shape(), [1, 28, 28]);
            assert_eq!(data.labels(), &[7, 0, 9]);
            assert_eq!(data.image(2).unwrap(), &pixels[2 * 784..]);
        }
        other => panic!("{other:?}"),
    }
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx(2051, &[2, 28, 28], &pixels[..2 * 784]),
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx(2049, &[2], &[1, 2]),
    )
    .unwrap();
    let (train, test) = pair(data::open(&dir, &no_cache()).unwrap());
    assert_eq!((train.len(), test.len()), (2, 3));
}

#[test]
fn mnist_bad_files() {
    let dir = temp_dir("mnist-bad");
    let images = dir.join("t10k-images-idx3-ubyte");
    let labels = dir.join("t10k-labels-idx1-ubyte");
    let px = vec![0u8; 2 * 28 * 28];
    std::fs::write(&labels, idx(2049, &[2], &[1, 2])).unwrap();

    std::fs::write(&images, idx(2049, &[2, 28, 28], &px)).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(
        e.contains("t10k-images-idx3-ubyte") && e.contains("magic"),
        "{e}"
    );

    std::fs::write(&images, idx(2051, &[2, 28, 28], &px[..1000])).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");

    std::fs::write(&images, idx(2051, &[2, 28, 0], &[])).unwrap();
    assert!(data::open(&dir, &no_cache())
        .unwrap_err()
        .to_string()
        .contains("dimensions"));

    std::fs::write(&images, idx(2051, &[3, 28, 28], &vec![0u8; 3 * 784])).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("2 labels for 3 images"), "{e}");

    std::fs::write(&images, idx(2051, &[2, 28, 28], &px)).unwrap();
    std::fs::write(&labels, idx(2049, &[2], &[1, 10])).unwrap();
    let e = data::open(&dir, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("label 10"), "{e}");
}

fn png(w: u32, h: u32, seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([seed, x as u8, y as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write_folder(root: &Path) {
    for (class, n) in [("cat", 2), ("ant", 3)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            std::fs::write(
                root.join(class).join(format!("{i}.png")),
                png(5, 4, i as u8 + if class == "cat" { 100 } else { 0 }),
            )
            .unwrap();
        }
    }
    std::fs::write(root.join("cat").join("notes.txt"), "not an image, ignored").unwrap();
}

#[test]
fn image_folder_directory_and_archive_agree() {
    let dir = temp_dir("folder");
    let root = dir.join("pets");
    write_folder(&root);
    let ds = match data::open(&root, &no_cache()).unwrap() {
        DataSplit::Single {
            data,
            sorted_by_class,
        } => {
            assert!(sorted_by_class);
            data
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        ds.classes(),
        &["ant", "cat"],
        "sorted folder names, like ImageFolder"
    );
    assert_eq!(ds.labels(), &[0, 0, 0, 1, 1]);
    assert_eq!(ds.image_shape(), [3, 4, 5]);
    // Planar layout: R plane is the seed, G the x coordinate, B the y coordinate.
    let img = ds.image(3).unwrap();
    assert_eq!((img[0], img[20 + 7], img[40 + 7]), (100, 2, 1));

    let mut files = Vec::new();
    for class in ["ant", "cat"] {
        for e in std::fs::read_dir(root.join(class)).unwrap() {
            let p = e.unwrap().path();
            files.push((
                format!("pets/{class}/{}", p.file_name().unwrap().to_str().unwrap()),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    let archive = dir.join("pets.tar.gz");
    tar_gz(&archive, &files);
    match data::open(&archive, &no_cache()).unwrap() {
        DataSplit::Single { data, .. } => {
            assert_eq!(data.labels(), ds.labels());
            assert_eq!(data.image(4).unwrap(), ds.image(4).unwrap());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn train_test_pair_of_folders_and_archives() {
    let dir = temp_dir("pair");
    write_folder(&dir.join("train"));
    write_folder(&dir.join("test"));
    let (train, test) = pair(data::open(&dir, &no_cache()).unwrap());
    assert_eq!((train.len(), test.len()), (5, 5));
}

#[test]
fn image_folder_bad_input() {
    let dir = temp_dir("folder-bad");
    let root = dir.join("set");
    write_folder(&root);
    std::fs::write(
        root.join("cat").join("broken.jpg"),
        b"\xff\xd8 definitely not a jpeg",
    )
    .unwrap();
    let e = data::open(&root, &no_cache()).unwrap_err().to_string();
    assert!(
        e.contains("broken.jpg") && e.contains("--skip-bad-images"),
        "{e}"
    );
    let opts = FolderOptions {
        skip_bad_images: true,
        cache: false,
        resize: None,
    };
    match data::open(&root, &opts).unwrap() {
        DataSplit::Single { data, .. } => assert_eq!((data.len(), data.skipped), (5, 1)),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(root.join("cat").join("broken.jpg")).unwrap();

    std::fs::write(root.join("cat").join("big.png"), png(6, 4, 1)).unwrap();
    let e = data::open(&root, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("big.png") && e.contains("one size"), "{e}");
    std::fs::remove_file(root.join("cat").join("big.png")).unwrap();

    std::fs::create_dir_all(root.join("dog")).unwrap();
    let e = data::open(&root, &no_cache()).unwrap_err().to_string();
    assert!(e.contains("dog") && e.contains("empty class folder"), "{e}");

    let e = data::open(&dir.join("nope"), &no_cache()).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("nope"),
        "{e}"
    );
    std::fs::write(dir.join("file.bin"), b"x").unwrap();
    assert!(data::open(&dir.join("file.bin"), &no_cache())
        .unwrap_err()
        .to_string()
        .contains("not a data set"));
    std::fs::write(dir.join("cut.tar.gz"), &gz(b"0123456789")[..8]).unwrap();
    assert!(data::open(&dir.join("cut.tar.gz"), &no_cache())
        .unwrap_err()
        .to_string()
        .contains("cut.tar.gz"));
}

#[test]
fn decoded_folders_are_cached_and_the_cache_follows_changes() {
    let dir = temp_dir("cache");
    // The only test here that caches: the decode cache goes to its own folder.
    std::env::set_var("CONVNET_CACHE_DIR", dir.join("cache"));
    let root = dir.join("set");
    write_folder(&root);
    let opts = FolderOptions::default();
    let first = match data::open(&root, &opts).unwrap() {
        DataSplit::Single { data, .. } => data,
        other => panic!("{other:?}"),
    };
    let cache = data::cache_dir().unwrap();
    let entries = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    let before = entries(&cache);
    assert!(before >= 1, "a cache entry was written");
    let second = match data::open(&root, &opts).unwrap() {
        DataSplit::Single { data, .. } => data,
        other => panic!("{other:?}"),
    };
    assert_eq!(first, second);
    assert_eq!(entries(&cache), before, "the second open read the cache");
    std::fs::write(root.join("ant").join("9.png"), png(5, 4, 9)).unwrap();
    let third = match data::open(&root, &opts).unwrap() {
        DataSplit::Single { data, .. } => data,
        other => panic!("{other:?}"),
    };
    assert_eq!(third.len(), 6, "a changed folder is decoded again");
}

fn tiny_set(n: usize) -> ImageDataset {
    let pixels: Vec<u8> = (0..n * 3 * 4 * 4).map(|i| (i * 7 % 256) as u8).collect();
    ImageDataset::new(
        pixels,
        (0..n as u32).map(|i| i % 3).collect(),
        [3, 4, 4],
        vec!["a".into(), "b".into(), "c".into()],
        "mem",
    )
    .unwrap()
}

#[test]
fn transforms_normalise_crop_flip_and_cut_out_deterministically() {
    let img: Vec<u8> = (0..16).map(|v| v as u8 * 10).collect();
    let t = Transform {
        normalize: Normalize {
            mean: vec![0.0],
            std: vec![1.0],
        },
        augment: Some(Augment {
            crop_padding: 0,
            hflip: true,
            cutout: 0,
            random_resized_crop: 0,
        }),
    };
    let mut flips = 0;
    for seed in 0..64 {
        let mut out = [0f32; 16];
        t.apply(&img, [1, 4, 4], &mut convnet::Rng::new(seed), &mut out);
        let plain: Vec<f32> = img.iter().map(|&v| v as f32 / 255.0).collect();
        let flipped: Vec<f32> = (0..16).map(|i| plain[(i / 4) * 4 + 3 - i % 4]).collect();
        if out.to_vec() == flipped {
            flips += 1;
        } else {
            assert_eq!(out.to_vec(), plain);
        }
    }
    assert!((16..=48).contains(&flips), "about half flipped: {flips}");

    let crop = Transform {
        normalize: Normalize {
            mean: vec![0.0],
            std: vec![1.0],
        },
        augment: Some(Augment {
            crop_padding: 2,
            hflip: false,
            cutout: 2,
            random_resized_crop: 0,
        }),
    };
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    crop.apply(&img, [1, 4, 4], &mut convnet::Rng::new(7), &mut a);
    crop.apply(&img, [1, 4, 4], &mut convnet::Rng::new(7), &mut b);
    assert_eq!(a, b, "same seed, same augmentation");
    assert!(
        a.iter().filter(|&&v| v == 0.0).count() >= 1,
        "cutout zeroes a square"
    );
    let n = Normalize::cifar10();
    let mut out = [0f32; 3];
    Transform {
        normalize: n.clone(),
        augment: None,
    }
    .apply(
        &[255, 0, 128],
        [3, 1, 1],
        &mut convnet::Rng::new(0),
        &mut out,
    );
    assert!((out[0] - (1.0 - n.mean[0]) / n.std[0]).abs() < 1e-6);
    assert!((out[1] + n.mean[1] / n.std[1]).abs() < 1e-6);
}

#[test]
fn loader_is_deterministic_complete_and_shards() {
    let ds = Arc::new(tiny_set(23));
    let t = Transform {
        normalize: Normalize::cifar10(),
        augment: Some(Augment::cifar()),
    };
    let cfg = LoaderConfig {
        batch_size: 5,
        seed: 3,
        workers: 1,
        ..Default::default()
    };
    let collect = |cfg: LoaderConfig, epoch: usize| -> Vec<(Vec<usize>, Vec<f32>)> {
        DataLoader::new(ds.clone(), t.clone(), cfg)
            .unwrap()
            .epoch(epoch)
            .map(|b| b.map(|b| (b.indices, b.images.to_vec())).unwrap())
            .collect()
    };
    let a = collect(cfg, 0);
    assert_eq!(a.len(), 5);
    assert_eq!(
        a,
        collect(LoaderConfig { workers: 3, ..cfg }, 0),
        "the same batches whatever the worker count"
    );
    assert_ne!(a, collect(cfg, 1), "another epoch, another order");
    let mut seen: Vec<usize> = a.iter().flat_map(|(i, _)| i.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..23).collect::<Vec<_>>(), "every example once");
    assert_eq!(
        collect(
            LoaderConfig {
                drop_last: true,
                ..cfg
            },
            0
        )
        .len(),
        4
    );
    // Data-parallel ranks: every rank takes a slice of every batch, and the slices put
    // together are the one-process batch (same images, same augmentation), for any number
    // of ranks, including more ranks than the short last batch has images.
    for ranks in [2, 3, 4] {
        let slices: Vec<_> = (0..ranks)
            .map(|rank| {
                collect(
                    LoaderConfig {
                        world_size: ranks,
                        rank,
                        ..cfg
                    },
                    0,
                )
            })
            .collect();
        for (step, whole) in a.iter().enumerate() {
            let mut joined = (Vec::new(), Vec::new());
            for s in &slices {
                assert_eq!(
                    s.len(),
                    a.len(),
                    "{ranks} ranks: one slice per step on every rank"
                );
                joined.0.extend_from_slice(&s[step].0);
                joined.1.extend_from_slice(&s[step].1);
            }
            assert_eq!(
                &joined, whole,
                "{ranks} ranks, step {step}: the slices make the batch"
            );
        }
    }
    assert!(DataLoader::new(
        ds.clone(),
        t.clone(),
        LoaderConfig {
            batch_size: 0,
            ..cfg
        }
    )
    .is_err());
    assert!(DataLoader::new(
        ds,
        t,
        LoaderConfig {
            rank: 2,
            world_size: 2,
            ..cfg
        }
    )
    .is_err());
}
