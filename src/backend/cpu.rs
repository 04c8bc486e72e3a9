//! CPU backend: every analog matrix is an [`AnalogMatrix`] (ndarray GEMMs + rayon), the rest
//! digital. Owns the programmed state of a mapped model ([`AnalogExperts`]), the stable tensor
//! ids that key its random streams ([`matrix_tensor_id`]), the [`Backend`] that runs an
//! evaluation on the CPU ([`CpuBackend`]), and the host-side scoring of forward passes that the
//! CUDA backend shares when only the routed experts run on the GPU ([`score_on_host`]).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use super::describe::{Description, Phases};
use super::score::{compare, Reference, ScoreSums};
use super::{AnalogWork, Backend};
use crate::device::Device;
use crate::mapping::Mapping;
use crate::model::{ExpertLinear, ExpertSlot, ForwardOptions, MatrixId, Model, Proj, RouterKind};
use crate::tile::{AnalogMatrix, TilePreset};

/// Stable tensor id of a model matrix, the key of its random streams ([`crate::rng`]): layer in bits 31..16, slot in
/// bits 15..2 (routed expert `e` → `e + 2`, shared expert `i` → `i + 1` counted from the top, dense MLP → 0), and the
/// projection in bits 1..0. Blocks derive their own ids from it ([`crate::rng::child_tensor_id`]).
pub fn matrix_tensor_id(id: MatrixId) -> u32 {
    let slot = match id.slot {
        ExpertSlot::DenseMlp => 0u32,
        ExpertSlot::Shared(i) => 0x3FFF - i as u32,
        ExpertSlot::Routed(e) => e as u32 + 2,
    };
    let proj = match id.proj {
        Proj::Gate => 0u32,
        Proj::Up => 1,
        Proj::Down => 2,
    };
    ((id.layer as u32) << 16) | ((slot & 0x3FFF) << 2) | proj
}

/// The analog matrices of a mapped model, programmed with one seed.
pub struct AnalogExperts<'m> {
    model: &'m Model,
    matrices: HashMap<MatrixId, AnalogMatrix>,
    seed: u64,
}

impl<'m> AnalogExperts<'m> {
    /// Programs every analog matrix of `mapping` (weights from `model`) on crossbars of `preset`.
    pub fn program(
        model: &'m Model,
        mapping: &Mapping,
        preset: &TilePreset,
        seed: u64,
    ) -> Result<Self> {
        Self::program_with_device(model, mapping, preset, preset.device.build(), seed)
    }

    /// As [`AnalogExperts::program`], with the crossbars built of `device` instead of the preset's device (a
    /// technology of your own: implement [`Device`]).
    pub fn program_with_device(
        model: &'m Model,
        mapping: &Mapping,
        preset: &TilePreset,
        device: Arc<dyn Device>,
        seed: u64,
    ) -> Result<Self> {
        Self::build(
            model,
            mapping,
            |w, id| AnalogMatrix::program_with_device(w, preset, device.clone(), seed, id),
            seed,
        )
    }

    /// The crossbars of [`AnalogExperts::program_with_device`] as ideal-device layouts
    /// ([`crate::tile::Crossbar::layout`]): block split, tensor ids and mapping scales, with no
    /// programming noise or drift drawn. For a backend that programs the devices itself (the
    /// CUDA backend's `GpuExperts::program`, with `seed`) and needs only the layout.
    pub fn layout(
        model: &'m Model,
        mapping: &Mapping,
        preset: &TilePreset,
        device: Arc<dyn Device>,
        seed: u64,
    ) -> Result<Self> {
        Self::build(
            model,
            mapping,
            |w, id| AnalogMatrix::layout(w, preset, device.clone(), seed, id),
            seed,
        )
    }

    /// Every analog matrix of `mapping`, built from its weights by `build(w, tensor id)`.
    fn build(
        model: &'m Model,
        mapping: &Mapping,
        build: impl Fn(ArrayView2<'_, f32>, u32) -> Result<AnalogMatrix> + Sync,
        seed: u64,
    ) -> Result<Self> {
        let matrices = mapping
            .analog
            .par_iter()
            .map(|p| {
                let w = model.matrix(p.id).with_context(|| {
                    format!(
                        "the mapping names {:?}, which the model does not have",
                        p.id
                    )
                })?;
                let a = build(w, matrix_tensor_id(p.id))
                    .with_context(|| format!("programming {:?}", p.id))?;
                Ok((p.id, a))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            model,
            matrices,
            seed,
        })
    }

    /// Drifts every analog matrix to `t_seconds` after programming (and recomputes GDC).
    pub fn drift_to(&mut self, t_seconds: f64) {
        self.matrices
            .par_iter_mut()
            .for_each(|(_, a)| a.drift_to(t_seconds));
    }

    /// A view that runs MVMs with the per-MVM noise of call `mvm_id` (one id per forward pass, so that every
    /// forward draws its own output noise and the result does not depend on thread order).
    pub fn call(&self, mvm_id: u32) -> AnalogCall<'_, 'm> {
        AnalogCall {
            experts: self,
            mvm_id,
        }
    }

    /// The programmed (and drifted) crossbars of `id`, if it is analog.
    pub fn matrix(&self, id: MatrixId) -> Option<&AnalogMatrix> {
        self.matrices.get(&id)
    }

    /// The model whose digital weights serve every matrix that is not analog.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Seed of the programming, read-noise and output-noise streams.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of analog matrices.
    pub fn len(&self) -> usize {
        self.matrices.len()
    }

    /// True when no matrix is analog.
    pub fn is_empty(&self) -> bool {
        self.matrices.is_empty()
    }
}

/// [`AnalogExperts`] bound to one MVM call id; implements the model's [`ExpertLinear`].
pub struct AnalogCall<'a, 'm> {
    experts: &'a AnalogExperts<'m>,
    mvm_id: u32,
}

impl ExpertLinear for AnalogCall<'_, '_> {
    fn linear(&self, id: MatrixId, x: ArrayView2<'_, f32>) -> Array2<f32> {
        match self.experts.matrices.get(&id) {
            Some(a) => a.mvm(x, self.mvm_id),
            None => self.experts.model.linear(id, x),
        }
    }
}

/// The CPU [`Backend`]: programs and drifts [`AnalogExperts`] and runs the forward passes in
/// parallel over sequences.
pub struct CpuBackend<'r, 'm> {
    work: AnalogWork<'r, 'm>,
    experts: Option<AnalogExperts<'m>>,
    phases: Phases,
}

impl<'r, 'm> CpuBackend<'r, 'm> {
    pub fn new(work: AnalogWork<'r, 'm>) -> Self {
        Self {
            work,
            experts: None,
            phases: Phases::default(),
        }
    }

    /// The programmed (and drifted) matrices, once [`Backend::program`] ran.
    pub fn experts(&self) -> Result<&AnalogExperts<'m>> {
        self.experts
            .as_ref()
            .context("the analog matrices are not programmed yet (call program first)")
    }
}

impl Backend for CpuBackend<'_, '_> {
    fn program(&mut self, seed: u64) -> Result<()> {
        let w = &self.work;
        let device = w.device.clone().unwrap_or_else(|| w.preset.device.build());
        let experts = self.phases.time(
            |p| &mut p.program_s,
            || AnalogExperts::program_with_device(w.model, w.mapping, w.preset, device, seed),
        )?;
        self.experts = Some(experts);
        Ok(())
    }

    fn drift_to(&mut self, t_seconds: f64) -> Result<()> {
        let experts = self
            .experts
            .as_mut()
            .context("the analog matrices are not programmed yet (call program first)")?;
        self.phases
            .time(|p| &mut p.drift_s, || experts.drift_to(t_seconds));
        Ok(())
    }

    fn reference(&mut self, sequences: &[&[u32]]) -> Result<Vec<Reference>> {
        references_on_host(self.work.model, sequences, self.work.router)
    }

    fn forward(&mut self, sequences: &[&[u32]], references: &[Reference]) -> Result<ScoreSums> {
        let experts = self.experts()?;
        let (model, router) = (self.work.model, self.work.router);
        let clock = std::time::Instant::now();
        let sums = score_on_host(model, sequences, references, router, |k| experts.call(k));
        self.phases.forward_s += clock.elapsed().as_secs_f64();
        sums
    }

    fn log_likelihoods(
        &mut self,
        sequences: &[&[u32]],
        from: &[usize],
        analog: bool,
    ) -> Result<Vec<f64>> {
        if !analog {
            return digital_log_likelihoods(self.work.model, self.work.router, sequences, from);
        }
        let (model, router) = (self.work.model, self.work.router);
        let experts = self.experts()?;
        let clock = std::time::Instant::now();
        let ll =
            log_likelihoods_on_host(model, sequences, from, router, Some(&|k| experts.call(k)));
        self.phases.forward_s += clock.elapsed().as_secs_f64();
        ll
    }

    fn describe(&self) -> Description {
        Description {
            device: "cpu".into(),
            gpu: None,
        }
    }

    fn phases(&self) -> Phases {
        self.phases.clone()
    }
}

/// The digital references of `sequences` from the CPU forward pass, in parallel over sequences.
pub fn references_on_host(
    model: &Model,
    sequences: &[&[u32]],
    router: RouterKind,
) -> Result<Vec<Reference>> {
    let opts = ForwardOptions {
        router,
        ..Default::default()
    };
    sequences
        .par_iter()
        .map(|s| {
            let out = model.forward(s, &opts)?;
            Ok(Reference::from_logits(out.logits.view(), s.len()))
        })
        .collect()
}

/// The CPU forward pass of every sequence in parallel, the expert products of sequence k
/// through `experts(k)`, scored against `references` and summed in sequence order (so the sum
/// does not depend on thread scheduling).
pub fn score_on_host<E: ExpertLinear>(
    model: &Model,
    sequences: &[&[u32]],
    references: &[Reference],
    router: RouterKind,
    experts: impl Fn(u32) -> E + Sync,
) -> Result<ScoreSums> {
    let per_seq: Vec<ScoreSums> = sequences
        .par_iter()
        .enumerate()
        .map(|(k, s)| {
            let call = experts(k as u32);
            let o = ForwardOptions {
                router,
                experts: Some(&call),
                ..Default::default()
            };
            let out = model.forward(s, &o)?;
            Ok(compare(&references[k], out.logits.view(), &s[1..]))
        })
        .collect::<Result<_>>()?;
    let mut total = ScoreSums::default();
    for s in per_seq {
        total += s;
    }
    Ok(total)
}

/// [`Backend::log_likelihoods`] with `analog` false, which every backend runs on the host, and the
/// `--digital` task score: the digital weights of `model` throughout.
pub fn digital_log_likelihoods(
    model: &Model,
    router: RouterKind,
    sequences: &[&[u32]],
    from: &[usize],
) -> Result<Vec<f64>> {
    log_likelihoods_on_host::<AnalogCall>(model, sequences, from, router, None)
}

/// [`Backend::log_likelihoods`] through the CPU forward pass, in parallel over sequences: the
/// expert products of sequence k through `experts(k)`, or the digital weights when `experts`
/// is `None`.
pub fn log_likelihoods_on_host<E: ExpertLinear>(
    model: &Model,
    sequences: &[&[u32]],
    from: &[usize],
    router: RouterKind,
    experts: Option<&(dyn Fn(u32) -> E + Sync)>,
) -> Result<Vec<f64>> {
    anyhow::ensure!(
        sequences.len() == from.len(),
        "log_likelihoods: {} sequences but {} start positions",
        sequences.len(),
        from.len()
    );
    sequences
        .par_iter()
        .zip(from)
        .enumerate()
        .map(|(k, (s, &from))| {
            anyhow::ensure!(
                from >= 1 && from < s.len(),
                "log_likelihoods: sequence {k} of {} tokens cannot be scored from token {from}",
                s.len()
            );
            let call = experts.map(|e| e(k as u32));
            let o = ForwardOptions {
                router,
                experts: call.as_ref().map(|c| c as &dyn ExpertLinear),
                ..Default::default()
            };
            let out = model.forward(&s[..s.len() - 1], &o)?;
            let rows = out.logits.slice(ndarray::s![from - 1.., ..]);
            let logp = super::score::log_softmax_rows(rows);
            Ok(s[from..]
                .iter()
                .enumerate()
                .map(|(i, &t)| f64::from(logp[[i, t as usize]]))
                .sum())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_ids_are_distinct_over_a_large_model() {
        let mut seen = std::collections::HashSet::new();
        for layer in 0..64 {
            let slots = (0..256)
                .map(ExpertSlot::Routed)
                .chain((0..4).map(ExpertSlot::Shared))
                .chain(std::iter::once(ExpertSlot::DenseMlp));
            for slot in slots {
                for proj in [Proj::Gate, Proj::Up, Proj::Down] {
                    assert!(seen.insert(matrix_tensor_id(MatrixId { layer, slot, proj })));
                }
            }
        }
    }
}
