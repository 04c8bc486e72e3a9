//! Per-token cost of a mapped model: replay a routing trace through the chip, step by step, and attribute every
//! step's time to the resource that binds.
//!
//! A *step* is the set of tokens processed together: `batch` sequences decoding one token each at a given context
//! length, or the `tokens` of one prompt in prefill (contexts 0, 1, …). Within a step the tokens are independent, so
//! the chip overlaps them: while one token's experts run on the stacks, another's attention runs on the attention
//! units. The step therefore takes the longest of
//!
//! * each resource's **busy time**: the busiest analog stack (its tier MVMs, one tier at a time, plus tier
//!   switches), the digital units, the attention units, on-chip SRAM traffic, off-chip memory traffic and the
//!   on-chip network; and
//! * the **dependency chain** of one token: through every layer in order (norm, projections, attention, norm,
//!   router, experts, accumulation), each stage waiting for the previous one.
//!
//! The first token's chain fills the pipeline and the other n − 1 tokens follow at the pace of the busiest shared
//! resource: `step time = chain + (n − 1)/n · max over resources of busy time` (for one token, the chain; for many,
//! about the busiest resource). The bottleneck is the busiest resource when its busy time exceeds the chain, else
//! the chain; it is reported in words with its figures. Decode throughput is batch / step time; prefill throughput
//! is prompt tokens / step time.
//!
//! What runs where ([`Projections::Analog`], the paper's system): every linear layer — attention projections,
//! dense MLPs, routed and shared experts, LM head — on analog tiers; QKᵀ, softmax and AV on the attention units;
//! norms, router, residual adds, activations and the accumulation of partial sums on the digital units.
//! [`Projections::Digital`] is the variant with attention projections and LM head on the digital units.
//!
//! Memory: digital weights (router, digital experts, embeddings, digital projections) and the KV cache are placed
//! by capacity, weights first, into on-chip SRAM and then off-chip memory; a step that cannot fit is an error. Reads
//! and writes cost each level's energy per byte and busy that level for `bytes / bandwidth`.
//!
//! Energy: every MVM (array energy scaled by the block's share of the tier's cells, one DAC conversion per row, one
//! ADC conversion per column), every digital op, every byte moved, plus static power (itemised per block) × step
//! time.
use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::breakdown::{Breakdown, Component};
use super::cost::{CostModel, DigitalOp, KvCacheLevel, Topology};
use super::phase::{
    add_busy, add_traffic, bytes_si, rate_si, scale_busy, scale_traffic, seconds_si, Bottleneck,
    PhaseCost, Placement, ResourceBusy, Scenario, StaticEnergy, Traffic,
};
use super::shape::ModelShape;
use crate::mapping::{ChipGeometry, Mapping, RoutingTrace};
use crate::model::ExpertSlot;

/// Where the attention projections and LM head run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Projections {
    /// The paper's system: every linear layer on analog tiers (the default).
    #[default]
    Analog,
    /// Variant: attention projections and LM head on the digital units, weights read from memory every step.
    Digital,
}

impl Projections {
    /// Names the costed system in titles and tables.
    pub fn label(self) -> &'static str {
        match self {
            Projections::Analog => "paper's system: every linear layer analog",
            Projections::Digital => "variant: attention projections and LM head digital",
        }
    }
}

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

/// A projection on dedicated analog stacks: `blocks` full R×C blocks, one per stack, never switched.
#[derive(Clone, Copy, Debug)]
struct ProjectionGroup {
    blocks: usize,
    /// Additions summing partial outputs of blocks split along the input.
    partial_sum_adds: usize,
}

/// A mapped model on a costed chip, ready to replay traces.
pub struct EnergyModel<'a> {
    cost: &'a CostModel,
    geo: ChipGeometry,
    shape: &'a ModelShape,
    /// Stacks of the mapping (experts, dense MLPs).
    mapped_stacks: usize,
    /// `routed[l][e]`, and the always-active units of each layer.
    routed: Vec<Vec<Unit>>,
    always: Vec<Vec<Unit>>,
    /// Mean hops between a digital unit and a stack.
    hops: f64,
    projections: Projections,
    /// Analog projections of one layer: q/k/v (first MVM phase) and o (second); and the LM head.
    qkv: ProjectionGroup,
    out: ProjectionGroup,
    head: ProjectionGroup,
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

/// Time on `units` parallel units and energy of `ops` operations of class `op`.
fn digital(op: &DigitalOp, units: f64, ops: f64) -> (f64, f64) {
    (
        ops / (op.ops_per_s.value * units),
        ops * op.energy_per_op_j.value,
    )
}

impl<'a> EnergyModel<'a> {
    /// Prepares `mapping` of `shape` on a chip with `cost`.
    ///
    /// With [`Projections::Analog`] each attention projection and the LM head get dedicated stacks (one tier, never
    /// switched) with full R×C blocks, `⌈params / (R·C)⌉` of them, beside the mapping's stacks: every token costs one
    /// MVM per block, q/k/v then o (two MVM phases), the LM head one.
    pub fn new(
        cost: &'a CostModel,
        mapping: &Mapping,
        shape: &'a ModelShape,
        projections: Projections,
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
        let geo = mapping.geometry;
        let cells = geo.rows * geo.cols;
        let h = shape.hidden_size;
        // Splitting the input of a matrix with `outputs` columns over ⌈h/R⌉ blocks leaves (⌈h/R⌉ − 1)·outputs adds.
        let split = h.div_ceil(geo.rows).saturating_sub(1);
        let attn_outputs = shape.attention_params_per_layer / h.max(1);
        // q/k/v carry ¾ of a standard attention block's weights, o the rest.
        let qkv_params = shape.attention_params_per_layer * 3 / 4;
        let o_params = shape.attention_params_per_layer - qkv_params;
        let qkv = ProjectionGroup {
            blocks: qkv_params.div_ceil(cells),
            partial_sum_adds: split * attn_outputs * 3 / 4,
        };
        let out = ProjectionGroup {
            blocks: o_params.div_ceil(cells),
            partial_sum_adds: split * (attn_outputs - attn_outputs * 3 / 4),
        };
        let head = ProjectionGroup {
            blocks: (shape.vocab_size * h).div_ceil(cells),
            partial_sum_adds: split * shape.vocab_size,
        };
        let mapped_stacks = mapping.stacks_used.max(1);
        let mut m = Self {
            cost,
            geo,
            shape,
            mapped_stacks,
            routed,
            always: always_by_layer,
            hops: 1.0,
            projections,
            qkv,
            out,
            head,
        };
        m.hops = match cost.interconnect.topology {
            Topology::Mesh => (2.0 / 3.0 * (m.analog_stacks() as f64).sqrt()).max(1.0),
            Topology::Bus | Topology::PointToPoint => 1.0,
        };
        m
    }

    /// Stacks dedicated to the analog projections and LM head (0 in the digital-projections variant).
    pub fn projection_stacks(&self) -> usize {
        match self.projections {
            Projections::Analog => {
                self.shape.num_layers * (self.qkv.blocks + self.out.blocks) + self.head.blocks
            }
            Projections::Digital => 0,
        }
    }

    /// All analog stacks in use: the mapping's plus the projections'.
    pub fn analog_stacks(&self) -> usize {
        self.mapped_stacks + self.projection_stacks()
    }

    /// Charges `mvms` MVMs of full blocks to `at` (a layer, or `None` for the LM head): crossbar, one DAC
    /// conversion per row and one ADC conversion per column each, and their input/output bytes over the
    /// interconnect (also counted in `tr`).
    fn charge_full_block_mvms(
        &self,
        e: &mut Breakdown,
        tr: &mut Traffic,
        at: Option<usize>,
        mvms: f64,
    ) {
        let c = self.cost;
        let (r, k) = (self.geo.rows as f64, self.geo.cols as f64);
        let full_block_bytes =
            r * c.interconnect.bytes_per_input.value + k * c.interconnect.bytes_per_output.value;
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
        let bytes = mvms * full_block_bytes;
        e.add(
            at,
            Component::Interconnect,
            bytes * self.hops * c.interconnect.energy_per_byte_per_hop_j.value,
        );
        tr.interconnect_bytes += bytes;
    }

    /// Weights kept digital and read in full every step they are used: router, digital experts, digital
    /// projections (embeddings apart: a step reads one row per token).
    fn digital_weight_params(&self) -> f64 {
        let s = self.shape;
        let experts: usize = self
            .routed
            .iter()
            .flatten()
            .chain(self.always.iter().flatten())
            .map(|u| u.digital_params)
            .sum();
        let projections = match self.projections {
            Projections::Analog => 0,
            Projections::Digital => {
                s.num_layers * s.attention_params_per_layer + s.vocab_size * s.hidden_size
            }
        };
        let routers = s.router_params() * s.moe_layers.iter().filter(|m| **m).count();
        (experts + projections + routers) as f64
    }

    /// Places the data of `scenario` by capacity, or says why it cannot exist. Order of preference for on-chip
    /// SRAM: digital weights (read in full every step), then the KV cache (read in full every decode step), then
    /// the embedding table (one row per token).
    pub fn place(&self, scenario: Scenario) -> Result<Placement> {
        let c = self.cost;
        let s = self.shape;
        let (seqs, ctx) = match scenario {
            Scenario::Decode { batch, context } => (batch, context + 1),
            Scenario::Prefill { tokens } => (1, tokens),
        };
        let bpw = c.digital.bytes_per_weight.value;
        let w = self.digital_weight_params() * bpw;
        let kv = seqs as f64
            * ctx as f64
            * (s.kv_values_per_token * s.num_layers) as f64
            * c.digital.bytes_per_kv_value.value;
        let emb = (s.vocab_size * s.hidden_size) as f64 * bpw;
        let on_cap = c.memory.on_chip.capacity_bytes.value;
        let on_w = w.min(on_cap);
        let on_kv = match c.memory.kv_cache_level() {
            KvCacheLevel::ByCapacity => kv.min(on_cap - on_w),
            KvCacheLevel::OffChip => 0.0,
        };
        let on_emb = emb.min(on_cap - on_w - on_kv);
        let p = Placement {
            digital_weight_bytes: w,
            kv_cache_bytes: kv,
            embedding_bytes: emb,
            on_chip_weight_bytes: on_w,
            on_chip_kv_bytes: on_kv,
            on_chip_embedding_bytes: on_emb,
            off_chip_weight_bytes: w - on_w,
            off_chip_kv_bytes: kv - on_kv,
            off_chip_embedding_bytes: emb - on_emb,
        };
        let off = p.off_chip_weight_bytes + p.off_chip_kv_bytes + p.off_chip_embedding_bytes;
        let off_cap = c.memory.off_chip.capacity_bytes.value;
        if off > off_cap {
            bail!(
                "{}: {} of digital weights, {} of embeddings and {} of KV cache ({} sequence(s) × {} positions) do \
                 not fit: on-chip memory holds {} (cost.memory.on_chip.capacity_bytes), off-chip memory {} \
                 (cost.memory.off_chip.capacity_bytes, {}); use a smaller batch or context, or a preset with more \
                 memory",
                scenario.label(),
                bytes_si(w),
                bytes_si(emb),
                bytes_si(kv),
                seqs,
                ctx,
                bytes_si(on_cap),
                bytes_si(off_cap),
                c.memory.off_chip.kind
            );
        }
        Ok(p)
    }

    /// Replays `steps` steps of `scenario` from `trace` (tokens taken in order, wrapping around) and returns the
    /// per-token cost. Stacks start with no tier selected; the first use of a stack is not a switch. Errors when
    /// the scenario is empty, its memory cannot exist, or the constants give a non-finite result.
    pub fn run(&self, trace: &RoutingTrace, scenario: Scenario, steps: usize) -> Result<PhaseCost> {
        let n = scenario.tokens_per_step();
        if n == 0 {
            bail!(
                "{}: a step must process at least one token",
                scenario.label()
            );
        }
        if trace.tokens.is_empty() {
            bail!("the routing trace has no tokens");
        }
        let placement = self.place(scenario)?;
        let c = self.cost;
        let shape = self.shape;
        let steps = steps.max(1);
        let units = c.digital.units.value;
        let att_units = c.digital.attention_units.value;
        let bpw = c.digital.bytes_per_weight.value;
        let h = shape.hidden_size as f64;
        let layers = shape.num_layers;
        let contexts: Vec<usize> = match scenario {
            Scenario::Decode { context, .. } => vec![context; n],
            Scenario::Prefill { tokens } => (0..tokens).collect(),
        };
        let kv_pos_bytes = shape.kv_values_per_token as f64 * c.digital.bytes_per_kv_value.value;
        let frac = |on: f64, total: f64| if total > 0.0 { on / total } else { 1.0 };
        let w_on = frac(
            placement.on_chip_weight_bytes,
            placement.digital_weight_bytes,
        );
        let kv_on = frac(placement.on_chip_kv_bytes, placement.kv_cache_bytes);
        let emb_on = frac(placement.on_chip_embedding_bytes, placement.embedding_bytes);
        let traced: HashMap<usize, usize> = trace
            .layers
            .iter()
            .enumerate()
            .map(|(i, &l)| (l, i))
            .collect();
        let on = &c.memory.on_chip;
        let off = &c.memory.off_chip;
        let t_mvm = c.analog.tier_mvm_time_s.value + c.analog.adc_time_s.value;
        let cells = (self.geo.rows * self.geo.cols) as f64;
        let link_bw = c.interconnect.bandwidth_bytes_per_s.value;
        let (bin, bout) = (
            c.interconnect.bytes_per_input.value,
            c.interconnect.bytes_per_output.value,
        );
        let (r, k) = (self.geo.rows as f64, self.geo.cols as f64);
        let full_block_bytes = r * bin + k * bout;
        let total_stacks = self.analog_stacks();
        let proj_base = self.mapped_stacks;
        // SwiGLU: SiLU and the product per intermediate element; a plain activation: one op.
        let act_per_intermediate = if shape.gated_ffn { 2.0 } else { 1.0 };

        let mut e = Breakdown::new(layers);
        let mut current: Vec<Option<usize>> = vec![None; self.mapped_stacks];
        let mut switches_total = 0u64;
        let mut sum_busy = ResourceBusy::default();
        let mut sum_traffic = Traffic::default();
        let mut sum_step = 0.0f64;
        // Which resource bound each step, with its busy time (the most frequent is reported).
        let mut bound_by: BTreeMap<&'static str, usize> = BTreeMap::new();

        for step in 0..steps {
            let toks: Vec<&Vec<Vec<usize>>> = (0..n)
                .map(|j| &trace.tokens[(step * n + j) % trace.tokens.len()])
                .collect();
            let mut tr = Traffic::default();
            // Per-stack busy time and MVM/switch counts of this step (mapping stacks; projection stacks apart).
            let mut stack_busy = vec![0.0f64; self.mapped_stacks];
            let mut stack_mvms = vec![0.0f64; self.mapped_stacks];
            let mut stack_sw = vec![0.0f64; self.mapped_stacks];
            let mut stack_bytes = vec![0.0f64; self.mapped_stacks];
            let mut digital_t = 0.0f64;
            let mut attention_t = 0.0f64;
            let mut on_bytes_t = 0.0f64; // seconds of on-chip traffic
            let mut off_bytes_t = 0.0f64;
            // Chain of each token through the layers.
            let mut chain = vec![0.0f64; n];

            // Embedding rows of the step's tokens (counted with the weights' traffic).
            {
                let bytes = n as f64 * h * bpw;
                let (on_b, off_b) = (bytes * emb_on, bytes * (1.0 - emb_on));
                tr.on_chip_weight_bytes += on_b;
                tr.off_chip_weight_bytes += off_b;
                e.add(
                    None,
                    Component::OnChipMemory,
                    on_b * on.read_energy_per_byte_j.value,
                );
                e.add(
                    None,
                    Component::OffChipMemory,
                    off_b * off.read_energy_per_byte_j.value,
                );
                let (ta, tb) = (
                    on_b / on.bandwidth_bytes_per_s.value,
                    off_b / off.bandwidth_bytes_per_s.value,
                );
                on_bytes_t += ta;
                off_bytes_t += tb;
                chain.iter_mut().for_each(|x| *x += (ta + tb) / n as f64);
            }

            // Memory traffic: weights `w` bytes, KV `kv` bytes, read (or written); returns the chain time of the
            // access, charges energy and busy time.
            let mut mem = |e: &mut Breakdown,
                           tr: &mut Traffic,
                           at: Option<usize>,
                           w: f64,
                           kv: f64,
                           write: bool|
             -> (f64, f64) {
                let (on_e, off_e) = if write {
                    (
                        on.write_energy_per_byte_j.value,
                        off.write_energy_per_byte_j.value,
                    )
                } else {
                    (
                        on.read_energy_per_byte_j.value,
                        off.read_energy_per_byte_j.value,
                    )
                };
                let on_b = w * w_on + kv * kv_on;
                let off_b = w * (1.0 - w_on) + kv * (1.0 - kv_on);
                tr.on_chip_weight_bytes += w * w_on;
                tr.on_chip_kv_bytes += kv * kv_on;
                tr.off_chip_weight_bytes += w * (1.0 - w_on);
                tr.off_chip_kv_bytes += kv * (1.0 - kv_on);
                e.add(at, Component::OnChipMemory, on_b * on_e);
                e.add(at, Component::OffChipMemory, off_b * off_e);
                let t_on = on_b / on.bandwidth_bytes_per_s.value;
                let t_off = off_b / off.bandwidth_bytes_per_s.value;
                on_bytes_t += t_on;
                off_bytes_t += t_off;
                (t_on, t_off)
            };

            for l in 0..layers {
                let at = Some(l);
                let ti = traced.get(&l).copied();
                // Per token: norms (2 × ~4 ops per element), residual adds (2 × h).
                let (t, en) = digital(&c.digital.norm, units, 8.0 * h);
                e.add(at, Component::NormsActivations, en * n as f64);
                digital_t += t * n as f64;
                tr.digital_ops += 8.0 * h * n as f64;
                let (t_res, en_res) = digital(&c.digital.accumulation, units, 2.0 * h);
                e.add(at, Component::Accumulation, en_res * n as f64);
                digital_t += t_res * n as f64;
                tr.digital_ops += 2.0 * h * n as f64;
                // One token's work runs on one unit: its chain time is not divided by the unit count.
                let mut per_token_chain = (t + t_res) * units;

                // Attention projections.
                match self.projections {
                    Projections::Analog => {
                        for g in [self.qkv, self.out] {
                            let mvms = g.blocks as f64 * n as f64;
                            self.charge_full_block_mvms(&mut e, &mut tr, at, mvms);
                            let (ta, ea) =
                                digital(&c.digital.accumulation, units, g.partial_sum_adds as f64);
                            e.add(at, Component::Accumulation, ea * n as f64);
                            digital_t += ta * n as f64;
                            tr.digital_ops += g.partial_sum_adds as f64 * n as f64;
                            per_token_chain += t_mvm + full_block_bytes / link_bw + ta * units;
                        }
                    }
                    Projections::Digital => {
                        let ops = 2.0 * shape.attention_params_per_layer as f64;
                        let (t, en) = digital(&c.digital.matmul, units, ops);
                        e.add(at, Component::DigitalMatmul, en * n as f64);
                        digital_t += t * n as f64;
                        tr.digital_ops += ops * n as f64;
                        let (a, b) = mem(
                            &mut e,
                            &mut tr,
                            at,
                            shape.attention_params_per_layer as f64 * bpw,
                            0.0,
                            false,
                        );
                        per_token_chain += t * units + a.max(b);
                    }
                }

                // Attention over the KV cache: scores, softmax (~5 ops per head and position), values.
                let per_pos =
                    shape.attention_flops_per_position as f64 + 5.0 * shape.num_heads as f64;
                for (j, &ctx) in contexts.iter().enumerate() {
                    let positions = (ctx + 1) as f64;
                    let (t, en) = digital(&c.digital.attention, att_units, positions * per_pos);
                    e.add(at, Component::DigitalAttention, en);
                    attention_t += t;
                    tr.attention_ops += positions * per_pos;
                    // Decode reads the sequence's cache and writes the new position; prefill writes each position
                    // and keeps the prompt's keys and values on chip while its queries run (fused attention).
                    let (ra, rb) = match scenario {
                        Scenario::Decode { .. } => {
                            mem(&mut e, &mut tr, at, 0.0, ctx as f64 * kv_pos_bytes, false)
                        }
                        Scenario::Prefill { .. } => (0.0, 0.0),
                    };
                    let (wa, wb) = mem(&mut e, &mut tr, at, 0.0, kv_pos_bytes, true);
                    // One attention unit serves a token; its cache streams from each level in parallel.
                    chain[j] += per_token_chain
                        + (positions * per_pos) / c.digital.attention.ops_per_s.value
                        + (ra + wa).max(rb + wb);
                }

                // Router.
                if shape.moe_layers[l] {
                    let ops = 2.0 * shape.router_params() as f64;
                    let (t1, e1) = digital(&c.digital.matmul, units, ops);
                    let (t2, e2) = digital(&c.digital.activation, units, shape.num_experts as f64);
                    e.add(at, Component::DigitalMatmul, e1 * n as f64);
                    e.add(at, Component::NormsActivations, e2 * n as f64);
                    digital_t += (t1 + t2) * n as f64;
                    tr.digital_ops += (ops + shape.num_experts as f64) * n as f64;
                    let (a, b) = mem(
                        &mut e,
                        &mut tr,
                        at,
                        shape.router_params() as f64 * bpw,
                        0.0,
                        false,
                    );
                    chain
                        .iter_mut()
                        .for_each(|x| *x += (t1 + t2) * units + a.max(b));
                }

                // FFN: per token, its units' MVMs (per stack and phase), digital expert work, accumulation,
                // activations. Stacks serialise tier by tier over the whole step.
                let mut jobs: [BTreeMap<usize, BTreeMap<usize, usize>>; 2] =
                    [BTreeMap::new(), BTreeMap::new()];
                let mut digital_units_used: BTreeSet<usize> = BTreeSet::new();
                let e_count = self.routed[l].len();
                for (j, tok) in toks.iter().enumerate() {
                    let routed: Vec<(usize, &Unit)> = match ti {
                        Some(i) => tok[i].iter().map(|&x| (x, &self.routed[l][x])).collect(),
                        None => Vec::new(),
                    };
                    let mut adds = h * routed.len() as f64;
                    let mut act = 0.0;
                    let mut dx_ops = 0.0;
                    // This token's MVMs per stack and phase, and its tiers per stack.
                    let mut own: [BTreeMap<usize, (usize, BTreeSet<usize>)>; 2] =
                        [BTreeMap::new(), BTreeMap::new()];
                    let always = self.always[l]
                        .iter()
                        .enumerate()
                        .map(|(i, u)| (e_count + i, u));
                    for (key, u) in routed.into_iter().chain(always) {
                        act += act_per_intermediate * u.intermediate as f64;
                        adds += u.partial_sum_adds as f64;
                        if u.digital_params > 0 {
                            dx_ops += 2.0 * u.digital_params as f64;
                            digital_units_used.insert(key);
                        }
                        for (p, blocks) in u.phases.iter().enumerate() {
                            for b in blocks {
                                e.add(
                                    at,
                                    Component::Crossbar,
                                    c.analog.tier_mvm_energy_j.value * (b.rows * b.cols) as f64
                                        / cells,
                                );
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
                                tr.interconnect_bytes += bytes;
                                stack_bytes[b.stack] += bytes;
                                *jobs[p]
                                    .entry(b.stack)
                                    .or_default()
                                    .entry(b.tier)
                                    .or_default() += 1;
                                let o = own[p].entry(b.stack).or_default();
                                o.0 += 1;
                                o.1.insert(b.tier);
                            }
                        }
                    }
                    let (t_dx, e_dx) = digital(&c.digital.matmul, units, dx_ops);
                    e.add(at, Component::DigitalMatmul, e_dx);
                    let (t_acc, e_acc) = digital(&c.digital.accumulation, units, adds);
                    e.add(at, Component::Accumulation, e_acc);
                    let (t_act, e_act) = digital(&c.digital.activation, units, act);
                    e.add(at, Component::NormsActivations, e_act);
                    digital_t += t_dx + t_acc + t_act;
                    tr.digital_ops += dx_ops + adds + act;
                    // The token's analog path: per phase, its slowest stack (its own MVMs there, one tier at a
                    // time) plus the transfer of one block's inputs and outputs.
                    let mut t_analog = 0.0;
                    for phase in &own {
                        let slowest = phase
                            .values()
                            .map(|(m, tiers)| {
                                *m as f64 * t_mvm
                                    + (tiers.len() - 1) as f64 * c.analog.tier_switch_time_s.value
                            })
                            .fold(0.0, f64::max);
                        if !phase.is_empty() {
                            t_analog += slowest + full_block_bytes / link_bw;
                        }
                    }
                    chain[j] += t_analog.max(t_dx * units) + (t_acc + t_act) * units;
                }
                // Digital expert weights: read once per step for every unit the step touches.
                let dx_bytes: f64 = digital_units_used
                    .iter()
                    .map(|&key| {
                        let u = match key.checked_sub(e_count) {
                            Some(i) => &self.always[l][i],
                            None => &self.routed[l][key],
                        };
                        u.digital_params as f64 * bpw
                    })
                    .sum();
                if dx_bytes > 0.0 {
                    let (a, b) = mem(&mut e, &mut tr, at, dx_bytes, 0.0, false);
                    chain.iter_mut().for_each(|x| *x += a.max(b));
                }
                // Stacks: each phase's jobs, the current tier first, then ascending.
                for phase in &jobs {
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
                        for t in order {
                            if current[s].is_some_and(|cur| cur != t) {
                                sw += 1;
                            }
                            current[s] = Some(t);
                            mvms += tiers[&t];
                        }
                        switches_total += sw;
                        e.add(
                            at,
                            Component::TierSwitch,
                            sw as f64 * c.analog.tier_switch_energy_j.value,
                        );
                        stack_busy[s] +=
                            mvms as f64 * t_mvm + sw as f64 * c.analog.tier_switch_time_s.value;
                        stack_mvms[s] += mvms as f64;
                        stack_sw[s] += sw as f64;
                    }
                }
            }

            // LM head.
            match self.projections {
                Projections::Analog => {
                    let mvms = self.head.blocks as f64 * n as f64;
                    self.charge_full_block_mvms(&mut e, &mut tr, None, mvms);
                    let adds = self.head.partial_sum_adds as f64;
                    let (ta, ea) = digital(&c.digital.accumulation, units, adds);
                    e.add(None, Component::Accumulation, ea * n as f64);
                    digital_t += ta * n as f64;
                    tr.digital_ops += adds * n as f64;
                    chain
                        .iter_mut()
                        .for_each(|x| *x += t_mvm + full_block_bytes / link_bw + ta * units);
                }
                Projections::Digital => {
                    let vh = (shape.vocab_size * shape.hidden_size) as f64;
                    let (t, en) = digital(&c.digital.matmul, units, 2.0 * vh);
                    e.add(None, Component::DigitalMatmul, en * n as f64);
                    digital_t += t * n as f64;
                    tr.digital_ops += 2.0 * vh * n as f64;
                    let (a, b) = mem(&mut e, &mut tr, None, vh * bpw, 0.0, false);
                    chain.iter_mut().for_each(|x| *x += t * units + a.max(b));
                }
            }

            // Projection stacks: each does one MVM per token of the step (per layer, its own stacks).
            let proj_busy = match self.projections {
                Projections::Analog => n as f64 * t_mvm,
                Projections::Digital => 0.0,
            };
            let (mut busiest, mut busiest_t) = (0usize, -1.0f64);
            for (s, &t) in stack_busy.iter().enumerate() {
                if t > busiest_t {
                    (busiest, busiest_t) = (s, t);
                }
            }
            let (b_mvms, b_sw) = if proj_busy > busiest_t {
                busiest = proj_base;
                busiest_t = proj_busy;
                (n as f64, 0.0)
            } else {
                (stack_mvms[busiest], stack_sw[busiest])
            };
            // Interconnect: every stack's link, and the digital units' ports which see every transfer.
            let port_bw = match c.interconnect.topology {
                Topology::Mesh | Topology::PointToPoint => {
                    link_bw * c.interconnect.digital_ports.value
                }
                Topology::Bus => link_bw,
            };
            let mut t_net = tr.interconnect_bytes / port_bw;
            if c.interconnect.topology != Topology::Bus {
                let mut worst_link = stack_bytes.iter().copied().fold(0.0, f64::max);
                if self.projections == Projections::Analog {
                    worst_link = worst_link.max(n as f64 * full_block_bytes);
                }
                t_net = t_net.max(worst_link / link_bw);
            }
            let chain_max = chain.iter().copied().fold(0.0, f64::max);
            let busy = ResourceBusy {
                busiest_stack_s: busiest_t.max(0.0),
                digital_units_s: digital_t,
                attention_units_s: attention_t,
                on_chip_memory_s: on_bytes_t,
                off_chip_memory_s: off_bytes_t,
                interconnect_s: t_net,
                dependency_chain_s: chain_max,
            };
            // The first token's chain fills the pipeline; the other n − 1 tokens follow at the pace of the busiest
            // shared resource (its busy time per token).
            let (res_key, _, res_busy) =
                busy.entries()[..6]
                    .iter()
                    .copied()
                    .fold(("busiest_stack", "", 0.0), |best, x| {
                        if x.2 > best.2 {
                            x
                        } else {
                            best
                        }
                    });
            let follow = res_busy * (n - 1) as f64 / n as f64;
            let t_step = chain_max + follow;
            let key = if res_busy > chain_max {
                res_key
            } else {
                "dependency_chain"
            };
            *bound_by.entry(key).or_default() += 1;
            tr.busiest_stack = busiest;
            tr.busiest_stack_mvms = b_mvms;
            tr.busiest_stack_switches = b_sw;
            add_busy(&mut sum_busy, &busy);
            add_traffic(&mut sum_traffic, &tr);
            sum_step += t_step;
        }

        let st = steps as f64;
        let step_time_s = sum_step / st;
        let busy = scale_busy(&sum_busy, 1.0 / st);
        let traffic = scale_traffic(&sum_traffic, 1.0 / st);
        let tokens = steps * n;
        // Static energy over the time the steps occupy the chip.
        let sp = &c.static_power;
        let per_token = sum_step / tokens as f64;
        let static_energy = StaticEnergy {
            digital_units_j: sp.digital_units_w.value * per_token,
            attention_units_j: sp.attention_units_w.value * per_token,
            on_chip_memory_j: sp.on_chip_memory_w.value * per_token,
            off_chip_memory_j: sp.off_chip_memory_w.value * per_token,
            analog_stacks_j: sp.per_stack_w.value * total_stacks as f64 * per_token,
        };
        let mut energy = e.scaled(1.0 / tokens as f64);
        energy.add(None, Component::Static, static_energy.total());
        let key = bound_by
            .iter()
            .max_by_key(|(_, &count)| count)
            .map_or("dependency_chain", |(k, _)| *k);
        let bottleneck = Bottleneck {
            resource: key.to_string(),
            description: self.describe(key, &busy, &traffic, n),
        };
        let cost = PhaseCost {
            scenario,
            tokens,
            energy,
            static_energy,
            step_time_s,
            latency_per_token_s: match scenario {
                Scenario::Decode { .. } => step_time_s,
                Scenario::Prefill { .. } => step_time_s / n as f64,
            },
            tokens_per_s: n as f64 / step_time_s,
            busy_per_step: busy,
            bottleneck,
            traffic_per_step: traffic,
            placement,
            tier_switches_per_token: switches_total as f64 / tokens as f64,
        };
        let finite = cost.energy.is_finite()
            && cost.step_time_s.is_finite()
            && cost.step_time_s > 0.0
            && cost.tokens_per_s.is_finite()
            && cost.busy_per_step.entries().iter().all(|x| x.2.is_finite());
        if !finite {
            bail!(
                "{}: the preset's cost constants give a non-finite or zero result (step time {} s, energy {} J per \
                 token); check the `cost` section for constants that overflow or vanish together",
                scenario.label(),
                cost.step_time_s,
                cost.energy.total()
            );
        }
        Ok(cost)
    }

    /// The bottleneck in words, with the figures that make it bind.
    fn describe(&self, key: &str, b: &ResourceBusy, t: &Traffic, n: usize) -> String {
        let c = self.cost;
        let t_mvm = c.analog.tier_mvm_time_s.value + c.analog.adc_time_s.value;
        match key {
            "busiest_stack" => {
                let what = if t.busiest_stack >= self.mapped_stacks {
                    "a projection stack".to_string()
                } else {
                    format!("stack {}", t.busiest_stack)
                };
                format!(
                    "tier MVMs on {what} ({:.0} MVMs of {} + {:.0} tier switches per step = {})",
                    t.busiest_stack_mvms,
                    seconds_si(t_mvm),
                    t.busiest_stack_switches,
                    seconds_si(b.busiest_stack_s)
                )
            }
            "digital_units" => format!(
                "digital units ({:.3e} ops per step on {} unit(s) = {})",
                t.digital_ops,
                c.digital.units.value,
                seconds_si(b.digital_units_s)
            ),
            "attention_units" => format!(
                "attention units ({:.3e} ops per step on {} unit(s) at {} each = {})",
                t.attention_ops,
                c.digital.attention_units.value,
                rate_si(c.digital.attention.ops_per_s.value, "op"),
                seconds_si(b.attention_units_s)
            ),
            "on_chip_memory" => format!(
                "on-chip SRAM ({} KV + {} weights per step at {})",
                bytes_si(t.on_chip_kv_bytes),
                bytes_si(t.on_chip_weight_bytes),
                rate_si(c.memory.on_chip.bandwidth_bytes_per_s.value, "B")
            ),
            "off_chip_memory" => {
                let what = if t.off_chip_kv_bytes >= t.off_chip_weight_bytes {
                    "KV cache"
                } else {
                    "digital weights"
                };
                format!(
                    "off-chip {what} ({} KV + {} weights per step at {}, {})",
                    bytes_si(t.off_chip_kv_bytes),
                    bytes_si(t.off_chip_weight_bytes),
                    rate_si(c.memory.off_chip.bandwidth_bytes_per_s.value, "B"),
                    c.memory.off_chip.kind
                )
            }
            "interconnect" => format!(
                "interconnect ({} per step through {} link(s) of {})",
                bytes_si(t.interconnect_bytes),
                c.interconnect.digital_ports.value,
                rate_si(c.interconnect.bandwidth_bytes_per_s.value, "B")
            ),
            _ => format!(
                "dependency chain of one token through {} layers ({}; {} token(s) per step overlap)",
                self.shape.num_layers,
                seconds_si(b.dependency_chain_s),
                n
            ),
        }
    }
}
