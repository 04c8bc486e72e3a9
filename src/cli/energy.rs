//! `aimc energy`: energy, latency and throughput per token of a model mapped onto a costed tile preset, the
//! resource that binds each phase, against a GPU; `--scaling` runs the dense-vs-MoE scaling study.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use super::common::{load_model, load_tokens, write_json};
use super::map::MappingFlags;
use crate::energy::gpu::{ExpertReads, ExpertWeightsRead};
use crate::energy::scaling::{self, ScalingConfig, ScalingPoint};
use crate::energy::{
    cost_of, estimate, joules_si, map_shape, paper_mapping, plots, seconds_si, Component,
    EnergyOptions, EnergyReport, GpuPreset, KvCacheLevel, KvCachePlacement, ModelShape,
    Projections,
};
use crate::mapping::{DigitalSelection, RoutingTrace};
use crate::model::{Model, RouterKind};
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
    #[arg(long, conflicts_with_all = ["shape", "shape_file"])]
    pub model: Option<PathBuf>,
    /// Cost a built-in model shape with a synthetic router instead of a checkpoint.
    #[arg(long, value_enum, conflicts_with = "shape_file")]
    pub shape: Option<BuiltinShape>,
    /// Cost a model shape given as JSON (the `model` object of energy.json), with a synthetic router.
    #[arg(long)]
    pub shape_file: Option<PathBuf>,
    /// Tile preset with a `cost` section: a built-in name (aimc-3d, 3dsim, buchel2025, pcm-3d-8tier, hermes) or a
    /// JSON file.
    #[arg(long, default_value = "aimc-3d")]
    pub preset: String,
    /// GPU preset for the digital baseline: a built-in name (`h100`, `a100`) or a JSON file.
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    #[command(flatten)]
    pub mapping: MappingFlags,
    /// Decode batch sizes (each ≥ 1).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub batch: Vec<usize>,
    /// Cached tokens per sequence during decode.
    #[arg(long, default_value_t = 512)]
    pub context: usize,
    /// Prompt length for prefill (≥ 1).
    #[arg(long, default_value_t = 512)]
    pub prefill: usize,
    /// Cost the variant with attention projections and LM head on the digital units (default: the paper's
    /// system, every linear layer on analog tiers).
    #[arg(long)]
    pub digital_projections: bool,
    /// Where the KV cache lives, overriding the preset's `cost.memory.kv_cache`: `by-capacity` (on-chip SRAM while
    /// it fits) or `off-chip` (always in off-chip memory; with `buchel2025`, 3D-SiM's 5.332 GB/s DRAM, as its own
    /// `kv_cache_latency` loads it).
    #[arg(long, value_enum)]
    pub kv_cache: Option<KvCacheFlag>,
    /// Which expert weights a GPU step reads, overriding the GPU preset: `used` (the experts the batch chose) or
    /// `all` (every expert each step, the whole model fetched per step).
    #[arg(long, value_enum)]
    pub gpu_expert_reads: Option<GpuReadsFlag>,
    /// Decode steps replayed per batch size (≥ 1).
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Calibration text for the routing trace (default: the embedded held-out text).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Calibration tokens (checkpoint) or synthetic trace tokens (`--shape`, `--shape-file`, `--scaling`), ≥ 1.
    #[arg(long, default_value_t = 1024)]
    pub trace_tokens: usize,
    /// Seed of the synthetic router.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Run the dense-vs-MoE scaling study instead (synthetic configurations, fixed chip of `--scaling-stacks`).
    #[arg(long)]
    pub scaling: bool,
    /// Stacks of the fixed chip in the scaling study (≥ 1).
    #[arg(long, default_value_t = 1024)]
    pub scaling_stacks: usize,
    /// Output folder.
    #[arg(long, default_value = "aimc-out/energy")]
    pub out: PathBuf,
}

/// `--kv-cache`: where the KV cache lives.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvCacheFlag {
    /// On-chip SRAM while it fits, the rest off chip.
    ByCapacity,
    /// Always off-chip memory.
    OffChip,
}

impl KvCacheFlag {
    fn placement(self) -> KvCachePlacement {
        let (level, flag) = match self {
            KvCacheFlag::ByCapacity => (KvCacheLevel::ByCapacity, "by-capacity"),
            KvCacheFlag::OffChip => (KvCacheLevel::OffChip, "off-chip"),
        };
        KvCachePlacement {
            level,
            source: format!("command line: --kv-cache {flag}"),
        }
    }
}

/// `--gpu-expert-reads`: which expert weights a GPU step reads.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuReadsFlag {
    /// The experts the step's tokens chose.
    Used,
    /// Every expert, each step.
    All,
}

/// Checks the numeric flags before any work; the error names the flag and the bad value.
fn check_flags(args: &EnergyArgs) -> Result<()> {
    if args.batch.is_empty() {
        bail!("--batch: give at least one decode batch size");
    }
    if let Some(b) = args.batch.iter().find(|&&b| b == 0 || b > 1 << 20) {
        bail!("--batch: each batch size must be in 1..=1048576, got {b}");
    }
    if args.prefill == 0 || args.prefill > 1 << 20 {
        bail!(
            "--prefill: the prompt length must be in 1..=1048576, got {}",
            args.prefill
        );
    }
    if args.context > 1 << 24 {
        bail!(
            "--context: at most 16777216 cached tokens, got {}",
            args.context
        );
    }
    if args.steps == 0 || args.steps > 1 << 16 {
        bail!("--steps: must be in 1..=65536, got {}", args.steps);
    }
    if args.trace_tokens == 0 {
        bail!("--trace-tokens: must be ≥ 1, got 0");
    }
    if args.scaling_stacks == 0 {
        bail!("--scaling-stacks: must be ≥ 1, got 0");
    }
    Ok(())
}

pub fn run(args: EnergyArgs) -> Result<()> {
    check_flags(&args)?;
    let mut preset = TilePreset::resolve(&args.preset)?;
    cost_of(&preset)?;
    if let (Some(flag), Some(cost)) = (args.kv_cache, preset.cost.as_mut()) {
        cost.memory.kv_cache = Some(flag.placement());
    }
    let mut gpu = GpuPreset::resolve(&args.gpu)?;
    if let Some(flag) = args.gpu_expert_reads {
        let (value, name) = match flag {
            GpuReadsFlag::Used => (ExpertReads::Used, "used"),
            GpuReadsFlag::All => (ExpertReads::All, "all"),
        };
        gpu.expert_weights_read = Some(ExpertWeightsRead {
            value,
            source: format!("command line: --gpu-expert-reads {name}"),
        });
    }
    let opts = EnergyOptions {
        batches: args.batch.clone(),
        context: args.context,
        prefill_tokens: args.prefill,
        decode_steps: args.steps,
        projections: if args.digital_projections {
            Projections::Digital
        } else {
            Projections::Analog
        },
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    if args.scaling {
        return run_scaling(&args, &preset, &gpu, &opts);
    }
    let mut mapping_opts = paper_mapping(args.mapping.options(), opts.projections);
    let (shape, trace, model): (ModelShape, RoutingTrace, Option<Model>) =
        match (args.shape, &args.shape_file) {
            (Some(BuiltinShape::Olmoe1b7b), _) => {
                let shape = ModelShape::olmoe_1b_7b();
                let trace = shape.synthetic_trace(args.trace_tokens, args.seed);
                (shape, trace, None)
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading --shape-file {}", path.display()))?;
                let de = &mut serde_json::Deserializer::from_str(&text);
                let shape: ModelShape = serde_path_to_error::deserialize(de).map_err(|e| {
                    anyhow::anyhow!(
                        "--shape-file {}: field `{}`: {}",
                        path.display(),
                        e.path(),
                        e.inner()
                    )
                })?;
                shape
                    .validate()
                    .with_context(|| format!("--shape-file {}", path.display()))?;
                let trace = shape.synthetic_trace(args.trace_tokens, args.seed);
                (shape, trace, None)
            }
            (None, None) => {
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
    print!("{}", report_text(&report));
    write_json(&args.out.join("energy.json"), &report)?;
    plots::write_all(&report, &args.out)?;
    println!(
        "wrote {}/{{energy.json, breakdown, throughput_vs_batch, energy_vs_batch, busy_vs_batch}}.{{png,svg}}",
        args.out.display()
    );
    Ok(())
}

/// The table `aimc energy` prints: one row per phase with its bottleneck in words, the busy time of every
/// resource, and the energy per component.
pub fn report_text(r: &EnergyReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {}  ({:.2}B params, {:.2}B active)  preset {}  costed system: {}; {}",
        r.model.name,
        r.model.total_params() as f64 / 1e9,
        r.model.active_params() as f64 / 1e9,
        r.preset,
        r.system,
        r.kv_cache
    );
    let _ = writeln!(
        s,
        "mapping {}: {} stacks for experts/MLPs + {} for projections and LM head ({} chip(s)); GPU {} ({})",
        r.mapping_strategy
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        r.stacks_used,
        r.projection_stacks,
        r.chips,
        r.gpu,
        r.gpu_expert_reads
    );
    let _ = writeln!(
        s,
        "{:<14} {:>13} {:>12} {:>12} {:>10} | {:>5} {:>12} {:>12} | bottleneck",
        "phase",
        "energy/token",
        "latency/tok",
        "tokens/s",
        "switch/tok",
        "GPUs",
        "GPU energy",
        "GPU tok/s"
    );
    let rows = r
        .decode
        .iter()
        .zip(&r.gpu_decode)
        .chain(std::iter::once((&r.prefill, &r.gpu_prefill)));
    for (a, g) in rows {
        let _ = writeln!(
            s,
            "{:<14} {:>13} {:>12} {:>12.1} {:>10.2} | {:>5} {:>12} {:>12.1} | {}",
            a.scenario.label(),
            joules_si(a.energy.total()),
            seconds_si(a.latency_per_token_s),
            a.tokens_per_s,
            a.tier_switches_per_token,
            g.gpus,
            joules_si(g.energy_per_token_j),
            g.tokens_per_s,
            a.bottleneck.description
        );
    }
    let _ = writeln!(s, "busy time per step of every resource:");
    let _ = write!(s, "  {:<18}", "resource");
    let phases: Vec<_> = r.decode.iter().chain(std::iter::once(&r.prefill)).collect();
    for p in &phases {
        let _ = write!(s, " {:>14}", p.scenario.label());
    }
    let _ = writeln!(s);
    for i in 0..7 {
        let _ = write!(s, "  {:<18}", phases[0].busy_per_step.entries()[i].1);
        for p in &phases {
            let e = p.busy_per_step.entries()[i];
            let mark = if e.0 == p.bottleneck.resource {
                "*"
            } else {
                " "
            };
            let _ = write!(s, " {:>13}{mark}", seconds_si(e.2));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "  (* binds)");
    let _ = writeln!(s, "energy per token by component:");
    let _ = write!(s, "  {:<30}", "component");
    for p in &phases {
        let _ = write!(s, " {:>14}", p.scenario.label());
    }
    let _ = writeln!(s);
    for c in Component::ALL {
        let _ = write!(s, "  {:<30}", c.label());
        for p in &phases {
            let _ = write!(s, " {:>14}", joules_si(p.energy.component(c)));
        }
        let _ = writeln!(s);
    }
    for i in 0..5 {
        let name = format!("  static: {}", phases[0].static_energy.entries()[i].0);
        let _ = write!(s, "  {name:<30}");
        for p in &phases {
            let _ = write!(s, " {:>14}", joules_si(p.static_energy.entries()[i].1));
        }
        let _ = writeln!(s);
    }
    s
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
    print!("{}", scaling_text(preset, gpu, &config, opts, &points));
    #[derive(serde::Serialize)]
    struct Out<'a> {
        preset: &'a str,
        gpu: &'a str,
        system: &'a str,
        config: &'a ScalingConfig,
        options: &'a EnergyOptions,
        points: &'a [ScalingPoint],
    }
    write_json(
        &args.out.join("scaling.json"),
        &Out {
            preset: &preset.name,
            gpu: &gpu.name,
            system: opts.projections.label(),
            config: &config,
            options: opts,
            points: &points,
        },
    )?;
    plots::write_scaling(&points, &preset.name, &gpu.name, &config, opts, &args.out)?;
    println!(
        "wrote {}/{{scaling.json, scaling_throughput, scaling_energy}}.{{png,svg}}",
        args.out.display()
    );
    Ok(())
}

/// The scaling study's table.
pub fn scaling_text(
    preset: &TilePreset,
    gpu: &GpuPreset,
    config: &ScalingConfig,
    opts: &EnergyOptions,
    points: &[ScalingPoint],
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "scaling study on {} ({} stacks fixed; {}; {}), GPU {} ({}); synthetic d={} L={} expert width {} top-{}; \
         context {}",
        preset.name,
        config.stacks,
        opts.projections.label(),
        preset
            .cost
            .as_ref()
            .map_or("", |c| c.memory.kv_cache_level().label()),
        gpu.name,
        gpu.expert_reads().label(),
        config.hidden,
        config.layers,
        config.intermediate,
        config.top_k,
        opts.context
    );
    let _ = writeln!(
        s,
        "{:<6} {:>4} {:>8} {:>8} {:>6} {:>6} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} | bottleneck",
        "family",
        "E",
        "total B",
        "active B",
        "tiers",
        "batch",
        "tokens/s",
        "energy/tok",
        "GPU tok/s",
        "GPU energy",
        "speed-up",
        "energy ×"
    );
    for p in points {
        for b in &p.per_batch {
            let _ = writeln!(
                s,
                "{:<6} {:>4} {:>8.3} {:>8.3} {:>6} {:>6} {:>12.1} {:>12} {:>12.1} {:>12} {:>9.2} {:>9.0} | {}",
                p.family,
                p.experts,
                p.total_params as f64 / 1e9,
                p.active_params as f64 / 1e9,
                p.tiers_per_stack,
                b.batch,
                b.tokens_per_s,
                joules_si(b.energy_per_token_j),
                b.gpu_tokens_per_s,
                joules_si(b.gpu_energy_per_token_j),
                b.tokens_per_s / b.gpu_tokens_per_s,
                b.gpu_energy_per_token_j / b.energy_per_token_j,
                b.bottleneck
            );
        }
    }
    s
}
