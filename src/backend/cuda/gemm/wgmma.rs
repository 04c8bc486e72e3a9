//! Launch of the sm_90a grouped GEMMs (`kernels/gemm_wgmma*.cuh`): `moe_gemm_wgmma` (digital,
//! pipelined or warp-specialised persistent, optionally in clusters of two that multicast the
//! weight tile) and `moe_analog_wgmma` (analog, the periphery per crossbar block as `moe_gemm`
//! applies it). Same contract and numbers as the mma.sync kernel of the same variant.

use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::allow_dynamic_shared;
use super::tile::{scatter_slab_cols, WgmmaTile, MAX_SHARED_BYTES, TILE_ROWS, WGMMA_TILE_K};
use super::tma::{operand_tensor_map, weight_tensor_map};
use super::variant::{analog_wgmma_defines, GemmVariant};
use super::GemmParams;
use crate::backend::cuda::compile::MOE_CU;
use crate::backend::cuda::device::linear_launch;
use crate::backend::cuda::grouped::GpuGroupedMatrix;
use crate::backend::cuda::routing::GpuRouting;
use crate::backend::cuda::{CudaDevice, CudaError, CudaResult};

/// The sm_90a GEMMs (`moe_gemm_wgmma`, kernels/gemm_wgmma*.cuh): 128 × `tile.cols` CTA tiles,
/// two warpgroups issuing wgmma from 128B-swizzled shared memory; digital on any of the
/// [`WgmmaTile`] schedules, analog (`variant.analog`) on [`super::analog_wgmma_tile_of`]'s.
pub(crate) fn wgmma_gemm(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    tile: WgmmaTile,
    routing: &GpuRouting,
    variant: &GemmVariant,
    params: &GemmParams,
) -> CudaResult<()> {
    let output = variant.output;
    let tile = tile.for_gathered(params.a_row_of != 0);
    if variant.analog != m.precision.analog()
        || (variant.analog && !variant.wgmma_ready())
        || dev.compute_capability() != (9, 0)
        || !m.k.is_multiple_of(WGMMA_TILE_K)
    {
        return Err(CudaError::Unsupported(format!(
            "the wgmma grouped GEMM runs digital bf16 weights on any tile, analog ones with an \
             f32 output (no bound-management attempt or GDC readout) on the analog tile (here \
             {:?} weights, {variant:?}, tile {tile:?}, crossbar rows {}), on an sm_90 device \
             (sm_{}{}) with K a multiple of {WGMMA_TILE_K} ({})",
            m.precision,
            m.k_block,
            dev.compute_capability().0,
            dev.compute_capability().1,
            m.k,
        )));
    }
    if variant.analog {
        tile.check_analog(variant, m.n_cols, m.k_block)?;
    } else {
        tile.check(m.n_cols)?;
    }
    let tile = tile.for_output(output.mode());
    let slab_cols = scatter_slab_cols(m.k, routing.top_k)?;
    let defines = if variant.analog {
        analog_wgmma_defines(variant, tile, m.k_block, slab_cols)
    } else {
        tile.defines(output.mode(), slab_cols).to_vec()
    };
    let name = if variant.analog {
        "moe_analog_wgmma"
    } else {
        "moe_gemm_wgmma"
    };
    let f = dev.function(&MOE_CU, &defines, name)?;
    let shared = if variant.analog {
        tile.analog_shared_bytes(variant)
    } else {
        tile.shared_bytes(m.n_experts)
    };
    if shared > MAX_SHARED_BYTES {
        return Err(CudaError::Unsupported(format!(
            "wgmma GEMM tile {} with {} experts needs {shared} B of shared memory, at most \
             {MAX_SHARED_BYTES}",
            tile.describe(),
            m.n_experts
        )));
    }
    let shared = shared as u32;
    let threads = if variant.analog {
        WgmmaTile::ANALOG_THREADS
    } else {
        tile.threads()
    };
    allow_dynamic_shared(&f, name, threads, shared)?;
    let pairs = routing.n_tokens * routing.top_k;
    // A bound on the row tiles (the routing's count lives on the device): the one-tile kernels
    // return past the last, the persistent ones walk them with as many CTAs as are resident
    // (the analog kernel with side products: one per multiprocessor).
    let tiles = (pairs.div_ceil(TILE_ROWS) + m.n_experts) * (m.n_cols / tile.cols);
    let block = (threads, 1, 1);
    let persistent = tiles.min(match tile.ctas {
        0 => dev.sm_count() as usize,
        c => c,
    });
    let grid = match tile.pipe {
        _ if variant.analog => {
            if variant.side_products() {
                persistent
            } else {
                tiles
            }
        }
        0 | 1 => tiles,
        2 => persistent,
        _ => {
            let clusters = match tile.ctas {
                0 => max_active_clusters(dev, &f, block, shared)?,
                c => c.div_ceil(2),
            };
            2 * clusters.min(tiles.div_ceil(2))
        }
    };
    let cfg = LaunchConfig {
        grid_dim: (grid.max(tile.cluster()) as u32, 1, 1),
        block_dim: block,
        shared_mem_bytes: shared,
    };
    if variant.analog && tile.pipe == 2 {
        // TMA stages: the operand in sorted-pair order (hidden rows already are; the DAC codes
        // of the first GEMM are one row per token, gathered here) and the weights.
        if pairs == 0 {
            // No rows: every CTA would return at once (and a tensor map has no empty extent).
            return Ok(());
        }
        let sorted = match params.a_row_of {
            0 => None,
            _ => Some(sorted_operand(dev, params.a, routing, m.k)?),
        };
        let a = sorted
            .as_ref()
            .map_or(params.a, |b| b.device_ptr(dev.stream()).0);
        let a_map = operand_tensor_map(a, pairs, m.k)?;
        let w_map = weight_tensor_map(m, tile)?;
        dev.launch(&f, name, cfg, |b| {
            b.arg(params).arg(&a_map).arg(&w_map);
        })
        // `sorted` is freed in stream order, after the GEMM that reads it.
    } else if tile.pipe >= 2 {
        let map = weight_tensor_map(m, tile)?;
        dev.launch(&f, name, cfg, |b| {
            b.arg(params).arg(&map);
        })
    } else {
        dev.launch(&f, name, cfg, |b| {
            b.arg(params);
        })
    }
}

/// The first GEMM's operand (`a`: one row of `k` fp16 DAC codes per token) in sorted-pair
/// order, row p that of pair p's token (`gather_rows` in kernels/dac.cuh): TMA cannot gather.
fn sorted_operand(
    dev: &CudaDevice,
    a: u64,
    routing: &GpuRouting,
    k: usize,
) -> CudaResult<CudaSlice<u16>> {
    let pairs = routing.n_tokens * routing.top_k;
    let mut out = dev.scratch::<u16>(pairs * k)?;
    let f = dev.function(&MOE_CU, &[], "gather_rows")?;
    let (rows, k32) = (pairs as u32, k as u32);
    dev.launch(
        &f,
        "gather_rows",
        linear_launch((pairs * k / 8) as u64),
        |b| {
            b.arg(&a)
                .arg(&routing.sorted_token)
                .arg(&rows)
                .arg(&k32)
                .arg(&mut out);
        },
    )?;
    Ok(out)
}

/// Clusters of `f` (compiled with `__cluster_dims__`) that can be resident at once with
/// `block` threads and `shared` bytes each: the grid of a persistent clustered kernel (a
/// GPC's SMs pair up, so this can be below half the SMs).
fn max_active_clusters(
    dev: &CudaDevice,
    f: &CudaFunction,
    block: (u32, u32, u32),
    shared: u32,
) -> CudaResult<usize> {
    use cudarc::driver::sys;
    let config = sys::CUlaunchConfig {
        gridDimX: 2 * dev.sm_count(),
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: shared,
        hStream: dev.stream().cu_stream(),
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `config` names no attributes; `f` is a loaded function of this context.
    let r = unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) };
    r.result().map_err(|source| CudaError::Driver {
        what: "querying how many 2-CTA clusters of moe_gemm_wgmma fit at once".into(),
        source,
    })?;
    if n < 1 {
        return Err(CudaError::Unsupported(format!(
            "no 2-CTA cluster of moe_gemm_wgmma ({} threads, {shared} B of shared memory) fits \
             on {}",
            block.0,
            dev.name()
        )));
    }
    Ok(n as usize)
}
