//! Qwen2-MoE (transformers `modeling_qwen2_moe.py`): q/k/v bias, MoE on layers selected by
//! `decoder_sparse_step` / `mlp_only_layers`, router softmax → top-k (± `norm_topk_prob`), plus a
//! shared expert scaled by `sigmoid(shared_expert_gate · x)`.
use anyhow::Result;

use super::config::{
    qwen_moe_layers, qwen_sliding_window, AttentionConfig, Family, Fields, ModelConfig, QkNorm,
};
use super::moe::MoeNames;
use super::rope::RopeConfig;
use super::router::RouterRule;

/// Tensor names: `mlp.gate`, `mlp.experts.*`, `mlp.shared_expert.*`, `mlp.shared_expert_gate`.
pub const NAMES: MoeNames = MoeNames {
    block: "mlp",
    expert_proj: ["gate_proj", "up_proj", "down_proj"],
    shared: Some("shared_expert"),
    shared_gate: Some("shared_expert_gate"),
};

/// Reads Qwen2-MoE's `config.json` (`num_experts`, `moe_intermediate_size`,
/// `shared_expert_intermediate_size`, `qkv_bias`, default true as in Qwen2).
pub fn config(f: &Fields<'_>) -> Result<ModelConfig> {
    let c = f.common(1e-6)?;
    let top_k = f.usize("num_experts_per_tok")?;
    Ok(ModelConfig {
        family: Family::Qwen2Moe,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_layers: c.num_layers,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        rms_norm_eps: c.rms_norm_eps,
        rope: RopeConfig::from_fields(f, c.head_dim, false)?,
        attention: AttentionConfig::Standard {
            qk_norm: QkNorm::None,
            qkv_bias: f.opt_bool("qkv_bias")?.unwrap_or(true),
            o_bias: false,
            clip_qkv: None,
        },
        num_experts: f.usize_any(&["num_experts", "num_local_experts"])?,
        top_k,
        moe_intermediate_size: f.usize("moe_intermediate_size")?,
        dense_intermediate_size: f.opt_usize("intermediate_size")?.unwrap_or(0),
        shared_intermediate_size: f.opt_usize("shared_expert_intermediate_size")?.unwrap_or(0),
        shared_expert_gated: true,
        moe_layers: qwen_moe_layers(f, c.num_layers)?,
        router: RouterRule {
            top_k,
            renormalize: f.opt_bool("norm_topk_prob")?.unwrap_or(false),
            scaling: 1.0,
            group_limit: None,
        },
        tie_word_embeddings: c.tie_word_embeddings,
        sliding_window: qwen_sliding_window(f)?,
    })
}
