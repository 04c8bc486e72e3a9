//! A small synthetic MoE layer for the fine-tuning tests: random experts, inputs and top-2
//! routing from the keyed test-data stream, the digital output computed here independently.
#![allow(dead_code)]
use aimc::finetune::calib::LayerCalib;
use aimc::model::common::SwiGlu;
use aimc::model::Assignment;
use aimc::rng::{Purpose, Stream};
use aimc::tile::TilePreset;
use ndarray::Array2;

/// Hidden width, expert width, experts, tokens of the synthetic layer.
pub const H: usize = 24;
pub const I: usize = 12;
pub const E: usize = 4;
pub const T: usize = 48;

fn normals(tensor: u32, shape: (usize, usize), scale: f32) -> Array2<f32> {
    let s = Stream::new(7, Purpose::TestData, tensor);
    Array2::from_shape_fn(shape, |(i, j)| {
        scale * s.normal((i * shape.1 + j) as u64, 0)
    })
}

/// Random experts (weights ~ N(0, 1/fan-in)); `variant` picks another draw.
pub fn experts(variant: u32) -> Vec<SwiGlu> {
    (0..E as u32)
        .map(|e| SwiGlu {
            gate_up: normals(
                100 * variant + 10 * e + 1,
                (2 * I, H),
                (H as f32).powf(-0.5),
            ),
            down: normals(100 * variant + 10 * e + 2, (H, I), (I as f32).powf(-0.5)),
        })
        .collect()
}

/// Digital routed output Σ w·down(silu(gate·x) ⊙ up·x).
pub fn digital(experts: &[SwiGlu], x: &Array2<f32>, a: &[Assignment]) -> Array2<f32> {
    let mut y = Array2::<f32>::zeros(x.raw_dim());
    for asg in a {
        let e = &experts[asg.expert as usize];
        let xt = x.row(asg.token as usize);
        let gu = e.gate_up.dot(&xt);
        let h = ndarray::Array1::from_shape_fn(I, |i| {
            let g = gu[i];
            g / (1.0 + (-g).exp()) * gu[I + i]
        });
        let o = e.down.dot(&h);
        y.row_mut(asg.token as usize).scaled_add(asg.weight, &o);
    }
    y
}

/// A layer whose target comes from `target` experts (another draw of the same shapes) or
/// from the trained experts themselves (`None`: the loss is zero up to float error).
pub fn layer(target: Option<&[SwiGlu]>, own: &[SwiGlu]) -> LayerCalib {
    let x = normals(1, (T, H), 1.0);
    let mut assignments = Vec::new();
    for t in 0..T {
        let (e0, e1) = (t % E, (t / E + t + 1) % E);
        let e1 = if e1 == e0 { (e0 + 1) % E } else { e1 };
        let (w0, w1) = (0.6, 0.4);
        let mut pair = [(e0, w0), (e1, w1)];
        pair.sort_by_key(|p| p.0);
        for (e, w) in pair {
            assignments.push(Assignment {
                token: t as u32,
                expert: e as u32,
                weight: w,
            });
        }
    }
    let y = digital(target.unwrap_or(own), &x, &assignments);
    LayerCalib {
        layer: 1,
        x,
        y,
        assignments,
    }
}

/// A preset from the `ideal` one with the given periphery JSON and device kind.
pub fn preset(device: &str, periphery: &str, drift_compensation: &str) -> TilePreset {
    let text = format!(
        r#"{{"name": "test", "description": "test", "device": {{"kind": "{device}"}},
        "mapping": {{"weight_scaling_omega": 1.0, "per_column": true}},
        "periphery": {periphery}, "drift_compensation": "{drift_compensation}",
        "stack": {{"rows": 512, "cols": 512, "tiers_per_stack": 1, "stacks": 64}}}}"#
    );
    TilePreset::from_json_str(&text, "test").expect("valid test preset")
}

/// Periphery with `bits`-bit DAC (bound 1, abs-max) and ADC (bound `adc_bound`), no noise, no
/// bound management.
pub fn quantised_periphery(bits: u32, adc_bound: f32) -> String {
    format!(
        r#"{{"noise_management": {{"kind": "abs_max"}}, "dac": {{"bits": {bits}, "bound": 1.0}},
        "adc": {{"bits": {bits}, "bound": {adc_bound}}}, "out_noise": 0.0,
        "w_noise": {{"kind": "none"}}, "ir_drop": null, "bound_management": "none"}}"#
    )
}

/// No DAC, no ADC, no noise.
pub const IDEAL_PERIPHERY: &str = r#"{"noise_management": {"kind": "none"}, "dac": null,
    "adc": null, "out_noise": 0.0, "w_noise": {"kind": "none"}, "ir_drop": null,
    "bound_management": "none"}"#;
