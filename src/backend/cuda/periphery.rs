//! The crossbar periphery as the GPU applies it (the nine steps of
//! `tile::Crossbar::forward_chunk`): the parameter block the kernels read ([`GemmPeriphery`],
//! from a preset's `PeripherySpec`), the DAC prologue ([`quantize`],
//! kernel `moe_quantize`, mirrors `tile::Crossbar::forward_chunk` steps 1–2), iterative bound
//! management (`bound_management`, step 8, kernels `moe_gemm` in `MOE_MODE` 4 and
//! `bm_combine`), and the global-drift-compensation readout through the grouped kernel
//! ([`crossbar_readout`], mirrors `tile::Crossbar`'s GDC readout). The epilogue of steps 4–7
//! and 9 is fused into the GEMMs (`kernels/periphery.cuh`).
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

use super::gemm::grouped_gemm;
use super::gemm::mma_sync::mma_sync_gemm;
use super::gemm::tile::GemmTile;
use super::gemm::variant::GemmOutput;
use super::gemm::GemmParams;
use super::grouped::{to_bf16_into, GpuGroupedMatrix};
use super::routing::{route, GpuRouting};
use crate::backend::cuda::compile::MOE_CU;
use crate::backend::cuda::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::tile::{NoiseManagement, PeripherySpec, WeightNoise};

/// The crossbar periphery as the kernels apply it (steps 1–9 of `tile::Crossbar::forward_chunk`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmPeriphery {
    /// 0 ABS_MAX, 1 constant, 2 none.
    pub(crate) nm_kind: u32,
    /// Constant α_nm (kind 1).
    pub(crate) nm_value: f32,
    /// DAC (step, largest code).
    pub(crate) dac: Option<(f32, f32)>,
    /// ADC (step, bound).
    pub(crate) adc: Option<(f32, f32)>,
    /// Output noise std.
    pub(crate) out_noise: f32,
    /// PCM_READ weight-noise std.
    pub(crate) pcm_read_std: Option<f32>,
    /// ADDITIVE weight-noise std (σ² = std²·‖x̃‖² per row and crossbar block).
    pub(crate) additive_std: Option<f32>,
    /// IR drop (scale, g_ratio).
    pub(crate) ir_drop: Option<(f32, f32)>,
    /// Iterative bound management: the largest β that may still be doubled
    /// ([`PeripherySpec::bm_beta_limit`]).
    pub(crate) bm_limit: Option<f32>,
}

impl GemmPeriphery {
    /// Kernel form of `spec`. DACs above 11 bits are refused: their codes are not exact fp16
    /// operands.
    pub fn from_spec(spec: &PeripherySpec) -> CudaResult<Self> {
        let (pcm_read_std, additive_std) = match spec.w_noise {
            WeightNoise::None => (None, None),
            WeightNoise::PcmRead { std } => ((std > 0.0).then_some(std), None),
            WeightNoise::Additive { std } => (None, (std > 0.0).then_some(std)),
        };
        let (nm_kind, nm_value) = match spec.noise_management {
            NoiseManagement::AbsMax => (0, 0.0),
            NoiseManagement::Constant { value } => (1, value),
            NoiseManagement::None => (2, 1.0),
        };
        if let Some(d) = spec.dac {
            if d.bits > 11 {
                return Err(CudaError::Unsupported(format!(
                    "periphery.dac.bits = {}: DAC codes above 11 bits are not exact in fp16 operands",
                    d.bits
                )));
            }
        }
        Ok(Self {
            nm_kind,
            nm_value,
            // Largest code: bound/step = (2^bits − 2)/2 exactly.
            dac: spec
                .dac
                .map(|d| (d.step(), ((1u64 << d.bits) - 2) as f32 / 2.0)),
            adc: spec.adc.map(|a| (a.step(), a.bound)),
            out_noise: spec.out_noise,
            pcm_read_std,
            additive_std,
            ir_drop: spec.ir_drop.map(|ir| (ir.scale, ir.g_ratio)),
            bm_limit: spec.bm_beta_limit(),
        })
    }

    /// Whether the GEMMs form side products beside W̃·x̃ (PCM_READ weight noise, IR drop): the
    /// analog wgmma kernel then runs its 64-column tile alone
    /// ([`GemmVariant::side_products`](super::gemm::GemmVariant::side_products)).
    pub fn side_products(&self) -> bool {
        self.pcm_read_std.is_some() || self.ir_drop.is_some()
    }

    /// Whether iterative bound management runs (saturated rows are redone by attempt passes).
    pub(crate) fn bound_managed(&self) -> bool {
        self.bm_limit.is_some()
    }

    /// Whether per-output noise is drawn (output noise and/or short-term weight noise).
    pub(crate) fn noisy(&self) -> bool {
        self.out_noise > 0.0 || self.pcm_read_std.is_some() || self.additive_std.is_some()
    }
}

/// Operand rows of one grouped GEMM: fp16 DAC codes (analog) or bf16 values (digital), with
/// α_nm per (row, crossbar block) for analog.
pub struct GemmInput<'x> {
    /// `[rows, K]` operand bits.
    pub a: CudaSlice<u16>,
    /// `[rows, K/k_block]` α_nm (empty for digital).
    pub alpha: CudaSlice<f32>,
    /// `[rows, K/k_block]` ‖x̃‖² (ADDITIVE weight noise only).
    pub sumsq: Option<CudaSlice<f32>>,
    /// The unquantised rows (analog: bound management re-encodes them at 2β).
    pub x: Option<&'x CudaSlice<f32>>,
    /// Rows.
    pub rows: usize,
}

/// Prologue: noise management + DAC of `x` (`[rows, k]` f32) per crossbar block of `k_block`
/// rows (analog), or bf16 conversion (digital, `periphery = None`).
pub fn quantize<'x>(
    dev: &CudaDevice,
    x: &'x CudaSlice<f32>,
    rows: usize,
    k: usize,
    k_block: usize,
    periphery: Option<&GemmPeriphery>,
) -> CudaResult<GemmInput<'x>> {
    quantize_scaled(dev, x, rows, k, k_block, periphery, 1.0)
}

/// [`quantize`] with the noise-management scale of every block multiplied by `beta` (a power
/// of two): the operand rows of bound-management attempt log2 β, x / (α_nm·β), whose α is
/// α_nm·β (step 8 of `tile::Crossbar::forward_chunk`).
pub fn quantize_scaled<'x>(
    dev: &CudaDevice,
    x: &'x CudaSlice<f32>,
    rows: usize,
    k: usize,
    k_block: usize,
    periphery: Option<&GemmPeriphery>,
    beta: f32,
) -> CudaResult<GemmInput<'x>> {
    if x.len() != rows * k || k_block == 0 || !k.is_multiple_of(k_block) {
        return Err(CudaError::Unsupported(format!(
            "quantize: {} values for {rows}×{k} in blocks of {k_block}",
            x.len()
        )));
    }
    let mut a = dev.scratch::<u16>(rows * k)?;
    let Some(p) = periphery else {
        to_bf16_into(dev, x, &mut a)?;
        return Ok(GemmInput {
            a,
            alpha: dev.zeros::<f32>(1)?,
            sumsq: None,
            x: None,
            rows,
        });
    };
    let n_kb = k / k_block;
    let mut alpha = dev.scratch::<f32>(rows * n_kb)?;
    let sumsq = match p.additive_std {
        Some(_) => Some(dev.scratch::<f32>(rows * n_kb)?),
        None => None,
    };
    let f = dev.function(&MOE_CU, &[], "moe_quantize")?;
    let (r32, k32, kb32) = (rows as u32, k as u32, k_block as u32);
    let use_dac = u32::from(p.dac.is_some());
    let (dac_step, dac_max) = p.dac.unwrap_or((1.0, 0.0));
    let s = dev.stream();
    // Raw pointer (0 = no ‖x̃‖² output): one stream, event tracking off (see grouped_gemm).
    let sumsq_ptr: u64 = sumsq.as_ref().map_or(0, |b| b.device_ptr(s).0);
    dev.launch(
        &f,
        "moe_quantize",
        linear_launch((rows * n_kb * 32) as u64),
        |b| {
            b.arg(x)
                .arg(&r32)
                .arg(&k32)
                .arg(&kb32)
                .arg(&p.nm_kind)
                .arg(&p.nm_value)
                .arg(&beta)
                .arg(&use_dac)
                .arg(&dac_step)
                .arg(&dac_max)
                .arg(&mut a)
                .arg(&mut alpha)
                .arg(&sumsq_ptr);
        },
    )?;
    Ok(GemmInput {
        a,
        alpha,
        sumsq,
        x: Some(x),
        rows,
    })
}

/// Bytes of block outputs ([`GemmOutput::BmAttempt`] scratch, f32 per flagged row, crossbar
/// block and column) bound management holds at once: the flagged rows are redone in groups
/// that fit (256 MiB: 8,192 rows of OLMoE's gate/up, 4 blocks × 2,048 columns).
const BM_SCRATCH_BYTES: usize = 256 << 20;

/// The fixed inputs of [`crossbar_readout`] for `groups` crossbar blocks of `k_block` rows and
/// `n_cols` columns: the identity rows, every row routed to every block (row r of each block
/// is identity row r, which the kernel's `MOE_DIAG` relies on), digital scale 1. Built once
/// per shape and reused at every drift point: uploading and sorting them per matrix cost
/// host round trips.
pub struct IdentityReadout {
    pub(crate) k_block: usize,
    pub(crate) groups: usize,
    pub(crate) n_cols: usize,
    pub(crate) eye: CudaSlice<f32>,
    pub(crate) routing: GpuRouting,
    pub(crate) ones: Arc<CudaSlice<f32>>,
}

impl IdentityReadout {
    /// The inputs for the crossbars of `m` (`E·KB` blocks of `k_block` rows, `N` columns).
    pub fn for_matrix(dev: &CudaDevice, m: &GpuGroupedMatrix) -> CudaResult<Self> {
        let (kb, groups, n) = (m.k_block, m.n_experts * (m.k / m.k_block), m.n_cols);
        let mut eye = vec![0.0f32; kb * kb];
        for j in 0..kb {
            eye[j * kb + j] = 1.0;
        }
        let experts: Vec<u32> = (0..kb * groups).map(|p| (p % groups) as u32).collect();
        let routing = route(
            dev,
            &dev.upload(&experts)?,
            &dev.upload(&vec![1.0f32; kb * groups])?,
            kb,
            groups,
            groups,
        )?;
        Ok(Self {
            k_block: kb,
            groups,
            n_cols: n,
            eye: dev.upload(&eye)?,
            routing,
            ones: Arc::new(dev.upload(&vec![1.0f32; groups * n])?),
        })
    }

    /// Whether these are the inputs for `m`'s crossbars.
    pub fn fits(&self, m: &GpuGroupedMatrix) -> bool {
        (self.k_block, self.groups, self.n_cols)
            == (m.k_block, m.n_experts * (m.k / m.k_block), m.n_cols)
    }
}

/// The GDC readout of every crossbar of `m` (global drift compensation, as `tile::Crossbar::drift_to` computes it): the
/// noisy identity forward of call `mvm_id` through each crossbar block along K, as
/// `tile::Crossbar` reads its crossbar out. Returns `[E·KB·k_block, N]`: row j of block
/// g = e·KB + kb is row g·k_block + j, the output of identity row j. Runs on `m`'s own operands
/// (`GpuGroupedMatrix::crossbar_blocks`), each row tile over the K range of its own rows
/// (`MOE_DIAG`: a quarter of the MMAs of 512-row crossbars).
pub fn crossbar_readout(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    inputs: &IdentityReadout,
    periphery: Option<&GemmPeriphery>,
    seed: u64,
    mvm_id: u32,
) -> CudaResult<CudaSlice<f32>> {
    if !m.precision.analog() || m.block_view.is_some() || !inputs.fits(m) {
        return Err(CudaError::Unsupported(format!(
            "GDC readout of a {:?} matrix (analog operands only) with inputs for {} blocks of \
             {}×{}",
            m.precision, inputs.groups, inputs.k_block, inputs.n_cols
        )));
    }
    let view = m.crossbar_blocks(&inputs.ones);
    let kb = m.k_block;
    let xq = quantize(dev, &inputs.eye, kb, kb, kb, periphery)?;
    let mut y = dev.scratch::<f32>(kb * inputs.groups * m.n_cols)?;
    grouped_gemm(
        dev,
        &view,
        &xq,
        &inputs.routing,
        true,
        periphery,
        seed,
        mvm_id,
        GemmOutput::Store,
        &mut y,
    )?;
    Ok(y)
}

/// The crossbars of bound-management slots that go again after an attempt, in place:
/// `pending` and `sat` are `[slots, KB, n_xbar]` (1: the crossbar ran in this attempt / one of
/// its outputs saturated); a crossbar stays pending when it ran, saturated, `again` holds
/// (β ≤ the preset's limit) and its block's α_nm (`alpha(slot, kb)`) is positive, as
/// `tile::Crossbar::forward_chunk`. Returns whether any is still pending.
fn bm_next_pending(
    pending: &mut [u8],
    sat: &[u8],
    n_kb: usize,
    n_xbar: usize,
    again: bool,
    alpha: impl Fn(usize, usize) -> f32,
) -> bool {
    let mut any = false;
    for (i, (p, &s)) in pending.iter_mut().zip(sat).enumerate() {
        let (slot, kb) = (i / (n_kb * n_xbar), i / n_xbar % n_kb);
        let keep = *p != 0 && s != 0 && again && alpha(slot, kb) > 0.0;
        *p = u8::from(keep);
        any |= keep;
    }
    any
}

/// A store-mode analog GEMM whose flagged rows bound management redoes.
pub(crate) struct BmJob<'j, 'x> {
    pub(crate) m: &'j GpuGroupedMatrix,
    pub(crate) input: &'j GemmInput<'x>,
    pub(crate) routing: &'j GpuRouting,
    pub(crate) gather_tokens: bool,
    pub(crate) periphery: &'j GemmPeriphery,
    /// `moe_gemm` in [`GemmOutput::BmAttempt`] mode, on the tile of the store pass.
    pub(crate) defines: super::gemm::variant::GemmDefines,
    pub(crate) tile: GemmTile,
    /// The store pass's parameters.
    pub(crate) params: GemmParams,
}

/// Step 8 of `tile::Crossbar::forward_chunk`, iterative bound management, for the rows the store pass flagged
/// (`flags`, one per sorted row), as tensor-core passes: attempt a re-encodes the operand rows
/// at α_nm·2^a ([`quantize_scaled`]) and reruns the GEMM over the row tiles holding a row with a
/// pending crossbar ([`GemmOutput::BmAttempt`]), drawing the output noise of attempt a; each
/// pending crossbar's outputs overwrite its slot in the scratch, and its saturation comes back
/// to the host, which keeps it pending while β = 2^a ≤ the preset's limit and α_nm > 0, as
/// `tile::Crossbar::forward_chunk` does per crossbar. Then `bm_combine` sums each redone row's
/// blocks in K-block order into the store output. Flagged rows go in groups whose scratch fits
/// [`BM_SCRATCH_BYTES`].
pub(crate) fn bound_management(
    dev: &CudaDevice,
    job: &BmJob<'_, '_>,
    flags: &CudaSlice<u32>,
) -> CudaResult<()> {
    let m = job.m;
    let pairs = job.routing.n_tokens * job.routing.top_k;
    let flag_host = dev.download(flags)?;
    let flagged: Vec<u32> = (0..pairs as u32)
        .filter(|&p| flag_host[p as usize] != 0)
        .collect();
    if flagged.is_empty() {
        return Ok(());
    }
    let x = job.input.x.ok_or_else(|| {
        CudaError::Unsupported("bound management needs the unquantised input rows".into())
    })?;
    let limit = job.periphery.bm_limit.unwrap_or(0.0);
    let (n, n_kb, n_xbar) = (m.n_cols, m.k / m.k_block, m.n_xbar);
    // α_nm of every sorted row's blocks: a block at α_nm = 0 accepts its first outputs.
    let alpha = dev.download(&job.input.alpha)?;
    let row_of: Vec<u32> = if job.gather_tokens {
        dev.download(&job.routing.sorted_token)?
    } else {
        (0..pairs as u32).collect()
    };
    let group = (BM_SCRATCH_BYTES / (n_kb * n * std::mem::size_of::<f32>())).max(1);
    let s = dev.stream();
    let combine = dev.function(&MOE_CU, &[], "bm_combine")?;
    for rows in flagged.chunks(group) {
        let slots = rows.len();
        let mut slot_of = vec![-1i32; pairs];
        for (slot, &pos) in rows.iter().enumerate() {
            slot_of[pos as usize] = slot as i32;
        }
        let slot_dev = dev.upload(&slot_of)?;
        let pos_dev = dev.upload(rows)?;
        let per_slot = n_kb * n_xbar;
        let mut pending = vec![1u8; slots * per_slot];
        let y = dev.scratch::<f32>(slots * n_kb * n)?;
        let mut beta = 1.0f32;
        for attempt in 0..=u32::from(u8::MAX) {
            let mut live = vec![0u32; pairs];
            for (slot, &pos) in rows.iter().enumerate() {
                live[pos as usize] =
                    u32::from(pending[slot * per_slot..(slot + 1) * per_slot].contains(&1));
            }
            let live_dev = dev.upload(&live)?;
            let pending_dev = dev.upload(&pending)?;
            let sat = dev.zeros::<u8>(pending.len())?;
            // Attempt 0 (β = 1) runs on the store pass's operand rows.
            let scaled;
            let xq = if attempt == 0 {
                job.input
            } else {
                scaled = quantize_scaled(
                    dev,
                    x,
                    job.input.rows,
                    m.k,
                    m.k_block,
                    Some(job.periphery),
                    beta,
                )?;
                &scaled
            };
            let params = GemmParams {
                a: xq.a.device_ptr(s).0,
                a_alpha: xq.alpha.device_ptr(s).0,
                a_sumsq: xq.sumsq.as_ref().map_or(0, |b| b.device_ptr(s).0),
                bm_slot: slot_dev.device_ptr(s).0,
                bm_flag: live_dev.device_ptr(s).0,
                bm_scratch: y.device_ptr(s).0,
                bm_pending: pending_dev.device_ptr(s).0,
                bm_sat: sat.device_ptr(s).0,
                attempt,
                ..job.params
            };
            mma_sync_gemm(dev, m, pairs, &job.defines, job.tile, &params)?;
            let sat = dev.download(&sat)?;
            let alpha_of =
                |slot: usize, kb: usize| alpha[row_of[rows[slot] as usize] as usize * n_kb + kb];
            if !bm_next_pending(&mut pending, &sat, n_kb, n_xbar, beta <= limit, alpha_of) {
                break;
            }
            beta *= 2.0;
        }
        let (slots32, kb32, n32) = (slots as u32, n_kb as u32, n as u32);
        let out = job.params.out;
        dev.launch(
            &combine,
            "bm_combine",
            linear_launch((slots * n) as u64),
            |b| {
                b.arg(&y)
                    .arg(&pos_dev)
                    .arg(&slots32)
                    .arg(&kb32)
                    .arg(&n32)
                    .arg(&out);
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_management_keeps_only_saturated_crossbars_that_may_go_again() {
        // 2 slots × 2 K blocks × 2 crossbars; slot 1's block 0 has α_nm = 0.
        let alpha = |slot: usize, kb: usize| if (slot, kb) == (1, 0) { 0.0 } else { 0.5 };
        let mut pending = vec![1, 1, 1, 0, 1, 1, 1, 1];
        let sat = vec![1, 0, 1, 1, 1, 1, 0, 1];
        assert!(bm_next_pending(&mut pending, &sat, 2, 2, true, alpha));
        assert_eq!(pending, vec![1, 0, 1, 0, 0, 0, 0, 1]);
        // β past the limit: every crossbar accepts its outputs.
        assert!(!bm_next_pending(&mut pending, &[1; 8], 2, 2, false, alpha));
        assert_eq!(pending, vec![0; 8]);
    }
}
