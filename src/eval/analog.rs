//! Accuracy of the analog model against the digital baseline over drift time and seeds (docs/model.md §7).
//!
//! For each seed the mapped matrices are programmed once; for each drift time they are drifted (from the same
//! programmed state) and the model runs on the evaluation tokens with every analog expert MVM through its crossbars.
//! Metrics on the same tokens as the digital model: perplexity, next-token top-1 agreement, and the mean
//! KL(digital ‖ analog) of the next-token distributions.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::{AnalogExperts, Execution};
use crate::device::Device;
use crate::mapping::Mapping;
use crate::model::{ForwardOptions, Model, RouterKind};
use crate::tile::TilePreset;

/// What to sweep.
#[derive(Clone, Debug)]
pub struct AnalogEvalConfig {
    pub times_s: Vec<f64>,
    pub seeds: Vec<u64>,
    /// Tokens per evaluated sequence (the text is cut into consecutive windows of this length).
    pub seq_len: usize,
    pub router: RouterKind,
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
    pub digital_perplexity: f64,
    pub points: Vec<PointMetrics>,
    pub summary: Vec<TimeSummary>,
    /// Wall time of the analog forwards alone, and of the digital reference forward.
    pub analog_seconds: f64,
    pub digital_seconds: f64,
    /// Backend of the analog forwards: `cpu`, or `cuda (<GPU>)` with the MoE layers it ran.
    #[serde(default)]
    pub backend: String,
    /// Where `analog_seconds` went: programming (once per seed), drift + GDC (once per point),
    /// building and uploading the GPU expert operands (once per point), forward passes and
    /// metrics.
    #[serde(default)]
    pub phases: EvalPhases,
}

/// Wall seconds of the phases of an analog sweep.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct EvalPhases {
    pub program_s: f64,
    pub drift_s: f64,
    pub upload_s: f64,
    pub forward_s: f64,
}

/// Sums over the positions of one sequence.
#[derive(Clone, Copy, Debug, Default)]
struct Sums {
    nll: f64,
    agree: usize,
    kl: f64,
    positions: usize,
}

impl std::ops::AddAssign for Sums {
    fn add_assign(&mut self, o: Self) {
        self.nll += o.nll;
        self.agree += o.agree;
        self.kl += o.kl;
        self.positions += o.positions;
    }
}

/// Row-wise log-softmax in f64 accumulation (stable: max subtracted first).
pub fn log_softmax_rows(logits: ArrayView2<f32>) -> Array2<f32> {
    let mut out = logits.to_owned();
    out.axis_iter_mut(Axis(0)).for_each(|mut row| {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = f64::from(m)
            + row
                .iter()
                .map(|&x| f64::from(x - m).exp())
                .sum::<f64>()
                .ln();
        row.mapv_inplace(|x| (f64::from(x) - lse) as f32);
    });
    out
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Digital reference of one sequence: log-probabilities of the positions that have a next token.
struct Reference {
    logp: Array2<f32>,
    argmax: Vec<usize>,
}

/// The reference of a sequence of `len` tokens from its digital logits (`[len, vocab]`).
fn reference(logits: ArrayView2<f32>, len: usize) -> Reference {
    let logp = log_softmax_rows(logits.slice(ndarray::s![..len - 1, ..]));
    let argmax = logp.axis_iter(Axis(0)).map(argmax).collect();
    Reference { logp, argmax }
}

/// Compares analog logits with the digital reference on `targets` (the next tokens).
fn compare(reference: &Reference, analog_logits: ArrayView2<f32>, targets: &[u32]) -> Sums {
    let n = targets.len();
    let la = log_softmax_rows(analog_logits.slice(ndarray::s![..n, ..]));
    let mut s = Sums {
        positions: n,
        ..Default::default()
    };
    for i in 0..n {
        let (a, d) = (la.row(i), reference.logp.row(i));
        s.nll -= f64::from(a[targets[i] as usize]);
        s.agree += usize::from(argmax(a) == reference.argmax[i]);
        s.kl += a
            .iter()
            .zip(d.iter())
            .map(|(&qa, &pd)| f64::from(pd).exp() * (f64::from(pd) - f64::from(qa)))
            .sum::<f64>();
    }
    s
}

/// Cuts `tokens` into windows of `seq_len` (the last may be shorter; windows of one token are dropped since they
/// predict nothing).
pub fn windows(tokens: &[u32], seq_len: usize) -> Vec<&[u32]> {
    tokens
        .chunks(seq_len.max(2))
        .filter(|w| w.len() >= 2)
        .collect()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
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
    let opts = ForwardOptions {
        router: cfg.router,
        ..Default::default()
    };
    // The whole forward on the GPU when the dense weights fit there; else only the routed
    // experts (the rest of the forward on the CPU).
    #[cfg(feature = "cuda")]
    let gpu = cfg.execution.gpu_for(preset)?;
    #[cfg(feature = "cuda")]
    let mut gpu_model = match &gpu {
        None => None,
        Some(dev) => match crate::backend::cuda::model::GpuModel::upload(dev, model) {
            Ok(gm) => Some(gm),
            Err(e) => {
                eprintln!("note: attention, norms and LM head run on the CPU ({e})");
                None
            }
        },
    };
    let mut phases = EvalPhases::default();
    let t1 = Instant::now();
    // Program, drift and run on the GPU when it holds every analog matrix and the device is
    // the preset's: the CPU builds the crossbar layout (block split, tensor ids, mapping
    // scales; no devices programmed), the GPU programs every seed itself.
    #[cfg(feature = "cuda")]
    let first = match gpu
        .as_ref()
        .filter(|_| cfg.device.is_none() && cfg.router.fixed_k())
    {
        Some(_) => {
            let clock = Instant::now();
            let layout =
                AnalogExperts::layout(model, mapping, preset, preset.device.build(), cfg.seeds[0])?;
            phases.program_s += clock.elapsed().as_secs_f64();
            Some(layout)
        }
        None => None,
    };
    #[cfg(feature = "cuda")]
    let programmed = match (&gpu, &first) {
        (Some(dev), Some(first)) => {
            use crate::backend::cuda::experts::GpuExperts;
            use crate::backend::cuda::{moe::Precision, CudaError};
            let residency = cfg.execution.gpu_memory().residency();
            let clock = Instant::now();
            let programmed =
                GpuExperts::program_with(dev, first, preset, Precision::AnalogSplitF16, residency);
            phases.upload_s += clock.elapsed().as_secs_f64();
            match programmed {
                Ok(g) => Some(g),
                Err(CudaError::Unsupported(why)) => {
                    eprintln!("note: programming and drift run on the CPU ({why})");
                    None
                }
                Err(e) => anyhow::bail!("uploading the programmed experts to the GPU: {e}"),
            }
        }
        _ => None,
    };
    // The digital reference: on the GPU, in the arithmetic of the analog forwards it is
    // compared with, when they run there; else on the CPU.
    let t0 = Instant::now();
    #[cfg(feature = "cuda")]
    let on_gpu = match (gpu_model.as_mut(), programmed.as_ref()) {
        (Some(gm), Some(g)) => Some(gpu_references(gm, g, &seqs, &cfg.router)?),
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    let on_gpu: Option<Vec<Reference>> = None;
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    let digital_on_gpu = on_gpu.is_some();
    let references: Vec<Reference> = match on_gpu {
        Some(r) => r,
        None => seqs
            .par_iter()
            .map(|s| {
                let out = model.forward(s, &opts)?;
                Ok(reference(out.logits.view(), s.len()))
            })
            .collect::<Result<_>>()?,
    };
    let digital_seconds = t0.elapsed().as_secs_f64();
    let digital_nll: f64 = references
        .iter()
        .zip(&seqs)
        .map(|(r, s)| {
            (0..s.len() - 1)
                .map(|i| -f64::from(r.logp[[i, s[i + 1] as usize]]))
                .sum::<f64>()
        })
        .sum();
    let positions: usize = seqs.iter().map(|s| s.len() - 1).sum();

    #[cfg(feature = "cuda")]
    let mut whole = match (gpu_model, &gpu) {
        (Some(gm), Some(dev)) => match reference_on_gpu(dev, &references, &seqs) {
            Ok(r) => Some((gm, r)),
            Err(e) => {
                eprintln!("note: attention, norms and LM head run on the CPU ({e})");
                None
            }
        },
        _ => None,
    };
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut backend = "cpu".to_string();
    let bar = progress_bar(cfg.progress, (cfg.times_s.len() * cfg.seeds.len()) as u64);
    let show_point = |seed: u64, t: f64| {
        bar.set_message(format!(
            "seed {seed}, t = {}",
            crate::eval::format_duration(t)
        ))
    };
    let mut points = Vec::new();
    #[cfg(feature = "cuda")]
    let mut done_on_gpu = false;
    #[cfg(feature = "cuda")]
    if let (Some(mut g), Some(first)) = (programmed, &first) {
        use crate::backend::cuda::experts::Residency;
        for (i, &seed) in cfg.seeds.iter().enumerate() {
            if i > 0 {
                let clock = Instant::now();
                g.reprogram(seed)
                    .map_err(|e| anyhow::anyhow!("programming seed {seed} on the GPU: {e}"))?;
                phases.program_s += clock.elapsed().as_secs_f64();
            }
            for &t in &cfg.times_s {
                show_point(seed, t);
                let clock = Instant::now();
                g.drift_to(t)
                    .map_err(|e| anyhow::anyhow!("drifting the experts on the GPU: {e}"))?;
                phases.drift_s += clock.elapsed().as_secs_f64();
                backend = format!(
                    "{}; programming and drift on the GPU{}",
                    describe_gpu(&cfg.execution, &g),
                    match g.residency() {
                        Some(Residency::Transient) => " (programmed state recomputed per point)",
                        Some(Residency::Streamed) => {
                            " (programmed state recomputed per point, digital weights streamed \
                             from the host)"
                        }
                        _ => "",
                    }
                );
                let clock = Instant::now();
                let total = forwards(
                    model,
                    &seqs,
                    &references,
                    &opts,
                    first,
                    Some(&g),
                    whole.as_mut(),
                    &mut backend,
                )?;
                phases.forward_s += clock.elapsed().as_secs_f64();
                points.push(point(t, seed, total));
                bar.inc(1);
            }
        }
        for st in g.stage_seconds().unwrap_or_default() {
            eprintln!(
                "  GPU programming/drift stage {}: {:.3} s (host enqueue {:.3} s)",
                st.name, st.seconds, st.host_seconds
            );
        }
        if digital_on_gpu {
            backend.push_str("; digital reference on the GPU");
        }
        done_on_gpu = true;
    }
    #[cfg(feature = "cuda")]
    let cpu_seeds: &[u64] = if done_on_gpu { &[] } else { &cfg.seeds };
    #[cfg(not(feature = "cuda"))]
    let cpu_seeds: &[u64] = &cfg.seeds;
    for &seed in cpu_seeds {
        let device = cfg.device.clone().unwrap_or_else(|| preset.device.build());
        let clock = Instant::now();
        let mut experts = AnalogExperts::program_with_device(model, mapping, preset, device, seed)?;
        phases.program_s += clock.elapsed().as_secs_f64();
        for &t in &cfg.times_s {
            show_point(seed, t);
            let clock = Instant::now();
            experts.drift_to(t);
            phases.drift_s += clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            #[cfg(feature = "cuda")]
            let gpu_experts = match &gpu {
                None => None,
                Some(dev) => {
                    let g = crate::backend::cuda::experts::GpuExperts::upload(
                        dev,
                        &experts,
                        &preset.periphery,
                        crate::backend::cuda::moe::Precision::AnalogSplitF16,
                    )
                    .map_err(|e| anyhow::anyhow!("uploading the experts to the GPU: {e}"))?;
                    backend = describe_gpu(&cfg.execution, &g);
                    Some(g)
                }
            };
            phases.upload_s += clock.elapsed().as_secs_f64();
            let clock = Instant::now();
            let total = forwards(
                model,
                &seqs,
                &references,
                &opts,
                &experts,
                #[cfg(feature = "cuda")]
                gpu_experts.as_ref(),
                #[cfg(feature = "cuda")]
                whole.as_mut(),
                #[cfg(feature = "cuda")]
                &mut backend,
            )?;
            phases.forward_s += clock.elapsed().as_secs_f64();
            points.push(point(t, seed, total));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    #[cfg(feature = "cuda")]
    if let Some(stages) = whole.as_ref().and_then(|(gm, _)| gm.stage_seconds()) {
        for s in stages {
            eprintln!(
                "  GPU forward stage {}: {:.3} s (host enqueue {:.3} s)",
                s.name, s.seconds, s.host_seconds
            );
        }
    }
    let summary = cfg
        .times_s
        .iter()
        .map(|&t| {
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
        })
        .collect();
    Ok(AnalogEvalReport {
        tokens: tokens.len(),
        seq_len: cfg.seq_len,
        digital_perplexity: (digital_nll / positions as f64).exp(),
        points,
        summary,
        analog_seconds: t1.elapsed().as_secs_f64() - digital_seconds,
        digital_seconds,
        backend,
        phases,
    })
}

/// The analog forward passes of one (time, seed) point over every sequence, with the metrics
/// summed: the whole forward on the GPU (`whole`) when the GPU holds the experts, else the CPU
/// forward in parallel over sequences with the routed experts on the GPU or the CPU.
#[allow(clippy::too_many_arguments)]
fn forwards(
    model: &Model,
    seqs: &[&[u32]],
    references: &[Reference],
    opts: &ForwardOptions<'_>,
    cpu: &AnalogExperts<'_>,
    #[cfg(feature = "cuda")] gpu: Option<&crate::backend::cuda::experts::GpuExperts<'_, '_>>,
    #[cfg(feature = "cuda")] whole: Option<&mut (
        crate::backend::cuda::model::GpuModel<'_>,
        crate::backend::cuda::model::GpuReference,
    )>,
    #[cfg(feature = "cuda")] backend: &mut String,
) -> Result<Sums> {
    #[cfg(feature = "cuda")]
    if let (Some(g), Some((gm, gref))) = (gpu, whole) {
        // As many sequences per pass as the free device memory holds (all of them for the
        // embedded model): one pass over the layers instead of one per sequence.
        let per_pass = gm
            .sequences_per_pass(g.device(), seqs[0].len())
            .map_err(|e| anyhow::anyhow!("sizing the GPU batch: {e}"))?;
        let mut total = Sums::default();
        for start in (0..seqs.len()).step_by(per_pass) {
            let end = (start + per_pass).min(seqs.len());
            let logits = gm.forward_sequences(&seqs[start..end], g, &opts.router, start as u32)?;
            let p = gref
                .compare_sequences(g.device(), start..end, &logits)
                .map_err(|e| anyhow::anyhow!("metrics on the GPU: {e}"))?;
            total += Sums {
                nll: p.nll,
                agree: p.agree,
                kl: p.kl,
                positions: p.positions,
            };
        }
        backend.push_str(&format!(
            "; whole forward on the GPU, {} sequences per pass",
            per_pass.min(seqs.len())
        ));
        return Ok(total);
    }
    let per_seq: Vec<Sums> = seqs
        .par_iter()
        .enumerate()
        .map(|(k, s)| {
            let cpu_call = cpu.call(k as u32);
            #[cfg(feature = "cuda")]
            let gpu_call = gpu.map(|g| g.call(k as u32));
            #[cfg(feature = "cuda")]
            let call: &dyn crate::model::ExpertLinear = match &gpu_call {
                Some(g) => g,
                None => &cpu_call,
            };
            #[cfg(not(feature = "cuda"))]
            let call: &dyn crate::model::ExpertLinear = &cpu_call;
            let o = ForwardOptions {
                experts: Some(call),
                ..*opts
            };
            let out = model.forward(s, &o)?;
            Ok(compare(&references[k], out.logits.view(), &s[1..]))
        })
        .collect::<Result<_>>()?;
    let mut total = Sums::default();
    for s in per_seq {
        total += s;
    }
    Ok(total)
}

fn point(t_seconds: f64, seed: u64, total: Sums) -> PointMetrics {
    PointMetrics {
        t_seconds,
        seed,
        perplexity: (total.nll / total.positions as f64).exp(),
        agreement: total.agree as f64 / total.positions as f64,
        kl: total.kl / total.positions as f64,
    }
}

/// The digital reference of `seqs` on the GPU, for the metrics of the analog forwards there.
#[cfg(feature = "cuda")]
fn reference_on_gpu(
    dev: &crate::backend::cuda::CudaDevice,
    references: &[Reference],
    seqs: &[&[u32]],
) -> Result<crate::backend::cuda::model::GpuReference> {
    let refs: Vec<_> = references
        .iter()
        .zip(seqs)
        .map(|(r, s)| (r.logp.view(), r.argmax.as_slice(), &s[1..]))
        .collect();
    Ok(crate::backend::cuda::model::GpuReference::upload(
        dev, &refs,
    )?)
}

/// The digital references of `seqs` from the digital forward on the GPU
/// ([`crate::backend::cuda::model::GpuModel::digital_sequences`]), as many sequences per pass
/// as the device memory holds.
#[cfg(feature = "cuda")]
fn gpu_references(
    gm: &mut crate::backend::cuda::model::GpuModel<'_>,
    g: &crate::backend::cuda::experts::GpuExperts<'_, '_>,
    seqs: &[&[u32]],
    router: &RouterKind,
) -> Result<Vec<Reference>> {
    let dev = g.device();
    let per_pass = gm
        .sequences_per_pass(dev, seqs[0].len())
        .map_err(|e| anyhow::anyhow!("sizing the GPU batch: {e}"))?;
    let mut out = Vec::with_capacity(seqs.len());
    for batch in seqs.chunks(per_pass) {
        let logits = gm.digital_sequences(batch, g, router)?;
        let logits = dev
            .download(&logits)
            .map_err(|e| anyhow::anyhow!("copying the digital logits back: {e}"))?;
        let rows: usize = batch.iter().map(|s| s.len()).sum();
        let logits = Array2::from_shape_vec((rows, logits.len() / rows), logits)?;
        let starts: Vec<usize> = batch
            .iter()
            .scan(0, |r, s| {
                let start = *r;
                *r += s.len();
                Some(start)
            })
            .collect();
        out.par_extend(
            batch
                .par_iter()
                .zip(starts)
                .map(|(s, r0)| reference(logits.slice(ndarray::s![r0..r0 + s.len(), ..]), s.len())),
        );
    }
    Ok(out)
}

/// `cuda (<GPU>): routed experts of layers [..] on the GPU; layer L on the CPU (why)`.
#[cfg(feature = "cuda")]
fn describe_gpu(
    execution: &Execution,
    g: &crate::backend::cuda::experts::GpuExperts<'_, '_>,
) -> String {
    let on_gpu: Vec<usize> = g.gpu_layers().collect();
    let mut s = format!(
        "{}: routed experts of MoE layers {on_gpu:?} on the GPU",
        execution.describe()
    );
    for (l, why) in g.cpu_layers() {
        s.push_str(&format!("; layer {l} on the CPU ({why})"));
    }
    s
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} (time × seed) {msg} [{elapsed}]",
        )
        .expect("valid template"),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn log_softmax_rows_normalise() {
        let l = log_softmax_rows(array![[1.0f32, 2.0, 3.0], [1000.0, 1000.0, -1000.0]].view());
        for row in l.rows() {
            let s: f64 = row.iter().map(|&x| f64::from(x).exp()).sum();
            assert!((s - 1.0).abs() < 1e-6);
        }
        assert!((l[[1, 0]] - (0.5f32).ln()).abs() < 1e-6);
    }

    #[test]
    fn identical_distributions_agree_fully_with_zero_kl() {
        let logits = array![[0.1f32, 2.0, -1.0], [3.0, 0.0, 0.5]];
        let logp = log_softmax_rows(logits.view());
        let argmax = logp.axis_iter(Axis(0)).map(argmax).collect();
        let r = Reference { logp, argmax };
        let s = compare(&r, logits.view(), &[1, 0]);
        assert_eq!(s.agree, 2);
        assert!(s.kl.abs() < 1e-9);
        // Shifting all logits of a row by a constant changes nothing.
        let shifted = logits.mapv(|x| x + 7.0);
        let s2 = compare(&r, shifted.view(), &[1, 0]);
        assert!((s2.nll - s.nll).abs() < 1e-5 && s2.kl.abs() < 1e-6);
    }

    #[test]
    fn mean_std_uses_the_sample_estimator() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
