//! What `aimc map` reports about a mapping (docs/model.md §4: stacks and tiers used, utilisation, blocks per expert,
//! digital share of parameters and FLOPs, tier switches per token).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Mapping, RoutingTrace};
use crate::model::ExpertSlot;

/// Model-level numbers the mapping alone does not know.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ModelTotals {
    /// All parameters of the model (embeddings included).
    pub total_params: usize,
    /// Parameters of the weight matrices every token multiplies outside the FFNs: attention projections, routers,
    /// LM head. Their FLOPs are `2 ×` this per token.
    pub dense_matmul_params: usize,
    /// Routed experts per token (top-k), used for activation rates when no trace is given.
    pub top_k: usize,
    /// Routed experts per MoE layer.
    pub n_experts: usize,
}

impl ModelTotals {
    /// The totals of a loaded model (the LM head counts as a per-token product whether or not it is tied).
    pub fn from_model(model: &crate::model::Model) -> Self {
        let p = model.param_counts();
        Self {
            total_params: p.total,
            dense_matmul_params: p.attention
                + p.router
                + model.config.vocab_size * model.config.hidden_size,
            top_k: model.config.top_k,
            n_experts: model.config.num_experts,
        }
    }
}

/// Minimum, mean and maximum.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

/// The summary printed by `aimc map` and stored beside the mapping JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MappingSummary {
    pub strategy: super::Strategy,
    pub crossbar_rows: usize,
    pub crossbar_cols: usize,
    pub tiers_per_stack: usize,
    pub chip_stacks: usize,
    pub stacks_used: usize,
    /// Tiers holding at least one block.
    pub tiers_used: usize,
    /// Cells holding weights / cells of the tiers in use.
    pub utilisation_of_used_tiers: f64,
    /// Cells holding weights / cells of the whole chip.
    pub utilisation_of_chip: f64,
    pub analog_matrices: usize,
    pub digital_matrices: usize,
    pub analog_blocks: usize,
    /// Crossbar blocks per analog routed expert.
    pub blocks_per_expert: Spread,
    pub analog_params: usize,
    /// Share of all model parameters computed digitally (attention, router, embeddings, LM head, digital experts).
    pub digital_param_share: f64,
    /// Share of the weight-matrix FLOPs per token computed digitally (attention scores over the context excluded).
    pub digital_flop_share: f64,
    /// Expected tier switches per token at batch 1, from a routing trace.
    pub tier_switches_per_token: Option<f64>,
}

impl MappingSummary {
    /// Summarises `m`. Expert activation rates come from `trace` when given, else `top_k / n_experts`.
    pub fn new(m: &Mapping, totals: &ModelTotals, trace: Option<&RoutingTrace>) -> Self {
        let g = m.geometry;
        let cells = (g.rows * g.cols) as f64;
        let rates = trace.map(|t| (t.layers.clone(), t.activation_rates()));
        let rate = |layer: usize, slot: ExpertSlot| -> f64 {
            match slot {
                ExpertSlot::Routed(e) => match &rates {
                    Some((layers, r)) => layers
                        .iter()
                        .position(|&l| l == layer)
                        .map_or(0.0, |i| r[i][e]),
                    None => totals.top_k as f64 / totals.n_experts.max(1) as f64,
                },
                _ => 1.0,
            }
        };
        let analog_params: usize = m.analog.iter().map(|p| p.n_out * p.n_in).sum();
        let analog_flops: f64 = m
            .analog
            .iter()
            .map(|p| 2.0 * (p.n_out * p.n_in) as f64 * rate(p.id.layer, p.id.slot))
            .sum();
        let digital_ffn_flops: f64 = m
            .digital
            .iter()
            .map(|d| 2.0 * (d.n_out * d.n_in) as f64 * rate(d.id.layer, d.id.slot))
            .sum();
        let total_flops =
            analog_flops + digital_ffn_flops + 2.0 * totals.dense_matmul_params as f64;
        let mut blocks: BTreeMap<(usize, ExpertSlot), usize> = BTreeMap::new();
        for p in &m.analog {
            if matches!(p.id.slot, ExpertSlot::Routed(_)) {
                *blocks.entry((p.id.layer, p.id.slot)).or_default() += p.blocks.len();
            }
        }
        let counts: Vec<f64> = blocks.values().map(|&b| b as f64).collect();
        let blocks_per_expert = if counts.is_empty() {
            Spread::default()
        } else {
            Spread {
                min: counts.iter().copied().fold(f64::INFINITY, f64::min),
                mean: counts.iter().sum::<f64>() / counts.len() as f64,
                max: counts.iter().copied().fold(0.0, f64::max),
            }
        };
        let tiers_used = m.tiers_used();
        let cells_used = m.cells_used() as f64;
        Self {
            strategy: m.options.strategy,
            crossbar_rows: g.rows,
            crossbar_cols: g.cols,
            tiers_per_stack: g.tiers_per_stack,
            chip_stacks: g.stacks,
            stacks_used: m.stacks_used,
            tiers_used,
            utilisation_of_used_tiers: cells_used / (tiers_used.max(1) as f64 * cells),
            utilisation_of_chip: cells_used / ((g.stacks * g.tiers_per_stack) as f64 * cells),
            analog_matrices: m.analog.len(),
            digital_matrices: m.digital.len(),
            analog_blocks: m.analog.iter().map(|p| p.blocks.len()).sum(),
            blocks_per_expert,
            analog_params,
            digital_param_share: 1.0 - analog_params as f64 / totals.total_params.max(1) as f64,
            digital_flop_share: 1.0 - analog_flops / total_flops.max(f64::MIN_POSITIVE),
            tier_switches_per_token: trace.map(|t| t.tier_switches_per_token(m)),
        }
    }
}

impl fmt::Display for MappingSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "strategy              {}", self.strategy)?;
        writeln!(
            f,
            "chip                  {} stacks × {} tiers of {}×{} crossbars",
            self.chip_stacks, self.tiers_per_stack, self.crossbar_rows, self.crossbar_cols
        )?;
        writeln!(
            f,
            "used                  {} stacks, {} tiers ({:.1}% of the chip's tiers)",
            self.stacks_used,
            self.tiers_used,
            100.0 * self.tiers_used as f64 / (self.chip_stacks * self.tiers_per_stack) as f64
        )?;
        writeln!(
            f,
            "utilisation           {:.1}% of used tiers' cells, {:.2}% of the chip's",
            100.0 * self.utilisation_of_used_tiers,
            100.0 * self.utilisation_of_chip
        )?;
        writeln!(
            f,
            "matrices              {} analog ({} blocks), {} digital",
            self.analog_matrices, self.analog_blocks, self.digital_matrices
        )?;
        writeln!(
            f,
            "blocks per expert     min {} / mean {:.2} / max {}",
            self.blocks_per_expert.min, self.blocks_per_expert.mean, self.blocks_per_expert.max
        )?;
        writeln!(
            f,
            "digital share         {:.1}% of parameters, {:.1}% of weight FLOPs per token",
            100.0 * self.digital_param_share,
            100.0 * self.digital_flop_share
        )?;
        match self.tier_switches_per_token {
            Some(s) => writeln!(
                f,
                "tier switches/token   {s:.2} (batch 1, from the routing trace)"
            ),
            None => writeln!(f, "tier switches/token   n/a (no routing trace)"),
        }
    }
}
