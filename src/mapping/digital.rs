//! Choosing which routed experts stay digital (heterogeneous analog–digital MoE, docs/model.md §4.2).
//!
//! The criterion of the retraining-free heterogeneous MoE paper (arXiv 2603.02633): an expert's sensitivity to
//! analog noise grows with its largest neuron, so its score is the product over its gate, up and down matrices of
//! the largest row (output neuron) L2 norm. The top fraction of each layer's experts by score stays digital. The
//! random selection of the same size is the control the paper compares against.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Result};
use ndarray::ArrayView2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::MatrixSpec;
use crate::model::{ExpertSlot, MatrixId};

/// How digital experts are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigitalSelection {
    /// Highest product of per-matrix max row L2 norms.
    MaxNeuronNorm,
    /// Uniformly random experts (seeded), the control.
    Random { seed: u64 },
}

impl std::fmt::Display for DigitalSelection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DigitalSelection::MaxNeuronNorm => f.write_str("max neuron norm"),
            DigitalSelection::Random { seed } => write!(f, "random (seed {seed})"),
        }
    }
}

/// Largest L2 norm over the rows of `w` (`[n_out, n_in]`: a row is one output neuron).
pub fn max_row_norm(w: ArrayView2<f32>) -> f64 {
    w.rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt()
        })
        .fold(0.0, f64::max)
}

/// Sensitivity score of every routed expert: product of [`max_row_norm`] over its matrices.
pub fn expert_scores<'w>(
    matrices: &[MatrixSpec],
    weights: &dyn Fn(MatrixId) -> Option<ArrayView2<'w, f32>>,
) -> Result<BTreeMap<(usize, usize), f64>> {
    let mut scores: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for m in matrices {
        if let ExpertSlot::Routed(e) = m.id.slot {
            let Some(w) = weights(m.id) else {
                bail!(
                    "no weights for layer {} routed expert {e} ({} projection), needed for the \
                     max-neuron-norm score",
                    m.id.layer,
                    match m.id.proj {
                        crate::model::Proj::Gate => "gate",
                        crate::model::Proj::Up => "up",
                        crate::model::Proj::Down => "down",
                    }
                );
            };
            *scores.entry((m.id.layer, e)).or_insert(1.0) *= max_row_norm(w);
        }
    }
    Ok(scores)
}

/// The `(layer, slot)` of the routed experts to keep digital: `round(fraction · E)` per layer.
pub fn select_digital<'w>(
    matrices: &[MatrixSpec],
    fraction: f64,
    selection: DigitalSelection,
    weights: &dyn Fn(MatrixId) -> Option<ArrayView2<'w, f32>>,
) -> Result<HashSet<(usize, ExpertSlot)>> {
    let mut chosen = HashSet::new();
    if fraction <= 0.0 {
        return Ok(chosen);
    }
    let mut per_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for m in matrices {
        if let ExpertSlot::Routed(e) = m.id.slot {
            let v = per_layer.entry(m.id.layer).or_default();
            if !v.contains(&e) {
                v.push(e);
            }
        }
    }
    let scores = match selection {
        DigitalSelection::MaxNeuronNorm => Some(expert_scores(matrices, weights)?),
        DigitalSelection::Random { .. } => None,
    };
    for (layer, mut experts) in per_layer {
        let n = (fraction * experts.len() as f64).round() as usize;
        match (&scores, selection) {
            (Some(s), _) => {
                experts.sort_by(|a, b| s[&(layer, *b)].total_cmp(&s[&(layer, *a)]).then(a.cmp(b)))
            }
            (None, DigitalSelection::Random { seed }) => {
                experts.sort_unstable();
                let mut rng = rand::rngs::StdRng::seed_from_u64(
                    seed ^ (layer as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                experts.shuffle(&mut rng);
            }
            (None, DigitalSelection::MaxNeuronNorm) => unreachable!("scores computed above"),
        }
        chosen.extend(experts[..n].iter().map(|&e| (layer, ExpertSlot::Routed(e))));
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn max_row_norm_is_the_largest_output_neuron() {
        let w = array![[3.0f32, 4.0], [1.0, 1.0], [0.0, -6.0]];
        assert_eq!(max_row_norm(w.view()), 6.0);
    }
}
