//! CPU backend: every analog matrix is an [`AnalogMatrix`] (ndarray GEMMs + rayon), the rest digital.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use crate::device::Device;
use crate::mapping::Mapping;
use crate::model::{ExpertLinear, ExpertSlot, MatrixId, Model, Proj};
use crate::tile::{AnalogMatrix, TilePreset};

/// Stable tensor id of a model matrix, the key of its random streams (docs/model.md §6): layer in bits 31..16, slot in
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
