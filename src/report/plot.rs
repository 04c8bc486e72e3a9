//! Chart style shared by every aimc plot, and line charts (optionally log-x / log-y, with ±σ bands) rendered by
//! plotters to PNG + SVG. Legends sit beside the plot, every plotted x value is ticked when there are few, and
//! units such as J or s take SI prefixes (µJ, not 1.2e-3 J).
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::coord::Shift;
use plotters::prelude::*;

/// DejaVu Sans (Bitstream Vera license), embedded so plots render on a bare machine.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// Family name every chart uses.
const FAMILY: &str = "sans-serif";
/// Chart size in pixels (PNG) / user units (SVG).
const SIZE: (u32, u32) = (1100, 640);

/// Qualitative colours (Tableau 10, then its light variants): distinct on screen and in print.
pub(super) const PALETTE: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
];

/// Colour of the `i`-th series or segment of a chart.
pub fn series_colour(i: usize) -> RGBAColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b).to_rgba()
}

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
    /// Kept for callers that name a corner; the legend is always drawn in a column beside the plot, where it
    /// cannot hide data.
    pub legend: Legend,
}

/// Corner a caller once chose for the legend box; the legend now always sits beside the plot.
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

/// Write `chart` to `<stem>.png` and `<stem>.svg`; returns both paths. The x axis is ticked at every plotted x
/// value when there are at most [`MAX_DATA_TICKS`] of them; see [`write_line_chart_with_ticks`] for named ticks.
pub fn write_line_chart(chart: &LineChart, stem: &Path) -> Result<[PathBuf; 2]> {
    write_line_chart_with_ticks(chart, None, stem)
}

/// [`write_line_chart`] with the x axis ticked exactly at `x_ticks` (value, label), e.g. drift times named
/// `1 h`, `1 d`, `1 y`.
pub fn write_line_chart_with_ticks(
    chart: &LineChart,
    x_ticks: Option<&[(f64, String)]>,
    stem: &Path,
) -> Result<[PathBuf; 2]> {
    let chart = si_scaled(chart);
    write_png_svg(stem, SIZE, &|r| draw(r, &chart, x_ticks), &|r| {
        draw(r, &chart, x_ticks)
    })
}

/// Draws one figure twice, as `<stem>.png` and `<stem>.svg` of `size` pixels, with the embedded font
/// registered; returns both paths. Plotters' backends are different types, so the caller passes its
/// drawing function once per backend (usually the same generic function).
pub fn write_png_svg(
    stem: &Path,
    size: (u32, u32),
    draw_png: &dyn Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
    draw_svg: &dyn Fn(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<[PathBuf; 2]> {
    register_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_png(&root).with_context(|| format!("drawing {}", png.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", png.display()))?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_svg(&root).with_context(|| format!("drawing {}", svg.display()))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", svg.display()))?;
    }
    Ok([png, svg])
}

/// At most this many distinct x values are each given a tick of their own.
pub const MAX_DATA_TICKS: usize = 12;

/// SI prefixes from pico to giga, with their factors.
const PREFIXES: [(f64, &str); 8] = [
    (1e-12, "p"),
    (1e-9, "n"),
    (1e-6, "µ"),
    (1e-3, "m"),
    (1.0, ""),
    (1e3, "k"),
    (1e6, "M"),
    (1e9, "G"),
];

/// Units that take an SI prefix when they appear as `(U)` or `[U]` at the end of an axis label.
const SI_UNITS: [&str; 5] = ["J", "s", "W", "S", "Hz"];

/// The SI prefix (factor, symbol) that brings `typical` (> 0) into [1, 1000).
pub fn si_prefix(typical: f64) -> (f64, &'static str) {
    if !(typical.is_finite() && typical > 0.0) {
        return (1.0, "");
    }
    PREFIXES
        .iter()
        .rev()
        .find(|(f, _)| typical >= *f * 0.9995)
        .copied()
        .unwrap_or(PREFIXES[0])
}

/// Formats `v` in `unit` with an SI prefix and three significant digits: `1.20 mJ`, `39.7 µJ`.
pub fn si_format(v: f64, unit: &str) -> String {
    let (f, p) = si_prefix(v.abs());
    let x = v / f;
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{x:.digits$} {p}{unit}")
}

/// Splits `energy per token (J)` into (`energy per token `, `J`, closing bracket) when the unit takes SI prefixes.
fn label_unit(label: &str) -> Option<(&str, &str, char)> {
    let close = label.chars().last()?;
    let open = match close {
        ')' => '(',
        ']' => '[',
        _ => return None,
    };
    let at = label.rfind(open)?;
    let unit = &label[at + 1..label.len() - 1];
    SI_UNITS
        .contains(&unit)
        .then_some((&label[..at], unit, close))
}

/// A copy of `chart` whose y values are rescaled to an SI prefix (µJ, not 1.2e-3 J) when the y label ends in a
/// prefixable unit; other charts come back unchanged.
fn si_scaled(chart: &LineChart) -> LineChart {
    let mut c = chart.clone();
    let Some((head, unit, close)) = label_unit(&chart.y_label) else {
        return c;
    };
    let ys: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1.abs()))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if ys.is_empty() {
        return c;
    }
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ys.iter().copied().fold(0.0, f64::max);
    // A log axis reads best with its geometric middle in [1, 1000); a linear one with its largest value.
    let typical = if chart.log_y { (lo * hi).sqrt() } else { hi };
    let (f, p) = si_prefix(typical);
    let open = if close == ')' { '(' } else { '[' };
    c.y_label = format!("{head}{open}{p}{unit}{close}");
    for s in &mut c.series {
        for pt in &mut s.points {
            pt.1 /= f;
        }
        if let Some(b) = &mut s.band {
            for e in b {
                e.1 /= f;
                e.2 /= f;
            }
        }
    }
    c
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
        let pad = ((hi - lo) * 0.08).max(1e-12 * hi.abs().max(1.0));
        (lo - pad, hi + pad)
    }
}

/// Round tick positions covering `[lo, hi]`: 1-2-5 steps on a linear axis, decades (with 2 and 5 when the axis
/// spans less than three decades) on a log axis.
fn nice_ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    if log {
        let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        let mults: &[f64] = if b - a <= 3 { &[1.0, 2.0, 5.0] } else { &[1.0] };
        let step = ((b - a) as usize / 8).max(1);
        (a..=b)
            .step_by(step)
            .flat_map(|e| mults.iter().map(move |m| m * 10f64.powi(e)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect()
    } else {
        let raw = (hi - lo) / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let first = (lo / step).ceil() as i64;
        let last = (hi / step).floor() as i64;
        (first..=last).map(|i| i as f64 * step).collect()
    }
}

/// The x ticks of a chart: the given ones, else every plotted x value when few, else round values.
fn x_tick_list(
    chart: &LineChart,
    given: Option<&[(f64, String)]>,
    lo: f64,
    hi: f64,
) -> Vec<(f64, String)> {
    if let Some(t) = given {
        return t.to_vec();
    }
    let mut xs: Vec<f64> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| x.is_finite() && (!chart.log_x || *x > 0.0))
        .collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup_by(|a, b| (*a - *b).abs() <= 1e-9 * b.abs().max(1e-300));
    if !xs.is_empty() && xs.len() <= MAX_DATA_TICKS {
        return xs.into_iter().map(|x| (x, short(x))).collect();
    }
    nice_ticks(lo, hi, chart.log_x)
        .into_iter()
        .map(|x| (x, short(x)))
        .collect()
}

/// An axis whose tick marks sit exactly at `ticks` (plotters' own key points cannot be pinned to data values).
pub(super) struct Ticked<R: Ranged<ValueType = f64>> {
    inner: R,
    ticks: Vec<f64>,
}

impl<R: Ranged<ValueType = f64>> Ranged for Ticked<R> {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// Pins the ticks of an axis range.
pub(super) fn ticked<A: AsRangedCoord<Value = f64>>(
    a: A,
    ticks: Vec<f64>,
) -> Ticked<A::CoordDescType>
where
    A::CoordDescType: Ranged<ValueType = f64>,
{
    Ticked {
        inner: a.into(),
        ticks,
    }
}

/// Width in pixels of the legend column for `labels` at 16 px type.
fn legend_width(labels: impl Iterator<Item = usize>) -> u32 {
    let chars = labels.max().unwrap_or(0) as u32;
    (chars * 9 + 60).clamp(150, 380)
}

/// A series drawn as a reference line: constant y (e.g. the digital baseline), dashed and without markers.
fn is_reference(s: &Series) -> bool {
    s.band.is_none() && s.points.len() >= 2 && s.points.windows(2).all(|w| w[0].1 == w[1].1)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &LineChart,
    x_ticks: Option<&[(f64, String)]>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let xs = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(x_ticks.into_iter().flatten().map(|t| t.0));
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
    let xt = x_tick_list(chart, x_ticks, x0, x1);
    let yt: Vec<f64> = nice_ticks(y0, y1, chart.log_y);
    let body = root.titled(&chart.title, (FAMILY, 24)).map_err(err)?;
    let legend_w = legend_width(chart.series.iter().map(|s| s.label.chars().count()));
    let (plot, legend) = body.split_horizontally(SIZE.0.saturating_sub(legend_w));
    let xv: Vec<f64> = xt.iter().map(|t| t.0).collect();
    match (chart.log_x, chart.log_y) {
        (true, true) => draw_in(
            &plot,
            &legend,
            chart,
            &xt,
            ticked((x0..x1).log_scale(), xv.clone()),
            ticked((y0..y1).log_scale(), yt.clone()),
        ),
        (true, false) => draw_in(
            &plot,
            &legend,
            chart,
            &xt,
            ticked((x0..x1).log_scale(), xv.clone()),
            ticked(y0..y1, yt.clone()),
        ),
        (false, true) => draw_in(
            &plot,
            &legend,
            chart,
            &xt,
            ticked(x0..x1, xv.clone()),
            ticked((y0..y1).log_scale(), yt.clone()),
        ),
        (false, false) => draw_in(
            &plot,
            &legend,
            chart,
            &xt,
            ticked(x0..x1, xv.clone()),
            ticked(y0..y1, yt.clone()),
        ),
    }
}

fn draw_in<DB, X, Y>(
    plot: &DrawingArea<DB, Shift>,
    legend: &DrawingArea<DB, Shift>,
    chart: &LineChart,
    x_ticks: &[(f64, String)],
    x: X,
    y: Y,
) -> Result<()>
where
    DB: DrawingBackend,
    DB::ErrorType: 'static,
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    let mut ctx = ChartBuilder::on(plot)
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    let x_label = |v: &f64| {
        x_ticks
            .iter()
            .find(|t| (t.0 - v).abs() <= 1e-9 * v.abs().max(1e-300))
            .map_or_else(|| short(*v), |t| t.1.clone())
    };
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .bold_line_style(BLACK.mix(0.12))
        .x_label_formatter(&x_label)
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(err)?;
    let keep_x = |x: f64| !chart.log_x || x > 0.0;
    let keep_y = |y: f64| !chart.log_y || y > 0.0;
    // Series with bands at the same x values are dodged sideways so their whiskers stay apart.
    let banded: Vec<usize> = (0..chart.series.len())
        .filter(|&i| chart.series[i].band.is_some())
        .collect();
    let dodge = |i: usize, x: f64| -> f64 {
        let Some(k) = banded.iter().position(|&b| b == i) else {
            return x;
        };
        if banded.len() < 2 {
            return x;
        }
        let off = k as f64 - (banded.len() - 1) as f64 / 2.0;
        if chart.log_x {
            x * 1.06f64.powf(off)
        } else {
            let span = chart
                .series
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.0))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                    (a.min(v), b.max(v))
                });
            x + off * 0.012 * (span.1 - span.0).max(f64::MIN_POSITIVE)
        }
    };
    let mut entries: Vec<(String, RGBAColor, bool)> = Vec::new();
    for (i, s) in chart.series.iter().enumerate() {
        let color = series_colour(i);
        let reference = is_reference(s);
        if let Some(band) = &s.band {
            let band: Vec<_> = band
                .iter()
                .filter(|b| keep_x(b.0) && keep_y(b.1) && keep_y(b.2))
                .map(|b| (dodge(i, b.0), b.1, b.2))
                .collect();
            let polygon: Vec<(f64, f64)> = band
                .iter()
                .map(|b| (b.0, b.2))
                .chain(band.iter().rev().map(|b| (b.0, b.1)))
                .collect();
            ctx.draw_series(std::iter::once(Polygon::new(
                polygon,
                color.mix(0.10).filled(),
            )))
            .map_err(err)?;
            if band.len() <= MAX_DATA_TICKS {
                for b in &band {
                    ctx.draw_series(std::iter::once(PathElement::new(
                        vec![(b.0, b.1), (b.0, b.2)],
                        color.stroke_width(2),
                    )))
                    .map_err(err)?;
                    for end in [b.1, b.2] {
                        ctx.draw_series(std::iter::once(
                            EmptyElement::at((b.0, end))
                                + PathElement::new(vec![(-6, 0), (6, 0)], color.stroke_width(2)),
                        ))
                        .map_err(err)?;
                    }
                }
            } else {
                for edge in [1, 2] {
                    let pts: Vec<(f64, f64)> = band
                        .iter()
                        .map(|b| (b.0, if edge == 1 { b.1 } else { b.2 }))
                        .collect();
                    ctx.draw_series(DashedLineSeries::new(pts, 5, 4, color.stroke_width(1)))
                        .map_err(err)?;
                }
            }
        }
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| keep_x(p.0) && keep_y(p.1))
            .map(|p| (dodge(i, p.0), p.1))
            .collect();
        if reference {
            ctx.draw_series(DashedLineSeries::new(pts, 10, 6, color.stroke_width(2)))
                .map_err(err)?;
        } else {
            ctx.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?;
            ctx.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
        entries.push((s.label.clone(), color, reference));
    }
    // The legend sits in its own column beside the plot, so it never hides data.
    let top = 70;
    for (row, (label, color, reference)) in entries.iter().enumerate() {
        let y = top + 28 * row as i32;
        if *reference {
            for k in 0..3 {
                legend
                    .draw(&PathElement::new(
                        vec![(6 + 10 * k, y + 8), (12 + 10 * k, y + 8)],
                        color.stroke_width(2),
                    ))
                    .map_err(err)?;
            }
        } else {
            legend
                .draw(&PathElement::new(
                    vec![(4, y + 8), (34, y + 8)],
                    color.stroke_width(2),
                ))
                .map_err(err)?;
            legend
                .draw(&Circle::new((19, y + 8), 4, color.filled()))
                .map_err(err)?;
        }
        legend
            .draw(&Text::new(label.clone(), (42, y), (FAMILY, 16)))
            .map_err(err)?;
    }
    let bands: Vec<usize> = chart
        .series
        .iter()
        .filter_map(|s| s.band.as_ref().map(Vec::len))
        .collect();
    if !bands.is_empty() {
        let y = top + 28 * entries.len() as i32 + 8;
        legend
            .draw(&Text::new(
                if bands.iter().all(|&n| n <= MAX_DATA_TICKS) {
                    "bars and shading: ± 1 std"
                } else {
                    "dashed lines and shading: ± 1 std"
                },
                (4, y),
                (FAMILY, 14),
            ))
            .map_err(err)?;
    }
    Ok(())
}

/// Compact tick label: plain numbers with at most three decimals, `10 k` / `1.5 M` for large ones, 1e-5-style
/// for tiny ones.
fn short(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e4 {
        let (f, p) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
            .into_iter()
            .find(|(f, _)| a >= *f)
            .unwrap_or((1e3, "k"));
        format!("{} {p}", short(v / f))
    } else if a < 1e-3 {
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
    write_png_svg(stem, SIZE, &|r| draw_heatmap(r, map), &|r| {
        draw_heatmap(r, map)
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_prefixes_bring_values_into_one_to_a_thousand() {
        assert_eq!(si_prefix(1.2e-3), (1e-3, "m"));
        assert_eq!(si_prefix(39.7e-6), (1e-6, "µ"));
        assert_eq!(si_prefix(999.0), (1.0, ""));
        assert_eq!(si_prefix(1000.0), (1e3, "k"));
        assert_eq!(si_format(39.719e-6, "J"), "39.7 µJ");
        assert_eq!(si_format(1.129e-3, "J"), "1.13 mJ");
        assert_eq!(si_format(5.017e-6, "s"), "5.02 µs");
    }

    #[test]
    fn axis_labels_in_joules_are_rescaled_and_others_are_not() {
        let chart = |label: &str| LineChart {
            y_label: label.into(),
            series: vec![Series {
                label: "a".into(),
                points: vec![(1.0, 2e-6), (2.0, 4e-5)],
                band: Some(vec![(1.0, 1e-6, 3e-6), (2.0, 3e-5, 5e-5)]),
            }],
            ..Default::default()
        };
        let c = si_scaled(&chart("energy per token (J)"));
        assert_eq!(c.y_label, "energy per token (µJ)");
        assert!((c.series[0].points[1].1 - 40.0).abs() < 1e-9);
        assert!((c.series[0].band.as_ref().unwrap()[0].2 - 3.0).abs() < 1e-9);
        let p = si_scaled(&chart("perplexity"));
        assert_eq!(p.y_label, "perplexity");
        assert_eq!(p.series[0].points[1].1, 4e-5);
    }

    #[test]
    fn few_x_values_are_each_ticked() {
        let chart = LineChart {
            log_x: true,
            series: vec![Series {
                label: "a".into(),
                points: vec![(1.0, 1.0), (8.0, 2.0), (64.0, 3.0)],
                band: None,
            }],
            ..Default::default()
        };
        let ticks = x_tick_list(&chart, None, 0.5, 100.0);
        assert_eq!(
            ticks,
            vec![(1.0, "1".into()), (8.0, "8".into()), (64.0, "64".into())]
        );
        assert_eq!(short(250_000.0), "250 k");
        assert_eq!(short(1.5e6), "1.5 M");
    }
}
