//! The crossbars of one fine-tuning step on the GPU: the current weights mapped (s_map from
//! their maxima, as `tile::crossbar`'s `map_weights`), programmed with the step's noise and
//! read out at the training time, as `AnalogMatrix::program_with_device` and `drift_to` do on
//! the CPU. Programming, drift and the GDC readout are the eval's own ([`DriftSource`]); what
//! is new here is that the mapping scale, the target conductance scale and (`global_exact`)
//! the GDC reference follow the weights, which change every step.
use std::sync::Arc;

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::super::compile::{FINETUNE_CU, PROGRAM_CU};
use super::super::experts::Lap;
use super::super::gemm::Precision;
use super::super::grouped::GpuGroupedMatrix;
use super::super::programmed::{DigitalWeights, DriftSource, Run};
use super::super::{linear_launch, row_launch, CudaDevice, CudaError, CudaResult};
use crate::tile::{DriftCompensation, MappingSpec, GDC_REFERENCE_MVM_ID};

/// The device weights `[E, N, K]` of a source the trainer built (always on the device).
pub(crate) fn weights(src: &DriftSource) -> CudaResult<&CudaSlice<f32>> {
    match &src.w {
        DigitalWeights::Device(w) => Ok(w),
        DigitalWeights::Host(..) => Err(CudaError::Unsupported(
            "fine-tuning keeps its weights on the device".into(),
        )),
    }
}

/// [`weights`], mutable (Adam's update).
pub(crate) fn weights_mut(src: &mut DriftSource) -> CudaResult<&mut CudaSlice<f32>> {
    match &mut src.w {
        DigitalWeights::Device(w) => Ok(w),
        DigitalWeights::Host(..) => Err(CudaError::Unsupported(
            "fine-tuning keeps its weights on the device".into(),
        )),
    }
}

/// s_map per `[E, KB, N]` of the current weights: max |W| over each column's row segment of
/// its crossbar (per-column mapping) or over the whole crossbar, divided by ω, 1 where 0.
fn map_scales(
    dev: &CudaDevice,
    src: &DriftSource,
    mapping: &MappingSpec,
) -> CudaResult<CudaSlice<f32>> {
    let w = weights(src)?;
    let m = &src.tables;
    let (n, k, kb) = (m.n_cols, m.k, m.k_block);
    let n_kb = k / kb;
    let entries = m.n_experts * n_kb * n;
    let mut s_map = dev.scratch::<f32>(entries)?;
    let (n32, nkb32, kb32, nx32) = (n as u32, n_kb as u32, kb as u32, m.n_xbar as u32);
    let len = entries as u64;
    let omega = mapping.weight_scaling_omega;
    let null = 0u64;
    // The maxima: per column segment, or per crossbar (f32 bits, atomics).
    enum Maxima {
        Segments(CudaSlice<f32>),
        Crossbars(CudaSlice<u32>),
    }
    let maxima = if mapping.per_column {
        let mut seg = dev.scratch::<f32>(entries)?;
        let f = dev.function(&FINETUNE_CU, &[], "ft_segment_abs_max")?;
        // One warp per segment.
        dev.launch(&f, "ft_segment_abs_max", linear_launch(32 * len), |b| {
            b.arg(w)
                .arg(&n32)
                .arg(&nkb32)
                .arg(&kb32)
                .arg(&len)
                .arg(&mut seg);
        })?;
        Maxima::Segments(seg)
    } else {
        let groups = m.n_experts * n_kb;
        let mut bits = dev.zeros::<u32>(groups * m.n_xbar)?;
        let f = dev.function(&PROGRAM_CU, &[], "crossbar_abs_max")?;
        let k32 = k as u32;
        dev.launch(
            &f,
            "crossbar_abs_max",
            row_launch(m.n_experts * n, k, 8)?,
            |b| {
                b.arg(w)
                    .arg(&null)
                    .arg(&n32)
                    .arg(&k32)
                    .arg(&kb32)
                    .arg(&*src.dev_tables.col_xbar)
                    .arg(&nx32)
                    .arg(&mut bits);
            },
        )?;
        Maxima::Crossbars(bits)
    };
    let f = dev.function(&FINETUNE_CU, &[], "ft_map_scales")?;
    dev.launch(&f, "ft_map_scales", linear_launch(len), |b| {
        // Exactly one of the two maxima arrays, the other a null pointer.
        match &maxima {
            Maxima::Segments(seg) => b.arg(seg).arg(&null),
            Maxima::Crossbars(bits) => b.arg(&null).arg(bits),
        };
        b.arg(&*src.dev_tables.col_xbar)
            .arg(&n32)
            .arg(&nx32)
            .arg(&len)
            .arg(&omega)
            .arg(&mut s_map);
    })?;
    Ok(s_map)
}

/// Maps the current weights of `src` (s_map, the target conductance scale per crossbar and
/// the `global_exact` GDC reference) and forgets the previous step's programmed state.
fn remap(
    run: Run<'_>,
    src: &mut DriftSource,
    mapping: &MappingSpec,
    lap: Lap<'_>,
) -> CudaResult<()> {
    let dev = run.dev;
    let s_map = Arc::new(map_scales(dev, src, mapping)?);
    src.g_target =
        src.crossbar_scales(dev, weights(src)?, Some(&*s_map), run.device.pcm.g_max_us)?;
    src.s_map = s_map;
    if run.device.compensation == DriftCompensation::GlobalExact {
        // mean |W/s_map| per crossbar, as tile::Crossbar takes it from its target weights.
        let m = &src.tables;
        let len = m.n_experts * m.n_cols * m.k;
        let mut target = dev.scratch::<f32>(len)?;
        let f = dev.function(&FINETUNE_CU, &[], "ft_divide_by_scale")?;
        let (len64, n32, k32, kb32) = (len as u64, m.n_cols as u32, m.k as u32, m.k_block as u32);
        dev.launch(&f, "ft_divide_by_scale", linear_launch(len64), |b| {
            b.arg(weights(src).expect("checked by map_scales"))
                .arg(&*src.s_map)
                .arg(&len64)
                .arg(&n32)
                .arg(&k32)
                .arg(&kb32)
                .arg(&mut target);
        })?;
        let means = src.gdc_means(run, &target, None, GDC_REFERENCE_MVM_ID, lap)?;
        src.host_gdc_ref = dev.download(&means)?;
    }
    src.programmed = None;
    src.seed_scales = None;
    lap("mapping: s_map, target scales")
}

/// The operands of `src`'s current weights for one step: mapped, programmed under `run.seed`
/// and read out `drift_s` seconds after programming (drift, read noise, GDC α in the digital
/// scales), or right after programming (`None`: W̃_prog rounded to binary16, α = 1), as
/// `finetune::noisy::CpuObjective` programs its crossbars.
pub(crate) fn step_operands(
    run: Run<'_>,
    src: &mut DriftSource,
    mapping: &MappingSpec,
    drift_s: Option<f64>,
    lap: Lap<'_>,
) -> CudaResult<GpuGroupedMatrix> {
    remap(run, src, mapping, lap)?;
    match drift_s {
        Some(t) => src.drifted(run, t, lap),
        None => {
            let programmed = src.program_weights(run, lap)?;
            // to_f16 rounds to nearest even: the binary16 rounding tile::Crossbar applies to
            // W̃_prog before any drift.
            GpuGroupedMatrix::from_device_parts(
                run.dev,
                &src.tables,
                &programmed.w_prog,
                Precision::AnalogF16,
                &src.dev_tables,
                Arc::clone(&src.s_map),
            )
        }
    }
}
