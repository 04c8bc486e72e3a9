//! `config.json` normalised over the MoE families (docs/model.md §5).
//!
//! Each family file reads its own field names through [`Fields`] and fills a [`ModelConfig`]; the
//! forward pass only ever sees the normalised form.
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::Value;

use super::rope::RopeConfig;
use super::router::RouterRule;

/// Largest vocabulary accepted (`vocab_size`): token ids are `u32` and real vocabularies stay
/// below 2^20; the bound keeps every size product far from overflow.
pub const MAX_VOCAB: usize = 1 << 24;
/// Largest width accepted for any hidden, head, rank or intermediate size.
pub const MAX_WIDTH: usize = 1 << 20;
/// Largest `num_hidden_layers` accepted (the largest released models have ~100-200).
pub const MAX_LAYERS: usize = 1 << 14;
/// Largest head count accepted.
pub const MAX_HEADS: usize = 1 << 14;
/// Largest routed-expert count accepted.
pub const MAX_EXPERTS: usize = 1 << 16;
/// Accepted `rms_norm_eps` range: released checkpoints use 1e-6..1e-5; ε ≥ 1e-2 swamps the mean
/// square of unit-scale activations, and ε below 1e-30 is 0 in practice.
pub const MIN_NORM_EPS: f32 = 1e-30;
/// See [`MIN_NORM_EPS`].
pub const MAX_NORM_EPS: f32 = 1e-2;
/// Largest `routed_scaling_factor` accepted (DeepSeek-V2 uses 16, V3 2.5).
pub const MAX_ROUTED_SCALING: f32 = 1e3;

/// The checkpoint families aimc loads (`model_type` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Family {
    /// `mixtral`: softmax → top-k → renormalise (Jiang et al. 2024).
    Mixtral,
    /// `olmoe`: q/k RMSNorm over the full projection width, optional `clip_qkv` (Muennighoff et al. 2024).
    Olmoe,
    /// `qwen2_moe`: q/k/v bias, sigmoid-gated shared expert.
    Qwen2Moe,
    /// `qwen3_moe`: per-head q/k RMSNorm.
    Qwen3Moe,
    /// `deepseek` (DeepSeekMoE, Dai et al. 2024): dense first layers, unweighted shared experts.
    DeepseekMoe,
    /// `deepseek_v2` (DeepSeek-V2 / V2-Lite): as DeepSeekMoE with MLA attention.
    DeepseekV2,
}

impl Family {
    /// Maps `model_type` to a family; unknown types are an error naming the field.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Some(match model_type {
            "mixtral" => Family::Mixtral,
            "olmoe" => Family::Olmoe,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3_moe" => Family::Qwen3Moe,
            "deepseek" => Family::DeepseekMoe,
            "deepseek_v2" => Family::DeepseekV2,
            _ => return None,
        })
    }
}

/// How q and k are normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QkNorm {
    None,
    /// One RMSNorm over the whole projection (`[heads·head_dim]`), OLMoE.
    Full,
    /// One RMSNorm of width `head_dim` shared by all heads, Qwen3.
    PerHead,
}

/// Multi-head latent attention sizes (DeepSeek-V2, arXiv 2405.04434 §2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MlaConfig {
    /// Rank of the query down-projection; `None` = a plain `q_proj` (V2-Lite).
    pub q_lora_rank: Option<usize>,
    /// Rank of the shared key/value latent.
    pub kv_lora_rank: usize,
    /// Per-head q/k width without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head q/k width with RoPE (k part shared by all heads).
    pub qk_rope_head_dim: usize,
    /// Per-head value width.
    pub v_head_dim: usize,
    /// Bias on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` (`attention_bias`).
    pub attention_bias: bool,
}

/// Attention variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum AttentionConfig {
    /// Grouped-query attention with separate q/k/v projections.
    Standard {
        qk_norm: QkNorm,
        /// Whether q/k/v projections carry a bias.
        qkv_bias: bool,
        /// Whether `o_proj` carries a bias.
        o_bias: bool,
        /// OLMoE `clip_qkv`: clamp q, k, v to ±c after projection.
        clip_qkv: Option<f32>,
    },
    /// DeepSeek-V2 multi-head latent attention.
    Mla(MlaConfig),
}

/// A checkpoint's architecture, normalised over families.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Checkpoint family (`model_type`).
    pub family: Family,
    /// Embedding rows (`vocab_size`).
    pub vocab_size: usize,
    /// Model width (`hidden_size`).
    pub hidden_size: usize,
    /// Decoder layers (`num_hidden_layers`).
    pub num_layers: usize,
    /// Query heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Key/value heads (`num_key_value_heads`; = heads for MLA).
    pub num_kv_heads: usize,
    /// Per-head width of q/k/v for standard attention.
    pub head_dim: usize,
    /// RMSNorm ε (`rms_norm_eps`).
    pub rms_norm_eps: f32,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Attention variant and its options.
    pub attention: AttentionConfig,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts per token under the checkpoint's own router.
    pub top_k: usize,
    /// Intermediate width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Intermediate width of the dense MLP of non-MoE layers.
    pub dense_intermediate_size: usize,
    /// Intermediate width of the (single, fused) shared expert; 0 when there is none.
    pub shared_intermediate_size: usize,
    /// Qwen2-MoE: the shared expert's output is scaled by `sigmoid(x·w)`.
    pub shared_expert_gated: bool,
    /// `moe_layers[l]` is true when layer `l` is a MoE layer (false: dense MLP).
    pub moe_layers: Vec<bool>,
    /// The checkpoint's routing rule.
    pub router: RouterRule,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Sliding attention window of the checkpoint (Mixtral `sliding_window`, Qwen with
    /// `use_sliding_window`). Not implemented: longer sequences are refused, shorter ones are
    /// unaffected by it.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Parses `config.json` (`location` is used in error messages).
    pub fn from_json(bytes: &[u8], location: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| anyhow!("{location}: invalid JSON ({e})"))?;
        let f = Fields {
            value: &value,
            location,
        };
        let model_type = f.str("model_type")?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            anyhow!(
                "{location}: field `model_type` = \"{model_type}\" is not a supported family \
                 (mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek, deepseek_v2)"
            )
        })?;
        let act = f.opt_str("hidden_act")?.unwrap_or("silu");
        if act != "silu" {
            bail!(
                "{location}: field `hidden_act` = \"{act}\": only \"silu\" (SwiGLU) is supported"
            );
        }
        let config = match family {
            Family::Mixtral => super::mixtral::config(&f)?,
            Family::Olmoe => super::olmoe::config(&f)?,
            Family::Qwen2Moe => super::qwen2_moe::config(&f)?,
            Family::Qwen3Moe => super::qwen3_moe::config(&f)?,
            Family::DeepseekMoe | Family::DeepseekV2 => super::deepseek::config(&f, family)?,
        };
        config.validate(location)?;
        Ok(config)
    }

    fn validate(&self, location: &str) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("num_experts", self.num_experts),
            ("num_experts_per_tok", self.top_k),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{location}: field `{name}` must be positive");
            }
        }
        let bounded = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("head_dim", self.head_dim, MAX_WIDTH),
            ("num_experts", self.num_experts, MAX_EXPERTS),
            (
                "moe_intermediate_size",
                self.moe_intermediate_size,
                MAX_WIDTH,
            ),
            ("intermediate_size", self.dense_intermediate_size, MAX_WIDTH),
            (
                "shared expert intermediate size",
                self.shared_intermediate_size,
                MAX_WIDTH,
            ),
        ];
        for (name, v, max) in bounded {
            if v > max {
                bail!("{location}: field `{name}` = {v} is out of range (allowed 1..={max})");
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "{location}: `num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if self.top_k > self.num_experts {
            bail!(
                "{location}: `num_experts_per_tok` ({}) exceeds the number of experts ({})",
                self.top_k,
                self.num_experts
            );
        }
        let any_moe = self.moe_layers.iter().any(|m| *m);
        if any_moe && self.moe_intermediate_size == 0 {
            bail!("{location}: the routed experts' intermediate size must be positive (allowed 1..={MAX_WIDTH})");
        }
        if self.moe_layers.iter().any(|m| !*m) && self.dense_intermediate_size == 0 {
            bail!(
                "{location}: field `intermediate_size` must be positive: the checkpoint has dense \
                 layers (allowed 1..={MAX_WIDTH})"
            );
        }
        if !(self.rms_norm_eps.is_finite()
            && (MIN_NORM_EPS..=MAX_NORM_EPS).contains(&self.rms_norm_eps))
        {
            bail!(
                "{location}: field `rms_norm_eps` = {} is out of range (allowed {MIN_NORM_EPS:e}..={MAX_NORM_EPS:e})",
                self.rms_norm_eps
            );
        }
        let scaling = self.router.scaling;
        if !(scaling.is_finite() && scaling > 0.0 && scaling <= MAX_ROUTED_SCALING) {
            bail!(
                "{location}: field `routed_scaling_factor` = {scaling} is out of range \
                 (allowed > 0 and ≤ {MAX_ROUTED_SCALING})"
            );
        }
        if let Some(g) = self.router.group_limit {
            let per_group = self.num_experts / g.n_group.max(1);
            if g.topk_group == 0 || g.topk_group.saturating_mul(per_group) < self.top_k {
                bail!(
                    "{location}: fields `n_group` = {} / `topk_group` = {}: the {} kept groups of \
                     {per_group} experts cannot hold `num_experts_per_tok` = {} experts",
                    g.n_group,
                    g.topk_group,
                    g.topk_group,
                    self.top_k
                );
            }
        }
        if let AttentionConfig::Standard {
            clip_qkv: Some(c), ..
        } = self.attention
        {
            if !(c.is_finite() && c > 0.0) {
                bail!("{location}: field `clip_qkv` = {c} must be a finite number > 0");
            }
        }
        if let AttentionConfig::Mla(m) = self.attention {
            for (name, v) in [
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1)),
                ("kv_lora_rank", m.kv_lora_rank),
                ("qk_rope_head_dim", m.qk_rope_head_dim),
                ("v_head_dim", m.v_head_dim),
            ] {
                if v == 0 || v > MAX_WIDTH {
                    bail!("{location}: field `{name}` = {v} is out of range (allowed 1..={MAX_WIDTH})");
                }
            }
            if m.qk_nope_head_dim > MAX_WIDTH {
                bail!(
                    "{location}: field `qk_nope_head_dim` = {} is out of range (allowed 0..={MAX_WIDTH})",
                    m.qk_nope_head_dim
                );
            }
        }
        if self.sliding_window == Some(0) {
            bail!("{location}: field `sliding_window` = 0 must be positive");
        }
        self.rope.validate(location)?;
        self.weight_count()
            .map_err(|e| anyhow!("{location}: {e}"))?;
        Ok(())
    }

    /// Number of weights the model holds under this configuration (an upper bound: every
    /// optional bias and norm counted), computed with checked arithmetic over every product the
    /// loader forms, so that a successful count guarantees no size product of loading
    /// overflows. An error names the part that overflows.
    pub fn weight_count(&self) -> Result<u64> {
        let overflow = |what: &str| anyhow!("the sizes give more than 2^64 weights in {what}");
        let m = |a: usize, b: usize, what: &str| -> Result<u64> {
            (a as u64)
                .checked_mul(b as u64)
                .ok_or_else(|| overflow(what))
        };
        let sum = |parts: &[u64], what: &str| -> Result<u64> {
            parts
                .iter()
                .try_fold(0u64, |a, &b| a.checked_add(b))
                .ok_or_else(|| overflow(what))
        };
        let (v, h, n, kv) = (
            self.vocab_size,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
        );
        let embeddings = m(v, h, "the embeddings")?;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            embeddings
        };
        let attention = match self.attention {
            AttentionConfig::Standard { .. } => {
                let q = m(n, self.head_dim, "the query width")? as usize;
                let k = m(kv, self.head_dim, "the key width")? as usize;
                let q_proj = m(q, h, "q_proj")?;
                let kv_proj = m(k, h, "k_proj")?;
                sum(
                    &[q_proj, kv_proj, kv_proj, q_proj, 3 * (q as u64 + k as u64)],
                    "the attention",
                )?
            }
            AttentionConfig::Mla(d) => {
                let dq = d.qk_nope_head_dim as u64 + d.qk_rope_head_dim as u64;
                let q_out = m(n, dq as usize, "the MLA query width")? as usize;
                let q = match d.q_lora_rank {
                    None => m(q_out, h, "q_proj")?,
                    Some(r) => sum(&[m(r, h, "q_a_proj")?, m(q_out, r, "q_b_proj")?], "q")?,
                };
                let kv_b_out = m(
                    n,
                    d.qk_nope_head_dim + d.v_head_dim,
                    "the MLA key/value width",
                )? as usize;
                let o_in = m(n, d.v_head_dim, "the MLA output width")? as usize;
                sum(
                    &[
                        q,
                        m(d.kv_lora_rank + d.qk_rope_head_dim, h, "kv_a_proj_with_mqa")?,
                        m(kv_b_out, d.kv_lora_rank, "kv_b_proj")?,
                        m(h, o_in, "o_proj")?,
                    ],
                    "the MLA attention",
                )?
            }
        };
        let swiglu = |i: usize, what: &str| m(3, i, what).and_then(|x| m(x as usize, h, what));
        let expert = swiglu(self.moe_intermediate_size, "one routed expert")?;
        let moe = sum(
            &[
                expert
                    .checked_mul(self.num_experts as u64)
                    .ok_or_else(|| overflow("the routed experts of one layer"))?,
                m(self.num_experts, h, "the router")?,
                swiglu(self.shared_intermediate_size, "the shared expert")?,
                h as u64,
            ],
            "one MoE layer",
        )?;
        let dense = swiglu(self.dense_intermediate_size, "the dense MLP")?;
        let mut total = sum(&[embeddings, lm_head, h as u64], "the embeddings")?;
        for &is_moe in &self.moe_layers {
            let layer = sum(
                &[attention, if is_moe { moe } else { dense }, 2 * h as u64],
                "one layer",
            )?;
            total = total
                .checked_add(layer)
                .ok_or_else(|| overflow("the whole model"))?;
        }
        Ok(total)
    }

    /// Number of leading dense (non-MoE) layers.
    pub fn first_dense_layers(&self) -> usize {
        self.moe_layers.iter().take_while(|m| !**m).count()
    }
}

/// A number as a person reads it in an error: plain when moderate, in exponent form when huge
/// or tiny (`1e300`, not three hundred digits).
pub fn show_number(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e15).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Typed access to `config.json` fields with errors that name the file and the field.
pub struct Fields<'a> {
    /// The parsed JSON object.
    pub value: &'a Value,
    /// File location for error messages.
    pub location: &'a str,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, what: &str) -> anyhow::Error {
        anyhow!(
            "{}: field `{key}` = {} is not {what}",
            self.location,
            self.get(key).map(|v| v.to_string()).unwrap_or_default()
        )
    }

    /// A required non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| anyhow!("{}: field `{key}` missing", self.location))
    }

    /// The first present of several alternative names of a required integer (transformers 5 writes
    /// e.g. Qwen3-MoE's `num_experts` as `num_local_experts`).
    pub fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_usize(k)? {
                return Ok(v);
            }
        }
        bail!("{}: field `{}` missing", self.location, keys.join("` / `"))
    }

    /// A required integer in `1..=max`; the error names the field, the value and the range.
    pub fn bounded(&self, key: &str, max: usize) -> Result<usize> {
        let v = self.usize(key)?;
        if v == 0 || v > max {
            bail!(
                "{}: field `{key}` = {v} is out of range (allowed 1..={max})",
                self.location
            );
        }
        Ok(v)
    }

    /// An optional non-negative integer.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer")),
        }
    }

    /// An optional number.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a number")),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a boolean")),
        }
    }

    /// A required string.
    pub fn str(&self, key: &str) -> Result<&'a str> {
        self.opt_str(key)?
            .ok_or_else(|| anyhow!("{}: field `{key}` missing", self.location))
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a string")),
        }
    }

    /// An optional list of non-negative integers (e.g. `mlp_only_layers`).
    pub fn opt_usize_list(&self, key: &str) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as usize)
                        .ok_or_else(|| self.wrong(key, "a list of integers"))
                })
                .collect(),
            Some(_) => Err(self.wrong(key, "a list of integers")),
        }
    }

    /// A nested object, viewed with the same file location.
    pub fn object(&self, key: &str) -> Option<Fields<'a>> {
        self.get(key).filter(|v| v.is_object()).map(|value| Fields {
            value,
            location: self.location,
        })
    }

    /// The common decoder fields every family shares: sizes, norm epsilon, RoPE, tying.
    pub fn common(&self, default_eps: f64) -> Result<Common> {
        let hidden_size = self.usize("hidden_size")?;
        let num_heads = self.usize("num_attention_heads")?;
        if num_heads == 0 {
            bail!(
                "{}: field `num_attention_heads` must be positive",
                self.location
            );
        }
        // Checked here, before the families build per-layer lists from them.
        let num_layers = self.bounded("num_hidden_layers", MAX_LAYERS)?;
        self.bounded("num_attention_heads", MAX_HEADS)?;
        let num_kv_heads = match self.opt_usize("num_key_value_heads")? {
            Some(_) => self.bounded("num_key_value_heads", MAX_HEADS)?,
            None => num_heads,
        };
        Ok(Common {
            vocab_size: self.usize("vocab_size")?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: self
                .opt_usize("head_dim")?
                .unwrap_or(hidden_size / num_heads),
            rms_norm_eps: {
                // Checked as read (f64): the f32 it becomes would hide 1e300 as inf.
                let eps = self.opt_f64("rms_norm_eps")?.unwrap_or(default_eps);
                if !(eps.is_finite()
                    && eps >= f64::from(MIN_NORM_EPS)
                    && eps <= f64::from(MAX_NORM_EPS))
                {
                    bail!(
                        "{}: field `rms_norm_eps` = {} is out of range (allowed {MIN_NORM_EPS:e}..={MAX_NORM_EPS:e})",
                        self.location,
                        show_number(eps)
                    );
                }
                eps as f32
            },
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        })
    }
}

/// Fields shared by all families, read by [`Fields::common`].
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)] // the same fields as [`ModelConfig`]
pub struct Common {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
}

/// Qwen's `sliding_window`, active only when `use_sliding_window` is true.
pub fn qwen_sliding_window(f: &Fields<'_>) -> Result<Option<usize>> {
    Ok(if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
        f.opt_usize("sliding_window")?
    } else {
        None
    })
}

/// Which layers are MoE under the Qwen rule: not in `mlp_only_layers` and
/// `(layer + 1) % decoder_sparse_step == 0` (transformers `Qwen2MoeDecoderLayer`).
pub fn qwen_moe_layers(f: &Fields<'_>, num_layers: usize) -> Result<Vec<bool>> {
    let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
    let dense_only = f.opt_usize_list("mlp_only_layers")?;
    Ok((0..num_layers)
        .map(|l| !dense_only.contains(&l) && (l + 1) % step == 0)
        .collect())
}
