//! The drift study behind `aimc drift`.
use aimc::tile::{drift_study, DriftStudyConfig, TilePreset};

fn small(preset: &TilePreset) -> DriftStudyConfig {
    DriftStudyConfig {
        n_out: 96,
        n_in: 128,
        batch: 64,
        fan_devices: 400,
        fan_points: 6,
        ..DriftStudyConfig::for_preset(preset, 3)
    }
}

/// PCM: conductances and the fan decay monotonically (read noise shares ξ across times), GDC
/// beats no compensation after a day, and the JSON has one point per requested time.
#[test]
fn pcm_drift_study_has_the_expected_trends() {
    let preset = TilePreset::builtin("aihwkit-default").unwrap();
    let study = drift_study(&preset, &small(&preset)).unwrap();
    assert_eq!(study.points.len(), 7);
    let g: Vec<f64> = study.points.iter().map(|p| p.g_mean_us).collect();
    assert!(
        g.windows(2).all(|w| w[1] < w[0]),
        "mean conductance must decay: {g:?}"
    );
    let last = study.points.last().unwrap();
    assert!(last.mvm_rel_err_gdc < last.mvm_rel_err_no_gdc);
    assert!(
        last.gdc_alpha_mean > 1.5,
        "1 yr of drift needs α ≈ 2, got {}",
        last.gdc_alpha_mean
    );
    // Signed weight error turns negative (weights shrink) and its std grows.
    assert!(last.w_err_std > study.points[0].w_err_std);
    for level in &study.fan.levels {
        assert!(
            level.g_mean_us.windows(2).all(|w| w[1] <= w[0] + 1e-9),
            "fan must decay"
        );
        // Mean at t = 0 within 5 σ/√n of the target (programming noise is zero-mean, unclipped here).
        let se = level.g_std_us[0] / (400f64).sqrt();
        assert!(
            (level.g_mean_us[0] - level.g_target_us as f64).abs()
                < 5.0 * se + 0.02 * level.g_target_us as f64
        );
    }
    let json = serde_json::to_value(&study).unwrap();
    assert!(json["points"][6]["mvm_rel_err_no_gdc"].is_number());
}

#[test]
fn ideal_drift_study_has_zero_error_and_bad_times_are_rejected() {
    let preset = TilePreset::builtin("ideal").unwrap();
    let study = drift_study(&preset, &small(&preset)).unwrap();
    for p in &study.points {
        // Only the binary16 rounding of W̃ (docs/model.md §3): ≤ 2⁻¹¹ relative per weight.
        assert!(p.mvm_rel_err_gdc < 1e-3 && p.mvm_rel_err_no_gdc < 1e-3);
        assert!(p.w_err_std < 1e-3);
    }
    let mut cfg = small(&preset);
    cfg.times_s = vec![0.0, -5.0];
    assert!(drift_study(&preset, &cfg).is_err());
}
