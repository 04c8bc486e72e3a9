//! The figures of `aimc energy`: energy per token split into readable components, throughput and energy per token
//! against decode batch (every batch ticked, the bottleneck marked where it changes), and the scaling study.
//!
//! Every title names the costed system (the paper's all-analog linear layers, or the digital-projections variant);
//! axes carry SI units; legends sit in their own column right of the data.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::breakdown::Component;
use super::scaling::{ScalingConfig, ScalingPoint};
use super::{EnergyOptions, EnergyReport, PhaseCost};
use crate::report::bars::category_tick;
use crate::report::write_png_svg;

const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1200, 680);
/// Width of the data area; the rest of the figure is the legend column.
const PLOT_W: u32 = 860;
/// Components below this share of every bar are grouped into one "other" segment.
const TINY_SHARE: f64 = 0.03;

/// `v` with an SI prefix and `unit` (`12.3 µJ`, `4.5 k tokens/s`).
pub fn si(v: f64, unit: &str) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v} {unit}");
    }
    let prefixes = [
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
        (1.0, ""),
        (1e-3, "m"),
        (1e-6, "µ"),
        (1e-9, "n"),
        (1e-12, "p"),
    ];
    let a = v.abs();
    let (scale, p) = prefixes
        .iter()
        .find(|(s, _)| a >= *s * 0.9999)
        .copied()
        .unwrap_or((1e-15, "f"));
    let x = v / scale;
    let digits = if x.abs() >= 100.0 {
        0
    } else if x.abs() >= 10.0 {
        1
    } else {
        2
    };
    format!("{x:.digits$} {p}{unit}")
}

/// Labels only the 1-2-5 ticks of a log axis, so labels never crowd.
fn log_tick(v: f64, unit: &str) -> String {
    if !(v.is_finite() && v > 0.0) {
        return String::new();
    }
    let m = v / 10f64.powf(v.log10().floor());
    // Ticks a hair under a decade (m ≈ 10 from rounding) would repeat that decade's label.
    if [1.0, 2.0, 5.0].iter().any(|k| (m - k).abs() < 1e-6 * k) {
        si(v, unit)
    } else {
        String::new()
    }
}

/// Splits a legend label into lines of about `width` characters at spaces.
fn wrap(label: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in label.split(' ') {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.chars().count() + word.chars().count() + 1 > width {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

/// A chart of lines over categorical x positions (one tick per category) on a log y axis.
struct Lines {
    title: String,
    x_label: String,
    /// Tick label of each x position.
    ticks: Vec<String>,
    y_label: String,
    /// Unit of y for tick labels (SI-prefixed).
    y_unit: String,
    /// (legend label, y per x position; None = no point).
    series: Vec<(String, Vec<Option<f64>>)>,
    /// Markers with text: (series index, x position, text; empty = marker only).
    notes: Vec<(usize, usize, String)>,
    /// Legend entry of the markers.
    note_label: String,
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Lines) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let ys: Vec<f64> = c
        .series
        .iter()
        .flat_map(|s| s.1.iter().flatten().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    anyhow::ensure!(!ys.is_empty(), "nothing to plot in `{}`", c.title);
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min) / 3.0;
    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max) * 3.0;
    let body = root.titled(&c.title, (FAMILY, 17)).map_err(err)?;
    let (plot, legend) = body.split_horizontally(PLOT_W);
    let n = c.ticks.len();
    let mut ctx = ChartBuilder::on(&plot)
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(135)
        .build_cartesian_2d(-0.4f64..(n as f64 - 0.6), (lo..hi).log_scale())
        .map_err(err)?;
    let unit = c.y_unit.clone();
    ctx.configure_mesh()
        .x_labels(n.max(1))
        .y_labels(12)
        .x_label_formatter(&|x| category_tick(&c.ticks, *x))
        .y_label_formatter(&|v| log_tick(*v, &unit))
        .x_desc(&c.x_label)
        .y_desc(&c.y_label)
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(err)?;
    let mut entries = Vec::new();
    for (k, (label, ys)) in c.series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64)> = ys
            .iter()
            .enumerate()
            .filter_map(|(i, y)| y.filter(|v| *v > 0.0).map(|v| (i as f64, v)))
            .collect();
        ctx.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(err)?;
        ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
        entries.push((label.clone(), color));
    }
    for (k, i, text) in &c.notes {
        if let Some(Some(y)) = c.series.get(*k).map(|s| s.1[*i]) {
            ctx.draw_series(std::iter::once(TriangleMarker::new(
                (*i as f64, y),
                9,
                BLACK.filled(),
            )))
            .map_err(err)?;
            if !text.is_empty() {
                ctx.draw_series(std::iter::once(Text::new(
                    text.clone(),
                    (*i as f64 + 0.04, y * 1.25),
                    (FAMILY, 14),
                )))
                .map_err(err)?;
            }
        }
    }
    let mut y = 40;
    for (label, color) in &entries {
        legend
            .draw(&Rectangle::new([(10, y + 4), (30, y + 10)], color.filled()))
            .map_err(err)?;
        for line in wrap(label, 34) {
            legend
                .draw(&Text::new(line, (38, y), (FAMILY, 15)))
                .map_err(err)?;
            y += 20;
        }
        y += 6;
    }
    if !c.notes.is_empty() {
        legend
            .draw(&TriangleMarker::new((20, y + 8), 7, BLACK.filled()))
            .map_err(err)?;
        for line in wrap(&c.note_label, 34) {
            legend
                .draw(&Text::new(line, (38, y), (FAMILY, 15)))
                .map_err(err)?;
            y += 20;
        }
    }
    Ok(())
}

fn write_lines(c: &Lines, stem: &Path) -> Result<()> {
    write_png_svg(stem, SIZE, &|r| draw_lines(r, c), &|r| draw_lines(r, c))?;
    Ok(())
}

/// Stacked shares of energy per token (each bar sums to 100%), total written above each bar.
struct Shares {
    title: String,
    bars: Vec<String>,
    totals: Vec<f64>,
    /// (label, joules per bar).
    segments: Vec<(String, Vec<f64>)>,
}

fn draw_shares<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Shares) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(err)?;
    let n = c.bars.len();
    let body = root.titled(&c.title, (FAMILY, 17)).map_err(err)?;
    let (plot, legend) = body.split_horizontally(PLOT_W);
    let mut ctx = ChartBuilder::on(&plot)
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0f64..112.0)
        .map_err(err)?;
    ctx.configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(1))
        .x_label_formatter(&|x| category_tick(&c.bars, *x))
        .y_label_formatter(&|v| {
            if *v <= 100.0 {
                format!("{v:.0} %")
            } else {
                String::new()
            }
        })
        .y_desc("share of energy per token (%)")
        .x_desc("phase")
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(err)?;
    let mut base = vec![0.0f64; n];
    let mut entries = Vec::new();
    for (k, (label, vals)) in c.segments.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let rects: Vec<_> = (0..n)
            .map(|i| {
                let share = if c.totals[i] > 0.0 {
                    100.0 * vals[i] / c.totals[i]
                } else {
                    0.0
                };
                let lo = base[i];
                base[i] += share;
                Rectangle::new(
                    [(i as f64 - 0.35, lo), (i as f64 + 0.35, base[i])],
                    color.filled(),
                )
            })
            .collect();
        ctx.draw_series(rects).map_err(err)?;
        entries.push((label.clone(), color));
    }
    for (i, t) in c.totals.iter().enumerate() {
        ctx.draw_series(std::iter::once(Text::new(
            format!("{} per token", si(*t, "J")),
            (i as f64 - 0.3, 108.0),
            (FAMILY, 15),
        )))
        .map_err(err)?;
    }
    let mut y = 40;
    for (label, color) in entries.iter().rev() {
        legend
            .draw(&Rectangle::new([(10, y), (28, y + 16)], color.filled()))
            .map_err(err)?;
        for line in wrap(label, 34) {
            legend
                .draw(&Text::new(line, (36, y), (FAMILY, 15)))
                .map_err(err)?;
            y += 20;
        }
        y += 6;
    }
    Ok(())
}

/// Short name of a bottleneck resource for plot markers.
fn short(p: &PhaseCost) -> String {
    match p.bottleneck.resource.as_str() {
        "busiest_stack" => "tier MVMs",
        "digital_units" => "digital units",
        "attention_units" => "attention units",
        "on_chip_memory" => "on-chip SRAM",
        "off_chip_memory" => "off-chip memory",
        "interconnect" => "interconnect",
        _ => "dependency chain",
    }
    .to_string()
}

/// Series index of each resource in the busy-time figure: the resources of [`super::ResourceBusy::entries`]
/// busy at some batch (a resource idle at every batch cannot bind and has no point on a log axis).
fn busy_series(r: &EnergyReport) -> Vec<(&'static str, String, Vec<Option<f64>>)> {
    let Some(first) = r.decode.first() else {
        return Vec::new();
    };
    first
        .busy_per_step
        .entries()
        .iter()
        .enumerate()
        .filter_map(|(k, (key, name, _))| {
            let ys: Vec<Option<f64>> = r
                .decode
                .iter()
                .map(|p| Some(p.busy_per_step.entries()[k].2).filter(|v| *v > 0.0))
                .collect();
            ys.iter()
                .any(Option::is_some)
                .then(|| (*key, name.to_string(), ys))
        })
        .collect()
}

/// The busy-time figure: every resource's busy time per decode step against batch, the step time beside them,
/// and a marker on the resource that binds at each batch (named where it changes).
fn busy_lines(r: &EnergyReport) -> Lines {
    let resources = busy_series(r);
    let mut notes = Vec::new();
    for (i, p) in r.decode.iter().enumerate() {
        if let Some(k) = resources
            .iter()
            .position(|(key, _, _)| *key == p.bottleneck.resource)
        {
            let changed = i == 0 || r.decode[i - 1].bottleneck.resource != p.bottleneck.resource;
            notes.push((k, i, if changed { short(p) } else { String::new() }));
        }
    }
    let mut series: Vec<(String, Vec<Option<f64>>)> = resources
        .into_iter()
        .map(|(_, name, ys)| (name, ys))
        .collect();
    series.push((
        "step time".into(),
        r.decode.iter().map(|p| Some(p.step_time_s)).collect(),
    ));
    Lines {
        title: format!(
            "Busy time per decode step by resource: {} on {} ({})",
            r.model.name, r.preset, r.system
        ),
        x_label: "decode batch size (sequences)".into(),
        ticks: r.options.batches.iter().map(|b| b.to_string()).collect(),
        y_label: "busy time per step (s)".into(),
        y_unit: "s".into(),
        series,
        notes,
        note_label: "binding resource (named where it changes)".into(),
    }
}

/// Writes `breakdown`, `throughput_vs_batch`, `energy_vs_batch` and `busy_vs_batch` (PNG and SVG) into `out`.
pub fn write_all(r: &EnergyReport, out: &Path) -> Result<()> {
    let system = &r.system;
    let phases: Vec<&PhaseCost> = r.decode.iter().chain(std::iter::once(&r.prefill)).collect();
    let totals: Vec<f64> = phases.iter().map(|p| p.energy.total()).collect();
    // Components under TINY_SHARE of every bar go into one "other" segment that lists them.
    let mut segments = Vec::new();
    let mut other = vec![0.0; phases.len()];
    let mut other_names = Vec::new();
    for c in Component::ALL {
        let vals: Vec<f64> = phases.iter().map(|p| p.energy.component(c)).collect();
        let big = vals
            .iter()
            .zip(&totals)
            .any(|(v, t)| *t > 0.0 && v / t >= TINY_SHARE);
        if big {
            segments.push((c.label().to_string(), vals));
        } else if vals.iter().any(|v| *v > 0.0) {
            other.iter_mut().zip(&vals).for_each(|(o, v)| *o += v);
            other_names.push(c.label());
        }
    }
    if !other_names.is_empty() {
        segments.push((format!("other (< 3 %): {}", other_names.join(", ")), other));
    }
    let shares = Shares {
        title: format!(
            "Energy per token by component: {} on {} ({system})",
            r.model.name, r.preset
        ),
        bars: phases.iter().map(|p| p.scenario.label()).collect(),
        totals,
        segments,
    };
    write_png_svg(
        &out.join("breakdown"),
        SIZE,
        &|root| draw_shares(root, &shares),
        &|root| draw_shares(root, &shares),
    )?;
    let ticks: Vec<String> = r.options.batches.iter().map(|b| b.to_string()).collect();
    let mut notes = Vec::new();
    for (i, p) in r.decode.iter().enumerate() {
        if i == 0 || r.decode[i - 1].bottleneck.resource != p.bottleneck.resource {
            notes.push((0, i, short(p)));
        }
    }
    write_lines(
        &Lines {
            title: format!(
                "Decode throughput vs batch: {} on {} vs {} ({system})",
                r.model.name, r.preset, r.gpu
            ),
            x_label: "decode batch size (sequences)".into(),
            ticks: ticks.clone(),
            y_label: "throughput (tokens/s)".into(),
            y_unit: "tokens/s".into(),
            series: vec![
                (
                    format!("{} (3D AIMC)", r.preset),
                    r.decode.iter().map(|p| Some(p.tokens_per_s)).collect(),
                ),
                (
                    format!("{} (roofline)", r.gpu),
                    r.gpu_decode.iter().map(|g| Some(g.tokens_per_s)).collect(),
                ),
            ],
            notes: notes.clone(),
            note_label: "bottleneck (where it changes)".into(),
        },
        &out.join("throughput_vs_batch"),
    )?;
    write_lines(
        &Lines {
            title: format!(
                "Decode energy per token vs batch: {} on {} vs {} ({system})",
                r.model.name, r.preset, r.gpu
            ),
            x_label: "decode batch size (sequences)".into(),
            ticks,
            y_label: "energy per token (J)".into(),
            y_unit: "J".into(),
            series: vec![
                (
                    format!("{} total", r.preset),
                    r.decode.iter().map(|p| Some(p.energy.total())).collect(),
                ),
                (
                    format!("{} analog tiers only", r.preset),
                    r.decode.iter().map(|p| Some(p.energy.analog())).collect(),
                ),
                (
                    format!("{} static only", r.preset),
                    r.decode
                        .iter()
                        .map(|p| Some(p.static_energy.total()))
                        .collect(),
                ),
                (
                    format!("{} (board power × time)", r.gpu),
                    r.gpu_decode
                        .iter()
                        .map(|g| Some(g.energy_per_token_j))
                        .collect(),
                ),
            ],
            notes,
            note_label: "bottleneck (where it changes)".into(),
        },
        &out.join("energy_vs_batch"),
    )?;
    write_lines(&busy_lines(r), &out.join("busy_vs_batch"))?;
    Ok(())
}

/// Writes `scaling_throughput` and `scaling_energy` (PNG and SVG) into `out`.
pub fn write_scaling(
    points: &[ScalingPoint],
    preset: &str,
    gpu: &str,
    config: &ScalingConfig,
    opts: &EnergyOptions,
    out: &Path,
) -> Result<()> {
    let sizes: Vec<usize> = {
        let mut v: Vec<usize> = points.iter().map(|p| p.experts).collect();
        v.dedup();
        v
    };
    let ticks: Vec<String> = sizes
        .iter()
        .map(|e| {
            let p = points
                .iter()
                .find(|p| p.experts == *e)
                .map_or(0.0, |p| p.total_params as f64);
            format!("{e}×: {}", si(p, "").trim_end())
        })
        .collect();
    let col = |family: &str, f: &dyn Fn(&ScalingPoint) -> f64| -> Vec<Option<f64>> {
        sizes
            .iter()
            .map(|e| {
                points
                    .iter()
                    .find(|p| p.experts == *e && p.family == family)
                    .map(f)
            })
            .collect()
    };
    let system = opts.projections.label();
    let x_label = format!(
        "experts (MoE) or MLP width multiple (dense): total parameters; chip fixed at {} stacks",
        config.stacks
    );
    write_lines(
        &Lines {
            title: format!(
                "Decode throughput at the best batch vs model size: {preset} vs {gpu} ({system})"
            ),
            x_label: x_label.clone(),
            ticks: ticks.clone(),
            y_label: "throughput (tokens/s)".into(),
            y_unit: "tokens/s".into(),
            series: vec![
                (
                    format!("dense on {preset}"),
                    col("dense", &|p| p.tokens_per_s),
                ),
                (format!("MoE on {preset}"), col("moe", &|p| p.tokens_per_s)),
                (
                    format!("dense on {gpu}"),
                    col("dense", &|p| p.gpu_tokens_per_s),
                ),
                (format!("MoE on {gpu}"), col("moe", &|p| p.gpu_tokens_per_s)),
            ],
            notes: Vec::new(),
            note_label: String::new(),
        },
        &out.join("scaling_throughput"),
    )?;
    write_lines(
        &Lines {
            title: format!(
                "Energy per token at the best batch vs model size: {preset} vs {gpu} ({system})"
            ),
            x_label,
            ticks,
            y_label: "energy per token (J)".into(),
            y_unit: "J".into(),
            series: vec![
                (
                    format!("dense on {preset}"),
                    col("dense", &|p| p.energy_per_token_j),
                ),
                (
                    format!("MoE on {preset}"),
                    col("moe", &|p| p.energy_per_token_j),
                ),
                (
                    format!("dense on {gpu}"),
                    col("dense", &|p| p.gpu_energy_per_token_j),
                ),
                (
                    format!("MoE on {gpu}"),
                    col("moe", &|p| p.gpu_energy_per_token_j),
                ),
            ],
            notes: Vec::new(),
            note_label: String::new(),
        },
        &out.join("scaling_energy"),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::energy::{estimate, map_shape, paper_mapping, EnergyOptions, GpuPreset, ModelShape};
    use crate::mapping::MappingOptions;
    use crate::tile::TilePreset;

    #[test]
    fn busy_figure_marks_the_binding_resource_of_every_batch_and_names_it_where_it_changes() {
        let preset = TilePreset::builtin("aimc-3d").unwrap();
        let gpu = GpuPreset::resolve("h100").unwrap();
        let shape = ModelShape::synthetic("moe", 512, 2, 8, 2, 512);
        let trace = shape.synthetic_trace(128, 3);
        let opts = EnergyOptions {
            batches: vec![1, 2, 64, 256],
            context: 4096,
            decode_steps: 2,
            ..Default::default()
        };
        let m = paper_mapping(MappingOptions::default(), opts.projections);
        let mapping = map_shape(&preset, &shape, &m, &|_| None, &trace).unwrap();
        let r = estimate(&preset, &gpu, &shape, &mapping, &trace, &opts).unwrap();
        let c = busy_lines(&r);
        let resources = busy_series(&r);
        // One series per resource busy at some batch, then the step time; every point of a series is positive.
        assert_eq!(c.series.len(), resources.len() + 1);
        assert_eq!(c.series.last().unwrap().0, "step time");
        for (_, ys) in &c.series {
            assert!(ys.iter().flatten().all(|v| *v > 0.0));
            assert_eq!(ys.len(), opts.batches.len());
        }
        // One marker per batch, on the series of the phase's bottleneck; named at the first batch and where the
        // bottleneck changes, blank elsewhere.
        assert_eq!(c.notes.len(), r.decode.len());
        for (k, i, text) in &c.notes {
            assert_eq!(resources[*k].0, r.decode[*i].bottleneck.resource);
            let changed =
                *i == 0 || r.decode[*i - 1].bottleneck.resource != r.decode[*i].bottleneck.resource;
            assert_eq!(!text.is_empty(), changed);
        }
        // At a long context the bottleneck moves from one token's chain to a shared resource as the batch grows.
        assert_eq!(r.decode[0].bottleneck.resource, "dependency_chain");
        assert_ne!(r.decode[3].bottleneck.resource, "dependency_chain");
    }
}
