//! Blocks shared by all families: linear layers, RMSNorm, SwiGLU weights and causal multi-head
//! attention over a batch of packed sequences.
//!
//! Activations are `[tokens, features]` matrices holding all sequences of a batch back to back;
//! `seqs` gives each sequence's row range. Products are whole-matrix GEMMs (ndarray
//! `general_mat_mul`), parallel over row blocks, heads and sequences with rayon.
use std::ops::Range;

use anyhow::Result;
use ndarray::linalg::general_mat_mul;
use ndarray::parallel::prelude::*;
use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis};

use super::checkpoint::TensorStore;
use super::config::QkNorm;
use super::rope::RopeTable;

/// Below this many multiply-adds a product runs on one thread (rayon overhead dominates).
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// `x · wᵀ` for `x: [n, in]`, `w: [out, in]` (PyTorch `nn.Linear` layout), split over row blocks.
pub fn matmul_t(x: ArrayView2<'_, f32>, w: ArrayView2<'_, f32>) -> Array2<f32> {
    let (n, out) = (x.nrows(), w.nrows());
    let mut y = Array2::zeros((n, out));
    let threads = rayon::current_num_threads();
    // Inside a rayon worker the caller already runs in parallel (experts, heads): stay sequential.
    let nested = rayon::current_thread_index().is_some();
    if nested || threads == 1 || n * out * x.ncols() < PARALLEL_MIN_MACS || n < 2 * threads {
        general_mat_mul(1.0, &x, &w.t(), 0.0, &mut y);
        return y;
    }
    let block = n.div_ceil(threads);
    y.axis_chunks_iter_mut(Axis(0), block)
        .into_par_iter()
        .zip(x.axis_chunks_iter(Axis(0), block).into_par_iter())
        .for_each(|(mut yb, xb)| general_mat_mul(1.0, &xb, &w.t(), 0.0, &mut yb));
    y
}

/// An affine map `y = x·Wᵀ + b` with `W: [out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`, when the layer has a bias.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        store: &TensorStore,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            weight: store.matrix(&format!("{prefix}.weight"), out, inp)?,
            bias: if bias {
                Some(store.vector(&format!("{prefix}.bias"), out)?)
            } else {
                None
            },
        })
    }

    /// `x · Wᵀ + b` for `x: [n, in]`.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut y = matmul_t(x, self.weight.view());
        if let Some(b) = &self.bias {
            y += b;
        }
        y
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, |b| b.len())
    }

    /// Whether the layer has no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RMSNorm (Zhang & Sennrich 2019): `y = w ⊙ x / sqrt(mean(x²) + ε)`, as transformers'
/// `LlamaRMSNorm` (statistics in f32, weight applied after normalising).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// Per-feature gain.
    pub weight: Array1<f32>,
    /// ε added to the mean square.
    pub eps: f32,
}

impl RmsNorm {
    /// Loads the gain vector `name` of length `n`.
    pub fn load(store: &TensorStore, name: &str, n: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: store.vector(name, n)?,
            eps,
        })
    }

    /// Normalises each consecutive `weight.len()`-wide group of every row (one group per row for
    /// a hidden-state norm, one per head for Qwen3's per-head q/k norm).
    pub fn forward_inplace(&self, mut x: ArrayViewMut2<'_, f32>) {
        let width = self.weight.len();
        let w = self.weight.as_slice().expect("contiguous norm weight");
        x.axis_iter_mut(Axis(0))
            .into_par_iter()
            .for_each(|mut row| {
                let row = row.as_slice_mut().expect("contiguous activation rows");
                for group in row.chunks_mut(width) {
                    let ms = group.iter().map(|v| v * v).sum::<f32>() / width as f32;
                    let inv = 1.0 / (ms + self.eps).sqrt();
                    for (v, g) in group.iter_mut().zip(w) {
                        *v = g * (*v * inv);
                    }
                }
            });
    }

    /// Normalised copy of `x`.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut y = x.as_standard_layout().into_owned();
        self.forward_inplace(y.view_mut());
        y
    }
}

/// The matrices of one SwiGLU feed-forward (`down(silu(gate·x) ⊙ up·x)`, Shazeer 2020), PyTorch
/// layout `[out, in]`. Gate and up are stored stacked (`[2I, H]`, gate rows first, the fused layout
/// of transformers ≥ 5) so the digital path computes both in one GEMM.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// `[2I, H]`: gate rows, then up rows.
    pub gate_up: Array2<f32>,
    /// `[H, I]`.
    pub down: Array2<f32>,
}

impl SwiGlu {
    /// Loads `{prefix}.{names[0..3]}.weight` for gate, up, down.
    pub fn load(
        store: &TensorStore,
        prefix: &str,
        names: [&str; 3],
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let name = |n: &str| format!("{prefix}.{n}.weight");
        let (gate, up) = (name(names[0]), name(names[1]));
        Ok(Self {
            gate_up: store.stacked_matrix(&[&gate, &up], intermediate, hidden)?,
            down: store.matrix(&name(names[2]), hidden, intermediate)?,
        })
    }

    /// Intermediate width I.
    pub fn intermediate(&self) -> usize {
        self.down.ncols()
    }

    /// Gate projection `[I, H]`.
    pub fn gate(&self) -> ArrayView2<'_, f32> {
        self.gate_up.slice(s![..self.intermediate(), ..])
    }

    /// Up projection `[I, H]`.
    pub fn up(&self) -> ArrayView2<'_, f32> {
        self.gate_up.slice(s![self.intermediate().., ..])
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.gate_up.len() + self.down.len()
    }

    /// Whether there is no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `silu(g) ⊙ u` from `gu = [g | u]` (`[n, 2I]`), giving `[n, I]`.
pub fn silu_mul(gu: ArrayView2<'_, f32>) -> Array2<f32> {
    let i = gu.ncols() / 2;
    let mut h = gu.slice(s![.., ..i]).to_owned();
    ndarray::Zip::from(&mut h)
        .and(gu.slice(s![.., i..]))
        .for_each(|g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
    h
}

/// Query rows per block of [`causal_attention`]: each block only multiplies against the keys it
/// can see, so the masked upper triangle costs at most one block's worth of wasted products.
const ATTENTION_BLOCK: usize = 64;

/// Causal softmax attention of one head of one sequence: `softmax(q·kᵀ·scale + mask)·v`,
/// computed in blocks of `ATTENTION_BLOCK` (64) query rows.
pub fn causal_attention(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    scale: f32,
) -> Array2<f32> {
    let n = q.nrows();
    let mut out = Array2::zeros((n, v.ncols()));
    let mut scores = Array2::zeros((ATTENTION_BLOCK.min(n), n));
    for r0 in (0..n).step_by(ATTENTION_BLOCK) {
        let r1 = (r0 + ATTENTION_BLOCK).min(n);
        let mut sc = scores.slice_mut(s![..r1 - r0, ..r1]);
        general_mat_mul(
            scale,
            &q.slice(s![r0..r1, ..]),
            &k.slice(s![..r1, ..]).t(),
            0.0,
            &mut sc,
        );
        for (i, mut row) in sc.axis_iter_mut(Axis(0)).enumerate() {
            let row = row.as_slice_mut().expect("contiguous score rows");
            let (visible, masked) = row.split_at_mut(r0 + i + 1);
            let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in visible.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            visible.iter_mut().for_each(|s| *s *= inv);
            masked.fill(0.0);
        }
        general_mat_mul(
            1.0,
            &sc,
            &v.slice(s![..r1, ..]),
            0.0,
            &mut out.slice_mut(s![r0..r1, ..]),
        );
    }
    out
}

/// Causal multi-head attention over packed sequences. `q: [T, heads·dq]`, `k: [T, kv_heads·dq]`,
/// `v: [T, kv_heads·dv]`; query head h reads key/value head `h / (heads / kv_heads)` (GQA).
/// Returns `[T, heads·dv]`. Parallel over (sequence, head).
#[allow(clippy::too_many_arguments)]
pub fn multi_head_attention(
    q: ArrayView2<'_, f32>,
    k: ArrayView2<'_, f32>,
    v: ArrayView2<'_, f32>,
    heads: usize,
    kv_heads: usize,
    dq: usize,
    dv: usize,
    seqs: &[Range<usize>],
    scale: f32,
) -> Array2<f32> {
    let group = heads / kv_heads;
    let jobs: Vec<(usize, usize)> = (0..seqs.len())
        .flat_map(|s| (0..heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<Array2<f32>> = jobs
        .par_iter()
        .map(|&(s, h)| {
            let r = seqs[s].clone();
            let kv = h / group;
            causal_attention(
                q.slice(s![r.clone(), h * dq..(h + 1) * dq]),
                k.slice(s![r.clone(), kv * dq..(kv + 1) * dq]),
                v.slice(s![r, kv * dv..(kv + 1) * dv]),
                scale,
            )
        })
        .collect();
    let mut out = Array2::zeros((q.nrows(), heads * dv));
    for (&(s, h), o) in jobs.iter().zip(results) {
        out.slice_mut(s![seqs[s].clone(), h * dv..(h + 1) * dv])
            .assign(&o);
    }
    out
}

/// Grouped-query attention with separate q/k/v projections (Mixtral, OLMoE, Qwen2/3-MoE,
/// DeepSeekMoE), optional q/k RMSNorm and `clip_qkv`.
#[derive(Debug, Clone)]
pub struct StandardAttention {
    /// `q_proj`.
    pub q: Linear,
    /// `k_proj`.
    pub k: Linear,
    /// `v_proj`.
    pub v: Linear,
    /// `o_proj`.
    pub o: Linear,
    /// q and k norms with their kind; `None` when the family has none.
    pub qk_norm: Option<(QkNorm, RmsNorm, RmsNorm)>,
    /// Clamp of q, k, v to ±c (OLMoE).
    pub clip_qkv: Option<f32>,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

/// Options to load a [`StandardAttention`].
#[allow(missing_docs)] // the fields of [`StandardAttention`] and [`super::config::AttentionConfig`]
pub struct StandardAttentionSpec {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub clip_qkv: Option<f32>,
    pub eps: f32,
}

impl StandardAttention {
    /// Loads `{prefix}.{q,k,v,o}_proj` and, per `spec.qk_norm`, `{prefix}.{q,k}_norm.weight`.
    pub fn load(store: &TensorStore, prefix: &str, spec: &StandardAttentionSpec) -> Result<Self> {
        let (q_width, kv_width) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
        let lin = |name: &str, out, inp, bias| {
            Linear::load(store, &format!("{prefix}.{name}"), out, inp, bias)
        };
        let norm =
            |name: &str, n| RmsNorm::load(store, &format!("{prefix}.{name}.weight"), n, spec.eps);
        let qk_norm = match spec.qk_norm {
            QkNorm::None => None,
            QkNorm::Full => Some((
                QkNorm::Full,
                norm("q_norm", q_width)?,
                norm("k_norm", kv_width)?,
            )),
            QkNorm::PerHead => Some((
                QkNorm::PerHead,
                norm("q_norm", spec.head_dim)?,
                norm("k_norm", spec.head_dim)?,
            )),
        };
        Ok(Self {
            q: lin("q_proj", q_width, spec.hidden, spec.qkv_bias)?,
            k: lin("k_proj", kv_width, spec.hidden, spec.qkv_bias)?,
            v: lin("v_proj", kv_width, spec.hidden, spec.qkv_bias)?,
            o: lin("o_proj", spec.hidden, q_width, spec.o_bias)?,
            qk_norm,
            clip_qkv: spec.clip_qkv,
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
        })
    }

    /// Attention output `[T, hidden]` for normalised input `x` (packed sequences `seqs`).
    pub fn forward(
        &self,
        x: ArrayView2<'_, f32>,
        seqs: &[Range<usize>],
        rope: &RopeTable,
    ) -> Array2<f32> {
        let (mut q, mut k, mut v) = (self.q.forward(x), self.k.forward(x), self.v.forward(x));
        if let Some((_, qn, kn)) = &self.qk_norm {
            // Full and per-head norms differ only in their width; `forward_inplace` groups by it.
            qn.forward_inplace(q.view_mut());
            kn.forward_inplace(k.view_mut());
        }
        if let Some(c) = self.clip_qkv {
            for m in [&mut q, &mut k, &mut v] {
                m.mapv_inplace(|x| x.clamp(-c, c));
            }
        }
        for r in seqs {
            rope.apply(q.slice_mut(s![r.clone(), ..]), self.head_dim, 0);
            rope.apply(k.slice_mut(s![r.clone(), ..]), self.head_dim, 0);
        }
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let attn = multi_head_attention(
            q.view(),
            k.view(),
            v.view(),
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.head_dim,
            seqs,
            scale,
        );
        self.o.forward(attn.view())
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        let norms = self
            .qk_norm
            .as_ref()
            .map_or(0, |(_, a, b)| a.weight.len() + b.weight.len());
        self.q.len() + self.k.len() + self.v.len() + self.o.len() + norms
    }

    /// Whether there is no parameter.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn rms_norm_matches_definition() {
        let n = RmsNorm {
            weight: array![1.0f32, 2.0],
            eps: 0.0,
        };
        let y = n.forward(array![[3.0f32, 4.0]].view());
        let rms = (12.5f32).sqrt();
        assert!((y[[0, 0]] - 3.0 / rms).abs() < 1e-6);
        assert!((y[[0, 1]] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn first_query_attends_only_to_itself() {
        let q = array![[1.0f32], [1.0]];
        let k = array![[1.0f32], [3.0]];
        let v = array![[10.0f32], [20.0]];
        let o = causal_attention(q.view(), k.view(), v.view(), 1.0);
        assert_eq!(o[[0, 0]], 10.0);
        let w1 = 3f32.exp() / (1f32.exp() + 3f32.exp());
        assert!((o[[1, 0]] - (10.0 * (1.0 - w1) + 20.0 * w1)).abs() < 1e-4);
    }

    #[test]
    fn blocked_attention_equals_full_masked_softmax() {
        let n = 150; // spans three blocks, the last one partial
        let f = |r: usize, c: usize, a: usize| ((r * a + c * 7) % 17) as f32 * 0.1 - 0.8;
        let q = Array2::from_shape_fn((n, 8), |(r, c)| f(r, c, 3));
        let k = Array2::from_shape_fn((n, 8), |(r, c)| f(r, c, 5));
        let v = Array2::from_shape_fn((n, 6), |(r, c)| f(r, c, 11));
        let got = causal_attention(q.view(), k.view(), v.view(), 0.5);
        let mut scores = q.dot(&k.t()) * 0.5;
        for (i, mut row) in scores.axis_iter_mut(Axis(0)).enumerate() {
            let max = row
                .iter()
                .take(i + 1)
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().take(i + 1).map(|s| (s - max).exp()).sum();
            for (j, s) in row.iter_mut().enumerate() {
                *s = if j <= i { (*s - max).exp() / z } else { 0.0 };
            }
        }
        let want = scores.dot(&v);
        let d = (&got - &want).mapv(f32::abs).fold(0.0f32, |m, x| m.max(*x));
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn parallel_matmul_equals_plain_dot() {
        let x = Array2::from_shape_fn((300, 70), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
        let w = Array2::from_shape_fn((90, 70), |(i, j)| ((i * 5 + j) % 13) as f32 - 6.0);
        assert_eq!(matmul_t(x.view(), w.view()), x.dot(&w.t()));
    }
}
