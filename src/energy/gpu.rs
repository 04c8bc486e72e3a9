//! The GPU reference: a roofline estimate of the same model on one or more GPUs.
//!
//! GPU presets live in `tiles/gpu/*.json` (built-ins embedded in the binary, like the tile presets) because they
//! describe a whole digital accelerator, not an analog tile: peak bf16 rate, HBM bandwidth and capacity, board
//! power, each a [`Constant`] with its source.
//!
//! Decode is memory-bound: one step of batch B reads the weights its tokens activate (attention, routers, LM head,
//! the union of the experts the B tokens chose) plus each sequence's KV cache, so the step takes
//! `max(bytes / HBM bandwidth, FLOPs / peak)`. A preset may say instead that a step reads every expert
//! (`expert_weights_read`), the whole model fetched per step. Prefill of P tokens is compute-bound with the same formula.
//! Energy = board power × time (an upper bound when the GPU is not fully loaded).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::cost::Constant;
use super::shape::ModelShape;
use crate::mapping::RoutingTrace;

/// A GPU preset (`tiles/gpu/<name>.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuPreset {
    pub name: String,
    pub description: String,
    /// Dense bf16 tensor-core peak, FLOP/s.
    pub peak_bf16_flops_per_s: Constant,
    /// HBM bandwidth, bytes/s.
    pub hbm_bandwidth_bytes_per_s: Constant,
    /// HBM capacity, bytes (sets how many GPUs the model needs).
    pub hbm_capacity_bytes: Constant,
    /// Board power, watts.
    pub board_power_w: Constant,
    /// Bytes per weight read from HBM.
    pub bytes_per_weight: Constant,
    /// Bytes per KV-cache value.
    pub bytes_per_kv_value: Constant,
    /// Which expert weights a decode step reads; absent = those the batch's tokens chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_weights_read: Option<ExpertWeightsRead>,
}

/// Which expert weights one GPU step reads from HBM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExpertReads {
    /// The union of the experts the step's tokens chose (what a grouped-GEMM kernel reads).
    #[default]
    Used,
    /// Every expert of every MoE layer, each step (the whole model fetched per step).
    All,
}

impl ExpertReads {
    /// In words, for tables.
    pub fn label(self) -> &'static str {
        match self {
            ExpertReads::Used => "reads the experts the batch chose",
            ExpertReads::All => "reads every expert each step",
        }
    }
}

/// An [`ExpertReads`] with where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertWeightsRead {
    pub value: ExpertReads,
    pub source: String,
}

const BUILTIN: &[(&str, &str)] = &[
    ("h100", include_str!("../../tiles/gpu/h100.json")),
    ("a100", include_str!("../../tiles/gpu/a100.json")),
];

impl GpuPreset {
    /// Parses and validates GPU preset JSON; `origin` names the file in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let p: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            anyhow::anyhow!("{origin}: field `{field}`: {}", e.into_inner())
        })?;
        for (field, c) in [
            ("peak_bf16_flops_per_s", &p.peak_bf16_flops_per_s),
            ("hbm_bandwidth_bytes_per_s", &p.hbm_bandwidth_bytes_per_s),
            ("hbm_capacity_bytes", &p.hbm_capacity_bytes),
            ("board_power_w", &p.board_power_w),
            ("bytes_per_weight", &p.bytes_per_weight),
            ("bytes_per_kv_value", &p.bytes_per_kv_value),
        ] {
            if !(c.value.is_finite() && (1e-30..=1e30).contains(&c.value)) {
                bail!(
                    "{origin}: field `{field}.value`: must be a finite number in [1e-30, 1e30], got {}",
                    c.value
                );
            }
            if c.source.trim().is_empty() {
                bail!("{origin}: field `{field}.source`: must name where the value comes from");
            }
        }
        if let Some(r) = &p.expert_weights_read {
            if r.source.trim().is_empty() {
                bail!("{origin}: field `expert_weights_read.source`: must name where the value comes from");
            }
        }
        Ok(p)
    }

    /// A built-in name (`h100`) or a path to a JSON file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::from_json_str(text, &format!("builtin:gpu/{name_or_path}"));
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            bail!(
                "no GPU preset named `{name_or_path}` and no such file (built-in: {})",
                BUILTIN.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
            );
        }
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Which expert weights a step reads (the experts chosen unless the preset says otherwise).
    pub fn expert_reads(&self) -> ExpertReads {
        self.expert_weights_read
            .as_ref()
            .map(|r| r.value)
            .unwrap_or_default()
    }

    /// Every constant as `(field, value, source)`.
    pub fn table(&self) -> Vec<(String, f64, String)> {
        [
            ("peak_bf16_flops_per_s", &self.peak_bf16_flops_per_s),
            ("hbm_bandwidth_bytes_per_s", &self.hbm_bandwidth_bytes_per_s),
            ("hbm_capacity_bytes", &self.hbm_capacity_bytes),
            ("board_power_w", &self.board_power_w),
            ("bytes_per_weight", &self.bytes_per_weight),
            ("bytes_per_kv_value", &self.bytes_per_kv_value),
        ]
        .into_iter()
        .map(|(f, c)| (f.to_string(), c.value, c.source.clone()))
        .collect()
    }
}

/// The GPU estimate of one phase (decode at a batch size, or prefill).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GpuEstimate {
    /// GPUs needed to hold the weights (model parallel, bandwidth and compute add up).
    pub gpus: usize,
    /// Tokens per step (decode batch, or prompt length for prefill).
    pub tokens_per_step: usize,
    /// Bytes read from HBM per step.
    pub bytes_per_step: f64,
    /// FLOPs per step.
    pub flops_per_step: f64,
    /// Step time, seconds: `max(bytes/bandwidth, FLOPs/peak)` over all GPUs.
    pub step_time_s: f64,
    /// Whether the step is bound by memory bandwidth (else by compute).
    pub memory_bound: bool,
    /// Energy per token, joules (board power × step time / tokens).
    pub energy_per_token_j: f64,
    /// Latency per token, seconds (the step time for decode, step time / tokens for prefill).
    pub latency_per_token_s: f64,
    pub tokens_per_s: f64,
}

/// Expected number of distinct experts a batch of `batch` tokens uses in traced layer `i`, from the trace's tokens
/// taken `batch` at a time (the union, averaged over groups).
fn mean_union(trace: &RoutingTrace, i: usize, batch: usize) -> f64 {
    let groups: Vec<&[Vec<Vec<usize>>]> = trace.tokens.chunks(batch.max(1)).collect();
    if groups.is_empty() {
        return 0.0;
    }
    let mut seen = vec![false; trace.n_experts[i]];
    let mut total = 0usize;
    for g in &groups {
        seen.iter_mut().for_each(|s| *s = false);
        for tok in g.iter() {
            for &e in &tok[i] {
                seen[e] = true;
            }
        }
        total += seen.iter().filter(|s| **s).count();
    }
    total as f64 / groups.len() as f64
}

/// Estimates one decode step of `batch` sequences at context `context` (decode), or one prefill of `batch` tokens
/// (`prefill` = true: contexts 0..batch, weights read once).
pub fn estimate(
    gpu: &GpuPreset,
    shape: &ModelShape,
    trace: &RoutingTrace,
    batch: usize,
    context: usize,
    prefill: bool,
) -> GpuEstimate {
    let bpv = gpu.bytes_per_weight.value;
    let bkv = gpu.bytes_per_kv_value.value;
    let h = shape.hidden_size as f64;
    let b = batch.max(1) as f64;
    let gpus = (shape.total_params() as f64 * bpv / gpu.hbm_capacity_bytes.value)
        .ceil()
        .max(1.0) as usize;
    // Weights read per step: dense parts once, experts by the union the batch activates.
    let m = shape.ffn_matrices() as f64;
    let expert_params = m * h * shape.moe_intermediate_size as f64;
    let mut weight_params = (shape.num_layers * shape.attention_params_per_layer) as f64
        + (shape.vocab_size * shape.hidden_size) as f64;
    let mut ffn_flops_per_token = 0.0;
    let mut traced = 0usize;
    for &moe in &shape.moe_layers {
        if moe {
            let union = match gpu.expert_reads() {
                ExpertReads::Used => mean_union(trace, traced, batch),
                ExpertReads::All => shape.num_experts as f64,
            };
            let per_token = trace.mean_active(trace.layers[traced]);
            traced += 1;
            weight_params += union * expert_params
                + m * h * shape.shared_intermediate_size as f64
                + shape.router_params() as f64;
            ffn_flops_per_token += 2.0
                * (per_token * expert_params
                    + m * h * shape.shared_intermediate_size as f64
                    + shape.router_params() as f64);
        } else {
            let p = m * h * shape.dense_intermediate_size as f64;
            weight_params += p;
            ffn_flops_per_token += 2.0 * p;
        }
    }
    let layers = shape.num_layers as f64;
    let kv_per_position = shape.kv_values_per_token as f64 * layers;
    // Mean context over the step's tokens.
    let mean_ctx = if prefill {
        (b - 1.0) / 2.0
    } else {
        context as f64
    };
    let kv_bytes = if prefill {
        // Prefill writes the cache once; reads stay on chip in fused attention kernels.
        b * kv_per_position * bkv
    } else {
        b * mean_ctx * kv_per_position * bkv
    };
    let bytes = weight_params * bpv + kv_bytes;
    let dense_flops = 2.0
        * ((shape.num_layers * shape.attention_params_per_layer) as f64
            + (shape.vocab_size * shape.hidden_size) as f64);
    let attn_flops = mean_ctx * shape.attention_flops_per_position as f64 * layers;
    let flops = b * (dense_flops + ffn_flops_per_token + attn_flops);
    let n = gpus as f64;
    let t_mem = bytes / (gpu.hbm_bandwidth_bytes_per_s.value * n);
    let t_cmp = flops / (gpu.peak_bf16_flops_per_s.value * n);
    let step = t_mem.max(t_cmp);
    let energy = gpu.board_power_w.value * n * step / b;
    GpuEstimate {
        gpus,
        tokens_per_step: batch,
        bytes_per_step: bytes,
        flops_per_step: flops,
        step_time_s: step,
        memory_bound: t_mem >= t_cmp,
        energy_per_token_j: energy,
        latency_per_token_s: if prefill { step / b } else { step },
        tokens_per_s: b / step,
    }
}
