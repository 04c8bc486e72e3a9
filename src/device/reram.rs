//! ReRAM (conductive-metal-oxide / HfOx), AIHWKIT `ReRamCMONoiseModel` (Falcone et al.).
use super::Device;

/// CMO/HfOx ReRAM, one device per weight over [9, 88.19] µS.
///
/// Programming: g_P = g_T + (c₀ + c₁·g_T)·ξ with the 0.2 %-acceptance fit c₀ = 0.00081107 µS,
/// c₁ = 0.00106879 (AIHWKIT's default branch). Drift is state-independent conductance decay:
/// g(t) = a·ln t + b·g_T/50 + (c·ln t + d)·ξ, a = −0.08900206, b = 49.92383444, c = 0.04201137,
/// d = 0.41183342, floored at g_min. As in AIHWKIT, the read uses the *target* g_T (stored as the
/// device's drift parameter) and t = 0 returns the programmed value.
#[derive(Clone, Debug, PartialEq)]
pub struct ReramCmo {
    /// Smallest conductance in µS.
    pub g_min_us: f32,
    /// Largest conductance in µS.
    pub g_max_us: f32,
    /// Multiplies the programming noise.
    pub prog_noise_scale: f32,
}

impl Default for ReramCmo {
    fn default() -> Self {
        Self {
            g_min_us: 9.0,
            g_max_us: 88.19,
            prog_noise_scale: 1.0,
        }
    }
}

impl Device for ReramCmo {
    fn name(&self) -> &str {
        "reram-cmo"
    }
    fn g_max_us(&self) -> f32 {
        self.g_max_us
    }
    fn g_min_us(&self) -> f32 {
        self.g_min_us
    }
    fn differential(&self) -> bool {
        false
    }
    fn program(&self, g_target_us: f32, xi: f32) -> f32 {
        g_target_us + self.prog_noise_scale * (0.000_811_07 + 0.001_068_79 * g_target_us) * xi
    }
    fn drift_exponent(&self, g_target_us: f32, _xi: f32) -> f32 {
        g_target_us
    }
    #[allow(clippy::excessive_precision)] // constants kept at AIHWKIT's published precision
    fn read(&self, g_prog_us: f32, g_target_us: f32, t_inference_s: f64, xi: f32) -> f32 {
        if t_inference_s <= 0.0 {
            return g_prog_us.max(self.g_min_us);
        }
        let ln_t = t_inference_s.ln() as f32;
        let mean = -0.089_002_06 * ln_t + 49.923_834 * g_target_us / 50.0;
        let std = 0.042_011_37 * ln_t + 0.411_833_42;
        (mean + std * xi).max(self.g_min_us)
    }
}
