//! Energy, latency and throughput per token of a mapped model, the resource that binds, and the GPU reference.
//!
//! Inputs: a tile preset with a `cost` section ([`CostModel`]), a model's shapes ([`ModelShape`]), a
//! [`Mapping`] of its FFN matrices onto the preset's stacks, and a [`RoutingTrace`] saying which experts each token
//! used (from calibration text through the digital model, or from a synthetic router). [`EnergyModel::run`] replays
//! the trace for decode at each batch size and for prefill; [`gpu::estimate`] gives the roofline of the same model
//! on a GPU preset. [`scaling`] builds the dense-vs-MoE study of Büchel et al. (Nat. Comput. Sci. 2025);
//! [`plots`] draws the figures.

pub mod breakdown;
pub mod cost;
pub mod gpu;
mod phase;
pub mod plots;
pub mod scaling;
pub mod shape;
mod sim;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use breakdown::{Breakdown, Component, N_COMPONENTS};
pub use cost::{Constant, CostModel, KvCacheLevel, KvCachePlacement};
pub use gpu::{GpuEstimate, GpuPreset};
pub use phase::{
    bytes_si, joules_si, seconds_si, Bottleneck, PhaseCost, Placement, ResourceBusy, Scenario,
    StaticEnergy, Traffic,
};
pub use shape::ModelShape;
pub use sim::{EnergyModel, Projections};

use crate::mapping::{map_matrices, ChipGeometry, Mapping, MappingOptions, RoutingTrace};
use crate::model::MatrixId;
use crate::tile::TilePreset;

/// What to replay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnergyOptions {
    /// Decode batch sizes.
    pub batches: Vec<usize>,
    /// Cached tokens per sequence during decode.
    pub context: usize,
    /// Prompt length for prefill.
    pub prefill_tokens: usize,
    /// Decode steps replayed per batch size (tokens wrap around the trace).
    pub decode_steps: usize,
    /// Where attention projections and LM head run: analog (the paper's system, default) or digital (variant).
    pub projections: Projections,
}

impl Default for EnergyOptions {
    fn default() -> Self {
        Self {
            batches: vec![1, 8, 64],
            context: 512,
            prefill_tokens: 512,
            decode_steps: 16,
            projections: Projections::Analog,
        }
    }
}

/// The result of `aimc energy` for one model, preset and mapping.
#[derive(Clone, Debug, Serialize)]
pub struct EnergyReport {
    pub model: ModelShape,
    pub preset: String,
    pub gpu: String,
    /// Which expert weights the GPU roofline reads per step, in words.
    pub gpu_expert_reads: String,
    pub options: EnergyOptions,
    pub mapping_strategy: crate::mapping::Strategy,
    /// The costed system in words (which of [`Projections`]).
    pub system: String,
    /// Where the KV cache lives, in words (by capacity, or pinned off chip by the preset).
    pub kv_cache: String,
    /// Stacks the mapping uses (experts, dense MLPs).
    pub stacks_used: usize,
    /// Stacks dedicated to the analog attention projections and LM head (0 in the digital variant).
    pub projection_stacks: usize,
    /// Chips of the preset's size all analog stacks take.
    pub chips: usize,
    /// Decode, one entry per batch size.
    pub decode: Vec<PhaseCost>,
    pub prefill: PhaseCost,
    pub gpu_decode: Vec<GpuEstimate>,
    pub gpu_prefill: GpuEstimate,
    /// Index into `decode` of the batch with the highest tokens/s.
    pub best_decode: usize,
}

/// Maps `shape` onto `preset`'s chip geometry, letting the system grow to as many chips of `preset.stack.stacks`
/// stacks as the model needs (see [`EnergyReport::chips`]). `weights` is only read for the max-neuron-norm
/// selection of digital experts.
pub fn map_shape<'w>(
    preset: &TilePreset,
    shape: &ModelShape,
    options: &MappingOptions,
    weights: &dyn Fn(MatrixId) -> Option<ndarray::ArrayView2<'w, f32>>,
    trace: &RoutingTrace,
) -> Result<Mapping> {
    let geo = ChipGeometry {
        rows: preset.stack.rows,
        cols: preset.stack.cols,
        tiers_per_stack: preset.stack.tiers_per_stack,
        stacks: usize::MAX / 2,
    };
    let mut m = map_matrices(&shape.matrix_specs(), geo, options, weights, Some(trace))
        .with_context(|| format!("mapping {} onto {}", shape.name, preset.name))?;
    m.geometry.stacks = preset.stack.stacks;
    Ok(m)
}

/// The mapping options of the costed system: in the paper's system every linear layer is analog, so shared
/// experts and dense MLPs go on tiers too; the digital-projections variant keeps `base` as given.
pub fn paper_mapping(base: MappingOptions, projections: Projections) -> MappingOptions {
    MappingOptions {
        analog_shared: base.analog_shared || projections == Projections::Analog,
        ..base
    }
}

/// The cost section of `preset`, or an error naming the preset.
pub fn cost_of(preset: &TilePreset) -> Result<&CostModel> {
    preset.cost.as_ref().with_context(|| {
        format!(
            "preset `{}` has no `cost` section; use one that does (aimc-3d, 3dsim, buchel2025, pcm-3d-8tier, hermes) or add one",
            preset.name
        )
    })
}

/// Checks the options before any work: every batch and the prompt must hold at least one token, and there must be at
/// least one batch. The error names the option.
pub fn check_options(opts: &EnergyOptions) -> Result<()> {
    anyhow::ensure!(
        !opts.batches.is_empty(),
        "batches: give at least one decode batch size"
    );
    if let Some(b) = opts.batches.iter().find(|&&b| b == 0) {
        anyhow::bail!("batches: decode batch size must be ≥ 1, got {b}");
    }
    anyhow::ensure!(
        opts.prefill_tokens >= 1,
        "prefill_tokens: the prompt must have ≥ 1 token, got 0"
    );
    anyhow::ensure!(
        opts.decode_steps >= 1,
        "decode_steps: replay ≥ 1 step, got 0"
    );
    Ok(())
}

/// Decode at every batch size, prefill, and the GPU reference.
pub fn estimate(
    preset: &TilePreset,
    gpu: &GpuPreset,
    shape: &ModelShape,
    mapping: &Mapping,
    trace: &RoutingTrace,
    opts: &EnergyOptions,
) -> Result<EnergyReport> {
    check_options(opts)?;
    anyhow::ensure!(!trace.tokens.is_empty(), "the routing trace has no tokens");
    let cost = cost_of(preset)?;
    let model = EnergyModel::new(cost, mapping, shape, opts.projections);
    let decode: Vec<PhaseCost> = opts
        .batches
        .iter()
        .map(|&b| {
            model.run(
                trace,
                Scenario::Decode {
                    batch: b,
                    context: opts.context,
                },
                opts.decode_steps,
            )
        })
        .collect::<Result<_>>()
        .with_context(|| format!("costing {} on {}", shape.name, preset.name))?;
    let prefill = model
        .run(
            trace,
            Scenario::Prefill {
                tokens: opts.prefill_tokens,
            },
            1,
        )
        .with_context(|| format!("costing {} on {}", shape.name, preset.name))?;
    let gpu_decode: Vec<GpuEstimate> = opts
        .batches
        .iter()
        .map(|&b| gpu::estimate(gpu, shape, trace, b, opts.context, false))
        .collect();
    let gpu_prefill = gpu::estimate(gpu, shape, trace, opts.prefill_tokens, 0, true);
    for g in gpu_decode.iter().chain(std::iter::once(&gpu_prefill)) {
        anyhow::ensure!(
            g.energy_per_token_j.is_finite() && g.tokens_per_s.is_finite() && g.tokens_per_s > 0.0,
            "GPU preset `{}` gives a non-finite result; check its constants",
            gpu.name
        );
    }
    let best_decode = (0..decode.len())
        .max_by(|&a, &b| decode[a].tokens_per_s.total_cmp(&decode[b].tokens_per_s))
        .unwrap_or(0);
    let projection_stacks = model.projection_stacks();
    Ok(EnergyReport {
        model: shape.clone(),
        preset: preset.name.clone(),
        gpu: gpu.name.clone(),
        gpu_expert_reads: gpu.expert_reads().label().to_string(),
        options: opts.clone(),
        mapping_strategy: mapping.options.strategy,
        system: opts.projections.label().to_string(),
        kv_cache: cost.memory.kv_cache_level().label().to_string(),
        stacks_used: mapping.stacks_used,
        projection_stacks,
        chips: (mapping.stacks_used + projection_stacks).div_ceil(preset.stack.stacks),
        decode,
        prefill,
        gpu_decode,
        gpu_prefill,
        best_decode,
    })
}
