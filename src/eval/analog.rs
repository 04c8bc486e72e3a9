//! The evaluation protocol: accuracy of the analog model against the digital baseline over
//! drift time and seeds.
//!
//! The text is cut into windows; the digital model scores them once; then for each seed the
//! mapped matrices are programmed once, and for each drift time they are drifted (from the same
//! programmed state) and the model runs on every window with each analog MVM through its
//! crossbars. Metrics on the same tokens as the digital model: perplexity, next-token top-1
//! agreement, and the mean KL(digital ‖ analog) of the next-token distributions; then mean ±
//! standard deviation over seeds per drift time.
//!
//! With a multiple-choice task ([`evaluate_with_task`]), every point also scores the task on
//! the same programmed and drifted state, beside the digital model's accuracy.
//!
//! Against a reference ([`evaluate_against`], `aimc eval --reference`): the metrics compare the
//! analog outputs with *another* model's digital outputs (the original a fine-tuned checkpoint
//! was made from), computed once on the host before the sweep; the evaluated model's own digital
//! perplexity is reported beside the reference's.
//!
//! Where the forwards run is the backend's business ([`crate::backend::Backend`], chosen by
//! [`Execution::with_backend`]): this file holds the one seed × time loop and knows no device.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::reference::{ReferenceModel, ReferenceSummary};
use super::task::{TaskAccuracy, TaskPoint, TaskReport, TaskSequences};
use crate::backend::{AnalogWork, Backend, Execution, Phases, ScoreSums};
use crate::device::Device;
use crate::mapping::Mapping;
use crate::model::{Model, RouterKind};
use crate::tile::TilePreset;

/// What to sweep.
#[derive(Clone, Debug)]
pub struct AnalogEvalConfig {
    pub times_s: Vec<f64>,
    pub seeds: Vec<u64>,
    /// Tokens per evaluated sequence (the text is cut into consecutive windows of this length).
    pub seq_len: usize,
    pub router: RouterKind,
    /// Print a line per (seed, time) point on stderr (also when stderr is not a terminal).
    pub progress: bool,
    /// Build the crossbars of this device instead of the preset's (`None`: the preset's device).
    pub device: Option<Arc<dyn Device>>,
    /// Where the routed experts' analog MVMs run (`--backend`); the CPU by default.
    pub execution: Execution,
}

/// Metrics of one (time, seed) point.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct PointMetrics {
    pub t_seconds: f64,
    pub seed: u64,
    pub perplexity: f64,
    /// Fraction of positions where the analog and digital argmax next token agree.
    pub agreement: f64,
    /// Mean over positions of KL(digital ‖ analog), in nats.
    pub kl: f64,
}

/// Mean ± standard deviation (sample, n − 1) over seeds at one drift time.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct TimeSummary {
    pub t_seconds: f64,
    pub perplexity_mean: f64,
    pub perplexity_std: f64,
    pub agreement_mean: f64,
    pub agreement_std: f64,
    pub kl_mean: f64,
    pub kl_std: f64,
}

/// The whole sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnalogEvalReport {
    pub tokens: usize,
    pub seq_len: usize,
    /// Digital perplexity of the outputs the analog ones are measured against: the model's own,
    /// or with a reference the reference's (the model's own is then in `reference`).
    pub digital_perplexity: f64,
    pub points: Vec<PointMetrics>,
    pub summary: Vec<TimeSummary>,
    /// Wall time of the analog forwards alone, and of the digital reference forward.
    pub analog_seconds: f64,
    pub digital_seconds: f64,
    /// Backend of the analog forwards: `cpu`, or `cuda (<GPU>)` with the MoE layers it ran
    /// (the backend's [`crate::backend::Description`], rendered).
    #[serde(default)]
    pub backend: String,
    /// Where `analog_seconds` went: programming (once per seed), drift + GDC (once per point),
    /// building and uploading device operands (GPU backends only), forward passes and metrics.
    /// `analog_seconds` also holds the backend's set-up (on a GPU: the dense weights' upload).
    #[serde(default)]
    pub phases: Phases,
    /// Multiple-choice task accuracy over the same points (when a task was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskReport>,
    /// When measured against another model's digital outputs: that model and both digital
    /// perplexities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSummary>,
}

/// Cuts `tokens` into windows of `seq_len` (the last may be shorter; windows of one token are dropped since they
/// predict nothing).
pub fn windows(tokens: &[u32], seq_len: usize) -> Vec<&[u32]> {
    tokens
        .chunks(seq_len.max(2))
        .filter(|w| w.len() >= 2)
        .collect()
}

/// Mean and sample standard deviation (n − 1 in the denominator; 0 for a single value) of `v`.
pub(crate) fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Runs the sweep. `mapping` says which matrices are analog and `preset` how they are built.
pub fn evaluate(
    model: &Model,
    mapping: &Mapping,
    preset: &TilePreset,
    tokens: &[u32],
    cfg: &AnalogEvalConfig,
) -> Result<AnalogEvalReport> {
    evaluate_with_task(model, mapping, preset, tokens, cfg, None)
}

/// [`evaluate`], also scoring `task` at every point (and once digitally).
pub fn evaluate_with_task(
    model: &Model,
    mapping: &Mapping,
    preset: &TilePreset,
    tokens: &[u32],
    cfg: &AnalogEvalConfig,
    task: Option<&TaskSequences>,
) -> Result<AnalogEvalReport> {
    evaluate_against(model, mapping, preset, tokens, cfg, task, None)
}

/// [`evaluate_with_task`], the analog outputs measured against `reference`'s digital outputs
/// when one is given (else the model's own). `reference` must share the model's architecture and
/// tokenizer ([`super::reference::check_compatible`]).
pub fn evaluate_against(
    model: &Model,
    mapping: &Mapping,
    preset: &TilePreset,
    tokens: &[u32],
    cfg: &AnalogEvalConfig,
    task: Option<&TaskSequences>,
    reference: Option<ReferenceModel<'_>>,
) -> Result<AnalogEvalReport> {
    if let Some(r) = reference {
        ensure!(
            r.model.config == model.config,
            "the reference {} has another architecture than the evaluated model",
            r.name
        );
    }
    ensure!(
        !cfg.times_s.is_empty() && !cfg.seeds.is_empty(),
        "need at least one drift time and one seed"
    );
    ensure!(
        cfg.times_s.iter().all(|t| t.is_finite() && *t >= 0.0),
        "drift times must be finite and ≥ 0 s, got {:?}",
        cfg.times_s
    );
    let seqs = windows(tokens, cfg.seq_len);
    ensure!(
        !seqs.is_empty(),
        "need at least 2 tokens to evaluate, got {}",
        tokens.len()
    );
    let work = AnalogWork {
        model,
        mapping,
        preset,
        router: cfg.router,
        device: cfg.device.clone(),
        first_seed: cfg.seeds[0],
    };
    let start = Instant::now();
    let run = cfg
        .execution
        .with_backend(work, |backend| sweep(backend, &seqs, cfg, task, reference))?;
    let summary = cfg
        .times_s
        .iter()
        .map(|&t| summarise(t, &run.points))
        .collect();
    let positions: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let ppl = |nll: f64| (nll / positions as f64).exp();
    let digital_perplexity = ppl(run.digital_nll);
    Ok(AnalogEvalReport {
        tokens: tokens.len(),
        seq_len: cfg.seq_len,
        digital_perplexity,
        points: run.points,
        summary,
        analog_seconds: start.elapsed().as_secs_f64() - run.digital_seconds,
        digital_seconds: run.digital_seconds,
        backend: run.backend,
        phases: run.phases,
        task: run.task.zip(task).map(|((digital, points), t)| {
            let mut r = TaskReport::new(t, digital, points, &cfg.times_s);
            r.reference_digital = run.task_reference_digital;
            r
        }),
        reference: reference
            .zip(run.own_digital_nll)
            .map(|(r, own)| ReferenceSummary::new(r.name, digital_perplexity, ppl(own))),
    })
}

/// What [`sweep`] measured.
struct Sweep {
    points: Vec<PointMetrics>,
    /// Σ −log p of the digital outputs the points are scored against.
    digital_nll: f64,
    /// With a reference: Σ −log p of the evaluated model's own digital outputs.
    own_digital_nll: Option<f64>,
    /// With a reference and a task: the reference's digital accuracy.
    task_reference_digital: Option<TaskAccuracy>,
    digital_seconds: f64,
    backend: String,
    phases: Phases,
    /// The task's digital accuracy and its points, when a task was given.
    task: Option<(super::task::TaskAccuracy, Vec<TaskPoint>)>,
}

/// The protocol on one backend: the digital reference once (the model's own, or `reference`'s),
/// then every seed × drift time point, with a progress line per point on stderr.
fn sweep(
    backend: &mut dyn Backend,
    seqs: &[&[u32]],
    cfg: &AnalogEvalConfig,
    task: Option<&TaskSequences>,
    reference: Option<ReferenceModel<'_>>,
) -> Result<Sweep> {
    let clock = Instant::now();
    let (references, own_digital_nll, task_reference_digital) = match reference {
        None => (backend.reference(seqs)?, None, None),
        Some(r) => {
            // The reference's digital outputs on the host, once. The backend's own reference is
            // never asked for, so every backend scores against these (a GPU one on the host).
            let refs = crate::backend::cpu::references_on_host(r.model, seqs, cfg.router)?;
            let from = vec![1; seqs.len()];
            let own: f64 = -backend
                .log_likelihoods(seqs, &from, false)?
                .iter()
                .sum::<f64>();
            let task_ref = task
                .map(|t| {
                    let tseqs: Vec<&[u32]> = t.tokens.iter().map(Vec::as_slice).collect();
                    let ll = crate::backend::cpu::digital_log_likelihoods(
                        r.model, cfg.router, &tseqs, &t.from,
                    )?;
                    super::task::accuracy(&t.choices, &t.answers, &t.choice_bytes, &ll)
                })
                .transpose()?;
            (refs, Some(own), task_ref)
        }
    };
    let digital_nll: f64 = references
        .iter()
        .zip(seqs)
        .map(|(r, s)| r.nll(&s[1..]))
        .sum();
    // The digital model's task accuracy counts as digital reference time.
    let task_digital = task.map(|t| t.score(backend, false)).transpose()?;
    let digital_seconds = clock.elapsed().as_secs_f64();
    let mut task_points = Vec::new();
    let n_points = cfg.seeds.len() * cfg.times_s.len();
    let mut points = Vec::with_capacity(n_points);
    for &seed in &cfg.seeds {
        backend.program(seed)?;
        for &t in &cfg.times_s {
            let clock = Instant::now();
            backend.drift_to(t)?;
            let p = point(t, seed, backend.forward(seqs, &references)?);
            if cfg.progress {
                eprintln!(
                    "  point {}/{n_points}: seed {seed}, t = {}: perplexity {:.3}, agreement {:.4}, \
                     KL {:.4} ({:.1} s)",
                    points.len() + 1,
                    crate::eval::format_duration(t),
                    p.perplexity,
                    p.agreement,
                    p.kl,
                    clock.elapsed().as_secs_f64()
                );
            }
            if let Some(task) = task {
                let a = task.score(backend, true)?;
                if cfg.progress {
                    eprintln!(
                        "    task {}: acc {:.4}, acc_norm {:.4}",
                        task.name, a.acc, a.acc_norm
                    );
                }
                task_points.push(TaskPoint {
                    t_seconds: t,
                    seed,
                    acc: a.acc,
                    acc_norm: a.acc_norm,
                });
            }
            points.push(p);
        }
    }
    let phases = backend.phases();
    for s in &phases.stages {
        eprintln!(
            "  GPU {} stage {}: {:.3} s (host enqueue {:.3} s)",
            s.group, s.name, s.seconds, s.host_seconds
        );
    }
    Ok(Sweep {
        points,
        digital_nll,
        own_digital_nll,
        task_reference_digital,
        digital_seconds,
        backend: backend.describe().to_string(),
        phases,
        task: task_digital.map(|d| (d, task_points)),
    })
}

fn point(t_seconds: f64, seed: u64, total: ScoreSums) -> PointMetrics {
    PointMetrics {
        t_seconds,
        seed,
        perplexity: (total.nll / total.positions as f64).exp(),
        agreement: total.agree as f64 / total.positions as f64,
        kl: total.kl / total.positions as f64,
    }
}

/// Mean ± standard deviation over seeds of the points at drift time `t`.
fn summarise(t: f64, points: &[PointMetrics]) -> TimeSummary {
    let at: Vec<&PointMetrics> = points.iter().filter(|p| p.t_seconds == t).collect();
    let col = |f: fn(&PointMetrics) -> f64| at.iter().map(|p| f(p)).collect::<Vec<_>>();
    let (pm, ps) = mean_std(&col(|p| p.perplexity));
    let (am, as_) = mean_std(&col(|p| p.agreement));
    let (km, ks) = mean_std(&col(|p| p.kl));
    TimeSummary {
        t_seconds: t,
        perplexity_mean: pm,
        perplexity_std: ps,
        agreement_mean: am,
        agreement_std: as_,
        kl_mean: km,
        kl_std: ks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_std_uses_the_sample_estimator() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn windows_drop_a_last_window_of_one_token() {
        let t: Vec<u32> = (0..9).collect();
        let w = windows(&t, 4);
        assert_eq!(w, vec![&t[0..4], &t[4..8]]);
        assert_eq!(windows(&t, 1).len(), 4, "windows are at least 2 tokens");
    }
}
