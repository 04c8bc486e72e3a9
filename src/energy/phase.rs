//! What one costed phase returns: the scenario a step processes, every resource's busy time and the one that
//! binds, itemised static energy, data placement, traffic, and the per-token [`PhaseCost`] that carries them;
//! with the sums and means the replay in `sim.rs` takes over steps, and the SI formatting of bytes, rates and
//! seconds its bottleneck descriptions use. Kept apart from `sim.rs` so the replay holds only the cost model.
use serde::{Deserialize, Serialize};

use super::breakdown::Breakdown;

/// What a step processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Scenario {
    /// `batch` sequences decode one token each, every sequence at `context` cached tokens.
    Decode { batch: usize, context: usize },
    /// One prompt of `tokens` tokens (token i attends to i earlier ones).
    Prefill { tokens: usize },
}

impl Scenario {
    /// Tokens of one step.
    pub fn tokens_per_step(self) -> usize {
        match self {
            Scenario::Decode { batch, .. } => batch,
            Scenario::Prefill { tokens } => tokens,
        }
    }

    /// `decode B=8` / `prefill 512`.
    pub fn label(self) -> String {
        match self {
            Scenario::Decode { batch, .. } => format!("decode B={batch}"),
            Scenario::Prefill { tokens } => format!("prefill {tokens}"),
        }
    }
}

/// Busy time per step of every resource, seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ResourceBusy {
    /// The busiest analog stack: its tier MVMs, one tier at a time, and its tier switches.
    pub busiest_stack_s: f64,
    /// The digital units: norms, router, residual adds, accumulation, activations, digital matmuls.
    pub digital_units_s: f64,
    /// The attention units: QKᵀ, softmax, AV.
    pub attention_units_s: f64,
    /// On-chip SRAM reads and writes.
    pub on_chip_memory_s: f64,
    /// Off-chip memory reads and writes.
    pub off_chip_memory_s: f64,
    /// The on-chip network's busiest port (a stack's link or the digital units' ports).
    pub interconnect_s: f64,
    /// One token's path through every layer in order.
    pub dependency_chain_s: f64,
}

impl ResourceBusy {
    /// `(JSON key, human name, seconds)` of every resource, in report order.
    pub fn entries(&self) -> [(&'static str, &'static str, f64); 7] {
        [
            ("busiest_stack", "tier MVMs", self.busiest_stack_s),
            ("digital_units", "digital units", self.digital_units_s),
            ("attention_units", "attention units", self.attention_units_s),
            ("on_chip_memory", "on-chip SRAM", self.on_chip_memory_s),
            ("off_chip_memory", "off-chip memory", self.off_chip_memory_s),
            ("interconnect", "interconnect", self.interconnect_s),
            (
                "dependency_chain",
                "dependency chain",
                self.dependency_chain_s,
            ),
        ]
    }
}

/// The resource that sets the step time.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Bottleneck {
    /// Key of the resource in [`ResourceBusy`] (`off_chip_memory`, `busiest_stack`, …).
    pub resource: String,
    /// What binds, in words with its figures, e.g. `off-chip KV cache (412 MB/step at 68 GB/s)`.
    pub description: String,
}

/// Static energy per token, itemised: each block's static power × step time / tokens per step.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StaticEnergy {
    pub digital_units_j: f64,
    pub attention_units_j: f64,
    pub on_chip_memory_j: f64,
    pub off_chip_memory_j: f64,
    pub analog_stacks_j: f64,
}

impl StaticEnergy {
    /// `(human name, joules per token)` of every item.
    pub fn entries(&self) -> [(&'static str, f64); 5] {
        [
            ("digital units", self.digital_units_j),
            ("attention units", self.attention_units_j),
            ("on-chip SRAM", self.on_chip_memory_j),
            ("off-chip memory", self.off_chip_memory_j),
            ("analog stacks", self.analog_stacks_j),
        ]
    }

    pub fn total(&self) -> f64 {
        self.digital_units_j
            + self.attention_units_j
            + self.on_chip_memory_j
            + self.off_chip_memory_j
            + self.analog_stacks_j
    }
}

/// Where the step's data lives (bytes), placed by capacity: digital weights first, then the KV cache, then the
/// embedding table.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    /// Digital weights: router, digital experts, embeddings, digital projections.
    pub digital_weight_bytes: f64,
    /// KV cache of every sequence of the step at its longest context.
    pub kv_cache_bytes: f64,
    /// Token embedding table.
    pub embedding_bytes: f64,
    pub on_chip_weight_bytes: f64,
    pub on_chip_kv_bytes: f64,
    pub on_chip_embedding_bytes: f64,
    pub off_chip_weight_bytes: f64,
    pub off_chip_kv_bytes: f64,
    pub off_chip_embedding_bytes: f64,
}

/// Bytes moved per step.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Traffic {
    pub on_chip_weight_bytes: f64,
    pub on_chip_kv_bytes: f64,
    pub off_chip_weight_bytes: f64,
    pub off_chip_kv_bytes: f64,
    /// Crossbar inputs and outputs over the on-chip network.
    pub interconnect_bytes: f64,
    /// Tier MVMs on the busiest stack, and its tier switches.
    pub busiest_stack_mvms: f64,
    pub busiest_stack_switches: f64,
    /// Index of the busiest stack (mapping stacks first, then the dedicated projection stacks).
    pub busiest_stack: usize,
    /// Operations on the digital and the attention units.
    pub digital_ops: f64,
    pub attention_ops: f64,
}

/// Cost of one scenario, per token, averaged over the steps replayed from the trace.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseCost {
    pub scenario: Scenario,
    /// Tokens replayed (steps × tokens per step).
    pub tokens: usize,
    /// Joules per token, per layer and component.
    pub energy: Breakdown,
    /// The `static` component of `energy`, itemised per block.
    pub static_energy: StaticEnergy,
    /// Seconds per step (mean over steps).
    pub step_time_s: f64,
    /// Latency a token sees: the step time for decode, step time / tokens for prefill.
    pub latency_per_token_s: f64,
    /// Tokens per step / step time.
    pub tokens_per_s: f64,
    /// Busy time per step of every resource (mean over steps).
    pub busy_per_step: ResourceBusy,
    /// The resource with the longest busy time.
    pub bottleneck: Bottleneck,
    /// Bytes and operations per step (mean over steps).
    pub traffic_per_step: Traffic,
    /// Data placement of the step.
    pub placement: Placement,
    /// Tier switches per token.
    pub tier_switches_per_token: f64,
}

/// Energy in a readable SI unit.
pub fn joules_si(j: f64) -> String {
    let a = j.abs();
    if a >= 1.0 {
        format!("{j:.3} J")
    } else if a >= 1e-3 {
        format!("{:.3} mJ", j * 1e3)
    } else if a >= 1e-6 {
        format!("{:.3} µJ", j * 1e6)
    } else {
        format!("{:.3} nJ", j * 1e9)
    }
}

/// Bytes in a readable SI unit.
pub fn bytes_si(b: f64) -> String {
    let a = b.abs();
    if a >= 1e12 {
        format!("{:.2} TB", b / 1e12)
    } else if a >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if a >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if a >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

/// A rate in a readable SI unit (`unit` per second).
pub(super) fn rate_si(r: f64, unit: &str) -> String {
    let a = r.abs();
    if a >= 1e12 {
        format!("{:.2} T{unit}/s", r / 1e12)
    } else if a >= 1e9 {
        format!("{:.1} G{unit}/s", r / 1e9)
    } else if a >= 1e6 {
        format!("{:.1} M{unit}/s", r / 1e6)
    } else {
        format!("{r:.0} {unit}/s")
    }
}

/// Seconds in a readable SI unit.
pub fn seconds_si(s: f64) -> String {
    let a = s.abs();
    if a >= 1.0 {
        format!("{s:.3} s")
    } else if a >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else if a >= 1e-6 {
        format!("{:.3} µs", s * 1e6)
    } else {
        format!("{:.1} ns", s * 1e9)
    }
}

pub(super) fn add_busy(a: &mut ResourceBusy, b: &ResourceBusy) {
    a.busiest_stack_s += b.busiest_stack_s;
    a.digital_units_s += b.digital_units_s;
    a.attention_units_s += b.attention_units_s;
    a.on_chip_memory_s += b.on_chip_memory_s;
    a.off_chip_memory_s += b.off_chip_memory_s;
    a.interconnect_s += b.interconnect_s;
    a.dependency_chain_s += b.dependency_chain_s;
}

pub(super) fn scale_busy(a: &ResourceBusy, f: f64) -> ResourceBusy {
    ResourceBusy {
        busiest_stack_s: a.busiest_stack_s * f,
        digital_units_s: a.digital_units_s * f,
        attention_units_s: a.attention_units_s * f,
        on_chip_memory_s: a.on_chip_memory_s * f,
        off_chip_memory_s: a.off_chip_memory_s * f,
        interconnect_s: a.interconnect_s * f,
        dependency_chain_s: a.dependency_chain_s * f,
    }
}

pub(super) fn add_traffic(a: &mut Traffic, b: &Traffic) {
    a.on_chip_weight_bytes += b.on_chip_weight_bytes;
    a.on_chip_kv_bytes += b.on_chip_kv_bytes;
    a.off_chip_weight_bytes += b.off_chip_weight_bytes;
    a.off_chip_kv_bytes += b.off_chip_kv_bytes;
    a.interconnect_bytes += b.interconnect_bytes;
    a.busiest_stack_mvms += b.busiest_stack_mvms;
    a.busiest_stack_switches += b.busiest_stack_switches;
    a.busiest_stack = b.busiest_stack;
    a.digital_ops += b.digital_ops;
    a.attention_ops += b.attention_ops;
}

pub(super) fn scale_traffic(a: &Traffic, f: f64) -> Traffic {
    Traffic {
        on_chip_weight_bytes: a.on_chip_weight_bytes * f,
        on_chip_kv_bytes: a.on_chip_kv_bytes * f,
        off_chip_weight_bytes: a.off_chip_weight_bytes * f,
        off_chip_kv_bytes: a.off_chip_kv_bytes * f,
        interconnect_bytes: a.interconnect_bytes * f,
        busiest_stack_mvms: a.busiest_stack_mvms * f,
        busiest_stack_switches: a.busiest_stack_switches * f,
        busiest_stack: a.busiest_stack,
        digital_ops: a.digital_ops * f,
        attention_ops: a.attention_ops * f,
    }
}
