//! The noise budget of the fine-tuning objective on the embedded model: each MoE layer's
//! relative squared error Σ‖ŷ − y‖²/Σ‖y‖² on the calibration text with one noise draw, under
//! the default preset and under variants with one nonideality removed at a time. Used by
//! reports/finetune/ to say what limits fine-tuning.
//!
//! `cargo run --release --example finetune_noise_budget [-- CHECKPOINT_DIR]`
use aimc::device::{DeviceKind, DeviceSpec, DriftTable};
use aimc::finetune::calib::{record, EMBEDDED_CALIB_TEXT};
use aimc::finetune::noisy::{CpuObjective, LayerObjective};
use aimc::finetune::{noise_seed, EVAL_STEP};
use aimc::model::{embedded, Ffn, Model, RouterKind};
use aimc::tile::{BoundManagement, TilePreset, WeightNoise};

fn main() -> anyhow::Result<()> {
    let model = match std::env::args().nth(1) {
        Some(dir) => Model::load(std::path::Path::new(&dir))?,
        None => embedded::load()?,
    };
    let mut tokens = model.tokenizer()?.encode(EMBEDDED_CALIB_TEXT)?;
    tokens.truncate(4096);
    let calib = record(&model, &tokens, 512, RouterKind::default())?;
    let base = TilePreset::builtin("pcm-3d-8tier")?;
    let year = 365.0 * 86400.0;
    let mut quiet = base.clone();
    quiet.periphery.out_noise = 0.0;
    quiet.periphery.w_noise = WeightNoise::None;
    let mut no_conv = base.clone();
    no_conv.periphery.dac = None;
    no_conv.periphery.adc = None;
    no_conv.periphery.bound_management = BoundManagement::None;
    let mut no_prog = base.clone();
    no_prog.device.prog_noise_scale = Some(0.0);
    let mut no_read = base.clone();
    no_read.device.read_noise_scale = Some(0.0);
    let mut no_drift = base.clone();
    no_drift.device.drift_scale = Some(0.0);
    // The drift law of `pcm` with the device-to-device spread of ν removed: what is left of
    // drift is its conductance-dependent mean, a deterministic distortion.
    let mut mean_nu = base.clone();
    let g_us: Vec<f32> = (0..=60)
        .map(|k| 25.0 * 10f32.powf(-6.0 + 0.1 * k as f32))
        .collect();
    let nu_mean = g_us
        .iter()
        .map(|g| (-0.0155 * (g / 25.0).ln() + 0.0244).clamp(0.049, 0.1))
        .collect();
    mean_nu.device = DeviceSpec {
        drift_table: Some(DriftTable {
            nu_std: vec![0.0; g_us.len()],
            g_us,
            nu_mean,
        }),
        ..DeviceSpec::of_kind(DeviceKind::CustomDrift)
    };
    let variants: Vec<(&str, &TilePreset, Option<f64>)> = vec![
        ("pcm-3d-8tier, 1 y", &base, Some(year)),
        ("pcm-3d-8tier, 0 s", &base, Some(0.0)),
        ("programming only (no read-out)", &base, None),
        ("1 y, no output/short-term noise", &quiet, Some(year)),
        ("1 y, ideal DAC/ADC", &no_conv, Some(year)),
        ("1 y, no programming noise", &no_prog, Some(year)),
        ("1 y, no read noise", &no_read, Some(year)),
        ("1 y, no drift", &no_drift, Some(year)),
        (
            "1 y, drift without its spread (mean ν(g) only)",
            &mean_nu,
            Some(year),
        ),
    ];
    print!("| variant |");
    for c in &calib {
        print!(" layer {} |", c.layer);
    }
    println!("\n|---|{}", "---|".repeat(calib.len()));
    for (name, preset, t) in variants {
        let objective = CpuObjective::new(preset, t);
        print!("| {name} |");
        for c in &calib {
            let Ffn::Moe(m) = &model.layers[c.layer].ffn else {
                continue;
            };
            let l = objective.evaluate(&m.experts, &c.batch(), noise_seed(0, EVAL_STEP), false)?;
            print!(" {:.4} |", l.loss);
        }
        println!();
    }
    Ok(())
}
