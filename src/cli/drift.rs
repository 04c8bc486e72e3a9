//! `aimc drift`: program a test matrix on a preset, drift it over time, write JSON and plots.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::common::time_ticks;
use crate::eval::time::parse_durations;
use crate::report::{write_line_chart_with_ticks, Legend, LineChart, Series};
use crate::tile::{drift_study, DriftStudy, DriftStudyConfig, TilePreset};

/// Arguments of `aimc drift`.
#[derive(Args, Debug)]
pub struct DriftArgs {
    /// Tile preset: a built-in name (`aimc presets`) or a JSON file.
    #[arg(long, default_value = super::common::DEFAULT_PRESET)]
    pub preset: String,
    /// Inference times after programming (seconds, or with a unit: min, h, d, w, mo, y).
    #[arg(long, default_value = "0,60,1h,1d,1w,1mo,1y")]
    pub times: String,
    /// Output folder for drift.json and the plots (created if missing).
    #[arg(long, default_value = "aimc-out/drift")]
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
    eprintln!(
        "drift: programming a {}×{} test matrix on `{}` and drifting it to {} times",
        config.n_out,
        config.n_in,
        preset.name,
        config.times_s.len()
    );
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
    super::common::write_versioned_json(&json, study)?;
    let times: Vec<f64> = study.points.iter().map(|p| p.t_seconds).collect();
    let ticks = time_ticks(&times);
    let fan = write_line_chart_with_ticks(&fan_chart(study), Some(&ticks), &out.join("drift_fan"))?;
    let err =
        write_line_chart_with_ticks(&error_chart(study), Some(&ticks), &out.join("mvm_error"))?;
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
        x_label: "time after programming (log scale; 0 s drawn at 1 s)".into(),
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
        title: format!(
            "{}: MVM error of a {}×{} matrix vs drift time",
            study.preset, study.config.n_out, study.config.n_in
        ),
        x_label: "time after programming (log scale; 0 s drawn at 1 s)".into(),
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
