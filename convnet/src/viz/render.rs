//! What every picture shares: the embedded font, choosing PNG or SVG from a file name,
//! running a `plotters` drawing on either backend, writing PNGs, and measuring and setting
//! text on an image.

use crate::error::{Error, Result};
use image::RgbImage;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// The font family every picture's text is set in (DejaVu Sans, embedded in the library).
pub const FONT_FAMILY: &str = "sans-serif";

/// DejaVu Sans 2.37 (Bitstream Vera licence, see `font/LICENSE-DejaVu.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("font/DejaVuSans.ttf");

/// Registers the embedded font with `plotters` (once per process).
pub(crate) fn ensure_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are a fixed, valid TrueType file; were they rejected, text would be
        // missing from the pictures but nothing else would fail.
        let _ = plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, DEJAVU_SANS);
    });
}

/// The file formats pictures are written in, chosen by the output's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotFormat {
    /// A PNG bitmap (`.png`).
    Png,
    /// SVG text (`.svg`), for charts only.
    Svg,
}

impl PlotFormat {
    /// The format `path`'s extension names (case-insensitive), or an error naming the file
    /// and the formats there are.
    ///
    /// ```
    /// use convnet::viz::PlotFormat;
    /// assert_eq!(PlotFormat::from_path("runs/curves.PNG")?, PlotFormat::Png);
    /// assert_eq!(PlotFormat::from_path("curves.svg")?, PlotFormat::Svg);
    /// assert!(PlotFormat::from_path("curves.jpg").unwrap_err().to_string().contains("curves.jpg"));
    /// # Ok::<(), convnet::Error>(())
    /// ```
    pub fn from_path(path: impl AsRef<Path>) -> Result<PlotFormat> {
        let path = path.as_ref();
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(PlotFormat::Png),
            Some("svg") => Ok(PlotFormat::Svg),
            Some(other) => Err(Error::Format {
                path: path.to_path_buf(),
                msg: format!("cannot write .{other} pictures: name a .png or .svg file"),
            }),
            None => Err(Error::Format {
                path: path.to_path_buf(),
                msg: "has no extension to tell the picture format: name a .png or .svg file".into(),
            }),
        }
    }
}

/// An error while drawing into `path`.
fn draw_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("drawing failed: {e}")),
    }
}

/// A picture drawn by `plotters` on whatever backend the output format needs.
pub(crate) trait Drawing {
    /// Draws on `root`, of the size given to [`render`].
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>>;
}

/// Draws `picture` at `size` pixels and writes it to `out`, as PNG or SVG by its extension.
pub(crate) fn render(out: &Path, size: (u32, u32), picture: &impl Drawing) -> Result<()> {
    let format = PlotFormat::from_path(out)?;
    ensure_font();
    match format {
        PlotFormat::Png => {
            let mut buf = vec![255u8; size.0 as usize * size.1 as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
                picture.draw(&root).map_err(|e| draw_error(out, e))?;
                root.present().map_err(|e| draw_error(out, e))?;
            }
            let img = RgbImage::from_raw(size.0, size.1, buf)
                .ok_or_else(|| draw_error(out, "the bitmap has the wrong size"))?;
            save_png(&img, out)
        }
        PlotFormat::Svg => {
            let mut text = String::new();
            {
                let root = SVGBackend::with_string(&mut text, size).into_drawing_area();
                picture.draw(&root).map_err(|e| draw_error(out, e))?;
                root.present().map_err(|e| draw_error(out, e))?;
            }
            std::fs::write(out, text).map_err(|source| Error::Io {
                path: out.to_path_buf(),
                source,
            })
        }
    }
}

/// Writes `img` to `path` as PNG (whatever the extension); errors name the file.
///
/// ```no_run
/// let img = image::RgbImage::new(4, 4);
/// convnet::viz::save_png(&img, "black.png")?;
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn save_png(img: &RgbImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("cannot encode PNG: {e}")),
    })?;
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Width and height in pixels of `text` set at `size` px.
pub(crate) fn text_size(text: &str, size: u32) -> (u32, u32) {
    ensure_font();
    (FONT_FAMILY, size as f64)
        .into_font()
        .box_size(text)
        .unwrap_or((text.chars().count() as u32 * size / 2, size))
}

/// A line of text to set on an image: its top-left corner, pixel size and colour.
pub(crate) struct Label {
    pub text: String,
    pub at: (i32, i32),
    pub size: u32,
    pub color: RGBColor,
}

/// Sets `labels` on `img`.
pub(crate) fn draw_labels(img: &mut RgbImage, labels: &[Label]) -> Result<()> {
    ensure_font();
    let (w, h) = img.dimensions();
    let buf: &mut [u8] = img;
    let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
    let to_err = |e: DrawingAreaErrorKind<_>| Error::Unsupported(format!("drawing text: {e}"));
    for l in labels {
        root.draw(&Text::new(
            l.text.as_str(),
            l.at,
            (FONT_FAMILY, l.size as f64).into_font().color(&l.color),
        ))
        .map_err(to_err)?;
    }
    root.present().map_err(to_err)?;
    Ok(())
}
