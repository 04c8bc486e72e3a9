//! Global drift compensation restores the output scale after drift (docs/model.md §2 GDC).
use aimc::rng::{Purpose, Stream};
use aimc::tile::{Crossbar, DriftCompensation, TilePreset};
use ndarray::Array2;

const YEAR: f64 = 365.0 * 86_400.0;

fn data(n_out: usize, n_in: usize, batch: usize) -> (Array2<f32>, Array2<f32>) {
    let s = Stream::new(5, Purpose::TestData, 0);
    let w = Array2::from_shape_fn((n_out, n_in), |(i, j)| s.normal((i * n_in + j) as u64, 0));
    let u = Stream::new(5, Purpose::TestData, 1);
    let x = Array2::from_shape_fn((batch, n_in), |(b, j)| {
        2.0 * u.uniform((b * n_in + j) as u64, 0) - 1.0
    });
    (w, x)
}

/// Regression slope of y on y_ref: Σ y·y_ref / Σ y_ref².
fn slope(y: &Array2<f32>, y_ref: &Array2<f32>) -> f64 {
    let num: f64 = y
        .iter()
        .zip(y_ref)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let den: f64 = y_ref.iter().map(|b| (*b as f64).powi(2)).sum();
    num / den
}

/// GDC on an ideal periphery (isolating the device): the output scale (regression slope against
/// the outputs right after programming) falls well below 1 without GDC and returns to 1 with it,
/// for the block-wise and the per-column variant.
///
/// Tolerances: 1 % where the drift law is state-independent (`state_independent` device at 1 yr,
/// and PCM at 1 h). With the state-dependent PCM law at 1 yr small conductances drift faster than
/// large ones, the identity readout weights them more than a random-input MVM does, and GDC
/// over-compensates by ≈ 2 % (measured 1.019): tolerance 3 % there, with the sign asserted.
#[test]
fn gdc_restores_mean_output_ratio() {
    let (w, x) = data(512, 512, 512);
    let cases = [
        ("state_independent", YEAR, 0.8, 0.01),
        ("pcm", 3600.0, 0.85, 0.01),
        ("pcm", YEAR, 0.7, 0.03),
    ];
    for mode in [
        DriftCompensation::Global,
        DriftCompensation::GlobalPerColumn,
    ] {
        for (device, t, raw_max, tol) in cases {
            let mut preset = TilePreset::builtin("ideal").unwrap();
            preset.device = serde_json::from_str(&format!(r#"{{"kind": "{device}"}}"#)).unwrap();
            preset.drift_compensation = mode;
            let mut raw_preset = preset.clone();
            raw_preset.drift_compensation = DriftCompensation::None;
            let mut gdc = Crossbar::program(w.view(), &preset, 1, 0).unwrap();
            let mut raw = Crossbar::program(w.view(), &raw_preset, 1, 0).unwrap();
            let y0 = raw.mvm(x.view(), 0);
            gdc.drift_to(t);
            raw.drift_to(t);
            let r_raw = slope(&raw.mvm(x.view(), 1), &y0);
            let r_gdc = slope(&gdc.mvm(x.view(), 1), &y0);
            println!("{mode:?} {device} t={t}: raw {r_raw:.4}, gdc {r_gdc:.4}");
            assert!(
                r_raw < raw_max,
                "{mode:?} {device} t={t}: drift should shrink outputs, ratio {r_raw}"
            );
            assert!(
                (r_gdc - 1.0).abs() < tol,
                "{mode:?} {device} t={t}: GDC ratio {r_gdc}"
            );
            if tol > 0.01 {
                assert!(r_gdc > 1.0, "state-dependent drift: GDC over-compensates");
            }
        }
    }
}

/// With the full aihwkit-default periphery (out noise 0.06), GDC still removes most of the drift
/// loss but leaves the ratio about 10 % low: mean|W̃x + n| shrinks less than mean|W̃x| (0.901
/// and 0.899 under two generations of the random streams).
#[test]
fn gdc_with_output_noise_is_biased_by_the_noise_floor() {
    let (w, x) = data(512, 512, 512);
    let preset = TilePreset::builtin("aihwkit-default").unwrap();
    let mut raw_preset = preset.clone();
    raw_preset.drift_compensation = DriftCompensation::None;
    let mut gdc = Crossbar::program(w.view(), &preset, 1, 0).unwrap();
    let mut raw = Crossbar::program(w.view(), &raw_preset, 1, 0).unwrap();
    let y0 = raw.mvm(x.view(), 0);
    gdc.drift_to(YEAR);
    raw.drift_to(YEAR);
    let r_raw = slope(&raw.mvm(x.view(), 1), &y0);
    let r_gdc = slope(&gdc.mvm(x.view(), 1), &y0);
    println!("aihwkit-default 1 yr: raw {r_raw:.4}, gdc {r_gdc:.4}");
    assert!(r_raw < 0.7);
    assert!((0.85..1.0).contains(&r_gdc), "GDC ratio {r_gdc}");
}
