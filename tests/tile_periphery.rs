//! DAC, ADC, noise management, bound management and the ideal preset (docs/model.md §3).
use aimc::tile::{
    quotient_by_reciprocal, BoundManagement, Crossbar, NoiseManagement, Quantizer, TilePreset,
    WeightNoise,
};
use ndarray::{Array2, ArrayView2};

fn ideal() -> TilePreset {
    TilePreset::builtin("ideal").unwrap()
}

fn rel_err(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn quantizer_rounds_half_to_even_and_clamps() {
    let q = Quantizer {
        bits: 7,
        bound: 1.0,
    };
    let step = q.step();
    assert_eq!(step, 2.0 / 126.0);
    assert_eq!(
        Quantizer {
            bits: 8,
            bound: 1.0
        }
        .step(),
        2.0 / 254.0
    );
    assert_eq!(
        Quantizer {
            bits: 9,
            bound: 12.0
        }
        .step(),
        24.0 / 510.0
    );
    // Ties go to the even level.
    assert_eq!(q.quantize(0.5 * step, step), 0.0);
    assert_eq!(q.quantize(1.5 * step, step), 2.0 * step);
    assert_eq!(q.quantize(2.5 * step, step), 2.0 * step);
    assert_eq!(q.quantize(-2.5 * step, step), -2.0 * step);
    assert_eq!(q.quantize(3.5 * step, step), 4.0 * step);
    // Clamping at ±bound.
    assert_eq!(q.quantize(7.0, step), 1.0);
    assert_eq!(q.quantize(-1.2, step), -1.0);
    assert_eq!(q.quantize(1e30, step), 1.0);
    assert_eq!(q.quantize(f32::NEG_INFINITY, step), -1.0);
    // rint agrees with the library half-to-even rounding everywhere in range.
    for i in -20_000..20_000 {
        let v = i as f32 * 0.25 + 0.001 * (i % 3) as f32;
        assert_eq!(aimc::tile::rint(v), v.round_ties_even(), "rint({v})");
    }
}

/// With W = I on an ideal device and only a DAC, the output is exactly the quantised input:
/// every value lies on the grid k·Δ_in, |k| ≤ 63, and equals rint(x/Δ)·Δ.
#[test]
fn dac_output_is_the_exact_quantisation_grid() {
    let mut p = ideal();
    p.periphery.dac = Some(Quantizer {
        bits: 7,
        bound: 1.0,
    });
    let n = 64;
    let w = Array2::<f32>::eye(n);
    let xbar = Crossbar::program(w.view(), &p, 1, 0).unwrap();
    let x = Array2::from_shape_fn((8, n), |(b, j)| {
        (b as f32 * 0.37 + j as f32 * 0.0411).sin() * 1.3
    });
    let y = xbar.mvm(x.view(), 0);
    let step = 2.0f32 / 126.0;
    for (yv, xv) in y.iter().zip(x.iter()) {
        let k = yv / step;
        // On the grid up to the f32 rounding of k·Δ (±b = ±63Δ only to 1 ulp).
        assert!((k - k.round()).abs() < 1e-4, "{yv} is off the grid");
        assert!(k.abs() <= 63.0);
        assert_eq!(*yv, ((xv / step).round_ties_even() * step).clamp(-1.0, 1.0));
    }
}

/// ADC alone: outputs on the grid Δ_out = 2b/(2^bits − 2) and clamped at ±b.
#[test]
fn adc_quantises_and_clamps_outputs() {
    let mut p = ideal();
    let adc = Quantizer {
        bits: 5,
        bound: 2.0,
    };
    p.periphery.adc = Some(adc);
    let n = 16;
    let w = Array2::<f32>::eye(n);
    let xbar = Crossbar::program(w.view(), &p, 1, 0).unwrap();
    let x = Array2::from_shape_fn((4, n), |(b, j)| (b as f32 - 1.5) * (j as f32 - 7.5) * 0.3);
    let y = xbar.mvm(x.view(), 0);
    let step = adc.step();
    for (yv, xv) in y.iter().zip(x.iter()) {
        assert_eq!(
            *yv,
            ((xv / step).round_ties_even() * step).clamp(-2.0, 2.0),
            "x = {xv}"
        );
    }
    assert!(
        y.iter().any(|v| v.abs() == 2.0),
        "test should exercise clamping"
    );
}

/// ABS_MAX noise management rescales: an input 1000× larger gives a 1000× larger output.
#[test]
fn abs_max_noise_management_is_scale_invariant() {
    let mut p = ideal();
    p.periphery.noise_management = NoiseManagement::AbsMax;
    p.periphery.dac = Some(Quantizer {
        bits: 8,
        bound: 1.0,
    });
    let w = Array2::from_shape_fn((8, 32), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
    let xbar = Crossbar::program(w.view(), &p, 1, 0).unwrap();
    let x = Array2::from_shape_fn((3, 32), |(b, j)| ((b + j) as f32 * 0.3).cos());
    let y1 = xbar.mvm(x.view(), 0);
    let y2 = xbar.mvm((&x * 1024.0).view(), 0);
    for (a, b) in y1.iter().zip(y2.iter()) {
        assert_eq!(a * 1024.0, *b);
    }
    // And all-zero inputs give exactly zero.
    assert!(xbar
        .mvm(Array2::<f32>::zeros((2, 32)).view(), 0)
        .iter()
        .all(|v| *v == 0.0));
}

/// Iterative bound management recovers an output 4× beyond the ADC bound; without it the
/// output stays clamped.
#[test]
fn iterative_bound_management_recovers_saturated_rows() {
    let mut p = ideal();
    p.periphery.noise_management = NoiseManagement::AbsMax;
    p.periphery.dac = Some(Quantizer {
        bits: 8,
        bound: 1.0,
    });
    p.periphery.adc = Some(Quantizer {
        bits: 10,
        bound: 4.0,
    });
    let w = Array2::<f32>::ones((2, 16));
    let x = Array2::<f32>::ones((3, 16));
    let clamped = Crossbar::program(w.view(), &p, 1, 0)
        .unwrap()
        .mvm(x.view(), 0);
    assert!(clamped.iter().all(|v| *v == 4.0), "{clamped}");
    p.periphery.bound_management = BoundManagement::Iterative;
    let managed = Crossbar::program(w.view(), &p, 1, 0)
        .unwrap()
        .mvm(x.view(), 0);
    assert!(
        managed.iter().all(|v| (v - 16.0).abs() < 0.02 * 16.0),
        "{managed}"
    );
}

/// The ideal preset reproduces W·x to binary16 precision of W̃ (docs/model.md §3: each weight
/// within 2⁻¹¹ relative; the product within 1e-3 relative), with any mapping scale.
#[test]
fn ideal_preset_equals_digital_matmul() {
    let p = ideal();
    let w = Array2::from_shape_fn((100, 300), |(i, j)| {
        ((i * 31 + j * 17) % 97) as f32 / 97.0 - 0.5
    });
    let x = Array2::from_shape_fn((50, 300), |(b, j)| {
        ((b * 13 + j * 5) % 89) as f32 / 44.5 - 1.0
    });
    let mut xbar = Crossbar::program(w.view(), &p, 3, 0).unwrap();
    let y_ref = x.dot(&w.t());
    assert!(rel_err(xbar.mvm(x.view(), 0).view(), y_ref.view()) < 1e-3);
    xbar.drift_to(1e7);
    assert!(rel_err(xbar.mvm(x.view(), 5).view(), y_ref.view()) < 1e-3);
    // And exactly the product with W̃ rounded to binary16, up to f32 summation.
    let w16 = w.mapv(aimc::tile::operand::to_binary16);
    let scaled = xbar.effective_weights();
    assert!(rel_err(scaled.view(), w16.view()) < 1e-3);
}

/// Short-term weight noise and output noise have the prescribed std (ideal device, W = 0 → only
/// output noise; PCM_READ std at W = 1, x = 1 is w_noise·√n).
#[test]
fn output_and_weight_noise_have_prescribed_std() {
    let n_out = 256;
    let batch = 400;
    let mut p = ideal();
    p.periphery.out_noise = 0.1;
    let x = Array2::<f32>::ones((batch, 16));
    let xbar = Crossbar::program(Array2::<f32>::zeros((n_out, 16)).view(), &p, 1, 0).unwrap();
    let y = xbar.mvm(x.view(), 0);
    let std = (y.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / y.len() as f64).sqrt();
    let se = 0.1 / (2.0 * y.len() as f64).sqrt();
    assert!((std - 0.1).abs() < 3.0 * se, "out noise std {std}");
    // Fresh noise per MVM id, identical for equal ids.
    assert_eq!(xbar.mvm(x.view(), 0), y);
    assert_ne!(xbar.mvm(x.view(), 1), y);

    let mut p = ideal();
    p.periphery.w_noise = WeightNoise::PcmRead { std: 0.02 };
    let xbar = Crossbar::program(Array2::<f32>::ones((n_out, 16)).view(), &p, 1, 0).unwrap();
    let y = xbar.mvm(x.view(), 0);
    let dev: Vec<f64> = y.iter().map(|v| *v as f64 - 16.0).collect();
    let std = (dev.iter().map(|d| d * d).sum::<f64>() / dev.len() as f64).sqrt();
    let expected = 0.02 * 4.0;
    assert!(
        (std - expected).abs() < 3.0 * expected / (2.0 * dev.len() as f64).sqrt(),
        "w noise std {std}"
    );
}

/// IR drop lowers |y| and matches the closed form for W = 1, x = 1 on one row.
#[test]
fn ir_drop_matches_closed_form() {
    let mut p = ideal();
    p.periphery.ir_drop = Some(aimc::tile::IrDrop {
        scale: 1.0,
        g_ratio: 571428.6,
    });
    let n = 512usize;
    let xbar = Crossbar::program(Array2::<f32>::ones((1, n)).view(), &p, 1, 0).unwrap();
    let y = xbar.mvm(Array2::<f32>::ones((1, n)).view(), 0)[[0, 0]] as f64;
    let a = n as f64 / 571428.6 * n as f64;
    let c = a * (a * (0.05 * a - 0.2) + 0.5);
    let yf: f64 = (0..n)
        .map(|j| 1.0 - (1.0 - j as f64 / n as f64).powi(2))
        .sum();
    let expected = n as f64 - c * yf;
    assert!(
        (y - expected).abs() < 1e-3 * expected,
        "y {y} vs {expected}"
    );
    assert!(y < n as f64 * 0.9);
}

/// The GPU ADC's division by a reciprocal and two residual steps is IEEE division, bit for bit:
/// for the step of every resolution on several bounds, at each rounding midpoint of the
/// quantiser (v ≈ (k + ½)·Δ, a few ulp either side, where one ulp off would move rint) and
/// on values spread over 2⁻⁶⁰…2⁶⁰ of both signs. One wrong bit in any of them fails the test.
#[test]
fn adc_quotient_by_reciprocal_is_ieee_division() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut checked = 0u64;
    for bits in 2..=16u32 {
        for bound in [1.0f32, 10.0, 12.0, 0.5, 3.3, 1e-3, 7.77e4] {
            let step = Quantizer { bits, bound }.step();
            let inv = 1.0 / step;
            let mut check = |v: f32| {
                let q = quotient_by_reciprocal(v, step, inv);
                assert_eq!(q.to_bits(), (v / step).to_bits(), "v {v:e} step {step:e}");
                checked += 1;
            };
            let levels = (1i64 << bits) / 2;
            let stride = (levels / 512).max(1);
            let mut k = -levels - 2;
            while k <= levels + 2 {
                let mid = (k as f32 + 0.5) * step;
                for d in -6i32..=6 {
                    let v = f32::from_bits((mid.to_bits() as i64 + d as i64) as u32);
                    check(v);
                }
                k += stride;
            }
            for _ in 0..20_000 {
                let r = next();
                let mag = f32::from_bits(0x3F80_0000 | (r as u32 >> 9));
                let e = ((r >> 40) % 121) as i32 - 60;
                let v = mag * 2f32.powi(e) * if r >> 63 == 1 { -1.0 } else { 1.0 };
                check(v);
            }
        }
    }
    assert!(checked > 2_000_000, "{checked} values");
}

/// Where the bound is an output level (`Quantizer::bound_is_a_level`), the quantiser of the
/// input clamped to ±b equals `Quantizer::quantize` (which clamps after) bit for bit: for every
/// resolution and the same bounds, at every level and rounding midpoint near ±b and a few ulp
/// either side, at ±b and its neighbours, beyond the range and at ±∞, and on random values.
/// Where the predicate is false the single clamp must differ somewhere, which the test also
/// finds for some quantiser, so that it could fail if the predicate were `true`.
#[test]
fn one_clamp_before_the_adc_is_the_quantiser_where_the_bound_is_a_level() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut levels_seen, mut not_levels, mut differs_elsewhere) = (0, 0, 0);
    for bits in 2..=16u32 {
        for bound in [1.0f32, 10.0, 12.0, 0.5, 3.3, 1e-3, 7.77e4, 2.0, 0.7, 6.0] {
            let q = Quantizer { bits, bound };
            let step = q.step();
            let one_clamp = |v: f32| aimc::tile::rint(v.clamp(-bound, bound) / step) * step;
            let mut values = vec![f32::INFINITY, f32::NEG_INFINITY, f32::MAX, -f32::MAX, 0.0];
            for b in [bound, -bound] {
                for d in -8i32..=8 {
                    values.push(f32::from_bits((b.to_bits() as i64 + d as i64) as u32));
                }
            }
            let top = (1i64 << (bits - 1)) - 1;
            for k in (top - 40).max(-top)..=top + 2 {
                for sign in [1.0f32, -1.0] {
                    for frac in [0.0f32, 0.5] {
                        let at = sign * (k as f32 + frac) * step;
                        for d in -3i32..=3 {
                            values.push(f32::from_bits((at.to_bits() as i64 + d as i64) as u32));
                        }
                    }
                }
            }
            for _ in 0..4_000 {
                let r = next();
                let u = (r >> 40) as f32 / (1u64 << 24) as f32;
                values.push((2.0 * u - 1.0) * 1.5 * bound);
            }
            let same = values
                .iter()
                .all(|&v| one_clamp(v).to_bits() == q.quantize(v, step).to_bits());
            if q.bound_is_a_level(step) {
                levels_seen += 1;
                for &v in &values {
                    assert_eq!(
                        one_clamp(v).to_bits(),
                        q.quantize(v, step).to_bits(),
                        "{bits} bits, bound {bound}, v {v:e}"
                    );
                }
            } else {
                not_levels += 1;
                differs_elsewhere += usize::from(!same);
            }
        }
    }
    // Both kinds occur among these quantisers, and a bound that is not a level does make the
    // single clamp wrong.
    assert!(
        levels_seen > 50,
        "{levels_seen} quantisers with the bound a level"
    );
    assert!(
        not_levels > 0 && differs_elsewhere > 0,
        "{not_levels} {differs_elsewhere}"
    );
}

/// Every built-in preset's ADC has its bound on a level, so the GPU's single-clamp ADC applies
/// to all of them (a preset where it does not still runs, with both clamps).
#[test]
fn builtin_adcs_have_their_bound_on_a_level() {
    let mut with_adc = 0;
    for name in TilePreset::builtin_names() {
        if let Some(adc) = TilePreset::builtin(name).unwrap().periphery.adc {
            assert!(adc.bound_is_a_level(adc.step()), "{name}");
            with_adc += 1;
        }
    }
    assert!(with_adc >= 8, "{with_adc} presets with an ADC");
}
