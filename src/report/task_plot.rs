//! The plot of multiple-choice task accuracy against drift time: `acc` and `acc_norm` of the
//! analog model (mean ± std over seeds) beside the digital model's flat lines.
use std::path::Path;

use anyhow::Result;

use super::{write_line_chart, LineChart, Series};
use crate::eval::task::{TaskReport, TaskTimeSummary};

/// Writes `<stem>.png` and `<stem>.svg` for one or more labelled runs of the same task (the
/// digital lines drawn once, from the first run).
pub fn write_task_plot(runs: &[(&str, &TaskReport)], stem: &Path) -> Result<()> {
    // Time 0 cannot sit on a log axis: plot it at 1 s and say so in the label.
    let x = |t: f64| t.max(1.0);
    let mut chart = LineChart {
        title: "Multiple-choice task accuracy vs drift time (mean ± std over seeds)".into(),
        x_label: "time after programming [s] (0 s drawn at 1 s)".into(),
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
    write_line_chart(&chart, stem)?;
    Ok(())
}
