//! Mapping of a model's matrices onto the crossbar tiers of 3D tile stacks (docs/model.md §4).
//!
//! Every analog matrix `[n_out, n_in]` is split into crossbar blocks (inputs on rows, outputs on columns, equal
//! parts as in docs/model.md §3), and each block gets a `(stack, tier, offset)`. Only one tier of a stack computes at a
//! time, so *where* the blocks go decides how many experts can run in parallel and how often a stack switches tiers.
//! Attention, router and embeddings are always digital; the heterogeneous option keeps the most noise-sensitive
//! experts digital as well (docs/model.md §4.2).

pub mod digital;
pub mod pack;
mod place;
pub mod summary;
pub mod trace;

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::{ExpertSlot, MatrixId};
use crate::tile::split_equal;
pub use digital::DigitalSelection;
pub use pack::Offset;
pub use summary::{MappingSummary, ModelTotals};
pub use trace::RoutingTrace;

/// Version of the JSON layout of [`Mapping`]; bump when fields change meaning.
pub const MAPPING_SCHEMA_VERSION: u32 = 1;

/// The chip a model is mapped onto: `stacks` tile stacks of `tiers_per_stack` crossbars of `rows × cols` each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChipGeometry {
    /// Crossbar rows (inputs per block).
    pub rows: usize,
    /// Crossbar columns (outputs per block).
    pub cols: usize,
    /// Tiers (crossbars) stacked over one periphery.
    pub tiers_per_stack: usize,
    /// Tile stacks on the chip.
    pub stacks: usize,
}

impl ChipGeometry {
    /// The chip of a tile preset (`stack` section).
    pub fn from_preset(preset: &crate::tile::TilePreset) -> Self {
        Self {
            rows: preset.stack.rows,
            cols: preset.stack.cols,
            tiers_per_stack: preset.stack.tiers_per_stack,
            stacks: preset.stack.stacks,
        }
    }
}

/// One matrix the mapper may place: its identity and shape (PyTorch layout `[n_out, n_in]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixSpec {
    pub id: MatrixId,
    pub n_out: usize,
    pub n_in: usize,
}

impl MatrixSpec {
    /// Every expert, shared-expert and dense-MLP matrix of a loaded model.
    pub fn from_model(model: &crate::model::Model) -> Vec<MatrixSpec> {
        model
            .matrices()
            .map(|(id, w)| MatrixSpec {
                id,
                n_out: w.nrows(),
                n_in: w.ncols(),
            })
            .collect()
    }
}

/// Placement strategy (docs/model.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Fill stacks tier by tier in model order.
    Packed,
    /// One expert per tier index, spread over as many stacks as its blocks need; a layer's experts on different tiers.
    ExpertPerTier,
    /// Co-activated experts (from a routing trace) on different stacks, so they can compute in parallel.
    Affinity,
    /// Expert-per-tier placement after keeping the most sensitive experts digital (max-neuron-norm criterion).
    Heterogeneous,
}

impl Strategy {
    /// The name a person types and reads (`expert-per-tier`), the same as the CLI value and the JSON string.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Packed => "packed",
            Strategy::ExpertPerTier => "expert-per-tier",
            Strategy::Affinity => "affinity",
            Strategy::Heterogeneous => "heterogeneous",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the mapper is asked to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MappingOptions {
    pub strategy: Strategy,
    /// Fraction of each layer's routed experts kept digital (0 = all analog).
    pub digital_fraction: f64,
    /// How the digital experts are chosen.
    pub digital_selection: DigitalSelection,
    /// Put shared experts and dense MLPs on analog tiles too (default: digital, as in docs/model.md §4.2).
    pub analog_shared: bool,
}

impl Default for MappingOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::ExpertPerTier,
            digital_fraction: 0.0,
            digital_selection: DigitalSelection::MaxNeuronNorm,
            analog_shared: false,
        }
    }
}

/// One crossbar block of a matrix and where it lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockPlacement {
    /// Index of the input part (along `n_in`, crossbar rows).
    pub in_part: usize,
    /// Index of the output part (along `n_out`, crossbar columns).
    pub out_part: usize,
    /// Input indices `[start, end)` of the matrix that drive this block.
    pub in_range: Range<usize>,
    /// Output indices `[start, end)` of the matrix this block produces.
    pub out_range: Range<usize>,
    pub stack: usize,
    pub tier: usize,
    /// Top-left corner of the block inside its tier.
    pub offset: Offset,
}

/// An analog matrix and the placement of all its blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixPlacement {
    pub id: MatrixId,
    pub n_out: usize,
    pub n_in: usize,
    pub blocks: Vec<BlockPlacement>,
}

/// Why a matrix stays digital.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigitalReason {
    /// Shared expert or dense MLP, digital unless `analog_shared`.
    SharedOrDense,
    /// Chosen by the heterogeneous selection.
    Sensitive,
}

/// A matrix computed digitally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigitalMatrix {
    pub id: MatrixId,
    pub n_out: usize,
    pub n_in: usize,
    pub reason: DigitalReason,
}

/// A whole model mapped onto a chip. Serialises to JSON and loads back ([`Mapping::to_json`], [`Mapping::from_json`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    pub schema_version: u32,
    pub options: MappingOptions,
    pub geometry: ChipGeometry,
    pub analog: Vec<MatrixPlacement>,
    pub digital: Vec<DigitalMatrix>,
    /// Stacks that hold at least one block.
    pub stacks_used: usize,
}

/// The blocks of one matrix before placement: `(in_part, out_part, in_range, out_range)`.
fn matrix_blocks(
    spec: &MatrixSpec,
    geo: &ChipGeometry,
) -> Vec<(usize, usize, Range<usize>, Range<usize>)> {
    let ins = split_equal(spec.n_in, geo.rows);
    let outs = split_equal(spec.n_out, geo.cols);
    let mut v = Vec::with_capacity(ins.len() * outs.len());
    for (i, ir) in ins.iter().enumerate() {
        for (j, or) in outs.iter().enumerate() {
            v.push((i, j, ir.clone(), or.clone()));
        }
    }
    v
}

/// Maps `matrices` onto `geo`. `weights` supplies the matrix values for the max-neuron-norm selection (only read when
/// `digital_fraction > 0`); `trace` supplies co-activation for `affinity`.
pub fn map_matrices<'w>(
    matrices: &[MatrixSpec],
    geo: ChipGeometry,
    opts: &MappingOptions,
    weights: &dyn Fn(MatrixId) -> Option<ndarray::ArrayView2<'w, f32>>,
    trace: Option<&RoutingTrace>,
) -> Result<Mapping> {
    if geo.rows == 0 || geo.cols == 0 || geo.tiers_per_stack == 0 || geo.stacks == 0 {
        bail!(
            "chip geometry must be positive in every dimension, got {} stacks × {} tiers of {}×{} crossbars",
            geo.stacks,
            geo.tiers_per_stack,
            geo.rows,
            geo.cols
        );
    }
    if !(0.0..=1.0).contains(&opts.digital_fraction) || opts.digital_fraction.is_nan() {
        bail!(
            "digital fraction must lie in [0, 1], got {}",
            opts.digital_fraction
        );
    }
    if opts.strategy == Strategy::Affinity && trace.is_none() {
        bail!("the affinity strategy needs a routing trace from calibration text");
    }
    let sensitive = digital::select_digital(
        matrices,
        opts.digital_fraction,
        opts.digital_selection,
        weights,
    )
    .context("selecting the digital experts")?;

    let mut digital_mats = Vec::new();
    // Units: the matrices of one expert (or shared expert / dense MLP) of one layer, in model order.
    let mut units: BTreeMap<(usize, ExpertSlot), Vec<&MatrixSpec>> = BTreeMap::new();
    for m in matrices {
        let is_routed = matches!(m.id.slot, ExpertSlot::Routed(_));
        let reason = if !is_routed && !opts.analog_shared {
            Some(DigitalReason::SharedOrDense)
        } else if is_routed && sensitive.contains(&(m.id.layer, m.id.slot)) {
            Some(DigitalReason::Sensitive)
        } else {
            None
        };
        match reason {
            Some(reason) => digital_mats.push(DigitalMatrix {
                id: m.id,
                n_out: m.n_out,
                n_in: m.n_in,
                reason,
            }),
            None => units.entry((m.id.layer, m.id.slot)).or_default().push(m),
        }
    }
    let units: Vec<place::Unit> = units
        .into_iter()
        .map(|((layer, slot), mats)| place::Unit {
            layer,
            slot,
            blocks: mats
                .iter()
                .flat_map(|m| {
                    matrix_blocks(m, &geo)
                        .into_iter()
                        .map(move |(i, j, ir, or)| place::PendingBlock {
                            id: m.id,
                            in_part: i,
                            out_part: j,
                            in_range: ir,
                            out_range: or,
                        })
                })
                .collect(),
        })
        .collect();

    let placed = match opts.strategy {
        Strategy::Packed => place::packed(&units, &geo),
        Strategy::ExpertPerTier | Strategy::Heterogeneous => place::expert_per_tier(&units, &geo),
        Strategy::Affinity => place::affinity(&units, &geo, trace.expect("checked above")),
    };
    let stacks_used = placed.stacks_needed;
    if stacks_used > geo.stacks {
        bail!(
            "the mapping does not fit the chip: it needs {stacks_used} stacks of {} tiers ({} tiers in all) \
             but the chip has {} stacks; use a preset with more stacks or tiers, or keep more experts digital",
            geo.tiers_per_stack,
            placed.tiers_needed,
            geo.stacks
        );
    }
    let mut by_matrix: BTreeMap<MatrixId, Vec<BlockPlacement>> = BTreeMap::new();
    for b in placed.blocks {
        by_matrix.entry(b.0).or_default().push(b.1);
    }
    let analog = matrices
        .iter()
        .filter_map(|m| {
            by_matrix.remove(&m.id).map(|mut blocks| {
                blocks.sort_by_key(|b| (b.in_part, b.out_part));
                MatrixPlacement {
                    id: m.id,
                    n_out: m.n_out,
                    n_in: m.n_in,
                    blocks,
                }
            })
        })
        .collect();
    Ok(Mapping {
        schema_version: MAPPING_SCHEMA_VERSION,
        options: opts.clone(),
        geometry: geo,
        analog,
        digital: digital_mats,
        stacks_used,
    })
}

impl Mapping {
    /// Pretty JSON of the whole mapping.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Loads a mapping written by [`Mapping::to_json`]; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let m: Mapping = serde_json::from_str(text)
            .with_context(|| format!("{origin}: not a valid aimc mapping"))?;
        if m.schema_version != MAPPING_SCHEMA_VERSION {
            bail!(
                "{origin}: field `schema_version` is {}, this aimc reads {MAPPING_SCHEMA_VERSION}",
                m.schema_version
            );
        }
        Ok(m)
    }

    /// Placement of one analog matrix, if it is analog.
    pub fn placement(&self, id: MatrixId) -> Option<&MatrixPlacement> {
        self.analog.iter().find(|p| p.id == id)
    }

    /// Crossbar cells holding weights, over all analog blocks.
    pub fn cells_used(&self) -> usize {
        self.analog
            .iter()
            .flat_map(|m| &m.blocks)
            .map(|b| b.in_range.len() * b.out_range.len())
            .sum()
    }

    /// Number of `(stack, tier)` crossbars holding at least one block.
    pub fn tiers_used(&self) -> usize {
        let mut set: Vec<(usize, usize)> = self
            .analog
            .iter()
            .flat_map(|m| m.blocks.iter().map(|b| (b.stack, b.tier)))
            .collect();
        set.sort_unstable();
        set.dedup();
        set.len()
    }

    /// Occupancy grid `[stack][tier]` over the stacks in use: for each crossbar the layer holding most of its
    /// cells, the fraction of its cells in use, and which experts sit there (`L0 E3,E4`; `S0` a shared expert,
    /// `MLP` a dense MLP; layers separated by `; `).
    pub fn occupancy(&self) -> Vec<Vec<Option<crate::report::heatmap::Cell>>> {
        let g = &self.geometry;
        let mut cells: Vec<Vec<BTreeMap<(usize, ExpertSlot), usize>>> =
            vec![vec![BTreeMap::new(); g.tiers_per_stack]; self.stacks_used];
        for m in &self.analog {
            for b in &m.blocks {
                *cells[b.stack][b.tier]
                    .entry((m.id.layer, m.id.slot))
                    .or_default() += b.in_range.len() * b.out_range.len();
            }
        }
        let total = (g.rows * g.cols) as f64;
        cells
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|units| {
                        let used: usize = units.values().sum();
                        let mut per_layer: BTreeMap<usize, (usize, Vec<String>)> = BTreeMap::new();
                        for (&(layer, slot), &c) in &units {
                            let e = per_layer.entry(layer).or_default();
                            e.0 += c;
                            e.1.push(match slot {
                                ExpertSlot::Routed(i) => format!("E{i}"),
                                ExpertSlot::Shared(i) => format!("S{i}"),
                                ExpertSlot::DenseMlp => "MLP".to_string(),
                            });
                        }
                        let label = per_layer
                            .iter()
                            .map(|(l, (_, names))| format!("L{l} {}", names.join(",")))
                            .collect::<Vec<_>>()
                            .join("; ");
                        per_layer
                            .iter()
                            .max_by_key(|&(&l, &(c, _))| (c, std::cmp::Reverse(l)))
                            .map(|(&layer, _)| crate::report::heatmap::Cell {
                                layer,
                                fill: used as f64 / total,
                                label,
                            })
                    })
                    .collect()
            })
            .collect()
    }
}
