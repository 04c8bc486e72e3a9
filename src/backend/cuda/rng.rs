//! Philox streams on the GPU (`kernels/rng.cu`), bit-compatible with [`crate::rng::Stream`].
use cudarc::driver::{CudaSlice, PushKernelArg};

use super::compile::RNG_CU;
use super::{linear_launch, CudaDevice, CudaResult};
use crate::rng::Purpose;

/// Normals `start .. start + n` of stream (seed, purpose, tensor_id) at (mvm_id, attempt) on
/// the device, bit-identical to [`crate::rng::Stream::fill_normal`] (`kernels/philox.cuh` mirrors
/// `rng::normal::NormalTable::normal` with the same table and one `__fmaf_rn`).
#[allow(clippy::too_many_arguments)]
pub fn fill_normal(
    dev: &CudaDevice,
    seed: u64,
    purpose: Purpose,
    tensor_id: u32,
    start: u64,
    n: usize,
    mvm_id: u32,
    attempt: u8,
) -> CudaResult<CudaSlice<f32>> {
    let f = dev.function(&RNG_CU, &[], "fill_normal")?;
    let mut out = dev.scratch::<f32>(n)?;
    let (n64, purpose, attempt) = (n as u64, purpose as u32, u32::from(attempt));
    dev.launch(&f, "fill_normal", linear_launch(n64), |b| {
        b.arg(&mut out)
            .arg(&n64)
            .arg(&seed)
            .arg(&purpose)
            .arg(&tensor_id)
            .arg(&start)
            .arg(&mvm_id)
            .arg(&attempt);
    })?;
    Ok(out)
}

/// Uniforms `start .. start + n` (bit-identical to [`crate::rng::Stream::uniform`]).
pub fn fill_uniform(
    dev: &CudaDevice,
    seed: u64,
    purpose: Purpose,
    tensor_id: u32,
    start: u64,
    n: usize,
    mvm_id: u32,
) -> CudaResult<CudaSlice<f32>> {
    let f = dev.function(&RNG_CU, &[], "fill_uniform")?;
    let mut out = dev.scratch::<f32>(n)?;
    let (n64, purpose) = (n as u64, purpose as u32);
    dev.launch(&f, "fill_uniform", linear_launch(n64), |b| {
        b.arg(&mut out)
            .arg(&n64)
            .arg(&seed)
            .arg(&purpose)
            .arg(&tensor_id)
            .arg(&start)
            .arg(&mvm_id);
    })?;
    Ok(out)
}
