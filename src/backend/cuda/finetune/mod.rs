//! Hardware-aware fine-tuning of one MoE layer on the GPU ([`CudaTrainer`], a
//! [`LayerTrainer`]): the objective of `finetune::noisy::CpuObjective` and the Adam of
//! `finetune::adam` with the layer's weights, Adam's moments and its calibration rows resident
//! on the device, so that a step moves only its token indices and routing over the host link.
//!
//! A step (docs/finetune.md §2): the current weights are mapped (s_map from their maxima),
//! programmed with the step's noise seed and read out at the training time by the eval's own
//! programming, drift and GDC kernels ([`mapping`]), with the CPU crossbars' Philox keys and
//! tensor ids, so the GPU's crossbars are the CPU objective's to the backend's parity bounds;
//! the forward runs the grouped analog kernels, the backward the hand-written products through
//! cuBLAS ([`step`]), Adam an element-wise kernel that rounds as the CPU's. One layer is on the
//! device at a time: the caller builds a trainer per layer and drops it before the next.
//!
//! Where the ADC clips (no bound management), the forward runs its two products a second time
//! with the same draws in the kernels' clip-count mode and the backward blocks the gradient of
//! every output a crossbar block clipped, as the CPU objective's straight-through mask does.
//!
//! Not on the GPU (an `Unsupported` error, the CLI falls back to the CPU under `--backend
//! auto`): non-PCM devices, routers with a varying number of experts per token, shapes the
//! kernel tiles do not take.
pub mod calib;
mod mapping;
mod step;

use std::sync::Arc;

use anyhow::Result;
use cudarc::driver::{CudaSlice, PushKernelArg};
use ndarray::{Array2, CowArray, Ix2};
use rayon::prelude::*;

use super::blas::Blas;
use super::compile::FINETUNE_CU;
use super::gemm::Precision;
use super::grouped::{swiglu_row, swiglu_source, GpuColumnTables};
use super::periphery::GemmPeriphery;
use super::profile::{laps, StageClock, StageTime};
use super::program::PcmParams;
use super::programmed::{DeviceModel, DigitalWeights, DriftHost, DriftSource, ReadoutCache, Run};
use super::routing::route;
use super::{linear_launch, CudaDevice, CudaError, CudaResult};
use crate::backend::cpu::matrix_tensor_id;
use crate::finetune::adam::{BETA1, BETA2, EPS};
use crate::finetune::calib::LayerCalib;
use crate::finetune::trainer::{token_starts, LayerTrainer};
use crate::finetune::LOSS_FLOOR;
use crate::model::common::SwiGlu;
use crate::model::{ExpertSlot, MatrixId, Proj};
use crate::tile::{AnalogMatrix, MappingSpec, TilePreset};

/// Why `preset` cannot train on the GPU, if it cannot (checked before any model work).
pub fn unsupported(preset: &TilePreset) -> Option<String> {
    if let Err(e) = GemmPeriphery::from_spec(&preset.periphery) {
        return Some(e.to_string());
    }
    let Some(pcm) = preset.device.pcm_like() else {
        return Some(format!(
            "device kind `{}`: GPU programming supports the PCM family only",
            preset.device.kind
        ));
    };
    PcmParams::new(&pcm).err().map(|e| e.to_string())
}

/// What one pass of [`CudaTrainer::run`] computes beyond the loss.
#[derive(Clone, Copy)]
enum Mode {
    Loss,
    /// The gradient and an Adam step of this size (when the loss is at least the floor).
    Step(f32),
    /// The gradient alone.
    Gradient,
}

/// Gradient and Adam moments of one grouped matrix.
struct Optim {
    grad: CudaSlice<f32>,
    m: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

impl Optim {
    fn new(dev: &CudaDevice, len: usize) -> CudaResult<Self> {
        Ok(Self {
            grad: dev.zeros(len)?,
            m: dev.zeros(len)?,
            v: dev.zeros(len)?,
        })
    }
}

/// One layer's fine-tuning on the GPU.
pub struct CudaTrainer {
    dev: Arc<CudaDevice>,
    blas: Blas,
    layer: usize,
    /// Experts E, hidden width d, expert width n, experts per token k.
    shape: (usize, usize, usize, usize),
    periphery: GemmPeriphery,
    device: DeviceModel,
    mapping: MappingSpec,
    drift_s: Option<f64>,
    readouts: ReadoutCache,
    /// Interleaved gate/up `[E, 2n, d]` and down `[E, d, n]`, each with its current weights.
    gate_up: DriftSource,
    down: DriftSource,
    optim: [Optim; 2],
    /// Adam's step count.
    t: i32,
    /// Calibration rows `[N, d]`: inputs and digital targets.
    x: CudaSlice<f32>,
    y: CudaSlice<f32>,
    /// Per token, its k (expert, weight) pairs in recorded order, on the host and (all tokens)
    /// on the device.
    pair_expert: Vec<u32>,
    pair_weight: Vec<f32>,
    all_expert: CudaSlice<u32>,
    all_weight: CudaSlice<f32>,
    /// Stage times of the steps ([`super::profile::PROFILE_ENV`]).
    clock: Option<StageClock>,
}

/// The crossbar layouts (block split, tensor ids) of projection `proj` of every expert.
fn layouts(
    experts: &[SwiGlu],
    layer: usize,
    proj: Proj,
    preset: &TilePreset,
) -> Result<Vec<AnalogMatrix>> {
    let device = preset.device.build();
    experts
        .par_iter()
        .enumerate()
        .map(|(e, w)| {
            let m = match proj {
                Proj::Gate => w.gate(),
                Proj::Up => w.up(),
                _ => w.down.view(),
            };
            let id = matrix_tensor_id(MatrixId {
                layer,
                slot: ExpertSlot::Routed(e),
                proj,
            });
            AnalogMatrix::layout(m, preset, device.clone(), 0, id)
        })
        .collect()
}

/// One expert's gate/up and down weights in standard layout (borrowed when they are already).
type StandardExpert<'w> = (CowArray<'w, f32, Ix2>, CowArray<'w, f32, Ix2>);

/// The experts' weights as standard-layout arrays, for [`grouped_rows`].
fn standard(experts: &[SwiGlu]) -> Vec<StandardExpert<'_>> {
    experts
        .iter()
        .map(|w| (w.gate_up.as_standard_layout(), w.down.as_standard_layout()))
        .collect()
}

/// The rows of the experts' weights in the grouped layout, for a staged upload without a host
/// copy: gate/up `[E, 2n, d]` with gate and up rows interleaved in groups of 8 (as the SwiGLU
/// epilogue and [`DriftHost::interleave`] lay them out), down `[E, d, n]` (one slice per
/// expert).
fn grouped_rows<'a>(experts: &'a [StandardExpert<'_>]) -> (Vec<&'a [f32]>, Vec<&'a [f32]>) {
    let mut gu = Vec::new();
    let mut dn = Vec::new();
    for (gate_up, down) in experts {
        let (n2, d) = gate_up.dim();
        let (n, rows) = (n2 / 2, gate_up.as_slice().expect("standard layout"));
        for f in 0..n2 {
            let (is_up, c) = swiglu_source(f);
            gu.push(&rows[(if is_up { n + c } else { c }) * d..][..d]);
        }
        dn.push(down.as_slice().expect("standard layout"));
    }
    (gu, dn)
}

/// The experts back from the grouped layout of [`grouped_rows`] for `e` experts of width `d`
/// and expert width `n` (row copies, experts in parallel).
fn experts_from_grouped(gu: &[f32], dn: &[f32], (e, d, n): (usize, usize, usize)) -> Vec<SwiGlu> {
    let n2 = 2 * n;
    (0..e)
        .into_par_iter()
        .map(|e| {
            let rows = &gu[e * n2 * d..][..n2 * d];
            let mut gate_up = Vec::with_capacity(n2 * d);
            // Gate rows 0..n, then up rows 0..n (`SwiGlu`'s order).
            for is_up in [false, true] {
                for c in 0..n {
                    gate_up.extend_from_slice(&rows[swiglu_row(is_up, c) * d..][..d]);
                }
            }
            let gate_up = Array2::from_shape_vec((n2, d), gate_up).expect("2n×d weights");
            let down = Array2::from_shape_vec((d, n), dn[e * d * n..][..d * n].to_vec())
                .expect("d×n weights");
            SwiGlu { gate_up, down }
        })
        .collect()
}

/// A [`DriftSource`] over weights `w` already on the device.
fn source(dev: &CudaDevice, h: DriftHost, w: CudaSlice<f32>) -> CudaResult<DriftSource> {
    Ok(DriftSource {
        programmed: None,
        seed_scales: None,
        host_gdc_ref: h.gdc_ref,
        dev_tables: GpuColumnTables::upload(dev, &h.tables)?,
        w: DigitalWeights::Device(w),
        s_map: Arc::new(dev.upload(&h.tables.col_scale)?),
        g_target: dev.zeros::<f32>(1)?,
        tables: h.tables,
    })
}

impl CudaTrainer {
    /// The trainer of `calib`'s layer starting from `experts`, against `preset`'s crossbars read
    /// out `drift_s` seconds after programming; its weights, moments and calibration rows are
    /// uploaded here. `Unsupported` ([`unsupported`]) where the GPU cannot run the objective.
    pub fn new(
        dev: Arc<CudaDevice>,
        preset: &TilePreset,
        drift_s: Option<f64>,
        calib: &LayerCalib,
        experts: &[SwiGlu],
    ) -> Result<Self> {
        if let Some(why) = unsupported(preset) {
            return Err(CudaError::Unsupported(why).into());
        }
        let pcm = preset.device.pcm_like().expect("checked by unsupported()");
        let params = PcmParams::new(&pcm)?;
        let periphery = GemmPeriphery::from_spec(&preset.periphery)?;
        let e_count = experts.len();
        anyhow::ensure!(e_count > 0, "layer {}: no experts", calib.layer);
        let (n2, d) = experts[0].gate_up.dim();
        let n = n2 / 2;
        if let Some((e, _)) = experts
            .iter()
            .enumerate()
            .find(|(_, w)| w.gate_up.dim() != (n2, d) || w.down.dim() != (d, n))
        {
            anyhow::bail!(
                "layer {}: expert {e} has another shape than expert 0",
                calib.layer
            );
        }
        let (tokens, width) = calib.x.dim();
        anyhow::ensure!(
            width == d && calib.y.dim() == (tokens, d),
            "layer {}: calibration rows of width {width} for experts of width {d}",
            calib.layer
        );
        // Exactly k pairs per token, in token order, experts in range (the GPU routing sort's
        // input).
        let starts = token_starts(calib);
        let k = starts.get(1).copied().unwrap_or(0);
        if k == 0
            || k > step::MAX_TOP_K
            || starts.windows(2).any(|w| w[1] - w[0] != k)
            || calib
                .assignments
                .iter()
                .enumerate()
                .any(|(i, a)| a.token as usize != i / k || a.expert as usize >= e_count)
        {
            return Err(CudaError::Unsupported(format!(
                "layer {}: the GPU trainer needs the same number (1..={}) of experts per token",
                calib.layer,
                step::MAX_TOP_K
            ))
            .into());
        }
        let pair_expert: Vec<u32> = calib.assignments.iter().map(|a| a.expert).collect();
        let pair_weight: Vec<f32> = calib.assignments.iter().map(|a| a.weight).collect();
        let layer = calib.layer;
        let hosts = |proj| -> Result<DriftHost> {
            let mats = layouts(experts, layer, proj, preset)?;
            let refs: Vec<&AnalogMatrix> = mats.iter().collect();
            Ok(DriftHost::new(&refs)?)
        };
        let gate_up_host = DriftHost::interleave(&hosts(Proj::Gate)?, &hosts(Proj::Up)?)?;
        let down_host = hosts(Proj::Down)?;
        let std_experts = standard(experts);
        let (gu, dn) = grouped_rows(&std_experts);
        let gate_up = source(&dev, gate_up_host, dev.upload_concat(&gu)?)?;
        let down = source(&dev, down_host, dev.upload_concat(&dn)?)?;
        drop((gu, dn));
        drop(std_experts);
        let std_x = calib.x.as_standard_layout();
        let std_y = calib.y.as_standard_layout();
        let optim = [
            Optim::new(&dev, e_count * n2 * d)?,
            Optim::new(&dev, e_count * d * n)?,
        ];
        let x = dev.upload(std_x.as_slice().expect("standard layout"))?;
        let y = dev.upload(std_y.as_slice().expect("standard layout"))?;
        let (all_expert, all_weight) = (dev.upload(&pair_expert)?, dev.upload(&pair_weight)?);
        let blas = Blas::new(&dev)?;
        Ok(Self {
            blas,
            layer,
            shape: (e_count, d, n, k),
            periphery,
            device: DeviceModel {
                pcm,
                params,
                compensation: preset.drift_compensation,
            },
            mapping: preset.mapping,
            drift_s,
            readouts: ReadoutCache::default(),
            gate_up,
            down,
            optim,
            t: 0,
            x,
            y,
            pair_expert,
            pair_weight,
            all_expert,
            all_weight,
            clock: StageClock::from_env()?,
            dev,
        })
    }

    /// Wall time per stage of the passes so far (each stage ends with a device
    /// synchronisation), when `AIMC_PROFILE_FORWARD` is set; empty otherwise.
    pub fn stage_seconds(&self) -> &[StageTime] {
        self.clock.as_ref().map_or(&[], |c| c.stages())
    }

    /// The loss and its gradient on all calibration tokens with the noise of `noise_seed`,
    /// without a step (whatever the loss): what `LayerObjective::evaluate` returns on the
    /// CPU, for the parity tests and diagnostics.
    pub fn gradient(&mut self, noise_seed: u64) -> Result<(f64, Vec<SwiGlu>)> {
        let loss = self
            .run(None, noise_seed, Mode::Gradient)
            .map_err(|e| anyhow::anyhow!("layer {} on the GPU: {e}", self.layer))?;
        let [og, od] = &self.optim;
        let grads = self.to_experts(&self.dev.download(&og.grad)?, &self.dev.download(&od.grad)?);
        Ok((loss, grads))
    }

    /// Interleaved gate/up `[E, 2n, d]` and down `[E, d, n]` arrays as experts.
    fn to_experts(&self, gu: &[f32], dn: &[f32]) -> Vec<SwiGlu> {
        let (e_count, d, n, _) = self.shape;
        experts_from_grouped(gu, dn, (e_count, d, n))
    }

    /// The loss of the current weights on `tokens` (all when `None`) with the noise of `seed`;
    /// per `mode` also its gradient, and an Adam step when the loss is finite and at least
    /// [`LOSS_FLOOR`].
    fn run(&mut self, tokens: Option<&[usize]>, seed: u64, mode: Mode) -> CudaResult<f64> {
        let dev = Arc::clone(&self.dev);
        let dev = &*dev;
        dev.context()
            .bind_to_thread()
            .map_err(|source| CudaError::Driver {
                what: "binding the CUDA context".into(),
                source,
            })?;
        let (e_count, d, _, k) = self.shape;
        let mut lap = laps(&mut self.clock, dev)?;
        // The batch: rows gathered on the device, routing built on the host (small).
        let (gathered, pairs);
        let (x, y, experts, weights, t) = match tokens {
            None => (
                &self.x,
                &self.y,
                &self.all_expert,
                &self.all_weight,
                self.x.len() / d,
            ),
            Some(tokens) => {
                let idx: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
                let idx_dev = dev.upload(&idx)?;
                let gather = |src: &CudaSlice<f32>| -> CudaResult<CudaSlice<f32>> {
                    let mut out = dev.scratch::<f32>(idx.len() * d)?;
                    let f = dev.function(&FINETUNE_CU, &[], "ft_gather_rows")?;
                    let (r64, d32) = (idx.len() as u64, d as u32);
                    dev.launch(&f, "ft_gather_rows", linear_launch(r64 * d as u64), |b| {
                        b.arg(src).arg(&idx_dev).arg(&r64).arg(&d32).arg(&mut out);
                    })?;
                    Ok(out)
                };
                gathered = (gather(&self.x)?, gather(&self.y)?);
                let mut ex = Vec::with_capacity(tokens.len() * k);
                let mut wt = Vec::with_capacity(tokens.len() * k);
                for &t in tokens {
                    ex.extend_from_slice(&self.pair_expert[t * k..(t + 1) * k]);
                    wt.extend_from_slice(&self.pair_weight[t * k..(t + 1) * k]);
                }
                pairs = (dev.upload(&ex)?, dev.upload(&wt)?);
                (&gathered.0, &gathered.1, &pairs.0, &pairs.1, tokens.len())
            }
        };
        let routing = route(dev, experts, weights, t, k, e_count)?;
        lap("batch and routing")?;
        let run = Run {
            dev,
            model: None,
            device: &self.device,
            readouts: &self.readouts,
            periphery: Some(&self.periphery),
            precision: Precision::AnalogF16,
            seed,
        };
        let (spec, drift_s) = (&self.mapping, self.drift_s);
        let gate_up = mapping::step_operands(run, &mut self.gate_up, spec, drift_s, &mut lap)?;
        let down = mapping::step_operands(run, &mut self.down, spec, drift_s, &mut lap)?;
        let for_backward = !matches!(mode, Mode::Loss);
        let fwd = step::forward(
            dev,
            &gate_up,
            &down,
            &self.periphery,
            seed,
            x,
            &routing,
            for_backward,
        )?;
        lap("forward")?;
        let (err, energy) = step::loss(dev, &fwd.y_hat, y, (t, d))?;
        lap("loss")?;
        let norm = energy.max(f64::MIN_POSITIVE);
        let loss = err / norm;
        let lr = match mode {
            Mode::Loss => return Ok(loss),
            Mode::Step(_) if !(loss.is_finite() && loss >= LOSS_FLOOR) => return Ok(loss),
            Mode::Step(lr) => Some(lr),
            Mode::Gradient => None,
        };
        let [og, od] = &mut self.optim;
        step::backward(
            dev,
            &self.blas,
            (&gate_up, &down),
            &self.periphery,
            &fwd,
            (x, y),
            &routing,
            norm,
            step::Grads {
                gate_up: &mut og.grad,
                down: &mut od.grad,
            },
        )?;
        drop((fwd, gate_up, down, routing));
        lap("backward")?;
        let Some(lr) = lr else {
            return Ok(loss);
        };
        self.t += 1;
        let c1 = 1.0 - BETA1.powi(self.t);
        let c2 = 1.0 - BETA2.powi(self.t);
        let (omb1, omb2) = (1.0 - BETA1, 1.0 - BETA2);
        let f = dev.function(&FINETUNE_CU, &[], "ft_adam")?;
        for (src, o) in [(&mut self.gate_up, og), (&mut self.down, od)] {
            let w = mapping::weights_mut(src)?;
            let n = w.len() as u64;
            dev.launch(&f, "ft_adam", linear_launch(n), |b| {
                b.arg(w)
                    .arg(&o.grad)
                    .arg(&mut o.m)
                    .arg(&mut o.v)
                    .arg(&n)
                    .arg(&lr)
                    .arg(&c1)
                    .arg(&c2)
                    .arg(&BETA1)
                    .arg(&BETA2)
                    .arg(&omb1)
                    .arg(&omb2)
                    .arg(&EPS);
            })?;
        }
        lap("Adam")?;
        Ok(loss)
    }
}

impl LayerTrainer for CudaTrainer {
    fn loss_all(&mut self, noise_seed: u64) -> Result<f64> {
        self.run(None, noise_seed, Mode::Loss)
            .map_err(|e| anyhow::anyhow!("layer {} on the GPU: {e}", self.layer))
    }

    fn step(&mut self, tokens: &[usize], noise_seed: u64, lr: f32) -> Result<f64> {
        self.run(Some(tokens), noise_seed, Mode::Step(lr))
            .map_err(|e| anyhow::anyhow!("layer {} on the GPU: {e}", self.layer))
    }

    fn experts(&self) -> Result<Vec<SwiGlu>> {
        let gu = self.dev.download(mapping::weights(&self.gate_up)?)?;
        let dn = self.dev.download(mapping::weights(&self.down)?)?;
        Ok(self.to_experts(&gu, &dn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouped_rows_interleave_gate_and_up_by_eight_and_invert() {
        let (e, d, n) = (2, 3, 16);
        let experts: Vec<SwiGlu> = (0..e)
            .map(|x| SwiGlu {
                gate_up: ndarray::Array2::from_shape_fn((2 * n, d), |(r, c)| {
                    (1000 * x + 10 * r + c) as f32
                }),
                down: ndarray::Array2::from_shape_fn((d, n), |(r, c)| {
                    -((1000 * x + 10 * r + c) as f32)
                }),
            })
            .collect();
        let std_experts = standard(&experts);
        let (gu, dn) = grouped_rows(&std_experts);
        let (gu, dn) = (gu.concat(), dn.concat());
        assert_eq!((gu.len(), dn.len()), (e * 2 * n * d, e * d * n));
        // Grouped row f of expert 1: gate rows 0..8, up rows 0..8, gate rows 8..16, up 8..16.
        let row = |f: usize| gu[(2 * n + f) * d];
        assert_eq!(row(0), 1000.0); // gate row 0
        assert_eq!(row(8), (1000 + 10 * n) as f32); // up row 0
        assert_eq!(row(16), (1000 + 80) as f32); // gate row 8
        assert_eq!(row(31), (1000 + 10 * (n + 15)) as f32); // up row 15
                                                            // The layout of the crossbar tables and programmed state (grouped::interleave_rows).
        let gate: Vec<f32> = experts.iter().flat_map(|w| w.gate().to_owned()).collect();
        let up: Vec<f32> = experts.iter().flat_map(|w| w.up().to_owned()).collect();
        assert_eq!(
            super::super::grouped::interleave_rows(&gate, &up, e, n, d),
            gu
        );
        let back = experts_from_grouped(&gu, &dn, (e, d, n));
        for (a, b) in back.iter().zip(&experts) {
            assert_eq!(a.gate_up, b.gate_up);
            assert_eq!(a.down, b.down);
        }
    }
}
