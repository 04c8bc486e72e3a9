//! Launch of the mma.sync grouped GEMM `moe_gemm` (`kernels/gemm_mma.cuh`, any sm_80+ GPU):
//! one CTA per (expert, row tile, column tile) of the routing, ldmatrix + m16n8k16 MMAs with
//! cp.async pipelining. The kernel mirrors `tile::AnalogMatrix::mvm` per crossbar block
//! (analog) or a bf16 GEMM with f32 accumulation (digital).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::allow_dynamic_shared;
use super::tile::{GemmTile, TILE_ROWS};
use super::GemmParams;
use crate::backend::cuda::compile::MOE_CU;
use crate::backend::cuda::grouped::GpuGroupedMatrix;
use crate::backend::cuda::{CudaDevice, CudaResult};

/// One `moe_gemm` launch of `defines` on `tile` over the sorted rows (`pairs` of them).
pub(crate) fn mma_sync_gemm(
    dev: &CudaDevice,
    m: &GpuGroupedMatrix,
    pairs: usize,
    defines: &[(&'static str, i64)],
    tile: GemmTile,
    params: &GemmParams,
) -> CudaResult<()> {
    // The stages, and the running total where the variant keeps it in shared memory (checked
    // against the limit with the tile, GemmTile::choose).
    let shared = tile.shared_bytes(defines.contains(&("MOE_TOTAL_SMEM", 1))) as u32;
    let f = dev.function(&MOE_CU, defines, "moe_gemm")?;
    let threads = tile.threads() as u32;
    allow_dynamic_shared(&f, "moe_gemm", threads, shared)?;
    // One CTA per (row tile, column tile), column tile fastest; an upper bound on the row
    // tiles (CTAs past the last tile return at once).
    let cfg = LaunchConfig {
        grid_dim: (
            ((pairs.div_ceil(TILE_ROWS) + m.n_experts) * (m.n_cols / tile.cols)) as u32,
            1,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared,
    };
    dev.launch(&f, "moe_gemm", cfg, |b| {
        b.arg(params);
    })
}
