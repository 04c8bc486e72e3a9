//! A new memory technology in under 60 lines: implement `Device`, then evaluate the embedded model with it.
//!
//! The toy technology here is a ferroelectric-like cell (an assumption for illustration, not a fitted model):
//! programming noise of constant σ = 0.3 µS, no power-law drift, and a retention loss that relaxes the conductance
//! towards g_max/2 with a 30-day time constant; read noise 1 % of g.
//!
//! `cargo run --release --example custom_device`
use std::sync::Arc;

use aimc::device::Device;
use aimc::eval::analog::{evaluate, AnalogEvalConfig};
use aimc::mapping::{map_matrices, ChipGeometry, MappingOptions, MatrixSpec};
use aimc::model::{embedded, RouterKind};
use aimc::tile::TilePreset;

#[derive(Debug)]
struct Relaxing {
    g_max_us: f32,
    tau_s: f64,
}

impl Device for Relaxing {
    fn name(&self) -> &str {
        "relaxing-fe"
    }
    fn g_max_us(&self) -> f32 {
        self.g_max_us
    }
    fn program(&self, g_target_us: f32, xi: f32) -> f32 {
        (g_target_us + 0.3 * xi).clamp(0.0, self.g_max_us)
    }
    fn drift_exponent(&self, _g_target_us: f32, _xi: f32) -> f32 {
        0.0
    }
    fn read(&self, g_prog_us: f32, _nu: f32, t_inference_s: f64, xi: f32) -> f32 {
        let keep = (-t_inference_s / self.tau_s).exp() as f32;
        let g = 0.5 * self.g_max_us + (g_prog_us - 0.5 * self.g_max_us) * keep;
        (g * (1.0 + 0.01 * xi)).max(0.0)
    }
}

fn main() -> anyhow::Result<()> {
    let model = embedded::load()?;
    let mut tokens = model.tokenizer()?.encode(embedded::default_text()?)?;
    tokens.truncate(1024);
    let preset = TilePreset::builtin("pcm-3d-8tier")?;
    let specs = MatrixSpec::from_model(&model);
    let geo = ChipGeometry {
        rows: 512,
        cols: 512,
        tiers_per_stack: 8,
        stacks: 128,
    };
    let lookup = |id| model.matrix(id);
    let mapping = map_matrices(&specs, geo, &MappingOptions::default(), &lookup, None)?;
    let device: Arc<dyn Device> = Arc::new(Relaxing {
        g_max_us: 25.0,
        tau_s: 30.0 * 86_400.0,
    });
    for (label, device) in [
        ("PCM (preset)", None),
        ("relaxing-fe (custom)", Some(device)),
    ] {
        let cfg = AnalogEvalConfig {
            times_s: vec![0.0, 86_400.0, 31_536_000.0],
            seeds: vec![0, 1],
            seq_len: 512,
            router: RouterKind::default(),
            progress: false,
            device,
            execution: Default::default(),
        };
        let r = evaluate(&model, &mapping, &preset, &tokens, &cfg)?;
        println!("{label}: digital perplexity {:.3}", r.digital_perplexity);
        for s in &r.summary {
            println!(
                "  t = {:>10} s  perplexity {:.3} ± {:.3}  agreement {:.4}",
                s.t_seconds, s.perplexity_mean, s.perplexity_std, s.agreement_mean
            );
        }
    }
    Ok(())
}
