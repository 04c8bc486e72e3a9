//! The programmed state of a model's routed experts on the device, and where it lives between
//! drift points ([`Residency`]): per grouped matrix the digital weights programming starts
//! from, the column tables, and (resident) W̃_prog, the drift exponents ν, the conductance
//! scales and GDC references (`DriftSource`). Programming, drift and read noise run in
//! `kernels/program.cu` (`program_weights` mirrors `tile::Crossbar::program`, `drift_weights`
//! mirrors `device::PcmLike::drift` with `tile::Crossbar::drift_to`'s GDC), the GDC readout
//! through the grouped GEMM ([`crossbar_readout`]). [`GpuExperts`](super::experts::GpuExperts) owns one of these per MoE
//! layer and exposes it through `program`, `reprogram` and `drift_to`.
//!
//! [`cpu_programmed_state`] lays the CPU crossbars' programmed state out the same way, so the
//! GPU tests compare the two bit for bit.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use cudarc::driver::PushKernelArg;
use ndarray::ArrayView2;

use super::compile::PROGRAM_CU;
use super::experts::{activation_reserve_bytes, routed_matrices, Lap};
use super::gemm::Precision;
use super::grouped::{interleave_rows, GpuColumnTables, GpuGroupedMatrix, GroupedMatrix};
use super::periphery::{crossbar_readout, GemmPeriphery, IdentityReadout};
use super::program::PcmParams;
use super::{gib, linear_launch, row_launch, CudaDevice, CudaError, CudaResult};
use crate::backend::cpu::AnalogExperts;
use crate::device::PcmLike;
use crate::model::{ExpertSlot, MatrixId, Model, Proj};
use crate::tile::{
    AnalogMatrix, Crossbar, DriftCompensation, GDC_MIN_READOUT, GDC_READOUT_MVM_ID,
    GDC_REFERENCE_MVM_ID,
};

/// The programmed state of the CPU crossbars of MoE layer `l` in the layout of
/// [`GpuExperts::programmed_state`](super::experts::GpuExperts::programmed_state) (`[gate/up, down]`, each (W̃_prog, ν `[2, E·N·K]`,
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

/// The programmed state of every MoE layer on the device ([`GpuExperts::program`](super::experts::GpuExperts::program)).
pub(crate) struct GpuDrift {
    pub(crate) device: DeviceModel,
    pub(crate) residency: Residency,
    /// Per MoE layer: (interleaved gate/up, down).
    pub(crate) sources: BTreeMap<usize, (DriftSource, DriftSource)>,
    pub(crate) readouts: ReadoutCache,
}

/// The inputs of the GDC readouts ([`IdentityReadout`]), one per crossbar shape (two per
/// model: gate/up and down), built at the first readout and reused at every drift point.
#[derive(Default)]
pub(crate) struct ReadoutCache(pub(crate) Mutex<Vec<Arc<IdentityReadout>>>);

impl ReadoutCache {
    pub(crate) fn for_matrix(
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
pub(crate) struct DeviceModel {
    pub(crate) pcm: PcmLike,
    pub(crate) params: PcmParams,
    pub(crate) compensation: DriftCompensation,
}

/// What one programming or drift of a [`DriftSource`] runs with.
#[derive(Clone, Copy)]
pub(crate) struct Run<'c> {
    pub(crate) dev: &'c CudaDevice,
    /// The model whose digital weights [`Residency::Streamed`] uploads per use (`None` where
    /// every source holds its weights on the device, as the fine-tuning trainer's do).
    pub(crate) model: Option<&'c Model>,
    pub(crate) device: &'c DeviceModel,
    pub(crate) readouts: &'c ReadoutCache,
    /// The kernel periphery of the GDC readouts.
    pub(crate) periphery: Option<&'c GemmPeriphery>,
    pub(crate) precision: Precision,
    pub(crate) seed: u64,
}

/// One grouped matrix's crossbars on the device, in the kernel layout `[E, N, K]`: the
/// digital weights and tables programming starts from, and the programmed state when it stays
/// resident ([`Residency::Resident`]).
pub(crate) struct DriftSource {
    /// Kernel tables (column tensor ids, crossbar columns); `weights` empty, `col_scale` s_map.
    pub(crate) tables: GroupedMatrix,
    /// The programmed state under the current seed ([`Residency::Resident`]); `None` when it is
    /// programmed again at each drift point ([`Residency::Transient`]).
    pub(crate) programmed: Option<Programmed>,
    /// [`Residency::Transient`]: the current seed's scales and GDC reference, from its first
    /// drift point on (its later points skip the reference readout).
    pub(crate) seed_scales: Option<SeedScales>,
    /// `[E, KB, N]`: the CPU layout's GDC reference per column (the seed-independent one of
    /// `global_exact`; 1 under `none`); `global`/`global_per_column` take theirs from the
    /// programmed state.
    pub(crate) host_gdc_ref: Vec<f32>,
    /// Device copies of `tables`' column tables, read by the programming, drift and GDC
    /// kernels and shared with every drift point's operands.
    pub(crate) dev_tables: GpuColumnTables,
    /// The digital weights `[E, N, K]` (what programming targets), s_map per `[E, KB, N]` and
    /// the target conductance scale of each column's crossbar (seed-independent), for
    /// [`DriftSource::program`].
    pub(crate) w: DigitalWeights,
    pub(crate) s_map: Arc<CudaSlice<f32>>,
    pub(crate) g_target: CudaSlice<f32>,
}

/// The programmed state of one grouped matrix (what `tile::Crossbar::program` keeps).
pub(crate) struct Programmed {
    pub(crate) weights: ProgrammedWeights,
    pub(crate) scales: SeedScales,
}

/// The per-weight part of a programmed state (12 B per weight).
pub(crate) struct ProgrammedWeights {
    pub(crate) w_prog: CudaSlice<f32>,
    /// `[2, E·N·K]`: drift exponents of the two devices of each weight.
    pub(crate) nu: CudaSlice<f32>,
}

/// The per-column part of a programmed state: small, and a function of the seed alone, so the
/// transient residency keeps it between the drift points of a seed.
pub(crate) struct SeedScales {
    /// `[E, KB, N]`: conductance scale (µS per normalised unit) of each column's crossbar.
    pub(crate) g_scale: CudaSlice<f32>,
    /// `[E, KB, N]`: GDC reference of each column (its crossbar's one value under `global`).
    pub(crate) gdc_ref: Vec<f32>,
    /// The device copy of `gdc_ref`, for the α of each drift point.
    pub(crate) gdc_ref_dev: CudaSlice<f32>,
}

/// Where the programmed state and the digital weights of [`GpuExperts::program`](super::experts::GpuExperts::program)'s layers live
/// between drift points. All three run the same kernels with the same Philox keys, so the
/// drifted operands are bit-identical whichever is chosen; they trade device memory for
/// work per drift point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// W̃_prog and ν of every layer stay on the device (12 B per weight beside the digital
    /// weights and the operands): each seed is programmed once, each drift point only drifts.
    Resident,
    /// Each matrix is programmed again from the digital weights at each drift point and its
    /// programmed state freed after drifting: 6 B per weight stay (digital weights and
    /// operands), for models whose resident state does not fit.
    Transient,
    /// As `Transient`, and the digital weights stay in the model's host arrays: each
    /// programming uploads its matrix's (and the digital reference each layer's) and frees
    /// them after. Only the operands stay (2 B per weight), for models whose digital weights
    /// do not fit beside them (Qwen1.5-MoE-A2.7B and DeepSeek-V2-Lite size on an 80 GB GPU);
    /// each drift point moves every routed weight over the host link once.
    Streamed,
}

impl Residency {
    /// The residencies from the fastest to the leanest.
    pub const ALL: [Residency; 3] = [Self::Resident, Self::Transient, Self::Streamed];

    /// Device bytes per weight that stay for the whole sweep: the fp16 operands, under
    /// `Transient` and `Resident` the digital f32 weights, under `Resident` W̃_prog and ν.
    pub fn resident_bytes_per_weight(self) -> usize {
        match self {
            Self::Resident => 18,
            Self::Transient => 6,
            Self::Streamed => 2,
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
pub(crate) struct DriftHost {
    /// Kernel tables with s_map as `col_scale`; `weights` empty.
    pub(crate) tables: GroupedMatrix,
    /// `[E, KB, N]`: the CPU crossbars' GDC reference per column (the seed-independent one of
    /// `global_exact`; 1 under `none`; recomputed on the device otherwise).
    pub(crate) gdc_ref: Vec<f32>,
}

impl DriftHost {
    pub(crate) fn new(experts: &[&AnalogMatrix]) -> CudaResult<Self> {
        let mut tables = GroupedMatrix::tables(experts)?;
        tables.col_scale = column_table(experts, |b, lc| b.map_scale()[lc]);
        Ok(Self {
            tables,
            gdc_ref: column_table(experts, gdc_reference_of),
        })
    }

    /// Gate and up interleaved as [`GroupedMatrix::interleave_swiglu`] lays them out.
    pub(crate) fn interleave(g: &Self, u: &Self) -> CudaResult<Self> {
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
    dev.upload_concat(&parts)
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
pub(crate) enum SourceKind {
    /// Gate and up, interleaved in groups of 8 rows as the SwiGLU epilogue reads them.
    GateUp,
    Down,
}

/// The digital weights `[E, N, K]` of matrix `kind` of MoE layer `l` (N: the grouped
/// matrix's rows, gate/up interleaved on the device) uploaded from the model's host arrays.
pub(crate) fn upload_digital(
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
pub(crate) enum DigitalWeights {
    /// On the device for the whole sweep.
    Device(CudaSlice<f32>),
    /// In the model's host arrays, uploaded for each use and freed after it
    /// ([`Residency::Streamed`]): (MoE layer, matrix).
    Host(usize, SourceKind),
}

/// Digital weights for one use: the resident copy or a fresh upload.
pub(crate) enum Held<'a> {
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
    pub(crate) fn upload(
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
    pub(crate) fn digital(&self, dev: &CudaDevice, model: Option<&Model>) -> CudaResult<Held<'_>> {
        Ok(match &self.w {
            DigitalWeights::Device(w) => Held::Resident(w),
            &DigitalWeights::Host(l, kind) => Held::Uploaded(upload_digital(
                dev,
                model.ok_or_else(|| {
                    CudaError::Unsupported(format!(
                        "layer {l}: streamed digital weights need the model to upload them from"
                    ))
                })?,
                (l, kind),
                (self.tables.n_cols, self.tables.k),
            )?),
        })
    }

    /// Per `[E, KB, N]` entry: WeightConverter::scale (differential pair) of the max |x / div|
    /// over the entry's crossbar (`div` per entry, or none).
    pub(crate) fn crossbar_scales(
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
    pub(crate) fn program(&self, run: Run<'_>, lap: Lap<'_>) -> CudaResult<Programmed> {
        let weights = self.program_weights(run, lap)?;
        let scales = self.seed_scales(run, &weights, lap)?;
        Ok(Programmed { weights, scales })
    }

    /// W̃_prog and ν of [`DriftSource::program`].
    pub(crate) fn program_weights(
        &self,
        run: Run<'_>,
        lap: Lap<'_>,
    ) -> CudaResult<ProgrammedWeights> {
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
    pub(crate) fn seed_scales(
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
    pub(crate) fn drifted(
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
    pub(crate) fn gdc_means(
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
