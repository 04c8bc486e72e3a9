//! The drift study behind `aimc drift`: program a test matrix, drift it, measure.
use anyhow::Result;
use ndarray::{Array2, ArrayView2};
use serde::{Deserialize, Serialize};

use super::{Crossbar, DriftCompensation, TilePreset};
use crate::device::Device;
use crate::rng::{Purpose, Stream};

/// Default drift times (docs/model.md §7): 0 s, 1 min, 1 h, 1 day, 1 week, 1 month (30 d), 1 year.
pub const DEFAULT_TIMES_S: [f64; 7] = [
    0.0,
    60.0,
    3600.0,
    86_400.0,
    604_800.0,
    2_592_000.0,
    31_536_000.0,
];

/// What to measure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftStudyConfig {
    /// Inference times after programming, s (≥ 0, finite).
    pub times_s: Vec<f64>,
    /// Global seed.
    pub seed: u64,
    /// Test matrix outputs (≤ preset crossbar columns).
    pub n_out: usize,
    /// Test matrix inputs (≤ preset crossbar rows).
    pub n_in: usize,
    /// Input vectors per MVM measurement.
    pub batch: usize,
    /// Drift-fan target levels as fractions of g_max.
    pub fan_levels: Vec<f32>,
    /// Devices per fan level.
    pub fan_devices: usize,
    /// Log-spaced fan time points between 1 s and the last time (plus t = 0).
    pub fan_points: usize,
}

impl DriftStudyConfig {
    /// One full crossbar of `preset` (capped at 512×512), docs/model.md §7 times, batch 256.
    pub fn for_preset(preset: &TilePreset, seed: u64) -> Self {
        Self {
            times_s: DEFAULT_TIMES_S.to_vec(),
            seed,
            n_out: preset.stack.cols.min(512),
            n_in: preset.stack.rows.min(512),
            batch: 256,
            fan_levels: vec![0.1, 0.25, 0.5, 0.75, 1.0],
            fan_devices: 2000,
            fan_points: 25,
        }
    }
}

/// Matrix-level statistics at one drift time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftPoint {
    /// Inference time after programming, s.
    pub t_seconds: f64,
    /// Mean conductance of the device holding each weight, µS.
    pub g_mean_us: f64,
    /// Std of that conductance, µS.
    pub g_std_us: f64,
    /// Mean of (w(t) − w)/max|W| (signed, dimensionless; no GDC).
    pub w_err_mean: f64,
    /// Std of (w(t) − w)/max|W|.
    pub w_err_std: f64,
    /// ‖Y − W·x‖/‖W·x‖ with drift compensation as configured by the preset (GDC).
    pub mvm_rel_err_gdc: f64,
    /// ‖Y − W·x‖/‖W·x‖ with drift compensation off.
    pub mvm_rel_err_no_gdc: f64,
    /// Mean GDC factor α of the compensated crossbar.
    pub gdc_alpha_mean: f64,
}

/// Device-level drift fan: conductance over time per target level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftFan {
    /// Fan time points (inference time), s.
    pub times_s: Vec<f64>,
    /// One entry per target level.
    pub levels: Vec<DriftFanLevel>,
}

/// One target level of the fan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftFanLevel {
    /// Target conductance, µS.
    pub g_target_us: f32,
    /// Mean conductance per time point, µS.
    pub g_mean_us: Vec<f64>,
    /// Conductance std per time point, µS.
    pub g_std_us: Vec<f64>,
}

/// Result of [`drift_study`] (serialised as `drift.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DriftStudy {
    /// Preset name.
    pub preset: String,
    /// Device model name.
    pub device: String,
    /// Drift compensation of the preset.
    pub drift_compensation: DriftCompensation,
    /// The configuration used.
    pub config: DriftStudyConfig,
    /// One entry per requested time.
    pub points: Vec<DriftPoint>,
    /// The device-level drift fan.
    pub fan: DriftFan,
}

/// Run the drift study: W ~ N(0, 1) (`[n_out, n_in]`), inputs uniform in [−1, 1], both drawn
/// from the seed's `TestData` streams; the same devices are measured with the preset's drift
/// compensation and with none (equal seeds give equal devices).
pub fn drift_study(preset: &TilePreset, config: &DriftStudyConfig) -> Result<DriftStudy> {
    anyhow::ensure!(
        config.times_s.iter().all(|t| t.is_finite() && *t >= 0.0),
        "drift times must be finite and ≥ 0, got {:?}",
        config.times_s
    );
    let data = Stream::new(config.seed, Purpose::TestData, 0);
    let w = Array2::from_shape_fn((config.n_out, config.n_in), |(i, j)| {
        data.normal((i * config.n_in + j) as u64, 0)
    });
    let inputs = Stream::new(config.seed, Purpose::TestData, 1);
    let x = Array2::from_shape_fn((config.batch, config.n_in), |(b, j)| {
        2.0 * inputs.uniform((b * config.n_in + j) as u64, 0) - 1.0
    });
    let y_ideal = x.dot(&w.t());
    let w_abs_max = w.fold(0.0f32, |m, v| m.max(v.abs())) as f64;

    let mut uncompensated = preset.clone();
    uncompensated.drift_compensation = DriftCompensation::None;
    let mut with_gdc = Crossbar::program(w.view(), preset, config.seed, 0)?;
    let mut without = Crossbar::program(w.view(), &uncompensated, config.seed, 0)?;

    let mut points = Vec::with_capacity(config.times_s.len());
    for (k, &t) in config.times_s.iter().enumerate() {
        with_gdc.drift_to(t);
        without.drift_to(t);
        let (g_mean_us, g_std_us) =
            mean_std(with_gdc.device_conductances_us().iter().map(|&g| g as f64));
        let w_t = with_gdc.effective_weights();
        let (w_err_mean, w_err_std) = mean_std(
            w_t.iter()
                .zip(&w)
                .map(|(a, b)| f64::from(a - b) / w_abs_max),
        );
        let mvm_id = k as u32;
        points.push(DriftPoint {
            t_seconds: t,
            g_mean_us,
            g_std_us,
            w_err_mean,
            w_err_std,
            mvm_rel_err_gdc: relative_error(with_gdc.mvm(x.view(), mvm_id).view(), y_ideal.view()),
            mvm_rel_err_no_gdc: relative_error(
                without.mvm(x.view(), mvm_id).view(),
                y_ideal.view(),
            ),
            gdc_alpha_mean: mean_std(with_gdc.gdc_alpha().iter().map(|&a| a as f64)).0,
        });
    }
    let device = preset.device.build();
    Ok(DriftStudy {
        preset: preset.name.clone(),
        device: device.name().to_string(),
        drift_compensation: preset.drift_compensation,
        config: config.clone(),
        points,
        fan: drift_fan(device.as_ref(), config),
    })
}

/// Program `fan_devices` devices at each level and read them over the fan time grid.
fn drift_fan(device: &dyn Device, config: &DriftStudyConfig) -> DriftFan {
    let t_max = config
        .times_s
        .iter()
        .cloned()
        .fold(1.0f64, f64::max)
        .max(10.0);
    let n = config.fan_points.max(2);
    let mut times_s = vec![0.0];
    times_s.extend((0..n).map(|i| 10f64.powf(t_max.log10() * i as f64 / (n - 1) as f64)));
    let levels = config
        .fan_levels
        .iter()
        .enumerate()
        .map(|(level, &frac)| {
            let g_t = frac * device.g_max_us();
            let id = level as u32;
            let prog = Stream::new(config.seed, Purpose::ProgramNoise, id);
            let drift = Stream::new(config.seed, Purpose::DriftExponent, id);
            let read = Stream::new(config.seed, Purpose::ReadNoise, id);
            let devices: Vec<(f32, f32)> = (0..config.fan_devices as u64)
                .map(|d| {
                    (
                        device.program(g_t, prog.normal(d, 0)),
                        device.drift_exponent(g_t, drift.normal(d, 0)),
                    )
                })
                .collect();
            let (g_mean_us, g_std_us) = times_s
                .iter()
                .map(|&t| {
                    mean_std(devices.iter().enumerate().map(|(d, &(g_p, nu))| {
                        device.read(g_p, nu, t, read.normal(d as u64, 0)) as f64
                    }))
                })
                .unzip();
            DriftFanLevel {
                g_target_us: g_t,
                g_mean_us,
                g_std_us,
            }
        })
        .collect();
    DriftFan { times_s, levels }
}

/// ‖y − y_ref‖_F / ‖y_ref‖_F in f64.
pub(crate) fn relative_error(y: ArrayView2<f32>, y_ref: ArrayView2<f32>) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in y.iter().zip(y_ref.iter()) {
        num += (f64::from(*a) - f64::from(*b)).powi(2);
        den += f64::from(*b).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Mean and (population) standard deviation.
fn mean_std(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut n, mut sum, mut sq) = (0usize, 0.0f64, 0.0f64);
    for v in values {
        n += 1;
        sum += v;
        sq += v * v;
    }
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = sum / n as f64;
    (mean, (sq / n as f64 - mean * mean).max(0.0).sqrt())
}
