//! Data sets larger than the memory limit: their decoded pixels go to a file (the cache
//! entry, or an unnamed temporary file) and are read image by image, with the same images,
//! labels, order and batches as in memory; image-folder archives are decoded as they stream
//! (entries in any order); the cache evicts its least recently used entries beyond its
//! size limit. (One test in its own binary: it sets the limits through the environment.)

mod common;

use common::scratch::Scratch;

use convnet::data::{
    self, DataLoader, FolderOptions, ImageDataset, LoaderConfig, Normalize, Transform,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn temp(name: &str) -> Scratch {
    Scratch::folder(&format!("disk-{name}"))
}

/// An 8x6 RGB PNG whose pixels encode `seed`.
fn png(seed: usize) -> Vec<u8> {
    let raw: Vec<u8> = (0..8 * 6 * 3).map(|i| (i * 7 + seed * 13) as u8).collect();
    let img = image::RgbImage::from_raw(8, 6, raw).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// `<root>/<class>/<n>.png`, 3 classes of `n` images; returns the files.
fn write_folder(root: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for (c, class) in ["cat", "dog", "owl"].iter().enumerate() {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            let name = format!("{class}/{i:03}.png");
            let bytes = png(c * 1000 + i);
            std::fs::write(root.join(&name), &bytes).unwrap();
            files.push((name, bytes));
        }
    }
    files
}

/// A `.tar.gz` of `files` under a top folder, in reverse order (not the folder order).
fn tar_gz(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    ));
    for (name, bytes) in files.iter().rev() {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("top/{name}"), bytes.as_slice())
            .unwrap();
    }
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

fn open(path: &Path, cache: bool) -> ImageDataset {
    let opts = FolderOptions {
        skip_bad_images: false,
        cache,
        resize: None,
    };
    match data::open(path, &opts).unwrap() {
        data::DataSplit::Single { data, .. } => data,
        data::DataSplit::Pair { .. } => panic!("a single folder"),
    }
}

/// Every batch of one epoch: images and labels.
fn epoch(ds: &ImageDataset) -> Vec<(Vec<f32>, Vec<usize>)> {
    let loader = DataLoader::new(
        Arc::new(ds.clone()),
        Transform {
            normalize: Normalize::cifar10(),
            augment: None,
        },
        LoaderConfig {
            batch_size: 16,
            seed: 4,
            ..Default::default()
        },
    )
    .unwrap();
    loader
        .epoch(0)
        .map(|b| {
            let b = b.unwrap();
            (b.images.to_vec(), b.labels)
        })
        .collect()
}

/// Same images, labels, classes and shape (wherever they came from).
fn assert_same(a: &ImageDataset, b: &ImageDataset, what: &str) {
    assert_eq!(
        (a.len(), a.labels(), a.classes(), a.image_shape()),
        (b.len(), b.labels(), b.classes(), b.image_shape()),
        "{what}"
    );
    for i in 0..a.len() {
        assert_eq!(
            a.image(i).unwrap(),
            b.image(i).unwrap(),
            "{what}: image {i}"
        );
    }
}

fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    v.sort();
    v
}

#[test]
fn large_data_sets_are_read_from_disk_with_the_same_images_order_and_batches() {
    let cache = temp("cache");
    std::env::set_var("CONVNET_CACHE_DIR", &cache);
    let (folder, other) = (temp("folder"), temp("other"));
    let files = write_folder(&folder, 40);
    write_folder(&other, 30);
    let archive_dir = temp("archive");
    let archive = archive_dir.join("data.tar.gz");
    tar_gz(&archive, &files);

    // In memory (the default limit): the reference.
    let reference = open(&folder, false);
    assert!(!reference.pixels_in_file());
    assert_eq!(reference.len(), 120);
    assert_same(
        &open(&archive, false),
        &reference,
        "archive in reverse order",
    );

    // Over the limit: pixels in a file, the same data set, the same batches.
    std::env::set_var("CONVNET_DATA_MEMORY_BYTES", "1000");
    for path in [&*folder, archive.as_path()] {
        let on_disk = open(path, false);
        assert!(on_disk.pixels_in_file(), "{}", path.display());
        assert_same(&on_disk, &reference, &path.display().to_string());
        assert_eq!(epoch(&on_disk), epoch(&reference), "{}", path.display());
        // Subsets share the file.
        let spread = on_disk.spread(10);
        assert!(spread.pixels_in_file());
        assert_same(&spread, &reference.spread(10), "spread");
    }
    assert!(
        cache_entries(&cache).is_empty(),
        "nothing cached without the cache"
    );

    // With the cache: the pixel file becomes the entry; the second read comes from it.
    for path in [&*folder, archive.as_path()] {
        let first = open(path, true);
        let second = open(path, true);
        assert!(second.pixels_in_file());
        assert_same(&first, &reference, &path.display().to_string());
        assert_same(&second, &reference, "from the cache");
    }
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 2, "{entries:?}");
    // No temporary file of the cache is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A cache limit that holds two entries: a third evicts the least recently used (the
    // folder's, as the archive's was read after it).
    let size: u64 = entries
        .iter()
        .map(|e| std::fs::metadata(e).unwrap().len())
        .sum();
    std::env::set_var("CONVNET_CACHE_MAX_BYTES", size.to_string());
    std::thread::sleep(std::time::Duration::from_millis(20));
    let _ = open(&archive, true); // used again: the most recent
    std::thread::sleep(std::time::Duration::from_millis(20));
    let _ = open(&other, true);
    let after = cache_entries(&cache);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(!after.contains(&entries[0]) || !after.contains(&entries[1]));
    let archive_entry = entries
        .iter()
        .find(|e| after.contains(e))
        .expect("one of the first two remains");
    assert_same(&open(&archive, true), &reference, "archive after eviction");
    assert!(after.contains(archive_entry));
}
