//! A new device technology plugs into the crossbar through the `Device` trait alone.
use std::sync::Arc;

use aimc::device::Device;
use aimc::tile::{AnalogMatrix, Crossbar, TilePreset};
use ndarray::Array2;

/// Toy technology: exact programming, conductance halves every `half_life_s`, no read noise.
#[derive(Debug)]
struct HalfLife {
    half_life_s: f64,
}

impl Device for HalfLife {
    fn name(&self) -> &str {
        "half-life"
    }
    fn g_max_us(&self) -> f32 {
        10.0
    }
    fn program(&self, g_target_us: f32, _xi: f32) -> f32 {
        g_target_us
    }
    fn drift_exponent(&self, _g_target_us: f32, _xi: f32) -> f32 {
        0.0
    }
    fn read(&self, g_prog_us: f32, _nu: f32, t_inference_s: f64, _xi: f32) -> f32 {
        g_prog_us * 0.5f64.powf(t_inference_s / self.half_life_s) as f32
    }
}

#[test]
fn custom_device_drives_the_crossbar() {
    let preset = TilePreset::builtin("ideal").unwrap();
    let device: Arc<dyn Device> = Arc::new(HalfLife { half_life_s: 100.0 });
    let w = Array2::from_shape_fn((8, 16), |(i, j)| (i as f32 - j as f32) / 16.0);
    let x = Array2::from_shape_fn((4, 16), |(b, j)| ((b + j) % 5) as f32 / 5.0);
    let y0 = x.dot(&w.t());
    let mut xbar = Crossbar::program_with_device(w.view(), &preset, device.clone(), 1, 0).unwrap();
    assert_eq!(xbar.device().name(), "half-life");
    xbar.drift_to(200.0);
    let y = xbar.mvm(x.view(), 0);
    for (a, b) in y.iter().zip(&y0) {
        // W̃ is binary16 (2⁻¹¹ relative per weight): outputs of order 1 within 1e-3.
        assert!((a - 0.25 * b).abs() < 1e-3, "{a} vs {}", 0.25 * b);
    }
    let mut m = AnalogMatrix::program_with_device(w.view(), &preset, device, 1, 0).unwrap();
    m.drift_to(100.0);
    let y = m.mvm(x.view(), 0);
    for (a, b) in y.iter().zip(&y0) {
        assert!((a - 0.5 * b).abs() < 1e-3);
    }
}
