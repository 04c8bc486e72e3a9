//! The energy model's accounting: additivity, linearity in each constant, digital-only mappings, tier serialisation.
use aimc::energy::{
    map_shape, Component, EnergyModel, ModelShape, PhaseCost, Projections, Scenario, N_COMPONENTS,
};
use aimc::mapping::{DigitalSelection, Mapping, MappingOptions, RoutingTrace, Strategy};
use aimc::tile::TilePreset;

fn small_moe() -> ModelShape {
    // d = 1024, 4 layers, 8 experts of width 512, top-2: every expert is 2 + 2 + 2 = 6 blocks of 512×512.
    ModelShape::synthetic("small-moe", 1024, 4, 8, 2, 512)
}

fn map(
    preset: &TilePreset,
    shape: &ModelShape,
    opts: &MappingOptions,
    trace: &RoutingTrace,
) -> Mapping {
    map_shape(preset, shape, opts, &|_| None, trace).unwrap()
}

fn run(
    preset: &TilePreset,
    shape: &ModelShape,
    mapping: &Mapping,
    trace: &RoutingTrace,
    s: Scenario,
) -> PhaseCost {
    EnergyModel::new(
        preset.cost.as_ref().unwrap(),
        mapping,
        shape,
        Projections::Digital,
    )
    .run(trace, s, 8)
    .unwrap()
}

const DECODE: Scenario = Scenario::Decode {
    batch: 4,
    context: 128,
};

#[test]
fn energy_is_additive_over_components_and_layers() {
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let shape = small_moe();
    let trace = shape.synthetic_trace(64, 3);
    let mapping = map(&preset, &shape, &MappingOptions::default(), &trace);
    for s in [DECODE, Scenario::Prefill { tokens: 32 }] {
        let r = run(&preset, &shape, &mapping, &trace, s);
        let e = &r.energy;
        let by_component: f64 = Component::ALL.iter().map(|&c| e.component(c)).sum();
        assert_eq!(
            by_component,
            e.total(),
            "components must add up to the total exactly"
        );
        let by_layer: f64 =
            (0..shape.num_layers).map(|l| e.layer(l)).sum::<f64>() + e.global.iter().sum::<f64>();
        assert!(
            (by_layer - e.total()).abs() <= 1e-12 * e.total(),
            "layers + global {by_layer} vs total {}",
            e.total()
        );
        assert_eq!(e.per_layer.len(), shape.num_layers);
        // Every layer does analog and digital work.
        for l in 0..shape.num_layers {
            assert!(e.per_layer[l][Component::Adc as usize] > 0.0);
            assert!(e.per_layer[l][Component::DigitalAttention as usize] > 0.0);
        }
        assert!(e.total() > 0.0 && r.tokens_per_s > 0.0 && r.latency_per_token_s > 0.0);
    }
}

#[test]
fn doubling_adc_energy_changes_only_the_adc_share_by_exactly_its_amount() {
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let mut doubled = preset.clone();
    doubled
        .cost
        .as_mut()
        .unwrap()
        .analog
        .adc_energy_per_conversion_j
        .value *= 2.0;
    let shape = small_moe();
    let trace = shape.synthetic_trace(64, 5);
    let mapping = map(&preset, &shape, &MappingOptions::default(), &trace);
    let a = run(&preset, &shape, &mapping, &trace, DECODE).energy;
    let b = run(&doubled, &shape, &mapping, &trace, DECODE).energy;
    for c in Component::ALL {
        if c == Component::Adc {
            assert_eq!(b.component(c), 2.0 * a.component(c));
        } else {
            assert_eq!(b.component(c), a.component(c), "{c:?} changed");
        }
    }
    let added = b.total() - a.total();
    assert!(
        (added - a.component(Component::Adc)).abs() <= 1e-12 * a.total(),
        "total grew by {added}, ADC was {}",
        a.component(Component::Adc)
    );
    // Exactly, per layer: the ADC column doubles, every other entry is unchanged.
    for (ra, rb) in a.per_layer.iter().zip(&b.per_layer) {
        for k in 0..N_COMPONENTS {
            let want = if k == Component::Adc as usize {
                2.0 * ra[k]
            } else {
                ra[k]
            };
            assert_eq!(rb[k], want);
        }
    }
}

#[test]
fn all_digital_experts_spend_no_analog_energy() {
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let shape = small_moe();
    let trace = shape.synthetic_trace(64, 9);
    let opts = MappingOptions {
        strategy: Strategy::Heterogeneous,
        digital_fraction: 1.0,
        digital_selection: DigitalSelection::Random { seed: 1 },
        analog_shared: false,
    };
    let mapping = map(&preset, &shape, &opts, &trace);
    assert!(mapping.analog.is_empty());
    let e = run(&preset, &shape, &mapping, &trace, DECODE).energy;
    assert_eq!(e.analog(), 0.0);
    for c in [
        Component::Crossbar,
        Component::Dac,
        Component::Adc,
        Component::TierSwitch,
        Component::Interconnect,
    ] {
        assert_eq!(e.component(c), 0.0, "{c:?}");
    }
    assert!(e.component(Component::DigitalMatmul) > 0.0);
}

#[test]
fn decode_latency_grows_with_tiers_per_stack_when_experts_share_stacks() {
    let shape = small_moe();
    let trace = shape.synthetic_trace(128, 11);
    for batch in [1, 4] {
        let s = Scenario::Decode { batch, context: 64 };
        let mut last = 0.0;
        let mut last_switches = 0.0;
        for tiers in [1, 2, 4, 8] {
            let mut preset = TilePreset::builtin("aimc-3d").unwrap();
            preset.stack.tiers_per_stack = tiers;
            let mapping = map(&preset, &shape, &MappingOptions::default(), &trace);
            let r = run(&preset, &shape, &mapping, &trace, s);
            assert!(
                r.step_time_s >= last,
                "batch {batch}: {tiers} tiers give {} s, fewer gave {last} s",
                r.step_time_s
            );
            assert!(r.tier_switches_per_token >= last_switches);
            if tiers == 1 {
                assert_eq!(r.tier_switches_per_token, 0.0, "one tier never switches");
            }
            last = r.step_time_s;
            last_switches = r.tier_switches_per_token;
        }
        assert!(last_switches > 0.0);
    }
}

#[test]
fn analog_projections_move_attention_projections_and_lm_head_off_the_digital_units() {
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let shape = small_moe();
    let trace = shape.synthetic_trace(64, 2);
    let mapping = map(&preset, &shape, &MappingOptions::default(), &trace);
    let cost = preset.cost.as_ref().unwrap();
    let digital = EnergyModel::new(cost, &mapping, &shape, Projections::Digital)
        .run(&trace, DECODE, 4)
        .unwrap();
    let analog = EnergyModel::new(cost, &mapping, &shape, Projections::Analog)
        .run(&trace, DECODE, 4)
        .unwrap();
    assert!(
        analog.energy.component(Component::Crossbar)
            > digital.energy.component(Component::Crossbar)
    );
    assert!(
        analog.energy.component(Component::DigitalMatmul)
            < digital.energy.component(Component::DigitalMatmul)
    );
    // Attention itself (QKᵀ, softmax, AV) stays digital in both.
    assert_eq!(
        analog.energy.component(Component::DigitalAttention),
        digital.energy.component(Component::DigitalAttention)
    );
}

#[test]
fn gpu_decode_is_memory_bound_and_long_prefill_compute_bound() {
    use aimc::energy::gpu::estimate;
    use aimc::energy::GpuPreset;
    let gpu = GpuPreset::resolve("h100").unwrap();
    let shape = ModelShape::olmoe_1b_7b();
    let trace = shape.synthetic_trace(256, 4);
    let d = estimate(&gpu, &shape, &trace, 1, 512, false);
    assert!(d.memory_bound);
    assert_eq!(
        d.step_time_s,
        d.bytes_per_step / gpu.hbm_bandwidth_bytes_per_s.value
    );
    // Batch 1 reads attention + LM head + 8 experts per layer (bf16) plus 512 positions of KV cache.
    let weights = 16.0 * 4.0 * 2048.0 * 2048.0
        + 50304.0 * 2048.0
        + 16.0 * (8.0 * 3.0 * 2048.0 * 1024.0 + 2048.0 * 64.0);
    let kv = 512.0 * 16.0 * 4096.0;
    assert!(
        (d.bytes_per_step - 2.0 * (weights + kv)).abs() < 1.0,
        "{}",
        d.bytes_per_step
    );
    assert_eq!(d.energy_per_token_j, 700.0 * d.step_time_s);
    let p = estimate(&gpu, &shape, &trace, 4096, 0, true);
    assert!(!p.memory_bound);
    assert_eq!(
        p.step_time_s,
        p.flops_per_step / gpu.peak_bf16_flops_per_s.value
    );
}

#[test]
fn energy_cli_writes_report_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args([
            "energy",
            "--shape",
            "olmoe1b7b",
            "--batch",
            "1,4",
            "--steps",
            "2",
            "--trace-tokens",
            "64",
        ])
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("energy.json")).unwrap())
            .unwrap();
    assert_eq!(v["decode"].as_array().unwrap().len(), 2);
    // Every component and resource is a named field; the system and bottleneck are in words.
    let d0 = &v["decode"][0];
    assert!(d0["energy"]["components"]["adc_j"].as_f64().unwrap() > 0.0);
    assert!(d0["busy_per_step"]["off_chip_memory_s"].is_number());
    assert!(d0["static_energy"]["digital_units_j"].is_number());
    assert!(!d0["bottleneck"]["description"].as_str().unwrap().is_empty());
    assert!(v["system"]
        .as_str()
        .unwrap()
        .contains("every linear layer analog"));
    for f in [
        "breakdown.png",
        "energy_vs_batch.png",
        "throughput_vs_batch.png",
        "busy_vs_batch.png",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_aimc"))
        .args([
            "energy",
            "--shape",
            "olmoe1b7b",
            "--preset",
            "aihwkit-default",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no `cost` section"));
}
