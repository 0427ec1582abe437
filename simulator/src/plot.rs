//! Plots comparing runs, as PNG and SVG: held-out loss (with perplexity on the right-hand
//! axis) against round, against simulated wall-clock time and against total bytes; training
//! loss against round; Rouge-L against round when a run has it. One line per run, the run's
//! label in the legend.
//!
//! Text is laid out with the DejaVu Sans font that the `dejavu` crate embeds, registered with
//! plotters' `ab_glyph` backend: no system font is looked up, so plots render the same on a
//! bare CI image as on a desktop. (The alternative, Debian's `fonts-dejavu-core` found through
//! fontconfig, needs an install step and a system library on every machine that plots.) The
//! bitmap is encoded with the `png` crate; SVG text names the `sans-serif` family, which every
//! viewer has.

use std::io::BufWriter;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::prelude::*;

use crate::record::RoundRecord;
use crate::report::RunData;

/// Pixel size of every plot (PNG pixels, SVG user units).
const SIZE: (u32, u32) = (1200, 750);
/// The font family registered for plots.
const FONT: &str = "sans-serif";
/// Font sizes (pixels): title, axis descriptions, tick labels, legend.
const TITLE_PX: u32 = 30;
const AXIS_PX: u32 = 24;
const TICK_PX: u32 = 19;
const LEGEND_PX: u32 = 21;
/// Line colours, one per run in order (Tableau 10: distinct, and readable for the common
/// colour-vision deficiencies); runs past ten reuse them.
const PALETTE: [RGBColor; 10] = [
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

/// Why plots could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// A file or folder could not be created or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Drawing failed.
    #[error("drawing {}: {reason}", path.display())]
    Draw {
        /// The plot being drawn.
        path: PathBuf,
        /// plotters' message.
        reason: String,
    },
    /// PNG encoding failed.
    #[error("encoding {}: {source}", path.display())]
    Png {
        /// The PNG file.
        path: PathBuf,
        /// The encoder's error.
        source: png::EncodingError,
    },
    /// The embedded font could not be registered (a broken build).
    #[error("the embedded DejaVu Sans font could not be loaded")]
    Font,
    /// No run has a held-out evaluation to plot.
    #[error("no run has a held-out evaluation to plot")]
    NoData,
}

/// One run to plot.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotRun {
    /// The legend entry.
    pub label: String,
    /// Held-out loss before the first round, drawn at round 0, time 0 (not on the bytes plot,
    /// whose axis is logarithmic).
    pub initial_heldout_loss: Option<f32>,
    /// The run's rounds.
    pub records: Vec<RoundRecord>,
}

impl From<(String, Vec<RoundRecord>)> for PlotRun {
    fn from((label, records): (String, Vec<RoundRecord>)) -> Self {
        Self {
            label,
            initial_heldout_loss: None,
            records,
        }
    }
}

impl From<&RunData> for PlotRun {
    fn from(run: &RunData) -> Self {
        Self {
            label: run.summary.run.clone(),
            initial_heldout_loss: Some(run.summary.initial_heldout_loss),
            records: run.records.clone(),
        }
    }
}

/// Writes the plots of `runs` into `out_dir` (created if absent), each as `NAME.png` and
/// `NAME.svg`, and returns the files written:
///
/// - `heldout_loss_vs_round`, `heldout_loss_vs_sim_time`, `heldout_loss_vs_total_bytes`
///   (held-out loss on the left axis, perplexity on the right);
/// - `train_loss_vs_round`;
/// - `rouge_l_vs_round`, when any run has Rouge-L.
pub fn write_plots(runs: &[PlotRun], out_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    register_font()?;
    if !runs
        .iter()
        .any(|r| r.records.iter().any(|x| x.heldout_loss.is_some()))
    {
        return Err(PlotError::NoData);
    }
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let heldout = |r: &RoundRecord| r.heldout_loss.map(f64::from);
    let max_time = runs
        .iter()
        .flat_map(|r| r.records.iter().map(|x| x.sim_time_s))
        .fold(0.0, f64::max);
    let (time_unit, time_scale) = time_unit(max_time);

    let mut plots = vec![
        Plot {
            name: "heldout_loss_vs_round",
            title: "Held-out loss by round",
            x_desc: "round".into(),
            y_desc: "held-out loss (nats/token)",
            perplexity_axis: true,
            x: XAxis::Rounds,
            lines: lines(runs, |r| Some(r.round as f64), heldout, Some(0.0)),
        },
        Plot {
            name: "heldout_loss_vs_sim_time",
            title: "Held-out loss by simulated wall-clock time",
            x_desc: format!("simulated wall-clock time ({time_unit})"),
            y_desc: "held-out loss (nats/token)",
            perplexity_axis: true,
            x: XAxis::Linear,
            lines: lines(
                runs,
                |r| Some(r.sim_time_s / time_scale),
                heldout,
                Some(0.0),
            ),
        },
        Plot {
            name: "heldout_loss_vs_total_bytes",
            title: "Held-out loss by bytes sent and received (all devices)",
            x_desc: "total bytes up + down (log scale)".into(),
            y_desc: "held-out loss (nats/token)",
            perplexity_axis: true,
            x: XAxis::LogBytes,
            lines: lines(runs, |r| Some(r.total_bytes as f64), heldout, None),
        },
        Plot {
            name: "train_loss_vs_round",
            title: "Training loss by round (mean over participating devices)",
            x_desc: "round".into(),
            y_desc: "training loss (nats/token)",
            perplexity_axis: false,
            x: XAxis::Rounds,
            lines: lines(
                runs,
                |r| Some(r.round as f64),
                |r| Some(f64::from(r.train_loss)),
                None,
            ),
        },
    ];
    if runs
        .iter()
        .any(|r| r.records.iter().any(|x| x.rouge_l.is_some()))
    {
        plots.push(Plot {
            name: "rouge_l_vs_round",
            title: "Rouge-L F of greedy generations by round",
            x_desc: "round".into(),
            y_desc: "Rouge-L F",
            perplexity_axis: false,
            x: XAxis::Rounds,
            lines: lines(
                runs,
                |r| Some(r.round as f64),
                |r| r.rouge_l.map(f64::from),
                None,
            ),
        });
    }

    let mut written = Vec::new();
    for plot in &plots {
        let svg = out_dir.join(format!("{}.svg", plot.name));
        {
            let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
            plot.draw(&root).map_err(|reason| PlotError::Draw {
                path: svg.clone(),
                reason,
            })?;
            root.present().map_err(|e| PlotError::Draw {
                path: svg.clone(),
                reason: e.to_string(),
            })?;
        }
        written.push(svg);

        let png_path = out_dir.join(format!("{}.png", plot.name));
        let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
            plot.draw(&root).map_err(|reason| PlotError::Draw {
                path: png_path.clone(),
                reason,
            })?;
            root.present().map_err(|e| PlotError::Draw {
                path: png_path.clone(),
                reason: e.to_string(),
            })?;
        }
        write_png(&png_path, &pixels)?;
        written.push(png_path);
    }
    tracing::info!(dir = %out_dir.display(), files = written.len(), "plots written");
    Ok(written)
}

/// Reads run folders (see [`crate::report::read_run`]) and writes their plots into `out_dir`.
pub fn plot_run_dirs(run_dirs: &[PathBuf], out_dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let mut runs = Vec::new();
    for dir in run_dirs {
        let run = crate::report::read_run(dir).map_err(|e| PlotError::Draw {
            path: dir.clone(),
            reason: e.to_string(),
        })?;
        runs.push(PlotRun::from(&run));
    }
    write_plots(&runs, out_dir)
}

/// Registers the embedded font once per process.
fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// The unit the time axis uses, and seconds per unit, for runs lasting up to `max_s`.
fn time_unit(max_s: f64) -> (&'static str, f64) {
    if max_s >= 3.0 * 3600.0 {
        ("h", 3600.0)
    } else if max_s >= 180.0 {
        ("min", 60.0)
    } else {
        ("s", 1.0)
    }
}

/// How a plot's x axis is scaled and labelled.
#[derive(Debug, Clone, Copy, PartialEq)]
enum XAxis {
    /// Round numbers: integer labels.
    Rounds,
    /// A linear axis with decimal labels.
    Linear,
    /// Bytes on a log scale, labelled with binary units.
    LogBytes,
}

/// One run's points.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// Each run's `(x, y)` points, rounds where either is absent skipped; with `origin_x`, the
/// run's initial held-out loss is drawn first at that x.
fn lines(
    runs: &[PlotRun],
    x: impl Fn(&RoundRecord) -> Option<f64>,
    y: impl Fn(&RoundRecord) -> Option<f64>,
    origin_x: Option<f64>,
) -> Vec<Line> {
    runs.iter()
        .map(|run| {
            let start = origin_x
                .zip(run.initial_heldout_loss)
                .map(|(x0, y0)| (x0, f64::from(y0)));
            let points = start
                .into_iter()
                .chain(run.records.iter().filter_map(|r| x(r).zip(y(r))))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            Line {
                label: run.label.clone(),
                points,
            }
        })
        .collect()
}

/// One chart.
struct Plot {
    name: &'static str,
    title: &'static str,
    x_desc: String,
    y_desc: &'static str,
    /// Whether the right-hand axis shows `exp(y)` (perplexity for a loss in nats).
    perplexity_axis: bool,
    x: XAxis,
    lines: Vec<Line>,
}

impl Plot {
    /// Draws the chart on `root` (either backend).
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let points = || self.lines.iter().flat_map(|l| l.points.iter());
        let (x_min, x_max) = bounds(points().map(|p| p.0));
        let (y_min, y_max) = bounds(points().map(|p| p.1));
        let y_pad = ((y_max - y_min) * 0.06).max(1e-3);
        let y_range = (y_min - y_pad)..(y_max + y_pad);
        match self.x {
            XAxis::Rounds => {
                let range = x_min.min(0.0)..x_max.max(1.0);
                let labels = (x_max.max(1.0) as usize + 1).min(11);
                self.draw_with(root, range, y_range, labels, &|x: &f64| format!("{x:.0}"))
            }
            XAxis::Linear => {
                let range = x_min.min(0.0)..(x_max * 1.02).max(1e-3);
                // As many decimals as a tenth of the range needs, the same on every tick.
                let step = (range.end - range.start) / 10.0;
                let decimals = (-step.log10().floor()).max(0.0) as usize;
                self.draw_with(root, range, y_range, 10, &|x: &f64| {
                    format!("{x:.decimals$}")
                })
            }
            XAxis::LogBytes => {
                let low = x_min.max(1.0);
                let range = (low / 1.5)..(x_max.max(low * 10.0) * 1.5);
                self.draw_with(root, range.log_scale(), y_range, 10, &|x: &f64| {
                    decimal_bytes(*x)
                })
            }
        }
    }

    /// Draws the chart with x coordinates `x_spec` (linear or logarithmic).
    fn draw_with<DB, X>(
        &self,
        root: &DrawingArea<DB, Shift>,
        x_spec: X,
        y_range: Range<f64>,
        x_labels: usize,
        x_format: &dyn Fn(&f64) -> String,
    ) -> Result<(), String>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64> + Clone,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, (FONT, TITLE_PX))
            .margin(20)
            .x_label_area_size(70)
            .y_label_area_size(95)
            .right_y_label_area_size(if self.perplexity_axis { 95 } else { 20 })
            .build_cartesian_2d(x_spec.clone(), y_range.clone())
            .map_err(|e| err(&e))?
            .set_secondary_coord(x_spec, y_range);
        chart
            .configure_mesh()
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc)
            .x_labels(x_labels)
            .y_labels(8)
            .x_label_formatter(x_format)
            .y_label_formatter(&|y: &f64| format!("{y:.3}"))
            .axis_desc_style((FONT, AXIS_PX))
            .label_style((FONT, TICK_PX))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(205, 205, 205))
            .draw()
            .map_err(|e| err(&e))?;
        if self.perplexity_axis {
            chart
                .configure_secondary_axes()
                .y_desc("perplexity")
                .y_labels(8)
                .y_label_formatter(&|y: &f64| trim_decimal(y.exp()))
                .axis_desc_style((FONT, AXIS_PX))
                .label_style((FONT, TICK_PX))
                .draw()
                .map_err(|e| err(&e))?;
        }
        for (i, line) in self.lines.iter().enumerate() {
            if line.points.is_empty() {
                // No legend entry for a run with nothing on this plot (no Rouge-L, say).
                continue;
            }
            let colour = PALETTE[i % PALETTE.len()];
            let style = ShapeStyle::from(colour).stroke_width(3);
            chart
                .draw_series(LineSeries::new(line.points.iter().copied(), style))
                .map_err(|e| err(&e))?
                .label(line.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 30, y)], colour.stroke_width(4))
                });
            chart
                .draw_series(
                    line.points
                        .iter()
                        .map(|&p| Circle::new(p, 4, colour.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(legend_corner(&self.lines, self.x == XAxis::LogBytes))
            .margin(15)
            .legend_area_size(40)
            .label_font((FONT, LEGEND_PX))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        Ok(())
    }
}

/// The corner of the plot where the legend covers the fewest points: upper right unless
/// another corner is emptier (a rising curve, such as Rouge-L, ends in the upper right). The
/// legend is taken to cover a third of the width and, per line, a fifteenth of the height.
fn legend_corner(lines: &[Line], log_x: bool) -> SeriesLabelPosition {
    let x_of = |x: f64| if log_x { x.max(1.0).log10() } else { x };
    let points = || lines.iter().flat_map(|l| l.points.iter());
    let (x_lo, x_hi) = bounds(points().map(|p| x_of(p.0)));
    let (y_lo, y_hi) = bounds(points().map(|p| p.1));
    let shown = lines.iter().filter(|l| !l.points.is_empty()).count();
    let height = (shown as f64 / 15.0 + 0.05).min(0.9);
    let covered = |right: bool, upper: bool| {
        points()
            .filter(|p| {
                let fx = (x_of(p.0) - x_lo) / (x_hi - x_lo).max(f64::MIN_POSITIVE);
                let fy = (p.1 - y_lo) / (y_hi - y_lo).max(f64::MIN_POSITIVE);
                let in_x = if right {
                    fx > 2.0 / 3.0
                } else {
                    fx < 1.0 / 3.0
                };
                let in_y = if upper {
                    fy > 1.0 - height
                } else {
                    fy < height
                };
                in_x && in_y
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, true, true),
        (SeriesLabelPosition::LowerRight, true, false),
        (SeriesLabelPosition::UpperLeft, false, true),
        (SeriesLabelPosition::LowerLeft, false, false),
    ]
    .into_iter()
    .min_by_key(|&(_, right, upper)| covered(right, upper))
    .map_or(SeriesLabelPosition::UpperRight, |(corner, _, _)| corner)
}

/// The smallest and largest of `values`, `(0, 1)` when there are none.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) }
}

/// Bytes with a decimal (SI) unit, for the log axis whose ticks fall on powers of ten:
/// `100 kB`, `1 MB`, `2.5 GB`.
fn decimal_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 999.5 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{} {}", trim_decimal(value), UNITS[unit])
}

/// A tick label with no more decimals than it needs: `120`, `12.5`, `1.25`, `0.125`, `2`.
fn trim_decimal(v: f64) -> String {
    let a = v.abs();
    let decimals = if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    let text = format!("{v:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// Writes an RGB8 buffer of [`SIZE`] as a PNG file.
fn write_png(path: &Path, pixels: &[u8]) -> Result<(), PlotError> {
    let file = std::fs::File::create(path).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let png_err = |source| PlotError::Png {
        path: path.to_path_buf(),
        source,
    };
    let mut writer = encoder.write_header().map_err(png_err)?;
    writer.write_image_data(pixels).map_err(png_err)?;
    writer.finish().map_err(png_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels() {
        assert_eq!(trim_decimal(120.4), "120");
        assert_eq!(trim_decimal(12.5), "12.5");
        assert_eq!(trim_decimal(2.0), "2");
        assert_eq!(trim_decimal(0.125), "0.125");
        assert_eq!(decimal_bytes(100_000.0), "100 kB");
        assert_eq!(decimal_bytes(1e6), "1 MB");
        assert_eq!(decimal_bytes(2.5e9), "2.5 GB");
        assert_eq!(decimal_bytes(512.0), "512 B");
        assert_eq!(time_unit(100.0), ("s", 1.0));
        assert_eq!(time_unit(1000.0), ("min", 60.0));
    }
}
