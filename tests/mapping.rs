//! Mapping invariants on synthetic MoE shapes: every block placed once, no crossbar cell used twice, JSON round
//! trip, strategy-specific placement rules, and the error of a chip that is too small.

use std::collections::HashSet;

use aimc::mapping::{
    map_matrices, ChipGeometry, DigitalReason, DigitalSelection, Mapping, MappingOptions,
    MatrixSpec, RoutingTrace, Strategy,
};
use aimc::model::{ExpertSlot, MatrixId, Proj};
use ndarray::Array2;

/// `layers` MoE layers of `experts` SwiGLU experts (hidden `h`, intermediate `i`), plus one shared expert per layer.
fn moe_specs(layers: usize, experts: usize, h: usize, i: usize) -> Vec<MatrixSpec> {
    let mut v = Vec::new();
    for layer in 0..layers {
        let slots = (0..experts)
            .map(ExpertSlot::Routed)
            .chain(std::iter::once(ExpertSlot::Shared(0)));
        for slot in slots {
            for (proj, n_out, n_in) in [(Proj::Gate, i, h), (Proj::Up, i, h), (Proj::Down, h, i)] {
                v.push(MatrixSpec {
                    id: MatrixId { layer, slot, proj },
                    n_out,
                    n_in,
                });
            }
        }
    }
    v
}

fn geo(stacks: usize, tiers: usize) -> ChipGeometry {
    ChipGeometry {
        rows: 512,
        cols: 512,
        tiers_per_stack: tiers,
        stacks,
    }
}

/// Stack of the first block of routed expert `e` (of any layer).
fn stack_of(m: &Mapping, e: usize) -> usize {
    m.analog
        .iter()
        .find(|p| p.id.slot == ExpertSlot::Routed(e))
        .unwrap()
        .blocks[0]
        .stack
}

fn no_weights(_: MatrixId) -> Option<ndarray::ArrayView2<'static, f32>> {
    None
}

/// Every cell of every analog matrix is covered exactly once by its blocks, and no crossbar cell of the chip holds
/// two blocks.
fn assert_valid(m: &Mapping, specs: &[MatrixSpec]) {
    let g = m.geometry;
    let analog: HashSet<MatrixId> = m.analog.iter().map(|p| p.id).collect();
    let digital: HashSet<MatrixId> = m.digital.iter().map(|d| d.id).collect();
    assert!(analog.is_disjoint(&digital));
    assert_eq!(
        analog.len() + digital.len(),
        specs.len(),
        "a matrix was lost"
    );
    for p in &m.analog {
        let mut covered = vec![0u8; p.n_out * p.n_in];
        for b in &p.blocks {
            assert!(b.in_range.len() <= g.rows && b.out_range.len() <= g.cols);
            assert!(b.stack < m.stacks_used && b.tier < g.tiers_per_stack);
            assert!(b.offset.row + b.in_range.len() <= g.rows);
            assert!(b.offset.col + b.out_range.len() <= g.cols);
            for o in b.out_range.clone() {
                for i in b.in_range.clone() {
                    covered[o * p.n_in + i] += 1;
                }
            }
        }
        assert!(
            covered.iter().all(|&c| c == 1),
            "{:?}: a weight is placed 0 or 2+ times",
            p.id
        );
    }
    // Rectangles on the same (stack, tier) never overlap.
    /// Rows `[r0, r1)` × columns `[c0, c1)` of a block inside its tier.
    type Rect = (usize, usize, usize, usize);
    let mut per_tier: std::collections::HashMap<(usize, usize), Vec<Rect>> = Default::default();
    for b in m.analog.iter().flat_map(|p| &p.blocks) {
        per_tier.entry((b.stack, b.tier)).or_default().push((
            b.offset.row,
            b.offset.row + b.in_range.len(),
            b.offset.col,
            b.offset.col + b.out_range.len(),
        ));
    }
    for rects in per_tier.values() {
        for (k, a) in rects.iter().enumerate() {
            for b in &rects[k + 1..] {
                let overlap = a.0 < b.1 && b.0 < a.1 && a.2 < b.3 && b.2 < a.3;
                assert!(!overlap, "blocks {a:?} and {b:?} overlap on one tier");
            }
        }
    }
}

#[test]
fn every_strategy_places_each_block_once_without_overlap() {
    // Blocks that do not divide the crossbar: hidden 700, intermediate 300 → 2 input parts for gate/up.
    let specs = moe_specs(2, 8, 700, 300);
    let trace = RoutingTrace::new(
        vec![0, 1],
        vec![8, 8],
        (0..64)
            .map(|t| vec![vec![t % 8, (t + 1) % 8], vec![(t * 3) % 8, (t * 5 + 1) % 8]])
            .collect(),
    );
    for strategy in [
        Strategy::Packed,
        Strategy::ExpertPerTier,
        Strategy::Affinity,
    ] {
        for analog_shared in [false, true] {
            let opts = MappingOptions {
                strategy,
                analog_shared,
                ..Default::default()
            };
            let m = map_matrices(&specs, geo(64, 8), &opts, &no_weights, Some(&trace)).unwrap();
            assert_valid(&m, &specs);
            let shared_digital = m
                .digital
                .iter()
                .filter(|d| d.reason == DigitalReason::SharedOrDense)
                .count();
            assert_eq!(shared_digital, if analog_shared { 0 } else { 2 * 3 });
        }
    }
}

#[test]
fn mapping_round_trips_through_json() {
    let specs = moe_specs(2, 4, 256, 128);
    let m = map_matrices(
        &specs,
        geo(8, 8),
        &MappingOptions::default(),
        &no_weights,
        None,
    )
    .unwrap();
    let back = Mapping::from_json(&m.to_json().unwrap(), "test.json").unwrap();
    assert_eq!(m, back);
    let err = Mapping::from_json("{\"schema_version\": 1}", "bad.json").unwrap_err();
    assert!(format!("{err:#}").contains("bad.json"), "{err:#}");
}

#[test]
fn expert_per_tier_puts_a_layers_experts_on_different_tiers() {
    // Each expert (gate+up+down of 256/128) fits one crossbar, so one stack holds 8 experts on 8 tiers.
    let specs = moe_specs(1, 8, 256, 128);
    let m = map_matrices(
        &specs,
        geo(4, 8),
        &MappingOptions::default(),
        &no_weights,
        None,
    )
    .unwrap();
    assert_valid(&m, &specs);
    let mut seen = HashSet::new();
    for e in 0..8 {
        let tiers: HashSet<(usize, usize)> = m
            .analog
            .iter()
            .filter(|p| p.id.slot == ExpertSlot::Routed(e))
            .flat_map(|p| p.blocks.iter().map(|b| (b.stack, b.tier)))
            .collect();
        assert_eq!(tiers.len(), 1, "expert {e} spread over {tiers:?}");
        assert!(
            seen.insert(*tiers.iter().next().unwrap()),
            "two experts share a tier"
        );
    }
    assert_eq!(m.stacks_used, 1);
}

#[test]
fn affinity_separates_the_most_co_activated_pair() {
    // Experts 2 and 5 fire together for most tokens; packed/expert-per-tier would put them on one stack.
    let mut tokens = Vec::new();
    for t in 0..100 {
        let pair = if t % 10 < 8 {
            vec![2, 5]
        } else {
            vec![t % 8, (t + 3) % 8]
        };
        tokens.push(vec![pair]);
    }
    let trace = RoutingTrace::new(vec![0], vec![8], tokens);
    let specs = moe_specs(1, 8, 256, 128);
    let opts = MappingOptions {
        strategy: Strategy::Affinity,
        ..Default::default()
    };
    let m = map_matrices(&specs, geo(8, 8), &opts, &no_weights, Some(&trace)).unwrap();
    assert_valid(&m, &specs);
    assert_ne!(stack_of(&m, 2), stack_of(&m, 5));
    // The same experts under expert-per-tier share stack 0: the test would fail without affinity.
    let ept = map_matrices(
        &specs,
        geo(8, 8),
        &MappingOptions::default(),
        &no_weights,
        None,
    )
    .unwrap();
    assert_eq!(stack_of(&ept, 2), stack_of(&ept, 5));
}

#[test]
fn too_small_a_chip_says_what_it_would_need() {
    let specs = moe_specs(2, 8, 256, 128);
    let err = map_matrices(
        &specs,
        geo(1, 8),
        &MappingOptions::default(),
        &no_weights,
        None,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("needs 2 stacks of 8 tiers"), "{msg}");
}

#[test]
fn heterogeneous_keeps_the_highest_norm_experts_digital() {
    let specs = moe_specs(1, 8, 16, 8);
    // Expert e's matrices have every entry equal to (e + 1) / 10, so its score grows with e.
    let weights: Vec<(MatrixId, Array2<f32>)> = specs
        .iter()
        .map(|s| {
            let v = match s.id.slot {
                ExpertSlot::Routed(e) => (e + 1) as f32 / 10.0,
                _ => 1.0,
            };
            (s.id, Array2::from_elem((s.n_out, s.n_in), v))
        })
        .collect();
    let lookup = |id: MatrixId| {
        weights
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, w)| w.view())
    };
    let opts = MappingOptions {
        strategy: Strategy::Heterogeneous,
        digital_fraction: 0.25,
        ..Default::default()
    };
    let m = map_matrices(&specs, geo(8, 8), &opts, &lookup, None).unwrap();
    assert_valid(&m, &specs);
    let sensitive: HashSet<ExpertSlot> = m
        .digital
        .iter()
        .filter(|d| d.reason == DigitalReason::Sensitive)
        .map(|d| d.id.slot)
        .collect();
    assert_eq!(
        sensitive,
        HashSet::from([ExpertSlot::Routed(7), ExpertSlot::Routed(6)])
    );
    // Random selection picks the same number, deterministically for a seed.
    let rnd = MappingOptions {
        digital_selection: DigitalSelection::Random { seed: 3 },
        ..opts
    };
    let a = map_matrices(&specs, geo(8, 8), &rnd, &lookup, None).unwrap();
    let b = map_matrices(&specs, geo(8, 8), &rnd, &lookup, None).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        a.digital
            .iter()
            .filter(|d| d.reason == DigitalReason::Sensitive)
            .count(),
        2 * 3
    );
}

/// The names people read for a strategy are the ones they type (`--strategy`) and the JSON spelling.
#[test]
fn strategy_names_are_the_cli_and_json_names() {
    use aimc::mapping::Strategy;
    use clap::ValueEnum;
    for s in Strategy::value_variants() {
        let cli = s.to_possible_value().unwrap().get_name().to_string();
        assert_eq!(s.to_string(), cli);
        assert_eq!(serde_json::to_value(s).unwrap(), serde_json::json!(cli));
    }
    assert_eq!(Strategy::ExpertPerTier.to_string(), "expert-per-tier");
}
