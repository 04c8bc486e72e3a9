//! The scaling study of Büchel et al. (Nat. Comput. Sci. 2025): dense vs MoE models of growing total parameter count
//! on a 3D AIMC chip of fixed size.
//!
//! MoE models have `E` experts of width `I`, top-`k`, so the active parameters per token stay fixed while the total
//! grows with `E`; the dense model of each point has one MLP of width `E·I`, the same total parameter count. The chip
//! keeps `stacks` stacks; a bigger model gets more tiers per stack (the smallest count the expert-per-tier mapping
//! fits in), which is how a 3D chip grows in capacity without growing in area or periphery. Every point is decoded
//! from a synthetic uniform top-k trace at each batch size; the best throughput is kept.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::{estimate, EnergyOptions, GpuPreset, ModelShape};
use crate::mapping::{map_matrices, ChipGeometry, Mapping, MappingOptions, Strategy};
use crate::tile::TilePreset;

/// The family of configurations the study sweeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalingConfig {
    pub hidden: usize,
    pub layers: usize,
    /// Width of one expert; the dense MLP of a point is `experts × intermediate` wide.
    pub intermediate: usize,
    pub top_k: usize,
    /// Expert counts, one point per entry.
    pub experts: Vec<usize>,
    /// Stacks of the fixed-size chip.
    pub stacks: usize,
    /// Tokens of the synthetic routing trace.
    pub trace_tokens: usize,
    pub seed: u64,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        Self {
            hidden: 1024,
            layers: 12,
            intermediate: 1024,
            top_k: 2,
            experts: vec![4, 8, 16, 32, 64],
            stacks: 1024,
            trace_tokens: 256,
            seed: 7,
        }
    }
}

/// One configuration at one decode batch, chip beside GPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchPoint {
    pub batch: usize,
    pub tokens_per_s: f64,
    pub energy_per_token_j: f64,
    pub gpu_tokens_per_s: f64,
    pub gpu_energy_per_token_j: f64,
    /// What binds the chip, in words.
    pub bottleneck: String,
}

/// One configuration of the study.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScalingPoint {
    /// `dense` or `moe`.
    pub family: String,
    pub experts: usize,
    pub total_params: usize,
    pub active_params: usize,
    /// Tiers per stack the mapping needed on the fixed chip.
    pub tiers_per_stack: usize,
    pub stacks_used: usize,
    /// Decode batch with the highest throughput.
    pub best_batch: usize,
    pub tokens_per_s: f64,
    pub energy_per_token_j: f64,
    /// Analog share of the energy per token at the best batch.
    pub analog_energy_per_token_j: f64,
    /// Decode latency at the smallest batch, seconds.
    pub latency_per_token_s: f64,
    /// GPU batch with the highest throughput, and its figures.
    pub gpu_best_batch: usize,
    pub gpu_tokens_per_s: f64,
    pub gpu_energy_per_token_j: f64,
    /// What binds the chip at its best batch, in words.
    pub bottleneck: String,
    /// Every decode batch of the run.
    pub per_batch: Vec<BatchPoint>,
}

/// Maps `shape` with expert-per-tier onto `stacks` stacks, with the fewest tiers per stack that fit.
fn fit(preset: &TilePreset, shape: &ModelShape, stacks: usize) -> Result<Mapping> {
    let opts = MappingOptions {
        strategy: Strategy::ExpertPerTier,
        analog_shared: true,
        ..Default::default()
    };
    let cells = preset.stack.rows * preset.stack.cols;
    let params: usize = shape.matrix_specs().iter().map(|m| m.n_out * m.n_in).sum();
    let specs = shape.matrix_specs();
    let none = |_| None;
    let attempt = |tiers: usize| {
        let geo = ChipGeometry {
            rows: preset.stack.rows,
            cols: preset.stack.cols,
            tiers_per_stack: tiers,
            stacks: usize::MAX / 2,
        };
        map_matrices(&specs, geo, &opts, &none, None)
    };
    // With as many tiers as there are units, the stacks in use are those of the widest unit: the floor.
    let units = specs.len().div_ceil(shape.ffn_matrices());
    let floor = attempt(units)?.stacks_used;
    if floor > stacks {
        bail!(
            "{}: one MLP or expert needs {floor} stacks side by side, the chip has {stacks}",
            shape.name
        );
    }
    let mut tiers = params.div_ceil(cells * stacks).max(1);
    loop {
        let mut m = attempt(tiers)?;
        if m.stacks_used <= stacks {
            m.geometry.stacks = stacks;
            return Ok(m);
        }
        tiers += 1;
    }
}

/// Runs the study on `preset` (which must have a cost section) against `gpu`; the throughput and energy kept per
/// point are those of the batch with the highest throughput (for the chip and the GPU separately).
pub fn run(
    preset: &TilePreset,
    gpu: &GpuPreset,
    config: &ScalingConfig,
    opts: &EnergyOptions,
) -> Result<Vec<ScalingPoint>> {
    let mut points = Vec::new();
    for &e in &config.experts {
        for family in ["dense", "moe"] {
            let shape = if family == "dense" {
                ModelShape::synthetic(
                    &format!("dense-{e}x"),
                    config.hidden,
                    config.layers,
                    0,
                    0,
                    e * config.intermediate,
                )
            } else {
                ModelShape::synthetic(
                    &format!("moe-{e}e"),
                    config.hidden,
                    config.layers,
                    e,
                    config.top_k,
                    config.intermediate,
                )
            };
            let trace = shape.synthetic_trace(config.trace_tokens, config.seed);
            let mapping = fit(preset, &shape, config.stacks)?;
            let mut p = preset.clone();
            p.stack.tiers_per_stack = mapping.geometry.tiers_per_stack;
            p.stack.stacks = config.stacks;
            let r = estimate(&p, gpu, &shape, &mapping, &trace, opts)?;
            let best = &r.decode[r.best_decode];
            let gpu_i = (0..r.gpu_decode.len())
                .max_by(|&a, &b| {
                    r.gpu_decode[a]
                        .tokens_per_s
                        .total_cmp(&r.gpu_decode[b].tokens_per_s)
                })
                .unwrap_or(0);
            let gpu_best = &r.gpu_decode[gpu_i];
            points.push(ScalingPoint {
                family: family.into(),
                experts: e,
                total_params: shape.total_params(),
                active_params: shape.active_params(),
                tiers_per_stack: mapping.geometry.tiers_per_stack,
                stacks_used: mapping.stacks_used,
                best_batch: opts.batches[r.best_decode],
                tokens_per_s: best.tokens_per_s,
                energy_per_token_j: best.energy.total(),
                analog_energy_per_token_j: best.energy.analog(),
                latency_per_token_s: r.decode[0].latency_per_token_s,
                gpu_best_batch: opts.batches[gpu_i],
                gpu_tokens_per_s: gpu_best.tokens_per_s,
                gpu_energy_per_token_j: gpu_best.energy_per_token_j,
                bottleneck: best.bottleneck.description.clone(),
                per_batch: r
                    .decode
                    .iter()
                    .zip(&r.gpu_decode)
                    .zip(&opts.batches)
                    .map(|((a, g), &batch)| BatchPoint {
                        batch,
                        tokens_per_s: a.tokens_per_s,
                        energy_per_token_j: a.energy.total(),
                        gpu_tokens_per_s: g.tokens_per_s,
                        gpu_energy_per_token_j: g.energy_per_token_j,
                        bottleneck: a.bottleneck.description.clone(),
                    })
                    .collect(),
            });
        }
    }
    Ok(points)
}
