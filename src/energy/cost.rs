//! The hardware cost model of a tile preset: the optional `cost` section of `tiles/*.json`.
//!
//! Every constant is a [`Constant`]: a value in the unit its field name ends with (`_s`, `_j`, `_w`,
//! `_bytes_per_s`, …) plus a `source` string naming the paper, table or figure it comes from, or saying that it is an
//! assumption. Presets without a `cost` section still load (they only cannot be used by `aimc energy`); presets with
//! one must give every constant, finite and ≥ 0 (throughputs and bandwidths > 0), or loading fails naming the field.
use serde::{Deserialize, Serialize};

use crate::tile::FieldError;

/// One constant of the cost model and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constant {
    /// Value, in the unit named by the field that holds it.
    pub value: f64,
    /// Paper, table or figure the value comes from; "assumption: …" when it is one.
    pub source: String,
}

/// Cost of the analog tiles: one crossbar MVM on one tier, its converters and the switch between tiers of a stack.
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
    /// Operations per second of one digital unit.
    pub ops_per_s: Constant,
    /// Energy per operation, joules.
    pub energy_per_op_j: Constant,
}

/// The digital processing units of the chip: everything that is not a crossbar MVM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DigitalCost {
    /// Digital units working in parallel (each has the throughputs below).
    pub units: Constant,
    /// Matrix products kept digital (attention projections, digital experts, router, LM head); op = multiply or add.
    pub matmul: DigitalOp,
    /// Attention over the KV cache (scores, softmax, weighted values); op = multiply or add.
    pub attention: DigitalOp,
    /// RMSNorm; op = one of ~4 per element (square, sum, scale, weight).
    pub norm: DigitalOp,
    /// Summing crossbar partial sums and weighted expert outputs; op = one addition.
    pub accumulation: DigitalOp,
    /// Activation functions (SwiGLU's SiLU and product, router softmax); op = one element.
    pub activation: DigitalOp,
    /// Static (leakage + clock) power of all digital units together, watts.
    pub static_power_w: Constant,
    /// On-chip memory for digital weights and the KV cache, bytes; what does not fit is read from off-chip.
    pub on_chip_memory_bytes: Constant,
    /// Energy to read one byte from on-chip memory, joules.
    pub on_chip_read_energy_per_byte_j: Constant,
    /// Bytes per stored digital weight and KV-cache value.
    pub bytes_per_value: Constant,
}

/// How the stacks are connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topology {
    /// 2D mesh: mean hop count ≈ 2/3·√N between N stacks (mean Manhattan distance on a √N×√N grid).
    Mesh,
    /// Shared bus: one hop, but every transfer of a layer shares the bus bandwidth.
    Bus,
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
    /// Bytes per value sent to a crossbar (DAC input).
    pub bytes_per_input: Constant,
    /// Bytes per value returned by a crossbar (ADC output).
    pub bytes_per_output: Constant,
}

/// Off-chip memory (DRAM) for digital weights and KV cache that do not fit on chip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffChipCost {
    /// Energy per byte read, joules.
    pub energy_per_byte_j: Constant,
    /// Bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: Constant,
}

/// The `cost` section of a tile preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CostModel {
    pub analog: AnalogCost,
    pub digital: DigitalCost,
    pub interconnect: InterconnectCost,
    pub off_chip: OffChipCost,
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
        let o = &self.off_chip;
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
            ("digital.static_power_w".into(), &d.static_power_w, Nn),
            (
                "digital.on_chip_memory_bytes".into(),
                &d.on_chip_memory_bytes,
                Nn,
            ),
            (
                "digital.on_chip_read_energy_per_byte_j".into(),
                &d.on_chip_read_energy_per_byte_j,
                Nn,
            ),
            ("digital.bytes_per_value".into(), &d.bytes_per_value, Pos),
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
            (
                "off_chip.energy_per_byte_j".into(),
                &o.energy_per_byte_j,
                Nn,
            ),
            (
                "off_chip.bandwidth_bytes_per_s".into(),
                &o.bandwidth_bytes_per_s,
                Pos,
            ),
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

    /// Checks every constant: finite, ≥ 0 (> 0 for rates and sizes that divide), with a non-empty source.
    /// The error names the field as `cost.<section>.<name>`.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (path, c, bound) in self.constants() {
            let field = format!("cost.{path}");
            let ok = c.value.is_finite()
                && match bound {
                    Bound::NonNegative => c.value >= 0.0,
                    Bound::Positive => c.value > 0.0,
                };
            if !ok {
                let want = match bound {
                    Bound::NonNegative => "≥ 0",
                    Bound::Positive => "> 0",
                };
                return Err(FieldError::new(
                    format!("{field}.value"),
                    format!("must be a finite number {want}, got {}", c.value),
                ));
            }
            if c.source.trim().is_empty() {
                return Err(FieldError::new(
                    format!("{field}.source"),
                    "must name the paper, table or figure the value comes from (or say it is an assumption)",
                ));
            }
        }
        Ok(())
    }
}
