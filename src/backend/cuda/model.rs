//! The whole forward pass of a model on the GPU: embedding, attention, norms, router products,
//! residual stream and LM head on the device (cuBLAS f32 GEMMs and `kernels/model.cu`), the
//! routed experts through the grouped analog kernels of [`GpuExperts`], and the per-position
//! metrics of an evaluation ([`GpuReference`]) without copying logits back.
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
use super::experts::GpuExperts;
use super::moe::allow_dynamic_shared;
use super::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::model::common::{Linear, RmsNorm, SwiGlu};
use crate::model::moe::{dispatch, swiglu};
use crate::model::rope::RopeTable;
use crate::model::{Attention, ExpertLinear, ExpertSlot, Ffn, MatrixId, Model, Proj, RouterKind};

/// Query rows per CTA and keys per shared tile of `causal_attention` (`ATT_ROWS`, `ATT_KEYS`
/// in `kernels/model.cu`), and the widest value head it takes (`ATT_DV_MAX`).
const ATT_ROWS: usize = 8;
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

/// Environment variable that makes [`GpuModel::forward`] synchronise after each stage and sum
/// the wall time per stage ([`GpuModel::stage_seconds`]), to see where a forward pass goes.
pub const PROFILE_ENV: &str = "AIMC_PROFILE_FORWARD";

/// Wall time per stage of the forward passes, when [`PROFILE_ENV`] is set.
#[derive(Default)]
struct StageClock {
    last: Option<std::time::Instant>,
    seconds: Vec<(&'static str, f64)>,
}

impl StageClock {
    /// Ends the running stage as `name` (after the device finished it).
    fn lap(&mut self, dev: &CudaDevice, name: &'static str) -> CudaResult<()> {
        let Some(last) = self.last else {
            return Ok(());
        };
        dev.synchronize()?;
        let now = std::time::Instant::now();
        let dt = (now - last).as_secs_f64();
        match self.seconds.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += dt,
            None => self.seconds.push((name, dt)),
        }
        self.last = Some(now);
        Ok(())
    }
}

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
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
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
            clock: std::env::var_os(PROFILE_ENV).map(|_| StageClock::default()),
        })
    }

    /// Seconds per forward stage so far, when [`PROFILE_ENV`] is set.
    pub fn stage_seconds(&self) -> Option<&[(&'static str, f64)]> {
        self.clock.as_ref().map(|c| c.seconds.as_slice())
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
        let dev = experts.device();
        dev.context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context: {e}"))?;
        let cfg = &self.model.config;
        let s = tokens.len();
        anyhow::ensure!(s > 0, "forward: empty sequence");
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            anyhow::bail!(
                "forward: token id {bad} is outside the vocabulary (vocab_size {})",
                cfg.vocab_size
            );
        }
        if let Some(w) = cfg.sliding_window.filter(|&w| s > w) {
            anyhow::bail!(
                "forward: a sequence of {s} tokens exceeds the checkpoint's sliding window ({w})"
            );
        }
        self.rope_for(dev, s)?;
        let mut clock = self.clock.take();
        if let Some(c) = clock.as_mut() {
            dev.synchronize()?;
            c.last = Some(std::time::Instant::now());
        }
        let mut lap = |name| match clock.as_mut() {
            Some(c) => c.lap(dev, name),
            None => Ok(()),
        };
        let h_dim = cfg.hidden_size;
        let call = experts.call(mvm_id);
        let ids = dev.upload(tokens)?;
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
                    self.attention(dev, a, &x, &mut h, s, (&rope.2, &rope.3, &rope.1))
                        .map_err(at)?;
                }
                None => {
                    let Attention::Mla(mla) = &self.model.layers[l].attention else {
                        unreachable!("only latent attention stays on the CPU")
                    };
                    let rope = &self.rope.as_ref().expect("rope_for ran").1;
                    let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                    #[allow(clippy::single_range_in_vec_init)]
                    let a = mla.forward(xh.view(), &[0..s], rope);
                    add_host(dev, &mut h, a.view()).map_err(at)?;
                }
            }
            lap("attention").map_err(at)?;
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
                    if is_digital(experts, l, slot) {
                        self.swiglu(dev, m, &x, s, h_dim, &mut h, None)
                            .map_err(at)?;
                    } else {
                        let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                        let y = swiglu(&call, l, slot, xh.view());
                        add_host(dev, &mut h, y.view()).map_err(at)?;
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
                    let logits = download_matrix(dev, &logits, s, e).map_err(at)?;
                    let assignments = router.route(logits.view(), &cfg.router);
                    lap("router").map_err(at)?;
                    match experts
                        .routed_on_device(l, &x, s, &assignments, e, mvm_id)
                        .map_err(at)?
                    {
                        Some(y) => add_rows(dev, &mut h, &y, None, s, h_dim).map_err(at)?,
                        None => {
                            let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                            let y = match call.routed_experts(l, xh.view(), &assignments, e)? {
                                Some(y) => y,
                                None => dispatch(l, xh.view(), &assignments, e, &call),
                            };
                            add_host(dev, &mut h, y.view()).map_err(at)?;
                        }
                    }
                    lap("routed experts").map_err(at)?;
                    if let Some((m, gate)) = shared {
                        let slot = ExpertSlot::Shared(0);
                        if is_digital(experts, l, slot) {
                            self.swiglu(dev, m, &x, s, h_dim, &mut h, gate.as_ref())
                                .map_err(at)?;
                        } else {
                            let xh = download_matrix(dev, &x, s, h_dim).map_err(at)?;
                            let mut y = swiglu(&call, l, slot, xh.view());
                            if let Some(g) = &self.shared_gate_host(l) {
                                for (mut row, xr) in y.rows_mut().into_iter().zip(xh.rows()) {
                                    let z = xr.dot(g);
                                    row *= 1.0 / (1.0 + (-z).exp());
                                }
                            }
                            add_host(dev, &mut h, y.view()).map_err(at)?;
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
        self.clock = clock;
        Ok(logits)
    }

    /// The host copy of the shared-expert gate of layer `l`, if it has one.
    fn shared_gate_host(&self, l: usize) -> Option<ndarray::Array1<f32>> {
        match &self.model.layers[l].ffn {
            Ffn::Moe(m) => m.shared.as_ref().and_then(|s| s.gate.clone()),
            Ffn::Dense(_) => None,
        }
    }

    /// h += o(attention(q, k, v)) for normalised rows `x` (StandardAttention::forward).
    fn attention(
        &self,
        dev: &CudaDevice,
        a: &GpuAttention,
        x: &CudaSlice<f32>,
        h: &mut CudaSlice<f32>,
        s: usize,
        (cos, sin, table): (&CudaSlice<f32>, &CudaSlice<f32>, &RopeTable),
    ) -> CudaResult<()> {
        let mut q = self.linear(dev, &a.q, x, s)?;
        let mut k = self.linear(dev, &a.k, x, s)?;
        let mut v = self.linear(dev, &a.v, x, s)?;
        if let Some((qn, kn)) = &a.qk_norm {
            let eps = self.model.config.rms_norm_eps;
            rms_norm(
                dev,
                None,
                &mut q,
                &qn.w,
                s * a.q.out / qn.width,
                qn.width,
                eps,
            )?;
            rms_norm(
                dev,
                None,
                &mut k,
                &kn.w,
                s * a.k.out / kn.width,
                kn.width,
                eps,
            )?;
        }
        if let Some(c) = a.clip_qkv {
            let f = dev.function(&MODEL_CU, &[], "clamp_abs")?;
            for m in [&mut q, &mut k, &mut v] {
                let n = m.len() as u64;
                dev.launch(&f, "clamp_abs", linear_launch(n), |b| {
                    b.arg(&mut *m).arg(&n).arg(&c);
                })?;
            }
        }
        let half = table.cos().ncols();
        let f = dev.function(&MODEL_CU, &[], "rope")?;
        for (m, heads) in [(&mut q, a.heads), (&mut k, a.kv_heads)] {
            let n = (s * heads * half) as u64;
            let (rows, heads, width, half, inter) = (
                s as u32,
                heads as u32,
                a.head_dim as u32,
                half as u32,
                u32::from(table.interleaved()),
            );
            dev.launch(&f, "rope", linear_launch(n), |b| {
                b.arg(&mut *m)
                    .arg(cos)
                    .arg(sin)
                    .arg(&rows)
                    .arg(&heads)
                    .arg(&width)
                    .arg(&half)
                    .arg(&inter);
            })?;
        }
        let d = a.head_dim;
        let mut out = dev.scratch::<f32>(s * a.heads * d)?;
        let shared = (ATT_KEYS * (d + 1) + ATT_KEYS * d + ATT_ROWS * d) * 4;
        let f = dev.function(&MODEL_CU, &[], "causal_attention")?;
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
            b.arg(&q)
                .arg(&k)
                .arg(&v)
                .arg(&mut out)
                .arg(&s32)
                .arg(&heads)
                .arg(&kv)
                .arg(&dq)
                .arg(&dq)
                .arg(&scale);
        })?;
        // h += out · Woᵀ (+ b)
        self.blas
            .sgemm_nt(dev, &out, &a.o.w, h, (s, a.o.out, a.o.inp), 1.0)?;
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

/// Whether every matrix of the feed-forward at (`l`, `slot`) is digital in `experts`.
fn is_digital(experts: &GpuExperts<'_, '_>, l: usize, slot: ExpertSlot) -> bool {
    [Proj::Gate, Proj::Up, Proj::Down].into_iter().all(|proj| {
        experts
            .cpu()
            .matrix(MatrixId {
                layer: l,
                slot,
                proj,
            })
            .is_none()
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

/// Sums over the scored positions of one or more sequences (as `eval::analog`'s).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PositionSums {
    /// Σ −log p(target).
    pub nll: f64,
    /// Positions whose argmax equals the digital one.
    pub agree: usize,
    /// Σ KL(digital ‖ this).
    pub kl: f64,
    /// Positions scored.
    pub positions: usize,
}

/// The digital reference of an evaluation on the device: per sequence the log-probabilities
/// `[n, V]` of its scored positions, their argmax and the target tokens.
pub struct GpuReference {
    seqs: Vec<ReferenceSeq>,
    vocab: usize,
}

/// One sequence of a [`GpuReference`].
struct ReferenceSeq {
    /// `[n, V]` digital log-probabilities.
    logp: CudaSlice<f32>,
    /// `[n]` digital argmax.
    argmax: CudaSlice<u32>,
    /// `[n]` next tokens.
    targets: CudaSlice<u32>,
    n: usize,
}

impl GpuReference {
    /// Uploads `(log-probabilities [n, V], argmax [n], targets [n])` per sequence.
    pub fn upload(
        dev: &CudaDevice,
        seqs: &[(ArrayView2<'_, f32>, &[usize], &[u32])],
    ) -> CudaResult<Self> {
        let vocab = seqs.first().map_or(0, |s| s.0.ncols());
        let need: usize = seqs.iter().map(|s| s.0.len() * 4).sum();
        let (free, total) = dev.memory_bytes()?;
        if need.saturating_add(total / 8) > free {
            return Err(CudaError::Unsupported(format!(
                "device memory: the digital reference log-probabilities need {:.2} GiB, {:.2} GiB are free",
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let seqs = seqs
            .iter()
            .map(|(logp, argmax, targets)| {
                let am: Vec<u32> = argmax.iter().map(|&a| a as u32).collect();
                Ok(ReferenceSeq {
                    logp: upload_matrix(dev, *logp)?,
                    argmax: dev.upload(&am)?,
                    targets: dev.upload(targets)?,
                    n: targets.len(),
                })
            })
            .collect::<CudaResult<Vec<_>>>()?;
        Ok(Self { seqs, vocab })
    }

    /// Metrics of sequence `k` for the device logits `[≥ n, V]` of its forward pass.
    pub fn compare(
        &self,
        dev: &CudaDevice,
        k: usize,
        logits: &CudaSlice<f32>,
    ) -> CudaResult<PositionSums> {
        let ReferenceSeq {
            logp,
            argmax,
            targets,
            n,
        } = &self.seqs[k];
        let n = *n;
        if n == 0 {
            return Ok(PositionSums::default());
        }
        let mut out = dev.scratch::<f64>(3 * n)?;
        let f = dev.function(&MODEL_CU, &[], "token_metrics")?;
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let vocab = self.vocab as u32;
        dev.launch(&f, "token_metrics", cfg, |b| {
            b.arg(logits)
                .arg(logp)
                .arg(argmax)
                .arg(targets)
                .arg(&vocab)
                .arg(&mut out);
        })?;
        let mut sums = PositionSums {
            positions: n,
            ..Default::default()
        };
        for row in dev.download(&out)?.chunks_exact(3) {
            sums.nll += row[0];
            sums.kl += row[1];
            sums.agree += usize::from(row[2] > 0.5);
        }
        Ok(sums)
    }
}
