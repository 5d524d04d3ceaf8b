//! Per-image transforms, deterministic under a seed: scale to [0, 1], per-channel
//! normalisation, and the usual augmentations (random crop with zero padding or
//! ImageNet-style random resized crop, horizontal flip, cutout) in torchvision's order: crop
//! and flip on the pixels, then `ToTensor` + `Normalize`, then cutout (which writes zeros,
//! i.e. the mean colour).

use super::geometry::RandomResizedCrop;
use crate::rng::Rng;

/// Per-channel `(x - mean) / std` after scaling to [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Channel means.
    pub mean: Vec<f32>,
    /// Channel standard deviations.
    pub std: Vec<f32>,
}

impl Normalize {
    /// CIFAR-10's statistics.
    pub fn cifar10() -> Self {
        Normalize {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
        }
    }
    /// MNIST's statistics.
    pub fn mnist() -> Self {
        Normalize {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }
    /// ImageNet's statistics (torchvision's pretrained weights).
    pub fn imagenet() -> Self {
        Normalize {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }
    /// The default for a data set with `channels` channels: MNIST's for one, CIFAR-10's for three.
    pub fn default_for(channels: usize) -> Self {
        if channels == 1 {
            Normalize::mnist()
        } else {
            Normalize::cifar10()
        }
    }
}

/// Random augmentations for training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Augment {
    /// Zero padding for the random crop back to the original size (0 = no crop).
    pub crop_padding: usize,
    /// Flip left-right with probability 1/2.
    pub hflip: bool,
    /// Side of the square zeroed at a random centre (0 = no cutout).
    pub cutout: usize,
    /// Output side of torchvision's `RandomResizedCrop` (8-100% of the image at an aspect
    /// ratio of 3/4-4/3, resized to this square; see [`RandomResizedCrop`]), taken instead
    /// of the padded crop; 0 = off. Images come out at this size whatever theirs.
    pub random_resized_crop: usize,
}

impl Augment {
    /// The standard CIFAR recipe: pad-4 random crop and horizontal flip.
    pub fn cifar() -> Self {
        Augment {
            crop_padding: 4,
            hflip: true,
            cutout: 0,
            random_resized_crop: 0,
        }
    }

    /// The ImageNet recipe: a random resized crop to `size` x `size` and horizontal flip.
    pub fn resized_crop(size: usize) -> Self {
        Augment {
            crop_padding: 0,
            hflip: true,
            cutout: 0,
            random_resized_crop: size,
        }
    }
}

/// Everything applied to one image on its way into a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Transform {
    /// Normalisation (always applied).
    pub normalize: Normalize,
    /// Augmentation (training only).
    pub augment: Option<Augment>,
}

impl Transform {
    /// The shape of what [`Transform::apply`] writes for an image of shape `input`: the
    /// same, or the random resized crop's square.
    ///
    /// ```
    /// use convnet::data::{Augment, Normalize, Transform};
    /// let t = Transform { normalize: Normalize::cifar10(), augment: Some(Augment::resized_crop(24)) };
    /// assert_eq!(t.output_shape([3, 32, 32]), [3, 24, 24]);
    /// ```
    pub fn output_shape(&self, input: [usize; 3]) -> [usize; 3] {
        match self.augment.filter(|a| a.random_resized_crop > 0) {
            Some(a) => [input[0], a.random_resized_crop, a.random_resized_crop],
            None => input,
        }
    }

    /// Writes image `img [C, H, W]` (bytes) into `out` (of [`Transform::output_shape`]) as
    /// normalised floats, drawing any random choices from `rng`.
    ///
    /// ```
    /// use convnet::data::{Normalize, Transform};
    /// let t = Transform { normalize: Normalize { mean: vec![0.5], std: vec![0.5] }, augment: None };
    /// let mut out = [0.0; 2];
    /// t.apply(&[0, 255], [1, 1, 2], &mut convnet::Rng::new(0), &mut out);
    /// assert_eq!(out, [-1.0, 1.0]);
    /// ```
    pub fn apply(&self, img: &[u8], shape: [usize; 3], rng: &mut Rng, out: &mut [f32]) {
        let cropped;
        let (img, shape) = match self.augment.filter(|a| a.random_resized_crop > 0) {
            Some(a) => {
                let size = a.random_resized_crop;
                cropped = RandomResizedCrop::new(size).apply(img, shape, rng);
                (&cropped[..], [shape[0], size, size])
            }
            None => (img, shape),
        };
        let [c, h, w] = shape;
        let (mut dy, mut dx, mut flip) = (0isize, 0isize, false);
        if let Some(a) = self.augment {
            if a.crop_padding > 0 && a.random_resized_crop == 0 {
                let p = a.crop_padding as u64;
                dy = rng.below(2 * p + 1) as isize - p as isize;
                dx = rng.below(2 * p + 1) as isize - p as isize;
            }
            flip = a.hflip && rng.next_u64() & 1 == 1;
        }
        for ch in 0..c {
            let (m, s) = (
                self.normalize.mean[ch % self.normalize.mean.len()],
                self.normalize.std[ch % self.normalize.std.len()],
            );
            // torchvision's arithmetic, `(v / 255 - mean) / std`, tabulated for the 256 byte values.
            let table: [f32; 256] = std::array::from_fn(|v| (v as f32 / 255.0 - m) / s);
            let src = &img[ch * h * w..(ch + 1) * h * w];
            let dst = &mut out[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                let sy = y as isize + dy;
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx = xx as isize + dx;
                    let v = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        src[sy as usize * w + sx as usize]
                    } else {
                        0
                    };
                    dst[y * w + x] = table[v as usize];
                }
            }
        }
        if let Some(a) = self.augment.filter(|a| a.cutout > 0) {
            let (cy, cx) = (rng.below(h as u64) as isize, rng.below(w as u64) as isize);
            let half = (a.cutout / 2) as isize;
            let (y0, y1) = (
                (cy - half).max(0) as usize,
                ((cy - half + a.cutout as isize).min(h as isize)) as usize,
            );
            let (x0, x1) = (
                (cx - half).max(0) as usize,
                ((cx - half + a.cutout as isize).min(w as isize)) as usize,
            );
            for ch in 0..c {
                for y in y0..y1 {
                    out[ch * h * w + y * w + x0..ch * h * w + y * w + x1].fill(0.0);
                }
            }
        }
    }
}
