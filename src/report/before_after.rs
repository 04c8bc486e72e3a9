//! Before/after plots of a fine-tuned model (`aimc report --reference`): the original model's
//! analog curves and the fine-tuned model's, both measured against the original's digital
//! outputs, one plot per metric (KL, top-1 agreement, perplexity, task accuracy), mean ± std over
//! seeds, with the two digital baselines as flat lines where they apply.
use std::path::Path;

use anyhow::{ensure, Result};

use super::{write_line_chart_with_ticks, LineChart, Series};
use crate::eval::analog::{AnalogEvalReport, TimeSummary};
use crate::eval::task::TaskTimeSummary;
use crate::eval::time::format_duration;

/// Label of the original model's curves.
pub const ORIGINAL: &str = "original";
/// Label of the fine-tuned model's curves.
pub const FINE_TUNED: &str = "fine-tuned";

/// Time 0 cannot sit on a log axis: it is drawn at 1 s (the axis label says so).
fn x(t: f64) -> f64 {
    t.max(1.0)
}

/// A curve with its ±std band from `(t, mean, std)` points.
fn curve(label: &str, points: impl Iterator<Item = (f64, f64, f64)>) -> Series {
    let pts: Vec<(f64, f64, f64)> = points.collect();
    Series {
        label: label.to_string(),
        points: pts.iter().map(|&(t, m, _)| (x(t), m)).collect(),
        band: Some(pts.iter().map(|&(t, m, s)| (x(t), m - s, m + s)).collect()),
    }
}

/// A flat line at `y` across the drift times `times`.
fn flat(label: String, y: f64, times: &[f64]) -> Series {
    let (a, b) = (times[0], times[times.len() - 1]);
    Series {
        label,
        points: vec![(x(a), y), (x(b), y)],
        band: None,
    }
}

/// Writes `kl_vs_time`, `agreement_vs_time`, `perplexity_vs_time` and, when both reports scored
/// a task, `task_vs_time` (PNG and SVG) under `out`, for `model` (the fine-tuned model's name).
/// `original` is the original model's own sweep; `tuned` the fine-tuned model's sweep against
/// the original's digital outputs (it carries `reference`). Returns the stems written.
pub fn write_before_after(
    model: &str,
    original: &AnalogEvalReport,
    tuned: &AnalogEvalReport,
    out: &Path,
) -> Result<Vec<&'static str>> {
    let reference = tuned.reference.as_ref();
    ensure!(
        reference.is_some(),
        "before/after plots need the fine-tuned sweep measured against the original"
    );
    let times: Vec<f64> = tuned.summary.iter().map(|p| p.t_seconds).collect();
    ensure!(
        !times.is_empty()
            && times
                == original
                    .summary
                    .iter()
                    .map(|p| p.t_seconds)
                    .collect::<Vec<_>>(),
        "before/after plots need the same drift times for both models"
    );
    let ticks: Vec<(f64, String)> = times.iter().map(|&t| (x(t), format_duration(t))).collect();
    let x_label = "time after programming (log scale; 0 s drawn at 1 s)".to_string();
    let chart = |title: &str, y_label: &str, f: fn(&TimeSummary) -> (f64, f64)| LineChart {
        title: format!("{model}: {title} (mean ± std over seeds)"),
        x_label: x_label.clone(),
        y_label: y_label.into(),
        log_x: true,
        series: [(ORIGINAL, original), (FINE_TUNED, tuned)]
            .into_iter()
            .map(|(label, r)| {
                curve(
                    label,
                    r.summary.iter().map(|p| {
                        let (m, s) = f(p);
                        (p.t_seconds, m, s)
                    }),
                )
            })
            .collect(),
        ..Default::default()
    };
    let mut written = Vec::new();
    let kl = chart(
        "KL(original digital ‖ analog) vs drift time",
        "KL divergence [nats]",
        |p| (p.kl_mean, p.kl_std),
    );
    write_line_chart_with_ticks(&kl, Some(&ticks), &out.join("kl_vs_time"))?;
    written.push("kl_vs_time");
    let agree = chart(
        "top-1 agreement with the original's digital outputs",
        "agreement",
        |p| (p.agreement_mean, p.agreement_std),
    );
    write_line_chart_with_ticks(&agree, Some(&ticks), &out.join("agreement_vs_time"))?;
    written.push("agreement_vs_time");
    let mut ppl = chart("perplexity vs drift time", "perplexity", |p| {
        (p.perplexity_mean, p.perplexity_std)
    });
    if let Some(r) = reference {
        ppl.series.push(flat(
            format!("{ORIGINAL}, digital"),
            r.reference_digital_perplexity,
            &times,
        ));
        ppl.series.push(flat(
            format!("{FINE_TUNED}, digital"),
            r.model_digital_perplexity,
            &times,
        ));
    }
    write_line_chart_with_ticks(&ppl, Some(&ticks), &out.join("perplexity_vs_time"))?;
    written.push("perplexity_vs_time");

    if let (Some(a), Some(b)) = (&original.task, &tuned.task) {
        let series = |label: &str, s: &[TaskTimeSummary]| {
            curve(
                label,
                s.iter().map(|p| (p.t_seconds, p.acc_mean, p.acc_std)),
            )
        };
        let chart = LineChart {
            title: format!(
                "{model}: task accuracy ({}, acc) vs drift time (mean ± std over seeds)",
                b.task
            ),
            x_label: x_label.clone(),
            y_label: "accuracy (fraction of items)".into(),
            log_x: true,
            series: vec![
                series(ORIGINAL, &a.summary),
                series(FINE_TUNED, &b.summary),
                flat(format!("{ORIGINAL}, digital"), a.digital.acc, &times),
                flat(format!("{FINE_TUNED}, digital"), b.digital.acc, &times),
            ],
            ..Default::default()
        };
        write_line_chart_with_ticks(&chart, Some(&ticks), &out.join("task_vs_time"))?;
        written.push("task_vs_time");
    }
    Ok(written)
}
