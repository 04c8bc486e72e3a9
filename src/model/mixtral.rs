//! Mixtral (Jiang et al. 2024, arXiv 2401.04088; transformers `modeling_mixtral.py`):
//! GQA attention without q/k norm, every layer MoE, router softmax → top-k → renormalise.
use anyhow::Result;

use super::checkpoint::TensorStore;
use super::config::{AttentionConfig, Family, Fields, ModelConfig, QkNorm};
use super::moe::MoeNames;
use super::rope::RopeConfig;
use super::router::RouterRule;

/// Reads Mixtral's `config.json` fields (`num_local_experts`, `intermediate_size` per expert).
pub fn config(f: &Fields<'_>) -> Result<ModelConfig> {
    let c = f.common(1e-5)?;
    let top_k = f.usize("num_experts_per_tok")?;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        family: Family::Mixtral,
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
            qkv_bias: bias,
            o_bias: bias,
            clip_qkv: None,
        },
        num_experts: f.usize("num_local_experts")?,
        top_k,
        moe_intermediate_size: f.usize("intermediate_size")?,
        dense_intermediate_size: 0,
        shared_intermediate_size: 0,
        shared_expert_gated: false,
        moe_layers: vec![true; c.num_layers],
        router: RouterRule {
            top_k,
            renormalize: true,
            scaling: 1.0,
            group_limit: None,
        },
        tie_word_embeddings: c.tie_word_embeddings,
        sliding_window: f.opt_usize("sliding_window")?,
    })
}

/// Hub checkpoints use `block_sparse_moe.experts.E.{w1,w3,w2}`; transformers ≥ 5 saves `mlp.*`
/// (fused, or per-expert `gate_proj`/`up_proj`/`down_proj`).
pub fn names(store: &TensorStore) -> MoeNames {
    let legacy = store.contains("model.layers.0.block_sparse_moe.gate.weight");
    let w_names = legacy || store.contains("model.layers.0.mlp.experts.0.w1.weight");
    MoeNames {
        block: if legacy { "block_sparse_moe" } else { "mlp" },
        expert_proj: if w_names {
            ["w1", "w3", "w2"]
        } else {
            ["gate_proj", "up_proj", "down_proj"]
        },
        shared: None,
        shared_gate: None,
    }
}
