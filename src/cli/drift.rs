//! `aimc drift`: program a test matrix on a preset, drift it over time, write JSON and plots.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use crate::eval::time::parse_durations;
use crate::report::{write_line_chart, Legend, LineChart, Series};
use crate::tile::{drift_study, DriftStudy, DriftStudyConfig, TilePreset};

/// Arguments of `aimc drift`.
#[derive(Args, Debug)]
pub struct DriftArgs {
    /// Built-in preset name (`aimc presets`) or path to a preset JSON file.
    #[arg(long, default_value = "aihwkit-default")]
    pub preset: String,
    /// Inference times after programming (seconds, or with a unit: min, h, d, w, mo, y).
    #[arg(long, default_value = "0,60,1h,1d,1w,1mo,1y")]
    pub times: String,
    /// Output directory for drift.json and the plots.
    #[arg(long, default_value = "reports/drift")]
    pub out: PathBuf,
    /// Global seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Input vectors per MVM error measurement.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

/// Run the study and write `drift.json`, `drift_fan.{png,svg}`, `mvm_error.{png,svg}`.
pub fn run(args: DriftArgs) -> Result<()> {
    super::args::check_drift(&args)?;
    let preset = TilePreset::resolve(&args.preset)?;
    let mut config = DriftStudyConfig::for_preset(&preset, args.seed);
    config.times_s = parse_durations(&args.times).context("--times")?;
    config.batch = args.batch;
    let study = drift_study(&preset, &config)?;
    super::results::check_drift(&study)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let written = write_outputs(&study, &args.out)?;
    println!(
        "{:>12} {:>10} {:>10} {:>12} {:>12}",
        "t (s)", "g mean µS", "g std µS", "MVM err GDC", "MVM err raw"
    );
    for p in &study.points {
        println!(
            "{:>12} {:>10.4} {:>10.4} {:>12.4} {:>12.4}",
            p.t_seconds, p.g_mean_us, p.g_std_us, p.mvm_rel_err_gdc, p.mvm_rel_err_no_gdc
        );
    }
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes `drift.json`, `drift_fan.{png,svg}` and `mvm_error.{png,svg}` into `out`; returns the paths.
pub fn write_outputs(study: &DriftStudy, out: &Path) -> Result<Vec<PathBuf>> {
    let json = out.join("drift.json");
    std::fs::write(&json, serde_json::to_string_pretty(study)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let fan = write_line_chart(&fan_chart(study), &out.join("drift_fan"))?;
    let err = write_line_chart(&error_chart(study), &out.join("mvm_error"))?;
    Ok([json].into_iter().chain(fan).chain(err).collect())
}

/// Log-x axes cannot show t = 0: it is drawn at 1 s (stated in the axis label).
fn t_axis(t: f64) -> f64 {
    t.max(1.0)
}

fn fan_chart(study: &DriftStudy) -> LineChart {
    let times = &study.fan.times_s;
    LineChart {
        title: format!(
            "{} ({}): conductance drift, mean ± std",
            study.preset, study.device
        ),
        x_label: "time after programming t_inf (s; t = 0 drawn at 1 s)".into(),
        y_label: "conductance (µS)".into(),
        log_x: true,
        log_y: false,
        legend: Legend::UpperRight,
        series: study
            .fan
            .levels
            .iter()
            .map(|l| Series {
                label: format!("g_T = {:.2} µS", l.g_target_us),
                points: times
                    .iter()
                    .zip(&l.g_mean_us)
                    .map(|(&t, &g)| (t_axis(t), g))
                    .collect(),
                band: Some(
                    times
                        .iter()
                        .zip(l.g_mean_us.iter().zip(&l.g_std_us))
                        .map(|(&t, (&m, &s))| (t_axis(t), m - s, m + s))
                        .collect(),
                ),
            })
            .collect(),
    }
}

fn error_chart(study: &DriftStudy) -> LineChart {
    let series = |label: &str, f: fn(&crate::tile::DriftPoint) -> f64| Series {
        label: label.into(),
        points: study
            .points
            .iter()
            .map(|p| (t_axis(p.t_seconds), f(p)))
            .collect(),
        band: None,
    };
    LineChart {
        title: format!("{}: relative MVM error vs drift time", study.preset),
        x_label: "time after programming t_inf (s; t = 0 drawn at 1 s)".into(),
        y_label: "‖y − Wx‖ / ‖Wx‖".into(),
        log_x: true,
        log_y: false,
        legend: Legend::UpperLeft,
        series: vec![
            series("with drift compensation", |p| p.mvm_rel_err_gdc),
            series("without drift compensation", |p| p.mvm_rel_err_no_gdc),
        ],
    }
}
