//! Model shapes: everything the cost model needs to know about a model, without its weights.
//!
//! The energy model works from matrix shapes ([`MatrixSpec`]) and a routing trace, so a 7B-parameter configuration
//! costs nothing to set up. [`ModelShape::from_model`] reads a loaded checkpoint; [`ModelShape::olmoe_1b_7b`] and
//! [`ModelShape::synthetic`] build configurations from numbers alone (benchmark and scaling study).
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::mapping::{MatrixSpec, RoutingTrace};
use crate::model::config::AttentionConfig;
use crate::model::{ExpertSlot, MatrixId, Model, ModelConfig, Proj};

/// The shapes of one decoder-only MoE (or dense) transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    /// Label used in reports.
    pub name: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// Weights of the attention block of one layer (q/k/v/o projections, MLA down/up projections, q/k norms).
    pub attention_params_per_layer: usize,
    /// Multiply–adds ×2 per cached position per token per layer for scores and weighted values:
    /// `2·heads·(qk_dim + v_dim)`.
    pub attention_flops_per_position: usize,
    /// Attention heads (softmax work per position).
    pub num_heads: usize,
    /// KV-cache values stored per token per layer (`2·kv_heads·head_dim`; MLA: `kv_lora_rank + rope_dim`).
    pub kv_values_per_token: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Intermediate width of one routed expert.
    pub moe_intermediate_size: usize,
    /// Intermediate width of the dense MLP of non-MoE layers.
    pub dense_intermediate_size: usize,
    /// Intermediate width of the shared expert (0: none).
    pub shared_intermediate_size: usize,
    /// `moe_layers[l]`: layer `l` is a MoE layer (false: dense MLP).
    pub moe_layers: Vec<bool>,
    /// Gated FFNs (SwiGLU: gate, up, down); false: two matrices (up, down) with a plain activation, as in the
    /// original transformer and IBM's 3D-SiM.
    #[serde(default = "gated_default")]
    pub gated_ffn: bool,
}

fn gated_default() -> bool {
    true
}

impl ModelShape {
    /// Shapes from a parsed `config.json`.
    pub fn from_config(name: &str, c: &ModelConfig) -> Self {
        let h = c.hidden_size;
        let (attention_params_per_layer, attention_flops_per_position, kv_values_per_token) =
            match &c.attention {
                AttentionConfig::Standard { .. } => {
                    let q = c.num_heads * c.head_dim;
                    let kv = c.num_kv_heads * c.head_dim;
                    (
                        h * q + 2 * h * kv + q * h,
                        2 * c.num_heads * 2 * c.head_dim,
                        2 * kv,
                    )
                }
                AttentionConfig::Mla(m) => {
                    let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                    let q = match m.q_lora_rank {
                        Some(r) => h * r + r * c.num_heads * qk,
                        None => h * c.num_heads * qk,
                    };
                    let kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim);
                    let kv_b = m.kv_lora_rank * c.num_heads * (m.qk_nope_head_dim + m.v_head_dim);
                    let o = c.num_heads * m.v_head_dim * h;
                    (
                        q + kv_a + kv_b + o,
                        2 * c.num_heads * (qk + m.v_head_dim),
                        m.kv_lora_rank + m.qk_rope_head_dim,
                    )
                }
            };
        Self {
            name: name.to_string(),
            hidden_size: h,
            num_layers: c.num_layers,
            vocab_size: c.vocab_size,
            attention_params_per_layer,
            attention_flops_per_position,
            num_heads: c.num_heads,
            kv_values_per_token,
            num_experts: c.num_experts,
            top_k: c.top_k,
            moe_intermediate_size: c.moe_intermediate_size,
            dense_intermediate_size: c.dense_intermediate_size,
            shared_intermediate_size: c.shared_intermediate_size,
            moe_layers: c.moe_layers.clone(),
            gated_ffn: true,
        }
    }

    /// Shapes of a loaded model; the attention weight count is the model's own (norms and biases included).
    pub fn from_model(name: &str, model: &Model) -> Self {
        let mut s = Self::from_config(name, &model.config);
        s.attention_params_per_layer =
            model.param_counts().attention / model.config.num_layers.max(1);
        s
    }

    /// OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924 `config.json`): 16 layers, d = 2048, 16 heads of 128, 64 experts of
    /// width 1024, top-8, vocabulary 50304.
    pub fn olmoe_1b_7b() -> Self {
        Self {
            name: "OLMoE-1B-7B (shapes)".into(),
            hidden_size: 2048,
            num_layers: 16,
            vocab_size: 50304,
            attention_params_per_layer: 4 * 2048 * 2048,
            attention_flops_per_position: 2 * 16 * 2 * 128,
            num_heads: 16,
            kv_values_per_token: 2 * 2048,
            num_experts: 64,
            top_k: 8,
            moe_intermediate_size: 1024,
            dense_intermediate_size: 0,
            shared_intermediate_size: 0,
            moe_layers: vec![true; 16],
            gated_ffn: true,
        }
    }

    /// A synthetic model with standard multi-head attention (head width 64): `experts == 0` gives a dense model whose
    /// MLP has width `intermediate`; otherwise every layer has `experts` routed experts of width `intermediate`, top-`k`.
    pub fn synthetic(
        name: &str,
        hidden: usize,
        layers: usize,
        experts: usize,
        top_k: usize,
        intermediate: usize,
    ) -> Self {
        let heads = (hidden / 64).max(1);
        let moe = experts > 0;
        Self {
            name: name.to_string(),
            hidden_size: hidden,
            num_layers: layers,
            vocab_size: 32000,
            attention_params_per_layer: 4 * hidden * hidden,
            attention_flops_per_position: 2 * heads * 2 * 64,
            num_heads: heads,
            kv_values_per_token: 2 * hidden,
            num_experts: experts.max(1),
            top_k: if moe { top_k } else { 1 },
            moe_intermediate_size: if moe { intermediate } else { 0 },
            dense_intermediate_size: if moe { 0 } else { intermediate },
            shared_intermediate_size: 0,
            moe_layers: vec![moe; layers],
            gated_ffn: true,
        }
    }

    /// Every FFN matrix as a mapping input, in the order of [`Model::matrices`]: layer, then dense MLP / routed
    /// experts / shared expert, then gate, up, down.
    pub fn matrix_specs(&self) -> Vec<MatrixSpec> {
        let h = self.hidden_size;
        let mut v = Vec::new();
        for (layer, &moe) in self.moe_layers.iter().enumerate() {
            let mut slots: Vec<(ExpertSlot, usize)> = Vec::new();
            if moe {
                slots.extend(
                    (0..self.num_experts)
                        .map(|e| (ExpertSlot::Routed(e), self.moe_intermediate_size)),
                );
                if self.shared_intermediate_size > 0 {
                    slots.push((ExpertSlot::Shared(0), self.shared_intermediate_size));
                }
            } else {
                slots.push((ExpertSlot::DenseMlp, self.dense_intermediate_size));
            }
            for (slot, inter) in slots {
                for (proj, n_out, n_in) in [
                    (Proj::Gate, inter, h),
                    (Proj::Up, inter, h),
                    (Proj::Down, h, inter),
                ] {
                    if proj == Proj::Gate && !self.gated_ffn {
                        continue;
                    }
                    v.push(MatrixSpec {
                        id: MatrixId { layer, slot, proj },
                        n_out,
                        n_in,
                    });
                }
            }
        }
        v
    }

    /// Total parameters: embeddings, untied LM head, attention, routers and FFNs (norm weights ignored).
    pub fn total_params(&self) -> usize {
        let ffn: usize = self.matrix_specs().iter().map(|m| m.n_out * m.n_in).sum();
        2 * self.vocab_size * self.hidden_size
            + self.num_layers * self.attention_params_per_layer
            + self.router_params() * self.moe_layers.iter().filter(|m| **m).count()
            + ffn
    }

    /// Parameters a token multiplies: attention, routers, top-k routed + shared experts or dense MLPs, LM head.
    pub fn active_params(&self) -> usize {
        let h = self.hidden_size;
        let per_layer: usize = self
            .moe_layers
            .iter()
            .map(|&moe| {
                if moe {
                    self.ffn_matrices()
                        * h
                        * (self.top_k * self.moe_intermediate_size + self.shared_intermediate_size)
                        + self.router_params()
                } else {
                    self.ffn_matrices() * h * self.dense_intermediate_size
                }
            })
            .sum();
        per_layer + self.num_layers * self.attention_params_per_layer + self.vocab_size * h
    }

    /// FFN matrices per expert or MLP: 3 when gated, else 2.
    pub fn ffn_matrices(&self) -> usize {
        if self.gated_ffn {
            3
        } else {
            2
        }
    }

    /// Checks the shape can be costed: every size ≥ 1 where it must be, one `moe_layers` entry per layer, top-k ≤
    /// experts. The error names the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
            (
                "attention_params_per_layer",
                self.attention_params_per_layer,
            ),
            ("num_heads", self.num_heads),
            ("kv_values_per_token", self.kv_values_per_token),
            ("num_experts", self.num_experts),
        ] {
            anyhow::ensure!(v >= 1, "{}: `{field}` must be ≥ 1, got {v}", self.name);
            anyhow::ensure!(
                v <= 1 << 40,
                "{}: `{field}` = {v} is beyond any model (at most 2^40)",
                self.name
            );
        }
        anyhow::ensure!(
            self.moe_layers.len() == self.num_layers,
            "{}: `moe_layers` has {} entries, `num_layers` is {}",
            self.name,
            self.moe_layers.len(),
            self.num_layers
        );
        let moe = self.moe_layers.iter().any(|m| *m);
        anyhow::ensure!(
            !moe || (1..=self.num_experts).contains(&self.top_k),
            "{}: `top_k` must be in 1..={} (num_experts), got {}",
            self.name,
            self.num_experts,
            self.top_k
        );
        anyhow::ensure!(
            !moe || self.moe_intermediate_size >= 1,
            "{}: `moe_intermediate_size` must be ≥ 1 when a layer is MoE",
            self.name
        );
        anyhow::ensure!(
            self.moe_layers.iter().all(|m| *m) || self.dense_intermediate_size >= 1,
            "{}: `dense_intermediate_size` must be ≥ 1 when a layer is dense",
            self.name
        );
        Ok(())
    }

    /// Router weights of one MoE layer.
    pub fn router_params(&self) -> usize {
        self.hidden_size * self.num_experts
    }

    /// A routing trace of `tokens` tokens from a synthetic router: every MoE layer, each token draws `top_k` distinct
    /// experts uniformly at random (seeded). Stands in for calibration text when there are no weights.
    pub fn synthetic_trace(&self, tokens: usize, seed: u64) -> RoutingTrace {
        let layers: Vec<usize> = (0..self.num_layers)
            .filter(|&l| self.moe_layers[l])
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let k = self.top_k.min(self.num_experts);
        let per_token = (0..tokens)
            .map(|_| {
                layers
                    .iter()
                    .map(|_| {
                        let mut chosen: Vec<usize> = Vec::with_capacity(k);
                        while chosen.len() < k {
                            let e = rng.random_range(0..self.num_experts);
                            if !chosen.contains(&e) {
                                chosen.push(e);
                            }
                        }
                        chosen
                    })
                    .collect()
            })
            .collect();
        RoutingTrace::new(
            layers.clone(),
            vec![self.num_experts; layers.len()],
            per_token,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_specs_match_the_loaded_model() {
        let model = crate::model::embedded::load().unwrap();
        let shape = ModelShape::from_model("embedded", &model);
        assert_eq!(shape.matrix_specs(), MatrixSpec::from_model(&model));
    }

    #[test]
    fn olmoe_parameter_counts_match_the_published_sizes() {
        let s = ModelShape::olmoe_1b_7b();
        // OLMoE-1B-7B: 6.9B total, 1.3B active parameters (Muennighoff et al. 2024, Table 1).
        let total = s.total_params() as f64 / 1e9;
        let active = s.active_params() as f64 / 1e9;
        assert!((6.8..7.0).contains(&total), "total {total}");
        // Active here excludes the embedding lookup (0.1B), which the published 1.3B counts.
        assert!((1.1..1.3).contains(&active), "active {active}");
    }

    #[test]
    fn synthetic_trace_draws_k_distinct_experts() {
        let s = ModelShape::synthetic("t", 64, 3, 8, 2, 128);
        let t = s.synthetic_trace(100, 1);
        assert_eq!(t.tokens.len(), 100);
        for tok in &t.tokens {
            assert_eq!(tok.len(), 3);
            for e in tok {
                assert_eq!(e.len(), 2);
                assert_ne!(e[0], e[1]);
            }
        }
    }
}
