//! Image grids: tiles (float maps shown in grey, float RGB planes, or 8-bit pictures)
//! scaled up with nearest-neighbour sampling and laid out in rows, optionally captioned.
//! Kernel pictures, misclassified-image pictures and activation maps are all drawn with it.

use super::render::{draw_labels, text_size, Label};
use crate::error::{invalid, Result};
use image::{imageops, Rgb, RgbImage};
use plotters::style::RGBColor;

/// The side in pixels that small tiles are scaled up to at least, by a whole factor, when
/// [`GridOptions::cell`] is not given.
pub const MIN_CELL: u32 = 24;

/// One picture of a grid.
#[derive(Clone, Debug)]
pub struct Tile {
    width: u32,
    height: u32,
    kind: TileKind,
}

#[derive(Clone, Debug)]
enum TileKind {
    Gray(Vec<f32>),
    Rgb(Vec<f32>),
    Pixels(RgbImage),
}

/// 0..=255 for `v` between `lo` and `hi`; mid-grey when the range is empty, black for
/// values that are not finite.
fn to_byte(v: f32, lo: f32, hi: f32) -> u8 {
    if !v.is_finite() {
        0
    } else if hi - lo <= f32::EPSILON * hi.abs().max(lo.abs()).max(1e-30) {
        128
    } else {
        (255.0 * (v - lo) / (hi - lo)).round().clamp(0.0, 255.0) as u8
    }
}

/// The smallest and largest finite values (0, 0 when there are none).
fn min_max(values: &[f32]) -> (f32, f32) {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        (0.0, 0.0)
    } else {
        (lo, hi)
    }
}

/// Checks that `len` values fill `channels` planes of `width` x `height`.
fn check_len(
    op: &'static str,
    width: usize,
    height: usize,
    channels: usize,
    len: usize,
) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(invalid(
            op,
            format!("a tile of {width}x{height} pixels is empty"),
        ));
    }
    if width > u32::MAX as usize || height > u32::MAX as usize {
        return Err(invalid(
            op,
            format!("a tile of {width}x{height} pixels is too large"),
        ));
    }
    if width
        .checked_mul(height)
        .and_then(|n| n.checked_mul(channels))
        != Some(len)
    {
        return Err(invalid(
            op,
            format!("{len} values do not make {channels} plane(s) of {width}x{height}"),
        ));
    }
    Ok(())
}

impl Tile {
    /// A float map of `width` x `height` values (row-major), shown in grey: its smallest
    /// value black, its largest white (mid-grey when all are equal).
    ///
    /// ```
    /// use convnet::viz::Tile;
    /// let t = Tile::gray(2, 1, vec![-1.0, 3.0])?;
    /// assert_eq!(t.to_rgb().get_pixel(1, 0).0, [255, 255, 255]);
    /// assert!(Tile::gray(2, 2, vec![0.0; 3]).is_err());
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn gray(width: usize, height: usize, values: Vec<f32>) -> Result<Tile> {
        check_len("grid tile", width, height, 1, values.len())?;
        Ok(Tile {
            width: width as u32,
            height: height as u32,
            kind: TileKind::Gray(values),
        })
    }

    /// Three float planes `[3, height, width]` (red, green, blue), min-max normalised
    /// together so that colours keep their balance.
    ///
    /// ```
    /// use convnet::viz::Tile;
    /// let t = Tile::rgb(1, 1, vec![1.0, 0.0, 0.5])?;
    /// assert_eq!(t.to_rgb().get_pixel(0, 0).0, [255, 0, 128]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn rgb(width: usize, height: usize, planes: Vec<f32>) -> Result<Tile> {
        check_len("grid tile", width, height, 3, planes.len())?;
        Ok(Tile {
            width: width as u32,
            height: height as u32,
            kind: TileKind::Rgb(planes),
        })
    }

    /// An 8-bit picture, shown as it is.
    ///
    /// ```
    /// let t = convnet::viz::Tile::image(image::RgbImage::new(3, 2));
    /// assert_eq!((t.width(), t.height()), (3, 2));
    /// ```
    pub fn image(img: RgbImage) -> Tile {
        Tile {
            width: img.width(),
            height: img.height(),
            kind: TileKind::Pixels(img),
        }
    }

    /// An 8-bit image stored as planes `[C, H, W]` (as data sets hold them), with one
    /// channel (grey) or three (RGB).
    ///
    /// ```
    /// use convnet::viz::Tile;
    /// let t = Tile::from_planes_u8([3, 1, 2], &[10, 20, 30, 40, 50, 60])?;
    /// assert_eq!(t.to_rgb().get_pixel(1, 0).0, [20, 40, 60]);
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn from_planes_u8(shape: [usize; 3], bytes: &[u8]) -> Result<Tile> {
        let [c, h, w] = shape;
        if c != 1 && c != 3 {
            return Err(invalid(
                "grid tile",
                format!("images with {c} channels cannot be shown: 1 (grey) or 3 (RGB)"),
            ));
        }
        check_len("grid tile", w, h, c, bytes.len())?;
        let plane = w * h;
        let img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let p = y as usize * w + x as usize;
            if c == 1 {
                Rgb([bytes[p]; 3])
            } else {
                Rgb([bytes[p], bytes[plane + p], bytes[2 * plane + p]])
            }
        });
        Ok(Tile::image(img))
    }

    /// Width in pixels, before scaling.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels, before scaling.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The tile as 8-bit RGB at its own size.
    pub fn to_rgb(&self) -> RgbImage {
        let (w, h) = (self.width, self.height);
        let plane = (w * h) as usize;
        match &self.kind {
            TileKind::Gray(v) => {
                let (lo, hi) = min_max(v);
                RgbImage::from_fn(w, h, |x, y| {
                    Rgb([to_byte(v[(y * w + x) as usize], lo, hi); 3])
                })
            }
            TileKind::Rgb(v) => {
                let (lo, hi) = min_max(v);
                RgbImage::from_fn(w, h, |x, y| {
                    let p = (y * w + x) as usize;
                    Rgb([0, 1, 2].map(|c| to_byte(v[c * plane + p], lo, hi)))
                })
            }
            TileKind::Pixels(img) => img.clone(),
        }
    }
}

/// Where the cells of a grid lie: `columns` x `rows` cells of `cell_width` x
/// `cell_height` pixels, each with a caption strip of `caption_height` under it, and `gap`
/// pixels between cells and around the edge.
///
/// ```
/// use convnet::viz::GridLayout;
/// // 32 kernels of 24x24 px, 2 px apart: 6 columns (the square root, rounded up), 6 rows.
/// let g = GridLayout::new(32, 0, (24, 24), 0, 2);
/// assert_eq!((g.columns, g.rows), (6, 6));
/// assert_eq!(g.size(), (6 * 24 + 7 * 2, 6 * 24 + 7 * 2));
/// assert_eq!(g.cell_origin(7), (2 + 26, 2 + 26));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridLayout {
    /// Cells per row.
    pub columns: u32,
    /// Number of rows.
    pub rows: u32,
    /// Cell width in pixels.
    pub cell_width: u32,
    /// Cell height in pixels (without the caption).
    pub cell_height: u32,
    /// Height of the caption strip under each cell (0: no captions).
    pub caption_height: u32,
    /// Pixels between cells and around the edge.
    pub gap: u32,
}

impl GridLayout {
    /// The layout of `count` cells in `columns` columns (0: [`GridLayout::auto_columns`];
    /// never more columns than cells).
    pub fn new(
        count: usize,
        columns: usize,
        cell: (u32, u32),
        caption_height: u32,
        gap: u32,
    ) -> GridLayout {
        let columns = if columns == 0 {
            GridLayout::auto_columns(count)
        } else {
            columns.min(count.max(1))
        };
        GridLayout {
            columns: columns as u32,
            rows: count.div_ceil(columns) as u32,
            cell_width: cell.0,
            cell_height: cell.1,
            caption_height,
            gap,
        }
    }

    /// Columns for `count` cells when none are asked for: the square root, rounded up, so
    /// the grid is about square (at least 1).
    ///
    /// ```
    /// use convnet::viz::GridLayout;
    /// assert_eq!([1, 4, 5, 16, 64, 65].map(GridLayout::auto_columns), [1, 2, 3, 4, 8, 9]);
    /// ```
    pub fn auto_columns(count: usize) -> usize {
        let mut c = (count as f64).sqrt() as usize;
        while c * c < count {
            c += 1;
        }
        c.max(1)
    }

    /// Width and height of the whole grid in pixels.
    pub fn size(&self) -> (u32, u32) {
        (
            self.columns * self.cell_width + (self.columns + 1) * self.gap,
            self.rows * (self.cell_height + self.caption_height) + (self.rows + 1) * self.gap,
        )
    }

    /// Top-left pixel of cell `i` (row by row).
    pub fn cell_origin(&self, i: usize) -> (u32, u32) {
        let (col, row) = (i as u32 % self.columns, i as u32 / self.columns);
        (
            self.gap + col * (self.cell_width + self.gap),
            self.gap + row * (self.cell_height + self.caption_height + self.gap),
        )
    }
}

/// How [`grid_image_with`] lays tiles out.
#[derive(Clone, Debug)]
pub struct GridOptions<'a> {
    /// Tiles per row (0: about square, see [`GridLayout::auto_columns`]).
    pub columns: usize,
    /// The box each tile is scaled into with nearest-neighbour sampling, keeping its aspect
    /// ratio; `None`: the largest tile's size times the smallest whole factor that makes
    /// its longer side at least [`MIN_CELL`] pixels.
    pub cell: Option<(u32, u32)>,
    /// Pixels between tiles and around the edge.
    pub gap: u32,
    /// One caption per tile, set under it (cells widen to fit the longest).
    pub captions: Option<&'a [String]>,
    /// Caption text size in pixels.
    pub caption_size: u32,
    /// Colour of the gaps and caption strips.
    pub background: [u8; 3],
}

impl Default for GridOptions<'_> {
    fn default() -> Self {
        GridOptions {
            columns: 0,
            cell: None,
            gap: 2,
            captions: None,
            caption_size: 13,
            background: [255, 255, 255],
        }
    }
}

/// Lays `tiles` out in `columns` columns (0: about square), each scaled up by nearest
/// neighbour to at least [`MIN_CELL`] pixels, 2 pixels apart, with `captions` under them
/// when given (one per tile). See [`grid_image_with`] for the other settings.
///
/// ```
/// use convnet::viz::{grid_image, Tile};
/// // Four 3x3 maps scaled 8x to 24x24, two per row, 2 px gaps: 2*24 + 3*2 = 54 px square.
/// let tiles: Vec<Tile> = (0..4)
///     .map(|i| Tile::gray(3, 3, (0..9).map(|v| (v * i) as f32).collect()))
///     .collect::<Result<_, _>>()?;
/// let img = grid_image(&tiles, 2, None)?;
/// assert_eq!(img.dimensions(), (54, 54));
/// // Tile 1 (top right) goes from black at its top-left to white at its bottom-right.
/// assert_eq!(img.get_pixel(28, 2).0, [0, 0, 0]);
/// assert_eq!(img.get_pixel(28 + 23, 2 + 23).0, [255, 255, 255]);
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn grid_image(tiles: &[Tile], columns: usize, captions: Option<&[String]>) -> Result<RgbImage> {
    grid_image_with(
        tiles,
        &GridOptions {
            columns,
            captions,
            ..GridOptions::default()
        },
    )
}

/// The size tiles of at most `max` pixels are scaled to by default: the smallest whole
/// multiple whose longer side is at least [`MIN_CELL`].
fn default_cell(max: (u32, u32)) -> (u32, u32) {
    let side = max.0.max(max.1).max(1);
    let k = MIN_CELL.div_ceil(side).max(1);
    (max.0 * k, max.1 * k)
}

/// `size` scaled to fit `cell`, keeping its aspect ratio (at least 1 pixel each way).
fn fit(size: (u32, u32), cell: (u32, u32)) -> (u32, u32) {
    let s = (cell.0 as f64 / size.0 as f64).min(cell.1 as f64 / size.1 as f64);
    (
        ((size.0 as f64 * s).round() as u32).clamp(1, cell.0.max(1)),
        ((size.1 as f64 * s).round() as u32).clamp(1, cell.1.max(1)),
    )
}

/// Lays `tiles` out as `opts` says; the grid's arithmetic is [`GridLayout`]'s.
///
/// ```
/// use convnet::viz::{grid_image_with, GridOptions, Tile};
/// let tiles = vec![Tile::image(image::RgbImage::new(32, 32)); 3];
/// let captions: Vec<String> = (0..3).map(|i| format!("image {i}")).collect();
/// let opts = GridOptions { columns: 3, cell: Some((64, 64)), captions: Some(&captions), ..Default::default() };
/// let img = grid_image_with(&tiles, &opts)?;
/// assert_eq!(img.height(), 64 + 13 + 8 + 2 * 2); // cell, caption strip, two gaps
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn grid_image_with(tiles: &[Tile], opts: &GridOptions) -> Result<RgbImage> {
    if tiles.is_empty() {
        return Err(invalid("grid", "no tiles to lay out"));
    }
    if let Some(c) = opts.captions {
        if c.len() != tiles.len() {
            return Err(invalid(
                "grid",
                format!("{} captions for {} tiles", c.len(), tiles.len()),
            ));
        }
    }
    let largest = tiles
        .iter()
        .fold((1, 1), |(w, h), t| (w.max(t.width()), h.max(t.height())));
    let (box_w, box_h) = match opts.cell {
        Some((w, h)) if w > 0 && h > 0 => (w, h),
        Some((w, h)) => {
            return Err(invalid(
                "grid",
                format!("cells of {w}x{h} pixels are empty"),
            ))
        }
        None => default_cell(largest),
    };
    let (caption_w, caption_h) = match opts.captions {
        Some(c) => (
            c.iter()
                .map(|t| text_size(t, opts.caption_size).0 + 6)
                .max()
                .unwrap_or(0),
            opts.caption_size + 8,
        ),
        None => (0, 0),
    };
    let layout = GridLayout::new(
        tiles.len(),
        opts.columns,
        (box_w.max(caption_w), box_h),
        caption_h,
        opts.gap,
    );
    // The size in 64 bits first: a huge grid is refused rather than wrapped around.
    let (gap, rows) = (layout.gap as u64, layout.rows as u64);
    let w = layout.columns as u64 * (layout.cell_width as u64 + gap) + gap;
    let h = rows * (layout.cell_height as u64 + layout.caption_height as u64 + gap) + gap;
    if w * h > 400_000_000 || w > 100_000 || h > 100_000 {
        return Err(invalid(
            "grid",
            format!("a grid of {w}x{h} pixels is too large: use fewer or smaller tiles"),
        ));
    }
    let (w, h) = layout.size();
    let mut img = RgbImage::from_pixel(w, h, Rgb(opts.background));
    for (i, tile) in tiles.iter().enumerate() {
        let (tw, th) = fit((tile.width(), tile.height()), (box_w, box_h));
        let scaled = imageops::resize(&tile.to_rgb(), tw, th, imageops::FilterType::Nearest);
        let (x0, y0) = layout.cell_origin(i);
        let x = x0 + (layout.cell_width - tw) / 2;
        let y = y0 + (box_h - th) / 2;
        imageops::replace(&mut img, &scaled, x as i64, y as i64);
    }
    if let Some(captions) = opts.captions {
        let labels: Vec<Label> = captions
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let (x0, y0) = layout.cell_origin(i);
                let tw = text_size(text, opts.caption_size).0;
                Label {
                    text: text.clone(),
                    at: (
                        (x0 + layout.cell_width.saturating_sub(tw) / 2) as i32,
                        (y0 + box_h + 4) as i32,
                    ),
                    size: opts.caption_size,
                    color: RGBColor(20, 20, 20),
                }
            })
            .collect();
        draw_labels(&mut img, &labels)?;
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_arithmetic() {
        // 64 kernels, 8 columns, 24 px cells, 2 px gaps: 8*24 + 9*2 = 210 px each way.
        let g = GridLayout::new(64, 8, (24, 24), 0, 2);
        assert_eq!((g.columns, g.rows, g.size()), (8, 8, (210, 210)));
        // Last cell of the last row.
        assert_eq!(g.cell_origin(63), (2 + 7 * 26, 2 + 7 * 26));
        // 10 cells in 4 columns: 3 rows, the last one partly empty.
        let g = GridLayout::new(10, 4, (30, 20), 10, 1);
        assert_eq!((g.columns, g.rows), (4, 3));
        assert_eq!(g.size(), (4 * 30 + 5, 3 * 30 + 4));
        assert_eq!(g.cell_origin(5), (1 + 31, 1 + 31));
        // More columns than cells: one row of exactly the cells.
        let g = GridLayout::new(3, 16, (24, 24), 0, 2);
        assert_eq!((g.columns, g.rows, g.size()), (3, 1, (3 * 24 + 4 * 2, 28)));
        // Automatic columns: about square.
        let g = GridLayout::new(32, 0, (24, 24), 0, 2);
        assert_eq!((g.columns, g.rows), (6, 6));
        let g = GridLayout::new(1, 0, (24, 24), 0, 2);
        assert_eq!((g.columns, g.rows, g.size()), (1, 1, (28, 28)));
    }

    #[test]
    fn default_cells_scale_by_whole_factors() {
        assert_eq!(default_cell((3, 3)), (24, 24));
        assert_eq!(default_cell((5, 5)), (25, 25));
        assert_eq!(default_cell((32, 32)), (32, 32));
        assert_eq!(default_cell((7, 14)), (14, 28));
        assert_eq!(fit((5, 5), (24, 24)), (24, 24));
        assert_eq!(fit((10, 5), (24, 24)), (24, 12));
    }

    #[test]
    fn normalisation() {
        assert_eq!(to_byte(0.5, 0.0, 1.0), 128);
        assert_eq!(to_byte(3.0, 3.0, 3.0), 128);
        assert_eq!(to_byte(f32::NAN, 0.0, 1.0), 0);
        assert_eq!(min_max(&[f32::NAN, 2.0, -1.0, f32::INFINITY]), (-1.0, 2.0));
        assert_eq!(min_max(&[]), (0.0, 0.0));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let t = Tile::gray(1, 1, vec![0.0]).unwrap();
        let e = grid_image(std::slice::from_ref(&t), 1, Some(&["a".into(), "b".into()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 captions for 1 tiles"), "{e}");
        assert!(grid_image(&[], 1, None).is_err());
        assert!(Tile::from_planes_u8([2, 1, 1], &[0, 0]).is_err());
        assert!(Tile::rgb(0, 3, vec![]).is_err());
    }
}
