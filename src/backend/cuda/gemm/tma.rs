//! TMA descriptors of the wgmma GEMMs: the `CUtensorMap`s (`TmaMap` in
//! `kernels/gemm_wgmma.cuh`) of a grouped matrix's weights and of an operand in sorted-pair
//! order, in the 128-byte-swizzled boxes of 64 K values that the kernels request (the layout
//! `wg_swizzle` writes and the wgmma descriptors read). The warp-specialised digital kernel
//! takes the weights' map; the analog kernel with TMA stages (`pipe` 2) takes both.

use cudarc::driver::{DevicePtr, DeviceRepr};

use super::tile::{WgmmaTile, TILE_ROWS, WGMMA_TILE_K};
use crate::backend::cuda::grouped::GpuGroupedMatrix;
use crate::backend::cuda::{CudaError, CudaResult};

/// A `CUtensorMap` as the kernel parameter `TmaMap` (128 opaque bytes, 64-byte aligned).
#[repr(C, align(64))]
pub(crate) struct TmaMap([u64; 16]);
// SAFETY: plain bytes, passed by value as the kernel's `const __grid_constant__ TmaMap`.
unsafe impl DeviceRepr for TmaMap {}

/// The TMA descriptor of `m`'s weights (bf16, or the analog layers' fp16) as a `[E·N, K]`
/// matrix, boxes of 64 K values × the rows one CTA loads per stage (`cols`, or half of them
/// when a cluster of two shares the tile).
pub(crate) fn weight_tensor_map(m: &GpuGroupedMatrix, tile: WgmmaTile) -> CudaResult<TmaMap> {
    let (ptr, _sync) = m.w.device_ptr(m.w.stream());
    let what = if m.precision.analog() {
        "fp16 weight"
    } else {
        "bf16 weight"
    };
    tensor_map(
        ptr,
        m.n_experts * m.n_cols,
        m.k,
        tile.cols / tile.cluster(),
        m.precision.analog(),
        what,
    )
}

/// The TMA descriptor of an analog operand at device address `a`: `rows` sorted pairs × `k`
/// fp16 values (DAC codes or hidden rows), boxes of 64 K values × the 128 rows of a CTA tile.
/// Rows past the last read as zeros. The caller keeps the buffer alive through the launch.
pub(crate) fn operand_tensor_map(a: u64, rows: usize, k: usize) -> CudaResult<TmaMap> {
    tensor_map(a, rows, k, TILE_ROWS, true, "fp16 operand")
}

/// A 2-D `[rows, k]` map of 2-byte values at `ptr`, 128-byte swizzle, boxes of
/// [`WGMMA_TILE_K`] × `box_rows`.
fn tensor_map(
    ptr: u64,
    rows: usize,
    k: usize,
    box_rows: usize,
    fp16: bool,
    what: &str,
) -> CudaResult<TmaMap> {
    use cudarc::driver::sys;
    let dims = [k as u64, rows as u64];
    let strides = [(k * 2) as u64];
    let boxes = [WGMMA_TILE_K as u32, box_rows as u32];
    let elem_strides = [1u32, 1];
    let dtype = if fp16 {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    } else {
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    };
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank (2) entries the call reads; the caller's buffer
    // outlives the launch that uses the map.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
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
            "encoding the TMA descriptor of a [{rows}, {k}] {what} matrix (box {boxes:?})"
        ),
        source,
    })?;
    // SAFETY: initialised by the successful call above.
    let map = unsafe { map.assume_init() };
    let mut out = TmaMap([0; 16]);
    out.0.copy_from_slice(&map.opaque);
    Ok(out)
}
