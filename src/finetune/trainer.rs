//! The seam between the fine-tuning loop and where a layer's training runs: a
//! [`LayerTrainer`] owns one layer's expert weights, its calibration data and Adam's state, and
//! runs a step (loss, gradient, update) where they live. [`CpuTrainer`] runs today's CPU path
//! ([`LayerObjective`] on host weights, [`Adam`] on the host); the CUDA one
//! (`backend::cuda::finetune::CudaTrainer`) keeps weights, moments and calibration rows on the
//! device, so that a step moves only its token indices and routing over the host link.
use anyhow::Result;
use ndarray::Axis;

use super::adam::Adam;
use super::calib::LayerCalib;
use super::noisy::{LayerBatch, LayerObjective};
use super::LOSS_FLOOR;
use crate::model::common::SwiGlu;
use crate::model::Assignment;

/// One layer's training state, wherever it lives.
pub trait LayerTrainer {
    /// The noisy loss of the current weights on every calibration token of the layer, with the
    /// noise of `noise_seed`; no step.
    fn loss_all(&mut self, noise_seed: u64) -> Result<f64>;

    /// One training step on the calibration tokens `tokens` (sorted row indices): the loss of
    /// the current weights with the noise of `noise_seed` and, when it is finite and at least
    /// [`LOSS_FLOOR`], an Adam step of size `lr` along its gradient. Returns the loss.
    fn step(&mut self, tokens: &[usize], noise_seed: u64, lr: f32) -> Result<f64>;

    /// The current weights, in the experts' own layout.
    fn experts(&self) -> Result<Vec<SwiGlu>>;
}

/// Row ranges of each token's assignments: `starts[t]..starts[t + 1]` (assignments are in
/// token order).
pub(crate) fn token_starts(calib: &LayerCalib) -> Vec<usize> {
    let n = calib.x.nrows();
    let mut starts = vec![0usize; n + 1];
    for a in &calib.assignments {
        starts[a.token as usize + 1] += 1;
    }
    for t in 0..n {
        starts[t + 1] += starts[t];
    }
    starts
}

/// The recorded data of `tokens` (sorted) as a batch: rows gathered, routing re-indexed.
struct Gathered {
    x: ndarray::Array2<f32>,
    y: ndarray::Array2<f32>,
    assignments: Vec<Assignment>,
}

fn gather(calib: &LayerCalib, starts: &[usize], tokens: &[usize]) -> Gathered {
    let mut assignments = Vec::new();
    for (row, &t) in tokens.iter().enumerate() {
        for a in &calib.assignments[starts[t]..starts[t + 1]] {
            assignments.push(Assignment {
                token: row as u32,
                ..*a
            });
        }
    }
    Gathered {
        x: calib.x.select(Axis(0), tokens),
        y: calib.y.select(Axis(0), tokens),
        assignments,
    }
}

/// [`LayerTrainer`] on the host: a [`LayerObjective`] (the CPU crossbars) for the loss and
/// gradient, [`Adam`] on the caller's weights, updated in place.
pub struct CpuTrainer<'a> {
    calib: &'a LayerCalib,
    starts: Vec<usize>,
    experts: &'a mut [SwiGlu],
    objective: &'a dyn LayerObjective,
    adam: Adam,
}

impl<'a> CpuTrainer<'a> {
    /// Trains `experts` (in place) on `calib` through `objective`.
    pub fn new(
        calib: &'a LayerCalib,
        experts: &'a mut [SwiGlu],
        objective: &'a dyn LayerObjective,
    ) -> Self {
        let adam = Adam::new(experts);
        Self {
            calib,
            starts: token_starts(calib),
            experts,
            objective,
            adam,
        }
    }
}

impl LayerTrainer for CpuTrainer<'_> {
    fn loss_all(&mut self, noise_seed: u64) -> Result<f64> {
        Ok(self
            .objective
            .evaluate(self.experts, &self.calib.batch(), noise_seed, false)?
            .loss)
    }

    fn step(&mut self, tokens: &[usize], noise_seed: u64, lr: f32) -> Result<f64> {
        let g = gather(self.calib, &self.starts, tokens);
        let batch = LayerBatch {
            layer: self.calib.layer,
            x: g.x.view(),
            y: g.y.view(),
            assignments: &g.assignments,
        };
        let lg = self
            .objective
            .evaluate(self.experts, &batch, noise_seed, true)?;
        if lg.loss.is_finite() && lg.loss >= LOSS_FLOOR {
            self.adam.step(self.experts, &lg.grads, lr);
        }
        Ok(lg.loss)
    }

    fn experts(&self) -> Result<Vec<SwiGlu>> {
        Ok(self.experts.to_vec())
    }
}
