//! The grouped (per-expert) GEMMs of a MoE layer: one entry point ([`grouped_gemm`]) that checks
//! the operands, fills the kernel parameter block (`GemmParams`, the struct of the same name in
//! `kernels/gemm_common.cuh`) and launches the mma.sync kernel ([`mma_sync`], `moe_gemm`) or,
//! on sm_90a, the wgmma kernels ([`wgmma`], [`tma`]), then bound management's attempts.
//!
//! Submodules by concern: [`tile`] (CTA shapes), [`variant`] (what an instantiation computes
//! and its `#define`s), [`mma_sync`], [`wgmma`], [`tma`] (launch paths). The CPU model of every
//! kernel, the oracle of the GPU tests, is [`super::reference`].
pub mod mma_sync;
pub mod tile;
pub mod tma;
pub mod variant;
pub mod wgmma;

pub use tile::*;
pub use variant::*;

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, DeviceRepr};

use crate::backend::cuda::grouped::GpuGroupedMatrix;
use crate::backend::cuda::periphery::{bound_management, BmJob, GemmInput, GemmPeriphery};
use crate::backend::cuda::routing::GpuRouting;
use crate::backend::cuda::{CudaDevice, CudaError, CudaResult};
use crate::rng::philox_round_keys;
use mma_sync::mma_sync_gemm;
use wgmma::wgmma_gemm;

/// Kernel parameters (layout of `GemmParams` in `kernels/gemm_common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmParams {
    pub(crate) a: u64,
    pub(crate) a_alpha: u64,
    pub(crate) a_row_of: u64,
    pub(crate) w: u64,
    pub(crate) offsets: u64,
    pub(crate) tile_offsets: u64,
    pub(crate) col_tensor_id: u64,
    pub(crate) col_scale: u64,
    pub(crate) col_local: u64,
    pub(crate) col_block_cols: u64,
    pub(crate) sorted_token: u64,
    pub(crate) sorted_weight: u64,
    pub(crate) out: u64,
    pub(crate) a_sumsq: u64,
    pub(crate) bm_slot: u64,
    pub(crate) bm_flag: u64,
    pub(crate) bm_scratch: u64,
    pub(crate) col_xbar: u64,
    pub(crate) noise_key: u64,
    pub(crate) bm_pending: u64,
    pub(crate) bm_sat: u64,
    pub(crate) seed: u64,
    pub(crate) k: u32,
    pub(crate) n: u32,
    pub(crate) n_kb: u32,
    pub(crate) k_block: u32,
    pub(crate) n_experts: u32,
    pub(crate) mvm_id: u32,
    pub(crate) n_xbar: u32,
    pub(crate) use_dac: u32,
    pub(crate) dac_step: f32,
    pub(crate) adc_step: f32,
    pub(crate) adc_bound: f32,
    pub(crate) out_noise: f32,
    pub(crate) w_noise_std: f32,
    pub(crate) ir_scale: f32,
    pub(crate) ir_k: f32,
    pub(crate) dac_max_code: f32,
    pub(crate) attempt: u32,
    pub(crate) diag_k: u32,
    pub(crate) diag_kb: u32,
    pub(crate) adc_step_inv: f32,
    pub(crate) adc_clip: f32,
    pub(crate) round_keys: [u32; 20],
}

// SAFETY: plain `repr(C)` data matching the CUDA struct field for field.
unsafe impl DeviceRepr for GemmParams {}

/// Size of the kernel parameter block of `moe_gemm` (checked against the
/// `.param` size in NVRTC's PTX by `tests/kernels_compile.rs`).
pub const GEMM_PARAMS_BYTES: usize = std::mem::size_of::<GemmParams>();

/// One grouped GEMM over the sorted pairs of `routing`.
///
/// `gather_tokens`: operand row of sorted pair p is its token (first layer); otherwise row p
/// itself (hidden rows in sorted order). `periphery = None` runs the digital variant. With
/// iterative bound management the output must be [`GemmOutput::Store`]: saturated rows are
/// flagged by `moe_gemm` and redone by [`GemmOutput::BmAttempt`] passes ([`GpuMoeLayer::forward`](crate::backend::cuda::layer::GpuMoeLayer::forward) composes
/// SwiGLU and the scatter-add after it).
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm<T: GemmOutElem>(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    input: &GemmInput<'_>,
    routing: &GpuRouting,
    gather_tokens: bool,
    periphery: Option<&GemmPeriphery>,
    seed: u64,
    mvm_id: u32,
    output: GemmOutput,
    out: &mut CudaSlice<T>,
) -> CudaResult<()> {
    let pairs = routing.n_tokens * routing.top_k;
    let out_len = match output {
        GemmOutput::Store
        | GemmOutput::BmAttempt
        | GemmOutput::StoreBf16
        | GemmOutput::ClipCount => pairs * m.n_cols,
        GemmOutput::SwiGlu | GemmOutput::SwiGluBf16 => pairs * m.n_cols / 2,
        GemmOutput::ScatterAdd => routing.n_tokens * m.n_cols,
    };
    if T::BF16 != output.bf16() || (output.bf16() && m.precision != Precision::DigitalBf16) {
        return Err(CudaError::Unsupported(format!(
            "grouped GEMM: output {output:?} into {} elements of {:?} weights (bf16 rows are for \
             digital layers, into u16)",
            if T::BF16 { "bf16" } else { "f32" },
            m.precision
        )));
    }
    let in_rows = if gather_tokens {
        routing.n_tokens
    } else {
        pairs
    };
    if out.len() != out_len
        || input.rows != in_rows
        || input.a.len() != in_rows * m.k
        || routing.n_experts != m.n_experts
        || periphery.is_some() != m.precision.analog()
    {
        return Err(CudaError::Unsupported(format!(
            "grouped GEMM: output {} (want {out_len}), input {}×? (want {in_rows}×{}), experts {} vs {}, \
             periphery {} for {:?}",
            out.len(),
            input.rows,
            m.k,
            routing.n_experts,
            m.n_experts,
            periphery.is_some(),
            m.precision
        )));
    }
    let p = periphery.copied();
    let bm = p.is_some_and(|p| p.bound_managed());
    let additive = p.is_some_and(|p| p.additive_std.is_some());
    if bm && (output != GemmOutput::Store || input.x.is_none()) {
        return Err(CudaError::Unsupported(format!(
            "grouped GEMM with bound management: needs store mode ({output:?}) and the unquantised input"
        )));
    }
    if output == GemmOutput::ClipCount && (bm || p.is_none_or(|p| p.adc.is_none())) {
        return Err(CudaError::Unsupported(
            "grouped GEMM: clip counts are for analog layers whose ADC clips (an ADC without \
             bound management)"
                .into(),
        ));
    }
    if output == GemmOutput::BmAttempt {
        return Err(CudaError::Unsupported(
            "grouped GEMM: bound-management attempts run inside a store-mode GEMM".into(),
        ));
    }
    if additive && input.sumsq.is_none() {
        return Err(CudaError::Unsupported(
            "grouped GEMM with ADDITIVE weight noise: the input has no ‖x̃‖² (quantize with the same periphery)".into(),
        ));
    }
    let variant = GemmVariant {
        analog: p.is_some(),
        pcm_read: p.is_some_and(|p| p.pcm_read_std.is_some()),
        ir_drop: p.is_some_and(|p| p.ir_drop.is_some()),
        ir_table: m.k_block <= IR_TABLE_ROWS,
        additive,
        bound_management: bm,
        out_noise: p.is_some_and(|p| p.out_noise > 0.0),
        adc: p.is_some_and(|p| p.adc.is_some()),
        adc_bound_level: p
            .and_then(|p| p.adc)
            .is_some_and(|(step, bound)| crate::tile::bound_is_a_level(step, bound)),
        output,
        noise_quads: m.noise_quads,
        block_readout: m.block_view.is_some(),
    };
    // Bound management: a flag per sorted row, set where an output saturated.
    let bm = bm && variant.adc;
    let bm_flags = if bm {
        Some(dev.zeros::<u32>(pairs.max(1))?)
    } else {
        None
    };
    // Raw pointers: all work is on this one stream and event tracking is off, so the guards
    // `device_ptr` returns have nothing to synchronise.
    let s = dev.stream();
    let bm_flag = bm_flags.as_ref().map_or(0, |f| f.device_ptr(s).0);
    let (dac_step, dac_max_code) = p.and_then(|p| p.dac).unwrap_or((1.0, 0.0));
    let (adc_step, adc_bound) = p.and_then(|p| p.adc).unwrap_or((1.0, f32::MAX));
    let params = GemmParams {
        a: input.a.device_ptr(s).0,
        a_alpha: input.alpha.device_ptr(s).0,
        a_row_of: if gather_tokens {
            routing.sorted_token.device_ptr(s).0
        } else {
            0
        },
        w: m.w.device_ptr(s).0,
        offsets: routing.offsets.device_ptr(s).0,
        tile_offsets: routing.tile_offsets.device_ptr(s).0,
        col_tensor_id: m.col_tensor_id.device_ptr(s).0,
        col_scale: m.col_scale.device_ptr(s).0,
        col_local: m.col_local.device_ptr(s).0,
        col_block_cols: m.col_block_cols.device_ptr(s).0,
        sorted_token: routing.sorted_token.device_ptr(s).0,
        sorted_weight: routing.sorted_weight.device_ptr(s).0,
        out: out.device_ptr(s).0,
        a_sumsq: input.sumsq.as_ref().map_or(0, |b| b.device_ptr(s).0),
        bm_slot: 0,
        bm_flag,
        bm_scratch: 0,
        col_xbar: m.col_xbar.device_ptr(s).0,
        noise_key: routing.noise_key.as_ref().map_or(0, |k| k.device_ptr(s).0),
        bm_pending: 0,
        bm_sat: 0,
        seed,
        k: m.k as u32,
        n: m.n_cols as u32,
        n_kb: (m.k / m.k_block) as u32,
        k_block: m.k_block as u32,
        n_experts: m.n_experts as u32,
        mvm_id,
        n_xbar: m.n_xbar as u32,
        use_dac: u32::from(p.is_some_and(|p| p.dac.is_some())),
        dac_step,
        adc_step,
        adc_bound,
        out_noise: p.map_or(0.0, |p| p.out_noise),
        w_noise_std: p
            .and_then(|p| p.pcm_read_std.or(p.additive_std))
            .unwrap_or(0.0),
        ir_scale: p.and_then(|p| p.ir_drop).map_or(0.0, |ir| ir.0),
        ir_k: p
            .and_then(|p| p.ir_drop)
            .map_or(0.0, |ir| m.k_block as f32 / ir.1),
        dac_max_code,
        attempt: 0,
        diag_k: m.block_view.map_or(0, |v| v.0 as u32),
        diag_kb: m.block_view.map_or(0, |v| v.1 as u32),
        adc_step_inv: 1.0 / adc_step,
        adc_clip: adc_bound + 2.0 * adc_step,
        round_keys: philox_round_keys([seed as u32, (seed >> 32) as u32]),
    };
    let wgmma = m.wgmma.filter(|_| variant.wgmma_ready());
    // The mma.sync tile (`AIMC_GEMM_TILE` applies to it alone; bound management's attempts
    // run on it after either kernel).
    let tile = match wgmma {
        Some(_) => GemmTile::for_variant(&variant),
        None => GemmTile::choose(&variant, m.n_cols, m.k_block)?,
    };
    let defines = gemm_defines(&variant, tile);
    match wgmma {
        Some(wg) => wgmma_gemm(dev, m, wg, routing, &variant, &params)?,
        None => mma_sync_gemm(dev, m, pairs, &defines, tile, &params)?,
    }
    if let (Some(flags), Some(p)) = (&bm_flags, p) {
        let attempt = GemmVariant {
            output: GemmOutput::BmAttempt,
            ..variant
        };
        let job = BmJob {
            m,
            input,
            routing,
            gather_tokens,
            periphery: &p,
            defines: gemm_defines(&attempt, tile),
            tile,
            params,
        };
        bound_management(dev, &job, flags)?;
    }
    // Dropping the flags frees them in stream order (cuMemFreeAsync on this stream), after
    // the kernels that use them.
    drop(bm_flags);
    Ok(())
}

/// Lets `f` (kernel `name`, launched with `threads` threads) use `shared` bytes of dynamic
/// shared memory, beyond the 48 KiB default; a refusal names the kernel and the size.
pub(crate) fn allow_dynamic_shared(
    f: &CudaFunction,
    name: &str,
    threads: u32,
    shared: u32,
) -> CudaResult<()> {
    // SAFETY: raising the dynamic shared-memory limit of a loaded function.
    unsafe {
        cudarc::driver::result::function::set_function_attribute(
            f.cu_function(),
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
    }
    .map_err(|source| CudaError::Kernel {
        kernel: name.into(),
        grid: (0, 0, 0),
        block: (threads, 1, 1),
        shared_bytes: shared,
        source,
    })
}
