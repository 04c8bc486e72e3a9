//! The plot of multiple-choice task accuracy against drift time: `acc` and `acc_norm` of the
//! analog model (mean ± std over seeds) beside the digital model's flat lines.
use std::path::Path;

use anyhow::Result;

use super::{write_line_chart_with_ticks, LineChart, Series};
use crate::eval::task::{TaskReport, TaskTimeSummary};
use crate::eval::time::format_duration;

/// Writes `<stem>.png` and `<stem>.svg` for one or more labelled runs of the same task on `model`
/// (the digital lines drawn once, from the first run).
pub fn write_task_plot(model: &str, runs: &[(&str, &TaskReport)], stem: &Path) -> Result<()> {
    // Time 0 cannot sit on a log axis: plot it at 1 s and say so in the label.
    let x = |t: f64| t.max(1.0);
    let mut chart = LineChart {
        title: format!(
            "{model}: multiple-choice task accuracy vs drift time (mean ± std over seeds)"
        ),
        x_label: "time after programming (log scale; 0 s drawn at 1 s)".into(),
        y_label: "accuracy (fraction of items)".into(),
        log_x: true,
        ..Default::default()
    };
    for (label, r) in runs {
        let line = |name: &str, f: fn(&TaskTimeSummary) -> (f64, f64)| Series {
            label: format!("{name}, {label}"),
            points: r.summary.iter().map(|p| (x(p.t_seconds), f(p).0)).collect(),
            band: Some(
                r.summary
                    .iter()
                    .map(|p| {
                        let (m, sd) = f(p);
                        (x(p.t_seconds), m - sd, m + sd)
                    })
                    .collect(),
            ),
        };
        chart.series.push(line("acc", |p| (p.acc_mean, p.acc_std)));
        chart
            .series
            .push(line("acc_norm", |p| (p.acc_norm_mean, p.acc_norm_std)));
    }
    if let Some((_, r)) = runs.first() {
        if let (Some(a), Some(b)) = (r.summary.first(), r.summary.last()) {
            let flat = |name: &str, y: f64| Series {
                label: format!("{name}, digital"),
                points: vec![(x(a.t_seconds), y), (x(b.t_seconds), y)],
                band: None,
            };
            chart.series.push(flat("acc", r.digital.acc));
            chart.series.push(flat("acc_norm", r.digital.acc_norm));
        }
    }
    // The drift times, named as a person reads them (`1 h`, `1 y`), as on the perplexity plot.
    let ticks: Vec<(f64, String)> = runs
        .first()
        .map(|(_, r)| {
            r.summary
                .iter()
                .map(|p| (x(p.t_seconds), format_duration(p.t_seconds)))
                .collect()
        })
        .unwrap_or_default();
    write_line_chart_with_ticks(&chart, Some(&ticks), stem)?;
    Ok(())
}
