//! MoE feed-forward: router → explicit assignments → per-expert batched SwiGLU → weighted sum.
//!
//! Every expert, shared-expert and dense-MLP matrix product goes through [`ExpertLinear`], so an
//! analog backend replaces exactly these products and nothing else (attention, router, norms and
//! LM head stay digital, as in the heterogeneous scheme of docs/model.md §4.2).
use anyhow::Result;
use ndarray::{Array1, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::TensorStore;
use super::common::{matmul_t, silu_mul, SwiGlu};
use super::router::{Assignment, RouterKind, RouterRule};

/// What one MoE layer's routed experts saw in one forward pass over a batch of sequences: their
/// input rows, the routing (tokens index the rows) and their output, rows in batch order (what
/// fine-tuning's calibration records, on any backend).
pub struct RoutedIo {
    /// Decoder layer index.
    pub layer: usize,
    /// Routed-expert inputs `[rows, hidden]`.
    pub x: Array2<f32>,
    /// Routing in token order.
    pub assignments: Vec<Assignment>,
    /// Digital routed-expert output `[rows, hidden]`.
    pub y: Array2<f32>,
}

/// Which feed-forward a matrix belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ExpertSlot {
    /// Routed expert `e` of the layer.
    Routed(usize),
    /// Shared (always-active) expert `i` of the layer.
    Shared(usize),
    /// The dense MLP of a non-MoE layer.
    DenseMlp,
}

/// Which of the three SwiGLU projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proj {
    Gate,
    Up,
    Down,
}

/// Identifies one feed-forward matrix of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MatrixId {
    /// Decoder layer index.
    pub layer: usize,
    /// Which feed-forward of the layer.
    pub slot: ExpertSlot,
    /// Which projection of that feed-forward.
    pub proj: Proj,
}

/// A backend for the feed-forward matrix products. `x` is `[n_tokens, in]` (all tokens routed to
/// that matrix, one batched GEMM); the result is `[n_tokens, out]` = `x · Wᵀ` for the matrix `W`
/// (`[out, in]`) that `id` names. The digital implementation is [`super::Model`] itself.
pub trait ExpertLinear: Sync {
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32>;

    /// `[x·W_gateᵀ | x·W_upᵀ]` (`[n_tokens, 2I]`) of the SwiGLU at (`layer`, `slot`). The default
    /// makes the two [`ExpertLinear::linear`] calls; the digital model overrides it with one GEMM
    /// over its stacked weights.
    fn gate_up(&self, layer: usize, slot: ExpertSlot, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let id = |proj| MatrixId { layer, slot, proj };
        let (g, u) = rayon::join(
            || self.linear(id(Proj::Gate), x),
            || self.linear(id(Proj::Up), x),
        );
        ndarray::concatenate(Axis(1), &[g.view(), u.view()]).expect("equal row counts")
    }

    /// All routed experts of MoE layer `layer` at once: `Σ_(t,e,w) w · expert_e(x[t])` for
    /// `assignments` (token order) over `n_experts` experts, or `Ok(None)` to let the model run
    /// them expert by expert through [`ExpertLinear::gate_up`] and [`ExpertLinear::linear`].
    /// A backend that batches every expert of a layer into one grouped kernel (the CUDA one)
    /// overrides it; an error (a device fault) ends the forward pass.
    fn routed_experts(
        &self,
        layer: usize,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        n_experts: usize,
    ) -> Result<Option<Array2<f32>>> {
        let _ = (layer, x, assignments, n_experts);
        Ok(None)
    }
}

/// `down(silu(gate·x) ⊙ up·x)` for the SwiGLU at (`layer`, `slot`), through `backend`.
pub fn swiglu(
    backend: &dyn ExpertLinear,
    layer: usize,
    slot: ExpertSlot,
    x: ArrayView2<'_, f32>,
) -> Array2<f32> {
    let h = silu_mul(backend.gate_up(layer, slot, x).view());
    backend.linear(
        MatrixId {
            layer,
            slot,
            proj: Proj::Down,
        },
        h.view(),
    )
}

/// Shared expert(s), fused into one SwiGLU of width `moe_intermediate_size · n_shared`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    /// The shared SwiGLU.
    pub mlp: SwiGlu,
    /// Qwen2-MoE `shared_expert_gate` (`[hidden]`): output × sigmoid(gate·x); DeepSeek: none.
    pub gate: Option<Array1<f32>>,
}

/// One MoE layer's weights.
#[derive(Debug, Clone)]
pub struct MoeBlock {
    /// Router `[experts, hidden]`.
    pub router: Array2<f32>,
    /// Routed experts, by index.
    pub experts: Vec<SwiGlu>,
    /// Always-active shared expert (Qwen2-MoE, DeepSeek).
    pub shared: Option<SharedExpert>,
}

/// Tensor names of a family's MoE block under `model.layers.N.{block}`.
pub struct MoeNames {
    /// `mlp` (most families) or `block_sparse_moe` (Mixtral before transformers 5).
    pub block: &'static str,
    /// Per-expert projection names for gate, up, down (`gate_proj`… or Mixtral `w1`, `w3`, `w2`).
    pub expert_proj: [&'static str; 3],
    /// Shared-expert module name (`shared_expert` Qwen2, `shared_experts` DeepSeek).
    pub shared: Option<&'static str>,
    /// Shared-expert gate (`shared_expert_gate`, Qwen2).
    pub shared_gate: Option<&'static str>,
}

/// Sizes needed to load a MoE block.
pub struct MoeSizes {
    /// Model width H.
    pub hidden: usize,
    /// Routed experts E.
    pub experts: usize,
    /// Routed expert width I.
    pub intermediate: usize,
    /// Shared expert width (0: none).
    pub shared_intermediate: usize,
}

impl MoeBlock {
    /// Loads a MoE block from `{layer_prefix}.{names.block}`, accepting both expert layouts:
    /// per-expert `experts.E.{gate,up,down}.weight` and fused `experts.gate_up_proj [E, 2I, H]` +
    /// `experts.down_proj [E, H, I]` (transformers ≥ 5; gate is the first half of the 2I rows).
    pub fn load(
        store: &TensorStore,
        layer_prefix: &str,
        names: &MoeNames,
        sz: &MoeSizes,
    ) -> Result<Self> {
        let p = format!("{layer_prefix}.{}", names.block);
        let (h, i, e) = (sz.hidden, sz.intermediate, sz.experts);
        let router = store.matrix(&format!("{p}.gate.weight"), e, h)?;
        let fused = format!("{p}.experts.gate_up_proj");
        let experts = if store.contains(&fused) {
            let gate_up = store.tensor3(&fused, [e, 2 * i, h])?;
            let down = store.tensor3(&format!("{p}.experts.down_proj"), [e, h, i])?;
            (0..e)
                .into_par_iter()
                .map(|x| SwiGlu {
                    gate_up: gate_up.index_axis(Axis(0), x).to_owned(),
                    down: down.index_axis(Axis(0), x).to_owned(),
                })
                .collect()
        } else {
            // Experts in parallel: each tensor's conversion alone is too short to keep every
            // core busy (and the first touch of its pages with them). The results are
            // gathered first so that a bad checkpoint reports its lowest-numbered expert's
            // error whatever the thread timing (a parallel collect returns any one of them).
            (0..e)
                .into_par_iter()
                .map(|x| SwiGlu::load(store, &format!("{p}.experts.{x}"), names.expert_proj, h, i))
                .collect::<Vec<_>>()
                .into_iter()
                .collect::<Result<Vec<_>>>()?
        };
        let shared = match names.shared {
            None => None,
            Some(_) if sz.shared_intermediate == 0 => None,
            Some(s) => Some(SharedExpert {
                mlp: SwiGlu::load(
                    store,
                    &format!("{p}.{s}"),
                    ["gate_proj", "up_proj", "down_proj"],
                    h,
                    sz.shared_intermediate,
                )?,
                gate: match names.shared_gate {
                    None => None,
                    Some(g) => Some(
                        store
                            .matrix(&format!("{p}.{g}.weight"), 1, h)?
                            .index_axis_move(Axis(0), 0),
                    ),
                },
            }),
        };
        Ok(Self {
            router,
            experts,
            shared,
        })
    }

    /// Runs the block on `x: [T, hidden]`; returns the output and the assignments used.
    pub fn forward(
        &self,
        layer: usize,
        x: ArrayView2<'_, f32>,
        router: &RouterKind,
        rule: &RouterRule,
        backend: &dyn ExpertLinear,
    ) -> Result<(Array2<f32>, Vec<Assignment>)> {
        let logits = matmul_t(x, self.router.view());
        let assignments = router.route(logits.view(), rule);
        let e = self.experts.len();
        let mut out = match backend.routed_experts(layer, x, &assignments, e)? {
            Some(y) => y,
            None => dispatch(layer, x, &assignments, e, backend),
        };
        if let Some(shared) = &self.shared {
            let y = swiglu(backend, layer, ExpertSlot::Shared(0), x);
            match &shared.gate {
                None => out += &y,
                Some(g) => {
                    let gate = x.dot(g).mapv(|v| 1.0 / (1.0 + (-v).exp()));
                    out += &(&y * &gate.insert_axis(Axis(1)));
                }
            }
        }
        Ok((out, assignments))
    }
}

/// Sends each token to its assigned experts and sums the weighted outputs:
/// `out[t] = Σ_{(t,e,w)} w · expert_e(x[t])`. Tokens are grouped per expert so each expert runs
/// one batched GEMM per projection; experts run in parallel.
pub fn dispatch(
    layer: usize,
    x: ArrayView2<'_, f32>,
    assignments: &[Assignment],
    experts: usize,
    backend: &dyn ExpertLinear,
) -> Array2<f32> {
    let mut groups: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); experts];
    for a in assignments {
        let g = &mut groups[a.expert as usize];
        g.0.push(a.token as usize);
        g.1.push(a.weight);
    }
    let outputs: Vec<(usize, Array2<f32>)> = groups
        .par_iter()
        .enumerate()
        .filter(|(_, g)| !g.0.is_empty())
        .map(|(e, (tokens, weights))| {
            let xe = x.select(Axis(0), tokens);
            let mut y = swiglu(backend, layer, ExpertSlot::Routed(e), xe.view());
            for (mut row, &w) in y.axis_iter_mut(Axis(0)).zip(weights) {
                row *= w;
            }
            (e, y)
        })
        .collect();
    let mut out = Array2::zeros(x.raw_dim());
    for (e, y) in outputs {
        for (row, &t) in y.axis_iter(Axis(0)).zip(&groups[e].0) {
            let mut o = out.row_mut(t);
            o += &row;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// Backend whose every matrix is the identity scaled by (expert index + 1): makes the
    /// combination rule visible.
    struct Scaled;
    impl ExpertLinear for Scaled {
        fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
            let s = match id.slot {
                ExpertSlot::Routed(e) => e as f32 + 1.0,
                _ => 1.0,
            };
            match id.proj {
                Proj::Down => x.mapv(|v| v * s),
                _ => x.to_owned(),
            }
        }
    }

    #[test]
    fn dispatch_sums_weighted_expert_outputs_per_token() {
        let x = array![[1.0f32, -2.0], [0.5, 3.0]];
        let f = |v: f32| v / (1.0 + (-v).exp()) * v; // silu(v)·v with gate = up = identity
        let a = [
            Assignment {
                token: 0,
                expert: 0,
                weight: 0.25,
            },
            Assignment {
                token: 0,
                expert: 2,
                weight: 0.5,
            },
            Assignment {
                token: 1,
                expert: 2,
                weight: 1.0,
            },
        ];
        let out = dispatch(0, x.view(), &a, 3, &Scaled);
        for j in 0..2 {
            let want0 = 0.25 * 1.0 * f(x[[0, j]]) + 0.5 * 3.0 * f(x[[0, j]]);
            assert!((out[[0, j]] - want0).abs() < 1e-5);
            assert!((out[[1, j]] - 3.0 * f(x[[1, j]])).abs() < 1e-5);
        }
        assert_eq!(
            dispatch(0, x.view(), &[], 3, &Scaled),
            Array2::<f32>::zeros((2, 2))
        );
    }
}
