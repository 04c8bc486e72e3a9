//! The routed experts of a whole model on the GPU: one grouped analog layer
//! ([`GpuMoeLayer`]) per MoE layer, built from the crossbars the CPU backend programmed and
//! drifted ([`AnalogExperts`]), so both backends run the same conductances with the same
//! Philox streams.
//!
//! The model calls [`ExpertLinear::routed_experts`] once per MoE layer; the adapter uploads the
//! layer input and the (token, expert, weight) pairs, sorts them on the GPU and runs the fused
//! gate/up → SwiGLU → down kernels, then copies the weighted sum back. Everything else of the
//! forward pass (attention, router, norms, shared experts, dense MLPs) stays on the CPU path.
//!
//! A layer stays on the CPU (listed in [`GpuExperts::cpu_layers`] with the reason) when some of
//! its routed experts are digital (heterogeneous mappings), when its crossbar blocks do not
//! fit the kernel tiles (output columns a multiple of [`super::moe::TILE_COLS`], crossbar rows
//! a multiple of [`super::moe::TILE_K`]), or when the device memory left would not hold its
//! weights plus a reserve for the activations ([`memory_plan`]): a model larger than the GPU
//! runs its first layers there and the rest on the CPU instead of failing with out-of-memory.
use std::collections::BTreeMap;
use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::CudaSlice;
use ndarray::{Array2, ArrayView2};

use cudarc::driver::PushKernelArg;

use super::compile::PROGRAM_CU;
use super::error::DriverContext;
use super::moe::{
    grouped_gemm, interleave_rows, quantize, route, GemmOutput, GemmPeriphery, GpuGroupedMatrix,
    GpuMoeLayer, GroupedMatrix, Precision,
};
use super::program::PcmParams;
use super::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::backend::cpu::{AnalogCall, AnalogExperts};
use crate::device::PcmLike;
use crate::model::{Assignment, ExpertLinear, ExpertSlot, MatrixId, Proj};
use crate::tile::{
    AnalogMatrix, Crossbar, DriftCompensation, PeripherySpec, TilePreset, GDC_MIN_READOUT,
    GDC_READOUT_MVM_ID,
};

/// Device memory kept free for the activations of the grouped layers (routing, DAC codes,
/// hidden rows, outputs) and the cuBLAS/NVRTC workspaces: the larger of 1 GiB and 1/16 of the
/// device.
pub fn activation_reserve_bytes(total: usize) -> usize {
    (1usize << 30).max(total / 16)
}

/// Device bytes a layer with grouped matrices of (resident, transient) bytes `gate_up` and
/// `down` needs while it uploads: both resident parts plus the larger transient f32 staging
/// copy (uploads run one matrix at a time).
pub fn layer_need_bytes(gate_up: (usize, usize), down: (usize, usize)) -> usize {
    gate_up.0 + down.0 + gate_up.1.max(down.1)
}

/// Whether a layer with grouped matrices of (resident, transient) device bytes `gate_up` and
/// `down` fits in `free` of `total` bytes, keeping [`activation_reserve_bytes`] free: the
/// resident bytes of both plus the larger transient f32 staging copy (uploads run one matrix
/// at a time). The error names both sizes.
pub fn memory_plan(
    gate_up: (usize, usize),
    down: (usize, usize),
    free: usize,
    total: usize,
) -> Result<(), String> {
    let need = layer_need_bytes(gate_up, down);
    let reserve = activation_reserve_bytes(total);
    if need.saturating_add(reserve) <= free {
        return Ok(());
    }
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    Err(format!(
        "device memory: the layer needs {:.2} GiB ({:.2} GiB resident) and {:.2} GiB stay reserved for \
         activations, {:.2} of {:.2} GiB are free",
        gib(need),
        gib(gate_up.0 + down.0),
        gib(reserve),
        gib(free),
        gib(total)
    ))
}

/// Every MoE layer whose routed experts are all analog, as grouped GPU layers.
pub struct GpuExperts<'a, 'm> {
    dev: &'a CudaDevice,
    cpu: &'a AnalogExperts<'m>,
    layers: BTreeMap<usize, GpuMoeLayer>,
    cpu_layers: Vec<(usize, String)>,
    /// One layer at a time on the device's single stream (the CPU side runs sequences in
    /// parallel; their GPU layers queue here).
    lock: Mutex<()>,
    /// Programmed state of every layer, when the GPU drifts them itself ([`GpuExperts::program`]).
    drift: Option<GpuDrift>,
    /// Operand format of the layers.
    precision: Precision,
    periphery: Option<GemmPeriphery>,
}

impl<'a, 'm> GpuExperts<'a, 'm> {
    /// Uploads the routed experts of every MoE layer of `cpu` (programmed and drifted) in the
    /// operand format of `precision`, with the kernel form of `periphery`.
    pub fn upload(
        dev: &'a CudaDevice,
        cpu: &'a AnalogExperts<'m>,
        periphery: &PeripherySpec,
        precision: Precision,
    ) -> CudaResult<Self> {
        let gemm = GemmPeriphery::from_spec(periphery)?;
        let cfg = &cpu.model().config;
        let mut layers = BTreeMap::new();
        let mut cpu_layers = Vec::new();
        // Free memory is read once and the resident bytes of each uploaded layer subtracted:
        // the driver's figure lags the stream-ordered frees and reuses of the memory pool.
        let (free_at_start, total) = dev.memory_bytes()?;
        let mut resident = 0usize;
        for l in (0..cfg.num_layers).filter(|&l| cfg.moe_layers[l]) {
            let proj = |proj| routed_matrices(cpu, l, proj).ok();
            let (Some(gate), Some(up), Some(down)) =
                (proj(Proj::Gate), proj(Proj::Up), proj(Proj::Down))
            else {
                cpu_layers.push((l, "some of its routed experts are digital".to_string()));
                continue;
            };
            let built = (|| -> CudaResult<GpuMoeLayer> {
                let gate_up = GroupedMatrix::interleave_swiglu(
                    &GroupedMatrix::from_analog(&gate)?,
                    &GroupedMatrix::from_analog(&up)?,
                )?;
                let down = GroupedMatrix::from_analog(&down)?;
                let (gu_bytes, down_bytes) = (
                    GpuGroupedMatrix::device_bytes(&gate_up, precision),
                    GpuGroupedMatrix::device_bytes(&down, precision),
                );
                memory_plan(
                    gu_bytes,
                    down_bytes,
                    free_at_start.saturating_sub(resident),
                    total,
                )
                .map_err(CudaError::Unsupported)?;
                resident += gu_bytes.0 + down_bytes.0;
                Ok(GpuMoeLayer {
                    gate_up: GpuGroupedMatrix::upload(dev, &gate_up, precision)?,
                    down: GpuGroupedMatrix::upload(dev, &down, precision)?,
                    periphery: Some(gemm),
                    seed: cpu.seed(),
                })
            })();
            match built {
                Ok(layer) => {
                    layers.insert(l, layer);
                }
                Err(CudaError::Unsupported(why)) => cpu_layers.push((l, why)),
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            dev,
            cpu,
            layers,
            cpu_layers,
            lock: Mutex::new(()),
            drift: None,
            precision,
            periphery: Some(gemm),
        })
    }

    /// Uploads the programmed state (programmed weights W̃_prog, drift exponents ν, conductance
    /// scales, GDC references) of every MoE layer of `cpu`, freshly programmed with the PCM-family
    /// `device`, so that [`GpuExperts::drift_to`] drifts them on the GPU: drift and read noise by
    /// `kernels/program.cu` with the CPU's Philox keys, the GDC readout as the noisy identity
    /// forward through the grouped kernel. The CPU crossbars stay at their programmed state.
    ///
    /// `cpu` must have been programmed with `preset` and its own device.
    ///
    /// `Unsupported` when any analog matrix of `cpu` is not a routed expert of a MoE layer
    /// whose experts are all analog (shared experts, dense MLPs, heterogeneous layers), when the
    /// device is not PCM-like, or when the programmed state does not fit in device memory: the
    /// caller then drifts on the CPU and uploads with [`GpuExperts::upload`].
    pub fn program(
        dev: &'a CudaDevice,
        cpu: &'a AnalogExperts<'m>,
        preset: &TilePreset,
        precision: Precision,
    ) -> CudaResult<Self> {
        let gemm = GemmPeriphery::from_spec(&preset.periphery)?;
        let pcm = preset.device.pcm_like().ok_or_else(|| {
            CudaError::Unsupported(format!(
                "device kind {:?}: GPU drift supports the PCM family only",
                preset.device.kind
            ))
        })?;
        let params = PcmParams::new(&pcm)?;
        let cfg = &cpu.model().config;
        let moe: Vec<usize> = (0..cfg.num_layers).filter(|&l| cfg.moe_layers[l]).collect();
        let routed = moe.len() * cfg.num_experts * 3;
        if cpu.len() != routed {
            return Err(CudaError::Unsupported(format!(
                "GPU drift needs exactly the routed experts analog ({routed} matrices), the mapping has {}",
                cpu.len()
            )));
        }
        let (free, total) = dev.memory_bytes()?;
        let mut need = 0usize;
        let mut sources = BTreeMap::new();
        for &l in &moe {
            let proj = |proj| {
                routed_matrices(cpu, l, proj).map_err(|e| {
                    CudaError::Unsupported(format!("layer {l}: expert {e} is digital"))
                })
            };
            let (gate, up, down) = (proj(Proj::Gate)?, proj(Proj::Up)?, proj(Proj::Down)?);
            if gate.iter().chain(&up).chain(&down).any(|m| {
                m.blocks()
                    .iter()
                    .any(|b| b.t_seconds().is_some() || b.drift_exponents().len() != 2)
            }) {
                return Err(CudaError::Unsupported(
                    "GPU drift starts from freshly programmed differential-pair crossbars".into(),
                ));
            }
            // Programmed state (3 f32 per weight) stays; the operands (4 B), the drifted f32
            // weights, their per-crossbar copy and its operands (12 B) exist while drifting.
            let elems = cfg.num_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size;
            need += 12 * elems + 4 * elems;
            if need + 12 * elems + activation_reserve_bytes(total) > free {
                return Err(CudaError::Unsupported(format!(
                    "device memory: the programmed state of {} MoE layers needs more than the {:.2} GiB free",
                    sources.len() + 1,
                    free as f64 / (1u64 << 30) as f64
                )));
            }
            let gate_up = DriftSource::interleaved(dev, &gate, &up)?;
            let down = DriftSource::new(dev, &down)?;
            sources.insert(l, (gate_up, down));
        }
        Ok(Self {
            dev,
            cpu,
            layers: BTreeMap::new(),
            cpu_layers: Vec::new(),
            lock: Mutex::new(()),
            drift: Some(GpuDrift {
                pcm,
                params,
                compensation: preset.drift_compensation,
                sources,
            }),
            precision,
            periphery: Some(gemm),
        })
    }

    /// Drifts every layer to `t_seconds` after programming on the GPU and rebuilds its
    /// operands and digital scales s_map·α_GDC (layers built by [`GpuExperts::program`]).
    pub fn drift_to(&mut self, t_seconds: f64) -> CudaResult<()> {
        let Some(drift) = &self.drift else {
            return Err(CudaError::Unsupported(
                "these GPU experts were uploaded drifted; drift the CPU crossbars and upload again"
                    .into(),
            ));
        };
        if !(t_seconds.is_finite() && t_seconds >= 0.0) {
            return Err(CudaError::Unsupported(format!(
                "drift time must be finite and ≥ 0 s, got {t_seconds}"
            )));
        }
        let (dev, seed) = (self.dev, self.cpu.seed());
        let periphery = self.periphery.as_ref();
        let mut layers = BTreeMap::new();
        for (&l, (gate_up, down)) in &drift.sources {
            let build = |src: &DriftSource| {
                src.drifted(dev, drift, t_seconds, seed, periphery, self.precision)
            };
            let layer = GpuMoeLayer {
                gate_up: build(gate_up)?,
                down: build(down)?,
                periphery: self.periphery,
                seed,
            };
            layers.insert(l, layer);
        }
        self.layers = layers;
        Ok(())
    }

    /// The grouped layer of MoE layer `l`, if it runs on the GPU.
    pub fn layer(&self, l: usize) -> Option<&GpuMoeLayer> {
        self.layers.get(&l)
    }

    /// MoE layers whose routed experts run on the GPU.
    pub fn gpu_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers.keys().copied()
    }

    /// MoE layers left on the CPU, with the reason.
    pub fn cpu_layers(&self) -> &[(usize, String)] {
        &self.cpu_layers
    }

    /// A view that runs MVMs with the per-MVM noise of call `mvm_id` (the id
    /// [`AnalogExperts::call`] takes, so both backends draw the same output noise).
    pub fn call(&self, mvm_id: u32) -> GpuCall<'_, 'a, 'm> {
        GpuCall {
            experts: self,
            cpu: self.cpu.call(mvm_id),
            mvm_id,
        }
    }

    /// The CPU backend these layers were built from (programmed and drifted crossbars, and the
    /// digital weights of every matrix that is not analog).
    pub fn cpu(&self) -> &'a AnalogExperts<'m> {
        self.cpu
    }

    /// The device the layers live on.
    pub fn device(&self) -> &'a CudaDevice {
        self.dev
    }

    /// The routed experts of MoE layer `layer` applied to the device rows `x` (`[n_tokens, d]`):
    /// `Σ w · expert_e(x[t])` over `assignments`, or `None` when the layer stays on the CPU or
    /// the routing does not give every token the same number of experts.
    pub fn routed_on_device(
        &self,
        layer: usize,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        assignments: &[Assignment],
        n_experts: usize,
        mvm_id: u32,
    ) -> CudaResult<Option<CudaSlice<f32>>> {
        let Some(gpu_layer) = self.layers.get(&layer) else {
            return Ok(None);
        };
        let Some(k) = uniform_top_k(assignments, n_tokens, n_experts) else {
            return self.stale_cpu().map(|()| None);
        };
        self.run_device(gpu_layer, x, n_tokens, assignments, k, n_experts, mvm_id)
            .map(Some)
    }

    /// An error when the CPU crossbars were not drifted with the GPU layers
    /// ([`GpuExperts::program`]): a product that would fall back to them would run the
    /// programmed state instead of the drifted one.
    fn stale_cpu(&self) -> CudaResult<()> {
        match self.drift {
            None => Ok(()),
            Some(_) => Err(CudaError::Unsupported(
                "a routing with a varying number of experts per token runs on the CPU crossbars, \
                 which GpuExperts::program leaves undrifted; drift on the CPU and use GpuExperts::upload"
                    .into(),
            )),
        }
    }

    /// One grouped layer on device rows: sort the pairs by expert, gate/up → SwiGLU → down.
    #[allow(clippy::too_many_arguments)]
    fn run_device(
        &self,
        layer: &GpuMoeLayer,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        assignments: &[Assignment],
        top_k: usize,
        n_experts: usize,
        mvm_id: u32,
    ) -> CudaResult<CudaSlice<f32>> {
        let dev = self.dev;
        let experts: Vec<u32> = assignments.iter().map(|a| a.expert).collect();
        let weights: Vec<f32> = assignments.iter().map(|a| a.weight).collect();
        let routing = route(
            dev,
            &dev.upload(&experts)?,
            &dev.upload(&weights)?,
            n_tokens,
            top_k,
            n_experts,
        )?;
        layer.forward(dev, x, &routing, mvm_id)
    }

    /// One grouped layer from host rows: upload, [`GpuExperts::run_device`], copy back.
    fn run(
        &self,
        layer: &GpuMoeLayer,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        top_k: usize,
        n_experts: usize,
        mvm_id: u32,
    ) -> CudaResult<Array2<f32>> {
        let _queue = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let dev = self.dev;
        dev.context()
            .bind_to_thread()
            .while_(|| "binding the CUDA context to a worker thread".into())?;
        let (t, d) = x.dim();
        let x = x.as_standard_layout();
        let x_dev = dev.upload(x.as_slice().expect("standard layout"))?;
        let y = self.run_device(layer, &x_dev, t, assignments, top_k, n_experts, mvm_id)?;
        let host = dev.download(&y)?;
        Ok(Array2::from_shape_vec((t, d), host).expect("kernel output is [T, d]"))
    }
}

/// Projection `proj` of every routed expert of MoE layer `l`, or the first expert for which
/// it is digital.
fn routed_matrices<'a>(
    cpu: &'a AnalogExperts<'_>,
    l: usize,
    proj: Proj,
) -> Result<Vec<&'a AnalogMatrix>, usize> {
    (0..cpu.model().config.num_experts)
        .map(|e| {
            cpu.matrix(MatrixId {
                layer: l,
                slot: ExpertSlot::Routed(e),
                proj,
            })
            .ok_or(e)
        })
        .collect()
}

/// The programmed state of every MoE layer on the device ([`GpuExperts::program`]).
struct GpuDrift {
    pcm: PcmLike,
    params: PcmParams,
    compensation: DriftCompensation,
    /// Per MoE layer: (interleaved gate/up, down).
    sources: BTreeMap<usize, (DriftSource, DriftSource)>,
}

/// One grouped matrix's programmed crossbars on the device, in the kernel layout `[E, N, K]`.
struct DriftSource {
    /// Kernel tables (column tensor ids, crossbar columns); `weights` empty, `col_scale` s_map.
    tables: GroupedMatrix,
    w_prog: CudaSlice<f32>,
    /// `[2, E·N·K]`: drift exponents of the two devices of each weight.
    nu: CudaSlice<f32>,
    /// `[E, KB, N]`: conductance scale (µS per normalised unit) of each column's crossbar.
    g_scale: CudaSlice<f32>,
    /// `[E, KB, N]`: GDC reference of each column (its crossbar's one value under `global`).
    gdc_ref: Vec<f32>,
    /// Device copies of `tables.col_tensor_id` and `tables.col_local`, read by `drift_grouped`.
    col_tensor_id: CudaSlice<u32>,
    col_local: CudaSlice<u32>,
}

/// `[E, KB, N]` table of `f(crossbar, local column)` over the experts' crossbars.
fn column_table(experts: &[&AnalogMatrix], f: impl Fn(&Crossbar, usize) -> f32) -> Vec<f32> {
    let (n, n_kb) = (experts[0].n_out(), experts[0].in_ranges().len());
    let mut t = vec![0.0; experts.len() * n_kb * n];
    for (e, mat) in experts.iter().enumerate() {
        for (g, block) in mat.geometry().iter().zip(mat.blocks()) {
            for (lc, c) in g.out_range.clone().enumerate() {
                t[(e * n_kb + g.in_block) * n + c] = f(block, lc);
            }
        }
    }
    t
}

fn gdc_reference_of(block: &Crossbar, lc: usize) -> f32 {
    match block.gdc_reference() {
        [] => 1.0,
        [r] => *r,
        r => r[lc],
    }
}

/// Host arrays of a [`DriftSource`] before upload.
struct DriftHost {
    /// Kernel tables with s_map as `col_scale`; `weights` empty.
    tables: GroupedMatrix,
    w_prog: Vec<f32>,
    nu0: Vec<f32>,
    nu1: Vec<f32>,
    g_scale: Vec<f32>,
    gdc_ref: Vec<f32>,
}

impl DriftHost {
    fn new(experts: &[&AnalogMatrix]) -> CudaResult<Self> {
        let mut tables = GroupedMatrix::from_blocks(experts, |b| b.programmed_weights())?;
        let w_prog = std::mem::take(&mut tables.weights);
        let nu0 = GroupedMatrix::from_blocks(experts, |b| b.drift_exponents()[0].view())?.weights;
        let nu1 = GroupedMatrix::from_blocks(experts, |b| b.drift_exponents()[1].view())?.weights;
        tables.col_scale = column_table(experts, |b, lc| b.map_scale()[lc]);
        Ok(Self {
            tables,
            w_prog,
            nu0,
            nu1,
            g_scale: column_table(experts, |b, _| b.conductance_scale_us()),
            gdc_ref: column_table(experts, gdc_reference_of),
        })
    }

    /// Gate and up interleaved as [`GroupedMatrix::interleave_swiglu`] lays them out.
    fn interleave(g: &Self, u: &Self) -> CudaResult<Self> {
        let t = &g.tables;
        let (e, n, k) = (t.n_experts, t.n_cols, t.k);
        let groups = e * (k / t.k_block);
        Ok(Self {
            tables: GroupedMatrix::interleave_swiglu(&g.tables, &u.tables)?,
            w_prog: interleave_rows(&g.w_prog, &u.w_prog, e, n, k),
            nu0: interleave_rows(&g.nu0, &u.nu0, e, n, k),
            nu1: interleave_rows(&g.nu1, &u.nu1, e, n, k),
            g_scale: interleave_rows(&g.g_scale, &u.g_scale, groups, n, 1),
            gdc_ref: interleave_rows(&g.gdc_ref, &u.gdc_ref, groups, n, 1),
        })
    }
}

impl DriftSource {
    fn upload(dev: &CudaDevice, mut h: DriftHost) -> CudaResult<Self> {
        let mut nu = std::mem::take(&mut h.nu0);
        nu.append(&mut h.nu1);
        Ok(Self {
            w_prog: dev.upload(&h.w_prog)?,
            nu: dev.upload(&nu)?,
            g_scale: dev.upload(&h.g_scale)?,
            gdc_ref: h.gdc_ref,
            col_tensor_id: dev.upload(&h.tables.col_tensor_id)?,
            col_local: dev.upload(&h.tables.col_local)?,
            tables: h.tables,
        })
    }

    fn new(dev: &CudaDevice, experts: &[&AnalogMatrix]) -> CudaResult<Self> {
        Self::upload(dev, DriftHost::new(experts)?)
    }

    fn interleaved(
        dev: &CudaDevice,
        gate: &[&AnalogMatrix],
        up: &[&AnalogMatrix],
    ) -> CudaResult<Self> {
        Self::upload(
            dev,
            DriftHost::interleave(&DriftHost::new(gate)?, &DriftHost::new(up)?)?,
        )
    }

    /// The matrix drifted to `t_seconds` in the operand format of `precision`, with s_map·α.
    fn drifted(
        &self,
        dev: &CudaDevice,
        drift: &GpuDrift,
        t_seconds: f64,
        seed: u64,
        periphery: Option<&GemmPeriphery>,
        precision: Precision,
    ) -> CudaResult<GpuGroupedMatrix> {
        let m = &self.tables;
        let (n, k, kb) = (m.n_cols, m.k, m.k_block);
        let len = m.n_experts * n * k;
        let mut w = dev.scratch::<f32>(len)?;
        let f = dev.function(&PROGRAM_CU, &[], "drift_grouped")?;
        let (len64, n32, k32, kb32) = (len as u64, n as u32, k as u32, kb as u32);
        let ratio = drift.pcm.drift_time_ratio(t_seconds);
        let time_factor = drift.pcm.read_noise_time_factor(t_seconds);
        dev.launch(&f, "drift_grouped", linear_launch(len64), |b| {
            b.arg(&self.w_prog)
                .arg(&self.nu)
                .arg(&mut w)
                .arg(&len64)
                .arg(&n32)
                .arg(&k32)
                .arg(&kb32)
                .arg(&self.col_tensor_id)
                .arg(&self.col_local)
                .arg(&self.g_scale)
                .arg(&seed)
                .arg(&ratio)
                .arg(&time_factor)
                .arg(&drift.params);
        })?;
        let alpha = match drift.compensation {
            DriftCompensation::None => None,
            c => Some(self.gdc_alpha(dev, &w, c, seed, periphery, precision)?),
        };
        let mut scaled = GroupedMatrix {
            weights: Vec::new(),
            ..m.clone()
        };
        if let Some(alpha) = alpha {
            for (s, a) in scaled.col_scale.iter_mut().zip(alpha) {
                *s *= a;
            }
        }
        GpuGroupedMatrix::from_device_weights(dev, &scaled, &w, precision)
    }

    /// α_GDC per (expert, K block, column) of the drifted weights `w`, as
    /// `tile::Crossbar::drift_to` computes it: ref / max(readout, GDC_MIN_READOUT), the readout
    /// being mean |Y| of the noisy identity forward through each crossbar (per column under
    /// `global_per_column`) or, under `global_exact`, mean |W̃|.
    fn gdc_alpha(
        &self,
        dev: &CudaDevice,
        w: &CudaSlice<f32>,
        compensation: DriftCompensation,
        seed: u64,
        periphery: Option<&GemmPeriphery>,
        precision: Precision,
    ) -> CudaResult<Vec<f32>> {
        let m = &self.tables;
        let (n, k, kb) = (m.n_cols, m.k, m.k_block);
        let groups = m.n_experts * (k / kb);
        let len = m.n_experts * n * k;
        // Each crossbar block along K as a matrix of its own: [E·KB, N, k_block].
        let mut wb = dev.scratch::<f32>(len)?;
        let f = dev.function(&PROGRAM_CU, &[], "regroup_blocks")?;
        let (len64, n32, k32, kb32) = (len as u64, n as u32, k as u32, kb as u32);
        dev.launch(&f, "regroup_blocks", linear_launch(len64), |b| {
            b.arg(w)
                .arg(&mut wb)
                .arg(&len64)
                .arg(&n32)
                .arg(&k32)
                .arg(&kb32);
        })?;
        // Σ_j |·| per (crossbar block, column) over its k_block rows: of W̃ (exact) or of Y.
        let (src, sg, sj, sc) = if compensation == DriftCompensation::GlobalExact {
            (wb, (n * kb) as u64, 1u64, kb as u64)
        } else {
            let readout = GroupedMatrix {
                n_experts: groups,
                n_cols: n,
                k: kb,
                k_block: kb,
                weights: Vec::new(),
                col_tensor_id: m.col_tensor_id.clone(),
                col_scale: vec![1.0; groups * n],
                col_local: m.col_local.clone(),
                col_block_cols: m.col_block_cols.clone(),
                col_xbar: m.col_xbar.clone(),
                n_xbar: m.n_xbar,
            };
            let gm = GpuGroupedMatrix::from_device_weights(dev, &readout, &wb, precision)?;
            let mut eye = vec![0.0f32; kb * kb];
            for j in 0..kb {
                eye[j * kb + j] = 1.0;
            }
            let eye = dev.upload(&eye)?;
            let xq = quantize(dev, &eye, kb, kb, kb, periphery)?;
            // Every identity row to every crossbar block, in row order within each.
            let experts: Vec<u32> = (0..kb * groups).map(|p| (p % groups) as u32).collect();
            let routing = route(
                dev,
                &dev.upload(&experts)?,
                &dev.upload(&vec![1.0f32; kb * groups])?,
                kb,
                groups,
                groups,
            )?;
            let mut y = dev.scratch::<f32>(kb * groups * n)?;
            grouped_gemm(
                dev,
                &gm,
                &xq,
                &routing,
                true,
                periphery,
                seed,
                GDC_READOUT_MVM_ID,
                GemmOutput::Store,
                &mut y,
            )?;
            // Block g's rows are g·k_block + j (sorted by block, identity rows in order).
            (y, (kb * n) as u64, n as u64, 1u64)
        };
        let mut sums = dev.scratch::<f64>(groups * n)?;
        let f = dev.function(&PROGRAM_CU, &[], "abs_column_sums")?;
        let (g32, rows) = (groups as u32, kb as u32);
        dev.launch(
            &f,
            "abs_column_sums",
            linear_launch((groups * n) as u64),
            |b| {
                b.arg(&src)
                    .arg(&mut sums)
                    .arg(&g32)
                    .arg(&rows)
                    .arg(&n32)
                    .arg(&sg)
                    .arg(&sj)
                    .arg(&sc);
            },
        )?;
        // Means in f64, rounded once to f32, and α in f32: as tile::Crossbar::drift_to.
        let sums = dev.download(&sums)?;
        let rows = kb as f64;
        let mut alpha = vec![1.0f32; groups * n];
        if compensation == DriftCompensation::GlobalPerColumn {
            for (i, a) in alpha.iter_mut().enumerate() {
                *a = self.gdc_ref[i] / ((sums[i] / rows) as f32).max(GDC_MIN_READOUT);
            }
        } else {
            // One value per crossbar: Σ over its columns, / (rows · columns).
            for g in 0..groups {
                let mut per_xbar = vec![0.0f64; m.n_xbar];
                for c in 0..n {
                    per_xbar[m.col_xbar[c] as usize] += sums[g * n + c];
                }
                for c in 0..n {
                    let mean =
                        per_xbar[m.col_xbar[c] as usize] / (rows * f64::from(m.col_block_cols[c]));
                    alpha[g * n + c] = self.gdc_ref[g * n + c] / (mean as f32).max(GDC_MIN_READOUT);
                }
            }
        }
        Ok(alpha)
    }
}

/// [`GpuExperts`] bound to one MVM call id; implements the model's [`ExpertLinear`].
pub struct GpuCall<'g, 'a, 'm> {
    experts: &'g GpuExperts<'a, 'm>,
    cpu: AnalogCall<'a, 'm>,
    mvm_id: u32,
}

/// `Some(k)` when `assignments` are exactly `k` per token in token order (what the GPU sort
/// takes: pair `p` belongs to token `p / k`), with every expert index below `n_experts`.
fn uniform_top_k(assignments: &[Assignment], n_tokens: usize, n_experts: usize) -> Option<usize> {
    if n_tokens == 0 || assignments.is_empty() || !assignments.len().is_multiple_of(n_tokens) {
        return None;
    }
    let k = assignments.len() / n_tokens;
    assignments
        .iter()
        .enumerate()
        .all(|(p, a)| a.token as usize == p / k && (a.expert as usize) < n_experts)
        .then_some(k)
}

impl ExpertLinear for GpuCall<'_, '_, '_> {
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
        self.cpu.linear(id, x)
    }

    fn routed_experts(
        &self,
        layer: usize,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        n_experts: usize,
    ) -> Result<Option<Array2<f32>>> {
        let Some(gpu_layer) = self.experts.layers.get(&layer) else {
            return Ok(None);
        };
        // Routers with a variable number of experts per token (relu, adaptive) take the
        // per-expert CPU path.
        let Some(k) = uniform_top_k(assignments, x.nrows(), n_experts) else {
            self.experts
                .stale_cpu()
                .map_err(|e| anyhow::anyhow!("MoE layer {layer}: {e}"))?;
            return Ok(None);
        };
        self.experts
            .run(gpu_layer, x, assignments, k, n_experts, self.mvm_id)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("MoE layer {layer} on the GPU: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(token: u32, expert: u32) -> Assignment {
        Assignment {
            token,
            expert,
            weight: 0.5,
        }
    }

    #[test]
    fn uniform_top_k_accepts_only_token_major_fixed_k() {
        assert_eq!(
            uniform_top_k(&[a(0, 1), a(0, 2), a(1, 0), a(1, 3)], 2, 4),
            Some(2)
        );
        // A token with 3 experts and one with 1 (adaptive routing).
        assert_eq!(
            uniform_top_k(&[a(0, 1), a(0, 2), a(0, 0), a(1, 3)], 2, 4),
            None
        );
        // Out of token order.
        assert_eq!(
            uniform_top_k(&[a(1, 1), a(1, 2), a(0, 0), a(0, 3)], 2, 4),
            None
        );
        // Expert index out of range.
        assert_eq!(uniform_top_k(&[a(0, 4), a(1, 0)], 2, 4), None);
        assert_eq!(uniform_top_k(&[], 2, 4), None);
        assert_eq!(uniform_top_k(&[a(0, 0)], 0, 4), None);
    }

    const GIB: usize = 1 << 30;

    #[test]
    fn device_bytes_count_operands_tables_and_the_f32_staging_copy() {
        let (e, n, k, k_block) = (2, 256, 1024, 512);
        let m = GroupedMatrix {
            n_experts: e,
            n_cols: n,
            k,
            k_block,
            weights: Vec::new(),
            col_tensor_id: vec![0; e * 2 * n],
            col_scale: vec![0.0; e * 2 * n],
            col_local: vec![0; n],
            col_block_cols: vec![0; n],
            col_xbar: vec![0; n],
            n_xbar: 1,
        };
        let elems = e * n * k;
        // Tables: [E, KB, N] u32 ids + f32 scales; [N] three u32 arrays.
        let tables = 8 * e * 2 * n + 12 * n;
        assert_eq!(
            GpuGroupedMatrix::device_bytes(&m, Precision::AnalogSplitF16),
            (4 * elems + tables, 4 * elems)
        );
        assert_eq!(
            GpuGroupedMatrix::device_bytes(&m, Precision::DigitalBf16),
            (2 * elems + tables, 4 * elems)
        );
    }

    #[test]
    fn memory_plan_keeps_the_activation_reserve_and_names_the_sizes() {
        let total = 80 * GIB;
        let reserve = activation_reserve_bytes(total);
        assert_eq!(reserve, 5 * GIB);
        assert_eq!(activation_reserve_bytes(8 * GIB), GIB);
        let (gate_up, down) = ((2 * GIB, 3 * GIB), (GIB, GIB + GIB / 2));
        // Resident 3 GiB plus the larger staging copy (3 GiB), plus the reserve.
        let need = 6 * GIB + reserve;
        assert_eq!(memory_plan(gate_up, down, need, total), Ok(()));
        let err = memory_plan(gate_up, down, need - 1, total).unwrap_err();
        assert!(
            err.contains("needs 6.00 GiB (3.00 GiB resident)")
                && err.contains("5.00 GiB stay reserved")
                && err.contains("of 80.00 GiB are free"),
            "{err}"
        );
        // Sizes near usize::MAX do not wrap into a false fit.
        assert!(memory_plan((usize::MAX / 2, 0), (usize::MAX / 2, 0), total, total).is_err());
    }
}
