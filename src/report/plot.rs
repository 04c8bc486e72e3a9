//! Line charts (optionally log-x / log-y, with ±σ bands) rendered by plotters to PNG + SVG.
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera license), embedded so plots render on a bare machine.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// Family name every chart uses.
const FAMILY: &str = "sans-serif";
/// Chart size in pixels (PNG) / user units (SVG).
const SIZE: (u32, u32) = (960, 640);

/// Register the embedded font with plotters' ab_glyph text backend (idempotent).
pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The font is a compile-time constant known to parse.
            let _ = plotters::style::register_font(FAMILY, style, FONT);
        }
    });
}

/// One line, optionally with a shaded band (x, low, high) around it.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// (x, y) points in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Optional band (x, low, high), e.g. mean ± std.
    pub band: Option<Vec<(f64, f64, f64)>>,
}

/// A line chart description.
#[derive(Clone, Debug, Default)]
pub struct LineChart {
    /// Title on top.
    pub title: String,
    /// X axis label (with unit).
    pub x_label: String,
    /// Y axis label (with unit).
    pub y_label: String,
    /// Logarithmic x axis (points with x ≤ 0 are dropped).
    pub log_x: bool,
    /// Logarithmic y axis (points with y ≤ 0 are dropped).
    pub log_y: bool,
    /// Lines.
    pub series: Vec<Series>,
    /// Corner of the legend box.
    pub legend: Legend,
}

/// Corner of the legend box (pick the one the data leaves free).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Legend {
    /// Upper left.
    UpperLeft,
    /// Upper right.
    #[default]
    UpperRight,
    /// Lower left.
    LowerLeft,
    /// Lower right.
    LowerRight,
}

/// Write `chart` to `<stem>.png` and `<stem>.svg`; returns both paths.
pub fn write_line_chart(chart: &LineChart, stem: &Path) -> Result<[PathBuf; 2]> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw(&root, chart).with_context(|| format!("drawing {}", png.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw(&root, chart).with_context(|| format!("drawing {}", svg.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    Ok([png, svg])
}

/// Data range of the chart along one axis (log axes ignore non-positive values), padded.
fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-12 * hi.abs().max(1.0));
        (lo - pad, hi + pad)
    }
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &LineChart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = chart.series.iter().flat_map(|s| {
        s.points
            .iter()
            .map(|p| p.1)
            .chain(s.band.iter().flatten().flat_map(|b| [b.1, b.2]))
    });
    let (x0, x1) = range(xs, chart.log_x);
    let (y0, y1) = range(ys, chart.log_y);
    // A range that padding pushed to ±inf (values near f64::MAX) would make the axis tick
    // search loop forever: refuse it.
    if ![x0, x1, y0, y1].iter().all(|v| v.is_finite()) || x0 >= x1 || y0 >= y1 {
        bail!(
            "chart `{}`: the data give a non-finite or empty axis range (x {x0}..{x1}, y {y0}..{y1})",
            chart.title
        );
    }
    match (chart.log_x, chart.log_y) {
        (true, true) => draw_in(root, chart, (x0..x1).log_scale(), (y0..y1).log_scale()),
        (true, false) => draw_in(root, chart, (x0..x1).log_scale(), y0..y1),
        (false, true) => draw_in(root, chart, x0..x1, (y0..y1).log_scale()),
        (false, false) => draw_in(root, chart, x0..x1, y0..y1),
    }
}

fn draw_in<DB, X, Y>(root: &DrawingArea<DB, Shift>, chart: &LineChart, x: X, y: Y) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, (FAMILY, 26))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(err)?;
    let keep_x = |x: f64| !chart.log_x || x > 0.0;
    let keep_y = |y: f64| !chart.log_y || y > 0.0;
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if let Some(band) = &s.band {
            let band: Vec<_> = band
                .iter()
                .filter(|b| keep_x(b.0) && keep_y(b.1) && keep_y(b.2))
                .collect();
            let polygon: Vec<(f64, f64)> = band
                .iter()
                .map(|b| (b.0, b.2))
                .chain(band.iter().rev().map(|b| (b.0, b.1)))
                .collect();
            ctx.draw_series(std::iter::once(Polygon::new(
                polygon,
                color.mix(0.18).filled(),
            )))
            .map_err(err)?;
        }
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| keep_x(p.0) && keep_y(p.1))
            .collect();
        ctx.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(&s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        ctx.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    ctx.configure_series_labels()
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(match chart.legend {
            Legend::UpperLeft => SeriesLabelPosition::UpperLeft,
            Legend::UpperRight => SeriesLabelPosition::UpperRight,
            Legend::LowerLeft => SeriesLabelPosition::LowerLeft,
            Legend::LowerRight => SeriesLabelPosition::LowerRight,
        })
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Compact tick label: 1e3-style for large/small magnitudes, plain otherwise.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e4).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// A heatmap of `values[[row, col]]` (row 0 at the bottom), e.g. stack × tier occupancy.
#[derive(Clone, Debug, Default)]
pub struct Heatmap {
    /// Title on top.
    pub title: String,
    /// X axis label (columns).
    pub x_label: String,
    /// Y axis label (rows).
    pub y_label: String,
    /// Cell values; NaN cells are drawn grey.
    pub values: ndarray::Array2<f64>,
}

/// Write `map` to `<stem>.png` and `<stem>.svg` with a linear colour scale from the smallest to
/// the largest finite value (dark blue → yellow); returns both paths.
pub fn write_heatmap(map: &Heatmap, stem: &Path) -> Result<[PathBuf; 2]> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        draw_heatmap(&root, map).with_context(|| format!("drawing {}", png.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        draw_heatmap(&root, map).with_context(|| format!("drawing {}", svg.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    Ok([png, svg])
}

fn draw_heatmap<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, map: &Heatmap) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    let (rows, cols) = map.values.dim();
    let (lo, hi) = map
        .values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let span = if hi > lo { hi - lo } else { 1.0 };
    root.fill(&WHITE).map_err(err)?;
    let mut ctx = ChartBuilder::on(root)
        .caption(
            format!("{} (range {lo:.3} … {hi:.3})", map.title),
            (FAMILY, 24),
        )
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..cols.max(1) as f64, 0.0..rows.max(1) as f64)
        .map_err(err)?;
    ctx.configure_mesh()
        .disable_mesh()
        .x_desc(&map.x_label)
        .y_desc(&map.y_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .x_labels((cols + 1).min(17))
        .y_labels((rows + 1).min(17))
        .x_label_formatter(&integer_tick)
        .y_label_formatter(&integer_tick)
        .draw()
        .map_err(err)?;
    ctx.draw_series(map.values.indexed_iter().map(|((r, c), &v)| {
        let color = if v.is_finite() {
            let f = ((v - lo) / span).clamp(0.0, 1.0);
            RGBColor(
                (40.0 + 213.0 * f) as u8,
                (30.0 + 201.0 * f) as u8,
                (110.0 - 80.0 * f) as u8,
            )
        } else {
            RGBColor(200, 200, 200)
        };
        Rectangle::new(
            [(c as f64, r as f64), (c as f64 + 1.0, r as f64 + 1.0)],
            color.filled(),
        )
    }))
    .map_err(err)?;
    Ok(())
}

/// Cell-boundary tick label: the integer, or nothing for fractional ticks.
fn integer_tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}
