//! Hardware-aware fine-tuning of a checkpoint's routed experts by layer-wise distillation
//! (docs/finetune.md; design after Rasch et al., Nature Communications 2023, applied per layer).
//!
//! 1. [`calib::record`]: the digital model runs on calibration text; every MoE layer's expert
//!    inputs, routing and digital routed-expert output are kept.
//! 2. [`finetune_layer`]: per layer, Adam minimises E‖ŷ − y‖² / E‖y‖² where ŷ is the layer's
//!    routed-expert output through the preset's analog physics with fresh noise every step
//!    ([`noisy::CpuObjective`]), y the recorded digital output. The loop ([`train_layer`]) drives
//!    a [`trainer::LayerTrainer`], which owns the layer's weights and Adam's state where they
//!    live: on the host ([`trainer::CpuTrainer`]) or on the GPU
//!    (`backend::cuda::finetune::CudaTrainer`).
//! 3. The caller writes the trained experts (`aimc finetune` does, with the checkpoint writer).
//!
//! Every random number comes from the keyed streams of [`crate::rng`]: the noise of step s is
//! keyed by ([`noise_seed`]`(seed, s)`, tensor id, element), the token batches by
//! `(seed, layer, epoch)`. Work is parallel over experts with a fixed summation order, so the
//! trained weights are bit-identical for any number of threads.
pub mod adam;
pub mod calib;
pub mod noisy;
pub mod trainer;

use std::time::Instant;

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::model::common::SwiGlu;
use crate::rng::SplitMix64;
use calib::LayerCalib;
use noisy::LayerObjective;
use trainer::LayerTrainer;

/// The step index whose noise measures the loss before and after training (never a training
/// step's).
pub const EVAL_STEP: u64 = u64::MAX;

/// Final learning rate as a fraction of the initial one (cosine decay).
const FINAL_LR_FRACTION: f32 = 0.1;

/// A batch whose relative error is below this makes no step. The crossbars' own arithmetic
/// error (block weights rounded once to binary16, docs/model.md §3) gives ~1e-7 with the
/// `ideal` preset, while `pcm-3d-8tier` costs 6e-3 and more on the embedded model (programming
/// noise alone, right after programming); a
/// gradient of rounding error would be normalised by Adam into a full-size step, so that with
/// the `ideal` preset the weights would wander instead of staying where the loss is already
/// (nearly) zero.
pub const LOSS_FLOOR: f64 = 1e-6;

/// Hyper-parameters of one fine-tuning run.
#[derive(Clone, Debug, Serialize)]
pub struct FinetuneConfig {
    /// Adam steps per layer (≥ 1).
    pub steps: usize,
    /// Initial learning rate (weight units per step), decayed by a cosine to a tenth.
    pub lr: f32,
    /// Seed of the training noise and of the token batches.
    pub seed: u64,
    /// Calibration tokens per step (all of them when larger than the recorded set).
    pub batch_tokens: usize,
    /// Read-out time after programming of the training noise, s (`None`: right after
    /// programming, without drift, read noise or drift compensation).
    pub drift_s: Option<f64>,
}

/// Loss of one layer before and after training, on all its calibration tokens with the noise of
/// [`EVAL_STEP`] (the same draw before and after).
#[derive(Clone, Debug, Serialize)]
pub struct LayerRecord {
    /// Decoder layer index.
    pub layer: usize,
    /// Calibration tokens of the layer.
    pub tokens: usize,
    /// Relative squared error Σ‖ŷ − y‖²/Σ‖y‖² before training.
    pub loss_before: f64,
    /// The same after training.
    pub loss_after: f64,
    /// Mean training loss over the first tenth of the steps.
    pub train_loss_first: f64,
    /// Mean training loss over the last tenth of the steps.
    pub train_loss_last: f64,
    /// Wall time of the layer (training and the two loss evaluations), s.
    pub seconds: f64,
    /// On the GPU: the peak bytes of the layer's device buffers (the memory pool's high-water
    /// mark while it trained); `None` on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_peak_bytes: Option<u64>,
    /// On the GPU: setting the layer up on the device (crossbar layouts on the host, uploads)
    /// and reading its trained experts back, s (not in `seconds`); `None` on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer_seconds: Option<f64>,
}

/// The seed of every noise stream of training step `step` (or of [`EVAL_STEP`]), derived from
/// the run's seed by SplitMix64 so that it never coincides with an evaluation seed in practice.
pub fn noise_seed(seed: u64, step: u64) -> u64 {
    let mut r = SplitMix64(seed ^ 0x4649_4E45_5455_4E45); // "FINETUNE"
    let a = r.next_u64();
    SplitMix64(a ^ step.wrapping_mul(0xD6E8_FEB8_6659_FD93)).next_u64()
}

/// The tokens of step `step`: consecutive slices of a per-epoch permutation of `0..n` keyed by
/// (seed, layer, epoch), sorted; all tokens when `batch ≥ n`.
fn batch_tokens(n: usize, batch: usize, seed: u64, layer: usize, step: usize) -> Vec<usize> {
    if batch >= n {
        return (0..n).collect();
    }
    let per_epoch = n / batch;
    let (epoch, k) = (step / per_epoch, step % per_epoch);
    let mut r = SplitMix64(noise_seed(seed ^ ((layer as u64) << 40), epoch as u64));
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, r.below(i + 1));
    }
    let mut out = perm[k * batch..(k + 1) * batch].to_vec();
    out.sort_unstable();
    out
}

/// Trains one layer's routed experts (`experts`, in place) on its calibration data through
/// `objective` on the host ([`trainer::CpuTrainer`]); `progress` receives a line now and then.
pub fn finetune_layer(
    calib: &LayerCalib,
    experts: &mut [SwiGlu],
    objective: &dyn LayerObjective,
    cfg: &FinetuneConfig,
    progress: &dyn Fn(&str),
) -> Result<LayerRecord> {
    let mut trainer = trainer::CpuTrainer::new(calib, experts, objective);
    train_layer(calib, &mut trainer, cfg, progress)
}

/// The training loop of one layer, wherever `trainer` runs: the loss before (noise of
/// [`EVAL_STEP`], all calibration tokens), `cfg.steps` steps on the seeded token batches with
/// the cosine learning rate, the loss after. The trained weights stay in `trainer`.
pub fn train_layer(
    calib: &LayerCalib,
    trainer: &mut dyn LayerTrainer,
    cfg: &FinetuneConfig,
    progress: &dyn Fn(&str),
) -> Result<LayerRecord> {
    ensure!(cfg.steps >= 1, "fine-tuning needs at least one step");
    ensure!(
        cfg.lr.is_finite() && cfg.lr > 0.0,
        "learning rate must be finite and > 0"
    );
    let clock = Instant::now();
    let n = calib.x.nrows();
    ensure!(n > 0, "layer {}: no calibration tokens", calib.layer);
    let eval_seed = noise_seed(cfg.seed, EVAL_STEP);
    let loss_before = trainer.loss_all(eval_seed)?;
    progress(&format!(
        "layer {}: {} tokens, noisy loss before {:.5}",
        calib.layer, n, loss_before
    ));
    let mut losses = Vec::with_capacity(cfg.steps);
    let report_every = (cfg.steps / 4).max(1);
    for step in 0..cfg.steps {
        let tokens = batch_tokens(n, cfg.batch_tokens, cfg.seed, calib.layer, step);
        let progress_frac = step as f32 / cfg.steps.max(2).saturating_sub(1) as f32;
        let lr = cfg.lr
            * (FINAL_LR_FRACTION
                + (1.0 - FINAL_LR_FRACTION)
                    * 0.5
                    * (1.0 + (std::f32::consts::PI * progress_frac).cos()));
        let loss = trainer.step(&tokens, noise_seed(cfg.seed, step as u64), lr)?;
        ensure!(
            loss.is_finite(),
            "layer {}: the loss became {} at step {step} (lower --lr)",
            calib.layer,
            loss
        );
        losses.push(loss);
        if (step + 1) % report_every == 0 {
            let recent = &losses[losses.len().saturating_sub(report_every)..];
            progress(&format!(
                "layer {}: step {}/{}, training loss {:.5} (mean of the last {})",
                calib.layer,
                step + 1,
                cfg.steps,
                recent.iter().sum::<f64>() / recent.len() as f64,
                recent.len()
            ));
        }
    }
    let loss_after = trainer.loss_all(eval_seed)?;
    let tenth = (cfg.steps / 10).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let record = LayerRecord {
        layer: calib.layer,
        tokens: n,
        loss_before,
        loss_after,
        train_loss_first: mean(&losses[..tenth]),
        train_loss_last: mean(&losses[losses.len() - tenth..]),
        seconds: clock.elapsed().as_secs_f64(),
        device_peak_bytes: None,
        transfer_seconds: None,
    };
    progress(&format!(
        "layer {}: noisy loss {:.5} → {:.5} ({:+.1} %), {:.1} s",
        record.layer,
        record.loss_before,
        record.loss_after,
        100.0 * (record.loss_after / record.loss_before - 1.0),
        record.seconds
    ));
    Ok(record)
}
