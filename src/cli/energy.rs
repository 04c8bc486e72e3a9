//! `aimc energy`: energy, latency and throughput per token of a model mapped onto a costed tile preset, against a
//! GPU; `--scaling` runs the dense-vs-MoE scaling study.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::common::{load_model, load_tokens, write_json};
use super::map::MappingFlags;
use crate::energy::scaling::{self, ScalingConfig, ScalingPoint};
use crate::energy::{
    cost_of, estimate, map_shape, Component, EnergyOptions, EnergyReport, GpuPreset, ModelShape,
};
use crate::mapping::{DigitalSelection, RoutingTrace};
use crate::model::{Model, RouterKind};
use crate::report::bars::{write_stacked_bars, Segment, StackedBars};
use crate::report::{write_line_chart, Legend, LineChart, Series};
use crate::tile::TilePreset;

/// Model shapes that need no checkpoint (random weights are never allocated; the trace comes from a synthetic
/// uniform top-k router).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BuiltinShape {
    /// OLMoE-1B-7B: 16 layers, d 2048, 64 experts of 1024, top-8.
    Olmoe1b7b,
}

#[derive(Args, Debug, Clone)]
pub struct EnergyArgs {
    /// HuggingFace checkpoint directory (default: the embedded model); its routing trace comes from `--calib`.
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Cost a built-in model shape with a synthetic router instead of a checkpoint.
    #[arg(long, value_enum)]
    pub shape: Option<BuiltinShape>,
    /// Tile preset with a `cost` section: a built-in name or a JSON file.
    #[arg(long, default_value = "aimc-3d")]
    pub preset: String,
    /// GPU preset for the digital baseline: a built-in name (`h100`, from tiles/gpu/) or a JSON file.
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    #[command(flatten)]
    pub mapping: MappingFlags,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batch: Vec<usize>,
    /// Cached tokens per sequence during decode.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Prompt length for prefill.
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// Put attention projections and the LM head on analog tiles too (as in Büchel et al.); default: digital.
    #[arg(long)]
    pub analog_projections: bool,
    /// Decode steps replayed per batch size.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Calibration text for the routing trace (default: the embedded held-out text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens (checkpoint) or synthetic trace tokens (`--shape`, `--scaling`).
    #[arg(long, default_value_t = 1024)]
    pub trace_tokens: usize,
    /// Seed of the synthetic router.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Run the dense-vs-MoE scaling study instead (synthetic configurations, fixed chip of `--scaling-stacks`).
    #[arg(long)]
    pub scaling: bool,
    /// Stacks of the fixed chip in the scaling study.
    #[arg(long, default_value_t = 1024)]
    pub scaling_stacks: usize,
    /// Output folder.
    #[arg(long, default_value = "aimc-out/energy")]
    pub out: PathBuf,
}

pub fn run(args: EnergyArgs) -> Result<()> {
    let preset = TilePreset::resolve(&args.preset)?;
    cost_of(&preset)?;
    let gpu = GpuPreset::resolve(&args.gpu)?;
    let opts = EnergyOptions {
        batches: args.batch.clone(),
        context: args.context,
        prefill_tokens: args.prefill,
        decode_steps: args.steps,
        analog_projections: args.analog_projections || args.scaling,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.scaling {
        return run_scaling(&args, &preset, &gpu, &opts);
    }
    let mut mapping_opts = args.mapping.options();
    let (shape, trace, model): (ModelShape, RoutingTrace, Option<Model>) = match args.shape {
        Some(BuiltinShape::Olmoe1b7b) => {
            let shape = ModelShape::olmoe_1b_7b();
            let trace = shape.synthetic_trace(args.trace_tokens, args.seed);
            (shape, trace, None)
        }
        None => {
            let model = load_model(args.model.as_deref())?;
            let tokens = load_tokens(&model, args.calib.as_deref(), args.trace_tokens)?;
            let trace = RoutingTrace::collect(&model, &tokens, 512, RouterKind::default())
                .context("collecting the routing trace on the calibration text")?;
            let name = args
                .model
                .as_ref()
                .map_or("embedded".to_string(), |p| p.display().to_string());
            (ModelShape::from_model(&name, &model), trace, Some(model))
        }
    };
    if model.is_none()
        && mapping_opts.digital_fraction > 0.0
        && mapping_opts.digital_selection == DigitalSelection::MaxNeuronNorm
    {
        println!("note: no weights for the max-neuron-norm selection; choosing digital experts at random (seed {})", args.seed);
        mapping_opts.digital_selection = DigitalSelection::Random { seed: args.seed };
    }
    let lookup = |id| model.as_ref().and_then(|m| m.matrix(id));
    let mapping = map_shape(&preset, &shape, &mapping_opts, &lookup, &trace)?;
    let report = estimate(&preset, &gpu, &shape, &mapping, &trace, &opts)?;
    print_report(&report);
    write_json(&args.out.join("energy.json"), &report)?;
    write_plots(&report, &args.out)?;
    println!(
        "wrote {}/{{energy.json, breakdown, energy_vs_batch, analog_vs_gpu}}.{{png,svg}}",
        args.out.display()
    );
    Ok(())
}

/// Energy in a readable unit.
pub(super) fn joules(j: f64) -> String {
    let a = j.abs();
    if a >= 1e-3 {
        format!("{:.3} mJ", j * 1e3)
    } else if a >= 1e-6 {
        format!("{:.3} µJ", j * 1e6)
    } else {
        format!("{:.3} nJ", j * 1e9)
    }
}

/// Time in a readable unit.
pub(super) fn seconds(s: f64) -> String {
    if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else {
        format!("{:.3} µs", s * 1e6)
    }
}

fn print_report(r: &EnergyReport) {
    println!(
        "model {}  ({:.2}B params, {:.2}B active)  preset {}  strategy {}  stacks {} ({} chip(s))",
        r.model.name,
        r.model.total_params() as f64 / 1e9,
        r.model.active_params() as f64 / 1e9,
        r.preset,
        r.mapping_strategy,
        r.stacks_used,
        r.chips
    );
    println!(
        "{:<9} {:>6} {:>13} {:>13} {:>12} {:>10} {:>12} | {:>5} {:>13} {:>13} {:>12}",
        "phase",
        "batch",
        "energy/token",
        "latency/tok",
        "tokens/s",
        "switch/tok",
        "bottleneck",
        "GPUs",
        "GPU energy",
        "GPU latency",
        "GPU tok/s"
    );
    let rows = r
        .decode
        .iter()
        .zip(&r.gpu_decode)
        .map(|(a, g)| ("decode", a, g))
        .chain(std::iter::once(("prefill", &r.prefill, &r.gpu_prefill)));
    for (phase, a, g) in rows {
        println!(
            "{:<9} {:>6} {:>13} {:>13} {:>12.1} {:>10.2} {:>12} | {:>5} {:>13} {:>13} {:>12.1}",
            phase,
            g.tokens_per_step,
            joules(a.energy.total()),
            seconds(a.latency_per_token_s),
            a.tokens_per_s,
            a.tier_switches_per_token,
            a.bottleneck,
            g.gpus,
            joules(g.energy_per_token_j),
            seconds(g.latency_per_token_s),
            g.tokens_per_s
        );
    }
    let best = &r.decode[r.best_decode];
    println!(
        "energy share per component (decode at batch {}, best throughput; prefill):",
        r.options.batches[r.best_decode]
    );
    for c in Component::ALL {
        let d = best.energy.component(c);
        let p = r.prefill.energy.component(c);
        println!(
            "  {:<20} {:>12} {:>6.1}%   {:>12} {:>6.1}%",
            c.label(),
            joules(d),
            100.0 * d / best.energy.total(),
            joules(p),
            100.0 * p / r.prefill.energy.total()
        );
    }
}

pub(super) fn write_plots(r: &EnergyReport, out: &Path) -> Result<()> {
    let mut bars: Vec<String> = r
        .options
        .batches
        .iter()
        .map(|b| format!("decode B={b}"))
        .collect();
    bars.push(format!("prefill {}", r.options.prefill_tokens));
    let phases: Vec<_> = r.decode.iter().chain(std::iter::once(&r.prefill)).collect();
    let chart = StackedBars {
        title: format!("Energy per token: {} on {}", r.model.name, r.preset),
        y_label: "energy per token (J)".into(),
        bars,
        segments: Component::ALL
            .iter()
            .map(|&c| Segment {
                label: c.label().into(),
                values: phases.iter().map(|p| p.energy.component(c)).collect(),
            })
            .collect(),
    };
    write_stacked_bars(&chart, &out.join("breakdown"))?;
    let xs: Vec<f64> = r.options.batches.iter().map(|&b| b as f64).collect();
    let line = |label: &str, ys: Vec<f64>| Series {
        label: label.into(),
        points: xs.iter().copied().zip(ys).collect(),
        band: None,
    };
    write_line_chart(
        &LineChart {
            title: format!("Decode energy per token vs batch: {}", r.model.name),
            x_label: "batch size".into(),
            y_label: "energy per token (J)".into(),
            log_x: true,
            log_y: true,
            series: vec![
                line(
                    &format!("{} (analog)", r.preset),
                    r.decode.iter().map(|p| p.energy.total()).collect(),
                ),
                line(
                    &format!("{} analog tiles only", r.preset),
                    r.decode.iter().map(|p| p.energy.analog()).collect(),
                ),
                line(
                    &r.gpu,
                    r.gpu_decode.iter().map(|g| g.energy_per_token_j).collect(),
                ),
            ],
            legend: Legend::UpperRight,
        },
        &out.join("energy_vs_batch"),
    )?;
    write_line_chart(
        &LineChart {
            title: format!("Decode throughput, analog vs GPU: {}", r.model.name),
            x_label: "batch size".into(),
            y_label: "tokens per second".into(),
            log_x: true,
            log_y: true,
            series: vec![
                line(
                    &format!("{} (analog)", r.preset),
                    r.decode.iter().map(|p| p.tokens_per_s).collect(),
                ),
                line(
                    &r.gpu,
                    r.gpu_decode.iter().map(|g| g.tokens_per_s).collect(),
                ),
            ],
            legend: Legend::UpperLeft,
        },
        &out.join("analog_vs_gpu"),
    )?;
    Ok(())
}

fn run_scaling(
    args: &EnergyArgs,
    preset: &TilePreset,
    gpu: &GpuPreset,
    opts: &EnergyOptions,
) -> Result<()> {
    let config = ScalingConfig {
        stacks: args.scaling_stacks,
        trace_tokens: args.trace_tokens,
        seed: args.seed,
        ..Default::default()
    };
    let points = scaling::run(preset, gpu, &config, opts)?;
    println!(
        "scaling study on {} ({} stacks fixed), GPU {}; synthetic d={} L={} expert width {} top-{}",
        preset.name,
        config.stacks,
        gpu.name,
        config.hidden,
        config.layers,
        config.intermediate,
        config.top_k
    );
    println!(
        "{:<6} {:>4} {:>8} {:>8} {:>6} {:>6} {:>12} {:>13} {:>13} {:>12} {:>13}",
        "family",
        "E",
        "total B",
        "active B",
        "tiers",
        "batch",
        "tokens/s",
        "energy/token",
        "latency B=1",
        "GPU tok/s",
        "GPU energy"
    );
    for p in &points {
        println!(
            "{:<6} {:>4} {:>8.3} {:>8.3} {:>6} {:>6} {:>12.1} {:>13} {:>13} {:>12.1} {:>13}",
            p.family,
            p.experts,
            p.total_params as f64 / 1e9,
            p.active_params as f64 / 1e9,
            p.tiers_per_stack,
            p.best_batch,
            p.tokens_per_s,
            joules(p.energy_per_token_j),
            seconds(p.latency_per_token_s),
            p.gpu_tokens_per_s,
            joules(p.gpu_energy_per_token_j)
        );
    }
    #[derive(serde::Serialize)]
    struct Out<'a> {
        preset: &'a str,
        gpu: &'a str,
        config: &'a ScalingConfig,
        options: &'a EnergyOptions,
        points: &'a [ScalingPoint],
    }
    write_json(
        &args.out.join("scaling.json"),
        &Out {
            preset: &preset.name,
            gpu: &gpu.name,
            config: &config,
            options: opts,
            points: &points,
        },
    )?;
    let series = |family: &str, label: &str, f: &dyn Fn(&ScalingPoint) -> f64| Series {
        label: label.into(),
        points: points
            .iter()
            .filter(|p| p.family == family)
            .map(|p| (p.total_params as f64 / 1e9, f(p)))
            .collect(),
        band: None,
    };
    write_line_chart(
        &LineChart {
            title: format!(
                "Throughput vs model size ({}, fixed {} stacks)",
                preset.name, config.stacks
            ),
            x_label: "total parameters (billions)".into(),
            y_label: "decode tokens per second (best batch)".into(),
            log_x: true,
            log_y: true,
            series: vec![
                series("dense", &format!("dense on {}", preset.name), &|p| {
                    p.tokens_per_s
                }),
                series("moe", &format!("MoE on {}", preset.name), &|p| {
                    p.tokens_per_s
                }),
                series("dense", &format!("dense on {}", gpu.name), &|p| {
                    p.gpu_tokens_per_s
                }),
                series("moe", &format!("MoE on {}", gpu.name), &|p| {
                    p.gpu_tokens_per_s
                }),
            ],
            legend: Legend::LowerLeft,
        },
        &args.out.join("scaling_throughput"),
    )?;
    write_line_chart(
        &LineChart {
            title: format!(
                "Energy per token vs model size ({}, fixed {} stacks)",
                preset.name, config.stacks
            ),
            x_label: "total parameters (billions)".into(),
            y_label: "energy per token (J)".into(),
            log_x: true,
            log_y: true,
            series: vec![
                series("dense", &format!("dense on {}", preset.name), &|p| {
                    p.energy_per_token_j
                }),
                series("moe", &format!("MoE on {}", preset.name), &|p| {
                    p.energy_per_token_j
                }),
                series("dense", &format!("dense on {}", gpu.name), &|p| {
                    p.gpu_energy_per_token_j
                }),
                series("moe", &format!("MoE on {}", gpu.name), &|p| {
                    p.gpu_energy_per_token_j
                }),
            ],
            legend: Legend::UpperLeft,
        },
        &args.out.join("scaling_energy"),
    )?;
    println!(
        "wrote {}/{{scaling.json, scaling_throughput, scaling_energy}}.{{png,svg}}",
        args.out.display()
    );
    Ok(())
}
