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
//! [`GpuExperts::program`] instead programs and drifts the crossbars on the device from the
//! digital weights, keeping the programmed state resident or, for models whose state does not
//! fit, recomputing it per drift point, and for models whose digital weights do not fit
//! either, streaming those from the host per drift point ([`Residency`]).
//!
//! A layer stays on the CPU (listed in [`GpuExperts::cpu_layers`] with the reason) when some of
//! its routed experts are digital (heterogeneous mappings), when its crossbar blocks do not
//! fit the kernel tiles (output columns a multiple of [`super::gemm::TILE_COLS`], crossbar rows
//! a multiple of [`super::gemm::TILE_K`]), or when the device memory left would not hold its
//! weights plus a reserve for the activations ([`memory_plan`]): a model larger than the GPU
//! runs its first layers there and the rest on the CPU instead of failing with out-of-memory.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use cudarc::driver::CudaSlice;
use ndarray::{Array2, ArrayView2};

use cudarc::driver::PushKernelArg;

use super::blas::Blas;
use super::compile::{MODEL_CU, PROGRAM_CU};
use super::error::DriverContext;
use super::gemm::Precision;
use super::grouped::{interleave_rows, GpuColumnTables, GpuGroupedMatrix, GroupedMatrix};
use super::layer::GpuMoeLayer;
use super::periphery::{crossbar_readout, GemmPeriphery, IdentityReadout};
use super::profile::{laps, StageClock, StageTime};
use super::program::PcmParams;
use super::routing::route;
use super::{gib, linear_launch, row_launch, CudaDevice, CudaError, CudaResult};
use crate::backend::cpu::{AnalogCall, AnalogExperts};
use crate::device::PcmLike;
use crate::model::{Assignment, ExpertLinear, ExpertSlot, MatrixId, Model, Proj};
use crate::tile::{
    AnalogMatrix, Crossbar, DriftCompensation, PeripherySpec, TilePreset, GDC_MIN_READOUT,
    GDC_READOUT_MVM_ID, GDC_REFERENCE_MVM_ID,
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

/// How the per-MVM noise of a batch of rows is keyed: the rows are consecutive sequences of
/// `window` tokens (the last may be shorter), sequence q drawing the noise of call
/// `first_call + q`, as each would alone. One sequence: `window` ≥ the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceKeys {
    pub window: usize,
    pub first_call: u32,
}

impl SequenceKeys {
    /// The rows are one sequence, call `mvm_id`.
    pub fn single(mvm_id: u32) -> Self {
        Self {
            window: usize::MAX,
            first_call: mvm_id,
        }
    }
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
    /// Digital weights and programmed state of every layer, when the GPU programs and drifts
    /// them itself ([`GpuExperts::program`]).
    drift: Option<GpuDrift>,
    /// Operand format of the layers.
    precision: Precision,
    periphery: Option<GemmPeriphery>,
    /// Seed of the programmed state and of the per-MVM noise.
    seed: u64,
    /// Stage times of programming and drift ([`super::profile::PROFILE_ENV`]).
    clock: Option<StageClock>,
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
            seed: cpu.seed(),
            clock: None,
        })
    }

    /// The programmed state (programmed weights W̃_prog, drift exponents ν, conductance scales,
    /// GDC references) of every MoE layer of `cpu`, freshly programmed with the PCM-family
    /// `device`, on the GPU, so that [`GpuExperts::drift_to`] drifts them there: the crossbar
    /// layout and mapping scales come from `cpu`, the programmed state is computed again on the
    /// device from the digital weights with the CPU's Philox keys ([`GpuExperts::reprogram`]
    /// with `cpu`'s seed); drift and read noise by `kernels/program.cu`, the GDC readout as the
    /// noisy identity forward through the grouped kernel. The CPU crossbars stay at their
    /// programmed state.
    ///
    /// `cpu` must have been built with `preset` and its own device, programmed or only laid out
    /// ([`AnalogExperts::layout`]: the eval's path, which programs no CPU crossbar); its
    /// crossbars are never run.
    ///
    /// `Unsupported` when any analog matrix of `cpu` is not a routed expert of a MoE layer
    /// whose experts are all analog (shared experts, dense MLPs, heterogeneous layers), when the
    /// device is not PCM-like, or when the digital weights and operands do not fit in device
    /// memory even with the programmed state recomputed per drift point
    /// ([`Residency::choose`]): the caller then drifts on the CPU and uploads with
    /// [`GpuExperts::upload`].
    pub fn program(
        dev: &'a CudaDevice,
        cpu: &'a AnalogExperts<'m>,
        preset: &TilePreset,
        precision: Precision,
    ) -> CudaResult<Self> {
        Self::program_with(dev, cpu, preset, precision, None)
    }

    /// [`GpuExperts::program`] with the programmed state kept per `residency`, or (`None`)
    /// resident when it fits in device memory and recomputed per drift point otherwise
    /// ([`Residency::choose`]).
    pub fn program_with(
        dev: &'a CudaDevice,
        cpu: &'a AnalogExperts<'m>,
        preset: &TilePreset,
        precision: Precision,
        residency: Option<Residency>,
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
        let mut matrices = BTreeMap::new();
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
            matrices.insert(l, (gate, up, down));
        }
        // Weights per grouped matrix (interleaved gate/up, down) of each layer.
        let per_matrix = cfg.num_experts * cfg.moe_intermediate_size * cfg.hidden_size;
        let sizes = vec![[2 * per_matrix, per_matrix]; moe.len()];
        let (free, total) = dev.memory_bytes()?;
        let residency = match residency {
            Some(r) => r.fits(&sizes, free, total).map(|()| r),
            None => Residency::choose(&sizes, free, total),
        }
        .map_err(CudaError::Unsupported)?;
        let (model, g_max) = (cpu.model(), pcm.g_max_us);
        let streamed = residency == Residency::Streamed;
        let mut sources = BTreeMap::new();
        for (l, (gate, up, down)) in matrices {
            // Checks that gate and up have one layout (GroupedMatrix::interleave_swiglu).
            let gate_up = DriftHost::interleave(&DriftHost::new(&gate)?, &DriftHost::new(&up)?)?;
            let gate_up = DriftSource::upload(
                dev,
                model,
                gate_up,
                (l, SourceKind::GateUp),
                streamed,
                g_max,
            )?;
            let down = DriftHost::new(&down)?;
            let down =
                DriftSource::upload(dev, model, down, (l, SourceKind::Down), streamed, g_max)?;
            sources.insert(l, (gate_up, down));
        }
        let mut g = Self {
            dev,
            cpu,
            layers: BTreeMap::new(),
            cpu_layers: Vec::new(),
            lock: Mutex::new(()),
            drift: Some(GpuDrift {
                device: DeviceModel {
                    pcm,
                    params,
                    compensation: preset.drift_compensation,
                },
                residency,
                sources,
                readouts: ReadoutCache::default(),
            }),
            precision,
            periphery: Some(gemm),
            seed: cpu.seed(),
            clock: StageClock::from_env(),
        };
        g.reprogram(cpu.seed())?;
        Ok(g)
    }

    /// Programs every layer again under `seed`, on the device ([`GpuExperts::program`]'s
    /// layers; drift with [`GpuExperts::drift_to`] before running them): the state
    /// `AnalogExperts::program` would give for `seed`, without programming the CPU crossbars
    /// and uploading them. Under [`Residency::Transient`] it only records the seed: each drift
    /// point programs it again.
    pub fn reprogram(&mut self, seed: u64) -> CudaResult<()> {
        let (dev, precision) = (self.dev, self.precision);
        let Some(drift) = self.drift.as_mut() else {
            return Err(CudaError::Unsupported(
                "these GPU experts were uploaded programmed and drifted; program them with GpuExperts::program"
                    .into(),
            ));
        };
        self.layers.clear();
        let _pool = dev.retain_pool()?;
        let run = Run {
            dev,
            model: self.cpu.model(),
            device: &drift.device,
            readouts: &drift.readouts,
            periphery: self.periphery.as_ref(),
            precision,
            seed,
        };
        let mut lap = laps(&mut self.clock, dev)?;
        for (gate_up, down) in drift.sources.values_mut() {
            for src in [gate_up, down] {
                src.programmed = None;
                src.seed_scales = None;
                if drift.residency == Residency::Resident {
                    src.programmed = Some(src.program(run, &mut lap)?);
                }
            }
        }
        self.seed = seed;
        Ok(())
    }

    /// Where the programmed state lives (`None`: uploaded drifted, [`GpuExperts::upload`]).
    pub fn residency(&self) -> Option<Residency> {
        self.drift.as_ref().map(|d| d.residency)
    }

    /// Seed of the programmed state (the CPU crossbars' unless [`GpuExperts::reprogram`]ed).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Host copies of the programmed state of MoE layer `l` as `[gate/up, down]`: (W̃_prog,
    /// ν `[2, E·N·K]`, conductance scale and GDC reference per `[E, KB, N]`), for tests.
    #[allow(clippy::type_complexity)]
    pub fn programmed_state(
        &self,
        l: usize,
    ) -> CudaResult<Option<[(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>); 2]>> {
        let Some(drift) = self.drift.as_ref() else {
            return Ok(None);
        };
        let Some((gu, down)) = drift.sources.get(&l) else {
            return Ok(None);
        };
        let host = |s: &DriftSource| -> CudaResult<_> {
            let fresh;
            let p = match &s.programmed {
                Some(p) => p,
                None => {
                    let run = Run {
                        dev: self.dev,
                        model: self.cpu.model(),
                        device: &drift.device,
                        readouts: &drift.readouts,
                        periphery: self.periphery.as_ref(),
                        precision: self.precision,
                        seed: self.seed,
                    };
                    fresh = s.program(run, &mut |_| Ok(()))?;
                    &fresh
                }
            };
            Ok((
                self.dev.download(&p.weights.w_prog)?,
                self.dev.download(&p.weights.nu)?,
                self.dev.download(&p.scales.g_scale)?,
                p.scales.gdc_ref.clone(),
            ))
        };
        Ok(Some([host(gu)?, host(down)?]))
    }

    /// Drifts every layer to `t_seconds` after programming on the GPU and rebuilds its
    /// operands and digital scales s_map·α_GDC (layers built by [`GpuExperts::program`]).
    pub fn drift_to(&mut self, t_seconds: f64) -> CudaResult<()> {
        let Some(GpuDrift {
            device,
            sources,
            readouts,
            ..
        }) = self.drift.as_mut()
        else {
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
        let (dev, seed) = (self.dev, self.seed);
        let run = Run {
            dev,
            model: self.cpu.model(),
            device,
            readouts,
            periphery: self.periphery.as_ref(),
            precision: self.precision,
            seed,
        };
        // The previous point's operands go first: they are a resident share of the memory
        // plan, not a second copy.
        self.layers.clear();
        let _pool = dev.retain_pool()?;
        let mut lap = laps(&mut self.clock, dev)?;
        let mut layers = BTreeMap::new();
        for (&l, (gate_up, down)) in sources.iter_mut() {
            let layer = GpuMoeLayer {
                gate_up: gate_up.drifted(run, t_seconds, &mut lap)?,
                down: down.drifted(run, t_seconds, &mut lap)?,
                periphery: self.periphery,
                seed,
            };
            layers.insert(l, layer);
        }
        self.layers = layers;
        Ok(())
    }

    /// Wall time per stage of programming and drift so far, when [`super::profile::PROFILE_ENV`] is set.
    pub fn stage_seconds(&self) -> Option<&[StageTime]> {
        self.clock.as_ref().map(|c| c.stages())
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
    /// the routing does not give every token the same number of experts. The rows are
    /// sequences of `keys.window` tokens, sequence q drawing the noise of call
    /// `keys.first_call + q` ([`SequenceKeys`]).
    pub fn routed_on_device(
        &self,
        layer: usize,
        x: &CudaSlice<f32>,
        n_tokens: usize,
        assignments: &[Assignment],
        n_experts: usize,
        keys: SequenceKeys,
    ) -> CudaResult<Option<CudaSlice<f32>>> {
        if !self.layers.contains_key(&layer) {
            return Ok(None);
        }
        let Some(k) = uniform_top_k(assignments, n_tokens, n_experts) else {
            return self.stale_cpu().map(|()| None);
        };
        let (eop, wop) = self.upload_pairs(assignments)?;
        self.pairs_on_device(layer, x, &eop, &wop, (n_tokens, k, n_experts), keys)
    }

    /// Whether MoE layer `l`'s routed experts run digitally on the device
    /// ([`GpuExperts::digital_pairs_on_device`]): [`GpuExperts::program`]'s layers, from
    /// programming on (before the first [`GpuExperts::drift_to`] too), their digital weights
    /// resident or uploaded per use ([`Residency::Streamed`]).
    pub fn digital_on_device(&self, l: usize) -> bool {
        self.drift
            .as_ref()
            .is_some_and(|d| d.sources.contains_key(&l))
    }

    /// The routed experts of MoE layer `layer` with their digital f32 weights on the device rows
    /// `x` (`[n_tokens, d]`), `n_tokens·top_k` pairs given as for
    /// [`GpuExperts::pairs_on_device`]: `Σ w · expert_e(x[t])` as [`crate::model::moe::dispatch`]
    /// computes it with the model's weights. cuBLAS f32 GEMMs per expert over the
    /// expert-sorted pairs, SwiGLU, and each token's sum in expert order; `None` where the
    /// layer's digital weights are not there ([`GpuExperts::digital_on_device`]). Under
    /// [`Residency::Streamed`] each matrix is uploaded for its GEMMs and freed after.
    pub fn digital_pairs_on_device(
        &self,
        blas: &Blas,
        layer: usize,
        x: &CudaSlice<f32>,
        expert_of_pair: &CudaSlice<u32>,
        weight_of_pair: &CudaSlice<f32>,
        (n_tokens, top_k, n_experts): (usize, usize, usize),
    ) -> CudaResult<Option<CudaSlice<f32>>> {
        let Some((gate_up, down)) = self.drift.as_ref().and_then(|d| d.sources.get(&layer)) else {
            return Ok(None);
        };
        let (d, inter) = (gate_up.tables.k, down.tables.k);
        if top_k > COMBINE_MAX_K || gate_up.tables.n_experts != n_experts {
            return Err(CudaError::Unsupported(format!(
                "digital experts of layer {layer} on the GPU: {top_k} experts per token (at most \
                 {COMBINE_MAX_K}), {n_experts} experts routed to {} held",
                gate_up.tables.n_experts
            )));
        }
        let dev = self.dev;
        let routing = route(
            dev,
            expert_of_pair,
            weight_of_pair,
            n_tokens,
            top_k,
            n_experts,
        )?;
        let offsets = dev.download(&routing.offsets)?;
        let pairs = n_tokens * top_k;
        let experts = || {
            (0..n_experts)
                .map(|e| {
                    (
                        e,
                        offsets[e] as usize,
                        (offsets[e + 1] - offsets[e]) as usize,
                    )
                })
                .filter(|&(_, _, rows)| rows > 0)
        };
        // The token row of every sorted pair.
        let mut a = dev.scratch::<f32>(pairs * d)?;
        let f = dev.function(&MODEL_CU, &[], "embed_gather")?;
        let (p32, d32) = (pairs as u32, d as u32);
        dev.launch(&f, "embed_gather", linear_launch((pairs * d) as u64), |b| {
            b.arg(x)
                .arg(&routing.sorted_token)
                .arg(&mut a)
                .arg(&p32)
                .arg(&d32);
        })?;
        let model = self.cpu.model();
        let w = gate_up.digital(dev, model)?;
        let mut gu = dev.scratch::<f32>(pairs * 2 * inter)?;
        for (e, r0, rows) in experts() {
            blas.sgemm_nt_rows(
                dev,
                (&a, r0),
                (&*w, e * 2 * inter),
                (&mut gu, r0),
                (rows, 2 * inter, d),
                0.0,
            )?;
        }
        drop((a, w));
        let mut hidden = dev.scratch::<f32>(pairs * inter)?;
        let f = dev.function(&MODEL_CU, &[], "silu_mul_interleaved")?;
        let (rows64, i32_) = (pairs as u64, inter as u32);
        dev.launch(
            &f,
            "silu_mul_interleaved",
            linear_launch(rows64 * inter as u64),
            |b| {
                b.arg(&gu).arg(&mut hidden).arg(&rows64).arg(&i32_);
            },
        )?;
        drop(gu);
        let w = down.digital(dev, model)?;
        let mut y = dev.scratch::<f32>(pairs * d)?;
        for (e, r0, rows) in experts() {
            blas.sgemm_nt_rows(
                dev,
                (&hidden, r0),
                (&*w, e * d),
                (&mut y, r0),
                (rows, d, inter),
                0.0,
            )?;
        }
        drop((hidden, w));
        let pos_of_pair = routing.pos_of_pair(dev)?;
        let mut out = dev.scratch::<f32>(n_tokens * d)?;
        let f = dev.function(&MODEL_CU, &[], "combine_pairs")?;
        let (t32, k32) = (n_tokens as u32, top_k as u32);
        dev.launch(
            &f,
            "combine_pairs",
            linear_launch((n_tokens * d) as u64),
            |b| {
                b.arg(&y)
                    .arg(&pos_of_pair)
                    .arg(&routing.sorted_weight)
                    .arg(&mut out)
                    .arg(&t32)
                    .arg(&k32)
                    .arg(&d32);
            },
        )?;
        Ok(Some(out))
    }

    /// The `(expert, weight)` of each assignment on the device, in `assignments`' order.
    fn upload_pairs(
        &self,
        assignments: &[Assignment],
    ) -> CudaResult<(CudaSlice<u32>, CudaSlice<f32>)> {
        let experts: Vec<u32> = assignments.iter().map(|a| a.expert).collect();
        let weights: Vec<f32> = assignments.iter().map(|a| a.weight).collect();
        Ok((self.dev.upload(&experts)?, self.dev.upload(&weights)?))
    }

    /// [`GpuExperts::routed_on_device`] for `(expert, weight)` pairs already on the device in
    /// `(token, slot)` order (`[T·k]` each; `shape` = (T, k, E)), `None` when the layer stays
    /// on the CPU.
    pub fn pairs_on_device(
        &self,
        layer: usize,
        x: &CudaSlice<f32>,
        expert_of_pair: &CudaSlice<u32>,
        weight_of_pair: &CudaSlice<f32>,
        (n_tokens, top_k, n_experts): (usize, usize, usize),
        keys: SequenceKeys,
    ) -> CudaResult<Option<CudaSlice<f32>>> {
        let Some(gpu_layer) = self.layers.get(&layer) else {
            return Ok(None);
        };
        let dev = self.dev;
        let mut routing = route(
            dev,
            expert_of_pair,
            weight_of_pair,
            n_tokens,
            top_k,
            n_experts,
        )?;
        routing.key_sequences(dev, keys.window, keys.first_call)?;
        gpu_layer
            .forward(dev, x, &routing, keys.first_call)
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

    /// MoE layer `layer` on host rows ([`GpuExperts::pairs_on_device`] with one call
    /// `mvm_id`): upload, run, copy back; `None` when the layer stays on the CPU.
    fn run(
        &self,
        layer: usize,
        x: ArrayView2<'_, f32>,
        assignments: &[Assignment],
        (top_k, n_experts): (usize, usize),
        mvm_id: u32,
    ) -> CudaResult<Option<Array2<f32>>> {
        let _queue = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let dev = self.dev;
        dev.context()
            .bind_to_thread()
            .while_(|| "binding the CUDA context to a worker thread".into())?;
        let (t, d) = x.dim();
        let x = x.as_standard_layout();
        let x_dev = dev.upload(x.as_slice().expect("standard layout"))?;
        let (eop, wop) = self.upload_pairs(assignments)?;
        let keys = SequenceKeys::single(mvm_id);
        let Some(y) =
            self.pairs_on_device(layer, &x_dev, &eop, &wop, (t, top_k, n_experts), keys)?
        else {
            return Ok(None);
        };
        let host = dev.download(&y)?;
        Ok(Some(
            Array2::from_shape_vec((t, d), host).expect("kernel output is [T, d]"),
        ))
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

/// The programmed state of the CPU crossbars of MoE layer `l` in the layout of
/// [`GpuExperts::programmed_state`] (`[gate/up, down]`, each (W̃_prog, ν `[2, E·N·K]`,
/// conductance scale and GDC reference per `[E, KB, N]`)), to compare the GPU's programming
/// with; `None` when a routed expert of the layer is digital.
#[allow(clippy::type_complexity)]
pub fn cpu_programmed_state(
    cpu: &AnalogExperts<'_>,
    l: usize,
) -> CudaResult<Option<[(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>); 2]>> {
    let state = |experts: &[&AnalogMatrix]| -> CudaResult<_> {
        let grouped = |f: &dyn Fn(&Crossbar) -> ArrayView2<'_, f32>| -> CudaResult<Vec<f32>> {
            Ok(GroupedMatrix::from_blocks(experts, f)?.weights)
        };
        let mut nu = grouped(&|b| b.drift_exponents()[0].view())?;
        nu.extend(grouped(&|b| b.drift_exponents()[1].view())?);
        Ok((
            grouped(&|b| b.programmed_weights())?,
            nu,
            column_table(experts, |b, _| b.conductance_scale_us()),
            column_table(experts, gdc_reference_of),
        ))
    };
    let proj = |p| routed_matrices(cpu, l, p).ok();
    let (Some(gate), Some(up), Some(down)) = (proj(Proj::Gate), proj(Proj::Up), proj(Proj::Down))
    else {
        return Ok(None);
    };
    let (g, u) = (state(&gate)?, state(&up)?);
    let (e, n, k) = (gate.len(), gate[0].n_out(), gate[0].n_in());
    let groups = e * gate[0].in_ranges().len();
    let len = e * n * k;
    let nu = [
        interleave_rows(&g.1[..len], &u.1[..len], e, n, k),
        interleave_rows(&g.1[len..], &u.1[len..], e, n, k),
    ]
    .concat();
    let gate_up = (
        interleave_rows(&g.0, &u.0, e, n, k),
        nu,
        interleave_rows(&g.2, &u.2, groups, n, 1),
        interleave_rows(&g.3, &u.3, groups, n, 1),
    );
    Ok(Some([gate_up, state(&down)?]))
}

/// The programmed state of every MoE layer on the device ([`GpuExperts::program`]).
struct GpuDrift {
    device: DeviceModel,
    residency: Residency,
    /// Per MoE layer: (interleaved gate/up, down).
    sources: BTreeMap<usize, (DriftSource, DriftSource)>,
    readouts: ReadoutCache,
}

/// The inputs of the GDC readouts ([`IdentityReadout`]), one per crossbar shape (two per
/// model: gate/up and down), built at the first readout and reused at every drift point.
#[derive(Default)]
struct ReadoutCache(Mutex<Vec<Arc<IdentityReadout>>>);

impl ReadoutCache {
    fn for_matrix(
        &self,
        dev: &CudaDevice,
        m: &GpuGroupedMatrix,
    ) -> CudaResult<Arc<IdentityReadout>> {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cache.iter().find(|r| r.fits(m)) {
            return Ok(Arc::clone(r));
        }
        let r = Arc::new(IdentityReadout::for_matrix(dev, m)?);
        cache.push(Arc::clone(&r));
        Ok(r)
    }
}

/// The device physics programming and drift run with.
struct DeviceModel {
    pcm: PcmLike,
    params: PcmParams,
    compensation: DriftCompensation,
}

/// What one programming or drift of a [`DriftSource`] runs with.
#[derive(Clone, Copy)]
struct Run<'c> {
    dev: &'c CudaDevice,
    /// The model whose digital weights [`Residency::Streamed`] uploads per use.
    model: &'c Model,
    device: &'c DeviceModel,
    readouts: &'c ReadoutCache,
    /// The kernel periphery of the GDC readouts.
    periphery: Option<&'c GemmPeriphery>,
    precision: Precision,
    seed: u64,
}

/// Ends a profiled stage ([`StageClock::lap`]; a no-op unless profiling).
type Lap<'l> = &'l mut dyn FnMut(&'static str) -> CudaResult<()>;

/// Experts per token [`GpuExperts::digital_pairs_on_device`] sums (`COMBINE_MAX_K` in
/// `kernels/model.cu`).
const COMBINE_MAX_K: usize = 32;

/// One grouped matrix's crossbars on the device, in the kernel layout `[E, N, K]`: the
/// digital weights and tables programming starts from, and the programmed state when it stays
/// resident ([`Residency::Resident`]).
struct DriftSource {
    /// Kernel tables (column tensor ids, crossbar columns); `weights` empty, `col_scale` s_map.
    tables: GroupedMatrix,
    /// The programmed state under the current seed ([`Residency::Resident`]); `None` when it is
    /// programmed again at each drift point ([`Residency::Transient`]).
    programmed: Option<Programmed>,
    /// [`Residency::Transient`]: the current seed's scales and GDC reference, from its first
    /// drift point on (its later points skip the reference readout).
    seed_scales: Option<SeedScales>,
    /// `[E, KB, N]`: the CPU layout's GDC reference per column (the seed-independent one of
    /// `global_exact`; 1 under `none`); `global`/`global_per_column` take theirs from the
    /// programmed state.
    host_gdc_ref: Vec<f32>,
    /// Device copies of `tables`' column tables, read by the programming, drift and GDC
    /// kernels and shared with every drift point's operands.
    dev_tables: GpuColumnTables,
    /// The digital weights `[E, N, K]` (what programming targets), s_map per `[E, KB, N]` and
    /// the target conductance scale of each column's crossbar (seed-independent), for
    /// [`DriftSource::program`].
    w: DigitalWeights,
    s_map: Arc<CudaSlice<f32>>,
    g_target: CudaSlice<f32>,
}

/// The programmed state of one grouped matrix (what `tile::Crossbar::program` keeps).
struct Programmed {
    weights: ProgrammedWeights,
    scales: SeedScales,
}

/// The per-weight part of a programmed state (12 B per weight).
struct ProgrammedWeights {
    w_prog: CudaSlice<f32>,
    /// `[2, E·N·K]`: drift exponents of the two devices of each weight.
    nu: CudaSlice<f32>,
}

/// The per-column part of a programmed state: small, and a function of the seed alone, so the
/// transient residency keeps it between the drift points of a seed.
struct SeedScales {
    /// `[E, KB, N]`: conductance scale (µS per normalised unit) of each column's crossbar.
    g_scale: CudaSlice<f32>,
    /// `[E, KB, N]`: GDC reference of each column (its crossbar's one value under `global`).
    gdc_ref: Vec<f32>,
    /// The device copy of `gdc_ref`, for the α of each drift point.
    gdc_ref_dev: CudaSlice<f32>,
}

/// Where the programmed state and the digital weights of [`GpuExperts::program`]'s layers live
/// between drift points. All three run the same kernels with the same Philox keys, so the
/// drifted operands are bit-identical whichever is chosen; they trade device memory for
/// work per drift point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// W̃_prog and ν of every layer stay on the device (12 B per weight beside the digital
    /// weights and the operands): each seed is programmed once, each drift point only drifts.
    Resident,
    /// Each matrix is programmed again from the digital weights at each drift point and its
    /// programmed state freed after drifting: 8 B per weight stay (digital weights and
    /// operands), for models whose resident state does not fit.
    Transient,
    /// As `Transient`, and the digital weights stay in the model's host arrays: each
    /// programming uploads its matrix's (and the digital reference each layer's) and frees
    /// them after. Only the operands stay (4 B per weight), for models whose digital weights
    /// do not fit beside them (Qwen1.5-MoE-A2.7B and DeepSeek-V2-Lite size on an 80 GB GPU);
    /// each drift point moves every routed weight over the host link once.
    Streamed,
}

impl Residency {
    /// The residencies from the fastest to the leanest.
    pub const ALL: [Residency; 3] = [Self::Resident, Self::Transient, Self::Streamed];

    /// Device bytes per weight that stay for the whole sweep: split fp16 operands, under
    /// `Transient` and `Resident` the digital f32 weights, under `Resident` W̃_prog and ν.
    pub fn resident_bytes_per_weight(self) -> usize {
        match self {
            Self::Resident => 20,
            Self::Transient => 8,
            Self::Streamed => 4,
        }
    }

    /// Device bytes per weight of the matrix being drifted that exist only while it drifts:
    /// the drifted f32 weights and the GDC readout's f32 outputs (one per weight; the readout
    /// runs on the new operands, a resident share), and under `Transient` and `Streamed` the
    /// freshly programmed W̃_prog and ν. (Programming's reference readout holds W̃_prog's
    /// operands and outputs instead of the drifted weights: as many bytes. `Streamed`'s
    /// uploaded digital weights are freed once W̃_prog and ν exist: 16 B at most, and 8 B
    /// while gate and up are interleaved.)
    pub fn transient_bytes_per_weight(self) -> usize {
        match self {
            Self::Resident => 8,
            Self::Transient | Self::Streamed => 20,
        }
    }

    /// Device bytes this residency needs for `layers` (weights per grouped matrix of each
    /// layer) on a device of `total` bytes, [`activation_reserve_bytes`] included.
    pub fn need_bytes(self, layers: &[[usize; 2]], total: usize) -> usize {
        let all: usize = layers.iter().flatten().sum();
        let largest = layers.iter().flatten().copied().max().unwrap_or(0);
        all.saturating_mul(self.resident_bytes_per_weight())
            .saturating_add(largest.saturating_mul(self.transient_bytes_per_weight()))
            .saturating_add(activation_reserve_bytes(total))
    }

    /// Whether this residency fits `layers` in `free` of `total` device bytes; the error names
    /// the sizes.
    pub fn fits(self, layers: &[[usize; 2]], free: usize, total: usize) -> Result<(), String> {
        let need = self.need_bytes(layers, total);
        if need <= free {
            return Ok(());
        }
        let all: usize = layers.iter().flatten().sum();
        Err(format!(
            "device memory: programming {all} analog weights on the GPU with the {} residency \
             needs {:.2} GiB ({:.2} GiB reserved for activations included), {:.2} of {:.2} GiB \
             are free",
            self.name(),
            gib(need),
            gib(activation_reserve_bytes(total)),
            gib(free),
            gib(total)
        ))
    }

    /// The fastest residency that fits: the first of [`Residency::ALL`] (fastest to leanest)
    /// that fits `layers` in `free` of `total` device bytes beside
    /// [`activation_reserve_bytes`], else the error of the leanest (`Streamed`).
    pub fn choose(layers: &[[usize; 2]], free: usize, total: usize) -> Result<Self, String> {
        let mut last = String::new();
        for r in Self::ALL {
            match r.fits(layers, free, total) {
                Ok(()) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// `resident`, `transient` or `streamed`, as `--gpu-memory` names them.
    pub fn name(self) -> &'static str {
        match self {
            Self::Resident => "resident",
            Self::Transient => "transient",
            Self::Streamed => "streamed",
        }
    }
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

/// Host tables of a [`DriftSource`] before upload (the weights go to the device directly,
/// [`upload_matrices`]).
struct DriftHost {
    /// Kernel tables with s_map as `col_scale`; `weights` empty.
    tables: GroupedMatrix,
    /// `[E, KB, N]`: the CPU crossbars' GDC reference per column (the seed-independent one of
    /// `global_exact`; 1 under `none`; recomputed on the device otherwise).
    gdc_ref: Vec<f32>,
}

impl DriftHost {
    fn new(experts: &[&AnalogMatrix]) -> CudaResult<Self> {
        let mut tables = GroupedMatrix::tables(experts)?;
        tables.col_scale = column_table(experts, |b, lc| b.map_scale()[lc]);
        Ok(Self {
            tables,
            gdc_ref: column_table(experts, gdc_reference_of),
        })
    }

    /// Gate and up interleaved as [`GroupedMatrix::interleave_swiglu`] lays them out.
    fn interleave(g: &Self, u: &Self) -> CudaResult<Self> {
        let t = &g.tables;
        let groups = t.n_experts * (t.k / t.k_block);
        Ok(Self {
            tables: GroupedMatrix::interleave_swiglu(&g.tables, &u.tables)?,
            gdc_ref: interleave_rows(&g.gdc_ref, &u.gdc_ref, groups, t.n_cols, 1),
        })
    }
}

/// The matrices `weights` (each `[n, k]`) as one `[E, n, k]` device array, copied from the
/// model's arrays through the device's pinned staging buffers
/// ([`CudaDevice::upload_staged`]; no whole-matrix host copy: at OLMoE size a layer's gate/up
/// is 1 GB).
fn upload_matrices(
    dev: &CudaDevice,
    weights: &[ArrayView2<'_, f32>],
    (n, k): (usize, usize),
) -> CudaResult<CudaSlice<f32>> {
    if let Some(m) = weights.iter().find(|m| m.dim() != (n, k)) {
        return Err(CudaError::Unsupported(format!(
            "programming on the GPU: a {:?} weight matrix for crossbars of {n}×{k}",
            m.dim()
        )));
    }
    let standard: Vec<_> = weights.iter().map(|m| m.as_standard_layout()).collect();
    let parts: Vec<&[f32]> = standard
        .iter()
        .map(|m| m.as_slice().expect("standard layout"))
        .collect();
    let mut w = dev.scratch::<f32>(weights.len() * n * k)?;
    dev.upload_staged(&parts, &mut w, 0)?;
    Ok(w)
}

/// The digital matrices of projection `proj` of every routed expert of MoE layer `l`.
fn expert_weights(model: &Model, l: usize, proj: Proj) -> CudaResult<Vec<ArrayView2<'_, f32>>> {
    (0..model.config.num_experts)
        .map(|e| {
            model
                .matrix(MatrixId {
                    layer: l,
                    slot: ExpertSlot::Routed(e),
                    proj,
                })
                .ok_or_else(|| CudaError::Unsupported(format!("layer {l}: no routed expert {e}")))
        })
        .collect()
}

/// Which grouped matrix of a MoE layer's routed experts a [`DriftSource`] holds.
#[derive(Clone, Copy, Debug)]
enum SourceKind {
    /// Gate and up, interleaved in groups of 8 rows as the SwiGLU epilogue reads them.
    GateUp,
    Down,
}

/// The digital weights `[E, N, K]` of matrix `kind` of MoE layer `l` (N: the grouped
/// matrix's rows, gate/up interleaved on the device) uploaded from the model's host arrays.
fn upload_digital(
    dev: &CudaDevice,
    model: &Model,
    (l, kind): (usize, SourceKind),
    (n, k): (usize, usize),
) -> CudaResult<CudaSlice<f32>> {
    match kind {
        SourceKind::Down => upload_matrices(dev, &expert_weights(model, l, Proj::Down)?, (n, k)),
        SourceKind::GateUp => {
            let n = n / 2;
            let wg = upload_matrices(dev, &expert_weights(model, l, Proj::Gate)?, (n, k))?;
            let wu = upload_matrices(dev, &expert_weights(model, l, Proj::Up)?, (n, k))?;
            let len = 2 * wg.len();
            let mut w = dev.scratch::<f32>(len)?;
            let f = dev.function(&PROGRAM_CU, &[], "interleave_swiglu_rows")?;
            let (len64, n32, k32) = (len as u64, n as u32, k as u32);
            dev.launch(&f, "interleave_swiglu_rows", linear_launch(len64), |b| {
                b.arg(&wg)
                    .arg(&wu)
                    .arg(&mut w)
                    .arg(&len64)
                    .arg(&n32)
                    .arg(&k32);
            })?;
            Ok(w)
        }
    }
}

/// Where a [`DriftSource`]'s digital weights live between uses.
enum DigitalWeights {
    /// On the device for the whole sweep.
    Device(CudaSlice<f32>),
    /// In the model's host arrays, uploaded for each use and freed after it
    /// ([`Residency::Streamed`]): (MoE layer, matrix).
    Host(usize, SourceKind),
}

/// Digital weights for one use: the resident copy or a fresh upload.
enum Held<'a> {
    Resident(&'a CudaSlice<f32>),
    Uploaded(CudaSlice<f32>),
}

impl std::ops::Deref for Held<'_> {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        match self {
            Held::Resident(w) => w,
            Held::Uploaded(w) => w,
        }
    }
}

impl DriftSource {
    /// The tables of `h` and the digital weights of matrix `kind` of MoE layer `l` on the
    /// device, kept there unless `streamed` ([`Residency::Streamed`]: uploaded again for each
    /// use); the programmed state is left for [`DriftSource::program`] to compute.
    fn upload(
        dev: &CudaDevice,
        model: &Model,
        h: DriftHost,
        (l, kind): (usize, SourceKind),
        streamed: bool,
        g_max_us: f32,
    ) -> CudaResult<Self> {
        let w = upload_digital(dev, model, (l, kind), (h.tables.n_cols, h.tables.k))?;
        let mut src = Self {
            programmed: None,
            seed_scales: None,
            host_gdc_ref: h.gdc_ref,
            dev_tables: GpuColumnTables::upload(dev, &h.tables)?,
            w: DigitalWeights::Host(l, kind),
            s_map: Arc::new(dev.upload(&h.tables.col_scale)?),
            g_target: dev.zeros::<f32>(1)?,
            tables: h.tables,
        };
        // tile::Crossbar::program's g_scale_target: the scale of max |W / s_map| per crossbar.
        src.g_target = src.crossbar_scales(dev, &w, Some(&*src.s_map), g_max_us)?;
        if !streamed {
            src.w = DigitalWeights::Device(w);
        }
        Ok(src)
    }

    /// The digital weights `[E, N, K]` on the device for one use.
    fn digital(&self, dev: &CudaDevice, model: &Model) -> CudaResult<Held<'_>> {
        Ok(match &self.w {
            DigitalWeights::Device(w) => Held::Resident(w),
            &DigitalWeights::Host(l, kind) => Held::Uploaded(upload_digital(
                dev,
                model,
                (l, kind),
                (self.tables.n_cols, self.tables.k),
            )?),
        })
    }

    /// Per `[E, KB, N]` entry: WeightConverter::scale (differential pair) of the max |x / div|
    /// over the entry's crossbar (`div` per entry, or none).
    fn crossbar_scales(
        &self,
        dev: &CudaDevice,
        x: &CudaSlice<f32>,
        div: Option<&CudaSlice<f32>>,
        g_max_us: f32,
    ) -> CudaResult<CudaSlice<f32>> {
        let m = &self.tables;
        let (n, k, kb) = (m.n_cols, m.k, m.k_block);
        let (len, groups) = (m.n_experts * n * k, m.n_experts * (k / kb));
        if !kb.is_multiple_of(8) || x.len() != len {
            return Err(CudaError::Unsupported(format!(
                "crossbar maxima: crossbar rows {kb} must be a multiple of 8, {} weights for {len}",
                x.len()
            )));
        }
        let mut bits = dev.zeros::<u32>(groups * m.n_xbar)?;
        let f = dev.function(&PROGRAM_CU, &[], "crossbar_abs_max")?;
        let (n32, k32, kb32, nx32) = (n as u32, k as u32, kb as u32, m.n_xbar as u32);
        let null = 0u64;
        // 8 elements per thread.
        let cfg = row_launch(m.n_experts * n, k, 8)?;
        dev.launch(&f, "crossbar_abs_max", cfg, |b| {
            b.arg(x);
            match div {
                Some(d) => b.arg(d),
                None => b.arg(&null),
            };
            b.arg(&n32)
                .arg(&k32)
                .arg(&kb32)
                .arg(&*self.dev_tables.col_xbar)
                .arg(&nx32)
                .arg(&mut bits);
        })?;
        let entries = (groups * n) as u64;
        let mut scale = dev.scratch::<f32>(groups * n)?;
        let f = dev.function(&PROGRAM_CU, &[], "crossbar_scales")?;
        dev.launch(&f, "crossbar_scales", linear_launch(entries), |b| {
            b.arg(&bits)
                .arg(&entries)
                .arg(&n32)
                .arg(&*self.dev_tables.col_xbar)
                .arg(&nx32)
                .arg(&g_max_us)
                .arg(&mut scale);
        })?;
        Ok(scale)
    }

    /// The crossbars programmed under `seed` on the device, as `tile::Crossbar::program`
    /// programs them on the CPU: W̃_prog and ν from the digital weights (`program_grouped`),
    /// the conductance scale of W̃_prog per crossbar, and the GDC reference (the noisy identity
    /// readout of W̃_prog under `global`/`global_per_column`; `global_exact`'s mean |W/s_map|
    /// and `none` do not depend on the seed).
    fn program(&self, run: Run<'_>, lap: Lap<'_>) -> CudaResult<Programmed> {
        let weights = self.program_weights(run, lap)?;
        let scales = self.seed_scales(run, &weights, lap)?;
        Ok(Programmed { weights, scales })
    }

    /// W̃_prog and ν of [`DriftSource::program`].
    fn program_weights(&self, run: Run<'_>, lap: Lap<'_>) -> CudaResult<ProgrammedWeights> {
        let (dev, seed, drift) = (run.dev, run.seed, run.device);
        let m = &self.tables;
        let (n, k, kb) = (m.n_cols, m.k, m.k_block);
        let len = m.n_experts * n * k;
        // Uploaded first under Residency::Streamed, and freed (stream-ordered) on return.
        let w = self.digital(dev, run.model)?;
        let mut w_prog = dev.scratch::<f32>(len)?;
        let mut nu = dev.scratch::<f32>(2 * len)?;
        let f = dev.function(&PROGRAM_CU, &[], "program_grouped")?;
        let (len64, n32, k32, kb32) = (len as u64, n as u32, k as u32, kb as u32);
        dev.launch(
            &f,
            "program_grouped",
            row_launch(m.n_experts * n, k, 1)?,
            |b| {
                b.arg(&*w)
                    .arg(&*self.s_map)
                    .arg(&self.g_target)
                    .arg(&mut w_prog)
                    .arg(&mut nu)
                    .arg(&len64)
                    .arg(&n32)
                    .arg(&k32)
                    .arg(&kb32)
                    .arg(&*self.dev_tables.col_tensor_id)
                    .arg(&*self.dev_tables.col_local)
                    .arg(&seed)
                    .arg(&drift.params);
            },
        )?;
        lap("program: W̃_prog, ν")?;
        Ok(ProgrammedWeights { w_prog, nu })
    }

    /// The conductance scales and GDC reference of [`DriftSource::program`], from `weights`.
    fn seed_scales(
        &self,
        run: Run<'_>,
        weights: &ProgrammedWeights,
        lap: Lap<'_>,
    ) -> CudaResult<SeedScales> {
        let (dev, drift, w_prog) = (run.dev, run.device, &weights.w_prog);
        let g_scale = self.crossbar_scales(dev, w_prog, None, drift.pcm.g_max_us)?;
        lap("program: conductance scales")?;
        let (gdc_ref, gdc_ref_dev) = match drift.compensation {
            DriftCompensation::Global | DriftCompensation::GlobalPerColumn => {
                let r = self.gdc_means(run, w_prog, None, GDC_REFERENCE_MVM_ID, lap)?;
                lap("program: GDC reference means")?;
                (dev.download(&r)?, r)
            }
            _ => (self.host_gdc_ref.clone(), dev.upload(&self.host_gdc_ref)?),
        };
        Ok(SeedScales {
            g_scale,
            gdc_ref,
            gdc_ref_dev,
        })
    }

    /// The matrix drifted to `t_seconds` in the operand format of `precision`, with s_map·α.
    /// The programmed state is this source's resident one, else programmed under `seed` now
    /// and freed on return ([`Residency::Transient`]; the seed's scales are kept).
    fn drifted(
        &mut self,
        run: Run<'_>,
        t_seconds: f64,
        lap: Lap<'_>,
    ) -> CudaResult<GpuGroupedMatrix> {
        let (dev, seed, drift) = (run.dev, run.seed, run.device);
        let fresh;
        let (weights, scales) = if let Some(p) = &self.programmed {
            (&p.weights, &p.scales)
        } else {
            fresh = self.program_weights(run, lap)?;
            if self.seed_scales.is_none() {
                let s = self.seed_scales(run, &fresh, lap)?;
                self.seed_scales = Some(s);
            }
            (&fresh, self.seed_scales.as_ref().expect("computed above"))
        };
        let m = &self.tables;
        let (n, k, kb) = (m.n_cols, m.k, m.k_block);
        let len = m.n_experts * n * k;
        let mut w = dev.scratch::<f32>(len)?;
        let f = dev.function(&PROGRAM_CU, &[], "drift_grouped")?;
        let (len64, n32, k32, kb32) = (len as u64, n as u32, k as u32, kb as u32);
        let ratio = drift.pcm.drift_time_ratio(t_seconds);
        let time_factor = drift.pcm.read_noise_time_factor(t_seconds);
        dev.launch(
            &f,
            "drift_grouped",
            row_launch(m.n_experts * n, k, 1)?,
            |b| {
                b.arg(&weights.w_prog)
                    .arg(&weights.nu)
                    .arg(&mut w)
                    .arg(&len64)
                    .arg(&n32)
                    .arg(&k32)
                    .arg(&kb32)
                    .arg(&*self.dev_tables.col_tensor_id)
                    .arg(&*self.dev_tables.col_local)
                    .arg(&scales.g_scale)
                    .arg(&seed)
                    .arg(&ratio)
                    .arg(&time_factor)
                    .arg(&drift.params);
            },
        )?;
        lap("drift + read noise")?;
        // The operands first: the GDC readout runs through them, and α only scales the
        // digital outputs (s_map·α per column), not the weights.
        let mut operands = GpuGroupedMatrix::from_device_parts(
            dev,
            m,
            &w,
            run.precision,
            &self.dev_tables,
            Arc::clone(&self.s_map),
        )?;
        lap("operands")?;
        if drift.compensation != DriftCompensation::None {
            let now = self.gdc_means(run, &w, Some(&operands), GDC_READOUT_MVM_ID, lap)?;
            // s_map · α, α = reference / max(readout, GDC_MIN_READOUT), on the device.
            let len = now.len() as u64;
            let mut scaled = dev.scratch::<f32>(now.len())?;
            let f = dev.function(&PROGRAM_CU, &[], "gdc_scales")?;
            dev.launch(&f, "gdc_scales", linear_launch(len), |b| {
                b.arg(&now)
                    .arg(&scales.gdc_ref_dev)
                    .arg(&*self.s_map)
                    .arg(&mut scaled)
                    .arg(&len)
                    .arg(&GDC_MIN_READOUT);
            })?;
            operands.set_col_scale(scaled)?;
            lap("GDC readout: means, α")?;
        }
        Ok(operands)
    }

    /// The GDC readout per (expert, K block, column) of the weights `w`, as `tile::Crossbar`
    /// computes it (the reference at programming, the readout after drift): mean |Y| of the
    /// noisy identity forward of call `mvm_id` through each crossbar (per column under
    /// `global_per_column`, else one value per crossbar) or, under `global_exact`, mean |W̃|.
    /// The forward runs on `operands` (`w` in the run's operand format) when given, else on
    /// operands made from `w` here.
    fn gdc_means(
        &self,
        run: Run<'_>,
        w: &CudaSlice<f32>,
        operands: Option<&GpuGroupedMatrix>,
        mvm_id: u32,
        lap: Lap<'_>,
    ) -> CudaResult<CudaSlice<f32>> {
        let forward_stage = if mvm_id == GDC_REFERENCE_MVM_ID {
            "program: GDC reference identity forward"
        } else {
            "GDC readout: identity forward"
        };
        let (dev, seed, periphery) = (run.dev, run.seed, run.periphery);
        let compensation = run.device.compensation;
        let m = &self.tables;
        let (n, k, kb) = (m.n_cols, m.k, m.k_block);
        let n_kb = k / kb;
        let groups = m.n_experts * n_kb;
        // Σ_j |·| per (crossbar block g = e·KB + kb, column) over its k_block rows, of W̃ read
        // in place ([E, N, K]: strides n·K per expert, k_block per block, 1 per row, K per
        // column) or of the readout Y ([E·KB·k_block, N]: row g·k_block + j).
        let readout;
        let (src, blocks, s_e, s_kb, sj, sc) = if compensation == DriftCompensation::GlobalExact {
            (w, n_kb, n * k, kb, 1, k)
        } else {
            let own;
            let operands = match operands {
                Some(o) => o,
                None => {
                    own = GpuGroupedMatrix::from_device_parts(
                        dev,
                        m,
                        w,
                        run.precision,
                        &self.dev_tables,
                        Arc::clone(&self.s_map),
                    )?;
                    &own
                }
            };
            let inputs = run.readouts.for_matrix(dev, operands)?;
            readout = crossbar_readout(dev, operands, &inputs, periphery, seed, mvm_id)?;
            lap(forward_stage)?;
            (&readout, 1, kb * n, 0, n, 1)
        };
        let mut sums = dev.scratch::<f64>(groups * n)?;
        let f = dev.function(&PROGRAM_CU, &[], "abs_column_sums")?;
        let (g32, rows, n32, b32) = (groups as u32, kb as u32, n as u32, blocks as u32);
        let [s_e, s_kb, sj, sc] = [s_e, s_kb, sj, sc].map(|v| v as u64);
        dev.launch(
            &f,
            "abs_column_sums",
            linear_launch((groups * n) as u64),
            |b| {
                b.arg(src)
                    .arg(&mut sums)
                    .arg(&g32)
                    .arg(&rows)
                    .arg(&n32)
                    .arg(&b32)
                    .arg(&s_e)
                    .arg(&s_kb)
                    .arg(&sj)
                    .arg(&sc);
            },
        )?;
        // Means in f64, rounded once to f32: as tile::Crossbar's mean_abs_f64.
        let mut means = dev.scratch::<f32>(groups * n)?;
        let f = dev.function(&PROGRAM_CU, &[], "gdc_column_means")?;
        let per_column = u32::from(compensation == DriftCompensation::GlobalPerColumn);
        let nx32 = m.n_xbar as u32;
        dev.launch(
            &f,
            "gdc_column_means",
            linear_launch((groups * m.n_xbar) as u64),
            |b| {
                b.arg(&sums)
                    .arg(&mut means)
                    .arg(&g32)
                    .arg(&n32)
                    .arg(&rows)
                    .arg(&per_column)
                    .arg(&*self.dev_tables.col_xbar)
                    .arg(&*self.dev_tables.col_block_cols)
                    .arg(&nx32);
            },
        )?;
        Ok(means)
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
        if !self.experts.layers.contains_key(&layer) {
            return Ok(None);
        }
        // Routers with a variable number of experts per token (relu, adaptive) take the
        // per-expert CPU path.
        let Some(k) = uniform_top_k(assignments, x.nrows(), n_experts) else {
            self.experts
                .stale_cpu()
                .map_err(|e| anyhow::anyhow!("MoE layer {layer}: {e}"))?;
            return Ok(None);
        };
        self.experts
            .run(layer, x, assignments, (k, n_experts), self.mvm_id)
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

    #[test]
    fn residency_is_the_fastest_that_fits_then_an_error() {
        let total = 80 * GIB;
        let reserve = activation_reserve_bytes(total);
        let layers = [[2000, 1000], [2000, 1000], [4000, 500]];
        let (all, largest) = (10_500, 4000);
        let resident = 20 * all + 8 * largest + reserve;
        let transient = 8 * all + 20 * largest + reserve;
        let streamed = 4 * all + 20 * largest + reserve;
        for (free, want) in [
            (resident, Residency::Resident),
            (resident - 1, Residency::Transient),
            (transient, Residency::Transient),
            (transient - 1, Residency::Streamed),
            (streamed, Residency::Streamed),
        ] {
            assert_eq!(Residency::choose(&layers, free, total), Ok(want), "{free}");
            assert_eq!(
                want.need_bytes(&layers, total),
                [resident, transient, streamed]
                    [Residency::ALL.iter().position(|&r| r == want).unwrap()]
            );
        }
        let err = Residency::choose(&layers, streamed - 1, total).unwrap_err();
        assert!(
            err.contains("10500 analog weights")
                && err.contains("streamed residency")
                && err.contains("5.00 GiB reserved"),
            "{err}"
        );
        // A forced residency is checked against the same plan.
        assert!(Residency::Resident.fits(&layers, resident, total).is_ok());
        let err = Residency::Resident
            .fits(&layers, resident - 1, total)
            .unwrap_err();
        assert!(err.contains("resident residency"), "{err}");
        // OLMoE-1B-7B (16 MoE layers, 64 experts of 2048 → 1024 → 2048) on an 80 GB H100 with
        // 78.6 GiB free: 129 GB resident does not fit, 51.5 GB + 5.4 GB transient does.
        let per_matrix = 64 * 1024 * 2048;
        let olmoe = vec![[2 * per_matrix, per_matrix]; 16];
        let free = 786 * GIB / 10;
        assert_eq!(
            Residency::choose(&olmoe, free, 79 * GIB),
            Ok(Residency::Transient)
        );
        // With 40 GiB free only the operands stay: 25.8 GB + 5.4 GB + 4.9 GiB.
        assert_eq!(
            Residency::choose(&olmoe, 40 * GIB, 79 * GIB),
            Ok(Residency::Streamed)
        );
        // Qwen1.5-MoE-A2.7B (24 MoE layers, 60 experts of 2048 → 1408 → 2048): 100 GB under
        // Transient, 49.8 GB + 6.9 GB + 4.9 GiB streamed on an 80 GB H100.
        let per_matrix = 60 * 1408 * 2048;
        let qwen = vec![[2 * per_matrix, per_matrix]; 24];
        assert_eq!(
            Residency::choose(&qwen, free, 79 * GIB),
            Ok(Residency::Streamed)
        );
        assert!(Residency::choose(&olmoe, 30 * GIB, 79 * GIB).is_err());
        assert!(Residency::choose(&[[usize::MAX / 4, 1]], free, total).is_err());
    }
}
