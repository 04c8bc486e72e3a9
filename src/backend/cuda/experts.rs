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
use std::sync::Mutex;

use anyhow::Result;
use cudarc::driver::CudaSlice;
use ndarray::{Array2, ArrayView2};

use cudarc::driver::PushKernelArg;

use super::blas::Blas;
use super::compile::MODEL_CU;
use super::error::DriverContext;
use super::gemm::Precision;
use super::grouped::{GpuGroupedMatrix, GroupedMatrix};
use super::layer::GpuMoeLayer;
use super::periphery::GemmPeriphery;
use super::profile::{laps, StageClock, StageTime};
use super::program::PcmParams;
use super::programmed::{
    DeviceModel, DriftHost, DriftSource, GpuDrift, Held, ReadoutCache, Residency, Run, SourceKind,
};
use super::routing::route;
use super::{gib, linear_launch, CudaDevice, CudaError, CudaResult};
use crate::backend::cpu::{AnalogCall, AnalogExperts};
use crate::model::{Assignment, ExpertLinear, ExpertSlot, MatrixId, Proj};
use crate::tile::{AnalogMatrix, PeripherySpec, TilePreset};

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
                    GpuGroupedMatrix::device_bytes(&gate_up),
                    GpuGroupedMatrix::device_bytes(&down),
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
                "device kind `{}`: GPU drift supports the PCM family only",
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
            clock: StageClock::from_env()?,
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
            model: Some(self.cpu.model()),
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
                        model: Some(self.cpu.model()),
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
            model: Some(self.cpu.model()),
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
        if gate_up.tables.n_experts != n_experts {
            return Err(CudaError::Unsupported(format!(
                "digital experts of layer {layer} on the GPU: {n_experts} experts routed to {} held",
                gate_up.tables.n_experts
            )));
        }
        let model = self.cpu.model();
        digital_routed(
            self.dev,
            blas,
            x,
            (expert_of_pair, weight_of_pair),
            (n_tokens, top_k, n_experts),
            (gate_up.tables.k, down.tables.k),
            || gate_up.digital(self.dev, Some(model)),
            || down.digital(self.dev, Some(model)),
        )
        .map(Some)
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
pub(crate) fn routed_matrices<'a>(
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

/// Ends a profiled stage ([`StageClock::lap`]; a no-op unless profiling).
pub(crate) type Lap<'l> = &'l mut dyn FnMut(&'static str) -> CudaResult<()>;

/// Experts per token [`GpuExperts::digital_pairs_on_device`] sums (`COMBINE_MAX_K` in
/// `kernels/model.cu`).
const COMBINE_MAX_K: usize = 32;

/// `Σ w · expert_e(x[t])` of the rows `x` (`[n_tokens, d]`) for `n_tokens·top_k` (expert,
/// weight) pairs in `(token, slot)` order, with the digital f32 weights of the layer's experts
/// in the grouped layout (gate/up `[E, 2·inter, d]` interleaved by eight, down `[E, d, inter]`),
/// each obtained just before its GEMMs and dropped after them (a streamed copy is freed at
/// once): [`crate::model::moe::dispatch`] with the model's weights, as cuBLAS f32 GEMMs per
/// expert over the expert-sorted pairs, SwiGLU, and each token's sum in expert order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn digital_routed<'w>(
    dev: &CudaDevice,
    blas: &Blas,
    x: &CudaSlice<f32>,
    (expert_of_pair, weight_of_pair): (&CudaSlice<u32>, &CudaSlice<f32>),
    (n_tokens, top_k, n_experts): (usize, usize, usize),
    (d, inter): (usize, usize),
    gate_up: impl FnOnce() -> CudaResult<Held<'w>>,
    down: impl FnOnce() -> CudaResult<Held<'w>>,
) -> CudaResult<CudaSlice<f32>> {
    if top_k > COMBINE_MAX_K {
        return Err(CudaError::Unsupported(format!(
            "digital experts on the GPU: {top_k} experts per token (at most {COMBINE_MAX_K})"
        )));
    }
    let routing = route(
        dev,
        expert_of_pair,
        weight_of_pair,
        n_tokens,
        top_k,
        n_experts,
    )?;
    let experts = routing.expert_rows(dev)?;
    let pairs = n_tokens * top_k;
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
    let w = gate_up()?;
    let mut gu = dev.scratch::<f32>(pairs * 2 * inter)?;
    for &(e, r0, rows) in &experts {
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
    let w = down()?;
    let mut y = dev.scratch::<f32>(pairs * d)?;
    for &(e, r0, rows) in &experts {
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
    Ok(out)
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
            GpuGroupedMatrix::device_bytes(&m),
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
        let resident = 18 * all + 8 * largest + reserve;
        let transient = 6 * all + 20 * largest + reserve;
        let streamed = 2 * all + 20 * largest + reserve;
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
        // 78.6 GiB free: 116 GB resident does not fit, 38.7 GB + 5.4 GB transient does.
        let per_matrix = 64 * 1024 * 2048;
        let olmoe = vec![[2 * per_matrix, per_matrix]; 16];
        let free = 786 * GIB / 10;
        assert_eq!(
            Residency::choose(&olmoe, free, 79 * GIB),
            Ok(Residency::Transient)
        );
        // With 40 GiB free only the operands stay: 12.9 GB + 5.4 GB + 4.9 GiB.
        assert_eq!(
            Residency::choose(&olmoe, 40 * GIB, 79 * GIB),
            Ok(Residency::Streamed)
        );
        // Qwen1.5-MoE-A2.7B (24 MoE layers, 60 experts of 2048 → 1408 → 2048): 74.7 GB + 6.9 GB
        // + 4.9 GiB under Transient, 24.9 GB + 6.9 GB + 4.9 GiB streamed on an 80 GB H100.
        let per_matrix = 60 * 1408 * 2048;
        let qwen = vec![[2 * per_matrix, per_matrix]; 24];
        assert_eq!(
            Residency::choose(&qwen, free, 79 * GIB),
            Ok(Residency::Streamed)
        );
        // Not even the operands: 12.9 GB + 5.4 GB + 4.9 GiB > 20 GiB.
        assert!(Residency::choose(&olmoe, 20 * GIB, 79 * GIB).is_err());
        assert!(Residency::choose(&[[usize::MAX / 4, 1]], free, total).is_err());
    }
}
