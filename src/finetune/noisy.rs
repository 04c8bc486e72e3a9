//! The objective of layer-wise hardware-aware fine-tuning and its gradient (docs/finetune.md §2):
//! one MoE layer's routed-expert output computed through the preset's analog physics, against
//! the digital output recorded on calibration text, and the hand-written backward.
//!
//! The forward is the simulator's own: every expert matrix is programmed onto crossbars with
//! [`AnalogMatrix::program_with_device`] (mapping scale from the current weights, tiling,
//! programming noise, drift exponents), drifted with [`AnalogMatrix::drift_to`] to the training
//! read-out time (drift, read noise, global drift compensation), and multiplied with
//! [`Crossbar::mvm`] (noise management, DAC, analog product, weight and output noise, ADC,
//! bound management, rescale). Nothing of the physics is written twice.
//!
//! The backward treats each noisy product `y = x̂ · Ŵᵀ` as linear in the *clean* weights
//! (straight-through noise, Rasch et al. 2023): Ŵ is the block's effective weight after noise,
//! drift and GDC (W̃·s_map·α), x̂ the DAC's quantised input in input units. The DAC and ADC pass
//! gradients straight through inside their range and block them where the output clipped
//! (where iterative bound management is on, it rescales saturating rows instead of clipping
//! them, so no mask applies). The mapping scale s_map, the GDC factor α, the noise-management
//! scale α_nm and the routing weights are constants of the backward.
//!
//! [`LayerObjective`] is the objective's interface; [`CpuObjective`] is this one. The GPU trains
//! behind the trainer seam instead (`finetune::trainer::LayerTrainer`), with the same
//! objective on device-resident weights (`backend::cuda::finetune`).
use std::sync::Arc;

use anyhow::Result;
use ndarray::{concatenate, s, Array2, ArrayView1, ArrayView2, Axis, Zip};
use rayon::prelude::*;

use crate::backend::cpu::matrix_tensor_id;
use crate::device::Device;
use crate::model::common::SwiGlu;
use crate::model::{Assignment, ExpertSlot, MatrixId, Proj};
use crate::tile::{AnalogMatrix, Crossbar, NoiseManagement, PeripherySpec, TilePreset};

/// Tokens of one MoE layer the objective is evaluated on.
#[derive(Clone, Copy, Debug)]
pub struct LayerBatch<'a> {
    /// Decoder layer index (keys the tensor ids of the random streams).
    pub layer: usize,
    /// Routed-expert inputs `[T, hidden]`.
    pub x: ArrayView2<'a, f32>,
    /// Digital routed-expert outputs `[T, hidden]` (the target).
    pub y: ArrayView2<'a, f32>,
    /// Routing; `token` indexes the rows of `x` and `y`.
    pub assignments: &'a [Assignment],
}

/// The loss and, on request, its gradient with respect to every expert's weights.
#[derive(Clone, Debug)]
pub struct LossGrad {
    /// Σ‖ŷ − y‖² / Σ‖y‖² over the batch (relative squared error of the layer output).
    pub loss: f64,
    /// Σ‖y‖² over the batch (the normaliser).
    pub target_energy: f64,
    /// Gradient per expert in the experts' layout (zero for experts no token used); empty when
    /// no gradient was asked for.
    pub grads: Vec<SwiGlu>,
}

/// One layer's noisy objective on host weights (the CPU trainer's; the GPU trainer computes the
/// same on the device).
pub trait LayerObjective: Sync {
    /// The loss of `experts` on `batch` with the noise of `noise_seed` (every random stream of
    /// this evaluation is keyed by it, the tensor id and the element), and its gradient when
    /// `gradient`.
    fn evaluate(
        &self,
        experts: &[SwiGlu],
        batch: &LayerBatch<'_>,
        noise_seed: u64,
        gradient: bool,
    ) -> Result<LossGrad>;
}

/// [`LayerObjective`] on the CPU, through the tile module's crossbars.
pub struct CpuObjective<'p> {
    preset: &'p TilePreset,
    device: Arc<dyn Device>,
    /// Read-out time after programming (s) of the training noise; `None`: right after
    /// programming (programming noise only, no drift, no read noise, no GDC).
    drift_s: Option<f64>,
}

impl<'p> CpuObjective<'p> {
    /// The objective on crossbars of `preset` (its own device), read out `drift_s` seconds after
    /// programming.
    pub fn new(preset: &'p TilePreset, drift_s: Option<f64>) -> Self {
        Self {
            preset,
            device: preset.device.build(),
            drift_s,
        }
    }
}

/// One analog product `y = mvm(x)` with what its backward needs.
struct Product {
    y: Array2<f32>,
    /// DAC-quantised inputs in input units (`[n, n_in]`).
    xq: Array2<f32>,
    /// Effective noisy weights Ŵ (`[n_out, n_in]`), GDC included.
    w_eff: Array2<f32>,
    /// 1 where the output is inside the ADC range, 0 where it clipped; `None`: nothing clipped.
    pass: Option<Array2<f32>>,
}

impl Product {
    /// (∂L/∂W, ∂L/∂x) from ∂L/∂y.
    fn backward(&self, mut gy: Array2<f32>, need_dx: bool) -> (Array2<f32>, Option<Array2<f32>>) {
        if let Some(p) = &self.pass {
            gy *= p;
        }
        let dw = gy.t().dot(&self.xq);
        let dx = need_dx.then(|| gy.dot(&self.w_eff));
        (dw, dx)
    }
}

/// The noise-management scale α_nm of one input row (docs/model.md §3.1).
fn noise_scale(nm: NoiseManagement, row: ArrayView1<'_, f32>) -> f32 {
    match nm {
        NoiseManagement::AbsMax => row.fold(0.0f32, |m, v| m.max(v.abs())),
        NoiseManagement::Constant { value } => value,
        NoiseManagement::None => 1.0,
    }
}

/// The DAC's view of `x` in input units: α_nm·DAC(x/α_nm), per row (docs/model.md §3.1–3.2),
/// with the α_nm of each row.
fn quantised_inputs(p: &PeripherySpec, x: ArrayView2<'_, f32>) -> (Array2<f32>, Vec<f32>) {
    let mut xq = Array2::<f32>::zeros(x.raw_dim());
    let mut scales = Vec::with_capacity(x.nrows());
    for (row, mut out) in x.rows().into_iter().zip(xq.rows_mut()) {
        let a = noise_scale(p.noise_management, row);
        scales.push(a);
        if a == 0.0 {
            continue;
        }
        match p.dac {
            Some(dac) => {
                let step = dac.step();
                Zip::from(&mut out)
                    .and(&row)
                    .for_each(|o, &v| *o = a * dac.quantize(v / a, step));
            }
            None => out.assign(&row),
        }
    }
    (xq, scales)
}

/// The digital scales a block applies to output j (s_map·α_GDC), as `Crossbar::mvm` does.
fn output_scales(b: &Crossbar) -> Vec<f32> {
    let alpha = b.gdc_alpha();
    let per_column = alpha.len() == b.n_out() && b.n_out() > 1;
    b.map_scale()
        .iter()
        .enumerate()
        .map(|(j, s)| s * if per_column { alpha[j] } else { alpha[0] })
        .collect()
}

impl CpuObjective<'_> {
    /// Programs `w` (tensor `id`) with `seed`, drifts it, and multiplies `x`.
    fn product(
        &self,
        w: ArrayView2<'_, f32>,
        x: ArrayView2<'_, f32>,
        seed: u64,
        id: MatrixId,
    ) -> Result<Product> {
        let p = &self.preset.periphery;
        let mut m = AnalogMatrix::program_with_device(
            w,
            self.preset,
            self.device.clone(),
            seed,
            matrix_tensor_id(id),
        )?;
        if let Some(t) = self.drift_s {
            m.drift_to(t);
        }
        let (n, n_out, n_in) = (x.nrows(), w.nrows(), w.ncols());
        let mut y = Array2::<f32>::zeros((n, n_out));
        let mut xq = Array2::<f32>::zeros((n, n_in));
        let mut w_eff = Array2::<f32>::zeros((n_out, n_in));
        // Without bound management a saturated ADC output is clipped: its gradient is 0.
        let clips = p.adc.is_some() && p.bm_beta_limit().is_none();
        let mut pass = clips.then(|| Array2::<f32>::ones((n, n_out)));
        for (g, b) in m.geometry().iter().zip(m.blocks()) {
            let xb = x.slice(s![.., g.in_range.clone()]);
            let part = b.mvm(xb, 0);
            let scales = output_scales(b);
            let mut we = b.effective_weights();
            let alpha = b.gdc_alpha();
            let per_column = alpha.len() == b.n_out() && b.n_out() > 1;
            for (j, mut row) in we.rows_mut().into_iter().enumerate() {
                row *= if per_column { alpha[j] } else { alpha[0] };
            }
            w_eff
                .slice_mut(s![g.out_range.clone(), g.in_range.clone()])
                .assign(&we);
            let (xqb, nm) = quantised_inputs(p, xb);
            if g.out_block == 0 {
                xq.slice_mut(s![.., g.in_range.clone()]).assign(&xqb);
            }
            if let (Some(mask), Some(adc)) = (pass.as_mut(), p.adc) {
                // Output j of row r clipped iff |y| reached bound·α_nm·s_map·α.
                let mut mb = mask.slice_mut(s![.., g.out_range.clone()]);
                for (r, (prow, mut mrow)) in part.rows().into_iter().zip(mb.rows_mut()).enumerate()
                {
                    for ((v, m), s) in prow.iter().zip(mrow.iter_mut()).zip(&scales) {
                        let limit = adc.bound * nm[r] * s;
                        if limit > 0.0 && v.abs() >= limit * (1.0 - 1e-5) {
                            *m = 0.0;
                        }
                    }
                }
            }
            let mut dst = y.slice_mut(s![.., g.out_range.clone()]);
            dst += &part;
        }
        Ok(Product { y, xq, w_eff, pass })
    }
}

/// One expert's forward on its tokens, kept for the backward.
struct ExpertPass {
    expert: usize,
    tokens: Vec<usize>,
    route_w: Vec<f32>,
    gate: Product,
    up: Product,
    down: Product,
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// d silu(a)/da = σ(a)·(1 + a·(1 − σ(a))).
fn silu_grad(v: f32) -> f32 {
    let sg = 1.0 / (1.0 + (-v).exp());
    sg * (1.0 + v * (1.0 - sg))
}

impl LayerObjective for CpuObjective<'_> {
    fn evaluate(
        &self,
        experts: &[SwiGlu],
        batch: &LayerBatch<'_>,
        noise_seed: u64,
        gradient: bool,
    ) -> Result<LossGrad> {
        let (t, h) = batch.x.dim();
        let mut groups: Vec<(Vec<usize>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); experts.len()];
        for a in batch.assignments {
            let g = &mut groups[a.expert as usize];
            g.0.push(a.token as usize);
            g.1.push(a.weight);
        }
        let layer = batch.layer;
        let passes: Vec<ExpertPass> = groups
            .into_par_iter()
            .enumerate()
            .filter(|(_, g)| !g.0.is_empty())
            .map(|(e, (tokens, route_w))| {
                let id = |proj| MatrixId {
                    layer,
                    slot: ExpertSlot::Routed(e),
                    proj,
                };
                let w = &experts[e];
                let xe = batch.x.select(Axis(0), &tokens);
                let (gate, up) = rayon::join(
                    || self.product(w.gate(), xe.view(), noise_seed, id(Proj::Gate)),
                    || self.product(w.up(), xe.view(), noise_seed, id(Proj::Up)),
                );
                let (gate, up) = (gate?, up?);
                let mut hid = gate.y.clone();
                Zip::from(&mut hid)
                    .and(&up.y)
                    .for_each(|a, &u| *a = silu(*a) * u);
                let down = self.product(w.down.view(), hid.view(), noise_seed, id(Proj::Down))?;
                Ok(ExpertPass {
                    expert: e,
                    tokens,
                    route_w,
                    gate,
                    up,
                    down,
                })
            })
            .collect::<Result<_>>()?;
        // ŷ in expert order (a fixed summation order whatever the thread count).
        let mut y_hat = Array2::<f32>::zeros((t, h));
        for p in &passes {
            for ((row, &tok), &w) in p.down.y.rows().into_iter().zip(&p.tokens).zip(&p.route_w) {
                let mut o = y_hat.row_mut(tok);
                o.scaled_add(w, &row);
            }
        }
        let resid = &y_hat - &batch.y;
        let err: f64 = resid.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let energy: f64 = batch.y.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let norm = energy.max(f64::MIN_POSITIVE);
        let loss = err / norm;
        if !gradient {
            return Ok(LossGrad {
                loss,
                target_energy: energy,
                grads: Vec::new(),
            });
        }
        // ∂L/∂ŷ = 2(ŷ − y)/Σ‖y‖².
        let g_yhat = resid.mapv(|v| (2.0 * f64::from(v) / norm) as f32);
        let mut grads: Vec<SwiGlu> = experts
            .iter()
            .map(|w| SwiGlu {
                gate_up: Array2::zeros(w.gate_up.raw_dim()),
                down: Array2::zeros(w.down.raw_dim()),
            })
            .collect();
        let computed: Vec<(usize, SwiGlu)> = passes
            .par_iter()
            .map(|p| {
                let mut g_out = g_yhat.select(Axis(0), &p.tokens);
                for (mut row, &w) in g_out.rows_mut().into_iter().zip(&p.route_w) {
                    row *= w;
                }
                let (d_down, g_h) = p.down.backward(g_out, true);
                let g_h = g_h.expect("asked for ∂L/∂h");
                let mut g_a = g_h.clone();
                let mut g_u = g_h;
                Zip::from(&mut g_a)
                    .and(&mut g_u)
                    .and(&p.gate.y)
                    .and(&p.up.y)
                    .for_each(|ga, gu, &a, &u| {
                        *ga *= u * silu_grad(a);
                        *gu *= silu(a);
                    });
                let ((d_gate, _), (d_up, _)) =
                    rayon::join(|| p.gate.backward(g_a, false), || p.up.backward(g_u, false));
                let gate_up =
                    concatenate(Axis(0), &[d_gate.view(), d_up.view()]).expect("equal widths");
                (
                    p.expert,
                    SwiGlu {
                        gate_up,
                        down: d_down,
                    },
                )
            })
            .collect();
        for (e, g) in computed {
            grads[e] = g;
        }
        Ok(LossGrad {
            loss,
            target_energy: energy,
            grads,
        })
    }
}
