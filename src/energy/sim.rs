//! Per-token cost of a mapped model: replay a routing trace through the chip, step by step.
//!
//! A *step* is the set of tokens processed together: `batch` sequences decoding one token each at a given context
//! length, or the `tokens` of one prompt in prefill (contexts 0, 1, …). For each layer of each step:
//!
//! * **digital**: two RMSNorms, the attention projections and the scores/values over the KV cache, the router;
//!   digital experts; the accumulation of crossbar partial sums and weighted expert outputs; the activation
//!   functions. Work of class `x` takes `ops / (x.ops_per_s · units)` and `ops · x.energy_per_op_j`.
//! * **memory**: the digital weights the step touches are read once per step; decode reads each sequence's KV cache,
//!   prefill writes each prompt position once (fused attention keeps the prompt's keys/values on chip). If the
//!   digital weights plus the KV cache of the step exceed the on-chip memory, that fraction of every read comes from
//!   off-chip (energy per byte, bandwidth); the rest costs the on-chip read energy.
//! * **analog**: every token runs every block of each analog expert it uses: one MVM per block (array energy scaled
//!   by the block's share of the tier's cells, one DAC conversion per row, one ADC conversion per column). Blocks
//!   on different stacks run in parallel; MVMs on one stack serialise, tier by tier (the tier the stack is on first,
//!   then ascending), and every change of tier costs a switch. Gate/up blocks run before down blocks (two phases).
//! * **interconnect**: inputs go to and outputs come back from each block's stack: `bytes · hops · energy`, mean
//!   hops `max(1, ⅔·√stacks)` on a mesh (1 on a bus); a stack's transfers take `bytes / link bandwidth` on a mesh,
//!   all transfers of a phase share the bandwidth on a bus.
//!
//! Latency of a step = Σ over layers of (attention + norms + router + max(analog FFN, digital experts) +
//! accumulation + activations) + LM head. Decode throughput is batch / step latency (the next step of a batch needs
//! this one's tokens); prefill tokens are independent per layer, so the layer pipeline fills and the busiest resource
//! (each stack, the digital units, off-chip memory) bounds it: tokens / max(busy time). Static power is charged over
//! that time.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::breakdown::{Breakdown, Component};
use super::cost::{CostModel, DigitalOp, Topology};
use super::shape::ModelShape;
use crate::mapping::{ChipGeometry, Mapping, RoutingTrace};
use crate::model::ExpertSlot;

/// One crossbar block as the cost model sees it.
#[derive(Clone, Copy, Debug)]
struct Block {
    stack: usize,
    tier: usize,
    rows: usize,
    cols: usize,
}

/// An expert (or shared expert / dense MLP) of one layer.
#[derive(Clone, Debug, Default)]
struct Unit {
    /// Analog blocks: gate/up (phase 0) and down (phase 1). Empty when digital.
    phases: [Vec<Block>; 2],
    /// Weights when digital (0 when analog).
    digital_params: usize,
    /// Additions that sum partial results of the blocks of its analog matrices.
    partial_sum_adds: usize,
    /// Intermediate width (activation function elements).
    intermediate: usize,
}

/// MVMs of one phase per stack: tier → (MVM count, bytes moved over the interconnect).
type StackJobs = BTreeMap<usize, BTreeMap<usize, (usize, f64)>>;

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
    fn tokens_per_step(self) -> usize {
        match self {
            Scenario::Decode { batch, .. } => batch.max(1),
            Scenario::Prefill { tokens } => tokens.max(1),
        }
    }
}

/// Cost of one scenario, per token, averaged over the steps replayed from the trace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseCost {
    pub scenario: Scenario,
    /// Tokens replayed (steps × tokens per step).
    pub tokens: usize,
    /// Joules per token, per layer and component.
    pub energy: Breakdown,
    /// Seconds per step along the layer pipeline (mean over steps).
    pub step_latency_s: f64,
    /// Seconds per layer of a step (mean over steps); the LM head is not included.
    pub layer_latency_s: Vec<f64>,
    /// Latency a token sees: the step latency for decode, step latency / tokens for prefill.
    pub latency_per_token_s: f64,
    /// Tokens per second: batch / step latency for decode; for prefill with the layer pipeline kept full.
    pub tokens_per_s: f64,
    /// What bounds throughput: `step latency` (decode), or the busiest resource in prefill (`stack N`, `digital`,
    /// `off-chip`, `projection stacks`).
    pub bottleneck: String,
    /// Tier switches per token.
    pub tier_switches_per_token: f64,
    /// Fraction of digital weight and KV reads served from off-chip memory.
    pub off_chip_fraction: f64,
}

/// A mapped model on a costed chip, ready to replay traces.
pub struct EnergyModel<'a> {
    cost: &'a CostModel,
    geo: ChipGeometry,
    shape: &'a ModelShape,
    stacks: usize,
    /// `routed[l][e]`, and the always-active units of each layer.
    routed: Vec<Vec<Unit>>,
    always: Vec<Vec<Unit>>,
    /// Mean hops between a digital unit and a stack.
    hops: f64,
    /// Digital weight bytes the chip must hold (attention, routers, LM head, digital experts).
    digital_weight_bytes: f64,
    /// Attention projections and LM head on dedicated analog stacks (see [`EnergyModel::new`]).
    analog_projections: bool,
}

/// The unit of (`layer`, `slot`): a routed expert, or an always-active unit created on first use.
fn unit_mut<'u>(
    routed: &'u mut [Vec<Unit>],
    always: &'u mut BTreeMap<(usize, ExpertSlot), Unit>,
    layer: usize,
    slot: ExpertSlot,
) -> &'u mut Unit {
    match slot {
        ExpertSlot::Routed(x) => &mut routed[layer][x],
        s => always.entry((layer, s)).or_default(),
    }
}

/// Time and energy of digital work.
fn digital(op: &DigitalOp, units: f64, ops: f64) -> (f64, f64) {
    (
        ops / (op.ops_per_s.value * units),
        ops * op.energy_per_op_j.value,
    )
}

impl<'a> EnergyModel<'a> {
    /// Prepares `mapping` of `shape` on a chip with `cost`.
    ///
    /// `analog_projections` puts the attention projections and the LM head on analog tiles too, as in the system of
    /// Büchel et al. (only attention over the KV cache, norms, router and activations stay digital): each projection
    /// gets dedicated stacks (one tier, never switched) with full R×C blocks, `⌈params / (R·C)⌉` of them, so every
    /// token costs one MVM per block; q/k/v then o (two MVM phases), the LM head one. Off by default: the
    /// heterogeneous mapping keeps them digital (docs/model.md §4.2).
    pub fn new(
        cost: &'a CostModel,
        mapping: &Mapping,
        shape: &'a ModelShape,
        analog_projections: bool,
    ) -> Self {
        let l = shape.num_layers;
        let e = shape.num_experts;
        let mut routed: Vec<Vec<Unit>> = vec![vec![Unit::default(); e]; l];
        let mut always: BTreeMap<(usize, ExpertSlot), Unit> = BTreeMap::new();
        for m in &mapping.analog {
            let u = unit_mut(&mut routed, &mut always, m.id.layer, m.id.slot);
            let phase = usize::from(m.id.proj == crate::model::Proj::Down);
            u.phases[phase].extend(m.blocks.iter().map(|b| Block {
                stack: b.stack,
                tier: b.tier,
                rows: b.in_range.len(),
                cols: b.out_range.len(),
            }));
            u.partial_sum_adds +=
                m.blocks.iter().map(|b| b.out_range.len()).sum::<usize>() - m.n_out;
            if m.id.proj != crate::model::Proj::Down {
                u.intermediate = m.n_out;
            }
        }
        for d in &mapping.digital {
            let u = unit_mut(&mut routed, &mut always, d.id.layer, d.id.slot);
            u.digital_params += d.n_out * d.n_in;
            if d.id.proj != crate::model::Proj::Down {
                u.intermediate = d.n_out;
            }
        }
        let mut always_by_layer: Vec<Vec<Unit>> = vec![Vec::new(); l];
        for ((layer, _), u) in always {
            always_by_layer[layer].push(u);
        }
        let stacks = mapping.stacks_used.max(1);
        let hops = match cost.interconnect.topology {
            Topology::Mesh => (2.0 / 3.0 * (stacks as f64).sqrt()).max(1.0),
            Topology::Bus => 1.0,
        };
        let digital_experts: usize = mapping.digital.iter().map(|d| d.n_out * d.n_in).sum();
        let projections = if analog_projections {
            0
        } else {
            shape.num_layers * shape.attention_params_per_layer
                + shape.vocab_size * shape.hidden_size
        };
        let digital_weight_bytes = (projections
            + shape.router_params() * shape.moe_layers.iter().filter(|m| **m).count()
            + digital_experts) as f64
            * cost.digital.bytes_per_value.value;
        Self {
            cost,
            geo: mapping.geometry,
            shape,
            stacks,
            routed,
            always: always_by_layer,
            hops,
            digital_weight_bytes,
            analog_projections,
        }
    }

    /// Energy of `n` tokens through a projection of `params` weights on dedicated analog stacks (full blocks), added
    /// to `e`; returns the busy time of those stacks per MVM phase.
    fn analog_projection(
        &self,
        e: &mut Breakdown,
        at: Option<usize>,
        params: usize,
        n: usize,
    ) -> f64 {
        let c = self.cost;
        let (r, k) = (self.geo.rows as f64, self.geo.cols as f64);
        let blocks = params.div_ceil(self.geo.rows * self.geo.cols) as f64;
        let mvms = blocks * n as f64;
        e.add(
            at,
            Component::Crossbar,
            mvms * c.analog.tier_mvm_energy_j.value,
        );
        e.add(
            at,
            Component::Dac,
            mvms * r * c.analog.dac_energy_per_conversion_j.value,
        );
        e.add(
            at,
            Component::Adc,
            mvms * k * c.analog.adc_energy_per_conversion_j.value,
        );
        let bytes =
            r * c.interconnect.bytes_per_input.value + k * c.interconnect.bytes_per_output.value;
        e.add(
            at,
            Component::Interconnect,
            mvms * bytes * self.hops * c.interconnect.energy_per_byte_per_hop_j.value,
        );
        n as f64
            * (c.analog.tier_mvm_time_s.value
                + c.analog.adc_time_s.value
                + bytes / c.interconnect.bandwidth_bytes_per_s.value)
    }

    /// Replays `steps` steps of `scenario` from `trace` (tokens taken in order, wrapping around) and returns the
    /// per-token cost. Stacks start with no tier selected; the first use of a stack is not a switch.
    pub fn run(&self, trace: &RoutingTrace, scenario: Scenario, steps: usize) -> PhaseCost {
        let c = self.cost;
        let shape = self.shape;
        let n = scenario.tokens_per_step();
        let steps = steps.max(1);
        let units = c.digital.units.value;
        let bpv = c.digital.bytes_per_value.value;
        let h = shape.hidden_size as f64;
        let layers = shape.num_layers;
        let contexts: Vec<usize> = match scenario {
            Scenario::Decode { context, .. } => vec![context; n],
            Scenario::Prefill { tokens } => (0..tokens.max(1)).collect(),
        };
        let kv_bytes_per_position = shape.kv_values_per_token as f64 * bpv;
        let max_ctx = contexts.iter().copied().max().unwrap_or(0) + 1;
        let kv_resident = n as f64 * max_ctx as f64 * kv_bytes_per_position * layers as f64;
        let needed = self.digital_weight_bytes + kv_resident;
        let off_frac = ((needed - c.digital.on_chip_memory_bytes.value) / needed).max(0.0);
        let traced: HashMap<usize, usize> = trace
            .layers
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i))
            .collect();

        let mut e = Breakdown::new(layers);
        let mut current: Vec<Option<usize>> = vec![None; self.stacks];
        let mut stack_busy = vec![0.0f64; self.stacks];
        let mut digital_busy = 0.0f64;
        let mut off_chip_busy = 0.0f64;
        let mut latency_sum = 0.0f64;
        let mut layer_latency = vec![0.0f64; layers];
        let mut switches = 0u64;
        let mut projection_busy_sum = 0.0f64;
        let t_mvm = c.analog.tier_mvm_time_s.value + c.analog.adc_time_s.value;
        let cells = (self.geo.rows * self.geo.cols) as f64;
        let link_bw = c.interconnect.bandwidth_bytes_per_s.value;
        let (bin, bout) = (
            c.interconnect.bytes_per_input.value,
            c.interconnect.bytes_per_output.value,
        );

        // Reads `bytes` of digital weights or KV: on-chip energy to `comp`, off-chip share to OffChip.
        let mut read =
            |e: &mut Breakdown, layer: Option<usize>, comp: Component, bytes: f64| -> f64 {
                e.add(
                    layer,
                    comp,
                    bytes * (1.0 - off_frac) * c.digital.on_chip_read_energy_per_byte_j.value,
                );
                e.add(
                    layer,
                    Component::OffChip,
                    bytes * off_frac * c.off_chip.energy_per_byte_j.value,
                );
                let t = bytes * off_frac / c.off_chip.bandwidth_bytes_per_s.value;
                off_chip_busy += t;
                t
            };

        for step in 0..steps {
            let toks: Vec<&Vec<Vec<usize>>> = (0..n)
                .map(|j| &trace.tokens[(step * n + j) % trace.tokens.len().max(1)])
                .collect();
            let mut step_latency = 0.0;
            // Busiest dedicated projection stack group of this step (each layer has its own).
            let mut projection_busy = 0.0f64;
            for (l, lat) in layer_latency.iter_mut().enumerate() {
                let at = Some(l);
                let mut t_digital = 0.0;
                let mut t_layer = 0.0;
                // Norms: input and post-attention RMSNorm, ~4 ops per element.
                let (t, en) = digital(&c.digital.norm, units, 2.0 * 4.0 * h * n as f64);
                e.add(at, Component::DigitalNormAct, en);
                t_layer += t;
                t_digital += t;
                // Attention: projections, scores and values over the cache, weights once per step, KV per token.
                let mut attn_weight_bytes = 0.0;
                if self.analog_projections {
                    let t = self.analog_projection(&mut e, at, shape.attention_params_per_layer, n);
                    // q/k/v, then o: two phases on the layer's own stacks.
                    t_layer += 2.0 * t;
                    projection_busy = projection_busy.max(2.0 * t);
                } else {
                    let (t, en) = digital(
                        &c.digital.matmul,
                        units,
                        2.0 * (shape.attention_params_per_layer * n) as f64,
                    );
                    e.add(at, Component::DigitalAttention, en);
                    t_layer += t;
                    t_digital += t;
                    attn_weight_bytes = shape.attention_params_per_layer as f64 * bpv;
                }
                let ctx_sum: f64 = contexts.iter().map(|&x| x as f64).sum();
                let score_ops = ctx_sum
                    * (shape.attention_flops_per_position as f64 + 5.0 * shape.num_heads as f64);
                let (t, en) = digital(&c.digital.attention, units, score_ops);
                e.add(at, Component::DigitalAttention, en);
                t_layer += t;
                t_digital += t;
                // Decode reads every cached position; prefill writes each position once and keeps the keys and
                // values of the prompt in on-chip tiles while its queries run (fused attention), as the GPU
                // estimate assumes.
                let kv_reads = match scenario {
                    Scenario::Decode { .. } => ctx_sum,
                    Scenario::Prefill { .. } => n as f64,
                };
                let attn_bytes = attn_weight_bytes + kv_reads * kv_bytes_per_position;
                t_layer += read(&mut e, at, Component::DigitalAttention, attn_bytes);

                let ti = traced.get(&l).copied();
                if shape.moe_layers[l] {
                    let (t1, e1) = digital(
                        &c.digital.matmul,
                        units,
                        2.0 * (shape.router_params() * n) as f64,
                    );
                    let (t2, e2) =
                        digital(&c.digital.activation, units, (shape.num_experts * n) as f64);
                    e.add(at, Component::DigitalRouter, e1 + e2);
                    t_layer += t1 + t2;
                    t_digital += t1 + t2;
                    t_layer += read(
                        &mut e,
                        at,
                        Component::DigitalRouter,
                        shape.router_params() as f64 * bpv,
                    );
                }

                // FFN: collect the MVMs per stack and phase, digital expert work, accumulation, activations.
                let mut jobs: [StackJobs; 2] = [BTreeMap::new(), BTreeMap::new()];
                let mut digital_ops = 0.0;
                // Digital units touched this step (routed expert index, or E + index of an always-active unit):
                // their weights are read once per step.
                let mut digital_units_used: BTreeSet<usize> = BTreeSet::new();
                let mut adds = 0.0;
                let mut act = 0.0;
                for tok in &toks {
                    let routed: Vec<(usize, &Unit)> = match ti {
                        Some(i) => tok[i].iter().map(|&x| (x, &self.routed[l][x])).collect(),
                        None => Vec::new(),
                    };
                    adds += h * routed.len() as f64;
                    let e_count = self.routed[l].len();
                    let always = self.always[l]
                        .iter()
                        .enumerate()
                        .map(|(i, u)| (e_count + i, u));
                    for (key, u) in routed.into_iter().chain(always) {
                        act += 2.0 * u.intermediate as f64;
                        adds += u.partial_sum_adds as f64;
                        if u.digital_params > 0 {
                            digital_ops += 2.0 * u.digital_params as f64;
                            digital_units_used.insert(key);
                        }
                        for (p, blocks) in u.phases.iter().enumerate() {
                            for b in blocks {
                                let en_x = c.analog.tier_mvm_energy_j.value
                                    * (b.rows * b.cols) as f64
                                    / cells;
                                e.add(at, Component::Crossbar, en_x);
                                e.add(
                                    at,
                                    Component::Dac,
                                    b.rows as f64 * c.analog.dac_energy_per_conversion_j.value,
                                );
                                e.add(
                                    at,
                                    Component::Adc,
                                    b.cols as f64 * c.analog.adc_energy_per_conversion_j.value,
                                );
                                let bytes = b.rows as f64 * bin + b.cols as f64 * bout;
                                e.add(
                                    at,
                                    Component::Interconnect,
                                    bytes
                                        * self.hops
                                        * c.interconnect.energy_per_byte_per_hop_j.value,
                                );
                                let slot = jobs[p]
                                    .entry(b.stack)
                                    .or_default()
                                    .entry(b.tier)
                                    .or_default();
                                slot.0 += 1;
                                slot.1 += bytes;
                            }
                        }
                    }
                }
                // Analog time: per phase, the slowest stack.
                let mut t_analog = 0.0;
                for phase in &jobs {
                    let mut slowest = 0.0f64;
                    let mut bus_bytes = 0.0;
                    for (&s, tiers) in phase {
                        let mut order: Vec<usize> = tiers.keys().copied().collect();
                        if let Some(cur) = current[s] {
                            if let Some(pos) = order.iter().position(|&t| t == cur) {
                                order.remove(pos);
                                order.insert(0, cur);
                            }
                        }
                        let mut sw = 0u64;
                        let mut mvms = 0usize;
                        let mut bytes = 0.0;
                        for t in order {
                            if current[s].is_some_and(|cur| cur != t) {
                                sw += 1;
                            }
                            current[s] = Some(t);
                            mvms += tiers[&t].0;
                            bytes += tiers[&t].1;
                        }
                        switches += sw;
                        e.add(
                            at,
                            Component::TierSwitch,
                            sw as f64 * c.analog.tier_switch_energy_j.value,
                        );
                        let mut busy =
                            mvms as f64 * t_mvm + sw as f64 * c.analog.tier_switch_time_s.value;
                        match c.interconnect.topology {
                            Topology::Mesh => busy += bytes / link_bw,
                            Topology::Bus => bus_bytes += bytes,
                        }
                        stack_busy[s] += busy;
                        slowest = slowest.max(busy);
                    }
                    t_analog += slowest + bus_bytes / link_bw;
                }
                let (t_dx, e_dx) = digital(&c.digital.matmul, units, digital_ops);
                e.add(at, Component::DigitalExperts, e_dx);
                let e_count = self.routed[l].len();
                let dx_bytes: f64 = digital_units_used
                    .iter()
                    .map(|&k| {
                        let u = match k.checked_sub(e_count) {
                            Some(i) => &self.always[l][i],
                            None => &self.routed[l][k],
                        };
                        u.digital_params as f64 * bpv
                    })
                    .sum();
                let t_dx = t_dx + read(&mut e, at, Component::DigitalExperts, dx_bytes);
                t_digital += t_dx;
                t_layer += t_analog.max(t_dx);
                let (t, en) = digital(&c.digital.accumulation, units, adds);
                e.add(at, Component::Accumulation, en);
                t_layer += t;
                t_digital += t;
                let (t, en) = digital(&c.digital.activation, units, act);
                e.add(at, Component::DigitalNormAct, en);
                t_layer += t;
                t_digital += t;
                digital_busy += t_digital;
                *lat += t_layer;
                step_latency += t_layer;
            }
            // LM head (final norm folded into the per-layer norms' order of magnitude).
            let vh = shape.vocab_size * shape.hidden_size;
            if self.analog_projections {
                let mut head = Breakdown::new(0);
                let t = self.analog_projection(&mut head, None, vh, n);
                e.add(None, Component::LmHead, head.total());
                step_latency += t;
                projection_busy = projection_busy.max(t);
            } else {
                let (t, en) = digital(&c.digital.matmul, units, 2.0 * vh as f64 * n as f64);
                e.add(None, Component::LmHead, en);
                digital_busy += t;
                step_latency += t + read(&mut e, None, Component::LmHead, vh as f64 * bpv);
            }
            latency_sum += step_latency;
            projection_busy_sum += projection_busy;
        }

        let tokens = steps * n;
        // Decode: a batch's next step needs this step's tokens, so the chip is occupied for the whole step latency.
        // Prefill: the prompt's tokens are independent per layer, so the layer pipeline fills and the busiest
        // resource (a stack, the digital units, off-chip memory, the projection stacks) sets the time.
        let (bottleneck, occupied) = match scenario {
            Scenario::Decode { .. } => ("step latency".to_string(), latency_sum),
            Scenario::Prefill { .. } => {
                let mut best = ("digital".to_string(), digital_busy);
                for (name, b) in [
                    ("off-chip".to_string(), off_chip_busy),
                    ("projection stacks".to_string(), projection_busy_sum),
                ]
                .into_iter()
                .chain(
                    stack_busy
                        .iter()
                        .enumerate()
                        .map(|(s, &b)| (format!("stack {s}"), b)),
                ) {
                    if b > best.1 {
                        best = (name, b);
                    }
                }
                best
            }
        };
        e.add(
            None,
            Component::Static,
            c.digital.static_power_w.value * occupied,
        );
        let step_latency_s = latency_sum / steps as f64;
        PhaseCost {
            scenario,
            tokens,
            energy: e.scaled(1.0 / tokens as f64),
            step_latency_s,
            layer_latency_s: layer_latency.iter().map(|t| t / steps as f64).collect(),
            latency_per_token_s: match scenario {
                Scenario::Decode { .. } => step_latency_s,
                Scenario::Prefill { .. } => step_latency_s / n as f64,
            },
            tokens_per_s: tokens as f64 / occupied.max(f64::MIN_POSITIVE),
            bottleneck,
            tier_switches_per_token: switches as f64 / tokens as f64,
            off_chip_fraction: off_frac,
        }
    }
}
