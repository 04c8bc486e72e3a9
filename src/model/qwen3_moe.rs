//! Qwen3-MoE (transformers `modeling_qwen3_moe.py`): per-head q/k RMSNorm (width `head_dim`,
//! which may differ from hidden/heads), no shared expert, router softmax → top-k
//! (± `norm_topk_prob`, true on released checkpoints).
use anyhow::Result;

use super::config::{
    qwen_moe_layers, qwen_sliding_window, AttentionConfig, Family, Fields, ModelConfig, QkNorm,
};
use super::moe::MoeNames;
use super::rope::RopeConfig;
use super::router::RouterRule;

/// Tensor names: `mlp.gate`, `mlp.experts.E.{gate,up,down}_proj` (or fused).
pub const NAMES: MoeNames = MoeNames {
    block: "mlp",
    expert_proj: ["gate_proj", "up_proj", "down_proj"],
    shared: None,
    shared_gate: None,
};

/// Reads Qwen3-MoE's `config.json`.
pub fn config(f: &Fields<'_>) -> Result<ModelConfig> {
    let c = f.common(1e-6)?;
    let top_k = f.usize("num_experts_per_tok")?;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        family: Family::Qwen3Moe,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_layers: c.num_layers,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        rms_norm_eps: c.rms_norm_eps,
        rope: RopeConfig::from_fields(f, c.head_dim, false)?,
        attention: AttentionConfig::Standard {
            qk_norm: QkNorm::PerHead,
            qkv_bias: bias,
            o_bias: bias,
            clip_qkv: None,
        },
        num_experts: f.usize_any(&["num_experts", "num_local_experts"])?,
        top_k,
        moe_intermediate_size: f.usize("moe_intermediate_size")?,
        dense_intermediate_size: f.opt_usize("intermediate_size")?.unwrap_or(0),
        shared_intermediate_size: 0,
        shared_expert_gated: false,
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
