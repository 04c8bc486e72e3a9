//! Routing traces: which experts each token used in each layer, collected by running the digital model on
//! calibration text. They drive the `affinity` strategy and the expected tier switches per token.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use anyhow::Result;
use rayon::prelude::*;

use super::Mapping;
use crate::model::{ExpertSlot, ForwardOptions, Model, Proj, RouterKind};

/// Experts chosen per token and layer: `tokens[t][l]` lists the routed experts token `t` used in layer `l`
/// (only MoE layers; `layers[l]` gives the model layer index).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RoutingTrace {
    /// Model layer index of each traced MoE layer.
    pub layers: Vec<usize>,
    /// Routed experts per traced layer.
    pub n_experts: Vec<usize>,
    /// `tokens[t][i]`: experts of token `t` in traced layer `i`, in the order the router ranked them.
    pub tokens: Vec<Vec<Vec<usize>>>,
    #[serde(skip)]
    cache: Option<CoCounts>,
}

/// Co-activation counts: same token, same layer, and same token in consecutive traced layers.
#[derive(Clone, Debug)]
struct CoCounts {
    same: Vec<Vec<u32>>,
    next: Vec<Vec<u32>>,
    active: Vec<u64>,
}

impl RoutingTrace {
    /// Builds a trace and its co-activation counts.
    pub fn new(layers: Vec<usize>, n_experts: Vec<usize>, tokens: Vec<Vec<Vec<usize>>>) -> Self {
        let mut t = Self {
            layers,
            n_experts,
            tokens,
            cache: None,
        };
        t.cache = Some(t.count());
        t
    }

    /// Runs the digital model on `tokens` (cut into windows of `seq_len`) and records every token's experts per MoE
    /// layer, ranked by routing weight.
    pub fn collect(
        model: &Model,
        tokens: &[u32],
        seq_len: usize,
        router: RouterKind,
    ) -> Result<Self> {
        let opts = ForwardOptions {
            router,
            record_routing: true,
            ..Default::default()
        };
        let windows: Vec<&[u32]> = tokens.chunks(seq_len.max(1)).collect();
        let outs = windows
            .par_iter()
            .map(|w| model.forward(w, &opts))
            .collect::<Result<Vec<_>>>()?;
        let layers: Vec<usize> = outs
            .first()
            .map(|o| o.routing.iter().map(|r| r.layer).collect())
            .unwrap_or_default();
        let n_experts = vec![model.config.num_experts; layers.len()];
        let mut per_token = Vec::with_capacity(tokens.len());
        for (w, out) in windows.iter().zip(&outs) {
            let mut seq: Vec<Vec<Vec<(f32, usize)>>> =
                vec![vec![Vec::new(); layers.len()]; w.len()];
            for (i, r) in out.routing.iter().enumerate() {
                for a in &r.assignments {
                    seq[a.token as usize][i].push((a.weight, a.expert as usize));
                }
            }
            per_token.extend(seq.into_iter().map(|layers| {
                layers
                    .into_iter()
                    .map(|mut v| {
                        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                        v.into_iter().map(|(_, e)| e).collect()
                    })
                    .collect()
            }));
        }
        Ok(Self::new(layers, n_experts, per_token))
    }

    fn count(&self) -> CoCounts {
        let nl = self.layers.len();
        let mut same: Vec<Vec<u32>> = self.n_experts.iter().map(|&e| vec![0; e * e]).collect();
        let mut next: Vec<Vec<u32>> = (0..nl.saturating_sub(1))
            .map(|i| vec![0; self.n_experts[i] * self.n_experts[i + 1]])
            .collect();
        let mut active = vec![0u64; nl];
        for tok in &self.tokens {
            for (i, experts) in tok.iter().enumerate() {
                let e = self.n_experts[i];
                active[i] += experts.len() as u64;
                for &a in experts {
                    for &b in experts {
                        if a != b {
                            same[i][a * e + b] += 1;
                        }
                    }
                    if i + 1 < nl {
                        for &b in &tok[i + 1] {
                            next[i][a * self.n_experts[i + 1] + b] += 1;
                        }
                    }
                }
            }
        }
        CoCounts { same, next, active }
    }

    fn counts(&self) -> std::borrow::Cow<'_, CoCounts> {
        match &self.cache {
            Some(c) => std::borrow::Cow::Borrowed(c),
            None => std::borrow::Cow::Owned(self.count()),
        }
    }

    fn traced_index(&self, model_layer: usize) -> Option<usize> {
        self.layers.iter().position(|&l| l == model_layer)
    }

    /// Fraction of tokens that use expert `x` in model layer `la` and expert `y` in model layer `lb` (same layer or
    /// adjacent traced layers; 0 otherwise).
    pub fn co_activation(&self, la: usize, x: usize, lb: usize, y: usize) -> f64 {
        let n = self.tokens.len().max(1) as f64;
        let (Some(ia), Some(ib)) = (self.traced_index(la), self.traced_index(lb)) else {
            return 0.0;
        };
        let c = self.counts();
        let count = if ia == ib {
            c.same[ia][x * self.n_experts[ia] + y]
        } else if ia + 1 == ib {
            c.next[ia][x * self.n_experts[ib] + y]
        } else if ib + 1 == ia {
            c.next[ib][y * self.n_experts[ia] + x]
        } else {
            0
        };
        f64::from(count) / n
    }

    /// Mean number of routed experts a token uses in model layer `layer`.
    pub fn mean_active(&self, layer: usize) -> f64 {
        match self.traced_index(layer) {
            Some(i) => self.counts().active[i] as f64 / self.tokens.len().max(1) as f64,
            None => 0.0,
        }
    }

    /// Activation rate of each routed expert per traced layer: tokens using it / tokens.
    pub fn activation_rates(&self) -> Vec<Vec<f64>> {
        let n = self.tokens.len().max(1) as f64;
        let mut rates: Vec<Vec<f64>> = self.n_experts.iter().map(|&e| vec![0.0; e]).collect();
        for tok in &self.tokens {
            for (i, experts) in tok.iter().enumerate() {
                for &e in experts {
                    rates[i][e] += 1.0 / n;
                }
            }
        }
        rates
    }

    /// Expected tier switches per token when tokens run one after another (decode at batch 1), with the schedule of
    /// the energy model (`energy::sim`): per layer two phases, the gate/up blocks of every active expert and then
    /// their down blocks; within a phase each stack visits the tiers it needs once, its current tier first and then
    /// ascending. Every change of a stack's tier is one switch; the first use of a stack is not. Analog shared
    /// experts and dense MLPs run for every token.
    pub fn tier_switches_per_token(&self, mapping: &Mapping) -> f64 {
        /// The `(stack, tier)` of a unit's blocks, per phase (0: gate/up, 1: down).
        type Phases = [Vec<(usize, usize)>; 2];
        let mut units: HashMap<(usize, ExpertSlot), Phases> = HashMap::new();
        let mut always: HashMap<usize, Vec<ExpertSlot>> = HashMap::new();
        for m in &mapping.analog {
            let phase = usize::from(m.id.proj == Proj::Down);
            units.entry((m.id.layer, m.id.slot)).or_default()[phase]
                .extend(m.blocks.iter().map(|b| (b.stack, b.tier)));
            if !matches!(m.id.slot, ExpertSlot::Routed(_)) {
                let a = always.entry(m.id.layer).or_default();
                if !a.contains(&m.id.slot) {
                    a.push(m.id.slot);
                }
            }
        }
        let mut current: Vec<Option<usize>> = vec![None; mapping.stacks_used];
        let mut switches = 0u64;
        for tok in &self.tokens {
            for (i, experts) in tok.iter().enumerate() {
                let layer = self.layers[i];
                let slots: Vec<ExpertSlot> = experts
                    .iter()
                    .map(|&e| ExpertSlot::Routed(e))
                    .chain(always.get(&layer).into_iter().flatten().copied())
                    .collect();
                for phase in 0..2 {
                    let mut need: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
                    for slot in &slots {
                        for &(s, t) in units
                            .get(&(layer, *slot))
                            .map_or(&[][..], |u| &u[phase][..])
                        {
                            need.entry(s).or_default().insert(t);
                        }
                    }
                    for (s, tiers) in need {
                        let first = current[s].filter(|c| tiers.contains(c));
                        for t in first
                            .into_iter()
                            .chain(tiers.into_iter().filter(|&t| Some(t) != first))
                        {
                            if current[s].is_some_and(|c| c != t) {
                                switches += 1;
                            }
                            current[s] = Some(t);
                        }
                    }
                }
            }
        }
        switches as f64 / self.tokens.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn co_activation_counts_pairs_per_token() {
        // 4 tokens, one layer of 4 experts: (0,1) together 3 times, (2,3) once.
        let t = RoutingTrace::new(
            vec![0],
            vec![4],
            vec![
                vec![vec![0, 1]],
                vec![vec![1, 0]],
                vec![vec![0, 1]],
                vec![vec![2, 3]],
            ],
        );
        assert_eq!(t.co_activation(0, 0, 0, 1), 0.75);
        assert_eq!(t.co_activation(0, 1, 0, 0), 0.75);
        assert_eq!(t.co_activation(0, 2, 0, 3), 0.25);
        assert_eq!(t.co_activation(0, 0, 0, 2), 0.0);
        assert_eq!(t.mean_active(0), 2.0);
        assert_eq!(t.activation_rates()[0], vec![0.75, 0.75, 0.25, 0.25]);
    }

    #[test]
    fn adjacent_layer_co_activation_is_symmetric_in_argument_order() {
        let t = RoutingTrace::new(
            vec![1, 2],
            vec![2, 3],
            vec![vec![vec![0], vec![2]], vec![vec![1], vec![2]]],
        );
        assert_eq!(t.co_activation(1, 0, 2, 2), 0.5);
        assert_eq!(t.co_activation(2, 2, 1, 0), 0.5);
        assert_eq!(t.co_activation(2, 2, 1, 1), 0.5);
        assert_eq!(t.co_activation(1, 1, 2, 0), 0.0);
    }

    #[test]
    fn tier_switches_follow_the_two_phase_schedule() {
        use crate::mapping::{map_matrices, ChipGeometry, MappingOptions, MatrixSpec};
        use crate::model::MatrixId;
        // One layer of 4 experts, each fitting one crossbar: expert-per-tier puts expert e on stack 0, tier e.
        let specs: Vec<MatrixSpec> = (0..4)
            .flat_map(|e| {
                [
                    (Proj::Gate, 128, 256),
                    (Proj::Up, 128, 256),
                    (Proj::Down, 256, 128),
                ]
                .map(|(proj, n_out, n_in)| MatrixSpec {
                    id: MatrixId {
                        layer: 0,
                        slot: ExpertSlot::Routed(e),
                        proj,
                    },
                    n_out,
                    n_in,
                })
            })
            .collect();
        let geo = ChipGeometry {
            rows: 512,
            cols: 512,
            tiers_per_stack: 8,
            stacks: 1,
        };
        let m = map_matrices(&specs, geo, &MappingOptions::default(), &|_| None, None).unwrap();
        let trace = RoutingTrace::new(
            vec![0],
            vec![4],
            vec![vec![vec![0, 1]], vec![vec![1, 0]], vec![vec![2]]],
        );
        // Token 1: gate/up visits tiers 0, 1 (1 switch), down starts on 1 then 0 (1). Token 2: 0 → 1 (1), 1 → 0 (1).
        // Token 3: gate/up on tier 2 (1), down stays on tier 2 (0). Five switches over three tokens.
        assert_eq!(trace.tier_switches_per_token(&m), 5.0 / 3.0);
    }
}
