//! Fuzzes tile presets: any UTF-8 text as a preset. Parsing and validation must return a preset
//! or an error naming a field, never panic; an accepted preset's drift study must be finite.
#![no_main]
use aimc::tile::{drift_study, DriftStudyConfig, TilePreset};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(preset) = TilePreset::from_json_str(text, "fuzz.json") else {
        return;
    };
    let config = DriftStudyConfig {
        times_s: vec![0.0, 3600.0, 3.15e7],
        seed: 0,
        n_out: preset.stack.cols.min(16),
        n_in: preset.stack.rows.min(16),
        batch: 4,
        fan_levels: vec![0.5, 1.0],
        fan_devices: 16,
        fan_points: 3,
    };
    if let Ok(s) = drift_study(&preset, &config) {
        for p in &s.points {
            assert!(p.mvm_rel_err_gdc.is_finite() && p.mvm_rel_err_no_gdc.is_finite());
            assert!(p.g_mean_us.is_finite() && p.g_std_us.is_finite());
        }
    }
});
