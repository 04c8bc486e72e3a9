//! The CUDA [`Backend`]: the choices of where each part of an analog evaluation runs on a GPU,
//! made once at set-up ([`with_cuda`]) and reported as a [`Description`].
//!
//! - Programming and drift run on the GPU ([`GpuExperts::program_with`], the programmed state
//!   kept per [`Residency`]) when it holds every analog matrix, the device is the preset's and
//!   every token has the same number of experts; otherwise the CPU programs and drifts
//!   ([`CpuBackend`]) and the drifted operands are uploaded at each point
//!   ([`GpuExperts::upload`]), with the layers that do not fit left on the CPU.
//! - The whole forward (attention, norms, LM head, and the scores) runs on the GPU
//!   ([`GpuModel`], [`GpuReference`]) when the dense weights and the digital reference fit
//!   there; otherwise the CPU runs the forward with only the routed experts on the GPU.
//! - The digital reference runs on the GPU, in the arithmetic of the analog forwards it is
//!   compared with, when both the whole model and the programming are there.
//!
//! Every fallback prints a one-line note naming the reason and shows in the description.
use anyhow::{anyhow, bail, Result};
use ndarray::Array2;
use rayon::prelude::*;

use super::experts::GpuExperts;
use super::gemm::Precision;
use super::model::GpuModel;
use super::programmed::Residency;
use super::score::GpuReference;
use super::{CudaDevice, CudaError};
use crate::backend::cpu::{
    log_likelihoods_on_host, references_on_host, score_on_host, AnalogExperts, CpuBackend,
};
use crate::backend::describe::{Description, GpuPlacement, Phases, ProgrammedState, Stage};
use crate::backend::score::{Reference, ScoreSums};
use crate::backend::{AnalogWork, Backend, GpuMemory};
use crate::model::RouterKind;

/// Who programs and drifts the crossbars.
enum Programming<'a, 'r, 'm> {
    /// The GPU, from the digital weights. `fresh`: programmed with the set-up seed and not yet
    /// handed out by [`Backend::program`].
    Gpu {
        experts: Box<GpuExperts<'a, 'm>>,
        fresh: bool,
    },
    /// The CPU; the drifted operands go up at each forward.
    Host(CpuBackend<'r, 'm>),
}

/// An analog evaluation on one GPU, with the CPU where the GPU cannot serve.
pub struct CudaBackend<'a, 'r, 'm> {
    dev: &'a CudaDevice,
    work: AnalogWork<'r, 'm>,
    /// The dense part of the forward on the GPU, and (after [`Backend::reference`]) the
    /// digital reference there: with both, the whole forward runs on the device.
    model: Option<GpuModel<'m>>,
    reference: Option<GpuReference>,
    programming: Programming<'a, 'r, 'm>,
    description: Description,
    phases: Phases,
}

/// Sets up the CUDA backend of `work` on `dev` (named `name` in reports) with the routed
/// experts' memory per `memory`, and runs `f` on it.
pub fn with_cuda<R>(
    dev: &CudaDevice,
    name: String,
    memory: GpuMemory,
    work: AnalogWork<'_, '_>,
    f: impl FnOnce(&mut dyn Backend) -> Result<R>,
) -> Result<R> {
    let mut phases = Phases {
        upload_s: Some(0.0),
        ..Default::default()
    };
    // The whole forward on the GPU when the dense weights fit there; else only the routed
    // experts (the rest of the forward on the CPU).
    let model = match GpuModel::upload(dev, work.model) {
        Ok(gm) => Some(gm),
        Err(e) => {
            eprintln!("note: attention, norms and LM head run on the CPU ({e})");
            None
        }
    };
    // Program, drift and run on the GPU when it holds every analog matrix and the device is
    // the preset's: the CPU builds the crossbar layout (block split, tensor ids, mapping
    // scales; no devices programmed), the GPU programs every seed itself.
    let layout = if work.device.is_none() && work.router.fixed_k() {
        let preset = work.preset;
        Some(phases.time(
            |p| &mut p.program_s,
            || {
                AnalogExperts::layout(
                    work.model,
                    work.mapping,
                    preset,
                    preset.device.build(),
                    work.first_seed,
                )
            },
        )?)
    } else {
        None
    };
    let on_gpu = match &layout {
        Some(layout) => {
            let clock = std::time::Instant::now();
            let programmed = GpuExperts::program_with(
                dev,
                layout,
                work.preset,
                Precision::AnalogF16,
                memory.residency(),
            );
            *phases.upload_s.get_or_insert(0.0) += clock.elapsed().as_secs_f64();
            match programmed {
                Ok(g) => Some(g),
                Err(CudaError::Unsupported(why)) => {
                    eprintln!("note: programming and drift run on the CPU ({why})");
                    None
                }
                Err(e) => bail!("uploading the programmed experts to the GPU: {e}"),
            }
        }
        None => None,
    };
    let programming = match on_gpu {
        Some(experts) => Programming::Gpu {
            experts: Box::new(experts),
            fresh: true,
        },
        None => Programming::Host(CpuBackend::new(work.clone())),
    };
    let mut backend = CudaBackend {
        dev,
        work,
        model,
        reference: None,
        programming,
        description: Description {
            device: name,
            gpu: None,
        },
        phases,
    };
    f(&mut backend)
}

/// The GPU share of `d`, created at the first point that used the GPU.
fn placement(d: &mut Description) -> &mut GpuPlacement {
    d.gpu.get_or_insert_with(Default::default)
}

impl Backend for CudaBackend<'_, '_, '_> {
    fn program(&mut self, seed: u64) -> Result<()> {
        match &mut self.programming {
            Programming::Gpu { experts, fresh } => {
                if std::mem::take(fresh) && experts.seed() == seed {
                    return Ok(());
                }
                self.phases.time(
                    |p| &mut p.program_s,
                    || {
                        experts
                            .reprogram(seed)
                            .map_err(|e| anyhow!("programming seed {seed} on the GPU: {e}"))
                    },
                )
            }
            Programming::Host(cpu) => cpu.program(seed),
        }
    }

    fn drift_to(&mut self, t_seconds: f64) -> Result<()> {
        match &mut self.programming {
            Programming::Gpu { experts, .. } => {
                self.phases.time(
                    |p| &mut p.drift_s,
                    || {
                        experts
                            .drift_to(t_seconds)
                            .map_err(|e| anyhow!("drifting the experts on the GPU: {e}"))
                    },
                )?;
                let state = match experts.residency() {
                    Some(Residency::Transient) => ProgrammedState::RecomputedPerPoint,
                    Some(Residency::Streamed) => ProgrammedState::Streamed,
                    _ => ProgrammedState::Resident,
                };
                let p = placement(&mut self.description);
                p.expert_layers = experts.gpu_layers().collect();
                p.cpu_layers = experts.cpu_layers().to_vec();
                p.programming = Some(state);
                Ok(())
            }
            Programming::Host(cpu) => cpu.drift_to(t_seconds),
        }
    }

    fn reference(&mut self, sequences: &[&[u32]]) -> Result<Vec<Reference>> {
        let on_gpu = match (self.model.as_mut(), &self.programming) {
            (Some(gm), Programming::Gpu { experts, .. }) => Some(references_on_gpu(
                gm,
                experts,
                sequences,
                &self.work.router,
            )?),
            _ => None,
        };
        let references = match on_gpu {
            Some(r) => {
                placement(&mut self.description).digital_reference = true;
                r
            }
            None => references_on_host(self.work.model, sequences, self.work.router)?,
        };
        if self.model.is_some() {
            match upload_reference(self.dev, &references, sequences) {
                Ok(r) => self.reference = Some(r),
                Err(e) => {
                    eprintln!("note: attention, norms and LM head run on the CPU ({e})");
                    self.model = None;
                }
            }
        }
        Ok(references)
    }

    fn forward(&mut self, sequences: &[&[u32]], references: &[Reference]) -> Result<ScoreSums> {
        let uploaded;
        let experts = match &self.programming {
            Programming::Gpu { experts, .. } => experts,
            Programming::Host(cpu) => {
                let clock = std::time::Instant::now();
                let g = GpuExperts::upload(
                    self.dev,
                    cpu.experts()?,
                    &self.work.preset.periphery,
                    Precision::AnalogF16,
                )
                .map_err(|e| anyhow!("uploading the experts to the GPU: {e}"))?;
                *self.phases.upload_s.get_or_insert(0.0) += clock.elapsed().as_secs_f64();
                let p = placement(&mut self.description);
                p.expert_layers = g.gpu_layers().collect();
                p.cpu_layers = g.cpu_layers().to_vec();
                uploaded = g;
                &uploaded
            }
        };
        let clock = std::time::Instant::now();
        // References of another model (an eval against the original checkpoint never asks this
        // backend for its own): upload them for this forward, so it still runs whole on the
        // device. Per call, since nothing ties one call's references to the next call's.
        let passed_reference = match (&self.model, &self.reference) {
            (Some(_), None) => match upload_reference(self.dev, references, sequences) {
                Ok(r) => Some(r),
                Err(e) => {
                    eprintln!("note: attention, norms and LM head run on the CPU ({e})");
                    self.model = None;
                    None
                }
            },
            _ => None,
        };
        let sums = match (
            self.model.as_mut(),
            self.reference.as_ref().or(passed_reference.as_ref()),
        ) {
            (Some(gm), Some(gref)) => {
                let (sums, per_pass) = whole_forward(gm, gref, experts, sequences, &self.work)?;
                placement(&mut self.description).whole_forward =
                    Some(per_pass.min(sequences.len()));
                sums
            }
            _ => score_on_host(
                self.work.model,
                sequences,
                references,
                self.work.router,
                |k| experts.call(k),
            )?,
        };
        self.phases.forward_s += clock.elapsed().as_secs_f64();
        Ok(sums)
    }

    fn log_likelihoods(
        &mut self,
        sequences: &[&[u32]],
        from: &[usize],
        analog: bool,
    ) -> Result<Vec<f64>> {
        // Task scoring runs the dense part on the host and the routed experts where they live
        // (the device's whole-forward path returns perplexity sums, not per-sequence sums
        // over a span), as the host fallback of `forward` does.
        if !analog {
            return crate::backend::cpu::digital_log_likelihoods(
                self.work.model,
                self.work.router,
                sequences,
                from,
            );
        }
        let (model, router) = (self.work.model, self.work.router);
        let clock = std::time::Instant::now();
        let ll = match &self.programming {
            Programming::Gpu { experts, .. } => {
                log_likelihoods_on_host(model, sequences, from, router, Some(&|k| experts.call(k)))
            }
            Programming::Host(cpu) => {
                let experts = cpu.experts()?;
                log_likelihoods_on_host(model, sequences, from, router, Some(&|k| experts.call(k)))
            }
        };
        self.phases.forward_s += clock.elapsed().as_secs_f64();
        ll
    }

    fn describe(&self) -> Description {
        self.description.clone()
    }

    fn phases(&self) -> Phases {
        let mut p = self.phases.clone();
        let stage = |group| {
            move |s: &super::profile::StageTime| Stage {
                group,
                name: s.name,
                seconds: s.seconds,
                host_seconds: s.host_seconds,
            }
        };
        match &self.programming {
            Programming::Gpu { experts, .. } => p.stages.extend(
                experts
                    .stage_seconds()
                    .unwrap_or_default()
                    .iter()
                    .map(stage("programming/drift")),
            ),
            Programming::Host(cpu) => {
                let c = cpu.phases();
                p.program_s += c.program_s;
                p.drift_s += c.drift_s;
            }
        }
        if let Some(stages) = self.model.as_ref().and_then(|gm| gm.stage_seconds()) {
            p.stages.extend(stages.iter().map(stage("forward")));
        }
        p
    }
}

/// The whole forward of every sequence on the GPU and its scores there, as many sequences per
/// pass as the free device memory holds (all of them for the embedded model): one pass over
/// the layers instead of one per sequence. Returns the sums and the sequences per pass.
fn whole_forward(
    gm: &mut GpuModel<'_>,
    gref: &GpuReference,
    g: &GpuExperts<'_, '_>,
    seqs: &[&[u32]],
    work: &AnalogWork<'_, '_>,
) -> Result<(ScoreSums, usize)> {
    let per_pass = gm
        .sequences_per_pass(g.device(), seqs[0].len())
        .map_err(|e| anyhow!("sizing the GPU batch: {e}"))?;
    let mut total = ScoreSums::default();
    for start in (0..seqs.len()).step_by(per_pass) {
        let end = (start + per_pass).min(seqs.len());
        let logits = gm.forward_sequences(&seqs[start..end], g, &work.router, start as u32)?;
        total += gref
            .compare_sequences(g.device(), start..end, &logits)
            .map_err(|e| anyhow!("metrics on the GPU: {e}"))?;
    }
    Ok((total, per_pass))
}

/// The digital reference of `seqs` on the GPU, for scoring the analog forwards there.
fn upload_reference(
    dev: &CudaDevice,
    references: &[Reference],
    seqs: &[&[u32]],
) -> Result<GpuReference> {
    let refs: Vec<_> = references
        .iter()
        .zip(seqs)
        .map(|(r, s)| (r.logp.view(), r.argmax.as_slice(), &s[1..]))
        .collect();
    Ok(GpuReference::upload(dev, &refs)?)
}

/// The digital references of `seqs` from the digital forward on the GPU
/// ([`GpuModel::digital_sequences`]), as many sequences per pass as the device memory holds.
fn references_on_gpu(
    gm: &mut GpuModel<'_>,
    g: &GpuExperts<'_, '_>,
    seqs: &[&[u32]],
    router: &RouterKind,
) -> Result<Vec<Reference>> {
    let dev = g.device();
    let per_pass = gm
        .sequences_per_pass(dev, seqs[0].len())
        .map_err(|e| anyhow!("sizing the GPU batch: {e}"))?;
    let mut out = Vec::with_capacity(seqs.len());
    for batch in seqs.chunks(per_pass) {
        let logits = gm.digital_sequences(batch, g, router)?;
        let logits = dev
            .download(&logits)
            .map_err(|e| anyhow!("copying the digital logits back: {e}"))?;
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
        out.par_extend(batch.par_iter().zip(starts).map(|(s, r0)| {
            Reference::from_logits(logits.slice(ndarray::s![r0..r0 + s.len(), ..]), s.len())
        }));
    }
    Ok(out)
}
