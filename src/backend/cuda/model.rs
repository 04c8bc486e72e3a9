//! The whole forward pass of a model on the GPU: embedding, attention, norms, router products,
//! residual stream and LM head on the device (cuBLAS f32 GEMMs and `kernels/model.cu`), the
//! routed experts through the grouped analog kernels of [`GpuExperts`], and the per-position
//! metrics of an evaluation ([`super::score::GpuReference`]) without copying logits back.
//!
//! It computes [`Model::forward`] with [`GpuExperts::call`] as the expert backend: the same
//! function, summed in another order (f32 GEMMs, online softmax). Three parts go back to the
//! host, each for a reason:
//! - the router's top-k: the `[T, E]` router logits are copied back and routed by
//!   [`RouterKind::route`], so every routing rule (group-limited, adaptive, …) is the CPU's;
//! - feed-forwards with an analog matrix that [`GpuExperts`] does not hold (analog shared
//!   experts or dense MLPs, layers left on the CPU by the memory plan, routers with a varying
//!   number of experts per token) run through the CPU crossbars of [`GpuExperts::cpu`];
//! - DeepSeek-V2's latent attention (MLA) runs on the CPU.
use anyhow::{anyhow, Result};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use ndarray::{Array2, ArrayView2};

use super::blas::Blas;
use super::compile::MODEL_CU;
use super::experts::{digital_routed, GpuExperts, SequenceKeys};
use super::gemm::allow_dynamic_shared;
use super::programmed::{upload_digital, Held, SourceKind};
use super::{gib, linear_launch, CudaDevice, CudaError, CudaResult};
use crate::model::common::{Linear, RmsNorm, SwiGlu};
use crate::model::moe::{dispatch, swiglu, RoutedIo};
use crate::model::rope::RopeTable;
use crate::model::{
    Assignment, Attention, ExpertLinear, ExpertSlot, Ffn, MatrixId, Model, Proj, RouterKind,
    RouterRule,
};

/// Query rows per CTA and keys per shared tile of `causal_attention` (`ATT_ROWS`, `ATT_KEYS`
/// in `kernels/model.cu`), and the widest value head it takes (`ATT_DV_MAX`).
const ATT_ROWS: usize = 16;
const ATT_KEYS: usize = 32;
const ATT_DV_MAX: usize = 256;

/// A `nn.Linear` on the device.
struct GpuLinear {
    /// `[out, in]`.
    w: CudaSlice<f32>,
    b: Option<CudaSlice<f32>>,
    out: usize,
    inp: usize,
}

impl GpuLinear {
    fn upload(dev: &CudaDevice, l: &Linear) -> CudaResult<Self> {
        Ok(Self {
            w: upload_matrix(dev, l.weight.view())?,
            b: match &l.bias {
                Some(b) => Some(dev.upload(b.as_slice().expect("contiguous bias"))?),
                None => None,
            },
            out: l.weight.nrows(),
            inp: l.weight.ncols(),
        })
    }
}

/// A SwiGLU feed-forward on the device (digital weights).
struct GpuSwiGlu {
    /// `[2I, H]`, gate rows first.
    gate_up: CudaSlice<f32>,
    /// `[H, I]`.
    down: CudaSlice<f32>,
    inter: usize,
}

impl GpuSwiGlu {
    fn upload(dev: &CudaDevice, m: &SwiGlu) -> CudaResult<Self> {
        Ok(Self {
            gate_up: upload_matrix(dev, m.gate_up.view())?,
            down: upload_matrix(dev, m.down.view())?,
            inter: m.intermediate(),
        })
    }
}

/// An RMSNorm gain vector on the device with the width of the groups it normalises.
struct GpuNorm {
    w: CudaSlice<f32>,
    width: usize,
}

/// Standard (grouped-query) attention on the device.
struct GpuAttention {
    q: GpuLinear,
    k: GpuLinear,
    v: GpuLinear,
    o: GpuLinear,
    /// q and k norms.
    qk_norm: Option<(GpuNorm, GpuNorm)>,
    clip_qkv: Option<f32>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

enum GpuFfn {
    Dense(GpuSwiGlu),
    Moe {
        /// `[E, H]`.
        router: CudaSlice<f32>,
        n_experts: usize,
        /// Shared expert and its gate (`[H]`, Qwen2-MoE).
        shared: Option<(GpuSwiGlu, Option<CudaSlice<f32>>)>,
    },
}

struct GpuLayer {
    input_norm: CudaSlice<f32>,
    /// `None`: latent attention (MLA), run on the CPU.
    attention: Option<GpuAttention>,
    post_norm: CudaSlice<f32>,
    ffn: GpuFfn,
}

use super::profile::{laps, StageClock};

/// What a GPU forward pass multiplies with wherever the model has analog matrices, and what it
/// hands back besides the logits.
enum Pass<'p, 'a, 'm> {
    /// The programmed, drifted crossbars of the [`GpuExperts`], sequence q drawing the per-MVM
    /// noise of call `first_call + q`.
    Analog(&'p GpuExperts<'a, 'm>, u32),
    /// The model's digital f32 weights: the routed experts' copies the [`GpuExperts`] hold,
    /// else [`Model`]'s on the CPU.
    Digital(&'p GpuExperts<'a, 'm>),
    /// The model's digital f32 weights, each MoE layer's routed experts uploaded from the host
    /// for the pass and freed after it; what every MoE layer sees goes to the sink.
    Record(&'p mut dyn FnMut(RoutedIo) -> Result<()>),
}
pub use super::profile::{StageTime, PROFILE_ENV};

/// The digital weights of a model on the device, ready to run forward passes.
pub struct GpuModel<'m> {
    model: &'m Model,
    blas: Blas,
    embed: CudaSlice<f32>,
    layers: Vec<GpuLayer>,
    final_norm: CudaSlice<f32>,
    lm_head: Option<CudaSlice<f32>>,
    /// RoPE cos/sin for positions 0..n, grown on demand: (n, cos, sin).
    rope: Option<(usize, RopeTable, CudaSlice<f32>, CudaSlice<f32>)>,
    clock: Option<StageClock>,
}

fn upload_matrix(dev: &CudaDevice, m: ArrayView2<'_, f32>) -> CudaResult<CudaSlice<f32>> {
    let m = m.as_standard_layout();
    dev.upload(m.as_slice().expect("standard layout"))
}

fn upload_norm(dev: &CudaDevice, n: &RmsNorm) -> CudaResult<CudaSlice<f32>> {
    dev.upload(n.weight.as_slice().expect("contiguous norm weight"))
}

/// Bytes of the device copy of every digital weight [`GpuModel::upload`] makes (f32).
pub fn dense_bytes(model: &Model) -> usize {
    let p = model.param_counts();
    let tied_head = if model.lm_head.is_none() {
        0
    } else {
        p.lm_head
    };
    4 * (p.embeddings
        + tied_head
        + p.norms
        + p.attention
        + p.router
        + p.shared_experts
        + p.dense_mlp)
}

impl<'m> GpuModel<'m> {
    /// Uploads the digital weights of `model` (all but the routed experts). An error when they
    /// do not fit in device memory beside a reserve of 1/8 of the device for activations.
    pub fn upload(dev: &CudaDevice, model: &'m Model) -> CudaResult<Self> {
        let need = dense_bytes(model);
        let (free, total) = dev.memory_bytes()?;
        if need.saturating_add(total / 8) > free {
            return Err(CudaError::Unsupported(format!(
                "device memory: the dense weights need {:.2} GiB in f32 and {:.2} GiB stay reserved, \
                 {:.2} of {:.2} GiB are free",
                gib(need),
                gib(total / 8),
                gib(free),
                gib(total)
            )));
        }
        let cfg = &model.config;
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let attention = match &l.attention {
                Attention::Mla(_) => None,
                Attention::Standard(a) => {
                    if a.head_dim > ATT_DV_MAX || a.kv_heads == 0 || a.heads % a.kv_heads != 0 {
                        return Err(CudaError::Unsupported(format!(
                            "attention with {} heads, {} key/value heads of width {}: the GPU \
                             kernel takes widths up to {ATT_DV_MAX} and whole query groups",
                            a.heads, a.kv_heads, a.head_dim
                        )));
                    }
                    let qk_norm = match &a.qk_norm {
                        None => None,
                        Some((_, qn, kn)) => Some((
                            GpuNorm {
                                w: upload_norm(dev, qn)?,
                                width: qn.weight.len(),
                            },
                            GpuNorm {
                                w: upload_norm(dev, kn)?,
                                width: kn.weight.len(),
                            },
                        )),
                    };
                    Some(GpuAttention {
                        q: GpuLinear::upload(dev, &a.q)?,
                        k: GpuLinear::upload(dev, &a.k)?,
                        v: GpuLinear::upload(dev, &a.v)?,
                        o: GpuLinear::upload(dev, &a.o)?,
                        qk_norm,
                        clip_qkv: a.clip_qkv,
                        heads: a.heads,
                        kv_heads: a.kv_heads,
                        head_dim: a.head_dim,
                    })
                }
            };
            let ffn = match &l.ffn {
                Ffn::Dense(m) => GpuFfn::Dense(GpuSwiGlu::upload(dev, m)?),
                Ffn::Moe(m) => GpuFfn::Moe {
                    router: upload_matrix(dev, m.router.view())?,
                    n_experts: m.experts.len(),
                    shared: match &m.shared {
                        None => None,
                        Some(s) => Some((
                            GpuSwiGlu::upload(dev, &s.mlp)?,
                            match &s.gate {
                                Some(g) => {
                                    Some(dev.upload(g.as_slice().expect("contiguous gate"))?)
                                }
                                None => None,
                            },
                        )),
                    },
                },
            };
            layers.push(GpuLayer {
                input_norm: upload_norm(dev, &l.input_norm)?,
                attention,
                post_norm: upload_norm(dev, &l.post_attention_norm)?,
                ffn,
            });
        }
        debug_assert_eq!(layers.len(), cfg.num_layers);
        Ok(Self {
            model,
            blas: Blas::new(dev)?,
            embed: upload_matrix(dev, model.embed_tokens.view())?,
            layers,
            final_norm: upload_norm(dev, &model.final_norm)?,
            lm_head: match &model.lm_head {
                Some(h) => Some(upload_matrix(dev, h.view())?),
                None => None,
            },
            rope: None,
            clock: StageClock::from_env()?,
        })
    }

    /// Time per forward stage so far, when [`PROFILE_ENV`] is set.
    pub fn stage_seconds(&self) -> Option<&[StageTime]> {
        self.clock.as_ref().map(|c| c.stages())
    }

    /// Device bytes one token row of a forward pass holds at most at once (activations and
    /// scratch in f32, the routed experts' pairs included), with a factor 2 for the memory
    /// pool's fragmentation.
    pub fn bytes_per_token(&self) -> usize {
        let c = &self.model.config;
        let attn = self
            .layers
            .iter()
            .filter_map(|l| l.attention.as_ref())
            .map(|a| 2 * a.q.out + a.k.out + a.v.out + a.o.out)
            .max()
            .unwrap_or(0);
        let ffn = (c.top_k.max(1) * (c.moe_intermediate_size * 6 + c.hidden_size))
            .max(3 * c.dense_intermediate_size.max(c.shared_intermediate_size));
        let floats = c.vocab_size + 4 * c.hidden_size + attn + 2 * c.num_experts + ffn;
        2 * 4 * floats + 64
    }

    /// How many sequences of `window` tokens one [`GpuModel::forward_sequences`] pass takes:
    /// as many as half the free device memory holds (at least one).
    pub fn sequences_per_pass(&self, dev: &CudaDevice, window: usize) -> CudaResult<usize> {
        let (free, _) = dev.memory_bytes()?;
        Ok((free / 2 / (self.bytes_per_token() * window.max(1))).max(1))
    }

    /// Which decoder layers run their attention on the CPU (latent attention), for reports.
    pub fn cpu_attention_layers(&self) -> Vec<usize> {
        (0..self.layers.len())
            .filter(|&l| self.layers[l].attention.is_none())
            .collect()
    }

    /// RoPE tables covering `n` positions (host and device copies).
    fn rope_for(&mut self, dev: &CudaDevice, n: usize) -> CudaResult<()> {
        if self.rope.as_ref().is_some_and(|r| r.0 >= n) {
            return Ok(());
        }
        let n = n.next_power_of_two();
        let table = self.model.config.rope.table(n);
        let cos = upload_matrix(dev, table.cos())?;
        let sin = upload_matrix(dev, table.sin())?;
        self.rope = Some((n, table, cos, sin));
        Ok(())
    }

    /// Next-token logits `[tokens.len(), vocab]` on the device for one sequence, the routed
    /// experts through `experts` with the per-MVM noise of call `mvm_id`.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        experts: &GpuExperts<'_, '_>,
        router: &RouterKind,
        mvm_id: u32,
    ) -> Result<CudaSlice<f32>> {
        self.forward_sequences(&[tokens], experts, router, mvm_id)
    }

    /// Next-token logits `[Σ len, vocab]` of several sequences run as one batch (rows one
    /// sequence after another). Every sequence but the last has the length of the first; each
    /// is computed as [`GpuModel::forward`] computes it alone with call `first_call + q`
    /// (attention and RoPE positions per sequence, per-MVM noise keyed per sequence): one pass
    /// over the layers for all of them instead of one per sequence.
    pub fn forward_sequences(
        &mut self,
        seqs: &[&[u32]],
        experts: &GpuExperts<'_, '_>,
        router: &RouterKind,
        first_call: u32,
    ) -> Result<CudaSlice<f32>> {
        self.run_sequences(
            experts.device(),
            seqs,
            router,
            &mut Pass::Analog(experts, first_call),
        )
    }

    /// [`GpuModel::forward_sequences`] with the model's digital weights everywhere: the digital
    /// reference of an evaluation in the GPU arithmetic of its analog forwards (cuBLAS f32;
    /// the routed experts by [`GpuExperts::digital_pairs_on_device`] where the device holds
    /// their digital weights, else [`Model`]'s on the CPU). Agrees with [`Model::forward`] up
    /// to f32 summation order.
    pub fn digital_sequences(
        &mut self,
        seqs: &[&[u32]],
        experts: &GpuExperts<'_, '_>,
        router: &RouterKind,
    ) -> Result<CudaSlice<f32>> {
        self.run_sequences(experts.device(), seqs, router, &mut Pass::Digital(experts))
    }

    /// The digital forward of [`GpuModel::digital_sequences`] over `seqs` (one batch, as
    /// there) with each MoE layer's routed experts uploaded from the model for the pass, handing
    /// `sink` what every MoE layer sees: its input rows, routing and routed-expert output,
    /// copied to the host (fine-tuning's calibration, `finetune::calib`).
    pub fn record_sequences(
        &mut self,
        dev: &CudaDevice,
        seqs: &[&[u32]],
        router: &RouterKind,
        sink: &mut dyn FnMut(RoutedIo) -> Result<()>,
    ) -> Result<()> {
        self.run_sequences(dev, seqs, router, &mut Pass::Record(sink))
            .map(drop)
    }

    fn run_sequences(
        &mut self,
        dev: &CudaDevice,
        seqs: &[&[u32]],
        router: &RouterKind,
        pass: &mut Pass<'_, '_, '_>,
    ) -> Result<CudaSlice<f32>> {
        let first_call = match pass {
            Pass::Analog(_, first) => *first,
            _ => 0,
        };
        dev.context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e}"))?;
        let cfg = &self.model.config;
        anyhow::ensure!(
            !seqs.is_empty() && seqs.iter().all(|q| !q.is_empty()),
            "forward: empty sequence"
        );
        let window = seqs[0].len();
        if let Some(q) = seqs[..seqs.len() - 1]
            .iter()
            .position(|q| q.len() != window)
        {
            anyhow::bail!(
                "forward: sequence {q} of the batch has {} tokens, the first {window} (only the last may be shorter)",
                seqs[q].len()
            );
        }
        if seqs.last().is_some_and(|q| q.len() > window) {
            anyhow::bail!("forward: the last sequence of the batch is longer than the first");
        }
        let tokens: Vec<u32> = seqs.concat();
        let s = tokens.len();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!(
                "forward: token id {bad} is outside the vocabulary (vocab_size {})",
                cfg.vocab_size
            );
        }
        if let Some(w) = cfg.sliding_window.filter(|&w| window > w) {
            anyhow::bail!(
                "forward: a sequence of {window} tokens exceeds the checkpoint's sliding window ({w})"
            );
        }
        let keys = SequenceKeys { window, first_call };
        // The layers allocate and free their scratch per call, with host synchronisations
        // between (bound management's flags, the GDC readout): keep the freed blocks for the
        // next layer rather than unmapping and mapping them again at each.
        let _pool = dev.retain_pool()?;
        self.rope_for(dev, window)?;
        let mut clock = self.clock.take();
        let mut lap = laps(&mut clock, dev)?;
        let h_dim = cfg.hidden_size;
        let ids = dev.upload(&tokens)?;
        let mut h = dev.scratch::<f32>(s * h_dim)?;
        let n = (s * h_dim) as u64;
        let (rows, width) = (s as u32, h_dim as u32);
        let f = dev.function(&MODEL_CU, &[], "embed_gather")?;
        dev.launch(&f, "embed_gather", linear_launch(n), |b| {
            b.arg(&self.embed)
                .arg(&ids)
                .arg(&mut h)
                .arg(&rows)
                .arg(&width);
        })?;
        let mut x = dev.scratch::<f32>(s * h_dim)?;
        lap("embedding")?;
        for (l, layer) in self.layers.iter().enumerate() {
            let at = |e: CudaError| anyhow!("layer {l} on the GPU: {e}");
            rms_norm(
                dev,
                Some(&h),
                &mut x,
                &layer.input_norm,
                s,
                h_dim,
                cfg.rms_norm_eps,
            )
            .map_err(at)?;
            match &layer.attention {
                Some(a) => {
                    let rope = self.rope.as_ref().expect("rope_for ran");
                    lap("attention: input norm").map_err(at)?;
                    self.attention(
                        dev,
                        a,
                        &x,
                        &mut h,
                        (s, window),
                        (&rope.2, &rope.3, &rope.1),
                        &mut lap,
                    )
                    .map_err(at)?;
                }
                None => {
                    let Attention::Mla(mla) = &self.model.layers[l].attention else {
                        unreachable!("only latent attention stays on the CPU")
                    };
                    let rope = &self.rope.as_ref().expect("rope_for ran").1;
                    let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                    let ranges: Vec<_> = (0..s)
                        .step_by(window)
                        .map(|a| a..(a + window).min(s))
                        .collect();
                    let a = mla.forward(xh.view(), &ranges, rope);
                    add_host(dev, &mut h, a.view()).map_err(at)?;
                    lap("attention: latent attention on the CPU").map_err(at)?;
                }
            }
            lap("attention: output projection").map_err(at)?;
            rms_norm(
                dev,
                Some(&h),
                &mut x,
                &layer.post_norm,
                s,
                h_dim,
                cfg.rms_norm_eps,
            )
            .map_err(at)?;
            match &layer.ffn {
                GpuFfn::Dense(m) => {
                    let slot = ExpertSlot::DenseMlp;
                    if let Some(experts) = analog_here(pass, l, slot) {
                        let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                        let y = per_sequence(keys, xh.view(), |call, rows| {
                            Ok(swiglu(&experts.call(call), l, slot, rows))
                        })?;
                        add_host(dev, &mut h, y.view()).map_err(at)?;
                    } else {
                        self.swiglu(dev, m, &x, s, h_dim, &mut h, None)
                            .map_err(at)?;
                    }
                }
                GpuFfn::Moe {
                    router: w_router,
                    n_experts,
                    shared,
                } => {
                    let e = *n_experts;
                    let mut logits = dev.scratch::<f32>(s * e)?;
                    self.blas
                        .sgemm_nt(dev, &x, w_router, &mut logits, (s, e, h_dim), 0.0)
                        .map_err(at)?;
                    // Fixed-k rules route on the device when the layer's experts are there.
                    let here = match pass {
                        Pass::Analog(experts, _) => experts.layer(l).is_some(),
                        Pass::Digital(experts) => experts.digital_on_device(l),
                        Pass::Record(_) => self.streamed_width(l).is_some(),
                    };
                    let on_device = match (here, device_top_k(router, &cfg.router, e)) {
                        (true, Some(k)) => {
                            let (eop, wop) =
                                route_top_k(dev, &logits, s, e, k, router, &cfg.router)
                                    .map_err(at)?;
                            lap("router").map_err(at)?;
                            let y = match pass {
                                Pass::Analog(experts, _) => {
                                    experts.pairs_on_device(l, &x, &eop, &wop, (s, k, e), keys)
                                }
                                Pass::Digital(experts) => experts.digital_pairs_on_device(
                                    &self.blas,
                                    l,
                                    &x,
                                    &eop,
                                    &wop,
                                    (s, k, e),
                                ),
                                Pass::Record(_) => self
                                    .streamed_experts(dev, l, &x, (&eop, &wop), (s, k, e))
                                    .map(Some),
                            }
                            .map_err(at)?;
                            if let (Pass::Record(sink), Some(y)) = (&mut *pass, &y) {
                                sink(
                                    seen_on_device(dev, l, (&x, &eop, &wop, y), (s, k, h_dim))
                                        .map_err(at)?,
                                )?;
                            }
                            y
                        }
                        _ => {
                            let logits = download_matrix(dev, &logits, s, e).map_err(at)?;
                            let assignments = router.route(logits.view(), &cfg.router);
                            lap("router").map_err(at)?;
                            let on_device = match pass {
                                Pass::Analog(experts, _) => experts
                                    .routed_on_device(l, &x, s, &assignments, e, keys)
                                    .map_err(at)?,
                                _ => None,
                            };
                            match (on_device, &mut *pass) {
                                (Some(y), _) => Some(y),
                                (None, Pass::Digital(_) | Pass::Record(_)) => {
                                    let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                                    let y = dispatch(l, xh.view(), &assignments, e, self.model);
                                    add_host(dev, &mut h, y.view()).map_err(at)?;
                                    if let Pass::Record(sink) = pass {
                                        sink(RoutedIo {
                                            layer: l,
                                            x: xh,
                                            assignments,
                                            y,
                                        })?;
                                    }
                                    None
                                }
                                (None, Pass::Analog(experts, _)) => {
                                    let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                                    let y = per_sequence(keys, xh.view(), |call, rows| {
                                        let r0 = (call - first_call) as usize * window;
                                        let r = r0 as u32..(r0 + rows.nrows()) as u32;
                                        let mine: Vec<Assignment> = assignments
                                            .iter()
                                            .filter(|a| r.contains(&a.token))
                                            .map(|a| Assignment {
                                                token: a.token - r.start,
                                                ..*a
                                            })
                                            .collect();
                                        let c = experts.call(call);
                                        Ok(match c.routed_experts(l, rows, &mine, e)? {
                                            Some(y) => y,
                                            None => dispatch(l, rows, &mine, e, &c),
                                        })
                                    })?;
                                    add_host(dev, &mut h, y.view()).map_err(at)?;
                                    None
                                }
                            }
                        }
                    };
                    if let Some(y) = on_device {
                        add_rows(dev, &mut h, &y, None, s, h_dim).map_err(at)?;
                    }
                    lap("routed experts").map_err(at)?;
                    if let Some((m, gate)) = shared {
                        let slot = ExpertSlot::Shared(0);
                        if let Some(experts) = analog_here(pass, l, slot) {
                            let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                            let mut y = per_sequence(keys, xh.view(), |call, rows| {
                                Ok(swiglu(&experts.call(call), l, slot, rows))
                            })?;
                            if let Some(g) = &self.shared_gate_host(l) {
                                for (mut row, xr) in y.rows_mut().into_iter().zip(xh.rows()) {
                                    let z = xr.dot(g);
                                    row *= 1.0 / (1.0 + (-z).exp());
                                }
                            }
                            add_host(dev, &mut h, y.view()).map_err(at)?;
                        } else {
                            self.swiglu(dev, m, &x, s, h_dim, &mut h, gate.as_ref())
                                .map_err(at)?;
                        }
                    }
                }
            }
            lap("shared and dense feed-forwards").map_err(at)?;
        }
        let at = |e: CudaError| anyhow!("LM head on the GPU: {e}");
        let (x_final, v) = (&mut x, cfg.vocab_size);
        rms_norm(
            dev,
            Some(&h),
            x_final,
            &self.final_norm,
            s,
            h_dim,
            cfg.rms_norm_eps,
        )
        .map_err(at)?;
        let mut logits = dev.scratch::<f32>(s * v)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.blas
            .sgemm_nt(dev, x_final, head, &mut logits, (s, v, h_dim), 0.0)
            .map_err(at)?;
        lap("LM head").map_err(at)?;
        drop(lap);
        self.clock = clock;
        Ok(logits)
    }

    /// The expert width of MoE layer `l` when [`GpuModel::streamed_experts`] takes its routed
    /// experts: all of one shape, the width a multiple of 8 (the SwiGLU row interleaving).
    fn streamed_width(&self, l: usize) -> Option<usize> {
        let Ffn::Moe(m) = &self.model.layers[l].ffn else {
            return None;
        };
        let first = m.experts.first()?;
        let inter = first.intermediate();
        (inter.is_multiple_of(8)
            && m.experts.iter().all(|w| {
                w.gate_up.dim() == first.gate_up.dim() && w.down.dim() == first.down.dim()
            }))
        .then_some(inter)
    }

    /// The routed experts of MoE layer `l` on the device rows `x` (`[T, d]`) for the `(token,
    /// slot)` pairs `pairs`, with their digital weights uploaded from the model for the
    /// product and freed after it ([`digital_routed`]).
    fn streamed_experts(
        &self,
        dev: &CudaDevice,
        l: usize,
        x: &CudaSlice<f32>,
        pairs: (&CudaSlice<u32>, &CudaSlice<f32>),
        shape: (usize, usize, usize),
    ) -> CudaResult<CudaSlice<f32>> {
        let inter = self.streamed_width(l).ok_or_else(|| {
            CudaError::Unsupported(format!("layer {l}: routed experts of unequal shapes"))
        })?;
        let d = self.model.config.hidden_size;
        let upload =
            |kind, dims| upload_digital(dev, self.model, (l, kind), dims).map(Held::Uploaded);
        digital_routed(
            dev,
            &self.blas,
            x,
            pairs,
            shape,
            (d, inter),
            || upload(SourceKind::GateUp, (2 * inter, d)),
            || upload(SourceKind::Down, (d, inter)),
        )
    }

    /// The host copy of the shared-expert gate of layer `l`, if it has one.
    fn shared_gate_host(&self, l: usize) -> Option<ndarray::Array1<f32>> {
        match &self.model.layers[l].ffn {
            Ffn::Moe(m) => m.shared.as_ref().and_then(|s| s.gate.clone()),
            Ffn::Dense(_) => None,
        }
    }

    /// h += o(attention(q, k, v)) for normalised rows `x` (StandardAttention::forward), the
    /// rows being sequences of `window` tokens.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        dev: &CudaDevice,
        a: &GpuAttention,
        x: &CudaSlice<f32>,
        h: &mut CudaSlice<f32>,
        (s, window): (usize, usize),
        (cos, sin, table): (&CudaSlice<f32>, &CudaSlice<f32>, &RopeTable),
        lap: &mut dyn FnMut(&'static str) -> CudaResult<()>,
    ) -> CudaResult<()> {
        let window32 = window.min(s) as u32;
        let q = &mut self.linear(dev, &a.q, x, s)?;
        let k = &mut self.linear(dev, &a.k, x, s)?;
        let v = &mut self.linear(dev, &a.v, x, s)?;
        lap("attention: q/k/v projections")?;
        if let Some((qn, kn)) = &a.qk_norm {
            let eps = self.model.config.rms_norm_eps;
            rms_norm(dev, None, q, &qn.w, s * a.q.out / qn.width, qn.width, eps)?;
            rms_norm(dev, None, k, &kn.w, s * a.k.out / kn.width, kn.width, eps)?;
        }
        if let Some(c) = a.clip_qkv {
            let f = dev.function(&MODEL_CU, &[], "clamp_abs")?;
            for (m, width) in [(&mut *q, a.q.out), (&mut *k, a.k.out), (&mut *v, a.v.out)] {
                let n = (s * width) as u64;
                dev.launch(&f, "clamp_abs", linear_launch(n), |b| {
                    b.arg(m).arg(&n).arg(&c);
                })?;
            }
        }
        let half = table.cos().ncols();
        let f = dev.function(&MODEL_CU, &[], "rope")?;
        for (m, heads) in [(&mut *q, a.heads), (&mut *k, a.kv_heads)] {
            let n = (s * heads * half) as u64;
            let (rows, heads, width, half, inter) = (
                s as u32,
                heads as u32,
                a.head_dim as u32,
                half as u32,
                u32::from(table.interleaved()),
            );
            dev.launch(&f, "rope", linear_launch(n), |b| {
                b.arg(m)
                    .arg(cos)
                    .arg(sin)
                    .arg(&rows)
                    .arg(&heads)
                    .arg(&width)
                    .arg(&half)
                    .arg(&inter)
                    .arg(&window32);
            })?;
        }
        lap("attention: q/k norms and RoPE")?;
        let d = a.head_dim;
        let out = &mut dev.scratch::<f32>(s * a.heads * d)?;
        let shared = (ATT_KEYS * (d + 1) + ATT_KEYS * d + ATT_ROWS * d) * 4;
        let f = dev.function(
            &MODEL_CU,
            &[("ATT_DV_SLOTS", d.div_ceil(32) as i64)],
            "causal_attention",
        )?;
        let threads = 32 * ATT_ROWS as u32;
        if shared > 48 * 1024 {
            allow_dynamic_shared(&f, "causal_attention", threads, shared as u32)?;
        }
        let cfg = LaunchConfig {
            grid_dim: (s.div_ceil(ATT_ROWS) as u32, a.heads as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (s32, heads, kv, dq, scale) = (
            s as u32,
            a.heads as u32,
            a.kv_heads as u32,
            d as u32,
            1.0 / (d as f32).sqrt(),
        );
        dev.launch(&f, "causal_attention", cfg, |b| {
            b.arg(&*q)
                .arg(&*k)
                .arg(&*v)
                .arg(&mut *out)
                .arg(&s32)
                .arg(&heads)
                .arg(&kv)
                .arg(&dq)
                .arg(&dq)
                .arg(&scale)
                .arg(&window32);
        })?;
        lap("attention: causal attention kernel")?;
        // h += out · Woᵀ (+ b)
        self.blas
            .sgemm_nt(dev, out, &a.o.w, h, (s, a.o.out, a.o.inp), 1.0)?;
        if let Some(b) = &a.o.b {
            add_bias(dev, h, b, s, a.o.out)?;
        }
        Ok(())
    }

    /// x · Wᵀ + b as a new device buffer.
    fn linear(
        &self,
        dev: &CudaDevice,
        l: &GpuLinear,
        x: &CudaSlice<f32>,
        s: usize,
    ) -> CudaResult<CudaSlice<f32>> {
        let mut y = dev.scratch::<f32>(s * l.out)?;
        self.blas
            .sgemm_nt(dev, x, &l.w, &mut y, (s, l.out, l.inp), 0.0)?;
        if let Some(b) = &l.b {
            add_bias(dev, &mut y, b, s, l.out)?;
        }
        Ok(y)
    }

    /// h += down(silu(gate·x) ⊙ up·x), times σ(gate_vec·x) per row when `gate_vec` is given.
    #[allow(clippy::too_many_arguments)]
    fn swiglu(
        &self,
        dev: &CudaDevice,
        m: &GpuSwiGlu,
        x: &CudaSlice<f32>,
        s: usize,
        h_dim: usize,
        h: &mut CudaSlice<f32>,
        gate_vec: Option<&CudaSlice<f32>>,
    ) -> CudaResult<()> {
        let i = m.inter;
        let mut gu = dev.scratch::<f32>(s * 2 * i)?;
        self.blas
            .sgemm_nt(dev, x, &m.gate_up, &mut gu, (s, 2 * i, h_dim), 0.0)?;
        let mut mid = dev.scratch::<f32>(s * i)?;
        let f = dev.function(&MODEL_CU, &[], "silu_mul")?;
        let (rows, inter) = (s as u64, i as u32);
        dev.launch(&f, "silu_mul", linear_launch(rows * i as u64), |b| {
            b.arg(&gu).arg(&mut mid).arg(&rows).arg(&inter);
        })?;
        match gate_vec {
            None => self
                .blas
                .sgemm_nt(dev, &mid, &m.down, h, (s, h_dim, i), 1.0),
            Some(g) => {
                let mut y = dev.scratch::<f32>(s * h_dim)?;
                self.blas
                    .sgemm_nt(dev, &mid, &m.down, &mut y, (s, h_dim, i), 0.0)?;
                let mut z = dev.scratch::<f32>(s)?;
                self.blas.sgemm_nt(dev, x, g, &mut z, (s, 1, h_dim), 0.0)?;
                add_rows(dev, h, &y, Some(&z), s, h_dim)
            }
        }
    }
}

/// `f(call, rows)` per sequence of the host rows `x` (sequences of `keys.window` rows, call
/// `keys.first_call + q`), stacked: the host parts of a batched forward key their noise per
/// sequence as the device parts do.
fn per_sequence(
    keys: SequenceKeys,
    x: ArrayView2<'_, f32>,
    mut f: impl FnMut(u32, ArrayView2<'_, f32>) -> Result<Array2<f32>>,
) -> Result<Array2<f32>> {
    let parts = (0..x.nrows())
        .step_by(keys.window)
        .enumerate()
        .map(|(q, r0)| {
            let r1 = (r0 + keys.window).min(x.nrows());
            f(keys.first_call + q as u32, x.slice(ndarray::s![r0..r1, ..]))
        })
        .collect::<Result<Vec<_>>>()?;
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    Ok(ndarray::concatenate(ndarray::Axis(0), &views)?)
}

/// Experts per token when `router` routes on the device (a fixed-k rule; group limits of at
/// most 64 groups), else `None`.
fn device_top_k(router: &RouterKind, rule: &RouterRule, n_experts: usize) -> Option<usize> {
    let k = match *router {
        RouterKind::CheckpointDefault => {
            if rule.group_limit.is_some_and(|g| {
                g.n_group > 64 || g.n_group == 0 || !n_experts.is_multiple_of(g.n_group)
            }) {
                return None;
            }
            rule.top_k
        }
        RouterKind::SoftmaxTopK { k, .. } | RouterKind::SigmoidTopK { k } => k.min(n_experts),
        RouterKind::Relu | RouterKind::AdaptiveK { .. } => return None,
    };
    (k > 0 && k <= n_experts).then_some(k)
}

/// `[T·k]` (expert, weight) pairs of the router logits `[T, E]` on the device, in `(token,
/// slot)` order: [`RouterKind::route`] for the rules [`device_top_k`] accepts.
pub fn route_top_k(
    dev: &CudaDevice,
    logits: &CudaSlice<f32>,
    tokens: usize,
    n_experts: usize,
    k: usize,
    router: &RouterKind,
    rule: &RouterRule,
) -> CudaResult<(CudaSlice<u32>, CudaSlice<f32>)> {
    let (sigmoid, renormalize, group) = match *router {
        RouterKind::CheckpointDefault => (false, rule.renormalize, rule.group_limit),
        RouterKind::SoftmaxTopK { renormalize, .. } => (false, renormalize, None),
        RouterKind::SigmoidTopK { .. } => (true, false, None),
        RouterKind::Relu | RouterKind::AdaptiveK { .. } => {
            return Err(CudaError::Unsupported(format!(
                "router {router:?} gives tokens different numbers of experts; it routes on the CPU"
            )))
        }
    };
    if logits.len() < tokens * n_experts || device_top_k(router, rule, n_experts) != Some(k) {
        return Err(CudaError::Unsupported(format!(
            "device routing: {} logits for {tokens}×{n_experts}, k = {k}",
            logits.len()
        )));
    }
    let mut scores = dev.scratch::<f32>(tokens * n_experts)?;
    let mut eop = dev.scratch::<u32>(tokens * k)?;
    let mut wop = dev.scratch::<f32>(tokens * k)?;
    let f = dev.function(&MODEL_CU, &[], "route_topk")?;
    let (t32, e32, k32) = (tokens as u32, n_experts as u32, k as u32);
    let (n_group, topk_group) =
        group.map_or((1u32, 1u32), |g| (g.n_group as u32, g.topk_group as u32));
    let (sig, renorm) = (u32::from(sigmoid), u32::from(renormalize));
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(128).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    dev.launch(&f, "route_topk", cfg, |b| {
        b.arg(logits)
            .arg(&mut scores)
            .arg(&t32)
            .arg(&e32)
            .arg(&k32)
            .arg(&sig)
            .arg(&n_group)
            .arg(&topk_group)
            .arg(&renorm)
            .arg(&rule.scaling)
            .arg(&mut eop)
            .arg(&mut wop);
    })?;
    Ok((eop, wop))
}

/// The experts of an analog pass when the feed-forward `slot` of layer `l` has an analog matrix
/// (run through their CPU crossbars); `None` when it runs on its digital weights.
fn analog_here<'p, 'a, 'm>(
    pass: &Pass<'p, 'a, 'm>,
    l: usize,
    slot: ExpertSlot,
) -> Option<&'p GpuExperts<'a, 'm>> {
    let Pass::Analog(experts, _) = *pass else {
        return None;
    };
    [Proj::Gate, Proj::Up, Proj::Down]
        .into_iter()
        .any(|proj| {
            experts
                .cpu()
                .matrix(MatrixId {
                    layer: l,
                    slot,
                    proj,
                })
                .is_some()
        })
        .then_some(experts)
}

/// What MoE layer `l` saw in a recording pass, copied to the host: its input rows `x`
/// (`[T, d]`), the (expert, weight) pairs in `(token, slot)` order (`[T·k]` each) and its
/// routed-expert output `y`.
fn seen_on_device(
    dev: &CudaDevice,
    l: usize,
    (x, expert_of_pair, weight_of_pair, y): (
        &CudaSlice<f32>,
        &CudaSlice<u32>,
        &CudaSlice<f32>,
        &CudaSlice<f32>,
    ),
    (s, k, d): (usize, usize, usize),
) -> CudaResult<RoutedIo> {
    let experts = dev.download(expert_of_pair)?;
    let weights = dev.download(weight_of_pair)?;
    let assignments = experts
        .iter()
        .zip(&weights)
        .enumerate()
        .map(|(i, (&expert, &weight))| Assignment {
            token: (i / k) as u32,
            expert,
            weight,
        })
        .collect();
    Ok(RoutedIo {
        layer: l,
        x: download_matrix(dev, x, s, d)?,
        assignments,
        y: download_matrix(dev, y, s, d)?,
    })
}

/// y = RMSNorm(x) per `width`-wide group (`x = None`: y in place).
fn rms_norm(
    dev: &CudaDevice,
    x: Option<&CudaSlice<f32>>,
    y: &mut CudaSlice<f32>,
    w: &CudaSlice<f32>,
    groups: usize,
    width: usize,
    eps: f32,
) -> CudaResult<()> {
    let f = dev.function(&MODEL_CU, &[], "rms_norm")?;
    let cfg = LaunchConfig {
        grid_dim: (groups.div_ceil(8).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (g, wd, null) = (groups as u64, width as u32, 0u64);
    dev.launch(&f, "rms_norm", cfg, |b| {
        match x {
            Some(x) => b.arg(x),
            None => b.arg(&null),
        };
        b.arg(y).arg(w).arg(&g).arg(&wd).arg(&eps);
    })
}

fn add_bias(
    dev: &CudaDevice,
    y: &mut CudaSlice<f32>,
    b: &CudaSlice<f32>,
    rows: usize,
    width: usize,
) -> CudaResult<()> {
    let f = dev.function(&MODEL_CU, &[], "add_bias")?;
    let (n, w) = ((rows * width) as u64, width as u32);
    dev.launch(&f, "add_bias", linear_launch(n), |a| {
        a.arg(y).arg(b).arg(&n).arg(&w);
    })
}

/// h += y (· σ(gate_logit) per row).
fn add_rows(
    dev: &CudaDevice,
    h: &mut CudaSlice<f32>,
    y: &CudaSlice<f32>,
    gate_logit: Option<&CudaSlice<f32>>,
    rows: usize,
    width: usize,
) -> CudaResult<()> {
    let f = dev.function(&MODEL_CU, &[], "add_rows")?;
    let (n, w) = ((rows * width) as u64, width as u32);
    let null = 0u64;
    dev.launch(&f, "add_rows", linear_launch(n), |a| {
        a.arg(h).arg(y);
        match gate_logit {
            Some(g) => a.arg(g),
            None => a.arg(&null),
        };
        a.arg(&n).arg(&w);
    })
}

/// h += a host matrix.
fn add_host(dev: &CudaDevice, h: &mut CudaSlice<f32>, a: ArrayView2<'_, f32>) -> CudaResult<()> {
    let (rows, width) = a.dim();
    let y = upload_matrix(dev, a)?;
    add_rows(dev, h, &y, None, rows, width)
}

fn download_matrix(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> CudaResult<Array2<f32>> {
    let v = dev.download(x)?;
    Ok(Array2::from_shape_vec((rows, cols), v[..rows * cols].to_vec()).expect("rows × cols"))
}
