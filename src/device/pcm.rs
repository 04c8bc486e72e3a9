//! Phase-change memory, AIHWKIT-compatible statistical models (docs/model.md §2).
//!
//! One struct, [`PcmLike`], covers the PCM family: AIHWKIT `PCMLikeNoiseModel` (Nandakumar et
//! al., ICECS 2019), `HermesNoiseModel` (Le Gallo et al., Nat. Electron. 2023, two devices per
//! weight), `StateIndependentNoiseModel` and `CustomDriftPCMLikeNoiseModel` (drift table). They
//! differ only in the programming polynomial, the drift-exponent law and the read-noise law.
use serde::{Deserialize, Serialize};

use super::Device;

/// AIHWKIT `_ZERO_CLIP`: floor of g_T/g_max before taking its logarithm.
const ZERO_CLIP: f32 = 1e-7;

/// Law of the drift exponent ν, drawn once per device from its *target* conductance.
#[derive(Clone, Debug, PartialEq)]
pub enum DriftModel {
    /// AIHWKIT PCM: g_r = max(|g_T|/g_max, 1e-7), μ_ν = clamp(−0.0155 ln g_r + 0.0244, 0.049, 0.1),
    /// σ_ν = clamp(−0.0125 ln g_r − 0.0059, 0.008, 0.045), ν = |μ_ν + σ_ν ξ| (docs/model.md §2).
    Aihwkit,
    /// HERMES two-device fit (AIHWKIT `HermesNoiseModel`, `num_devices = 2`): branch functions of g_r.
    Hermes,
    /// State-independent ν = |mean + std·ξ| (AIHWKIT `StateIndependentNoiseModel`: 0.1, 0.05).
    Constant {
        /// Mean drift exponent.
        mean: f32,
        /// Device-to-device standard deviation of ν.
        std: f32,
    },
    /// μ_ν, σ_ν linearly interpolated over g_T (µS), clipped to the table's range
    /// (AIHWKIT `CustomDriftPCMLikeNoiseModel`).
    Table(DriftTable),
}

/// A drift table: conductances in ascending order with the mean and std of ν at each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftTable {
    /// Conductances in µS, strictly ascending, at least 2.
    pub g_us: Vec<f32>,
    /// Mean drift exponent at each conductance (dimensionless).
    pub nu_mean: Vec<f32>,
    /// Standard deviation of ν at each conductance (dimensionless, ≥ 0).
    pub nu_std: Vec<f32>,
}

impl DriftTable {
    /// (μ_ν, σ_ν) at conductance `g_us`, linear interpolation as numpy `interp`.
    pub fn at(&self, g_us: f32) -> (f32, f32) {
        let g = &self.g_us;
        let last = g.len() - 1;
        if g_us <= g[0] {
            return (self.nu_mean[0], self.nu_std[0]);
        }
        if g_us >= g[last] {
            return (self.nu_mean[last], self.nu_std[last]);
        }
        let k = g.partition_point(|&x| x <= g_us) - 1;
        let f = (g_us - g[k]) / (g[k + 1] - g[k]);
        let lerp = |v: &[f32]| v[k] + f * (v[k + 1] - v[k]);
        (lerp(&self.nu_mean), lerp(&self.nu_std))
    }
}

/// Law of the accumulated 1/f read noise σ_nG (relative to |g_D|) at drift time t.
#[derive(Clone, Debug, PartialEq)]
pub enum ReadNoiseModel {
    /// AIHWKIT PCM: Q_s = min(0.0088 / max((|g_P|/g_max)^0.65, 1e-3), 0.2), σ = Q_s·√ln((t+t_r)/(2t_r)).
    Aihwkit,
    /// HERMES two-device fit of Q_s (AIHWKIT `HermesNoiseModel`, `num_devices = 2`).
    Hermes,
    /// State-independent: g += |g_D/g_max|·√ln(...)·ξ (AIHWKIT `StateIndependentNoiseModel`;
    /// note its σ is |g_D|/g_max in µS, not relative to g_D).
    StateIndependent,
}

/// A PCM-family device model (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct PcmLike {
    /// Report name.
    pub name: String,
    /// Largest conductance in µS (AIHWKIT PCM 25, HERMES 20.7).
    pub g_max_us: f32,
    /// First read time t₀ in s: drift is measured relative to it (PCM 20, HERMES 300).
    pub t0_seconds: f64,
    /// Read pulse width t_read in s, parameter of the 1/f fit (PCM 250e-9, HERMES 512e-9).
    pub t_read_seconds: f64,
    /// σ_prog polynomial coefficients c_i (µS at `prog_coeff_g_max_reference_us`) in (g_T/g_max)^i.
    pub prog_coeffs: Vec<f32>,
    /// The g_max (µS) the coefficients were fitted at: σ_prog scales by g_max / this.
    pub prog_coeff_g_max_reference_us: f32,
    /// Drift-exponent law.
    pub drift: DriftModel,
    /// Read-noise law.
    pub read_noise: ReadNoiseModel,
    /// Multiplies σ_prog (AIHWKIT `prog_noise_scale`).
    pub prog_noise_scale: f32,
    /// Multiplies σ_nG (AIHWKIT `read_noise_scale`).
    pub read_noise_scale: f32,
    /// Multiplies ν (AIHWKIT `drift_scale`).
    pub drift_scale: f32,
}

impl PcmLike {
    /// AIHWKIT `PCMLikeNoiseModel` defaults: g_max 25 µS, t₀ 20 s, t_read 250 ns,
    /// σ_prog = 0.26348 + 1.9650x − 1.1731x² µS (Nandakumar et al. 2019; docs/model.md §2).
    pub fn aihwkit() -> Self {
        Self {
            name: "pcm".into(),
            g_max_us: 25.0,
            t0_seconds: 20.0,
            t_read_seconds: 250.0e-9,
            prog_coeffs: vec![0.26348, 1.9650, -1.1731],
            prog_coeff_g_max_reference_us: 25.0,
            drift: DriftModel::Aihwkit,
            read_noise: ReadNoiseModel::Aihwkit,
            prog_noise_scale: 1.0,
            read_noise_scale: 1.0,
            drift_scale: 1.0,
        }
    }

    /// AIHWKIT `HermesNoiseModel` (two devices per weight): g_max 20.7 µS, t₀ 300 s, t_read 512 ns,
    /// cubic σ_prog [0.16603222, 4.71806468, −8.48101252, 4.68961419] (docs/model.md §2 rounds these).
    #[allow(clippy::excessive_precision)] // constants kept at AIHWKIT's published precision
    pub fn hermes() -> Self {
        Self {
            name: "hermes".into(),
            g_max_us: 20.7,
            t0_seconds: 300.0,
            t_read_seconds: 512.0e-9,
            prog_coeffs: vec![0.166_032_22, 4.718_064_7, -8.481_012_5, 4.689_614],
            prog_coeff_g_max_reference_us: 20.7,
            drift: DriftModel::Hermes,
            read_noise: ReadNoiseModel::Hermes,
            ..Self::aihwkit()
        }
    }

    /// AIHWKIT `StateIndependentNoiseModel`: σ_prog = 0.2 µS, ν = |0.1 + 0.05ξ| (docs/model.md §2).
    pub fn state_independent() -> Self {
        Self {
            name: "state-independent".into(),
            prog_coeffs: vec![0.2],
            drift: DriftModel::Constant {
                mean: 0.1,
                std: 0.05,
            },
            read_noise: ReadNoiseModel::StateIndependent,
            ..Self::aihwkit()
        }
    }

    /// PCM programming and read noise with a user drift table (AIHWKIT
    /// `CustomDriftPCMLikeNoiseModel`, after N. Li et al., AEM 2023).
    pub fn custom_drift(table: DriftTable) -> Self {
        Self {
            name: "custom-drift".into(),
            drift: DriftModel::Table(table),
            ..Self::aihwkit()
        }
    }

    /// σ_prog in µS at target g_T, evaluated as AIHWKIT does (running power of x = g_T/g_max).
    pub fn sigma_prog_us(&self, g_target_us: f32) -> f32 {
        let x = g_target_us / self.g_max_us;
        let mut power = 1.0f32;
        let mut sigma = self.prog_coeffs[0];
        for &c in &self.prog_coeffs[1..] {
            power *= x;
            sigma += power * c;
        }
        sigma * (self.g_max_us / self.prog_coeff_g_max_reference_us)
    }

    /// (μ_ν, σ_ν) of the drift exponent at target g_T (before `drift_scale`).
    pub fn nu_moments(&self, g_target_us: f32) -> (f32, f32) {
        let g_r = (g_target_us / self.g_max_us).abs().max(ZERO_CLIP);
        match &self.drift {
            DriftModel::Aihwkit => {
                let ln = g_r.ln();
                (
                    (-0.0155 * ln + 0.0244).clamp(0.049, 0.1),
                    (-0.0125 * ln - 0.0059).clamp(0.008, 0.045),
                )
            }
            DriftModel::Hermes => {
                let ln = g_r.ln();
                let mean = if g_r < 0.0945 {
                    (-0.0387 * ln - 0.0182).clamp(0.072, 0.13)
                } else {
                    -0.0436 * g_r * g_r - 0.0126 * g_r + 0.0736
                };
                let std = if g_r < 0.3055 {
                    (-0.0117 * ln - 0.0057).clamp(0.0091, 0.04)
                } else {
                    -0.0118 * g_r * g_r + 0.0093 * g_r + 0.0073
                };
                (mean, std)
            }
            DriftModel::Constant { mean, std } => (*mean, *std),
            DriftModel::Table(table) => table.at(g_target_us),
        }
    }

    /// Read-noise amplitude at programmed g_P (µS), before the time factor and `read_noise_scale`.
    /// Relative to |g_D| except for [`ReadNoiseModel::StateIndependent`] (µS per µS of g_max).
    pub fn q_s(&self, g_prog_us: f32) -> f32 {
        let g_r = g_prog_us.abs() / self.g_max_us;
        match self.read_noise {
            ReadNoiseModel::Aihwkit => (0.0088 / g_r.powf(0.65).max(1e-3)).min(0.2),
            ReadNoiseModel::Hermes => {
                if g_r < 0.16 {
                    (-0.0117 * g_r.ln() - 0.0069).clamp(0.015, 0.04)
                } else {
                    0.0069 * g_r * g_r * g_r - 0.0280 * g_r * g_r + 0.0211 * g_r + 0.0123
                }
            }
            ReadNoiseModel::StateIndependent => 1.0 / self.g_max_us,
        }
    }

    /// Accumulated 1/f time factor √ln((t + t_read)/(2 t_read)) with t = t_inf + t₀
    /// (docs/model.md §2 check values: 4.184 at t_inf = 0, 4.765 at 1 h, 5.087 at 1 day, 5.637 at 1 yr).
    pub fn read_noise_time_factor(&self, t_inference_s: f64) -> f32 {
        let t = t_inference_s + self.t0_seconds;
        ((t + self.t_read_seconds) / (2.0 * self.t_read_seconds))
            .ln()
            .sqrt() as f32
    }

    /// Drift ratio t/t₀ with t = t_inf + t₀, as f32 (computed in f64 on the host).
    pub fn drift_time_ratio(&self, t_inference_s: f64) -> f32 {
        ((t_inference_s + self.t0_seconds) / self.t0_seconds) as f32
    }
}

impl Device for PcmLike {
    fn name(&self) -> &str {
        &self.name
    }

    fn g_max_us(&self) -> f32 {
        self.g_max_us
    }

    /// g_P = max(0, g_T + scale·σ_prog(g_T)·ξ).
    fn program(&self, g_target_us: f32, xi: f32) -> f32 {
        (g_target_us + self.prog_noise_scale * self.sigma_prog_us(g_target_us) * xi).max(0.0)
    }

    /// ν = drift_scale·|μ_ν + σ_ν ξ| (folded normal, as AIHWKIT).
    fn drift_exponent(&self, g_target_us: f32, xi: f32) -> f32 {
        let (mean, std) = self.nu_moments(g_target_us);
        (mean + std * xi).abs() * self.drift_scale
    }

    /// g = max(0, g_D + |g_D|·σ_nG·ξ), g_D = g_P·(t/t₀)^(−ν) (AIHWKIT order of operations).
    fn read(&self, g_prog_us: f32, nu: f32, t_inference_s: f64, xi: f32) -> f32 {
        // An empty device stays empty: g_D = 0 and its read noise ∝ |g_D| = 0. After the re-conversion of the
        // programmed pair (AIHWKIT) one device of every pair is empty, so this skips half the work exactly.
        if g_prog_us <= 0.0 {
            return 0.0;
        }
        let ratio = self.drift_time_ratio(t_inference_s);
        let g_drift = if ratio > 1.0 {
            g_prog_us * ratio.powf(-nu)
        } else {
            g_prog_us
        };
        let sigma = self.q_s(g_prog_us) * self.read_noise_time_factor(t_inference_s);
        (g_drift + g_drift.abs() * self.read_noise_scale * sigma * xi).max(0.0)
    }
}
