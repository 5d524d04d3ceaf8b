//! Learning curves: loss, accuracy and learning rate against epoch for one or more runs,
//! train solid and test dashed, each run's best test accuracy marked, and a legend naming
//! the runs.

use super::metrics::{read_runs, EpochMetrics, RunCurves};
use super::render::{render, text_size, Drawing, FONT_FAMILY};
use crate::error::{invalid, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

/// Size in pixels of a learning-curve picture (three panels side by side over a legend).
pub const CURVES_SIZE: (u32, u32) = (1500, 560);

/// Least height of the legend strip under the panels (two rows).
const LEGEND_HEIGHT: u32 = 64;
/// Legend text size, row height and left margin in pixels.
const LEGEND_TEXT: u32 = 14;
const LEGEND_ROW: i32 = 22;
const LEGEND_LEFT: i32 = 70;

/// Run colours (matplotlib's "tab10"), reused in order past ten runs.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Reads the `metrics.jsonl` of each run folder and draws their curves into `out`
/// (`.png` or `.svg`); runs are named after their folders. This is what `convnet plot`
/// runs, and what a training run can call on its own folder when it ends.
///
/// ```no_run
/// convnet::viz::plot_run_folders(&["runs/seed-cnn"], "runs/seed-cnn/curves.png")?;
/// # Ok::<(), convnet::Error>(())
/// ```
pub fn plot_run_folders<P: AsRef<Path>>(dirs: &[P], out: impl AsRef<Path>) -> Result<()> {
    if dirs.is_empty() {
        return Err(invalid("plot", "name at least one run folder"));
    }
    plot_curves(&read_runs(dirs)?, out)
}

/// Draws the learning curves of `runs` into `out`, [`CURVES_SIZE`] pixels, as PNG or SVG
/// by its extension: three panels (loss, accuracy, learning rate) against epoch; train
/// solid, test dashed; one colour per run; each run's best test accuracy marked with a
/// point and its value.
///
/// ```
/// use convnet::viz::{plot_curves, RunCurves};
/// let text = "{\"epoch\":1,\"lr\":0.1,\"train_loss\":2.0,\"train_accuracy\":0.3}\n\
///             {\"epoch\":2,\"lr\":0.1,\"train_loss\":1.5,\"train_accuracy\":0.45}";
/// let run = RunCurves::parse("no-test-set", text, "metrics.jsonl".as_ref())?;
/// let out = std::env::temp_dir().join(format!("convnet-doc-curves-{}.svg", std::process::id()));
/// plot_curves(&[run], &out)?;
/// assert!(std::fs::read_to_string(&out)?.contains("no-test-set"));
/// # std::fs::remove_file(&out)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plot_curves(runs: &[RunCurves], out: impl AsRef<Path>) -> Result<()> {
    if runs.is_empty() {
        return Err(invalid("plot", "no runs to draw"));
    }
    render(out.as_ref(), CURVES_SIZE, &Curves { runs })
}

struct Curves<'a> {
    runs: &'a [RunCurves],
}

/// What one panel shows.
#[derive(Clone, Copy)]
enum Panel {
    Loss,
    Accuracy,
    LearningRate,
}

impl Panel {
    fn title(self) -> &'static str {
        match self {
            Panel::Loss => "loss",
            Panel::Accuracy => "accuracy (%)",
            Panel::LearningRate => "learning rate",
        }
    }

    /// The panel's (train or only, test) values of an epoch, in display units.
    fn values(self, e: &EpochMetrics) -> (Option<f64>, Option<f64>) {
        let pct = |v: Option<f64>| v.map(|a| 100.0 * a);
        match self {
            Panel::Loss => (e.train_loss, e.test_loss),
            Panel::Accuracy => (pct(e.train_accuracy), pct(e.test_accuracy)),
            Panel::LearningRate => (e.lr, None),
        }
    }
}

/// The maximal runs of consecutive epochs that have a value, as (epoch, value) points.
fn segments(
    epochs: &[EpochMetrics],
    value: impl Fn(&EpochMetrics) -> Option<f64>,
) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for e in epochs {
        match value(e) {
            Some(v) => {
                if let Some(s) = out.last_mut() {
                    s.push((e.epoch as f64, v));
                }
            }
            None if out.last().is_some_and(|s| !s.is_empty()) => out.push(Vec::new()),
            None => {}
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A value range with some room around it, never empty.
fn padded_range(values: impl Iterator<Item = f64>, floor_zero: bool) -> std::ops::Range<f64> {
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return 0.0..1.0;
    }
    if floor_zero && lo >= 0.0 {
        lo = 0.0;
    }
    if hi - lo < 1e-12 {
        let d = if hi.abs() > 1e-12 {
            hi.abs() * 0.1
        } else {
            1.0
        };
        lo -= d;
        hi += d;
    }
    let pad = 0.06 * (hi - lo);
    (if floor_zero && lo == 0.0 {
        0.0
    } else {
        lo - pad
    })..hi + pad
}

/// Tick labels: plain decimals (at most four places), scientific notation below 0.001.
fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() < 1e-3 {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Drawing for Curves<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let (w, h) = root.dim_in_pixel();
        let legend = self.legend_height(w, h);
        let (panels_area, legend_area) = root.split_vertically(h.saturating_sub(legend));
        let panels = panels_area.split_evenly((1, 3));
        for (area, panel) in panels
            .iter()
            .zip([Panel::Loss, Panel::Accuracy, Panel::LearningRate])
        {
            self.draw_panel(area, panel)?;
        }
        self.draw_legend(&legend_area)
    }
}

impl Curves<'_> {
    fn draw_panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        panel: Panel,
    ) -> DrawResult<DB> {
        let last_epoch = self
            .runs
            .iter()
            .flat_map(|r| r.epochs.last().map(|e| e.epoch))
            .max()
            .unwrap_or(1);
        let xs = if last_epoch <= 1 {
            0.5..1.5
        } else {
            1.0..last_epoch as f64
        };
        let all = self.runs.iter().flat_map(|r| &r.epochs).flat_map(|e| {
            let (a, b) = panel.values(e);
            a.into_iter().chain(b)
        });
        let ys = match panel {
            Panel::Accuracy => {
                let r = padded_range(all, true);
                r.start.max(0.0)..r.end.min(100.0).max(r.start.max(0.0) + 1.0)
            }
            Panel::LearningRate => padded_range(all, true),
            Panel::Loss => padded_range(all, false),
        };
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title(), (FONT_FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(62)
            .build_cartesian_2d(xs, ys)?;
        let x_labels = last_epoch.clamp(2, 10);
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(x_labels)
            .y_labels(8)
            .x_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-9 && *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| tick_label(*v))
            .label_style((FONT_FAMILY, 13))
            .axis_desc_style((FONT_FAMILY, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()?;
        for (i, run) in self.runs.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let style = color.stroke_width(2);
            for seg in segments(&run.epochs, |e| panel.values(e).0) {
                if seg.len() == 1 {
                    chart.draw_series(seg.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
                }
                chart.draw_series(LineSeries::new(seg, style))?;
            }
            for seg in segments(&run.epochs, |e| panel.values(e).1) {
                if seg.len() == 1 {
                    chart.draw_series(seg.iter().map(|&p| Circle::new(p, 3, style)))?;
                }
                chart.draw_series(DashedLineSeries::new(seg, 7, 5, style))?;
            }
            if let (Panel::Accuracy, Some((epoch, acc))) = (panel, run.best_test_accuracy()) {
                let p = (epoch as f64, 100.0 * acc);
                chart.draw_series(std::iter::once(Circle::new(p, 5, color.filled())))?;
                // Above the point; right-aligned at the last epoch so it stays inside.
                let (h, dx) = if epoch >= last_epoch {
                    (HPos::Right, 4)
                } else {
                    (HPos::Center, 0)
                };
                let style = (FONT_FAMILY, 14)
                    .into_font()
                    .color(&color)
                    .pos(Pos::new(h, VPos::Bottom));
                let label = format!("{:.1}%", 100.0 * acc);
                let (w, hgt) = text_size(&label, 14);
                let (w, hgt) = (w as i32, hgt as i32);
                let x0 = if dx > 0 { dx - w } else { -w / 2 };
                chart.draw_series(std::iter::once(
                    EmptyElement::at(p)
                        + Rectangle::new(
                            [(x0 - 3, -8 - hgt - 3), (x0 + w + 3, -6)],
                            WHITE.mix(0.85).filled(),
                        )
                        + Text::new(label, (dx, -8), style),
                ))?;
            }
        }
        Ok(())
    }

    /// The legend's entries (text, colour, kind: 0 solid line, 1 dashed, 2 marker) at
    /// their places in a strip `width` pixels wide: one per run, then what the line styles
    /// and the marker mean, flowing left to right over as many rows as they need.
    fn legend(&self, width: u32) -> Vec<(String, RGBColor, u8, (i32, i32))> {
        let black = RGBColor(40, 40, 40);
        let mut entries: Vec<(String, RGBColor, u8)> = self
            .runs
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.clone(), COLORS[i % COLORS.len()], 0))
            .collect();
        entries.push(("train".into(), black, 0));
        entries.push(("test".into(), black, 1));
        if self.runs.iter().any(|r| r.best_test_accuracy().is_some()) {
            entries.push(("best test accuracy".into(), black, 2));
        }
        let (mut x, mut y) = (LEGEND_LEFT, 14i32);
        let mut placed = Vec::with_capacity(entries.len());
        for (text, color, kind) in entries {
            let w = 30 + 8 + text_size(&text, LEGEND_TEXT).0 as i32 + 28;
            if x + w > width as i32 && x > LEGEND_LEFT {
                (x, y) = (LEGEND_LEFT, y + LEGEND_ROW);
            }
            placed.push((text, color, kind, (x, y)));
            x += w;
        }
        placed
    }

    /// Height of the legend strip: its rows, at most half the picture.
    fn legend_height(&self, width: u32, height: u32) -> u32 {
        let last_y = self.legend(width).last().map_or(14, |e| e.3 .1);
        (last_y as u32 + LEGEND_ROW as u32 + 28).clamp(LEGEND_HEIGHT, height / 2)
    }

    fn draw_legend<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let black = RGBColor(40, 40, 40);
        let font = (FONT_FAMILY, LEGEND_TEXT).into_font();
        for (text, color, kind, (x, y)) in self.legend(area.dim_in_pixel().0) {
            let style = color.stroke_width(2);
            match kind {
                0 => area.draw(&PathElement::new([(x, y), (x + 30, y)], style))?,
                1 => {
                    area.draw(&PathElement::new([(x, y), (x + 10, y)], style))?;
                    area.draw(&PathElement::new([(x + 17, y), (x + 27, y)], style))?;
                }
                _ => area.draw(&Circle::new((x + 15, y), 5, color.filled()))?,
            }
            area.draw(&Text::new(
                text,
                (x + 38, y - 8),
                font.clone().color(&black),
            ))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(e: usize, test: Option<f64>) -> EpochMetrics {
        EpochMetrics {
            epoch: e,
            test_accuracy: test,
            ..Default::default()
        }
    }

    #[test]
    fn segments_break_at_missing_values() {
        let epochs = [
            epoch(1, Some(0.1)),
            epoch(2, None),
            epoch(3, Some(0.3)),
            epoch(4, Some(0.4)),
            epoch(5, None),
        ];
        let s = segments(&epochs, |e| e.test_accuracy);
        assert_eq!(s, vec![vec![(1.0, 0.1)], vec![(3.0, 0.3), (4.0, 0.4)]]);
        assert!(segments(&epochs[1..2], |e| e.test_accuracy).is_empty());
    }

    #[test]
    fn ranges_are_never_empty() {
        let r = padded_range([2.0, 2.0].into_iter(), false);
        assert!(r.start < 2.0 && r.end > 2.0);
        assert_eq!(padded_range(std::iter::empty(), false), 0.0..1.0);
        let r = padded_range([0.01, 0.1].into_iter(), true);
        assert_eq!(r.start, 0.0);
        assert!(r.end > 0.1);
    }

    #[test]
    fn the_legend_grows_with_the_runs() {
        let run = |i: usize| RunCurves {
            name: format!("a-rather-long-run-name-{i}"),
            epochs: vec![epoch(1, Some(0.5))],
        };
        let few: Vec<RunCurves> = (0..2).map(run).collect();
        let many: Vec<RunCurves> = (0..40).map(run).collect();
        let (w, h) = CURVES_SIZE;
        assert_eq!(Curves { runs: &few }.legend_height(w, h), LEGEND_HEIGHT);
        let tall = Curves { runs: &many }.legend_height(w, h);
        assert!(tall > LEGEND_HEIGHT && tall <= h / 2, "{tall}");
        // Every entry starts inside the strip's width.
        for (_, _, _, (x, _)) in (Curves { runs: &many }).legend(w) {
            assert!(x < w as i32);
        }
    }

    #[test]
    fn tick_labels() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(0.005), "0.005");
        assert_eq!(tick_label(0.0125), "0.0125");
        assert_eq!(tick_label(0.0001), "1.0e-4");
        assert_eq!(tick_label(40.0), "40");
        assert_eq!(tick_label(1.25), "1.25");
    }
}
