//! Stacked bar charts (e.g. energy per token split by component), rendered to PNG + SVG.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, ensure, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::plot::{series_colour, si_format, si_prefix, write_png_svg};

/// Font family registered by [`register_font`].
const FAMILY: &str = "sans-serif";

/// One segment kind of every bar (a legend entry).
#[derive(Clone, Debug, Default)]
pub struct Segment {
    pub label: String,
    /// Height of this segment in each bar (same order as [`StackedBars::bars`]); ≥ 0.
    pub values: Vec<f64>,
}

/// Bars stacked from the segments, bottom to top in segment order.
#[derive(Clone, Debug, Default)]
pub struct StackedBars {
    pub title: String,
    /// Y axis label (with unit).
    pub y_label: String,
    /// Label under each bar.
    pub bars: Vec<String>,
    pub segments: Vec<Segment>,
}

/// Writes `chart` to `<stem>.png` and `<stem>.svg`; segments that are zero in every bar are left out of the legend.
pub fn write_stacked_bars(chart: &StackedBars, stem: &Path) -> Result<[PathBuf; 2]> {
    for s in &chart.segments {
        ensure!(
            s.values.len() == chart.bars.len(),
            "segment `{}` has {} values for {} bars",
            s.label,
            s.values.len(),
            chart.bars.len()
        );
    }
    write_png_svg(stem, (1100, 680), &|r| draw(r, chart), &|r| draw(r, chart))
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &StackedBars) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let n = chart.bars.len();
    let top = (0..n)
        .map(|i| {
            chart
                .segments
                .iter()
                .map(|s| s.values[i].max(0.0))
                .sum::<f64>()
        })
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.08 } else { 1.0 };
    // Ticks in an SI prefix of the label's unit (µJ, not 1.2e-3 J), chosen from the tallest bar.
    let si = chart
        .y_label
        .strip_suffix(')')
        .and_then(|l| l.rsplit_once('('))
        .filter(|(_, u)| ["J", "s", "W"].contains(u));
    let unit = match si {
        Some(_) => si_prefix(top / 1.08),
        None => (1.0, ""),
    };
    let y_label = match si {
        Some((head, u)) => format!("{head}({}{u})", unit.1),
        None => chart.y_label.clone(),
    };
    let (plot, legend_area) = root.split_horizontally(800);
    let mut ctx = ChartBuilder::on(&plot)
        .caption(&chart.title, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0..top)
        .map_err(err)?;
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(1))
        .x_label_formatter(&|x| category_tick(&chart.bars, *x))
        .y_label_formatter(&|v| tick(*v / unit.0))
        .y_desc(&y_label)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .draw()
        .map_err(err)?;
    let mut base = vec![0.0f64; n];
    let mut legend: Vec<(String, RGBAColor)> = Vec::new();
    for (k, s) in chart.segments.iter().enumerate() {
        let color = series_colour(k);
        let rects: Vec<_> = (0..n)
            .map(|i| {
                let lo = base[i];
                let hi = lo + s.values[i].max(0.0);
                base[i] = hi;
                Rectangle::new(
                    [(i as f64 - 0.35, lo), (i as f64 + 0.35, hi)],
                    color.filled(),
                )
            })
            .collect();
        ctx.draw_series(rects).map_err(err)?;
        if s.values.iter().any(|v| *v > 0.0) {
            legend.push((s.label.clone(), color));
        }
    }
    // Each bar's total above it, so small bars stay readable.
    for (i, total) in base.iter().enumerate() {
        let text = match si {
            Some((_, u)) => si_format(*total, u),
            None => tick(*total),
        };
        ctx.draw_series(std::iter::once(Text::new(
            text,
            (i as f64, *total),
            TextStyle::from((FAMILY, 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom)),
        )))
        .map_err(err)?;
    }
    // Legend in its own column, top to bottom in stacking order reversed (matches the bars' top-down reading).
    for (row, (label, color)) in legend.iter().rev().enumerate() {
        let y = 40 + 26 * row as i32;
        legend_area
            .draw(&Rectangle::new([(10, y), (28, y + 16)], color.filled()))
            .map_err(err)?;
        legend_area
            .draw(&Text::new(label.clone(), (36, y), (FAMILY, 16)))
            .map_err(err)?;
    }
    Ok(())
}

/// Label of a category axis at `x`: the name of the category at that whole position, blank between.
pub fn category_tick(names: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 {
        names.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

/// Tick label with at most three decimals.
fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    format!("{v:.3}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
}
