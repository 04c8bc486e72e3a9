//! OLMoE (Muennighoff et al. 2024, arXiv 2409.02060; transformers `modeling_olmoe.py`):
//! q/k RMSNorm over the whole projection width, optional `clip_qkv`, every layer MoE, router
//! softmax → top-k, renormalised only when `norm_topk_prob`.
use anyhow::Result;

use super::config::{AttentionConfig, Family, Fields, ModelConfig, QkNorm};
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

/// Reads OLMoE's `config.json` (`num_experts`, `intermediate_size` per expert, `clip_qkv`).
pub fn config(f: &Fields<'_>) -> Result<ModelConfig> {
    let c = f.common(1e-5)?;
    let top_k = f.usize("num_experts_per_tok")?;
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    // OLMoE's attention always uses hidden/heads as head width.
    let head_dim = c.hidden_size / c.num_heads;
    Ok(ModelConfig {
        family: Family::Olmoe,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_layers: c.num_layers,
        num_heads: c.num_heads,
        num_kv_heads: c.num_kv_heads,
        head_dim,
        rms_norm_eps: c.rms_norm_eps,
        rope: RopeConfig::from_fields(f, head_dim, false)?,
        attention: AttentionConfig::Standard {
            qk_norm: QkNorm::Full,
            qkv_bias: bias,
            o_bias: bias,
            clip_qkv: match f.opt_f64("clip_qkv")? {
                Some(c) if !(c.is_finite() && c > 0.0 && c <= f64::from(f32::MAX)) => {
                    anyhow::bail!(
                        "{}: field `clip_qkv` = {} is out of range (a finite number > 0)",
                        f.location,
                        super::config::show_number(c)
                    )
                }
                c => c.map(|c| c as f32),
            },
        },
        num_experts: f.usize_any(&["num_experts", "num_local_experts"])?,
        top_k,
        moe_intermediate_size: f.usize("intermediate_size")?,
        dense_intermediate_size: 0,
        shared_intermediate_size: 0,
        shared_expert_gated: false,
        moe_layers: vec![true; c.num_layers],
        router: RouterRule {
            top_k,
            renormalize: f.opt_bool("norm_topk_prob")?.unwrap_or(false),
            scaling: 1.0,
            group_limit: None,
        },
        tie_word_embeddings: c.tie_word_embeddings,
        sliding_window: None,
    })
}
