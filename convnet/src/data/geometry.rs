//! Image geometry as torchvision computes it, on planar 8-bit images `[C, H, W]`:
//! `Resize(size)` (the shorter side to `size`, the longer one in proportion, rounded down;
//! bilinear with antialiasing, here the image crate's triangle filter, which widens its
//! support when shrinking as PIL's bilinear filter does), `CenterCrop(size)`, and
//! `RandomResizedCrop(size)` (a random area of 8-100% of the image at an aspect ratio of
//! 3/4-4/3, resized to `size` x `size`) for training.
//!
//! The one home of these operations: image folders are resized and cropped as they are
//! decoded (photos of many sizes become one size), other readers' sets through
//! [`super::ImageDataset::resized`], training batches take their random resized crops in
//! [`super::Transform`], and single images for prediction through [`ResizeCrop::apply`].

use crate::error::{invalid, Result};
use crate::rng::Rng;
use image::{imageops, GrayImage};

/// torchvision's `Resize(resize)` followed by `CenterCrop(crop)`: the evaluation transform
/// of ImageNet-style models (`Resize(256), CenterCrop(224)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResizeCrop {
    /// The shorter side after resizing.
    pub resize: usize,
    /// The side of the square cut from the centre (at most `resize`).
    pub crop: usize,
}

impl ResizeCrop {
    /// Checks the sizes: both positive, the crop no larger than the resized shorter side.
    ///
    /// ```
    /// use convnet::data::ResizeCrop;
    /// assert!(ResizeCrop::new(256, 224).is_ok());
    /// assert!(ResizeCrop::new(224, 256).unwrap_err().to_string().contains("larger"));
    /// ```
    pub fn new(resize: usize, crop: usize) -> Result<ResizeCrop> {
        if resize == 0 || crop == 0 {
            return Err(invalid(
                "resize",
                format!("sizes must be positive, got resize {resize} and crop {crop}"),
            ));
        }
        if crop > resize {
            return Err(invalid(
                "resize",
                format!(
                    "the crop {crop} is larger than the resized shorter side {resize}: crop at most {resize}"
                ),
            ));
        }
        if resize > MAX_SIDE {
            return Err(invalid(
                "resize",
                format!("resize {resize} is larger than {MAX_SIDE}"),
            ));
        }
        Ok(ResizeCrop { resize, crop })
    }

    /// The shape of an image of `channels` channels after the transform.
    pub fn output_shape(&self, channels: usize) -> [usize; 3] {
        [channels, self.crop, self.crop]
    }

    /// Resizes `img [C, H, W]` so that its shorter side is `resize`, then cuts the centre
    /// `crop` x `crop`.
    ///
    /// ```
    /// use convnet::data::ResizeCrop;
    /// // A 2x4 image: the shorter side to 4 makes it 4x8; the centre 4x4 is columns 2..6.
    /// let img: Vec<u8> = (0..8).map(|v| v * 30).collect();
    /// let out = ResizeCrop::new(4, 4)?.apply(&img, [1, 2, 4]);
    /// assert_eq!(out.len(), 16);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn apply(&self, img: &[u8], shape: [usize; 3]) -> Vec<u8> {
        let [c, h, w] = shape;
        let (rh, rw) = shorter_side_to(h, w, self.resize);
        let resized = resize_planes(img, shape, rh, rw);
        let (top, left) = center_crop_offsets(rh, rw, self.crop, self.crop);
        crop_planes(&resized, [c, rh, rw], top, left, self.crop, self.crop)
    }
}

/// The largest side a resize may produce.
const MAX_SIDE: usize = 16384;

/// torchvision's output size of `Resize(size)` for an `h` x `w` image: the shorter side
/// becomes `size`, the longer `int(size * long / short)` (at least 1).
pub fn shorter_side_to(h: usize, w: usize, size: usize) -> (usize, usize) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((size as f64 * long as f64 / short.max(1) as f64) as usize).max(1);
    if w <= h {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// Python's `round` (halves to even), which torchvision's crop offsets use.
fn round_half_even(x: f64) -> usize {
    let r = x.round();
    let r = if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    };
    r.max(0.0) as usize
}

/// torchvision's `CenterCrop` offsets (top, left) of a `ch` x `cw` crop of an `h` x `w`
/// image (which must be at least as large).
pub fn center_crop_offsets(h: usize, w: usize, ch: usize, cw: usize) -> (usize, usize) {
    (
        round_half_even(h.saturating_sub(ch) as f64 / 2.0),
        round_half_even(w.saturating_sub(cw) as f64 / 2.0),
    )
}

/// `img [C, H, W]` resized to `[C, nh, nw]` with the triangle (bilinear) filter, channel by
/// channel; the image itself when the size does not change.
pub fn resize_planes(img: &[u8], shape: [usize; 3], nh: usize, nw: usize) -> Vec<u8> {
    let [c, h, w] = shape;
    if (h, w) == (nh, nw) {
        return img.to_vec();
    }
    let mut out = Vec::with_capacity(c * nh * nw);
    for plane in img.chunks_exact(h * w).take(c) {
        let src = GrayImage::from_raw(w as u32, h as u32, plane.to_vec())
            .expect("a plane holds h * w bytes");
        let scaled = imageops::resize(&src, nw as u32, nh as u32, imageops::FilterType::Triangle);
        out.extend_from_slice(scaled.as_raw());
    }
    out
}

/// The `ch` x `cw` window at (`top`, `left`) of `img [C, H, W]` (which must hold it).
pub fn crop_planes(
    img: &[u8],
    shape: [usize; 3],
    top: usize,
    left: usize,
    ch: usize,
    cw: usize,
) -> Vec<u8> {
    let [c, h, w] = shape;
    debug_assert!(top + ch <= h && left + cw <= w);
    let mut out = Vec::with_capacity(c * ch * cw);
    for plane in img.chunks_exact(h * w).take(c) {
        for y in top..top + ch {
            out.extend_from_slice(&plane[y * w + left..y * w + left + cw]);
        }
    }
    out
}

/// torchvision's `RandomResizedCrop(size)` with its defaults: a window of a random area
/// (`scale` of the image's) and aspect ratio (`ratio`, drawn log-uniformly), up to ten
/// tries, else the largest centred window within the ratios; resized to `size` x `size`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output side.
    pub size: usize,
    /// Range of the window's area as a fraction of the image's (0.08, 1).
    pub scale: (f64, f64),
    /// Range of the window's width / height (3/4, 4/3).
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// torchvision's defaults for an output of `size` x `size`.
    pub fn new(size: usize) -> Self {
        RandomResizedCrop {
            size,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    /// The window (top, left, height, width) for an `h` x `w` image, as torchvision's
    /// `RandomResizedCrop.get_params` chooses it, drawing from `rng`.
    ///
    /// ```
    /// use convnet::data::RandomResizedCrop;
    /// let mut rng = convnet::Rng::new(3);
    /// for _ in 0..100 {
    ///     let (top, left, h, w) = RandomResizedCrop::new(8).window(20, 30, &mut rng);
    ///     assert!(h > 0 && w > 0 && top + h <= 20 && left + w <= 30);
    ///     let area = (h * w) as f64 / 600.0;
    ///     assert!((0.05..=1.0).contains(&area), "{area}");
    /// }
    /// ```
    pub fn window(&self, h: usize, w: usize, rng: &mut Rng) -> (usize, usize, usize, usize) {
        let area = (h * w) as f64;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * (self.scale.0 + (self.scale.1 - self.scale.0) * rng.next_f64());
            let aspect = (log_lo + (log_hi - log_lo) * rng.next_f64()).exp();
            let cw = (target * aspect).sqrt().round() as usize;
            let ch = (target / aspect).sqrt().round() as usize;
            if 0 < cw && cw <= w && 0 < ch && ch <= h {
                let top = rng.below((h - ch + 1) as u64) as usize;
                let left = rng.below((w - cw + 1) as u64) as usize;
                return (top, left, ch, cw);
            }
        }
        // The fallback: a centred window within the ratios.
        let in_ratio = w as f64 / h as f64;
        let (ch, cw) = if in_ratio < self.ratio.0 {
            (((w as f64 / self.ratio.0).round() as usize).clamp(1, h), w)
        } else if in_ratio > self.ratio.1 {
            (h, ((h as f64 * self.ratio.1).round() as usize).clamp(1, w))
        } else {
            (h, w)
        };
        ((h - ch) / 2, (w - cw) / 2, ch, cw)
    }

    /// A random window of `img [C, H, W]` resized to `[C, size, size]`.
    pub fn apply(&self, img: &[u8], shape: [usize; 3], rng: &mut Rng) -> Vec<u8> {
        let [c, h, w] = shape;
        let (top, left, ch, cw) = self.window(h, w, rng);
        let window = crop_planes(img, shape, top, left, ch, cw);
        resize_planes(&window, [c, ch, cw], self.size, self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_sizes_and_center_offsets_follow_torchvision() {
        // torchvision.transforms.Resize(256) on 500x375 (h x w) gives 341x256.
        assert_eq!(shorter_side_to(500, 375, 256), (341, 256));
        assert_eq!(shorter_side_to(375, 500, 256), (256, 341));
        assert_eq!(shorter_side_to(32, 32, 40), (40, 40));
        // CenterCrop: int(round((341 - 224) / 2)) = round(58.5) = 58 (halves to even).
        assert_eq!(center_crop_offsets(341, 256, 224, 224), (58, 16));
        assert_eq!(center_crop_offsets(343, 256, 224, 224), (60, 16));
    }

    #[test]
    fn crop_takes_the_window_of_every_channel() {
        let img: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        let out = crop_planes(&img, [2, 3, 4], 1, 2, 2, 2);
        assert_eq!(out, [6, 7, 10, 11, 18, 19, 22, 23]);
    }

    #[test]
    fn a_constant_image_stays_constant_through_resize_and_crops() {
        let img = vec![77u8; 3 * 30 * 50];
        let out = ResizeCrop::new(20, 16).unwrap().apply(&img, [3, 30, 50]);
        assert_eq!(out, vec![77u8; 3 * 16 * 16]);
        let mut rng = Rng::new(1);
        let out = RandomResizedCrop::new(12).apply(&img, [3, 30, 50], &mut rng);
        assert_eq!(out, vec![77u8; 3 * 12 * 12]);
    }
}
