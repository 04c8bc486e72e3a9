//! The fine-tuning backward: exact against finite differences where the forward is smooth, the
//! straight-through rule inside the converters' range, and zero where the ADC clips.
mod finetune_support;

use aimc::finetune::noisy::{CpuObjective, LayerBatch, LayerObjective};
use aimc::model::common::SwiGlu;
use finetune_support as fs;

/// Loss of `experts` on `layer` through `objective` (no gradient).
fn loss(objective: &CpuObjective<'_>, experts: &[SwiGlu], batch: &LayerBatch<'_>) -> f64 {
    objective.evaluate(experts, batch, 0, false).unwrap().loss
}

/// Every 7th weight of every expert matrix: (expert, matrix 0 = gate_up / 1 = down, flat index).
fn probes() -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for e in 0..fs::E {
        for (m, len) in [(0, 2 * fs::I * fs::H), (1, fs::H * fs::I)] {
            v.extend((0..len).step_by(37).map(|k| (e, m, k)));
        }
    }
    v
}

fn weight(experts: &mut [SwiGlu], (e, m, k): (usize, usize, usize)) -> &mut f32 {
    let a = if m == 0 {
        &mut experts[e].gate_up
    } else {
        &mut experts[e].down
    };
    &mut a.as_slice_mut().unwrap()[k]
}

fn grad(g: &[SwiGlu], (e, m, k): (usize, usize, usize)) -> f32 {
    let a = if m == 0 { &g[e].gate_up } else { &g[e].down };
    a.as_slice().unwrap()[k]
}

/// Central differences of `loss_of` at every probe with step `h`.
fn finite_differences(experts: &[SwiGlu], h: f32, loss_of: impl Fn(&[SwiGlu]) -> f64) -> Vec<f64> {
    probes()
        .into_iter()
        .map(|p| {
            let mut plus = experts.to_vec();
            *weight(&mut plus, p) += h;
            let mut minus = experts.to_vec();
            *weight(&mut minus, p) -= h;
            (loss_of(&plus) - loss_of(&minus)) / (2.0 * f64::from(h))
        })
        .collect()
}

/// ‖a − b‖ / ‖b‖.
fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

#[test]
fn backward_equals_finite_differences_without_quantisation() {
    // No DAC, ADC or noise: the forward is Σ w·SwiGLU(x) through the crossbar's mapping scale
    // (a constant per column) with the block weights W̃ rounded once to binary16 (relative
    // error ≤ 2⁻¹², docs/model.md §3), so the hand-written gradient must equal its derivative up
    // to that rounding: the forward values it is taken at and the finite differences (whose
    // step h = 1e-2 spans many binary16 steps, so they see the smooth function) each differ by
    // O(2⁻¹¹) relative. Central differences add O(h²) ≈ 1e-4 truncation error, the f32 forward
    // ~1e-7/h = 1e-5. Bound: 5e-3 (measured 1.1e-3).
    let preset = fs::preset("ideal", fs::IDEAL_PERIPHERY, "none");
    let objective = CpuObjective::new(&preset, None);
    let experts = fs::experts(0);
    let target = fs::experts(1);
    let layer = fs::layer(Some(&target), &experts);
    let batch = layer.batch();
    let g = objective.evaluate(&experts, &batch, 0, true).unwrap();
    assert!(g.loss > 0.1, "the targets differ: loss {}", g.loss);
    let analytic: Vec<f64> = probes()
        .into_iter()
        .map(|p| f64::from(grad(&g.grads, p)))
        .collect();
    let fd = finite_differences(&experts, 1e-2, |w| loss(&objective, w, &batch));
    let err = relative_error(&analytic, &fd);
    eprintln!("backward vs finite differences: relative error {err:.2e}");
    assert!(err < 5e-3, "relative error {err}");
}

#[test]
fn straight_through_gradient_matches_the_unquantised_function_inside_the_range() {
    // 12-bit DAC (abs-max, so inputs never clip) and 12-bit ADC with a bound of 32 normalised
    // units, far above every output (the largest is ≈ 10): nothing clips, and the
    // straight-through rule defines the gradient as that of the unquantised function, evaluated
    // at the quantised forward. The two differ only through the quantisation of the values the
    // gradient is taken at: each DAC input moves by at most half a step (2⁻¹² of its row's max)
    // and each ADC output by at most half of 64/4094 ≈ 0.016 in normalised units (typical
    // |output| ≈ 1), a relative perturbation of ≲ 1 % per value, which moves the gradient by as
    // much. Bound on the relative L2 difference of the gradients: 2 %.
    let quantised = fs::preset("ideal", &fs::quantised_periphery(12, 32.0), "none");
    let smooth = fs::preset("ideal", fs::IDEAL_PERIPHERY, "none");
    let (q, s) = (
        CpuObjective::new(&quantised, None),
        CpuObjective::new(&smooth, None),
    );
    let experts = fs::experts(0);
    let target = fs::experts(1);
    let layer = fs::layer(Some(&target), &experts);
    let batch = layer.batch();
    let g = q.evaluate(&experts, &batch, 0, true).unwrap();
    let ste: Vec<f64> = probes()
        .into_iter()
        .map(|p| f64::from(grad(&g.grads, p)))
        .collect();
    let fd = finite_differences(&experts, 1e-2, |w| loss(&s, w, &batch));
    let err = relative_error(&ste, &fd);
    eprintln!("straight-through vs unquantised finite differences: relative error {err:.2e}");
    assert!(err < 0.02, "relative error {err}");
    // And the quantised loss itself is close to the smooth one (the forward is the quantised one).
    let (lq, ls) = (g.loss, loss(&s, &experts, &batch));
    assert!((lq - ls).abs() < 0.01 * ls, "quantised {lq} vs smooth {ls}");
}

#[test]
fn gradient_is_zero_where_every_adc_output_clips() {
    // An ADC bound far below every output and no bound management: every output saturates,
    // and the straight-through rule passes nothing outside the range.
    let preset = fs::preset("ideal", &fs::quantised_periphery(8, 1e-4), "none");
    let objective = CpuObjective::new(&preset, None);
    let experts = fs::experts(0);
    let target = fs::experts(1);
    let layer = fs::layer(Some(&target), &experts);
    let batch = layer.batch();
    let g = objective.evaluate(&experts, &batch, 0, true).unwrap();
    assert!(
        g.loss > 0.5,
        "clipped outputs are far from the target: {}",
        g.loss
    );
    for e in &g.grads {
        assert!(e.gate_up.iter().chain(e.down.iter()).all(|&v| v == 0.0));
    }
}
