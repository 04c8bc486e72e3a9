//! TMA descriptors of the warp-specialised wgmma GEMM: the `CUtensorMap` of a grouped matrix's
//! bf16 weights in the 128-byte-swizzled boxes the kernel's loading warpgroup requests
//! (`TmaMap` in `kernels/gemm_wgmma.cuh`).

use cudarc::driver::{DevicePtr, DeviceRepr};

use super::tile::{WgmmaTile, WGMMA_TILE_K};
use crate::backend::cuda::grouped::GpuGroupedMatrix;
use crate::backend::cuda::{CudaError, CudaResult};

/// A `CUtensorMap` as the kernel parameter `TmaMap` (128 opaque bytes, 64-byte aligned).
#[repr(C, align(64))]
pub(crate) struct TmaMap([u64; 16]);
// SAFETY: plain bytes, passed by value as the kernel's `const __grid_constant__ TmaMap`.
unsafe impl DeviceRepr for TmaMap {}

/// The TMA descriptor of `m`'s bf16 weights as a `[E·N, K]` matrix, boxes of 64 K values ×
/// the rows one CTA loads per stage (`cols`, or half of them when a cluster of two shares the
/// tile), 128-byte swizzle (the layout `wg_swizzle` writes and the wgmma descriptors read).
pub(crate) fn weight_tensor_map(m: &GpuGroupedMatrix, tile: WgmmaTile) -> CudaResult<TmaMap> {
    use cudarc::driver::sys;
    let rows = (m.n_experts * m.n_cols) as u64;
    let dims = [m.k as u64, rows];
    let strides = [(m.k * 2) as u64];
    let boxes = [WGMMA_TILE_K as u32, (tile.cols / tile.cluster()) as u32];
    let elem_strides = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let (ptr, _sync) = m.w.device_ptr(m.w.stream());
    // SAFETY: every array has the rank (2) entries the call reads; the weights outlive the
    // launch that uses the map (they belong to `m`).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    r.result().map_err(|source| CudaError::Driver {
        what: format!(
            "encoding the TMA descriptor of a [{rows}, {}] bf16 weight matrix (box {boxes:?})",
            m.k
        ),
        source,
    })?;
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    let mut out = TmaMap([0; 16]);
    out.0.copy_from_slice(&map.opaque);
    Ok(out)
}
