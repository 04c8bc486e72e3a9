//! MoE language models: HuggingFace checkpoint loading and the digital (f32, CPU) forward pass.
//!
//! - [`Model::load`] / [`Model::load_from_memory`] read `config.json`, safetensors weights (f32,
//!   f16, bf16; sharded or not) and an optional `tokenizer.json` (docs/model.md §5).
//! - [`Model::forward`] / [`Model::forward_batch`] return logits `[S, V]` and, on request, every
//!   MoE layer's `(token, expert, weight)` assignments.
//! - Every feed-forward matrix product goes through [`ExpertLinear`]; the model itself is the
//!   digital implementation, an analog backend replaces it via [`ForwardOptions::experts`].
//!
//! Families: one file each ([`mixtral`], [`olmoe`], [`qwen2_moe`], [`qwen3_moe`], [`deepseek`]),
//! built from the shared blocks of [`common`], [`rope`], [`router`] and [`moe`].
use std::ops::Range;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use ndarray::{s, Array2, ArrayView2, Axis};
use serde::Serialize;

pub mod checkpoint;
pub mod common;
pub mod config;
pub mod deepseek;
pub mod embedded;
pub mod layer;
pub mod mixtral;
pub mod moe;
pub mod olmoe;
pub mod qwen2_moe;
pub mod qwen3_moe;
pub mod rope;
pub mod router;
pub mod tokenizer;
pub mod write;

pub use checkpoint::{CheckpointSource, TensorStore};
pub use config::{Family, ModelConfig};
pub use layer::{Attention, DecoderLayer, Ffn};
pub use moe::{ExpertLinear, ExpertSlot, MatrixId, Proj};
pub use router::{Assignment, GroupLimit, RouterKind, RouterRule};
pub use tokenizer::Tokenizer;

use common::{matmul_t, RmsNorm, SwiGlu};

/// A loaded MoE causal language model, all weights in f32.
#[derive(Debug)]
pub struct Model {
    /// Normalised architecture.
    pub config: ModelConfig,
    /// Present when the checkpoint ships `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
    /// `[vocab, hidden]`.
    pub embed_tokens: Array2<f32>,
    /// Decoder layers in order.
    pub layers: Vec<DecoderLayer>,
    /// RMSNorm before the LM head (`model.norm`).
    pub final_norm: RmsNorm,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Array2<f32>>,
}

/// Options of one forward pass.
#[derive(Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// Routing rule (default: the checkpoint's own).
    pub router: RouterKind,
    /// Backend for expert / shared-expert / dense-MLP products (default: the digital weights).
    pub experts: Option<&'a dyn ExpertLinear>,
    /// Return every MoE layer's assignments in [`ForwardOutput::routing`].
    pub record_routing: bool,
}

impl std::fmt::Debug for ForwardOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardOptions")
            .field("router", &self.router)
            .field("experts", &self.experts.map_or("digital", |_| "custom"))
            .field("record_routing", &self.record_routing)
            .finish()
    }
}

/// Assignments of one MoE layer; `token` indexes the sequence's positions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerRouting {
    /// Decoder layer index.
    pub layer: usize,
    /// Assignments in token order.
    pub assignments: Vec<Assignment>,
}

/// Result of a forward pass over one sequence.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[S, V]` next-token logits.
    pub logits: Array2<f32>,
    /// One entry per MoE layer when `record_routing`, else empty.
    pub routing: Vec<LayerRouting>,
}

impl Model {
    /// Loads a HuggingFace checkpoint directory (files memory-mapped, converted to f32 once).
    pub fn load(dir: &Path) -> Result<Model> {
        Self::load_source(&CheckpointSource::Dir(dir))
    }

    /// Loads a checkpoint from `(file name, bytes)` pairs, e.g. files compiled in with
    /// `include_bytes!` (names as in a checkpoint directory: `config.json`, …).
    pub fn load_from_memory(files: &[(&str, &[u8])]) -> Result<Model> {
        Self::load_source(&CheckpointSource::Memory(files))
    }

    /// Loads from any [`CheckpointSource`].
    pub fn load_source(source: &CheckpointSource<'_>) -> Result<Model> {
        let config_at = source.display("config.json");
        let config = ModelConfig::from_json(&source.read_required("config.json")?, &config_at)?;
        let store = TensorStore::open(source)?;
        checkpoint::check_against_files(&config, &config_at, &store)?;
        let names = moe_names(config.family, &store);
        let (v, h) = (config.vocab_size, config.hidden_size);
        let embed_tokens = store.matrix("model.embed_tokens.weight", v, h)?;
        let layers = (0..config.num_layers)
            .map(|l| DecoderLayer::load(&store, &config, l, &names))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::load(&store, "model.norm.weight", h, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(store.matrix("lm_head.weight", v, h)?)
        };
        let tokenizer = match source.read("tokenizer.json")? {
            None => None,
            Some(bytes) => Some(Tokenizer::from_bytes(
                &bytes,
                &source.display("tokenizer.json"),
                v,
            )?),
        };
        Ok(Model {
            config,
            tokenizer,
            embed_tokens,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// The tokenizer, or an error saying the checkpoint has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| anyhow!("this checkpoint has no tokenizer.json"))
    }

    /// Forward pass of one sequence.
    pub fn forward(&self, tokens: &[u32], opts: &ForwardOptions<'_>) -> Result<ForwardOutput> {
        Ok(self.forward_batch(&[tokens], opts)?.remove(0))
    }

    /// Forward pass of several independent sequences (each starting at position 0). Their tokens
    /// are packed into one matrix so every projection and expert is one GEMM for the whole batch.
    pub fn forward_batch(
        &self,
        seqs: &[&[u32]],
        opts: &ForwardOptions<'_>,
    ) -> Result<Vec<ForwardOutput>> {
        let cfg = &self.config;
        let mut ranges: Vec<Range<usize>> = Vec::with_capacity(seqs.len());
        let mut ids = Vec::new();
        for seq in seqs {
            if seq.is_empty() {
                bail!("forward: empty sequence");
            }
            if let Some(&bad) = seq.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                bail!(
                    "forward: token id {bad} is outside the vocabulary (vocab_size {})",
                    cfg.vocab_size
                );
            }
            if let Some(w) = cfg.sliding_window.filter(|&w| seq.len() > w) {
                bail!(
                    "forward: a sequence of {} tokens exceeds the checkpoint's sliding window ({w}); \
                     sliding-window attention is not implemented",
                    seq.len()
                );
            }
            ranges.push(ids.len()..ids.len() + seq.len());
            ids.extend(seq.iter().map(|&t| t as usize));
        }
        let max_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let rope = cfg.rope.table(max_len);
        let backend: &dyn ExpertLinear = opts.experts.unwrap_or(self);
        let mut h = self.embed_tokens.select(Axis(0), &ids);
        let ctx = layer::PassContext {
            seqs: &ranges,
            rope: &rope,
            config: cfg,
            router: &opts.router,
            backend,
        };
        let mut routing = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let a = layer.forward(l, &mut h, &ctx)?;
            if opts.record_routing && cfg.moe_layers[l] {
                routing.push((l, a));
            }
        }
        self.final_norm.forward_inplace(h.view_mut());
        let logits = matmul_t(
            h.view(),
            self.lm_head.as_ref().unwrap_or(&self.embed_tokens).view(),
        );
        Ok(ranges
            .iter()
            .map(|r| ForwardOutput {
                logits: logits.slice(s![r.clone(), ..]).to_owned(),
                routing: routing
                    .iter()
                    .map(|(l, a)| LayerRouting {
                        layer: *l,
                        assignments: a
                            .iter()
                            .filter(|x| r.contains(&(x.token as usize)))
                            .map(|x| Assignment {
                                token: x.token - r.start as u32,
                                ..*x
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect())
    }

    /// The SwiGLU at (`layer`, `slot`), if it exists.
    pub fn swiglu(&self, layer: usize, slot: ExpertSlot) -> Option<&SwiGlu> {
        match (&self.layers.get(layer)?.ffn, slot) {
            (Ffn::Dense(m), ExpertSlot::DenseMlp) => Some(m),
            (Ffn::Moe(m), ExpertSlot::Routed(e)) => m.experts.get(e),
            (Ffn::Moe(m), ExpertSlot::Shared(0)) => m.shared.as_ref().map(|s| &s.mlp),
            _ => None,
        }
    }

    /// The matrix `id` names (`[out, in]`), if it exists.
    pub fn matrix(&self, id: MatrixId) -> Option<ArrayView2<'_, f32>> {
        let m = self.swiglu(id.layer, id.slot)?;
        Some(match id.proj {
            Proj::Gate => m.gate(),
            Proj::Up => m.up(),
            Proj::Down => m.down.view(),
        })
    }

    /// Every routed-expert, shared-expert and dense-MLP matrix (PyTorch layout `[out, in]`), in
    /// model order: layer, then dense MLP / routed experts / shared expert, then gate, up, down.
    pub fn matrices(&self) -> impl Iterator<Item = (MatrixId, ArrayView2<'_, f32>)> + '_ {
        self.layers.iter().enumerate().flat_map(move |(layer, l)| {
            let slots: Vec<ExpertSlot> = match &l.ffn {
                Ffn::Dense(_) => vec![ExpertSlot::DenseMlp],
                Ffn::Moe(m) => (0..m.experts.len())
                    .map(ExpertSlot::Routed)
                    .chain(m.shared.iter().map(|_| ExpertSlot::Shared(0)))
                    .collect(),
            };
            slots.into_iter().flat_map(move |slot| {
                [Proj::Gate, Proj::Up, Proj::Down]
                    .into_iter()
                    .map(move |proj| {
                        let id = MatrixId { layer, slot, proj };
                        (id, self.matrix(id).expect("slot enumerated from the model"))
                    })
            })
        })
    }

    /// Parameter counts by component.
    pub fn param_counts(&self) -> ParamCounts {
        let mut c = ParamCounts {
            embeddings: self.embed_tokens.len(),
            lm_head: self.lm_head.as_ref().map_or(0, |m| m.len()),
            norms: self.final_norm.weight.len(),
            ..Default::default()
        };
        let mut active_ffn = 0;
        for l in &self.layers {
            c.attention += l.attention.len();
            c.norms += l.input_norm.weight.len() + l.post_attention_norm.weight.len();
            match &l.ffn {
                Ffn::Dense(m) => {
                    c.dense_mlp += m.len();
                    active_ffn += m.len();
                }
                Ffn::Moe(m) => {
                    c.router += m.router.len();
                    let routed: usize = m.experts.iter().map(SwiGlu::len).sum();
                    c.experts += routed;
                    active_ffn += routed / m.experts.len() * self.config.top_k;
                    if let Some(s) = &m.shared {
                        let n = s.mlp.len() + s.gate.as_ref().map_or(0, |g| g.len());
                        c.shared_experts += n;
                        active_ffn += n;
                    }
                }
            }
        }
        c.total = c.embeddings
            + c.lm_head
            + c.norms
            + c.attention
            + c.router
            + c.experts
            + c.shared_experts
            + c.dense_mlp;
        // The LM head product uses a full `[vocab, hidden]` matrix, tied or not.
        c.active_per_token = c.attention
            + c.router
            + c.norms
            + active_ffn
            + self.config.vocab_size * self.config.hidden_size;
        c
    }
}

/// Tensor names of `family`'s MoE blocks in `store` (Mixtral's depend on the files' naming).
pub fn moe_names(family: Family, store: &TensorStore<'_>) -> moe::MoeNames {
    match family {
        Family::Mixtral => mixtral::names(store),
        Family::Olmoe => olmoe::NAMES,
        Family::Qwen2Moe => qwen2_moe::NAMES,
        Family::Qwen3Moe => qwen3_moe::NAMES,
        Family::DeepseekMoe | Family::DeepseekV2 => deepseek::NAMES,
    }
}

impl ExpertLinear for Model {
    /// One GEMM over the stacked gate/up weights.
    fn gate_up(&self, layer: usize, slot: ExpertSlot, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let m = self.swiglu(layer, slot).unwrap_or_else(|| {
            panic!("layer {layer} {slot:?} is not a feed-forward of this model")
        });
        matmul_t(x, m.gate_up.view())
    }

    /// Digital product with the checkpoint weights.
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let w = self
            .matrix(id)
            .unwrap_or_else(|| panic!("{id:?} is not a matrix of this model"));
        matmul_t(x, w)
    }
}

/// Parameter counts of a model by component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Token embedding table.
    pub embeddings: usize,
    /// Untied LM head (0 when tied).
    pub lm_head: usize,
    /// q/k/v/o projections (and MLA down/up projections, q/k norms).
    pub attention: usize,
    /// Router matrices.
    pub router: usize,
    /// Routed experts.
    pub experts: usize,
    /// Shared experts (and their gates).
    pub shared_experts: usize,
    /// Dense MLPs of non-MoE layers.
    pub dense_mlp: usize,
    /// RMSNorm weights.
    pub norms: usize,
    /// Sum of all the above.
    pub total: usize,
    /// Parameters whose product runs for each token: attention, router, norms, top-k routed plus
    /// shared experts or dense MLPs, and the LM head (the embedding lookup is not a product).
    pub active_per_token: usize,
}
