//! The confusion matrix as a heat map: rows are true classes, columns predicted ones, each
//! cell coloured by its share of its row, with class names on the axes and the counts in
//! the cells when there are few enough classes to read them.

use super::render::{render, text_size, Drawing, FONT_FAMILY};
use crate::error::{invalid, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Most classes drawn (4 pixels each).
const MAX_CLASSES: usize = 2000;
/// Most classes whose counts are written in the cells.
const MAX_COUNTED: usize = 20;
/// Space for the title and the colour note above the matrix.
const TOP: u32 = 64;
/// Space right of the matrix.
const RIGHT: u32 = 24;

/// The geometry of a confusion picture for these class names.
struct Geometry {
    cell: u32,
    label_size: u32,
    left: u32,
    bottom: u32,
}

impl Geometry {
    fn new(classes: &[String]) -> Geometry {
        let n = classes.len().max(1) as u32;
        let cell = if n as usize <= MAX_COUNTED {
            44
        } else {
            (880 / n).clamp(4, 44)
        };
        let label_size = if cell >= 20 {
            14
        } else {
            cell.saturating_sub(2)
        };
        let widest = if label_size >= 7 {
            classes
                .iter()
                .map(|c| text_size(c, label_size).0)
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        Geometry {
            cell,
            label_size,
            left: widest + 48,
            bottom: widest + 48,
        }
    }

    fn size(&self, n: usize) -> (u32, u32) {
        let side = self.cell * n as u32;
        (
            (self.left + side + RIGHT).max(360),
            TOP + side + self.bottom,
        )
    }
}

/// Size in pixels of [`plot_confusion`]'s picture for these class names.
///
/// ```
/// let classes: Vec<String> = (0..10).map(|i| format!("class {i}")).collect();
/// let (w, h) = convnet::viz::confusion_size(&classes);
/// assert!(w > 10 * 40 && h > 10 * 40);
/// ```
pub fn confusion_size(classes: &[String]) -> (u32, u32) {
    Geometry::new(classes).size(classes.len())
}

/// Draws `confusion[true][predicted]` counts as a heat map into `out` (`.png` or `.svg`),
/// [`confusion_size`] pixels: cells coloured by their share of the row (of the true
/// class's images), class names on both axes, counts in the cells for at most 20 classes.
/// At most 2,000 classes.
///
/// ```
/// let classes = vec!["cat".to_string(), "dog".to_string()];
/// let out = std::env::temp_dir().join(format!("convnet-doc-confusion-{}.svg", std::process::id()));
/// convnet::viz::plot_confusion(&[vec![8, 2], vec![3, 7]], &classes, &out)?;
/// let svg = std::fs::read_to_string(&out)?;
/// assert!(svg.contains("dog"));
/// assert!(svg.split(['<', '>', '\n']).any(|t| t.trim() == "7"), "the count 7 is written");
/// # std::fs::remove_file(&out)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plot_confusion(
    confusion: &[Vec<u64>],
    classes: &[String],
    out: impl AsRef<Path>,
) -> Result<()> {
    let n = classes.len();
    if n == 0 {
        return Err(invalid("confusion", "no classes"));
    }
    if n > MAX_CLASSES {
        return Err(invalid(
            "confusion",
            format!("{n} classes are too many to draw (at most {MAX_CLASSES})"),
        ));
    }
    if confusion.len() != n || confusion.iter().any(|r| r.len() != n) {
        return Err(invalid(
            "confusion",
            format!("the matrix is not {n}x{n} for {n} classes"),
        ));
    }
    let geometry = Geometry::new(classes);
    let size = geometry.size(n);
    render(
        out.as_ref(),
        size,
        &Confusion {
            confusion,
            classes,
            geometry,
        },
    )
}

struct Confusion<'a> {
    confusion: &'a [Vec<u64>],
    classes: &'a [String],
    geometry: Geometry,
}

/// matplotlib's "Blues" from white (0) to dark blue (1).
fn blues(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    RGBColor(lerp(247, 8), lerp(251, 48), lerp(255, 107))
}

impl Drawing for Confusion<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let g = &self.geometry;
        let n = self.classes.len();
        let (c, left, top) = (g.cell as i32, g.left as i32, TOP as i32);
        let side = c * n as i32;
        let ink = RGBColor(20, 20, 20);
        let total: u64 = self.confusion.iter().flatten().sum();
        let correct: u64 = (0..n).map(|i| self.confusion[i][i]).sum();
        let title = format!(
            "confusion matrix: {total} images, accuracy {:.1}%",
            100.0 * correct as f64 / total.max(1) as f64
        );
        root.draw(&Text::new(
            title,
            (12, 10),
            (FONT_FAMILY, 18).into_font().color(&ink),
        ))?;
        root.draw(&Text::new(
            "colour: share of the true class's images",
            (12, 36),
            (FONT_FAMILY, 13).into_font().color(&RGBColor(90, 90, 90)),
        ))?;
        let counted = n <= MAX_COUNTED;
        for (i, row) in self.confusion.iter().enumerate() {
            let row_total: u64 = row.iter().sum();
            for (j, &v) in row.iter().enumerate() {
                let share = if row_total == 0 {
                    0.0
                } else {
                    v as f64 / row_total as f64
                };
                let (x, y) = (left + j as i32 * c, top + i as i32 * c);
                root.draw(&Rectangle::new(
                    [(x, y), (x + c, y + c)],
                    blues(share).filled(),
                ))?;
                if counted {
                    let color = if share > 0.5 { WHITE } else { ink };
                    let style = (FONT_FAMILY, 13)
                        .into_font()
                        .color(&color)
                        .pos(Pos::new(HPos::Center, VPos::Center));
                    root.draw(&Text::new(v.to_string(), (x + c / 2, y + c / 2), style))?;
                }
            }
        }
        root.draw(&Rectangle::new(
            [(left, top), (left + side, top + side)],
            ink.stroke_width(1),
        ))?;
        if g.label_size >= 7 {
            let font = (FONT_FAMILY, g.label_size).into_font().color(&ink);
            for (i, name) in self.classes.iter().enumerate() {
                let mid = i as i32 * c + c / 2;
                root.draw(&Text::new(
                    name.as_str(),
                    (left - 6, top + mid),
                    font.pos(Pos::new(HPos::Right, VPos::Center)),
                ))?;
                root.draw(&Text::new(
                    name.as_str(),
                    (left + mid, top + side + 6),
                    font.transform(FontTransform::Rotate270)
                        .pos(Pos::new(HPos::Right, VPos::Center)),
                ))?;
            }
        }
        let axis = (FONT_FAMILY, 15).into_font().color(&ink);
        let (_, h) = root.dim_in_pixel();
        root.draw(&Text::new(
            "predicted class",
            (left + side / 2, h as i32 - 20),
            axis.pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        root.draw(&Text::new(
            "true class",
            (16, top + side / 2),
            axis.transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_run_from_white_to_dark_blue() {
        assert_eq!(blues(0.0), RGBColor(247, 251, 255));
        assert_eq!(blues(1.0), RGBColor(8, 48, 107));
        assert_eq!(blues(2.0), blues(1.0));
    }

    #[test]
    fn bad_matrices_are_refused() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let out = std::env::temp_dir().join("never-written.png");
        let e = plot_confusion(&[vec![1, 2]], &classes, &out).unwrap_err();
        assert!(e.to_string().contains("not 2x2"), "{e}");
        assert!(!out.exists());
    }

    #[test]
    fn many_classes_get_small_cells_and_no_counts() {
        let classes: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let g = Geometry::new(&classes);
        assert_eq!(g.cell, 8);
        let (w, h) = g.size(100);
        assert!(w < 1200 && h < 1200, "{w}x{h}");
    }
}
