//! Pictures of attribution maps: bilinear upsampling (PyTorch's `align_corners=False`),
//! min-max normalisation, the jet colour map, heat maps blended on the image, and `.npy`
//! files of the raw maps (NumPy's format 1.0, little-endian float32).

use crate::error::{Error, Result};
use image::RgbImage;
use std::path::Path;

/// Resizes a row-major `[h, w]` map to `[out_h, out_w]` by bilinear interpolation with
/// half-pixel centres (`torch.nn.functional.interpolate(mode="bilinear",
/// align_corners=False)`, OpenCV's `resize`).
///
/// ```
/// use convnet::explain::picture::upsample_bilinear;
/// let up = upsample_bilinear(&[0.0, 1.0], (1, 2), (1, 4));
/// assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
/// ```
pub fn upsample_bilinear(
    map: &[f32],
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "map size");
    let coord = |o: usize, out: usize, inp: usize| -> (usize, usize, f32) {
        let s = ((o as f32 + 0.5) * inp as f32 / out as f32 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        (i0, i1, s - i0 as f32)
    };
    let mut out = vec![0f32; oh * ow];
    for y in 0..oh {
        let (y0, y1, fy) = coord(y, oh, h);
        for x in 0..ow {
            let (x0, x1, fx) = coord(x, ow, w);
            let top = map[y0 * w + x0] * (1.0 - fx) + map[y0 * w + x1] * fx;
            let bottom = map[y1 * w + x0] * (1.0 - fx) + map[y1 * w + x1] * fx;
            out[y * ow + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// Scales values to [0, 1] (all zeros for a constant map; NaN counts as the minimum).
///
/// ```
/// let v = convnet::explain::picture::min_max(&[2.0, 4.0, 3.0]);
/// assert_eq!(v, vec![0.0, 1.0, 0.5]);
/// ```
pub fn min_max(v: &[f32]) -> Vec<f32> {
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let lo = finite.clone().fold(f32::INFINITY, f32::min);
    let hi = finite.fold(f32::NEG_INFINITY, f32::max);
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![0.0; v.len()];
    }
    v.iter()
        .map(|&x| {
            if x.is_finite() {
                (x - lo) / (hi - lo)
            } else {
                0.0
            }
        })
        .collect()
}

/// The jet colour map (blue, cyan, yellow, red) at `t` in [0, 1].
///
/// ```
/// use convnet::explain::picture::jet;
/// assert_eq!(jet(0.0), [0, 0, 128]);
/// assert_eq!(jet(1.0), [128, 0, 0]);
/// ```
pub fn jet(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let ch = |c: f32| ((1.5 - (4.0 * t - c).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [ch(3.0), ch(2.0), ch(1.0)]
}

/// A map already in [0, 1], `[h, w]` row-major, as a jet-coloured image.
pub fn heat_map(unit: &[f32], width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        image::Rgb(jet(unit[(y * width + x) as usize]))
    })
}

/// `image` and `heat` (same size) blended with weight `alpha` on the heat map.
pub fn overlay(image: &RgbImage, heat: &RgbImage, alpha: f32) -> RgbImage {
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let (a, b) = (image.get_pixel(x, y), heat.get_pixel(x, y));
        image::Rgb(std::array::from_fn(|c| {
            ((1.0 - alpha) * a[c] as f32 + alpha * b[c] as f32).round() as u8
        }))
    })
}

/// The heat map and the overlay of a raw `[h, w]` map for `image`: upsampled to the image's
/// size, min-max normalised, jet-coloured, blended 50/50.
pub fn pictures(map: &[f32], (h, w): (usize, usize), image: &RgbImage) -> (RgbImage, RgbImage) {
    let (iw, ih) = image.dimensions();
    let up = upsample_bilinear(map, (h, w), (ih as usize, iw as usize));
    let heat = heat_map(&min_max(&up), iw, ih);
    let blended = overlay(image, &heat, 0.5);
    (heat, blended)
}

/// The bytes of a `.npy` file (format 1.0) holding `data` as little-endian float32 of
/// `shape`.
///
/// ```
/// let bytes = convnet::explain::picture::npy_bytes(&[1.0, 2.0], &[1, 2]);
/// assert_eq!(&bytes[..6], b"\x93NUMPY");
/// assert_eq!(bytes.len() % 64, 8 % 64); // header padded to 64 bytes, then 2 floats
/// ```
pub fn npy_bytes(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes a `.npy` file (see [`npy_bytes`]).
pub fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    std::fs::write(path, npy_bytes(data, shape)).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Writes a PNG.
pub fn write_png(path: &Path, picture: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    picture
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| crate::error::invalid("png", e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })
}
