//! `aimc info [--model DIR] [--json]`: architecture and parameter counts of a model.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::model::config::{AttentionConfig, Family, QkNorm};
use crate::model::rope::RopeScaling;
use crate::model::{embedded, Model, ModelConfig, ParamCounts};

/// Arguments of `aimc info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// HuggingFace checkpoint directory (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Info<'a> {
    config: &'a ModelConfig,
    params: ParamCounts,
    tokenizer_vocab: Option<usize>,
}

/// Runs `aimc info`.
pub fn run(args: InfoArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => Model::load(dir).with_context(|| format!("loading {}", dir.display()))?,
        None => embedded::load()?,
    };
    let info = Info {
        config: &model.config,
        params: model.param_counts(),
        tokenizer_vocab: model.tokenizer.as_ref().map(|t| t.vocab_size()),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", render(&info));
    }
    Ok(())
}

/// The family as its `model_type` and the name people use.
fn family(f: Family) -> &'static str {
    match f {
        Family::Mixtral => "Mixtral (mixtral)",
        Family::Olmoe => "OLMoE (olmoe)",
        Family::Qwen2Moe => "Qwen2-MoE (qwen2_moe)",
        Family::Qwen3Moe => "Qwen3-MoE (qwen3_moe)",
        Family::DeepseekMoe => "DeepSeekMoE (deepseek)",
        Family::DeepseekV2 => "DeepSeek-V2 (deepseek_v2)",
    }
}

fn qk_norm_name(n: QkNorm) -> &'static str {
    match n {
        QkNorm::None => "none",
        QkNorm::Full => "full (one RMSNorm over all heads)",
        QkNorm::PerHead => "per head (RMSNorm of head width)",
    }
}

fn rope_scaling(s: &RopeScaling) -> String {
    match *s {
        RopeScaling::None => "no scaling".into(),
        RopeScaling::Linear { factor } => format!("linear scaling × {factor}"),
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            ..
        } => format!("YaRN × {factor} from {original_max_position_embeddings} positions"),
        RopeScaling::Llama3 {
            factor,
            original_max_position_embeddings,
            ..
        } => {
            format!("Llama-3 scaling × {factor} from {original_max_position_embeddings} positions")
        }
    }
}

fn attention(c: &ModelConfig) -> String {
    match c.attention {
        AttentionConfig::Standard {
            qk_norm,
            qkv_bias,
            clip_qkv,
            ..
        } => format!(
            "{} heads, {} kv heads, head dim {}, q/k norm: {}{}{}",
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            qk_norm_name(qk_norm),
            if qkv_bias { ", qkv bias" } else { "" },
            clip_qkv.map_or(String::new(), |v| format!(", clip_qkv {v}")),
        ),
        AttentionConfig::Mla(m) => format!(
            "MLA, {} heads, q rank {}, kv rank {}, qk dims {} nope + {} rope, v dim {}",
            c.num_heads,
            m.q_lora_rank.map_or("full".to_owned(), |r| r.to_string()),
            m.kv_lora_rank,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim
        ),
    }
}

fn render(info: &Info<'_>) -> String {
    let c = info.config;
    let p = &info.params;
    let moe_layers = c.moe_layers.iter().filter(|m| **m).count();
    let mut s = format!(
        "family            {}\n\
         layers            {} ({} MoE, {} dense)\n\
         hidden            {}\n\
         attention         {}\n\
         experts           {} routed per MoE layer, top-{}, expert intermediate {}\n\
         shared expert     {}\n\
         router            {}\n\
         rope              θ = {}, dim {}, {} pairs, {}\n\
         vocab             {} (tokenizer: {})\n\n",
        family(c.family),
        c.num_layers,
        moe_layers,
        c.num_layers - moe_layers,
        c.hidden_size,
        attention(c),
        c.num_experts,
        c.top_k,
        c.moe_intermediate_size,
        if c.shared_intermediate_size == 0 {
            "none".to_owned()
        } else {
            format!(
                "intermediate {}{}",
                c.shared_intermediate_size,
                if c.shared_expert_gated {
                    ", sigmoid-gated"
                } else {
                    ""
                }
            )
        },
        c.router,
        c.rope.theta,
        c.rope.dim,
        if c.rope.interleaved {
            "interleaved"
        } else {
            "half-split"
        },
        rope_scaling(&c.rope.scaling),
        c.vocab_size,
        info.tokenizer_vocab
            .map_or("none".to_owned(), |v| format!("{v} tokens")),
    );
    let pct = |n: usize| 100.0 * n as f64 / p.total as f64;
    for (name, n) in [
        ("embeddings", p.embeddings),
        ("lm head", p.lm_head),
        ("attention", p.attention),
        ("router", p.router),
        ("routed experts", p.experts),
        ("shared experts", p.shared_experts),
        ("dense MLPs", p.dense_mlp),
        ("norms", p.norms),
    ] {
        s += &format!("{name:<17} {n:>14} ({:5.1}%)\n", pct(n));
    }
    s += &format!("{:<17} {:>14}\n", "total", p.total);
    s += &format!("{:<17} {:>14} per token\n", "active", p.active_per_token);
    s
}
