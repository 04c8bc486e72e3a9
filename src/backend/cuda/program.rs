//! Programming, drift and read noise of PCM-family crossbars on the GPU (`kernels/program.cu`),
//! with the Philox keys of [`crate::tile::Crossbar`]: the same seed and tensor id give the same
//! devices as the CPU, for models too large to program on the host.
use cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};

use super::compile::PROGRAM_CU;
use super::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::device::{DeviceSpec, DriftModel, PcmLike, ReadNoiseModel, WeightConverter};

/// Device parameters as the kernels read them (layout of `PcmParams` in `kernels/program.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PcmParams {
    g_max_us: f32,
    prog_coeffs: [f32; 4],
    n_prog_coeffs: u32,
    prog_coeff_g_max_reference_us: f32,
    drift_model: u32,
    nu_const_mean: f32,
    nu_const_std: f32,
    read_model: u32,
    prog_noise_scale: f32,
    read_noise_scale: f32,
    drift_scale: f32,
}

// SAFETY: plain `repr(C)` data matching the CUDA struct field for field.
unsafe impl DeviceRepr for PcmParams {}

impl PcmParams {
    /// Kernel parameters of `pcm`; drift tables (custom drift) are not supported on the GPU.
    pub fn new(pcm: &PcmLike) -> CudaResult<Self> {
        if pcm.prog_coeffs.is_empty() || pcm.prog_coeffs.len() > 4 {
            return Err(CudaError::Unsupported(format!(
                "device `{}`: the GPU kernels take 1..=4 programming-noise coefficients, got {}",
                pcm.name,
                pcm.prog_coeffs.len()
            )));
        }
        let mut prog_coeffs = [0.0; 4];
        prog_coeffs[..pcm.prog_coeffs.len()].copy_from_slice(&pcm.prog_coeffs);
        let (drift_model, nu_const_mean, nu_const_std) = match &pcm.drift {
            DriftModel::Aihwkit => (0, 0.0, 0.0),
            DriftModel::Hermes => (1, 0.0, 0.0),
            DriftModel::Constant { mean, std } => (2, *mean, *std),
            DriftModel::Table(_) => {
                return Err(CudaError::Unsupported(format!(
                    "device `{}`: drift tables are not supported by the CUDA backend (use --backend cpu)",
                    pcm.name
                )))
            }
        };
        let read_model = match pcm.read_noise {
            ReadNoiseModel::Aihwkit => 0,
            ReadNoiseModel::Hermes => 1,
            ReadNoiseModel::StateIndependent => 2,
        };
        Ok(Self {
            g_max_us: pcm.g_max_us,
            prog_coeffs,
            n_prog_coeffs: pcm.prog_coeffs.len() as u32,
            prog_coeff_g_max_reference_us: pcm.prog_coeff_g_max_reference_us,
            drift_model,
            nu_const_mean,
            nu_const_std,
            read_model,
            prog_noise_scale: pcm.prog_noise_scale,
            read_noise_scale: pcm.read_noise_scale,
            drift_scale: pcm.drift_scale,
        })
    }
}

/// One programmed crossbar block on the GPU: normalised weights as
/// [`crate::tile::Crossbar::programmed_weights`] / [`crate::tile::Crossbar::weights`] hold them.
pub struct GpuProgrammedBlock {
    pcm: PcmLike,
    params: PcmParams,
    seed: u64,
    tensor_id: u32,
    len: usize,
    /// Programmed net weights W̃_prog (normalised units).
    pub w_prog: CudaSlice<f32>,
    /// Drift exponents ν, `[2·len]` (device d of element i at 2i + d).
    pub nu: CudaSlice<f32>,
    /// Conductance scale of the re-converted programmed weights, µS per normalised unit.
    pub g_scale_us: f32,
}

impl GpuProgrammedBlock {
    /// Program `w_target` (normalised block weights W/s_map, row-major `[n_out, n_in]`) as
    /// `Crossbar::program` does for a PCM-family `device` with the same seed and tensor id.
    pub fn program(
        dev: &CudaDevice,
        device: &DeviceSpec,
        w_target: &[f32],
        seed: u64,
        tensor_id: u32,
    ) -> CudaResult<Self> {
        let pcm = device.pcm_like().ok_or_else(|| {
            CudaError::Unsupported(format!(
                "device kind `{}`: GPU programming supports the PCM family only",
                device.kind
            ))
        })?;
        let params = PcmParams::new(&pcm)?;
        let converter = WeightConverter::DifferentialPair {
            g_max_us: pcm.g_max_us,
        };
        let len = w_target.len();
        let abs_max = w_target.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let g_scale_target = converter.scale(abs_max);
        let target = dev.upload(w_target)?;
        let mut w_prog = dev.scratch::<f32>(len)?;
        let mut nu = dev.scratch::<f32>(2 * len)?;
        let f = dev.function(&PROGRAM_CU, &[], "program_weights")?;
        let n = len as u64;
        dev.launch(&f, "program_weights", linear_launch(n), |b| {
            b.arg(&target)
                .arg(&mut w_prog)
                .arg(&mut nu)
                .arg(&n)
                .arg(&seed)
                .arg(&tensor_id)
                .arg(&g_scale_target)
                .arg(&params);
        })?;
        let g_scale_us = converter.scale(abs_max_gpu(dev, &w_prog)?);
        Ok(Self {
            pcm,
            params,
            seed,
            tensor_id,
            len,
            w_prog,
            nu,
            g_scale_us,
        })
    }

    /// Weights W̃(t) after drift and read noise at `t_seconds` (as `Crossbar::drift_to`).
    pub fn drift_to(&self, dev: &CudaDevice, t_seconds: f64) -> CudaResult<CudaSlice<f32>> {
        let ratio = self.pcm.drift_time_ratio(t_seconds);
        let time_factor = self.pcm.read_noise_time_factor(t_seconds);
        let mut w = dev.scratch::<f32>(self.len)?;
        let f = dev.function(&PROGRAM_CU, &[], "drift_weights")?;
        let n = self.len as u64;
        dev.launch(&f, "drift_weights", linear_launch(n), |b| {
            b.arg(&self.w_prog)
                .arg(&self.nu)
                .arg(&mut w)
                .arg(&n)
                .arg(&self.seed)
                .arg(&self.tensor_id)
                .arg(&self.g_scale_us)
                .arg(&ratio)
                .arg(&time_factor)
                .arg(&self.params);
        })?;
        Ok(w)
    }
}

/// max |x| of a device buffer (one pass, atomic max over IEEE bits).
pub fn abs_max_gpu(dev: &CudaDevice, x: &CudaSlice<f32>) -> CudaResult<f32> {
    let f = dev.function(&PROGRAM_CU, &[], "abs_max")?;
    let mut bits = dev.zeros::<u32>(1)?;
    let n = x.len() as u64;
    let mut cfg = linear_launch(n);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
    dev.launch(&f, "abs_max", cfg, |b| {
        b.arg(x).arg(&n).arg(&mut bits);
    })?;
    Ok(f32::from_bits(dev.download(&bits)?[0]))
}
