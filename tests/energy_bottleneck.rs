//! Bottleneck attribution: for each resource, a chip where that resource binds is named as the bottleneck, its busy
//! time sets the step time, and the description says so in words. Also the errors of impossible inputs.
use aimc::energy::{
    check_options, map_shape, paper_mapping, CostModel, EnergyModel, EnergyOptions, ModelShape,
    PhaseCost, Projections, Scenario,
};
use aimc::mapping::MappingOptions;
use aimc::tile::TilePreset;

fn shape() -> ModelShape {
    // d = 512, 4 layers, 8 experts of width 512, top-2.
    ModelShape::synthetic("small-moe", 512, 4, 8, 2, 512)
}

/// Decode at `batch` and `context` on aimc-3d with `tweak` applied to its cost section.
fn decode(batch: usize, context: usize, tweak: impl Fn(&mut CostModel)) -> PhaseCost {
    let mut preset = TilePreset::builtin("aimc-3d").unwrap();
    tweak(preset.cost.as_mut().unwrap());
    let shape = shape();
    let trace = shape.synthetic_trace(256, 5);
    let opts = paper_mapping(MappingOptions::default(), Projections::Analog);
    let mapping = map_shape(&preset, &shape, &opts, &|_| None, &trace).unwrap();
    EnergyModel::new(
        preset.cost.as_ref().unwrap(),
        &mapping,
        &shape,
        Projections::Analog,
    )
    .run(&trace, Scenario::Decode { batch, context }, 4)
    .unwrap()
}

fn assert_binds(p: &PhaseCost, resource: &str, words: &str) {
    assert_eq!(
        p.bottleneck.resource, resource,
        "{}: {:?}",
        p.bottleneck.description, p.busy_per_step
    );
    assert!(
        p.bottleneck.description.contains(words),
        "`{}` should mention `{words}`",
        p.bottleneck.description
    );
    let (_, _, busy) = p
        .busy_per_step
        .entries()
        .into_iter()
        .find(|e| e.0 == resource)
        .unwrap();
    // The step is the chain plus (n − 1)/n of the busiest shared resource, and nothing is busier than the binder.
    let n = p.scenario.tokens_per_step() as f64;
    let chain = p.busy_per_step.dependency_chain_s;
    let shared = p.busy_per_step.entries()[..6]
        .iter()
        .map(|e| e.2)
        .fold(0.0, f64::max);
    let want = chain + shared * (n - 1.0) / n;
    assert!(
        (p.step_time_s - want).abs() <= 1e-9 * want,
        "step {} vs {want}",
        p.step_time_s
    );
    for (k, _, t) in p.busy_per_step.entries() {
        assert!(
            t <= busy * (1.0 + 1e-12),
            "{k} busier ({t}) than {resource} ({busy})"
        );
    }
    assert!(
        (p.tokens_per_s - p.scenario.tokens_per_step() as f64 / p.step_time_s).abs()
            < 1e-6 * p.tokens_per_s
    );
}

#[test]
fn a_single_token_is_bound_by_its_dependency_chain() {
    let p = decode(1, 16, |_| {});
    assert_binds(
        &p,
        "dependency_chain",
        "dependency chain of one token through 4 layers",
    );
}

#[test]
fn slow_tiers_make_the_busiest_stack_bind() {
    let p = decode(64, 16, |c| c.analog.tier_mvm_time_s.value = 1e-3);
    assert_binds(&p, "busiest_stack", "tier MVMs on");
}

#[test]
fn slow_norms_make_the_digital_units_bind() {
    let p = decode(64, 16, |c| c.digital.norm.ops_per_s.value = 1e6);
    assert_binds(&p, "digital_units", "digital units");
}

#[test]
fn slow_attention_makes_the_attention_units_bind() {
    let p = decode(64, 256, |c| c.digital.attention.ops_per_s.value = 1e6);
    assert_binds(&p, "attention_units", "attention units");
}

#[test]
fn slow_sram_makes_on_chip_memory_bind() {
    let p = decode(64, 64, |c| {
        c.memory.on_chip.bandwidth_bytes_per_s.value = 1e6;
    });
    assert_eq!(
        p.placement.off_chip_kv_bytes, 0.0,
        "the KV cache fits on chip"
    );
    assert_binds(&p, "on_chip_memory", "on-chip SRAM");
}

#[test]
fn kv_cache_beyond_sram_makes_off_chip_memory_bind() {
    let p = decode(64, 512, |c| {
        c.memory.on_chip.capacity_bytes.value = 1e6;
        c.memory.off_chip.bandwidth_bytes_per_s.value = 1e9;
    });
    assert!(p.placement.off_chip_kv_bytes > 0.0);
    assert_binds(&p, "off_chip_memory", "off-chip KV cache");
    // The figures in the description are the step's: KV bytes per step at the part's bandwidth.
    assert!(
        p.bottleneck.description.contains("1.0 GB/s"),
        "{}",
        p.bottleneck.description
    );
}

#[test]
fn a_slow_network_makes_the_interconnect_bind() {
    let p = decode(64, 16, |c| {
        c.interconnect.bandwidth_bytes_per_s.value = 1e6;
        c.interconnect.digital_ports.value = 1.0;
    });
    assert_binds(&p, "interconnect", "interconnect");
}

#[test]
fn static_energy_is_itemised_power_times_step_time() {
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let p = decode(8, 64, |_| {});
    let c = preset.cost.as_ref().unwrap();
    let per_token = p.step_time_s / 8.0;
    let s = &c.static_power;
    let want = [
        s.digital_units_w.value,
        s.attention_units_w.value,
        s.on_chip_memory_w.value,
        s.off_chip_memory_w.value,
    ];
    for (w, (_, j)) in want.iter().zip(p.static_energy.entries()) {
        assert!(
            (w * per_token - j).abs() <= 1e-12 * j.max(1e-30),
            "{w} W × {per_token} s vs {j} J"
        );
    }
    assert_eq!(
        p.energy.component(aimc::energy::Component::Static),
        p.static_energy.total()
    );
}

#[test]
fn impossible_memory_is_an_error_naming_the_field() {
    let mut preset = TilePreset::builtin("aimc-3d").unwrap();
    {
        let c = preset.cost.as_mut().unwrap();
        c.memory.on_chip.capacity_bytes.value = 1e6;
        c.memory.off_chip.capacity_bytes.value = 1e6;
    }
    let c = preset.cost.as_ref().unwrap();
    let shape = shape();
    let trace = shape.synthetic_trace(64, 5);
    let mapping = map_shape(
        &preset,
        &shape,
        &MappingOptions::default(),
        &|_| None,
        &trace,
    )
    .unwrap();
    let err = EnergyModel::new(c, &mapping, &shape, Projections::Analog)
        .run(
            &trace,
            Scenario::Decode {
                batch: 64,
                context: 4096,
            },
            1,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cost.memory.off_chip.capacity_bytes") && err.contains("decode B=64"),
        "{err}"
    );
}

#[test]
fn empty_batches_and_prompts_are_errors_naming_the_option() {
    let base = EnergyOptions::default();
    for (opts, words) in [
        (
            EnergyOptions {
                batches: vec![1, 0],
                ..base.clone()
            },
            "batches",
        ),
        (
            EnergyOptions {
                batches: vec![],
                ..base.clone()
            },
            "batches",
        ),
        (
            EnergyOptions {
                prefill_tokens: 0,
                ..base.clone()
            },
            "prefill_tokens",
        ),
        (
            EnergyOptions {
                decode_steps: 0,
                ..base.clone()
            },
            "decode_steps",
        ),
    ] {
        let err = check_options(&opts).unwrap_err().to_string();
        assert!(err.contains(words), "{err}");
    }
    assert!(check_options(&base).is_ok());
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aimc"))
        .arg("energy")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cli_rejects_bad_flags_and_impossible_presets_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    for (args, words) in [
        (vec!["--batch", "1,0"], vec!["--batch", "got 0"]),
        (vec!["--prefill", "0"], vec!["--prefill", "got 0"]),
        (vec!["--steps", "0"], vec!["--steps", "got 0"]),
    ] {
        let mut a = vec!["--shape", "olmoe1b7b", "--out", out];
        a.extend(args);
        let (ok, err) = cli(&a);
        assert!(!ok);
        for w in words {
            assert!(err.contains(w), "{err}");
        }
    }
    // A preset whose memory cannot hold the KV cache of the batch.
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tiles/aimc-3d.json"))
            .unwrap(),
    )
    .unwrap();
    v["cost"]["memory"]["off_chip"]["capacity_bytes"]["value"] = 1e6.into();
    let preset = dir.path().join("small-memory.json");
    std::fs::write(&preset, v.to_string()).unwrap();
    let (ok, err) = cli(&[
        "--shape",
        "olmoe1b7b",
        "--batch",
        "64",
        "--steps",
        "1",
        "--trace-tokens",
        "64",
        "--preset",
        preset.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert!(!ok);
    assert!(err.contains("cost.memory.off_chip.capacity_bytes"), "{err}");
    // An overflowing constant: rejected at load, naming the field, no hang.
    v["cost"]["memory"]["off_chip"]["capacity_bytes"]["value"] = 1.6e10.into();
    v["cost"]["digital"]["attention"]["energy_per_op_j"]["value"] = 1e308.into();
    std::fs::write(&preset, v.to_string()).unwrap();
    let (ok, err) = cli(&[
        "--shape",
        "olmoe1b7b",
        "--preset",
        preset.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert!(!ok);
    assert!(
        err.contains("cost.digital.attention.energy_per_op_j"),
        "{err}"
    );
    // A shape file with an impossible field.
    let mut s = serde_json::to_value(ModelShape::synthetic("bad", 64, 2, 4, 2, 64)).unwrap();
    s["top_k"] = 9.into();
    let shape = dir.path().join("shape.json");
    std::fs::write(&shape, s.to_string()).unwrap();
    let (ok, err) = cli(&["--shape-file", shape.to_str().unwrap(), "--out", out]);
    assert!(!ok);
    assert!(
        err.contains("top_k") && err.contains("--shape-file"),
        "{err}"
    );
}

#[test]
fn the_library_example_and_the_cli_agree() {
    // The example's OLMoE case, through the library, against the CLI with the same inputs.
    let preset = TilePreset::builtin("aimc-3d").unwrap();
    let gpu = aimc::energy::GpuPreset::resolve("h100").unwrap();
    let shape = ModelShape::olmoe_1b_7b();
    let trace = shape.synthetic_trace(64, 7);
    let opts = EnergyOptions {
        batches: vec![1, 8],
        decode_steps: 2,
        ..Default::default()
    };
    let mapping_opts = paper_mapping(MappingOptions::default(), Projections::Analog);
    let mapping = map_shape(&preset, &shape, &mapping_opts, &|_| None, &trace).unwrap();
    let lib = aimc::energy::estimate(&preset, &gpu, &shape, &mapping, &trace, &opts).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, err) = cli(&[
        "--shape",
        "olmoe1b7b",
        "--batch",
        "1,8",
        "--steps",
        "2",
        "--trace-tokens",
        "64",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("energy.json")).unwrap())
            .unwrap();
    for (i, d) in lib.decode.iter().enumerate() {
        let j = &v["decode"][i];
        assert_eq!(j["energy"]["total_j"].as_f64().unwrap(), d.energy.total());
        assert_eq!(j["tokens_per_s"].as_f64().unwrap(), d.tokens_per_s);
        assert_eq!(
            j["bottleneck"]["description"].as_str().unwrap(),
            d.bottleneck.description
        );
    }
}
