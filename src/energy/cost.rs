//! The hardware cost model of a tile preset: the optional `cost` section of `tiles/*.json`.
//!
//! Every constant is a [`Constant`]: a value in the unit its field name ends with (`_s`, `_j`, `_w`,
//! `_bytes_per_s`, …) plus a `source` string naming the part, paper, table or figure it comes from, or saying that it
//! is an assumption or a placeholder. Presets without a `cost` section still load (they only cannot be used by
//! `aimc energy`); presets with one must give every constant, finite and ≥ 0 (throughputs, bandwidths and sizes that
//! divide > 0), or loading fails naming the field.
//!
//! The section has five parts: the analog tiers, the digital units (everything that is not a crossbar MVM), the
//! on-chip network, the memory hierarchy (on-chip SRAM and off-chip memory, each a named part with capacity,
//! bandwidth and energy per byte) and the static power, itemised per block so static energy can be itemised too.
use serde::{Deserialize, Serialize};

use crate::tile::FieldError;

/// One constant of the cost model and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constant {
    /// Value, in the unit named by the field that holds it.
    pub value: f64,
    /// Part, paper, table or figure the value comes from; "assumption: …" or "placeholder: …" when it is one.
    pub source: String,
}

/// Cost of the analog tiers: one crossbar MVM on one tier, its converters and the switch between tiers of a stack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalogCost {
    /// Integration time of one MVM on one tier, seconds (DAC drive and array read, ADC excluded).
    pub tier_mvm_time_s: Constant,
    /// Array energy of one MVM on a fully used R×C tier, joules (scaled by the fraction of cells a block uses).
    pub tier_mvm_energy_j: Constant,
    /// Energy of one DAC input conversion (one crossbar row driven), joules.
    pub dac_energy_per_conversion_j: Constant,
    /// Energy of one ADC output conversion (one crossbar column read out), joules.
    pub adc_energy_per_conversion_j: Constant,
    /// Time to convert all columns of one MVM, seconds (added to `tier_mvm_time_s`).
    pub adc_time_s: Constant,
    /// Time to switch the shared periphery of a stack from one tier to another, seconds.
    pub tier_switch_time_s: Constant,
    /// Energy of one tier switch, joules.
    pub tier_switch_energy_j: Constant,
}

/// Throughput and energy of one class of digital operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitalOp {
    /// Operations per second of one unit.
    pub ops_per_s: Constant,
    /// Energy per operation, joules.
    pub energy_per_op_j: Constant,
}

/// The digital units of the chip: everything that is not a crossbar MVM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitalCost {
    /// Digital processing units working in parallel: norms, router, residual adds, partial-sum accumulation,
    /// activations and any matrix product kept digital.
    pub units: Constant,
    /// Attention units working in parallel: QKᵀ, softmax and the weighted sum of values over the KV cache.
    pub attention_units: Constant,
    /// Matrix products kept digital (router, digital experts, and the projections in the digital-projections
    /// variant); op = multiply or add. Runs on the digital units.
    pub matmul: DigitalOp,
    /// Attention over the KV cache (scores, softmax, weighted values); op = multiply or add. Runs on the attention
    /// units.
    pub attention: DigitalOp,
    /// RMSNorm; op = one of ~4 per element (square, sum, scale, weight).
    pub norm: DigitalOp,
    /// Summing crossbar partial sums, weighted expert outputs and residuals; op = one addition.
    pub accumulation: DigitalOp,
    /// Activation functions (SwiGLU's SiLU and product, router softmax); op = one element.
    pub activation: DigitalOp,
    /// Bytes per digital weight (router, digital experts, embeddings, digital projections).
    pub bytes_per_weight: Constant,
    /// Bytes per KV-cache value.
    pub bytes_per_kv_value: Constant,
}

/// How the stacks are connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// 2D mesh: mean hop count ≈ 2/3·√N between N stacks (mean Manhattan distance on a √N×√N grid).
    Mesh,
    /// Shared bus: one hop, but every transfer shares the bus bandwidth.
    Bus,
    /// Every stack has its own link to the digital units: one hop, no sharing between stacks (IBM 3D-SiM's
    /// communication model: a fixed latency per transfer, transfers never contend).
    PointToPoint,
}

/// On-chip network between the digital units and the stacks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterconnectCost {
    pub topology: Topology,
    /// Energy to move one byte over one hop, joules.
    pub energy_per_byte_per_hop_j: Constant,
    /// Bandwidth of one link (mesh) or of the bus, bytes per second.
    pub bandwidth_bytes_per_s: Constant,
    /// Links through which the digital units reach the network (mesh, point-to-point; the bus has one).
    pub digital_ports: Constant,
    /// Bytes per value sent to a crossbar (DAC input).
    pub bytes_per_input: Constant,
    /// Bytes per value returned by a crossbar (ADC output).
    pub bytes_per_output: Constant,
}

/// One level of the memory hierarchy: a named part with its capacity, bandwidth and energy per byte.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLevel {
    /// What it is, in words (e.g. "SRAM, 32 KiB banks", "HBM2E, one 16 GB stack").
    pub kind: String,
    pub capacity_bytes: Constant,
    pub bandwidth_bytes_per_s: Constant,
    pub read_energy_per_byte_j: Constant,
    pub write_energy_per_byte_j: Constant,
}

/// Where digital weights, the KV cache and activations live. Placement is by capacity: digital weights first
/// (they are read every step), then the KV cache, on chip while it fits; the rest goes off chip. `kv_cache` can
/// instead pin the KV cache off chip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryCost {
    pub on_chip: MemoryLevel,
    pub off_chip: MemoryLevel,
    /// Where the KV cache goes; absent = by capacity, like everything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache: Option<KvCachePlacement>,
}

/// Which memory level holds the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheLevel {
    /// On-chip SRAM while it fits (after the digital weights), the rest off chip.
    #[default]
    ByCapacity,
    /// Always off-chip memory, whatever the SRAM could hold.
    OffChip,
}

impl KvCacheLevel {
    /// In words, for tables and titles.
    pub fn label(self) -> &'static str {
        match self {
            KvCacheLevel::ByCapacity => "KV cache on chip while it fits",
            KvCacheLevel::OffChip => "KV cache in off-chip memory",
        }
    }
}

/// A KV-cache placement with where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCachePlacement {
    pub level: KvCacheLevel,
    /// The part, paper or simulator that places the cache there.
    pub source: String,
}

impl MemoryCost {
    /// The KV cache's level (by capacity unless the preset pins it).
    pub fn kv_cache_level(&self) -> KvCacheLevel {
        self.kv_cache.as_ref().map(|k| k.level).unwrap_or_default()
    }
}

/// Static (leakage, clock, refresh) power, itemised per block; charged over the time a step occupies the chip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticPower {
    /// All digital units together, watts.
    pub digital_units_w: Constant,
    /// All attention units together, watts.
    pub attention_units_w: Constant,
    /// On-chip SRAM, watts.
    pub on_chip_memory_w: Constant,
    /// Off-chip memory (background and refresh), watts.
    pub off_chip_memory_w: Constant,
    /// Periphery of one analog stack in use (times the stacks the mapping uses), watts.
    pub per_stack_w: Constant,
}

/// The `cost` section of a tile preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    pub analog: AnalogCost,
    pub digital: DigitalCost,
    pub interconnect: InterconnectCost,
    pub memory: MemoryCost,
    #[serde(rename = "static")]
    pub static_power: StaticPower,
}

/// Whether a constant may be zero.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bound {
    NonNegative,
    Positive,
}

impl CostModel {
    /// Every constant with its dotted field path (below `cost.`) and its allowed range.
    fn constants(&self) -> Vec<(String, &Constant, Bound)> {
        use Bound::{NonNegative as Nn, Positive as Pos};
        let a = &self.analog;
        let d = &self.digital;
        let i = &self.interconnect;
        let s = &self.static_power;
        let mut v: Vec<(String, &Constant, Bound)> = vec![
            ("analog.tier_mvm_time_s".into(), &a.tier_mvm_time_s, Pos),
            ("analog.tier_mvm_energy_j".into(), &a.tier_mvm_energy_j, Nn),
            (
                "analog.dac_energy_per_conversion_j".into(),
                &a.dac_energy_per_conversion_j,
                Nn,
            ),
            (
                "analog.adc_energy_per_conversion_j".into(),
                &a.adc_energy_per_conversion_j,
                Nn,
            ),
            ("analog.adc_time_s".into(), &a.adc_time_s, Nn),
            (
                "analog.tier_switch_time_s".into(),
                &a.tier_switch_time_s,
                Nn,
            ),
            (
                "analog.tier_switch_energy_j".into(),
                &a.tier_switch_energy_j,
                Nn,
            ),
            ("digital.units".into(), &d.units, Pos),
            ("digital.attention_units".into(), &d.attention_units, Pos),
        ];
        for (name, op) in [
            ("matmul", &d.matmul),
            ("attention", &d.attention),
            ("norm", &d.norm),
            ("accumulation", &d.accumulation),
            ("activation", &d.activation),
        ] {
            v.push((format!("digital.{name}.ops_per_s"), &op.ops_per_s, Pos));
            v.push((
                format!("digital.{name}.energy_per_op_j"),
                &op.energy_per_op_j,
                Nn,
            ));
        }
        v.extend([
            ("digital.bytes_per_weight".into(), &d.bytes_per_weight, Pos),
            (
                "digital.bytes_per_kv_value".into(),
                &d.bytes_per_kv_value,
                Pos,
            ),
            (
                "interconnect.energy_per_byte_per_hop_j".into(),
                &i.energy_per_byte_per_hop_j,
                Nn,
            ),
            (
                "interconnect.bandwidth_bytes_per_s".into(),
                &i.bandwidth_bytes_per_s,
                Pos,
            ),
            ("interconnect.digital_ports".into(), &i.digital_ports, Pos),
            (
                "interconnect.bytes_per_input".into(),
                &i.bytes_per_input,
                Pos,
            ),
            (
                "interconnect.bytes_per_output".into(),
                &i.bytes_per_output,
                Pos,
            ),
        ]);
        for (name, m) in [
            ("on_chip", &self.memory.on_chip),
            ("off_chip", &self.memory.off_chip),
        ] {
            v.push((
                format!("memory.{name}.capacity_bytes"),
                &m.capacity_bytes,
                Nn,
            ));
            v.push((
                format!("memory.{name}.bandwidth_bytes_per_s"),
                &m.bandwidth_bytes_per_s,
                Pos,
            ));
            v.push((
                format!("memory.{name}.read_energy_per_byte_j"),
                &m.read_energy_per_byte_j,
                Nn,
            ));
            v.push((
                format!("memory.{name}.write_energy_per_byte_j"),
                &m.write_energy_per_byte_j,
                Nn,
            ));
        }
        v.extend([
            ("static.digital_units_w".into(), &s.digital_units_w, Nn),
            ("static.attention_units_w".into(), &s.attention_units_w, Nn),
            ("static.on_chip_memory_w".into(), &s.on_chip_memory_w, Nn),
            ("static.off_chip_memory_w".into(), &s.off_chip_memory_w, Nn),
            ("static.per_stack_w".into(), &s.per_stack_w, Nn),
        ]);
        v
    }

    /// Every constant as `(cost.<path>, value, source)`, in preset order (for tables of the shipped constants).
    pub fn table(&self) -> Vec<(String, f64, String)> {
        self.constants()
            .into_iter()
            .map(|(path, c, _)| (format!("cost.{path}"), c.value, c.source.clone()))
            .collect()
    }

    /// Checks every constant: finite, ≥ 0 (> 0 for rates and sizes that divide), at most 1e30 in magnitude (so no
    /// product of two constants and a count can overflow), with a non-empty source; memory levels must name their
    /// kind. The error names the field as `cost.<section>.<name>`.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (path, c, bound) in self.constants() {
            let field = format!("cost.{path}");
            let ok = c.value.is_finite()
                && c.value <= MAX_CONSTANT
                && match bound {
                    Bound::NonNegative => c.value >= 0.0,
                    Bound::Positive => c.value >= MIN_POSITIVE,
                };
            if !ok {
                let want = match bound {
                    Bound::NonNegative => "in [0, 1e30]",
                    Bound::Positive => "in [1e-30, 1e30]",
                };
                return Err(FieldError::new(
                    format!("{field}.value"),
                    format!("must be a finite number {want}, got {}", c.value),
                ));
            }
            if c.source.trim().is_empty() {
                return Err(FieldError::new(
                    format!("{field}.source"),
                    "must name the part, paper, table or figure the value comes from (or say it is an assumption)",
                ));
            }
        }
        for (name, m) in [
            ("on_chip", &self.memory.on_chip),
            ("off_chip", &self.memory.off_chip),
        ] {
            if m.kind.trim().is_empty() {
                return Err(FieldError::new(
                    format!("cost.memory.{name}.kind"),
                    "must say what the memory is (e.g. \"SRAM\", \"HBM2E, one stack\")",
                ));
            }
        }
        if let Some(k) = &self.memory.kv_cache {
            if k.source.trim().is_empty() {
                return Err(FieldError::new(
                    "cost.memory.kv_cache.source",
                    "must name the part, paper or simulator that places the KV cache there",
                ));
            }
        }
        Ok(())
    }
}

/// Largest constant accepted: far beyond any physical value, small enough that products stay finite.
pub const MAX_CONSTANT: f64 = 1e30;
/// Smallest rate or size accepted where the model divides by it.
pub const MIN_POSITIVE: f64 = 1e-30;
