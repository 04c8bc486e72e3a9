//! The analog part of `aimc eval`: map, program, drift, compare with the digital model; tables and plots.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::common::time_ticks;
use super::common::write_json;
use crate::eval::analog::{
    evaluate, evaluate_against, AnalogEvalConfig, AnalogEvalReport, TimeSummary,
};
use crate::eval::reference::ReferenceModel;
use crate::eval::task::TaskSequences;
use crate::eval::time::format_duration;
use crate::mapping::{DigitalSelection, Mapping, MappingOptions, Strategy};
use crate::model::Model;
use crate::report::{write_line_chart, write_line_chart_with_ticks, LineChart, Series};
use crate::tile::TilePreset;

/// One configuration of a comparison: a preset and a mapping.
#[derive(Clone, Debug, Serialize)]
pub struct RunSpec {
    pub label: String,
    pub preset: String,
    pub options: MappingOptions,
}

/// A configuration's results.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// The model's name as a person reads it (`kjv-moe (embedded)`).
    pub model: String,
    pub spec: RunSpec,
    pub report: AnalogEvalReport,
}

/// Maps `model` with `opts` on `preset` and runs the drift × seed sweep (scoring `task` at
/// every point when given), against `reference`'s digital outputs when given.
pub fn run_one(
    model: &Model,
    preset: &TilePreset,
    opts: &MappingOptions,
    tokens: &[u32],
    cfg: &AnalogEvalConfig,
    task: Option<&TaskSequences>,
    reference: Option<ReferenceModel<'_>>,
) -> Result<(Mapping, AnalogEvalReport)> {
    let mapping = super::map::map_loaded(model, preset, opts, None)?;
    let report = evaluate_against(model, &mapping, preset, tokens, cfg, task, reference)?;
    Ok((mapping, report))
}

/// Markdown table of a report: one row per drift time, mean ± std over seeds.
pub fn markdown_table(r: &AnalogEvalReport) -> String {
    let mut s = String::new();
    match &r.reference {
        None => {
            let _ = writeln!(
                s,
                "Digital perplexity: {:.3} ({} tokens, windows of {}).\n",
                r.digital_perplexity, r.tokens, r.seq_len
            );
            let _ = writeln!(
                s,
                "| drift time | perplexity | top-1 agreement | KL(digital‖analog) [nats] |"
            );
        }
        Some(reference) => {
            let _ = writeln!(
                s,
                "{} ({} tokens, windows of {}.)\n",
                reference.describe(),
                r.tokens,
                r.seq_len
            );
            let _ = writeln!(
                s,
                "| drift time | perplexity | top-1 agreement with the original | \
                 KL(original digital‖analog) [nats] |"
            );
        }
    }
    let _ = writeln!(s, "|---|---|---|---|");
    for t in &r.summary {
        let _ = writeln!(
            s,
            "| {} | {:.3} ± {:.3} | {:.4} ± {:.4} | {:.4} ± {:.4} |",
            format_duration(t.t_seconds),
            t.perplexity_mean,
            t.perplexity_std,
            t.agreement_mean,
            t.agreement_std,
            t.kl_mean,
            t.kl_std
        );
    }
    s
}

/// Plots perplexity (with ±std band and the digital line) and agreement against drift time for one or more runs.
pub fn plot_runs(runs: &[RunResult], out: &Path) -> Result<()> {
    // Time 0 cannot sit on a log axis: plot it at 1 s and say so in the label.
    let x = |t: f64| t.max(1.0);
    let model = runs
        .first()
        .map_or(String::new(), |r| format!("{}: ", r.model));
    let mut ppl = LineChart {
        title: format!("{model}perplexity vs drift time (mean ± std over seeds)"),
        x_label: "time after programming (log scale; 0 s drawn at 1 s)".into(),
        y_label: "perplexity".into(),
        log_x: true,
        ..Default::default()
    };
    let reference = runs.first().and_then(|r| r.report.reference.as_ref());
    let mut agree = LineChart {
        title: match reference {
            None => format!("{model}next-token top-1 agreement with the digital model"),
            Some(r) => format!(
                "{model}top-1 agreement with the original model's digital outputs ({})",
                r.model
            ),
        },
        x_label: ppl.x_label.clone(),
        y_label: "agreement".into(),
        log_x: true,
        ..Default::default()
    };
    for r in runs {
        let s = &r.report.summary;
        // One line with its ±std band, for the metric `f` returns as (mean, std).
        let series = |f: fn(&TimeSummary) -> (f64, f64)| Series {
            label: r.spec.label.clone(),
            points: s.iter().map(|p| (x(p.t_seconds), f(p).0)).collect(),
            band: Some(
                s.iter()
                    .map(|p| {
                        let (m, sd) = f(p);
                        (x(p.t_seconds), m - sd, m + sd)
                    })
                    .collect(),
            ),
        };
        ppl.series
            .push(series(|p| (p.perplexity_mean, p.perplexity_std)));
        agree
            .series
            .push(series(|p| (p.agreement_mean, p.agreement_std)));
    }
    if let Some(first) = runs.first() {
        let s = &first.report.summary;
        let d = first.report.digital_perplexity;
        let ends = |d: f64| vec![(x(s[0].t_seconds), d), (x(s[s.len() - 1].t_seconds), d)];
        match reference {
            None => ppl.series.push(Series {
                label: format!("digital ({} tokens)", thousands(first.report.tokens)),
                points: ends(d),
                band: None,
            }),
            Some(r) => {
                ppl.series.push(Series {
                    label: format!(
                        "original, digital ({} tokens)",
                        thousands(first.report.tokens)
                    ),
                    points: ends(d),
                    band: None,
                });
                ppl.series.push(Series {
                    label: "this model, digital".into(),
                    points: ends(r.model_digital_perplexity),
                    band: None,
                });
            }
        }
    }
    let times: Vec<f64> = runs
        .first()
        .map(|r| r.report.summary.iter().map(|p| p.t_seconds).collect())
        .unwrap_or_default();
    let ticks = time_ticks(&times);
    write_line_chart_with_ticks(&ppl, Some(&ticks), &out.join("perplexity_vs_time"))?;
    write_line_chart_with_ticks(&agree, Some(&ticks), &out.join("agreement_vs_time"))?;
    Ok(())
}

/// Result of the heterogeneous sweep at one digital fraction.
#[derive(Clone, Debug, Serialize)]
pub struct SweepPoint {
    pub digital_fraction: f64,
    pub norm_perplexity_mean: f64,
    pub norm_perplexity_std: f64,
    pub random_perplexity_mean: f64,
    pub random_perplexity_std: f64,
}

/// Perplexity at one drift time against the share of experts kept digital, for max-neuron-norm and random
/// selection of the same size; also returns the digital perplexity on the same tokens.
pub fn digital_sweep(
    model: &Model,
    preset: &TilePreset,
    base: &MappingOptions,
    fractions: &[f64],
    tokens: &[u32],
    cfg: &AnalogEvalConfig,
) -> Result<(Vec<SweepPoint>, f64)> {
    let mut points = Vec::new();
    let mut digital = f64::NAN;
    for &f in fractions {
        let mut stats = Vec::new();
        let mut evaluated: Vec<(Mapping, (f64, f64))> = Vec::new();
        for selection in [
            DigitalSelection::MaxNeuronNorm,
            DigitalSelection::Random { seed: 0x5EED },
        ] {
            let opts = MappingOptions {
                digital_fraction: f,
                digital_selection: selection,
                strategy: if base.strategy == Strategy::Affinity {
                    Strategy::ExpertPerTier
                } else {
                    base.strategy
                },
                ..base.clone()
            };
            let mapping = super::map::map_loaded(model, preset, &opts, None)?;
            // When both selections keep the same experts digital (none at all at fraction 0), the runs would be
            // bit-identical: evaluate once.
            if let Some((_, st)) = evaluated.iter().find(|(m, _)| m.digital == mapping.digital) {
                stats.push(*st);
                continue;
            }
            let r = evaluate(model, &mapping, preset, tokens, cfg)?;
            digital = r.digital_perplexity;
            let st = (r.summary[0].perplexity_mean, r.summary[0].perplexity_std);
            stats.push(st);
            evaluated.push((mapping, st));
        }
        points.push(SweepPoint {
            digital_fraction: f,
            norm_perplexity_mean: stats[0].0,
            norm_perplexity_std: stats[0].1,
            random_perplexity_mean: stats[1].0,
            random_perplexity_std: stats[1].1,
        });
    }
    Ok((points, digital))
}

/// `4096` → `4,096`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Plot and table of the heterogeneous sweep over `tokens` evaluation tokens (the digital baseline is on the same
/// tokens, so its line is comparable with the two selections).
pub fn write_sweep(
    points: &[SweepPoint],
    t_seconds: f64,
    digital_ppl: f64,
    tokens: usize,
    out: &Path,
) -> Result<String> {
    // One line with its ±std band, for the selection whose (mean, std) `f` returns.
    let line = |label: &str, f: fn(&SweepPoint) -> (f64, f64)| Series {
        label: label.into(),
        points: points
            .iter()
            .map(|p| (p.digital_fraction, f(p).0))
            .collect(),
        band: Some(
            points
                .iter()
                .map(|p| {
                    let (m, sd) = f(p);
                    (p.digital_fraction, m - sd, m + sd)
                })
                .collect(),
        ),
    };
    let chart = LineChart {
        title: format!(
            "Perplexity at {} vs share of experts kept digital ({} tokens)",
            format_duration(t_seconds),
            thousands(tokens)
        ),
        x_label: "digital fraction of routed experts".into(),
        y_label: "perplexity".into(),
        series: vec![
            line("max neuron norm", |p| {
                (p.norm_perplexity_mean, p.norm_perplexity_std)
            }),
            line("random", |p| {
                (p.random_perplexity_mean, p.random_perplexity_std)
            }),
            Series {
                label: format!("all digital (same {} tokens)", thousands(tokens)),
                points: vec![
                    (points[0].digital_fraction, digital_ppl),
                    (points[points.len() - 1].digital_fraction, digital_ppl),
                ],
                band: None,
            },
        ],
        ..Default::default()
    };
    write_line_chart(&chart, &out.join("digital_sweep"))?;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| digital fraction | perplexity, max-neuron-norm | perplexity, random |\n|---|---|---|"
    );
    for p in points {
        let _ = writeln!(
            s,
            "| {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} |",
            p.digital_fraction,
            p.norm_perplexity_mean,
            p.norm_perplexity_std,
            p.random_perplexity_mean,
            p.random_perplexity_std
        );
    }
    Ok(s)
}

/// Writes the JSON of the runs and, when there is one, the sweep.
pub fn write_outputs(runs: &[RunResult], sweep: Option<&[SweepPoint]>, out: &Path) -> Result<()> {
    #[derive(Serialize)]
    struct Out<'a> {
        schema_version: u32,
        runs: &'a [RunResult],
        digital_sweep: Option<&'a [SweepPoint]>,
    }
    write_json(
        &out.join("eval.json"),
        &Out {
            schema_version: super::common::OUTPUT_SCHEMA_VERSION,
            runs,
            digital_sweep: sweep,
        },
    )
}
