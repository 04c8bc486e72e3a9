//! The standard normal's upper-tail probability Q(z) = P(Z > z) and its inverse in f64, from
//! which [`super::normal`] computes its table once. Not on any hot path.
//!
//! Q comes from erfc: the all-positive series of erf below x = 2.5 (no cancellation inside the
//! sum; 1 − erf loses at most 5 digits there) and the classical continued fraction of erfc
//! above. The inverse starts from Acklam's rational approximation (relative error ≈ 1e-9) and
//! takes two Halley steps on Q, which leaves it at the accuracy of Q itself (≈ 1e-13 relative).

use std::f64::consts::PI;

/// erfc(x) for x ≥ 0.
pub fn erfc(x: f64) -> f64 {
    debug_assert!(x >= 0.0);
    if x < 2.5 {
        // erf x = (2/√π)·e^(−x²)·Σ_n 2ⁿ x^(2n+1) / (1·3·…·(2n+1)): every term positive.
        let (mut term, mut sum) = (x, x);
        let mut n = 0.0;
        while term > 1e-18 * sum {
            n += 1.0;
            term *= 2.0 * x * x / (2.0 * n + 1.0);
            sum += term;
        }
        1.0 - 2.0 / PI.sqrt() * (-x * x).exp() * sum
    } else {
        // erfc x = e^(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + …))))), evaluated
        // from a fixed depth upwards (stable; converged to < 1e-15 relative for x ≥ 2.5).
        let mut tail = x;
        for k in (1..=160).rev() {
            tail = x + (k as f64 / 2.0) / tail;
        }
        (-x * x).exp() / PI.sqrt() / tail
    }
}

/// Upper-tail probability Q(z) = P(Z > z) = erfc(z/√2)/2 of the standard normal, z ≥ 0.
pub fn upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The z with Q(z) = q, for q in (0, 1) (z ≥ 0 for q ≤ ½; the fit of the segment ending at
/// u = 1 samples just past ½).
pub fn upper_tail_inverse(q: f64) -> f64 {
    assert!(q > 0.0 && q < 1.0, "tail probability {q} outside (0, 1)");
    if q > 0.5 {
        return -upper_tail_inverse(1.0 - q);
    }
    // Acklam's approximation of the lower quantile x = Φ⁻¹(q) ≤ 0 (two regions), then z = −x.
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_671_010_565_316,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let x = if q < 0.02425 {
        let r = (-2.0 * q.ln()).sqrt();
        (((((C[0] * r + C[1]) * r + C[2]) * r + C[3]) * r + C[4]) * r + C[5])
            / ((((D[0] * r + D[1]) * r + D[2]) * r + D[3]) * r + 1.0)
    } else {
        let s = q - 0.5;
        let r = s * s;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * s
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    let mut z = -x;
    // Halley on Q(z) − q = 0: Q' = −φ, Q'' = z·φ.
    for _ in 0..2 {
        let u = (upper_tail(z) - q) * (2.0 * PI).sqrt() * (0.5 * z * z).exp();
        z += u / (1.0 - 0.5 * z * u);
    }
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_branches_agree_where_they_meet_and_match_known_values() {
        // Continuity at the switch: both forms at x = 2.5 (the series is valid everywhere).
        let series_at = |x: f64| {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term > 1e-18 * sum {
                n += 1.0;
                term *= 2.0 * x * x / (2.0 * n + 1.0);
                sum += term;
            }
            1.0 - 2.0 / PI.sqrt() * (-x * x).exp() * sum
        };
        let rel = |a: f64, b: f64| ((a - b) / b).abs();
        assert!(rel(erfc(2.5), series_at(2.5)) < 1e-11);
        // erfc(1) and erfc(3) to 16 digits (Abramowitz & Stegun table 7.1).
        assert!(rel(erfc(1.0), 0.157_299_207_050_285_1) < 1e-14);
        assert!(rel(erfc(3.0), 2.209_049_699_858_544e-5) < 1e-13);
        assert_eq!(erfc(0.0), 1.0);
    }

    #[test]
    fn inverse_round_trips_from_the_centre_to_the_far_tail() {
        for q in [0.5, 0.3, 0.1, 0.024, 1e-3, 1e-6, 1e-9, 1e-10] {
            let z = upper_tail_inverse(q);
            assert!(((upper_tail(z) - q) / q).abs() < 1e-12, "q {q}: z {z}");
        }
        assert!(upper_tail_inverse(0.5).abs() < 1e-15);
        // Φ⁻¹(0.975) = 1.959963984540054.
        assert!((upper_tail_inverse(0.025) - 1.959_963_984_540_054).abs() < 1e-13);
    }
}
