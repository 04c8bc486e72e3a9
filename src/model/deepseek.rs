//! DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066; `model_type` "deepseek") and DeepSeek-V2 /
//! V2-Lite (arXiv 2405.04434; transformers `modeling_deepseek_v2.py`): the first
//! `first_k_dense_replace` layers are dense, the others add unweighted shared experts to routed
//! ones. V2 replaces attention by multi-head latent attention (MLA) with interleaved
//! ("complex") RoPE on a `qk_rope_head_dim` slice, and routes softmax → (group-limited) top-k →
//! × `routed_scaling_factor`, without renormalisation (transformers' V2 ignores `norm_topk_prob`).
use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use ndarray::{s, Array2, ArrayView2};

use super::checkpoint::TensorStore;
use super::common::{multi_head_attention, Linear, RmsNorm};
use super::config::{
    AttentionConfig, Family, Fields, MlaConfig, ModelConfig, QkNorm, MAX_ROUTED_SCALING,
};
use super::moe::MoeNames;
use super::rope::{RopeConfig, RopeTable};
use super::router::{GroupLimit, RouterRule};

/// Epsilon of `q_a_layernorm` and `kv_a_layernorm`, fixed in transformers' `DeepseekV2Attention`
/// (the RMSNorm default), not read from `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

/// Tensor names: `mlp.gate`, `mlp.experts.*`, `mlp.shared_experts.*` (no shared gate).
pub const NAMES: MoeNames = MoeNames {
    block: "mlp",
    expert_proj: ["gate_proj", "up_proj", "down_proj"],
    shared: Some("shared_experts"),
    shared_gate: None,
};

/// Reads a DeepSeekMoE or DeepSeek-V2 `config.json`.
pub fn config(f: &Fields<'_>, family: Family) -> Result<ModelConfig> {
    let c = f.common(1e-6)?;
    let top_k = f.usize("num_experts_per_tok")?;
    let moe_intermediate = f.usize("moe_intermediate_size")?;
    let first_dense = f.opt_usize("first_k_dense_replace")?.unwrap_or(0);
    let bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    if f.opt_bool("mlp_bias")?.unwrap_or(false) {
        bail!("{}: field `mlp_bias` = true is not supported", f.location);
    }
    let v2 = family == Family::DeepseekV2;
    let (attention, rope) = if v2 {
        let mla = MlaConfig {
            q_lora_rank: f.opt_usize("q_lora_rank")?,
            kv_lora_rank: f.usize("kv_lora_rank")?,
            qk_nope_head_dim: f.usize("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize("qk_rope_head_dim")?,
            v_head_dim: f.usize("v_head_dim")?,
            attention_bias: bias,
        };
        (
            AttentionConfig::Mla(mla),
            RopeConfig::from_fields(f, mla.qk_rope_head_dim, true)?,
        )
    } else {
        (
            AttentionConfig::Standard {
                qk_norm: QkNorm::None,
                qkv_bias: bias,
                o_bias: bias,
                clip_qkv: None,
            },
            RopeConfig::from_fields(f, c.head_dim, false)?,
        )
    };
    let freq = f.opt_usize("moe_layer_freq")?.unwrap_or(1).max(1);
    let moe_layers = (0..c.num_layers)
        .map(|l| l >= first_dense && (v2 || l % freq == 0))
        .collect();
    let group_limit = match f.opt_str("topk_method")?.unwrap_or("greedy") {
        "greedy" => None,
        "group_limited_greedy" => Some(GroupLimit {
            n_group: f.usize("n_group")?,
            topk_group: f.usize("topk_group")?,
        }),
        other => bail!(
            "{}: field `topk_method` = \"{other}\" is not supported (greedy, group_limited_greedy)",
            f.location
        ),
    };
    let num_experts = f.usize("n_routed_experts")?;
    if let Some(g) = group_limit {
        if g.n_group == 0 || !num_experts.is_multiple_of(g.n_group) || g.topk_group > g.n_group {
            bail!(
                "{}: fields `n_group` ({}) / `topk_group` ({}) do not divide {num_experts} experts",
                f.location,
                g.n_group,
                g.topk_group
            );
        }
    }
    Ok(ModelConfig {
        family,
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_layers: c.num_layers,
        num_heads: c.num_heads,
        num_kv_heads: if v2 { c.num_heads } else { c.num_kv_heads },
        head_dim: c.head_dim,
        rms_norm_eps: c.rms_norm_eps,
        rope,
        attention,
        num_experts,
        top_k,
        moe_intermediate_size: moe_intermediate,
        dense_intermediate_size: f.usize("intermediate_size")?,
        shared_intermediate_size: {
            let n_shared = f.opt_usize("n_shared_experts")?.unwrap_or(0);
            moe_intermediate.checked_mul(n_shared).ok_or_else(|| {
                anyhow!(
                    "{}: fields `moe_intermediate_size` ({moe_intermediate}) × `n_shared_experts` \
                     ({n_shared}) overflow",
                    f.location
                )
            })?
        },
        shared_expert_gated: false,
        moe_layers,
        router: RouterRule {
            top_k,
            renormalize: !v2 && f.opt_bool("norm_topk_prob")?.unwrap_or(false),
            scaling: {
                let s = f.opt_f64("routed_scaling_factor")?.unwrap_or(1.0);
                if !(s.is_finite() && s > 0.0 && s <= f64::from(MAX_ROUTED_SCALING)) {
                    bail!(
                        "{}: field `routed_scaling_factor` = {} is out of range (allowed > 0 and ≤ {MAX_ROUTED_SCALING})",
                        f.location,
                        super::config::show_number(s)
                    );
                }
                s as f32
            },
            group_limit,
        },
        tie_word_embeddings: c.tie_word_embeddings,
        sliding_window: None,
    })
}

/// Query projection of MLA: direct (V2-Lite) or low-rank with an RMSNorm in between (V2).
#[derive(Debug, Clone)]
pub enum QueryProj {
    Direct(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

/// Multi-head latent attention (DeepSeek-V2 §2.1): keys and values are decompressed from a
/// `kv_lora_rank` latent; a `qk_rope_head_dim` slice of q and a single shared k slice carry RoPE.
#[derive(Debug, Clone)]
pub struct MlaAttention {
    /// Query projection.
    pub q: QueryProj,
    /// `kv_a_proj_with_mqa`: hidden → latent ‖ k_rope.
    pub kv_a: Linear,
    /// `kv_a_layernorm` on the latent.
    pub kv_norm: RmsNorm,
    /// `kv_b_proj`: latent → per head (k_nope ‖ v).
    pub kv_b: Linear,
    /// Output projection `o_proj`.
    pub o: Linear,
    /// Attention heads.
    pub heads: usize,
    /// MLA widths.
    pub dims: MlaConfig,
}

impl MlaAttention {
    /// Loads the MLA tensors under `p` (`model.layers.N.self_attn`).
    pub fn load(store: &TensorStore, p: &str, cfg: &ModelConfig, d: &MlaConfig) -> Result<Self> {
        let (h, n) = (cfg.hidden_size, cfg.num_heads);
        let bias = d.attention_bias;
        let dq = d.qk_nope_head_dim + d.qk_rope_head_dim;
        let lin =
            |name: &str, out, inp, b| Linear::load(store, &format!("{p}.{name}"), out, inp, b);
        let q = match d.q_lora_rank {
            None => QueryProj::Direct(lin("q_proj", n * dq, h, false)?),
            Some(r) => QueryProj::LowRank {
                a: lin("q_a_proj", r, h, bias)?,
                norm: RmsNorm::load(
                    store,
                    &format!("{p}.q_a_layernorm.weight"),
                    r,
                    LATENT_NORM_EPS,
                )?,
                b: lin("q_b_proj", n * dq, r, false)?,
            },
        };
        Ok(Self {
            q,
            kv_a: lin(
                "kv_a_proj_with_mqa",
                d.kv_lora_rank + d.qk_rope_head_dim,
                h,
                bias,
            )?,
            kv_norm: RmsNorm::load(
                store,
                &format!("{p}.kv_a_layernorm.weight"),
                d.kv_lora_rank,
                LATENT_NORM_EPS,
            )?,
            kv_b: lin(
                "kv_b_proj",
                n * (d.qk_nope_head_dim + d.v_head_dim),
                d.kv_lora_rank,
                false,
            )?,
            o: lin("o_proj", h, n * d.v_head_dim, bias)?,
            heads: n,
            dims: *d,
        })
    }

    /// Attention output `[T, hidden]` for normalised input `x`.
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        seqs: &[Range<usize>],
        rope: &RopeTable,
    ) -> Array2<f32> {
        let d = &self.dims;
        let (n, nope, rd, dv, r) = (
            self.heads,
            d.qk_nope_head_dim,
            d.qk_rope_head_dim,
            d.v_head_dim,
            d.kv_lora_rank,
        );
        let dq = nope + rd;
        let mut q = match &self.q {
            QueryProj::Direct(l) => l.forward(x),
            QueryProj::LowRank { a, norm, b } => {
                let mut t = a.forward(x);
                norm.forward_inplace(t.view_mut());
                b.forward(t.view())
            }
        };
        let ckv = self.kv_a.forward(x);
        let mut latent = ckv.slice(s![.., ..r]).to_owned();
        self.kv_norm.forward_inplace(latent.view_mut());
        let kv = self.kv_b.forward(latent.view());
        let mut k_rope = ckv.slice(s![.., r..]).to_owned();
        for range in seqs {
            rope.apply(q.slice_mut(s![range.clone(), ..]), dq, nope);
            rope.apply(k_rope.slice_mut(s![range.clone(), ..]), rd, 0);
        }
        let tokens = x.nrows();
        let mut k = Array2::zeros((tokens, n * dq));
        let mut v = Array2::zeros((tokens, n * dv));
        let w = nope + dv;
        for h in 0..n {
            k.slice_mut(s![.., h * dq..h * dq + nope])
                .assign(&kv.slice(s![.., h * w..h * w + nope]));
            k.slice_mut(s![.., h * dq + nope..(h + 1) * dq])
                .assign(&k_rope);
            v.slice_mut(s![.., h * dv..(h + 1) * dv])
                .assign(&kv.slice(s![.., h * w + nope..(h + 1) * w]));
        }
        let scale = 1.0 / (dq as f32).sqrt();
        let attn = multi_head_attention(q.view(), k.view(), v.view(), n, n, dq, dv, seqs, scale);
        self.o.forward(attn.view())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        let q = match &self.q {
            QueryProj::Direct(l) => l.len(),
            QueryProj::LowRank { a, norm, b } => a.len() + norm.weight.len() + b.len(),
        };
        q + self.kv_a.len() + self.kv_norm.weight.len() + self.kv_b.len() + self.o.len()
    }

    /// Whether the attention has no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
