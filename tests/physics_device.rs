//! Device physics against the formulas and check values of docs/model.md §2.
use aimc::device::{Device, PcmLike};
use aimc::rng::{Purpose, Stream};

const N: usize = 100_000;
const HOUR: f64 = 3600.0;
const DAY: f64 = 86_400.0;
const YEAR: f64 = 365.0 * DAY;

fn normals(seed: u64, purpose: Purpose, n: usize) -> Vec<f32> {
    let mut z = vec![0.0f32; n];
    Stream::new(seed, purpose, 0).fill_normal(0, 0, 0, &mut z);
    z
}

/// Standard normal CDF (Abramowitz & Stegun 7.1.26 erfc, |error| < 1.5e-7).
fn phi_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * z);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erfc = poly * (-z * z).exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

fn phi_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Sample mean, std and the standard error of the std, √((m₄ − σ⁴)/(4nσ²)) (any distribution).
fn moments(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let m4 = v.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / n;
    (
        mean,
        var.sqrt(),
        ((m4 - var * var) / (4.0 * n * var)).sqrt(),
    )
}

#[test]
fn check_values_of_design_table() {
    let pcm = PcmLike::aihwkit();
    for (g, sigma) in [(0.0, 0.2635), (12.5, 0.9527), (25.0, 1.0554)] {
        assert!(
            (pcm.sigma_prog_us(g) - sigma).abs() < 1e-3,
            "σ_prog({g}) = {}",
            pcm.sigma_prog_us(g)
        );
    }
    for (t, f) in [(0.0, 4.184), (HOUR, 4.765), (DAY, 5.087), (YEAR, 5.637)] {
        let got = pcm.read_noise_time_factor(t);
        assert!((got - f).abs() < 1e-3, "time factor at {t} s: {got}");
    }
    for (t, f) in [(HOUR, 0.775), (DAY, 0.664), (YEAR, 0.497)] {
        let got = pcm.drift_time_ratio(t).powf(-0.049);
        assert!((got - f).abs() < 1e-3, "(t/t0)^-0.049 at {t} s: {got}");
        // The device applies exactly this factor when read noise is off.
        let quiet = PcmLike {
            read_noise_scale: 0.0,
            ..PcmLike::aihwkit()
        };
        assert!((quiet.read(10.0, 0.049, t, 1.0) - 10.0 * got).abs() < 1e-5);
    }
}

/// Programming noise: empirical std of g_P = max(0, g_T + σ_prog ξ) within 3 standard errors of
/// the std of that clipped normal (= σ_prog where clipping is negligible), 10⁵ devices per level.
#[test]
fn programming_noise_matches_formula() {
    let pcm = PcmLike::aihwkit();
    for (k, x) in [0.01f64, 0.1, 0.5, 1.0].into_iter().enumerate() {
        let g_t = (x * 25.0) as f32;
        let xi = normals(100 + k as u64, Purpose::ProgramNoise, N);
        let g: Vec<f64> = xi.iter().map(|&z| pcm.program(g_t, z) as f64).collect();
        let (mu, s) = (g_t as f64, pcm.sigma_prog_us(g_t) as f64);
        let sigma_formula = (0.26348 + 1.9650 * x - 1.1731 * x * x) * 1.0;
        assert!((s - sigma_formula).abs() < 1e-6, "σ_prog formula at x={x}");
        // Moments of max(0, N(μ, s²)).
        let a = mu / s;
        let m1 = mu * phi_cdf(a) + s * phi_pdf(a);
        let m2 = (mu * mu + s * s) * phi_cdf(a) + mu * s * phi_pdf(a);
        let expected_std = (m2 - m1 * m1).sqrt();
        let (mean, std, se) = moments(&g);
        assert!(
            (std - expected_std).abs() < 3.0 * se,
            "x={x}: std {std} vs {expected_std} (3 SE = {})",
            3.0 * se
        );
        assert!(
            (mean - m1).abs() < 3.0 * std / (N as f64).sqrt(),
            "x={x}: mean {mean} vs {m1}"
        );
    }
}

/// Drift: with read noise off, ln(g(t)/g_P)/ln(t/t₀) = −ν, so its mean is −E[ν] with
/// E|N(μ,σ²)| = σ√(2/π)·e^(−μ²/2σ²) + μ(1 − 2Φ(−μ/σ)) (folded normal), μ_ν, σ_ν from docs/model.md §2.
#[test]
fn drift_exponent_mean_matches_folded_normal() {
    let quiet = PcmLike {
        read_noise_scale: 0.0,
        ..PcmLike::aihwkit()
    };
    let t = DAY;
    let ln_ratio = quiet.drift_time_ratio(t).ln() as f64;
    for (k, g_r) in [0.001f64, 0.01, 0.1, 0.5, 1.0].into_iter().enumerate() {
        let g_t = (g_r * 25.0) as f32;
        let mu = (-0.0155 * g_r.ln() + 0.0244).clamp(0.049, 0.1);
        let sigma = (-0.0125 * g_r.ln() - 0.0059).clamp(0.008, 0.045);
        let e_nu =
            sigma * (2.0 / std::f64::consts::PI).sqrt() * (-mu * mu / (2.0 * sigma * sigma)).exp()
                + mu * (1.0 - 2.0 * phi_cdf(-mu / sigma));
        let xi = normals(200 + k as u64, Purpose::DriftExponent, N);
        let slopes: Vec<f64> = xi
            .iter()
            .map(|&z| {
                let nu = quiet.drift_exponent(g_t, z);
                let g = quiet.read(10.0, nu, t, 0.0);
                (g as f64 / 10.0).ln() / ln_ratio
            })
            .collect();
        let (mean, std, _) = moments(&slopes);
        let tol = 3.0 * std / (N as f64).sqrt() + 1e-5; // + f32 rounding of g
        assert!(
            (mean + e_nu).abs() < tol,
            "g_r={g_r}: mean slope {mean}, −E[ν] = {}",
            -e_nu
        );
    }
}

/// Read noise: with ν = 0, g = g_P(1 + Q_s·√ln((t+t_r)/2t_r)·ξ); its relative std must match
/// within 3·σ/√(2n) at 1 h and 1 yr, for two conductances.
#[test]
fn read_noise_sigma_matches_formula() {
    let pcm = PcmLike::aihwkit();
    for (k, (g_p, t)) in [(12.5f32, HOUR), (12.5, YEAR), (2.5, HOUR), (25.0, YEAR)]
        .into_iter()
        .enumerate()
    {
        let g_r = g_p as f64 / 25.0;
        let q_s = (0.0088 / g_r.powf(0.65).max(1e-3)).min(0.2);
        let tt = t + 20.0;
        let expected = q_s * ((tt + 250e-9) / (2.0 * 250e-9)).ln().sqrt();
        let xi = normals(300 + k as u64, Purpose::ReadNoise, N);
        let rel: Vec<f64> = xi
            .iter()
            .map(|&z| pcm.read(g_p, 0.0, t, z) as f64 / g_p as f64)
            .collect();
        let (mean, std, _) = moments(&rel);
        let se = expected / (2.0 * N as f64).sqrt();
        assert!(
            (std - expected).abs() < 3.0 * se,
            "g={g_p} t={t}: σ {std} vs {expected}"
        );
        assert!(
            (mean - 1.0).abs() < 3.0 * expected / (N as f64).sqrt(),
            "mean {mean}"
        );
    }
}

#[test]
fn other_devices_follow_their_published_defaults() {
    let hermes = PcmLike::hermes();
    assert_eq!(
        (hermes.g_max_us, hermes.t0_seconds, hermes.t_read_seconds),
        (20.7, 300.0, 512e-9)
    );
    assert!((hermes.sigma_prog_us(0.0) - 0.166).abs() < 1e-3);
    // σ(g_max) = 0.166 + 4.718 − 8.481 + 4.690 (docs/model.md §2 cubic).
    assert!(
        (hermes.sigma_prog_us(20.7) - (0.166_032_2 + 4.718_065 - 8.481_013 + 4.689_614)).abs()
            < 1e-4
    );
    let si = PcmLike::state_independent();
    assert!(
        (si.sigma_prog_us(3.0) - 0.2).abs() < 1e-7 && (si.sigma_prog_us(25.0) - 0.2).abs() < 1e-7
    );
    assert_eq!(si.nu_moments(1.0), (0.1, 0.05));
    assert_eq!(si.drift_exponent(5.0, -3.0), (0.1f32 - 0.15).abs());
    let table = aimc::device::DriftTable {
        g_us: vec![0.0, 10.0, 20.0],
        nu_mean: vec![0.1, 0.05, 0.03],
        nu_std: vec![0.02, 0.01, 0.0],
    };
    let custom = PcmLike::custom_drift(table);
    assert_eq!(custom.nu_moments(5.0), (0.075, 0.015));
    assert_eq!(custom.nu_moments(30.0), (0.03, 0.0));
    let ideal = aimc::device::Ideal::default();
    assert_eq!(
        ideal.read(
            ideal.program(7.0, 3.0),
            ideal.drift_exponent(7.0, 1.0),
            YEAR,
            2.0
        ),
        7.0
    );
    let reram = aimc::device::ReramCmo::default();
    assert!(!reram.differential());
    assert_eq!(reram.read(50.0, 50.0, 0.0, 1.0), 50.0);
    // Mean decay at 1 day: −0.089·ln t + 49.92·g_T/50.
    let g = reram.read(50.0, 50.0, DAY, 0.0) as f64;
    assert!((g - (-0.08900206 * DAY.ln() + 49.92383444)).abs() < 1e-3);
}

/// Weight ↔ conductance: differential pair s = g_max/max|W| with one device per sign,
/// single device centred on g_mid; both round-trip exactly representable weights.
#[test]
fn weight_converter_maps_and_round_trips() {
    use aimc::device::{ReramCmo, WeightConverter};
    let pair = WeightConverter::for_device(&PcmLike::aihwkit());
    assert_eq!(pair.devices_per_weight(), 2);
    let s = pair.scale(2.0);
    assert_eq!(s, 12.5);
    assert_eq!(pair.to_conductances(2.0, s), [25.0, 0.0]);
    assert_eq!(pair.to_conductances(-1.0, s), [0.0, 12.5]);
    assert_eq!(
        pair.to_conductances(4.0, s),
        [25.0, 0.0],
        "clamped at g_max"
    );
    assert_eq!(pair.to_weight([25.0, 12.5], s), 1.0);
    let single = WeightConverter::for_device(&ReramCmo::default());
    assert_eq!(single.devices_per_weight(), 1);
    let s = single.scale(1.0);
    let g = single.to_conductances(-1.0, s);
    assert!(
        (g[0] - 9.0).abs() < 1e-4 && g[1] == 0.0,
        "−max|W| maps to g_min: {g:?}"
    );
    assert!((single.to_conductances(1.0, s)[0] - 88.19).abs() < 1e-4);
    assert!((single.to_weight(single.to_conductances(0.25, s), s) - 0.25).abs() < 1e-6);
}
