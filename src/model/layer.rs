//! A pre-norm decoder layer: `h += attn(norm₁(h)); h += ffn(norm₂(h))`, the structure shared by
//! every supported family.
use std::ops::Range;

use anyhow::Result;
use ndarray::{Array2, ArrayView2};

use super::checkpoint::TensorStore;
use super::common::{RmsNorm, StandardAttention, StandardAttentionSpec, SwiGlu};
use super::config::{AttentionConfig, ModelConfig};
use super::deepseek::MlaAttention;
use super::moe::{swiglu, ExpertLinear, ExpertSlot, MoeBlock, MoeNames, MoeSizes};
use super::rope::RopeTable;
use super::router::{Assignment, RouterKind};

/// Attention variant of a layer.
#[derive(Debug, Clone)]
pub enum Attention {
    Standard(StandardAttention),
    Mla(MlaAttention),
}

impl Attention {
    /// Attention output `[T, hidden]` for normalised input `x`.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        seqs: &[Range<usize>],
        rope: &RopeTable,
    ) -> Array2<f32> {
        match self {
            Attention::Standard(a) => a.forward(x, seqs, rope),
            Attention::Mla(a) => a.forward(x, seqs, rope),
        }
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        match self {
            Attention::Standard(a) => a.len(),
            Attention::Mla(a) => a.len(),
        }
    }

    /// Whether the attention has no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Feed-forward of a layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Dense SwiGLU MLP (DeepSeek first layers, Qwen `mlp_only_layers`).
    Dense(SwiGlu),
    Moe(MoeBlock),
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// RMSNorm before attention (`input_layernorm`).
    pub input_norm: RmsNorm,
    /// Self-attention.
    pub attention: Attention,
    /// RMSNorm before the feed-forward (`post_attention_layernorm`).
    pub post_attention_norm: RmsNorm,
    /// Dense MLP or MoE block.
    pub ffn: Ffn,
}

impl DecoderLayer {
    /// Loads layer `l` whose attention is standard (or MLA for DeepSeek-V2) and whose MoE tensors
    /// follow `names`; dense layers read `mlp.{gate,up,down}_proj`.
    pub fn load(
        store: &TensorStore,
        cfg: &ModelConfig,
        l: usize,
        names: &MoeNames,
    ) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let h = cfg.hidden_size;
        let norm = |n: &str| RmsNorm::load(store, &format!("{p}.{n}.weight"), h, cfg.rms_norm_eps);
        let attention = match cfg.attention {
            AttentionConfig::Standard {
                qk_norm,
                qkv_bias,
                o_bias,
                clip_qkv,
            } => Attention::Standard(StandardAttention::load(
                store,
                &format!("{p}.self_attn"),
                &StandardAttentionSpec {
                    hidden: h,
                    heads: cfg.num_heads,
                    kv_heads: cfg.num_kv_heads,
                    head_dim: cfg.head_dim,
                    qkv_bias,
                    o_bias,
                    qk_norm,
                    clip_qkv,
                    eps: cfg.rms_norm_eps,
                },
            )?),
            AttentionConfig::Mla(mla) => Attention::Mla(MlaAttention::load(
                store,
                &format!("{p}.self_attn"),
                cfg,
                &mla,
            )?),
        };
        let ffn = if cfg.moe_layers[l] {
            Ffn::Moe(MoeBlock::load(
                store,
                &p,
                names,
                &MoeSizes {
                    hidden: h,
                    experts: cfg.num_experts,
                    intermediate: cfg.moe_intermediate_size,
                    shared_intermediate: cfg.shared_intermediate_size,
                },
            )?)
        } else {
            Ffn::Dense(SwiGlu::load(
                store,
                &format!("{p}.mlp"),
                ["gate_proj", "up_proj", "down_proj"],
                h,
                cfg.dense_intermediate_size,
            )?)
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            attention,
            post_attention_norm: norm("post_attention_layernorm")?,
            ffn,
        })
    }

    /// Applies the layer to `h` in place; returns the routing of its MoE block (empty if dense).
    pub fn forward(
        &self,
        l: usize,
        h: &mut Array2<f32>,
        ctx: &PassContext<'_>,
    ) -> Result<Vec<Assignment>> {
        let a =
            self.attention
                .forward(self.input_norm.forward(h.view()).view(), ctx.seqs, ctx.rope);
        *h += &a;
        let x = self.post_attention_norm.forward(h.view());
        let (y, routing) = match &self.ffn {
            Ffn::Dense(_) => (
                swiglu(ctx.backend, l, ExpertSlot::DenseMlp, x.view()),
                Vec::new(),
            ),
            Ffn::Moe(m) => m.forward(l, x.view(), ctx.router, &ctx.config.router, ctx.backend)?,
        };
        *h += &y;
        Ok(routing)
    }
}

/// What every layer of one forward pass shares.
pub struct PassContext<'a> {
    /// Row range of each packed sequence.
    pub seqs: &'a [Range<usize>],
    /// cos/sin for positions 0..longest sequence.
    pub rope: &'a RopeTable,
    /// The model's configuration (router rule).
    pub config: &'a ModelConfig,
    /// Routing rule of this pass.
    pub router: &'a RouterKind,
    /// Backend of the feed-forward products.
    pub backend: &'a dyn ExpertLinear,
}
