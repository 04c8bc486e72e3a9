//! The placement strategies: where each block of each analog expert goes.

use std::ops::Range;

use super::pack::{pack_into_crossbars, TierSpace};
use super::trace::RoutingTrace;
use super::{BlockPlacement, ChipGeometry};
use crate::model::{ExpertSlot, MatrixId};

/// A block of a matrix waiting for a place.
pub(super) struct PendingBlock {
    pub id: MatrixId,
    pub in_part: usize,
    pub out_part: usize,
    pub in_range: Range<usize>,
    pub out_range: Range<usize>,
}

impl PendingBlock {
    fn shape(&self) -> (usize, usize) {
        (self.in_range.len(), self.out_range.len())
    }
}

/// All analog blocks of one expert (or shared expert / dense MLP) of one layer.
pub(super) struct Unit {
    pub layer: usize,
    pub slot: ExpertSlot,
    pub blocks: Vec<PendingBlock>,
}

/// Result of a strategy: each block with its placement, and the chip size it needed.
pub(super) struct Placed {
    pub blocks: Vec<(MatrixId, BlockPlacement)>,
    pub stacks_needed: usize,
    pub tiers_needed: usize,
}

/// A chip that grows by whole stacks as blocks are placed, so a too-small chip can say what it would need.
struct Chip {
    geo: ChipGeometry,
    stacks: Vec<Vec<TierSpace>>,
    out: Vec<(MatrixId, BlockPlacement)>,
}

impl Chip {
    fn new(geo: ChipGeometry) -> Self {
        Self {
            geo,
            stacks: Vec::new(),
            out: Vec::new(),
        }
    }

    fn ensure_stack(&mut self, s: usize) {
        while self.stacks.len() <= s {
            self.stacks
                .push(vec![TierSpace::default(); self.geo.tiers_per_stack]);
        }
    }

    /// Places `b` on `(stack, tier)` if it fits there.
    fn try_place(&mut self, b: &PendingBlock, stack: usize, tier: usize) -> bool {
        self.ensure_stack(stack);
        let (h, w) = b.shape();
        match self.stacks[stack][tier].place(h, w, self.geo.rows, self.geo.cols) {
            Some(offset) => {
                self.record(b, stack, tier, offset);
                true
            }
            None => false,
        }
    }

    fn record(&mut self, b: &PendingBlock, stack: usize, tier: usize, offset: super::Offset) {
        self.out.push((
            b.id,
            BlockPlacement {
                in_part: b.in_part,
                out_part: b.out_part,
                in_range: b.in_range.clone(),
                out_range: b.out_range.clone(),
                stack,
                tier,
                offset,
            },
        ));
    }

    /// Puts a whole unit on tier `tier` of the stacks `first..first + bins.len()`, using a precomputed packing.
    fn place_packed_unit(&mut self, unit: &Unit, first: usize, tier: usize) {
        let shapes: Vec<_> = unit.blocks.iter().map(PendingBlock::shape).collect();
        let (bins, slots) = pack_into_crossbars(&shapes, self.geo.rows, self.geo.cols);
        self.ensure_stack(first + bins.len() - 1);
        for (k, bin) in bins.into_iter().enumerate() {
            debug_assert!(self.stacks[first + k][tier].is_empty());
            self.stacks[first + k][tier] = bin;
        }
        for (b, (bin, offset)) in unit.blocks.iter().zip(slots) {
            self.record(b, first + bin, tier, offset);
        }
    }

    fn finish(self) -> Placed {
        let tiers_needed = self
            .stacks
            .iter()
            .flatten()
            .filter(|t| !t.is_empty())
            .count();
        Placed {
            stacks_needed: self.stacks.len(),
            tiers_needed,
            blocks: self.out,
        }
    }
}

/// Crossbars one unit needs when packed alone (first-fit decreasing).
fn bins_needed(unit: &Unit, geo: &ChipGeometry) -> usize {
    let shapes: Vec<_> = unit.blocks.iter().map(PendingBlock::shape).collect();
    pack_into_crossbars(&shapes, geo.rows, geo.cols).0.len()
}

/// `packed`: a cursor walks stack 0 tier 0, stack 0 tier 1, …, then stack 1; each block goes to the cursor's tier if
/// it fits there, otherwise the cursor moves on.
pub(super) fn packed(units: &[Unit], geo: &ChipGeometry) -> Placed {
    let mut chip = Chip::new(*geo);
    let (mut s, mut t) = (0, 0);
    for b in units.iter().flat_map(|u| &u.blocks) {
        while !chip.try_place(b, s, t) {
            t += 1;
            if t == geo.tiers_per_stack {
                t = 0;
                s += 1;
            }
        }
    }
    chip.finish()
}

/// `expert-per-tier`: a unit needing `g` crossbars takes the same tier index on a group of `g` stacks, so all its
/// blocks compute in parallel; consecutive units take consecutive tiers of the group, so the experts of a layer sit
/// on different tiers. A new group of stacks opens when the tiers run out or the group width changes.
pub(super) fn expert_per_tier(units: &[Unit], geo: &ChipGeometry) -> Placed {
    let mut chip = Chip::new(*geo);
    let (mut first, mut width, mut tier) = (0usize, 0usize, 0usize);
    for u in units {
        let g = bins_needed(u, geo);
        if width == 0 || g != width || tier == geo.tiers_per_stack {
            first += width;
            width = g;
            tier = 0;
        }
        chip.place_packed_unit(u, first, tier);
        tier += 1;
    }
    chip.finish()
}

/// A group of stacks of one width with its tiers filled in order.
struct Group {
    first: usize,
    width: usize,
    tiers_used: usize,
    /// `(layer, slot)` of the units on this group.
    units: Vec<(usize, ExpertSlot)>,
}

/// `affinity` (ExFlow-style): per layer, experts in order of decreasing co-activation go to the stack group that
/// holds the least co-activation with them (same layer counts fully, adjacent layers half), so co-activated experts
/// land on different stacks and compute in parallel. A layer may open up to `max(⌈E/T⌉, k)` groups, `k` being the
/// mean number of experts a token activates rounded up; beyond that, experts share groups with their least
/// co-activated peers.
pub(super) fn affinity(units: &[Unit], geo: &ChipGeometry, trace: &RoutingTrace) -> Placed {
    let mut chip = Chip::new(*geo);
    let mut groups: Vec<Group> = Vec::new();
    let mut next_stack = 0usize;
    let layers: std::collections::BTreeSet<usize> = units.iter().map(|u| u.layer).collect();
    for &layer in &layers {
        let layer_units: Vec<&Unit> = units.iter().filter(|u| u.layer == layer).collect();
        let co = |a: ExpertSlot, b: ExpertSlot, la: usize, lb: usize| -> f64 {
            match (a, b) {
                (ExpertSlot::Routed(x), ExpertSlot::Routed(y)) => trace.co_activation(la, x, lb, y),
                // Shared experts and dense MLPs run for every token.
                _ => 1.0,
            }
        };
        let degree = |u: &Unit| -> f64 {
            layer_units
                .iter()
                .filter(|v| v.slot != u.slot)
                .map(|v| co(u.slot, v.slot, layer, layer))
                .sum()
        };
        let deg: Vec<f64> = layer_units.iter().map(|u| degree(u)).collect();
        let mut order: Vec<usize> = (0..layer_units.len()).collect();
        order.sort_by(|&a, &b| deg[b].total_cmp(&deg[a]).then(a.cmp(&b)));
        let layer_units: Vec<&Unit> = order.iter().map(|&i| layer_units[i]).collect();

        let k = trace.mean_active(layer).ceil().max(1.0) as usize;
        let quota = layer_units
            .len()
            .div_ceil(geo.tiers_per_stack)
            .max(k.min(layer_units.len()));
        let mut layer_groups: Vec<usize> = Vec::new();
        for u in layer_units {
            let width = bins_needed(u, geo);
            let cost = |g: &Group| -> f64 {
                g.units
                    .iter()
                    .map(|&(l, s)| {
                        if l == layer {
                            co(u.slot, s, layer, l)
                        } else if l + 1 == layer || layer + 1 == l {
                            0.5 * co(u.slot, s, layer, l)
                        } else {
                            0.0
                        }
                    })
                    .sum()
            };
            let best = groups
                .iter()
                .enumerate()
                .filter(|(_, g)| g.width == width && g.tiers_used < geo.tiers_per_stack)
                .map(|(i, g)| (cost(g), g.tiers_used, i))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            let may_open = layer_groups.len() < quota;
            let gi = match best {
                Some((c, _, i)) if c <= 0.0 || !may_open => i,
                _ => {
                    groups.push(Group {
                        first: next_stack,
                        width,
                        tiers_used: 0,
                        units: Vec::new(),
                    });
                    next_stack += width;
                    groups.len() - 1
                }
            };
            if !layer_groups.contains(&gi) {
                layer_groups.push(gi);
            }
            let g = &mut groups[gi];
            chip.place_packed_unit(u, g.first, g.tiers_used);
            g.tiers_used += 1;
            g.units.push((layer, u.slot));
        }
    }
    chip.finish()
}
