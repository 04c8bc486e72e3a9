//! One R×C crossbar block with its periphery (docs/model.md §2–§3).
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use ndarray::{linalg::general_mat_mul, s, Array2, ArrayView2, ArrayViewMut1, ArrayViewMut2, Zip};
use rayon::prelude::*;

use super::kernel::{self, Packed, RowNoise};
use super::operand::{round_to_binary16, to_binary16};
use super::preset::{
    DriftCompensation, IrDrop, NoiseManagement, PeripherySpec, TilePreset, WeightNoise,
};
use crate::device::{Device, WeightConverter};
use crate::rng::{Purpose, Stream};

/// Batch rows per rayon task. Fixed (not derived from the thread count) so that results are
/// bit-identical for any number of threads; large enough that matrixmultiply's packing of W̃
/// (repeated per GEMM call) stays negligible (64-row chunks measured 2.3× slower per GEMM).
const CHUNK_ROWS: usize = 256;

/// MVM id of the GDC reference forward taken right after programming. Callers' MVM ids must
/// stay below [`GDC_READOUT_MVM_ID`].
pub const GDC_REFERENCE_MVM_ID: u32 = u32::MAX;
/// MVM id of the GDC readout forward taken at every drift time.
pub const GDC_READOUT_MVM_ID: u32 = u32::MAX - 1;

/// AIHWKIT `GlobalDriftCompensation` floor of the readout mean |Y| (docs/model.md §2).
pub const GDC_MIN_READOUT: f32 = 1e-4;

/// mean |x| of a GDC readout, accumulated in f64 and rounded once to f32: a sequential f32 sum
/// over a 512×512 readout drifts by up to ~1e-4 relative, the f64 one by ~1e-13, so another
/// summation order (the CUDA backend's, `GpuExperts::drift_to`) gives the same α.
fn mean_abs_f64<'a>(x: impl ExactSizeIterator<Item = &'a f32>) -> f32 {
    let n = x.len();
    (x.map(|v| f64::from(v.abs())).sum::<f64>() / n as f64) as f32
}

/// [`mean_abs_f64`] of every element of `a`.
fn mean_abs(a: ndarray::ArrayView2<'_, f32>) -> f32 {
    match a.as_slice() {
        Some(s) => mean_abs_f64(s.iter()),
        None => mean_abs_f64(a.iter().collect::<Vec<_>>().into_iter()),
    }
}

/// A programmed R×C block: weights live as normalised conductance-derived values W̃ (`[n_out,
/// n_in]`, PyTorch layout), the periphery converts inputs and outputs (docs/model.md §3).
///
/// Lifecycle: [`Crossbar::program`] (programming noise, drift exponents, GDC reference) →
/// [`Crossbar::drift_to`] (drift + read noise at t, GDC α) → any number of [`Crossbar::mvm`]
/// calls from any threads.
#[derive(Clone, Debug)]
pub struct Crossbar {
    n_out: usize,
    n_in: usize,
    seed: u64,
    tensor_id: u32,
    device: Arc<dyn Device>,
    converter: WeightConverter,
    periphery: PeripherySpec,
    drift_compensation: DriftCompensation,
    /// Mapping scale s_map per output (equal entries when one scale per block), weight units.
    map_scale: Vec<f32>,
    /// Programmed net weights, normalised units (AIHWKIT re-converts these before drift).
    w_prog: Array2<f32>,
    /// Drift parameter ν per device of the pair, `[n_out, n_in]` each.
    nu: Vec<Array2<f32>>,
    /// Conductance scale (µS per normalised unit) of the re-converted programmed weights.
    g_scale_us: f32,
    /// Current weights W̃ (programmed or drifted), normalised units, rounded to binary16
    /// (docs/model.md §3, [`super::operand`]).
    w: Array2<f32>,
    /// |W̃|, kept when IR drop or PCM_READ noise need it.
    abs_w: Option<Array2<f32>>,
    /// [W̃; W̃∘F] (`[2·n_out, n_in]`, F_j = 1 − (1 − j/n)²), kept when IR drop is on.
    w_ir: Option<Array2<f32>>,
    /// GDC reference mean |Y₀| (one entry, or one per column).
    gdc_ref: Vec<f32>,
    /// GDC output factor α (one entry, or one per column).
    gdc_alpha: Vec<f32>,
    /// Inference time of the last [`Crossbar::drift_to`], `None` right after programming.
    t_seconds: Option<f64>,
}

impl Crossbar {
    /// Program `w` (`[n_out, n_in]`, weight units) onto one block of `preset`.
    ///
    /// Random draws are keyed by `(seed, purpose, tensor_id)` so any block can be reproduced in
    /// isolation. Errors on an empty or oversized matrix and on non-finite weights.
    pub fn program(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        seed: u64,
        tensor_id: u32,
    ) -> Result<Self> {
        validate_preset(preset)?;
        Self::program_with_device(w, preset, preset.device.build(), seed, tensor_id)
    }

    /// [`Crossbar::program`] with a caller-supplied device model, for a technology that is not a
    /// [`crate::device::DeviceSpec`] kind; the preset's `device` section is not used.
    pub fn program_with_device(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        device: Arc<dyn Device>,
        seed: u64,
        tensor_id: u32,
    ) -> Result<Self> {
        let (n_out, n_in) = w.dim();
        let (map_scale, w_target) = map_weights(w, preset, tensor_id)?;
        let converter = WeightConverter::for_device(device.as_ref());
        let g_scale_target = converter.scale(max_abs(&w_target));
        let n_dev = converter.devices_per_weight();
        let prog = Stream::new(seed, Purpose::ProgramNoise, tensor_id);
        let drift = Stream::new(seed, Purpose::DriftExponent, tensor_id);
        let mut w_prog = Array2::<f32>::zeros((n_out, n_in));
        let mut nu_flat = vec![0.0f32; n_out * n_in * n_dev];
        w_prog
            .as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(n_in)
            .zip(nu_flat.par_chunks_mut(n_in * n_dev))
            .enumerate()
            .for_each(|(i, (wp, nu))| {
                let base = 2 * (i * n_in) as u64;
                let mut xi_p = vec![0.0f32; 2 * n_in];
                let mut xi_d = vec![0.0f32; 2 * n_in];
                prog.fill_normal(base, 0, 0, &mut xi_p);
                drift.fill_normal(base, 0, 0, &mut xi_d);
                for j in 0..n_in {
                    let g_t = converter.to_conductances(w_target[[i, j]], g_scale_target);
                    let mut g_p = [0.0f32; 2];
                    for d in 0..n_dev {
                        g_p[d] = device.program(g_t[d], xi_p[2 * j + d]);
                        nu[j * n_dev + d] = device.drift_exponent(g_t[d], xi_d[2 * j + d]);
                    }
                    wp[j] = converter.to_weight(g_p, g_scale_target);
                }
            });
        let nu = (0..n_dev)
            .map(|d| {
                Array2::from_shape_fn((n_out, n_in), |(i, j)| nu_flat[(i * n_in + j) * n_dev + d])
            })
            .collect();
        let mut xbar = Self::assemble(
            preset,
            device,
            converter,
            (seed, tensor_id),
            map_scale,
            w_prog,
            nu,
        );
        xbar.gdc_ref = match xbar.drift_compensation {
            DriftCompensation::None => Vec::new(),
            DriftCompensation::Global | DriftCompensation::GlobalPerColumn => {
                xbar.gdc_readout(GDC_REFERENCE_MVM_ID)
            }
            DriftCompensation::GlobalExact => {
                vec![mean_abs(w_target.view())]
            }
        };
        xbar.gdc_alpha = vec![1.0; xbar.gdc_ref.len().max(1)];
        Ok(xbar)
    }

    /// The layout of the crossbar `program` would build for `w`: its shape, tensor id, mapping
    /// scales s_map, the target conductance scale and the preset's `global_exact` GDC reference
    /// (no reference under `global` / `global_per_column`: it is a noisy readout of programmed
    /// devices; α stays 1). It holds no weight arrays (no W̃, ν, |W̃|: [`Crossbar::memory_bytes`]
    /// is 0) and draws no random numbers. For backends that program the devices themselves from
    /// the digital weights and need only the block layout (the CUDA backend's
    /// `GpuExperts::program`), so that a large model's host memory holds its weights once.
    ///
    /// [`Crossbar::mvm`] and [`Crossbar::drift_to`] panic on a layout ([`Crossbar::is_layout`]);
    /// its weight views are empty.
    pub fn layout(
        w: ArrayView2<f32>,
        preset: &TilePreset,
        device: Arc<dyn Device>,
        seed: u64,
        tensor_id: u32,
    ) -> Result<Self> {
        let (map_scale, w_target) = map_weights(w, preset, tensor_id)?;
        let converter = WeightConverter::for_device(device.as_ref());
        let (n_out, n_in) = w_target.dim();
        let g_scale_us = converter.scale(max_abs(&w_target));
        let gdc_ref = match preset.drift_compensation {
            DriftCompensation::GlobalExact => vec![mean_abs(w_target.view())],
            _ => Vec::new(),
        };
        let empty = || Array2::<f32>::zeros((0, 0));
        let nu = vec![empty(); converter.devices_per_weight()];
        let mut xbar = Self::assemble(
            preset,
            device,
            converter,
            (seed, tensor_id),
            map_scale,
            empty(),
            nu,
        );
        (xbar.n_out, xbar.n_in, xbar.g_scale_us, xbar.gdc_ref) = (n_out, n_in, g_scale_us, gdc_ref);
        Ok(xbar)
    }

    /// Whether this is a [`Crossbar::layout`] (no devices programmed, no weight arrays).
    pub fn is_layout(&self) -> bool {
        self.w.is_empty()
    }

    /// Panics on a layout: a caller bug (running a backend's placeholder), not a data error.
    fn assert_programmed(&self, what: &str) {
        assert!(
            !self.is_layout(),
            "tensor {}: {what} a crossbar layout, which holds no conductances (program it first)",
            self.tensor_id
        );
    }

    /// The crossbar right after programming: programmed weights `w_prog` (normalised units),
    /// drift exponents `nu` (one array per device of a weight), the conductance scale of
    /// `w_prog`, no GDC reference yet (α = 1); the caller takes the reference.
    fn assemble(
        preset: &TilePreset,
        device: Arc<dyn Device>,
        converter: WeightConverter,
        (seed, tensor_id): (u64, u32),
        map_scale: Vec<f32>,
        w_prog: Array2<f32>,
        nu: Vec<Array2<f32>>,
    ) -> Self {
        let (n_out, n_in) = w_prog.dim();
        let mut xbar = Self {
            n_out,
            n_in,
            seed,
            tensor_id,
            device,
            converter,
            periphery: preset.periphery,
            drift_compensation: preset.drift_compensation,
            map_scale,
            w: {
                let mut w = w_prog.clone();
                round_to_binary16(w.as_slice_mut().expect("standard layout"));
                w
            },
            g_scale_us: converter.scale(max_abs(&w_prog)),
            w_prog,
            nu,
            abs_w: None,
            w_ir: None,
            gdc_ref: Vec::new(),
            gdc_alpha: vec![1.0],
            t_seconds: None,
        };
        xbar.refresh_derived();
        xbar
    }

    /// Drift every device to `t_seconds` after programming: re-convert the programmed net
    /// weights (AIHWKIT `apply_drift_noise`), apply drift and read noise, round W̃ to binary16,
    /// recompute α.
    ///
    /// The read-noise normal of each device is keyed by the device alone, not by the time: the
    /// result does not depend on earlier calls, and one device's trajectory over time is smooth
    /// (AIHWKIT draws a fresh normal per call instead; the distribution at each t is the same).
    ///
    /// # Panics
    /// If `t_seconds` is negative or not finite (callers validate user input first, as
    /// [`crate::tile::drift_study`] does), or on a [`Crossbar::layout`].
    pub fn drift_to(&mut self, t_seconds: f64) {
        self.assert_programmed("drifting");
        assert!(
            t_seconds.is_finite() && t_seconds >= 0.0,
            "tensor {}: drift time must be finite and ≥ 0 s, got {t_seconds}",
            self.tensor_id
        );
        let (n_in, n_dev) = (self.n_in, self.converter.devices_per_weight());
        let read = Stream::new(self.seed, Purpose::ReadNoise, self.tensor_id);
        let (w_prog, nu, conv, dev, s) = (
            &self.w_prog,
            &self.nu,
            self.converter,
            &self.device,
            self.g_scale_us,
        );
        self.w
            .as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(n_in)
            .enumerate()
            .for_each(|(i, w_row)| {
                let mut xi = vec![0.0f32; 2 * n_in];
                read.fill_normal(2 * (i * n_in) as u64, 0, 0, &mut xi);
                for j in 0..n_in {
                    let g_p = conv.to_conductances(w_prog[[i, j]], s);
                    let mut g = [0.0f32; 2];
                    for d in 0..n_dev {
                        g[d] = dev.read(g_p[d], nu[d][[i, j]], t_seconds, xi[2 * j + d]);
                    }
                    w_row[j] = to_binary16(conv.to_weight(g, s));
                }
            });
        self.t_seconds = Some(t_seconds);
        self.refresh_derived();
        if !self.gdc_ref.is_empty() {
            let now = match self.drift_compensation {
                DriftCompensation::GlobalExact => self.mean_abs_readout(GDC_READOUT_MVM_ID, false),
                _ => self.gdc_readout(GDC_READOUT_MVM_ID),
            };
            self.gdc_alpha = self
                .gdc_ref
                .iter()
                .zip(&now)
                .map(|(r, y)| r / y.max(GDC_MIN_READOUT))
                .collect();
        }
    }

    /// Analog MVM of a batch `x` (`[batch, n_in]`) → `[batch, n_out]` in weight·input units.
    ///
    /// `mvm_id` is the caller's call counter: per-MVM noise is keyed by (mvm_id, batch row,
    /// output index), so equal ids reproduce equal noise. Must be below [`GDC_READOUT_MVM_ID`].
    ///
    /// # Panics
    /// If `x` does not have `n_in` columns (a shape bug in the caller, not a data error), or on
    /// a [`Crossbar::layout`].
    pub fn mvm(&self, x: ArrayView2<f32>, mvm_id: u32) -> Array2<f32> {
        self.forward(x, mvm_id, true)
    }

    /// Rows (inputs) of this block.
    pub fn n_in(&self) -> usize {
        self.n_in
    }
    /// Columns (outputs) of this block.
    pub fn n_out(&self) -> usize {
        self.n_out
    }
    /// Tensor id keying this block's random streams.
    pub fn tensor_id(&self) -> u32 {
        self.tensor_id
    }
    /// The device model.
    pub fn device(&self) -> &dyn Device {
        self.device.as_ref()
    }
    /// Current normalised weights W̃ (`[n_out, n_in]`).
    pub fn weights(&self) -> ArrayView2<'_, f32> {
        self.w.view()
    }
    /// Programmed (pre-drift) normalised net weights.
    pub fn programmed_weights(&self) -> ArrayView2<'_, f32> {
        self.w_prog.view()
    }
    /// Current weights in the caller's units: W̃_ij·s_map,i (no GDC).
    pub fn effective_weights(&self) -> Array2<f32> {
        let mut w = self.w.clone();
        for (mut row, s) in w.rows_mut().into_iter().zip(&self.map_scale) {
            row.mapv_inplace(|x| x * s);
        }
        w
    }
    /// Mapping scale s_map per output (weight units per normalised unit).
    pub fn map_scale(&self) -> &[f32] {
        &self.map_scale
    }
    /// Conductance per normalised weight unit (µS) of the re-converted programmed weights; the
    /// conductance of the device holding W̃_ij is |W̃_ij|·this (pair) after programming.
    pub fn conductance_scale_us(&self) -> f32 {
        self.g_scale_us
    }
    /// Conductance (µS) of the device holding each weight at the current time: |W̃|·s for a
    /// differential pair (after AIHWKIT's re-conversion only one device of a pair is non-zero),
    /// g_mid + s·W̃ for a single device.
    pub fn device_conductances_us(&self) -> Array2<f32> {
        let s = self.g_scale_us;
        match self.converter {
            WeightConverter::DifferentialPair { .. } => self.w.mapv(|w| w.abs() * s),
            WeightConverter::SingleDevice { g_min_us, g_max_us } => {
                let mid = 0.5 * (g_min_us + g_max_us);
                self.w.mapv(|w| mid + s * w)
            }
        }
    }
    /// Host memory held by the block's arrays, bytes (programmed and current weights, drift
    /// parameters, and the |W̃| / [W̃; W̃∘F] copies kept for IR drop and PCM_READ).
    pub fn memory_bytes(&self) -> usize {
        let arrays = [
            Some(&self.w_prog),
            Some(&self.w),
            self.abs_w.as_ref(),
            self.w_ir.as_ref(),
        ];
        let elements: usize = arrays.iter().flatten().map(|a| a.len()).sum::<usize>()
            + self.nu.iter().map(|a| a.len()).sum::<usize>();
        elements * std::mem::size_of::<f32>()
    }
    /// GDC factors α (one, or one per column; 1 without GDC or before any drift).
    pub fn gdc_alpha(&self) -> &[f32] {
        &self.gdc_alpha
    }
    /// GDC reference mean |Y₀| taken after programming (one, or one per column; empty
    /// without GDC).
    pub fn gdc_reference(&self) -> &[f32] {
        &self.gdc_ref
    }
    /// The drift compensation of the block's preset.
    pub fn drift_compensation(&self) -> DriftCompensation {
        self.drift_compensation
    }
    /// Drift exponents ν, one `[n_out, n_in]` array per device of a weight.
    pub fn drift_exponents(&self) -> &[Array2<f32>] {
        &self.nu
    }
    /// Time of the last drift, `None` right after programming.
    pub fn t_seconds(&self) -> Option<f64> {
        self.t_seconds
    }

    /// Recompute |W̃| and the IR-drop weights after the weights changed.
    fn refresh_derived(&mut self) {
        if self.is_layout() {
            return;
        }
        let p = &self.periphery;
        let need_abs = p.ir_drop.is_some() || matches!(p.w_noise, WeightNoise::PcmRead { .. });
        self.abs_w = need_abs.then(|| self.w.mapv(f32::abs));
        self.w_ir = p.ir_drop.map(|_| {
            let n = self.n_in as f32;
            let mut scaled = self.w.clone();
            for mut row in scaled.rows_mut() {
                for (j, v) in row.iter_mut().enumerate() {
                    let u = 1.0 - j as f32 / n;
                    *v *= 1.0 - u * u;
                }
            }
            ndarray::concatenate(ndarray::Axis(0), &[self.w.view(), scaled.view()])
                .expect("equal widths")
        });
    }

    /// Mean |Y| of the noisy identity forward (one value, or one per column) — the GDC readout.
    fn gdc_readout(&self, mvm_id: u32) -> Vec<f32> {
        let per_column = self.drift_compensation == DriftCompensation::GlobalPerColumn;
        if per_column {
            let y = self.forward(Array2::eye(self.n_in).view(), mvm_id, false);
            y.columns()
                .into_iter()
                .map(|c| mean_abs_f64(c.iter()))
                .collect()
        } else {
            self.mean_abs_readout(mvm_id, true)
        }
    }

    /// One value: mean |Y| of the identity forward (`noisy`) or of W̃ itself.
    fn mean_abs_readout(&self, mvm_id: u32, noisy: bool) -> Vec<f32> {
        let mean = |a: &Array2<f32>| mean_abs(a.view());
        if noisy {
            vec![mean(&self.forward(
                Array2::eye(self.n_in).view(),
                mvm_id,
                false,
            ))]
        } else {
            vec![mean(&self.w)]
        }
    }

    /// Full periphery forward; `digital_scales` applies s_map and GDC α (off for GDC readouts).
    fn forward(&self, x: ArrayView2<f32>, mvm_id: u32, digital_scales: bool) -> Array2<f32> {
        self.assert_programmed("running");
        assert_eq!(
            x.ncols(),
            self.n_in,
            "tensor {}: input has {} features, crossbar has {} rows",
            self.tensor_id,
            x.ncols(),
            self.n_in
        );
        let (batch, n_out) = (x.nrows(), self.n_out);
        let mut out = Array2::<f32>::zeros((batch, n_out));
        if batch == 0 {
            return out;
        }
        out.as_slice_mut()
            .expect("standard layout")
            .par_chunks_mut(CHUNK_ROWS * n_out)
            .enumerate()
            .for_each(|(c, buf)| {
                let r0 = c * CHUNK_ROWS;
                let rows = buf.len() / n_out;
                let o = ArrayViewMut2::from_shape((rows, n_out), buf).expect("chunk shape");
                self.forward_chunk(
                    x.slice(s![r0..r0 + rows, ..]),
                    r0,
                    mvm_id,
                    o,
                    digital_scales,
                );
            });
        out
    }

    /// Steps 1–9 of docs/model.md §3 for rows `r0..r0 + x.nrows()` of one batch, with W̃ (and
    /// [W̃; W̃∘F]) packed once for the products of the chunk and of its bound-management
    /// retries where the packed kernel runs.
    fn forward_chunk(
        &self,
        x: ArrayView2<f32>,
        r0: usize,
        mvm_id: u32,
        out: ArrayViewMut2<f32>,
        digital_scales: bool,
    ) {
        if kernel::available() {
            let ir = self.w_ir.as_ref().map(|w| w.view());
            Packed::with(self.w.view(), ir, |w, ir| {
                let ops = Some(Operands { w, ir });
                self.forward_rows(x, r0, mvm_id, out, digital_scales, ops);
            });
        } else {
            self.forward_rows(x, r0, mvm_id, out, digital_scales, None);
        }
    }

    /// [`Crossbar::forward_chunk`] with the packed operands, `None` for the `ndarray` GEMM.
    fn forward_rows(
        &self,
        x: ArrayView2<f32>,
        r0: usize,
        mvm_id: u32,
        mut out: ArrayViewMut2<f32>,
        digital_scales: bool,
        ops: Option<Operands<'_>>,
    ) {
        let rows = x.nrows();
        let p = &self.periphery;
        // 1. noise management
        let alpha_nm: Vec<f32> = x
            .rows()
            .into_iter()
            .map(|r| match p.noise_management {
                NoiseManagement::AbsMax => match r.as_slice() {
                    Some(r) => kernel::abs_max(r),
                    None => r.fold(0.0f32, |m, v| m.max(v.abs())),
                },
                NoiseManagement::Constant { value } => value,
                NoiseManagement::None => 1.0,
            })
            .collect();
        let mut beta = vec![1.0f32; rows];
        // 2. DAC
        let mut xq = Array2::<f32>::zeros((rows, self.n_in));
        for (r, row) in xq.rows_mut().into_iter().enumerate() {
            self.encode_row(x.row(r), alpha_nm[r] * beta[r], row);
        }
        let ids: Vec<usize> = (r0..r0 + rows).collect();
        // 3–7. analog MVM, IR drop, weight noise, output noise, ADC
        let saturated = self.analog(xq.view(), &ids, mvm_id, 0, out.view_mut(), ops);
        // 8. iterative bound management, only for saturated rows
        if let (Some(limit), Some(_)) = (p.bm_beta_limit(), p.adc) {
            let mut pending: Vec<usize> = (0..rows)
                .filter(|&r| alpha_nm[r] > 0.0 && saturated[r])
                .collect();
            let mut attempt = 0u8;
            while !pending.is_empty() && attempt < u8::MAX {
                pending.retain(|&r| beta[r] <= limit);
                if pending.is_empty() {
                    break;
                }
                attempt += 1;
                let mut sub = Array2::<f32>::zeros((pending.len(), self.n_in));
                for (k, &r) in pending.iter().enumerate() {
                    beta[r] *= 2.0;
                    self.encode_row(x.row(r), alpha_nm[r] * beta[r], sub.row_mut(k));
                }
                let sub_ids: Vec<usize> = pending.iter().map(|&r| r0 + r).collect();
                let mut sub_out = Array2::<f32>::zeros((pending.len(), self.n_out));
                let sub_saturated = self.analog(
                    sub.view(),
                    &sub_ids,
                    mvm_id,
                    attempt,
                    sub_out.view_mut(),
                    ops,
                );
                for (k, &r) in pending.iter().enumerate() {
                    out.row_mut(r).assign(&sub_out.row(k));
                }
                pending = pending
                    .iter()
                    .zip(&sub_saturated)
                    .filter(|(_, &sat)| sat)
                    .map(|(&r, _)| r)
                    .collect();
            }
        }
        // 9. digital rescale
        for (r, mut row) in out.rows_mut().into_iter().enumerate() {
            let scale = alpha_nm[r] * beta[r];
            if digital_scales {
                let row = row.as_slice_mut().expect("contiguous output rows");
                kernel::rescale(row, scale, &self.map_scale, &self.gdc_alpha);
            } else {
                row.mapv_inplace(|v| v * scale);
            }
        }
    }

    /// x̃ = DAC(x/scale); a zero scale (all-zero input under ABS_MAX) gives x̃ = 0.
    fn encode_row(&self, x: ndarray::ArrayView1<f32>, scale: f32, mut out: ArrayViewMut1<f32>) {
        if scale == 0.0 {
            out.fill(0.0);
            return;
        }
        if let (Some(x), Some(out)) = (x.as_slice(), out.as_slice_mut()) {
            kernel::encode(x, scale, self.periphery.dac, out);
            return;
        }
        match self.periphery.dac {
            Some(dac) => {
                let step = dac.step();
                Zip::from(&mut out)
                    .and(&x)
                    .for_each(|o, &v| *o = dac.quantize(v / scale, step));
            }
            None => Zip::from(&mut out).and(&x).for_each(|o, &v| *o = v / scale),
        }
    }

    /// y = ADC(W̃x̃ − IR drop + weight noise + output noise) for quantised inputs `xq`;
    /// `ids` are the global batch rows (noise keys). Returns per row whether an output reached
    /// the ADC bound.
    fn analog(
        &self,
        xq: ArrayView2<f32>,
        ids: &[usize],
        mvm_id: u32,
        attempt: u8,
        mut y: ArrayViewMut2<f32>,
        ops: Option<Operands<'_>>,
    ) -> Vec<bool> {
        let p = &self.periphery;
        let n_out = self.n_out;
        let pcm_read_std = match p.w_noise {
            WeightNoise::PcmRead { std } if std > 0.0 => Some(std),
            _ => None,
        };
        let (ir_abs, pcm_sum) = match ops {
            Some(ops) => self.products_packed(xq, ops, pcm_read_std.is_some(), y.view_mut()),
            None => self.products_ndarray(xq, pcm_read_std.is_some(), y.view_mut()),
        };
        // 4. IR drop: y = W̃x̃ − scale·c(a)·(W̃∘F)x̃; the products left W̃x̃ in y[.., ..n_out] of
        // `both` and (W̃∘F)x̃ in its second half.
        if let (Some(IrDrop { scale, g_ratio }), Some((a, both))) = (p.ir_drop, &ir_abs) {
            let k = self.n_in as f32 / g_ratio;
            Zip::from(&mut y)
                .and(both.slice(s![.., ..n_out]))
                .and(a)
                .and(both.slice(s![.., n_out..]))
                .for_each(|y, &w_x, &a, &yf| {
                    let a = k * a;
                    let c = a * (a * (0.05 * a - 0.2) + 0.5);
                    *y = w_x - scale * c * yf;
                });
        }
        // 5–6. Short-term weight noise and output noise are independent zero-mean Gaussians added
        // to the same y_i, so they are drawn as one normal with the summed variance
        // σ_i² = out_noise² + σ_w,i² (same distribution, half the random numbers). The GPU
        // backend must do the same to reproduce these values.
        let weight_var = match (p.w_noise, pcm_read_std) {
            (_, Some(std)) => WeightVar::PcmRead {
                std2: std * std,
                sum_abs_w_x2: pcm_sum.as_ref().expect("PCM_READ products computed").view(),
            },
            (WeightNoise::Additive { std }, _) if std > 0.0 => WeightVar::Additive {
                per_row: xq
                    .rows()
                    .into_iter()
                    .map(|r| std * std * r.iter().map(|v| v * v).sum::<f32>())
                    .collect(),
            },
            _ => WeightVar::None,
        };
        let noisy = p.out_noise > 0.0 || !matches!(weight_var, WeightVar::None);
        let out_var = p.out_noise * p.out_noise;
        let stream = Stream::new(self.seed, Purpose::OutputNoise, self.tensor_id);
        let mut xi = vec![0.0f32; n_out];
        let mut saturated = vec![false; y.nrows()];
        // Per row: noise, then 7. ADC (one pass over y).
        for (r, mut row) in y.rows_mut().into_iter().enumerate() {
            let z = noisy.then(|| {
                stream.fill_normal((ids[r] * n_out) as u64, mvm_id, attempt, &mut xi);
                &xi[..]
            });
            let noise = match &weight_var {
                WeightVar::PcmRead { std2, sum_abs_w_x2 } => RowNoise::PcmRead {
                    out_var,
                    std2: *std2,
                    s: sum_abs_w_x2.row(r).to_slice().expect("contiguous rows"),
                },
                WeightVar::Additive { per_row } => {
                    RowNoise::Uniform(kernel::noise_sd(out_var + per_row[r]))
                }
                WeightVar::None => RowNoise::Uniform(p.out_noise),
            };
            let row = row.as_slice_mut().expect("contiguous output rows");
            saturated[r] = kernel::noise_adc(row, z, noise, p.adc);
        }
        saturated
    }

    /// The crossbar products of quantised inputs `xq` with the packed kernel: W̃x̃ into `y`
    /// (without IR drop), and the products the periphery needs — under IR drop
    /// `(a = |x̃|·|W̃|ᵀ, [W̃x̃ | (W̃∘F)x̃])`, under PCM_READ Σ_j |W̃_ij| x̃_j². Bit-identical to
    /// [`Crossbar::products_ndarray`] ([`kernel`]).
    #[allow(clippy::type_complexity)]
    fn products_packed(
        &self,
        xq: ArrayView2<f32>,
        ops: Operands<'_>,
        pcm_read: bool,
        y: ArrayViewMut2<f32>,
    ) -> (Option<(Array2<f32>, Array2<f32>)>, Option<Array2<f32>>) {
        let (m, n_out) = (xq.nrows(), self.n_out);
        let x2 = pcm_read.then(|| xq.mapv(|v| v * v));
        let mut pcm_sum = x2.as_ref().map(|_| Array2::<f32>::zeros((m, n_out)));
        fn second<'a>(
            x2: &'a Option<Array2<f32>>,
            s: &'a mut Option<Array2<f32>>,
        ) -> Option<(ArrayView2<'a, f32>, ArrayViewMut2<'a, f32>)> {
            x2.as_ref()
                .map(|x2| x2.view())
                .zip(s.as_mut().map(|s| s.view_mut()))
        }
        let Some(w_ir) = ops.ir else {
            kernel::gemm(xq, ops.w, false, y, second(&x2, &mut pcm_sum));
            return (None, pcm_sum);
        };
        let mut both = Array2::<f32>::zeros((m, 2 * n_out));
        kernel::gemm(xq, w_ir, false, both.view_mut(), None);
        let abs_x = xq.mapv(f32::abs);
        let mut a = Array2::<f32>::zeros((m, n_out));
        kernel::gemm(
            abs_x.view(),
            ops.w,
            true,
            a.view_mut(),
            second(&x2, &mut pcm_sum),
        );
        (Some((a, both)), pcm_sum)
    }

    /// [`Crossbar::products_packed`] through `ndarray`'s GEMM, for CPUs without AVX2 and FMA.
    #[allow(clippy::type_complexity)]
    fn products_ndarray(
        &self,
        xq: ArrayView2<f32>,
        pcm_read: bool,
        mut y: ArrayViewMut2<f32>,
    ) -> (Option<(Array2<f32>, Array2<f32>)>, Option<Array2<f32>>) {
        let p = &self.periphery;
        let m = xq.nrows();
        // GEMMs with |W̃|: IR drop needs a = |x̃|·|W̃|ᵀ, PCM_READ needs Σ|W̃|x̃² = x̃²·|W̃|ᵀ;
        // both run as one GEMM over the stacked inputs [|x̃|; x̃²] (|W̃| packed once).
        let abs_inputs: Vec<fn(f32) -> f32> = [
            p.ir_drop.map(|_| f32::abs as fn(f32) -> f32),
            pcm_read.then_some((|v: f32| v * v) as fn(f32) -> f32),
        ]
        .into_iter()
        .flatten()
        .collect();
        let abs_products = (!abs_inputs.is_empty()).then(|| {
            let abs_w = self
                .abs_w
                .as_ref()
                .expect("|W| kept for IR drop / PCM_READ");
            let mut stacked = Array2::<f32>::zeros((abs_inputs.len() * m, self.n_in));
            for (k, f) in abs_inputs.iter().enumerate() {
                Zip::from(stacked.slice_mut(s![k * m..(k + 1) * m, ..]))
                    .and(&xq)
                    .for_each(|o, &v| *o = f(v));
            }
            stacked.dot(&abs_w.t())
        });
        let pcm_sum = pcm_read.then(|| {
            let abs = abs_products.as_ref().expect("PCM_READ products computed");
            abs.slice(s![abs.nrows() - m.., ..]).to_owned()
        });
        // 3. y = W̃x̃, and with IR drop y and y_f = (W̃∘F)x̃ from one GEMM against [W̃; W̃∘F].
        let ir = match (&self.w_ir, &abs_products) {
            (Some(w_ir), Some(abs)) => {
                let mut both = Array2::<f32>::zeros((m, 2 * self.n_out));
                general_mat_mul(1.0, &xq, &w_ir.t(), 0.0, &mut both);
                Some((abs.slice(s![..m, ..]).to_owned(), both))
            }
            _ => {
                general_mat_mul(1.0, &xq, &self.w.t(), 0.0, &mut y);
                None
            }
        };
        (ir, pcm_sum)
    }
}

/// The packed crossbar operands of one chunk: W̃, and [W̃; W̃∘F] under IR drop.
#[derive(Clone, Copy)]
struct Operands<'a> {
    w: &'a Packed,
    ir: Option<&'a Packed>,
}

/// Variance of the short-term weight noise of each output, before adding out_noise².
enum WeightVar<'a> {
    None,
    /// σ² = std²·Σ_j |W̃_ij| x̃_j² (PCM_READ).
    PcmRead {
        std2: f32,
        sum_abs_w_x2: ArrayView2<'a, f32>,
    },
    /// σ² = std²·‖x̃‖² per batch row (ADDITIVE).
    Additive {
        per_row: Vec<f32>,
    },
}

/// The mapping step of programming (docs/model.md §3, "Mapping scale"): checks `w` against one
/// crossbar of `preset` and returns the mapping scales s_map (one per output) and the target
/// weights W/s_map.
fn map_weights(
    w: ArrayView2<f32>,
    preset: &TilePreset,
    tensor_id: u32,
) -> Result<(Vec<f32>, Array2<f32>)> {
    let (n_out, n_in) = w.dim();
    ensure!(
        n_out > 0 && n_in > 0,
        "tensor {tensor_id}: empty weight matrix {n_out}×{n_in}"
    );
    ensure!(
        n_in <= preset.stack.rows && n_out <= preset.stack.cols,
        "tensor {tensor_id}: {n_out}×{n_in} (n_out×n_in) exceeds one {}×{} crossbar of preset `{}`; \
         split it with AnalogMatrix",
        preset.stack.rows,
        preset.stack.cols,
        preset.name
    );
    if let Some(((i, j), v)) = w.indexed_iter().find(|(_, v)| !v.is_finite()) {
        bail!("tensor {tensor_id}: non-finite weight {v} at [{i}, {j}]");
    }
    validate_preset(preset)?;
    let omega = preset.mapping.weight_scaling_omega;
    let abs_max = |v: ndarray::ArrayView1<f32>| v.fold(0.0f32, |m, x| m.max(x.abs()));
    let nonzero = |s: f32| if s > 0.0 { s } else { 1.0 };
    let map_scale: Vec<f32> = if preset.mapping.per_column {
        w.rows()
            .into_iter()
            .map(|r| nonzero(abs_max(r) / omega))
            .collect()
    } else {
        let m = nonzero(w.fold(0.0f32, |m, x| m.max(x.abs())) / omega);
        vec![m; n_out]
    };
    let mut w_target = w.to_owned();
    for (mut row, s) in w_target.rows_mut().into_iter().zip(&map_scale) {
        row.mapv_inplace(|x| x / s);
    }
    Ok((map_scale, w_target))
}

/// A preset built in code (not loaded) may be invalid: check it before use.
fn validate_preset(preset: &TilePreset) -> Result<()> {
    preset.validate().map_err(|e| {
        anyhow::anyhow!(
            "preset `{}`: field `{}`: {}",
            preset.name,
            e.field,
            e.message
        )
    })
}

fn max_abs(a: &Array2<f32>) -> f32 {
    a.fold(0.0f32, |m, x| m.max(x.abs()))
}
