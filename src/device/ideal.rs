//! The ideal device: programs exactly, never drifts, never fluctuates.
use super::Device;

/// A noise-free device of range [0, g_max_us]: reference for "analog equals digital" checks.
#[derive(Clone, Debug, PartialEq)]
pub struct Ideal {
    /// Largest conductance in µS (only fixes the unit scale; results do not depend on it).
    pub g_max_us: f32,
}

impl Default for Ideal {
    fn default() -> Self {
        Self { g_max_us: 25.0 }
    }
}

impl Device for Ideal {
    fn name(&self) -> &str {
        "ideal"
    }
    fn g_max_us(&self) -> f32 {
        self.g_max_us
    }
    fn program(&self, g_target_us: f32, _xi: f32) -> f32 {
        g_target_us
    }
    fn drift_exponent(&self, _g_target_us: f32, _xi: f32) -> f32 {
        0.0
    }
    fn read(&self, g_prog_us: f32, _nu: f32, _t_inference_s: f64, _xi: f32) -> f32 {
        g_prog_us
    }
}
