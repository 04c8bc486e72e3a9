//! Cost sections of tile presets and GPU presets: shipped constants load, bad ones are rejected naming the field.
use aimc::energy::GpuPreset;
use aimc::tile::TilePreset;

fn text(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tiles/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn costed_presets_load_and_uncosted_ones_still_do() {
    for name in ["aimc-3d", "pcm-3d-8tier", "hermes", "3dsim", "buchel2025"] {
        let p = TilePreset::builtin(name).unwrap();
        let cost = p
            .cost
            .as_ref()
            .unwrap_or_else(|| panic!("{name} has no cost"));
        for (field, value, source) in cost.table() {
            assert!(value.is_finite() && value >= 0.0, "{name} {field}");
            assert!(!source.trim().is_empty(), "{name} {field} has no source");
        }
    }
    assert!(TilePreset::builtin("aihwkit-default")
        .unwrap()
        .cost
        .is_none());
    let p = TilePreset::builtin("aimc-3d").unwrap();
    assert_eq!((p.stack.rows, p.stack.tiers_per_stack), (512, 8));
    let c = p.cost.unwrap();
    assert_eq!(c.analog.tier_mvm_time_s.value, 100e-9);
    // The 3D-SiM placeholder: 10 nJ per full 512×512 tier MVM, split over array, DAC and ADC.
    let per_mvm = c.analog.tier_mvm_energy_j.value
        + 512.0 * c.analog.dac_energy_per_conversion_j.value
        + 512.0 * c.analog.adc_energy_per_conversion_j.value;
    assert!((per_mvm - 10e-9).abs() < 1e-15, "{per_mvm}");
}

fn expect_field(json: &str, field: &str) {
    let err = TilePreset::from_json_str(json, "bad.json").unwrap_err();
    assert_eq!(err.field(), Some(field), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("bad.json") && msg.contains(field), "{msg}");
}

#[test]
fn missing_or_negative_constants_are_rejected_naming_the_field() {
    let base = text("aimc-3d");
    let v: serde_json::Value = serde_json::from_str(&base).unwrap();

    let mut missing = v.clone();
    missing["cost"]["analog"]
        .as_object_mut()
        .unwrap()
        .remove("adc_energy_per_conversion_j");
    let err = TilePreset::from_json_str(&missing.to_string(), "bad.json").unwrap_err();
    assert!(
        err.to_string().contains("adc_energy_per_conversion_j")
            && err.field() == Some("cost.analog"),
        "{err}"
    );

    let mut negative = v.clone();
    negative["cost"]["analog"]["adc_energy_per_conversion_j"]["value"] = (-1e-12).into();
    expect_field(
        &negative.to_string(),
        "cost.analog.adc_energy_per_conversion_j.value",
    );

    let mut zero_rate = v.clone();
    zero_rate["cost"]["digital"]["norm"]["ops_per_s"]["value"] = 0.0.into();
    expect_field(&zero_rate.to_string(), "cost.digital.norm.ops_per_s.value");

    let mut no_source = v.clone();
    no_source["cost"]["memory"]["off_chip"]["bandwidth_bytes_per_s"]["source"] = "".into();
    expect_field(
        &no_source.to_string(),
        "cost.memory.off_chip.bandwidth_bytes_per_s.source",
    );

    // Overflowing constants are rejected before any arithmetic.
    let mut huge = v.clone();
    huge["cost"]["analog"]["tier_mvm_energy_j"]["value"] = 1e308.into();
    expect_field(&huge.to_string(), "cost.analog.tier_mvm_energy_j.value");
    let mut tiny_rate = v.clone();
    tiny_rate["cost"]["memory"]["on_chip"]["bandwidth_bytes_per_s"]["value"] = 1e-300.into();
    expect_field(
        &tiny_rate.to_string(),
        "cost.memory.on_chip.bandwidth_bytes_per_s.value",
    );
    let mut no_kind = v.clone();
    no_kind["cost"]["memory"]["off_chip"]["kind"] = " ".into();
    expect_field(&no_kind.to_string(), "cost.memory.off_chip.kind");

    let mut no_value = v.clone();
    no_value["cost"]["interconnect"]["bandwidth_bytes_per_s"]
        .as_object_mut()
        .unwrap()
        .remove("value");
    let err = TilePreset::from_json_str(&no_value.to_string(), "bad.json").unwrap_err();
    assert_eq!(
        err.field(),
        Some("cost.interconnect.bandwidth_bytes_per_s"),
        "{err}"
    );
    assert!(err.to_string().contains("value"), "{err}");

    // NaN cannot be written in JSON; validate() rejects it on a constructed preset.
    let mut p = TilePreset::builtin("aimc-3d").unwrap();
    p.cost.as_mut().unwrap().analog.tier_switch_energy_j.value = f64::NAN;
    assert_eq!(
        p.validate().unwrap_err().field,
        "cost.analog.tier_switch_energy_j.value"
    );
}

#[test]
fn gpu_preset_loads_and_rejects_bad_constants() {
    let h100 = GpuPreset::resolve("h100").unwrap();
    assert_eq!(h100.peak_bf16_flops_per_s.value, 989e12);
    assert_eq!(h100.hbm_bandwidth_bytes_per_s.value, 3.35e12);
    assert_eq!(h100.board_power_w.value, 700.0);
    let mut v: serde_json::Value = serde_json::from_str(&text("gpu/h100")).unwrap();
    v["board_power_w"]["value"] = (-700.0).into();
    let err = GpuPreset::from_json_str(&v.to_string(), "gpu.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gpu.json") && err.contains("board_power_w"),
        "{err}"
    );
    v.as_object_mut().unwrap().remove("board_power_w");
    let err = GpuPreset::from_json_str(&v.to_string(), "gpu.json")
        .unwrap_err()
        .to_string();
    assert!(err.contains("board_power_w"), "{err}");
}
